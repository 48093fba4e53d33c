"""Source (a): captures with given poses (checked by hand) and fitted poses (render-and-compare); bad folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sam3d_core.data.captures import CaptureSettings, build_captures
from sam3d_core.data.posefit import FitSettings
from sam3d_core.data.sample import SampleDataset
from sam3d_core.geometry import frames

trimesh = pytest.importorskip("trimesh")
W, H = 160, 120
K = np.array([[150.0, 0.0, 80.0], [0.0, 150.0, 60.0], [0.0, 0.0, 1.0]])


def write_capture(folder, mesh, mask, pose=None, camera=True):
    folder.mkdir(parents=True)
    rgb = np.where(mask[..., None], 200, 40).astype(np.uint8).repeat(3, 2)
    Image.fromarray(rgb).save(folder / "photo.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "mask.png")
    mesh.export(folder / "mesh.obj")
    if camera:
        (folder / "camera.json").write_text(json.dumps({"K": K.tolist()}))
    if pose is not None:
        (folder / "pose.json").write_text(json.dumps(pose))


def opencv_mask(vertices_file, faces, matrix):
    """The mask a camera sees: file coordinates -> OpenCV camera by `matrix`, projected with K (frames)."""
    v = frames.transform_points(matrix, vertices_file)
    return frames.rasterize_triangles(frames.project_points_opencv(v, K), faces, W, H)


def test_given_pose_of_a_cube_matches_the_hand_computed_values(tmp_path):
    cube = trimesh.creation.box(extents=(0.2, 0.2, 0.2))  # a 20 cm cube, stored y-up as OBJ files are
    matrix = np.eye(4)
    matrix[:3, 3] = [0.05, -0.02, 1.0]  # OpenCV camera: 1 m ahead, a bit right and up
    write_capture(
        tmp_path / "caps" / "cube",
        cube,
        opencv_mask(cube.vertices, cube.faces, matrix),
        {"matrix": matrix.tolist(), "convention": "opencv"},
    )
    report = build_captures(tmp_path / "caps", tmp_path / "out")
    assert report.written == 1 and not report.skipped
    s = SampleDataset(tmp_path / "out")[0]
    # By hand: local = (x, -z, y) of the file (y-up -> z-up), p_p3d = diag(-1, -1, 1) p_opencv. With row vectors
    # p_cam = (p_local * 0.2) @ R + t, R = (C A turn^T)^T = [[-1, 0, 0], [0, 0, -1], [0, -1, 0]].
    assert s.rotation == pytest.approx(np.array([[-1.0, 0, 0], [0, 0, -1], [0, -1, 0]]))
    assert s.scale == pytest.approx([0.2, 0.2, 0.2])
    assert s.translation == pytest.approx([-0.05, 0.02, 1.0])
    assert len(s.occupancy) == 64**3 - 62**3  # the cube fills the grid's outer layer
    assert s.provenance["pose_source"] == "given" and s.provenance["mask_iou"] >= 0.98
    assert s.K == pytest.approx(K) and s.source == "capture" and s.amodal_mask is None


def test_fitted_pose_reaches_a_high_silhouette_iou(tmp_path):
    box = trimesh.creation.box(extents=(0.3, 0.18, 0.09))  # asymmetric, so the silhouette pins the pose
    turn = trimesh.transformations.rotation_matrix(0.7, [0.3, 1.0, 0.2])[:3, :3]
    matrix = np.eye(4)
    matrix[:3, :3] = turn
    matrix[:3, 3] = [0.02, 0.01, 0.8]
    mask = opencv_mask(box.vertices, box.faces, matrix)
    write_capture(tmp_path / "caps" / "box", box, mask)
    fit = FitSettings(directions=16, rolls=6, top_k=2, refine_evals=60, fine_evals=60)
    report = build_captures(tmp_path / "caps", tmp_path / "out", CaptureSettings(fit=fit))
    assert report.written == 1, report.messages
    s = SampleDataset(tmp_path / "out")[0]
    assert s.provenance["pose_source"] == "fitted" and s.provenance["fit_iou"] >= 0.9
    assert s.scale == pytest.approx([0.3] * 3)  # the mesh's real size (metres); the fit moves depth, not size
    assert s.translation[2] == pytest.approx(0.8, rel=0.05)
    # the stored pose re-projects onto the mask
    from sam3d_core.data.meshio import load_asset

    asset = load_asset(tmp_path / "caps" / "box" / "mesh.obj")
    sil = frames.render_silhouette((asset.vertices * s.scale) @ s.rotation + s.translation, asset.faces, K, W, H)
    assert frames.mask_iou(sil, mask) == pytest.approx(s.provenance["fit_iou"], abs=2e-3)


def test_bad_capture_folders_are_counted_and_the_rest_is_built(tmp_path):
    cube = trimesh.creation.box(extents=(0.2, 0.2, 0.2))
    matrix = np.eye(4)
    matrix[2, 3] = 1.0
    mask = opencv_mask(cube.vertices, cube.faces, matrix)
    pose = {"matrix": matrix.tolist()}
    caps = tmp_path / "caps"
    write_capture(caps / "good", cube, mask, pose)
    write_capture(caps / "no_mask", cube, mask, pose)
    (caps / "no_mask" / "mask.png").unlink()
    write_capture(caps / "broken_mesh", cube, mask, pose)
    (caps / "broken_mesh" / "mesh.obj").write_text("v 1 2\nf x y z\n")
    write_capture(caps / "no_faces", cube, mask, pose)
    (caps / "no_faces" / "mesh.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    write_capture(caps / "bad_pose", cube, mask, {"matrix": [[1, 0], [0, 1]]})
    report = build_captures(caps, tmp_path / "out")
    assert report.written == 1
    assert report.skipped == {
        "photo without mask": 1,
        "unreadable mesh": 1,
        "mesh without faces": 1,
        "bad pose.json": 1,
    }
    assert any(m.startswith("no_mask: has a photo but no mask.png") for m in report.messages)
    assert SampleDataset(tmp_path / "out").ids() == ["good"]
