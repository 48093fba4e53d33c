"""The paper's metrics on identical, shifted, rotated, scaled and symmetric shapes, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sam3d_core.evaluation import metrics as M


def rot_z(deg: float) -> np.ndarray:
    """Row-vector rotation about z (p @ R turns p by +deg)."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])


def rot_x(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])


def box_surface(extents, n: int, seed: int = 0) -> np.ndarray:
    """n points uniformly on the surface of a centred box (area-weighted faces)."""
    rng = np.random.default_rng(seed)
    e = np.asarray(extents, dtype=np.float64)
    areas = np.array([e[1] * e[2], e[0] * e[2], e[0] * e[1]])
    axis = rng.choice(3, size=n, p=areas / areas.sum())
    p = (rng.random((n, 3)) - 0.5) * e
    p[np.arange(n), axis] = np.where(rng.random(n) < 0.5, -0.5, 0.5) * e[axis]
    return p


def sphere(n: int, radius: float = 1.0) -> np.ndarray:
    """A Fibonacci sphere: n nearly evenly spread points."""
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + 5**0.5) * i
    r = np.sqrt(1 - z**2)
    return radius * np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


# --- point-set distances --------------------------------------------------------------------------


def test_f_score_hand_computed():
    pred = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]], float)
    target = np.array([[0, 0, 0.005], [1, 0, 0.02], [5, 0, 0]], float)
    f1, precision, recall = M.f_score(pred, target, 0.01)
    assert precision == pytest.approx(1 / 4)  # only pred[0] is within 0.01 of a target point
    assert recall == pytest.approx(1 / 3)  # only target[0] is within 0.01 of a predicted point
    assert f1 == pytest.approx(2 / 7)  # 2 (1/4)(1/3) / (1/4 + 1/3)
    assert M.f_score(pred, pred + [0, 0, 0.5], 0.01) == (0.0, 0.0, 0.0)


def test_chamfer_hand_computed():
    assert M.chamfer_distance([[0, 0, 0]], [[0.3, 0.4, 0]]) == pytest.approx(0.5)
    # a -> b: distances 0 and 1 (mean 0.5); b -> a: 0; symmetric mean 0.25
    assert M.chamfer_distance([[0, 0, 0], [1, 0, 0]], [[0, 0, 0]]) == pytest.approx(0.25)


def test_emd_is_a_bijection_and_equals_the_shift():
    assert M.earth_movers_distance([[0, 0, 0], [1, 0, 0]], [[1, 0, 0], [0, 0, 0]]) == pytest.approx(0.0)
    assert M.earth_movers_distance([[0, 0, 0], [1, 0, 0]], [[0.1, 0, 0], [1.1, 0, 0]]) == pytest.approx(0.1)
    # W1 between a set and its translate by v is |v| (identity matching is optimal: mean |d| >= |mean d|)
    cloud = np.random.default_rng(1).random((300, 3))
    assert M.earth_movers_distance(cloud, cloud + [0.3, 0.0, 0.4]) == pytest.approx(0.5, abs=1e-9)
    # Chamfer lets many points share one neighbour; EMD does not: 2 points vs 1 point repeated
    two = np.array([[0, 0, 0], [1, 0, 0]], float)
    same = np.array([[0, 0, 0], [0, 0, 0]], float)
    assert M.earth_movers_distance(two, same) == pytest.approx(0.5)
    assert M.chamfer_distance(two, same) == pytest.approx(0.25)


def test_emd_subset_bias_is_positive_and_shrinks_with_more_points():
    a, b = box_surface((2, 2, 2), 20_000, seed=1), box_surface((2, 2, 2), 20_000, seed=2)  # one shape, 2 samplings
    small = M.earth_movers_distance(a, b, n=64, rng=np.random.default_rng(0))
    large = M.earth_movers_distance(a, b, n=1024, rng=np.random.default_rng(0))
    assert small > large > 0.0
    assert large < 0.15  # the documented bias at the default 1024 points is ~0.1 on a [-1, 1] cube


# --- voxels -------------------------------------------------------------------------------------


