"""The mesh chain after the networks (issue 15): floaters, the split into parts, decimation with kept borders, the
join, and `decimate_and_unwrap` in-process and on worker processes."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pytest
import torch

from sam3d_core.export.bake import _TriangleGrid
from sam3d_core.export.cleanup import (
    _components_torch,
    _undirected_edges,
    clean_mesh,
    drop_floaters,
    simplify_piece,
    split_mesh,
    stitch_pieces,
)
from sam3d_core.export.uv import decimate_and_unwrap, worker_init

trimesh = pytest.importorskip("trimesh")
pytest.importorskip("fast_simplification")
pytest.importorskip("xatlas")


def _bumpy_sphere(subdivisions: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A closed, bumpy sphere of radius ~0.3 (81,920 faces at 6 subdivisions), outward winding."""
    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=1.0)
    v = s.vertices
    r = 0.3 + 0.02 * np.sin(7 * v[:, 0]) * np.cos(5 * v[:, 1]) + 0.01 * np.sin(11 * v[:, 2])
    return (v * r[:, None]).astype(np.float32), s.faces.astype(np.int64)


@pytest.fixture(scope="module")
def object_mesh():
    """The bumpy sphere plus 30 small floaters around it (as a random-weight stage-2 mesh has)."""
    v, f = _bumpy_sphere()
    rng = np.random.default_rng(0)
    parts_v, parts_f, n = [v], [f], len(v)
    blob = trimesh.creation.icosphere(subdivisions=1, radius=0.01)
    for _ in range(30):
        centre = rng.normal(size=3)
        centre = centre / np.linalg.norm(centre) * 0.42
        parts_v.append((blob.vertices + centre).astype(np.float32))
        parts_f.append(blob.faces + n)
        n += len(blob.vertices)
    return np.concatenate(parts_v), np.concatenate(parts_f)


def _open_and_nonmanifold(v, f) -> tuple[int, int]:
    _, _, counts, _ = _undirected_edges(np.asarray(f, np.int64), len(v))
    return int((counts == 1).sum()), int((counts > 2).sum())


def test_components_on_the_device_equal_scipys(object_mesh):
    """The hooking + pointer-jumping components (the GPU path, here on CPU tensors) equal scipy's."""
    import scipy.sparse
    import scipy.sparse.csgraph

    v, f = object_mesh
    label = _components_torch(len(v), torch.from_numpy(f)).numpy()
    e = f[:, [0, 1, 1, 2]].reshape(-1, 2)
    graph = scipy.sparse.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(len(v), len(v)))
    count, ref = scipy.sparse.csgraph.connected_components(graph, directed=False)
    assert count == 31 and len(np.unique(label)) == 31
    # the same partition: a bijection between the two labellings
    pairs = np.unique(np.stack([label, ref], 1), axis=0)
    assert len(pairs) == 31
    for root in np.unique(label):  # each label is the smallest vertex id of its component
        assert np.flatnonzero(label == root).min() == root


def test_drop_floaters_keeps_the_object_only(object_mesh):
    v, f = object_mesh
    kept = drop_floaters(v, f)
    assert len(kept) == 81920 and (kept == f[:81920]).all()  # the sphere's faces, in order
    kept_t = drop_floaters(torch.from_numpy(v), torch.from_numpy(f))  # torch input on the CPU: same answer
    assert isinstance(kept_t, torch.Tensor) and torch.equal(kept_t, torch.from_numpy(f[:81920]))


def test_split_covers_every_face_once_and_stitch_joins_the_parts():
    v, f = _bumpy_sphere(5)
    parts = split_mesh(v, f, 7)
    assert len(parts) == 7
    sizes = [len(pf) for _, pf in parts]
    assert sum(sizes) == len(f) and max(sizes) - min(sizes) <= 1  # balanced halving
    for pv, pf in parts:
        assert pv.dtype == np.float32 and pf.dtype == np.int32 and pf.min() == 0 and pf.max() == len(pv) - 1
    got = {tuple(np.sort(pv[t].round(7).tolist(), axis=0).ravel()) for pv, pf in parts for t in pf}
    want = {tuple(np.sort(v[t].round(7).tolist(), axis=0).ravel()) for t in f}
    assert got == want
    sv, sf = stitch_pieces(parts)
    assert len(sv) == len(v) and len(sf) == len(f)
    assert _open_and_nonmanifold(sv, sf) == (0, 0)  # closed again: every border vertex joined with its copies


