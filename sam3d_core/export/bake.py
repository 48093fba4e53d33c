"""Texture baking: fill the UV texture of a decimated, unwrapped mesh from the dense coloured mesh (or Gaussians).

    source = VertexColorSource(mesh.vertices, mesh.faces, mesh.vertex_attrs[:, :3])   # the dense FlexiCubes mesh
    texture = bake_texture(low_vertices, low_faces, low_uvs, source, size=1024)      # [1024, 1024, 3] uint8

Steps of `bake_texture`:
  1. checks (shapes, finite values, UVs inside [0, 1])
  2. rasterize the low-poly mesh in UV space (`kernels.rasterize`): per texel centre its face and barycentrics
  3. gutter: grow every chart by `padding` texels; a gutter texel takes, among its neighbours' faces, the UV
     triangle closest to its centre and the closest point on it, so bilinear filtering and mip-mapping at a chart
     border read the colour of the surface at that border instead of the background
  4. per texel the 3D point on the low-poly surface (barycentric blend of the face's vertices)
  5. colour of that point from the source (nearest point on the dense surface, or nearby Gaussians)
  6. push-pull fill of every remaining texel (averages of the baked texels only), so small mip levels stay clean
  7. quantise to uint8

UV convention. `convention="trimesh"` (the default) is trimesh's `TextureVisuals.uv`, OpenGL, OBJ and Blender:
v = 0 at the BOTTOM row of the image. trimesh's glTF exporter writes TEXCOORD_0 = (u, 1 - v), glTF's
convention (v = 0 at the TOP row), and its importer flips back; `convention="gltf"` reads UVs already in glTF's
form. Texel (row i, col j) is centred at u = (j + 0.5) / size and v = 1 - (i + 0.5) / size (trimesh) or
(i + 0.5) / size (gltf), the sampling convention of glTF / OpenGL.

Colour management. The decoders' colours (FlexiCubes vertex colours after the sigmoid, Gaussian SH_C0 dc + 0.5)
were trained against photo pixels / 255, so they are display-referred, sRGB-encoded values, and glTF's
baseColorTexture is sRGB-encoded: texel = round(255 c), with no transfer function applied. The bake is therefore
not washed out: no double gamma (no linear -> sRGB encoding of values that already are sRGB), no averaging with a
background (each texel is one surface point's colour; nothing is fitted to renders with a background), no alpha
and so no premultiplication (gutter and unused texels are filled from baked texels only, weighted by coverage,
never blended with black). By contrast, glTF vertex colours (COLOR_0) are linear: a vertex-coloured GLB needs
the sRGB -> linear conversion of these colours.

The low-poly vertices and the source must be in the same frame (the object's local frame, z up): bake before any
export rotation, or rotate both.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from kernels.rasterize import rasterize

_CONVENTIONS = ("trimesh", "gltf")
# The 8 neighbours (drow, dcol) of a texel, edge neighbours first: on equal distance the earlier one wins.
_NEIGHBOURS = ((0, -1), (0, 1), (-1, 0), (1, 0), (-1, -1), (-1, 1), (1, -1), (1, 1))


class ColorSource(Protocol):
    def colors(self, points: np.ndarray) -> np.ndarray:
        """points [N, 3] float64 in the mesh's frame -> colours [N, 3] float32 in [0, 1] (sRGB-encoded)."""


def _numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _check_mesh(name: str, vertices: np.ndarray, faces: np.ndarray) -> None:
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"{name} vertices must be [V, 3]; got {vertices.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"{name} faces must be [F, 3] vertex indices; got {faces.shape}")
    if faces.shape[0] == 0:
        raise ValueError(f"the {name} mesh has no faces; there is nothing to bake (did the mesh extraction fail?)")
    if faces.min() < 0 or faces.max() >= vertices.shape[0]:
        raise ValueError(
            f"{name} faces index vertices {faces.min()}..{faces.max()} but there are {vertices.shape[0]} vertices"
        )
    if not np.isfinite(vertices).all():
        raise ValueError(f"{name} vertices contain NaN or inf; clean the mesh before baking")


