"""The render-paste recipe shared by the asset builder and the benchmark: random camera, object pose, flying
occluders, light, background crop, SAM-like mask noise (paper appendix B.2.1 Flying Occlusions, B.3).

    scene = sample_scene(rng, target_mesh, target_size, occluders=[(mesh, size), ...], width=518, height=518)
    view, info = render_scene(scene, background_photo)        # exact masks; info: occlusion, mode, ...
    noisy, how = mask_noise(view.mask, rng)                   # the input a segmenter would have given

Camera: a pinhole with a horizontal field of view in `fov_deg`, principal point at the image centre. Pose:
"upright" keeps the object's local z along the world's up and looks at it from an elevation in
`elevation_deg` and any azimuth (furniture stands); "random" draws a uniform rotation. The distance makes
the object's bounding sphere span `size_frac` of the image width; its centre lands within the middle
`centre_frac` of the image.

Occlusion (appendix B.2.1): with probability `p_occluded` one or two other objects fly between the camera
and the target, aimed at a random point of it; a placement is kept when the visible fraction
|M_vis| / |M_obj| lies in [0.1, 0.9] and |M_vis| >= 0.2 % of the image (a few tries, else no occluder). With
probability `p_occluder` the target is itself the occluder: another object stands behind it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from sam3d_core.data.render import Light, Placed, RenderMesh, View, render_view

MIN_VISIBLE_FRAC, MAX_VISIBLE_FRAC = 0.1, 0.9  # |M_vis| / |M_obj| for an occluded sample (appendix B.2.1)
MIN_VISIBLE_PIXELS = 0.002  # |M_vis| / |I|


@dataclass(frozen=True)
class SceneConfig:
    """Ranges of the random scene; every draw comes from the caller's numpy Generator (reproducible)."""

    width: int = 518
    height: int = 518
    fov_deg: tuple[float, float] = (35.0, 65.0)
    rotation: str = "upright"  # "upright" | "random"
    elevation_deg: tuple[float, float] = (5.0, 40.0)
    size_frac: tuple[float, float] = (0.3, 0.7)
    centre_frac: float = 0.5
    p_occluded: float = 0.5
    p_occluder: float = 0.15
    occluder_tries: int = 4
    occluder_size: tuple[float, float] = (0.3, 0.8)  # projected occluder radius / the target's

    def check(self) -> SceneConfig:
        if self.rotation not in ("upright", "random"):
            raise ValueError(f"rotation: got {self.rotation!r}, expected 'upright' or 'random'")
        if not (8 <= self.width <= 4096 and 8 <= self.height <= 4096):
            raise ValueError(f"image size {self.width}x{self.height}: expected 8..4096 pixels per side")
        if not 0 <= self.p_occluded + self.p_occluder <= 1:
            raise ValueError("p_occluded + p_occluder must lie in [0, 1]")
        return self


@dataclass
class Scene:
    """A drawn scene: the target and the other placed meshes, the camera and the light."""

    K: np.ndarray  # [3, 3]
    width: int
    height: int
    target: Placed
    others: list[Placed] = field(default_factory=list)
    other_names: list[str] = field(default_factory=list)
    light: Light | None = None
    mode: str = "alone"  # "alone" | "occluded" | "occluder"
    info: dict = field(default_factory=dict)


def intrinsics(rng: np.random.Generator, cfg: SceneConfig) -> np.ndarray:
    fov = math.radians(rng.uniform(*cfg.fov_deg))
    f = cfg.width / 2.0 / math.tan(fov / 2.0)
    return np.array([[f, 0.0, cfg.width / 2.0], [0.0, f, cfg.height / 2.0], [0.0, 0.0, 1.0]])


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniform random rotation (QR of a Gaussian matrix with the sign fix), det +1."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def look_rotation(azimuth: float, elevation: float) -> np.ndarray:
    """Row-vector rotation local (z up) -> PyTorch3D camera for a camera on a sphere around the object at
    (azimuth, elevation) radians, looking at it with the world's up as the image's up."""
    ce = math.cos(elevation)
    c = np.array([ce * math.cos(azimuth), ce * math.sin(azimuth), math.sin(elevation)])
    z = -c  # forward: from the camera towards the object
    y = np.array([0.0, 0.0, 1.0]) - z[2] * z
    y /= np.linalg.norm(y)
    x = np.cross(y, z)  # PyTorch3D: x left, y up, z forward, right-handed
    return np.stack([x, y, z], 0).T  # rows of M = [x; y; z] map world -> camera (column); R = M^T


