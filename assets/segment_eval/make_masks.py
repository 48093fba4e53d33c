"""Rebuild the segmentation evaluation set from scikit-image's bundled sample data (numpy + Pillow only).

    pip download --no-deps scikit-image==0.26.0 -d /tmp/skw
    unzip -o /tmp/skw/scikit_image-0.26.0-*.whl 'skimage/data/*' -d /tmp/skx
    python assets/segment_eval/make_masks.py /tmp/skx/skimage/data

Writes <name>.jpg (the photo, quality 92) and <name>_mask.png (reference mask, 255 = object) here.
Nobody drew any of the masks: see README.md beside this file for the derivations.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
SS = 4  # supersampling factor of the renders: the paste alpha is the covered fraction of 4x4 subpixels


# ---------------------------------------------------------------------------------------------
# (a) Middlebury motorcycle: the object in front of the background and above the floor plane


def _geodesic_component(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 8-connected component of `mask` holding `seed`, by repeated 3x3 dilation inside the mask."""
    comp = np.zeros_like(mask)
    comp[seed] = True
    while True:
        p = np.pad(comp, 1)
        grown = np.zeros_like(comp)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                grown |= p[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
        grown &= mask
        if grown.sum() == comp.sum():
            return grown
        comp = grown


def motorcycle_mask(disp: np.ndarray) -> np.ndarray:
    """disp: [H, W] float32 ground-truth disparity (inf = unknown) -> [H, W] bool motorcycle mask.

    1. Fit the floor plane d = a*x + b*y + c by least squares on known pixels of two floor regions
       (rows >= 470, where nothing but floor is seen; and the strip x < 100, y >= 330 left of the
       rear wheel), refitting twice on the pixels within 1 px of the fit (drops stray outliers).
    2. Candidate pixels: known disparity, d > 30 px (everything behind the bike, the wall, shelves
       and bench, lies at d < 27) and d > floor plane + 2 px (the bike stands above the floor).
    3. Keep the 8-connected component containing a pixel on the fuel tank (x=420, y=190 at
       741x500). Unknown (occluded) pixels stay background: they are background seen past edges.
    """
    h, w = disp.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    known = np.isfinite(disp)
    floor = known & ((yy >= 470) | ((xx < 100) & (yy >= 330)))
    A = np.stack([xx[floor], yy[floor], np.ones(floor.sum())], 1)
    d = disp[floor].astype(np.float64)
    keep = np.ones(len(d), bool)
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(A[keep], d[keep], rcond=None)
        keep = np.abs(A @ coef - d) < 1.0
    plane = coef[0] * xx + coef[1] * yy + coef[2]
    cand = known & (disp > 30) & (disp > plane + 2.0)
    return _geodesic_component(cand, (190, 420))


# ---------------------------------------------------------------------------------------------
# (b) composites: a shaded object rendered with numpy, pasted into a real photo by its alpha


def render_surface(points: np.ndarray, normals: np.ndarray, albedo: np.ndarray, size: int) -> np.ndarray:
    """Splat a dense surface sample into a size x size RGBA image (orthographic, z-buffered, Lambert).

    points, normals: [N, 3] in [-1, 1]^3, camera looking down -z; albedo: [N, 3] in [0, 1].
    Returns [size, size, 4] uint8; alpha = subpixel coverage after SS x SS supersampling.
    """
    big = size * SS
    px = np.clip(((points[:, 0] + 1) / 2 * (big - 1)).round().astype(int), 0, big - 1)
    py = np.clip(((1 - points[:, 1]) / 2 * (big - 1)).round().astype(int), 0, big - 1)
    order = np.argsort(points[:, 2])  # far first; later (nearer) writes win
    light = np.array([-0.4, 0.6, 0.7]) / np.linalg.norm([-0.4, 0.6, 0.7])
    shade = 0.25 + 0.75 * np.clip(normals @ light, 0, 1)
    rgb = np.zeros((big, big, 3))
    cov = np.zeros((big, big))
    rgb[py[order], px[order]] = albedo[order] * shade[order, None]
    cov[py[order], px[order]] = 1.0
    rgba = np.concatenate([rgb * cov[..., None], cov[..., None]], -1)
    rgba = rgba.reshape(size, SS, size, SS, 4).mean((1, 3))
    col = rgba[..., :3] / np.maximum(rgba[..., 3:], 1e-6)  # un-premultiply
    return (np.concatenate([col, rgba[..., 3:]], -1) * 255).round().clip(0, 255).astype(np.uint8)


def _rotate(p: np.ndarray, rx: float, ry: float) -> np.ndarray:
    cx, sx, cy, sy = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry)
    r = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return p @ r.T