def test_voxel_iou_hand_computed():
    a = np.array([[0, 0, 0], [1, 0, 0], [1, 0, 0]])  # the duplicate counts once
    b = np.array([[1, 0, 0], [2, 0, 0]])
    assert M.voxel_iou(a, b) == pytest.approx(1 / 3)
    assert M.voxel_iou(a, a) == 1.0
    assert M.voxel_iou(np.zeros((0, 3), int), np.zeros((0, 3), int)) == 1.0
    with pytest.raises(ValueError, match=r"indices span 0\.\.64, expected 0\.\.63"):
        M.voxel_iou(np.array([[64, 0, 0]]), a)


def test_voxelize_cells_and_clamping():
    v = M.voxelize(np.array([[-1.0, -1.0, -1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.2, 0, 0]]), 64)
    assert v.tolist() == [[0, 0, 0], [32, 32, 32], [63, 32, 32], [63, 63, 63]]


# --- normalisation and the shape group ----------------------------------------------------------------


def test_normalize_unit_cube():
    corners = np.array([[x, y, z] for x in (0, 4) for y in (0, 2) for z in (0, 1)], float) + 7
    n = M.normalize_unit_cube(corners)
    np.testing.assert_allclose(n.min(0), [-1, -0.5, -0.25])
    np.testing.assert_allclose(n.max(0), [1, 0.5, 0.25])


def test_shape_metrics_identical_shape():
    shape = box_surface((1.0, 0.6, 0.3), 20_000)
    m = M.shape_metrics(shape, shape, rng=np.random.default_rng(0))
    assert m["f1"] == 1.0 and m["viou"] == 1.0
    assert m["chamfer"] < 1e-6
    # EMD compares two independent 1024-point subsets: > 0 even for one shape (the documented bias, ~0.08 here)
    assert 0.0 < m["emd"] < 0.12


def test_shape_metrics_ignore_shift_and_uniform_scale_but_not_stretch():
    shape = box_surface((1.0, 0.6, 0.3), 20_000)
    moved = shape * 2.5 + [3.0, -1.0, 2.0]
    m = M.shape_metrics(moved, shape, rng=np.random.default_rng(0))
    assert m["f1"] == 1.0 and m["viou"] == 1.0 and m["chamfer"] < 1e-6
    stretched = shape * [1.0, 1.5, 1.0]  # a different shape: (1, 0.9, 0.3)
    s = M.shape_metrics(stretched, shape, rng=np.random.default_rng(0))
    assert s["f1"] < 0.5 and s["viou"] < 0.5 and s["chamfer"] > 0.02
    assert s["emd"] > m["emd"] + 0.05


def test_shape_metrics_icp_undoes_a_small_rotation():
    shape = box_surface((1.0, 0.6, 0.3), 20_000)
    turned = shape @ rot_z(4.0)
    before = M.f_score(M.normalize_unit_cube(turned), M.normalize_unit_cube(shape))[0]
    m = M.shape_metrics(turned, shape, rng=np.random.default_rng(0))
    assert before < 0.6  # without ICP a 4 degree turn costs a lot at 0.01
    assert m["f1"] > 0.95 and m["chamfer"] < 0.005


# --- rotations ------------------------------------------------------------------------------------


def test_rotation_error_geodesic_and_symmetries():
    assert M.rotation_error_deg(rot_z(30), np.eye(3)) == pytest.approx(30)
    assert M.rotation_error_deg(rot_z(30) @ rot_x(40), rot_x(40)) == pytest.approx(30)  # relative angle only
    assert M.rotation_angle_deg(rot_x(180)) == pytest.approx(180)
    # a square prism turned by 90 degrees about its axis: 90 without symmetry, 0 with its 4-fold symmetry
    c4 = [rot_z(k * 90) for k in range(4)]
    assert M.rotation_error_deg(rot_z(90), np.eye(3)) == pytest.approx(90)
    assert M.rotation_error_deg(rot_z(90), np.eye(3), symmetries=c4) == pytest.approx(0, abs=1e-6)
    assert M.rotation_error_deg(rot_z(100), np.eye(3), symmetries=c4) == pytest.approx(10)
    with pytest.raises(ValueError, match="proper rotation"):
        M.rotation_error_deg(np.diag([1.0, 1.0, -1.0]), np.eye(3))


