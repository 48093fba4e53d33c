"""The whole flow against a real worker process (tiny random-weight model on the CPU):
photo -> camera -> masks (clicks, or mask files) -> Reconstruct -> placed objects; cancel, undo, errors,
re-roll and best of N. Operators are called as the UI calls them; `session.run_until_idle` plays the
timer that Blender's event loop would run.
"""

from __future__ import annotations

import json
import os

import bpy
import numpy as np
import pytest
from bpy_extras.object_utils import world_to_camera_view
from conftest import MASK, PHOTO
from glb_writer import read_glb_positions

W, H = 600, 400
TIMEOUT = 180.0


@pytest.fixture
def flow(addon, clean_scene, worker_prefs):
    """A scene with the example photo opened (camera made) and the worker started."""
    assert bpy.ops.sam3d.open_photo(filepath=str(PHOTO)) == {"FINISHED"}
    assert addon.session.SESSION.state in ("starting", "ready")
    return addon


def wait_ready(addon) -> dict:
    s = addon.session.SESSION
    import time

    deadline = time.monotonic() + TIMEOUT
    while s.poll() == "starting" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.state == "ready", s.error
    return s.hello


def object_steps(addon) -> list[str]:
    """The undo steps pushed for arriving objects (a camera refined from the photo's metadata adds its own)."""
    return [m for m in addon.scene.UNDO_LOG if not m.startswith("SAM 3D: camera")]


def run(addon) -> None:
    assert addon.session.run_until_idle(TIMEOUT), "the worker did not finish in time"


def add_mask(name: str, path=MASK) -> None:
    assert bpy.ops.sam3d.add_mask(filepath=str(path), name=name) == {"FINISHED"}


def reconstruct_one(addon, name="cup", add=True):
    if add:
        add_mask(name)
    assert bpy.ops.sam3d.reconstruct() == {"FINISHED"}
    run(addon)
    item = bpy.context.scene.sam3d.items[name]
    assert item.status == "DONE", item.message
    return item


def test_open_photo_makes_the_matched_camera(flow):
    props = bpy.context.scene.sam3d
    cam = props.camera
    assert bpy.context.scene.camera == cam and (props.width, props.height) == (W, H)
    K = json.loads(props.K)
    assert cam.data.lens == pytest.approx(K[0][0] * cam.data.sensor_width / W)
    assert (bpy.context.scene.render.resolution_x, bpy.context.scene.render.resolution_y) == (W, H)
    assert cam.data.background_images[0].image.filepath.endswith("coffee.png")
    run(flow)  # the open_photo request (when the worker has it) may refine the camera; it stays consistent
    assert props.camera.data.lens == pytest.approx(json.loads(props.K)[0][0] * 36 / W)


def _projected(scene, cam, points_world) -> np.ndarray:
    out = []
    for p in points_world:
        ndc = world_to_camera_view(scene, cam, p)
        if ndc.z > 0.05:
            out.append((ndc.x * W, (1 - ndc.y) * H))
    return np.array(out)


def _gltf_camera_space(obj) -> np.ndarray:
    """The object's vertices in glTF camera space, read from the worker's files (not from Blender): the
    placed scene.glb when the worker wrote one (textured mesh), else the stage-1 GLB (already placed)."""
    scene = json.loads(open(os.path.join(os.path.dirname(obj["sam3d_file"]), "scene.json")).read())
    placed = scene.get("scene_glb")
    path = os.path.join(os.path.dirname(obj["sam3d_file"]), placed) if placed else obj["sam3d_file"]
    return read_glb_positions(path)


