"""Operators of the flow: open a photo, click objects, reconstruct, cancel, re-roll, best of N, setup.

No operator waits on the worker: the ones that send requests add a task (tasks.py) and return at once;
`session.tick()`, on a timer, applies what arrives.
"""

from __future__ import annotations

import os

import bpy
from bpy.props import FloatProperty, IntProperty, StringProperty
from bpy_extras.io_utils import ImportHelper

from . import overlay, preferences, tasks
from . import scene as S
from .core import setup
from .core.camera import region_to_photo
from .session import SESSION, TASKS, add_task


def _props(context):
    return context.scene.sam3d


def _fail(op, props, message: str) -> set[str]:
    tasks.report(props, message, "ERROR")
    op.report({"ERROR"}, message)
    return {"CANCELLED"}


class SAM3D_OT_open_photo(bpy.types.Operator, ImportHelper):
    """Load a reference photo: a new camera matched to it, with the photo as its background"""

    bl_idname = "sam3d.open_photo"
    bl_label = "Open Photo"
    bl_options = {"REGISTER", "UNDO"}
    filter_glob: StringProperty(default="*.png;*.jpg;*.jpeg;*.tif;*.tiff;*.webp;*.bmp", options={"HIDDEN"})

    def execute(self, context):
        props = _props(context)
        path = os.path.abspath(bpy.path.abspath(self.filepath))
        try:
            img = S.load_photo(path)
            width, height = img.size
            if width < 1 or height < 1:
                raise ValueError(f"Blender reads {path!r} as an empty image; save it as PNG or JPEG")
            tasks.open_photo(context, path, width, height)
        except (OSError, ValueError) as e:
            return _fail(self, props, str(e))
        if tasks.ensure_worker(props):  # start the model loading now; EXIF intrinsics come when it is ready
            add_task(tasks.OpenPhotoTask(context.scene, path))
        tasks.report(props, f"photo {os.path.basename(path)}: {width}x{height}; click objects to select them")
        return {"FINISHED"}


class SAM3D_OT_add_prompt(bpy.types.Operator):
    """Add a click on the photo (photo pixels, y down): label 1 = object, 0 = not the object"""

    bl_idname = "sam3d.add_prompt"
    bl_label = "Add Click"
    bl_options = {"REGISTER", "INTERNAL"}
    x: FloatProperty()
    y: FloatProperty()
    label: IntProperty(default=1, min=0, max=1)

    def execute(self, context):
        props = _props(context)
        if not props.photo:
            return _fail(self, props, "open a photo first (SAM 3D panel > Open Photo)")
        if not (0 <= self.x < props.width and 0 <= self.y < props.height):
            return _fail(
                self, props, f"click ({self.x:.0f}, {self.y:.0f}) is outside the {props.width}x{props.height} photo"
            )
        p = props.prompts.add()
        p.x, p.y, p.label = self.x, self.y, self.label
        tasks.request_segment(context)
        return {"FINISHED"}


class SAM3D_OT_set_box(bpy.types.Operator):
    """Set the box around the object (photo pixels); a box with zero size removes it"""

    bl_idname = "sam3d.set_box"
    bl_label = "Set Box"
    bl_options = {"REGISTER", "INTERNAL"}
    x0: FloatProperty()
    y0: FloatProperty()
    x1: FloatProperty()
    y1: FloatProperty()

    def execute(self, context):
        props = _props(context)
        if not props.photo:
            return _fail(self, props, "open a photo first (SAM 3D panel > Open Photo)")
        x0, x1 = sorted((self.x0, self.x1))
        y0, y1 = sorted((self.y0, self.y1))
        props.use_box = x1 - x0 >= 1 and y1 - y0 >= 1
        props.box = (max(x0, 0), max(y0, 0), min(x1, props.width), min(y1, props.height))
        tasks.request_segment(context)
        return {"FINISHED"}


class SAM3D_OT_clear_prompts(bpy.types.Operator):
    """Remove the clicks and the box"""

    bl_idname = "sam3d.clear_prompts"
    bl_label = "Clear Clicks"
    bl_options = {"REGISTER"}

    def execute(self, context):
        props = _props(context)
        props.prompts.clear()
        props.use_box = False
        props.draft_mask = props.draft_info = ""
        overlay.refresh(props)
        return {"FINISHED"}


