"""Stage 1 alone -> a textured mesh (export/project.py): the occupancy surface, the photo projected into its
texture, and the pipeline path without stage 2 (tiny random model on CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("skimage", reason="the occupancy surface needs scikit-image: pip install 'sam3d[export]'")
pytest.importorskip("xatlas")
pytest.importorskip("fast_simplification")
trimesh = pytest.importorskip("trimesh")
from scipy.spatial import cKDTree

from sam3d_core.cli.main import main
from sam3d_core.cli.reconstruct import EXAMPLE_MASK, EXAMPLE_PHOTO
from sam3d_core.export.bake import sample_texture
from sam3d_core.export.cleanup import face_area_vectors
from sam3d_core.export.gltf import TexturedMesh
from sam3d_core.export.project import PhotoProjection, SilhouetteCarve, occupancy_surface, project_texture
from sam3d_core.export.uv import decimate_and_unwrap
from sam3d_core.geometry import frames
from sam3d_core.models.ss_vae import cap_voxels
from sam3d_core.pipeline.reconstruct import Pipeline

R = 64
VOXEL = 1.0 / R
RED, BLUE = (220, 30, 30), (30, 30, 220)


def _centres() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = (np.arange(R) + 0.5) / R - 0.5  # voxel centres in the local frame
    return np.meshgrid(c, c, c, indexing="ij")


def _sphere_logits(radius: float, kind: str = "sdf") -> np.ndarray:
    x, y, z = _centres()
    d = np.sqrt(x * x + y * y + z * z)
    if kind == "sdf":  # a smooth decoder: logit proportional to the signed distance (2 per voxel)
        return (radius - d) / VOXEL * 2.0
    if kind == "binary":  # an overconfident one: +-5, nothing in between
        return np.where(d < radius, 5.0, -5.0)
    # surface-only occupancy (the official decoder, our data by default): a shell about one voxel thick
    return np.where(np.abs(d - radius) < 0.75 * VOXEL, 5.0, -5.0)


BOX_HALF = np.array([0.3, 0.3, 0.3])


def _box_logits(half: np.ndarray = BOX_HALF) -> np.ndarray:
    x, y, z = _centres()
    q = np.abs(np.stack([x, y, z], -1)) - half
    sdf = np.linalg.norm(np.maximum(q, 0), axis=-1) + np.minimum(q.max(-1), 0)  # exact box SDF, > 0 outside
    return -sdf / VOXEL * 2.0


def _box_distance(p: np.ndarray, half: np.ndarray = BOX_HALF) -> np.ndarray:
    q = np.abs(p) - half
    return np.abs(np.linalg.norm(np.maximum(q, 0), axis=-1) + np.minimum(q.max(-1), 0))


def _edge_counts(f: np.ndarray) -> np.ndarray:
    e = np.sort(f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    return np.unique(e, axis=0, return_counts=True)[1]


def _volume(v: np.ndarray, f: np.ndarray) -> float:
    return float((face_area_vectors(v, f) * v[f].mean(1)).sum() / 6)


# ---------------------------------------------------------------------------------------------------------
# the surface


@pytest.mark.parametrize("kind, mean_err, max_err", [("sdf", 0.05, 0.1), ("binary", 0.25, 0.5)])
def test_sphere_surface_is_close_to_the_sphere_closed_and_outward(kind, mean_err, max_err):
    radius = 0.3
    v, f = occupancy_surface(_sphere_logits(radius, kind))
    err = np.abs(np.linalg.norm(v, axis=1) - radius) / VOXEL  # in voxels
    assert err.mean() < mean_err and err.max() < max_err, (err.mean(), err.max())
    assert set(_edge_counts(f).tolist()) == {2}  # watertight: every edge between exactly two faces
    volume = _volume(v, f)  # > 0: faces wind counter-clockwise seen from outside
    assert abs(volume - 4 / 3 * np.pi * radius**3) < 0.02 * volume


def test_surface_only_occupancy_is_filled_to_one_outer_surface():
    """A shell (no interior) gives one closed outer surface at the shell's outside, not an outer and an inner one."""
    radius = 0.3
    v, f = occupancy_surface(_sphere_logits(radius, "shell"))
    r = np.linalg.norm(v, axis=1)
    assert r.min() > radius and r.max() < radius + 1.5 * VOXEL, (r.min() / VOXEL, r.max() / VOXEL)
    assert set(_edge_counts(f).tolist()) == {2} and _volume(v, f) > 0
    hollow, _ = occupancy_surface(_sphere_logits(radius, "shell"), fill=False)
    assert np.linalg.norm(hollow, axis=1).min() < radius - 0.5 * VOXEL  # without the fill: the inner surface too


