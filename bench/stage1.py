"""Stage-1 speed and memory: one object, official configuration, random weights.

    python bench/stage1.py [--preset official] [--dtype bf16] [--repeats 3]
                           [--official-json official_timing.json] [--out result.json]

Times (CUDA-synchronised wall clock, median of --repeats after one warm-up): preprocessing, condition
embedding, 25-step CFG-7 sampling, occupancy decoding + voxel extraction + pose, the whole object, and
the 4-step shortcut mode; peak GPU memory. With --official-json (written by a run of the official code
in the same session on the same machine) the table also shows the official numbers and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sam3d_core.cli.reconstruct import EXAMPLE_MASK, EXAMPLE_PHOTO
from sam3d_core.inputs.camera import fallback_pointmap  # noqa: E402
from sam3d_core.inputs.imageio import load_mask, load_photo  # noqa: E402
from sam3d_core.pipeline.stage1 import Stage1Pipeline  # noqa: E402
from sam3d_core.registry import stage1_preset  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def run_once(pipe: Stage1Pipeline, image, mask, pointmap, shortcut: bool) -> dict[str, float]:
    dev = pipe.device
    inputs, t_prep = timed(lambda: pipe.prepare(image, mask, pointmap), dev)
    cond, t_enc = timed(lambda: pipe.encode(inputs), dev)
    out, t_rest = timed(lambda: pipe.sample(inputs, cond, seed=42, shortcut=shortcut), dev)
    return {
        "preprocess": t_prep,
        "condition": t_enc,
        "sample+decode": t_rest,
        "total": t_prep + t_enc + t_rest,
        "voxels": float(len(out.coords)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="official")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the flow model's fast path")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="launch kernels eagerly (for comparison)")
    ap.add_argument("--official-json", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    device = torch.device(args.device)
    photo = load_photo(EXAMPLE_PHOTO)
    image, mask = photo.rgb, load_mask(EXAMPLE_MASK, photo)
    pointmap, _ = fallback_pointmap(*image.shape[:2])
    pipe = Stage1Pipeline.from_random(
        stage1_preset(args.preset), seed=0, device=args.device, dtype=DTYPES[args.dtype], compile=args.compile
    )
    pipe.cuda_graphs = pipe.cuda_graphs and not args.no_cuda_graphs
    rows = {}
    for mode, shortcut in (("default (25 steps, CFG 7)", False), ("shortcut (4 steps)", True)):
        first = run_once(pipe, image, mask, pointmap, shortcut)  # warm-up: compilation, graph capture
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        runs = [run_once(pipe, image, mask, pointmap, shortcut) for _ in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        if device.type == "cuda":
            med["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        med["first_call_s"] = first["total"]
        rows[mode] = med

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "preset": args.preset,
        "dtype": args.dtype,
        "compile": args.compile,
        "cuda_graphs": pipe.cuda_graphs,
        "date": time.strftime("%Y-%m-%d"),
        "ours": rows,
    }
    if args.official_json and args.official_json.is_file():
        result["official"] = json.loads(args.official_json.read_text())
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    for mode, r in rows.items():
        print(
            f"| ours | {mode} | {r['condition']:.3f} | {r['sample+decode']:.3f} | {r['total']:.3f} | "
            f"{r.get('peak_gb', float('nan')):.2f} |"
        )


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
