"""Render-pack views made on the training device (`data.packviews`, `training.data.DeviceBatches`): the loader's
processes draw the scenes, the training process renders, adds the mask noise and preprocesses a micro-batch at
once. Real components at tiny sizes on the CPU; the CUDA twin is the gpu-marked test at the end."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_default_model import make_pack

from sam3d_core.config import PreprocessConfig
from sam3d_core.data.pack import RenderPack, RenderPackDataset, ViewSettings, _usable
from sam3d_core.data.packviews import (
    DeviceViews,
    PoseRef,
    ViewPlans,
    collate_plans,
    draw_attempt,
    median_depth,
    plan_view,
    plane_pointmap,
    usable_masks,
)
from sam3d_core.data.sample import Sample
from sam3d_core.registry import stage1_preset
from sam3d_core.training.data import Collate, DeviceBatches, MicroBatches, views_batch

CFG = stage1_preset("tiny")


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    p = make_pack(tmp_path_factory.mktemp("pack"))
    p.save_latents(np.random.default_rng(1).normal(size=(len(p), 8, 8, 8, 8)).astype(np.float32), {"test": True})
    return RenderPack.load(p.folder)


def _dataset(pack, seed=0, **settings) -> RenderPackDataset:
    base = dict(size=64, p_occluded=0.6, p_occluder=0.2, p_mask_noise=0.5, p_flat_pointmap=0.2, p_wall=0.4)
    return RenderPackDataset(pack, seed=seed, settings=ViewSettings(**{**base, **settings}))


def _render(ds, indices, device="cpu"):
    return DeviceViews(ds, device)(collate_plans([plan_view(ds, i) for i in indices]))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.isnan(), b.isnan())
        and (torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)))
    )


def test_device_batches_have_the_collate_paths_structure_and_valid_views(pack):
    ds = _dataset(pack)
    on_device = DeviceBatches(ds, CFG, "cpu")
    batch = on_device(on_device.collate([on_device.source[i] for i in range(6)]))
    ref = Collate(CFG, 1, pairs=False)([ds[i] for i in range(6)])
    assert list(batch.views) == list(ref.views) and list(batch.target) == list(ref.target)
    for part in ("views", "target"):
        for k, v in getattr(ref, part).items():
            got = getattr(batch, part)[k]
            assert got.shape == v.shape and got.dtype == v.dtype, (k, got.shape, v.shape)
    assert batch.rejected is None and batch.size == 6
    assert batch.ids == [f"pack:{plan_view(ds, i).obj}:{i}" for i in range(6)]
    objs = [int(i.split(":")[1]) for i in batch.ids]
    assert torch.equal(batch.target["shape"], torch.from_numpy(pack.latents[objs]).reshape(6, 8, -1).permute(0, 2, 1))
    assert all(torch.isfinite(v).all() for k, v in batch.target.items())
    assert (batch.views["mask"].flatten(1).sum(1) > 0).all()  # every view shows its target
    views = _render(ds, range(6))
    assert bool(usable_masks(views.mask).all()) and views.rgb.dtype == torch.uint8
    for r in views.rotation:  # proper rotations
        assert torch.allclose(r.T @ r, torch.eye(3, dtype=torch.float64), atol=1e-9) and torch.det(r) > 0


def test_device_views_are_a_function_of_seed_and_index(pack):
    ds = _dataset(pack, seed=3)
    a, b = _render(ds, [5, 9, 2]), _render(_dataset(pack, seed=3), [5, 9, 2])
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert _same(x, y) if torch.is_tensor(x) else x == y, f.name
    assert not torch.equal(_render(ds, [5]).rgb[0], _render(_dataset(pack, seed=4), [5]).rgb[0])
    # the step stream of MicroBatches: step 2 read in a run started at 0 equals step 2 of a run resumed at 2
    source = ViewPlans(ds)
    kw = dict(steps=4, batch_size=4, micro=2, rank=0, world=1, seed=7)
    fresh = MicroBatches(source, collate_plans, start=0, **kw)
    resumed = MicroBatches(source, collate_plans, start=2, **kw)
    x, y = fresh[2 * 2 + 1], resumed[1]  # (step 2, second micro-batch)
    assert [p.index for p in x.plans] == [p.index for p in y.plans] and torch.equal(x.backgrounds, y.backgrounds)
    views = DeviceViews(ds, "cpu")
    assert torch.equal(views(x).mask, views(y).mask)
    # DDP: rank 1 of 2 reads the other micro-batch of the same step
    other = MicroBatches(source, collate_plans, start=0, **{**kw, "rank": 1, "world": 2})
    assert [p.index for p in other[2].plans] == [p.index for p in fresh[2 * 2 + 1].plans]


def test_a_hidden_target_falls_back_to_the_next_attempt(pack):
    ds = _dataset(pack, p_mask_noise=0.0)
    plans = [plan_view(ds, i) for i in range(4)]
    hidden = plans[1].first
    behind = PoseRef(hidden.target.obj, hidden.target.rotation, hidden.target.translation * [1, 1, -1], 1.0)
    plans[1] = replace(plans[1], first=replace(hidden, target=behind, mode="alone", tries=[]))  # behind the camera
    views = DeviceViews(ds, "cpu")(collate_plans(plans))
    assert views.attempts == [0, 1, 0, 0]
    second = draw_attempt(ds, 1, plans[1].obj, plans[1].picks, 1)
    flat = plans[1].kind == "flat"
    assert np.allclose(views.rotation[1].numpy(), second.target.rotation)
    if not flat:
        assert np.allclose(views.translation[1].numpy(), second.target.translation)
    alone = _render(ds, [0, 2, 3])  # the other views are what they are without the hidden one
    assert torch.equal(views.rgb[[0, 2, 3]], alone.rgb) and torch.equal(views.mask[[0, 2, 3]], alone.mask)
    assert bool(usable_masks(views.mask).all())


def test_point_map_kinds_come_at_their_rates_and_flat_views_sit_at_unit_distance(pack):
    ds = _dataset(pack, size=40, p_mask_noise=0.3)
    n = 200
    views = [_render(ds, range(i, i + 50)) for i in range(0, n, 50)]
    kinds = [plan_view(ds, i).kind for i in range(n)]
    flat, wall = kinds.count("flat"), kinds.count("wall")
    assert abs(flat / n - 0.2) < 0.09 and abs(wall / (n - flat) - 0.4) < 0.12 and kinds.count("nan") > 0
    pm = torch.cat([v.pointmap for v in views])
    amodal = torch.cat([v.amodal for v in views])
    t = torch.cat([v.translation for v in views])
    for i, k in enumerate(kinds):
        p = pm[i]
        if k == "flat":  # the no-depth fallback plane at depth 1 everywhere
            assert torch.isfinite(p).all() and torch.allclose(p[..., 2], torch.ones(40, 40))
        elif k == "wall":
            assert torch.isfinite(p).all() and float(p[~amodal[i]][:, 2].min()) > 0  # the wall where nothing is
        else:
            assert p[..., 2].isnan().any() and torch.isfinite(p[amodal[i]]).any()  # NaN off the surfaces
    assert all(0.5 < float(t[i, 2]) < 2.0 for i, k in enumerate(kinds) if k == "flat")


def test_flat_views_are_the_metric_scene_scaled_to_the_visible_surfaces_median_depth(pack):
    ds = _dataset(pack, p_flat_pointmap=1.0, p_mask_noise=0.0)
    metric = _dataset(pack, p_flat_pointmap=0.0, p_wall=0.0, p_mask_noise=0.0)  # the same scenes, true points
    a, b = _render(ds, range(6)), _render(metric, range(6))
    assert torch.equal(a.rgb, b.rgb) and torch.equal(a.rotation, b.rotation)
    for i in range(6):
        seen = b.pointmap[i][b.mask[i]][:, 2].numpy()
        unit = float(np.median(seen))
        assert torch.allclose(a.translation[i], b.translation[i] / unit, rtol=1e-12)
        assert torch.allclose(a.scale[i], b.scale[i] / unit, rtol=1e-12)
        assert 0.8 < float(a.translation[i, 2]) < 1.6


def test_wall_and_flat_planes_are_the_numpy_point_maps_bit_for_bit():
    from sam3d_core.inputs.camera import fallback_pointmap, intrinsics_from_fov, pointmap_from_depth

    K = np.array([[61.3, 0.0, 20.0], [0.0, 61.3, 16.0], [0.0, 0.0, 1.0]])
    depth = float(np.float32(2.7 * 1.37))
    ref = pointmap_from_depth(np.full((32, 40), 2.7 * 1.37, np.float32), K)
    got = plane_pointmap(torch.tensor([depth], dtype=torch.float64), torch.from_numpy(K)[None], 32, 40)[0]
    assert torch.equal(got, torch.from_numpy(ref))
    flat, Kf = fallback_pointmap(40, 40, 50.0)
    assert np.array_equal(Kf, intrinsics_from_fov(40, 40, 50.0))
    got = plane_pointmap(torch.ones(1, dtype=torch.float64), torch.from_numpy(Kf)[None], 40, 40)[0]
    assert torch.equal(got, torch.from_numpy(flat.astype(np.float32)))
    z = torch.tensor([[[3.0, 1.0], [2.0, 7.0]], [[5.0, 4.0], [9.0, 8.0]], [[1.0, 1.0], [1.0, 1.0]]])
    where = torch.tensor([[[1, 1], [1, 1]], [[1, 0], [1, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    med = median_depth(z, where)
    assert med[0] == 2.5 and med[1] == 7.0 and med[2].isnan()  # np.median: the mean of the middle two


def test_the_batched_preprocessing_and_targets_equal_collates_for_the_same_views(pack):
    ds = _dataset(pack, size=72, p_mask_noise=1.0)
    views = _render(ds, range(8))
    on_device = views_batch(views, torch.from_numpy(pack.latents), CFG)
    samples = [
        Sample(
            sample_id=views.ids[i],
            photo=views.rgb[i].numpy(),
            mask=views.mask[i].numpy(),
            amodal_mask=views.amodal[i].numpy(),
            K=views.K[i].numpy(),
            rotation=views.rotation[i].numpy(),
            translation=views.translation[i].numpy(),
            scale=np.full(3, float(views.scale[i])),
            occupancy=np.zeros((1, 3), np.int64),
            pointmap=views.pointmap[i].numpy(),
            ss_latent=pack.latents[views.objects[i]],
            source="render-pack",
        )  # fmt: skip
        for i in range(8)
    ]
    ref = Collate(CFG, 1, pairs=False)(samples)
    for k, v in ref.views.items():  # bit for bit (preprocess_stage1 of each view), but a crop larger than the
        if k == "image":  # tiny preset's 70 px is downsampled, whose taps torch sums in its own order: within 2 ulp
            assert torch.allclose(on_device.views[k], v, rtol=0, atol=2.4e-7)
        else:
            assert _same(on_device.views[k], v), k
    for k, v in ref.target.items():
        assert torch.allclose(on_device.target[k], v, rtol=1e-6, atol=1e-6), k
    assert on_device.ids == ref.ids


def test_preprocess_stage1_batch_equals_preprocess_stage1_on_odd_masks():
    from sam3d_core.pipeline.preprocess import preprocess_stage1, preprocess_stage1_batch

    rng = np.random.default_rng(0)
    b, h, w = 4, 50, 60
    images = rng.integers(0, 255, (b, h, w, 3), dtype=np.uint8)
    masks = np.zeros((b, h, w), bool)
    masks[0, 10:30, 20:35] = True
    masks[1, 0:50, 0:12] = True  # the box leaves the image
    masks[2, 20:23, 40:59] = True  # wide and flat: downsampled crop
    masks[3, 2:48, 3:58] = True
    points = rng.normal(size=(b, h, w, 3)).astype(np.float32)
    points[0, :4] = np.nan
    points[2, 21, 41] = np.inf
    for cfg in (PreprocessConfig(image_size=24), PreprocessConfig(image_size=90, padding_factor=0.1)):
        out = preprocess_stage1_batch(torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(points), cfg)
        for i in range(b):
            one = preprocess_stage1(images[i], masks[i], points[i], cfg)
            for k, v in one.items():
                got = out[k][i : i + 1]
                if k == "image" and cfg.image_size == 24:  # a downsampled crop: torch sums its taps otherwise
                    assert torch.allclose(got, v, rtol=0, atol=2.4e-7), (cfg, i, k)
                else:
                    assert _same(got, v), (cfg, i, k)  # upsampled crops, masks, point maps, statistics: exact
    with pytest.raises(ValueError, match=r"masks\[1\]: got an empty mask"):
        masks[1] = False
        preprocess_stage1_batch(torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(points), cfg)


def test_usable_masks_is_the_packs_rule():
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 40, 40), bool)
    masks[1, 5:30, 5:30] = True
    masks[2, 5:6, 5:30] = True  # one row: too flat
    masks[3, 10:19, 10:19] = True  # 9 x 9: a box of 8
    masks[4, 10:18, 10:18] = True  # 8 x 8: a box of 7
    masks[5] = rng.uniform(size=(40, 40)) < 0.001
    got = usable_masks(torch.from_numpy(masks)).tolist()
    assert got == [_usable(m) for m in masks] == [False, True, False, True, False, got[5]]


def test_target_masks_are_the_rendered_masks(pack):
    from sam3d_core.data.render import Shot, render_views, target_masks

    ds = _dataset(pack, p_occluded=1.0, p_occluder=0.0)
    dv = DeviceViews(ds, "cpu")
    shots = []
    for i in range(4):
        a = plan_view(ds, i).first
        shots += [Shot([dv.placed(a.target), *map(dv.placed, t)], a.K) for t in a.tries]
    assert torch.equal(target_masks(shots, 64, 64), render_views(shots, 64, 64, to_numpy=False).mask)


@pytest.mark.slow
def test_train_default_with_views_on_the_device_trains_pauses_and_resumes(tmp_path, pack):
    import json
    import shutil

    from sam3d_core.training.default_model import DefaultPlan, run

    folder = tmp_path / "pack"
    shutil.copytree(pack.folder, folder)
    (folder / "latents.npy").unlink()
    plan = DefaultPlan(
        pack=str(folder), out=str(tmp_path / "run"), preset="default-tiny", device="cpu", workers=0,
        view_device="device", decoder_steps=2, decoder_batch=1, steps=3, batch_size=2, warmup_steps=1, save_every=1,
    )  # fmt: skip
    first = run(plan, log=lambda s: None, stop_after_s=0.0)
    second = run(plan, log=lambda s: None)
    assert first["status"] == "paused" and first["step"] == 1 and second["status"] == "done"
    metrics = [json.loads(x) for x in (tmp_path / "run" / "flow" / "metrics.jsonl").read_text().splitlines()]
    losses = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) for v in losses.values())
    config = json.loads((tmp_path / "run" / "flow" / "run.json").read_text())["config"]
    assert config["view_device"] == "device"
    assert (tmp_path / "run" / "default" / "manifest.json").is_file()


def test_view_device_settings_are_checked(pack, tmp_path):
    from sam3d_core.data.sample import SampleError
    from sam3d_core.training.config import ConfigError, TrainConfig
    from sam3d_core.training.data import device_batches

    base = TrainConfig(data=("x",), output=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="view_device = 'cuda': expected one of auto, cpu, device"):
        replace(base, view_device="cuda").check()
    with pytest.raises(ConfigError, match="view_device = 'device' renders stage-1 views"):
        replace(base, view_device="device", stage=2).check()
    ds = _dataset(pack)
    cpu = torch.device("cpu")
    assert device_batches("auto", ds, CFG, cpu, 1, False) is None  # auto on a CPU: the loader's processes
    assert device_batches("cpu", ds, CFG, cpu, 1, False) is None
    assert isinstance(device_batches("device", ds, CFG, cpu, 1, False), DeviceBatches)
    with pytest.raises(SampleError, match="renders the views of a render pack, and data names sample folders"):
        device_batches("device", [object()], CFG, cpu, 1, False)


@pytest.mark.gpu
def test_views_rendered_on_cuda_equal_those_rendered_on_the_cpu(pack):
    ds = _dataset(pack, size=96, p_mask_noise=0.7)
    batch = collate_plans([plan_view(ds, i) for i in range(16)])
    cpu, gpu = DeviceViews(ds, "cpu")(batch), DeviceViews(ds, "cuda")(batch)
    assert cpu.attempts == gpu.attempts and cpu.modes == gpu.modes and cpu.ids == gpu.ids
    assert torch.equal(cpu.mask, gpu.mask.cpu()) and torch.equal(cpu.amodal, gpu.amodal.cpu())  # exact
    assert (cpu.rgb.int() - gpu.rgb.cpu().int()).abs().max() <= 1
    assert torch.equal(cpu.pointmap.isnan(), gpu.pointmap.cpu().isnan())
    assert torch.allclose(torch.nan_to_num(cpu.pointmap), torch.nan_to_num(gpu.pointmap.cpu()), atol=1e-4)
    latents = torch.from_numpy(pack.latents)
    a, b = views_batch(cpu, latents, CFG), views_batch(gpu, latents.cuda(), CFG)
    for k, v in a.views.items():  # masks exact; images within a colour level; point maps within rounding
        tol = 0.0 if "mask" in k else 1 / 255 + 1e-5 if "image" in k else 1e-3
        assert torch.equal(v.isnan(), b.views[k].cpu().isnan()), k
        assert torch.allclose(torch.nan_to_num(v), torch.nan_to_num(b.views[k].cpu()), rtol=0, atol=tol), k
    for k, v in a.target.items():
        assert torch.allclose(v, b.target[k].cpu(), atol=1e-4), k
