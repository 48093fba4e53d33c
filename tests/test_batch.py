"""Objects of one photo sampled together equal the same objects sampled one at a time, bit for bit (float32, CPU).

Tiny random-weight presets; three masks of different sizes (so different crops and condition tokens) and, for
stage 2, three voxel sets of different sizes (different segment lengths in the varlen batch).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from sam3d_core.cli.reconstruct import EXAMPLE_MASK, EXAMPLE_PHOTO
from sam3d_core.inputs.camera import fallback_pointmap
from sam3d_core.inputs.imageio import load_mask, load_photo
from sam3d_core.pipeline.reconstruct import Pipeline
from sam3d_core.pipeline.stage1 import Stage1Pipeline
from sam3d_core.pipeline.stage2 import Stage2Pipeline
from sam3d_core.registry import stage1_preset, stage2_preset

SEEDS = [11, 12, 13]
MAX_VOXELS = 120  # every random-weight object exceeds it: the cap (shrink + random subset) runs for each


@pytest.fixture(scope="module")
def scene():
    photo = load_photo(EXAMPLE_PHOTO)
    big = load_mask(EXAMPLE_MASK, photo)
    wide = np.zeros_like(big)
    wide[40:220, 80:330] = True
    small = np.zeros_like(big)
    small[250:330, 400:470] = True
    pointmap, _ = fallback_pointmap(*photo.rgb.shape[:2])
    return photo.rgb, [big, wide, small], pointmap


@pytest.fixture(scope="module")
def stage1():
    return Stage1Pipeline.from_random(replace(stage1_preset("tiny"), max_voxels=MAX_VOXELS), seed=0)


@pytest.fixture(scope="module")
def stage1_single(stage1, scene):
    """Each object alone: its inputs, condition tokens and Stage1Output."""
    rgb, masks, pointmap = scene
    shared: dict = {}
    inputs = [stage1.prepare(rgb, m, pointmap) for m in masks]
    conds = [stage1.encode(i, shared) for i in inputs]
    outs = [stage1.sample(i, c, seed=s, steps=1) for i, c, s in zip(inputs, conds, SEEDS, strict=True)]
    return inputs, conds, outs


def _assert_same_stage1(a, b) -> None:
    assert a.settings == b.settings
    assert sorted(a.latents) == sorted(b.latents)
    for k in a.latents:
        assert torch.equal(a.latents[k], b.latents[k]), k
    assert torch.equal(a.coords_original, b.coords_original)
    assert torch.equal(a.coords, b.coords)
    assert a.downsample_factor == b.downsample_factor
    for field in ("rotation", "quaternion", "translation", "scale"):
        assert torch.equal(getattr(a.pose, field), getattr(b.pose, field)), field


@pytest.mark.parametrize("which", [[2], [0, 1], [2, 0, 1]], ids=["1 object", "2 objects", "3 objects"])
def test_stage1_batch_equals_one_at_a_time(stage1, stage1_single, which):
    inputs, conds, singles = stage1_single
    outs = stage1.sample_batch(
        [inputs[i] for i in which], torch.cat([conds[i] for i in which]), seeds=[SEEDS[i] for i in which], steps=1
    )
    assert len(outs) == len(which)
    for i, out in zip(which, outs, strict=True):
        assert len(out.coords) <= MAX_VOXELS and out.downsample_factor == 2  # the cap ran, with this object's draw
        assert out.coords[:, 0].eq(0).all() and out.coords_original[:, 0].eq(0).all()
        _assert_same_stage1(out, singles[i])


def test_stage1_batch_checks_its_arguments(stage1, stage1_single):
    inputs, conds, _ = stage1_single
    with pytest.raises(ValueError, match="2 inputs, 1 seeds and 2 condition rows"):
        stage1.sample_batch(inputs[:2], torch.cat(conds[:2]), seeds=[1], steps=1)


@pytest.fixture(scope="module")
def stage2():
    return Stage2Pipeline.from_random(stage2_preset("tiny"), seed=1)


@pytest.fixture(scope="module")
def voxel_sets(stage1_single):
    """Three voxel sets of different sizes (prefixes of stage-1 outputs: unique voxels on the 64^3 grid)."""
    outs = stage1_single[2]
    return [outs[0].coords[:120], outs[1].coords[:57], outs[2].coords[:23]]


@pytest.fixture(scope="module")
def stage2_single(stage2, scene, voxel_sets):
    rgb, masks, _ = scene
    shared: dict = {}
    return [stage2(rgb, m, c, seed=s, steps=2, shared=shared) for m, c, s in zip(masks, voxel_sets, SEEDS, strict=True)]


@pytest.mark.parametrize("which", [[1], [2, 0], [0, 1, 2]], ids=["1 object", "2 objects", "3 objects"])
def test_stage2_batch_equals_one_at_a_time(stage2, scene, voxel_sets, stage2_single, which):
    rgb, masks, _ = scene
    outs = stage2.batch(
        rgb, [masks[i] for i in which], [voxel_sets[i] for i in which], seeds=[SEEDS[i] for i in which], steps=2
    )
    for i, out in zip(which, outs, strict=True):
        one = stage2_single[i]
        assert out.settings == one.settings and len(out.coords) == len(voxel_sets[i])
        assert torch.equal(out.coords, one.coords)
        assert torch.equal(out.slat_feats, one.slat_feats)
        for field in ("get_xyz", "colors", "get_scaling", "get_rotation", "get_opacity"):
            assert torch.equal(getattr(out.gaussians, field), getattr(one.gaussians, field)), field
        assert torch.equal(out.mesh.vertices, one.mesh.vertices)
        assert torch.equal(out.mesh.faces, one.mesh.faces)
        assert torch.equal(out.mesh.vertex_attrs, one.mesh.vertex_attrs)


def test_stage2_sample_batch_keeps_objects_apart(stage2, scene, voxel_sets):
    """The voxels of object k attend only to object k: changing object 0's voxels leaves object 1's feats."""
    rgb, masks, _ = scene
    cond = torch.cat([stage2.encode(stage2.prepare(rgb, m)) for m in masks[:2]])
    a = stage2.sample_batch(cond, voxel_sets[:2], seeds=SEEDS[:2], steps=2)
    b = stage2.sample_batch(cond, [voxel_sets[0][:40], voxel_sets[1]], seeds=SEEDS[:2], steps=2)
    assert [len(x) for x in a] == [120, 57] and [len(x) for x in b] == [40, 57]
    assert torch.equal(a[1], b[1])
    assert not torch.equal(a[0][:40], b[0])


@pytest.fixture(scope="module")
def pipe():
    p, _ = Pipeline.load("tiny", "cpu", max_voxels=100)
    assert p.max_batch == 1  # the CPU default: a batch is no faster there
    p.mesh_workers, p.max_batch = 0, 10
    return p


OPTS = dict(names=["a", "b", "c"], seed=7, steps=1, texture_size=32, faces=200)


@pytest.fixture(scope="module")
def one_at_a_time(pipe, scene):
    pipe.max_batch = 1
    try:
        return pipe.reconstruct(pipe.open_photo(EXAMPLE_PHOTO), scene[1], **OPTS)
    finally:
        pipe.max_batch = 10


def _assert_same_objects(got, expected) -> None:
    assert [r.name for r in got] == [r.name for r in expected]
    for x, y in zip(got, expected, strict=True):
        assert x.settings == y.settings and x.num_voxels == y.num_voxels
        np.testing.assert_array_equal(x.pose_matrix, y.pose_matrix)
        np.testing.assert_array_equal(x.voxels, y.voxels)
        np.testing.assert_array_equal(x.mesh.vertices, y.mesh.vertices)
        np.testing.assert_array_equal(x.mesh.faces, y.mesh.faces)
        np.testing.assert_array_equal(x.mesh.uvs, y.mesh.uvs)
        np.testing.assert_array_equal(x.mesh.texture, y.mesh.texture)
        assert x.mask_iou == y.mask_iou


def test_pipeline_batch_equals_one_at_a_time(pipe, scene, one_at_a_time):
    """reconstruct() with the objects batched (all three, or in chunks of two, or stage 1 only) equals one object
    at a time."""
    ctx = pipe.open_photo(EXAMPLE_PHOTO)
    assert [r.timings["batch_objects"] for r in one_at_a_time] == [1, 1, 1]
    for batch, stage2, sizes in ((10, True, [3, 3, 3]), (2, True, [2, 2, 1]), (10, False, [3, 3, 3])):
        pipe.max_batch, pipe.batch_stage2 = batch, stage2
        try:
            got = pipe.reconstruct(ctx, scene[1], **OPTS)
        finally:
            pipe.max_batch, pipe.batch_stage2 = 10, True
        assert [r.timings["batch_objects"] for r in got] == sizes
        _assert_same_objects(got, one_at_a_time)
        for x, y in zip(got, one_at_a_time, strict=True):
            assert torch.equal(x.gaussians.get_xyz, y.gaussians.get_xyz)


def test_mesh_worker_processes_give_the_same_objects(pipe, scene, one_at_a_time):
    """The mesh chain in the pipeline's worker processes (spawned, warmed up while the networks run) gives the
    objects of the in-process chain."""
    pipe.mesh_workers = 2
    try:
        got = pipe.reconstruct(pipe.open_photo(EXAMPLE_PHOTO), scene[1], **OPTS)
        assert pipe._pool is not None and len(pipe._warm) == 2 and all(f.result() for f in pipe._warm)
    finally:
        pipe.close()
        pipe.mesh_workers = 0
    assert pipe._pool is None
    _assert_same_objects(got, one_at_a_time)


def test_out_of_memory_in_a_batch_continues_one_at_a_time(pipe, scene, one_at_a_time, monkeypatch):
    """A CUDA out-of-memory error in the batched stages (driven on the CPU): the objects not yet handed over go
    one at a time, with the same results."""
    ctx = pipe.open_photo(EXAMPLE_PHOTO)
    batched = pipe._gpu_steps_batch
    calls = []

    def flaky(ctx, masks, names, seeds, **kwargs):
        calls.append(len(masks))
        if len(masks) > 1:
            gen = batched(ctx, masks, names, seeds, **kwargs)
            yield next(gen)  # the first object is decoded, then the GPU runs out of memory
            pipe.device = torch.device("cuda")  # (only a CUDA error is retried)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        pipe.device = torch.device("cpu")  # the CPU paths from here on: this machine has no GPU
        yield from batched(ctx, masks, names, seeds, **kwargs)

    monkeypatch.setattr(pipe, "_gpu_steps_batch", flaky)
    monkeypatch.setattr(pipe, "device", torch.device("cpu"))
    monkeypatch.setattr(pipe, "overlap", False)  # finish each object here, before the next one is decoded
    got = pipe.reconstruct(ctx, scene[1], gaussians=False, **OPTS)
    assert calls == [3, 1, 1]  # the batch, then objects b and c alone
    assert all(r.gaussians is None for r in got)
    assert [r.timings["batch_objects"] for r in got] == [3, 1, 1]
    _assert_same_objects(got, one_at_a_time)


# --- on a CUDA GPU (the lead's machine): batched runs agree with one-at-a-time ones ---------------------------


@pytest.mark.gpu
def test_cuda_stage1_batch_agrees_with_one_at_a_time(scene, monkeypatch):
    """float32 with TF32 off: cuBLAS may pick other kernels for other batch sizes, so close rather than equal."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    rgb, masks, pointmap = scene
    s1 = Stage1Pipeline.from_random(replace(stage1_preset("tiny"), max_voxels=MAX_VOXELS), seed=0, device="cuda")
    inputs = [s1.prepare(rgb, m, pointmap) for m in masks]
    conds = [s1.encode(i) for i in inputs]
    singles = [s1.sample(i, c, seed=s, steps=2) for i, c, s in zip(inputs, conds, SEEDS, strict=True)]
    batch = s1.sample_batch(inputs, torch.cat(conds), seeds=SEEDS, steps=2)
    for a, b in zip(batch, singles, strict=True):
        for k in a.latents:
            torch.testing.assert_close(a.latents[k], b.latents[k], rtol=1e-4, atol=1e-4, msg=k)
        ka, kb = (set(map(tuple, o.coords_original[:, 1:].tolist())) for o in (a, b))
        assert len(ka & kb) / len(ka | kb) > 0.999