def test_box_surface_hausdorff_and_chamfer_bounds_and_face_budget():
    v, f = occupancy_surface(_box_logits())
    to_box = _box_distance(v.astype(np.float64)) / VOXEL  # surface -> box
    rng = np.random.default_rng(0)
    pts = rng.uniform(-1, 1, (20000, 3)) * BOX_HALF
    axis = rng.integers(0, 3, len(pts))
    pts[np.arange(len(pts)), axis] = np.sign(rng.uniform(-1, 1, len(pts))) * BOX_HALF[axis]  # on the box's faces
    to_mesh = cKDTree(v).query(pts)[0] / VOXEL  # box -> surface vertices
    assert to_box.max() < 1.0 and to_mesh.max() < 1.0, (to_box.max(), to_mesh.max())  # Hausdorff < 1 voxel
    assert to_box.mean() + to_mesh.mean() < 0.5  # Chamfer (mean both ways) < half a voxel
    uv, report = decimate_and_unwrap(v, f, target_faces=2000, texture_size=256)
    assert 1000 <= len(uv.faces) <= 2000 and report["faces_out"] == len(uv.faces)
    assert set(_edge_counts(uv.vmapping[uv.faces]).tolist()) == {2}  # still closed (UV seams welded by vmapping)
    assert _box_distance(uv.vertices.astype(np.float64)).max() < 1.5 * VOXEL


def test_thin_rod_survives_the_smoothing_and_isolated_voxels_do_not():
    logits = np.full((R, R, R), -4.0)
    logits[32, 32, 10:54] = 4.0  # a rod one voxel thick
    logits[5, 5, 5] = 4.0  # a lone voxel
    v, f = occupancy_surface(logits)
    z = v[:, 2]
    assert z.min() < (10 - 32 + 0.5) * VOXEL and z.max() > (53 - 32 + 0.5) * VOXEL  # the rod's whole length
    assert np.linalg.norm(v - ((np.array([5, 5, 5]) + 0.5) * VOXEL - 0.5), axis=1).min() > 10 * VOXEL


def test_capped_voxels_move_the_surface_as_the_cap_does():
    """With cap_voxels' factor 2 the surface lands where the capped voxels are (the pose's scale is doubled)."""
    half = np.array([0.35, 0.25, 0.12])
    logits = _box_logits(half)
    coords = np.argwhere(logits > 0)
    capped, factor = cap_voxels(
        torch.from_numpy(np.c_[np.zeros(len(coords)), coords]).int(), max_voxels=len(coords) - 1
    )
    assert factor == 2
    v, _ = occupancy_surface(logits, downsample_factor=2)
    c = capped[:, 1:].numpy()
    voxel_lo, voxel_hi = c.min(0) * VOXEL - 0.5, (c.max(0) + 1) * VOXEL - 0.5  # the capped voxels' outer faces
    assert np.abs(v.min(0) - voxel_lo).max() < VOXEL and np.abs(v.max(0) - voxel_hi).max() < VOXEL
    full, _ = occupancy_surface(logits)
    ratio = (v.max(0) - v.min(0)) / (full.max(0) - full.min(0))
    assert np.all((ratio > 0.4) & (ratio < 0.5)), ratio  # about half on every axis: (size / 2 - 1) / (size - 1)


