"""Every coordinate frame the project uses and the maps between them (numpy only: Blender imports this).

All frames are right-handed; every map below is a rotation (det +1), so none mirrors the object.

| frame      | axes                                                          | lives there                        |
|------------|---------------------------------------------------------------|------------------------------------|
| local      | the model's voxel grid [-0.5, 0.5]^3, z up (TRELLIS)          | voxels, stage-2 mesh and Gaussians |
| gltf_local | local turned z-up -> y-up: (x, y, z) -> (x, z, -y)            | vertices in our and official GLBs  |
| pytorch3d  | the photo's camera: x left, y up, z forward (into the scene)  | point map, stage-1 pose            |
| opencv     | the photo's camera: x right, y down, z forward                | MoGe output, K, pixels             |
| gltf       | the photo's camera, OpenGL style: x right, y up, looks down -z | scene GLB and scene PLY world     |
| blender    | Blender world, z up: glTF (x, y, z) -> (x, -z, y)             | the add-on's scene                 |

Our scene convention: the glTF world IS the photo camera's glTF frame (camera at the origin, identity
rotation). Blender's glTF importer turns that into a camera at the origin rotated +90 degrees about X
(looking along +Y), and turns a y-up GLB's vertices back into the model's local z-up coordinates.

Matrices are for column vectors (v_out = M @ v_in); a row-vector caller uses M.T. The stage-1 pose
(`sam3d_core.geometry.layout.Pose`, row vectors p_cam = (p * scale) @ R + t) is the 4x4 `pose_matrix(R, t, scale)`
= [[R^T diag(scale), t], [0, 1]], equal to `Pose.as_matrix()`.

Pixels: the pixel in row i, column j has its centre at (u, v) = (j + 0.5, i + 0.5), the image spans
[0, W] x [0, H], and K is an OpenCV-style 3x3 matrix in those units (as `camera.pointmap_from_depth`).
"""

from __future__ import annotations

import math

import numpy as np

CONVENTIONS = ("pytorch3d", "opencv", "gltf", "blender")

# 3x3 rotations, column-vector convention (v_out = M @ v_in).
LOCAL_TO_GLTF_LOCAL = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # (x, y, z) -> (x, z, -y)
GLTF_LOCAL_TO_LOCAL = LOCAL_TO_GLTF_LOCAL.T  # (x, y, z) -> (x, -z, y)
P3D_TO_OPENCV = np.diag([-1.0, -1.0, 1.0])  # its own inverse
P3D_TO_GLTF = np.diag([-1.0, 1.0, -1.0])  # its own inverse
# (x, y, z) -> (x, -z, y): +90 degrees about X, the y-up -> z-up turn of Blender's glTF importer
GLTF_TO_BLENDER = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
BLENDER_TO_GLTF = GLTF_TO_BLENDER.T
P3D_TO_BLENDER = GLTF_TO_BLENDER @ P3D_TO_GLTF  # (x, y, z) -> (-x, z, y)

# PyTorch3D camera frame -> each convention's frame (camera frame, or world for blender).
FROM_P3D: dict[str, np.ndarray] = {
    "pytorch3d": np.eye(3),
    "opencv": P3D_TO_OPENCV,
    "gltf": P3D_TO_GLTF,
    "blender": P3D_TO_BLENDER,
}

_BLENDER_MAX_PIXEL_ASPECT = 200.0  # Blender clamps pixel_aspect_x / _y to [1, 200]


# ---------------------------------------------------------------------------------------------------
# Checks and small helpers
# ---------------------------------------------------------------------------------------------------


def _check_convention(convention: str) -> None:
    if convention not in FROM_P3D:
        raise ValueError(f"convention: got {convention!r}, expected one of {CONVENTIONS}")


def _as_matrix4(matrix, name: str) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"{name}: got shape {m.shape}, expected [4, 4]; for a batched Pose pass pose.as_matrix()[i]")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
        raise ValueError(f"{name}: last row is {m[3].tolist()}, expected [0, 0, 0, 1] (an affine column-vector matrix)")
    return m


def _as_points(points, name: str) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"{name}: got shape {p.shape}, expected [N, 3]")
    return p


def _check_intrinsics(K, width: int | None = None, height: int | None = None) -> np.ndarray:
    k = np.asarray(K, dtype=np.float64)
    if k.shape != (3, 3):
        raise ValueError(f"K: got shape {k.shape}, expected a 3x3 pixel intrinsics matrix (OpenCV style)")
    if not (k[0, 0] > 0 and k[1, 1] > 0) or not np.allclose(k[2], [0.0, 0.0, 1.0]):
        raise ValueError(
            f"K: got {k.tolist()}, expected [[fx, s, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0 in pixels"
        )
    for value, name in ((width, "width"), (height, "height")):
        if value is not None and (int(value) != value or value < 1):
            raise ValueError(f"{name}: got {value!r}, expected a positive number of pixels")
    return k


