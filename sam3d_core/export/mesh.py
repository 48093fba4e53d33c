"""Mesh clean-up, decimation and UV unwrapping for stage-2 meshes, and the textured-mesh container.

Everything here stays in the object's local frame ([-0.5, 0.5]^3, z up); the z-up -> y-up turn of the GLB
files happens only in `sam3d_core/export/gltf.py`. numpy is the only import at module load; scipy,
fast_simplification and xatlas (the `export` extra) are imported where they are used.

Face winding: counter-clockwise seen from outside, so (v1 - v0) x (v2 - v0) is the outward normal.

UV convention (`UVMesh.uvs`, `TexturedMesh.uvs`): glTF's. u runs right and v runs DOWN the image, (0, 0) is
the top-left corner of texel [row 0, col 0]; a point with UV (u, v) lies in texel [row = v * H, col = u * W]
of an [H, W, 3] array. The GLB stores these values unchanged in TEXCOORD_0; trimesh flips v on load
(its `visual.uv` is (u, 1 - v), origin bottom-left), which tests/test_export_mesh.py checks.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CleanMesh", "TexturedMesh", "UVMesh", "clean_mesh", "unwrap_uv", "vertex_normals"]

_MERGE_TOLERANCE = 1e-6  # vertices closer than this fraction of the bounding-box diagonal are merged


def _optional(module: str) -> Any:
    """Import an `export`-extra dependency, failing with the install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"mesh export needs {module}: pip install 'sam3d[export]'") from e


@dataclass
class CleanMesh:
    """Result of `clean_mesh`: vertices [V, 3] float32 (local frame), faces [F, 3] int64 (outward winding),
    colors [V, C] float32 or None (the input's channels), report: counts of what each step changed."""

    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray | None
    report: dict[str, Any]


@dataclass
class UVMesh:
    """Result of `unwrap_uv`. Vertices are split along chart seams: vertices [V', 3] = input[vmapping],
    faces [F, 3] (same face order as the input), uvs [V', 2] float32 in [0, 1] (glTF convention, module
    docstring), vmapping [V'] int64 index of each new vertex in the input (carry colours with it)."""

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    vmapping: np.ndarray


@dataclass
class TexturedMesh:
    """One object ready for GLB export, in the local frame (z up; the writers turn it y-up).

    vertices [V, 3] float, faces [F, 3] int, uvs [V, 2] in [0, 1] (glTF convention) or None,
    texture [H, W, 3|4] uint8 sRGB or None (needs uvs), vertex_colors [V, 3|4] float sRGB in [0, 1] (or
    uint8) or None (used only without a texture), name (node and mesh name), metadata (JSON-able; written
    as the node's glTF `extras`).
    """

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray | None = None
    texture: np.ndarray | None = None
    vertex_colors: np.ndarray | None = None
    name: str = "object"
    metadata: dict[str, Any] = field(default_factory=dict)

    def save_glb(self, path: str | Path) -> Path:
        from sam3d_core.export.gltf import save_object_glb

        return save_object_glb(path, self)


# ---------------------------------------------------------------------------------------------------------
# small geometry helpers