def closest_point_barycentric(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, ...]:
    """Closest point to p on triangles (a, b, c), all [..., D] (D = 2 or 3) -> (bary [..., 3], squared distance).

    Region tests on the Voronoi regions of vertices, edges and face (as in Ericson, Real-Time Collision
    Detection, 5.1.5), vectorised; degenerate triangles fall back to their edges and vertices.
    """
    def dot(x, y):
        return np.einsum("...i,...i->...", x, y)

    ab, ac, ap, bp, cp = b - a, c - a, p - a, p - b, p - c
    d1, d2, d3, d4, d5, d6 = dot(ab, ap), dot(ac, ap), dot(ab, bp), dot(ac, bp), dot(ab, cp), dot(ac, cp)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ab = d1 / (d1 - d3)
        t_ac = d2 / (d2 - d6)
        t_bc = (d4 - d3) / ((d4 - d3) + (d5 - d6))
        denom = va + vb + vc
        v, w = vb / denom, vc / denom
        one, zero = np.ones_like(d1), np.zeros_like(d1)
        # np.select takes the first true condition: the order is the order of Ericson's early returns.
        conditions = [
            (d1 <= 0) & (d2 <= 0),
            (d3 >= 0) & (d4 <= d3),
            (vc <= 0) & (d1 >= 0) & (d3 <= 0),
            (d6 >= 0) & (d5 <= d6),
            (vb <= 0) & (d2 >= 0) & (d6 <= 0),
            (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0),
            np.isfinite(v) & np.isfinite(w),
        ]
        choices = (
            [one, zero, 1 - t_ab, zero, 1 - t_ac, zero, 1 - v - w],
            [zero, one, t_ab, zero, zero, 1 - t_bc, v],
            [zero, zero, zero, one, t_ac, t_bc, w],
        )
        bary = np.stack([np.select(conditions, ch, default=float(i == 0)) for i, ch in enumerate(choices)], -1)
    q = p - (bary[..., :1] * a + bary[..., 1:2] * b + bary[..., 2:] * c)
    return bary, dot(q, q)


