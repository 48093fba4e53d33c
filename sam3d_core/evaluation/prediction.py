"""What a model or a baseline predicts for one sample, and the point sets the metrics compare.

A `Prediction` has the structure of a sample's targets (data/sample.py): occupancy on the 64^3 grid of its own
local frame ([-0.5, 0.5]^3, z up), a pose local -> PyTorch3D camera (row vectors, p_cam = (p * scale) @ R + t),
and optionally a surface mesh in the same local frame (stage 2, or a baseline's primitive).

Surface points: from the mesh when there is one (area-weighted uniform samples), else from the exposed faces of
the occupied voxels (uniform on the faces a neighbour does not cover). The target's: the sample's
`surface_points` when present, else the exposed faces of its occupancy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sam3d_core.data.sample import GRID, Sample
from sam3d_core.evaluation._deps import trimesh_module

# The 6 face directions of a voxel: (axis, +1 / -1).
_FACES = [(axis, side) for axis in range(3) for side in (-1, 1)]


@dataclass
class Prediction:
    """One object's predicted shape and layout.

    occupancy [N, 3] int64 voxel indices on the 64^3 grid of the predicted local frame; rotation [3, 3]
    (row-vector), translation [3], scale [3]: local -> PyTorch3D camera; vertices [V, 3] float + faces [F, 3]
    int: an optional surface mesh in the local frame; info: free JSON (what produced it, voxel counts ...).
    """

    occupancy: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    scale: np.ndarray
    vertices: np.ndarray | None = None
    faces: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def check(self) -> Prediction:
        """Validate shapes and values; raises ValueError naming the field. Returns self."""
        occ = np.asarray(self.occupancy)
        if occ.ndim != 2 or occ.shape[1] != 3 or (occ.size and (occ.min() < 0 or occ.max() >= GRID)):
            raise ValueError(f"occupancy: got {occ.shape}, expected voxel indices [N, 3] in 0..{GRID - 1}")
        r = np.asarray(self.rotation, dtype=np.float64)
        if r.shape != (3, 3) or not np.allclose(r @ r.T, np.eye(3), atol=1e-4) or np.linalg.det(r) < 0:
            raise ValueError("rotation: expected a 3x3 proper rotation matrix (row-vector Pose.rotation)")
        if np.asarray(self.translation).shape != (3,) or not np.isfinite(self.translation).all():
            raise ValueError(f"translation: got {np.asarray(self.translation).tolist()}, expected 3 finite values")
        s = np.asarray(self.scale, dtype=np.float64)
        if s.shape != (3,) or not (s > 0).all() or not np.isfinite(s).all():
            raise ValueError(f"scale: got {s.tolist()}, expected 3 positive values")
        if (self.vertices is None) != (self.faces is None):
            raise ValueError("vertices and faces come together (a mesh) or not at all")
        if self.vertices is not None and (len(self.vertices) == 0 or len(self.faces) == 0):
            raise ValueError("the predicted mesh is empty (no vertices or no faces)")
        if self.vertices is None and len(occ) == 0:
            raise ValueError("the prediction is empty: no occupied voxel and no mesh")
        return self

    def surface_points(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        """n points on the predicted surface in the local frame [n, 3], and their source ("mesh" | "voxels")."""
        if self.vertices is not None:
            return sample_mesh_surface(self.vertices, self.faces, n, rng), "mesh"
        return sample_voxel_surface(self.occupancy, n, rng), "voxels"

    def posed(self, points: np.ndarray) -> np.ndarray:
        """Local points [N, 3] -> PyTorch3D camera frame [N, 3] with this prediction's pose."""
        return pose_points(points, self.rotation, self.translation, self.scale)


def pose_points(points, rotation, translation, scale) -> np.ndarray:
    """p_cam = (p_local * scale) @ rotation + translation (row vectors, `Pose` / `Sample` convention)."""
    p = np.asarray(points, dtype=np.float64)
    return (p * np.asarray(scale, np.float64).reshape(1, 3)) @ np.asarray(rotation, np.float64) + np.asarray(
        translation, np.float64
    ).reshape(1, 3)


def sample_mesh_surface(vertices, faces, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points uniformly on a triangle mesh's surface (area-weighted; trimesh's sampler) -> [n, 3]."""
    tm = trimesh_module()
    mesh = tm.Trimesh(np.asarray(vertices, np.float64), np.asarray(faces, np.int64), process=False)
    if not mesh.area > 0:
        raise ValueError("the mesh has zero surface area; nothing to sample")
    points, _ = tm.sample.sample_surface(mesh, int(n), seed=rng)
    return np.asarray(points, dtype=np.float64)


def sample_voxel_surface(occupancy, n: int, rng: np.random.Generator, resolution: int = GRID) -> np.ndarray:
    """n points uniformly on the exposed faces of occupied voxels (a face whose neighbour cell is empty or off the
    grid) -> [n, 3] in the local frame, voxel (x, y, z) spanning [x, x + 1] / resolution - 0.5 on each axis.

    Written here because no library samples the boundary of a voxel set: every exposed face is a unit square, so
    uniform sampling is a uniform face choice plus a uniform point in the square."""
    occ = np.asarray(occupancy, dtype=np.int64).reshape(-1, 3)
    if len(occ) == 0:
        raise ValueError("occupancy is empty; there is no surface to sample")
    grid = np.zeros((resolution + 2,) * 3, dtype=bool)  # one empty cell of padding on every side
    grid[occ[:, 0] + 1, occ[:, 1] + 1, occ[:, 2] + 1] = True
    cells, axes, sides = [], [], []
    for axis, side in _FACES:
        neighbour = np.roll(grid, -side, axis=axis)  # neighbour[i] = grid[i + side]
        exposed = np.argwhere(grid & ~neighbour) - 1  # [M, 3] cells with that face exposed
        cells.append(exposed)
        axes.append(np.full(len(exposed), axis))
        sides.append(np.full(len(exposed), side))
    cells, axes, sides = np.concatenate(cells), np.concatenate(axes), np.concatenate(sides)
    pick = rng.integers(0, len(cells), size=int(n))
    p = cells[pick] + rng.random((int(n), 3))  # uniform inside the cell ...
    a = axes[pick]
    p[np.arange(int(n)), a] = cells[pick, a] + (sides[pick] > 0)  # ... then snapped onto the chosen face
    return p / resolution - 0.5


def target_points(sample: Sample, n: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """The target surface in the local frame: the sample's `surface_points` (a random subset of n when it holds
    more), else n points on its occupancy's exposed voxel faces. Returns (points [P, 3], source)."""
    sp = sample.surface_points
    if sp is not None and len(sp) > 0:
        sp = np.asarray(sp, dtype=np.float64)
        if len(sp) > n:
            sp = sp[rng.choice(len(sp), n, replace=False)]
        return sp, "surface_points"
    return sample_voxel_surface(sample.occupancy, n, rng), "occupancy"
