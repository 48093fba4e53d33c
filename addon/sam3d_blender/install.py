"""First run in Blender: make the worker's private environment (the vendored worker_client/installer.py) when no
sam3d environment is found. Asks for Blender's online access before any download; the install runs on a thread,
a timer copies its progress into the window manager (shown in the preferences), and the Worker Python is set
when it is done."""

from __future__ import annotations

import threading

import bpy

from . import preferences
from .worker_client import installer

STATE: dict = {"thread": None, "cancel": None, "fraction": 0.0, "message": "", "python": "", "error": "", "log": ""}
ONLINE_ACCESS_FIX = (
    "Blender's online access is off: allow it in Preferences > System > Network > Allow Online Access "
    "(the setup downloads torch and sam3d), then try again"
)


def running() -> bool:
    return STATE["thread"] is not None and STATE["thread"].is_alive()


def _run(plan, cancel: threading.Event) -> None:
    def progress(step: str, fraction: float, message: str) -> None:
        STATE["fraction"], STATE["message"] = fraction, f"{step}: {message}"

    try:
        result = installer.install(plan, progress=progress, cancel=cancel)
        STATE["python"], STATE["log"] = result.python, result.log
        STATE["message"] = f"done in {result.seconds:.0f} s: torch {result.doctor.get('torch')}"
    except installer.InstallError as e:
        STATE["error"], STATE["log"] = e.message, e.log or ""


def _timer() -> float | None:
    wm = bpy.context.window_manager
    if wm is not None:
        text = STATE["error"] and f"Problem: {STATE['error']} (nothing was left installed; log: {STATE['log']})"
        wm["sam3d_install_status"] = text or f"{STATE['fraction'] * 100:.0f}% {STATE['message']}"
    if running():
        return 0.5
    prefs = preferences.get()
    if STATE["python"] and prefs is not None:
        prefs.python = STATE["python"]  # the worker starts from it on the next request
    return None


def start(prefs, target: str = "", index_url: str | None = None, torch_index: str | None = "auto") -> str:
    """Start the install (non-blocking); returns the plan's description. Raises PermissionError without
    online access, installer.InstallError when the plan cannot be made."""
    if not bpy.app.online_access:
        raise PermissionError(ONLINE_ACCESS_FIX)
    if running():
        raise RuntimeError("the worker environment is already being set up")
    plan = installer.plan_install(target or None, index_url=index_url, torch_index=torch_index)
    cancel = threading.Event()
    STATE.update(cancel=cancel, fraction=0.0, message="starting", python="", error="", log="")
    STATE["thread"] = threading.Thread(target=_run, args=(plan, cancel), name="sam3d-install", daemon=True)
    STATE["thread"].start()
    if not bpy.app.timers.is_registered(_timer):
        bpy.app.timers.register(_timer, first_interval=0.5, persistent=True)
    return plan.describe()


class SAM3D_OT_install_worker(bpy.types.Operator):
    """Make a private Python environment for the worker: torch for this computer's GPU (or CPU), then sam3d.
    Downloads about 0.3 GB (CPU) to 3 GB (NVIDIA GPU) from the internet"""

    bl_idname = "sam3d.install_worker"
    bl_label = "Set Up the Worker"

    target: bpy.props.StringProperty(name="Folder", default="", description="Empty: sam3d's data folder")

    def execute(self, context):
        try:
            what = start(preferences.get(context), self.target)
        except PermissionError as e:
            self.report({"ERROR"}, str(e))
            context.window_manager["sam3d_install_status"] = f"Problem: {e}"
            return {"CANCELLED"}
        except (RuntimeError, installer.InstallError) as e:
            self.report({"ERROR"}, getattr(e, "message", str(e)))
            return {"CANCELLED"}
        self.report({"INFO"}, f"setting up {what}")
        return {"FINISHED"}


class SAM3D_OT_cancel_install(bpy.types.Operator):
    """Stop the worker setup (what was installed so far is removed)"""

    bl_idname = "sam3d.cancel_install"
    bl_label = "Cancel Setup"

    def execute(self, context):
        if STATE["cancel"] is not None:
            STATE["cancel"].set()
        return {"FINISHED"}


def draw(layout, context) -> None:
    """The first-run box of the preferences: shown while no worker Python is set or found."""
    box = layout.box()
    box.label(text="No sam3d worker environment found", icon="ERROR")
    if not bpy.app.online_access:
        box.label(text="Allow online access (Preferences > System > Network) to set it up here", icon="INFO")
    row = box.row()
    row.enabled = not running()
    row.operator("sam3d.install_worker", icon="IMPORT")
    if running():
        box.operator("sam3d.cancel_install", icon="CANCEL")
    status = context.window_manager.get("sam3d_install_status")
    if status:
        box.label(text=str(status))


def unregister() -> None:
    if STATE["cancel"] is not None:
        STATE["cancel"].set()
    if bpy.app.timers.is_registered(_timer):
        bpy.app.timers.unregister(_timer)


CLASSES = (SAM3D_OT_install_worker, SAM3D_OT_cancel_install)
