"""A minimal glTF 2.0 binary writer for tests: one mesh, optional UVs and an embedded PNG base-colour texture.

Written here (numpy + stdlib) so that the add-on's import and placement are checked against geometry
whose coordinates the test chose, not against files made by the code under test.
"""

from __future__ import annotations

import json
import struct

import numpy as np


def _pad(b: bytes, fill: bytes) -> bytes:
    return b + fill * (-len(b) % 4)


def write_glb(path, vertices, faces, uvs=None, png: bytes | None = None) -> None:
    """vertices [N, 3] float (glTF frame: y up), faces [M, 3] int, uvs [N, 2] (glTF: v down), png bytes."""
    v = np.asarray(vertices, np.float32).reshape(-1, 3)
    f = np.asarray(faces, np.uint32).reshape(-1, 3)
    views, accessors, blob = [], [], b""

    def add(data: bytes, target: int | None) -> int:
        nonlocal blob
        view = {"buffer": 0, "byteOffset": len(blob), "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        views.append(view)
        blob = _pad(blob + data, b"\0")
        return len(views) - 1

    accessors.append(
        {
            "bufferView": add(v.tobytes(), 34962),
            "componentType": 5126,
            "count": len(v),
            "type": "VEC3",
            "min": v.min(0).tolist(),
            "max": v.max(0).tolist(),
        }
    )
    accessors.append({"bufferView": add(f.tobytes(), 34963), "componentType": 5125, "count": f.size, "type": "SCALAR"})
    attributes = {"POSITION": 0}
    gltf = {
        "asset": {"version": "2.0"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0}],
        "meshes": [{"primitives": [{"attributes": attributes, "indices": 1, "material": 0}]}],
        "materials": [{"pbrMetallicRoughness": {"baseColorFactor": [0.8, 0.5, 0.2, 1.0]}}],
    }
    if uvs is not None:
        uv = np.asarray(uvs, np.float32).reshape(-1, 2)
        accessors.append(
            {"bufferView": add(uv.tobytes(), 34962), "componentType": 5126, "count": len(uv), "type": "VEC2"}
        )
        attributes["TEXCOORD_0"] = 2
    if png is not None:
        gltf["images"] = [{"bufferView": add(png, None), "mimeType": "image/png"}]
        gltf["textures"] = [{"source": 0}]
        gltf["materials"][0]["pbrMetallicRoughness"] = {"baseColorTexture": {"index": 0}}
    gltf["accessors"], gltf["bufferViews"] = accessors, views
    gltf["buffers"] = [{"byteLength": len(blob)}]
    js = _pad(json.dumps(gltf).encode(), b" ")
    body = struct.pack("<II", len(js), 0x4E4F534A) + js + struct.pack("<II", len(blob), 0x004E4942) + blob
    with open(path, "wb") as fh:
        fh.write(struct.pack("<III", 0x46546C67, 2, 12 + len(body)) + body)


def card_in_camera_space(K, box, depth: float):
    """A rectangle (2 triangles) in glTF camera space (camera looks down -z, y up) that covers the pixel box
    (x0, y0, x1, y1; y down) of a photo with intrinsics K, at distance `depth`."""
    (fx, _, cx), (_, fy, cy) = K[0], K[1]
    x0, y0, x1, y1 = box
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    verts = [((u - cx) / fx * depth, -(v - cy) / fy * depth, -depth) for u, v in corners]
    # counter-clockwise seen from the camera (+z side looking at -z)
    return np.array(verts), np.array([[0, 3, 2], [0, 2, 1]]), np.array([[0, 0], [1, 0], [1, 1], [0, 1]])


def read_glb_positions(path) -> np.ndarray:
    """Every POSITION of every mesh primitive of a GLB, with the node transforms applied: [N, 3] (glTF frame)."""
    data = open(path, "rb").read()
    magic, _, _ = struct.unpack_from("<III", data, 0)
    if magic != 0x46546C67:
        raise ValueError(f"{path} is not a GLB")
    jlen, _ = struct.unpack_from("<II", data, 12)
    gltf = json.loads(data[20 : 20 + jlen])
    blen, _ = struct.unpack_from("<II", data, 20 + jlen)
    blob = data[28 + jlen : 28 + jlen + blen]

    def positions(acc_index):
        acc = gltf["accessors"][acc_index]
        view = gltf["bufferViews"][acc["bufferView"]]
        start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
        stride = view.get("byteStride", 12)
        raw = np.frombuffer(blob, np.uint8, count=stride * acc["count"], offset=start).reshape(acc["count"], stride)
        return raw[:, :12].copy().view(np.float32).reshape(-1, 3).astype(np.float64)

    def local(node):
        if "matrix" in node:
            return np.array(node["matrix"], np.float64).reshape(4, 4).T  # column-major
        t = np.eye(4)
        if "scale" in node:
            t = np.diag([*node["scale"], 1.0]) @ t
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
            t = rot @ t
        if "translation" in node:
            tr = np.eye(4)
            tr[:3, 3] = node["translation"]
            t = tr @ t
        return t

    out = []

    def walk(index, parent):
        node = gltf["nodes"][index]
        m = parent @ local(node)
        if "mesh" in node:
            for prim in gltf["meshes"][node["mesh"]]["primitives"]:
                p = positions(prim["attributes"]["POSITION"])
                out.append(p @ m[:3, :3].T + m[:3, 3])
        for child in node.get("children", []):
            walk(child, m)

    for root in gltf["scenes"][gltf.get("scene", 0)]["nodes"]:
        walk(root, np.eye(4))
    return np.concatenate(out) if out else np.zeros((0, 3))