def _check_faces(faces, n_vertices: int) -> np.ndarray:
    f = np.asarray(faces)
    if f.ndim != 2 or f.shape[1] != 3 or (f.size and not np.issubdtype(f.dtype, np.integer)):
        raise ValueError(f"faces: got {f.dtype} {f.shape}, expected integer [F, 3] vertex indices (triangulate first)")
    f = f.astype(np.int64)
    if f.size and (f.min() < 0 or f.max() >= n_vertices):
        raise ValueError(f"faces: indices span {f.min()}..{f.max()}, expected 0..{n_vertices - 1} (the vertex count)")
    return f


def homogeneous(linear, translation=None) -> np.ndarray:
    """3x3 linear part (+ optional [3] translation) -> 4x4 column-vector matrix."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(linear, dtype=np.float64)
    if translation is not None:
        m[:3, 3] = np.asarray(translation, dtype=np.float64).reshape(3)
    return m


def transform_points(matrix, points) -> np.ndarray:
    """Apply a 4x4 column-vector matrix to points [N, 3] -> [N, 3]."""
    m = _as_matrix4(matrix, "matrix")
    return _as_points(points, "points") @ m[:3, :3].T + m[:3, 3]


def frame_matrix(src: str, dst: str) -> np.ndarray:
    """3x3 rotation taking coordinates in convention `src` to convention `dst` (camera/world frames)."""
    _check_convention(src)
    _check_convention(dst)
    return FROM_P3D[dst] @ FROM_P3D[src].T


def convert_points(points, src: str, dst: str) -> np.ndarray:
    """Points [N, 3] in convention `src` -> the same points in convention `dst`."""
    return _as_points(points, "points") @ frame_matrix(src, dst).T


# ---------------------------------------------------------------------------------------------------
# Object matrices
# ---------------------------------------------------------------------------------------------------


def pose_matrix(rotation_rowvec, translation, scale) -> np.ndarray:
    """Row-vector pose (p_cam = (p_local * scale) @ R + t) -> 4x4 column-vector object -> PyTorch3D camera.

    rotation_rowvec [3, 3] (the `Pose.rotation` of one object), translation [3], scale [3] or a scalar.
    """
    r = np.asarray(rotation_rowvec, dtype=np.float64)
    if r.shape != (3, 3):
        raise ValueError(f"rotation_rowvec: got shape {r.shape}, expected [3, 3] (Pose.rotation[i])")
    s = np.asarray(scale, dtype=np.float64).reshape(-1)
    if s.shape not in ((1,), (3,)) or not (s > 0).all():
        raise ValueError(f"scale: got {s.tolist()}, expected a positive scalar or 3 per-axis values (Pose.scale[i])")
    s = np.broadcast_to(s, (3,))
    t = np.asarray(translation, dtype=np.float64).reshape(-1)
    if t.shape != (3,):
        raise ValueError(f"translation: got {t.shape[0]} values, expected 3 (Pose.translation[i])")
    return homogeneous(r.T * s[None, :], t)  # R^T diag(s)


def object_matrix(pose, convention: str) -> np.ndarray:
    """4x4 mapping the model's LOCAL z-up coordinates into `convention`'s frame.

    pose: the 4x4 object -> PyTorch3D camera matrix (`pose_matrix` or `Pose.as_matrix()[i]`).
    "pytorch3d" / "opencv" / "gltf": that camera frame (glTF's is our scene world); "blender": Blender world
    with the photo camera placed by `blender_camera`.
    """
    _check_convention(convention)
    return homogeneous(FROM_P3D[convention]) @ _as_matrix4(pose, "pose")


def gltf_node_matrix(pose) -> np.ndarray:
    """The 4x4 for a glTF node whose mesh is stored y-up (official GLB layout), placing it in our glTF world."""
    return object_matrix(pose, "gltf") @ homogeneous(GLTF_LOCAL_TO_LOCAL)


def blender_object_matrix(pose) -> np.ndarray:
    """Blender `matrix_world` for the object Blender's glTF importer makes from a y-up GLB with no node transform.

    The importer maps the stored (x, z, -y) back to (x, y, z), so the object's local coordinates are the
    model's local frame. Importing a GLB whose node carries `gltf_node_matrix(pose)` gives this same matrix.
    """
    return object_matrix(pose, "blender")


# ---------------------------------------------------------------------------------------------------
# Cameras
# ---------------------------------------------------------------------------------------------------


def blender_camera(K, width: int, height: int, sensor_width_mm: float = 36.0) -> dict:
    """Blender camera + render settings that reproduce the pinhole K on a width x height image.

    Blender (camera `view_frame`, render viewplane), with sensor_fit HORIZONTAL and pixel aspect
    (ax, ay): fx = lens / sensor_width * W, fy = fx * ax / ay, and the shifts are fractions of the
    image WIDTH on both axes (the sensor-fit dimension): cx = W / 2 - shift_x * W,
    cy = H / 2 + shift_y * W * fy / fx (cy from the top). fx != fy becomes a non-square pixel aspect
    (Blender keeps both aspects >= 1). Skew is not representable and is rejected.
    matrix_world: the camera at the origin looking along +Y (Blender world of our glTF scene), as row-major
    nested lists for `mathutils.Matrix(rows)`.
    """
    k = _check_intrinsics(K, width, height)
    if abs(k[0, 1]) > 1e-9 * k[0, 0]:
        raise ValueError(f"K: skew K[0, 1] = {k[0, 1]} cannot be expressed by a Blender camera; pass K with 0 skew")
    if not sensor_width_mm > 0:
        raise ValueError(f"sensor_width_mm: got {sensor_width_mm}, expected a positive width such as 36.0")
    fx, fy, cx, cy = k[0, 0], k[1, 1], k[0, 2], k[1, 2]
    ratio = fx / fy  # = pixel_aspect_y / pixel_aspect_x
    if not 1.0 / _BLENDER_MAX_PIXEL_ASPECT <= ratio <= _BLENDER_MAX_PIXEL_ASPECT:
        raise ValueError(f"K: fx / fy = {ratio:.4g} is beyond Blender's pixel aspect range [1/200, 200]")
    return {
        "matrix_world": homogeneous(GLTF_TO_BLENDER).tolist(),
        "lens_mm": float(fx * sensor_width_mm / width),
        "sensor_width_mm": float(sensor_width_mm),
        "sensor_height_mm": float(sensor_width_mm * (height / fy) / (width / fx)),  # unused with HORIZONTAL fit
        "sensor_fit": "HORIZONTAL",
        "shift_x": float((width / 2.0 - cx) / width),
        "shift_y": float((cy - height / 2.0) * ratio / width),
        "resolution_x": int(width),
        "resolution_y": int(height),
        "resolution_percentage": 100,
        "pixel_aspect_x": float(max(1.0, 1.0 / ratio)),
        "pixel_aspect_y": float(max(1.0, ratio)),
    }


def gltf_camera(K, width: int, height: int, znear: float = 0.01) -> dict:
    """A glTF 2.0 perspective camera object for the photo: yfov = 2 atan(H / (2 fy)), aspectRatio = tan(xfov/2) /
    tan(yfov/2) = (W / fx) / (H / fy), znear; no zfar (infinite projection).

    glTF cannot express a principal point off the image centre (nor skew): viewers frame the photo as if
    cx = W / 2, cy = H / 2. The exact intrinsics go to `extras` (K, image size) for our own readers and the
    Blender camera (`blender_camera`, which does model the shift).
    """
    k = _check_intrinsics(K, width, height)
    if not znear > 0:
        raise ValueError(f"znear: got {znear}, expected a positive near-plane distance (glTF requires it)")
    return {
        "type": "perspective",
        "perspective": {
            "yfov": float(2.0 * math.atan(height / (2.0 * k[1, 1]))),
            "aspectRatio": float((width / k[0, 0]) / (height / k[1, 1])),
            "znear": float(znear),
        },
        "extras": {"K": k.tolist(), "width": int(width), "height": int(height)},
    }


# ---------------------------------------------------------------------------------------------------
# Projection, silhouettes
# ---------------------------------------------------------------------------------------------------


def project_points_opencv(points_opencv, K) -> np.ndarray:
    """Points [N, 3] in the OpenCV camera frame -> pixel coordinates [N, 2] (u right, v down).

    Points with z <= 0 (behind the camera) come out non-finite or meaningless; filter on z first.
    """
    p = _as_points(points_opencv, "points_opencv")
    k = _check_intrinsics(K)
    uvw = p @ k.T
    with np.errstate(divide="ignore", invalid="ignore"):
        return uvw[:, :2] / uvw[:, 2:]


def project_points(points_p3d, K) -> np.ndarray:
    """Points [N, 3] in the PyTorch3D camera frame -> pixels [N, 2]; inverse of `camera.pointmap_from_depth`."""
    return project_points_opencv(_as_points(points_p3d, "points_p3d") @ P3D_TO_OPENCV.T, K)


def project_points_from(points, K, convention: str) -> np.ndarray:
    """Points [N, 3] in any convention's frame (the photo camera's, or Blender world) -> pixels [N, 2]."""
    return project_points_opencv(convert_points(points, convention, "opencv"), K)


def rasterize_triangles(uv, faces, width: int, height: int, keep=None) -> np.ndarray:
    """Fill 2D triangles: uv [V, 2] pixel coordinates, faces [F, 3] -> bool [H, W].

    A pixel is set when its centre (j + 0.5, i + 0.5) lies inside or on a triangle (either winding).
    keep [F] bool selects faces (e.g. those in front of the camera). Vectorised over triangles of
    similar size; meant for checks and reported IoU, not speed.
    """
    uv = np.asarray(uv, dtype=np.float64)
    if uv.ndim != 2 or uv.shape[1] != 2:
        raise ValueError(f"uv: got shape {uv.shape}, expected [V, 2] pixel coordinates")
    faces = _check_faces(faces, len(uv))
    mask = np.zeros((int(height), int(width)), dtype=bool)
    tri = uv[faces if keep is None else faces[np.asarray(keep, dtype=bool)]]  # [F, 3, 2]
    tri = tri[np.isfinite(tri).all(axis=(1, 2))]
    (ax, ay), (bx, by), (cx, cy) = tri[:, 0].T, tri[:, 1].T, tri[:, 2].T
    area = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
    # Pixel j is a candidate when xmin <= j + 0.5 <= xmax.
    j0 = np.clip(np.ceil(tri[..., 0].min(1) - 0.5), 0, width).astype(np.int64)
    j1 = np.clip(np.floor(tri[..., 0].max(1) - 0.5), -1, width - 1).astype(np.int64)
    i0 = np.clip(np.ceil(tri[..., 1].min(1) - 0.5), 0, height).astype(np.int64)
    i1 = np.clip(np.floor(tri[..., 1].max(1) - 0.5), -1, height - 1).astype(np.int64)
    live = (area != 0) & (j1 >= j0) & (i1 >= i0)
    tri, area, j0, j1, i0, i1 = tri[live], area[live], j0[live], j1[live], i0[live], i1[live]
    side = np.maximum(j1 - j0, i1 - i0) + 1
    bucket = np.ceil(np.log2(side)).astype(np.int64) if len(side) else side
    for b in np.unique(bucket):
        n = 1 << int(b)  # candidate window n x n
        sel = np.nonzero(bucket == b)[0]
        for start in range(0, len(sel), max(1, (1 << 22) // (n * n))):
            s = sel[start : start + max(1, (1 << 22) // (n * n))]
            jj = j0[s, None, None] + np.arange(n)[None, None, :]  # [f, 1, n]
            ii = i0[s, None, None] + np.arange(n)[None, :, None]  # [f, n, 1]
            px, py = jj + 0.5, ii + 0.5
            t = tri[s]
            sign = np.sign(area[s])[:, None, None]
            inside = (jj <= j1[s, None, None]) & (ii <= i1[s, None, None])
            for e in range(3):
                (x0, y0), (x1, y1) = t[:, e].T, t[:, (e + 1) % 3].T
                edge = (x1 - x0)[:, None, None] * (py - y0[:, None, None]) - (y1 - y0)[:, None, None] * (
                    px - x0[:, None, None]
                )
                inside &= edge * sign >= 0
            f_idx, r, c = np.nonzero(inside)
            mask[ii[f_idx, r, 0], jj[f_idx, 0, c]] = True
    return mask


def render_silhouette(vertices_p3d, faces, K, width: int, height: int, near: float = 1e-6) -> np.ndarray:
    """Silhouette bool [H, W] of a mesh given in the PyTorch3D camera frame (vertices [V, 3], faces [F, 3]).

    Faces with a vertex at z <= near are dropped (no clipping): keep the object in front of the camera.
    """
    v = _as_points(vertices_p3d, "vertices_p3d")
    _check_intrinsics(K, width, height)
    faces = _check_faces(faces, len(v))
    keep = (v[:, 2] > near)[faces].all(axis=1)  # [F]
    uv = project_points(v, K)
    return rasterize_triangles(uv, faces, width, height, keep=keep)


def mask_iou(a, b) -> float:
    """Intersection over union of two boolean masks of one shape; 1.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks: got shapes {a.shape} and {b.shape}; render both at the photo's size")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
