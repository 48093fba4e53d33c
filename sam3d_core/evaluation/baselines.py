"""Baselines that need no model: a box and an ellipsoid fitted to the mask's extent at the true depth, and the
oracle (the ground truth itself, at voxel resolution).

What the box and the ellipsoid read from a sample, and nothing else:
- the VISIBLE mask (what a model gets; never the amodal mask),
- the intrinsics K,
- the true depth: z of the ground-truth translation (the depth of the object's local-frame origin, the centre of
  its 64^3 grid, along the camera's viewing axis). No other part of the pose, no point map, no shape.

The fit: the mask's pixel bounding box [u0, u1] x [v0, v1] (pixel edges) is back-projected through K at that
depth; its width and height in metres become the primitive's extents across the view and up the view, and the
extent along the view is taken equal to the width (objects stand upright and turn about the vertical axis, so
their horizontal extent across the view is the best guess for the one along it). The primitive is centred on the
back-projected centre of the bounding box, at the true depth. Orientation: upright and facing the camera, local
z (up) -> camera +y (up), local -y (the glTF front, see `frames`) -> camera -z (towards the camera). Scale: one
value, the largest extent, so the primitive's longest side spans the local grid.

The oracle returns the sample's own occupancy and pose (no mesh): its scores are the ceiling of a perfect
stage-1 prediction under the metrics (voxel quantisation only) and check the metric plumbing end to end.
"""

from __future__ import annotations

import numpy as np

from sam3d_core.data.sample import GRID, Sample
from sam3d_core.evaluation._deps import trimesh_module
from sam3d_core.evaluation.prediction import Prediction

BASELINES = ("box", "ellipsoid", "oracle")
DESCRIPTIONS = {
    "box": "baseline: a box fitted to the visible mask's extent at the true depth (t_z), upright, facing the camera",
    "ellipsoid": "baseline: an ellipsoid fitted to the visible mask's extent at the true depth (t_z), upright",
    "oracle": "ground-truth occupancy and pose (the ceiling at 64^3 voxel resolution; checks the metrics)",
}
# Row-vector rotation (p_cam = p_local @ R): local x -> camera -x, local y -> camera +z, local z -> camera +y.
UPRIGHT_FACING_CAMERA = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
ELLIPSOID_SUBDIVISIONS = 4  # icosphere of 2562 vertices


def mask_extent_at_depth(mask: np.ndarray, K: np.ndarray, depth: float) -> tuple[np.ndarray, np.ndarray]:
    """The visible mask's bounding box back-projected at `depth` (metres along the view axis).

    Returns (centre [3] in the PyTorch3D camera frame, extents [3] = (width, height, depth) in metres, the depth
    extent taken equal to the width)."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2 or not m.any():
        raise ValueError(f"mask: got shape {m.shape} with {int(m.sum())} pixels set; expected a non-empty [H, W] mask")
    if not depth > 0:
        raise ValueError(f"depth: got {depth}; the object's centre must lie in front of the camera (z > 0)")
    rows, cols = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
    u0, u1, v0, v1 = cols[0], cols[-1] + 1.0, rows[0], rows[-1] + 1.0  # pixel edges
    uc, vc = (u0 + u1) / 2, (v0 + v1) / 2
    k_inv = np.linalg.inv(np.asarray(K, dtype=np.float64))
    rays = np.array([[uc, vc, 1.0], [u0, vc, 1.0], [u1, vc, 1.0], [uc, v0, 1.0], [uc, v1, 1.0]]) @ k_inv.T
    xyz = rays / rays[:, 2:] * depth  # [5, 3] OpenCV camera frame, all at z = depth
    width = float(np.linalg.norm(xyz[2] - xyz[1]))
    height = float(np.linalg.norm(xyz[4] - xyz[3]))
    centre = xyz[0] * np.array([-1.0, -1.0, 1.0])  # OpenCV -> PyTorch3D (x left, y up)
    return centre, np.array([width, height, width])


def _local_extents(extents_cam: np.ndarray) -> tuple[np.ndarray, float]:
    """Camera-axis extents (width, height, depth) -> local-frame extents in grid units (longest = 1), and the
    scale in metres. Local x is the width, local y the depth, local z the height (UPRIGHT_FACING_CAMERA)."""
    scale = float(extents_cam.max())
    if not scale > 0:
        raise ValueError("the fitted primitive has zero size")
    w, h, d = extents_cam
    return np.array([w, d, h]) / scale, scale


def _cell_centres() -> np.ndarray:
    i = (np.arange(GRID) + 0.5) / GRID - 0.5
    return np.stack(np.meshgrid(i, i, i, indexing="ij"), axis=-1)  # [64, 64, 64, 3] local frame


def _shell(inside: np.ndarray) -> np.ndarray:
    """Solid bool grid [64, 64, 64] -> indices [N, 3] of its surface voxels (inside, with a face neighbour
    outside or off the grid), the stage-1 model's kind of occupancy."""
    padded = np.pad(inside, 1)
    interior = padded.copy()
    for axis in range(3):
        for side in (-1, 1):
            interior &= np.roll(padded, side, axis=axis)
    return np.argwhere(inside & ~interior[1:-1, 1:-1, 1:-1])


