"""Meshes -> the model's local frame and its 64^3 occupancy (the stage-1 target).

    v_local, scale, centre = normalize_mesh(vertices)      # v = v_local * scale + centre
    occ = voxelize(v_local, faces)                         # [N, 3] int64 surface voxels
    occ = voxelize(v_local, faces, fill=True)              # + the enclosed interior

The local frame is TRELLIS's (and SAM 3D's): [-0.5, 0.5]^3, z up; `normalize_mesh` centres the axis-aligned
bounding box at the origin and divides by its longest side, as TRELLIS's `dataset_toolkits` do before
rendering and voxelising (so the longest side spans exactly [-0.5, 0.5]; the pose's scale is that side's
length in the camera frame's units). Voxel (x, y, z) spans [x, x + 1] / 64 - 0.5 on each axis.

Surface voxels are found by an exact triangle-box overlap test (separating axes), so every voxel that a
triangle touches is set and no triangle is missed, whatever its size: non-watertight meshes, open surfaces,
single triangles and inner faces are all fine (TRELLIS takes the same surface voxels from open3d's
`VoxelGrid.create_from_triangle_mesh_within_bounds`; the official decoder's occupancy is surface-only too).
A point exactly on a boundary between two voxels belongs to the upper one (boxes are half-open), so a face
lying in a grid plane gives one layer, not two.

`fill=True` adds the interior by a flood fill of the outside from the grid's border through non-surface
voxels (6-connected; the conservative surface above is 6-separating). It never marks outside space as
inside: a mesh whose holes are wider than a voxel lets the flood in, and its interior simply stays empty
(the result is then the surface alone; `fill_report` says how much was added).
"""

from __future__ import annotations

import numpy as np

GRID = 64
# Voxel boxes are [i - _LOW, i + 1 - _HIGH] in grid units: half-open (a point at exactly i + 1 belongs to voxel
# i + 1 only), with margins far above float64 rounding at these magnitudes (~1e-14).
_LOW, _HIGH = 1e-7, 1e-6
_CLIP = 1e-5  # grid coordinates are clipped to [0, GRID - _CLIP] (the top face at +0.5 lands in voxel 63)
_CHUNK = 1 << 22  # candidate (triangle, voxel) pairs tested at once


class MeshError(ValueError):
    """A mesh that cannot be used (no faces, no extent, non-finite values); the message says which."""


