"""Training views per second of a render pack: the loader's processes rendering vs the training device rendering.

    python bench/train_views.py --pack PACK [--device cuda] [--workers 15] [--batch 64] [--batches 30]
                                [--which both|cpu|device] [--preset default] [--threads N] [--json out.json]

(a) cpu: what `sam3d train` did until now: --workers DataLoader processes, each rendering its micro-batch's views
    on the CPU (`RenderPackDataset`) and preprocessing them (`Collate`); the batch is then copied to --device.
(b) device: the processes only draw the scenes (`data.packviews.ViewPlans`), the training process renders and
    preprocesses each micro-batch on --device (`training.data.DeviceBatches`), as `view_device = "device"` trains.
Both read the same step stream (MicroBatches, seed 0) at the same batch size. Printed per path: views/s of the
whole path (what the training loop would get if the model took no time), and for (b) also the device's share
alone (render + preprocess of a batch already drawn: the rate when enough processes draw), then one line of GPU
memory. Timed after --warmup batches (by default past the processes' first burst, which would flatter (a)); on CUDA
every batch is synchronised before the clock is read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sam3d_core.data.pack import RenderPack, RenderPackDataset, ViewSettings  # noqa: E402
from sam3d_core.registry import stage1_preset  # noqa: E402
from sam3d_core.training.data import Collate, DeviceBatches, MicroBatches  # noqa: E402


def loader(dataset, collate, args, steps: int) -> torch.utils.data.DataLoader:
    micro = MicroBatches(
        dataset, collate, start=0, steps=steps, batch_size=args.batch, micro=args.batch, rank=0, world=1, seed=0
    )
    return torch.utils.data.DataLoader(
        micro, batch_size=None, num_workers=args.workers, prefetch_factor=2 if args.workers else None
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(batches, make, device: torch.device, warmup: int) -> tuple[float, float]:
    """(views/s of the whole path, seconds spent in `make` per batch) over the batches after `warmup`."""
    views, count, in_make, t0 = 0, 0, 0.0, time.perf_counter()
    for i, item in enumerate(batches):
        if i == warmup:
            sync(device)
            views, count, in_make, t0 = 0, 0, 0.0, time.perf_counter()
        t = time.perf_counter()
        batch = make(item)
        sync(device)
        in_make += time.perf_counter() - t
        views, count = views + batch.size, count + 1
    sync(device)
    return views / (time.perf_counter() - t0), in_make / max(count, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", required=True, help="a render pack with latents.npy (`sam3d train-default` writes it)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=30, help="timed batches per path")
    ap.add_argument(
        "--warmup", type=int, default=-1,
        help="batches before the clock starts (-1: 2 x workers + 1, past the first burst of the processes' batches)",
    )  # fmt: skip
    ap.add_argument("--size", type=int, default=ViewSettings().size, help="rendered view size (pixels)")
    ap.add_argument("--preset", default="default", help="stage-1 preset whose preprocessing the batches get")
    ap.add_argument("--which", choices=("both", "cpu", "device"), default="both")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of this process (0: torch's default)")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:  # on a busy CPU, torch's default threads fight for the cores (the workers run 1 each)
        torch.set_num_threads(args.threads)
    ds = RenderPackDataset(RenderPack.load(args.pack), seed=0, settings=ViewSettings(size=args.size))
    model_cfg = stage1_preset(args.preset)
    if args.warmup < 0:
        args.warmup = 2 * args.workers + 1
    steps = args.warmup + args.batches
    result = {"device": str(device), "workers": args.workers, "batch": args.batch, "size": args.size}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    if args.which in ("both", "cpu"):
        batches = loader(ds, Collate(model_cfg, 1, pairs=False), args, steps)
        rate, _ = timed(batches, lambda b: b.to(device), device, args.warmup)
        result["cpu_views_per_s"] = rate
        print(f"(a) cpu workers : {rate:8.1f} views/s  ({args.workers} processes render + preprocess, batch "
              f"{args.batch}, {args.size} px, copied to {device})", flush=True)  # fmt: skip
    if args.which in ("both", "device"):
        on_device = DeviceBatches(ds, model_cfg, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batches = loader(on_device.source, on_device.collate, args, steps)
        rate, per_batch = timed(batches, on_device, device, args.warmup)
        result.update({"device_views_per_s": rate, "device_only_views_per_s": args.batch / per_batch})
        print(f"(b) on {device.type:<8}: {rate:8.1f} views/s  ({args.workers} processes draw, {device} renders + "
              f"preprocesses batch {args.batch}); the device alone: {args.batch / per_batch:.1f} views/s "
              f"({per_batch * 1e3:.1f} ms per batch)", flush=True)  # fmt: skip
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            result["gpu_peak_gib"] = peak
            print(f"gpu memory: {peak:.2f} GiB peak allocated by the device path (batch {args.batch})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
