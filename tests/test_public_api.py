"""The public surface: `sam3d_core.__all__`, the console script, and the README's Python example, run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

import sam3d_core

ROOT = Path(__file__).resolve().parents[1]

PUBLIC = [
    "__version__",
    "Pipeline",
    "PhotoContext",
    "ObjectResult",
    "ReconstructionError",
    "GPUOutOfMemory",
    "InputError",
    "load_photo",
    "load_mask",
    "CheckpointError",
    "Prompt",
    "load_segmenter",
]


def test_all_is_pinned_and_every_name_resolves():
    assert sam3d_core.__all__ == PUBLIC
    for name in PUBLIC:
        assert getattr(sam3d_core, name) is not None, name
    assert issubclass(sam3d_core.InputError, ValueError) and issubclass(sam3d_core.GPUOutOfMemory, RuntimeError)
    assert sam3d_core.Pipeline.__module__ == "sam3d_core.pipeline.reconstruct"


def test_console_script_points_at_the_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"sam3d": "sam3d_core.cli.main:main"}
    from sam3d_core.cli.main import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"weights", "segment", "reconstruct", "scene", "demo", "doctor", "serve"} <= set(commands)


def test_readme_python_example_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- python-example[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its Python example (marked <!-- python-example -->)"
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    out = subprocess.run(
        [sys.executable, "-c", m.group(1)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "SAM3D_HOME": str(tmp_path / "home")},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tiny random-weight model" in out.stdout and "object_0" in out.stdout
    files = {p.name for p in (tmp_path / "python_out").iterdir()}
    assert {"object_0.glb", "object_0.ply", "scene.glb", "scene.json"} <= files
