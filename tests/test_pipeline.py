"""The end-to-end pipeline (tiny random model on CPU): photo + mask -> placed, textured files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sam3d_core.cli.main import main
from sam3d_core.cli.reconstruct import EXAMPLE_MASK, EXAMPLE_PHOTO
from sam3d_core.geometry import frames
from sam3d_core.inputs.imageio import InputError
from sam3d_core.pipeline.reconstruct import GPUOutOfMemory, ObjectResult, Pipeline

trimesh = pytest.importorskip("trimesh")


@pytest.fixture(scope="module")
def pipe():
    p, which = Pipeline.load("tiny", "cpu", max_voxels=150)
    assert "tiny" in which
    return p


@pytest.fixture(scope="module")
def done(pipe, tmp_path_factory):
    ctx = pipe.open_photo(EXAMPLE_PHOTO)
    mask = pipe.load_mask(ctx, EXAMPLE_MASK)
    seen = []
    results = pipe.reconstruct(
        ctx,
        [mask, mask],
        names=["cup", "cup_again"],
        seed=5,
        steps=2,
        texture_size=64,
        faces=400,
        progress=lambda *a: seen.append(a),
    )
    out = tmp_path_factory.mktemp("pipeline_out")
    scene = pipe.export(ctx, results, out)
    return ctx, mask, results, scene, out, seen


def test_objects_are_textured_placed_and_recorded(done):
    ctx, mask, results, scene, out, seen = done
    assert [r.name for r in results] == ["cup", "cup_again"]
    assert [r.settings["seed"] for r in results] == [5, 6]  # object i gets seed + i
    stages = [s for s, _, _ in seen]
    for a, b in zip(
        ("preprocess", "stage1", "stage2", "postprocess", "bake"),
        ("stage1", "stage2", "postprocess", "bake", "export"),
        strict=True,
    ):
        assert stages.index(a) < stages.index(b)
    for r in results:
        m = r.mesh
        assert m.texture.shape == (64, 64, 3) and m.uvs.min() >= 0 and m.uvs.max() <= 1
        assert len(m.faces) <= 600 and 0.0 <= r.mask_iou <= 1.0
        # the recorded pose matrix is the stage-1 pose, and the Blender matrix is derived from it
        np.testing.assert_allclose(
            frames.blender_object_matrix(r.pose_matrix),
            np.array(scene["objects"][results.index(r)]["blender_matrix_world"]),
        )
    record = json.loads((out / "scene.json").read_text())
    assert record["intrinsics_source"] == "default_fov" and record["pointmap_source"] == "fallback plane"
    assert record["width"] == ctx.width and record["blender_camera"]["resolution_y"] == ctx.height
    assert record["weights"] == "random:0+random:1" and "tiny" in record["model"]
    for o in record["objects"]:
        glb = trimesh.load(out / o["mesh_glb"], force="mesh")
        assert isinstance(glb.visual, trimesh.visual.TextureVisuals) and glb.visual.uv is not None
        assert (out / o["gaussians_ply"]).read_bytes().startswith(b"ply")
        assert np.array_equal(np.asarray(Image.open(out / o["mask"])) > 127, mask)


def test_scene_glb_places_each_object_with_its_pose(done):
    ctx, mask, results, scene, out, _ = done
    loaded = trimesh.load(out / "scene.glb", force="scene")
    for r in results:
        world = trimesh.transform_points(loaded.geometry[r.name].vertices, loaded.graph[r.name][0])
        # glTF world -> PyTorch3D camera, then compare with the pose applied to the local mesh
        expect = frames.transform_points(r.pose_matrix, r.mesh.vertices)
        np.testing.assert_allclose(frames.convert_points(world, "gltf", "pytorch3d"), expect, atol=1e-5)


def test_reported_iou_is_the_silhouette_of_the_placed_mesh(done):
    ctx, mask, results, *_ = done
    r = results[0]
    sil = frames.render_silhouette(
        frames.transform_points(r.pose_matrix, r.mesh.vertices), r.mesh.faces, ctx.K, ctx.width, ctx.height
    )
    assert frames.mask_iou(sil, mask) == pytest.approx(r.mask_iou)


def test_bad_masks_are_clear_errors(pipe):
    ctx = pipe.open_photo(EXAMPLE_PHOTO)
    with pytest.raises(InputError, match=r"mask is empty \(no pixel above the threshold\)"):
        pipe.reconstruct(ctx, [np.zeros((ctx.height, ctx.width), bool)])
    with pytest.raises(InputError, match=f"{ctx.width}x{ctx.height}"):
        pipe.reconstruct(ctx, [np.ones((10, 12), bool)])
    with pytest.raises(ValueError, match="names"):
        pipe.reconstruct(ctx, [EXAMPLE_MASK], names=["a", "b"])


def test_user_depth_gives_a_metric_point_map(pipe):
    ctx = pipe.open_photo(EXAMPLE_PHOTO, depth=np.full((400, 600), 2.5, np.float32))
    assert ctx.pointmap_source == "depth" and np.allclose(ctx.pointmap[..., 2], 2.5)
    with pytest.raises(InputError, match="depth"):
        pipe.open_photo(EXAMPLE_PHOTO, depth=np.ones((10, 10), np.float32))


def test_out_of_memory_retries_once_in_low_vram_mode(pipe, monkeypatch):
    """CUDA paths driven on the CPU: the first attempt runs out of memory, the retry runs in low-VRAM mode."""
    ctx = pipe.open_photo(EXAMPLE_PHOTO)
    mask = pipe.load_mask(ctx, EXAMPLE_MASK)
    calls, modes = [], []

    def flaky(ctx, mask, **kwargs):
        calls.append(pipe.low_vram)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return lambda progress=None: ObjectResult(
            kwargs["name"],
            mask,
            np.eye(4),
            [1, 0, 0, 0],
            [0, 0, 1],
            [1, 1, 1],
            0,
            None,
            None,
            None,
            settings={"seed": kwargs["seed"]},
        )

    monkeypatch.setattr(pipe, "_gpu_steps", flaky)
    monkeypatch.setattr(pipe, "device", torch.device("cuda"))
    monkeypatch.setattr(pipe, "set_low_vram", lambda on: (modes.append(on), setattr(pipe, "low_vram", on)))
    try:
        res = pipe.reconstruct(ctx, [mask], steps=1)
        assert calls == [False, True] and modes == [True] and res[0].settings["low_vram_retry"]

        def always(*args, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

        monkeypatch.setattr(pipe, "_gpu_steps", always)
        pipe.low_vram = False
        with pytest.raises(GPUOutOfMemory, match="low-VRAM"):
            pipe.reconstruct(ctx, [mask], steps=1)
    finally:
        pipe.low_vram = False


def test_cli_reconstruct_writes_the_files(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        [
            "reconstruct",
            str(EXAMPLE_PHOTO),
            "--mask",
            str(EXAMPLE_MASK),
            "--out",
            str(out),
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--steps",
            "2",
            "--texture-size",
            "64",
            "--faces",
            "300",
        ]
    )
    assert code == 0
    record = json.loads((out / "scene.json").read_text())
    assert [o["name"] for o in record["objects"]] == ["object_0"]
    assert (out / "object_0.glb").is_file() and (out / "scene.glb").is_file()
    assert "mask IoU" in capsys.readouterr().out
    assert main(["reconstruct", str(EXAMPLE_PHOTO), "--out", str(out)]) == 2  # no object given: a clear error
    assert "--mask" in capsys.readouterr().err
    assert main(["reconstruct", str(EXAMPLE_PHOTO), "--mask", str(EXAMPLE_MASK), "--texture-size", "9"]) == 2
    assert "texture-size" in capsys.readouterr().err


def test_cli_reconstruct_from_a_click(tmp_path):
    pytest.importorskip("cv2")
    out = tmp_path / "click"
    code = main(
        [
            "reconstruct",
            str(EXAMPLE_PHOTO),
            "--point",
            "300,200",
            "--box",
            "200,100,420,330",
            "--out",
            str(out),
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--texture-size",
            "64",
            "--faces",
            "300",
        ]
    )
    assert code == 0 and (out / "object_0_mask.png").is_file()
    assert Path(out / "scene.json").is_file()


def test_full_image_tokens_are_shared_across_objects_exactly(pipe):
    """The full-image RGB tokens do not depend on the mask: computed for the first object, reused after."""
    ctx = pipe.open_photo(EXAMPLE_PHOTO)
    a = pipe.load_mask(ctx, EXAMPLE_MASK)
    b = np.zeros_like(a)
    b[50:200, 60:300] = True
    shared: dict = {}
    for stage, prepare in (
        (pipe.stage1, lambda m: pipe.stage1.prepare(ctx.photo.rgb, m, ctx.pointmap)),
        (pipe.stage2, lambda m: pipe.stage2.prepare(ctx.photo.rgb, m)),
    ):
        first = stage.encode(prepare(a), shared)
        second = stage.encode(prepare(b), shared)  # reuses the first object's full-image tokens
        assert torch.equal(first, stage.encode(prepare(a)))
        assert torch.equal(second, stage.encode(prepare(b)))
        assert not torch.equal(first, second)
    assert len(shared) == 2  # one entry per stage


def test_cli_scene_reconstructs_every_object_found(tmp_path, capsys):
    pytest.importorskip("cv2")
    out = tmp_path / "scene"
    code = main(
        [
            "scene",
            str(EXAMPLE_PHOTO),
            "--out",
            str(out),
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--texture-size",
            "64",
            "--faces",
            "300",
            "--max-voxels",
            "150",
            "--max-objects",
            "2",
        ]
    )
    assert code == 0
    record = json.loads((out / "scene.json").read_text())
    names = [o["name"] for o in record["objects"]]
    assert len(names) in (1, 2) and names[0] == "object_0"
    for o in record["objects"]:
        assert (out / o["mesh_glb"]).is_file() and (out / o["mask"]).is_file()
        assert 0 < o["num_voxels"] <= 150
    assert "segmenter: basic" in capsys.readouterr().err


def test_overlapped_objects_equal_sequential_ones(pipe):
    """With several objects, one's post-processing runs on a thread while the next one's stages run: same
    results, delivered in order, as one after the other."""
    ctx = pipe.open_photo(EXAMPLE_PHOTO)
    a = pipe.load_mask(ctx, EXAMPLE_MASK)
    b = np.zeros_like(a)
    b[40:220, 80:330] = True
    opts = dict(names=["a", "b", "c"], seed=3, steps=1, texture_size=64, faces=300)
    seen = []
    overlapped = pipe.reconstruct(ctx, [a, b, a], on_object=lambda r: seen.append(r.name), **opts)
    pipe.overlap = False
    try:
        sequential = pipe.reconstruct(ctx, [a, b, a], **opts)
    finally:
        pipe.overlap = True
    assert seen == ["a", "b", "c"]
    for x, y in zip(overlapped, sequential, strict=True):
        assert x.name == y.name and x.settings["seed"] == y.settings["seed"]
        np.testing.assert_array_equal(x.mesh.faces, y.mesh.faces)
        np.testing.assert_allclose(x.mesh.vertices, y.mesh.vertices)
        np.testing.assert_array_equal(x.mesh.texture, y.mesh.texture)
        assert x.mask_iou == pytest.approx(y.mask_iou)


def test_files_written_side_by_side_equal_one_after_another(pipe, done, tmp_path):
    """The export's files written on several threads (the default) are byte for byte those written one after
    another, and the scene GLB (reusing the objects' texture encodings) too."""
    ctx, _, results, _, first, _ = done
    before = pipe.file_workers
    try:
        for workers in (1, 4):
            pipe.file_workers = workers
            pipe.export(ctx, results, tmp_path / f"w{workers}")
    finally:
        pipe.file_workers = before
    names = sorted(p.name for p in first.iterdir())
    assert {"cup.glb", "cup.ply", "cup_mask.png", "cup_again.glb", "scene.glb", "scene.json"} <= set(names)
    for workers in (1, 4):
        assert sorted(p.name for p in (tmp_path / f"w{workers}").iterdir()) == names
        for name in names:
            assert (tmp_path / f"w{workers}" / name).read_bytes() == (first / name).read_bytes(), (workers, name)


def test_side_by_side_jobs_all_finish_before_the_first_failure_is_raised():
    import threading

    from sam3d_core.pipeline.reconstruct import run_side_by_side

    finished, go = [], threading.Event()

    def fail(msg):
        raise ValueError(msg)

    def waits():
        assert go.wait(60)
        finished.append("waits")

    jobs = [lambda: fail("first"), waits, go.set, lambda: fail("second")]
    with pytest.raises(ValueError, match="first"):
        run_side_by_side(jobs, 3)
    assert finished == ["waits"]
    ran = []
    run_side_by_side([lambda: ran.append(1), lambda: ran.append(2)], 1)  # one worker: in order, in this thread
    assert ran == [1, 2]