def _primitive(sample: Sample, kind: str) -> Prediction:
    t_gt = np.asarray(sample.translation, dtype=np.float64)
    centre, extents_cam = mask_extent_at_depth(sample.mask, sample.K, float(t_gt[2]))
    half, scale = _local_extents(extents_cam)
    half = half / 2
    c = _cell_centres()
    tm = trimesh_module()
    if kind == "box":
        inside = (np.abs(c) <= half).all(axis=-1)
        mesh = tm.creation.box(extents=2 * half)
    else:
        inside = ((c / half) ** 2).sum(axis=-1) <= 1.0
        mesh = tm.creation.icosphere(subdivisions=ELLIPSOID_SUBDIVISIONS)
        mesh.vertices = mesh.vertices * half
    occupancy = _shell(inside)
    if len(occupancy) == 0:  # thinner than a voxel: keep the centre cell so the occupancy is not empty
        occupancy = np.array([[GRID // 2] * 3])
    return Prediction(
        occupancy=occupancy.astype(np.int64),
        rotation=UPRIGHT_FACING_CAMERA.copy(),
        translation=centre,
        scale=np.full(3, scale),
        vertices=np.asarray(mesh.vertices, dtype=np.float64),
        faces=np.asarray(mesh.faces, dtype=np.int64),
        info={"baseline": kind, "extents_m": extents_cam.tolist(), "depth_m": float(t_gt[2])},
    )


def box_baseline(sample: Sample) -> Prediction:
    """A box with the visible mask's extent at the true depth (see the module docstring for what it reads)."""
    return _primitive(sample, "box")


def ellipsoid_baseline(sample: Sample) -> Prediction:
    """The ellipsoid inscribed in `box_baseline`'s box (same centre, axes and semi-axes = half extents)."""
    return _primitive(sample, "ellipsoid")


def oracle_baseline(sample: Sample) -> Prediction:
    """The sample's own occupancy and pose, no mesh (points then come from the voxel faces)."""
    return Prediction(
        occupancy=np.asarray(sample.occupancy, dtype=np.int64),
        rotation=np.asarray(sample.rotation, dtype=np.float64),
        translation=np.asarray(sample.translation, dtype=np.float64),
        scale=np.asarray(sample.scale, dtype=np.float64),
        info={"baseline": "oracle"},
    )


def predict_baseline(name: str, sample: Sample) -> Prediction:
    """Run the baseline called `name` (one of BASELINES) on one sample."""
    fns = {"box": box_baseline, "ellipsoid": ellipsoid_baseline, "oracle": oracle_baseline}
    if name not in fns:
        raise ValueError(f"baseline: got {name!r}, expected one of {BASELINES}")
    return fns[name](sample)
