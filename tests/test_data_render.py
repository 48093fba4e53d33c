"""The training-view renderer: masks against the projected mesh, exact depth and point map, occluders, textures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam3d_core.data.meshio import Asset, asset_from_arrays
from sam3d_core.data.render import Light, Placed, RenderMesh, Shot, render_view, render_views
from sam3d_core.data.synth import SceneConfig, intrinsics, look_rotation, place_occluder, place_target, random_rotation
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


def textured_box(rng, device="cpu") -> RenderMesh:
    """A box with unshared vertices, random UVs past [0, 1] (wrapping), two textures and some untextured faces."""
    m = trimesh.creation.box(extents=(1.0, 0.6, 0.8))
    v = np.asarray(m.vertices)[np.asarray(m.faces)].reshape(-1, 3)
    tex = [rng.integers(0, 256, (7, 9, 3)).astype(np.uint8), rng.integers(0, 256, (4, 5, 3)).astype(np.uint8)]
    asset = Asset(
        name="box",
        vertices=v,
        faces=np.arange(len(v)).reshape(-1, 3),
        colors=rng.uniform(0.3, 1.0, (len(v), 3)).astype(np.float32),
        size=1.0,
        centre=np.zeros(3),
        uvs=rng.uniform(-0.5, 1.5, (len(v), 2)).astype(np.float32),
        face_texture=np.array([-1, -1, 0, 0, 1, 1, 0, 1, -1, 0, 1, 0]),
        textures=tex,
    )
    return RenderMesh.from_asset(asset, device)


def mixed_shots(n: int, height: int, width: int, device="cpu", seed=0) -> list[Shot]:
    """Views of a vertex-coloured sphere and a textured box with 0-2 occluders; every fifth view puts its target
    close enough to cross the image borders and the near plane, every seventh adds a wall through the camera
    plane; backgrounds None, uint8, float and tensor; default and random lights."""
    rng = np.random.default_rng(seed)
    s, small = trimesh.creation.icosphere(subdivisions=2), trimesh.creation.icosphere(subdivisions=1)
    colours = rng.uniform(0, 1, (len(s.vertices), 3))
    sphere = RenderMesh.from_asset(asset_from_arrays("s", s.vertices, s.faces, colours), device)
    occluder = RenderMesh.from_asset(asset_from_arrays("o", small.vertices, small.faces, [0.2, 0.4, 0.8]), device)
    box = textured_box(rng, device)
    cfg = SceneConfig(width=width, height=height)
    shots = []
    for i in range(n):
        K = intrinsics(rng, cfg)
        target = place_target(rng, cfg, K, [sphere, box][i % 2], 1.0)
        if i % 5 == 3:
            target = Placed(target.mesh, random_rotation(rng), np.array([0.1, -0.1, 0.35]), 1.5)
        placed = [target] + [place_occluder(rng, K, target, [occluder, box][(i + j) % 2], 1.0) for j in range(i % 3)]
        if i % 7 == 6:
            placed.append(Placed(box, random_rotation(rng), np.array([0.0, 0.0, 0.2]), 3.0))
        photo = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
        background = [None, photo, photo / 255.0, torch.from_numpy(photo).to(device)][i % 4]
        shots.append(Shot(placed, K, None if i % 6 == 0 else Light.random(rng), background))
    return shots


def one_view(shot: Shot, height: int, width: int):
    return render_view(shot.placed, shot.K, height, width, shot.light, shot.background)


def assert_same_view(one, other, rgb_step: int = 0):
    for name in ("mask", "amodal", "coverage"):
        assert np.array_equal(getattr(one, name), getattr(other, name)), name
    assert np.abs(one.rgb.astype(int) - other.rgb.astype(int)).max() <= rgb_step
    torch.testing.assert_close(torch.from_numpy(other.depth), torch.from_numpy(one.depth), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(other.pointmap), torch.from_numpy(one.pointmap), rtol=1e-6, atol=1e-6)


def test_a_batch_of_views_renders_each_view_as_render_view_does():
    height, width = 40, 56
    shots = mixed_shots(14, height, width)
    batch = render_views(shots, height, width)
    assert len(batch) == 14 and batch.rgb.shape == (14, height, width, 3) and batch.mask.shape == (14, height, width)
    for i, shot in enumerate(shots):
        assert_same_view(one_view(shot, height, width), batch[i])
    # The scenes exercise what they claim: occluders cut masks, targets cross the borders and the near plane,
    # textured faces are seen, some view shows no target at all.
    assert (batch.amodal & ~batch.mask).any(axis=(1, 2)).sum() >= 3
    assert batch.coverage[3].all() and batch.coverage[8].all()  # the close views: surfaces fill the image
    t = shots[3].placed[0]
    z = ((t.mesh.vertices.numpy() * t.scale) @ t.rotation + t.translation)[:, 2]
    assert z.min() < 0 < z.max()  # part of the target lies behind the camera (its faces there are dropped)
    boxes = [i for i in range(14) if shots[i].placed[0].mesh.uvs is not None]
    assert any(batch.mask[i].sum() > 50 for i in boxes)
    # Splitting the batch differently changes nothing; amodal=False gives amodal == mask everywhere.
    halves = [render_views(shots[:5], height, width), render_views(shots[5:], height, width)]
    for i in range(14):
        assert_same_view(batch[i], halves[i >= 5][i - 5 * (i >= 5)])
    flat = render_views(shots[:4], height, width, amodal=False, to_numpy=False)
    assert torch.equal(flat.amodal, flat.mask) and torch.equal(flat.mask, torch.from_numpy(batch.mask[:4]))


def test_a_view_with_nothing_in_front_of_the_camera_is_empty():
    sphere = trimesh.creation.icosphere(subdivisions=1)
    mesh = RenderMesh.from_asset(asset_from_arrays("s", sphere.vertices, sphere.faces, [0.5, 0.5, 0.5]))
    k = np.array([[50.0, 0, 16], [0, 50, 16], [0, 0, 1]])
    behind = Shot([Placed(mesh, np.eye(3), np.array([0, 0, -3.0]), 1.0)], k)
    seen = Shot([Placed(mesh, np.eye(3), np.array([0, 0, 3.0]), 1.0), behind.placed[0]], k)
    alone = render_views([behind], 32, 32)  # no face survives the near-plane cull (this once raised IndexError)
    assert not alone.coverage.any() and not alone.amodal.any() and (alone.rgb == 0).all()
    assert np.isinf(alone.depth).all() and (alone.pointmap == 0).all()
    both = render_views([behind, seen, behind], 32, 32)
    assert not both.coverage[[0, 2]].any() and both.mask[1].sum() > 100
    assert_same_view(one_view(seen, 32, 32), both[1])


def test_render_views_bad_inputs_name_the_problem():
    shots = mixed_shots(3, 20, 24)
    with pytest.raises(ValueError, match="shots: got no views"):
        render_views([], 20, 24)
    with pytest.raises(ValueError, match=r"shots\[1\]: got no meshes"):
        render_views([shots[0], Shot([], shots[1].K)], 20, 24)
    with pytest.raises(ValueError, match=r"shots\[2\].background: got shape \(20, 24, 3\), expected \[21, 24, 3\]"):
        render_views([s._replace(background=None) for s in shots[:2]] + [shots[1]], 21, 24)


@pytest.mark.gpu
def test_cuda_batch_renders_what_the_cpu_renders_one_at_a_time():
    height, width = 64, 80
    cpu = mixed_shots(12, height, width)
    cuda = mixed_shots(12, height, width, device="cuda")
    batch = render_views(cuda, height, width)
    for i, shot in enumerate(cpu):
        one = one_view(shot, height, width)
        for name in ("mask", "amodal", "coverage"):
            assert np.array_equal(getattr(one, name), getattr(batch[i], name)), (i, name)
        assert np.abs(one.rgb.astype(int) - batch[i].rgb.astype(int)).max() <= 1
        assert_same_view(one_view(cuda[i], height, width), batch[i], rgb_step=1)


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
