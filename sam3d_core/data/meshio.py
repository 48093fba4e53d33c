"""Read an asset (OBJ / GLB / glTF / PLY / STL through trimesh; FBX / .blend through Blender) into one
coloured, optionally textured triangle mesh in the model's local frame.

    asset = load_asset("chair.obj")                 # y-up file -> z-up local frame, normalised
    asset.vertices      # [V, 3] float64 in [-0.5, 0.5]^3 (z up); asset.size = longest side in file units
    asset.colors        # [V, 3] float32 in [0, 1] (vertex colour x material colour)
    asset.uvs, asset.face_texture, asset.textures   # textured faces: uv [V, 2] (v up), texture index per face

OBJ and glTF store y-up models (glTF by the standard, OBJ by common use: Blender's and Sweet Home 3D's
exporters); they are turned into the local frame's z-up by frames.GLTF_LOCAL_TO_LOCAL ((x, y, z) ->
(x, -z, y)), as Blender's importer and TRELLIS's Blender-based renderer do. `up="z"` keeps the file's axes.

FBX and .blend: converted to a temporary GLB by Blender (the `bpy` module, run as a subprocess with the
Python of /work/main/.venv-blender or `$SAM3D_BLENDER_PYTHON`); without it they raise MeshError that says so.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sam3d_core.data.voxelize import MeshError, normalize_mesh
from sam3d_core.geometry import frames

TRIMESH_SUFFIXES = (".obj", ".glb", ".gltf", ".ply", ".stl", ".off")
BLENDER_SUFFIXES = (".fbx", ".blend")
SUFFIXES = TRIMESH_SUFFIXES + BLENDER_SUFFIXES
MAX_TEXTURE = 1024  # textures are downsized to at most this side (memory; renders are 518^2)
_GREY = np.array([0.7, 0.7, 0.7], np.float32)


@dataclass
class Asset:
    """One mesh in the local frame ([-0.5, 0.5]^3, z up); see the module doc for the fields."""

    name: str
    vertices: np.ndarray  # [V, 3] float64, local frame
    faces: np.ndarray  # [F, 3] int64
    colors: np.ndarray  # [V, 3] float32 in [0, 1]
    size: float  # longest bounding-box side in the file's units (v_file = v_local * size + centre)
    centre: np.ndarray  # [3] bounding-box centre in the file's units (after the up-axis turn)
    uvs: np.ndarray | None = None  # [V, 2] float32, texture coordinates (u right, v up)
    face_texture: np.ndarray | None = None  # [F] int64 index into textures, -1 = vertex colour only
    textures: list[np.ndarray] = field(default_factory=list)  # each [h, w, 3] uint8
    path: str = ""
    sha256: str = ""

    @property
    def trimesh(self):
        """The geometry as a trimesh.Trimesh in the local frame (no colours): what latent encoders take."""
        import trimesh

        return trimesh.Trimesh(self.vertices, self.faces, process=False)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _texture_of(material) -> np.ndarray | None:
    image = getattr(material, "image", None)
    if image is None:
        image = getattr(material, "baseColorTexture", None)
    if image is None:
        return None
    image = image.convert("RGB")
    if max(image.size) > MAX_TEXTURE:
        image.thumbnail((MAX_TEXTURE, MAX_TEXTURE))
    return np.asarray(image, dtype=np.uint8)


def _material_colour(material) -> np.ndarray:
    for name in ("diffuse", "baseColorFactor", "main_color"):
        c = getattr(material, name, None)
        if c is not None:
            c = np.asarray(c, dtype=np.float32).reshape(-1)[:3]
            return c / 255.0 if c.max() > 1.0 else c
    return _GREY


def _part(mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One trimesh geometry -> (vertices, faces, colours [V, 3], uvs [V, 2] or None, texture or None)."""
    v = np.asarray(mesh.vertices, dtype=np.float64)
    f = np.asarray(mesh.faces, dtype=np.int64)
    visual = mesh.visual
    if visual.kind == "texture":
        material = visual.material
        colour = np.broadcast_to(_material_colour(material), (len(v), 3)).astype(np.float32)
        tex = _texture_of(material)
        uv = getattr(visual, "uv", None)
        if tex is not None and uv is not None and len(uv) == len(v):
            return v, f, np.ones_like(colour), np.asarray(uv, np.float32), tex
        return v, f, colour, None, None
    if visual.kind == "face":  # unshare vertices so that each face keeps its colour
        fc = np.asarray(visual.face_colors, np.float32)[:, :3] / 255.0
        return v[f].reshape(-1, 3), np.arange(3 * len(f)).reshape(-1, 3), np.repeat(fc, 3, axis=0), None, None
    if visual.kind == "vertex":
        return v, f, np.asarray(visual.vertex_colors, np.float32)[:, :3] / 255.0, None, None
    return v, f, np.broadcast_to(_GREY, (len(v), 3)).copy(), None, None


