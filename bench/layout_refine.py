"""Layout refinement on benchmark samples: the true shape with a pose spoilt the way a small stage-1 model spoils
it, refined against the sample's point map, mask and K (`pipeline.layout.refine_placement`, as the pipeline runs
it). Single-threaded CPU timings.

    python bench/layout_refine.py DATASET_DIR [--limit N] [--yaw random|90|150|0] [--t-err 0.07] [--s-err 1.06]
                                  [--seed 0] [--out result.jsonl] [--set turn_weight=0.02 ...]

Per sample: the sample's occupancy (its 64^3 voxels, local frame) and its true pose, turned about the object's
up axis (local z) by the --yaw error (random: uniform in [-180, 180) degrees), its translation moved by --t-err of
its length in a random direction and its scale multiplied by --s-err (or divided, at random). Printed per sample
and summarised: rotation error (geodesic, degrees) before and after, translation error / |t|, scale ratio, the
symmetric shape-placement error (mean distance from the true posed surface to the refined one, / the object's
diagonal: it forgives the turns that symmetric objects cannot tell apart), accepted or not, CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sam3d_core.data.sample import SampleDataset  # noqa: E402
from sam3d_core.data.voxelize import sample_surface  # noqa: E402
from sam3d_core.export.voxels import voxel_surface  # noqa: E402
from sam3d_core.geometry import frames  # noqa: E402
from sam3d_core.pipeline.layout import LayoutSettings, refine_placement  # noqa: E402


def turn(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Row-vector rotation about a unit axis (right-handed)."""
    a = math.radians(degrees)
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return (np.eye(3) + math.sin(a) * k + (1.0 - math.cos(a)) * (k @ k)).T


def angle(a: np.ndarray, b: np.ndarray) -> float:
    return math.degrees(math.acos(float(np.clip((np.trace(a.T @ b) - 1.0) / 2.0, -1.0, 1.0))))


def placement_error(points, r1, t1, s1, r2, t2, s2) -> float:
    """Mean distance from the surface posed one way to the nearest point of it posed the other way, / diagonal."""
    from scipy.spatial import cKDTree

    a = (points * s1) @ r1 + t1
    b = (points * s2) @ r2 + t2
    return float(cKDTree(b).query(a)[0].mean() / np.linalg.norm(np.ptp(a, axis=0)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--yaw", default="random")
    ap.add_argument("--t-err", type=float, default=0.07)
    ap.add_argument("--s-err", type=float, default=1.06)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a LayoutSettings field")
    args = ap.parse_args()
    torch.set_num_threads(1)
    fields = {k: type(getattr(LayoutSettings(), k))(v) for k, v in (a.split("=", 1) for a in args.set)}
    settings = LayoutSettings(**fields)
    ds = SampleDataset(args.dataset)
    records = list(ds.records())
    rng = np.random.default_rng(args.seed)
    rows = []
    out = open(args.out, "w") if args.out else None  # noqa: SIM115
    for i in range(len(ds) if args.limit is None else min(args.limit, len(ds))):
        s = ds[i]
        if s.pointmap is None:
            continue
        yaw = rng.uniform(-180, 180) if args.yaw == "random" else float(args.yaw)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        s_err = args.s_err if rng.random() < 0.5 else 1.0 / args.s_err
        R, t, sc = np.asarray(s.rotation), np.asarray(s.translation), np.asarray(s.scale)
        Rp = turn(np.array([0.0, 0.0, 1.0]), yaw) @ R  # a turn about the local up axis through the grid centre
        tp = t + args.t_err * np.linalg.norm(t) * direction
        sp = sc * s_err
        pose4 = frames.pose_matrix(Rp, tp, sp)
        c0 = time.process_time()
        new4, R2, report = refine_placement(pose4, s.occupancy, s.mask, s.pointmap, s.K, settings=settings)
        cpu = time.process_time() - c0
        t2, s2 = new4[:3, 3], np.linalg.norm(new4[:3, :3], axis=0)
        v, f = voxel_surface(s.occupancy, fill=True)
        pts = sample_surface(v, f, 4000, seed=i).astype(np.float64)
        row = {
            "index": i,
            "group": (records[i] or {}).get("group"),
            "occlusion": (records[i] or {}).get("occlusion"),
            "yaw_error": round(yaw, 1),
            "rot_before": round(angle(Rp, R), 2),
            "rot_after": round(angle(R2, R), 2),
            "t_before": round(float(np.linalg.norm(tp - t) / np.linalg.norm(t)), 4),
            "t_after": round(float(np.linalg.norm(t2 - t) / np.linalg.norm(t)), 4),
            "s_before": round(float(sp[0] / sc[0]), 4),
            "s_after": round(float(s2[0] / sc[0]), 4),
            "place_before": round(placement_error(pts, R, t, sc, Rp, tp, sp), 4),
            "place_after": round(placement_error(pts, R, t, sc, R2, t2, s2), 4),
            "accepted": report["accepted"],
            "reason": report.get("reason"),
            "cpu_s": round(cpu, 3),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
    if out:
        out.close()

    def med(key):
        return float(np.median([r[key] for r in rows]))

    summary = {
        "samples": len(rows),
        "accepted": round(float(np.mean([r["accepted"] for r in rows])), 3),
        "rot_before_median": med("rot_before"),
        "rot_after_median": med("rot_after"),
        "rot_after_under_10deg": round(float(np.mean([r["rot_after"] < 10 for r in rows])), 3),
        "t_after_median": med("t_after"),
        "s_after_median_abs_error": float(np.median([abs(r["s_after"] - 1) for r in rows])),
        "place_before_median": med("place_before"),
        "place_after_median": med("place_after"),
        "place_after_under_0.02": round(float(np.mean([r["place_after"] < 0.02 for r in rows])), 3),
        "cpu_s_median": med("cpu_s"),
        "cpu_s_max": float(np.max([r["cpu_s"] for r in rows])),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
