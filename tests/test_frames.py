"""Frames and cameras: conversions, pose encoding, posed Gaussians, and placement reprojected onto the mask.

The placement test builds a scene the way a photo is made: an asymmetric closed mesh in the model's local
frame, a ground-truth pose, a mask and depth map ray-cast in the OpenCV frame (written here, independent of
`sam3d_core.geometry.frames`), the official point-map normalisation, encode/decode of the pose latents, then each
convention's placement projected back onto the photo.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sam3d_core.geometry import frames
from sam3d_core.geometry.gaussians import Gaussians
from sam3d_core.geometry.layout import (
    ROT6D_MEAN,
    ROT6D_STD,
    Pose,
    decode_pose,
    encode_pose,
    matrix_to_quaternion,
    quaternion_invert,
    quaternion_multiply,
    quaternion_to_matrix,
    rotation_6d_to_matrix,
)
from sam3d_core.inputs import camera
from sam3d_core.pipeline.preprocess import normalize_pointmap

W, H = 160, 100  # non-square photo
K = np.array([[150.0, 0.0, 91.3], [0.0, 138.0, 42.6], [0.0, 0.0, 1.0]])  # fx != fy, principal point off-centre
# The official to_glb turns z-up into y-up with row vectors: v_gltf = v_local @ TO_GLB, (x, y, z) -> (x, z, -y).
TO_GLB = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


def _axis_rotation(axis, angle: float) -> np.ndarray:
    """Column-vector rotation by `angle` (radians, right hand) about `axis` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    cross = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def _random_rotations(n: int, seed: int) -> torch.Tensor:
    q = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return quaternion_to_matrix(q / q.norm(dim=-1, keepdim=True))


# ---------------------------------------------------------------------------------------------------
# Conversions
# ---------------------------------------------------------------------------------------------------


def test_frames_imports_without_torch():
    code = "import sys, sam3d_core.geometry.frames; sys.exit(any(m.split('.')[0] == 'torch' for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True)
    assert result.returncode == 0, "sam3d_core.geometry.frames must stay numpy-only: Blender's Python imports it"


def test_conversions_are_rotations_and_round_trip():
    for name in ("LOCAL_TO_GLTF_LOCAL", "P3D_TO_OPENCV", "P3D_TO_GLTF", "GLTF_TO_BLENDER", "P3D_TO_BLENDER"):
        m = getattr(frames, name)
        np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-12, err_msg=name)
        assert np.linalg.det(m) == pytest.approx(1.0), f"{name} mirrors: every frame here is right-handed"
    np.testing.assert_allclose(frames.LOCAL_TO_GLTF_LOCAL @ frames.GLTF_LOCAL_TO_LOCAL, np.eye(3))
    np.testing.assert_allclose(frames.GLTF_TO_BLENDER @ frames.BLENDER_TO_GLTF, np.eye(3))
    pts = np.random.default_rng(0).normal(size=(5, 3))
    for src in frames.CONVENTIONS:
        for dst in frames.CONVENTIONS:
            back = frames.convert_points(frames.convert_points(pts, src, dst), dst, src)
            np.testing.assert_allclose(back, pts, atol=1e-12)


@pytest.mark.parametrize(
    "p3d, opencv, gltf, blender",
    [
        # straight ahead 2 m: OpenCV +z, glTF -z (its camera looks down -z), Blender +Y (camera looks along +Y)
        ((0, 0, 2), (0, 0, 2), (0, 0, -2), (0, 2, 0)),
        # to the camera's left (PyTorch3D +x): OpenCV -x (x right), glTF -x, Blender -X
        ((1, 0, 0), (-1, 0, 0), (-1, 0, 0), (-1, 0, 0)),
        # up (PyTorch3D +y): OpenCV -y (y down), glTF +y, Blender +Z (z up)
        ((0, 1, 0), (0, -1, 0), (0, 1, 0), (0, 0, 1)),
    ],
)
def test_named_directions(p3d, opencv, gltf, blender):
    for conv, expected in (("opencv", opencv), ("gltf", gltf), ("blender", blender), ("pytorch3d", p3d)):
        np.testing.assert_allclose(frames.convert_points([p3d], "pytorch3d", conv)[0], expected, atol=1e-12)


