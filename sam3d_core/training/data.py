"""Samples -> training batches: the condition inputs (the pipeline's own preprocessing) and the flow targets.

Stage 1 targets are the latents the MoT denoises: the shape latent [8, 16, 16, 16] as 4096 tokens of 8, and the
pose in the model's scale-shift-invariant frame. The pose of a sample maps local -> PyTorch3D camera; the
stage-1 preprocessing normalises the photo's point map by (scale sigma, shift) and `encode_pose`, the exact
inverse of `decode_pose`, turns the pose into the latents the sampler would have to produce:
    6drotation_normalized = (first two columns of R - mean) / std,  scale = log(s / sigma),
    translation = (t - shift) / sigma,  translation_scale = 0 (log 1, the official ScaleShiftInvariant target).
Stage 2 targets are the structured latent: coords [M, 3] on the 64^3 grid and feats [M, 8] normalised with
the pipeline's SLAT statistics (the inverse of `denormalize_slat`).

The data order is one global stream: position p = step * batch_size + j reads sample perm_e[p mod N] with
e = p div N and perm_e a seeded permutation. A step's batch is cut into micro-batches; process `rank` takes
micro-batches rank, rank + world, ... So the batch of a step does not depend on the number of processes,
and resuming at step s continues the stream exactly (the data position is s * batch_size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sam3d_core.config import Stage1Config, Stage2Config
from sam3d_core.data.sample import Sample, SampleDataset, SampleError
from sam3d_core.geometry.layout import Pose, encode_pose, matrix_to_quaternion
from sam3d_core.pipeline.preprocess import preprocess_stage1, preprocess_stage1_batch, preprocess_stage2

STAGE1_VIEWS = ("image", "rgb_image", "mask", "rgb_image_mask", "pointmap", "rgb_pointmap")
STAGE2_VIEWS = ("image", "rgb_image", "mask", "rgb_image_mask")


@dataclass
class Batch:
    """One micro-batch. views: condition inputs [b, C, S, S]; target / rejected: see `stage1_targets` and
    `stage2_targets` (rejected only for preference pairs); ids: the sample ids (error messages, logs)."""

    views: dict[str, torch.Tensor]
    target: dict[str, torch.Tensor]
    rejected: dict[str, torch.Tensor] | None
    ids: list[str]

    @property
    def size(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device) -> Batch:
        def move(d):
            return None if d is None else {k: v.to(device, non_blocking=True) for k, v in d.items()}

        return Batch(move(self.views), move(self.target), move(self.rejected), self.ids)


def global_indices(num_samples: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The dataset indices of step `step`'s global batch (see the module doc)."""
    out, cache = [], {}
    for p in range(step * batch_size, (step + 1) * batch_size):
        epoch = p // num_samples
        if epoch not in cache:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(num_samples, generator=gen).tolist()
        out.append(cache[epoch][p % num_samples])
    return out


def _need(s: Sample, key: str, why: str):
    value = getattr(s, key)
    if value is None:
        raise SampleError(f"sample {s.sample_id} has no {key}; {why}")
    return value


def stage1_targets(s: Sample, scale: torch.Tensor, shift: torch.Tensor, which: dict | None = None) -> dict:
    """The stage-1 latents of one sample (or of its rejected alternative, `which` = s.rejected), batch of 1."""
    src = which or {}
    latent = src.get("ss_latent", _need(s, "ss_latent", "stage-1 training needs the shape latent (`sam3d data`)"))
    rot = torch.as_tensor(np.asarray(src.get("rotation", s.rotation)), dtype=torch.float64)[None]
    pose = Pose(
        rotation=rot,
        quaternion=matrix_to_quaternion(rot),
        translation=torch.as_tensor(np.asarray(src.get("translation", s.translation)), dtype=torch.float64)[None],
        scale=torch.as_tensor(np.asarray(src.get("scale", s.scale)), dtype=torch.float64)[None],
    )
    out = encode_pose(pose, scale, shift)  # [1, 1, c] each
    out["translation_scale"] = torch.zeros(1, 1, 1)
    c = latent.shape[0]
    out["shape"] = torch.from_numpy(np.ascontiguousarray(latent)).reshape(1, c, -1).permute(0, 2, 1).float()
    return out


