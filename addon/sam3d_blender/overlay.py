"""Drawing the masks, clicks and box over the photo (Image Editor, and the 3D view through the camera).

Only registered when Blender has a display (not in background mode). Photo pixels are mapped to the
region through the rectangle where the photo is drawn (`photo_frame`), the same rectangle the click
operator uses the other way round.
"""

from __future__ import annotations

import os

import bpy
import gpu
from gpu_extras.batch import batch_for_shader

from .core.camera import photo_to_region

_HANDLES: list = []
_TEXTURES: dict[str, tuple[float, object]] = {}  # mask path -> (file mtime, GPUTexture)
_SHADER = None
ITEM_COLORS = ((0.95, 0.55, 0.1), (0.3, 0.8, 0.3), (0.8, 0.3, 0.8), (0.9, 0.9, 0.2), (0.2, 0.8, 0.9))
DRAFT_COLOR = (0.2, 0.5, 1.0)


def _mask_shader():
    """Draws a mask texture as a tint: colour where the mask is white, transparent where black."""
    global _SHADER
    if _SHADER is None:
        info = gpu.types.GPUShaderCreateInfo()
        info.push_constant("MAT4", "ModelViewProjectionMatrix")
        info.push_constant("VEC4", "color")
        info.sampler(0, "FLOAT_2D", "image")
        iface = gpu.types.GPUStageInterfaceInfo("sam3d_mask_iface")
        iface.smooth("VEC2", "uv")
        info.vertex_in(0, "VEC2", "pos")
        info.vertex_in(1, "VEC2", "texCoord")
        info.vertex_out(iface)
        info.fragment_out(0, "VEC4", "FragColor")
        info.vertex_source(
            "void main() { uv = texCoord; gl_Position = ModelViewProjectionMatrix * vec4(pos, 0.0, 1.0); }"
        )
        info.fragment_source(
            "void main() { float m = texture(image, uv).r; FragColor = vec4(color.rgb, color.a * step(0.5, m)); }"
        )
        _SHADER = gpu.shader.create_from_info(info)
    return _SHADER


def _texture(path: str):
    try:
        mtime = os.path.getmtime(path)
    except OSError:
        return None
    cached = _TEXTURES.get(path)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    img = bpy.data.images.load(path, check_existing=True)
    img.reload()
    tex = gpu.texture.from_image(img)
    _TEXTURES[path] = (mtime, tex)
    return tex


def refresh(props) -> None:
    """Redraw the views after a mask changed."""
    wm = bpy.context.window_manager
    for window in wm.windows if wm else []:
        for area in window.screen.areas:
            if area.type in ("IMAGE_EDITOR", "VIEW_3D"):
                area.tag_redraw()


def photo_frame(context) -> tuple[float, float, float, float] | None:
    """(left, bottom, right, top) of the photo in the region's pixels, or None when it is not shown."""
    props = context.scene.sam3d
    region, space = context.region, context.space_data
    if not props.photo or region is None or space is None:
        return None
    if space.type == "IMAGE_EDITOR":
        img = space.image
        if img is None or os.path.abspath(bpy.path.abspath(img.filepath)) != props.photo:
            return None
        x0, y0 = region.view2d.view_to_region(0.0, 0.0, clip=False)
        x1, y1 = region.view2d.view_to_region(1.0, 1.0, clip=False)
        return float(x0), float(y0), float(x1), float(y1)
    if space.type == "VIEW_3D":
        rv3d = space.region_3d
        cam = props.camera
        if rv3d is None or cam is None or rv3d.view_perspective != "CAMERA" or context.scene.camera != cam:
            return None
        from bpy_extras.view3d_utils import location_3d_to_region_2d

        corners = [
            location_3d_to_region_2d(region, rv3d, cam.matrix_world @ v)
            for v in cam.data.view_frame(scene=context.scene)
        ]
        if any(c is None for c in corners):
            return None
        xs, ys = [c.x for c in corners], [c.y for c in corners]
        return min(xs), min(ys), max(xs), max(ys)
    return None


def _draw_mask(path: str, frame, color, alpha: float) -> None:
    tex = _texture(path)
    if tex is None:
        return
    left, bottom, right, top = frame
    shader = _mask_shader()
    batch = batch_for_shader(
        shader,
        "TRI_FAN",
        {
            "pos": ((left, bottom), (right, bottom), (right, top), (left, top)),
            "texCoord": ((0, 0), (1, 0), (1, 1), (0, 1)),
        },
    )
    shader.bind()
    mvp = gpu.matrix.get_projection_matrix() @ gpu.matrix.get_model_view_matrix()
    shader.uniform_float("ModelViewProjectionMatrix", mvp)
    shader.uniform_float("color", (*color, alpha))
    shader.uniform_sampler("image", tex)
    batch.draw(shader)


def draw_callback() -> None:
    context = bpy.context
    props = getattr(context.scene, "sam3d", None)
    if props is None or not props.show_overlay:
        return
    frame = photo_frame(context)
    if frame is None:
        return
    w, h = props.width, props.height
    gpu.state.blend_set("ALPHA")
    for i, item in enumerate(props.items):
        if item.mask:
            _draw_mask(bpy.path.abspath(item.mask), frame, ITEM_COLORS[i % len(ITEM_COLORS)], 0.35)
    if props.draft_mask:
        _draw_mask(props.draft_mask, frame, DRAFT_COLOR, 0.45)
    flat = gpu.shader.from_builtin("UNIFORM_COLOR")
    if props.use_box:
        x0, y0, x1, y1 = props.box
        pts = [photo_to_region(x, y, frame, w, h) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]
        batch = batch_for_shader(flat, "LINE_STRIP", {"pos": pts})
        flat.bind()
        flat.uniform_float("color", (1.0, 1.0, 0.2, 0.9))
        batch.draw(flat)
    gpu.state.point_size_set(9.0)
    for label, color in ((1, (0.1, 0.9, 0.2, 1.0)), (0, (0.95, 0.1, 0.1, 1.0))):
        pts = [photo_to_region(p.x, p.y, frame, w, h) for p in props.prompts if p.label == label]
        if pts:
            batch = batch_for_shader(flat, "POINTS", {"pos": pts})
            flat.bind()
            flat.uniform_float("color", color)
            batch.draw(flat)
    gpu.state.point_size_set(1.0)
    gpu.state.blend_set("NONE")


def register() -> None:
    if bpy.app.background:
        return  # nothing to draw on
    for space in (bpy.types.SpaceImageEditor, bpy.types.SpaceView3D):
        _HANDLES.append((space, space.draw_handler_add(draw_callback, (), "WINDOW", "POST_PIXEL")))


def unregister() -> None:
    for space, handle in _HANDLES:
        space.draw_handler_remove(handle, "WINDOW")
    _HANDLES.clear()
    _TEXTURES.clear()
