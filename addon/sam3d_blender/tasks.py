"""What the add-on waits for: one task per worker request, advanced by `session.tick()` on the main thread.

Each task's `tick()` polls its job (never blocks) and returns True once it has finished; results are
applied to the scene there, one undo step per arriving object. Tasks refer to scenes and items by name
and uid, never by Python references to Blender data, which may be freed between ticks (undo, file load).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid

import bpy
from mathutils import Matrix, Vector

from . import preferences
from . import scene as S
from .core import preflog, setup
from .core.camera import blender_camera_from_K, intrinsics_from_fov
from .core.scene_io import entry_from_result
from .session import SESSION, SetupError, work_dir

_SEGMENT_GENERATION: dict[str, int] = {}  # scene name -> the latest segment request's number
CANDIDATES: dict[str, dict] = {}  # best-of-N group id -> {"item", "scene", "names", "expected", "photo", ...}


def report(props, message: str, level: str = "INFO") -> None:
    props.status, props.status_level = message, level
    print(f"SAM 3D: {message}")


@contextlib.contextmanager
def main_context():
    """A context with a window, for operators called from a timer (where context.window is None)."""
    wm = bpy.context.window_manager
    if bpy.context.window is None and wm is not None and wm.windows:
        with bpy.context.temp_override(window=wm.windows[0]):
            yield bpy.context
    else:
        yield bpy.context


def find_item(props, uid: str):
    return next((it for it in props.items if it.uid == uid), None)


def new_item(props, name: str, mask: str):
    item = props.items.add()
    item.uid, item.name, item.mask, item.status = uuid.uuid4().hex[:10], name, mask, "MASKED"
    props.active_item = len(props.items) - 1
    return item


def ensure_worker(props) -> bool:
    """Start the worker when needed; False (and a message) when it cannot run."""
    if SESSION.state in ("starting", "ready"):
        return True
    try:
        SESSION.start(preferences.get())
    except SetupError as e:
        report(props, str(e), "ERROR")
        return False
    return True


class Task:
    def __init__(self, scene: bpy.types.Scene):
        self.scene_name = scene.name
        self.job = None

    @property
    def props(self):
        sc = bpy.data.scenes.get(self.scene_name)
        return sc.sam3d if sc is not None else None

    def fail(self, message: str) -> None:
        if self.props is not None:
            report(self.props, message, "ERROR")

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def _worker_gone(self) -> str | None:
        """A message when the worker cannot take requests (failed to start); None when it can."""
        if SESSION.state == "failed":
            return SESSION.error or "the sam3d worker is not running"
        if SESSION.state == "stopped":
            return "the sam3d worker is not running; open Preferences > Add-ons > SAM 3D Objects > Check setup"
        return None

    def _submit_when_ready(self, props, request: dict, capability: str, missing: str) -> bool | None:
        """Submit `request` once the worker is ready and can do `capability`. None: submitted (go on polling);
        False: not ready yet (tick again); True: the task is over (why the worker cannot, or `missing`, reported)."""
        if (gone := self._worker_gone()) is not None:
            report(props, gone, "ERROR")
            return True
        if SESSION.state != "ready":
            return False
        if not SESSION.capable(capability):
            report(props, missing, "ERROR")
            return True
        self.job = SESSION.submit(request)
        return None

    @staticmethod
    def _error_text(msg: dict) -> str:
        if msg.get("type") == "cancelled":
            return f"cancelled ({msg.get('stage', '?')})"
        return msg.get("message") or f"the worker answered {msg.get('type')}"


# -- the photo and its camera -----------------------------------------------------------------------


def open_photo(context: bpy.types.Context, photo: str, width: int, height: int) -> bpy.types.Object:
    """Camera matched to the photo at once (the default field of view), refined by the worker when it can."""
    props = context.scene.sam3d
    K = intrinsics_from_fov(width, height)  # the worker's fallback: a 60 degree horizontal field of view
    cam = S.setup_photo_camera(context, photo, blender_camera_from_K(K, width, height), K, "default_fov")
    props.photo, props.width, props.height = os.path.abspath(photo), width, height
    props.K, props.intrinsics_source = json.dumps(K), "default_fov"
    props.camera, props.collection = cam, S.photo_collection(context, photo)
    props.prompts.clear()
    props.draft_mask = props.draft_info = ""
    props.items.clear()
    return cam


class OpenPhotoTask(Task):
    """Ask the worker for the photo's intrinsics (EXIF); update the camera when they differ."""

    def __init__(self, scene: bpy.types.Scene, photo: str):
        super().__init__(scene)
        self.photo = photo

    def tick(self) -> bool:
        props = self.props
        if props is None or props.photo != self.photo:
            return True  # another photo was opened meanwhile
        if self.job is None:
            if (gone := self._worker_gone()) is not None:
                report(props, f"camera uses a 60 degree field of view ({gone})", "WARNING")
                return True
            if SESSION.state != "ready":
                return False
            if not SESSION.capable("open_photo"):
                report(props, "camera uses a 60 degree field of view (this worker cannot read photo metadata)")
                return True
            self.job = SESSION.submit({"type": "open_photo", "photo": self.photo})
        self.job.poll()
        if not self.job.done():
            return False
        msg = self.job.final
        if msg.get("type") != "photo":
            report(
                props,
                f"camera uses a 60 degree field of view (reading the photo failed: {self._error_text(msg)})",
                "WARNING",
            )
            return True
        cam = props.camera
        if cam is not None and msg.get("blender_camera"):
            props.K, props.intrinsics_source = json.dumps(msg["K"]), msg.get("intrinsics_source", "")
            cam["sam3d_K"], cam["sam3d_intrinsics_source"] = props.K, props.intrinsics_source
            if _camera_differs(cam, msg["blender_camera"]):  # e.g. EXIF focal length: the camera changes
                S.apply_camera(cam, msg["blender_camera"], bpy.data.scenes[self.scene_name])
                S.push_undo("SAM 3D: camera from the photo")
        seg = msg.get("segmenter") or {}
        note = f"; selection: {seg.get('name')}" + (f" ({seg.get('reason')})" if seg.get("fallback") else "")
        report(props, f"camera from {props.intrinsics_source or 'the worker'}" + (note if seg else ""))
        return True


