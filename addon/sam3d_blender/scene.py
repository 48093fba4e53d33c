"""Putting things into the Blender scene: the photo's camera, and each reconstructed object. Main thread only.

`apply_entry` is the one function that places an object: used by the interactive flow (a worker result)
and by the headless `demo_scene` script (a scene.json entry) alike.
"""

from __future__ import annotations

import base64
import json
import os

import bpy
from mathutils import Matrix

from .core.camera import check_camera
from .core.photo import check_photo_size
from .core.scene_io import ObjectEntry

COLLECTION_PREFIX = "SAM3D "
UNDO_LOG: list[str] = []  # messages of the undo steps pushed by this add-on (for the UI and tests)
MAX_MASK_PROP_BYTES = 2 << 20  # masks larger than this (as PNG) are kept by path only


def push_undo(message: str) -> None:
    """One undo step (the interactive flow pushes one per arriving object)."""
    UNDO_LOG.append(message)
    bpy.ops.ed.undo_push(message=message)


def photo_collection(context: bpy.types.Context, photo: str, create: bool = True) -> bpy.types.Collection | None:
    """The collection of one photo ("SAM3D <file name>"), under the scene's collection."""
    for col in bpy.data.collections:
        if col.get("sam3d_photo") == os.path.abspath(photo):
            return col
    if not create:
        return None
    col = bpy.data.collections.new(COLLECTION_PREFIX + os.path.basename(photo))
    col["sam3d_photo"] = os.path.abspath(photo)
    context.scene.collection.children.link(col)
    return col


def load_photo(photo: str) -> bpy.types.Image:
    """The photo as a Blender image (reused when already loaded). A photo above the worker's pixel limit is refused
    (core.photo.PhotoTooLarge, a ValueError) before it is loaded."""
    path = os.path.abspath(photo)
    for img in bpy.data.images:
        if img.filepath and os.path.abspath(bpy.path.abspath(img.filepath)) == path:
            return img
    if not os.path.isfile(path):
        raise FileNotFoundError(f"photo {path!r} does not exist; choose an existing image file")
    check_photo_size(path)  # the worker's pixel limit, from the header, before Blender decodes anything
    try:
        return bpy.data.images.load(path, check_existing=True)
    except RuntimeError as e:
        raise ValueError(f"Blender cannot read the photo {path!r} ({e}); save it as PNG or JPEG") from None


def apply_camera(cam_obj: bpy.types.Object, cam: dict, scene: bpy.types.Scene) -> None:
    """Set a camera object and the scene's render size from a blender_camera dict (core.camera)."""
    check_camera(cam)
    cam_obj.matrix_world = Matrix([list(r) for r in cam["matrix_world"]])
    data = cam_obj.data
    data.type = "PERSP"
    data.sensor_fit = cam["sensor_fit"]
    data.sensor_width = cam["sensor_width_mm"]
    if cam["sensor_fit"] == "VERTICAL":
        data.sensor_height = cam["sensor_width_mm"]  # the dict's sensor size is the fitted side's
    data.lens = cam["lens_mm"]
    data.shift_x, data.shift_y = cam["shift_x"], cam["shift_y"]
    data.clip_start, data.clip_end = 0.01, 1000.0
    r = scene.render
    r.resolution_x, r.resolution_y = int(cam["resolution_x"]), int(cam["resolution_y"])
    r.resolution_percentage = 100
    r.pixel_aspect_x, r.pixel_aspect_y = cam["pixel_aspect_x"], cam["pixel_aspect_y"]
    cam_obj["sam3d_camera"] = json.dumps(cam)


def setup_photo_camera(
    context: bpy.types.Context, photo: str, cam: dict, K=None, intrinsics_source: str = "default_fov"
) -> bpy.types.Object:
    """A new camera matched to the photo, with the photo as its background, in the photo's collection.

    Makes it the scene camera and sets the render resolution to the photo's. Raises before touching the
    scene when the photo cannot be read.
    """
    image = load_photo(photo)
    check_camera(cam)
    col = photo_collection(context, photo)
    data = bpy.data.cameras.new(f"SAM3D camera {os.path.basename(photo)}")
    cam_obj = bpy.data.objects.new(data.name, data)
    col.objects.link(cam_obj)
    apply_camera(cam_obj, cam, context.scene)
    data.show_background_images = True
    bg = data.background_images.new()
    bg.image = image
    bg.frame_method = "STRETCH"  # the render has the photo's size, so this is an exact fit
    bg.display_depth = "BACK"
    bg.alpha = 1.0
    cam_obj["sam3d_photo"] = os.path.abspath(photo)
    cam_obj["sam3d_intrinsics_source"] = intrinsics_source
    if K is not None:
        cam_obj["sam3d_K"] = json.dumps(K)
    col["sam3d_camera"] = cam_obj.name
    context.scene.camera = cam_obj
    return cam_obj