def test_reconstruct_places_the_object_where_the_worker_put_it(flow, worker_prefs, tmp_path):
    from mathutils import Vector

    worker_prefs.textured = True  # the full job: textured mesh when the worker makes one
    add_mask("cup")
    bpy.ops.ed.undo_push(message="add mask")  # what the UI does after Add Mask (an UNDO operator)
    item = reconstruct_one(flow, add=False)
    scene, props = bpy.context.scene, bpy.context.scene.sam3d
    obj = item.object
    assert obj is not None and obj.name == "cup" and props.collection in obj.users_collection
    assert obj["sam3d_seed"] == 42 and json.loads(obj["sam3d_settings"])["seed"] == 42
    assert obj["sam3d_weights"] and obj["sam3d_mask"].endswith(".png") and obj["sam3d_mask_png"]
    assert object_steps(flow) == ["SAM 3D: add cup"]
    materials = flow.scene.material_report([obj, *obj.children_recursive])
    assert materials["materials"] >= 1
    if flow.session.SESSION.capable("texture_bake"):  # the worker bakes a texture: it arrives as an image
        assert obj["sam3d_textured"] and materials["image_textures"] >= 1
    # Independent check of the placement: the worker's GLB vertices (glTF camera space) projected with K
    # must land where Blender projects the placed object's vertices through the matched camera.
    K = json.loads(props.K)
    glb = _gltf_camera_space(obj)
    front = glb[glb[:, 2] < -0.05]
    expected = np.stack(
        [K[0][2] + K[0][0] * front[:, 0] / -front[:, 2], K[1][2] - K[1][1] * front[:, 1] / -front[:, 2]], 1
    )
    meshes = [o for o in (obj, *obj.children_recursive) if o.type == "MESH"]
    world = [o.matrix_world @ Vector(v.co) for o in meshes for v in o.data.vertices]
    got = _projected(scene, props.camera, world)
    assert len(got) and len(expected)
    key = lambda a: {tuple(r) for r in np.round(a, 1).tolist()}  # noqa: E731
    overlap = len(key(got) & key(expected)) / len(key(expected))
    assert overlap > 0.99
    if obj.get("sam3d_mask_iou") is not None:  # a worker that reports how well the object fits its mask
        from render_util import iou, load_mask, render_silhouette

        sil = render_silhouette(scene, tmp_path / "sil.png", percentage=50)
        assert abs(iou(sil, load_mask(MASK, size=(W // 2, H // 2))) - obj["sam3d_mask_iou"]) < 0.1
    # one undo step per arriving object: undo takes the object away, redo brings it back
    bpy.ops.ed.undo()
    assert "cup" not in bpy.data.objects
    bpy.ops.ed.redo()
    assert "cup" in bpy.data.objects


def test_cancel_stops_the_running_and_queued_jobs_and_keeps_what_finished(flow):
    for name in ("first cup", "b", "c"):  # a name with a space: the worker's file names are made safe
        add_mask(name)
    assert bpy.ops.sam3d.reconstruct() == {"FINISHED"}
    items = bpy.context.scene.sam3d.items
    # the operator returned before any result: nothing waits on the worker
    assert [it.status for it in items] == ["QUEUED"] * 3 and not [o for o in bpy.data.objects if o.type == "MESH"]
    import time

    deadline = time.monotonic() + TIMEOUT
    while items["first cup"].status != "DONE" and time.monotonic() < deadline:
        flow.session.tick()
        time.sleep(0.02)
    assert items["first cup"].status == "DONE", items["first cup"].message
    assert bpy.ops.sam3d.cancel() == {"FINISHED"}
    run(flow)
    assert [items[n].status for n in ("first cup", "b", "c")] == ["DONE", "CANCELLED", "CANCELLED"]
    assert "queued" in items["c"].message
    assert "first cup" in bpy.data.objects and "b" not in bpy.data.objects and "c" not in bpy.data.objects
    assert object_steps(flow) == ["SAM 3D: add first cup"]


def test_bad_mask_is_reported_on_the_object(flow, tmp_path):
    small = bpy.data.images.new("small", 32, 24)
    small.pixels.foreach_set(np.ones(32 * 24 * 4, np.float32))
    small.filepath_raw, small.file_format = str(tmp_path / "small.png"), "PNG"
    small.save()
    add_mask("cup", tmp_path / "small.png")
    before = set(bpy.data.objects)
    bpy.ops.sam3d.reconstruct()
    run(flow)
    item = bpy.context.scene.sam3d.items["cup"]
    assert item.status == "ERROR" and "mask is 32x24 pixels but the photo is 600x400" in item.message
    assert set(bpy.data.objects) == before


def test_clicks_select_an_object(flow):
    hello = wait_ready(flow)
    if "segment" not in hello.get("capabilities", []):
        pytest.skip("the worker has no 'segment' capability yet (click-to-mask lands with it)")
    assert bpy.ops.sam3d.add_prompt(x=300, y=250, label=1) == {"FINISHED"}
    assert bpy.ops.sam3d.add_prompt(x=20, y=20, label=0) == {"FINISHED"}
    assert bpy.ops.sam3d.set_box(x0=60, y0=20, x1=520, y1=380) == {"FINISHED"}
    run(flow)
    props = bpy.context.scene.sam3d
    assert props.draft_mask and os.path.isfile(props.draft_mask), props.status
    from render_util import iou, load_mask

    assert iou(load_mask(props.draft_mask), load_mask(MASK)) > 0.5
    assert bpy.ops.sam3d.add_object(name="cup") == {"FINISHED"}
    assert not props.prompts and props.items["cup"].mask
    bpy.ops.sam3d.reconstruct()
    run(flow)
    assert props.items["cup"].status == "DONE" and "cup" in bpy.data.objects


@pytest.mark.slow
def test_reroll_replaces_the_object_and_logs_the_rejection(flow, worker_prefs):
    from sam3d_blender.core import preflog

    item = reconstruct_one(flow)
    bpy.context.view_layer.objects.active = item.object
    assert bpy.ops.sam3d.reroll(seed=7) == {"FINISHED"}
    run(flow)
    item = bpy.context.scene.sam3d.items["cup"]
    assert item.status == "DONE" and item.object["sam3d_seed"] == 7
    assert len([o for o in bpy.data.objects if o.get("sam3d_item") == item.uid]) == 1
    (rec,) = preflog.read_log(worker_prefs.preference_log)
    assert rec["kind"] == "reroll" and rec["chosen"] is None and rec["rejected"][0]["seed"] == 42
    assert object_steps(flow) == ["SAM 3D: add cup", "SAM 3D: re-roll cup"] and item.object.name == "cup"


@pytest.mark.slow
def test_best_of_n_shows_candidates_side_by_side_and_keeps_one(flow, worker_prefs):
    from sam3d_blender.core import preflog

    add_mask("cup")
    assert bpy.ops.sam3d.best_of_n(n=2) == {"FINISHED"}
    run(flow)
    cands = sorted((o for o in bpy.data.objects if o.get("sam3d_candidate_group")), key=lambda o: o.name)
    assert len(cands) == 2 and {c["sam3d_seed"] for c in cands} == {43, 44}
    true = [json.loads(c["sam3d_true_matrix"]) for c in cands]
    moved = [c for c, m in zip(cands, true, strict=True) if abs(c.matrix_world[0][3] - m[0][3]) > 1e-6]
    assert len(moved) == 1  # the first stays lined up with the photo, the second stands beside it
    keep = moved[0]
    bpy.context.view_layer.objects.active = keep
    assert bpy.ops.sam3d.keep_candidate() == {"FINISHED"}
    kept = bpy.context.scene.sam3d.items["cup"].object
    assert kept is not None and not kept.get("sam3d_candidate_group")
    expected = [v for row in true[cands.index(keep)] for v in row]
    assert [v for row in kept.matrix_world for v in row] == pytest.approx(expected, abs=1e-6)  # float32 matrices
    assert kept.name == "cup"
    assert len([o for o in bpy.data.objects if o.get("sam3d_item")]) == 1
    (rec,) = preflog.read_log(worker_prefs.preference_log)
    assert rec["kind"] == "best_of_n" and rec["chosen"]["seed"] == kept["sam3d_seed"]
    assert [r["seed"] for r in rec["rejected"]] == [({43, 44} - {kept["sam3d_seed"]}).pop()]


def test_check_setup_reports_worker_gpu_and_weights(flow, worker_prefs, tmp_path):
    worker_prefs.weights_dir = str(tmp_path / "weights")
    assert bpy.ops.sam3d.check_setup() == {"FINISHED"}
    run(flow)
    report = bpy.context.window_manager["sam3d_setup_report"]
    assert f"Worker Python: {worker_prefs.python}" in report and "torch" in report
    assert "GPU: " in report and "Weights: none imported" in report
    assert "Worker: sam3d" in report and "Capabilities: " in report and "reconstruct" in report


def test_missing_worker_gives_a_readable_message_and_leaves_the_scene(flow, worker_prefs, tmp_path):
    flow.session.SESSION.stop()
    worker_prefs.python = str(tmp_path / "no" / "python")
    add_mask("cup")
    before = set(bpy.data.objects)
    with pytest.raises(RuntimeError, match="does not exist"):
        bpy.ops.sam3d.reconstruct()  # bpy.ops turns the operator's error report into RuntimeError
    assert "does not exist" in bpy.context.scene.sam3d.status
    assert set(bpy.data.objects) == before and bpy.context.scene.sam3d.items["cup"].status == "MASKED"


def test_crashed_worker_fails_the_job_readably(flow):
    add_mask("cup")
    bpy.ops.sam3d.reconstruct()
    item = bpy.context.scene.sam3d.items["cup"]
    import time

    deadline = time.monotonic() + TIMEOUT
    while item.status != "RUNNING" and time.monotonic() < deadline:
        flow.session.tick()
        time.sleep(0.02)
    assert item.stage and item.total >= 1  # the row's progress bar: the current stage and its steps
    before = set(bpy.data.objects)
    flow.session.SESSION.client.kill()
    run(flow)
    assert item.status == "ERROR" and "exited unexpectedly" in item.message
    assert set(bpy.data.objects) == before
    flow.session.SESSION.stop()  # the next test starts a fresh worker
