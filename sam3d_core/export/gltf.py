"""GLB writers: one object in the official layout, and a scene with every object placed and the photo's camera.

A small glTF 2.0 writer of our own (json + struct + numpy; Pillow for the PNG texture), because trimesh's
exporter writes neither cameras nor node extras. Layout of every mesh (object and scene files alike):
* positions: the local frame turned z-up -> y-up, (x, y, z) -> (x, z, -y), as the official `to_glb`
  (a rotation, so the outward winding stays counter-clockwise);
* NORMAL: area-weighted vertex normals, one per position (UV seams share it);
* TEXCOORD_0: `TexturedMesh.uvs` unchanged (glTF and our UVs both put (0, 0) at the image's top-left);
* a metallicRoughness material: metallic 0, roughness 1.0 (as official: the baked albedo carries the
  photo's shading, so no extra highlights), doubleSided false; baseColorTexture (PNG, sRGB) when a texture is
  present, else COLOR_0 vertex colours. glTF defines COLOR_0 as linear and multiplies it into the base colour,
  so sRGB colours are converted to linear (the official trimesh export writes them unconverted, which looks
  washed out), and COLOR_0 is left out when a texture is present.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sam3d_core.export.cleanup import face_area_vectors
from sam3d_core.export.output import atomic_path
from sam3d_core.geometry import frames

__all__ = ["TexturedMesh", "save_object_glb", "save_scene_glb", "vertex_normals"]

Z_UP_TO_Y_UP = frames.LOCAL_TO_GLTF_LOCAL.T  # row vectors: v @ M = (x, z, -y), the local frame stored y-up

_FLOAT, _UINT32 = 5126, 5125  # accessor componentType
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963  # bufferView target
_LINEAR, _LINEAR_MIPMAP_LINEAR, _CLAMP_TO_EDGE = 9729, 9987, 33071  # sampler
_TYPES = {1: "SCALAR", 2: "VEC2", 3: "VEC3", 4: "VEC4"}
_CAMERA_KEYS = {"yfov", "aspectRatio", "znear", "zfar"}


@dataclass
class TexturedMesh:
    """One object ready for GLB export, in the local frame (z up; the writers turn it y-up).

    vertices [V, 3] float, faces [F, 3] int, uvs [V, 2] in [0, 1] (glTF convention) or None,
    texture [H, W, 3|4] uint8 sRGB or None (needs uvs), vertex_colors [V, 3|4] float sRGB in [0, 1] (or
    uint8) or None (used only without a texture), name (node and mesh name), metadata (JSON-able; written
    as the node's glTF `extras`).
    """

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray | None = None
    texture: np.ndarray | None = None
    vertex_colors: np.ndarray | None = None
    name: str = "object"
    metadata: dict[str, Any] = field(default_factory=dict)

    def save_glb(self, path: str | Path) -> Path:
        return save_object_glb(path, self)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals [V, 3] float32. Vertices at the same position (UV seams) share one
    normal, so seams do not show in shading; unreferenced vertices get (0, 0, 1)."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    positions, weld = np.unique(v, axis=0, return_inverse=True)
    weld = weld.reshape(-1)
    cross = np.repeat(face_area_vectors(v, f), 3, axis=0)  # [3F, 3]: each face's area vector for its 3 corners
    corner = weld[f.reshape(-1)]
    acc = np.stack([np.bincount(corner, weights=cross[:, k], minlength=len(positions)) for k in range(3)], 1)
    n = acc[weld]
    length = np.linalg.norm(n, axis=1, keepdims=True)
    n = np.where(length > 0, n / np.maximum(length, 1e-30), np.array([0.0, 0.0, 1.0]))
    return n.astype(np.float32)


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _jsonable(value: Any, where: str) -> Any:
    """Metadata as plain JSON values (numpy arrays and scalars converted); an error names the bad key."""

    def convert(x: Any) -> Any:
        if isinstance(x, np.ndarray | np.generic):
            return x.tolist()
        if isinstance(x, Path):
            return str(x)
        raise TypeError(type(x).__name__)

    try:
        return json.loads(json.dumps(value, default=convert, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} is not JSON-serialisable ({e}); use numbers, strings, lists and dicts") from e


def _check_textured(mesh: TexturedMesh) -> dict[str, np.ndarray | None]:
    """Validated arrays of a TexturedMesh: vertices [V, 3] float64, faces [F, 3] uint32, uvs [V, 2] float32,
    texture [H, W, 3|4] uint8, colors [V, 4] float32 linear RGBA (each optional one may be None)."""
    name = mesh.name
    v = np.asarray(mesh.vertices, dtype=np.float64)
    f = np.asarray(mesh.faces)
    if v.ndim != 2 or v.shape[1] != 3 or not len(v) or not np.isfinite(v).all():
        raise ValueError(f"mesh '{name}': vertices has shape {v.shape}; expected [V, 3] finite positions, V > 0")
    if f.ndim != 2 or f.shape[1] != 3 or not len(f) or not np.issubdtype(f.dtype, np.integer):
        raise ValueError(f"mesh '{name}': faces has shape {f.shape}, dtype {f.dtype}; expected [F, 3] ints, F > 0")
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"mesh '{name}': faces index {f.min()}..{f.max()} but there are {len(v)} vertices")
    out: dict[str, np.ndarray | None] = {"v": v, "f": f.astype(np.uint32), "uv": None, "tex": None, "col": None}
    if mesh.uvs is not None:
        uv = np.asarray(mesh.uvs, dtype=np.float32)
        if uv.shape != (len(v), 2) or not np.isfinite(uv).all():
            raise ValueError(f"mesh '{name}': uvs has shape {uv.shape}; expected [{len(v)}, 2] finite, one per vertex")
        out["uv"] = uv
    if mesh.texture is not None:
        tex = np.asarray(mesh.texture)
        if tex.dtype != np.uint8 or tex.ndim != 3 or tex.shape[2] not in (3, 4):
            raise ValueError(f"mesh '{name}': texture is {tex.dtype} {tex.shape}; expected uint8 [H, W, 3 or 4]")
        if out["uv"] is None:
            raise ValueError(f"mesh '{name}' has a texture but no uvs; pass the uvs of unwrap_uv with the texture")
        out["tex"] = tex
    if mesh.vertex_colors is not None:
        col = np.asarray(mesh.vertex_colors)
        if col.ndim != 2 or col.shape[0] != len(v) or col.shape[1] not in (3, 4):
            raise ValueError(f"mesh '{name}': vertex_colors has shape {col.shape}; expected [{len(v)}, 3] or [V, 4]")
        col = col / 255.0 if col.dtype == np.uint8 else np.clip(col.astype(np.float64), 0.0, 1.0)
        rgba = np.ones((len(v), 4))
        rgba[:, : col.shape[1]] = col
        rgba[:, :3] = _srgb_to_linear(rgba[:, :3])  # alpha is linear already
        out["col"] = rgba.astype(np.float32)
    return out


def _check_matrix(matrix: Any, name: str) -> np.ndarray:
    """A node matrix (column vectors: world = M @ [p, 1]) that glTF can decompose into TRS."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4) or not np.isfinite(m).all():
        raise ValueError(f"object '{name}': node matrix has shape {m.shape}; expected a finite 4x4 array")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"object '{name}': node matrix last row is {m[3].tolist()}; expected [0, 0, 0, 1]")
    gram = m[:3, :3].T @ m[:3, :3]
    if np.abs(gram - np.diag(np.diag(gram))).max() > 1e-5 * max(gram.max(), 1e-30):
        raise ValueError(f"object '{name}': node matrix has shear; glTF needs rotation x scale + translation")
    return m