def test_local_to_gltf_local_is_the_official_glb_rotation():
    v = np.random.default_rng(1).uniform(-0.5, 0.5, size=(20, 3))
    np.testing.assert_allclose(v @ frames.LOCAL_TO_GLTF_LOCAL.T, v @ TO_GLB)
    # Up in the model (local +z) is up in the y-up GLB (+y).
    np.testing.assert_allclose(frames.LOCAL_TO_GLTF_LOCAL @ [0, 0, 1], [0, 1, 0])
    # Blender's importer ((x, y, z) -> (x, -z, y)) undoes it: imported vertices are the local coordinates.
    np.testing.assert_allclose(frames.GLTF_TO_BLENDER @ frames.LOCAL_TO_GLTF_LOCAL, np.eye(3), atol=1e-12)


def _decoded_pose(seed: int = 0, b: int = 1) -> Pose:
    g = torch.Generator().manual_seed(seed)
    latents = {
        "6drotation_normalized": torch.randn(b, 1, 6, generator=g),
        "scale": (0.3 * torch.randn(b, 1, 1, generator=g)).expand(b, 1, 3),
        "translation": torch.randn(b, 1, 3, generator=g),
    }
    return decode_pose(latents, torch.full((3,), 1.7), torch.tensor([0.2, -0.1, 3.0]))


def test_pose_matrix_equals_pose_as_matrix_and_apply():
    pose = _decoded_pose(3)
    m = frames.pose_matrix(pose.rotation[0], pose.translation[0], pose.scale[0])
    np.testing.assert_allclose(m, pose.as_matrix()[0].numpy(), atol=1e-6)
    pts = torch.rand(9, 3) - 0.5
    np.testing.assert_allclose(frames.transform_points(m, pts), pose.apply(pts).numpy(), atol=1e-5)
    scalar = frames.pose_matrix(pose.rotation[0], pose.translation[0], float(pose.scale[0, 0]))
    np.testing.assert_allclose(scalar, m, atol=1e-6)


def test_object_gltf_and_blender_matrices_agree():
    pose = _decoded_pose(4)[0].as_matrix()[0].numpy()
    v = np.random.default_rng(2).uniform(-0.5, 0.5, size=(30, 3))
    p3d = frames.transform_points(pose, v)
    for conv in frames.CONVENTIONS:
        np.testing.assert_allclose(
            frames.transform_points(frames.object_matrix(pose, conv), v), frames.convert_points(p3d, "pytorch3d", conv)
        )
    # glTF node over y-up stored vertices == object matrix over local vertices.
    np.testing.assert_allclose(
        frames.transform_points(frames.gltf_node_matrix(pose), v @ TO_GLB),
        frames.transform_points(frames.object_matrix(pose, "gltf"), v),
        atol=1e-12,
    )
    # Blender's importer conjugates node matrices by its axis turn: a scene GLB lands where blender_object_matrix says.
    c = frames.homogeneous(frames.GLTF_TO_BLENDER)
    np.testing.assert_allclose(c @ frames.gltf_node_matrix(pose) @ c.T, frames.blender_object_matrix(pose), atol=1e-12)
    # A uniform scale stays TRS-decomposable (glTF requires it): linear part = scale * rotation.
    lin = frames.gltf_node_matrix(pose)[:3, :3]
    s = np.cbrt(np.linalg.det(lin))
    np.testing.assert_allclose((lin / s) @ (lin / s).T, np.eye(3), atol=1e-6)


def test_project_points_inverts_pointmap_from_depth():
    rng = np.random.default_rng(3)
    depth = rng.uniform(1.0, 5.0, size=(H, W)).astype(np.float32)
    pm = camera.pointmap_from_depth(depth, K)  # [H, W, 3] PyTorch3D frame
    uv = frames.project_points(pm.reshape(-1, 3), K).reshape(H, W, 2)
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    np.testing.assert_allclose(uv[..., 0], jj, atol=1e-3)
    np.testing.assert_allclose(uv[..., 1], ii, atol=1e-3)
    for conv in frames.CONVENTIONS:
        pts = frames.convert_points(pm.reshape(-1, 3), "pytorch3d", conv)
        np.testing.assert_allclose(frames.project_points_from(pts, K, conv), uv.reshape(-1, 2), atol=1e-3)


# ---------------------------------------------------------------------------------------------------
# Cameras
# ---------------------------------------------------------------------------------------------------


