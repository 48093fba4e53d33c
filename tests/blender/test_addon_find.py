"""The Find field (SAM 3 concept prompts) against a real worker: a word (and/or the drawn box as an example) -> one
object row per instance, rows removable before Reconstruct, then each one reconstructed and placed.

Without SAM 3 the worker's answer (how to get the weights) must reach the panel. With SAM 3 the worker runs in
$SAM3D_SAM3_PYTHON, a sam3d environment where Meta's sam3 imports (see docs/segmentation.md), with the tiny SAM 3
of tests/fixtures/sam3_tiny imported into a temporary weights folder; without that variable the test skips.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import bpy
import pytest
from conftest import PHOTO, ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "sam3_tiny"
TIMEOUT = 300.0


def run(addon) -> None:
    assert addon.session.run_until_idle(TIMEOUT), "the worker did not finish in time"


def test_find_without_sam3_says_how_to_get_it(addon, clean_scene, worker_prefs, tmp_path):
    worker_prefs.weights_dir = str(tmp_path / "weights")  # nothing imported: no SAM 3
    assert bpy.ops.sam3d.open_photo(filepath=str(PHOTO)) == {"FINISHED"}
    props = bpy.context.scene.sam3d
    with pytest.raises(RuntimeError, match="type what to find"):  # neither a word nor a box
        bpy.ops.sam3d.find_concept()
    props.find_text = "cup"
    assert bpy.ops.sam3d.find_concept() == {"FINISHED"}
    run(addon)
    assert props.status_level == "ERROR" and "no SAM 3 weights are imported" in props.status, props.status
    assert "facebook/sam3" in props.status and "import-sam" in props.status
    assert len(props.items) == 0


def _sam3_python() -> str:
    py = os.environ.get("SAM3D_SAM3_PYTHON", "")
    if not py or not os.path.isfile(py):
        pytest.skip("set $SAM3D_SAM3_PYTHON to a sam3d environment where Meta's sam3 imports (docs/segmentation.md)")
    probe = subprocess.run(
        [py, "-c", "from sam3d_core.segment.sam3 import import_error; import sys; sys.exit(import_error() or 0)"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if probe.returncode != 0:
        pytest.skip(f"sam3 does not import in {py}: {probe.stderr.strip()[-300:]}")
    return py


def test_find_field_lists_every_instance_and_each_is_placed(addon, clean_scene, worker_prefs, tmp_path):
    py = _sam3_python()
    weights = tmp_path / "weights"
    env = {**os.environ, "SAM3D_HOME": str(weights), "PYTHONPATH": str(ROOT)}
    tiny = str(FIXTURE / "sam3_tiny.safetensors")
    done = subprocess.run(
        [py, "-m", "sam3d_core.cli", "weights", "import-sam", tiny, "--name", "tiny3"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    meta = json.loads((FIXTURE / "cases.json").read_text())
    case = next(c for c in meta["cases"] if c["name"] == "combined")
    addon.session.SESSION.stop()  # a worker of this Python with these weights
    worker_prefs.python, worker_prefs.weights_dir = py, str(weights)

    assert bpy.ops.sam3d.open_photo(filepath=str(FIXTURE / "photo.png")) == {"FINISHED"}
    props = bpy.context.scene.sam3d
    x0, y0, x1, y1, _ = case["boxes"][0]
    props.use_box, props.box = True, (max(x0, 0), y0, x1, min(y1, props.height))  # the drawn box: an example
    props.find_text, props.find_min_score = case["text"], meta["threshold"]
    assert bpy.ops.sam3d.find_concept() == {"FINISHED"}
    run(addon)
    assert [it.name for it in props.items] == [f"red_mug_{i}" for i in range(case["kept"])], props.status
    assert all(it.status == "MASKED" and Path(it.mask).is_file() and it.message.startswith("score ")
               for it in props.items)  # fmt: skip
    assert f"found {case['kept']} red mug" in props.status
    props.active_item = len(props.items) - 1  # the weakest: removed before Reconstruct
    assert bpy.ops.sam3d.remove_item() == {"FINISHED"}
    assert len(props.items) == case["kept"] - 1
    assert bpy.ops.sam3d.reconstruct() == {"FINISHED"}
    run(addon)
    centres = []
    for it in props.items:
        assert it.status == "DONE", it.message
        obj = it.object
        assert obj is not None and obj.name == it.name and props.collection in obj.users_collection
        assert obj["sam3d_mask"] == os.path.abspath(it.mask)  # the instance mask it was made from
        # placed: its vertices (world space) lie in front of the photo's camera (random weights: not always inside
        # the frame), each instance somewhere else
        from bpy_extras.object_utils import world_to_camera_view
        from mathutils import Vector

        meshes = [o for o in (obj, *obj.children_recursive) if o.type == "MESH"]
        world = [o.matrix_world @ Vector(v.co) for o in meshes for v in o.data.vertices]
        assert world, f"{obj.name} has no mesh"
        centre = sum(world, Vector()) / len(world)
        ndc = world_to_camera_view(bpy.context.scene, props.camera, centre)
        assert ndc.z > 0, (obj.name, tuple(ndc))
        centres.append(centre)
    assert all((a - b).length > 1e-6 for i, a in enumerate(centres) for b in centres[i + 1 :]), centres
    addon.session.SESSION.stop()
