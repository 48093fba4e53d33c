"""Lighting from HDR environment maps (equirectangular .exr / .hdr): the dominant light and the ambient level.

    env = read_environment("forest.exr")                 # [h, w, 3] float32 radiance, equirectangular
    light, info = light_from_environment(env, rng, R)    # a render.Light in the camera frame of pose R

Our renderer shades with one directional light plus ambient (Lambert), so an environment map is reduced to:
the direction of its brightest region (after a 32 x 64 area downsample, weighted by the solid angle of each
row) as the light, the share of the map's energy within 30 degrees of it as the diffuse / ambient balance, and
its mean colour as the tint. The map is turned by a random yaw about the up axis each time. Directions are in
the object's local frame (z up: row 0 of the map is straight up), turned into the camera frame by the pose.

Reading .exr needs the `OpenEXR` package (pip install openexr); .hdr (Radiance RGBE) is read by OpenCV.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sam3d_core.data.render import Light

SUFFIXES = (".exr", ".hdr")


def read_environment(path: str | Path) -> np.ndarray:
    """An equirectangular HDR file -> [h, w, 3] float32 linear RGB. Raises ValueError naming the problem."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".exr":
        try:
            import OpenEXR
        except ImportError:
            raise ImportError(f"{path.name}: reading .exr needs the OpenEXR package: pip install openexr") from None
        try:
            with OpenEXR.File(str(path)) as f:
                channels = f.channels()
                if "RGB" in channels:
                    rgb = np.asarray(channels["RGB"].pixels, np.float32)
                else:
                    rgb = np.stack([np.asarray(channels[c].pixels, np.float32) for c in "RGB"], -1)
        except Exception as e:  # OpenEXR raises its own types for damaged files
            raise ValueError(f"{path.name}: not a readable EXR ({type(e).__name__}: {e})") from None
    elif suffix == ".hdr":
        import cv2

        bgr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if bgr is None:
            raise ValueError(f"{path.name}: not a readable Radiance .hdr file")
        rgb = bgr[..., ::-1].astype(np.float32)
    else:
        raise ValueError(f"{path.name}: expected an .exr or .hdr environment map")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[1] < 2 * rgb.shape[0] - 2 or not np.isfinite(rgb).all():
        raise ValueError(f"{path.name}: expected a finite equirectangular RGB map (width = 2 x height)")
    return np.clip(rgb, 0.0, None)


def light_from_environment(env: np.ndarray, rng: np.random.Generator, rotation: np.ndarray) -> tuple[Light, dict]:
    """env [h, w, 3] (equirectangular, z up), a random yaw, the pose rotation [3, 3] (row-vector local ->
    camera) -> (Light in the camera frame, what was derived)."""
    import cv2

    small = cv2.resize(env, (64, 32), interpolation=cv2.INTER_AREA)  # [32, 64, 3]
    small = np.roll(small, int(rng.integers(0, 64)), axis=1)  # random yaw
    lum = small @ np.array([0.2126, 0.7152, 0.0722], np.float32)  # [32, 64]
    elev = (0.5 - (np.arange(32) + 0.5) / 32) * math.pi  # row 0 = up
    azim = ((np.arange(64) + 0.5) / 64) * 2 * math.pi - math.pi
    weight = np.cos(elev)[:, None]  # solid angle of each cell
    energy = lum * weight
    total = float(energy.sum())
    if not total > 0:
        return Light(np.array([0.0, 0.0, -1.0]), 0.6, 0.0), {"dark_environment": True}
    i, j = np.unravel_index(int(np.argmax(energy)), energy.shape)
    ce = np.cos(elev)
    dirs = np.stack(
        np.broadcast_arrays(ce[:, None] * np.cos(azim), ce[:, None] * np.sin(azim), np.sin(elev)[:, None]), -1
    )
    d = dirs[i, j]  # [3] local frame
    near = (dirs @ d) > math.cos(math.radians(30))
    share = float(energy[near].sum() / total)  # how directional the lighting is
    diffuse = 0.35 + 0.6 * share
    ambient = 1.05 - 0.75 * diffuse
    mean = (small * weight[..., None]).sum((0, 1)) / weight.sum() / small.shape[1]
    tint = np.clip(mean / max(float(mean.max()), 1e-6), 0.75, 1.0)
    light = Light(np.asarray(d @ rotation, np.float64), float(ambient), float(diffuse), tuple(float(c) for c in tint))
    return light, {"elevation_deg": round(math.degrees(elev[i]), 1), "directional_share": round(share, 3)}