def _camera_differs(cam_obj, new: dict, tol: float = 1e-6) -> bool:
    try:
        old = json.loads(cam_obj.get("sam3d_camera", "{}"))
    except ValueError:
        return True
    for key in (
        "lens_mm",
        "sensor_width_mm",
        "shift_x",
        "shift_y",
        "resolution_x",
        "resolution_y",
        "pixel_aspect_x",
        "pixel_aspect_y",
    ):
        if key not in old or abs(float(old[key]) - float(new[key])) > tol:
            return True
    return old.get("sensor_fit") != new.get("sensor_fit") or old.get("matrix_world") != new.get("matrix_world")


# -- selection --------------------------------------------------------------------------------------


def request_segment(context: bpy.types.Context) -> None:
    """Send the current clicks and box to the worker; the newest answer becomes the draft mask."""
    scene = context.scene
    props = scene.sam3d
    if not props.photo:
        raise ValueError("open a photo first (SAM 3D panel > Open photo)")
    if not props.prompts and not props.use_box:
        props.draft_mask, props.draft_info = "", ""
        return
    if not ensure_worker(props):
        return
    gen = _SEGMENT_GENERATION.get(scene.name, 0) + 1
    _SEGMENT_GENERATION[scene.name] = gen
    out = os.path.join(work_dir(scene, props.photo, preferences.get()), f"draft_{gen}.png")
    req = {
        "type": "segment",
        "photo": props.photo,
        "out": out,
        "overwrite": True,  # drafts are scratch: the worker replaces only a mask it wrote (never another file)
        "points": [[p.x, p.y, p.label] for p in props.prompts],
        "box": list(props.box) if props.use_box else None,
    }
    from .session import add_task

    add_task(SegmentTask(scene, gen, req))


class SegmentTask(Task):
    def __init__(self, scene: bpy.types.Scene, generation: int, request: dict):
        super().__init__(scene)
        self.generation, self.request = generation, request

    def tick(self) -> bool:
        props = self.props
        if props is None or _SEGMENT_GENERATION.get(self.scene_name) != self.generation:
            return True  # a newer click superseded this request
        if self.job is None:
            missing = (
                "this worker cannot select objects from clicks yet (no 'segment' capability); "
                "update sam3d, or add masks from files (Add mask)"
            )
            if (over := self._submit_when_ready(props, self.request, "segment", missing)) is not None:
                return over
        self.job.poll()
        if not self.job.done():
            return False
        msg = self.job.final
        if msg.get("type") != "result" or not msg.get("mask"):
            report(props, f"selection failed: {self._error_text(msg)}", "ERROR")
            return True
        props.draft_mask = msg["mask"]
        seg = msg.get("segmenter") or {}
        name = seg.get("name", "?") if isinstance(seg, dict) else str(seg)
        score = msg.get("score")
        props.draft_info = (
            f"{msg.get('area', '?')} px" + (f", score {score:.2f}" if score is not None else "") + f" ({name})"
        )
        from . import overlay

        overlay.refresh(props)
        return True


