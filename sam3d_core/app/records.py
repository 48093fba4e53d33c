"""The app's state without Qt: objects and their candidates, job settings, the preference log, export.

The preference log is the add-on's format (addon/sam3d_blender/core/preflog.py, schema version 1; a test
checks that the add-on's reader reads what this writes): one JSON object per line, appended.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sam3d_core.app import glb
from sam3d_core.geometry import frames

LOG_VERSION = 1  # = preflog.LOG_VERSION of the add-on
EXPORTED_BY = "sam3d app"
STATUSES = ("MASKED", "QUEUED", "RUNNING", "DONE", "ERROR", "CANCELLED")


@dataclass
class JobSettings:
    """What a reconstruct request carries (docs/protocol.md); 0 / "" mean the worker's default."""

    steps: int = 0
    seed: int = 42
    fast: bool = False
    textured: bool = True  # False: stage 1 only (coarse voxels and placement)
    texture_size: int = 1024
    faces: int = 20000
    vram: str = "auto"  # auto | low | medium | high

    def request(self, photo: str, mask: str, out: str, name: str, seed: int) -> dict:
        req = {"type": "reconstruct", "photo": photo, "mask": mask, "out": out, "name": name, "seed": int(seed)}
        req.update(steps=self.steps or None, fast=self.fast, stage2=self.textured)
        req.update(texture_size=self.texture_size, faces=self.faces)
        if self.vram != "auto":
            req["vram"] = self.vram
        return req


@dataclass
class Candidate:
    """One finished reconstruction of an object: the worker's result message."""

    result: dict
    seed: int

    @property
    def mesh(self) -> str:
        return self.result.get("mesh_glb") or self.result.get("glb") or ""

    def info(self) -> dict:
        """The preference log's candidate record: {"seed", "settings" (+ weights), "mesh"}."""
        settings = dict(self.result.get("settings") or {})
        settings.setdefault("weights", self.result.get("weights") or "")
        return {"seed": self.seed, "settings": settings, "mesh": self.mesh or None}


@dataclass
class ObjectItem:
    name: str
    mask: str  # the mask file the jobs read (a copy the app owns)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    status: str = "MASKED"
    stage: str = ""
    step: int = 0
    total: int = 0
    message: str = ""
    seed: int | None = None  # the seed of the kept result
    kept: Candidate | None = None  # the result shown and exported
    candidates: list[Candidate] = field(default_factory=list)  # best-of-N results waiting for a pick
    expected: int = 0  # best-of-N: how many candidates were asked for
    jobs: set = field(default_factory=set)  # ids of this object's jobs in flight

    @property
    def safe_name(self) -> str:
        return safe_name(self.name)


def safe_name(name: str) -> str:
    """A name for files: letters, digits, '_' and '-' (what the worker accepts)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "object"


def unique_name(base: str, taken: Sequence[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


# ----------------------------------------------------------------------------------------------
# The preference log


def default_log_path(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "preferences.jsonl"


def preference_record(
    kind: str, photo: str, mask: str | None, chosen: dict | None, rejected: Sequence[dict], model: str = ""
) -> dict:
    """A record of the add-on's schema (preflog.make_record): kind "best_of_n" or "reroll"."""
    if kind not in ("best_of_n", "reroll"):
        raise ValueError(f"preference record kind {kind!r}: expected 'best_of_n' or 'reroll'")
    if chosen is None and not rejected:
        raise ValueError("a preference record needs a chosen candidate or at least one rejected one")
    weights = next((c.get("settings", {}).get("weights", "") for c in [chosen, *rejected] if c), "")
    return {
        "version": LOG_VERSION,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kind": kind,
        "photo": photo,
        "mask": mask,
        "weights": str(weights),
        "model": model,
        "chosen": chosen,
        "rejected": list(rejected),
    }