def stage2_targets(s: Sample, mean: torch.Tensor, std: torch.Tensor, which: dict | None = None) -> dict:
    """coords [M, 3] int64 and normalised feats [M, 8] of one sample (or of its rejected alternative)."""
    src = which or {}
    why = "stage-2 training needs the structured latent (slat_coords + slat_feats; `sam3d data`)"
    coords = src.get("slat_coords", _need(s, "slat_coords", why))
    feats = src.get("slat_feats", _need(s, "slat_feats", why))
    if feats.shape[1] != mean.shape[0]:
        raise SampleError(f"sample {s.sample_id}: slat_feats has {feats.shape[1]} channels, the model {mean.shape[0]}")
    feats = (torch.from_numpy(np.ascontiguousarray(feats)).float() - mean) / std
    return {"coords": torch.from_numpy(np.asarray(coords, dtype=np.int64)), "feats": feats}


def _cat_sparse(parts: list[dict]) -> dict[str, torch.Tensor]:
    """Per-object coords/feats -> coords [N, 4] (object, x, y, z) grouped by object, feats [N, 8]."""
    coords = [torch.cat([torch.full((p["coords"].shape[0], 1), i), p["coords"]], dim=1) for i, p in enumerate(parts)]
    return {"coords": torch.cat(coords).to(torch.int32), "feats": torch.cat([p["feats"] for p in parts])}


class Collate:
    """Samples -> Batch for one stage; picklable, so DataLoader workers run it (preprocessing on the CPU)."""

    def __init__(self, model_cfg: Stage1Config | Stage2Config, stage: int, pairs: bool):
        self.cfg, self.stage, self.pairs = model_cfg, stage, pairs

    def __call__(self, samples: list[Sample]) -> Batch:
        views, target, rejected = [], [], []
        for s in samples:
            if self.pairs and not s.rejected:
                raise SampleError(f"sample {s.sample_id} has no rejected alternative; DPO trains on preference pairs")
            if self.stage == 1:
                pointmap = _need(s, "pointmap", "stage 1 is conditioned on the photo's point map")
                v = preprocess_stage1(s.photo, s.mask, pointmap, self.cfg.preprocess)
                scale, shift = v.pop("pointmap_scale"), v.pop("pointmap_shift")
                target.append(stage1_targets(s, scale, shift))
                if self.pairs:
                    rejected.append(stage1_targets(s, scale, shift, s.rejected))
            else:
                v = preprocess_stage2(s.photo, s.mask, self.cfg.preprocess)
                mean, std = torch.tensor(self.cfg.slat_mean), torch.tensor(self.cfg.slat_std)
                target.append(stage2_targets(s, mean, std))
                if self.pairs:
                    rejected.append(stage2_targets(s, mean, std, s.rejected))
            views.append(v)
        stacked = {k: torch.cat([v[k] for v in views]) for k in views[0]}
        if self.stage == 1:
            tgt = {k: torch.cat([t[k] for t in target]) for k in target[0]}
            rej = {k: torch.cat([t[k] for t in rejected]) for k in rejected[0]} if rejected else None
        else:
            tgt, rej = _cat_sparse(target), (_cat_sparse(rejected) if rejected else None)
        return Batch(stacked, tgt, rej, [s.sample_id for s in samples])


class MicroBatches(torch.utils.data.Dataset):
    """Item k = this process's k-th micro-batch from step `start` on: a map-style dataset, so a DataLoader
    (with workers) prefetches in order and a resumed run starts at its step without replaying the stream."""

    def __init__(
        self,
        dataset: SampleDataset,
        collate: Collate,
        *,
        start: int,
        steps: int,
        batch_size: int,
        micro: int,
        rank: int,
        world: int,
        seed: int,
    ):
        self.dataset, self.collate = dataset, collate
        self.start, self.steps, self.batch_size, self.micro = start, steps, batch_size, micro
        self.rank, self.world, self.seed = rank, world, seed
        self.per_step = batch_size // (micro * world)  # accumulation steps

    def __len__(self) -> int:
        return (self.steps - self.start) * self.per_step

    def locate(self, k: int) -> tuple[int, int]:
        """(step, global micro-batch index) of item k."""
        step, a = divmod(k, self.per_step)
        return self.start + step, a * self.world + self.rank

    def __getitem__(self, k: int) -> Batch:
        step, m = self.locate(k)
        idx = global_indices(len(self.dataset), step, self.batch_size, self.seed)[m * self.micro : (m + 1) * self.micro]
        return self.collate([self.dataset[i] for i in idx])