def add_draft_as_item(context: bpy.types.Context, name: str = "") -> object:
    """The current draft mask becomes a masked object of the list; the clicks are cleared."""
    props = context.scene.sam3d
    if not props.draft_mask or not os.path.isfile(props.draft_mask):
        raise ValueError("no mask yet: click on the object in the photo first (and wait for its outline)")
    return add_mask_file(context, props.draft_mask, name, keep_prompts=False)


def add_mask_file(context: bpy.types.Context, mask: str, name: str = "", keep_prompts: bool = True):
    """A mask image (white = object, the photo's size) becomes a masked object of the list."""
    props = context.scene.sam3d
    if not props.photo:
        raise ValueError("open a photo first (SAM 3D panel > Open photo)")
    if not os.path.isfile(mask):
        raise FileNotFoundError(f"mask file {mask!r} does not exist")
    name = name or f"object_{len(props.items)}"
    dst = os.path.join(work_dir(context.scene, props.photo, preferences.get()), f"mask_{uuid.uuid4().hex[:8]}.png")
    _copy_to_new_file(mask, dst)  # the job reads it later: keep a copy that later clicks do not overwrite
    item = new_item(props, name, dst)
    if not keep_prompts:
        props.prompts.clear()
        props.use_box = False
        props.draft_mask = props.draft_info = ""
    return item


def _copy_to_new_file(src: str, dst: str) -> None:
    """Copy into a file that must not exist yet (O_EXCL: never through a link planted at `dst`)."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    with open(src, "rb") as fsrc, os.fdopen(fd, "wb") as fdst:
        shutil.copyfileobj(fsrc, fdst)


class SegmentAllTask(Task):
    def __init__(self, scene: bpy.types.Scene, request: dict):
        super().__init__(scene)
        self.request = request

    def tick(self) -> bool:
        props = self.props
        if props is None:
            return True
        if self.job is None:
            missing = "this worker cannot find objects automatically yet (no 'segment_all' capability)"
            if (over := self._submit_when_ready(props, self.request, "segment_all", missing)) is not None:
                return over
        self.job.poll()
        if not self.job.done():
            return False
        msg = self.job.final
        if msg.get("type") != "result":
            report(props, f"finding objects failed: {self._error_text(msg)}", "ERROR")
            return True
        for path in msg.get("masks") or []:
            new_item(props, f"object_{len(props.items)}", path)
        report(props, f"found {len(msg.get('masks') or [])} object(s)")
        return True


def request_find(context: bpy.types.Context) -> None:
    """Send the Find field (a noun phrase) and/or the current box (an example) to the worker's SAM 3; every
    instance arrives as an object row (see FindConceptTask)."""
    props = context.scene.sam3d
    if not props.photo:
        raise ValueError("open a photo first (SAM 3D panel > Open Photo)")
    text = props.find_text.strip()
    if not text and not props.use_box:
        raise ValueError("type what to find (e.g. chair) in the Find field, or draw a box around one instance")
    if not ensure_worker(props):
        return
    out = os.path.join(work_dir(context.scene, props.photo, preferences.get()), f"find_{uuid.uuid4().hex[:6]}")
    req = {
        "type": "segment_concept",
        "photo": props.photo,
        "out_dir": out,
        "text": text or None,
        "boxes": [[*props.box, 1]] if props.use_box else [],
        "min_score": round(float(props.find_min_score), 4),
    }
    from .session import add_task

    add_task(FindConceptTask(context.scene, req))
    report(props, f"finding {text or 'what the box shows'} ...")


def _row_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:40] or "found"


class FindConceptTask(Task):
    """A segment_concept request: each "instance" event becomes an object row at once (removable before
    Reconstruct); the final answer reports how many, or why none (e.g. no SAM 3 weights, and how to get them)."""

    def __init__(self, scene: bpy.types.Scene, request: dict):
        super().__init__(scene)
        self.request = request
        self.photo = request["photo"]
        self.added = 0

    def tick(self) -> bool:
        props = self.props
        if props is None or props.photo != self.photo:
            return True  # another photo was opened meanwhile
        if self.job is None:
            missing = "this worker cannot find objects from a word (no 'segment_concept' capability); update sam3d"
            if (over := self._submit_when_ready(props, self.request, "segment_concept", missing)) is not None:
                return over
        base = _row_name(self.request.get("text") or "found")
        for msg in self.job.poll():
            if msg.get("type") == "instance" and msg.get("mask"):
                taken = {it.name for it in props.items}
                i = self.added
                while f"{base}_{i}" in taken:
                    i += 1
                item = new_item(props, f"{base}_{i}", msg["mask"])
                item.message = f"score {float(msg.get('score', 0)):.2f}"
                self.added += 1
        if not self.job.done():
            return False
        msg = self.job.final
        if msg.get("type") != "result":
            report(props, f"finding failed: {self._error_text(msg)}", "ERROR")
            return True
        what = self.request.get("text") or "the box's kind of object"
        if not self.added:
            report(props, f"found no {what} above score {self.request.get('min_score')}; lower Min score", "WARNING")
        else:
            report(props, f"found {self.added} {what} ({msg.get('segmenter')}); remove rows you do not want, then "
                   "Reconstruct")  # fmt: skip
        return True


# -- reconstruction ---------------------------------------------------------------------------------


def job_request(scene: bpy.types.Scene, item, seed: int, tag: str) -> dict:
    """A reconstruct request for one masked object with the preferences' settings."""
    props, prefs = scene.sam3d, preferences.get()
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", item.name) or "object"  # it names the worker's output files
    out = os.path.join(work_dir(scene, props.photo, prefs), f"{safe}_{tag}")
    req = {
        "type": "reconstruct",
        "photo": props.photo,
        "mask": bpy.path.abspath(item.mask),
        "out": out,
        "seed": seed,
        "name": safe,
    }
    if prefs is not None:
        req["steps"] = prefs.steps or None
        req["texture_size"], req["faces"] = prefs.texture_size, prefs.faces
        req["stage2"] = prefs.textured  # False: coarse shape and placement only (stage 1), much faster
        if prefs.vram != "AUTO":
            req["vram"] = prefs.vram.lower()
    return req


