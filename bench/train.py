"""Training speed and memory at the official configuration, random initial weights, one GPU.

    python bench/train.py [--recipes sft-stage1,lora-stage1,...] [--steps 12] [--warmup 3] [--out train.json]

For each recipe: a synthetic sample folder at realistic sizes (640 x 480 photos with point maps, the 16^3 x 8
shape latent, --slat-voxels structured-latent rows; preference pairs for DPO), then `train()` for --steps
steps at the recipe's batch size (or --batch), through the real loop (data loader, bf16 autocast, gradient
checkpointing as the recipe sets it, AdamW, EMA, one checkpoint at the end). Prints, per recipe, samples per
second over the steps after --warmup and the peak GPU memory (torch.cuda.max_memory_allocated), and a
Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sam3d_core.data.sample import Sample, ShardWriter  # noqa: E402
from sam3d_core.training.config import RECIPES, recipe  # noqa: E402
from sam3d_core.training.loop import train  # noqa: E402

# The targets on an 80 GB card: full stage 1 batch >= 4 with checkpointing, LoRA stage 1 batch >= 6.
BATCH = {"sft-stage1": 4, "lora-stage1": 6, "dpo-stage1": 6, "shortcut-stage1": 4, "sft-stage2": 4, "dpo-stage2": 3}


def rotation(rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def sample(i: int, voxels: int, pairs: bool) -> Sample:
    rng = np.random.default_rng(i)
    h, w = 480, 640
    mask = np.zeros((h, w), bool)
    mask[120:380, 180:460] = True
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    pointmap = np.stack([(320 - xs) / 500 * 3, (240 - ys) / 500 * 3, np.full_like(xs, 3.0)], -1).astype(np.float32)

    def slat():
        # a surface, as stage 1 produces (pruned interior): a sphere shell holding about `voxels` cells
        g = np.stack(np.meshgrid(*[np.arange(64)] * 3, indexing="ij"), -1).reshape(-1, 3)
        radius = min(30.0, (voxels / (6 * np.pi)) ** 0.5)
        dist = np.linalg.norm(g - 31.5 + rng.normal(0, 0.3, 3), axis=1)
        coords = g[np.argsort(np.abs(dist - radius))[:voxels]]
        return coords, rng.normal(size=(len(coords), 8)).astype(np.float32)

    coords, feats = slat()
    rejected = None
    if pairs:
        rc, rf = slat()
        rejected = {
            "ss_latent": rng.normal(size=(8, 16, 16, 16)).astype(np.float32),
            "slat_coords": rc,
            "slat_feats": rf,
        }
    return Sample(
        sample_id=f"b{i:04d}",
        photo=rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
        mask=mask,
        K=np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]]),
        rotation=rotation(rng),
        translation=np.array([0.1, -0.1, 3.0]),
        scale=np.full(3, 0.8),
        occupancy=rng.integers(0, 64, (100, 3)),
        pointmap=pointmap,
        ss_latent=rng.normal(size=(8, 16, 16, 16)).astype(np.float32),
        slat_coords=coords,
        slat_feats=feats,
        rejected=rejected,
        source="bench",
        licence="CC0-1.0",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3, help="steps excluded from the rate (allocator, autotuning)")
    ap.add_argument("--batch", type=int, default=0, help="override every recipe's batch size (0 = the table above)")
    ap.add_argument("--slat-voxels", type=int, default=16000, help="structured-latent rows per stage-2 object")
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/train.py measures a GPU; run it on the GPU machine")
    tmp = Path(tempfile.mkdtemp(prefix="sam3d-bench-train-"))
    data = {}
    for pairs in (False, True):
        folder = tmp / ("pairs" if pairs else "single")
        with ShardWriter(folder, samples_per_shard=4) as w:
            for i in range(args.samples):
                w.add(sample(i, args.slat_voxels, pairs))
        data[pairs] = folder
    device = torch.cuda.get_device_name()
    results = []
    for name in args.recipes.split(","):
        batch = args.batch or BATCH[name]
        cfg = recipe(
            name, base="random", preset="official", data=(str(data[RECIPES[name]["objective"] == "dpo"]),),
            output=str(tmp / f"run-{name}"), steps=args.steps, batch_size=batch, num_workers=args.workers,
            warmup_steps=1, log_every=1, save_every=10**6,
        ).check()  # fmt: skip
        times: list[float] = []
        torch.cuda.reset_peak_memory_stats()

        def progress(p, times=times):
            torch.cuda.synchronize()
            times.append(time.perf_counter())

        t0 = time.perf_counter()
        try:
            train(cfg, progress=progress)
        except Exception as e:  # report and go on with the next recipe
            results.append({"recipe": name, "batch": batch, "error": f"{type(e).__name__}: {e}"})
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        timed = times[args.warmup :]
        rate = batch * (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else float("nan")
        peak = torch.cuda.max_memory_allocated() / 1024**3
        row = {
            "recipe": name,
            "batch": batch,
            "grad_checkpointing": cfg.grad_checkpointing,
            "samples_per_s": rate,
            "step_s": batch / rate,
            "peak_memory_gb": peak,
            "wall_s": time.perf_counter() - t0,
        }
        results.append(row)
        print(f"{name}: batch {batch}  {rate:.2f} samples/s  peak {peak:.1f} GiB", flush=True)
        shutil.rmtree(tmp / f"run-{name}", ignore_errors=True)
        torch.cuda.empty_cache()
    print(f"\nDevice: {device}, torch {torch.__version__}; official configuration, random weights, bf16 autocast")
    print("| recipe | batch | grad. checkpointing | samples/s | s/step | peak GPU memory (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['recipe']} | {r['batch']} | | failed: {r['error'][:60]} | | |")
        else:
            print(
                f"| {r['recipe']} | {r['batch']} | {'yes' if r['grad_checkpointing'] else 'no'} | "
                f"{r['samples_per_s']:.2f} | {r['step_s']:.2f} | {r['peak_memory_gb']:.1f} |"
            )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"device": device, "torch": torch.__version__, "results": results}, indent=1)
        )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
