"""Frames checked inside Blender (the `bpy` wheel): a y-up GLB imported by Blender's glTF importer, placed with
`blender_object_matrix` and seen through `blender_camera`, must cover the mask the PyTorch3D pose projects.

Runs only where `bpy` imports (its own venv); imports `sam3d_core.geometry.frames` alone (numpy, no torch). The photo
is 160x100 with fx != fy and an off-centre principal point, so lens, shift and pixel aspect are all exercised.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

bpy = pytest.importorskip("bpy", reason="needs Blender's Python module (the bpy wheel); run in the Blender venv")
trimesh = pytest.importorskip("trimesh", reason="writes the test GLBs")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bpy_extras.object_utils import world_to_camera_view  # noqa: E402
from mathutils import Matrix, Vector  # noqa: E402

from sam3d_core.geometry import frames  # noqa: E402

W, H = 160, 100
K = np.array([[150.0, 0.0, 91.3], [0.0, 128.0, 42.6], [0.0, 0.0, 1.0]])  # fx != fy, cx != W/2, cy != H/2
TO_GLB = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # official to_glb, row vectors


def _axis_rotation(axis, angle: float) -> np.ndarray:
    a = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    cross = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def _boxes(*specs) -> tuple[np.ndarray, np.ndarray]:
    """Closed axis-aligned boxes (extents, centre) -> one mesh: vertices [8n, 3], faces [12n, 3]."""
    corners = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    quads = [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]]
    tris = np.array([[q[0], q[1], q[2]] for q in quads] + [[q[0], q[2], q[3]] for q in quads])
    verts = [corners * np.asarray(e) + np.asarray(c) for e, c in specs]
    return np.concatenate(verts), np.concatenate([tris + 8 * i for i in range(len(specs))])


@pytest.fixture(scope="module")
def case():
    """An asymmetric object (local z-up frame), a pose in the PyTorch3D camera, and the mask it projects to."""
    v, faces = _boxes(
        ([0.6, 0.15, 0.15], [0.0, 0.0, -0.3]),  # a bar along x at the bottom
        ([0.15, 0.15, 0.6], [0.22, 0.0, 0.0]),  # a post up from its right end
        ([0.15, 0.4, 0.15], [-0.22, 0.18, 0.22]),  # a bar along y at the top left
    )
    rot = _axis_rotation([0.2, 1.0, -0.3], 2.0) @ _axis_rotation([1, 0, 0], -1.1)  # row-vector R
    pose = frames.pose_matrix(rot, [0.1, -0.05, 1.6], 0.9)
    mask = frames.render_silhouette(frames.transform_points(pose, v), faces, K, W, H)
    assert 0.05 < mask.mean() < 0.6 and not mask[[0, -1]].any() and not mask[:, [0, -1]].any()
    return {"v": v, "faces": faces, "pose": pose, "mask": mask}


def _fresh_scene():
    bpy.ops.wm.read_factory_settings(use_empty=True)
    return bpy.context.scene


def _set_camera(scene, cam: dict):
    data = bpy.data.cameras.new("photo")
    data.lens = cam["lens_mm"]
    data.sensor_width = cam["sensor_width_mm"]
    data.sensor_height = cam["sensor_height_mm"]
    data.sensor_fit = cam["sensor_fit"]
    data.shift_x, data.shift_y = cam["shift_x"], cam["shift_y"]
    obj = bpy.data.objects.new("photo", data)
    scene.collection.objects.link(obj)
    obj.matrix_world = Matrix(cam["matrix_world"])
    scene.camera = obj
    r = scene.render
    r.resolution_x, r.resolution_y, r.resolution_percentage = cam["resolution_x"], cam["resolution_y"], 100
    r.pixel_aspect_x, r.pixel_aspect_y = cam["pixel_aspect_x"], cam["pixel_aspect_y"]
    return obj


def _import_glb(path: Path):
    before = set(bpy.data.objects)
    bpy.ops.import_scene.gltf(filepath=str(path))
    new = [o for o in bpy.data.objects if o not in before]
    meshes = [o for o in new if o.type == "MESH"]
    assert len(meshes) == 1, f"expected one imported mesh, got {[o.name for o in new]}"
    return meshes[0], [o for o in new if o.type == "CAMERA"]


def _camera_view(scene, cam_obj, obj) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Evaluated mesh -> (local vertices [V, 3], pixel coords [V, 2] via world_to_camera_view, depth [V],
    triangles [F, 3])."""
    bpy.context.view_layer.update()
    evaluated = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
    mesh = evaluated.data
    mesh.calc_loop_triangles()
    local = np.array([v.co[:] for v in mesh.vertices])
    ndc = np.array([world_to_camera_view(scene, cam_obj, evaluated.matrix_world @ Vector(p))[:] for p in local])
    uv = np.stack([ndc[:, 0] * W, (1.0 - ndc[:, 1]) * H], axis=1)  # Blender's y is up from the bottom edge
    tris = np.array([t.vertices[:] for t in mesh.loop_triangles], dtype=np.int64)
    return local, uv, ndc[:, 2], tris