@pytest.mark.gpu
def test_cuda_graphs_of_a_batch_replay_exactly(scene):
    """bf16: the captured graphs of a 3-object batch give what the eager kernels give, bit for bit."""
    rgb, masks, pointmap = scene
    cfg = replace(stage1_preset("tiny"), max_voxels=MAX_VOXELS)
    graphed = Stage1Pipeline.from_random(cfg, seed=0, device="cuda", dtype=torch.bfloat16)
    eager = Stage1Pipeline.from_random(cfg, seed=0, device="cuda", dtype=torch.bfloat16)
    eager.cuda_graphs = False
    assert graphed.cuda_graphs
    inputs = [graphed.prepare(rgb, m, pointmap) for m in masks]
    cond = torch.cat([graphed.encode(i) for i in inputs])
    a = graphed.sample_batch(inputs, cond, seeds=SEEDS, steps=3)
    b = eager.sample_batch(inputs, cond, seeds=SEEDS, steps=3)
    one = graphed.sample(inputs[0], cond[:1], seed=SEEDS[0], steps=3)  # another batch size: its own graphs
    assert len(graphed._graphs) == 2
    for x, y in zip(a, b, strict=True):
        for k in x.latents:
            torch.testing.assert_close(x.latents[k], y.latents[k], rtol=0, atol=0, msg=k)
    assert one.latents["shape"].shape == (1, 4096, 8)


