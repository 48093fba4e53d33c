"""Headless: a sam3d scene.json -> a .blend (matched camera, photo, placed objects) and a composited render.

    PYTHONPATH=addon .venv-blender/bin/python -m sam3d_blender.demo_scene demo_out/scene.json \\
        --blend demo_out/scene.blend --render demo_out/render.png

Runs with the `bpy` module (or `blender -b --python-expr`). The objects are placed by the same
`scene.apply_entry` as the interactive flow. The render is Cycles through the matched camera with a
transparent film, laid over the photo in the compositor, so what lines up in the .blend's camera view
lines up in the picture.
"""

from __future__ import annotations

import argparse
import os
import sys

import bpy

from . import scene as S
from .core.scene_io import SceneSpec, load_scene


def ensure_gltf_importer() -> None:
    import addon_utils

    if not addon_utils.check("io_scene_gltf2")[1]:
        addon_utils.enable("io_scene_gltf2", default_set=True)


def build_scene(context: bpy.types.Context, spec: SceneSpec) -> tuple[bpy.types.Object, list[bpy.types.Object]]:
    """Camera and objects of a scene.json in the current (empty) scene; returns (camera, top objects)."""
    if not spec.photo:
        raise ValueError("the scene.json names no photo (an older file); pass --photo PATH")
    ensure_gltf_importer()
    cam = S.setup_photo_camera(context, spec.photo, spec.camera, spec.K, spec.intrinsics_source)
    col = S.photo_collection(context, spec.photo)
    objects = [S.apply_entry(context, e, col, photo=spec.photo) for e in spec.objects]
    return cam, objects


def add_light(context: bpy.types.Context, col: bpy.types.Collection) -> None:
    """A sun from above and behind the camera, and a soft grey world, so the objects read in the render."""
    sun = bpy.data.objects.new("SAM3D sun", bpy.data.lights.new("SAM3D sun", "SUN"))
    sun.data.energy = 3.0
    sun.rotation_euler = (0.9, 0.0, 0.5)
    col.objects.link(sun)
    world = context.scene.world or bpy.data.worlds.new("SAM3D world")
    context.scene.world = world
    world.use_nodes = True
    bg = world.node_tree.nodes.get("Background")
    if bg is not None:
        bg.inputs["Color"].default_value = (0.6, 0.6, 0.6, 1.0)
        bg.inputs["Strength"].default_value = 1.0


def setup_composite_render(
    scene: bpy.types.Scene, photo: bpy.types.Image, samples: int = 8, percentage: int = 50
) -> None:
    """Cycles on the CPU, few samples, transparent film; the compositor lays the render over the photo."""
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.use_denoising = False
    scene.render.film_transparent = True
    scene.render.resolution_percentage = percentage
    scene.view_settings.view_transform = "Standard"  # keep the photo's colours as they are
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGB"
    scene.use_nodes = True
    tree = scene.node_tree
    tree.nodes.clear()
    layers = tree.nodes.new("CompositorNodeRLayers")
    img = tree.nodes.new("CompositorNodeImage")
    img.image = photo
    scale = tree.nodes.new("CompositorNodeScale")  # the photo to the render's size (percentage)
    scale.space = "RENDER_SIZE"
    over = tree.nodes.new("CompositorNodeAlphaOver")
    out = tree.nodes.new("CompositorNodeComposite")
    tree.links.new(img.outputs["Image"], scale.inputs["Image"])
    tree.links.new(scale.outputs["Image"], over.inputs[1])  # background
    tree.links.new(layers.outputs["Image"], over.inputs[2])  # foreground: the objects
    tree.links.new(over.outputs["Image"], out.inputs["Image"])


def render(scene: bpy.types.Scene, path: str) -> str:
    scene.render.filepath = os.path.abspath(path)
    os.makedirs(os.path.dirname(scene.render.filepath), exist_ok=True)
    bpy.ops.render.render(write_still=True)
    return scene.render.filepath


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sam3d_blender.demo_scene", description=__doc__.split("\n\n")[0])
    p.add_argument("scene_json")
    p.add_argument("--blend", default=None, help="write the .blend here")
    p.add_argument("--render", default=None, help="write the composited Cycles render (PNG) here")
    p.add_argument("--photo", default=None, help="the photo, when scene.json names none (older files)")
    p.add_argument("--mask", default=None, help="the mask of a single object, when scene.json names none")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--percentage", type=int, default=50, help="render size in percent of the photo's")
    args = p.parse_args(argv)
    try:
        spec = load_scene(args.scene_json, photo=args.photo, mask=args.mask)
        bpy.ops.wm.read_factory_settings(use_empty=True)
        context = bpy.context
        cam, objects = build_scene(context, spec)
        add_light(context, S.photo_collection(context, spec.photo))
        setup_composite_render(context.scene, S.load_photo(spec.photo), args.samples, args.percentage)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"demo_scene: error: {e}", file=sys.stderr)
        return 2
    print(f"placed {len(objects)} object(s) from {args.scene_json} ({spec.model or 'model not named'})")
    if args.blend:
        os.makedirs(os.path.dirname(os.path.abspath(args.blend)), exist_ok=True)
        bpy.ops.wm.save_as_mainfile(filepath=os.path.abspath(args.blend))
        print(f"wrote {args.blend}")
    if args.render:
        print(f"wrote {render(context.scene, args.render)}")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The bpy 4.2 module crashes in its exit handlers after a Cycles render (segfault after everything was
    # written); leave without them so the exit code is this script's.
    os._exit(code)
