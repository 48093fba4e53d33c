"""TEST-ONLY: a tiny dataset of primitive objects in the sample format, for `sam3d eval` tests and the docs table.

Not a benchmark and not product code (the render-paste benchmark is built by `sam3d data`). Each sample: one
primitive (box, ellipsoid or cylinder, its longest side spanning the local grid), posed upright with a random
turn about the vertical, 2.5-3.5 m in front of a camera with known K; the amodal mask is the exact silhouette
(`frames.render_silhouette`), the visible mask that minus an occluding rectangle on some samples; the point map is
a flat stand-in (every pixel at the object's centre depth, back-projected through K); surface points and the
64^3 occupancy (surface voxels) come from the primitive's mesh. Licence: generated here, CC0-1.0.

    python tests/eval_samples.py OUT_DIR [--count 12] [--size 128] [--surface-points 300000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import trimesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sam3d_core.data.sample import GRID, Sample, ShardWriter
from sam3d_core.geometry import frames
from sam3d_core.inputs.camera import pointmap_from_depth

KINDS = ("box", "ellipsoid", "cylinder")
COLOURS = {"box": (200, 80, 60), "ellipsoid": (60, 160, 90), "cylinder": (70, 90, 200)}
# Row-vector rotation: local z (up) -> camera +y (up), local y -> camera +z (away from the camera).
UPRIGHT = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])


def primitive(kind: str, rng: np.random.Generator) -> trimesh.Trimesh:
    """A primitive in the local frame: centred, longest side exactly 1 (it spans [-0.5, 0.5] on that axis)."""
    if kind == "box":
        mesh = trimesh.creation.box(extents=rng.uniform(0.4, 1.0, 3))
    elif kind == "ellipsoid":
        mesh = trimesh.creation.icosphere(subdivisions=3)
        mesh.vertices = mesh.vertices * rng.uniform(0.4, 1.0, 3)
    elif kind == "cylinder":
        mesh = trimesh.creation.cylinder(radius=rng.uniform(0.2, 0.5), height=rng.uniform(0.5, 1.0), sections=48)
    else:
        raise ValueError(f"kind: got {kind!r}, expected one of {KINDS}")
    lo, hi = mesh.bounds
    mesh.vertices = (mesh.vertices - (lo + hi) / 2) / (hi - lo).max()
    return mesh


def yaw(angle: float) -> np.ndarray:
    """Row-vector rotation about local z by `angle` radians."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])


def surface_occupancy(mesh: trimesh.Trimesh, rng: np.random.Generator, count: int = 200_000) -> np.ndarray:
    """Voxels of the 64^3 local grid that the surface passes through (dense surface samples, voxelised)."""
    points, _ = trimesh.sample.sample_surface(mesh, count, seed=rng)
    idx = np.clip(np.floor((points + 0.5) * GRID).astype(np.int64), 0, GRID - 1)
    return np.unique(idx, axis=0)


def make_sample(
    index: int,
    kind: str,
    rng: np.random.Generator,
    size: int = 96,
    occluded: bool = False,
    turn: float | None = None,
    surface_points: int = 20_000,
) -> Sample:
    """One sample; `turn`: the angle about the vertical in radians (default: random); `surface_points`: how many
    target points to store (F1@0.01 needs ~300k for its ceiling to reach 1, docs/evaluation.md)."""
    mesh = primitive(kind, rng)
    rotation = yaw(rng.uniform(0, 2 * np.pi) if turn is None else turn) @ UPRIGHT
    scale = np.full(3, rng.uniform(0.8, 1.2))
    translation = np.array([rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(2.5, 3.5)])
    f = 1.2 * size
    K = np.array([[f, 0.0, size / 2], [0.0, f, size / 2], [0.0, 0.0, 1.0]])
    v_cam = (mesh.vertices * scale) @ rotation + translation
    amodal = frames.render_silhouette(v_cam, mesh.faces, K, size, size)
    visible = amodal.copy()
    photo = rng.integers(60, 120, (size, size, 3)).astype(np.uint8)
    shade = rng.integers(-15, 15, (size, size, 1))
    photo[amodal] = np.clip(np.array(COLOURS[kind]) + shade[amodal], 0, 255).astype(np.uint8)
    if occluded:  # a grey board over the right 40 % of the object
        cols = np.nonzero(amodal.any(axis=0))[0]
        cut = int(cols[0] + 0.6 * (cols[-1] + 1 - cols[0]))
        visible[:, cut:] = False
        photo[:, cut:][amodal[:, cut:]] = 200
    return Sample(
        sample_id=f"{kind}-{index:03d}",
        photo=photo,
        mask=visible,
        amodal_mask=amodal,
        K=K,
        rotation=rotation,
        translation=translation,
        scale=scale,
        occupancy=surface_occupancy(mesh, rng),
        pointmap=pointmap_from_depth(np.full((size, size), translation[2], np.float32), K),
        surface_points=trimesh.sample.sample_surface(mesh, surface_points, seed=rng)[0].astype(np.float32),
        source="test-primitives",
        licence="CC0-1.0",
        group=kind,
        occlusion=float(1.0 - visible.sum() / amodal.sum()),
        provenance={"generator": "tests/eval_samples.py", "kind": kind},
    )


def write_dataset(
    folder: str | Path, count: int = 6, seed: int = 0, size: int = 96, surface_points: int = 20_000
) -> Path:
    """`count` samples cycling through the kinds, every other triple occluded, into a new or empty folder."""
    rng = np.random.default_rng(seed)
    with ShardWriter(folder, samples_per_shard=4, info={"builder": "tests/eval_samples.py", "seed": seed}) as w:
        for i in range(count):
            occluded = (i // len(KINDS)) % 2 == 1
            w.add(make_sample(i, KINDS[i % len(KINDS)], rng, size, occluded, surface_points=surface_points))
    return Path(folder)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--surface-points", type=int, default=300_000)
    a = ap.parse_args()
    print(write_dataset(a.out, a.count, a.seed, a.size, a.surface_points))
