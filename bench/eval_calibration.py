"""What the sampling-based metrics give for a PERFECT prediction (two independent samplings of one surface), and
what scoring one sample costs: the numbers behind docs/evaluation.md.

    python bench/eval_calibration.py [--counts 10000,30000,100000,300000,1000000] [--emd 256,1024,2048]

F1@0.01 ceiling: the same shape (a cube, a sphere, a 1 x 0.6 x 0.3 box; normalised into [-1, 1]) sampled twice
with N points each. EMD floor: the subset EMD of two independent samplings at n points per side. Timing:
`score_prediction`'s whole metric set for one sample at the default 100k points.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import trimesh

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sam3d_core.evaluation import metrics as M  # noqa: E402

SHAPES = {
    "cube": lambda: trimesh.creation.box(extents=(2, 2, 2)),
    "sphere": lambda: trimesh.creation.icosphere(subdivisions=5),
    "box 1x0.6x0.3": lambda: trimesh.creation.box(extents=(2, 1.2, 0.6)),
}


def sample(mesh: trimesh.Trimesh, n: int, seed: int) -> np.ndarray:
    return M.normalize_unit_cube(trimesh.sample.sample_surface(mesh, n, seed=seed)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="10000,30000,100000,300000,1000000")
    ap.add_argument("--emd", default="256,1024,2048")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    print("| shape | " + " | ".join(f"F1@0.01, {c:,} pts" for c in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for name, make in SHAPES.items():
        mesh = make()
        row = [f"{M.f_score(sample(mesh, c, 1), sample(mesh, c, 2))[0]:.3f}" for c in counts]
        print(f"| {name} | " + " | ".join(row) + " |")
    print()
    sizes = [int(n) for n in args.emd.split(",")]
    print("| shape | " + " | ".join(f"EMD floor, n={n} (s)" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name, make in SHAPES.items():
        mesh, cells = make(), []
        a, b = sample(mesh, 100_000, 1), sample(mesh, 100_000, 2)
        for n in sizes:
            t = time.perf_counter()
            e = M.earth_movers_distance(a, b, n, np.random.default_rng(0))
            cells.append(f"{e:.4f} ({time.perf_counter() - t:.2f})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    mesh = SHAPES["box 1x0.6x0.3"]()
    a, b = sample(mesh, 100_000, 1), sample(mesh, 100_000, 2) @ np.diag([1.0, 1.0, 1.0])
    t = time.perf_counter()
    M.shape_metrics(a, b, rng=np.random.default_rng(0))
    t_shape = time.perf_counter() - t
    t = time.perf_counter()
    M.layout_metrics(a + [0.1, 0, 3], b + [0, 0, 3], np.eye(3), np.eye(3), rng=np.random.default_rng(0))
    print(f"one sample at 100k points: shape metrics {t_shape:.2f} s, layout metrics {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
