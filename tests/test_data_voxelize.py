"""Voxelisation and the local frame: exact occupancy of cubes by hand, open meshes, single triangles."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sam3d_core.data.voxelize import MeshError, normalize_mesh, sample_surface, surface_voxels, voxelize

trimesh = pytest.importorskip("trimesh")


def shell(lo: int, hi: int) -> set[tuple[int, int, int]]:
    """Hand count: every voxel of the cube [lo, hi]^3 with a coordinate equal to lo or hi."""
    r = range(lo, hi + 1)
    return {(x, y, z) for x, y, z in itertools.product(r, r, r) if {x, y, z} & {lo, hi}}


def as_set(occ: np.ndarray) -> set[tuple[int, int, int]]:
    return set(map(tuple, occ.tolist()))


def test_unit_cube_fills_the_outer_layer_of_the_grid():
    box = trimesh.creation.box(extents=(1, 1, 1))
    occ = voxelize(box.vertices, box.faces)
    assert occ.dtype == np.int64 and occ.shape == (64**3 - 62**3, 3)
    assert as_set(occ) == shell(0, 63)


def test_half_cube_faces_on_grid_planes_give_one_layer():
    # Faces at +-0.25 lie exactly on grid planes 16 and 48: the half-open rule puts each in one voxel layer.
    box = trimesh.creation.box(extents=(0.5, 0.5, 0.5))
    occ = voxelize(box.vertices, box.faces)
    assert as_set(occ) == shell(16, 48)
    solid = voxelize(box.vertices, box.faces, fill=True)
    assert len(solid) == 33**3 and as_set(solid) == set(itertools.product(range(16, 49), repeat=3))


def test_open_box_is_voxelised_and_fill_never_marks_outside():
    box = trimesh.creation.box(extents=(0.5, 0.5, 0.5))
    top = box.triangles_center[:, 2] > 0.24
    assert top.sum() == 2
    faces = box.faces[~top]  # no lid: not watertight
    occ = voxelize(box.vertices, faces)
    lid_only = {(x, y, 48) for x in range(17, 48) for y in range(17, 48)}
    assert as_set(occ) == shell(16, 48) - lid_only
    # The flood fill enters through the open top, so the solid is the surface itself (nothing invented).
    assert as_set(voxelize(box.vertices, faces, fill=True)) == as_set(occ)


def test_a_single_large_triangle_touches_exactly_its_voxels():
    v = np.array([[-0.45, -0.4, -0.3], [0.42, -0.1, 0.35], [-0.2, 0.44, 0.1]])
    occ = surface_voxels(v, np.array([[0, 1, 2]]))
    # Every voxel hit by dense points on the triangle is found ...
    w = np.random.default_rng(0).dirichlet(np.ones(3), 200_000)
    pts = w @ v
    hit = np.floor((pts + 0.5) * 64).astype(np.int64)
    assert as_set(hit) <= as_set(occ)
    # ... and every voxel found is within half a voxel diagonal of the triangle's plane.
    n = np.cross(v[1] - v[0], v[2] - v[0])
    n /= np.linalg.norm(n)
    centres = (occ + 0.5) / 64 - 0.5
    assert np.abs((centres - v[0]) @ n).max() <= np.sqrt(3) / 2 / 64 + 1e-9


def test_normalize_mesh_centres_and_scales_by_the_longest_side():
    box = trimesh.creation.box(extents=(2.0, 1.0, 0.5))
    v = box.vertices + [3.0, 4.0, 5.0]
    local, scale, centre = normalize_mesh(v)
    assert scale == pytest.approx(2.0) and np.allclose(centre, [3, 4, 5])
    assert np.allclose(local.max(0) - local.min(0), [1.0, 0.5, 0.25]) and np.allclose(local * scale + centre, v)


def test_bad_meshes_are_clear_errors():
    box = trimesh.creation.box(extents=(1, 1, 1))
    with pytest.raises(MeshError, match="no faces"):
        voxelize(box.vertices, np.zeros((0, 3), np.int64))
    with pytest.raises(MeshError, match="call normalize_mesh first"):
        voxelize(box.vertices * 3, box.faces)
    with pytest.raises(MeshError, match="zero extent"):
        normalize_mesh(np.zeros((4, 3)))


def test_surface_samples_lie_on_the_mesh():
    box = trimesh.creation.box(extents=(1, 1, 1))
    pts = sample_surface(box.vertices, box.faces, 5000, seed=1)
    assert pts.shape == (5000, 3) and pts.dtype == np.float32
    assert np.allclose(np.abs(pts).max(1), 0.5, atol=1e-6)  # on some face of the cube