def _radius(mesh: RenderMesh) -> float:
    return float(mesh.vertices.norm(dim=1).max())  # bounding-sphere radius in the local frame (<= sqrt(3)/2)


def place_target(rng, cfg: SceneConfig, K: np.ndarray, mesh: RenderMesh, size: float) -> Placed:
    if cfg.rotation == "upright":
        rot = look_rotation(rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(*cfg.elevation_deg)))
    else:
        rot = random_rotation(rng)
    r = _radius(mesh) * size
    frac = rng.uniform(*cfg.size_frac)
    depth = max(K[0, 0] * 2 * r / (frac * cfg.width), 1.5 * r + 0.05)
    # Centre the object's projection at a random point of the middle `centre_frac` of the image.
    u = cfg.width / 2 + rng.uniform(-0.5, 0.5) * cfg.centre_frac * cfg.width
    v = cfg.height / 2 + rng.uniform(-0.5, 0.5) * cfg.centre_frac * cfg.height
    t = np.array([-(u - K[0, 2]) / K[0, 0] * depth, -(v - K[1, 2]) / K[1, 1] * depth, depth])  # p3d: -x, -y
    return Placed(mesh, rot, t, size)


def _ray_point(K: np.ndarray, u: float, v: float, depth: float) -> np.ndarray:
    return np.array([-(u - K[0, 2]) / K[0, 0] * depth, -(v - K[1, 2]) / K[1, 1] * depth, depth])