class SAM3D_OT_pick(bpy.types.Operator):
    """Click objects on the photo (Image Editor, or the 3D view through the photo's camera).
    Click: part of the object. Shift/Ctrl-click or right-click: not part of it. Drag: box.
    Enter: add the object to the list. Backspace: remove the last click. Esc: done"""

    bl_idname = "sam3d.pick"
    bl_label = "Pick Objects"
    DRAG_PX = 6

    @classmethod
    def poll(cls, context):
        return (
            bool(_props(context).photo)
            and context.area is not None
            and context.area.type in ("IMAGE_EDITOR", "VIEW_3D")
        )

    def invoke(self, context, event):
        if overlay.photo_frame(context) is None:
            msg = (
                "show the photo first: in the Image Editor open it, or in the 3D view look through its camera "
                "(Numpad 0)"
            )
            self.report({"WARNING"}, msg)
            return {"CANCELLED"}
        self._press = None
        context.window_manager.modal_handler_add(self)
        context.workspace.status_text_set(
            "Click: object  Shift/Right-click: not object  Drag: box  "
            "Enter: add object  Backspace: undo click  Esc: done"
        )
        return {"RUNNING_MODAL"}

    def _to_photo(self, context, event):
        frame = overlay.photo_frame(context)
        props = _props(context)
        if frame is None:
            return None
        x, y = region_to_photo(event.mouse_region_x, event.mouse_region_y, frame, props.width, props.height)
        return (x, y) if 0 <= x < props.width and 0 <= y < props.height else None

    def modal(self, context, event):
        props = _props(context)
        if event.type in {"ESC"}:
            context.workspace.status_text_set(None)
            return {"FINISHED"}
        if event.type in {"RET", "NUMPAD_ENTER"} and event.value == "PRESS":
            bpy.ops.sam3d.add_object()
            return {"RUNNING_MODAL"}
        if event.type == "BACK_SPACE" and event.value == "PRESS":
            if props.prompts:
                props.prompts.remove(len(props.prompts) - 1)
                tasks.request_segment(context)
            return {"RUNNING_MODAL"}
        if event.type in {"LEFTMOUSE", "RIGHTMOUSE"}:
            pt = self._to_photo(context, event)
            if pt is None:
                return {"PASS_THROUGH"}
            if event.value == "PRESS":
                self._press = (event.mouse_region_x, event.mouse_region_y, pt)
                return {"RUNNING_MODAL"}
            if event.value == "RELEASE" and self._press is not None:
                mx, my, start = self._press
                self._press = None
                moved = abs(event.mouse_region_x - mx) + abs(event.mouse_region_y - my)
                if event.type == "LEFTMOUSE" and moved > self.DRAG_PX:
                    bpy.ops.sam3d.set_box(x0=start[0], y0=start[1], x1=pt[0], y1=pt[1])
                else:
                    negative = event.type == "RIGHTMOUSE" or event.shift or event.ctrl
                    bpy.ops.sam3d.add_prompt(x=pt[0], y=pt[1], label=0 if negative else 1)
                context.area.tag_redraw()
                return {"RUNNING_MODAL"}
        return {"PASS_THROUGH"}


class SAM3D_OT_add_object(bpy.types.Operator):
    """Add the selected object (the current mask) to the list of objects to reconstruct"""

    bl_idname = "sam3d.add_object"
    bl_label = "Add Object"
    bl_options = {"REGISTER", "UNDO"}
    name: StringProperty(default="")

    def execute(self, context):
        try:
            item = tasks.add_draft_as_item(context, self.name)
        except (OSError, ValueError) as e:
            return _fail(self, _props(context), str(e))
        tasks.report(_props(context), f"added {item.name}; click the next object or press Reconstruct")
        return {"FINISHED"}


class SAM3D_OT_add_mask(bpy.types.Operator, ImportHelper):
    """Add an object from a mask image (white = object, the photo's size) made elsewhere"""

    bl_idname = "sam3d.add_mask"
    bl_label = "Add Mask From File"
    bl_options = {"REGISTER", "UNDO"}
    filter_glob: StringProperty(default="*.png;*.jpg;*.jpeg;*.tif;*.tiff;*.bmp", options={"HIDDEN"})
    name: StringProperty(default="")

    def execute(self, context):
        try:
            item = tasks.add_mask_file(context, bpy.path.abspath(self.filepath), self.name)
        except (OSError, ValueError) as e:
            return _fail(self, _props(context), str(e))
        tasks.report(_props(context), f"added {item.name} from {os.path.basename(self.filepath)}")
        return {"FINISHED"}


