"""Stage 1 alone -> a textured mesh: a smooth surface from the 64^3 occupancy logits, textured from the photo.

For models without a trained stage 2 (SLAT -> mesh), the product still needs a textured object:

    v, f = occupancy_surface(out1.logits, downsample_factor=out1.downsample_factor)   # local frame
    uv, report = decimate_and_unwrap(v, f, target_faces=20000, texture_size=1024)    # export/uv.py
    source = PhotoProjection(uv.vertices, uv.faces, photo_rgb, mask, pose4, K)
    texture = bake_texture(uv.vertices, uv.faces, uv.uvs, source, size=1024)        # export/bake.py

`project_texture` does the last two lines and returns the same `TexturedMesh` as stage 2's path, so GLB,
scene.glb, the Blender import and the app work unchanged.

Surface (`occupancy_surface`): the logits are clipped to +-`clip` (so far-away values do not pull the
surface), the interior that a surface-only occupancy encloses is filled (the official decoder, and our data
by default, mark surface voxels only: without the fill the shell would give an outer and an inner surface),
the field is lightly smoothed (a Gaussian of `smooth` voxels) and scikit-image's marching cubes extracts the
level-0 surface. Vertex (i, j, k) of the grid lands at (i + 0.5) / R - 0.5 in the local frame (voxel centres,
the convention of `voxels.voxel_surface` and `data/voxelize.py`), so the level-0 surface passes about where
the occupied voxels' outer faces are. When stage 1 capped its voxels (`models.ss_vae.cap_voxels`, factor 2),
the vertices get the cap's affine map, so the mesh sits where the capped voxels (and the pose's scale x 2)
put the object, as a stage-2 mesh would.

Texture (`PhotoProjection`, a `bake.ColorSource`): the placed mesh (pose, K) is rasterised into a depth
buffer at the photo's resolution (at most `max_render` pixels on a side; `sam3d_kernels.rasterize`); a texel's
surface point takes the photo's colour where it is visible (in front: its depth within `tolerance` of the
buffer's) and inside the (slightly eroded) mask; every other point takes the colour of the nearest visible
surface point in 3D (on a grid of 1/96 of the object: a Euclidean distance transform finds each cell's nearest
cell holding seen points), so the back and the sides are a plausible continuation of the front, never black.
Colours: the photo is sRGB and the GLB's baseColorTexture is sRGB, so texel = photo value, with no transfer
function applied (bake.py's module doc).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from sam3d_core.export.bake import bake_texture, sample_texture
from sam3d_core.export.cleanup import optional_import
from sam3d_core.export.gltf import TexturedMesh
from sam3d_core.geometry import frames
from sam3d_kernels.rasterize import rasterize

__all__ = ["PhotoProjection", "SilhouetteCarve", "occupancy_surface", "project_texture"]

_NEAR = 1e-6  # faces with a vertex at camera depth <= this are not drawn (behind the camera)


# ---------------------------------------------------------------------------------------------------------
# surface


def _cap_map(occupied: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """The affine map (per axis: x -> lo' + (x - lo) * ratio) that `cap_voxels` applies, with its rounding left
    out, for grid coordinates: (offset [3], ratio [3]) with x_capped = offset + x * ratio. occupied [R, R, R]."""
    used = [np.flatnonzero(occupied.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]  # per axis
    lo = np.array([u[0] for u in used], np.float64)
    hi = np.array([u[-1] for u in used], np.float64)
    size = hi - lo + 1
    target = size / factor
    target_lo = lo + (size - target) / 2
    # cap_voxels: (x - lo) / (hi - lo) * (target - 1) + target_lo; a flat (or 2-voxel) axis would collapse to a
    # plane there, so the ratio is kept at least 1 / (2 factor) (the mesh keeps a thickness)
    ratio = np.where(hi > lo, (target - 1) / np.maximum(hi - lo, 1), 1.0 / factor)
    ratio = np.maximum(ratio, 0.5 / factor)
    return target_lo - lo * ratio, ratio


# Voxels the filled stage-1 solid grows by before the carve (SilhouetteCarve.grow): on the render-paste benchmark
# the first default model's Chamfer went 0.165 -> 0.149, voxel IoU 0.038 -> 0.040, ADD-S@0.1 0.87 -> 0.89, F1@0.01
# 0.018 -> 0.016 (docs/benchmarks.md), and the demo armchair's silhouette IoU 0.54 -> 0.73.
CARVE_GROW = 3


class SilhouetteCarve:
    """What the photo rules out: a local-frame point placed by the pose is dropped when it projects into the photo
    outside the object's mask, unless something nearer is seen at that pixel (an occluder may hide it there).

        carve = SilhouetteCarve(pose4, K, mask, pointmap)
        keep = carve(local_points)                      # bool [N]
        v, f = occupancy_surface(logits, carve=carve)   # the surface of what is kept

    A stage-1 model too small to get the shape right (the default model) predicts a blob of about the right size
    and place; the single view still knows its outline. Cutting the blob down to the silhouette cone (one view's
    visual hull) makes the object land on the photo: on the render-paste benchmark, after layout refinement, every
    shape and layout metric of the default model improved (docs/benchmarks.md). Points that project off the photo
    are kept (no evidence there), and so are points behind the point map's depth at their pixel by more than
    `tolerance` of the object's size. The mask is dilated by `margin` voxels as they appear in the photo: with the
    default half voxel a point is kept when the footprint of a voxel about it touches the mask (the level-0 surface
    then follows the outline to about half a voxel; one voxel made the silhouette visibly fat).

    pose4 [4, 4]: local -> PyTorch3D camera (`frames.pose_matrix`); K [3, 3] pixel intrinsics; mask [H, W] bool (the
    visible mask); pointmap [H, W, 3] camera points (non-finite or z <= 0: unknown) or None; voxel: the side of one
    voxel in the local frame (1 / 64 for stage 1's grid)."""

    def __init__(self, pose4, K, mask, pointmap=None, *, voxel: float = 1.0 / 64, margin: float = 0.5,
                 tolerance: float = 0.05, grow: int = 0):  # fmt: skip
        self.pose = np.asarray(pose4, np.float64)
        self.K = np.asarray(K, np.float64)
        self.mask = np.asarray(mask, bool)
        if self.pose.shape != (4, 4) or self.K.shape != (3, 3) or self.mask.ndim != 2:
            raise ValueError(
                f"SilhouetteCarve: got pose {self.pose.shape}, K {self.K.shape}, mask {self.mask.shape}; expected "
                "[4, 4], [3, 3] and [H, W]"
            )
        if pointmap is not None and np.shape(pointmap) != (*self.mask.shape, 3):
            raise ValueError(f"pointmap: got {np.shape(pointmap)}, expected {(*self.mask.shape, 3)} (the mask's size)")
        if not isinstance(grow, int) or grow < 0:
            raise ValueError(f"grow={grow!r}: expected a number of voxels >= 0")
        self.pointmap, self.voxel, self.margin, self.tolerance = pointmap, float(voxel), float(margin), float(tolerance)
        self.grow = grow
        self.report: dict = {}

    def grown(self, solid: np.ndarray) -> np.ndarray:
        """The solid [R, R, R] bool to be carved: its enclosed holes filled, then dilated by `grow` voxels (the
        solid itself when grow is 0). Growing first lets the outline bring back what a coarse shape misses (a
        chair's legs, the top of its back): the carve then cuts the grown solid down to the silhouette cone."""
        solid = np.asarray(solid, bool)
        if not self.grow or not solid.any():
            return solid
        ndimage = optional_import("scipy.ndimage")
        return ndimage.binary_dilation(ndimage.binary_fill_holes(solid), iterations=self.grow)

    def __call__(self, local: np.ndarray) -> np.ndarray:
        ndimage = optional_import("scipy.ndimage")
        local = np.asarray(local, np.float64).reshape(-1, 3)
        keep = np.ones(len(local), bool)
        if not len(local):
            return keep
        cam = local @ self.pose[:3, :3].T + self.pose[:3, 3]
        ahead = cam[:, 2] > _NEAR
        if not ahead.any():
            return keep
        uv = frames.project_points(np.where(ahead[:, None], cam, 1.0), self.K)
        h, w = self.mask.shape
        j, i = np.floor(uv[:, 0]), np.floor(uv[:, 1])
        inside = ahead & (j >= 0) & (j < w) & (i >= 0) & (i < h)
        # a voxel's size in pixels at the object's median depth: the outline's tolerance
        side = self.voxel * float(np.linalg.norm(self.pose[:3, :3], axis=0).max())
        pixels = float(self.K[0, 0]) * side / float(np.median(cam[ahead, 2]))
        radius = max(1, math.ceil(self.margin * pixels))
        allowed = ndimage.binary_dilation(self.mask, iterations=radius) if self.mask.any() else self.mask
        ii, jj = i[inside].astype(np.int64), j[inside].astype(np.int64)
        ok = allowed[ii, jj]
        if self.pointmap is not None:
            size = float(np.linalg.norm(np.ptp(cam, axis=0)))
            z = np.asarray(self.pointmap[ii, jj, 2], np.float64)
            with np.errstate(invalid="ignore"):
                ok |= np.isfinite(z) & (z > 0) & (z < cam[inside, 2] - self.tolerance * size)  # occluded there
        keep[np.flatnonzero(inside)] = ok
        self.report = {"points": len(local), "removed": int((~keep).sum()), "margin_pixels": radius}
        return keep


def occupancy_surface(
    logits: np.ndarray | torch.Tensor,
    *,
    downsample_factor: int = 1,
    smooth: float = 0.5,
    clip: float = 4.0,
    fill: bool = True,
    carve: SilhouetteCarve | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The level-0 surface of occupancy logits [R, R, R] (grid axes x, y, z; stage 1's [64, 64, 64]) ->
    (vertices [V, 3] float32 in the local frame [-0.5, 0.5]^3, faces [F, 3] int64, counter-clockwise seen
    from outside). Watertight: the field is padded with outside values, so the surface closes at the grid's
    border.

    smooth: Gaussian sigma in voxels (0: none). 0.5 removes the voxel staircase and keeps rods one voxel thick
    (a sigma of 0.6 would erase them); isolated single voxels vanish. clip: logits are clipped to +-clip first.
    fill: the enclosed empty interior of a surface-only occupancy is set inside (`scipy.ndimage.binary_fill_holes`).
    downsample_factor: `Stage1Output.downsample_factor` (see the module doc).
    carve: a callable local points [N, 3] -> keep [N] bool (`SilhouetteCarve`): the cells of the filled solid
    (grown first by the carve's `grow` voxels) that it drops are set outside before the surface is extracted (the
    cap's map is taken from the uncarved occupancy, so what is kept stays where it was). When it would drop every
    cell, nothing is dropped and nothing grown.
    """
    ndimage = optional_import("scipy.ndimage")
    measure = optional_import("skimage.measure")
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().float().cpu().numpy()
    grid = np.asarray(logits, dtype=np.float32)
    if grid.ndim == 5 and grid.shape[:2] == (1, 1):
        grid = grid[0, 0]
    if grid.ndim != 3 or len(set(grid.shape)) != 1 or grid.shape[0] < 2:
        raise ValueError(f"logits: got shape {grid.shape}, expected a cubic grid [R, R, R] (stage 1: [64, 64, 64])")
    if not np.isfinite(grid).all():
        raise ValueError("logits contain NaN or inf; the stage-1 decoder's output is broken (check the weights)")
    if downsample_factor not in (1, 2):
        raise ValueError(
            f"downsample_factor: got {downsample_factor}, expected 1 or 2 (Stage1Output.downsample_factor)"
        )
    if not (smooth >= 0 and clip > 0):
        raise ValueError(f"smooth={smooth}, clip={clip}: expected smooth >= 0 voxels and clip > 0")
    res = grid.shape[0]
    occupied = grid > 0
    if not occupied.any():
        raise ValueError("no voxel has a positive occupancy logit: stage 1 found no shape (try another seed)")

    offset, ratio = _cap_map(occupied, downsample_factor) if downsample_factor != 1 else (0.0, 1.0)
    field = np.clip(grid, -clip, clip)
    if fill:
        interior = ndimage.binary_fill_holes(occupied) & ~occupied
        field[interior] = clip
    if carve is not None:
        solid = field > 0
        grown = carve.grown(solid) if hasattr(carve, "grown") else solid  # SilhouetteCarve.grow: 0 = the solid
        cells = np.argwhere(grown)  # [N, 3]
        keep = np.asarray(carve((offset + cells * ratio + 0.5) / res - 0.5), bool)
        if keep.any():
            field[grown & ~solid] = clip
            gone = cells[~keep]
            field[gone[:, 0], gone[:, 1], gone[:, 2]] = -clip
    pad = 2  # outside values around the grid: a closed surface, and room for the smoothing
    field = np.pad(field, pad, constant_values=-clip)
    if smooth > 0:
        smoothed = ndimage.gaussian_filter(field, smooth, mode="nearest")
        if smoothed.max() > 0:  # else (only isolated voxels) the unsmoothed field keeps them
            field = smoothed
    # 'ascent': the field grows towards the inside, so the faces wind counter-clockwise seen from outside
    verts, faces, _, _ = measure.marching_cubes(field, level=0.0, gradient_direction="ascent", allow_degenerate=False)
    grid_xyz = verts.astype(np.float64) - pad  # [V, 3] voxel index units
    if downsample_factor != 1:
        grid_xyz = offset + grid_xyz * ratio
    local = (grid_xyz + 0.5) / res - 0.5
    return local.astype(np.float32), faces.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# texture from the photo


class PhotoProjection:
    """Colour source (`bake.ColorSource`): surface points -> the photo's colour where the point is seen, else the
    colour of the nearest seen surface point (module doc).

    vertices [V, 3], faces [F, 3]: the mesh in the local frame, the one the texture is baked for (its own
    surface is the occluder); image [H, W, 3] uint8 sRGB; mask [H, W] bool (the object's); pose [4, 4] local ->
    PyTorch3D camera (column vectors, `ObjectResult.pose_matrix`); K [3, 3] pixel intrinsics (OpenCV style).
    max_render: the depth buffer's longest side in pixels (the photo's resolution up to that); erode_px: the mask
    is eroded by this many render pixels, so that colours at the object's outline do not mix in background;
    tolerance: depth slack of the visibility test in camera units (default 2 voxels of the object, 2 / 64 of its
    mean scale); fill_cell: cell size (local units) of the grid that carries the colours of hidden points.
    `stats` holds counts (render size, seen pixels, and from the last `colors` call the visible fraction).
    """

    def __init__(
        self,
        vertices: np.ndarray,
        faces: np.ndarray,
        image: np.ndarray,
        mask: np.ndarray,
        pose: np.ndarray,
        K: np.ndarray,
        *,
        max_render: int = 1024,
        erode_px: int = 1,
        tolerance: float | None = None,
        fill_cell: float = 1 / 96,
    ):
        ndimage = optional_import("scipy.ndimage")
        image, mask = np.asarray(image), np.asarray(mask, dtype=bool)
        vertices = np.asarray(vertices, dtype=np.float64)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image: got {image.dtype} {image.shape}, expected [H, W, 3] uint8 (the photo's RGB)")
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask is {mask.shape} but the image is {image.shape[:2]}; pass the object's mask")
        if not 16 <= max_render <= 16384:
            raise ValueError(f"max_render={max_render}: expected 16..16384 pixels")
        if not 1 / 1024 <= fill_cell <= 1:
            raise ValueError(f"fill_cell={fill_cell}: expected 1/1024..1 (local units; 1/96 is the default)")
        self.image, self.pose = image, np.asarray(pose, dtype=np.float64)
        h, w = mask.shape
        s = min(1.0, max_render / max(h, w))
        self.size = (max(1, round(h * s)), max(1, round(w * s)))  # (rows, cols) of the depth buffer
        self.sx, self.sy = self.size[1] / w, self.size[0] / h  # photo pixels -> render pixels
        self.K = np.diag([self.sx, self.sy, 1.0]) @ np.asarray(K, dtype=np.float64)  # the render's intrinsics
        scale = float(np.linalg.norm(self.pose[:3, :3], axis=0).mean())
        self.tolerance = 2.0 * scale / 64 if tolerance is None else float(tolerance)

        # 1. depth buffer of the placed mesh. The rasteriser interpolates its depth linearly on screen, so it gets
        # -1 / z (linear on screen: an exact z-test, nearest first), and the depth is perspective-correct.
        v_cam = frames.transform_points(self.pose, vertices)  # [V, 3]
        f = np.asarray(faces, dtype=np.int64)
        f = f[(v_cam[:, 2] > _NEAR)[f].all(axis=1)]
        rows, cols = self.size
        with np.errstate(divide="ignore"):
            key = -1.0 / v_cam[:, 2:]  # [V, 1]
        pos = torch.from_numpy(np.concatenate([frames.project_points(v_cam, self.K), key], 1))
        pos = torch.where(torch.isfinite(pos), pos, 0.0).clamp(-(2.0**19), 2.0**19)  # culled vertices' junk
        raster = rasterize(pos, torch.from_numpy(f), rows, cols)
        face_id = raster.face_id.numpy().astype(np.int64)  # [rows, cols]
        covered = face_id >= 0
        fid, bary = face_id[covered], raster.bary.numpy()[covered].astype(np.float64)  # [N], [N, 3]
        inv_z = bary / v_cam[f[fid], 2]  # [N, 3]: b_k / z_k
        self.depth = np.full(self.size, np.inf)
        self.depth[covered] = 1.0 / inv_z.sum(1)

        # 2. the mask at render pixel centres, eroded
        r_idx = np.minimum(((np.arange(rows) + 0.5) / self.sy).astype(np.int64), h - 1)
        c_idx = np.minimum(((np.arange(cols) + 0.5) / self.sx).astype(np.int64), w - 1)
        mask_r = mask[r_idx[:, None], c_idx[None, :]]
        if erode_px > 0:
            eroded = ndimage.binary_erosion(mask_r, iterations=erode_px)
            mask_r = eroded if eroded.any() else mask_r
        self.seen = covered & mask_r  # [rows, cols]: pixels showing the object's surface

        # 3. the seen pixels' surface points (local frame) and photo colours
        sel = self.seen[covered]
        persp = inv_z[sel] / inv_z[sel].sum(1, keepdims=True)  # perspective-correct barycentrics
        points = frames.transform_points(
            np.linalg.inv(self.pose), np.einsum("nk,nkc->nc", persp, v_cam[f[fid[sel]]])
        )  # [S, 3], in the order of argwhere (row-major, as boolean indexing)
        pix = np.argwhere(self.seen)  # [S, 2] (row, col)
        colors = self._photo_colors((pix[:, 1] + 0.5) / self.sx, (pix[:, 0] + 0.5) / self.sy)  # [S, 3]

        # 4. the fill: a colour grid over the mesh's box where each cell takes the mean colour of the seen points
        # in the nearest cell that has any. The exact Euclidean nearest cell of every cell comes from one distance
        # transform (scipy.ndimage.distance_transform_edt), in time linear in the cells; a KD-tree query per hidden
        # point was 5-10x slower here (the back's points are far from every seen point, so each query visits
        # most of the tree: 1.2-2.3 s for a 20k-face mesh's 1024^2 texture against 0.2 s).
        self.fallback = ((image[mask] if mask.any() else image.reshape(-1, 3)).mean(0) / 255.0).astype(np.float32)
        self.cell = float(fill_cell)
        self.origin = vertices.min(0) - self.cell  # [3]: the grid's corner
        dims = tuple(int(d) for d in np.ceil((vertices.max(0) + self.cell - self.origin) / self.cell) + 1)
        self.fill = None
        if len(points):
            idx = np.clip(((points - self.origin) / self.cell).astype(np.int64), 0, np.array(dims) - 1)
            flat = np.ravel_multi_index(tuple(idx.T), dims)
            count = np.bincount(flat, minlength=math.prod(dims))
            mean = np.stack([np.bincount(flat, colors[:, c], math.prod(dims)) for c in range(3)], 1)
            mean = (mean / np.maximum(count, 1)[:, None]).astype(np.float32)  # [cells, 3]
            nearest = ndimage.distance_transform_edt(
                (count == 0).reshape(dims), return_distances=False, return_indices=True
            )  # [3, *dims]
            self.fill = mean[np.ravel_multi_index(tuple(nearest), dims)]  # [*dims, 3]
        self.stats: dict[str, Any] = {"render": list(self.size), "seen_pixels": int(self.seen.sum())}

    def _photo_colors(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Bilinear photo colours [N, 3] float32 in [0, 1] at photo pixel coordinates x, y [N] (centres at j + 0.5)."""
        h, w = self.image.shape[:2]
        return sample_texture(self.image, np.stack([x / w, y / h], 1), convention="gltf")

    def visible(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """points [N, 3] local -> (seen [N] bool, their photo pixel coordinates [N, 2]): in front of the camera,
        on a pixel of the eroded mask, and not behind the mesh's own surface there (depth within tolerance)."""
        p_cam = frames.transform_points(self.pose, points)
        px = frames.project_points(p_cam, self.K)  # render pixels
        z = p_cam[:, 2]
        rows, cols = self.size
        with np.errstate(invalid="ignore"):
            ok = (z > _NEAR) & np.isfinite(px).all(1)
            ok &= (px[:, 0] >= 0) & (px[:, 0] < cols) & (px[:, 1] >= 0) & (px[:, 1] < rows)
        r = np.where(ok, px[:, 1], 0).astype(np.int64)
        c = np.where(ok, px[:, 0], 0).astype(np.int64)
        ok &= self.seen[r, c] & (z <= self.depth[r, c] + self.tolerance)
        return ok, px / [self.sx, self.sy]

    def colors(self, points: np.ndarray) -> np.ndarray:
        ndimage = optional_import("scipy.ndimage")
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        out = np.empty((len(points), 3), np.float32)
        seen, px = self.visible(points)
        out[seen] = self._photo_colors(px[seen, 0], px[seen, 1])
        hidden = ~seen
        if hidden.any() and self.fill is None:
            out[hidden] = self.fallback  # nothing of the object is seen: its mean colour in the photo
        elif hidden.any():
            at = ((points[hidden] - self.origin) / self.cell - 0.5).T  # [3, N] grid coordinates (cell centres)
            for c in range(3):  # trilinear between cell centres: no blocks on the back
                out[hidden, c] = ndimage.map_coordinates(self.fill[..., c], at, order=1, mode="nearest")
        self.stats.update(points=len(points), visible_fraction=round(float(seen.mean()) if len(seen) else 0.0, 4))
        return out


def project_texture(
    vertices: np.ndarray,
    faces: np.ndarray,
    uvs: np.ndarray,
    image: np.ndarray,
    mask: np.ndarray,
    pose: np.ndarray,
    K: np.ndarray,
    *,
    texture_size: int = 1024,
    name: str = "object",
    **options: Any,
) -> tuple[TexturedMesh, dict[str, Any]]:
    """An unwrapped mesh (local frame; uvs [V, 2] glTF convention, as `uv.unwrap_uv` returns) textured by
    projecting the photo: -> (TexturedMesh, stats of the projection). options: `PhotoProjection`'s."""
    source = PhotoProjection(vertices, faces, image, mask, pose, K, **options)
    texture = bake_texture(vertices, faces, uvs, source, size=texture_size)
    mesh = TexturedMesh(
        vertices=np.asarray(vertices, np.float32),
        faces=np.asarray(faces, np.int64),
        uvs=np.asarray(uvs, np.float32),
        texture=texture,
        name=name,
        metadata={"frame": "model local, stored y-up (x, z, -y)", "texture": "projected from the photo (stage 1)"},
    )
    return mesh, dict(source.stats)