def _blender_view_frame_projection(cam: dict, points_world: np.ndarray) -> np.ndarray:
    """Pixels [N, 2] of Blender-world points under Blender's camera definitions (`Camera.view_frame` and
    `world_to_camera_view`): camera looks down its local -Z with +Y up; with sensor fit HORIZONTAL the frame
    at unit depth is sensor_width / lens wide, its height follows the render aspect (resolution x pixel
    aspect), and shift_x / shift_y move it by that fraction of its WIDTH."""
    m = np.array(cam["matrix_world"])
    local = (points_world - m[:3, 3]) @ m[:3, :3]  # inverse of a rigid matrix
    depth = -local[:, 2]
    width_frame = cam["sensor_width_mm"] / cam["lens_mm"]
    aspect = (cam["resolution_y"] * cam["pixel_aspect_y"]) / (cam["resolution_x"] * cam["pixel_aspect_x"])
    height_frame = width_frame * aspect
    x = (local[:, 0] / depth - cam["shift_x"] * width_frame) / width_frame + 0.5  # 0 = left edge
    y = (local[:, 1] / depth - cam["shift_y"] * width_frame) / height_frame + 0.5  # 0 = bottom edge
    return np.stack([x * cam["resolution_x"], (1 - y) * cam["resolution_y"]], axis=1)


@pytest.mark.parametrize(
    "k",
    [
        K,
        np.array([[120.0, 0, 70.0], [0, 180.0, 61.0], [0, 0, 1]]),
        np.array([[200.0, 0, 80], [0, 200.0, 50], [0, 0, 1]]),
    ],
)
def test_blender_camera_reproduces_k(k):
    cam = frames.blender_camera(k, W, H)
    json.dumps(cam)  # plain JSON for the worker protocol
    assert cam["sensor_fit"] == "HORIZONTAL"
    assert min(cam["pixel_aspect_x"], cam["pixel_aspect_y"]) == 1.0
    m = np.array(cam["matrix_world"])
    np.testing.assert_allclose(-m[:3, 2], [0, 1, 0], atol=1e-12)  # the camera looks along +Y
    np.testing.assert_allclose(m[:3, 1], [0, 0, 1], atol=1e-12)  # with Blender's +Z up
    rng = np.random.default_rng(4)
    p3d = np.stack([rng.uniform(-1, 1, 50), rng.uniform(-1, 1, 50), rng.uniform(1.5, 6, 50)], axis=1)
    world = frames.convert_points(p3d, "pytorch3d", "blender")
    np.testing.assert_allclose(_blender_view_frame_projection(cam, world), frames.project_points(p3d, k), atol=1e-9)


def test_blender_camera_known_values():
    k = np.array([[640.0, 0, 320.0], [0, 640.0, 200.0], [0, 0, 1]])
    cam = frames.blender_camera(k, 640, 400, sensor_width_mm=36.0)
    assert cam["lens_mm"] == pytest.approx(36.0)  # fx = W: horizontal field of view 2 atan(1/2)
    assert cam["shift_x"] == 0.0 and cam["shift_y"] == 0.0  # centred principal point
    cam = frames.blender_camera(k + np.array([[0, 0, -64.0], [0, 0, 40.0], [0, 0, 0]]), 640, 400)
    # Principal point 64 px left of centre: the frame moves right by 64/640 of its width; 40 px down: down by 40/640.
    assert cam["shift_x"] == pytest.approx(0.1) and cam["shift_y"] == pytest.approx(40 / 640)


def test_gltf_camera_matches_k_for_a_centred_principal_point():
    k = np.array([[150.0, 0.0, W / 2], [0.0, 120.0, H / 2], [0.0, 0.0, 1.0]])
    cam = frames.gltf_camera(k, W, H)
    json.dumps(cam)
    persp = cam["perspective"]
    assert cam["type"] == "perspective" and persp["znear"] > 0
    np.testing.assert_allclose(cam["extras"]["K"], k)
    # glTF 2.0 perspective projection (spec, section "Projection Matrices"), then NDC -> pixels.
    t = math.tan(persp["yfov"] / 2)
    rng = np.random.default_rng(5)
    pts = np.stack([rng.uniform(-1, 1, 40), rng.uniform(-1, 1, 40), -rng.uniform(1.5, 6, 40)], axis=1)
    ndc_x = pts[:, 0] / (persp["aspectRatio"] * t * -pts[:, 2])
    ndc_y = pts[:, 1] / (t * -pts[:, 2])
    uv = np.stack([(ndc_x + 1) / 2 * W, (1 - ndc_y) / 2 * H], axis=1)
    np.testing.assert_allclose(uv, frames.project_points_from(pts, k, "gltf"), atol=1e-9)