def _mask_props(obj: bpy.types.Object, mask: str | None) -> None:
    if not mask:
        return
    obj["sam3d_mask"] = os.path.abspath(mask)
    try:
        data = open(mask, "rb").read()
    except OSError:
        return
    if len(data) <= MAX_MASK_PROP_BYTES:  # the mask itself, so the .blend keeps it when the file moves
        obj["sam3d_mask_png"] = base64.b64encode(data).decode("ascii")


def material_report(objects) -> dict:
    """How many materials and image textures the meshes among `objects` carry."""
    mats, images = set(), set()
    for obj in objects:
        if obj.type != "MESH":
            continue
        for slot in obj.material_slots:
            if slot.material is None:
                continue
            mats.add(slot.material.name)
            if slot.material.use_nodes:
                images.update(
                    n.image.name for n in slot.material.node_tree.nodes if n.type == "TEX_IMAGE" and n.image is not None
                )
    return {"materials": len(mats), "image_textures": len(images)}


def _ensure_material(obj: bpy.types.Object) -> None:
    """A mesh without a material gets one that shows its vertex colours (or grey)."""
    if obj.type != "MESH" or any(s.material for s in obj.material_slots):
        return
    mat = bpy.data.materials.new(f"{obj.name} (vertex colours)")
    mat.use_nodes = True
    nodes = mat.node_tree.nodes
    bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
    if obj.data.color_attributes:
        attr = nodes.new("ShaderNodeVertexColor")
        attr.layer_name = obj.data.color_attributes[0].name
        mat.node_tree.links.new(attr.outputs["Color"], bsdf.inputs["Base Color"])
    obj.data.materials.append(mat)


def apply_entry(
    context: bpy.types.Context,
    entry: ObjectEntry,
    collection: bpy.types.Collection,
    photo: str = "",
    extra: dict | None = None,
) -> bpy.types.Object:
    """Import one object's GLB, place it with its matrix, put it into `collection`; returns the top object.

    A single imported mesh becomes the object itself; several become children of an empty (the top
    object). Custom properties on the top object keep the seed, settings, weights hash, mask, photo.
    On failure every object the import created is removed again, so the scene is left as it was.
    """
    if not os.path.isfile(entry.mesh_path):
        raise FileNotFoundError(
            f"the object file {entry.mesh_path!r} does not exist (did the worker's output "
            "folder get deleted?); reconstruct the object again"
        )
    before = set(bpy.data.objects)
    try:
        result = bpy.ops.import_scene.gltf(filepath=entry.mesh_path)
        if "FINISHED" not in result:
            raise RuntimeError(f"Blender's glTF importer did not finish ({result}) on {entry.mesh_path!r}")
        new = [o for o in bpy.data.objects if o not in before]
        if not new:
            raise RuntimeError(f"{entry.mesh_path!r} holds no objects; reconstruct the object again")
        for o in new:  # the importer links into the active collection: move everything into ours
            for c in list(o.users_collection):
                c.objects.unlink(o)
            collection.objects.link(o)
        roots = [o for o in new if o.parent not in new]
        world = Matrix(entry.matrix_world)
        if len(roots) == 1 and not roots[0].children:
            top = roots[0]
            top.matrix_world = world @ top.matrix_world
        else:
            top = bpy.data.objects.new(entry.name, None)
            top.empty_display_size = 0.1
            collection.objects.link(top)
            for o in roots:
                basis = o.matrix_world.copy()
                o.parent = top
                o.matrix_parent_inverse = Matrix.Identity(4)
                o.matrix_basis = basis
            top.matrix_world = world
            new.append(top)
        top.name = entry.name
        for o in new:
            _ensure_material(o)
    except Exception:
        for o in [o for o in bpy.data.objects if o not in before]:
            bpy.data.objects.remove(o, do_unlink=True)
        raise
    settings = dict(entry.settings)
    top["sam3d_seed"] = entry.seed if entry.seed is not None else -1
    top["sam3d_settings"] = json.dumps(settings)
    top["sam3d_weights"] = entry.weights or str(settings.get("weights", ""))
    top["sam3d_file"] = os.path.abspath(entry.mesh_path)
    top["sam3d_textured"] = entry.textured
    if entry.mask_iou is not None:
        top["sam3d_mask_iou"] = float(entry.mask_iou)
    if entry.pose:
        top["sam3d_pose"] = json.dumps(entry.pose)
    if photo:
        top["sam3d_photo"] = os.path.abspath(photo)
    _mask_props(top, entry.mask)
    for k, v in (extra or {}).items():
        top[k] = v
    return top


def object_and_children(obj: bpy.types.Object) -> list[bpy.types.Object]:
    return [obj, *obj.children_recursive]


def remove_object(obj: bpy.types.Object) -> None:
    """Delete an object placed by apply_entry, with its children."""
    for o in reversed(object_and_children(obj)):
        bpy.data.objects.remove(o, do_unlink=True)
