"""Camera intrinsics and point maps, in the frames the model uses.

The model's camera frame is PyTorch3D's: x left, y up, z forward (into the scene). OpenCV's is x right,
y down, z forward, so p3d = (-x, -y, z) of OpenCV. glTF/OpenGL cameras look down -z with x right, y up,
so glTF = (-x, y, -z) of PyTorch3D.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np

from sam3d_core.geometry import frames

if TYPE_CHECKING:
    from sam3d_core.inputs.imageio import Photo

log = logging.getLogger(__name__)

DEFAULT_FOV_DEG = 60.0  # horizontal field of view assumed when a photo carries no focal length
FULL_FRAME_DIAGONAL_MM = 43.27  # 36 x 24 mm film: the 35 mm equivalent focal length is defined on its diagonal
EXIF_FOV_RANGE_DEG = (10.0, 150.0)  # EXIF intrinsics giving a field of view outside this are ignored


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
    flip = np.diag(frames.P3D_TO_OPENCV)  # OpenCV -> PyTorch3D is a diagonal flip: a sign per axis, exact
    assert np.array_equal(frames.P3D_TO_OPENCV, np.diag(flip))
    u = (np.arange(w) + 0.5 - K[0, 2]) / K[0, 0]  # [W] float64, as the full meshgrid computed it
    pts = np.empty((h, w, 3), np.float32)
    for r0 in range(0, h, 512):  # row blocks: float64 temporaries of 512 rows, not of the whole photo (67 MP)
        d = np.asarray(depth[r0 : r0 + 512], dtype=np.float64)
        v = (np.arange(r0, r0 + len(d)) + 0.5 - K[1, 2]) / K[1, 1]
        block = np.stack([u[None, :] * d, v[:, None] * d, d], axis=-1) * flip
        block[~np.isfinite(d) | (d <= 0)] = np.inf
        pts[r0 : r0 + len(d)] = block
    return pts


def fallback_pointmap(height: int, width: int, fov_x_deg: float = DEFAULT_FOV_DEG) -> tuple[np.ndarray, np.ndarray]:
    """No depth available: a fronto-parallel plane at unit distance seen with a default field of view.

    Layout is then in relative units (the object's distance is ~1). Returns (point map, K).
    """
    K = intrinsics_from_fov(width, height, fov_x_deg)
    return pointmap_from_depth(np.ones((height, width), np.float32), K), K


def fov_deg(K: np.ndarray, width: int, height: int) -> tuple[float, float]:
    """(horizontal, vertical) field of view in degrees of pixel intrinsics K for a width x height image."""
    return (math.degrees(2 * math.atan(0.5 * width / K[0, 0])), math.degrees(2 * math.atan(0.5 * height / K[1, 1])))


def _K(fx: float, fy: float, width: int, height: int) -> np.ndarray:
    return np.array([[fx, 0.0, width / 2.0], [0.0, fy, height / 2.0], [0.0, 0.0, 1.0]])


def intrinsics_from_exif(photo: Photo) -> tuple[np.ndarray | None, str]:
    """(K, how it was found) from a photo's EXIF, or (None, why not). K in pixels of `photo.rgb`, centred.

    FocalLengthIn35mmFilm first: f_px = f35 / 43.27 mm * image diagonal in pixels (the equivalent is defined
    on the diagonal, so cropping to another aspect ratio keeps it right). Else FocalLength (mm) times the
    focal-plane resolution (sensor pixels per mm; it refers to the camera's own pixel grid, so a photo resized
    after capture gets a wrong K, which the field-of-view check catches only when far off). A result whose
    horizontal or vertical field of view lies outside EXIF_FOV_RANGE_DEG is ignored.
    """
    w, h = photo.width, photo.height
    f35, f_mm, per_mm = photo.focal_length_35mm, photo.focal_length_mm, photo.focal_plane_px_per_mm
    if f35:
        fx = fy = f35 / FULL_FRAME_DIAGONAL_MM * math.hypot(w, h)
        how = f"EXIF 35 mm equivalent focal length {f35:g} mm"
    elif f_mm and per_mm:
        fx, fy = f_mm * per_mm[0] * photo.scale, f_mm * per_mm[1] * photo.scale
        how = f"EXIF focal length {f_mm:g} mm with {per_mm[0]:g} x {per_mm[1]:g} sensor pixels per mm"
    elif f_mm:
        return None, (
            f"EXIF focal length {f_mm:g} mm but no sensor size (neither a 35 mm equivalent nor a "
            "focal-plane resolution), so it cannot be converted to pixels"
        )
    else:
        return None, "no focal length in the photo's EXIF"
    K = _K(fx, fy, w, h)
    fov_x, fov_y = fov_deg(K, w, h)
    lo, hi = EXIF_FOV_RANGE_DEG
    if not (lo <= fov_x <= hi and lo <= fov_y <= hi):
        return None, (
            f"{how} gives a {fov_x:.1f} x {fov_y:.1f} degree field of view, outside {lo:g}..{hi:g} "
            "degrees; the EXIF data is probably wrong for this image and is ignored"
        )
    return K, f"{how}: {fov_x:.1f} degree horizontal field of view"


def _check_user_K(K: np.ndarray, width: int, height: int) -> np.ndarray:
    from sam3d_core.inputs.imageio import InputError

    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3) or not np.isfinite(K).all():
        raise InputError(
            f"K has shape {list(K.shape)}{'' if np.isfinite(K).all() else ' and non-finite values'}; "
            "expected a finite 3x3 matrix [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] in pixels",
            "K",
            {"shape": list(K.shape)},
        )
    if K[0, 0] <= 0 or K[1, 1] <= 0 or not np.allclose(K[2], [0.0, 0.0, 1.0]):
        raise InputError(
            f"K = {K.tolist()} is not a pinhole intrinsics matrix; expected fx, fy > 0 and a last row "
            "[0, 0, 1] (OpenCV convention, pixels)",
            "K",
            {"K": K.tolist()},
        )
    if not (0 <= K[0, 2] <= width and 0 <= K[1, 2] <= height):
        raise InputError(
            f"K's principal point ({K[0, 2]:g}, {K[1, 2]:g}) lies outside the {width}x{height} photo; "
            "K must be in pixels of this photo as displayed (is it for another resolution?)",
            "K",
            {"K": K.tolist(), "photo_size": [width, height]},
        )
    return K


def resolve_intrinsics(
    photo: Photo | tuple[int, int],
    K: np.ndarray | None = None,
    fov: float | None = None,
    notes: list[str] | None = None,
) -> tuple[np.ndarray, str]:
    """The intrinsics to use and their source: "user" (K, else fov: horizontal degrees), "exif", "default_fov".

    photo: a Photo (EXIF used) or (width, height). A user K is in pixels of the photo as displayed at its
    source size (source_width x source_height) and is scaled with the photo when it was downscaled.
    How EXIF was used or why not goes to `notes` when given, else to the log.
    """
    from sam3d_core.inputs.imageio import InputError, Photo

    is_photo = isinstance(photo, Photo)
    w, h = (photo.width, photo.height) if is_photo else (int(photo[0]), int(photo[1]))
    if K is not None and fov is not None:
        raise InputError("both K and fov were given; pass only one of them", "K")
    if K is not None:
        sw, sh = (photo.source_width, photo.source_height) if is_photo else (w, h)
        K = _check_user_K(K, sw, sh)
        s = w / sw
        return np.diag([s, s, 1.0]) @ K, "user"
    if fov is not None:
        try:
            return intrinsics_from_fov(w, h, float(fov)), "user"
        except ValueError as e:
            raise InputError(str(e), "fov", {"fov": fov}) from None
    K_exif, how = intrinsics_from_exif(photo) if is_photo else (None, "no EXIF (only the image size was given)")
    if notes is not None:
        notes.append(f"intrinsics: {how}")
    else:
        log.info("intrinsics: %s", how)
    if K_exif is not None:
        return K_exif, "exif"
    return intrinsics_from_fov(w, h, DEFAULT_FOV_DEG), "default_fov"
