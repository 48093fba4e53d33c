"""Mesh clean-up, decimation, UV unwrap and the GLB writers (sam3d_core/export/mesh.py, gltf.py).

Synthetic meshes with known defects; GLB files checked three ways: our own stdlib parse of the container,
trimesh.load, and pygltflib where it is installed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

trimesh = pytest.importorskip("trimesh", reason="mesh export needs the export extra: pip install 'sam3d[export]'")
pytest.importorskip("xatlas", reason="UV unwrap needs xatlas: pip install 'sam3d[export]'")
pytest.importorskip("fast_simplification", reason="decimation needs fast-simplification: pip install 'sam3d[export]'")

from sam3d_core.export.cleanup import (  # noqa: E402
    _ear_clip,
    _ray_winding,
    _stable_argsort,
    _winding_number,
    clean_mesh,
)
from sam3d_core.export.gltf import (  # noqa: E402
    Z_UP_TO_Y_UP,
    TexturedMesh,  # noqa: E402
    save_object_glb,
    save_scene_glb,
)
from sam3d_core.export.uv import _split_faces, unwrap_uv  # noqa: E402


def _colour(v: np.ndarray) -> np.ndarray:
    """A smooth colour field over space, [V, 3] in [0, 1]."""
    return np.stack([0.5 + 0.4 * np.sin(3 * v[:, 0]), 0.2 + 0.6 * v[:, 1] ** 2, 0.5 + 0.4 * v[:, 2]], axis=1)


def _sphere(subdivisions: int, radius: float = 1.0, centre=(0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    s = trimesh.creation.icosphere(subdivisions, radius=radius)
    return s.vertices + np.asarray(centre), s.faces.astype(np.int64)


def _cup(sections: int = 32, rings: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """An open-top cylinder (radius 0.5, z in [-0.5, 0.5]) with a fan bottom, outward winding."""
    a = 2 * np.pi * np.arange(sections) / sections
    z = np.linspace(-0.5, 0.5, rings + 1)
    wall = np.stack(
        [
            np.repeat(0.5 * np.cos(a)[None], rings + 1, 0),
            np.repeat(0.5 * np.sin(a)[None], rings + 1, 0),
            np.repeat(z[:, None], sections, 1),
        ],
        axis=-1,
    ).reshape(-1, 3)
    v = np.concatenate([wall, [[0.0, 0.0, -0.5]]])
    i, j = np.meshgrid(np.arange(rings), np.arange(sections), indexing="ij")
    p, q = i * sections + j, i * sections + (j + 1) % sections  # ring i, angle j and j + 1
    quads = np.stack([p, q, q + sections, p + sections], axis=-1).reshape(-1, 4)
    side = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
    bottom = np.stack([np.full(sections, len(wall)), (np.arange(sections) + 1) % sections, np.arange(sections)], 1)
    return v, np.concatenate([side, bottom]).astype(np.int64)


def _boundary_edges(faces: np.ndarray) -> int:
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    return int((counts == 1).sum())


# ---------------------------------------------------------------------------------------------------------
# clean_mesh


def test_clean_mesh_repairs_a_sphere_with_floaters_a_hole_and_split_vertices():
    v, f = _sphere(4)
    centre_vertex = np.flatnonzero(np.bincount(f.reshape(-1)) == 6)[0]
    f = f[~(f == centre_vertex).any(axis=1)]  # a 6-edge hole
    v, f = v[f.reshape(-1)], np.arange(3 * len(f)).reshape(-1, 3)  # every face with its own 3 vertices
    f[::7] = f[::7, ::-1]  # some faces wound the wrong way
    n_flipped, n_sphere = len(f[::7]), len(f)
    rng = np.random.default_rng(0)
    floaters = np.array([3.0, 0.0, 0.0]) + rng.normal(size=(5, 1, 3)) * 0.3 + rng.normal(size=(5, 3, 3)) * 0.01
    v = np.concatenate([v, floaters.reshape(-1, 3)])
    f = np.concatenate([f, len(f) * 3 + np.arange(15).reshape(5, 3)])

    out = clean_mesh(v, f, _colour(v))

    r = out.report
    assert (r["floaters_removed"], r["holes_filled"], r["open_boundaries"]) == (5, 1, 0)
    assert r["faces_flipped"] == n_flipped
    assert r["vertices_merged"] == 3 * n_sphere - (len(_sphere(4)[0]) - 1)
    m = trimesh.Trimesh(out.vertices, out.faces, process=False)
    assert m.is_watertight and m.is_winding_consistent
    assert m.volume == pytest.approx(4 / 3 * np.pi, rel=0.01)  # outward: positive volume of the unit sphere
    assert np.linalg.norm(out.vertices, axis=1).max() < 1.0 + 1e-6  # the floaters at x ~ 3 are gone
    np.testing.assert_allclose(out.colors, _colour(out.vertices), atol=1e-5)  # merged copies had equal colours


def test_clean_mesh_keeps_the_open_top_of_a_cup_and_fills_a_small_wall_hole():
    v, f = _cup()
    f = np.delete(f, [16 * 32 + 5, 32 * 32 + 16 * 32 + 5], axis=0)  # one wall quad (its two triangles): 4 edges
    out = clean_mesh(v, f)
    assert (out.report["holes_filled"], out.report["open_boundaries"]) == (1, 1)
    assert _boundary_edges(out.faces) == 32  # the rim, untouched
    normals = trimesh.Trimesh(out.vertices, out.faces, process=False).face_normals
    centres = out.vertices[out.faces].mean(axis=1)
    wall = np.abs(normals[:, 2]) < 0.5
    assert (np.einsum("ij,ij->i", normals[wall, :2], centres[wall, :2]) > 0).all()  # away from the axis
    assert (normals[~wall, 2] < 0).all()  # the bottom points down


def test_clean_mesh_keeps_both_parts_of_a_two_part_object_and_drops_an_inner_shell():
    big, big_f = _sphere(3, 0.3, (-0.5, 0.0, 0.0))
    small, small_f = _sphere(3, 0.12, (0.5, 0.0, 0.0))
    inner, inner_f = _sphere(2, 0.1, (-0.5, 0.0, 0.0))
    v = np.concatenate([big, small, inner])
    f = np.concatenate([big_f, small_f + len(big), inner_f[:, ::-1] + len(big) + len(small)])  # inner: inward

    out = clean_mesh(v, f)
    assert (out.report["components"], out.report["floaters_removed"], out.report["inner_shells_removed"]) == (3, 0, 1)
    bodies = trimesh.Trimesh(out.vertices, out.faces, process=False).split(only_watertight=False)
    assert sorted(len(b.faces) for b in bodies) == sorted([len(big_f), len(small_f)])

    kept = clean_mesh(v, f, remove_inner_shells=False)
    assert len(kept.faces) == len(f) and kept.report["inner_shells_removed"] == 0


def test_clean_mesh_turns_an_inverted_mesh_outward_and_drops_bad_faces():
    v, f = _sphere(2)
    f = np.concatenate([f[:, ::-1], f[:3], [[0, 0, 1]]])  # inverted, 3 duplicates (opposite winding), 1 degenerate
    out = clean_mesh(v, f)
    assert (out.report["duplicate_faces"], out.report["degenerate_faces"]) == (3, 1)
    m = trimesh.Trimesh(out.vertices, out.faces, process=False)
    assert m.is_watertight and m.volume > 0


def test_hole_triangulation_handles_concave_and_folded_loops():
    # a concave L-shaped loop: ear clipping covers exactly its area, every triangle wound like the loop
    loop = np.array([[0, 0, 0], [2, 0, 0], [2, 1, 0], [1, 1, 0], [1, 2, 0], [0, 2, 0]], dtype=np.float64)
    tris = _ear_clip(loop)
    area = _uv_area(loop[tris][..., :2])
    assert len(tris) == 4 and (area > 0).all() and area.sum() == pytest.approx(3.0)
    # a band cut 300 degrees around a sphere folds over itself in its plane: filled by a fan (one new vertex)
    v, f = _sphere(3)
    centre = v[f].mean(axis=1)
    azimuth = np.degrees(np.arctan2(centre[:, 1], centre[:, 0])) % 360
    f = f[~((np.abs(centre[:, 2]) < 0.25) & (azimuth < 300))]
    out = clean_mesh(v, f, max_hole_edges=1000, max_hole_perimeter=10.0)
    assert out.report["holes_filled"] == 1 and len(out.vertices) == len(np.unique(f)) + 1
    m = trimesh.Trimesh(out.vertices, out.faces, process=False)
    assert m.is_watertight and m.is_winding_consistent and m.volume > 0


def test_decimation_reaches_the_target_and_carries_colours():
    v, f = _sphere(5)  # 20480 faces, edge ~0.04
    out = clean_mesh(v, f, _colour(v), target_faces=2000)
    assert out.report["faces_before_decimation"] == len(f)
    assert abs(len(out.faces) - 2000) <= 100
    m = trimesh.Trimesh(out.vertices, out.faces, process=False)
    assert m.is_watertight and m.volume > 0
    err = np.abs(out.colors - _colour(out.vertices))
    assert err.max() < 0.05 and err.mean() < 0.015  # nearest dense vertex: within about one input edge


def test_clean_mesh_rejects_bad_input_with_the_fix():
    v, f = _sphere(1)
    with pytest.raises(ValueError, match=r"vertices has shape \(42, 2\)"):
        clean_mesh(v[:, :2], f)
    with pytest.raises(ValueError, match="faces index vertices 0..41 but there are 10"):
        clean_mesh(v[:10], f)
    with pytest.raises(ValueError, match=r"colors has shape \(5, 3\); expected \[42, C\]"):
        clean_mesh(v, f, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="target_faces=2"):
        clean_mesh(v, f, target_faces=2)


def test_clean_mesh_drops_a_shell_inside_an_open_cup():
    # The cup is open, so the generalised winding number decides (about 0.9 near its bottom). The second ball
    # lies in a corner of the cup's bounding box but outside the cup: it is tested and kept.
    cup_v, cup_f = _cup()
    ball, ball_f = _sphere(2, 0.1, (0.0, 0.0, -0.3))
    corner, corner_f = _sphere(2, 0.04, (0.44, 0.44, 0.0))
    v = np.concatenate([cup_v, ball, corner])
    f = np.concatenate([cup_f, ball_f + len(cup_v), corner_f + len(cup_v) + len(ball)])
    out = clean_mesh(v, f, min_component_ratio=0.0, fill_holes=False)
    assert (out.report["components"], out.report["inner_shells_removed"]) == (3, 1)
    assert len(out.faces) == len(cup_f) + len(corner_f)
    assert np.linalg.norm(out.vertices[:, :2], axis=1).max() > 0.6  # the corner ball is kept


def test_ray_crossings_give_the_winding_number_of_closed_meshes():
    v, f = _sphere(3, 0.8)
    rng = np.random.default_rng(1)
    points = np.concatenate([rng.uniform(-1, 1, (300, 3)), [[0.0, 0.0, 0.0], [0.0, 0.0, 0.4], v[0] * 0.5]])
    by_ray = _ray_winding(points, v, f)
    exact = _reference_winding(points, v[f])
    decided = ~np.isnan(by_ray)
    assert decided.mean() > 0.95  # only grazing rays are left undecided
    np.testing.assert_array_equal(by_ray[decided], np.round(exact[decided]))
    inside = np.linalg.norm(points, axis=1) < 0.78  # the icosphere is inscribed in the sphere of radius 0.8
    assert (np.abs(by_ray[decided & inside]) == 1).all()
    # open meshes: the expanded formula equals the textbook one
    open_f = f[v[f].mean(1)[:, 2] < 0.5]
    np.testing.assert_allclose(_winding_number(points, v, open_f), _reference_winding(points, v[open_f]), atol=1e-9)


def _reference_winding(points: np.ndarray, tris: np.ndarray) -> np.ndarray:
    """Generalised winding number, one solid angle per (point, triangle) (Van Oosterom-Strackee)."""
    out = []
    for p in points:
        a, b, c = tris[:, 0] - p, tris[:, 1] - p, tris[:, 2] - p
        la, lb, lc = (np.linalg.norm(x, axis=1) for x in (a, b, c))
        det = np.einsum("ij,ij->i", a, np.cross(b, c))
        den = la * lb * lc + (a * b).sum(1) * lc + (b * c).sum(1) * la + (c * a).sum(1) * lb
        out.append(np.arctan2(det, den).sum() / (2 * np.pi))
    return np.array(out)


def _moebius(segments: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """A Moebius band: `segments` quads around a circle, the last one joined to the first with a half twist."""
    t = 2 * np.pi * np.arange(segments) / segments
    across = np.stack([np.cos(t / 2) * np.cos(t), np.cos(t / 2) * np.sin(t), np.sin(t / 2)], 1) * 0.3
    centre = np.stack([np.cos(t), np.sin(t), np.zeros_like(t)], 1)
    v = np.concatenate([centre - across, centre + across])  # vertex i: one side, segments + i: the other
    i = np.arange(segments)
    j = (i + 1) % segments
    lo, hi = i, i + segments
    lo_next = np.where(j == 0, segments, j)  # the twist: past the last segment the two sides swap
    hi_next = np.where(j == 0, 0, j + segments)
    f = np.concatenate([np.stack([lo, lo_next, hi_next], 1), np.stack([lo, hi_next, hi], 1)])
    return v, f


def test_orientation_of_a_non_orientable_band_leaves_one_inconsistent_edge():
    v, f = _moebius()
    f = np.where(np.random.default_rng(2).random(len(f))[:, None] < 0.5, f[:, ::-1], f)  # random windings
    assert _same_way_edges(f) > 5
    out = clean_mesh(v, f, fill_holes=False, remove_inner_shells=False)
    assert len(out.faces) == len(f)
    # the faces form a cycle through their shared edges: a spanning tree orients all shared edges but one
    # consistently; no orientation can do better on a Moebius band
    assert _same_way_edges(out.faces) == 1


def _same_way_edges(faces: np.ndarray) -> int:
    """Shared edges walked in the same direction by both faces (0 for a consistently wound surface)."""
    _, count = np.unique(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=0, return_counts=True)
    return int((count == 2).sum())


def test_stable_argsort_matches_numpy():
    rng = np.random.default_rng(3)
    for bound in (50, 1 << 40, 1 << 62):  # the last does not fit the packed sort: numpy's argsort is used
        key = rng.integers(0, bound, 5000, dtype=np.int64)
        key[::7] = key[0]  # many repeats: the order among equal keys matters
        np.testing.assert_array_equal(_stable_argsort(key, bound), np.argsort(key, kind="stable"))


# ---------------------------------------------------------------------------------------------------------
# unwrap_uv


def _uv_area(tri: np.ndarray) -> np.ndarray:
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    return 0.5 * (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])


def _overlapping_pairs(tri: np.ndarray, eps: float = 1e-7) -> int:
    """Pairs of 2D triangles [F, 3, 2] whose interiors overlap (separating-axis test on the edge normals)."""
    i, j = np.triu_indices(len(tri), k=1)
    edges = np.concatenate([np.roll(tri, -1, axis=1) - tri], axis=1)  # [F, 3, 2]
    normals = np.stack([-edges[..., 1], edges[..., 0]], axis=-1)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    axes = np.concatenate([normals[i], normals[j]], axis=1)  # [P, 6, 2]
    pa = np.einsum("pak,pvk->pav", axes, tri[i])  # [P, 6, 3]
    pb = np.einsum("pak,pvk->pav", axes, tri[j])
    gap = np.minimum(pa.max(-1), pb.max(-1)) - np.maximum(pa.min(-1), pb.min(-1))
    return int((gap > eps).all(axis=1).sum())


def _chart_gap(uvs: np.ndarray, faces: np.ndarray) -> float:
    """Smallest distance between a UV vertex and an edge of another chart (charts: UV-connected faces)."""
    import scipy.sparse
    import scipy.sparse.csgraph

    e = faces[:, [0, 1, 1, 2]].reshape(-1, 2)
    graph = scipy.sparse.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(len(uvs), len(uvs)))
    _, chart = scipy.sparse.csgraph.connected_components(graph, directed=False)
    a, b = uvs[faces].reshape(-1, 2), uvs[np.roll(faces, -1, axis=1)].reshape(-1, 2)
    d = b - a
    t = np.clip(((uvs[:, None] - a[None]) * d[None]).sum(-1) / (d * d).sum(-1)[None], 0.0, 1.0)
    dist = np.linalg.norm(uvs[:, None] - (a[None] + t[..., None] * d[None]), axis=-1)
    other = chart[:, None] != chart[faces.reshape(-1)][None]
    return float(dist[other].min())


def test_unwrap_uv_gives_non_overlapping_padded_charts_in_the_unit_square():
    v, f = _sphere(2)
    uv = unwrap_uv(v, f, texture_size=256, padding=4)
    assert uv.uvs.shape == (len(uv.vertices), 2) and uv.faces.shape == f.shape
    assert uv.uvs.min() >= 0.0 and uv.uvs.max() <= 1.0
    np.testing.assert_array_equal(uv.vertices, v[uv.vmapping].astype(np.float32))
    np.testing.assert_allclose(uv.vertices[uv.faces], v[f], atol=1e-6)  # same faces, same order
    area = np.abs(_uv_area(uv.uvs[uv.faces]))
    assert area.min() > 0.0 and area.sum() < 1.0
    assert _overlapping_pairs(uv.uvs[uv.faces]) == 0
    assert len(np.unique(uv.vmapping)) == len(v) < len(uv.vertices)  # split along seams, every vertex kept
    assert _chart_gap(uv.uvs, uv.faces) * 256 >= 0.75 * 4


def test_unwrap_in_pieces_keeps_faces_charts_apart_and_every_vertex():
    v, f = _sphere(2)
    pieces = _split_faces(v[f].mean(axis=1), 90)
    assert len(pieces) == 4 and max(len(p) for p in pieces) <= 90
    np.testing.assert_array_equal(np.sort(np.concatenate(pieces)), np.arange(len(f)))
    uv = unwrap_uv(v, f, texture_size=256, padding=4, piece_faces=90)
    assert uv.uvs.min() >= 0.0 and uv.uvs.max() <= 1.0
    np.testing.assert_allclose(uv.vertices[uv.faces], v[f], atol=1e-6)  # same faces, same order
    np.testing.assert_array_equal(uv.vertices, v[uv.vmapping].astype(np.float32))
    assert len(np.unique(uv.vmapping)) == len(v)
    assert np.abs(_uv_area(uv.uvs[uv.faces])).min() > 0.0
    # the pieces' charts are packed together without overlap (1e-6: float32 rounding along shared edges)
    assert _overlapping_pairs(uv.uvs[uv.faces], eps=1e-6) == 0
    assert _chart_gap(uv.uvs, uv.faces) * 256 >= 0.75 * 4


# ---------------------------------------------------------------------------------------------------------
# GLB files


def _read_glb(path: Path) -> tuple[dict, bytes]:
    """Parse a GLB container with the stdlib: (glTF JSON, BIN chunk). Checks the header and chunk layout."""
    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    assert (magic, version, length) == (b"glTF", 2, len(data))
    json_len, json_type = struct.unpack_from("<I4s", data, 12)
    assert json_type == b"JSON" and json_len % 4 == 0
    doc = json.loads(data[20 : 20 + json_len])
    bin_len, bin_type = struct.unpack_from("<I4s", data, 20 + json_len)
    assert bin_type == b"BIN\0" and bin_len % 4 == 0 and 28 + json_len + bin_len == len(data)
    return doc, data[28 + json_len :]


_COMPONENTS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}
_DTYPES = {5126: np.float32, 5125: np.uint32, 5123: np.uint16, 5121: np.uint8}


def _accessor(doc: dict, blob: bytes, index: int) -> np.ndarray:
    acc = doc["accessors"][index]
    view = doc["bufferViews"][acc["bufferView"]]
    n = _COMPONENTS[acc["type"]]
    arr = np.frombuffer(blob, _DTYPES[acc["componentType"]], acc["count"] * n, view["byteOffset"])
    return arr.reshape(acc["count"], n) if n > 1 else arr


def _check_gltf(doc: dict, blob: bytes) -> None:
    """The glTF 2.0 rules our files can break: required fields, index ranges, alignment, POSITION bounds."""
    assert doc["asset"]["version"] == "2.0"
    assert all(v != [] for v in doc.values())  # top-level arrays need at least one item
    assert doc["buffers"] == [{"byteLength": len(blob)}]
    for view in doc["bufferViews"]:
        assert view["buffer"] == 0 and view["byteOffset"] % 4 == 0
        assert view["byteOffset"] + view["byteLength"] <= len(blob)
    for acc in doc["accessors"]:
        assert acc["count"] >= 1 and acc["type"] in _COMPONENTS and acc["componentType"] in _DTYPES
        view = doc["bufferViews"][acc["bufferView"]]
        size = acc["count"] * _COMPONENTS[acc["type"]] * np.dtype(_DTYPES[acc["componentType"]]).itemsize
        assert size <= view["byteLength"]
    for mesh in doc["meshes"]:
        for prim in mesh["primitives"]:
            attrs = prim["attributes"]
            positions = _accessor(doc, blob, attrs["POSITION"])
            acc = doc["accessors"][attrs["POSITION"]]
            assert acc["min"] == positions.min(0).tolist() and acc["max"] == positions.max(0).tolist()
            assert {doc["accessors"][a]["count"] for a in attrs.values()} == {len(positions)}
            assert _accessor(doc, blob, prim["indices"]).max() < len(positions)
            assert doc["accessors"][prim["indices"]]["count"] % 3 == 0 and prim.get("mode", 4) == 4
            assert prim["material"] < len(doc["materials"])
    for node in doc["nodes"]:
        assert node.get("mesh", 0) < len(doc.get("meshes", [])) and node.get("camera", 0) < len(doc.get("cameras", [1]))
    assert all(n < len(doc["nodes"]) for n in doc["scenes"][doc["scene"]]["nodes"])
    for tex in doc.get("textures", []):
        assert tex["source"] < len(doc["images"]) and tex["sampler"] < len(doc["samplers"])
    for image in doc.get("images", []):
        assert image["mimeType"] == "image/png" and image["bufferView"] < len(doc["bufferViews"])


def _textured_ball(width: int = 256, height: int = 128) -> TexturedMesh:
    """A unit sphere with xatlas UVs and a texture whose texel [row, col] stores (col, row % 256, 0)."""
    v, f = _sphere(2)
    uv = unwrap_uv(v, f, texture_size=256)
    rows, cols = np.mgrid[0:height, 0:width]
    texture = np.stack([cols, rows % 256, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    return TexturedMesh(uv.vertices, uv.faces, uv.uvs, texture, name="ball", metadata={"score": np.float32(0.75)})


def test_object_glb_round_trips_through_trimesh_with_the_documented_uv_flip(tmp_path):
    mesh = _textured_ball()
    path = mesh.save_glb(tmp_path / "ball.glb")

    doc, blob = _read_glb(path)
    _check_gltf(doc, blob)
    assert doc["nodes"] == [{"name": "ball", "mesh": 0, "extras": {"score": 0.75}}]
    prim = doc["meshes"][0]["primitives"][0]
    np.testing.assert_array_equal(_accessor(doc, blob, prim["attributes"]["TEXCOORD_0"]), mesh.uvs)  # stored as is
    assert "COLOR_0" not in prim["attributes"]
    positions = _accessor(doc, blob, prim["attributes"]["POSITION"])
    normals = _accessor(doc, blob, prim["attributes"]["NORMAL"])
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
    assert (np.einsum("ij,ij->i", normals, positions) > 0.9).all()  # a unit sphere: outward, about the position
    material = doc["materials"][prim["material"]]
    assert material["doubleSided"] is False
    assert material["pbrMetallicRoughness"]["metallicFactor"] == 0.0
    assert material["pbrMetallicRoughness"]["roughnessFactor"] == 1.0

    loaded = trimesh.load(path, process=False)
    (geom,) = loaded.geometry.values()
    assert isinstance(geom.visual, trimesh.visual.texture.TextureVisuals)
    assert geom.visual.material.baseColorTexture.size == (256, 128)
    np.testing.assert_allclose(geom.vertices, mesh.vertices @ Z_UP_TO_Y_UP, atol=1e-6)  # (x, y, z) -> (x, z, -y)
    np.testing.assert_array_equal(geom.faces, mesh.faces)
    np.testing.assert_allclose(geom.visual.uv, np.c_[mesh.uvs[:, 0], 1.0 - mesh.uvs[:, 1]], atol=1e-7)
    # trimesh samples its flipped UVs at the texel our convention names: [row = v * H, col = u * W]
    texel = trimesh.visual.color.uv_to_color(geom.visual.uv, geom.visual.material.baseColorTexture)
    assert np.abs(texel[:, 0] - mesh.uvs[:, 0] * 256).max() <= 1.5  # trimesh scales by W - 1 and rounds
    assert np.abs(texel[:, 1] - mesh.uvs[:, 1] * 128).max() <= 1.5


def test_object_glb_without_texture_writes_linear_vertex_colours(tmp_path):
    v, f = _sphere(1)
    srgb = _colour(v)
    path = save_object_glb(tmp_path / "plain.glb", TexturedMesh(v, f, vertex_colors=srgb, name="plain"))
    doc, blob = _read_glb(path)
    _check_gltf(doc, blob)
    prim = doc["meshes"][0]["primitives"][0]
    assert "baseColorTexture" not in doc["materials"][0]["pbrMetallicRoughness"] and "TEXCOORD_0" not in prim
    colour = _accessor(doc, blob, prim["attributes"]["COLOR_0"])
    np.testing.assert_allclose(colour[:, 3], 1.0)
    np.testing.assert_allclose(
        colour[:, :3], np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4), atol=1e-6
    )
    (geom,) = trimesh.load(path, process=False).geometry.values()
    np.testing.assert_allclose(geom.vertices, v @ Z_UP_TO_Y_UP, atol=1e-6)


def _pose(angle: float, axis: int, scale: float, t) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(4)
    m[[i, i, j, j], [i, j, i, j]] = [c, -s, s, c]
    m[:3, :3] *= scale
    m[:3, 3] = t
    return m


def test_scene_glb_places_every_object_and_the_camera(tmp_path):
    ball = _textured_ball()
    v, f = _sphere(1)
    plain = TexturedMesh(v, f, vertex_colors=_colour(v), name="plain", metadata={"index": 1, "box": np.arange(4)})
    poses = {"ball": _pose(0.3, 1, 0.5, [0.2, -0.1, -2.0]), "plain": _pose(-1.1, 2, 0.25, [-0.5, 0.3, -3.0])}
    camera = {"yfov": 0.7, "aspectRatio": 1.5, "znear": 0.01, "zfar": 100.0}
    path = save_scene_glb(
        tmp_path / "scene.glb", [(ball, poses["ball"]), (plain, poses["plain"])], camera, extras={"image": "photo.jpg"}
    )

    doc, blob = _read_glb(path)
    _check_gltf(doc, blob)
    nodes = {n["name"]: n for n in doc["nodes"]}
    assert set(nodes) == {"ball", "plain", "camera"} and len(doc["scenes"][0]["nodes"]) == 3
    for name, pose in poses.items():
        np.testing.assert_allclose(np.array(nodes[name]["matrix"]).reshape(4, 4).T, pose)  # column-major
    assert nodes["plain"]["extras"] == {"index": 1, "box": [0, 1, 2, 3]} and nodes["ball"]["extras"] == {"score": 0.75}
    assert nodes["camera"] == {"name": "camera", "camera": 0}  # at the origin, identity transform
    assert doc["cameras"] == [{"name": "camera", "type": "perspective", "perspective": camera}]
    assert doc["scenes"][0]["extras"] == {"image": "photo.jpg"}
    # the mesh data is stored exactly as in the object GLB
    obj_doc, obj_blob = _read_glb(save_object_glb(tmp_path / "ball.glb", ball))
    for key in ("POSITION", "NORMAL", "TEXCOORD_0"):
        scene_acc = doc["meshes"][nodes["ball"]["mesh"]]["primitives"][0]["attributes"][key]
        obj_acc = obj_doc["meshes"][0]["primitives"][0]["attributes"][key]
        np.testing.assert_array_equal(_accessor(doc, blob, scene_acc), _accessor(obj_doc, obj_blob, obj_acc))

    scene = trimesh.load(path, process=False)
    for mesh in (ball, plain):
        transform, geometry = scene.graph[mesh.name]
        world = trimesh.transform_points(scene.geometry[geometry].vertices, transform)
        expected = (mesh.vertices @ Z_UP_TO_Y_UP) @ poses[mesh.name][:3, :3].T + poses[mesh.name][:3, 3]
        np.testing.assert_allclose(world, expected, atol=1e-5)
    assert scene.has_camera and np.degrees(0.7) == pytest.approx(scene.camera.fov[1], rel=1e-4)


def test_scene_glb_rejects_bad_matrices_names_and_cameras(tmp_path):
    v, f = _sphere(0)
    a, b = TexturedMesh(v, f, name="a"), TexturedMesh(v, f, name="a")
    shear = np.eye(4)
    shear[0, 1] = 0.5
    with pytest.raises(ValueError, match="node matrix has shear"):
        save_scene_glb(tmp_path / "s.glb", [(a, shear)])
    with pytest.raises(ValueError, match="must be unique"):
        save_scene_glb(tmp_path / "s.glb", [(a, np.eye(4)), (b, np.eye(4))])
    with pytest.raises(ValueError, match="yfov=4.0: expected radians"):
        save_scene_glb(tmp_path / "s.glb", [(a, np.eye(4))], {"yfov": 4.0, "znear": 0.1})
    with pytest.raises(ValueError, match="has a texture but no uvs"):
        save_object_glb(tmp_path / "o.glb", TexturedMesh(v, f, texture=np.zeros((4, 4, 3), np.uint8)))
    assert not (tmp_path / "s.glb").exists()


def test_glb_files_load_in_pygltflib(tmp_path):
    pygltflib = pytest.importorskip("pygltflib", reason="optional: pip install pygltflib for this extra check")
    v, f = _sphere(1)
    mesh = TexturedMesh(v, f, vertex_colors=_colour(v), name="plain")
    for path in (
        save_object_glb(tmp_path / "o.glb", mesh),
        save_scene_glb(tmp_path / "s.glb", [(mesh, np.eye(4))], {"yfov": 0.5, "znear": 0.1}),
    ):
        gltf = pygltflib.GLTF2().load(str(path))
        assert gltf.asset.version == "2.0" and len(gltf.meshes) == 1
        assert len(gltf.binary_blob()) == gltf.buffers[0].byteLength


def test_texture_png_is_encoded_once_per_content():
    """The GLB writers' PNG encodings are remembered by content: the same pixels (another array) give the same
    bytes without a second encoding; one changed pixel, or the same bytes in another shape, are encoded anew."""
    import io

    from PIL import Image

    from sam3d_core.export import gltf

    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    png = gltf.png_bytes(image)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), image)
    assert gltf.png_bytes(image.copy()) is png
    changed = image.copy()
    changed[3, 4, 2] ^= 1
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(gltf.png_bytes(changed)))), changed)
    reshaped = image.reshape(64, 48, 3)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(gltf.png_bytes(reshaped)))), reshaped)
