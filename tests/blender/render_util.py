"""Helpers for Blender tests: a Cycles silhouette through the scene camera, and masks as arrays."""

from __future__ import annotations

import bpy
import numpy as np


def load_mask(path, size=None) -> np.ndarray:
    """A mask image -> [H, W] bool (white = object), optionally resized (nearest) to size=(w, h)."""
    img = bpy.data.images.load(str(path), check_existing=False)
    try:
        if size is not None:
            img.scale(*size)
        w, h = img.size
        px = np.empty(w * h * 4, np.float32)
        img.pixels.foreach_get(px)
    finally:
        bpy.data.images.remove(img)
    return np.flipud(px.reshape(h, w, 4)[..., 0] > 0.5)  # Blender's rows go bottom-up


def render_silhouette(scene, path, percentage: int = 25) -> np.ndarray:
    """Render the scene's camera with Cycles (1 sample, transparent film) -> [H, W] bool alpha > 0.5,
    rows top-down like the photo."""
    r = scene.render
    saved = (r.engine, r.film_transparent, r.resolution_percentage, r.filepath, scene.use_nodes)
    r.engine, r.film_transparent, r.resolution_percentage = "CYCLES", True, percentage
    scene.cycles.samples, scene.cycles.use_denoising, scene.cycles.device = 1, False, "CPU"
    scene.use_nodes = False
    r.image_settings.file_format, r.image_settings.color_mode = "PNG", "RGBA"
    r.filepath = str(path)
    try:
        bpy.ops.render.render(write_still=True)
    finally:
        r.engine, r.film_transparent, r.resolution_percentage, r.filepath, scene.use_nodes = saved
    img = bpy.data.images.load(str(path), check_existing=False)
    w, h = img.size
    px = np.empty(w * h * 4, np.float32)
    img.pixels.foreach_get(px)
    bpy.data.images.remove(img)
    return np.flipud(px.reshape(h, w, 4)[..., 3] > 0.5)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0