def _blender_python() -> str | None:
    env = os.environ.get("SAM3D_BLENDER_PYTHON")
    if env:
        return env
    # The repository's Blender environment (`make install-blender`), beside the one this Python runs in.
    for root in (Path(__file__).resolve().parents[2], Path(sys.prefix).parent):
        candidate = root / ".venv-blender" / "bin" / "python"
        if candidate.is_file():
            return str(candidate)
    return None


_BPY_TO_GLB = """
import sys, bpy
src, dst = sys.argv[-2], sys.argv[-1]
if src.lower().endswith(".blend"):
    bpy.ops.wm.open_mainfile(filepath=src)
else:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.import_scene.fbx(filepath=src)
bpy.ops.export_scene.gltf(filepath=dst, export_format="GLB", use_selection=False, export_apply=True)
sys.stdout.flush()
import os
os._exit(0)  # bpy 4.2 as a module can crash while tearing down; the GLB is written by now
"""


def blender_to_glb(path: Path, out_dir: Path, timeout: float = 300.0) -> Path:
    """FBX / .blend -> GLB through Blender's own importer and glTF exporter (a subprocess; no bpy here)."""
    py = _blender_python()
    if py is None:
        raise MeshError(
            f"{path.name}: reading {path.suffix} needs Blender's Python (bpy); run `make install-blender` "
            "or set SAM3D_BLENDER_PYTHON, or export the asset to GLB"
        )
    dst = out_dir / (path.stem + ".glb")
    try:
        proc = subprocess.run(
            [py, "-c", _BPY_TO_GLB, str(path), str(dst)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise MeshError(f"{path.name}: Blender did not convert it within {timeout:.0f} s") from None
    if proc.returncode != 0 or not dst.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise MeshError(f"{path.name}: Blender could not convert it to GLB ({tail[0][:200]})")
    return dst


def load_asset(path: str | Path, *, up: str = "y", name: str | None = None) -> Asset:
    """Read a mesh file into an Asset in the local frame (module doc). Raises MeshError with the reason for an
    unreadable file, an unsupported format, or a mesh without faces or extent."""
    import trimesh

    path = Path(path)
    if up not in ("y", "z"):
        raise ValueError(f"up: got {up!r}, expected 'y' (glTF / OBJ convention) or 'z'")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise MeshError(f"{path.name}: unsupported format {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise MeshError(f"{path}: no such file")
    sha = file_sha256(path)
    with tempfile.TemporaryDirectory(prefix="sam3d-asset-") as tmp:
        src = blender_to_glb(path, Path(tmp)) if suffix in BLENDER_SUFFIXES else path
        try:
            scene = trimesh.load(str(src), force="scene", process=False)
        except Exception as e:  # trimesh raises many types for corrupt files
            raise MeshError(f"{path.name}: cannot be read as a mesh ({type(e).__name__}: {str(e)[:160]})") from None
        parts = []
        for node in scene.graph.nodes_geometry:
            transform, geom_name = scene.graph[node]
            mesh = scene.geometry.get(geom_name)
            if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
                continue
            v, f, c, uv, tex = _part(mesh)
            parts.append((trimesh.transform_points(v, transform), f, c, uv, tex))
    if not parts:
        raise MeshError(f"{path.name}: the file holds no triangles (empty, points or lines only)")
    return _merge(parts, path, sha, up, name or path.stem)


def _merge(parts, path: Path, sha: str, up: str, name: str) -> Asset:
    verts, faces, colors, uvs, face_tex, textures = [], [], [], [], [], []
    offset, textured = 0, any(p[3] is not None for p in parts)
    for v, f, c, uv, tex in parts:
        verts.append(v)
        faces.append(f + offset)
        colors.append(c)
        if textured:
            uvs.append(uv if uv is not None else np.zeros((len(v), 2), np.float32))
            face_tex.append(np.full(len(f), len(textures) if tex is not None else -1, np.int64))
            if tex is not None:
                textures.append(tex)
        offset += len(v)
    v = np.concatenate(verts)
    if up == "y":
        v = v @ frames.GLTF_LOCAL_TO_LOCAL.T  # (x, y, z) -> (x, -z, y)
    if not np.isfinite(v).all():
        raise MeshError(f"{path.name}: vertices hold NaN or infinite values")
    v_local, size, centre = normalize_mesh(v)
    return Asset(
        name=name,
        vertices=v_local,
        faces=np.concatenate(faces),
        colors=np.clip(np.concatenate(colors), 0, 1).astype(np.float32),
        size=size,
        centre=centre,
        uvs=np.concatenate(uvs).astype(np.float32) if textured else None,
        face_texture=np.concatenate(face_tex) if textured else None,
        textures=textures,
        path=str(path),
        sha256=sha,
    )


def asset_from_arrays(name: str, vertices, faces, colors=None) -> Asset:
    """An Asset from raw arrays already z-up (tests, procedural shapes); normalised into the local frame."""
    v_local, size, centre = normalize_mesh(vertices)
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(f) == 0:
        raise MeshError(f"{name}: the mesh has no faces")
    c = np.broadcast_to(_GREY if colors is None else np.asarray(colors, np.float32), (len(v_local), 3))
    return Asset(name=name, vertices=v_local, faces=f, colors=np.array(c, np.float32), size=size, centre=centre)
