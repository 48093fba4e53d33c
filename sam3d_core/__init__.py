"""SAM 3D Objects, reimplemented: photo + mask -> placed, textured 3D objects.

    from sam3d_core import Pipeline
    pipe, which = Pipeline.load()                  # the best model there is, and a sentence saying which
    ctx = pipe.open_photo("photo.jpg")              # checked once: size, EXIF turn, intrinsics, point map
    results = pipe.reconstruct(ctx, ["mask.png"])   # one ObjectResult per mask: mesh, Gaussians, pose
    pipe.export(ctx, results, "out/")               # NAME.glb, NAME.ply, scene.glb, scene.json

Importing this package loads nothing: each name below is imported on first use.
"""

from __future__ import annotations

import importlib

from sam3d_core.version import __version__

_EXPORTS = {
    "Pipeline": "sam3d_core.pipeline.reconstruct",
    "PhotoContext": "sam3d_core.pipeline.reconstruct",
    "ObjectResult": "sam3d_core.pipeline.reconstruct",
    "ReconstructionError": "sam3d_core.pipeline.errors",
    "GPUOutOfMemory": "sam3d_core.pipeline.errors",
    "InputError": "sam3d_core.inputs.imageio",
    "load_photo": "sam3d_core.inputs.imageio",
    "load_mask": "sam3d_core.inputs.imageio",
    "CheckpointError": "sam3d_core.weights.store",
    "Prompt": "sam3d_core.segment",
    "load_segmenter": "sam3d_core.segment",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sam3d_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