# ---------------------------------------------------------------------------------------------------
# Silhouettes
# ---------------------------------------------------------------------------------------------------


def test_rasterize_counts_pixel_centres_inside():
    # Right triangle with legs 10: centres (j + .5, i + .5) with j + i + 1 <= 10, both windings.
    expected = sum(1 for i in range(12) for j in range(12) if i + j + 1 <= 10)
    uv = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    for faces in ([[0, 1, 2]], [[0, 2, 1]]):
        mask = frames.rasterize_triangles(uv, np.array(faces), 12, 12)
        assert mask.sum() == expected and mask[0, 0] and not mask[11, 0]
    # A quad partly outside the image is clipped; a face dropped by `keep` draws nothing.
    quad = np.array([[-5.0, -5.0], [5.0, -5.0], [5.0, 5.0], [-5.0, 5.0]])
    mask = frames.rasterize_triangles(quad, np.array([[0, 1, 2], [0, 2, 3]]), 8, 6)
    assert mask.sum() == 25 and mask[:5, :5].all()
    assert not frames.rasterize_triangles(quad, np.array([[0, 1, 2]]), 8, 6, keep=np.array([False])).any()


def test_mask_iou():
    a = np.zeros((4, 5), bool)
    b = a.copy()
    a[:2], b[1:3] = True, True
    assert frames.mask_iou(a, b) == pytest.approx(5 / 15)
    assert frames.mask_iou(a, a) == 1.0 and frames.mask_iou(~a & a, ~a & a) == 1.0


# ---------------------------------------------------------------------------------------------------
# The placement test
# ---------------------------------------------------------------------------------------------------


def _torus(major: float, minor: float, n_major: int = 24, n_minor: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """A closed torus about the z axis: vertices [n_major * n_minor, 3], faces [2 * that, 3]."""
    u, v = np.meshgrid(
        np.arange(n_major) * 2 * np.pi / n_major, np.arange(n_minor) * 2 * np.pi / n_minor, indexing="ij"
    )
    ring = major + minor * np.cos(v)
    verts = np.stack([ring * np.cos(u), ring * np.sin(u), minor * np.sin(v)], -1).reshape(-1, 3)
    i, j = np.meshgrid(np.arange(n_major), np.arange(n_minor), indexing="ij")
    a, b = i * n_minor + j, (i + 1) % n_major * n_minor + j
    c, d = (i + 1) % n_major * n_minor + (j + 1) % n_minor, i * n_minor + (j + 1) % n_minor
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return verts, faces


def _box(extents, centre) -> tuple[np.ndarray, np.ndarray]:
    """A closed axis-aligned box: 8 vertices, 12 triangles."""
    corners = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    quads = [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]]
    faces = np.array([[q[0], q[1], q[2]] for q in quads] + [[q[0], q[2], q[3]] for q in quads])
    return corners * extents + centre, faces


def _object_mesh() -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric closed mesh in the model's local frame (z up): a tilted torus plus an off-centre bar."""
    torus_v, torus_f = _torus(0.24, 0.07)
    torus_v = torus_v @ _axis_rotation([1, 0.3, 0], 0.5).T + [-0.08, 0.02, 0.0]
    bar_v, bar_f = _box([0.1, 0.36, 0.1], [0.3, 0.12, 0.18])
    vertices = np.concatenate([torus_v, bar_v])
    assert np.abs(vertices).max() < 0.5
    return vertices, np.concatenate([torus_f, bar_f + len(torus_v)])


