"""The desktop app (`sam3d app`): a second thin client of the worker (`sam3d serve`), like the Blender add-on.

The UI process never imports torch: it talks to the worker through the stdlib client (serve/client.py) and
imports only numpy, geometry.frames and PySide6 besides its own modules (tests/test_app_layering.py).
`panel.Panel` is the dockable part (photo, objects, settings); `window.MainWindow` adds the 3D view and menus.
Nothing is imported here, so `import sam3d_core.app` does not need PySide6.
"""