def test_imported_glb_lands_on_the_mask(case, tmp_path):
    scene = _fresh_scene()
    stored = trimesh.Trimesh(case["v"] @ TO_GLB, case["faces"], process=False)  # y-up, no node transform
    stored.export(tmp_path / "object.glb")
    obj, _ = _import_glb(tmp_path / "object.glb")
    # The importer turns the y-up vertices back into the model's local z-up coordinates.
    local = np.array([v.co[:] for v in obj.data.vertices])
    nearest = np.abs(local[:, None, :] - case["v"][None]).max(-1).min(1)
    assert nearest.max() < 1e-5, "imported vertices are not the model's local coordinates"

    obj.matrix_world = Matrix(frames.blender_object_matrix(case["pose"]).tolist())
    local, uv, depth, tris = _camera_view(scene, _set_camera(scene, frames.blender_camera(K, W, H)), obj)
    assert (depth > 0).all()
    # Vertex by vertex: Blender's camera projection equals K applied to the PyTorch3D pose.
    expected = frames.project_points(frames.transform_points(case["pose"], local), K)
    np.testing.assert_allclose(uv, expected, atol=2e-3)
    iou = frames.mask_iou(frames.rasterize_triangles(uv, tris, W, H), case["mask"])
    assert iou >= 0.97, f"Blender placement IoU {iou:.3f}"
    # The check can fail: ignoring the pixel aspect (square pixels) moves the silhouette off the mask.
    scene.render.pixel_aspect_x = scene.render.pixel_aspect_y = 1.0
    _, uv_square, _, _ = _camera_view(scene, scene.camera, obj)
    assert frames.mask_iou(frames.rasterize_triangles(uv_square, tris, W, H), case["mask"]) < 0.9


def test_scene_glb_node_and_camera_import_as_expected(case, tmp_path):
    _fresh_scene()
    tscene = trimesh.Scene()
    stored = trimesh.Trimesh(case["v"] @ TO_GLB, case["faces"], process=False)
    tscene.add_geometry(stored, node_name="object", geom_name="object", transform=frames.gltf_node_matrix(case["pose"]))
    tscene.camera = trimesh.scene.Camera(resolution=(W, H), fov=(60.0, 40.0))
    tscene.camera_transform = np.eye(4)

    def use_our_camera(tree: dict) -> None:
        tree["cameras"] = [frames.gltf_camera(K, W, H) | {"name": "photo"}]

    (tmp_path / "scene.glb").write_bytes(trimesh.exchange.gltf.export_glb(tscene, tree_postprocessor=use_our_camera))
    obj, cams = _import_glb(tmp_path / "scene.glb")
    bpy.context.view_layer.update()
    np.testing.assert_allclose(np.array(obj.matrix_world), frames.blender_object_matrix(case["pose"]), atol=1e-5)
    assert len(cams) == 1
    np.testing.assert_allclose(
        np.array(cams[0].matrix_world), np.array(frames.blender_camera(K, W, H)["matrix_world"]), atol=1e-5
    )


def test_cycles_render_matches_the_mask(case, tmp_path):
    """The rendered image (not only world_to_camera_view) honours lens, shift and pixel aspect."""
    scene = _fresh_scene()
    stored = trimesh.Trimesh(case["v"] @ TO_GLB, case["faces"], process=False)
    stored.export(tmp_path / "object.glb")
    obj, _ = _import_glb(tmp_path / "object.glb")
    obj.matrix_world = Matrix(frames.blender_object_matrix(case["pose"]).tolist())
    _set_camera(scene, frames.blender_camera(K, W, H))
    material = bpy.data.materials.new("white")
    material.use_nodes = True
    nodes = material.node_tree.nodes
    nodes.clear()
    emission = nodes.new("ShaderNodeEmission")
    output = nodes.new("ShaderNodeOutputMaterial")
    material.node_tree.links.new(emission.outputs["Emission"], output.inputs["Surface"])
    obj.data.materials.clear()
    obj.data.materials.append(material)
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 16
    scene.cycles.use_denoising = False
    scene.cycles.pixel_filter_type = "BOX"
    scene.render.filter_size = 1.0  # coverage of the pixel square: > 0.5 where the centre is (nearly always) inside
    scene.render.image_settings.file_format = "OPEN_EXR"  # linear values: pixel = covered fraction
    scene.render.image_settings.color_mode = "RGB"
    scene.render.filepath = str(tmp_path / "render.exr")
    bpy.ops.render.render(write_still=True)
    image = bpy.data.images.load(str(tmp_path / "render.exr"))
    pixels = np.array(image.pixels[:]).reshape(H, W, image.channels)[::-1, :, 0]  # Blender stores rows bottom-up
    iou = frames.mask_iou(pixels > 0.5, case["mask"])
    assert iou >= 0.97, f"Cycles render IoU {iou:.3f}"