def default_seed(item) -> int:
    prefs = preferences.get()
    return item.seed if item.seed >= 0 else (prefs.seed if prefs is not None else 42)


class ReconstructTask(Task):
    """One reconstruct job; its object is placed when the result arrives (one undo step).

    mode: "add" (a new object), "reroll" (replaces the item's object), "candidate" (one of best-of-N).
    """

    def __init__(self, scene: bpy.types.Scene, item, seed: int, mode: str = "add", group: str = ""):
        super().__init__(scene)
        self.item_uid, self.seed, self.mode, self.group = item.uid, seed, mode, group
        self.request = job_request(scene, item, seed, f"seed{seed}_{uuid.uuid4().hex[:6]}")
        self.cancelled_early = False

    def cancel(self) -> None:
        if self.job is None:
            self.cancelled_early = True
        else:
            self.job.cancel()

    def fail(self, message: str) -> None:
        props = self.props
        item = find_item(props, self.item_uid) if props is not None else None
        if item is not None:
            item.status, item.message = "ERROR", message
        super().fail(f"{item.name if item else 'object'}: {message}")

    def tick(self) -> bool:
        props = self.props
        item = find_item(props, self.item_uid) if props is not None else None
        if item is None:  # the item was removed (or its photo replaced): drop the job
            self.cancel()
            return True
        if self.cancelled_early:
            item.status, item.message = "CANCELLED", "cancelled before it started"
            return True
        if self.job is None:
            if (gone := self._worker_gone()) is not None:
                self.fail(gone)
                return True
            self.job = SESSION.submit(self.request)  # the worker queues it until its model has loaded
            item.status, item.stage, item.step, item.total, item.message = "QUEUED", "", 0, 0, ""
        for msg in self.job.poll():
            if msg.get("type") == "progress":
                item.status, item.stage = "RUNNING", str(msg.get("stage", ""))
                item.step, item.total = int(msg.get("step", 0)), int(msg.get("total", 0))
        if not self.job.done():
            return False
        final = self.job.final
        if final.get("type") == "cancelled":
            item.status, item.message = "CANCELLED", f"cancelled during {final.get('stage', '?')}"
            return True
        if final.get("type") != "result":
            self.fail(self._error_text(final))
            return True
        try:
            self._apply(props, item, final)
        except (OSError, ValueError, RuntimeError) as e:
            self.fail(f"could not place the object: {e}")
        return True

    def _apply(self, props, item, result: dict) -> None:
        scene = bpy.data.scenes[self.scene_name]
        entry = entry_from_result(result, item.name, bpy.path.abspath(item.mask))
        if entry.seed is None:
            entry.settings["seed"] = self.seed
        with main_context() as context:
            if entry.camera and props.camera is not None:
                S.apply_camera(props.camera, entry.camera, scene)  # the camera the worker placed it for
            col = props.collection or S.photo_collection(context, props.photo)
            if self.mode == "candidate":
                self._place_candidate(context, props, item, entry)
                return
            old = item.object if self.mode == "reroll" else None
            obj = S.apply_entry(context, entry, col, photo=props.photo, extra={"sam3d_item": item.uid})
            if old is not None:
                _log_choice(props, item, "reroll", None, [_candidate_info(old)])
                S.remove_object(old)
                obj.name = item.name  # the name the old one had (the new one arrived as "<name>.001")
            item.object, item.status, item.seed = obj, "DONE", entry.seed if entry.seed is not None else -1
            item.stage, item.message = "", f"seed {entry.seed}" + ("" if entry.textured else " (stage-1 voxels)")
            S.push_undo(f"SAM 3D: {'re-roll' if old is not None else 'add'} {obj.name}")

    def _place_candidate(self, context, props, item, entry) -> None:
        group = CANDIDATES[self.group]
        col = _candidate_collection(context, props, item)
        obj = S.apply_entry(
            context, entry, col, photo=props.photo, extra={"sam3d_item": item.uid, "sam3d_candidate_group": self.group}
        )
        obj["sam3d_true_matrix"] = json.dumps([list(r) for r in obj.matrix_world])
        index = len(group["names"])
        if index:  # side by side, to the right of the first (the first stays lined up with the photo)
            width = max(_world_extent(obj), 1e-3)
            obj.matrix_world = Matrix.Translation(Vector((1.25 * width * index, 0.0, 0.0))) @ obj.matrix_world
        group["names"].append(obj.name)
        item.status, item.stage, item.message = "DONE", "", f"{len(group['names'])}/{group['expected']} candidates"
        S.push_undo(f"SAM 3D: candidate {obj.name}")


