"""Blender tests: run with the `bpy` wheel's Python (`make test-blender`, .venv-blender), never by the main suite.

    .venv-blender/bin/python -m pytest -q --confcutdir=tests/blender tests/blender

Without `bpy` (the main .venv) nothing here is collected. `--confcutdir` keeps pytest from loading
tests/conftest.py, which imports torch (not in the Blender environment).

Blender's user folders (preferences, installed extensions) point at a temporary folder, so the tests never
touch ~/.config/blender. The add-on under test is the zip that `make addon` builds, installed into that
folder's "user_default" repository and enabled as Blender would.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
for p in (str(ROOT), str(ROOT / "addon"), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

if importlib.util.find_spec("bpy") is None:
    collect_ignore_glob = ["test_*.py"]  # the main suite (.venv, no bpy): not ours to run
else:
    _USER = tempfile.mkdtemp(prefix="sam3d_blender_user_")
    os.environ.setdefault("BLENDER_USER_RESOURCES", _USER)  # before bpy is imported anywhere

ADDON_ID = "sam3d_blender"
MODULE = f"bl_ext.user_default.{ADDON_ID}"
PHOTO = ROOT / "assets" / "examples" / "coffee.png"
MASK = ROOT / "assets" / "examples" / "coffee_mask.png"
ARTIFACTS = ROOT / "build" / "test_artifacts"


def load_build_module():
    """addon/build.py as a module (not importable by name: `build` is also a PyPI package)."""
    spec = importlib.util.spec_from_file_location("sam3d_addon_build", ROOT / "addon" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


if "collect_ignore_glob" not in globals():
    load_build_module().vendor()  # sam3d_blender.worker_client, made as `make addon` makes it


def worker_python() -> str | None:
    """The sam3d environment the worker runs in: $SAM3D_PYTHON, else the checkout's .venv."""
    for cand in (os.environ.get("SAM3D_PYTHON"), str(ROOT / ".venv" / "bin" / "python")):
        if cand and os.path.isfile(cand):
            return cand
    return None


@pytest.fixture(scope="session")
def addon_zip(tmp_path_factory) -> Path:
    return load_build_module().build_zip(tmp_path_factory.mktemp("dist") / "sam3d_blender.zip")


@pytest.fixture(scope="session")
def addon(addon_zip):
    """The installed and enabled add-on's module (bl_ext.user_default.sam3d_blender)."""
    import bpy  # noqa: I001 (bpy first: it puts Blender's script folders, addon_utils, on sys.path)
    import addon_utils

    if MODULE not in sys.modules:
        result = bpy.ops.extensions.package_install_files(
            filepath=str(addon_zip), repo="user_default", enable_on_install=True
        )
        assert result == {"FINISHED"}, result
    addon_utils.enable("io_scene_gltf2", default_set=True)
    mod = sys.modules[MODULE]
    yield mod
    mod.session.shutdown()


@pytest.fixture
def prefs(addon):
    import bpy

    p = bpy.context.preferences.addons[MODULE].preferences
    saved = {
        k: getattr(p, k)
        for k in (
            "python",
            "model",
            "device",
            "steps",
            "seed",
            "output_dir",
            "preference_log",
            "weights_dir",
            "textured",
            "texture_size",
            "faces",
        )
    }
    yield p
    for k, v in saved.items():
        setattr(p, k, v)


@pytest.fixture
def clean_scene(addon, tmp_path):
    """An empty scene (no objects, collections, cameras, images) with fresh SAM 3D properties."""
    import bpy

    for coll in (
        bpy.data.objects,
        bpy.data.collections,
        bpy.data.meshes,
        bpy.data.cameras,
        bpy.data.materials,
        bpy.data.images,
        bpy.data.lights,
    ):
        for block in list(coll):
            coll.remove(block)
    scene = bpy.context.scene
    props = scene.sam3d
    props.items.clear()
    props.prompts.clear()
    props.photo = props.draft_mask = props.status = props.K = ""
    props.use_box = False
    addon.session.TASKS.clear()
    addon.scene.UNDO_LOG.clear()
    return scene


@pytest.fixture
def worker_prefs(prefs, tmp_path):
    """Preferences that start the real worker with the tiny model on the CPU, outputs under tmp_path; stage 1
    only (textured=False) unless a test turns the textured mesh on (small texture, few faces)."""
    python = worker_python()
    if python is None:
        pytest.skip("no sam3d environment for the worker: run `make install` (creates .venv) or set $SAM3D_PYTHON")
    prefs.python, prefs.model, prefs.device, prefs.steps, prefs.seed = python, "tiny", "cpu", 1, 42
    prefs.textured, prefs.texture_size, prefs.faces = False, 64, 500
    prefs.output_dir = str(tmp_path / "out")
    prefs.preference_log = str(tmp_path / "preferences.jsonl")
    return prefs


_EXIT = {"status": 0}


def pytest_sessionfinish(session, exitstatus):
    _EXIT["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """The bpy 4.2 module segfaults in its exit handlers after an in-process Cycles render (everything is
    written by then); leave without them so that pytest's own exit status is the process's."""
    if "bpy" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT["status"])
