"""A Blender camera that sees what the photo's camera saw. Stdlib only.

Frames. Pixels: x right, y down, origin at the top-left corner of the top-left pixel; K is the OpenCV-style
3x3 matrix in those pixels (pixel centres at +0.5, as sam3d_core.inputs.camera uses). The worker's objects come
in glTF's camera space (camera at the origin looking down -z, y up); Blender's glTF importer turns y-up
into z-up, (x, y, z) -> (x, -z, y), so in Blender the photo's camera sits at the origin looking along +Y
with +Z up. A Blender camera looks down its local -Z with local +Y up: a 90 degree turn about X.

The dict returned by `blender_camera_from_K` has the same keys as the worker's `blender_camera`
(docs/protocol.md, `open_photo`), so both are applied by the same code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

DEFAULT_FOV_DEG = 60.0  # the worker's fallback horizontal field of view (sam3d_core.inputs.camera.DEFAULT_FOV_DEG)
SENSOR_WIDTH_MM = 36.0  # full-frame width; any value works, the lens follows from it

# Camera at the origin looking along +Y, +Z up: a rotation of +90 degrees about X (4x4, rows).
CAMERA_MATRIX_WORLD = (
    (1.0, 0.0, 0.0, 0.0),
    (0.0, 0.0, -1.0, 0.0),
    (0.0, 1.0, 0.0, 0.0),
    (0.0, 0.0, 0.0, 1.0),
)

CAMERA_KEYS = (
    "matrix_world",
    "lens_mm",
    "sensor_width_mm",
    "sensor_fit",
    "shift_x",
    "shift_y",
    "resolution_x",
    "resolution_y",
    "pixel_aspect_x",
    "pixel_aspect_y",
)


def intrinsics_from_fov(width: int, height: int, fov_x_deg: float = DEFAULT_FOV_DEG) -> list[list[float]]:
    """3x3 K (rows) for a horizontal field of view, principal point at the image centre."""
    if not 1.0 < fov_x_deg < 179.0:
        raise ValueError(f"fov_x_deg={fov_x_deg}: expected a field of view between 1 and 179 degrees")
    fx = 0.5 * width / math.tan(math.radians(fov_x_deg) / 2)
    return [[fx, 0.0, width / 2.0], [0.0, fx, height / 2.0], [0.0, 0.0, 1.0]]


def blender_camera_from_K(
    K: Sequence[Sequence[float]], width: int, height: int, sensor_width_mm: float = SENSOR_WIDTH_MM
) -> dict:
    """Blender camera settings that reproduce the pinhole camera K for a width x height photo.

    Horizontal sensor fit: the sensor width spans the image width, so lens = fx * sensor / width, and
    shifts are in units of the image width (Blender's rule for a horizontal fit). Non-square pixels
    (fx != fy) become a pixel aspect ratio, the smaller side set to 1. Same values as the worker's
    `sam3d_core.geometry.frames.blender_camera`, which the add-on cannot import (no numpy/torch in Blender).
    """
    if width < 1 or height < 1:
        raise ValueError(f"photo size {width}x{height}: expected a positive width and height")
    (fx, _, cx), (_, fy, cy) = K[0], K[1]
    if fx <= 0 or fy <= 0:
        raise ValueError(f"focal lengths fx={fx}, fy={fy} in K must be positive pixels; check the intrinsics")
    aspect = fy / fx  # a pixel's width / height: fx = f / pixel width, fy = f / pixel height
    return {
        "matrix_world": [list(r) for r in CAMERA_MATRIX_WORLD],
        "lens_mm": fx * sensor_width_mm / width,
        "sensor_width_mm": sensor_width_mm,
        "sensor_fit": "HORIZONTAL",
        "shift_x": (width / 2.0 - cx) / width,  # principal point left of centre -> the frame shifts right
        # principal point below centre (y down) -> the frame shifts up; Blender scales y by the pixel aspect
        "shift_y": (cy - height / 2.0) * (fx / fy) / width,
        "resolution_x": int(width),
        "resolution_y": int(height),
        "pixel_aspect_x": max(aspect, 1.0),
        "pixel_aspect_y": max(1.0 / aspect, 1.0),
    }


def default_camera(width: int, height: int) -> dict:
    """The camera the worker assumes without EXIF or user intrinsics (60 degree horizontal field of view)."""
    return blender_camera_from_K(intrinsics_from_fov(width, height), width, height)


def check_camera(cam: dict) -> dict:
    """Check a blender_camera dict (from the worker or a scene.json); raises ValueError naming what is wrong."""
    missing = [k for k in CAMERA_KEYS if k not in cam]
    if missing:
        raise ValueError(
            f"camera settings lack {missing}; expected the keys {list(CAMERA_KEYS)} "
            "(docs/protocol.md, open_photo). Update the worker and the add-on to the same release"
        )
    m = cam["matrix_world"]
    if len(m) != 4 or any(len(r) != 4 for r in m):
        raise ValueError(f"camera matrix_world must be 4x4 rows, got {m!r}")
    if cam["lens_mm"] <= 0 or cam["sensor_width_mm"] <= 0:
        raise ValueError(f"camera lens {cam['lens_mm']} mm / sensor {cam['sensor_width_mm']} mm must be positive")
    if cam["resolution_x"] < 1 or cam["resolution_y"] < 1:
        raise ValueError(f"camera resolution {cam['resolution_x']}x{cam['resolution_y']} must be positive")
    return cam


def region_to_photo(mx: float, my: float, frame: Sequence[float], width: int, height: int) -> tuple[float, float]:
    """A mouse position in region pixels (y up) -> photo pixels (y down), given where the photo is drawn:
    frame = (left, bottom, right, top) in region pixels."""
    left, bottom, right, top = frame
    if right <= left or top <= bottom:
        raise ValueError(f"photo frame {tuple(frame)} is empty; is the photo visible in the view?")
    return (mx - left) / (right - left) * width, (top - my) / (top - bottom) * height


def photo_to_region(x: float, y: float, frame: Sequence[float], width: int, height: int) -> tuple[float, float]:
    """Photo pixels (y down) -> region pixels (y up); the inverse of `region_to_photo`."""
    left, bottom, right, top = frame
    return left + x / width * (right - left), top - y / height * (top - bottom)
