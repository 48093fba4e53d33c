"""Reconstruct results and scene.json files -> one description of each object to place. Stdlib only.

Both the interactive flow (a worker's `reconstruct` result) and the headless demo script (a scene.json
written by `sam3d demo` / `sam3d scene`) end in `ObjectEntry`, which `scene.apply_entry` puts into Blender.

Which file is imported, and with which matrix:
- `mesh_glb` (the textured object, stored y-up in the model's local frame): imported and given
  `blender.object_matrix_world` (result) / `blender_matrix_world` (scene.json);
- otherwise the stage-1 `glb` (voxels already posed in glTF camera space): imported with the identity.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .camera import blender_camera_from_K, check_camera

IDENTITY = ((1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0), (0.0, 0.0, 0.0, 1.0))


@dataclass
class ObjectEntry:
    """One object to place: the file to import, its 4x4 world matrix (rows), and what made it."""

    name: str
    mesh_path: str  # GLB to import (textured mesh when the worker made one, else stage-1 voxels)
    matrix_world: list[list[float]]
    textured: bool  # True when mesh_path is the baked-texture mesh (mesh_glb)
    mask: str | None = None
    gaussians_ply: str | None = None
    mask_iou: float | None = None
    settings: dict = field(default_factory=dict)
    pose: dict | None = None
    camera: dict | None = None  # the blender_camera the worker used for this object, when it said
    weights: str = ""  # the weights' hash (provenance)

    @property
    def seed(self) -> int | None:
        s = self.settings.get("seed")
        return s if isinstance(s, int) else None


@dataclass
class SceneSpec:
    """A scene.json: the photo, its camera, and the objects."""

    photo: str | None
    width: int
    height: int
    K: list[list[float]]
    intrinsics_source: str
    camera: dict
    objects: list[ObjectEntry]
    model: str = ""
    weights: str = ""


def _matrix(m, what: str) -> list[list[float]]:
    if m is None:
        return [list(r) for r in IDENTITY]
    if len(m) != 4 or any(len(r) != 4 for r in m):
        raise ValueError(f"{what} must be a 4x4 matrix given as rows, got {m!r}")
    return [[float(v) for v in r] for r in m]


def _resolve(path: str | None, base: str | None) -> str | None:
    if not path:
        return None
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) or base is None else os.path.normpath(os.path.join(base, path))


def entry_from_result(result: dict, name: str, mask: str | None = None) -> ObjectEntry:
    """A worker `reconstruct` result message -> ObjectEntry. `mask`: the mask file the job used."""
    blender = result.get("blender") or {}
    mesh = result.get("mesh_glb")
    if mesh:
        path, matrix, textured = mesh, _matrix(blender.get("object_matrix_world"), "object_matrix_world"), True
    elif result.get("glb"):
        path, matrix, textured = result["glb"], _matrix(None, ""), False
    else:
        raise ValueError(
            "the worker's result names no mesh_glb and no glb to import; update the worker "
            f"(result keys: {sorted(result)})"
        )
    camera = blender.get("camera")
    settings = dict(result.get("settings") or {})
    return ObjectEntry(
        name=name,
        mesh_path=path,
        matrix_world=matrix,
        textured=textured,
        mask=mask,
        gaussians_ply=result.get("gaussians_ply"),
        mask_iou=result.get("mask_iou"),
        settings=settings,
        pose=result.get("pose"),
        camera=check_camera(camera) if camera else None,
        weights=str(result.get("weights") or settings.get("weights") or ""),
    )


def load_scene(path: str, photo: str | None = None, mask: str | None = None) -> SceneSpec:
    """Read a scene.json: the version-1 schema, or the older stage-1 one (intrinsics, image_size, glb).

    `photo` / `mask`: used when the file names none (the older schema names neither). Relative paths in
    the file are relative to its folder.
    """
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
        raise ValueError(f"{path} is not a sam3d scene.json (no 'objects' list); write one with `sam3d demo`")
    if data.get("version") == 1:
        width, height, K = int(data["width"]), int(data["height"]), data["K"]
        source = data.get("intrinsics_source", "default_fov")
        camera = check_camera(data["blender_camera"]) if data.get("blender_camera") else None
    elif "intrinsics" in data and "image_size" in data:  # the stage-1 scene.json: image_size is [H, W]
        height, width = (int(v) for v in data["image_size"])
        K, source, camera = data["intrinsics"], "default_fov", None
    else:
        raise ValueError(
            f"{path}: unknown scene.json layout (version {data.get('version')!r}); expected version 1 "
            "or the stage-1 file with 'intrinsics' and 'image_size'. Re-run `sam3d demo`"
        )
    camera = camera or blender_camera_from_K(K, width, height)
    photo_path = _resolve(data.get("photo"), base) or photo
    objects = []
    for i, obj in enumerate(data["objects"]):
        name = obj.get("name") or f"object_{i}"
        mesh = _resolve(obj.get("mesh_glb"), base)
        if mesh:
            path_, matrix, textured = mesh, _matrix(obj.get("blender_matrix_world"), "blender_matrix_world"), True
        elif obj.get("glb"):
            path_, matrix, textured = _resolve(obj["glb"], base), _matrix(None, ""), False
        else:
            raise ValueError(f"{path}: object {i} ({name}) names no mesh_glb and no glb")
        pose = obj.get("pose") or {k: obj[k] for k in ("rotation_wxyz", "translation", "scale") if k in obj} or None
        objects.append(
            ObjectEntry(
                name=name,
                mesh_path=path_,
                matrix_world=matrix,
                textured=textured,
                mask=_resolve(obj.get("mask"), base) or (mask if len(data["objects"]) == 1 else None),
                gaussians_ply=_resolve(obj.get("gaussians_ply"), base),
                mask_iou=obj.get("mask_iou"),
                settings=dict(obj.get("settings") or {}),
                pose=pose,
                camera=camera,
            )
        )
    weights = data.get("weights") or ""
    weights = weights if isinstance(weights, str) else json.dumps(weights)
    for obj in objects:
        obj.weights = obj.weights or str(obj.settings.get("weights") or weights)
    return SceneSpec(
        photo=photo_path,
        width=width,
        height=height,
        K=[list(map(float, r)) for r in K],
        intrinsics_source=source,
        camera=camera,
        objects=objects,
        model=str(data.get("model", "")),
        weights=weights,
    )
