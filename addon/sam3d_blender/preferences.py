"""Add-on preferences: where the worker's Python is, weights, device, memory preset, job defaults."""

from __future__ import annotations

import os

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty

from .core import setup

ADDON_DIR = os.path.dirname(os.path.abspath(__file__))

VRAM_PRESETS = (
    ("AUTO", "Automatic", "Keep both stages loaded; after running out of GPU memory, retry one stage at a time"),
    ("LOW", "Low (8-12 GB)", "One stage on the GPU at a time (a whole object in 8 GB); slower"),
    ("MEDIUM", "Medium (16-24 GB)", "Keep both stages loaded (about 13 GB)"),
    ("HIGH", "High (32 GB and more)", "Keep both stages loaded; fastest"),
)


def package_name() -> str:
    return __package__ or "sam3d_blender"


class SAM3D_Preferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    python: StringProperty(
        name="Worker Python",
        subtype="FILE_PATH",
        default="",
        description="Python interpreter of the environment where sam3d is installed (empty: detect it)",
    )
    weights_dir: StringProperty(
        name="Weights folder",
        subtype="DIR_PATH",
        default="",
        description="sam3d data folder holding imported weights (empty: sam3d's default)",
    )
    model: StringProperty(
        name="Model", default="", description="Imported model name, or 'tiny' (empty: the best available)"
    )
    device: EnumProperty(
        name="Device",
        items=(
            ("auto", "Automatic", "CUDA when present"),
            ("cuda", "CUDA", "The first NVIDIA GPU"),
            ("cpu", "CPU", "Very slow; for testing"),
        ),
        default="auto",
    )
    vram: EnumProperty(name="GPU memory", items=VRAM_PRESETS, default="AUTO")
    steps: IntProperty(name="Steps", default=0, min=0, max=1000, description="Sampling steps (0: the model's)")
    seed: IntProperty(name="Seed", default=42, min=0)
    textured: BoolProperty(
        name="Textured mesh",
        default=True,
        description="Reconstruct the textured mesh (stage 2). Off: the coarse shape and its "
        "placement only, several times faster (for layout)",
    )
    texture_size: IntProperty(name="Texture size", default=1024, min=64, max=8192)
    faces: IntProperty(name="Faces", default=20000, min=100, max=2_000_000, description="Target face count")
    output_dir: StringProperty(
        name="Output folder",
        subtype="DIR_PATH",
        default="",
        description="Where masks and reconstructed objects are written (empty: a folder "
        "next to the .blend, or a temporary one)",
    )
    preference_log: StringProperty(
        name="Preference log",
        subtype="FILE_PATH",
        default="",
        description="JSON-lines file of picks and rejections (empty: the weights folder's preferences.jsonl)",
    )

    def draw(self, context):
        layout = self.layout
        col = layout.column()
        row = col.row(align=True)
        row.prop(self, "python")
        row.operator("sam3d.detect_python", text="", icon="VIEWZOOM")
        if not self.python:
            found = setup.find_worker_python(ADDON_DIR)
            col.label(
                text=f"Detected: {found[0].python} ({found[0].source})"
                if found
                else "No sam3d environment found: set the Worker Python",
                icon="INFO",
            )
            if not found:
                from . import install

                install.draw(col, context)
        col.prop(self, "weights_dir")
        col.prop(self, "model")
        row = col.row()
        row.prop(self, "device")
        row.prop(self, "vram")
        box = layout.box()
        box.label(text="Defaults for new objects")
        row = box.row()
        row.prop(self, "steps")
        row.prop(self, "seed")
        box.prop(self, "textured")
        row = box.row()
        row.active = self.textured
        row.prop(self, "texture_size")
        row.prop(self, "faces")
        col = layout.column()
        col.prop(self, "output_dir")
        col.prop(self, "preference_log")
        layout.operator("sam3d.check_setup", icon="CHECKMARK")
        report = context.window_manager.get("sam3d_setup_report")
        if report:
            box = layout.box()
            for line in str(report).splitlines():
                box.label(text=line)


def get(context: bpy.types.Context | None = None) -> SAM3D_Preferences | None:
    """The preferences, or None when the add-on runs without being enabled (scripts, some tests)."""
    context = context or bpy.context
    addon = context.preferences.addons.get(package_name())
    return addon.preferences if addon is not None else None


def worker_python(prefs) -> tuple[str, str]:
    """(interpreter, where it came from); ('', reason) when none is set or found."""
    if prefs is not None and prefs.python:
        path = bpy.path.abspath(prefs.python)
        return (path, "preferences") if os.path.isfile(path) else ("", f"the Worker Python {path!r} does not exist")
    found = setup.find_worker_python(ADDON_DIR)
    if found:
        return found[0].python, found[0].source
    return "", (
        "no sam3d environment found; set Preferences > Add-ons > SAM 3D Objects > Worker Python to the "
        "python of the environment where sam3d is installed (or set $SAM3D_PYTHON)"
    )


def weights_dir(prefs) -> str:
    return bpy.path.abspath(prefs.weights_dir) if prefs is not None and prefs.weights_dir else ""


CLASSES = (SAM3D_Preferences,)