def vase(n: int = 1400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A surface of revolution (radius r(t) along y) with painted bands, tilted towards the camera."""
    t, u = np.meshgrid(np.linspace(-1, 1, n), np.linspace(0, 2 * np.pi, n), indexing="ij")
    r = 0.35 + 0.22 * np.sin(2.6 * t + 0.9) + 0.08 * np.cos(6 * t)
    dr = 0.22 * 2.6 * np.cos(2.6 * t + 0.9) - 0.48 * np.sin(6 * t)
    p = np.stack([r * np.cos(u), 0.9 * t, r * np.sin(u)], -1)
    nrm = np.stack([np.cos(u), -dr / 0.9, np.sin(u)], -1)
    band = (np.floor((t + 1) * 6) % 2)[..., None]
    alb = band * np.array([0.75, 0.45, 0.2]) + (1 - band) * np.array([0.85, 0.8, 0.7])
    p, nrm = _rotate(p.reshape(-1, 3), 0.35, 0.0), _rotate(nrm.reshape(-1, 3), 0.35, 0.0)
    return p, nrm / np.linalg.norm(nrm, axis=1, keepdims=True), alb.reshape(-1, 3)


def torus(n: int = 1400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A torus (a ring with a see-through hole) with a checker texture, tilted 55 degrees."""
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, n), np.linspace(0, 2 * np.pi, n // 2), indexing="ij")
    R, r = 0.62, 0.3
    p = np.stack([(R + r * np.cos(v)) * np.cos(u), r * np.sin(v), (R + r * np.cos(v)) * np.sin(u)], -1)
    nrm = np.stack([np.cos(v) * np.cos(u), np.sin(v), np.cos(v) * np.sin(u)], -1)
    check = ((np.floor(u / (np.pi / 8)) + np.floor(v / (np.pi / 4))) % 2)[..., None]
    alb = check * np.array([0.2, 0.45, 0.8]) + (1 - check) * np.array([0.9, 0.9, 0.85])
    rot = (np.deg2rad(55), np.deg2rad(20))
    return _rotate(p.reshape(-1, 3), *rot), _rotate(nrm.reshape(-1, 3), *rot), alb.reshape(-1, 3)


def mug(n: int = 1400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An open enamel mug: outer and inner wall, bottom, and a half-torus handle with a see-through hole.

    Cream glaze with a dark-blue rim band; tilted 25 degrees so the opening shows as an ellipse.
    """
    R, top, bot = 0.42, 0.55, -0.55
    t, u = np.meshgrid(np.linspace(bot, top, n), np.linspace(0, 2 * np.pi, n), indexing="ij")
    ring = np.stack([np.cos(u), np.zeros_like(u), np.sin(u)], -1)
    outer = ring * R + np.stack([0 * t, t, 0 * t], -1)
    inner = ring * (R - 0.03) + np.stack([0 * t, np.clip(t, bot + 0.05, top), 0 * t], -1)
    rr, u2 = np.meshgrid(np.linspace(0, R, n // 2), np.linspace(0, 2 * np.pi, n), indexing="ij")
    bottom = np.stack([rr * np.cos(u2), np.full_like(rr, bot + 0.05), rr * np.sin(u2)], -1)
    a, b = np.meshgrid(np.linspace(-np.pi / 2, np.pi / 2, n // 2), np.linspace(0, 2 * np.pi, n // 4), indexing="ij")
    hR, hr = 0.27, 0.065  # handle: half a torus in the x-y plane, attached at the wall (x = R)
    hc = np.stack([R - 0.02 + hR * np.cos(a), hR * np.sin(a), 0 * a], -1)
    hn = np.stack([np.cos(b) * np.cos(a), np.cos(b) * np.sin(a), np.sin(b)], -1)
    handle = hc + hr * hn
    cream, blue = np.array([0.92, 0.88, 0.78]), np.array([0.12, 0.2, 0.45])
    band = (t > top - 0.12)[..., None]
    parts = [(outer, ring, np.where(band, blue, cream)), (inner, -ring, np.broadcast_to(cream * 0.9, inner.shape)),
             (bottom, np.broadcast_to([0.0, 1.0, 0.0], bottom.shape), np.broadcast_to(cream * 0.85, bottom.shape)),
             (handle, hn, np.broadcast_to(cream, handle.shape))]
    p = np.concatenate([q.reshape(-1, 3) for q, _, _ in parts])
    nrm = np.concatenate([q.reshape(-1, 3) for _, q, _ in parts])
    alb = np.concatenate([q.reshape(-1, 3) for _, _, q in parts])
    rot = (np.deg2rad(25), np.deg2rad(-30))
    return _rotate(p, *rot) * 1.05, _rotate(nrm, *rot), alb


def knot(n: int = 8000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A trefoil-knot tube (thin crossing parts, three see-through holes) with teal and white stripes."""
    s, v = np.meshgrid(np.linspace(0, 2 * np.pi, n), np.linspace(0, 2 * np.pi, 240), indexing="ij")
    c = np.stack([np.sin(s) + 2 * np.sin(2 * s), np.cos(s) - 2 * np.cos(2 * s), -np.sin(3 * s)], -1) / 3.3
    tan = np.gradient(c, axis=0)
    tan /= np.linalg.norm(tan, axis=-1, keepdims=True)
    n1 = np.cross(tan, [0.0, 0.0, 1.0])
    n1 /= np.linalg.norm(n1, axis=-1, keepdims=True)
    n2 = np.cross(tan, n1)
    nrm = np.cos(v)[..., None] * n1 + np.sin(v)[..., None] * n2
    p = c + 0.09 * nrm
    stripe = (np.floor(s / (np.pi / 12)) % 2)[..., None]
    alb = stripe * np.array([0.1, 0.55, 0.55]) + (1 - stripe) * np.array([0.9, 0.9, 0.88])
    rot = (np.deg2rad(30), np.deg2rad(15))
    return _rotate(p.reshape(-1, 3), *rot), _rotate(nrm.reshape(-1, 3), *rot), alb.reshape(-1, 3)


def horse_sprite(data: Path, size: int) -> np.ndarray:
    """scikit-image's horse silhouette (CC0) filled with a wood-grain crop of coffee.png, shaded."""
    sil = np.asarray(Image.open(data / "horse.png").convert("L")) < 128  # [328, 400] True = horse
    hgt = size * sil.shape[0] // sil.shape[1]
    sil_img = Image.fromarray(sil.astype(np.uint8) * 255).resize((size * SS, hgt * SS), Image.NEAREST)
    alpha = np.asarray(sil_img, np.float64).reshape(hgt, SS, size, SS).mean((1, 3)) / 255
    wood = Image.open(data / "coffee.png").convert("RGB").crop((0, 300, 200, 400))
    col = np.asarray(wood.resize((size, alpha.shape[0])), np.float64) / 255
    grad = np.linspace(1.15, 0.7, size)[None, :, None]
    rgba = np.concatenate([np.clip(col * grad, 0, 1), alpha[..., None]], -1)
    return (rgba * 255).round().astype(np.uint8)


def paste(photo: np.ndarray, sprite: np.ndarray, x0: int, y0: int) -> tuple[np.ndarray, np.ndarray]:
    """Alpha-composite sprite [h, w, 4] at (x0, y0). Returns (photo, mask = alpha >= 0.5)."""
    h, w = sprite.shape[:2]
    a = sprite[..., 3:].astype(np.float64) / 255
    out = photo.astype(np.float64).copy()
    out[y0:y0 + h, x0:x0 + w] = a * sprite[..., :3] + (1 - a) * out[y0:y0 + h, x0:x0 + w]
    mask = np.zeros(photo.shape[:2], bool)
    mask[y0:y0 + h, x0:x0 + w] = a[..., 0] >= 0.5
    return out.round().astype(np.uint8), mask


def _save(name: str, photo: np.ndarray, mask: np.ndarray, long_side: int = 640) -> None:
    im, m = Image.fromarray(photo), Image.fromarray(mask.astype(np.uint8) * 255)
    s = long_side / max(im.size)
    if s < 1:
        size = (round(im.width * s), round(im.height * s))
        im, m = im.resize(size, Image.LANCZOS), m.resize(size, Image.BILINEAR).point(lambda v: 255 * (v >= 128))
    im.save(HERE / f"{name}.jpg", quality=92)
    m.convert("1").save(HERE / f"{name}_mask.png")
    print(f"{name}: {im.size[0]}x{im.size[1]}, object {np.asarray(m).astype(bool).mean():.1%} of the image")


def main(data: Path) -> None:
    rgb = lambda f: np.asarray(Image.open(data / f).convert("RGB"))  # noqa: E731
    disp = np.load(data / "motorcycle_disp.npz")["arr_0"]
    _save("motorcycle", rgb("motorcycle_left.png"), motorcycle_mask(disp))
    _save("chelsea_vase", *paste(rgb("chelsea.png"), render_surface(*vase(), size=150), 270, 110))
    _save("rocket_torus", *paste(rgb("rocket.jpg"), render_surface(*torus(), size=200), 40, 170))
    _save("astronaut_horse", *paste(rgb("astronaut.png"), horse_sprite(data, 220), 270, 300))
    _save("coffee_mug", *paste(rgb("coffee.png"), render_surface(*mug(), size=170), 415, 150))
    _save("garage_knot", *paste(rgb("motorcycle_right.png"), render_surface(*knot(), size=190), 520, 15))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
