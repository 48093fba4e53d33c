"""The add-on's bpy-free parts: scene files, the preference log, setup detection, photo <-> region mapping.

They are stdlib only, so they run here in the main suite (no Blender); the bpy parts run in tests/blender.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "addon"))

from sam3d_blender.core import preflog, setup
from sam3d_blender.core.camera import (
    blender_camera_from_K,
    check_camera,
    intrinsics_from_fov,
    photo_to_region,
    region_to_photo,
)
from sam3d_blender.core.scene_io import entry_from_result, load_scene


def test_intrinsics_from_fov_matches_the_worker_fallback():
    K = intrinsics_from_fov(600, 400)
    # the worker's default: fx = (W/2) / tan(30 deg), principal point at the centre
    assert K[0][0] == pytest.approx(300 / 0.5773502691896258)
    assert (K[0][2], K[1][2]) == (300.0, 200.0)


def test_camera_dict_lens_and_shift_from_K():
    cam = blender_camera_from_K([[500.0, 0, 290.0], [0, 500.0, 215.0], [0, 0, 1]], 600, 400)
    assert cam["lens_mm"] == pytest.approx(500 * 36 / 600)
    assert cam["shift_x"] == pytest.approx(10 / 600)  # principal point 10 px left of centre
    assert cam["shift_y"] == pytest.approx(15 / 600)  # 15 px below centre (y down)
    assert (cam["resolution_x"], cam["resolution_y"]) == (600, 400)
    check_camera(cam)


def test_camera_rejects_bad_input_with_the_fix():
    with pytest.raises(ValueError, match="positive"):
        blender_camera_from_K([[0.0, 0, 1], [0, 1, 1], [0, 0, 1]], 10, 10)
    with pytest.raises(ValueError, match="lack"):
        check_camera({"lens_mm": 50})


def test_region_photo_mapping_round_trip():
    frame = (100.0, 50.0, 700.0, 450.0)  # the photo drawn 600x400 region px, bottom-left at (100, 50)
    assert region_to_photo(100, 450, frame, 600, 400) == (0.0, 0.0)  # top-left corner
    x, y = region_to_photo(400, 150, frame, 600, 400)
    assert (x, y) == (300.0, 300.0)
    assert photo_to_region(x, y, frame, 600, 400) == (400.0, 150.0)
    with pytest.raises(ValueError, match="empty"):
        region_to_photo(0, 0, (5, 5, 5, 9), 10, 10)


def test_old_scene_json_gets_a_default_camera_and_identity_matrix(tmp_path):
    (tmp_path / "object_0_voxels.glb").write_bytes(b"")
    K = intrinsics_from_fov(600, 400)
    (tmp_path / "scene.json").write_text(
        json.dumps(
            {
                "intrinsics": K,
                "image_size": [400, 600],
                "objects": [{"glb": "object_0_voxels.glb", "settings": {"seed": 3}, "rotation_wxyz": [1, 0, 0, 0]}],
            }
        )
    )
    spec = load_scene(str(tmp_path / "scene.json"), photo="/p.png", mask="/m.png")
    assert (spec.width, spec.height, spec.photo) == (600, 400, "/p.png")
    obj = spec.objects[0]
    assert obj.mesh_path == str(tmp_path / "object_0_voxels.glb") and not obj.textured
    assert obj.matrix_world[0] == [1.0, 0.0, 0.0, 0.0] and obj.seed == 3 and obj.mask == "/m.png"
    assert spec.camera["lens_mm"] == pytest.approx(blender_camera_from_K(K, 600, 400)["lens_mm"])


def test_v1_scene_json_uses_mesh_glb_and_its_matrix(tmp_path):
    cam = blender_camera_from_K(intrinsics_from_fov(64, 48, 50.0), 64, 48)
    m = [[2.0, 0, 0, 0.5], [0, 2.0, 0, 3.0], [0, 0, 2.0, 0], [0, 0, 0, 1]]
    (tmp_path / "scene.json").write_text(
        json.dumps(
            {
                "version": 1,
                "photo": "photo.png",
                "width": 64,
                "height": 48,
                "K": intrinsics_from_fov(64, 48, 50.0),
                "intrinsics_source": "exif",
                "blender_camera": cam,
                "objects": [
                    {
                        "name": "cup",
                        "mask": "m.png",
                        "mesh_glb": "cup.glb",
                        "glb": "v.glb",
                        "blender_matrix_world": m,
                        "mask_iou": 0.8,
                        "settings": {"seed": 1},
                    }
                ],
            }
        )
    )
    spec = load_scene(str(tmp_path / "scene.json"))
    assert spec.photo == str(tmp_path / "photo.png") and spec.intrinsics_source == "exif"
    obj = spec.objects[0]
    assert obj.name == "cup" and obj.textured and obj.mesh_path == str(tmp_path / "cup.glb")
    assert obj.matrix_world == m and obj.mask_iou == 0.8 and obj.mask == str(tmp_path / "m.png")


def test_scene_json_errors_name_the_problem(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"objects": [], "version": 7}))
    with pytest.raises(ValueError, match="unknown scene.json layout"):
        load_scene(str(tmp_path / "a.json"))
    (tmp_path / "b.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a sam3d scene.json"):
        load_scene(str(tmp_path / "b.json"))


def test_result_entry_prefers_the_textured_mesh():
    cam = blender_camera_from_K(intrinsics_from_fov(64, 48), 64, 48)
    m = [[1, 0, 0, 0], [0, 1, 0, 2], [0, 0, 1, 0], [0, 0, 0, 1]]
    res = {
        "type": "result",
        "glb": "/v.glb",
        "mesh_glb": "/m.glb",
        "settings": {"seed": 5, "weights": "sha"},
        "blender": {"object_matrix_world": m, "camera": cam},
    }
    e = entry_from_result(res, "cup", "/mask.png")
    assert (e.mesh_path, e.textured, e.seed, e.camera["resolution_x"]) == ("/m.glb", True, 5, 64)
    assert e.matrix_world[1][3] == 2.0
    today = entry_from_result({"type": "result", "glb": "/v.glb", "settings": {}}, "cup")
    assert (today.mesh_path, today.textured, today.camera) == ("/v.glb", False, None)
    with pytest.raises(ValueError, match="no mesh_glb and no glb"):
        entry_from_result({"type": "result"}, "cup")


def test_preference_log_round_trip_and_torn_line(tmp_path):
    log = str(tmp_path / "sub" / "prefs.jsonl")
    a, b, c = (preflog.candidate(s, {"steps": 25}, f"/o{s}.glb") for s in (1, 2, 3))
    preflog.append(log, preflog.make_record("best_of_n", "/p.png", "/m.png", a, [b, c], weights="sha256:x"))
    preflog.append(log, preflog.make_record("reroll", "/p.png", "/m.png", None, [a]))
    with open(log, "a") as f:
        f.write('{"version": 1, "kind": "best_')  # a crash mid-write
    recs = preflog.read_log(log)
    assert [r["kind"] for r in recs] == ["best_of_n", "reroll"]
    assert [(p[1]["seed"], p[2]["seed"]) for p in preflog.pairs(recs)] == [(1, 2), (1, 3)]
    with pytest.raises(ValueError, match="kind"):
        preflog.make_record("like", "/p", None, a, [])


def test_find_worker_python_order(tmp_path):
    py = tmp_path / "envpy"
    py.write_text("")
    checkout = tmp_path / "repo"
    (checkout / "sam3d_core").mkdir(parents=True)
    venv_py = checkout / ".venv" / "bin" / "python"
    venv_py.parent.mkdir(parents=True)
    venv_py.write_text("")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "sam3d"
    script.write_text(f"#!{py}\nimport sys\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    addon_dir = checkout / "addon" / "sam3d_blender"
    addon_dir.mkdir(parents=True)
    found = setup.find_worker_python(str(addon_dir), {"SAM3D_PYTHON": str(py), "PATH": str(bindir)})
    assert [c.python for c in found] == [str(py), str(venv_py)]  # the sam3d script's python is py: not twice
    assert setup.find_worker_python(None, {"PATH": ""}) == []


def test_worker_command_and_env():
    assert setup.worker_command("/py") == ["/py", "-m", "sam3d_core.cli", "serve"]
    assert setup.worker_command("/py", "tiny", "cpu")[-4:] == ["--model", "tiny", "--device", "cpu"]
    env = setup.worker_env("~/w", base={})
    assert env["SAM3D_HOME"] == os.path.expanduser("~/w")


def test_setup_report_lists_gpu_weights_and_worker(tmp_path):
    folder = tmp_path / "models" / "official"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"files": {"a": {"bytes": 3_000_000_000}}}))
    models = setup.imported_models(str(tmp_path))
    assert models[0]["name"] == "official" and models[0]["bytes"] == 3_000_000_000
    probe = setup.parse_probe(
        'noise\n{"python": "3.11", "sam3d": "0.1.0", "torch": "2.5", "cuda": true, '
        '"gpu": "H100", "gpu_memory_gb": 80, "gpu_free_gb": 70}\n'
    )
    hello = {
        "worker": "sam3d 0.1.0",
        "protocol": 1,
        "device": "cuda",
        "dtype": "bfloat16",
        "model": "official",
        "capabilities": ["reconstruct"],
    }
    text = "\n".join(setup.setup_report("/py", probe, hello, models, str(tmp_path)))
    assert "GPU: H100, 80 GB (70 GB free)" in text and "official (3.0 GB)" in text and "sam3d 0.1.0" in text
    empty = "\n".join(setup.setup_report("", {}, None, [], ""))
    assert "not found" in empty and "sam3d weights import" in empty
