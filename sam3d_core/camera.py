"""Camera intrinsics and point maps, in the frames the model uses.

The model's camera frame is PyTorch3D's: x left, y up, z forward (into the scene). OpenCV's is x right,
y down, z forward, so p3d = (-x, -y, z) of OpenCV. glTF/OpenGL cameras look down -z with x right, y up,
so glTF = (-x, y, -z) of PyTorch3D.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_FOV_DEG = 60.0  # horizontal field of view assumed when a photo carries no focal length

P3D_TO_GLTF = np.diag([-1.0, 1.0, -1.0])  # row or column convention alike: it is its own inverse
P3D_TO_OPENCV = np.diag([-1.0, -1.0, 1.0])


def intrinsics_from_fov(width: int, height: int, fov_x_deg: float = DEFAULT_FOV_DEG) -> np.ndarray:
    """3x3 pixel intrinsics K (OpenCV convention) for a horizontal field of view."""
    if not 1.0 < fov_x_deg < 179.0:
        raise ValueError(f"fov_x_deg={fov_x_deg}: expected a field of view between 1 and 179 degrees")
    fx = 0.5 * width / math.tan(math.radians(fov_x_deg) / 2)
    return np.array([[fx, 0.0, width / 2.0], [0.0, fx, height / 2.0], [0.0, 0.0, 1.0]])


def pointmap_from_depth(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Back-project a depth map [H, W] (metres along +z; non-finite or <= 0 = unknown) to a point map
    [H, W, 3] in the PyTorch3D camera frame; unknown pixels become +inf, as the official depth model's."""
    if depth.ndim != 2:
        raise ValueError(f"depth has shape {depth.shape}; expected [H, W]")
    h, w = depth.shape
    v, u = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    x = (u - K[0, 2]) / K[0, 0] * depth
    y = (v - K[1, 2]) / K[1, 1] * depth
    pts = np.stack([x, y, depth], axis=-1) @ P3D_TO_OPENCV  # OpenCV -> PyTorch3D (a diagonal flip)
    bad = ~np.isfinite(depth) | (depth <= 0)
    pts[bad] = np.inf
    return pts.astype(np.float32)


def fallback_pointmap(height: int, width: int, fov_x_deg: float = DEFAULT_FOV_DEG) -> tuple[np.ndarray, np.ndarray]:
    """No depth available: a fronto-parallel plane at unit distance seen with a default field of view.

    Layout is then in relative units (the object's distance is ~1). Returns (point map, K).
    """
    K = intrinsics_from_fov(width, height, fov_x_deg)
    return pointmap_from_depth(np.ones((height, width), np.float32), K), K