def append_record(path: str | os.PathLike, record: dict) -> None:
    """One line, one write call (concurrent appenders, e.g. Blender and the app, do not interleave)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


# ----------------------------------------------------------------------------------------------
# Export: the kept objects of a photo as one folder (object files, scene.glb, scene.json)


class ExportError(Exception):
    """The export folder cannot be used; the message says why and what to do."""


def check_export_folder(out: str | os.PathLike) -> Path:
    """`out` must be missing, empty, or an earlier export of this app (its scene.json says so)."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; choose a folder for the export")
    if out.is_dir() and any(out.iterdir()):
        try:
            ours = json.loads((out / "scene.json").read_text(encoding="utf-8")).get("exported_by") == EXPORTED_BY
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ExportError(f"{out} holds files this app did not write; choose an empty folder (nothing is replaced)")
    parent = out if out.is_dir() else next(p for p in out.parents if p.exists())
    if not os.access(parent, os.W_OK):
        raise ExportError(f"{parent} is not writable; choose another folder")
    return out


def _copy(src: str, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _job_scene(result: dict) -> dict:
    """The scene.json the worker wrote for one job: the camera record and the object's full record."""
    path = result.get("scene")
    if not path or not os.path.isfile(path):
        raise ExportError(f"the worker's scene.json {path!r} is gone; reconstruct the object again")
    return json.loads(Path(path).read_text(encoding="utf-8"))


def export_scene(items: Sequence[ObjectItem], photo: str, out: str | os.PathLike, model: str = "") -> dict:
    """Write every kept object (NAME.glb or NAME_voxels.glb, NAME.ply, NAME_mask.png), scene.glb (textured
    objects placed, the photo's camera at the origin) and scene.json (version 1, as `sam3d reconstruct` writes,
    so `sam3d_blender.demo_scene` builds the .blend from it). Returns the scene.json record."""
    kept = [it for it in items if it.kept is not None]
    if not kept:
        raise ExportError("no reconstructed object to export yet: reconstruct an object first")
    out = check_export_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    camera, objects, placed, names = None, [], [], []
    for it in kept:
        res = it.kept.result
        scene = _job_scene(res)
        camera = camera or {k: scene[k] for k in ("width", "height", "K", "intrinsics_source", "blender_camera")}
        rec = dict(next((o for o in scene["objects"]), {}))
        name = unique_name(it.safe_name, names)
        names.append(name)
        rec["name"] = name
        if res.get("mesh_glb"):
            _copy(res["mesh_glb"], out / f"{name}.glb")
            rec["mesh_glb"] = f"{name}.glb"
            pose = np.asarray(res["pose"]["matrix"], np.float64)
            placed.append((name, out / f"{name}.glb", frames.gltf_node_matrix(pose)))
        else:
            _copy(res["glb"], out / f"{name}_voxels.glb")
            rec["glb"] = f"{name}_voxels.glb"
        rec.pop("gaussians_ply", None)
        if res.get("gaussians_ply") and os.path.isfile(res["gaussians_ply"]):
            _copy(res["gaussians_ply"], out / f"{name}.ply")
            rec["gaussians_ply"] = f"{name}.ply"
        _copy(it.mask, out / f"{name}_mask.png")
        rec["mask"] = f"{name}_mask.png"
        rec["settings"] = dict(res.get("settings") or rec.get("settings") or {})
        objects.append(rec)
    weights = sorted({str(it.kept.result.get("weights") or "") for it in kept} - {""})
    record = {
        "version": 1,
        "photo": os.path.abspath(photo),
        **camera,
        "frames": "as sam3d reconstruct's scene.json (docs/architecture.md, Frames)",
        "objects": objects,
        "model": model or str(kept[0].kept.result.get("model", "")),
        "weights": weights[0] if len(weights) == 1 else "+".join(weights),
        "exported_by": EXPORTED_BY,
    }
    if placed:
        cam = frames.gltf_camera(camera["K"], camera["width"], camera["height"])
        fd, tmp = tempfile.mkstemp(prefix=".scene.glb.", dir=out)
        os.close(fd)
        glb.merge_glbs(placed, tmp, cam["perspective"], {"camera": cam["extras"], "model": record["model"]})
        os.replace(tmp, out / "scene.glb")
        record["scene_glb"] = "scene.glb"
    fd, tmp = tempfile.mkstemp(prefix=".scene.json.", dir=out)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, out / "scene.json")
    return record
