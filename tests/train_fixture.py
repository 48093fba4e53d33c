"""Tiny training samples and configurations for the tests of sam3d_core.training (random latents are fine:
the tests check the mechanics and the formulas, not what the model learns)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sam3d_core.data.sample import Sample, ShardWriter
from sam3d_core.training.config import recipe


def rotation(rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def make_sample(i: int, pairs: bool = False, slat_rows: int = 24) -> Sample:
    rng = np.random.default_rng(1000 + i)
    h, w = 40, 52
    mask = np.zeros((h, w), bool)
    mask[8 + i % 3 : 30, 10 : 40 - i % 4] = True
    # a plausible point map: a plane in front of the camera (PyTorch3D frame: z forward)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    pointmap = np.stack([(26 - xs) / 50 * 2.5, (20 - ys) / 50 * 2.5, np.full_like(xs, 2.5)], -1).astype(np.float32)
    coords = np.unique(rng.integers(20, 44, (slat_rows, 3)), axis=0)
    rejected = None
    if pairs:
        rcoords = np.unique(rng.integers(18, 46, (slat_rows + 5, 3)), axis=0)
        rejected = {
            "ss_latent": rng.normal(size=(8, 16, 16, 16)).astype(np.float32),
            "rotation": rotation(rng),
            "slat_coords": rcoords,
            "slat_feats": rng.normal(size=(len(rcoords), 8)).astype(np.float32),
        }
    return Sample(
        sample_id=f"s{i:03d}",
        photo=rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
        mask=mask,
        K=np.array([[50.0, 0, 26], [0, 50, 20], [0, 0, 1]]),
        rotation=rotation(rng),
        translation=np.array([0.1 * (i % 3), -0.1, 2.4]),
        scale=np.full(3, 0.4 + 0.05 * (i % 4)),
        occupancy=rng.integers(0, 64, (30, 3)),
        pointmap=pointmap,
        ss_latent=rng.normal(size=(8, 16, 16, 16)).astype(np.float32),
        slat_coords=coords,
        slat_feats=rng.normal(size=(len(coords), 8)).astype(np.float32),
        rejected=rejected,
        source="test",
        licence="CC0-1.0",
    )


def make_dataset(folder: Path, n: int = 4, pairs: bool = False) -> Path:
    with ShardWriter(folder, samples_per_shard=3, info={"builder": "test"}) as w:
        for i in range(n):
            w.add(make_sample(i, pairs))
    return folder


def tiny(name: str, data: Path, output: Path, **kw):
    """A recipe at the tiny preset with random weights, one process, no data workers, a few steps."""
    base = dict(
        base="random",
        preset="tiny",
        data=(str(data),),
        output=str(output),
        steps=3,
        batch_size=2,
        num_workers=0,
        warmup_steps=1,
        log_every=1,
        save_every=100,
        grad_checkpointing=False,
    )
    return recipe(name, **{**base, **kw}).check()


def objective_and_batch(name: str, n: int = 2, seed: int = 0, **kw):
    """(Objective, Batch, Draws) of recipe `name` at the tiny preset, on n fixed samples, on the CPU."""
    import torch

    from sam3d_core.training.data import Collate
    from sam3d_core.training.loop import build_objective, load_base
    from sam3d_core.training.objective import draw

    cfg = recipe(name, base="random", preset="tiny", data=("unused",), output="unused", **kw).check()
    stage_model, _ = load_base(cfg)
    obj = build_objective(cfg, stage_model)
    batch = Collate(stage_model.cfg, cfg.stage, pairs=cfg.objective == "dpo")(
        [make_sample(i, pairs=cfg.objective == "dpo") for i in range(n)]
    )
    draws = draw(cfg, stage_model.cfg, batch, torch.Generator().manual_seed(seed))
    return obj, batch, draws
