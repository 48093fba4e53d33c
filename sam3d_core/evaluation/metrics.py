"""The metrics of the SAM 3D paper (appendix D.3) as pure functions of point sets, on the CPU.

Shape (D.3.1), in the object's local frame: both shapes are normalised on their own into [-1, 1]
(`normalize_unit_cube`), the prediction is aligned to the target by rigid ICP (`icp_align`), then
    F1@0.01   harmonic mean of precision (predicted points within 0.01 of a target point) and recall
    vIoU      IoU of the two point sets voxelised on a 64^3 grid over [-1, 1]^3
    Chamfer   (mean NN distance pred -> target + mean NN distance target -> pred) / 2, Euclidean (not squared)
    EMD       mean matched distance of the optimal one-to-one assignment between `emd_points` random points of
              each set (exact assignment on subsets; biased upwards, see `earth_movers_distance`)
Layout (D.3.2), in the camera frame, each shape posed with its own pose:
    3D IoU    IoU of the axis-aligned bounding boxes (camera axes), as the paper
    ICP-Rot   angle of the rotation ICP needs to align the posed prediction to the posed target, both centred on
              their centroids (the paper's rotation error: an object symmetric under the error scores ~0)
    Rot. err  plain geodesic angle between the two rotations (optionally the minimum over known symmetries)
    ADD-S     (ADD(pred, target) + ADD(target, pred)) / (2 d), ADD(A, B) = mean NN distance from A to B,
              d = diameter of the posed target (paper eq. 8-9)
    ADD-S@0.1 ADD-S < 0.1, i.e. the symmetric distance is under 10 % of the diameter

Means of nearest distances (Chamfer, ADD-S) are taken over MEAN_QUERIES random query points per direction
against all the other side's points (see the note at MEAN_QUERIES); F1 uses every point.

Points are float arrays [N, 3]; rotations are 3x3 in the row-vector convention of `geometry.layout.Pose`
(p_cam = (p_local * scale) @ R + t); the geodesic angle is the same in either convention. docs/evaluation.md
states every choice and its bias.
"""

from __future__ import annotations

import math

import numpy as np

from sam3d_core.evaluation._deps import scipy_modules as _scipy
from sam3d_core.evaluation._deps import trimesh_module

F1_THRESHOLD = 0.01  # in the [-1, 1] normalisation
VOXEL_RESOLUTION = 64
ADD_S_THRESHOLD = 0.1  # ADD-S is already divided by the diameter
EMD_POINTS = 1024
# A KD-tree answers queries near the surface it holds in microseconds, but a query far from it costs time in
# proportion to the tree's size: 200-800 us per query at 300k points (a point inside a closed surface is nearly
# equidistant from much of it), and a bad prediction is far everywhere. So distances that are only averaged
# (Chamfer, ADD-S) are averaged over MEAN_QUERIES random query points against ALL the other side's points (exact
# distances, an unbiased mean; standard error ~1.6 % of the spread per direction), F1 asks only "closer than
# 0.01?" (a bounded search, every point), ICP fits on subsets and the diameter's hull on DIAMETER_HULL_POINTS.
MEAN_QUERIES = 4000
# Threads per KD-tree query (-1: every core). `sam3d eval --workers N` sets each scoring process's share, so that
# N processes do not each start a thread per core; exact queries give the same distances whatever the count.
KDTREE_WORKERS = -1
ICP_POINTS = 2048  # source points per ICP fit
ICP_TARGET_POINTS = 20_000  # target points in ICP's KD-tree
ICP_ITERATIONS = 30
DIAMETER_EXACT_POINTS = 2048  # hull vertices up to which the diameter is exact
DIAMETER_HULL_POINTS = 50_000  # points the hull is built on (a random subset beyond; ~0.1 % low at most)


def _points(a, name: str, min_count: int = 1) -> np.ndarray:
    p = np.asarray(a, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"{name}: got shape {p.shape}, expected [N, 3] points")
    if len(p) < min_count:
        raise ValueError(f"{name}: got {len(p)} points, expected at least {min_count}")
    if not np.isfinite(p).all():
        raise ValueError(f"{name}: holds NaN or infinite coordinates")
    return p