def _world_extent(obj) -> float:
    xs = [(o.matrix_world @ Vector(c)).x for o in S.object_and_children(obj) if o.type == "MESH" for c in o.bound_box]
    return (max(xs) - min(xs)) if xs else 0.0


def _candidate_collection(context, props, item) -> bpy.types.Collection:
    parent = props.collection or S.photo_collection(context, props.photo)
    name = f"SAM3D candidates {item.name}"
    col = bpy.data.collections.get(name)
    if col is None:
        col = bpy.data.collections.new(name)
        parent.children.link(col)
    return col


def _candidate_info(obj) -> dict:
    settings = json.loads(obj.get("sam3d_settings", "{}"))
    settings.setdefault("weights", obj.get("sam3d_weights", ""))
    return preflog.candidate(int(obj.get("sam3d_seed", -1)), settings, obj.get("sam3d_file"))


def preference_log_path() -> str:
    prefs = preferences.get()
    if prefs is not None and prefs.preference_log:
        return bpy.path.abspath(prefs.preference_log)
    base = (
        preferences.weights_dir(prefs)
        or os.environ.get("SAM3D_HOME")
        or os.path.join(os.path.expanduser("~"), ".local", "share", "sam3d")
    )
    return os.path.join(base, "preferences.jsonl")


def _log_choice(props, item, kind: str, chosen: dict | None, rejected: list[dict]) -> None:
    weights = next((c.get("settings", {}).get("weights", "") for c in [chosen, *rejected] if c), "")
    model = SESSION.hello.get("model", "") if SESSION.hello else ""
    record = preflog.make_record(
        kind, props.photo, bpy.path.abspath(item.mask), chosen, rejected, weights=str(weights), model=model
    )
    preflog.append(preference_log_path(), record)


def start_best_of(scene: bpy.types.Scene, item, n: int) -> list[ReconstructTask]:
    """N reconstructions of one object with consecutive seeds; they arrive side by side as candidates."""
    group = uuid.uuid4().hex[:8]
    CANDIDATES[group] = {"item": item.uid, "scene": scene.name, "names": [], "expected": n}
    seed = default_seed(item)
    return [ReconstructTask(scene, item, seed + 1 + i, mode="candidate", group=group) for i in range(n)]