class DeviceBatches:
    """Render-pack micro-batches made on the training device (`data.packviews`): the loader's processes only draw
    the scenes (`source` and `collate` go to MicroBatches), the training process renders and preprocesses each
    micro-batch at once (`batches(item)`: PlanBatch -> Batch with Collate's keys, shapes, dtypes and targets)."""

    def __init__(self, dataset, model_cfg: Stage1Config, device: torch.device | str):
        from sam3d_core.data.packviews import DeviceViews, ViewPlans, collate_plans

        self.source, self.collate = ViewPlans(dataset), collate_plans
        self.views = DeviceViews(dataset, device)
        self.cfg = model_cfg
        self.latents = torch.from_numpy(np.ascontiguousarray(dataset.pack.latents, np.float32)).to(device)

    def __call__(self, plans) -> Batch:
        return views_batch(self.views(plans), self.latents, self.cfg)


def views_batch(views, latents: torch.Tensor, model_cfg: Stage1Config) -> Batch:
    """Rendered views (`data.packviews.RenderedViews`, on one device) -> the stage-1 Batch that Collate makes of
    the same views as Samples: `preprocess_stage1_batch` and the targets of `stage1_targets`, batched.
    latents: the pack's shape latents [N, C, R, R, R] on the views' device."""
    pre = preprocess_stage1_batch(views.rgb, views.mask, views.pointmap, model_cfg.preprocess)
    scale, shift = pre.pop("pointmap_scale"), pre.pop("pointmap_shift")
    b = len(views.ids)
    pose = Pose(
        rotation=views.rotation,
        quaternion=matrix_to_quaternion(views.rotation),
        translation=views.translation,
        scale=views.scale[:, None].expand(b, 3),
    )
    target = encode_pose(pose, scale, shift)  # [B, 1, c] each
    target["translation_scale"] = torch.zeros(b, 1, 1, device=scale.device)
    latent = latents[torch.tensor(views.objects, device=latents.device)]  # [B, C, R, R, R]
    target["shape"] = latent.reshape(b, latent.shape[1], -1).permute(0, 2, 1).float().contiguous()
    return Batch(pre, target, None, list(views.ids))


def device_batches(view_device: str, dataset, model_cfg, device: torch.device, stage: int, pairs: bool):
    """The DeviceBatches `view_device` asks for, or None (the loader's processes make whole batches: Collate).
    "device": a render pack's views on `device`; "auto": that when the pack trains stage 1 on CUDA; "cpu": None."""
    from sam3d_core.data.pack import RenderPackDataset

    pack = isinstance(dataset, RenderPackDataset)
    if view_device == "cpu" or (view_device == "auto" and not (pack and device.type == "cuda")):
        return None
    if stage != 1 or pairs:
        if view_device == "auto":
            return None
        raise SampleError("view_device = 'device' makes stage-1 views (flow or shortcut); set view_device = 'cpu'")
    if not pack:
        raise SampleError(
            "view_device = 'device' renders the views of a render pack, and data names sample folders (stored "
            "views): set view_device = 'cpu' or 'auto'"
        )
    return DeviceBatches(dataset, model_cfg, device)


def open_dataset(folders: tuple[str, ...], what: str, seed: int = 0):
    """The dataset of `folders` with an error that says which setting named them: a SampleDataset of sample
    folders, or one render pack (`data.pack`: views rendered on the fly, deterministic in `seed` and the index)."""
    from sam3d_core.data.pack import RenderPack, RenderPackDataset, is_pack

    packs = [f for f in folders if is_pack(f)]
    try:
        if packs:
            if len(folders) != 1:
                raise SampleError(
                    f"a render pack ({packs[0]}) trains alone: list it as the only entry (got {len(folders)} folders)"
                )
            return RenderPackDataset(RenderPack.load(packs[0]), seed=seed)
        return SampleDataset(*folders)
    except SampleError as e:
        raise SampleError(f"{what}: {e}") from None