class SAM3D_OT_find_objects(bpy.types.Operator):
    """Find every object of the photo automatically (each becomes an item of the list)"""

    bl_idname = "sam3d.find_objects"
    bl_label = "Find All Objects"

    def execute(self, context):
        props = _props(context)
        if not props.photo:
            return _fail(self, props, "open a photo first (SAM 3D panel > Open Photo)")
        if not tasks.ensure_worker(props):
            return {"CANCELLED"}
        out = os.path.join(tasks.work_dir(context.scene, props.photo, preferences.get()), "all")
        add_task(tasks.SegmentAllTask(context.scene, {"type": "segment_all", "photo": props.photo, "out_dir": out}))
        tasks.report(props, "finding objects ...")
        return {"FINISHED"}


class SAM3D_OT_find_concept(bpy.types.Operator):
    """Find every instance of the Find field's phrase (and/or of what the drawn box shows) with SAM 3: each becomes
    an object row"""

    bl_idname = "sam3d.find_concept"
    bl_label = "Find"

    def execute(self, context):
        try:
            tasks.request_find(context)
        except ValueError as e:
            return _fail(self, _props(context), str(e))
        return {"FINISHED"}


class SAM3D_OT_remove_item(bpy.types.Operator):
    """Remove the active object from the list (a placed object stays in the scene)"""

    bl_idname = "sam3d.remove_item"
    bl_label = "Remove From List"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        props = _props(context)
        if not 0 <= props.active_item < len(props.items):
            return {"CANCELLED"}
        uid = props.items[props.active_item].uid
        for task in [t for t in TASKS if getattr(t, "item_uid", None) == uid]:
            task.cancel()
        props.items.remove(props.active_item)
        props.active_item = max(0, min(props.active_item, len(props.items) - 1))
        return {"FINISHED"}


class SAM3D_OT_reconstruct(bpy.types.Operator):
    """Send every object of the list that has no 3D object yet to the worker"""

    bl_idname = "sam3d.reconstruct"
    bl_label = "Reconstruct"

    def execute(self, context):
        props = _props(context)
        todo = [it for it in props.items if it.status in ("MASKED", "ERROR", "CANCELLED")]
        if not todo:
            return _fail(self, props, "nothing to reconstruct: add objects first (click them on the photo)")
        if not tasks.ensure_worker(props):
            self.report({"ERROR"}, props.status)
            return {"CANCELLED"}
        for item in todo:
            add_task(tasks.ReconstructTask(context.scene, item, tasks.default_seed(item)))
            item.status, item.message = "QUEUED", ""
        tasks.report(props, f"reconstructing {len(todo)} object(s) ...")
        return {"FINISHED"}


class SAM3D_OT_cancel(bpy.types.Operator):
    """Stop the running and queued jobs; the objects that already arrived stay"""

    bl_idname = "sam3d.cancel"
    bl_label = "Cancel"

    def execute(self, context):
        n = 0
        for task in TASKS:
            if isinstance(task, tasks.ReconstructTask):
                task.cancel()
                n += 1
        tasks.report(_props(context), f"cancelling {n} job(s) ..." if n else "nothing to cancel")
        return {"FINISHED"}


def _active_item(context):
    props = _props(context)
    obj = context.active_object
    if obj is not None and obj.get("sam3d_item"):
        item = tasks.find_item(props, obj["sam3d_item"])
        if item is not None:
            return item
    if 0 <= props.active_item < len(props.items):
        return props.items[props.active_item]
    return None


class SAM3D_OT_reroll(bpy.types.Operator):
    """Reconstruct the active object again with another seed; the new one replaces it"""

    bl_idname = "sam3d.reroll"
    bl_label = "Re-roll"
    seed: IntProperty(default=-1, min=-1, description="-1: the next seed")

    def execute(self, context):
        props = _props(context)
        item = _active_item(context)
        if item is None or item.object is None:
            return _fail(self, props, "select a reconstructed object (or its row in the list) to re-roll")
        if not tasks.ensure_worker(props):
            return {"CANCELLED"}
        seed = self.seed if self.seed >= 0 else tasks.default_seed(item) + 1
        add_task(tasks.ReconstructTask(context.scene, item, seed, mode="reroll"))
        item.status = "QUEUED"
        tasks.report(props, f"re-rolling {item.name} with seed {seed} ...")
        return {"FINISHED"}


class SAM3D_OT_best_of_n(bpy.types.Operator):
    """Reconstruct the active object N times with different seeds, side by side; keep the best"""

    bl_idname = "sam3d.best_of_n"
    bl_label = "Best of N"
    n: IntProperty(default=0, min=0, max=8, description="0: the panel's number")

    def execute(self, context):
        props = _props(context)
        item = _active_item(context)
        if item is None:
            return _fail(self, props, "select an object of the list first")
        if not tasks.ensure_worker(props):
            return {"CANCELLED"}
        n = self.n or props.best_of
        for task in tasks.start_best_of(context.scene, item, n):
            add_task(task)
        item.status = "QUEUED"
        tasks.report(props, f"{n} candidates of {item.name} on their way; select one and press Keep")
        return {"FINISHED"}