def _check_camera(camera: dict[str, Any]) -> dict[str, float]:
    unknown = set(camera) - _CAMERA_KEYS
    if unknown:
        raise ValueError(f"camera has unknown keys {sorted(unknown)}; expected some of {sorted(_CAMERA_KEYS)}")
    if "yfov" not in camera or "znear" not in camera:
        raise ValueError(f"camera {camera} needs 'yfov' (radians) and 'znear' (> 0)")
    cam = {k: float(v) for k, v in camera.items()}
    if not 0.0 < cam["yfov"] < math.pi:
        raise ValueError(f"camera yfov={cam['yfov']}: expected radians in (0, pi)")
    if cam["znear"] <= 0.0:
        raise ValueError(f"camera znear={cam['znear']}: expected > 0")
    if "zfar" in cam and cam["zfar"] <= cam["znear"]:
        raise ValueError(f"camera zfar={cam['zfar']} must exceed znear={cam['znear']}")
    if cam.get("aspectRatio", 1.0) <= 0.0:
        raise ValueError(f"camera aspectRatio={cam['aspectRatio']}: expected width / height > 0")
    return cam


_PNG_CACHE: OrderedDict[bytes, bytes] = OrderedDict()  # content digest -> PNG, most recent last
_PNG_CACHE_BYTES = 64 * 2**20  # a 10-object photo's textures: up to ~30 MB of PNG
_PNG_LOCK = threading.Lock()


