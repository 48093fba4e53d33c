"""Stage-1 voxels as a mesh, placed in the photo's camera frame, written as GLB."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sam3d_core.export.output import atomic_path
from sam3d_core.geometry import frames

# The 6 faces of a unit cube as (axis, side) with their quads, vertices in counter-clockwise order
# seen from outside.
_CORNERS = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], dtype=np.float64)
_QUADS = {  # (axis, side) -> corner indices into _CORNERS (index = 4x + 2y + z)
    (0, 0): (0, 1, 3, 2),
    (0, 1): (4, 6, 7, 5),
    (1, 0): (0, 4, 5, 1),
    (1, 1): (2, 3, 7, 6),
    (2, 0): (0, 2, 6, 4),
    (2, 1): (1, 5, 7, 3),
}


def voxel_surface(coords: np.ndarray, resolution: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Exposed cube faces of occupied voxels. coords [N, 3] ints -> (vertices [V, 3], faces [F, 3]).

    Vertices are in the model's local frame: a voxel i spans [i, i+1] / res - 0.5 on each axis.
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 3)
    occupied = set(map(tuple, coords.tolist()))
    verts, faces = [], []
    for (axis, side), quad in _QUADS.items():
        step = np.zeros(3, np.int64)
        step[axis] = 1 if side else -1
        neighbours = coords + step
        exposed = np.array([tuple(n) not in occupied for n in neighbours.tolist()], dtype=bool)
        base = coords[exposed].astype(np.float64)
        if not len(base):
            continue
        corners = base[:, None, :] + _CORNERS[list(quad)][None]  # [M, 4, 3]
        start = sum(len(v) for v in verts)
        verts.append(corners.reshape(-1, 3))
        idx = start + np.arange(len(base))[:, None] * 4
        faces.append(np.concatenate([idx + [0, 1, 2], idx + [0, 2, 3]], axis=0))
    if not verts:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    v = np.concatenate(verts) / resolution - 0.5
    return v, np.concatenate(faces)


def save_voxels_glb(
    path: str | Path, coords: np.ndarray, pose: np.ndarray, resolution: int = 64, color=(200, 160, 90, 255)
) -> Path:
    """Write the voxels placed by `pose` (the 4x4 object -> PyTorch3D camera matrix, `Pose.as_matrix()[i]`) in
    glTF's camera space (camera at the origin looking down -z). The frame turn keeps handedness (det +1), so
    the face winding stays outward."""
    try:
        import trimesh
    except ImportError as e:  # the optional export dependency
        raise ImportError("GLB export needs trimesh: pip install 'sam3d[export]'") from e
    v_local, faces = voxel_surface(coords, resolution)
    v_gltf = frames.transform_points(frames.object_matrix(pose, "gltf"), v_local)
    material = trimesh.visual.material.PBRMaterial(baseColorFactor=list(color), roughnessFactor=1.0)
    mesh = trimesh.Trimesh(v_gltf, faces, process=False, visual=trimesh.visual.TextureVisuals(material=material))
    path = Path(path)
    with atomic_path(path) as tmp:  # a failed write leaves no half file; a link at `path` is replaced
        mesh.export(tmp, file_type="glb")
    return path