class SAM3D_OT_keep_candidate(bpy.types.Operator):
    """Keep the selected candidate (the others are deleted; the choice goes to the preference log)"""

    bl_idname = "sam3d.keep_candidate"
    bl_label = "Keep This One"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        obj = context.active_object
        return obj is not None and bool(obj.get("sam3d_candidate_group"))

    def execute(self, context):
        try:
            obj = tasks.keep_candidate(context, context.active_object)
        except ValueError as e:
            return _fail(self, _props(context), str(e))
        tasks.report(_props(context), f"kept {obj.name}")
        return {"FINISHED"}


class SAM3D_OT_reject_candidates(bpy.types.Operator):
    """Reject every candidate of the selected one's group (logged as rejections)"""

    bl_idname = "sam3d.reject_candidates"
    bl_label = "Reject All"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        obj = context.active_object
        return obj is not None and bool(obj.get("sam3d_candidate_group"))

    def execute(self, context):
        n = tasks.reject_candidates(context, context.active_object["sam3d_candidate_group"])
        tasks.report(_props(context), f"rejected {n} candidate(s)")
        return {"FINISHED"}


class SAM3D_OT_load_scene(bpy.types.Operator, ImportHelper):
    """Import a scene.json written by `sam3d demo` / `sam3d scene`: camera, photo and placed objects"""

    bl_idname = "sam3d.load_scene"
    bl_label = "Import sam3d Scene"
    bl_options = {"REGISTER", "UNDO"}
    filter_glob: StringProperty(default="*.json", options={"HIDDEN"})

    def execute(self, context):
        from .core.scene_io import load_scene
        from .demo_scene import build_scene

        try:
            spec = load_scene(bpy.path.abspath(self.filepath))
            build_scene(context, spec)
        except (OSError, ValueError, RuntimeError) as e:
            return _fail(self, _props(context), str(e))
        self.report({"INFO"}, f"placed {len(spec.objects)} object(s)")
        return {"FINISHED"}


class SAM3D_OT_check_setup(bpy.types.Operator):
    """Check the worker's Python, GPU, memory, weights and worker version (the report appears below)"""

    bl_idname = "sam3d.check_setup"
    bl_label = "Check Setup"

    def execute(self, context):
        add_task(tasks.CheckSetupTask(preferences.get(context)))
        return {"FINISHED"}


class SAM3D_OT_detect_python(bpy.types.Operator):
    """Find the Python of a sam3d installation and put it into the preferences"""

    bl_idname = "sam3d.detect_python"
    bl_label = "Detect Worker Python"

    def execute(self, context):
        prefs = preferences.get(context)
        found = setup.find_worker_python(preferences.ADDON_DIR)
        if not found:
            self.report({"WARNING"}, "no sam3d environment found; install sam3d or set the path by hand")
            return {"CANCELLED"}
        if prefs is not None:
            prefs.python = found[0].python
        self.report({"INFO"}, f"{found[0].python} ({found[0].source})")
        return {"FINISHED"}


class SAM3D_OT_stop_worker(bpy.types.Operator):
    """Stop the worker process (frees its GPU memory); it starts again when needed"""

    bl_idname = "sam3d.stop_worker"
    bl_label = "Stop Worker"

    def execute(self, context):
        SESSION.stop()
        tasks.report(_props(context), "worker stopped")
        return {"FINISHED"}


CLASSES = (
    SAM3D_OT_open_photo,
    SAM3D_OT_add_prompt,
    SAM3D_OT_set_box,
    SAM3D_OT_clear_prompts,
    SAM3D_OT_pick,
    SAM3D_OT_add_object,
    SAM3D_OT_add_mask,
    SAM3D_OT_find_objects,
    SAM3D_OT_find_concept,
    SAM3D_OT_remove_item,
    SAM3D_OT_reconstruct,
    SAM3D_OT_cancel,
    SAM3D_OT_reroll,
    SAM3D_OT_best_of_n,
    SAM3D_OT_keep_candidate,
    SAM3D_OT_reject_candidates,
    SAM3D_OT_load_scene,
    SAM3D_OT_check_setup,
    SAM3D_OT_detect_python,
    SAM3D_OT_stop_worker,
)