def png_bytes(image: np.ndarray) -> bytes:
    """The PNG encoding of a uint8 image [H, W, 3|4], remembered by content: an object's texture goes into its
    GLB and again into scene.glb, and encoding a 1024² texture (~0.17 s) costs far more than hashing it (~3 ms).
    Keyed by a digest of the pixels, shape and dtype, so a changed texture is always encoded anew. Thread-safe
    (the writers run on several threads); the encoding itself runs outside the lock."""
    from PIL import Image

    image = np.ascontiguousarray(image)
    digest = hashlib.blake2b(f"{image.shape} {image.dtype};".encode(), digest_size=20)
    digest.update(image.data)
    key = digest.digest()
    with _PNG_LOCK:
        if key in _PNG_CACHE:
            _PNG_CACHE.move_to_end(key)
            return _PNG_CACHE[key]
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    png = out.getvalue()
    with _PNG_LOCK:
        _PNG_CACHE[key] = png
        total = sum(len(v) for v in _PNG_CACHE.values())
        while total > _PNG_CACHE_BYTES and len(_PNG_CACHE) > 1:
            total -= len(_PNG_CACHE.popitem(last=False)[1])
    return png


class _GlbBuilder:
    """glTF JSON plus one binary buffer; `to_bytes` packs the GLB container."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] = {
            "asset": {"version": "2.0", "generator": "sam3d"},
            "scene": 0,
            "scenes": [{"nodes": []}],
            **{k: [] for k in ("nodes", "meshes", "materials", "textures", "images", "samplers", "cameras")},
            **{k: [] for k in ("accessors", "bufferViews", "buffers")},
        }
        self.blob = bytearray()

    def _view(self, data: bytes, target: int | None) -> int:
        self.blob.extend(b"\0" * (-len(self.blob) % 4))  # every view starts 4-byte aligned
        view: dict[str, Any] = {"buffer": 0, "byteOffset": len(self.blob), "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        self.blob.extend(data)
        self.doc["bufferViews"].append(view)
        return len(self.doc["bufferViews"]) - 1

    def _accessor(self, array: np.ndarray, target: int, bounds: bool = False) -> int:
        """float32 [N, k] -> VECk, or uint32 [N] -> SCALAR."""
        array = np.ascontiguousarray(array)
        acc: dict[str, Any] = {
            "bufferView": self._view(array.tobytes(), target),
            "componentType": _UINT32 if array.dtype == np.uint32 else _FLOAT,
            "count": int(array.shape[0]),
            "type": _TYPES[1 if array.ndim == 1 else array.shape[1]],
        }
        if bounds:  # required for POSITION
            acc["min"] = [float(x) for x in array.min(axis=0)]
            acc["max"] = [float(x) for x in array.max(axis=0)]
        self.doc["accessors"].append(acc)
        return len(self.doc["accessors"]) - 1

    def _texture(self, image: np.ndarray) -> int:
        self.doc["images"].append({"bufferView": self._view(png_bytes(image), None), "mimeType": "image/png"})
        if not self.doc["samplers"]:
            filters = {"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR}
            self.doc["samplers"].append({**filters, "wrapS": _CLAMP_TO_EDGE, "wrapT": _CLAMP_TO_EDGE})
        self.doc["textures"].append({"sampler": 0, "source": len(self.doc["images"]) - 1})
        return len(self.doc["textures"]) - 1

    def add_mesh(self, mesh: TexturedMesh) -> int:
        """Mesh data turned y-up (module docstring); returns the glTF mesh index."""
        a = _check_textured(mesh)
        attrs = {
            "POSITION": self._accessor((a["v"] @ Z_UP_TO_Y_UP).astype(np.float32), _ARRAY_BUFFER, bounds=True),
            "NORMAL": self._accessor(vertex_normals(a["v"], a["f"]) @ Z_UP_TO_Y_UP.astype(np.float32), _ARRAY_BUFFER),
        }
        pbr: dict[str, Any] = {"baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0, "roughnessFactor": 1.0}
        if a["uv"] is not None:
            attrs["TEXCOORD_0"] = self._accessor(a["uv"], _ARRAY_BUFFER)
        if a["tex"] is not None:
            pbr["baseColorTexture"] = {"index": self._texture(a["tex"]), "texCoord": 0}
        elif a["col"] is not None:
            attrs["COLOR_0"] = self._accessor(a["col"], _ARRAY_BUFFER)
        material = {"name": f"{mesh.name}_material", "pbrMetallicRoughness": pbr, "doubleSided": False}
        self.doc["materials"].append(material)
        primitive = {
            "attributes": attrs,
            "indices": self._accessor(a["f"].reshape(-1), _ELEMENT_ARRAY_BUFFER),
            "material": len(self.doc["materials"]) - 1,
            "mode": 4,  # triangles
        }
        self.doc["meshes"].append({"name": mesh.name, "primitives": [primitive]})
        return len(self.doc["meshes"]) - 1

    def add_node(self, node: dict[str, Any]) -> int:
        """A root node of the scene."""
        self.doc["nodes"].append(node)
        index = len(self.doc["nodes"]) - 1
        self.doc["scenes"][0]["nodes"].append(index)
        return index

    def to_bytes(self) -> bytes:
        self.blob.extend(b"\0" * (-len(self.blob) % 4))
        self.doc["buffers"] = [{"byteLength": len(self.blob)}]
        doc = {k: v for k, v in self.doc.items() if v != []}  # glTF forbids empty top-level arrays
        js = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
        js += b" " * (-len(js) % 4)  # the JSON chunk is padded with spaces, the BIN chunk with zeros
        total = 12 + 8 + len(js) + 8 + len(self.blob)
        return b"".join(
            [
                struct.pack("<4sII", b"glTF", 2, total),
                struct.pack("<I4s", len(js), b"JSON"),
                js,
                struct.pack("<I4s", len(self.blob), b"BIN\0"),
                bytes(self.blob),
            ]
        )


def _write(path: str | Path, data: bytes) -> Path:
    """Write atomically: a failed write (disk full) leaves no half file, and a link at `path` is replaced."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def save_object_glb(path: str | Path, mesh: TexturedMesh) -> Path:
    """One object as a GLB: a single node (no transform, named mesh.name, extras = mesh.metadata) holding the
    mesh turned y-up (module docstring). Returns the path."""
    builder = _GlbBuilder()
    node: dict[str, Any] = {"name": mesh.name, "mesh": builder.add_mesh(mesh)}
    if mesh.metadata:
        node["extras"] = _jsonable(mesh.metadata, f"metadata of '{mesh.name}'")
    builder.add_node(node)
    return _write(path, builder.to_bytes())


