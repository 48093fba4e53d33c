"""A small software renderer for the app's 3D view (numpy): z-buffered triangles, textured or shaded, with
the photo as a backdrop plane, seen through a camera that starts at the photo's own camera.

Why by hand: the view must render the same offscreen (tests, CI without a GPU) as on screen, and Qt's
OpenGL widgets draw nothing on the offscreen platform. Objects are meshes of thousands of faces, so numpy
keeps an interactive frame rate at widget sizes.

Frames (geometry/frames.py): the scene world is the photo camera's glTF frame (camera at the origin looking
down -z, y up); `convert_points(..., "gltf", "opencv")` and K give pixels (x right, y down). The view camera is
that camera moved by `OrbitCamera.matrix()`; at home (the identity) an object's pixels are the photo's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sam3d_core.geometry import frames

BACKGROUND = np.array([38, 40, 44], np.uint8)
LIGHT = np.array([0.3, 0.5, 0.8]) / np.linalg.norm([0.3, 0.5, 0.8])  # in the view's OpenCV frame: from the camera


@dataclass
class Drawable:
    """Triangles in the scene world (the photo camera's glTF frame) with colours or a texture."""

    vertices: np.ndarray  # [V, 3]
    faces: np.ndarray  # [F, 3] int
    colors: np.ndarray | None = None  # [V, 3] in 0..1
    uvs: np.ndarray | None = None  # [V, 2] glTF UVs (v = 0 on the top row)
    texture: np.ndarray | None = None  # [Ht, Wt, 3] uint8
    lit: bool = True  # False for the photo backdrop


@dataclass
class OrbitCamera:
    """Orbit (yaw, pitch about `pivot`), pan (dx, dy) and dolly (dz) of the photo's camera; all 0 = the photo's."""

    pivot: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, -1.0]))
    yaw: float = 0.0  # radians
    pitch: float = 0.0
    pan: np.ndarray = field(default_factory=lambda: np.zeros(2))
    dolly: float = 0.0  # + moves the camera towards the pivot

    def home(self) -> None:
        self.yaw = self.pitch = self.dolly = 0.0
        self.pan = np.zeros(2)

    def is_home(self) -> bool:
        return self.yaw == 0 and self.pitch == 0 and self.dolly == 0 and not self.pan.any()

    def matrix(self) -> np.ndarray:
        """4x4 world -> view (both glTF camera frames: the view camera at the origin looking down -z)."""
        cy, sy, cp, sp = math.cos(self.yaw), math.sin(self.yaw), math.cos(self.pitch), math.sin(self.pitch)
        ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
        to_pivot = frames.homogeneous(np.eye(3), -self.pivot)
        back = frames.homogeneous(np.eye(3), self.pivot + np.array([self.pan[0], self.pan[1], self.dolly]))
        return back @ frames.homogeneous(rx @ ry) @ to_pivot


def fit_intrinsics(K, photo_w: int, photo_h: int, view_w: int, view_h: int) -> np.ndarray:
    """The photo's K scaled to fit (letterboxed) in a view of view_w x view_h pixels."""
    s = min(view_w / photo_w, view_h / photo_h)
    ox, oy = (view_w - photo_w * s) / 2, (view_h - photo_h * s) / 2
    k = np.asarray(K, np.float64).copy()
    k[0] *= s
    k[1] *= s
    k[0, 2] += ox
    k[1, 2] += oy
    return k


def backdrop(photo: np.ndarray, K, depth: float) -> Drawable:
    """The photo as a plane at `depth` that fills the photo camera's view exactly."""
    h, w = photo.shape[:2]
    k = np.asarray(K, np.float64)
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64)
    x = (corners[:, 0] - k[0, 2]) / k[0, 0] * depth
    y = (corners[:, 1] - k[1, 2]) / k[1, 1] * depth
    verts = frames.convert_points(np.stack([x, y, np.full(4, depth)], 1), "opencv", "gltf")
    uvs = corners / [w, h]
    return Drawable(verts, np.array([[0, 1, 2], [0, 2, 3]]), uvs=uvs, texture=photo[..., :3], lit=False)


