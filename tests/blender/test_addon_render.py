"""The headless scene builder (`make demo-blend`): scene.json -> .blend + a Cycles render over the photo.

The render is kept as a test artifact: build/test_artifacts/blender_composite.png.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import bpy
import numpy as np
from conftest import ARTIFACTS, MASK, PHOTO, ROOT
from glb_writer import card_in_camera_space, write_glb

W, H = 600, 400
BOX = (100.0, 80.0, 300.0, 240.0)  # where the test's object covers the photo (pixels)


def _read_png(path) -> np.ndarray:
    img = bpy.data.images.load(str(path), check_existing=False)
    w, h = img.size
    px = np.empty(w * h * 4, np.float32)
    img.pixels.foreach_get(px)
    bpy.data.images.remove(img)
    return np.flipud(px.reshape(h, w, 4)[..., :3])


def _run(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "addon"), PYTHONFAULTHANDLER="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, **kw)


def test_demo_scene_writes_the_blend_and_a_composited_render(addon_zip, tmp_path):
    from sam3d_blender.core.camera import blender_camera_from_K, intrinsics_from_fov

    K = intrinsics_from_fov(W, H)
    verts, faces, uvs = card_in_camera_space(K, BOX, depth=1.5)
    write_glb(tmp_path / "card.glb", verts, faces, uvs=uvs, png=MASK.read_bytes())
    identity = [[1.0 if i == j else 0.0 for j in range(4)] for i in range(4)]
    (tmp_path / "scene.json").write_text(
        json.dumps(
            {
                "version": 1,
                "photo": str(PHOTO),
                "width": W,
                "height": H,
                "K": K,
                "intrinsics_source": "default_fov",
                "blender_camera": blender_camera_from_K(K, W, H),
                "model": "test card",
                "objects": [
                    {
                        "name": "card",
                        "mask": str(MASK),
                        "mesh_glb": "card.glb",
                        "blender_matrix_world": identity,
                        "settings": {"seed": 1},
                    }
                ],
            }
        )
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    render = ARTIFACTS / "blender_composite.png"
    blend = tmp_path / "scene.blend"
    proc = _run(
        [
            "-m",
            "sam3d_blender.demo_scene",
            str(tmp_path / "scene.json"),
            "--blend",
            str(blend),
            "--render",
            str(render),
            "--samples",
            "2",
            "--percentage",
            "25",
        ]
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert blend.is_file()
    out = _read_png(render)
    assert out.shape == (H // 4, W // 4, 3)
    photo = _read_png(PHOTO).reshape(H // 4, 4, W // 4, 4, 3).mean(axis=(1, 3))  # 4x4 block means
    x0, y0, x1, y1 = (int(v / 4) for v in BOX)
    outside = np.ones(out.shape[:2], bool)
    outside[max(y0 - 2, 0) : y1 + 2, max(x0 - 2, 0) : x1 + 2] = False
    assert np.abs(out[outside] - photo[outside]).mean() < 0.05  # the photo shows through around the object
    inside = np.zeros_like(outside)
    inside[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2] = True
    assert np.abs(out[inside] - photo[inside]).mean() > 0.1  # the object covers it where it stands
    # the .blend holds the matched camera (scene camera, render size) and the placed object
    probe = (
        f"import bpy, json; bpy.ops.wm.open_mainfile(filepath={str(blend)!r}); s = bpy.context.scene; "
        "print(json.dumps([s.camera.data.lens, s.render.resolution_x, s.render.resolution_y, "
        "[o.name for o in bpy.data.objects if o.get('sam3d_seed') is not None]]))"
    )
    info = json.loads(_run(["-c", probe]).stdout.strip().splitlines()[-1])
    assert abs(info[0] - blender_camera_from_K(K, W, H)["lens_mm"]) < 1e-4 and info[1:] == [W, H, ["card"]]


def test_demo_scene_builds_a_scene_json_written_by_the_worker(addon_zip, tmp_path):
    """The scene.json of a real reconstruct job (tiny model, stage 1) -> .blend + render (`make demo-blend`)."""
    import pytest
    from conftest import worker_python

    python = worker_python()
    if python is None:
        pytest.skip("no sam3d environment (.venv) to run the worker")
    from sam3d_blender.worker_client.client import WorkerClient

    with WorkerClient(
        python, args=("-m", "sam3d_core.cli", "serve", "--model", "tiny", "--device", "cpu"), log=lambda line: None
    ) as client:
        res = client.reconstruct(
            str(PHOTO), str(MASK), str(tmp_path / "job"), steps=1, seed=1, name="cup", stage2=False
        ).result(timeout=300)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    render = ARTIFACTS / "blender_worker_scene.png"
    proc = _run(
        [
            "-m",
            "sam3d_blender.demo_scene",
            res["scene"],
            "--blend",
            str(tmp_path / "s.blend"),
            "--render",
            str(render),
            "--samples",
            "1",
            "--percentage",
            "25",
        ]
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "placed 1 object(s)" in proc.stdout and (tmp_path / "s.blend").is_file()
    assert _read_png(render).shape == (H // 4, W // 4, 3)


def test_demo_scene_explains_a_missing_photo(addon_zip, tmp_path):
    (tmp_path / "scene.json").write_text(
        json.dumps({"intrinsics": [[1, 0, 1], [0, 1, 1], [0, 0, 1]], "image_size": [2, 2], "objects": []})
    )
    proc = _run(["-m", "sam3d_blender.demo_scene", str(tmp_path / "scene.json")])
    assert proc.returncode == 2 and "pass --photo" in proc.stderr