def save_scene_glb(
    path: str | Path,
    objects: list[tuple[TexturedMesh, np.ndarray]],
    camera: dict[str, Any] | None = None,
    *,
    extras: dict[str, Any] | None = None,
) -> Path:
    """Every object on its own root node, plus the photo's camera.

    objects: (mesh, node matrix) pairs; the mesh is stored exactly as in save_object_glb (y-up) and the 4x4
    matrix (column vectors: world = M @ [p_yup, 1], written column-major as glTF wants) places it. Node names
    are the mesh names (must be unique) and node extras the mesh metadata. For a stage-1 pose
    (p_cam = (p_local * s) @ R + t in the PyTorch3D camera frame) the matrix is M[:3, :3] = G @ (s R.T) @
    Z_UP_TO_Y_UP, M[:3, 3] = G @ t, with G = frames.P3D_TO_GLTF (the y-up turn undone, then the pose).
    camera: a glTF perspective camera {yfov (radians), znear, aspectRatio?, zfar?} on a node named "camera" at
    the origin with the identity transform (glTF cameras look down -z, y up). extras: scene-level metadata.
    """
    if not objects:
        raise ValueError("objects is empty; pass at least one (TexturedMesh, 4x4 node matrix) pair")
    names = [mesh.name for mesh, _ in objects]
    if len(set(names)) != len(names) or "camera" in names:
        raise ValueError(f"object names {names} must be unique and not 'camera'; rename the TexturedMesh objects")
    builder = _GlbBuilder()
    for mesh, matrix in objects:
        m = _check_matrix(matrix, mesh.name)
        node: dict[str, Any] = {"name": mesh.name, "mesh": builder.add_mesh(mesh), "matrix": m.T.reshape(-1).tolist()}
        if mesh.metadata:
            node["extras"] = _jsonable(mesh.metadata, f"metadata of '{mesh.name}'")
        builder.add_node(node)
    if camera is not None:
        builder.doc["cameras"].append({"name": "camera", "type": "perspective", "perspective": _check_camera(camera)})
        builder.add_node({"name": "camera", "camera": 0})
    if extras:
        builder.doc["scenes"][0]["extras"] = _jsonable(extras, "scene extras")
    return _write(path, builder.to_bytes())