def normalize_mesh(vertices: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """vertices [V, 3] (any units, z up) -> (v_local [V, 3] in [-0.5, 0.5]^3, scale, centre [3]).

    v_local = (v - centre) / scale with centre = the bounding box centre and scale = its longest side, so
    v = v_local * scale + centre. Raises MeshError for no vertices, non-finite values or zero extent.
    """
    v = np.asarray(vertices, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise MeshError(f"vertices: got shape {v.shape}, expected [V, 3] with V >= 1")
    if not np.isfinite(v).all():
        raise MeshError("vertices hold NaN or infinite values; repair the mesh first")
    lo, hi = v.min(0), v.max(0)
    scale = float((hi - lo).max())
    if not scale > 0:
        raise MeshError("the mesh has zero extent (all vertices at one point); nothing to voxelise")
    centre = (lo + hi) / 2.0
    return (v - centre) / scale, scale, centre


def _check(vertices, faces) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3:
        raise MeshError(f"vertices: got shape {v.shape}, expected [V, 3] in the local frame [-0.5, 0.5]^3")
    if f.ndim != 2 or f.shape[1] != 3 or (f.size and not np.issubdtype(f.dtype, np.integer)):
        raise MeshError(f"faces: got {f.dtype} {f.shape}, expected integer [F, 3] (triangulate first)")
    if len(f) == 0:
        raise MeshError("the mesh has no faces; occupancy needs triangles (a point cloud is not a mesh)")
    f = f.astype(np.int64)
    if f.min() < 0 or f.max() >= len(v):
        raise MeshError(f"faces index vertices {f.min()}..{f.max()} but there are {len(v)} vertices")
    if not np.isfinite(v).all():
        raise MeshError("vertices hold NaN or infinite values; repair the mesh first")
    if np.abs(v).max() > 0.5 + 1e-3:
        raise MeshError(
            f"vertices reach {np.abs(v).max():.4f}; expected the local frame [-0.5, 0.5]^3 (call normalize_mesh first)"
        )
    return v, f


def _overlap(tri: np.ndarray, centre: np.ndarray, half: float) -> np.ndarray:
    """Separating-axis test: triangles tri [N, 3, 3] against axis-aligned cubes (centre [N, 3], half-size)
    -> [N] bool. Axes: the 3 box normals, the triangle normal, the 9 edge x box-axis cross products."""
    p = tri - centre[:, None, :]  # [N, 3, 3] corners relative to the box centre
    ok = (p.min(1) <= half).all(1) & (p.max(1) >= -half).all(1)  # box normals
    e = np.roll(p, -1, axis=1) - p  # [N, 3, 3] edges
    n = np.cross(e[:, 0], e[:, 1])  # [N, 3] triangle normal (zero for degenerate triangles: test passes)
    ok &= np.abs((n * p[:, 0]).sum(1)) <= half * np.abs(n).sum(1)
    for k in range(3):
        for j in range(3):
            axis = np.zeros_like(e[:, k])  # e_k x unit_j
            axis[:, (j + 1) % 3] = e[:, k, (j + 2) % 3]
            axis[:, (j + 2) % 3] = -e[:, k, (j + 1) % 3]
            proj = (p * axis[:, None, :]).sum(2)  # [N, 3]
            r = half * np.abs(axis).sum(1)
            ok &= (proj.min(1) <= r) & (proj.max(1) >= -r)
    return ok


def surface_voxels(vertices: np.ndarray, faces: np.ndarray, resolution: int = GRID) -> np.ndarray:
    """Every voxel of the resolution^3 grid that a triangle touches -> [N, 3] int64, sorted, unique."""
    v, f = _check(vertices, faces)
    g = np.clip((v + 0.5) * resolution, 0.0, resolution - _CLIP)  # grid units
    tri = g[f]  # [F, 3, 3]
    lo = np.floor(tri.min(1)).astype(np.int64)  # [F, 3] first candidate voxel per axis
    hi = np.floor(tri.max(1)).astype(np.int64)
    span = hi - lo + 1  # [F, 3]
    count = span.prod(1)  # candidates per triangle
    half = 0.5 - (_HIGH - _LOW) / 2
    offset = 0.5 - (_HIGH + _LOW) / 2  # box centre - voxel index
    found = []
    start = 0
    while start < len(f):
        # Take triangles until the chunk holds about _CHUNK candidates (at least one triangle).
        stop = start + max(1, int(np.searchsorted(np.cumsum(count[start:]), _CHUNK)))
        idx = np.repeat(np.arange(start, stop), count[start:stop])  # [C] triangle of each candidate
        k = np.arange(len(idx)) - np.repeat(np.cumsum(count[start:stop]) - count[start:stop], count[start:stop])
        sx, sy = span[idx, 0], span[idx, 1]
        vox = lo[idx] + np.stack([k % sx, (k // sx) % sy, k // (sx * sy)], 1)  # [C, 3]
        hit = _overlap(tri[idx], vox + offset, half)
        found.append(vox[hit])
        start = stop
    occ = np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 3), np.int64)
    return occ.astype(np.int64)


def fill_interior(occupancy: np.ndarray, resolution: int = GRID) -> np.ndarray:
    """Surface voxels [N, 3] -> surface + enclosed interior [M, 3] (flood fill of the outside; module doc)."""
    from scipy import ndimage

    grid = np.zeros((resolution,) * 3, dtype=bool)
    occ = np.asarray(occupancy, dtype=np.int64).reshape(-1, 3)
    grid[occ[:, 0], occ[:, 1], occ[:, 2]] = True
    filled = ndimage.binary_fill_holes(grid)  # background 6-connected to the border stays outside
    return np.argwhere(filled).astype(np.int64)


def voxelize(vertices: np.ndarray, faces: np.ndarray, *, fill: bool = False, resolution: int = GRID) -> np.ndarray:
    """vertices [V, 3] in the local frame [-0.5, 0.5]^3, faces [F, 3] -> occupied voxels [N, 3] int64.

    Surface voxels by exact triangle-box overlap; `fill=True` adds the enclosed interior (module doc).
    Raises MeshError for a mesh with no faces, vertices outside the local frame, or bad indices.
    """
    occ = surface_voxels(vertices, faces, resolution)
    return fill_interior(occ, resolution) if fill else occ


def sample_surface(vertices: np.ndarray, faces: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """`count` points uniformly on the mesh surface (area-weighted) -> [count, 3] float32 (evaluation targets)."""
    v, f = np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64)
    if len(f) == 0:
        raise MeshError("the mesh has no faces; cannot sample its surface")
    rng = np.random.default_rng(seed)
    tri = v[f]  # [F, 3, 3]
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    if not area.sum() > 0:
        raise MeshError("every triangle of the mesh has zero area; cannot sample its surface")
    pick = rng.choice(len(f), size=count, p=area / area.sum())
    r1, r2 = rng.random(count), rng.random(count)
    s = np.sqrt(r1)
    w = np.stack([1 - s, s * (1 - r2), s * r2], 1)  # [count, 3] uniform barycentrics
    return (tri[pick] * w[:, :, None]).sum(1).astype(np.float32)
