"""End to end: photo + mask -> placed, textured object files, at the official configuration (random weights).

    python bench/e2e.py [--objects 5] [--low-vram] [--texture-size 1024] [--faces 20000] [--out result.json]

Runs `Pipeline.reconstruct` + `Pipeline.export` on the bundled example photo: first one object (after one
warm-up object, which pays for CUDA graph capture and cuDNN autotuning), then a scene of `--objects`
objects (the example mask, each with its own seed). Reports seconds per object and per scene, the time of
each pipeline step (stage 1, stage 2, clean-up, bake, ...), the peak GPU memory, and the mesh sizes.
Random weights make random shapes: the mesh clean-up and bake see noisier meshes than a trained model gives.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sam3d_core.cli.reconstruct import EXAMPLE_MASK, EXAMPLE_PHOTO  # noqa: E402
from sam3d_core.pipeline.reconstruct import Pipeline  # noqa: E402
from sam3d_core.pipeline.stage1 import Stage1Pipeline  # noqa: E402
from sam3d_core.pipeline.stage2 import Stage2Pipeline  # noqa: E402
from sam3d_core.registry import stage1_preset, stage2_preset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="single-object runs after the warm-up")
    ap.add_argument("--low-vram", action="store_true")
    ap.add_argument("--texture-size", type=int, default=1024)
    ap.add_argument("--faces", type=int, default=20000)
    ap.add_argument("--preset", default="official", help="'tiny' with --device cpu checks the script quickly")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    s1 = Stage1Pipeline.from_random(stage1_preset(args.preset), seed=0, device=args.device, dtype=dtype)
    s2 = Stage2Pipeline.from_random(stage2_preset(args.preset), seed=1, device=args.device, dtype=dtype)
    pipe = Pipeline(s1, s2, description=f"{args.preset} configuration, random weights", low_vram=args.low_vram)
    load_s = time.perf_counter() - t0
    ctx = pipe.open_photo(EXAMPLE_PHOTO)
    mask = pipe.load_mask(ctx, EXAMPLE_MASK)
    opts = dict(texture_size=args.texture_size, faces=args.faces)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run(n: int, seed: int):
        sync()
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            res = pipe.reconstruct(ctx, [mask] * n, seed=seed, **opts)
            pipe.export(ctx, res, d)
        sync()
        return res, time.perf_counter() - t

    warm, warm_s = run(1, 0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    singles = [run(1, 10 + i) for i in range(args.repeats)]
    scene, scene_s = run(args.objects, 100)
    steps = {k: statistics.median(r[0][0].timings.get(k, 0.0) for r in singles) for k in singles[0][0][0].timings}
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "preset": args.preset,
        "low_vram": args.low_vram,
        "dtype": str(dtype).removeprefix("torch."),
        "load_s": round(load_s, 2),
        "first_object_s": round(warm_s, 2),
        "seconds_per_object": round(statistics.median(s for _, s in singles), 2),
        "steps_s": {k: round(v, 3) for k, v in steps.items()},
        f"scene_{args.objects}_objects_s": round(scene_s, 2),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if dev.type == "cuda" else None,
        "voxels": [r.num_voxels for r in scene],
        "faces": [len(r.mesh.faces) for r in scene],
        "mesh_report": scene[0].report,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