def test_parts_decimated_with_kept_borders_join_into_a_closed_mesh():
    v, f = _bumpy_sphere(5)
    parts = split_mesh(v, f, 4)
    out = [simplify_piece(pv, pf, len(pf) // 8) for pv, pf in parts]
    for (pv, pf), (qv, qf) in zip(parts, out, strict=True):
        assert len(qf) < len(pf) // 4
        half, eid, counts, _ = _undirected_edges(pf.astype(np.int64), len(pv))
        border = pv[np.unique(half[counts[eid] == 1])]
        kept = {tuple(p) for p in qv.tolist()}
        assert all(tuple(p) in kept for p in border.tolist())  # every border vertex, bit for bit
    sv, sf = stitch_pieces(out)
    cleaned = clean_mesh(sv, sf)
    assert _open_and_nonmanifold(cleaned.vertices, cleaned.faces) == (0, 0)
    assert cleaned.report["components"] == 1


def _distance(points: np.ndarray, v: np.ndarray, f: np.ndarray) -> np.ndarray:
    face, bary = _TriangleGrid(torch.from_numpy(v[f].astype(np.float32))).nearest(torch.from_numpy(points), 1 << 20)
    q = np.einsum("nk,nkc->nc", bary.numpy(), v[f[face.numpy()]])
    return np.linalg.norm(points - q, axis=1)


def test_decimate_and_unwrap_matches_one_decimation_of_the_whole_mesh(object_mesh):
    """The chain in parts (floaters dropped, 4 parts, 4 x target faces, joined, cleaned, decimated) is as close to
    the dense surface as one quadric decimation of the cleaned whole."""
    v, f = object_mesh
    uv, report = decimate_and_unwrap(v, f, target_faces=2000, texture_size=256, min_piece_faces=20000)
    assert report["first_pass_parts"] == 4 and report["first_pass_floater_faces"] == 30 * 80
    assert 1900 <= len(uv.faces) <= 2000 and report["components"] == 1
    assert uv.uvs.min() >= 0 and uv.uvs.max() <= 1
    whole = clean_mesh(v, f, target_faces=2000)
    rng = np.random.default_rng(0)
    probe = v[: 81920 // 2][rng.choice(40960, 4000, replace=False)]  # dense vertices on the sphere
    ours = _distance(probe, uv.vertices, uv.faces)
    theirs = _distance(probe, whole.vertices, whole.faces)
    assert ours.mean() <= 1.2 * theirs.mean() and ours.max() <= 1.5 * theirs.max()
    assert ours.mean() < 0.002  # ~0.5 lattice steps of the 256^3 grid


def test_worker_processes_give_the_same_result(object_mesh):
    v, f = object_mesh
    opts = dict(target_faces=2000, texture_size=256, min_piece_faces=20000)
    here, _ = decimate_and_unwrap(v, f, **opts)
    with ProcessPoolExecutor(2, mp_context=get_context("spawn"), initializer=worker_init) as pool:
        there, report = decimate_and_unwrap(torch.from_numpy(v), torch.from_numpy(f), executor=pool, **opts)
    assert report["first_pass_parts"] == 4
    for field in ("vertices", "faces", "uvs", "vmapping"):
        np.testing.assert_array_equal(getattr(here, field), getattr(there, field))


def test_small_meshes_skip_the_first_pass():
    v, f = _bumpy_sphere(4)  # 5,120 faces: below 2 x 4 x target
    uv, report = decimate_and_unwrap(v, f, target_faces=1000, texture_size=128)
    assert report["first_pass_parts"] == 0 and len(uv.faces) <= 1000


def test_push_pull_in_torch_equals_numpy():
    """The bake's fill of empty texels, in torch on the GPU path, equals the numpy one (odd sizes too)."""
    from sam3d_core.export.bake import _push_pull, _push_pull_torch

    rng = np.random.default_rng(0)
    for shape in ((64, 64), (37, 50)):
        colour = rng.random((*shape, 3))
        known = rng.random(shape) > 0.7
        want = _push_pull(colour, known)
        got = _push_pull_torch(torch.from_numpy(colour), torch.from_numpy(known)).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(np.round(got * 255), np.round(want * 255))
        assert np.isfinite(got).all()
