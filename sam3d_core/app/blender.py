""" "Open in Blender": an exported scene.json -> a .blend through the add-on's scene builder (the one `make demo`
uses: addon/sam3d_blender/demo_scene.py), run by Blender or by a Python that has the `bpy` module."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sam3d_core.serve import installer


@dataclass(frozen=True)
class BlenderRunner:
    kind: str  # "blender" (the executable) or "bpy" (a Python with the bpy module)
    path: str
    addon_dir: str | None  # the folder holding sam3d_blender/ (a checkout's addon/); None: the installed extension


def _addon_dir() -> str | None:
    checkout = installer.source_checkout(__file__)
    return str(checkout / "addon") if checkout and (checkout / "addon" / "sam3d_blender").is_dir() else None


def find_runner(configured: str = "", environ: dict | None = None) -> BlenderRunner | None:
    """The setting (a blender executable, or a python with bpy); $SAM3D_BLENDER_PYTHON; the checkout's
    .venv-blender (`make install-blender`); `blender` on PATH."""
    env = os.environ if environ is None else environ
    addon = _addon_dir()
    for path in (configured, env.get("SAM3D_BLENDER_PYTHON")):
        if path and os.path.isfile(path):
            kind = "bpy" if os.path.basename(path).startswith("python") else "blender"
            return BlenderRunner(kind, path, addon)
    if addon:
        venv = (
            Path(addon).parent / ".venv-blender" / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
        )
        if venv.is_file():
            return BlenderRunner("bpy", str(venv), addon)
    exe = shutil.which("blender", path=env.get("PATH"))
    return BlenderRunner("blender", exe, addon) if exe else None


def build_command(runner: BlenderRunner, scene_json: str, blend: str) -> tuple[list[str], dict]:
    """(command, environment) that writes `blend` from `scene_json` with demo_scene."""
    args = [os.path.abspath(scene_json), "--blend", os.path.abspath(blend)]
    env = dict(os.environ)
    if runner.kind == "bpy":
        if runner.addon_dir is None:
            raise FileNotFoundError("the Blender add-on's source (addon/) is not here; set a blender executable")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (runner.addon_dir, env.get("PYTHONPATH", "")) if p)
        return [runner.path, "-m", "sam3d_blender.demo_scene", *args], env
    module = "sam3d_blender.demo_scene" if runner.addon_dir else "bl_ext.user_default.sam3d_blender.demo_scene"
    expr = (
        "import sys, importlib; "
        + (f"sys.path.insert(0, {runner.addon_dir!r}); " if runner.addon_dir else "")
        + f"sys.exit(importlib.import_module({module!r}).main({args!r}))"
    )
    return [runner.path, "-b", "--python-exit-code", "1", "--python-expr", expr], env


def open_command(blend: str, runner: BlenderRunner | None) -> str:
    """The command that opens the .blend in Blender (what the window shows)."""
    exe = runner.path if runner is not None and runner.kind == "blender" else "blender"
    return f'"{exe}" "{os.path.abspath(blend)}"' if " " in exe + blend else f"{exe} {os.path.abspath(blend)}"


def write_blend(runner: BlenderRunner, scene_json: str, blend: str, timeout: float = 300) -> str:
    """Run the scene builder; returns its output. Raises RuntimeError with its last lines when it fails."""
    cmd, env = build_command(runner, scene_json, blend)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0 or not os.path.isfile(blend):
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"Blender could not build {blend} (exit code {proc.returncode}): {tail}")
    return proc.stdout
