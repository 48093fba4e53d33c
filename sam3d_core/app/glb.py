"""GLB files for the app: read a mesh for the 3D view (numpy), merge object GLBs into one scene GLB (stdlib).

Written here rather than with trimesh: the app's process stays free of the worker's dependencies (the app
may import numpy and geometry.frames only), and merging keeps every byte of the worker's files (texture,
UVs, extras) instead of re-encoding them.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_MAGIC, _JSON, _BIN = 0x46546C67, 0x4E4F534A, 0x004E4942
_COMPONENTS = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
_WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}


def read_glb(path: str | Path) -> tuple[dict, bytes]:
    """(the glTF JSON, the BIN chunk) of a .glb file; ValueError naming the file when it is not one."""
    data = Path(path).read_bytes()
    if len(data) < 20 or struct.unpack_from("<I", data, 0)[0] != _MAGIC:
        raise ValueError(f"{path} is not a GLB file (no glTF header); re-export it")
    length = struct.unpack_from("<I", data, 8)[0]
    offset, doc, binary = 12, None, b""
    while offset + 8 <= min(length, len(data)):
        size, kind = struct.unpack_from("<II", data, offset)
        chunk = data[offset + 8 : offset + 8 + size]
        if kind == _JSON:
            doc = json.loads(chunk.decode("utf-8"))
        elif kind == _BIN:
            binary = bytes(chunk)
        offset += 8 + size
    if doc is None:
        raise ValueError(f"{path} has no JSON chunk; it is not a valid GLB")
    return doc, binary


def write_glb(path: str | Path, doc: dict, binary: bytes) -> None:
    text = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 4)
    binary += b"\0" * (-len(binary) % 4)
    chunks = struct.pack("<II", len(text), _JSON) + text
    if binary:
        chunks += struct.pack("<II", len(binary), _BIN) + binary
    Path(path).write_bytes(struct.pack("<III", _MAGIC, 2, 12 + len(chunks)) + chunks)


def _accessor(doc: dict, binary: bytes, index: int) -> np.ndarray:
    acc = doc["accessors"][index]
    view = doc["bufferViews"][acc["bufferView"]]
    dtype = np.dtype(_COMPONENTS[acc["componentType"]])
    width = _WIDTH[acc["type"]]
    start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
    stride = view.get("byteStride") or dtype.itemsize * width
    count = acc["count"]
    if stride == dtype.itemsize * width:
        out = np.frombuffer(binary, dtype, count * width, start).reshape(count, width)
    else:  # interleaved: gather rows
        rows = [np.frombuffer(binary, dtype, width, start + i * stride) for i in range(count)]
        out = np.stack(rows) if rows else np.zeros((0, width), dtype)
    if acc.get("normalized") and dtype.kind in "iu":
        out = out.astype(np.float32) / np.iinfo(dtype).max
    return out


def _node_matrix(node: dict) -> np.ndarray:
    if "matrix" in node:
        return np.asarray(node["matrix"], np.float64).reshape(4, 4).T  # glTF stores column-major
    m = np.eye(4)
    if "scale" in node:
        m = np.diag([*node["scale"], 1.0]) @ m
    if "rotation" in node:
        x, y, z, w = node["rotation"]
        r = np.array(
            [
                [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
            ]
        )
        rot = np.eye(4)
        rot[:3, :3] = r
        m = rot @ m
    if "translation" in node:
        t = np.eye(4)
        t[:3, 3] = node["translation"]
        m = t @ m
    return m


@dataclass
class MeshData:
    """A GLB's triangles in the file's world frame (node transforms applied)."""

    vertices: np.ndarray  # [V, 3] float64
    faces: np.ndarray  # [F, 3] int64
    uvs: np.ndarray | None  # [V, 2] glTF UVs (v = 0 on the texture's top row), or None
    colors: np.ndarray | None  # [V, 3] float in 0..1 (vertex colours or the material's base colour), or None
    texture: bytes | None  # the base-colour image file (PNG/JPEG bytes) of the first textured primitive


def load_mesh(path: str | Path) -> MeshData:
    """Every triangle primitive of a GLB, node transforms applied, in one mesh."""
    doc, binary = read_glb(path)
    verts, faces, uvs, colors, texture = [], [], [], [], None
    scene = doc.get("scenes", [{}])[doc.get("scene", 0)] if doc.get("scenes") else {}
    stack = [(i, np.eye(4)) for i in scene.get("nodes", range(len(doc.get("nodes", []))))]
    count = 0
    while stack:
        index, parent = stack.pop()
        node = doc["nodes"][index]
        world = parent @ _node_matrix(node)
        stack += [(c, world) for c in node.get("children", [])]
        if "mesh" not in node:
            continue
        for prim in doc["meshes"][node["mesh"]]["primitives"]:
            if prim.get("mode", 4) != 4:
                continue
            attrs = prim["attributes"]
            v = _accessor(doc, binary, attrs["POSITION"]).astype(np.float64)
            f = (
                _accessor(doc, binary, prim["indices"]).reshape(-1, 3).astype(np.int64)
                if "indices" in prim
                else np.arange(len(v)).reshape(-1, 3)
            )
            verts.append(v @ world[:3, :3].T + world[:3, 3])
            faces.append(f + count)
            count += len(v)
            uv = _accessor(doc, binary, attrs["TEXCOORD_0"]).astype(np.float64) if "TEXCOORD_0" in attrs else None
            uvs.append(uv if uv is not None else np.zeros((len(v), 2)))
            material = doc.get("materials", [{}])[prim["material"]] if "material" in prim else {}
            pbr = material.get("pbrMetallicRoughness", {})
            if "COLOR_0" in attrs:
                c = _accessor(doc, binary, attrs["COLOR_0"]).astype(np.float64)[:, :3]
                colors.append(c / 255.0 if c.max() > 1.0 else c)
            else:
                colors.append(np.tile(np.asarray(pbr.get("baseColorFactor", [0.8, 0.8, 0.8, 1])[:3]), (len(v), 1)))
            tex = pbr.get("baseColorTexture")
            if texture is None and tex is not None and uv is not None:
                image = doc["images"][doc["textures"][tex["index"]]["source"]]
                view = doc["bufferViews"][image["bufferView"]]
                start = view.get("byteOffset", 0)
                texture = binary[start : start + view["byteLength"]]
    if not verts:
        raise ValueError(f"{path} holds no triangles to show")
    has_uv = texture is not None
    return MeshData(
        np.concatenate(verts), np.concatenate(faces), np.concatenate(uvs) if has_uv else None,
        np.concatenate(colors), texture,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Merging object GLBs into one scene GLB


_INDEXED = {  # per top-level list: the fields of its items that index another list (after merging)
    "accessors": {"bufferView": "bufferViews"},
    "images": {"bufferView": "bufferViews"},
    "textures": {"sampler": "samplers", "source": "images"},
    "meshes": {},
    "nodes": {"mesh": "meshes", "camera": "cameras"},
}


def _shift_textures(value, offset: int):
    """Texture references inside a material ({"index": i, "texCoord": ...}) move by `offset`."""
    if isinstance(value, dict):
        out = {k: _shift_textures(v, offset) for k, v in value.items()}
        if isinstance(value.get("index"), int):  # in a material only texture references carry an "index"
            out["index"] = value["index"] + offset
        return out
    if isinstance(value, list):
        return [_shift_textures(v, offset) for v in value]
    return value


def merge_glbs(
    parts: list[tuple[str, str | Path, np.ndarray]], out: str | Path, camera: dict | None = None, extras=None
) -> Path:
    """One GLB holding each part (name, GLB file, 4x4 column-vector matrix placing its scene) on a root node of
    that name, plus the photo's camera (`frames.gltf_camera(...)["perspective"]`) at the origin."""
    merged: dict = {"asset": {"version": "2.0", "generator": "sam3d app"}, "scene": 0, "scenes": [{"nodes": []}]}
    for key in ("buffers", "bufferViews", "accessors", "images", "samplers", "textures", "materials", "meshes"):
        merged[key] = []
    merged["nodes"], merged["cameras"] = [], []
    blob = bytearray()
    for name, path, matrix in parts:
        doc, binary = read_glb(path)
        base = {k: len(merged[k]) for k in ("bufferViews", "accessors", "images", "samplers", "textures",
                                             "materials", "meshes", "nodes", "cameras")}  # fmt: skip
        blob += b"\0" * (-len(blob) % 4)
        start = len(blob)
        blob += binary
        for view in doc.get("bufferViews", []):
            merged["bufferViews"].append({**view, "buffer": 0, "byteOffset": view.get("byteOffset", 0) + start})
        for key in ("accessors", "images", "textures", "nodes"):
            for item in doc.get(key, []):
                item = dict(item)
                for fld, target in _INDEXED[key].items():
                    if fld in item:
                        item[fld] += base[target]
                if key == "nodes" and "children" in item:
                    item["children"] = [c + base["nodes"] for c in item["children"]]
                merged[key].append(item)
        merged["samplers"] += doc.get("samplers", [])
        merged["cameras"] += doc.get("cameras", [])
        merged["materials"] += [_shift_textures(m, base["textures"]) for m in doc.get("materials", [])]
        for mesh in doc.get("meshes", []):
            prims = []
            for p in mesh["primitives"]:
                p = {**p, "attributes": {k: v + base["accessors"] for k, v in p["attributes"].items()}}
                if "indices" in p:
                    p["indices"] += base["accessors"]
                if "material" in p:
                    p["material"] += base["materials"]
                prims.append(p)
            merged["meshes"].append({**mesh, "primitives": prims})
        scene = doc.get("scenes", [{}])[doc.get("scene", 0)] if doc.get("scenes") else {}
        roots = [n + base["nodes"] for n in scene.get("nodes", range(len(doc.get("nodes", []))))]
        m = np.asarray(matrix, np.float64)
        merged["nodes"].append({"name": name, "children": roots, "matrix": m.T.reshape(-1).tolist()})
        merged["scenes"][0]["nodes"].append(len(merged["nodes"]) - 1)
    if camera is not None:
        merged["cameras"].append({"name": "camera", "type": "perspective", "perspective": camera})
        merged["nodes"].append({"name": "camera", "camera": len(merged["cameras"]) - 1})
        merged["scenes"][0]["nodes"].append(len(merged["nodes"]) - 1)
    if extras:
        merged["scenes"][0]["extras"] = extras
    merged["buffers"] = [{"byteLength": len(blob) + (-len(blob) % 4)}]
    merged = {k: v for k, v in merged.items() if v != []}
    write_glb(out, merged, bytes(blob))
    return Path(out)