def test_icp_rotation_error_sees_asymmetric_turns_and_ignores_symmetric_ones():
    prism = box_surface((1.0, 0.6, 0.3), 20_000)
    assert M.icp_rotation_error_deg(prism @ rot_z(20), prism, rng=np.random.default_rng(0)) == pytest.approx(20, abs=1)
    cube = box_surface((1.0, 1.0, 1.0), 20_000)
    assert M.icp_rotation_error_deg(cube @ rot_z(90), cube, rng=np.random.default_rng(0)) < 1.0
    # translation is not a rotation error: the posed shapes are centred first
    assert M.icp_rotation_error_deg(prism + [5, 0, 0], prism, rng=np.random.default_rng(0)) < 1.0


# --- layout: ADD-S, boxes -----------------------------------------------------------------------------


def test_add_s_hand_computed_and_threshold_on_the_diameter():
    target = np.array([[0, 0, 0], [1, 0, 0]], float)  # diameter 1
    assert M.diameter(target) == pytest.approx(1.0)
    far = target + [0, 0.15, 0]  # every nearest distance is 0.15 both ways -> (0.15 + 0.15) / (2 * 1)
    near = target + [0, 0.05, 0]
    assert M.add_s(far, target) == pytest.approx(0.15)
    assert M.add_s(near, target) == pytest.approx(0.05)
    assert M.add_s(far * 2, target * 2) == pytest.approx(0.15)  # relative to the diameter: scale-free
    assert M.diameter(box_surface((1, 1, 1), 5000)) == pytest.approx(math.sqrt(3), abs=0.02)


def test_rotated_sphere_add_s_is_zero_while_add_is_not():
    ball = sphere(20_000)
    turned = ball @ rot_z(90)
    assert M.add_s(turned, ball) < 0.005
    # mean |p R - p| = 2 sin(45 deg) * mean distance to the axis (pi / 4 on a unit sphere)
    assert M.add_corresponding(turned, ball) == pytest.approx(2 * math.sin(math.radians(45)) * math.pi / 4, rel=1e-3)
    lay = M.layout_metrics(turned, ball, rot_z(90), np.eye(3), rng=np.random.default_rng(0))
    assert lay["rot_err"] == pytest.approx(90) and lay["icp_rot"] < 1.0
    assert lay["add_s_01"] is True and lay["iou3d"] > 0.99


def test_box_iou_hand_computed():
    unit = np.array([[0, 0, 0], [1, 1, 1]], float)
    assert M.box_iou_3d(unit, unit) == 1.0
    assert M.box_iou_3d(unit, unit + [0.5, 0, 0]) == pytest.approx(1 / 3)  # 0.5 / (1 + 1 - 0.5)
    assert M.box_iou_3d(unit, unit + [0.5, 0.5, 0]) == pytest.approx(1 / 7)  # 0.25 / 1.75
    assert M.box_iou_3d(unit, np.array([[-0.5] * 3, [1.5] * 3])) == pytest.approx(1 / 8)  # inside one twice as big
    assert M.box_iou_3d(unit, unit + [2, 0, 0]) == 0.0
    with pytest.raises(ValueError, match="expected"):
        M.box_iou_3d(unit[::-1], unit)


def test_layout_metrics_of_shifted_cubes():
    cube = box_surface((1, 1, 1), 20_000)
    lay = M.layout_metrics(cube + [0.5, 0, 0], cube, np.eye(3), np.eye(3), rng=np.random.default_rng(0))
    assert lay["iou3d"] == pytest.approx(1 / 3, abs=0.01)
    assert lay["rot_err"] == 0.0 and lay["icp_rot"] < 1.0
    assert 0.05 < lay["add_s"] < 0.5 * 0.5 / math.sqrt(3) + 0.01  # at most |shift| / (2 d) per direction
    same = M.layout_metrics(cube, cube, np.eye(3), np.eye(3), rng=np.random.default_rng(0))
    assert same["iou3d"] == 1.0 and same["add_s"] == 0.0 and same["add_s_01"] is True


def test_metrics_name_bad_input():
    with pytest.raises(ValueError, match=r"a: got shape \(3,\), expected \[N, 3\]"):
        M.nearest_distances(np.zeros(3), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        M.chamfer_distance(np.full((2, 3), np.nan), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="all points coincide"):
        M.normalize_unit_cube(np.ones((5, 3)))
    with pytest.raises(ValueError, match="zero diameter"):
        M.add_s(np.zeros((3, 3)), np.zeros((3, 3)))
