"""Per-scene state of the flow: the photo and its camera, click prompts, the masked objects and their jobs."""

from __future__ import annotations

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    FloatVectorProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

ITEM_STATES = (
    ("MASKED", "Masked", "Has a mask; not sent yet"),
    ("QUEUED", "Queued", "Sent to the worker, waiting for the job before it"),
    ("RUNNING", "Running", "The worker is reconstructing it"),
    ("DONE", "Done", "Placed in the scene"),
    ("ERROR", "Error", "The job failed; see the message"),
    ("CANCELLED", "Cancelled", "Cancelled before it finished"),
)


class SAM3D_Prompt(bpy.types.PropertyGroup):
    """One click on the photo, in photo pixels (x right, y down, origin top-left)."""

    x: FloatProperty()
    y: FloatProperty()
    label: IntProperty(min=0, max=1, default=1, description="1: part of the object (+), 0: not (-)")


class SAM3D_Item(bpy.types.PropertyGroup):
    """A masked object of the photo, and the state of its reconstruction."""

    uid: StringProperty()
    mask: StringProperty(subtype="FILE_PATH", description="Mask image (white = object), the photo's size")
    status: EnumProperty(items=ITEM_STATES, default="MASKED")
    stage: StringProperty(description="The worker's current stage for this object")
    step: IntProperty()
    total: IntProperty()
    message: StringProperty()
    seed: IntProperty(default=-1, description="Seed of the job (-1: the preference's default)")
    object: PointerProperty(type=bpy.types.Object, description="The placed object")

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total > 0 else 0.0


class SAM3D_SceneProps(bpy.types.PropertyGroup):
    photo: StringProperty(subtype="FILE_PATH", description="The reference photo")
    width: IntProperty()
    height: IntProperty()
    K: StringProperty(description="3x3 intrinsics of the photo in pixels (JSON rows)")
    intrinsics_source: StringProperty()
    camera: PointerProperty(type=bpy.types.Object)
    collection: PointerProperty(type=bpy.types.Collection)
    prompts: CollectionProperty(type=SAM3D_Prompt)
    use_box: BoolProperty(default=False)
    box: FloatVectorProperty(size=4, description="Box x0, y0, x1, y1 in photo pixels")
    draft_mask: StringProperty(subtype="FILE_PATH", description="The mask of the current clicks")
    draft_info: StringProperty()
    items: CollectionProperty(type=SAM3D_Item)
    active_item: IntProperty()
    status: StringProperty(description="The last message of the add-on")
    status_level: StringProperty(default="INFO")
    show_overlay: BoolProperty(default=True, name="Show masks")
    best_of: IntProperty(name="Candidates", default=3, min=2, max=8, description="N for best of N")
    find_text: StringProperty(
        name="Find",
        description="A short noun phrase (e.g. chair): every instance in the photo becomes an object row (SAM 3). "
        "With a box drawn, the box is an example of what to find",
    )
    find_min_score: FloatProperty(
        name="Min score", default=0.5, min=0.0, max=0.99, description="Keep instances SAM 3 scores above this"
    )


CLASSES = (SAM3D_Prompt, SAM3D_Item, SAM3D_SceneProps)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.sam3d = PointerProperty(type=SAM3D_SceneProps)


def unregister() -> None:
    del bpy.types.Scene.sam3d
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
