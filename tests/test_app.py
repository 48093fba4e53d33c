"""The desktop app, offscreen, against a real worker (tiny random-weight model on the CPU): the whole flow with
a screenshot of each state, the panel docked in a bare host window, the messages for bad inputs and a dead
worker, and the parts below the widgets (3D view projection, scene GLB merge, the preference log's format)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6")

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QApplication, QMainWindow

from sam3d_core.app import blender, glb, render
from sam3d_core.geometry import frames

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "assets" / "examples" / "coffee.png"
ARTIFACTS = ROOT / "build" / "test_artifacts" / "app"
TIMEOUT = 240.0
CUP, SAUCER = (300, 150), (470, 330)  # clicks on the coffee photo (600 x 400)


@pytest.fixture(scope="module")
def qapp():
    return QApplication.instance() or QApplication([])


def wait(app, cond, what: str, panel=None, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        app.processEvents()
        time.sleep(0.01)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}; status: {panel.status_text if panel else ''}")
    app.processEvents()


def shoot(widget, name: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    assert widget.grab().save(str(path)), path
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, ARTIFACTS / path.name)
    return path


def configure(panel, tmp: Path) -> None:
    """The real worker with the tiny model on the CPU, small outputs: seconds per object."""
    for key, value in dict(worker_python=sys.executable, model="tiny", device="cpu", max_voxels=200, steps=2,
                           texture_size=64, faces=500, output_dir=str(tmp / "out"),
                           preference_log=str(tmp / "preferences.jsonl")).items():  # fmt: skip
        panel.set_setting(key, value)


def worker_env(tmp: Path) -> dict:
    env = {**os.environ, "SAM3D_HOME": str(tmp / "home")}  # no imported weights
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def settled(panel) -> bool:
    return not panel.link.pending() and all(it.status not in ("QUEUED", "RUNNING") for it in panel.items)


def add_by_click(app, panel, xy, name):
    panel.add_click(*xy, 1)
    wait(app, lambda: bool(panel.draft_mask), f"the mask of {name}", panel)
    item = panel.add_object(name)
    assert item is not None and item.name == name, panel.status_text
    return item


def load_preflog():
    """The add-on's own reader of the preference log (stdlib only), to check the app writes the same format."""
    spec = importlib.util.spec_from_file_location("addon_preflog", ROOT / "addon/sam3d_blender/core/preflog.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------
# Below the widgets


def test_the_3d_view_at_home_projects_like_the_photo_camera():
    K = np.array([[480.0, 0, 310], [0, 470, 190], [0, 0, 1]])
    verts = np.array([[-0.2, -0.1, -2.0], [0.3, -0.15, -2.5], [0.05, 0.25, -2.2]])  # glTF camera frame
    tri = render.Drawable(verts, np.array([[0, 1, 2]]), colors=np.ones((3, 3)))
    photo = np.zeros((400, 600, 3), np.uint8)
    img = render.render([render.backdrop(photo, K, 10.0), tri], render.fit_intrinsics(K, 600, 400, 600, 400),
                        600, 400, render.OrbitCamera().matrix())  # fmt: skip
    drawn = img.max(axis=2) > 100
    expected = frames.rasterize_triangles(frames.project_points_from(verts, K, "gltf"), np.array([[0, 1, 2]]), 600, 400)
    assert expected.sum() > 1000
    assert frames.mask_iou(drawn, expected) > 0.99
    cam = render.OrbitCamera(pivot=verts.mean(0))
    cam.yaw = 0.6
    moved = render.render([tri], render.fit_intrinsics(K, 600, 400, 600, 400), 600, 400, cam.matrix()).max(2) > 100
    assert moved.sum() > 0 and frames.mask_iou(moved, expected) < 0.9  # orbiting changes the view


def test_scene_glb_merge_keeps_every_mesh_and_places_it(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    for name, offset in (("a", 0.0), ("b", 5.0)):
        box = trimesh.creation.box(extents=(1, 1, 1))
        box.apply_translation((offset, 0, 0))
        box.export(tmp_path / f"{name}.glb")
    move = frames.homogeneous(np.eye(3), [0, 0, -3])
    out = glb.merge_glbs([("a", tmp_path / "a.glb", move), ("b", tmp_path / "b.glb", np.eye(4))],
                         tmp_path / "scene.glb", {"yfov": 0.8, "znear": 0.01})  # fmt: skip
    mesh = glb.load_mesh(out)
    assert len(mesh.vertices) == 2 * len(glb.load_mesh(tmp_path / "a.glb").vertices)
    doc, _ = glb.read_glb(out)
    assert [n["name"] for n in doc["nodes"] if n["name"] in ("a", "b", "camera")] == ["a", "b", "camera"]
    loaded = trimesh.load(out, force="scene")  # another reader agrees
    bounds = loaded.bounds
    np.testing.assert_allclose(bounds, [[-0.5, -0.5, -3.5], [5.5, 0.5, 0.5]], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The app with a real worker


@pytest.fixture
def window(qapp, tmp_path):
    from sam3d_core.app.window import MainWindow

    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    w = MainWindow(settings, worker_env=worker_env(tmp_path))
    configure(w.panel, tmp_path)
    w.resize(1280, 800)
    w.show()
    yield w
    w.close()
    qapp.processEvents()


def test_the_whole_flow_offscreen(qapp, window, tmp_path):
    panel, shots = window.panel, tmp_path / "screens"
    shoot(window, "0_empty", shots)
    assert panel.open_photo(str(PHOTO))
    wait(qapp, lambda: panel.link.state == "ready", "the worker's hello", panel)
    assert "No weights imported" in panel.weights_label.text() and "tiny random-weight" in panel.weights_label.text()
    assert panel.recent()[0] == str(PHOTO)
    shoot(window, "1_photo", shots)
    # two objects by clicks; undo / redo of a mask edit on the way
    panel.add_click(*CUP, 1)
    panel.add_click(40, 40, 0)
    panel.undo()
    assert panel.prompts == ([(float(CUP[0]), float(CUP[1]), 1)], None)
    panel.redo()
    assert len(panel.prompts[0]) == 2
    panel.undo()
    wait(qapp, lambda: bool(panel.draft_mask), "the cup's mask", panel)
    assert panel.add_object("cup") is not None
    add_by_click(qapp, panel, SAUCER, "saucer")
    assert [it.name for it in panel.items] == ["cup", "saucer"]
    shoot(window, "2_two_objects", shots)
    # reconstruct both and cancel the second while it waits in the queue
    assert panel.reconstruct() == 2
    assert panel.cancel("saucer") == 1
    wait(qapp, lambda: settled(panel), "the reconstructions", panel)
    cup, saucer = panel.items
    assert cup.status == "DONE" and cup.kept.result["mesh_glb"].endswith("cup.glb"), cup.message
    assert saucer.status == "CANCELLED" and saucer.message == "cancelled (queued)"
    assert len(window.view3d.objects) == 1
    shoot(window, "3_reconstructed_one_cancelled", shots)
    assert panel.reconstruct() == 1  # the cancelled one again
    wait(qapp, lambda: settled(panel), "the saucer", panel)
    assert saucer.status == "DONE" and len(window.view3d.objects) == 2
    window.view3d.orbit(0.5, 0.2)
    shoot(window, "4_both_orbit", shots)
    window.view3d.home()
    # re-roll the cup: seed 43 replaces seed 42, logged as a re-roll
    old_mesh = cup.kept.mesh
    panel.select("cup")
    assert panel.reroll()
    wait(qapp, lambda: settled(panel), "the re-roll", panel)
    assert cup.seed == 43 and cup.kept.mesh != old_mesh and cup.kept.result["settings"]["seed"] == 43
    shoot(window, "5_rerolled", shots)
    # best of 3 for the saucer: seeds 43, 44, 45; keep the second
    assert panel.best_of("saucer", n=3)
    wait(qapp, lambda: settled(panel) and len(saucer.candidates) == 3, "three candidates", panel)
    assert sorted(c.seed for c in saucer.candidates) == [43, 44, 45]
    panel.select("saucer")
    assert panel.candidate_combo.count() == 3
    panel.candidate_combo.setCurrentIndex(1)
    shoot(window, "6_best_of_3", shots)
    chosen = saucer.candidates[1]
    assert panel.keep_candidate("saucer", 1)
    assert saucer.kept is chosen and saucer.candidates == []
    # the preference log: read by the add-on's own reader
    preflog = load_preflog()
    recs = preflog.read_log(tmp_path / "preferences.jsonl")
    assert [r["kind"] for r in recs] == ["reroll", "best_of_n"]
    assert recs[0]["chosen"] is None and recs[0]["rejected"][0]["seed"] == 42
    assert recs[1]["chosen"]["seed"] == chosen.seed and sorted(c["seed"] for c in recs[1]["rejected"]) == sorted(
        {43, 44, 45} - {chosen.seed}
    )
    assert recs[1]["mask"] == saucer.mask and recs[1]["photo"] == str(PHOTO) and "tiny" in recs[1]["model"]
    assert recs[1]["weights"] == "random:0+random:1" and len(preflog.pairs(recs)) == 2
    addon_rec = preflog.make_record("best_of_n", "/p", "/m", recs[1]["chosen"], recs[1]["rejected"])
    assert set(addon_rec) == set(recs[1])
    # export
    out = tmp_path / "export"
    record = panel.export(str(out))
    assert record is not None, panel.status_text
    names = sorted(p.name for p in out.iterdir())
    assert names == ["cup.glb", "cup.ply", "cup_mask.png", "saucer.glb", "saucer.ply", "saucer_mask.png",
                     "scene.glb", "scene.json"]  # fmt: skip
    scene = json.loads((out / "scene.json").read_text())
    assert [o["name"] for o in scene["objects"]] == ["cup", "saucer"] and scene["photo"] == str(PHOTO)
    assert scene["objects"][1]["settings"]["seed"] == chosen.seed
    merged = glb.load_mesh(out / "scene.glb")
    assert len(merged.vertices) == sum(len(glb.load_mesh(out / f"{n}.glb").vertices) for n in ("cup", "saucer"))
    shoot(window, "7_exported", shots)
    # an export never writes into a folder of someone else's files
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep")
    assert panel.export(str(tmp_path / "theirs")) is None and "did not write" in panel.status_text
    assert sorted(p.name for p in (tmp_path / "theirs").iterdir()) == ["notes.txt"]
    # settings persist
    assert QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat).value("faces") in (500, "500")


def test_bad_inputs_and_a_dead_worker_give_messages(qapp, window, tmp_path):
    panel = window.panel
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    assert not panel.open_photo(str(bad))
    assert panel.status_level == "ERROR" and f"cannot read the photo {bad}" in panel.status_text
    assert panel.open_photo(str(PHOTO))
    wait(qapp, lambda: panel.link.state == "ready", "the worker's hello", panel)
    small = tmp_path / "small_mask.png"
    from PySide6.QtGui import QImage

    img = QImage(30, 20, QImage.Format.Format_Grayscale8)
    img.fill(255)
    img.save(str(small))
    assert panel.add_mask_file(str(small)) is None
    assert "mask is 30x20 pixels but the photo is 600x400" in panel.status_text
    cup = add_by_click(qapp, panel, CUP, "cup")
    panel.reconstruct()
    wait(qapp, lambda: settled(panel), "the cup", panel)
    assert cup.status == "DONE"
    saucer = add_by_click(qapp, panel, SAUCER, "saucer")
    panel.set_setting("steps", 200)  # long enough to be running when the worker dies
    panel.reconstruct()
    wait(qapp, lambda: saucer.status == "RUNNING", "the saucer's progress", panel)
    panel.link.client.kill()
    wait(qapp, lambda: panel.link.state == "crashed" and settled(panel), "the crash message", panel)
    assert saucer.status == "ERROR" and "exited unexpectedly" in saucer.message
    assert cup.status == "DONE" and cup.kept is not None  # finished objects are kept
    assert "Restart worker" in panel.status_text and panel.status_level == "ERROR"
    shoot(window, "8_worker_crashed", tmp_path / "screens")
    panel.set_setting("steps", 2)
    panel.restart_worker()
    wait(qapp, lambda: panel.link.state == "ready", "the restarted worker", panel)
    assert panel.reconstruct() == 1
    wait(qapp, lambda: settled(panel), "the saucer after the restart", panel)
    assert saucer.status == "DONE" and cup.status == "DONE"


def test_the_panel_docks_in_a_bare_host_window(qapp, tmp_path):
    """A host (Maya, Houdini, Nuke) owns the application and the main window; the panel is one dock widget."""
    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QDockWidget

    from sam3d_core.app.panel import Panel

    host = QMainWindow()
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    panel = Panel(settings, worker_env=worker_env(tmp_path))
    configure(panel, tmp_path)
    dock = QDockWidget("SAM 3D", host)
    dock.setWidget(panel)
    host.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
    host.resize(1000, 700)
    host.show()
    assert QApplication.instance() is qapp and panel.window() is host
    assert panel.open_photo(str(PHOTO))
    item = add_by_click(qapp, panel, CUP, "cup")
    shown = []
    panel.results_changed.connect(shown.append)
    panel.reconstruct()
    wait(qapp, lambda: settled(panel), "the cup", panel)
    assert item.status == "DONE" and shown[-1][0]["mesh_glb"] == item.kept.mesh
    shoot(host, "9_docked_panel", tmp_path / "screens")
    panel.shutdown()
    host.close()


def test_open_in_blender_writes_the_blend(qapp, window, tmp_path):
    runner = blender.find_runner()
    if runner is None and Path("/work/main/.venv-blender/bin/python").is_file():
        os.environ["SAM3D_BLENDER_PYTHON"] = "/work/main/.venv-blender/bin/python"  # a worktree without its own
        runner = blender.find_runner()
    if runner is None:
        pytest.skip("no Blender: run `make install-blender` (the bpy wheel) or put blender on PATH")
    panel = window.panel
    assert panel.open_photo(str(PHOTO))
    add_by_click(qapp, panel, CUP, "cup")
    panel.reconstruct()
    wait(qapp, lambda: settled(panel), "the cup", panel)
    command = panel.open_in_blender(str(tmp_path / "for_blender"))
    assert command is not None, panel.status_text
    blend = tmp_path / "for_blender" / "scene.blend"
    assert blend.is_file() and blend.read_bytes()[:7] == b"BLENDER"
    assert command.endswith(str(blend)) and f"open it with: {command}" in panel.status_text
