"""The app's process stays light: it never imports torch, and sam3d_core.app imports only the worker's stdlib
client and installer, geometry.frames (numpy) and its own modules; the installer is stdlib only."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_layering import import_graph

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"sam3d_core.serve.protocol", "sam3d_core.serve.client", "sam3d_core.serve.installer",
           "sam3d_core.geometry.frames", "sam3d_core.version"}  # fmt: skip
PARENTS = {"sam3d_core", "sam3d_core.serve", "sam3d_core.geometry", "sam3d_core.app"}  # package __init__s


def test_app_imports_only_the_client_frames_and_itself():
    graph = import_graph("sam3d_core")
    app = {m: edges for m, edges in graph.items() if m.startswith("sam3d_core.app")}
    assert len(app) >= 10, sorted(app)
    bad = {m: sorted(e for e in edges if not e.startswith("sam3d_core.app") and e not in ALLOWED | PARENTS)
           for m, edges in app.items()}  # fmt: skip
    assert {m: e for m, e in bad.items() if e} == {}
    # and, of the other packages, the app takes only numpy, PySide6 and the standard library
    for path in sorted((ROOT / "sam3d_core" / "app").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in ("numpy", "PySide6", "sam3d_core"), (path, name)


def test_the_app_process_never_loads_torch(tmp_path):
    """Build the whole window (offscreen) with every app module imported: torch stays out of the process."""
    pytest.importorskip("PySide6")
    code = (
        "import sys, pkgutil, importlib\n"
        "from PySide6.QtWidgets import QApplication\n"
        "from PySide6.QtCore import QSettings\n"
        "import sam3d_core.app as pkg\n"
        "for m in pkgutil.iter_modules(pkg.__path__): importlib.import_module('sam3d_core.app.' + m.name)\n"
        "import sam3d_core.cli.app\n"
        "app = QApplication([])\n"
        "from sam3d_core.app.window import MainWindow\n"
        f"w = MainWindow(QSettings({str(tmp_path / 's.ini')!r}, QSettings.Format.IniFormat))\n"
        "w.show(); app.processEvents()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'PIL', 'trimesh', 'scipy', 'cv2')))\n"
    )
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_installer_is_stdlib_only():
    # -I -S: no site-packages, so the add-on can vendor it into Blender's Python
    code = "import sys; sys.path.insert(0, sys.argv[1]); import sam3d_core.serve.installer as i; print(i.DIST_NAME)"
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(ROOT)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "sam3d-kit"
