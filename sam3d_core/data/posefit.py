"""Find an object's pose from its mask: render-and-compare of the mesh's silhouette (captures without a pose).

    fit = fit_pose(asset.vertices, asset.faces, size_m, mask, K)     # fit.rotation, fit.translation, fit.iou

The scale is NOT fitted: a silhouette cannot tell a small near object from a large far one (scaling the scene
about the camera centre leaves the image unchanged), so the mesh's real size fixes it, and depth follows.
Rotation and translation maximise the silhouette IoU with the mask:

1. The mask and K are reduced so that the longer side is at most `FitSettings.resolution` pixels, and the mesh
   to at most `max_faces` triangles (fast_simplification when installed).
2. Coarse search over rotations: `directions` viewing directions (a Fibonacci sphere) x `rolls` rotations
   about the optical axis. For each, the translation is set so that the silhouette's box matches the mask's
   (depth from the box diagonal, then the centre), and the IoU is measured.
3. Refinement of the `top_k` best: coordinate search over (rotation vector, pixel position of the centre,
   log depth) with step halving, `refine_evals` renders each.
4. A fine pass: the same search with small steps (`fine_evals` renders) at up to 4x that resolution with a
   less reduced mesh.
5. The best pose's IoU at full resolution with the full mesh is what is reported (`FitResult.iou`).

Symmetric objects have several equally good rotations; any of them is returned (the IoU says how good).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sam3d_core.data.render import silhouette
from sam3d_core.geometry import frames


@dataclass(frozen=True)
class FitSettings:
    resolution: int = 128
    directions: int = 32
    rolls: int = 8
    top_k: int = 3
    refine_evals: int = 120
    fine_evals: int = 80
    max_faces: int = 4000


@dataclass
class FitResult:
    rotation: np.ndarray  # [3, 3] row-vector, local -> PyTorch3D camera
    translation: np.ndarray  # [3]
    scale: float
    iou: float  # silhouette IoU at full resolution
    evaluations: int


def _rotvec(v: np.ndarray) -> np.ndarray:
    """Rotation vector [3] -> 3x3 column-vector rotation (Rodrigues)."""
    th = float(np.linalg.norm(v))
    if th < 1e-12:
        return np.eye(3)
    k = v / th
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(th) * kx + (1 - math.cos(th)) * kx @ kx


def candidate_rotations(directions: int, rolls: int) -> list[np.ndarray]:
    """Row-vector rotations: the camera looks at the object from `directions` Fibonacci-sphere directions,
    each with `rolls` rotations about the optical axis."""
    out = []
    golden = math.pi * (3 - math.sqrt(5))
    for i in range(directions):
        z = 1 - 2 * (i + 0.5) / directions
        r = math.sqrt(max(0.0, 1 - z * z))
        d = np.array([r * math.cos(golden * i), r * math.sin(golden * i), z])  # camera -> object, local frame
        up = np.array([0.0, 0.0, 1.0]) if abs(d[2]) < 0.9 else np.array([0.0, 1.0, 0.0])
        y = up - (up @ d) * d
        y /= np.linalg.norm(y)
        m = np.stack([np.cross(y, d), y, d], 0)  # world -> camera (column vectors), P3D axes
        for j in range(rolls):
            a = 2 * math.pi * j / rolls
            roll = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
            out.append((roll @ m).T)
    return out


def _reduce(mask: np.ndarray, K: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    h, w = mask.shape
    f = max(h, w) / resolution
    if f <= 1:
        return mask, np.asarray(K, np.float64)
    hs, ws = max(1, round(h / f)), max(1, round(w / f))
    small = cv2.resize(mask.astype(np.float32), (ws, hs), interpolation=cv2.INTER_AREA) > 0.5
    S = np.diag([ws / w, hs / h, 1.0])
    return small, S @ np.asarray(K, np.float64)


def _simplify(v: np.ndarray, f: np.ndarray, max_faces: int) -> tuple[np.ndarray, np.ndarray]:
    if len(f) <= max_faces:
        return v, f
    try:
        import fast_simplification
    except ImportError:
        return v, f
    v2, f2 = fast_simplification.simplify(v.astype(np.float32), f.astype(np.int32), 1.0 - max_faces / len(f))
    return (v2.astype(np.float64), f2.astype(np.int64)) if len(f2) else (v, f)


class _Scorer:
    """Silhouettes at the reduced size with the numpy rasteriser of `frames` (no per-call thread start-up,
    which dominates torch on small images) and their IoU with the mask."""

    def __init__(self, v, f, size, mask, K):
        self.v, self.f = np.asarray(v, np.float64), np.asarray(f, np.int64)
        self.size, self.K = size, K
        self.mask = np.asarray(mask, bool)
        self.h, self.w = mask.shape
        self.evals = 0

    def render(self, R, t) -> np.ndarray:
        self.evals += 1
        v_cam = (self.v * self.size) @ R + t
        return frames.render_silhouette(v_cam, self.f, self.K, self.w, self.h, near=1e-3)

    def iou(self, sil) -> float:
        union = np.logical_or(sil, self.mask).sum()
        return float(np.logical_and(sil, self.mask).sum() / union) if union else 0.0

    def t_of(self, u, v, z) -> np.ndarray:
        K = self.K
        return np.array([-(u - K[0, 2]) / K[0, 0] * z, -(v - K[1, 2]) / K[1, 1] * z, z])


def _pixel(K: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    return K[0, 0] * -t[0] / t[2] + K[0, 2], K[1, 1] * -t[1] / t[2] + K[1, 2]


def _box(m: np.ndarray) -> tuple[float, float, float] | None:
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        return None
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    return (x0 + x1) / 2, (y0 + y1) / 2, math.hypot(x1 - x0, y1 - y0)


def _initial(sc: _Scorer, R: np.ndarray, target: tuple[float, float, float]) -> tuple[np.ndarray, float]:
    """Depth and centre so that the silhouette's box matches the mask's box; -> ((u, v, z), IoU)."""
    u, v, diag = target
    z = sc.K[0, 0] * sc.size * 1.2 / max(diag, 1.0)
    for _ in range(2):
        box = _box(sc.render(R, sc.t_of(u, v, z)))
        if box is None:
            return np.array([u, v, z]), 0.0
        z *= box[2] / max(diag, 1.0)
        u, v = u + (target[0] - box[0]), v + (target[1] - box[1])
    p = np.array([u, v, z])
    return p, sc.iou(sc.render(R, sc.t_of(*p)))


COARSE_STEPS = (0.2, 0.2, 0.2, 3.0, 3.0, 0.06)  # rotvec (rad) x3, u, v (px), log z
FINE_STEPS = (0.03, 0.03, 0.03, 1.0, 1.0, 0.01)


def _refine(sc: _Scorer, R, p, best: float, evals: int, steps=COARSE_STEPS) -> tuple[np.ndarray, np.ndarray, float]:
    steps = np.array(steps, dtype=np.float64)
    x = np.zeros(6)
    start = sc.evals
    while sc.evals - start < evals and steps[0] > 0.002:
        improved = False
        for k in range(6):
            for sign in (1.0, -1.0):
                y = x.copy()
                y[k] += sign * steps[k]
                Ry = (_rotvec(y[:3]) @ R.T).T  # perturb in the camera frame
                score = sc.iou(sc.render(Ry, sc.t_of(p[0] + y[3], p[1] + y[4], p[2] * math.exp(y[5]))))
                if score > best:
                    best, x, improved = score, y, True
                    break
        if not improved:
            steps /= 2
    R_best = (_rotvec(x[:3]) @ R.T).T
    return R_best, np.array([p[0] + x[3], p[1] + x[4], p[2] * math.exp(x[5])]), best


def fit_pose(
    vertices: np.ndarray,
    faces: np.ndarray,
    size: float,
    mask: np.ndarray,
    K: np.ndarray,
    settings: FitSettings | None = None,
) -> FitResult:
    """vertices [V, 3] local frame, faces [F, 3], size (the pose's scale), mask [H, W] bool, K [3, 3] ->
    FitResult (see the module doc). Raises ValueError for an empty mask."""
    settings = settings or FitSettings()
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("the mask is empty; nothing to fit the pose to")
    small, Ks = _reduce(mask, K, settings.resolution)
    v, f = _simplify(np.asarray(vertices), np.asarray(faces), settings.max_faces)
    sc = _Scorer(v, f, size, small, Ks)
    target = _box(small)
    if target is None:  # the mask vanished when reduced: fit at full resolution
        sc = _Scorer(v, f, size, mask, np.asarray(K, np.float64))
        target = _box(mask)
    coarse = []
    for R in candidate_rotations(settings.directions, settings.rolls):
        p, score = _initial(sc, R, target)
        coarse.append((score, R, p))
    coarse.sort(key=lambda c: -c[0])
    best = None
    for score, R, p in coarse[: settings.top_k]:
        cand = _refine(sc, R, p, score, settings.refine_evals)
        if best is None or cand[2] > best[2]:
            best = cand
    R, p, _ = best
    t = sc.t_of(*p)  # the ray through (u, v) of the reduced image is the same ray at full resolution
    Kf = np.asarray(K, np.float64)
    # 4. A fine pass at up to 4x the coarse resolution with the full-detail (or less reduced) mesh.
    fine_mask, fine_K = _reduce(mask, Kf, 4 * settings.resolution)
    v2, f2 = _simplify(np.asarray(vertices), np.asarray(faces), 4 * settings.max_faces)
    fine = _Scorer(v2, f2, size, fine_mask, fine_K)
    u, v = _pixel(fine_K, t)
    start = np.array([u, v, t[2]])
    R, p, _ = _refine(fine, R, start, fine.iou(fine.render(R, t)), settings.fine_evals, FINE_STEPS)
    t = fine.t_of(*p)
    sc.evals += fine.evals
    full = silhouette(
        torch.as_tensor(vertices, dtype=torch.float32),
        torch.as_tensor(faces, dtype=torch.int64),
        R,
        t,
        size,
        Kf,
        *mask.shape,
    ).numpy()
    union = np.logical_or(full, mask).sum()
    iou = float(np.logical_and(full, mask).sum() / union) if union else 0.0
    return FitResult(rotation=R, translation=t, scale=float(size), iou=iou, evaluations=sc.evals)