def _pixel_of(K: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    return K[0, 0] * -p[0] / p[2] + K[0, 2], K[1, 1] * -p[1] / p[2] + K[1, 2]


def place_occluder(
    rng, K, target: Placed, mesh: RenderMesh, size: float, rel_size: tuple[float, float] = (0.3, 0.8)
) -> Placed:
    """An occluder between the camera and the target, aimed near a random point of the target's disc, its
    projected radius `rel_size` times the target's (its own real size is ignored: flying occluders are props)."""
    r_t = _radius(target.mesh) * float(np.mean(target.scale))
    d_t = float(target.translation[2])
    u0, v0 = _pixel_of(K, np.asarray(target.translation))
    disc = K[0, 0] * r_t / d_t  # target's projected radius in pixels
    ang, rad = rng.uniform(0, 2 * math.pi), disc * math.sqrt(rng.uniform(0, 1)) * 0.8
    u, v = u0 + rad * math.cos(ang), v0 + rad * math.sin(ang)
    free = d_t - r_t  # space in front of the target
    r_o = _radius(mesh)
    # Projected occluder radius rel_size of the target's, at a depth in the front part of the free space.
    depth = free * rng.uniform(0.35, 0.8)
    s = rng.uniform(*rel_size) * disc * depth / K[0, 0] / max(r_o, 1e-6)
    s = min(s, 0.9 * (free - depth) / max(r_o, 1e-6), 0.9 * depth / max(r_o, 1e-6))
    return Placed(mesh, random_rotation(rng), _ray_point(K, u, v, depth), max(s, 1e-4))


def place_behind(rng, K, target: Placed, mesh: RenderMesh, size: float) -> Placed:
    """Another object behind the target, overlapping its disc (the target is then the occluder)."""
    r_t = _radius(target.mesh) * float(np.mean(target.scale))
    d_t = float(target.translation[2])
    u0, v0 = _pixel_of(K, np.asarray(target.translation))
    disc = K[0, 0] * r_t / d_t
    ang = rng.uniform(0, 2 * math.pi)
    u, v = u0 + disc * math.cos(ang), v0 + disc * math.sin(ang)
    r_o = _radius(mesh) * size
    depth = d_t + r_t + r_o * rng.uniform(1.05, 2.0)
    return Placed(mesh, random_rotation(rng), _ray_point(K, u, v, depth), size)


def sample_scene(
    rng: np.random.Generator,
    target: RenderMesh,
    target_size: float,
    others: list[tuple[str, RenderMesh, float]],
    cfg: SceneConfig,
    mode: str | None = None,
) -> Scene:
    """Draw a camera, the target's pose, a light and the scene mode; occluders are placed in `render_scene`.

    others: (name, mesh, real size) candidates for occluders / objects behind. mode: force "alone",
    "occluded" or "occluder" (the benchmark does), else drawn with cfg's probabilities.
    """
    K = intrinsics(rng, cfg)
    placed = place_target(rng, cfg, K, target, target_size)
    if mode is None:
        x = rng.uniform()
        mode = "occluded" if x < cfg.p_occluded else "occluder" if x < cfg.p_occluded + cfg.p_occluder else "alone"
    if not others:
        mode = "alone"
    return Scene(K=K, width=cfg.width, height=cfg.height, target=placed, light=Light.random(rng), mode=mode)


def occlusion_accepted(visible: int, amodal: int, pixels: int) -> bool:
    """An occluded placement is kept when |M_vis| / |M_obj| lies in [0.1, 0.9] and |M_vis| >= 0.2 % of the image."""
    frac = visible / max(amodal, 1)
    return MIN_VISIBLE_FRAC <= frac <= MAX_VISIBLE_FRAC and visible >= MIN_VISIBLE_PIXELS * pixels


def draw_occluders(
    rng: np.random.Generator, scene: Scene, others: list[tuple[str, RenderMesh, float]], cfg: SceneConfig
) -> list[tuple[int, Placed]]:
    """One try of the "occluded" mode: one (70 %) or two flying occluders -> [(index into others, placed)]."""
    n = 1 if rng.uniform() < 0.7 else 2
    picks = [int(i) for i in rng.integers(0, len(others), n)]
    return [
        (i, place_occluder(rng, scene.K, scene.target, others[i][1], others[i][2], cfg.occluder_size)) for i in picks
    ]


def draw_behind(
    rng: np.random.Generator, scene: Scene, others: list[tuple[str, RenderMesh, float]]
) -> tuple[int, Placed]:
    """The "occluder" mode: another object behind the target -> (index into others, placed)."""
    i = int(rng.integers(0, len(others)))
    return i, place_behind(rng, scene.K, scene.target, others[i][1], others[i][2])


def render_scene(
    scene: Scene,
    rng: np.random.Generator,
    others: list[tuple[str, RenderMesh, float]],
    background: np.ndarray | None,
    cfg: SceneConfig,
) -> tuple[View, dict]:
    """Place the occluders of the scene's mode (with the visibility checks), render, and report
    {mode, occlusion, visible_frac, others, tries}. A scene whose target leaves no visible pixel raises
    ValueError (the caller skips and counts it)."""
    w, h, K = scene.width, scene.height, scene.K
    tries, view = 0, None
    if scene.mode == "occluded":
        for tries in range(1, cfg.occluder_tries + 1):  # noqa: B007 (reported after the loop)
            picks = draw_occluders(rng, scene, others, cfg)
            placed = [p for _, p in picks]
            view = render_view([scene.target, *placed], K, h, w, scene.light, background)
            if occlusion_accepted(int(view.mask.sum()), int(view.amodal.sum()), w * h):
                scene.others, scene.other_names = placed, [others[i][0] for i, _ in picks]
                break
            view = None
        else:
            scene.mode = "alone"  # no placement met the visibility bounds: fall back to no occluder
    elif scene.mode == "occluder":
        i, placed = draw_behind(rng, scene, others)
        scene.others, scene.other_names = [placed], [others[i][0]]
    if scene.mode == "alone":
        scene.others, scene.other_names = [], []
    if view is None:
        view = render_view([scene.target, *scene.others], K, h, w, scene.light, background, amodal=bool(scene.others))
    vis, amo = int(view.mask.sum()), int(view.amodal.sum())
    if vis == 0:
        raise ValueError("the target is not visible in this view (off screen or hidden)")
    info = {
        "mode": scene.mode,
        "occlusion": round(1.0 - vis / max(amo, 1), 4),
        "visible_pixels": vis,
        "others": list(scene.other_names),
        "occluder_tries": tries,
    }
    return view, info


# ---------------------------------------------------------------------------------------------------
# Backgrounds and mask noise
# ---------------------------------------------------------------------------------------------------


class CropBox(NamedTuple):
    """A drawn background crop: rows y0 .. y0 + h, columns x0 .. x0 + w of the photo, mirrored left-right or not."""

    y0: int
    x0: int
    h: int
    w: int
    flip: bool


def draw_crop(rng: np.random.Generator, photo_hw: tuple[int, int], width: int, height: int) -> CropBox:
    """A random crop of a photo of photo_hw = (h, w) pixels: 0.5..1 of its shorter side, the output's aspect;
    flipped left-right half the time."""
    ph, pw = photo_hw
    aspect = width / height
    side = rng.uniform(0.5, 1.0)
    ch = int(min(ph, pw / aspect) * side)
    cw = max(1, int(ch * aspect))
    ch = max(1, ch)
    y0, x0 = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    return CropBox(y0, x0, ch, cw, bool(rng.uniform() < 0.5))


def crop_background(photo: np.ndarray, box: CropBox, width: int, height: int) -> np.ndarray:
    """The crop `box` of a photo [h, w, 3] uint8, resized (bilinear) to [height, width, 3] uint8."""
    from PIL import Image

    crop = Image.fromarray(photo[box.y0 : box.y0 + box.h, box.x0 : box.x0 + box.w]).resize(
        (width, height), Image.BILINEAR
    )
    out = np.asarray(crop, dtype=np.uint8)
    return out[:, ::-1].copy() if box.flip else out


def background_crop(rng: np.random.Generator, photo: np.ndarray, width: int, height: int) -> np.ndarray:
    """A random crop of a photo [h, w, 3] uint8 (0.5..1 of its shorter side, the output's aspect), resized to
    [height, width, 3] uint8; flipped left-right half the time."""
    return crop_background(photo, draw_crop(rng, photo.shape[:2], width, height), width, height)


@dataclass(frozen=True)
class NoiseParams:
    """The drawn part of SAM-like mask noise: erode or dilate by `px` (an elliptic kernel of 2 px + 1), then
    optionally a boundary jitter (a smooth field: `field` [h // cell + 2, w // cell + 2] float32 N(0, 1), cubic-
    resized to the mask, times `amplitude`, added to the mask blurred with `sigma`) and `holes` small holes."""

    erode: bool
    px: int
    cell: int = 0  # 0: no jitter
    field: np.ndarray | None = None
    amplitude: float = 0.0
    sigma: float = 0.0
    holes: int = 0

    def how(self) -> dict:
        """What was done, as mask_noise reports it."""
        how: dict = {"erode_px" if self.erode else "dilate_px": self.px}
        if self.cell:
            how["jitter"] = {"cell_px": self.cell, "amplitude": round(self.amplitude, 3)}
        if self.holes:
            how["holes"] = self.holes
        return how


def draw_mask_noise(rng: np.random.Generator, height: int, width: int) -> NoiseParams:
    """The noise of one mask of height x width pixels (every draw but where the holes go and their radii)."""
    k = int(rng.integers(1, 4))
    erode = bool(rng.uniform() < 0.5)
    jitter: dict = {}
    if rng.uniform() < 0.6:
        cell = int(rng.integers(8, 24))
        field_ = rng.normal(size=(height // cell + 2, width // cell + 2)).astype(np.float32)
        jitter = {"cell": cell, "field": field_, "amplitude": float(rng.uniform(0.15, 0.35))}
        jitter["sigma"] = float(rng.uniform(1.0, 3.0))
    holes = int(rng.integers(1, 4)) if rng.uniform() < 0.3 else 0
    return NoiseParams(erode, k, holes=holes, **jitter)


def mask_noise(mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """SAM-like noise on a visible mask [H, W] bool -> (noisy mask, what was done). One of erode / dilate
    (1-3 px), then with some probability a boundary jitter (smooth random field added to a blurred mask, inside the
    blur's boundary band only) and a few small holes. The result is never empty (falls back to the input).
    `data.masknoise.mask_noise_batch` is the same noise on tensors (many masks at once, any device)."""
    import cv2

    m = mask.astype(np.uint8)
    h, w = m.shape
    p = draw_mask_noise(rng, h, w)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * p.px + 1, 2 * p.px + 1))
    m = cv2.erode(m, kernel) if p.erode else cv2.dilate(m, kernel)
    if p.cell:
        field_ = cv2.resize(p.field, (w, h), interpolation=cv2.INTER_CUBIC)
        blurred = cv2.GaussianBlur(m.astype(np.float32), (0, 0), sigmaX=p.sigma)
        # Only the boundary band jitters: elsewhere the field alone would cross 0.5 in ~5 % of the cells and
        # scatter specks over the whole photo, which no segmenter does.
        band = (blurred > 0.02) & (blurred < 0.98)
        m = np.where(band, (blurred + p.amplitude * field_) > 0.5, blurred > 0.5).astype(np.uint8)
    if p.holes:
        ys, xs = np.nonzero(m)
        for _ in range(p.holes if len(ys) else 0):  # where the holes go depends on the mask: drawn here
            i = int(rng.integers(0, len(ys)))
            cv2.circle(m, (int(xs[i]), int(ys[i])), int(rng.integers(1, 4)), 0, -1)
    out = m.astype(bool)
    if not out.any():
        return mask.copy(), {"fallback": "noise emptied the mask"}
    return out, p.how()