def _ray_cast(vertices_cv: np.ndarray, faces: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit of the ray through every pixel centre (OpenCV frame, camera at the origin), Moller-Trumbore.

    Returns hit [H, W] bool and depth [H, W] (z of the hit; rays have direction z = 1, so z = ray parameter)."""
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    dirs = np.stack([(jj - k[0, 2]) / k[0, 0], (ii - k[1, 2]) / k[1, 1], np.ones_like(jj)], -1).reshape(-1, 3)
    depth = np.full(len(dirs), np.inf)
    # Cull rays that miss the mesh's bounding box (slab test at the box's depth range).
    lo, hi = vertices_cv.min(0), vertices_cv.max(0)
    x_range = np.stack([dirs[:, 0] * lo[2], dirs[:, 0] * hi[2]], 1)
    y_range = np.stack([dirs[:, 1] * lo[2], dirs[:, 1] * hi[2]], 1)
    near = (x_range.max(1) >= lo[0]) & (x_range.min(1) <= hi[0]) & (y_range.max(1) >= lo[1]) & (y_range.min(1) <= hi[1])
    rays = np.nonzero(near)[0]
    v0, v1, v2 = (vertices_cv[faces[:, i]] for i in range(3))
    e1, e2 = v1 - v0, v2 - v0  # [F, 3]
    qvec = np.cross(-v0, e1)  # [F, 3]; the origin is 0, so tvec = -v0
    for start in range(0, len(rays), 512):
        d = dirs[rays[start : start + 512]]  # [R, 3]
        pvec = np.cross(d[:, None, :], e2[None])  # [R, F, 3]
        det = np.einsum("rfc,fc->rf", pvec, e1)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / det
            u = np.einsum("rfc,fc->rf", pvec, -v0) * inv
            v = (d @ qvec.T) * inv
            t = (qvec * e2).sum(-1)[None] * inv
        ok = (np.abs(det) > 1e-12) & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
        depth[rays[start : start + 512]] = np.where(ok, t, np.inf).min(1)
    return np.isfinite(depth).reshape(H, W), depth.reshape(H, W)


@pytest.fixture(scope="module")
def photo():
    """Ground truth: mesh, pose, and the ray-cast mask, depth and point map of the photo."""
    v_local, faces = _object_mesh()
    rot = _axis_rotation([0.3, 1.0, -0.4], 2.1) @ _axis_rotation([1, 0, 0], -1.2)  # row-vector R
    scale, trans = 0.9, np.array([0.1, -0.06, 1.5])  # PyTorch3D camera frame: left of centre, below, 1.5 ahead
    v_p3d = (v_local * scale) @ rot + trans
    hit, depth_obj = _ray_cast(v_p3d * [-1.0, -1.0, 1.0], faces, K)  # PyTorch3D -> OpenCV: x and y negate
    # A tilted back wall behind the object gives the scene a finite depth everywhere.
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    normal = np.array([0.15, -0.2, 1.0])
    wall = 4.0 / (normal[0] * (jj - K[0, 2]) / K[0, 0] + normal[1] * (ii - K[1, 2]) / K[1, 1] + normal[2])
    mask = hit & (depth_obj < wall)
    depth = np.where(mask, depth_obj, wall)
    assert 0.05 < mask.mean() < 0.6 and not mask[0].any() and not mask[-1].any()  # whole object in view
    return {"v": v_local, "faces": faces, "rot": rot, "scale": scale, "trans": trans, "mask": mask, "depth": depth}


def _silhouette(vertices_frame: np.ndarray, faces: np.ndarray, convention: str) -> np.ndarray:
    uv = frames.project_points_from(vertices_frame, K, convention)
    in_front = frames.convert_points(vertices_frame, convention, "opencv")[:, 2] > 0
    return frames.rasterize_triangles(uv, faces, W, H, keep=in_front[faces].all(1))


def test_placement_reprojects_onto_the_mask(photo):
    # 1. The point map of the photo (PyTorch3D frame) is the ray-cast surface.
    pm = camera.pointmap_from_depth(photo["depth"].astype(np.float32), K)
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    hits_cv = (
        np.stack([(jj - K[0, 2]) / K[0, 0], (ii - K[1, 2]) / K[1, 1], np.ones_like(jj)], -1) * photo["depth"][..., None]
    )
    np.testing.assert_allclose(pm, hits_cv * [-1.0, -1.0, 1.0], rtol=1e-5, atol=1e-5)
    # 2. Official normalisation, then the pose -> latents -> pose round trip.
    mask_t = torch.from_numpy(photo["mask"])
    _, sigma, shift = normalize_pointmap(torch.from_numpy(pm).permute(2, 0, 1), mask_t)
    assert torch.isfinite(sigma).all() and sigma[0] > 0
    truth = Pose(
        torch.tensor(photo["rot"])[None],
        matrix_to_quaternion(torch.tensor(photo["rot"]))[None],
        torch.tensor(photo["trans"])[None],
        torch.full((1, 3), photo["scale"], dtype=torch.float64),
    )
    latents = encode_pose(truth, sigma, shift)
    # Object-centric normalisation: the object sits near the origin of the normalised frame.
    assert latents["translation"].abs().max() < 0.5
    pose = decode_pose(latents, sigma, shift)
    torch.testing.assert_close(pose.rotation[0].double(), truth.rotation[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(pose.translation[0].double(), truth.translation[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pose.scale[0].double(), truth.scale[0], atol=1e-5, rtol=1e-5)
    # 3. Place with the decoded pose in every convention and reproject.
    m = pose.as_matrix()[0].numpy()
    sil = frames.render_silhouette(frames.transform_points(m, photo["v"]), photo["faces"], K, W, H)
    assert frames.mask_iou(sil, photo["mask"]) >= 0.97
    for conv in frames.CONVENTIONS:
        placed = frames.transform_points(frames.object_matrix(m, conv), photo["v"])
        iou = frames.mask_iou(_silhouette(placed, photo["faces"], conv), photo["mask"])
        assert iou >= 0.97, f"{conv}: IoU {iou:.3f}"
    # The test can fail: a y-up GLB posed without undoing the turn, or a mirrored frame, misses the mask.
    wrong = frames.transform_points(m, photo["v"] @ TO_GLB)
    assert frames.mask_iou(frames.render_silhouette(wrong, photo["faces"], K, W, H), photo["mask"]) < 0.8
    mirrored = frames.transform_points(frames.object_matrix(m, "gltf"), photo["v"])
    assert frames.mask_iou(_silhouette(mirrored, photo["faces"], "pytorch3d"), photo["mask"]) < 0.8


def _read_glb_json(data: bytes) -> dict:
    magic, _, _ = struct.unpack_from("<4sII", data, 0)
    length, kind = struct.unpack_from("<I4s", data, 12)
    assert magic == b"glTF" and kind == b"JSON"
    return json.loads(data[20 : 20 + length])


def test_placement_through_a_gltf_scene(photo, tmp_path):
    trimesh = pytest.importorskip("trimesh")
    pose = frames.pose_matrix(photo["rot"], photo["trans"], photo["scale"])
    scene = trimesh.Scene()
    stored = trimesh.Trimesh(photo["v"] @ TO_GLB, photo["faces"], process=False)  # y-up, as the official GLB
    scene.add_geometry(stored, node_name="object", geom_name="object", transform=frames.gltf_node_matrix(pose))
    scene.camera = trimesh.scene.Camera(resolution=(W, H), fov=(60.0, 40.0))
    scene.camera_transform = np.eye(4)  # our glTF world is the photo camera's frame

    def use_our_camera(tree: dict) -> None:  # trimesh writes aspectRatio = xfov / yfov; glTF wants the tan ratio
        tree["cameras"] = [frames.gltf_camera(K, W, H) | {"name": "photo"}]

    data = trimesh.exchange.gltf.export_glb(scene, tree_postprocessor=use_our_camera)
    (tmp_path / "scene.glb").write_bytes(data)
    loaded = trimesh.load(tmp_path / "scene.glb", force="scene")
    np.testing.assert_allclose(loaded.camera_transform, np.eye(4), atol=1e-6)
    cam = _read_glb_json((tmp_path / "scene.glb").read_bytes())["cameras"][0]
    k_back = np.array(cam["extras"]["K"])
    np.testing.assert_allclose(k_back, K)
    (node,) = loaded.graph.nodes_geometry
    transform, geom_name = loaded.graph[node]
    mesh = loaded.geometry[geom_name]
    world = frames.transform_points(transform, mesh.vertices)  # our glTF world = the glTF camera frame
    iou = frames.mask_iou(_silhouette(world, np.asarray(mesh.faces), "gltf"), photo["mask"])
    assert iou >= 0.97, f"glTF scene: IoU {iou:.3f}"


# ---------------------------------------------------------------------------------------------------
# Pose encoding
# ---------------------------------------------------------------------------------------------------


def test_encode_pose_inverts_decode_pose():
    b = 4
    rot = _random_rotations(b, seed=6)
    scale = torch.tensor([0.3, 1.0, 2.5, 0.05], dtype=torch.float64)[:, None].expand(b, 3)
    pose = Pose(rot, matrix_to_quaternion(rot), torch.randn(b, 3, dtype=torch.float64) + 2, scale)
    sigma = torch.tensor([[0.7], [1.9], [3.0], [1.0]]).expand(b, 3)
    shift = torch.randn(b, 3)
    latents = encode_pose(pose, sigma, shift, downsample_factor=2.0)
    assert {k: tuple(v.shape) for k, v in latents.items()} == {
        "6drotation_normalized": (b, 1, 6),
        "scale": (b, 1, 3),
        "translation": (b, 1, 3),
    }
    back = decode_pose(latents, sigma, shift, downsample_factor=2.0)
    torch.testing.assert_close(back.rotation.double(), rot, atol=2e-6, rtol=0)
    torch.testing.assert_close(back.translation.double(), pose.translation, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back.scale.double(), scale, atol=1e-6, rtol=1e-5)
    # Latents -> pose -> latents: the 6D is canonical (two orthonormal columns), scale and translation return.
    raw = {
        "6drotation_normalized": torch.randn(b, 1, 6),
        "scale": (0.2 * torch.randn(b, 1, 1)).expand(b, 1, 3),
        "translation": torch.randn(b, 1, 3),
    }
    again = encode_pose(decode_pose(raw, sigma, shift), sigma, shift)
    torch.testing.assert_close(again["scale"], raw["scale"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again["translation"], raw["translation"], atol=1e-5, rtol=1e-5)
    std, mean = torch.tensor(ROT6D_STD), torch.tensor(ROT6D_MEAN)
    torch.testing.assert_close(
        rotation_6d_to_matrix(again["6drotation_normalized"] * std + mean),
        rotation_6d_to_matrix(raw["6drotation_normalized"] * std + mean),
        atol=1e-5,
        rtol=0,
    )


# ---------------------------------------------------------------------------------------------------
# Posed Gaussians
# ---------------------------------------------------------------------------------------------------


def _gaussians(m: int = 40) -> Gaussians:
    g = torch.Generator().manual_seed(7)
    scaling = 2.0 * torch.randn(m, 3, generator=g)
    scaling[:5] = -5.0  # tiny Gaussians: the posed scale clamps to 1.1 * min_kernel
    return Gaussians(
        _xyz=torch.rand(m, 3, generator=g),
        _features_dc=torch.randn(m, 1, 3, generator=g),
        _scaling=scaling,
        _rotation=torch.randn(m, 4, generator=g) * 0.5,
        _opacity=torch.randn(m, 1, generator=g),
    )


def _covariance(gs: Gaussians) -> torch.Tensor:
    """Sigma = R_g diag(s^2) R_g^T [M, 3, 3] (3DGS, column vectors), float64."""
    r = quaternion_to_matrix(gs.get_rotation.double())
    return r @ torch.diag_embed(gs.get_scaling.double().square()) @ r.transpose(-1, -2)


def test_quaternion_multiply_composes_rotations():
    g = torch.Generator().manual_seed(10)
    a, b = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    ab = quaternion_multiply(a, b)
    torch.testing.assert_close(quaternion_to_matrix(ab), quaternion_to_matrix(a) @ quaternion_to_matrix(b))
    assert (ab[:, 0] >= 0).all()
    torch.testing.assert_close(quaternion_to_matrix(quaternion_invert(a)), quaternion_to_matrix(a).transpose(-1, -2))


def test_posed_gaussians_follow_the_pose():
    gs = _gaussians()
    pose = _decoded_pose(8)
    s = float(pose.scale[0, 0])
    posed = gs.posed(pose)
    torch.testing.assert_close(posed.get_xyz, pose.apply(gs.get_xyz), atol=1e-5, rtol=1e-5)
    assert posed.min_kernel_size == pytest.approx(gs.min_kernel_size * s)
    # Row vectors x' = s x R + t: the covariance becomes s^2 R^T Sigma R.
    big = (gs.get_scaling > 1.1 * gs.min_kernel_size).all(-1)
    assert 0 < big.sum() < len(gs)
    r = pose.rotation[0].double()
    expected = s**2 * r.T @ _covariance(gs) @ r
    torch.testing.assert_close(_covariance(posed)[big], expected[big], atol=1e-9, rtol=1e-4)
    # Tiny ones clamp to 1.1 * the scaled 3D filter (official make_scene rule).
    posed_scales = posed.get_scaling.double()
    clamp = torch.maximum(gs.get_scaling.double() * s, torch.tensor(1.1 * gs.min_kernel_size * s))
    torch.testing.assert_close(posed_scales, clamp, atol=1e-9, rtol=1e-4)
    # The official rotation rule, q' = q_pose^-1 (x) q_g, as plain Hamilton products.
    q = quaternion_multiply(quaternion_invert(pose.quaternion.double()), gs.get_rotation.double())
    dots = (posed.get_rotation.double() * q).sum(-1).abs()
    torch.testing.assert_close(dots, torch.ones_like(dots), atol=1e-5, rtol=0)
    torch.testing.assert_close(posed.get_opacity, gs.get_opacity)
    torch.testing.assert_close(posed.colors, gs.colors)


def test_posed_gaussians_in_gltf_world(tmp_path):
    gs = _gaussians()
    pose = _decoded_pose(9)
    p3d, gltf = gs.posed(pose), gs.posed(pose, "gltf")
    flip = torch.tensor(frames.P3D_TO_GLTF)
    torch.testing.assert_close(gltf.get_xyz.double(), p3d.get_xyz.double() @ flip.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_covariance(gltf), flip @ _covariance(p3d) @ flip.T, atol=1e-9, rtol=1e-4)
    gltf.save_ply(tmp_path / "scene.ply")  # the posed Gaussians still write a valid 3DGS PLY
    assert (tmp_path / "scene.ply").stat().st_size > 40 * 17 * 4


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: frames.object_matrix(np.eye(4), "unity"), "convention"),
        (lambda: frames.object_matrix(np.eye(3), "gltf"), "pose"),
        (lambda: frames.object_matrix(np.ones((4, 4)), "gltf"), "last row"),
        (lambda: frames.project_points(np.zeros((3, 2)), K), "points_p3d"),
        (lambda: frames.project_points(np.zeros((3, 3)), np.eye(4)), "K"),
        (lambda: frames.blender_camera(K + [[0, 3.0, 0], [0, 0, 0], [0, 0, 0]], W, H), "skew"),
        (lambda: frames.blender_camera(K, 0, H), "width"),
        (lambda: frames.gltf_camera(K, W, H, znear=0.0), "znear"),
        (lambda: frames.rasterize_triangles(np.zeros((3, 2)), np.array([[0, 1, 5]]), 4, 4), "faces"),
        (lambda: frames.mask_iou(np.zeros((2, 3)), np.zeros((3, 2))), "shapes"),
        (lambda: frames.pose_matrix(np.eye(3), [0, 0], 1.0), "translation"),
        (lambda: frames.pose_matrix(np.eye(3), [0, 0, 1], [1.0, 2.0]), "scale"),
        (
            lambda: encode_pose(_decoded_pose(), torch.tensor([1.0, 2.0, 1.0]), torch.zeros(3)),
            "pointmap_scale",
        ),
        (
            lambda: encode_pose(
                Pose(-torch.eye(3)[None], torch.zeros(1, 4), torch.zeros(1, 3), torch.ones(1, 3)),
                torch.ones(3),
                torch.zeros(3),
            ),
            "proper rotation",
        ),
        (lambda: _gaussians().posed(_decoded_pose(b=2)), "pose"),
        (lambda: _gaussians().posed(_decoded_pose(), "unity"), "convention"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_addon_camera_copy_agrees_with_frames():
    """The add-on keeps a stdlib copy of `blender_camera` (Blender gets no numpy from us) for photos the
    worker has not answered for yet; it must give the same camera."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "addon" / "sam3d_blender" / "core" / "camera.py"
    spec = importlib.util.spec_from_file_location("addon_core_camera", path)
    addon_camera = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(addon_camera)
    for K, w, h in (
        ([[500.0, 0, 331.0], [0, 460.0, 180.0], [0, 0, 1]], 640, 400),
        ([[900.0, 0, 300.0], [0, 900.0, 200.0], [0, 0, 1]], 600, 400),
    ):
        ours, theirs = frames.blender_camera(np.array(K), w, h), addon_camera.blender_camera_from_K(K, w, h)
        assert theirs.keys() <= ours.keys()  # frames adds sensor_height_mm and resolution_percentage
        for key in theirs:
            value = ours[key]
            if isinstance(value, str):
                assert theirs[key] == value, key
            else:
                np.testing.assert_allclose(np.asarray(theirs[key], float), np.asarray(value, float), err_msg=key)
