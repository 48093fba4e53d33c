"""UV unwrapping with xatlas (the `export` extra), in the object's local frame.

UV convention: glTF's (see `cleanup.py`'s module docstring): (0, 0) is the top-left of texel [row 0, col 0].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sam3d_core.export.cleanup import check_mesh, optional_import

__all__ = ["UVMesh", "unwrap_uv"]


@dataclass
class UVMesh:
    """Result of `unwrap_uv`. Vertices are split along chart seams: vertices [V', 3] = input[vmapping],
    faces [F, 3] (same face order as the input), uvs [V', 2] float32 in [0, 1] (glTF convention, module
    docstring), vmapping [V'] int64 index of each new vertex in the input (carry colours with it)."""

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    vmapping: np.ndarray


def unwrap_uv(
    vertices: np.ndarray,
    faces: np.ndarray,
    *,
    texture_size: int = 1024,
    padding: int = 2,
    chart_iterations: int = 1,
    piece_faces: int | None = 5000,
) -> UVMesh:
    """xatlas charts packed for a texture_size^2 texture, `padding` texels between charts.

    chart_iterations is xatlas' ChartOptions.max_iterations (1, its default, as the official code); 0 skips
    chart refinement: about a fifth of the time for ~1.2-1.7x as many charts (more texture seams).

    piece_faces: meshes with more faces are cut into pieces of at most this many (halved at the median face
    centre along the longest extent, recursively), handed to xatlas as separate meshes of one atlas: xatlas
    grows charts per mesh in time superlinear in its faces (and on its own thread per mesh), then packs every
    chart together. The cuts become chart borders; at 5000 faces per piece that changed the chart count by
    under 1% on a stage-2 mesh decimated to 20k faces, for a third of the time. None: one piece.

    xatlas picks its atlas size close to (not exactly) texture_size; the UVs are scaled uniformly so the
    larger side spans [0, 1], so the final gap is padding x texture_size / atlas size texels (0.7-0.9x padding
    on typical meshes). Slow on large meshes (chart growth): decimate first.
    """
    v, f, _ = check_mesh(vertices, faces, None)
    if texture_size < 16:
        raise ValueError(f"texture_size={texture_size}: expected at least 16 texels")
    if piece_faces is not None and piece_faces < 1:
        raise ValueError(f"piece_faces={piece_faces}: expected a positive face count, or None for one piece")
    xatlas = optional_import("xatlas")
    atlas = xatlas.Atlas()
    pieces = _split_faces(v[f].mean(axis=1), piece_faces or len(f))
    used = []  # per piece: the input vertices it uses
    for idx in pieces:
        ids, local = np.unique(f[idx], return_inverse=True)
        atlas.add_mesh(v[ids].astype(np.float32), local.reshape(-1, 3).astype(np.uint32))
        used.append(ids)
    pack = xatlas.PackOptions()
    pack.resolution = texture_size
    pack.padding = padding
    pack.bilinear = True  # keep a half-texel border inside each chart for bilinear sampling
    charts = xatlas.ChartOptions()
    charts.max_iterations = chart_iterations
    atlas.generate(charts, pack)
    if atlas.atlas_count != 1:
        raise RuntimeError(f"xatlas produced {atlas.atlas_count} atlases; expected 1 (texture_size={texture_size})")
    new_faces, vmapping, uvs = np.empty_like(f), [], []
    offset = 0
    for k, (idx, ids) in enumerate(zip(pieces, used, strict=True)):
        piece_vmapping, piece_faces_out, piece_uvs = atlas[k]
        new_faces[idx] = piece_faces_out.astype(np.int64) + offset
        vmapping.append(ids[piece_vmapping.astype(np.int64)])
        uvs.append(piece_uvs)
        offset += len(piece_vmapping)
    vmapping = np.concatenate(vmapping)
    # xatlas normalises u by the atlas width and v by its height: back to texels, then one scale for both
    uvs = np.concatenate(uvs).astype(np.float64) * [atlas.width, atlas.height] / max(atlas.width, atlas.height)
    return UVMesh(v[vmapping].astype(np.float32), new_faces, uvs.astype(np.float32), vmapping)


def _split_faces(centres: np.ndarray, max_faces: int) -> list[np.ndarray]:
    """Face index groups of at most max_faces: recursive halving at the median of the face centres [F, 3] along
    their longest extent. Deterministic (stable sorts), every face in exactly one group."""
    out, stack = [], [np.arange(len(centres))]
    while stack:
        idx = stack.pop()
        if len(idx) <= max_faces:
            out.append(idx)
            continue
        c = centres[idx]
        order = idx[np.argsort(c[:, np.argmax(c.max(axis=0) - c.min(axis=0))], kind="stable")]
        stack += [order[len(order) // 2 :], order[: len(order) // 2]]
    return out
