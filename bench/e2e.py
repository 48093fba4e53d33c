"""End to end: photo + mask -> placed, textured object files, at the official configuration (random weights).

    python bench/e2e.py [--objects 10] [--low-vram] [--texture-size 1024] [--faces 20000] [--max-batch N]
                        [--no-batch-stage2] [--mesh-workers N] [--no-ply] [--steps N] [--out result.json]

Runs `Pipeline.reconstruct` + `Pipeline.export` on the bundled example photo: first one object (after one
warm-up object, which pays for CUDA graph capture and cuDNN autotuning), then a scene of `--objects`
objects (the example mask, each with its own seed: the objects go through stage 1 and stage 2 as one batch,
up to --max-batch at a time, default 10). Reports seconds per object and per scene, the time of each pipeline
step of a single object (stage 1, stage 2, clean-up + UVs, bake, placement, files), the scene's breakdown (the
batched stages, the objects' own steps, which overlap, and the files), the peak GPU memory, and the mesh
sizes. Random weights make random shapes: the mesh clean-up and bake see noisier meshes than a trained model
gives (bench/postprocess.py times that chain on real objects' meshes too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
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
    ap.add_argument("--objects", type=int, default=10, help="objects in the scene run (one photo)")
    ap.add_argument("--repeats", type=int, default=2, help="single-object runs after the warm-up")
    ap.add_argument("--low-vram", action="store_true")
    ap.add_argument("--texture-size", type=int, default=1024)
    ap.add_argument("--faces", type=int, default=20000)
    ap.add_argument("--preset", default="official", help="'tiny' with --device cpu checks the script quickly")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's 25 + 25)")
    ap.add_argument("--max-batch", type=int, default=None, help="objects per batched run (1: one at a time)")
    ap.add_argument("--no-batch-stage2", action="store_true", help="batch stage 1 only (stage 2 one at a time)")
    ap.add_argument("--mesh-workers", type=int, default=None, help="mesh worker processes (default: the pipeline's)")
    ap.add_argument("--no-ply", action="store_true", help="skip the Gaussian decoder and the PLY files")
    ap.add_argument("--max-voxels", type=int, default=None, help="stage-1 voxel cap (default: the preset's)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    cfg1 = stage1_preset(args.preset)
    if args.max_voxels:
        cfg1 = replace(cfg1, max_voxels=args.max_voxels)
    s1 = Stage1Pipeline.from_random(cfg1, seed=0, device=args.device, dtype=dtype)
    s2 = Stage2Pipeline.from_random(stage2_preset(args.preset), seed=1, device=args.device, dtype=dtype)
    pipe = Pipeline(s1, s2, description=f"{args.preset} configuration, random weights", low_vram=args.low_vram)
    if args.max_batch is not None:
        pipe.max_batch = args.max_batch
    if args.mesh_workers is not None:
        pipe.mesh_workers = args.mesh_workers
    pipe.batch_stage2 = not args.no_batch_stage2
    pipe.warm_up()  # the mesh worker processes (a worker does this while the model loads)
    load_s = time.perf_counter() - t0
    ctx = pipe.open_photo(EXAMPLE_PHOTO)
    mask = pipe.load_mask(ctx, EXAMPLE_MASK)
    opts = dict(texture_size=args.texture_size, faces=args.faces, steps=args.steps, gaussians=not args.no_ply)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run(n: int, seed: int):
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            res = pipe.reconstruct(ctx, [mask] * n, seed=seed, **opts)
            sync()
            t_files = time.perf_counter()
            pipe.export(ctx, res, d)
        end = time.perf_counter()
        peak = round(torch.cuda.max_memory_allocated() / 1e9, 2) if dev.type == "cuda" else None
        return res, end - t, end - t_files, peak

    warm = run(1, 0)
    singles = [run(1, 10 + i) for i in range(args.repeats)]
    scene, scene_s, scene_files_s, scene_peak = run(args.objects, 100)
    steps = {k: statistics.median(r[0][0].timings.get(k, 0.0) for r in singles) for k in singles[0][0][0].timings}
    steps["files"] = statistics.median(r[2] for r in singles)
    per_object = {
        k: [r.timings.get(k) for r in scene]
        for k in ("preprocess", "stage1", "stage2", "postprocess", "bake", "placement")
    }
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "preset": args.preset,
        "low_vram": args.low_vram,
        "dtype": str(dtype).removeprefix("torch."),
        "max_batch": 1 if args.low_vram else pipe.max_batch,
        "batch_stage2": pipe.batch_stage2,
        "mesh_workers": pipe.mesh_workers,
        "ply": not args.no_ply,
        "load_s": round(load_s, 2),
        "first_object_s": round(warm[1], 2),
        "seconds_per_object": round(statistics.median(r[1] for r in singles), 2),
        "single_object_steps_s": {k: round(v, 3) for k, v in steps.items()},
        "single_object_peak_gpu_gb": singles[-1][3],
        f"scene_{args.objects}_objects_s": round(scene_s, 2),
        "scene_breakdown_s": {
            "stage1_batch (all objects)": scene[0].timings.get("stage1_batch"),
            "stage2_batch (sampling, all objects)": scene[0].timings.get("stage2_batch"),
            "until the last object is finished": round(scene_s - scene_files_s, 2),
            "files (export)": round(scene_files_s, 2),
        },
        "scene_per_object_s": per_object,
        "scene_peak_gpu_gb": scene_peak,
        "voxels": [r.num_voxels for r in scene],
        "faces": [len(r.mesh.faces) for r in scene],
        "mesh_report": {k: v for k, v in scene[0].report.items() if k != "step_seconds"},
    }
    pipe.close()
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