def _face_cross(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(v1 - v0) x (v2 - v0) per face: [F, 3], length = 2 * area."""
    v0, v1, v2 = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    return np.cross(v1 - v0, v2 - v0)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals [V, 3] float32. Vertices at the same position (UV seams) share one
    normal, so seams do not show in shading; unreferenced vertices get (0, 0, 1)."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    positions, weld = np.unique(v, axis=0, return_inverse=True)
    weld = weld.reshape(-1)
    cross = np.repeat(_face_cross(v, f), 3, axis=0)  # [3F, 3]: each face's area vector for its 3 corners
    corner = weld[f.reshape(-1)]
    acc = np.stack([np.bincount(corner, weights=cross[:, k], minlength=len(positions)) for k in range(3)], 1)
    n = acc[weld]
    length = np.linalg.norm(n, axis=1, keepdims=True)
    n = np.where(length > 0, n / np.maximum(length, 1e-30), np.array([0.0, 0.0, 1.0]))
    return n.astype(np.float32)


def _pack_rows(rows: np.ndarray, n: int) -> np.ndarray:
    """One int64 key per row of small non-negative ints (each < n): equal rows <-> equal keys."""
    rows = rows.astype(np.int64)
    bits = max(int(n - 1).bit_length(), 1)
    if bits * rows.shape[1] <= 63:
        key = np.zeros(len(rows), np.int64)
        for k in range(rows.shape[1]):
            key = (key << bits) | rows[:, k]
        return key
    return np.unique(rows, axis=0, return_inverse=True)[1].reshape(-1)


def _undirected_edges(f: np.ndarray, n_vertices: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-edges of faces, [3F, 2] (row 3i + k is face i's edge k -> k + 1), their undirected edge id
    [3F] and the number of half-edges on each undirected edge [E]."""
    half = f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    key = _pack_rows(np.sort(half, axis=1), n_vertices)
    _, edge_id, counts = np.unique(key, return_inverse=True, return_counts=True)
    return half, edge_id.reshape(-1), counts


def _compact(v: np.ndarray, f: np.ndarray, c: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Drop vertices no face uses."""
    used = np.zeros(len(v), bool)
    used[f.reshape(-1)] = True
    remap = np.cumsum(used) - 1
    return v[used], remap[f], None if c is None else c[used]


# ---------------------------------------------------------------------------------------------------------
# clean-up steps


def _merge_vertices(v: np.ndarray, f: np.ndarray, c: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, Any, int]:
    """Merge vertices that coincide up to _MERGE_TOLERANCE of the diagonal; merged colours are averaged."""
    lo = v.min(axis=0)
    tol = max(float(np.linalg.norm(v.max(axis=0) - lo)), 1e-12) * _MERGE_TOLERANCE
    q = np.rint((v - lo) / tol).astype(np.int64)  # each < 2^20: the extent is at most the diagonal
    _, first, inverse = np.unique(_pack_rows(q, int(q.max()) + 1), return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    if len(first) == len(v):
        return v, f, c, 0
    if c is not None:
        count = np.bincount(inverse, minlength=len(first))[:, None]
        c = np.stack([np.bincount(inverse, weights=c[:, k], minlength=len(first)) for k in range(c.shape[1])], 1)
        c = (c / count).astype(np.float32)
    return v[first], inverse[f], c, len(v) - len(first)


def _drop_bad_faces(f: np.ndarray, n_vertices: int) -> tuple[np.ndarray, int, int]:
    """Drop faces with a repeated vertex index, then faces on the same vertex triple as an earlier one (either
    winding). Returns (faces, degenerate count, duplicate count)."""
    bad = (f[:, 0] == f[:, 1]) | (f[:, 1] == f[:, 2]) | (f[:, 2] == f[:, 0])
    f = f[~bad]
    _, first = np.unique(_pack_rows(np.sort(f, axis=1), n_vertices), return_index=True)
    first.sort()
    return f[first], int(bad.sum()), len(f) - len(first)


def _orient(v: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, int]:
    """Consistent winding within each edge-connected patch, then each patch turned outward (positive signed
    volume about its centroid). Non-manifold edges (3+ faces) do not connect patches. Returns (faces, number
    of faces flipped)."""
    csgraph = _optional("scipy.sparse.csgraph")
    sparse = _optional("scipy.sparse")
    n_faces = len(f)
    half, edge_id, counts = _undirected_edges(f, len(v))
    # the two half-edges of every manifold edge: neighbours in edge-id order
    order = np.argsort(edge_id, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    manifold = np.flatnonzero(counts == 2)
    h1, h2 = order[starts[manifold]], order[starts[manifold] + 1]
    f1, f2 = h1 // 3, h2 // 3
    same_direction = half[h1, 0] == half[h2, 0]  # a shared edge walked the same way: one face is flipped
    weight = np.where(same_direction, 2.0, 1.0)

    # face graph + a virtual root (index n_faces) tied to one face per patch, so one BFS spans every patch
    adjacency = sparse.coo_matrix((np.ones(len(f1)), (f1, f2)), shape=(n_faces, n_faces))
    n_patches, patch = csgraph.connected_components(adjacency, directed=False)
    _, seeds = np.unique(patch, return_index=True)
    rows = np.concatenate([f1, seeds])
    cols = np.concatenate([f2, np.full(len(seeds), n_faces)])
    w = np.concatenate([weight, np.ones(len(seeds))])
    graph = sparse.coo_matrix((w, (rows, cols)), shape=(n_faces + 1, n_faces + 1)).tocsr()
    graph = (graph + graph.T).tocsr()
    _, pred = csgraph.breadth_first_order(graph, n_faces, directed=False, return_predecessors=True)
    parent = np.append(pred[:n_faces], n_faces).astype(np.int64)
    flip = np.zeros(n_faces + 1, bool)
    flip[:n_faces] = np.asarray(graph[np.arange(n_faces), parent[:n_faces]]).reshape(-1) == 2.0
    # pointer jumping: flip[i] becomes the parity of flipped tree edges from face i up to the root
    while (parent != n_faces).any():
        flip ^= flip[parent]
        parent = parent[parent]
    f = np.where(flip[:n_faces, None], f[:, [0, 2, 1]], f)

    # outward: signed volume of each patch about its area-weighted centroid
    cross = _face_cross(v, f)
    area = np.linalg.norm(cross, axis=1)
    centre = v[f].mean(axis=1)
    wsum = np.maximum(np.bincount(patch, weights=area, minlength=n_patches), 1e-30)
    centroid = np.stack([np.bincount(patch, weights=area * centre[:, k], minlength=n_patches) for k in range(3)], 1)
    centroid = centroid / wsum[:, None]
    volume = np.bincount(patch, weights=np.einsum("ij,ij->i", centre - centroid[patch], cross), minlength=n_patches)
    inward = volume[patch] < 0
    f = np.where(inward[:, None], f[:, [0, 2, 1]], f)
    return f, int((flip[:n_faces] ^ inward).sum())


def _winding_number(points: np.ndarray, tris: np.ndarray) -> np.ndarray:
    """Generalised winding number of points [P, 3] w.r.t. triangles [F, 3, 3] (Van Oosterom-Strackee solid
    angles): ~1 inside a closed outward mesh, ~0 outside. Returns [P]."""
    out = np.empty(len(points))
    for i, p in enumerate(points):
        a, b, c = tris[:, 0] - p, tris[:, 1] - p, tris[:, 2] - p
        la, lb, lc = (np.linalg.norm(x, axis=1) for x in (a, b, c))
        det = np.einsum("ij,ij->i", a, np.cross(b, c))
        den = la * lb * lc + np.einsum("ij,ij->i", a, b) * lc + np.einsum("ij,ij->i", b, c) * la
        den += np.einsum("ij,ij->i", c, a) * lb
        out[i] = np.arctan2(det, den).sum() / (2 * np.pi)
    return out


def _drop_floaters(v: np.ndarray, f: np.ndarray, min_ratio: float) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Drop vertex-connected components whose area is below min_ratio x the largest one's. Returns (faces,
    component label of each kept face [F'] in 0..C'-1, components found, components dropped)."""
    csgraph = _optional("scipy.sparse.csgraph")
    sparse = _optional("scipy.sparse")
    edges = f[:, [0, 1, 1, 2]].reshape(-1, 2)
    graph = sparse.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(len(v), len(v)))
    _, label = csgraph.connected_components(graph, directed=False)
    comps, face_label = np.unique(label[f[:, 0]], return_inverse=True)
    area = np.bincount(face_label, weights=np.linalg.norm(_face_cross(v, f), axis=1))
    keep = area >= min_ratio * area.max()
    kept_faces = keep[face_label]
    new_label = (np.cumsum(keep) - 1)[face_label[kept_faces]]
    return f[kept_faces], new_label, len(comps), int((~keep).sum())


def _drop_inner_shells(v: np.ndarray, f: np.ndarray, face_label: np.ndarray) -> tuple[np.ndarray, int]:
    """Drop components enclosed by a larger one: all of up to 8 sampled vertices have a winding number above
    0.5 w.r.t. it (needs consistent winding; the sign does not matter). Returns (faces, components dropped)."""
    n = int(face_label.max()) + 1
    if n < 2:
        return f, 0
    area = np.bincount(face_label, weights=np.linalg.norm(_face_cross(v, f), axis=1), minlength=n)
    order = np.argsort(face_label, kind="stable")
    bounds = np.searchsorted(face_label[order], np.arange(n + 1))
    part = [f[order[bounds[i] : bounds[i + 1]]] for i in range(n)]  # faces of each component
    box = [(v[p].reshape(-1, 3).min(0), v[p].reshape(-1, 3).max(0)) for p in part]
    keep = np.ones(n, bool)
    rng = np.random.default_rng(0)
    by_area = np.argsort(-area)
    for rank, c in enumerate(by_area[1:], start=1):
        for outer in by_area[:rank]:
            if not keep[outer] or (box[c][0] < box[outer][0]).any() or (box[c][1] > box[outer][1]).any():
                continue
            ids = np.unique(part[c])
            samples = v[rng.choice(ids, size=min(8, len(ids)), replace=False)]
            if (np.abs(_winding_number(samples, v[part[outer]])) > 0.5).all():
                keep[c] = False
                break
    return f[keep[face_label]], int((~keep).sum())


def _boundary_loops(f: np.ndarray, n_vertices: int) -> list[np.ndarray]:
    """Closed boundary loops as vertex lists, ordered so that a fill face (l[i], l[i+1], x) has the winding of
    its neighbours. Loops through a vertex with several boundary edges out of it are skipped (ambiguous)."""
    half, edge_id, counts = _undirected_edges(f, n_vertices)
    border = half[counts[edge_id] == 1][:, ::-1]  # reversed: the fill face walks each border edge backwards
    if not len(border):
        return []
    out_degree = np.bincount(border[:, 0], minlength=n_vertices)
    edge_from = np.full(n_vertices, -1)
    edge_from[border[:, 0]] = np.arange(len(border))
    nxt = np.where(out_degree[border[:, 1]] == 1, edge_from[border[:, 1]], -1)
    ok = (out_degree[border[:, 0]] == 1) & (nxt >= 0)
    loops, seen = [], np.zeros(len(border), bool)
    for start in np.flatnonzero(ok):
        if seen[start]:
            continue
        loop, e = [], start
        while not seen[e] and ok[e]:
            seen[e] = True
            loop.append(e)
            e = nxt[e]
        if e == start:  # closed
            loops.append(border[loop, 0])
    return loops


def _ear_clip(points: np.ndarray) -> np.ndarray | None:
    """Triangulate a simple polygon [n, 3] (near-planar, any winding is taken from Newell's normal) without new
    vertices, always cutting the ear with the largest smallest angle. Returns [n - 2, 3] local indices or None
    when no valid ear exists (the projection self-intersects)."""
    normal = np.cross(points, np.roll(points, -1, axis=0)).sum(axis=0)  # Newell: orientation of the loop
    if np.linalg.norm(normal) < 1e-20:
        return None
    normal /= np.linalg.norm(normal)
    axis_u = np.cross(normal, [1.0, 0.0, 0.0] if abs(normal[0]) < 0.9 else [0.0, 1.0, 0.0])
    axis_u /= np.linalg.norm(axis_u)
    p2 = np.stack([points @ axis_u, points @ np.cross(normal, axis_u)], axis=1)  # counter-clockwise in 2D
    if _self_intersects(p2):  # a loop that folds over itself in its plane: no ear clipping there
        return None
    idx, tris = list(range(len(points))), []
    while len(idx) > 3:
        ring = np.array(idx)
        a, b, c = p2[np.roll(ring, 1)], p2[ring], p2[np.roll(ring, -1)]
        convex = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]) > 1e-14
        # no other polygon vertex inside the ear (a, b, c) or on its edges: [n ears, n points]
        q, m = p2[ring], len(ring)
        inside = (_side(a, b, q) >= -1e-14) & (_side(b, c, q) >= -1e-14) & (_side(c, a, q) >= -1e-14)
        offset = (np.arange(m)[None, :] - np.arange(m)[:, None]) % m
        inside &= (offset > 1) & (offset < m - 1)  # the ear's own three corners do not count
        valid = convex & ~inside.any(axis=1)
        if not valid.any():
            return None
        angles = np.stack([_angle(a, b, c), _angle(b, c, a), _angle(c, a, b)], 1).min(axis=1)
        k = int(np.argmax(np.where(valid, angles, -1.0)))
        tris.append((ring[k - 1], ring[k], ring[(k + 1) % len(ring)]))
        idx.pop(k)
    tris.append(tuple(idx))
    return np.array(tris, dtype=np.int64)