@pytest.mark.gpu
def test_cuda_stage2_batch_agrees_with_one_at_a_time(scene, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    rgb, masks, pointmap = scene
    s1 = Stage1Pipeline.from_random(replace(stage1_preset("tiny"), max_voxels=MAX_VOXELS), seed=0, device="cuda")
    sizes = (120, 57, 23)
    coords = [s1(rgb, m, pointmap, seed=s, steps=1).coords[:n] for m, s, n in zip(masks, SEEDS, sizes, strict=True)]
    s2 = Stage2Pipeline.from_random(stage2_preset("tiny"), seed=1, device="cuda")
    singles = [s2(rgb, m, c, seed=s, steps=2) for m, c, s in zip(masks, coords, SEEDS, strict=True)]
    batch = s2.batch(rgb, masks, coords, seeds=SEEDS, steps=2)
    for a, b in zip(batch, singles, strict=True):
        torch.testing.assert_close(a.slat_feats, b.slat_feats, rtol=1e-4, atol=1e-4)
        assert abs(len(a.mesh.faces) - len(b.mesh.faces)) <= 0.01 * len(b.mesh.faces)


@pytest.mark.gpu
def test_cuda_floaters_and_split_run_on_the_gpu():
    """The mesh chain's first steps on CUDA tensors equal their CPU results."""
    from sam3d_core.export.cleanup import drop_floaters, split_mesh

    trimesh = pytest.importorskip("trimesh")
    big = trimesh.creation.icosphere(subdivisions=5, radius=0.3)
    small = trimesh.creation.icosphere(subdivisions=1, radius=0.01)
    v = np.concatenate([big.vertices, small.vertices + 0.45]).astype(np.float32)
    f = np.concatenate([big.faces, small.faces + len(big.vertices)])
    kept = drop_floaters(torch.from_numpy(v).cuda(), torch.from_numpy(f).cuda())
    assert kept.is_cuda and torch.equal(kept.cpu(), torch.from_numpy(f[: len(big.faces)]))
    on_gpu = split_mesh(torch.from_numpy(v).cuda(), kept, 4)
    on_cpu = split_mesh(v, f[: len(big.faces)], 4)
    for (a, b), (c, d) in zip(on_gpu, on_cpu, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)


@pytest.mark.gpu
def test_cuda_low_vram_mode_gives_the_same_object_from_pinned_weights(scene):
    """Low-VRAM mode (weights in pinned host memory, one stage on the GPU at a time, nothing copied back) gives
    the object of the normal mode, and leaves no weight on the GPU."""
    rgb, masks, _ = scene
    pipe, _ = Pipeline.load("tiny", "cuda", max_voxels=100)
    pipe.mesh_workers = 0
    ctx = pipe.open_photo(EXAMPLE_PHOTO)
    opts = dict(seed=3, steps=2, texture_size=64, faces=300)
    normal = pipe.reconstruct(ctx, masks[:1], **opts)[0]
    pipe.set_low_vram(True)
    try:
        assert all(p.device.type == "cpu" and p.is_pinned() for p in pipe.stage1.model.parameters())
        low = pipe.reconstruct(ctx, masks[:1], **opts)[0]
        assert all(p.device.type == "cpu" and p.is_pinned() for p in pipe.stage2.model.parameters())
        assert pipe.stage1.device.type == "cpu" and pipe.stage2.device.type == "cpu"
    finally:
        pipe.set_low_vram(False)
    assert all(p.is_cuda for p in pipe.stage1.model.parameters())
    np.testing.assert_array_equal(low.voxels, normal.voxels)
    np.testing.assert_array_equal(low.mesh.faces, normal.mesh.faces)
    np.testing.assert_allclose(low.mesh.vertices, normal.mesh.vertices, rtol=0, atol=1e-6)
