"""`LatentEncoder.encode_sample`: the target latents of a mesh + occupancy, with the views, rendering, visibility
and feature conventions checked against independent computations (trimesh ray casting, frames' silhouettes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from sam3d_core.data.latents import (
    DELIT,
    HEADLIGHT,
    LatentEncoder,
    Views,
    one_colour,
    project,
    render,
    render_batch,
    render_mesh,
    sphere_views,
)
from sam3d_core.geometry import frames

LO, HI = 20, 44  # the box covers voxels 20..43 on each axis: its faces lie on voxel boundaries


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention on a shared CPU
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoder() -> LatentEncoder:
    return LatentEncoder.from_random("tiny", seed=0).with_views(24)


def _box() -> tuple[trimesh.Trimesh, np.ndarray, np.ndarray]:
    """A box mesh on voxel boundaries, its solid occupancy and its outer voxel layer (what the views can see)."""
    lo, hi = LO / 64 - 0.5, HI / 64 - 0.5
    mesh = trimesh.creation.box(bounds=[[lo] * 3, [hi] * 3])
    solid = np.stack(np.meshgrid(*[np.arange(LO, HI)] * 3, indexing="ij"), -1).reshape(-1, 3)
    outer = solid[((solid == LO) | (solid == HI - 1)).any(1)]
    return mesh, solid, outer


def test_encode_sample_keeps_exactly_the_visible_voxels(encoder):
    mesh, solid, outer = _box()
    rng = np.random.default_rng(0)
    out = encoder.encode_sample(mesh, rng.permutation(solid))  # any row order
    assert out["ss_latent"].shape == (8, 16, 16, 16) and out["ss_latent"].dtype == np.float32
    assert np.isfinite(out["ss_latent"]).all()
    # hand-computed: the centre of an outer voxel lies half a voxel under a face; the next layer 1.5 voxels
    # (beyond the one-voxel tolerance from every side), so the visible voxels are exactly the outer layer
    assert out["slat_coords"].dtype == np.int64
    assert out["slat_coords"].tolist() == sorted(outer.tolist())
    assert out["slat_feats"].shape == (len(outer), 8) and out["slat_feats"].dtype == np.float32
    assert np.isfinite(out["slat_feats"]).all() and out["slat_feats"].std() > 0
    again = encoder.encode_sample(mesh, solid)
    for key in out:
        np.testing.assert_array_equal(out[key], again[key])


def test_voxel_features_average_the_views_that_see_the_voxel(encoder):
    mesh, solid, outer = _box()
    feats, counts = encoder.voxel_features(mesh, solid)
    inner = ~((solid == LO) | (solid == HI - 1)).any(1)
    assert (counts[inner] == 0).all() and (feats[inner] == 0).all()
    assert (counts[~inner] >= 1).all() and counts.max() <= encoder.cfg.num_views
    corner = np.flatnonzero((solid == [LO, LO, LO]).all(1))[0]
    face_centre = np.flatnonzero((solid == [LO + 12, LO + 12, HI - 1]).all(1))[0]  # the middle of the top face
    # a face's middle is seen from the hemisphere above it: about half the views on a sphere
    assert 0.25 * encoder.cfg.num_views <= counts[face_centre] <= 0.75 * encoder.cfg.num_views
    assert counts[corner] >= 1
    assert feats.shape == (len(solid), encoder.cfg.dino.embed_dim) and np.isfinite(feats).all()


def _first_hit(origin: np.ndarray, dirs: np.ndarray, tri: np.ndarray) -> np.ndarray:
    """Moller-Trumbore: smallest t > 0 with origin + t dir on a triangle, per ray; inf when none. tri [F, 3, 3]."""
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]  # [F, 3]
    p = np.cross(dirs[:, None], e2[None])  # [R, F, 3]
    det = (p * e1[None]).sum(-1)
    s = origin - tri[:, 0]  # [F, 3]
    u = (p * s[None]).sum(-1) / det
    q = np.cross(s, e1)  # [F, 3]
    v = (dirs[:, None] * q[None]).sum(-1) / det
    t = (q[None] * e2[None]).sum(-1) / det
    ok = (np.abs(det) > 1e-12) & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
    return np.where(ok, t, np.inf).min(1)


def test_rendered_depth_matches_ray_casting_and_the_silhouette_matches_frames(encoder):
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.35)
    rmesh = render_mesh(mesh)
    views = encoder.views
    s = views.size
    for i in (0, 7):
        rgb, depth = render(rmesh, views, i, HEADLIGHT)
        w2c = views.world_to_camera[i].double().numpy()
        # silhouette: frames' numpy rasterizer of the same mesh in the PyTorch3D camera frame
        cam_p3d = (mesh.vertices @ w2c[:3, :3].T + w2c[:3, 3]) @ frames.P3D_TO_OPENCV.T
        sil = frames.render_silhouette(cam_p3d, mesh.faces, views.K.double().numpy(), s, s)
        assert frames.mask_iou(sil, np.isfinite(depth.numpy())) > 0.97
        # depth: the camera z of the first hit of the ray through each pixel centre
        rows, cols = np.nonzero(np.isfinite(depth.numpy()))
        pick = np.random.default_rng(i).choice(len(rows), 40, replace=False)
        px = np.stack([cols[pick] + 0.5, rows[pick] + 0.5, np.ones(40)], 1)
        dirs_cam = px @ np.linalg.inv(views.K.double().numpy()).T  # z = 1
        origin = -w2c[:3, :3].T @ w2c[:3, 3]
        dirs = dirs_cam @ w2c[:3, :3]  # to the local frame
        t_hit = _first_hit(origin, dirs, mesh.vertices[mesh.faces])  # ray parameter: dirs have camera z = 1
        hit = np.isfinite(t_hit)
        assert hit.sum() >= 36  # pixel centres on the silhouette's rim may miss
        z_ours = depth.numpy()[rows[pick], cols[pick]]
        np.testing.assert_allclose(z_ours[hit], t_hit[hit], rtol=0, atol=5e-4)  # 1/256-pixel vertex snapping
        lit = rgb[:, np.isfinite(depth.numpy())]
        assert (lit > 0).all() and (rgb[:, ~np.isfinite(depth.numpy())] == 0).all()  # grey + headlight, black bg
    # the encoder renders its views in batches: each exactly the view rendered alone
    rgbs, depths = render_batch(rmesh, views, [7, 0, 3], HEADLIGHT)
    assert rgbs.shape == (3, 3, s, s) and rgbs.is_contiguous() and depths.shape == (3, s, s)
    for b, i in enumerate((7, 0, 3)):
        rgb, depth = render(rmesh, views, i, HEADLIGHT)
        assert torch.equal(rgbs[b], rgb) and torch.equal(depths[b], depth)
    assert not torch.equal(depths[0], depths[1])


def test_texture_uv_orientation_and_vertex_colours():
    # a camera above the origin looking down -z: image right = +x, image down = -y (the pole fallback up = +y)
    w2c = torch.tensor([[1.0, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 2], [0, 0, 0, 1]])
    size = 40
    focal = size / 2 / np.tan(np.radians(20))
    views = Views(w2c[None], torch.tensor([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1.0]]), size)
    ref = sphere_views(2, 40.0, 2.0, size, 0)
    assert torch.allclose(project(torch.zeros(1, 3), ref)[0], torch.full((2, 1, 2), size / 2))  # looks at the origin
    quad_v = np.array([[-0.4, -0.4, 0], [0.4, -0.4, 0], [0.4, 0.4, 0], [-0.4, 0.4, 0]])
    quad_f = np.array([[0, 1, 2], [0, 2, 3]])
    # texture: left half (u < 0.5) red, right half blue; top rows (v > 0.5) with green added
    tex = np.zeros((8, 8, 3), np.uint8)
    tex[:, :4, 0] = 255
    tex[:, 4:, 2] = 255
    tex[:4, :, 1] = 255
    visual = trimesh.visual.TextureVisuals(uv=np.array([[0, 0], [1, 0], [1, 1], [0, 1.0]]), image=Image.fromarray(tex))
    mesh = trimesh.Trimesh(quad_v, quad_f, visual=visual, process=False)
    rgb, depth = render(render_mesh(mesh), views, 0, DELIT)
    c = size // 2
    q = 6  # well inside each quadrant of the quad (which spans pixels ~ 9..31)
    top_left, top_right = rgb[:, c - q, c - q], rgb[:, c - q, c + q]
    bottom_left = rgb[:, c + q, c - q]
    torch.testing.assert_close(top_left, torch.tensor([1.0, 1.0, 0.0]))  # x < 0, y > 0: red + green
    torch.testing.assert_close(top_right, torch.tensor([0.0, 1.0, 1.0]))  # x > 0: blue + green
    torch.testing.assert_close(bottom_left, torch.tensor([1.0, 0.0, 0.0]))  # y < 0: no green
    assert float(depth[c, c]) == pytest.approx(2.0, abs=1e-5)
    # vertex colours: interpolated, exact at a constant colour
    coloured = trimesh.Trimesh(quad_v, quad_f, vertex_colors=np.tile([[0, 255, 0, 255]], (4, 1)), process=False)
    rgb, _ = render(render_mesh(coloured), views, 0, DELIT)
    torch.testing.assert_close(rgb[:, c, c], torch.tensor([0.0, 1.0, 0.0]))
    # face colours keep each face's colour; one colour everywhere picks the headlight
    faced = trimesh.Trimesh(quad_v, quad_f, face_colors=[[255, 0, 0, 255], [0, 0, 255, 255]], process=False)
    rgb, _ = render(render_mesh(faced), views, 0, DELIT)
    torch.testing.assert_close(rgb[:, c + q, c + q + 2], torch.tensor([1.0, 0.0, 0.0]))  # face 0 is below the diagonal
    assert (
        one_colour(render_mesh(coloured)) and not one_colour(render_mesh(faced)) and not one_colour(render_mesh(mesh))
    )


def test_bad_inputs_name_the_problem(encoder):
    mesh, solid, _ = _box()
    with pytest.raises(ValueError, match="without faces"):
        encoder.encode_sample(trimesh.Trimesh(vertices=np.zeros((3, 3))), solid)
    with pytest.raises(ValueError, match=r"expected the local frame \[-0.5, 0.5\]\^3"):
        encoder.encode_sample(trimesh.creation.box(extents=(2, 2, 2)), solid)
    with pytest.raises(ValueError, match="expected integer voxel indices"):
        encoder.encode_sample(mesh, solid.astype(np.float32))
    with pytest.raises(ValueError, match=r"indices span 21\.\.64, expected 0\.\.63"):
        encoder.encode_sample(mesh, solid + 1 + (solid == HI - 1) * 20)
    with pytest.raises(ValueError, match="none of its 1 voxels is visible"):
        encoder.encode_sample(mesh, np.array([[32, 32, 32]]))  # deep inside the closed box


def test_provenance_names_the_weights_and_views(encoder):
    p = encoder.provenance
    assert p["encoders"] == "random:tiny:0" and p["num_views"] == 24 and p["dino_image_size"] == 70