def _subset(p: np.ndarray, n: int, rng: np.random.Generator | None) -> np.ndarray:
    if len(p) <= n:
        return p
    rng = rng if rng is not None else np.random.default_rng(0)
    return p[rng.choice(len(p), n, replace=False)]


# ---------------------------------------------------------------------------------------------------
# Point-set distances (shape)
# ---------------------------------------------------------------------------------------------------


def nearest_distances(a, b, upper_bound: float = np.inf) -> np.ndarray:
    """For each point of a [N, 3], the Euclidean distance to its nearest point of b [M, 3] -> [N]; inf where
    that distance is not below `upper_bound` (a bounded search is fast whatever the distances)."""
    a, b = _points(a, "a"), _points(b, "b")
    d, _ = _scipy().spatial.cKDTree(b).query(a, k=1, distance_upper_bound=upper_bound, workers=KDTREE_WORKERS)
    return d


def mean_nearest_distance(a, b, max_queries: int = MEAN_QUERIES, rng: np.random.Generator | None = None) -> float:
    """Mean over the points of a of the distance to the nearest point of b, estimated on `max_queries` random
    points of a (all when fewer) against all of b: exact distances, an unbiased mean."""
    return float(nearest_distances(_subset(_points(a, "a"), max_queries, rng), b).mean())


def _pair_distances(
    a: np.ndarray, b: np.ndarray, threshold: float, max_queries: int, rng: np.random.Generator | None
) -> tuple[float, float, float, float]:
    """One KD-tree per side, shared: (share of a closer than `threshold` to b, the same for b to a, mean nearest
    distance a -> b, b -> a over up to `max_queries` query points each)."""
    ckd = _scipy().spatial.cKDTree
    tree_a, tree_b = ckd(a), ckd(b)

    def within(tree, q) -> float:
        return float((tree.query(q, distance_upper_bound=threshold, workers=KDTREE_WORKERS)[0] < threshold).mean())

    def mean(tree, q) -> float:
        return float(tree.query(_subset(q, max_queries, rng), workers=KDTREE_WORKERS)[0].mean())

    return within(tree_b, a), within(tree_a, b), mean(tree_b, a), mean(tree_a, b)


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def f_score(pred, target, threshold: float = F1_THRESHOLD) -> tuple[float, float, float]:
    """(F1, precision, recall) at `threshold`: precision = share of predicted points with a target point closer
    than the threshold, recall = share of target points with a predicted point closer; F1 = 2PR / (P + R), 0 when
    both are 0. Depends on the point density: see docs/evaluation.md for the ceiling at a given count."""
    if not threshold > 0:
        raise ValueError(f"threshold: got {threshold}, expected a positive distance such as 0.01")
    precision = float((nearest_distances(pred, target, threshold) < threshold).mean())
    recall = float((nearest_distances(target, pred, threshold) < threshold).mean())
    return _f1(precision, recall), precision, recall


def chamfer_distance(a, b, max_queries: int = MEAN_QUERIES, rng: np.random.Generator | None = None) -> float:
    """Symmetric Chamfer distance: (mean NN distance a -> b + mean NN distance b -> a) / 2, Euclidean (not
    squared); each mean over up to `max_queries` random query points (`mean_nearest_distance`)."""
    return 0.5 * (mean_nearest_distance(a, b, max_queries, rng) + mean_nearest_distance(b, a, max_queries, rng))


def earth_movers_distance(a, b, n: int = EMD_POINTS, rng: np.random.Generator | None = None) -> float:
    """EMD approximation: n random points of each set (all of them when fewer), the optimal one-to-one
    assignment between the two subsets (exact, `scipy.optimize.linear_sum_assignment` on Euclidean costs),
    and the mean matched distance.

    Bias: the subsets are themselves samples, so two different samplings of the same surface score > 0 (the
    transport distance between two n-point samples shrinks like n^(-1/2) on a surface); the value is an upper
    estimate of the EMD between the full sets. Equal-size subsets are required for a bijection: when the sets
    differ in size, both are cut to the smaller count.
    """
    a, b = _points(a, "a"), _points(b, "b")
    if n < 1:
        raise ValueError(f"n: got {n}, expected a positive number of points such as 1024")
    m = min(n, len(a), len(b))
    a, b = _subset(a, m, rng), _subset(b, m, rng)
    sp = _scipy()
    cost = sp.spatial.distance.cdist(a, b)  # [m, m]
    rows, cols = sp.optimize.linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