def _fragments(uv: np.ndarray, faces: np.ndarray, width: int, height: int):
    """Pixels covered by each triangle: (face index [N], pixel row [N], column [N], barycentrics [N, 3])."""
    tri = uv[faces]  # [F, 3, 2]
    (ax, ay), (bx, by), (cx, cy) = tri[:, 0].T, tri[:, 1].T, tri[:, 2].T
    area = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
    j0 = np.clip(np.ceil(tri[..., 0].min(1) - 0.5), 0, width).astype(np.int64)
    j1 = np.clip(np.floor(tri[..., 0].max(1) - 0.5), -1, width - 1).astype(np.int64)
    i0 = np.clip(np.ceil(tri[..., 1].min(1) - 0.5), 0, height).astype(np.int64)
    i1 = np.clip(np.floor(tri[..., 1].max(1) - 0.5), -1, height - 1).astype(np.int64)
    live = np.nonzero((np.abs(area) > 1e-12) & (j1 >= j0) & (i1 >= i0))[0]
    side = np.maximum(j1 - j0, i1 - i0)[live] + 1
    bucket = np.ceil(np.log2(side)).astype(np.int64) if len(side) else side
    out_f, out_i, out_j, out_b = [], [], [], []
    for b in np.unique(bucket):
        n = 1 << int(b)
        sel = live[bucket == b]
        chunk = max(1, (1 << 21) // (n * n))
        for start in range(0, len(sel), chunk):
            s = sel[start : start + chunk]
            jj = j0[s, None, None] + np.arange(n)[None, None, :]  # [f, 1, n]
            ii = i0[s, None, None] + np.arange(n)[None, :, None]  # [f, n, 1]
            px, py = jj + 0.5, ii + 0.5
            t = tri[s]
            # barycentric weights of a, b, c at the pixel centre
            w_a = ((t[:, 1, 0, None, None] - px) * (t[:, 2, 1, None, None] - py)
                   - (t[:, 1, 1, None, None] - py) * (t[:, 2, 0, None, None] - px)) / area[s, None, None]  # fmt: skip
            w_b = ((t[:, 2, 0, None, None] - px) * (t[:, 0, 1, None, None] - py)
                   - (t[:, 2, 1, None, None] - py) * (t[:, 0, 0, None, None] - px)) / area[s, None, None]  # fmt: skip
            w_c = 1.0 - w_a - w_b
            inside = (w_a >= 0) & (w_b >= 0) & (w_c >= 0) & (jj <= j1[s, None, None]) & (ii <= i1[s, None, None])
            f, r, c = np.nonzero(inside)
            out_f.append(s[f])
            out_i.append(ii[f, r, 0])
            out_j.append(jj[f, 0, c])
            out_b.append(np.stack([w_a[f, r, c], w_b[f, r, c], w_c[f, r, c]], 1))
    if not out_f:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3))
    return np.concatenate(out_f), np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_b)


def _sample(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Nearest texel of glTF UVs [N, 2] (v = 0 on the top row) -> [N, 3] floats in 0..1."""
    h, w = texture.shape[:2]
    col = np.clip((uv[:, 0] % 1.0) * w, 0, w - 1).astype(np.int64)
    row = np.clip((uv[:, 1] % 1.0) * h, 0, h - 1).astype(np.int64)
    return texture[row, col, :3].astype(np.float64) / 255.0


def render(
    drawables: list[Drawable], K_view: np.ndarray, width: int, height: int, view: np.ndarray, textured: bool = True
) -> np.ndarray:
    """The scene seen by the view camera: RGB uint8 [height, width, 3].

    view: 4x4 world -> view camera (OrbitCamera.matrix()); K_view: intrinsics in view pixels. Faces with a
    vertex behind the near plane are skipped (no clipping). textured=False: clay shading for the meshes.
    """
    image = np.broadcast_to(BACKGROUND, (height, width, 3)).reshape(-1, 3).astype(np.float64) / 255.0
    zbuf = np.full(height * width, np.inf)
    color = image.copy()
    for d in drawables:
        p = frames.convert_points(frames.transform_points(view, d.vertices), "gltf", "opencv")  # [V, 3]
        z = p[:, 2]
        faces = np.asarray(d.faces, np.int64)
        faces = faces[(z[faces] > 1e-3).all(1)]
        if not len(faces):
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = np.stack([K_view[0, 0] * p[:, 0] / z + K_view[0, 2], K_view[1, 1] * p[:, 1] / z + K_view[1, 2]], 1)
        f, i, j, bary = _fragments(uv, faces, width, height)
        if not len(f):
            continue
        tri = faces[f]  # [N, 3]
        inv_z = 1.0 / z[tri]  # perspective-correct interpolation: attributes / z, then divide by the sum of 1 / z
        wz = bary * inv_z
        depth = 1.0 / wz.sum(1)
        wz *= depth[:, None]
        pix = i * width + j
        np.minimum.at(zbuf, pix, depth)
        front = depth <= zbuf[pix]
        if not front.any():
            continue
        tri, wz, pix, f = tri[front], wz[front], pix[front], f[front]
        if textured and d.texture is not None and d.uvs is not None:
            rgb = _sample(d.texture, np.einsum("nk,nkc->nc", wz, d.uvs[tri]))
        elif textured and d.colors is not None:
            rgb = np.einsum("nk,nkc->nc", wz, d.colors[tri])
        else:
            rgb = np.full((len(tri), 3), 0.78)
        if d.lit:
            a, b, c = p[faces[f][:, 0]], p[faces[f][:, 1]], p[faces[f][:, 2]]
            n = np.cross(b - a, c - a)
            n /= np.linalg.norm(n, axis=1, keepdims=True) + 1e-12
            rgb = rgb * (0.35 + 0.65 * np.abs(n @ LIGHT))[:, None]
        color[pix] = rgb  # among equal depths the last fragment wins
    return (np.clip(color, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(height, width, 3)
