"""The SAM 3D sidebar tab (3D View and Image Editor): photo, clicks, the list of objects, jobs, candidates."""

from __future__ import annotations

import bpy

from .session import SESSION, TASKS

STATUS_ICONS = {
    "MASKED": "MOD_MASK",
    "QUEUED": "SORTTIME",
    "RUNNING": "PLAY",
    "DONE": "CHECKMARK",
    "ERROR": "ERROR",
    "CANCELLED": "CANCEL",
}


class SAM3D_UL_items(bpy.types.UIList):
    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index):
        row = layout.row(align=True)
        row.prop(item, "name", text="", emboss=False, icon=STATUS_ICONS.get(item.status, "DOT"))
        if item.status == "RUNNING" and item.total:
            row.progress(factor=item.fraction, type="BAR", text=f"{item.stage} {item.step}/{item.total}")
        elif item.status == "RUNNING":
            row.label(text=item.stage or "running")
        else:
            row.label(text=item.message or item.status.lower())


def _draw(layout, context) -> None:
    props = context.scene.sam3d
    col = layout.column(align=True)
    col.operator("sam3d.open_photo", icon="IMAGE_DATA")
    if not props.photo:
        col.label(text="Open a photo to start", icon="INFO")
        return
    col.label(text=f"{bpy.path.basename(props.photo)}  {props.width}x{props.height}", icon="CAMERA_DATA")
    if props.intrinsics_source:
        col.label(text=f"Camera: {props.intrinsics_source.replace('_', ' ')}")

    box = layout.box()
    box.label(text="Select objects", icon="RESTRICT_SELECT_OFF")
    row = box.row(align=True)
    row.operator("sam3d.pick", text="Click Objects", icon="EYEDROPPER")
    row.operator("sam3d.clear_prompts", text="", icon="X")
    if props.prompts or props.use_box:
        box.label(
            text=f"{sum(p.label for p in props.prompts)} + / {sum(1 - p.label for p in props.prompts)} - "
            f"clicks{', box' if props.use_box else ''}"
        )
    if props.draft_info:
        box.label(text=props.draft_info)
    row = box.row(align=True)
    row.operator("sam3d.add_object", icon="ADD")
    row.operator("sam3d.add_mask", text="From File", icon="FILE_IMAGE")
    box.operator("sam3d.find_objects", icon="VIEWZOOM")
    row = box.row(align=True)  # SAM 3: every instance of a word (the drawn box, if any, is an example)
    row.prop(props, "find_text", text="Find", icon="VIEWZOOM")
    row.operator("sam3d.find_concept", text="Find")
    box.prop(props, "find_min_score", slider=True)
    box.prop(props, "show_overlay")

    layout.template_list("SAM3D_UL_items", "", props, "items", props, "active_item", rows=3)
    row = layout.row(align=True)
    row.operator("sam3d.remove_item", text="", icon="REMOVE")
    busy = any(hasattr(t, "item_uid") for t in TASKS)
    row.operator("sam3d.reconstruct", icon="MESH_ICOSPHERE")
    if busy:
        row.operator("sam3d.cancel", icon="CANCEL")
    row = layout.row(align=True)
    row.operator("sam3d.reroll", icon="FILE_REFRESH")
    row.operator("sam3d.best_of_n", icon="SEQ_STRIP_DUPLICATE")
    row.prop(props, "best_of", text="N")
    obj = context.active_object
    if obj is not None and obj.get("sam3d_candidate_group"):
        row = layout.row(align=True)
        row.operator("sam3d.keep_candidate", icon="CHECKMARK")
        row.operator("sam3d.reject_candidates", icon="X")

    worker = {"stopped": "not running", "starting": "loading the model ...", "ready": "ready", "failed": "FAILED"}[
        SESSION.state
    ]
    layout.label(text=f"Worker: {worker}", icon="ERROR" if SESSION.state == "failed" else "CONSOLE")
    if props.status:
        icon = {"ERROR": "ERROR", "WARNING": "INFO"}.get(props.status_level, "NONE")
        for i, chunk in enumerate(_wrap(props.status, 48)):
            layout.label(text=chunk, icon=icon if i == 0 else "BLANK1")


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


class SAM3D_PT_view3d(bpy.types.Panel):
    bl_idname = "SAM3D_PT_view3d"
    bl_label = "SAM 3D Objects"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "SAM 3D"

    def draw(self, context):
        _draw(self.layout, context)


class SAM3D_PT_image(bpy.types.Panel):
    bl_idname = "SAM3D_PT_image"
    bl_label = "SAM 3D Objects"
    bl_space_type = "IMAGE_EDITOR"
    bl_region_type = "UI"
    bl_category = "SAM 3D"

    def draw(self, context):
        _draw(self.layout, context)


CLASSES = (SAM3D_UL_items, SAM3D_PT_view3d, SAM3D_PT_image)