# ---------------------------------------------------------------------------------------------------
# Voxels
# ---------------------------------------------------------------------------------------------------


def voxelize(points, resolution: int = VOXEL_RESOLUTION, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """Points [N, 3] -> unique voxel indices [M, 3] int64 of a resolution^3 grid spanning [lo, hi]^3.

    Cell i spans [lo + i * h, lo + (i + 1) * h), h = (hi - lo) / resolution; points outside are clamped to
    the border cells (after ICP a few points may leave [-1, 1] by a hair)."""
    p = _points(points, "points", min_count=0)
    if resolution < 1 or not hi > lo:
        raise ValueError(f"resolution={resolution}, [lo, hi]=[{lo}, {hi}]: expected resolution >= 1 and hi > lo")
    idx = np.floor((p - lo) / (hi - lo) * resolution).astype(np.int64)
    return np.unique(np.clip(idx, 0, resolution - 1), axis=0)


def _voxel_keys(v, name: str, resolution: int) -> np.ndarray:
    v = np.asarray(v)
    if v.ndim != 2 or v.shape[1] != 3 or (v.size and not np.issubdtype(v.dtype, np.integer)):
        raise ValueError(f"{name}: got {v.dtype} {v.shape}, expected integer voxel indices [N, 3]")
    v = v.astype(np.int64)
    if v.size and (v.min() < 0 or v.max() >= resolution):
        raise ValueError(f"{name}: indices span {v.min()}..{v.max()}, expected 0..{resolution - 1}")
    return np.unique((v[:, 0] * resolution + v[:, 1]) * resolution + v[:, 2])


def voxel_iou(a, b, resolution: int = VOXEL_RESOLUTION) -> float:
    """IoU of two sets of occupied voxels (indices [N, 3] on a resolution^3 grid; duplicates count once).
    1.0 when both are empty."""
    ka, kb = _voxel_keys(a, "a", resolution), _voxel_keys(b, "b", resolution)
    inter = len(np.intersect1d(ka, kb, assume_unique=True))
    union = len(ka) + len(kb) - inter
    return 1.0 if union == 0 else inter / union


# ---------------------------------------------------------------------------------------------------
# Normalisation and alignment
# ---------------------------------------------------------------------------------------------------


def normalize_unit_cube(points) -> np.ndarray:
    """The paper's shape normalisation: centre of the bounding box to the origin, longest side to 2, so the shape
    spans [-1, 1] on its longest axis (and lies inside [-1, 1]^3). Uniform scale, no rotation."""
    p = _points(points, "points")
    lo, hi = p.min(0), p.max(0)
    side = float((hi - lo).max())
    if side <= 0:
        raise ValueError("points: all points coincide; a shape needs an extent to be normalised")
    return (p - (lo + hi) / 2) * (2.0 / side)


def icp_align(
    source,
    target,
    *,
    iterations: int = ICP_ITERATIONS,
    max_points: int = ICP_POINTS,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rigid point-to-point ICP (rotation + translation, no scale, no reflection) from the identity, moving
    source [N, 3] onto target [M, 3] (trimesh's ICP: nearest neighbours by KD-tree, Procrustes per step). Fitted
    on a random subset of `max_points` source points against up to ICP_TARGET_POINTS target points. Returns
    (the whole source moved [N, 3], the 4x4 column-vector transform). Like any ICP it finds the nearest local
    optimum: a large misalignment is only partly undone."""
    src, dst = _points(source, "source", 3), _points(target, "target", 3)
    matrix, _, _ = trimesh_module().registration.icp(
        _subset(src, max_points, rng),
        _subset(dst, ICP_TARGET_POINTS, rng),
        initial=np.eye(4),
        threshold=1e-10,
        max_iterations=iterations,
        reflection=False,
        scale=False,
    )
    return src @ matrix[:3, :3].T + matrix[:3, 3], matrix


# ---------------------------------------------------------------------------------------------------
# Rotations
# ---------------------------------------------------------------------------------------------------


def _rotation(r, name: str) -> np.ndarray:
    m = np.asarray(r, dtype=np.float64)
    if m.shape != (3, 3) or not np.allclose(m @ m.T, np.eye(3), atol=1e-4) or np.linalg.det(m) < 0:
        raise ValueError(f"{name}: expected a 3x3 proper rotation matrix (R R^T = I, det +1), got {m.tolist()}")
    return m


def rotation_angle_deg(r) -> float:
    """Angle in degrees (0..180) of a rotation matrix: arccos((trace - 1) / 2)."""
    m = _rotation(r, "r")
    return math.degrees(math.acos(float(np.clip((np.trace(m) - 1.0) / 2.0, -1.0, 1.0))))


def rotation_error_deg(r_pred, r_gt, symmetries=None) -> float:
    """Geodesic angle in degrees between two rotations (row-vector `Pose.rotation`s; the angle is the same for
    column vectors). `symmetries`: rotations S [K, 3, 3] of the target's local frame that leave its shape
    unchanged (row-vector: p @ S); the error is then min over S of angle(r_pred, S @ r_gt). None = no symmetry."""
    rp, rg = _rotation(r_pred, "r_pred"), _rotation(r_gt, "r_gt")
    syms = [np.eye(3)] if symmetries is None else [_rotation(s, "symmetries[i]") for s in symmetries]
    return min(rotation_angle_deg(rp.T @ (s @ rg)) for s in syms)


def icp_rotation_error_deg(
    pred_posed, target_posed, *, rng: np.random.Generator | None = None, iterations: int = ICP_ITERATIONS
) -> float:
    """The paper's ICP-Rot: both shapes already posed in the camera frame, each centred on its centroid (the
    translation error is ADD-S's and the box IoU's business), rigid ICP of the prediction onto the target from
    the identity, and the angle of the rotation ICP applied, in degrees. Symmetric objects need no special
    case: a rotation the shape does not see costs ~0. A gross error (beyond ICP's basin) is under-reported."""
    p = _points(pred_posed, "pred_posed", 3)
    t = _points(target_posed, "target_posed", 3)
    _, matrix = icp_align(p - p.mean(0), t - t.mean(0), rng=rng, iterations=iterations)
    return rotation_angle_deg(_nearest_rotation(matrix[:3, :3]))


def _nearest_rotation(m: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(m)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


# ---------------------------------------------------------------------------------------------------
# Posed distances and boxes (layout)
# ---------------------------------------------------------------------------------------------------


def diameter(points, max_exact: int = DIAMETER_EXACT_POINTS, rng: np.random.Generator | None = None) -> float:
    """Largest distance between two points of the set. The pair lies on the convex hull (built on at most
    DIAMETER_HULL_POINTS random points): exact over the hull's vertices when there are at most `max_exact` of
    them; else the larger of a double sweep (farthest point from the farthest point from the centroid) and the
    exact diameter of `max_exact` random hull vertices. The approximations are lower bounds, within ~0.1 % on
    dense surface samples (a sphere of 20k points: 2 - 1e-3); ADD-S only divides by it."""
    p = _subset(_points(points, "points"), DIAMETER_HULL_POINTS, rng)
    sp = _scipy()
    if len(p) > 16:
        try:
            p = p[sp.spatial.ConvexHull(p, qhull_options="QJ").vertices]
        except Exception:  # noqa: BLE001 - degenerate sets (collinear, coincident): keep all the points
            pass
    if len(p) < 2:
        return 0.0
    if len(p) <= max_exact:
        return float(sp.spatial.distance.pdist(p).max())
    a = p[np.argmax(((p - p.mean(0)) ** 2).sum(1))]
    b = p[np.argmax(((p - a) ** 2).sum(1))]
    sweep = float(max(np.linalg.norm(p - b, axis=1).max(), np.linalg.norm(b - a)))
    return max(sweep, float(sp.spatial.distance.pdist(_subset(p, max_exact, rng)).max()))


def add_s(
    pred_posed,
    target_posed,
    target_diameter: float | None = None,
    max_queries: int = MEAN_QUERIES,
    rng: np.random.Generator | None = None,
) -> float:
    """The paper's ADD-S (eq. 8-9): (ADD(pred, target) + ADD(target, pred)) / (2 d), where ADD(A, B) is the mean
    distance from each point of A to its nearest point of B and d the target's diameter (computed unless
    given); that is the Chamfer distance over d. Both shapes posed in the camera frame."""
    d = diameter(target_posed) if target_diameter is None else float(target_diameter)
    if not d > 0:
        raise ValueError("target_posed: the target has zero diameter; ADD-S is undefined for a single point")
    return chamfer_distance(pred_posed, target_posed, max_queries, rng) / d


def add_corresponding(a, b) -> float:
    """The classic ADD of 6D pose estimation: mean distance between CORRESPONDING points a[i], b[i] (the same
    model posed twice). Not symmetric-aware: a rotated sphere scores > 0. For comparison with ADD-S."""
    a, b = _points(a, "a"), _points(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a, b: got {a.shape} and {b.shape}; ADD pairs point i with point i, give equal shapes")
    return float(np.linalg.norm(a - b, axis=1).mean())


def aabb(points) -> np.ndarray:
    """Axis-aligned bounding box [2, 3] (min row, max row) of points [N, 3]."""
    p = _points(points, "points")
    return np.stack([p.min(0), p.max(0)])


def box_iou_3d(box_a, box_b) -> float:
    """IoU of two axis-aligned boxes given as [2, 3] (min corner, max corner). 0 for disjoint boxes;
    1.0 for two identical zero-volume boxes."""
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    for box, name in ((a, "box_a"), (b, "box_b")):
        if box.shape != (2, 3) or (box[1] < box[0]).any():
            raise ValueError(f"{name}: got {box.tolist()}, expected [[xmin, ymin, zmin], [xmax, ymax, zmax]]")
    inter = np.prod(np.clip(np.minimum(a[1], b[1]) - np.maximum(a[0], b[0]), 0.0, None))
    union = np.prod(a[1] - a[0]) + np.prod(b[1] - b[0]) - inter
    if union <= 0:
        return 1.0 if np.allclose(a, b) else 0.0
    return float(inter / union)


# ---------------------------------------------------------------------------------------------------
# The two groups, as `sam3d eval` computes them
# ---------------------------------------------------------------------------------------------------


def shape_metrics(
    pred_local,
    target_local,
    *,
    threshold: float = F1_THRESHOLD,
    resolution: int = VOXEL_RESOLUTION,
    emd_points: int = EMD_POINTS,
    rng: np.random.Generator | None = None,
) -> dict[str, float]:
    """F1@threshold, vIoU, Chamfer, EMD of two surface point sets given in their own local frames: each normalised
    into [-1, 1] on its own, the prediction ICP-aligned to the target (normalised again after the first ICP, then
    aligned again), then compared (paper D.3.1)."""
    target = normalize_unit_cube(target_local)
    pred = normalize_unit_cube(pred_local)
    # A turned shape has a larger bounding box, so the first normalisation shrinks it (4 degrees: ~4 %, which
    # alone fails F1@0.01). Normalising again once ICP has turned it into the target's axes removes that.
    pred, _ = icp_align(pred, target, rng=rng)
    pred, _ = icp_align(normalize_unit_cube(pred), target, rng=rng)
    precision, recall, mean_pt, mean_tp = _pair_distances(pred, target, threshold, MEAN_QUERIES, rng)
    return {
        "f1": _f1(precision, recall),
        "precision": precision,
        "recall": recall,
        "viou": voxel_iou(voxelize(pred, resolution), voxelize(target, resolution), resolution),
        "chamfer": 0.5 * (mean_pt + mean_tp),
        "emd": earth_movers_distance(pred, target, emd_points, rng),
    }


def layout_metrics(
    pred_posed, target_posed, r_pred, r_gt, *, rng: np.random.Generator | None = None
) -> dict[str, float | bool]:
    """3D IoU (axis-aligned boxes), ICP-Rot, geodesic rotation error, ADD-S and ADD-S@0.1 of two shapes posed in
    the camera frame (paper D.3.2)."""
    pred, target = _points(pred_posed, "pred_posed", 3), _points(target_posed, "target_posed", 3)
    score = add_s(pred, target, rng=rng)
    return {
        "iou3d": box_iou_3d(aabb(pred), aabb(target)),
        "icp_rot": icp_rotation_error_deg(pred, target, rng=rng),
        "rot_err": rotation_error_deg(r_pred, r_gt),
        "add_s": score,
        "add_s_01": bool(score < ADD_S_THRESHOLD),
    }
