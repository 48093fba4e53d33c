"""The photo's camera and object placement, checked through Blender's own projection and a Cycles render."""

from __future__ import annotations

import bpy
import numpy as np
import pytest
from bpy_extras.object_utils import world_to_camera_view
from conftest import MASK, PHOTO
from glb_writer import card_in_camera_space, write_glb
from mathutils import Matrix, Vector
from render_util import iou, load_mask, render_silhouette

W, H = 600, 400
K = [[450.0, 0.0, 280.0], [0.0, 450.0, 215.0], [0.0, 0.0, 1.0]]  # principal point off-centre: tests the shift


def gltf_to_blender(p):
    """Blender's glTF importer: y up -> z up, (x, y, z) -> (x, -z, y)."""
    x, y, z = p
    return Vector((x, -z, y))


@pytest.fixture
def camera(addon, clean_scene):
    from sam3d_blender.core.camera import blender_camera_from_K

    cam = addon.scene.setup_photo_camera(bpy.context, str(PHOTO), blender_camera_from_K(K, W, H), K, "user")
    return cam


def test_camera_matches_the_photo(camera, clean_scene):
    scene = clean_scene
    assert scene.camera == camera and camera.type == "CAMERA"
    assert camera.data.lens == pytest.approx(450 * 36 / 600) and camera.data.sensor_width == 36
    assert camera.data.sensor_fit == "HORIZONTAL"
    assert (scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage) == (W, H, 100)
    bg = camera.data.background_images[0]
    assert camera.data.show_background_images and bg.image.size[:] == (W, H)
    assert camera.users_collection[0]["sam3d_photo"] == str(PHOTO)
    # points seen at known pixels (glTF camera space from K) land on those pixels in Blender's camera view
    for u, v, depth in ((10.0, 20.0, 1.0), (300.0, 200.0, 3.0), (590.0, 390.0, 0.5), (280.0, 215.0, 2.0)):
        p = ((u - K[0][2]) / K[0][0] * depth, -(v - K[1][2]) / K[1][1] * depth, -depth)
        ndc = world_to_camera_view(scene, camera, gltf_to_blender(p))
        assert ndc.x * W == pytest.approx(u, abs=1e-3) and (1 - ndc.y) * H == pytest.approx(v, abs=1e-3)
        assert ndc.z == pytest.approx(depth, rel=1e-4)


def _mask_box():
    m = load_mask(MASK)
    ys, xs = np.nonzero(m)
    return m, (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def test_placed_card_silhouette_covers_the_mask(addon, camera, clean_scene, tmp_path):
    from sam3d_blender.core.scene_io import IDENTITY, ObjectEntry

    mask, box = _mask_box()
    verts, faces, _ = card_in_camera_space(K, box, depth=2.0)
    write_glb(tmp_path / "card.glb", verts, faces)
    col = addon.scene.photo_collection(bpy.context, str(PHOTO))
    entry = ObjectEntry(
        "card",
        str(tmp_path / "card.glb"),
        [list(r) for r in IDENTITY],
        False,
        mask=str(MASK),
        settings={"seed": 7, "weights": "sha256:abc"},
    )
    obj = addon.scene.apply_entry(bpy.context, entry, col, photo=str(PHOTO))
    assert obj.users_collection[0] == col and obj.name == "card"
    assert obj["sam3d_seed"] == 7 and obj["sam3d_weights"] == "sha256:abc" and obj["sam3d_mask"] == str(MASK)
    assert len(obj["sam3d_mask_png"]) > 100  # the mask itself travels with the .blend
    sil = render_silhouette(clean_scene, tmp_path / "sil.png", percentage=25)  # 150 x 100
    assert sil.shape == (H // 4, W // 4)
    small = load_mask(MASK, size=(W // 4, H // 4))
    expected = np.zeros_like(sil)
    x0, y0, x1, y1 = (round(v / 4) for v in box)
    expected[y0:y1, x0:x1] = True
    assert iou(sil, expected) > 0.9
    assert np.logical_and(sil, small).sum() / small.sum() > 0.95  # the object covers its mask


def test_matrix_world_is_applied_to_the_imported_local_frame(addon, clean_scene, tmp_path):
    from sam3d_blender.core.scene_io import ObjectEntry

    verts = np.array([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5]])
    write_glb(tmp_path / "tri.glb", verts, [[0, 1, 2]])
    M = Matrix.Translation((0.1, 2.0, -0.3)) @ Matrix.Rotation(0.7, 4, "Z") @ Matrix.Scale(1.5, 4)
    col = addon.scene.photo_collection(bpy.context, str(PHOTO))
    obj = addon.scene.apply_entry(
        bpy.context, ObjectEntry("tri", str(tmp_path / "tri.glb"), [list(r) for r in M], True), col
    )
    world = sorted(tuple(round(c, 5) for c in obj.matrix_world @ v.co) for v in obj.data.vertices)
    expected = sorted(tuple(round(c, 5) for c in M @ gltf_to_blender(p)) for p in verts)
    assert world == expected


def test_textured_mesh_keeps_its_image_texture(addon, clean_scene, tmp_path):
    from sam3d_blender.core.scene_io import IDENTITY, ObjectEntry

    verts, faces, uvs = card_in_camera_space(K, (100, 100, 200, 200), depth=1.0)
    write_glb(tmp_path / "tex.glb", verts, faces, uvs=uvs, png=MASK.read_bytes())
    col = addon.scene.photo_collection(bpy.context, str(PHOTO))
    obj = addon.scene.apply_entry(
        bpy.context, ObjectEntry("tex", str(tmp_path / "tex.glb"), [list(r) for r in IDENTITY], True), col
    )
    report = addon.scene.material_report([obj])
    assert report == {"materials": 1, "image_textures": 1}


def test_failed_import_leaves_the_scene_as_it_was(addon, clean_scene, tmp_path):
    from sam3d_blender.core.scene_io import IDENTITY, ObjectEntry

    col = addon.scene.photo_collection(bpy.context, str(PHOTO))
    before = set(bpy.data.objects)
    with pytest.raises(FileNotFoundError, match="reconstruct the object again"):
        addon.scene.apply_entry(bpy.context, ObjectEntry("x", str(tmp_path / "gone.glb"), IDENTITY, False), col)
    (tmp_path / "bad.glb").write_bytes(b"glTF not really")
    with pytest.raises(Exception):  # noqa: B017 (whatever the importer raises: the scene must be unchanged)
        addon.scene.apply_entry(bpy.context, ObjectEntry("x", str(tmp_path / "bad.glb"), IDENTITY, False), col)
    assert set(bpy.data.objects) == before


def test_unreadable_photo_creates_no_camera(addon, clean_scene, tmp_path):
    from sam3d_blender.core.camera import default_camera

    with pytest.raises(FileNotFoundError, match="does not exist"):
        addon.scene.setup_photo_camera(bpy.context, str(tmp_path / "nope.png"), default_camera(W, H))
    assert not bpy.data.cameras and not bpy.data.collections
