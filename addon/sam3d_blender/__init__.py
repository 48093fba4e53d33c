"""SAM 3D Objects for Blender: click objects in a photo, get them as placed, textured 3D objects.

The add-on never imports torch: the model runs in a separate worker process (`sam3d serve`), reached
through the stdlib-only client vendored into `worker_client/` by `make addon`. Parts without bpy live in
`core/` (camera geometry, scene files, the preference log, setup checks).
"""

from __future__ import annotations

_MODULES = ("properties", "preferences", "operators", "panels", "install")


def _modules():
    import importlib

    return [importlib.import_module(f".{name}", __package__) for name in _MODULES]


def importlib_module(name: str):
    import importlib

    return importlib.import_module(f".{name}", __package__)


def register() -> None:
    import bpy

    from . import overlay, properties

    properties.register()
    for mod in _modules()[1:]:
        for cls in mod.CLASSES:
            bpy.utils.register_class(cls)
    overlay.register()


def unregister() -> None:
    import bpy

    from . import overlay, properties, session

    session.shutdown()
    importlib_module("install").unregister()
    overlay.unregister()
    for mod in reversed(_modules()[1:]):
        for cls in reversed(mod.CLASSES):
            bpy.utils.unregister_class(cls)
    properties.unregister()
