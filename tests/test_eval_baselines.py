"""Predictions' surface points, the box / ellipsoid / oracle baselines, and scoring one sample."""

from __future__ import annotations

import numpy as np
import pytest
from eval_samples import UPRIGHT, make_sample

from sam3d_core.evaluation import baselines as B
from sam3d_core.evaluation.prediction import Prediction, sample_mesh_surface, sample_voxel_surface, target_points
from sam3d_core.evaluation.run import score_prediction


def test_voxel_surface_points_lie_on_exposed_faces_only():
    rng = np.random.default_rng(0)
    bar = np.array([[10, 20, 30], [11, 20, 30]])  # two voxels side by side along x
    p = sample_voxel_surface(bar, 20_000, rng)
    g = (p + 0.5) * 64  # grid units
    assert (g.min(0) >= [10, 20, 30]).all() and (g.max(0) <= [12, 21, 31]).all()
    on_face = np.isclose(g, np.round(g), atol=1e-9, rtol=0)  # [n, 3]: coordinate sits on a cell boundary
    assert on_face.any(axis=1).all()
    assert not np.isclose(g[:, 0], 11.0, atol=1e-9, rtol=0).any()  # the shared face is inside: never sampled
    # 10 exposed unit faces: the two end caps hold 2 of 10 -> ~20 % of the points
    caps = np.isclose(g[:, 0], 10.0, atol=1e-9, rtol=0) | np.isclose(g[:, 0], 12.0, atol=1e-9, rtol=0)
    assert caps.mean() == pytest.approx(0.2, abs=0.02)


def test_mesh_surface_points_lie_on_the_mesh():
    import trimesh

    box = trimesh.creation.box(extents=(1.0, 0.5, 0.25))
    p = sample_mesh_surface(box.vertices, box.faces, 5000, np.random.default_rng(0))
    gap = np.min(np.abs(np.abs(p) - [0.5, 0.25, 0.125]), axis=1)  # distance to the nearest face plane
    assert p.shape == (5000, 3) and gap.max() < 1e-9
    assert (np.abs(p) <= np.array([0.5, 0.25, 0.125]) + 1e-9).all()


def test_target_points_prefer_surface_points_and_fall_back_to_occupancy():
    rng = np.random.default_rng(0)
    s = make_sample(0, "box", rng)
    pts, src = target_points(s, 1000, rng)
    assert src == "surface_points" and pts.shape == (1000, 3)
    assert np.isin(pts.astype(np.float32), s.surface_points).all(axis=1).all()  # a subset of the stored points
    s.surface_points = None
    pts, src = target_points(s, 1000, rng)
    assert src == "occupancy" and np.abs(pts).max() <= 0.5


def test_mask_extent_hand_computed():
    mask = np.zeros((100, 100), bool)
    mask[30:50, 40:60] = True  # 20 x 20 pixels, centre (u, v) = (50, 40)
    K = np.array([[100.0, 0, 50], [0, 100.0, 50], [0, 0, 1]])
    centre, extents = B.mask_extent_at_depth(mask, K, 2.0)
    np.testing.assert_allclose(extents, [0.4, 0.4, 0.4])  # 20 px * 2 m / 100 px
    np.testing.assert_allclose(centre, [0.0, 0.2, 2.0])  # 10 px above the principal point -> +y (up) in PyTorch3D
    with pytest.raises(ValueError, match="in front of the camera"):
        B.mask_extent_at_depth(mask, K, -1.0)
    with pytest.raises(ValueError, match="non-empty"):
        B.mask_extent_at_depth(np.zeros((10, 10), bool), K, 2.0)


def test_box_baseline_recovers_a_box_seen_head_on():
    s = make_sample(0, "box", np.random.default_rng(3), size=128, turn=0.0)
    pred = B.box_baseline(s).check()
    np.testing.assert_allclose(pred.rotation, UPRIGHT)  # the test scene's upright pose is the baseline's
    assert pred.vertices is not None and pred.scale[0] == pred.scale[1] == pred.scale[2]
    m, used = score_prediction(s, pred, points=20_000, rng=np.random.default_rng(0))
    assert used == {"prediction_points": "mesh", "target_points": "surface_points", "target_count": 20_000}
    assert m["rot_err"] == pytest.approx(0.0, abs=1e-6)
    assert m["iou3d"] > 0.6 and m["add_s_01"] is True  # the guessed depth extent is the only big error
    # the box's shell voxels cover its faces: every exposed face of the 64^3 box shell is on the box surface
    occ = pred.occupancy
    assert len(occ) == len(np.unique(occ, axis=0)) and occ.min() >= 0 and occ.max() <= 63


def test_ellipsoid_baseline_is_inscribed_in_the_box():
    s = make_sample(1, "ellipsoid", np.random.default_rng(4), turn=0.3)
    box, ell = B.box_baseline(s), B.ellipsoid_baseline(s).check()
    np.testing.assert_allclose(ell.translation, box.translation)
    np.testing.assert_allclose(ell.scale, box.scale)
    half = np.abs(box.vertices).max(0)
    np.testing.assert_allclose((((ell.vertices / half) ** 2).sum(1)), 1.0, atol=1e-9, rtol=0)  # on the ellipsoid
    assert len(ell.occupancy) < len(box.occupancy)


def test_oracle_scores_the_voxel_ceiling():
    s = make_sample(2, "cylinder", np.random.default_rng(5), occluded=True)
    m, used = score_prediction(s, B.oracle_baseline(s), points=20_000, rng=np.random.default_rng(0))
    assert used["prediction_points"] == "voxels"
    assert m["rot_err"] == 0.0 and m["icp_rot"] < 2.0
    assert m["iou3d"] > 0.9 and m["add_s"] < 0.02 and m["add_s_01"] is True
    assert m["chamfer"] < 0.03  # within a voxel (2 / 64 in the [-1, 1] normalisation) of the true surface


def test_prediction_check_names_the_problem():
    good = dict(occupancy=np.array([[1, 2, 3]]), rotation=np.eye(3), translation=np.zeros(3), scale=np.ones(3))
    Prediction(**good).check()
    with pytest.raises(ValueError, match="prediction is empty"):
        Prediction(**{**good, "occupancy": np.zeros((0, 3), int)}).check()
    with pytest.raises(ValueError, match="occupancy"):
        Prediction(**{**good, "occupancy": np.array([[64, 0, 0]])}).check()
    with pytest.raises(ValueError, match="scale"):
        Prediction(**{**good, "scale": np.array([1.0, 0.0, 1.0])}).check()
    with pytest.raises(ValueError, match="mesh is empty"):
        Prediction(**good, vertices=np.zeros((0, 3)), faces=np.zeros((0, 3), int)).check()
    with pytest.raises(ValueError, match="baseline: got 'cube'"):
        B.predict_baseline("cube", make_sample(0, "box", np.random.default_rng(0)))
