"""Time `Pipeline.export` alone: the files of a photo's objects at the official output sizes.

Each object is what the official configuration hands to the writers: a 20,000-face textured mesh with a 1024²
texture (smooth colour fields with grain, so the PNG compresses like a baked texture, not like noise or a flat
colour), 32 Gaussians for each of ~32,700 voxels (the PLY, ~71 MB), the mask of a 1280 x 960 photo; plus the
scene GLB and scene.json. No network runs: the model is the tiny one, only for its export.

    PYTHONPATH=$PWD python bench/export_files.py --objects 1 --workers 1,2      # one object, serial vs 2 threads
    PYTHONPATH=$PWD python bench/export_files.py --objects 10 --workers 1,8 --json files.json

Prints one JSON line per (objects, workers): median wall seconds of `--repeats` exports into fresh folders, with
the texture PNG cache cleared before each (so the first encoding is paid as in a real run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sam3d_core.cli.reconstruct import EXAMPLE_PHOTO
from sam3d_core.export import gltf
from sam3d_core.export.gltf import TexturedMesh
from sam3d_core.geometry.gaussians import Gaussians
from sam3d_core.pipeline.reconstruct import ObjectResult, Pipeline


def synthetic_object(i: int, faces: int, texture: int, gaussians: int, hw: tuple[int, int]) -> ObjectResult:
    import trimesh

    rng = np.random.default_rng(i)
    sphere = trimesh.creation.icosphere(subdivisions=6)
    keep = sphere.faces[: faces // 2 * 2]
    used, inverse = np.unique(keep, return_inverse=True)
    vertices = (sphere.vertices[used] * (0.3 + 0.02 * i)).astype(np.float32)
    yy, xx = np.mgrid[0:texture, 0:texture].astype(np.float32)
    fields = [np.sin(xx / (31 + i)) * 60 + 120, np.cos(yy / 23.0) * 50 + 100, ((xx + yy) / 4) % 200 + 20]
    tex = (np.stack(fields, -1) + rng.normal(0, 6, (texture, texture, 3))).clip(0, 255).astype(np.uint8)
    mesh = TexturedMesh(vertices, inverse.reshape(-1, 3), rng.random((len(vertices), 2)).astype(np.float32), tex)
    n = gaussians
    g = Gaussians(
        torch.randn(n, 3) * 0.2, torch.randn(n, 1, 3), torch.randn(n, 3), torch.randn(n, 4), torch.randn(n, 1)
    )
    mask = np.zeros(hw, bool)
    mask[100 + 20 * i : 500 + 20 * i, 200:700] = True
    pose = np.eye(4)
    pose[:3, 3] = [0.1 * i, 0.0, 2.0]
    return ObjectResult(
        name=f"object_{i}",
        mask=mask,
        pose_matrix=pose,
        rotation_wxyz=[1.0, 0.0, 0.0, 0.0],
        translation=pose[:3, 3].tolist(),
        scale=[1.0, 1.0, 1.0],
        num_voxels=n // 32,
        mesh=mesh,
        gaussians=g,
        mask_iou=None,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=1)
    ap.add_argument("--workers", default="1,8", help="comma-separated file_workers values to time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--faces", type=int, default=20000)
    ap.add_argument("--texture-size", type=int, default=1024)
    ap.add_argument("--gaussians", type=int, default=32 * 32724)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    torch.set_num_threads(1)
    pipe, _ = Pipeline.load("tiny", "cpu")
    ctx = pipe.open_photo(EXAMPLE_PHOTO)
    results = [
        synthetic_object(i, args.faces, args.texture_size, args.gaussians, (ctx.height, ctx.width))
        for i in range(args.objects)
    ]
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        pipe.file_workers = workers
        times = []
        for _ in range(args.repeats):
            getattr(gltf, "_PNG_CACHE", {}).clear()  # (absent before the cache: the bench also times older code)
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                pipe.export(ctx, results, Path(d) / "out")
                times.append(time.perf_counter() - t)
        row = {
            "objects": args.objects,
            "file_workers": workers,
            "export_s": round(statistics.median(times), 3),
            "min_s": round(min(times), 3),
            "faces": args.faces,
            "texture": args.texture_size,
            "gaussians_per_object": args.gaussians,
            "date": time.strftime("%Y-%m-%d"),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