class VertexColorSource:
    """Colour of the nearest point on a dense vertex-coloured mesh, barycentric blend of its vertex colours.

    vertices [V, 3], faces [F, 3], colors [V, 3] in [0, 1] (float) or 0..255 (uint8); numpy or torch. The nearest
    triangle is searched among the `k` triangles whose centroids are nearest (scipy cKDTree), then the exact
    closest point on each; with the near-uniform triangles of a FlexiCubes mesh the true nearest is among them.
    """

    def __init__(self, vertices, faces, colors, k: int = 8):
        from scipy.spatial import cKDTree

        self.vertices = _numpy(vertices, np.float64)
        self.faces = _numpy(faces, np.int64)
        _check_mesh("source", self.vertices, self.faces)
        colors = colors.detach().cpu().numpy() if isinstance(colors, torch.Tensor) else np.asarray(colors)
        if colors.shape != (self.vertices.shape[0], 3):
            raise ValueError(
                f"colors must be [V={self.vertices.shape[0]}, 3] RGB; got {colors.shape} "
                "(for a FlexiCubes MeshResult pass mesh.vertex_attrs[:, :3])"
            )
        if colors.dtype == np.uint8:
            colors = colors / 255.0
        if not np.isfinite(colors).all() or colors.min() < -1e-3 or colors.max() > 1 + 1e-3:
            raise ValueError(
                f"float colors must lie in [0, 1]; got {colors.min():.4g}..{colors.max():.4g} "
                "(divide 0..255 values by 255, or pass uint8)"
            )
        self.vertex_colors = np.clip(colors, 0, 1).astype(np.float32)
        self.k = min(k, self.faces.shape[0])
        self._tri = self.vertices[self.faces]  # [F, 3, 3]
        self._tree = cKDTree(self._tri.mean(1))

    def colors(self, points: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        out = np.empty((points.shape[0], 3), np.float32)
        for lo in range(0, points.shape[0], chunk):
            p = points[lo : lo + chunk]
            _, cand = self._tree.query(p, k=self.k, workers=-1)
            cand = cand.reshape(p.shape[0], self.k)  # [N, k]
            tri = self._tri[cand]  # [N, k, 3, 3]
            bary, d2 = closest_point_barycentric(p[:, None], tri[:, :, 0], tri[:, :, 1], tri[:, :, 2])
            best = d2.argmin(1)
            rows = np.arange(p.shape[0])
            face, w = cand[rows, best], bary[rows, best]  # [N], [N, 3]
            out[lo : lo + chunk] = np.einsum("nk,nkc->nc", w, self.vertex_colors[self.faces[face]])
        return out


class GaussianSource:
    """Colour from nearby 3D Gaussians: the average of the `k` nearest centres' colours, weighted by opacity x
    the Gaussian's density at the point (exp(-m^2 / 2), m the Mahalanobis distance under its scales and rotation).

    `gaussians`: a `sam3d_core.gaussians.Gaussians` (colours SH_C0 dc + 0.5, clipped to [0, 1]). Where no
    Gaussian reaches the point (all weights ~0), the colour of the Gaussian with the smallest m is used.
    """

    def __init__(self, gaussians, k: int = 16):
        from scipy.spatial import cKDTree

        if len(gaussians) == 0:
            raise ValueError("there are no Gaussians to bake from (the decoder returned an empty set)")
        self.xyz = _numpy(gaussians.get_xyz, np.float64)
        self.rgb = np.clip(_numpy(gaussians.colors, np.float32), 0, 1)
        self.opacity = _numpy(gaussians.get_opacity, np.float64)[:, 0]
        self.inv_scale = 1.0 / _numpy(gaussians.get_scaling, np.float64)
        w, x, y, z = _numpy(gaussians.get_rotation, np.float64).T
        self.rot = np.stack([  # [M, 3, 3], columns = the Gaussian's local axes in the object frame
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ], 1)
        self.k = min(k, len(self.xyz))
        self._tree = cKDTree(self.xyz)

    def colors(self, points: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        out = np.empty((points.shape[0], 3), np.float32)
        for lo in range(0, points.shape[0], chunk):
            p = points[lo : lo + chunk]
            _, cand = self._tree.query(p, k=self.k, workers=-1)
            cand = cand.reshape(p.shape[0], self.k)
            local = np.einsum("nkji,nkj->nki", self.rot[cand], p[:, None] - self.xyz[cand]) * self.inv_scale[cand]
            m2 = (local**2).sum(-1)  # [N, k]
            w = self.opacity[cand] * np.exp(-0.5 * m2)
            total = w.sum(1, keepdims=True)
            nearest = self.rgb[cand[np.arange(p.shape[0]), m2.argmin(1)]]
            blend = np.einsum("nk,nkc->nc", w, self.rgb[cand]) / np.maximum(total, 1e-300)
            out[lo : lo + chunk] = np.where(total > 1e-12, blend, nearest)
        return out


def _uv_pixels(uvs: np.ndarray, size: int, convention: str) -> np.ndarray:
    """[V, 2] UVs -> [V, 2] (x, y) in texel units of the image (rows down), per `convention`."""
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be one of {_CONVENTIONS}; got {convention!r}")
    v_row = 1.0 - uvs[:, 1] if convention == "trimesh" else uvs[:, 1]
    return np.stack([uvs[:, 0], v_row], 1) * size


def _grow_charts(face: np.ndarray, bary: np.ndarray, uv_tri: np.ndarray, rings: int) -> None:
    """Extend face [S, S] (-1 empty) and bary [S, S, 3] in place by `rings` texels (step 3 of the module doc)."""
    size = face.shape[0]
    for _ in range(rings):
        padded = np.pad(face, 1, constant_values=-1)
        cand = np.stack([padded[1 + dr : 1 + dr + size, 1 + dc : 1 + dc + size] for dr, dc in _NEIGHBOURS], -1)
        target = (face < 0) & (cand >= 0).any(-1)
        if not target.any():
            return
        rows, cols = np.nonzero(target)
        cand = cand[rows, cols]  # [N, 8]
        centre = np.stack([cols + 0.5, rows + 0.5], 1)[:, None]  # [N, 1, 2]
        tri = uv_tri[np.maximum(cand, 0)]  # [N, 8, 3, 2]
        w, d2 = closest_point_barycentric(centre, tri[:, :, 0], tri[:, :, 1], tri[:, :, 2])
        d2 = np.where(cand >= 0, d2, np.inf)
        best = d2.argmin(1)
        face[rows, cols] = cand[np.arange(len(rows)), best]
        bary[rows, cols] = w[np.arange(len(rows)), best]


def _push_pull(color: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill the texels where `known` [H, W] is False with coverage-weighted averages of coarser levels."""
    levels = [(color * known[..., None], known.astype(np.float64))]
    while max(levels[-1][1].shape) > 1:
        c, w = levels[-1]
        h, wd = w.shape
        c = np.pad(c, ((0, h % 2), (0, wd % 2), (0, 0)))
        w = np.pad(w, ((0, h % 2), (0, wd % 2)))
        levels.append((c.reshape(c.shape[0] // 2, 2, c.shape[1] // 2, 2, -1).sum((1, 3)),
                       w.reshape(w.shape[0] // 2, 2, w.shape[1] // 2, 2).sum((1, 3))))
    filled = None
    for c, w in reversed(levels):
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = c / w[..., None]
        if filled is not None:
            up = filled.repeat(2, 0).repeat(2, 1)[: w.shape[0], : w.shape[1]]
            mean = np.where(w[..., None] > 0, mean, up)
        filled = mean
    return filled


def bake_texture(
    vertices,
    faces,
    uvs,
    source: ColorSource,
    size: int = 1024,
    padding: int = 4,
    convention: str = "trimesh",
) -> np.ndarray:
    """Bake `source`'s colours into a [size, size, 3] uint8 sRGB texture for the unwrapped mesh.

    vertices [V, 3] and faces [F, 3] (numpy or torch): the low-poly mesh, in the source's frame; uvs [V, 2] in
    [0, 1], one per vertex (xatlas output: vertices[vmapping], indices, uvs), in `convention` ("trimesh": v = 0
    at the bottom row; "gltf": v = 0 at the top row; see the module doc). `padding`: gutter texels grown around
    every chart from the surface (step 3); all texels beyond are filled by push-pull.
    """
    # 1. checks
    vertices, faces, uvs = _numpy(vertices, np.float64), _numpy(faces, np.int64), _numpy(uvs, np.float64)
    _check_mesh("low-poly", vertices, faces)
    if uvs.shape != (vertices.shape[0], 2):
        raise ValueError(f"uvs must be [V={vertices.shape[0]}, 2], one per vertex; got {uvs.shape}")
    if not np.isfinite(uvs).all() or uvs.min() < -1e-6 or uvs.max() > 1 + 1e-6:
        raise ValueError(
            f"uvs must lie in [0, 1]; got {np.nanmin(uvs):.4g}..{np.nanmax(uvs):.4g} (normalise xatlas' UVs by the "
            "atlas size, or repack them: tiling UVs cannot be baked into one texture)"
        )
    if not isinstance(size, int) or not 2 <= size <= 16384:
        raise ValueError(f"size must be an int in [2, 16384] texels; got {size!r}")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int (texels of gutter); got {padding!r}")

    # 2. UV raster
    uv_px = _uv_pixels(uvs, size, convention)  # [V, 2]
    pos = torch.from_numpy(np.concatenate([uv_px, np.zeros((len(uv_px), 1))], 1))  # depth 0: charts do not overlap
    raster = rasterize(pos, torch.from_numpy(faces), size, size)
    face, bary = raster.face_id.numpy().astype(np.int64), raster.bary.numpy().astype(np.float64)
    if not (face >= 0).any():
        raise ValueError(
            f"no texel centre of the {size}x{size} texture is covered by the UV layout: the UVs are degenerate "
            "(zero area) or the charts are far smaller than a texel; unwrap the mesh (xatlas) or raise size"
        )

    # 3. gutter
    _grow_charts(face, bary, uv_px[faces], padding)

    # 4-5. surface points and their colours
    known = face >= 0
    points = np.einsum("nk,nkc->nc", bary[known], vertices[faces[face[known]]])
    color = np.zeros((size, size, 3), np.float64)
    color[known] = source.colors(points)

    # 6-7. fill the rest, quantise
    color = _push_pull(color, known)
    return np.clip(np.round(color * 255.0), 0, 255).astype(np.uint8)


def sample_texture(texture: np.ndarray, uv, convention: str = "trimesh") -> np.ndarray:
    """Bilinear lookup (clamp to edge, texel centres at (j + 0.5) / W) -> [N, C] float32 in [0, 1] for uint8
    textures (values as stored otherwise). uv [N, 2] in `convention` (see the module doc)."""
    texture = np.asarray(texture)
    uv = _numpy(uv, np.float64).reshape(-1, 2)
    height, width = texture.shape[:2]
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be one of {_CONVENTIONS}; got {convention!r}")
    v_row = 1.0 - uv[:, 1] if convention == "trimesh" else uv[:, 1]
    x, y = uv[:, 0] * width - 0.5, v_row * height - 0.5
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    img = texture.reshape(height, width, -1).astype(np.float64)

    def at(r, c):
        return img[np.clip(r, 0, height - 1), np.clip(c, 0, width - 1)]

    out = (at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x0 + 1) * fx * (1 - fy)
           + at(y0 + 1, x0) * (1 - fx) * fy + at(y0 + 1, x0 + 1) * fx * fy)
    return (out / 255.0 if texture.dtype == np.uint8 else out).astype(np.float32)