def test_surface_errors_name_the_problem():
    with pytest.raises(ValueError, match="no voxel has a positive occupancy logit"):
        occupancy_surface(np.full((R, R, R), -1.0))
    with pytest.raises(ValueError, match=r"expected a cubic grid \[R, R, R\]"):
        occupancy_surface(np.ones((64, 64, 32)))
    bad = _sphere_logits(0.3)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        occupancy_surface(bad)


# ---------------------------------------------------------------------------------------------------------
# the projected texture: a box turned 45 degrees about the vertical in front of the camera; the photo's left half
# is red, its right half blue, so the box's front-left face must come out red and its front-right face blue


W, H = 320, 240
K = np.array([[300.0, 0.0, W / 2], [0.0, 300.0, H / 2], [0.0, 0.0, 1.0]])


def _box_pose() -> np.ndarray:
    up = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # local z up -> camera y up
    a = np.deg2rad(45.0)
    yaw = np.array([[np.cos(a), 0.0, np.sin(a)], [0.0, 1.0, 0.0], [-np.sin(a), 0.0, np.cos(a)]])
    return frames.homogeneous(yaw @ up * 1.2, [0.0, 0.0, 3.0])  # scale 1.2, 3 units in front


def _photo() -> np.ndarray:
    img = np.empty((H, W, 3), np.uint8)
    img[:, : W // 2], img[:, W // 2 :] = RED, BLUE
    return img


@pytest.fixture(scope="module")
def box():
    v, f = occupancy_surface(_box_logits())
    uv, _ = decimate_and_unwrap(v, f, target_faces=4000, texture_size=256)
    pose = _box_pose()
    exact = trimesh.creation.box(extents=2 * BOX_HALF)
    mask = frames.render_silhouette(frames.transform_points(pose, exact.vertices), exact.faces, K, W, H)
    mesh, stats = project_texture(uv.vertices, uv.faces, uv.uvs, _photo(), mask, pose, K, texture_size=256)
    return uv, pose, mask, mesh, stats


def _face_colours(mesh: TexturedMesh, pose: np.ndarray):
    """Per face: the texture's colour (0..255) at its centroid, its normal in the camera frame, its centroid."""
    centroid_uv = mesh.uvs[mesh.faces].mean(1)
    colour = sample_texture(mesh.texture, centroid_uv, convention="gltf") * 255.0
    n = face_area_vectors(mesh.vertices.astype(np.float64), mesh.faces)
    n_cam = n @ pose[:3, :3].T
    n_cam /= np.linalg.norm(n_cam, axis=1, keepdims=True)
    return colour, n_cam, mesh.vertices[mesh.faces].mean(1)


def _face_interior(centroid: np.ndarray, axis: int) -> np.ndarray:
    """Faces away from the box's edges (3 voxels), where one face's texels are not mixed with another's."""
    others = [a for a in range(3) if a != axis]
    return (np.abs(centroid[:, others]) < BOX_HALF[others] - 3 * VOXEL).all(1)


def test_visible_faces_take_the_photo_colour_exactly(box):
    uv, pose, mask, mesh, stats = box
    assert isinstance(mesh, TexturedMesh) and mesh.texture.shape == (256, 256, 3) and mesh.texture.dtype == np.uint8
    colour, n_cam, centroid = _face_colours(mesh, pose)
    toward = -n_cam[:, 2]  # > 0: facing the camera (p3d z points away from it)
    # p3d x points left: the front-left face's normal has x > 0 and lies in the photo's left (red) half
    left = (toward > 0.6) & (n_cam[:, 0] > 0.6)
    right = (toward > 0.6) & (n_cam[:, 0] < -0.6)
    local_axis = lambda sel: int(np.abs(face_area_vectors(mesh.vertices, mesh.faces[sel]).sum(0)).argmax())  # noqa: E731
    left &= _face_interior(centroid, local_axis(left))
    right &= _face_interior(centroid, local_axis(right))
    assert left.sum() > 50 and right.sum() > 50
    # sRGB in, sRGB out: no gamma on the way (a linear <-> sRGB slip moves 220 by ~20 or more)
    assert np.abs(colour[left] - RED).max() < 6, colour[left].mean(0)
    assert np.abs(colour[right] - BLUE).max() < 6, colour[right].mean(0)
    assert 0.2 < stats["visible_fraction"] < 0.6  # the two front faces of six, with their gutters


def test_hidden_faces_continue_the_nearest_seen_colour_not_black(box):
    uv, pose, mask, mesh, _ = box
    colour, n_cam, centroid = _face_colours(mesh, pose)
    back = n_cam[:, 2] > 0.6  # facing away from the camera
    assert back.sum() > 50
    assert colour[back].max(1).min() > 100  # red, blue or (at the back edge) between them: none dark
    c_cam = frames.transform_points(pose, centroid)
    # the back faces next to the left corner (p3d x > 0, far left) continue the red face, the right ones the blue
    far_left, far_right = back & (c_cam[:, 0] > 0.25), back & (c_cam[:, 0] < -0.25)
    assert far_left.sum() > 10 and far_right.sum() > 10
    assert np.abs(colour[far_left] - RED).max() < 40 and np.abs(colour[far_right] - BLUE).max() < 40


def test_visibility_is_a_depth_test_inside_the_mask(box):
    uv, pose, mask, mesh, _ = box
    src = PhotoProjection(uv.vertices, uv.faces, _photo(), mask, pose, K)
    toward_camera = np.linalg.inv(pose[:3, :3]) @ np.array([0.0, 0.0, -1.0])  # local direction to the camera
    toward_camera /= np.linalg.norm(toward_camera)
    front = -0.45 * np.array([1.0, 1.0, 0.0])  # the local corner nearest the camera is (-x, -y) or (+x, +y)
    front *= np.sign(front @ toward_camera)
    near_pt, far_pt = front + [0, 0, 0.1], -front + [0, 0, 0.1]  # front corner region vs back corner region
    # points on the actual surface: the mesh vertices nearest these positions
    tree = cKDTree(uv.vertices)
    near_v, far_v = uv.vertices[tree.query(near_pt)[1]], uv.vertices[tree.query(far_pt)[1]]
    seen, px = src.visible(np.stack([near_v, far_v]).astype(np.float64))
    assert seen.tolist() == [True, False]  # the back corner projects inside the mask but lies behind the front
    col, row = px[1].astype(int)
    assert mask[row, col]
    outside = PhotoProjection(uv.vertices, uv.faces, _photo(), np.zeros_like(mask), pose, K)
    assert not outside.visible(uv.vertices.astype(np.float64))[0].any()  # no mask: nothing is seen
    # ...and then every colour is the mask-less fallback: the photo's mean, not black
    assert np.allclose(outside.colors(uv.vertices[:5]), _photo().reshape(-1, 3).mean(0) / 255, atol=1e-6)


def test_placed_mesh_silhouette_matches_the_mask(box):
    uv, pose, mask, mesh, _ = box
    sil = frames.render_silhouette(frames.transform_points(pose, mesh.vertices), mesh.faces, K, W, H)
    assert frames.mask_iou(sil, mask) > 0.95


# ---------------------------------------------------------------------------------------------------------
# carving to the mask's silhouette cone


def _silhouette(v, f, pose):
    return frames.render_silhouette(frames.transform_points(pose, v), f, K, W, H)


@pytest.fixture(scope="module")
def blob():
    """A sphere of radius 0.48 (a small model's blob) where the photo shows the box (half 0.3), same pose."""
    return _sphere_logits(0.48), _box_pose(), box_mask()


def box_mask() -> np.ndarray:
    exact = trimesh.creation.box(extents=2 * BOX_HALF)
    return frames.render_silhouette(frames.transform_points(_box_pose(), exact.vertices), exact.faces, K, W, H)


def test_carving_cuts_a_blob_down_to_the_photos_outline(blob):
    logits, pose, mask = blob
    v0, f0 = occupancy_surface(logits)
    carve = SilhouetteCarve(pose, K, mask)
    v1, f1 = occupancy_surface(logits, carve=carve)
    before, after = frames.mask_iou(_silhouette(v0, f0, pose), mask), frames.mask_iou(_silhouette(v1, f1, pose), mask)
    assert before < 0.75 and after > 0.85, (before, after)  # the outline, within a voxel (the carving's margin)
    assert carve.report["removed"] > 0 and carve.report["margin_pixels"] >= 1
    assert (_edge_counts(f1) == 2).all() and _volume(v1, f1) < _volume(v0, f0)  # closed, and smaller
    # what is kept lies inside the blob: carving only removes
    assert (np.linalg.norm(v1, axis=1) < 0.48 + 2 * VOXEL).all()


def test_what_an_occluder_hides_is_kept(blob):
    """The right half of the box is behind something nearer (the point map says so): its mask pixels are missing,
    but the blob there is not cut; without the point map it is."""
    logits, pose, mask = blob
    visible = mask.copy()
    visible[:, W // 2 :] = False
    pointmap = np.full((H, W, 3), np.inf, np.float32)
    pointmap[:, W // 2 :] = (0.0, 0.0, 1.0)  # an occluder at depth 1, in front of the object at about 3
    right = np.zeros_like(mask)
    right[:, W // 2 + 4 :] = True
    kept = _silhouette(*occupancy_surface(logits, carve=SilhouetteCarve(pose, K, visible, pointmap)), pose)
    cut = _silhouette(*occupancy_surface(logits, carve=SilhouetteCarve(pose, K, visible)), pose)
    assert (kept & right).sum() > 0.9 * (mask & right).sum()
    assert (cut & right).sum() == 0


def test_carving_keeps_what_it_cannot_see_and_never_empties_a_shape(blob):
    logits, pose, mask = blob
    carve = SilhouetteCarve(pose, K, mask)
    off = np.array([[5.0, 0.0, 0.0], [0.0, 0.0, -10.0]])  # off the photo's edge, behind the camera
    assert carve(frames.transform_points(np.linalg.inv(pose), off)).all()
    nothing = np.zeros_like(mask)
    v0, f0 = occupancy_surface(logits)
    v1, f1 = occupancy_surface(logits, carve=SilhouetteCarve(pose, K, nothing))
    np.testing.assert_array_equal(v1, v0)  # it would drop every cell: nothing is dropped
    with pytest.raises(ValueError, match="pointmap"):
        SilhouetteCarve(pose, K, mask, np.zeros((2, 2, 3)))


def test_growing_first_brings_back_what_a_small_blob_misses():
    """A blob smaller than the object (radius 0.24 where the photo shows a box of half 0.3): carving alone can only
    cut; grown by 3 voxels first, the solid reaches further out and the carve trims it to the outline again."""
    logits, pose, mask = _sphere_logits(0.24), _box_pose(), box_mask()
    plain = _silhouette(*occupancy_surface(logits, carve=SilhouetteCarve(pose, K, mask)), pose)
    carve = SilhouetteCarve(pose, K, mask, grow=3)
    grown = _silhouette(*occupancy_surface(logits, carve=carve), pose)
    assert frames.mask_iou(grown, mask) > frames.mask_iou(plain, mask) + 0.1
    assert (grown & ~mask).sum() < 0.1 * grown.sum()  # still inside the outline (within the carve's margin)
    v0, _ = occupancy_surface(logits)
    v1, _ = occupancy_surface(logits, carve=SilhouetteCarve(pose, K, np.zeros_like(mask), grow=3))
    np.testing.assert_array_equal(v1, v0)  # the carve would drop every cell: nothing dropped, nothing grown
    with pytest.raises(ValueError, match="grow"):
        SilhouetteCarve(pose, K, mask, grow=-1)


def test_the_benchmark_carves_as_the_pipeline():
    from sam3d_core.evaluation.run import EvalSettings
    from sam3d_core.export.project import CARVE_GROW

    assert EvalSettings().carve_grow == CARVE_GROW == Pipeline.load("tiny", "cpu", stage2=False)[0].carve_grow


def test_capped_carving_keeps_the_caps_map(blob):
    """With the cap's factor 2 the map comes from the uncarved occupancy: what is kept does not move."""
    logits, pose, mask = blob
    v0, _ = occupancy_surface(logits, downsample_factor=2)
    v1, f1 = occupancy_surface(logits, downsample_factor=2, carve=lambda p: p[:, 0] < 0.0)  # keep one half
    assert v1[:, 0].max() < 0.0 + 2 * VOXEL
    assert v1[:, 0].min() == pytest.approx(v0[:, 0].min(), abs=0.5 * VOXEL)  # the kept side stays put


# ---------------------------------------------------------------------------------------------------------
# the pipeline without stage 2


@pytest.fixture(scope="module")
def pipe():
    p, _ = Pipeline.load("tiny", "cpu", stage2=False)
    assert p.stage2 is None and not p.voxels_only
    return p


def test_pipeline_without_stage2_writes_a_textured_glb(pipe, tmp_path):
    ctx = pipe.open_photo(EXAMPLE_PHOTO, depth_model="none")
    mask = pipe.load_mask(ctx, EXAMPLE_MASK)
    seen = []
    (res,) = pipe.reconstruct(
        ctx, [mask], seed=42, steps=1, texture_size=64, faces=500, progress=lambda *a: seen.append(a[0])
    )
    assert isinstance(res.mesh, TexturedMesh) and res.gaussians is None
    assert res.mesh.texture.shape == (64, 64, 3) and len(res.mesh.faces) <= 500
    assert [s for i, s in enumerate(seen) if s not in seen[:i]] == [
        "preprocess",
        "stage1",
        "postprocess",
        "bake",
        "export",
    ]
    assert res.settings["texture"].startswith("projected") and res.report["projection"]["seen_pixels"] > 0
    assert res.report["carve"]["points"] > 0  # carved to the mask by default (Pipeline.carve)
    sil = frames.render_silhouette(
        frames.transform_points(res.pose_matrix, res.mesh.vertices), res.mesh.faces, ctx.K, ctx.width, ctx.height
    )
    assert res.mask_iou == pytest.approx(frames.mask_iou(sil, mask))  # reported as for stage 2's meshes
    scene = pipe.export(ctx, [res], tmp_path / "out")
    obj = scene["objects"][0]
    assert obj["mesh_glb"] == "object_0.glb" and "glb" not in obj and "gaussians_ply" not in obj
    loaded = trimesh.load(tmp_path / "out" / "object_0.glb", force="mesh")
    assert isinstance(loaded.visual, trimesh.visual.TextureVisuals)
    assert loaded.visual.material.baseColorTexture.size == (64, 64) and len(loaded.faces) == len(res.mesh.faces)
    assert (tmp_path / "out" / "scene.glb").is_file()


def test_cli_no_stage2_and_voxels_flags(tmp_path, capsys):
    """--no-stage2: the projected-texture mesh (NAME.glb, no PLY); --voxels: the stage-1 voxels as before."""
    common = [str(EXAMPLE_PHOTO), "--mask", str(EXAMPLE_MASK), "--model", "tiny", "--device", "cpu", "--steps", "1"]
    small = ["--texture-size", "64", "--faces", "500"]
    assert main(["reconstruct", *common, "--out", str(tmp_path / "a"), "--no-stage2", *small]) == 0
    assert "textured by projecting the photo" in capsys.readouterr().err
    record = json.loads((tmp_path / "a" / "scene.json").read_text())["objects"][0]
    assert record["mesh_glb"] == "object_0.glb" and "gaussians_ply" not in record
    # --no-carve: the whole occupancy's surface; carving can only take away from the reprojected silhouette
    assert main(["reconstruct", *common, "--out", str(tmp_path / "c"), "--no-stage2", "--no-carve", *small]) == 0
    uncarved = json.loads((tmp_path / "c" / "scene.json").read_text())["objects"][0]
    assert uncarved["mask_iou"] != record["mask_iou"]
    assert main(["reconstruct", *common, "--out", str(tmp_path / "b"), "--voxels"]) == 0
    record = json.loads((tmp_path / "b" / "scene.json").read_text())["objects"][0]
    assert record["glb"] == "object_0_voxels.glb" and "mesh_glb" not in record