def keep_candidate(context: bpy.types.Context, obj: bpy.types.Object) -> bpy.types.Object:
    """Keep one candidate: back to its place in the photo, the others deleted, the choice logged."""
    gid = obj.get("sam3d_candidate_group")
    if not gid:
        raise ValueError(f"{obj.name} is not a best-of-N candidate; select one of the candidates")
    props = context.scene.sam3d
    item = find_item(props, obj.get("sam3d_item", ""))
    others = [o for o in bpy.data.objects if o.get("sam3d_candidate_group") == gid and o != obj]
    rejected = [_candidate_info(o) for o in others]
    if item is not None:
        _log_choice(props, item, "best_of_n", _candidate_info(obj), rejected)
    obj.matrix_world = Matrix(json.loads(obj["sam3d_true_matrix"]))
    target = props.collection or S.photo_collection(context, props.photo)
    for o in S.object_and_children(obj):
        for c in list(o.users_collection):
            c.objects.unlink(o)
        target.objects.link(o)
    del obj["sam3d_candidate_group"]
    for o in others:
        S.remove_object(o)
    _remove_empty_candidate_collections()
    old = item.object if item is not None else None
    if old is not None and old != obj:
        S.remove_object(old)
    if item is not None:
        obj.name = item.name
        item.object, item.seed, item.status = obj, int(obj.get("sam3d_seed", -1)), "DONE"
        item.message = f"kept seed {item.seed} of {len(others) + 1}"
    CANDIDATES.pop(gid, None)
    return obj


def reject_candidates(context: bpy.types.Context, gid: str) -> int:
    """Reject every candidate of a group (all logged as rejected); returns how many were removed."""
    props = context.scene.sam3d
    group = [o for o in bpy.data.objects if o.get("sam3d_candidate_group") == gid]
    if not group:
        return 0
    item = find_item(props, group[0].get("sam3d_item", ""))
    if item is not None:
        _log_choice(props, item, "best_of_n", None, [_candidate_info(o) for o in group])
    for o in group:
        S.remove_object(o)
    _remove_empty_candidate_collections()
    CANDIDATES.pop(gid, None)
    return len(group)


def _remove_empty_candidate_collections() -> None:
    for col in list(bpy.data.collections):
        if col.name.startswith("SAM3D candidates") and not col.all_objects:
            bpy.data.collections.remove(col)


# -- setup check ------------------------------------------------------------------------------------


class CheckSetupTask:
    """Probe the worker's Python (torch, GPU) and say hello to the worker; the report goes to the window
    manager's "sam3d_setup_report" (shown in the preferences and the panel)."""

    TIMEOUT_S = 600.0  # loading the official model can take minutes on a cold disk

    def __init__(self, prefs):
        self.prefs = prefs
        self.python, self.problem = preferences.worker_python(prefs)
        self.weights_dir = preferences.weights_dir(prefs)
        self.t0 = time.monotonic()
        self.probe = None
        self.probe_out: dict = {}
        if self.python:
            self.problem = ""
            try:
                self.probe = subprocess.Popen(
                    [self.python, *setup.PROBE_ARGS],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=setup.worker_env(self.weights_dir),
                )
                SESSION.start(prefs)
            except (OSError, SetupError) as e:
                self.problem, self.probe = str(e), None
        _set_report(["Checking the setup ..."])

    def fail(self, message: str) -> None:
        _set_report([f"Problem: {message}"])

    def tick(self) -> bool:
        if self.probe is not None and self.probe.poll() is not None:
            out, err = self.probe.communicate()
            # no JSON line: the interpreter could not even import sam3d_core (its last stderr line says why)
            self.probe_out = setup.parse_probe(out) or {"sam3d_error": (err.strip().splitlines() or ["?"])[-1]}
            self.probe = None
        state = SESSION.state if self.python and not self.problem else "failed"
        waiting = self.probe is not None or state == "starting"
        if waiting and time.monotonic() - self.t0 < self.TIMEOUT_S:
            return False
        if self.probe is not None:
            self.probe.kill()
        problem = self.problem or (SESSION.error if state == "failed" else "")
        if waiting:
            problem = problem or f"the worker did not answer within {self.TIMEOUT_S:.0f} s"
        lines = setup.setup_report(
            self.python,
            self.probe_out,
            SESSION.hello,
            setup.imported_models(self.weights_dir or _default_data_dir()),
            self.weights_dir,
            problem,
        )
        _set_report(lines)
        return True


def _default_data_dir() -> str:
    return os.environ.get("SAM3D_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share", "sam3d")


def _set_report(lines: list[str]) -> None:
    wm = bpy.context.window_manager
    if wm is not None:
        wm["sam3d_setup_report"] = "\n".join(lines)
