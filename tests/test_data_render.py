"""The training-view renderer: masks against the projected mesh, exact depth and point map, occluders, textures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam3d_core.data.meshio import Asset, asset_from_arrays
from sam3d_core.data.render import Light, Placed, RenderMesh, render_view
from sam3d_core.data.synth import look_rotation, random_rotation
from sam3d_core.geometry import frames

trimesh = pytest.importorskip("trimesh")
K = np.array([[420.0, 0.0, 259.0], [0.0, 410.0, 250.0], [0.0, 0.0, 1.0]])


def posed(asset, R, t, s):
    return (asset.vertices * s) @ R + t


@pytest.mark.parametrize("shape", ["sphere", "box", "torus"])
def test_rendered_mask_matches_the_projected_mesh(shape):
    mesh = {
        "sphere": trimesh.creation.icosphere(subdivisions=3),
        "box": trimesh.creation.box(extents=(1.0, 0.4, 0.7)),
        "torus": trimesh.creation.torus(0.4, 0.15),
    }[shape]
    asset = asset_from_arrays(shape, mesh.vertices, mesh.faces)
    R, t, s = random_rotation(np.random.default_rng(7)), np.array([0.12, -0.05, 2.4]), 0.9
    view = render_view([Placed(RenderMesh.from_asset(asset), R, t, s)], K, 518, 518)
    want = frames.render_silhouette(posed(asset, R, t, s), asset.faces, K, 518, 518)
    assert want.sum() > 5000
    assert frames.mask_iou(view.mask, want) >= 0.98
    assert np.array_equal(view.mask, view.amodal) and np.array_equal(view.mask, view.coverage)


def test_depth_and_point_map_are_exact_on_a_tilted_plane():
    quad = asset_from_arrays("quad", [[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], [[0, 1, 2], [0, 2, 3]])
    R = look_rotation(0.3, 0.5)  # seen at an angle: depth varies across the image
    t = np.array([0.0, 0.0, 3.0])
    k = np.array([[150.0, 0.0, 80.0], [0.0, 150.0, 60.0], [0.0, 0.0, 1.0]])
    view = render_view([Placed(RenderMesh.from_asset(quad), R, t, 2.0)], k, 120, 160)
    ii, jj = np.nonzero(view.mask)
    assert len(ii) > 2000
    p = view.pointmap[ii, jj].astype(np.float64)
    # every point lies on the plane, projects to its own pixel centre, and its z is the depth
    normal = R.T @ np.array([0.0, 0.0, 1.0])  # the local z axis in the camera frame (row-vector pose)
    assert np.abs((p - t) @ normal).max() < 1e-4
    uv = frames.project_points(p, k)
    assert np.abs(uv - np.stack([jj + 0.5, ii + 0.5], 1)).max() < 1e-2
    assert np.allclose(view.depth[ii, jj], p[:, 2]) and np.isinf(view.depth[~view.mask]).all()


def test_an_occluder_cuts_the_visible_mask_but_not_the_amodal_one():
    sphere = trimesh.creation.icosphere(subdivisions=2)
    target = RenderMesh.from_asset(asset_from_arrays("t", sphere.vertices, sphere.faces, [0.9, 0.1, 0.1]))
    blocker = RenderMesh.from_asset(asset_from_arrays("o", sphere.vertices, sphere.faces, [0.1, 0.1, 0.9]))
    a = Placed(target, np.eye(3), np.array([0.0, 0.0, 3.0]), 1.0)
    b = Placed(blocker, np.eye(3), np.array([0.2, 0.0, 1.5]), 0.3)
    k = np.array([[200.0, 0.0, 130.0], [0.0, 200.0, 100.0], [0.0, 0.0, 1.0]])
    both = render_view([a, b], k, 200, 260)
    alone = render_view([a], k, 200, 260)
    front = render_view([b], k, 200, 260)
    assert np.array_equal(both.amodal, alone.mask)
    assert np.array_equal(both.mask, alone.mask & ~front.mask)
    assert 0 < both.mask.sum() < alone.mask.sum()
    # occluder pixels show the occluder's colour; the target's show red
    assert both.rgb[front.mask & alone.mask][:, 2].mean() > both.rgb[front.mask & alone.mask][:, 0].mean()


def test_texture_lookup_is_upright():
    # A quad facing the camera with a 2 x 2 texture: top-left red, top-right green, bottom-left blue, white.
    v = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], float)  # local x right, y up (seen from +z)
    tex = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], np.uint8)
    asset = Asset(
        name="q",
        vertices=v / 2,
        faces=np.array([[0, 1, 2], [0, 2, 3]]),
        colors=np.ones((4, 3), np.float32),
        size=2.0,
        centre=np.zeros(3),
        uvs=np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float32),
        face_texture=np.zeros(2, np.int64),
        textures=[tex],
    )
    # Camera looking at the quad's front (local +z towards the camera): P3D x left = local -x, y up = local y.
    R = np.array([[-1.0, 0, 0], [0, 1, 0], [0, 0, -1]])
    view = render_view(
        [Placed(RenderMesh.from_asset(asset), R, np.array([0, 0, 3.0]), 2.0)],
        K,
        500,
        518,
        light=Light(np.array([0, 0, -1.0]), ambient=1.0, diffuse=0.0),
    )
    ii, jj = np.nonzero(view.mask)
    top, left = ii.min() + 20, jj.min() + 20
    bottom, right = ii.max() - 20, jj.max() - 20
    assert view.rgb[top, left].tolist() == [255, 0, 0]
    assert view.rgb[top, right].tolist() == [0, 255, 0]
    assert view.rgb[bottom, left].tolist() == [0, 0, 255]
    assert view.rgb[bottom, right].tolist() == [255, 255, 255]


@pytest.mark.gpu
def test_cuda_renders_the_same_masks_as_the_cpu():
    mesh = trimesh.creation.icosphere(subdivisions=4)
    asset = asset_from_arrays("s", mesh.vertices, mesh.faces)
    R, t = random_rotation(np.random.default_rng(1)), np.array([0.1, 0.0, 2.0])
    cpu = render_view([Placed(RenderMesh.from_asset(asset), R, t, 1.0)], K, 518, 518)
    gpu = render_view([Placed(RenderMesh.from_asset(asset, "cuda"), R, t, 1.0)], K, 518, 518)
    assert torch.cuda.is_available()
    assert np.array_equal(cpu.mask, gpu.mask)
    assert np.abs(cpu.rgb.astype(int) - gpu.rgb.astype(int)).max() <= 1


def test_textured_glb_loads_with_its_texture_and_renders_it(tmp_path):
    from PIL import Image

    from sam3d_core.data.meshio import load_asset

    quad = trimesh.Trimesh([[-1, 0, -1], [1, 0, -1], [1, 0, 1], [-1, 0, 1]], [[0, 1, 2], [0, 2, 3]], process=False)
    image = Image.fromarray(np.full((8, 8, 3), [30, 200, 90], np.uint8))
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=image)
    quad.visual = trimesh.visual.TextureVisuals(uv=[[0, 0], [1, 0], [1, 1], [0, 1]], material=material)
    quad.export(tmp_path / "quad.glb")
    asset = load_asset(tmp_path / "quad.glb")  # the file is y-up: its xz-plane quad lies in the local xy plane
    assert len(asset.textures) == 1 and asset.uvs.shape == (4, 2) and (asset.face_texture == 0).all()
    R = np.array([[-1.0, 0, 0], [0, 1, 0], [0, 0, -1]])
    view = render_view(
        [Placed(RenderMesh.from_asset(asset), R, np.array([0, 0, 3.0]), 1.0)],
        K,
        518,
        518,
        light=Light(np.array([0, 0, -1.0]), ambient=1.0, diffuse=0.0),
    )
    assert view.mask.sum() > 1000
    assert np.abs(view.rgb[view.mask].astype(int) - [30, 200, 90]).max() <= 2


def test_mask_noise_stays_near_the_mask_and_never_empties_it():
    from sam3d_core.data.synth import mask_noise

    mask = np.zeros((120, 160), bool)
    mask[30:90, 40:120] = True
    changed = 0
    for seed in range(20):
        noisy, how = mask_noise(mask, np.random.default_rng(seed))
        assert noisy.any() and frames.mask_iou(noisy, mask) > 0.6, how
        assert ("erode_px" in how) != ("dilate_px" in how)
        changed += not np.array_equal(noisy, mask)
    assert changed == 20
    # On a large photo no noisy pixel lies far from the object: the jitter stays in the boundary band (it once
    # scattered specks over the whole photo, which an IoU on a small canvas did not see).
    from scipy.ndimage import distance_transform_edt

    big = np.zeros((400, 400), bool)
    big[150:210, 160:240] = True
    far = distance_transform_edt(~big)
    for seed in range(30):
        noisy, how = mask_noise(big, np.random.default_rng(seed))
        assert far[noisy].max() <= 3 + 9, how  # dilation (<= 3 px) + the blur's band (3 sigma <= 9 px)
    tiny = np.zeros((50, 50), bool)
    tiny[25, 25] = True  # erosion would empty it: the input comes back
    outs = [mask_noise(tiny, np.random.default_rng(s))[0] for s in range(10)]
    assert all(o.any() for o in outs)