def _self_intersects(p2: np.ndarray) -> bool:
    """Whether two non-adjacent edges of the closed 2D polygon [n, 2] cross."""
    n = len(p2)
    a, b = p2, np.roll(p2, -1, axis=0)  # edge i: a[i] -> b[i]
    split = _side(a, b, a) * _side(a, b, b) < 0  # [n, n]: edge i has the two ends of edge j on opposite sides
    crosses = split & split.T
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    adjacent = (np.abs(i - j) <= 1) | (np.abs(i - j) == n - 1)
    return bool((crosses & ~adjacent).any())


def _side(p: np.ndarray, r: np.ndarray, q: np.ndarray) -> np.ndarray:
    """2D cross (r - p) x (q - p) for segments p[i] -> r[i] [N, 2] and points q [M, 2]: [N, M], > 0 when q
    lies left of the segment."""
    return (r[:, None, 0] - p[:, None, 0]) * (q[None, :, 1] - p[:, None, 1]) - (r[:, None, 1] - p[:, None, 1]) * (
        q[None, :, 0] - p[:, None, 0]
    )


def _angle(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Angle at a of the 2D triangles (a, b, c), [N]."""
    u, w = b - a, c - a
    cos = (u * w).sum(1) / np.maximum(np.linalg.norm(u, axis=1) * np.linalg.norm(w, axis=1), 1e-30)
    return np.arccos(np.clip(cos, -1.0, 1.0))


def _fill_holes(
    v: np.ndarray, f: np.ndarray, c: np.ndarray | None, max_edges: int, max_perimeter: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int]:
    """Close boundary loops with at most max_edges edges and a perimeter of at most max_perimeter (absolute
    length): ear clipping in the loop's plane, or a fan around the loop centroid (one new vertex, colour the
    loop's mean) when the clipping fails. Returns (v, f, c, holes filled, open loops left)."""
    new_v, new_c, new_f, filled, left = [], [], [], 0, 0
    for loop in _boundary_loops(f, len(v)):
        pts = v[loop]
        perimeter = np.linalg.norm(pts - np.roll(pts, -1, axis=0), axis=1).sum()
        if len(loop) > max_edges or perimeter > max_perimeter:
            left += 1
            continue
        tris = _ear_clip(pts)
        if tris is not None:
            new_f.append(loop[tris])
        else:
            centre = len(v) + sum(len(x) for x in new_v)
            new_v.append(pts.mean(axis=0, keepdims=True))
            if c is not None:
                new_c.append(c[loop].mean(axis=0, keepdims=True))
            new_f.append(np.stack([loop, np.roll(loop, -1), np.full(len(loop), centre)], axis=1))
        filled += 1
    if new_v:
        v = np.concatenate([v, *new_v]).astype(v.dtype)
        c = None if c is None else np.concatenate([c, *new_c]).astype(c.dtype)
    if new_f:
        f = np.concatenate([f, *new_f])
    return v, f, c, filled, left


def _decimate(
    v: np.ndarray, f: np.ndarray, c: np.ndarray | None, target: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quadric decimation to about `target` faces; colours re-sampled from the nearest input vertex (the
    input is dense, so its nearest vertex is within about one input edge of the output vertex)."""
    simplify = _optional("fast_simplification").simplify
    v2, f2 = simplify(v.astype(np.float32), f.astype(np.int32), target_count=target)
    f2 = f2.astype(np.int64)
    f2, _, _ = _drop_bad_faces(f2, len(v2))
    c2 = None
    if c is not None:
        _, nearest = _optional("scipy.spatial").cKDTree(v).query(v2, k=1)
        c2 = c[nearest]
    v2, f2, c2 = _compact(v2.astype(np.float32), f2, c2)
    return v2, f2, c2


def _check_mesh(vertices: Any, faces: Any, colors: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"vertices has shape {v.shape}; expected [V, 3] positions")
    if f.ndim != 2 or f.shape[1] != 3 or not np.issubdtype(f.dtype, np.integer):
        raise ValueError(f"faces has shape {f.shape} and dtype {f.dtype}; expected [F, 3] integer vertex indices")
    if not len(f):
        raise ValueError("faces is empty; pass a mesh with at least one triangle")
    if not np.isfinite(v).all():
        raise ValueError(f"vertices has {int((~np.isfinite(v)).any(1).sum())} non-finite rows; drop them first")
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"faces index vertices {f.min()}..{f.max()} but there are {len(v)} vertices")
    c = None
    if colors is not None:
        c = np.asarray(colors, dtype=np.float32)
        if c.ndim != 2 or c.shape[0] != len(v):
            raise ValueError(f"colors has shape {c.shape}; expected [{len(v)}, C], one row per vertex")
    return v, f.astype(np.int64), c


def clean_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    colors: np.ndarray | None = None,
    *,
    min_component_ratio: float = 0.01,
    remove_inner_shells: bool = True,
    fill_holes: bool = True,
    max_hole_edges: int = 64,
    max_hole_perimeter: float = 0.2,
    target_faces: int | None = None,
) -> CleanMesh:
    """Repair a FlexiCubes mesh for export.

    vertices [V, 3] (local frame), faces [F, 3] int, colors [V, C] float or None (any channels, e.g. the
    decoder's 6 vertex_attrs). Steps:
    1. merge vertices closer than 1e-6 of the bounding-box diagonal (colours averaged);
    2. drop faces with a repeated vertex and duplicate faces (same three vertices, either winding);
    3. drop components (connected through vertices) with less than min_component_ratio x the largest one's
       area (floaters);
    4. consistent winding per edge-connected patch, each patch turned outward; with remove_inner_shells,
       drop components enclosed by a larger one;
    5. fill boundary loops of at most max_hole_edges edges whose perimeter is at most max_hole_perimeter x
       the bounding-box diagonal (small holes; a cup's rim stays open);
    6. drop unreferenced vertices; 7. decimate to about target_faces (fast_simplification, quadric error),
       colours re-sampled from the nearest vertex of the undecimated mesh.
    The report counts what each step did, and times the whole call (`seconds`).
    """
    t0 = time.perf_counter()
    if not 0.0 <= min_component_ratio <= 1.0:
        raise ValueError(f"min_component_ratio={min_component_ratio}: expected a fraction in [0, 1]")
    if target_faces is not None and target_faces < 4:
        raise ValueError(f"target_faces={target_faces}: expected at least 4 faces, or None to keep every face")
    v, f, c = _check_mesh(vertices, faces, colors)
    report: dict[str, Any] = {"vertices_in": len(v), "faces_in": len(f)}

    v, f, c, report["vertices_merged"] = _merge_vertices(v, f, c)
    f, report["degenerate_faces"], report["duplicate_faces"] = _drop_bad_faces(f, len(v))
    if not len(f):
        raise ValueError("every face is degenerate (repeated vertices); the mesh has no surface to clean")
    f, label, report["components"], report["floaters_removed"] = _drop_floaters(v, f, min_component_ratio)
    f, report["faces_flipped"] = _orient(v, f)  # keeps the face order, so `label` still applies
    report["inner_shells_removed"] = 0
    if remove_inner_shells:
        f, report["inner_shells_removed"] = _drop_inner_shells(v, f, label)
    v, f, c = _compact(v, f, c)
    report["holes_filled"], report["open_boundaries"] = 0, 0
    if fill_holes:
        diagonal = float(np.linalg.norm(v.max(axis=0) - v.min(axis=0)))
        v, f, c, report["holes_filled"], report["open_boundaries"] = _fill_holes(
            v, f, c, max_hole_edges, max_hole_perimeter * diagonal
        )
    report["faces_before_decimation"] = len(f)
    if target_faces is not None and len(f) > target_faces:
        v, f, c = _decimate(v, f, c, target_faces)
    report["vertices_out"], report["faces_out"] = len(v), len(f)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return CleanMesh(v.astype(np.float32), f.astype(np.int64), c, report)


# ---------------------------------------------------------------------------------------------------------
# UV unwrapping


def unwrap_uv(
    vertices: np.ndarray, faces: np.ndarray, *, texture_size: int = 1024, padding: int = 2, chart_iterations: int = 1
) -> UVMesh:
    """xatlas charts packed for a texture_size^2 texture, `padding` texels between charts.

    chart_iterations is xatlas' ChartOptions.max_iterations (1, its default, as the official code); 0 skips
    chart refinement: about half the time for ~1.7x as many charts (more texture seams).

    xatlas picks its atlas size close to (not exactly) texture_size; the UVs are scaled uniformly so the
    larger side spans [0, 1], so the final gap is padding x texture_size / atlas size texels (about 0.9x
    padding on typical meshes). Slow on large meshes (chart growth; ~25k faces take seconds): decimate first.
    """
    v, f, _ = _check_mesh(vertices, faces, None)
    if texture_size < 16:
        raise ValueError(f"texture_size={texture_size}: expected at least 16 texels")
    xatlas = _optional("xatlas")
    atlas = xatlas.Atlas()
    atlas.add_mesh(v.astype(np.float32), f.astype(np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = texture_size
    pack.padding = padding
    pack.bilinear = True  # keep a half-texel border inside each chart for bilinear sampling
    charts = xatlas.ChartOptions()
    charts.max_iterations = chart_iterations
    atlas.generate(charts, pack)
    if atlas.atlas_count != 1:
        raise RuntimeError(f"xatlas produced {atlas.atlas_count} atlases; expected 1 (texture_size={texture_size})")
    vmapping, new_faces, uvs = atlas[0]
    # xatlas normalises u by the atlas width and v by its height: back to texels, then one scale for both
    uvs = uvs.astype(np.float64) * [atlas.width, atlas.height] / max(atlas.width, atlas.height)
    vmapping = vmapping.astype(np.int64)
    return UVMesh(v[vmapping].astype(np.float32), new_faces.astype(np.int64), uvs.astype(np.float32), vmapping)
