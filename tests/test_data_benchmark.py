"""The render-paste benchmark: the committed manifest and samples, the catalogue reader, a reproducible build."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageFilter
from scipy.spatial import cKDTree

from sam3d_core.data.benchmark import (
    SOURCES,
    build_benchmark,
    extract_piece,
    load_manifest,
    load_piece,
    occlusion_level,
    parse_properties,
    read_catalogue,
)
from sam3d_core.data.heldout import default_manifest, encode_fingerprint, fingerprint
from sam3d_core.data.meshio import file_sha256
from sam3d_core.data.sample import SampleDataset
from sam3d_core.data.voxelize import voxelize
from sam3d_core.geometry import frames

trimesh = pytest.importorskip("trimesh")
SAMPLES = default_manifest().parent / "samples"


def test_committed_manifest_is_small_complete_and_attributed():
    m = load_manifest()
    assert default_manifest().stat().st_size < 100_000
    names = [o["name"] for o in m["objects"]]
    assert len(names) == 40 and len(set(names)) == 40
    assert len({o["group"] for o in m["objects"]}) >= 8
    for e in m["objects"] + m["occluders"] + m["backgrounds"] + m["hdrs"]:
        assert e["licence"] and e["attribution"] and len(e["sha256"]) == 64, e["name"]
    for o in m["objects"]:
        assert 10 <= max(o["size_cm"]) <= 150 and o["licence"] in ("CC0-1.0", "CC-BY-3.0", "CC-BY-3.0-US")
    assert all(o["source"] == "sweethome3d-furniture" for o in m["objects"])
    assert m["sources"] == SOURCES


def test_committed_samples_are_exact_and_small():
    total = sum(p.stat().st_size for p in SAMPLES.iterdir())
    assert total < 2_000_000
    m = load_manifest()
    by_name = {o["name"]: o for o in m["objects"]}
    ds = SampleDataset(SAMPLES, verify=True)
    assert len(ds) >= 3
    for i in range(len(ds)):
        s = ds[i]
        o = by_name[s.provenance["object"]]
        assert s.source == "benchmark" and s.licence == o["licence"] and s.group == o["group"]
        assert s.scale == pytest.approx([max(o["size_cm"]) / 100] * 3)
        assert not (s.mask & ~s.amodal_mask).any()  # exact masks: the visible part lies inside the amodal one
        assert s.occlusion == pytest.approx(1 - s.mask.sum() / s.amodal_mask.sum(), abs=1e-4)
        assert s.provenance["occlusion_level"] == occlusion_level(s.occlusion)
        # the surface points, posed, land on the amodal mask
        uv = frames.project_points((s.surface_points.astype(np.float64) * s.scale) @ s.rotation + s.translation, s.K)
        h, w = s.mask.shape
        inside = (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
        px = np.floor(uv[inside]).astype(int)
        grown = np.asarray(Image.fromarray(s.amodal_mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))) > 0
        assert grown[px[:, 1], px[:, 0]].mean() > 0.99
        assert s.surface_points.shape == (m["surface_points"], 3) and len(s.occupancy) > 100
        # the point map: the nearest surface per pixel, NaN where none (all three coordinates at once)
        valid = np.isfinite(s.pointmap).all(-1)
        assert np.isnan(s.pointmap[~valid]).all() and valid[s.mask].all() and (~valid).sum() > h * w / 2
        if s.provenance["mode"] == "alone":  # no occluder: the surface is the object's, exactly where it shows
            np.testing.assert_array_equal(valid, s.mask)
        # the visible pixels' points, taken back into the local frame, lie on the object's surface
        local = ((s.pointmap[s.mask].astype(np.float64) - s.translation) @ s.rotation.T) / s.scale
        gap = cKDTree(s.surface_points).query(local)[0]
        assert np.median(gap) < 0.01 and np.quantile(gap, 0.99) < 0.03, (s.sample_id, np.quantile(gap, [0.5, 0.99]))


def test_properties_reader_handles_escapes_and_continuations():
    text = "# comment\nname#1=Bill 10\\u20ac\nmodel#1=/a/b.obj\ntags#1=one, \\\n    two\nkey\\:x=v\n"
    assert parse_properties(text) == {
        "name#1": "Bill 10\u20ac",
        "model#1": "/a/b.obj",
        "tags#1": "one, two",
        "key:x": "v",
    }


def fake_sources(root, rotated: bool = True):
    """A cache laid out as fetch_source leaves it: one catalogue with two boxes, occluders, photos."""
    furn = root / f"sweethome3d-furniture_{SOURCES['sweethome3d-furniture']['version']}"
    lib = furn / "usr/share/sweethome3d/furniture"
    lib.mkdir(parents=True)
    (furn / ".complete").write_text("x")
    props = [
        "id#1=T#chair\nname#1=Kitchen chair\ncategory#1=Kitchen\nmodel#1=/t/chair/chair.obj\n"
        "width#1=40\ndepth#1=50\nheight#1=90\ncreator#1=Me\ndoorOrWindow#1=false\n",
        "id#2=T#lamp\nname#2=Desk lamp\ntags#2=light\ncategory#2=Lights\nmodel#2=/t/lamp/lamp.obj\n"
        "width#2=20\ndepth#2=20\nheight#2=50\ncreator#2=You\ndoorOrWindow#2=false\n"
        + ("modelRotation#2=1 0 0 0 0 1 0 -1 0\n" if rotated else ""),
    ]
    with zipfile.ZipFile(lib / "Test.sh3f", "w") as z:
        z.writestr("PluginFurnitureCatalog.properties", "\n".join(props))
        z.writestr("t/chair/chair.obj", trimesh.creation.box((40, 90, 50)).export(file_type="obj"))
        # the lamp is stored z-up (its modelRotation turns it y-up): 20 x 20 footprint, 50 high along z
        z.writestr("t/lamp/lamp.obj", trimesh.creation.box((20, 20, 50)).export(file_type="obj"))
    pyb = root / f"pybullet_{SOURCES['pybullet']['version']}"
    (pyb / "occ").mkdir(parents=True)
    (pyb / ".complete").write_text("x")
    trimesh.creation.icosphere(subdivisions=1).export(pyb / "occ" / "ball.obj")
    sk = root / f"scikit-image_{SOURCES['scikit-image']['version']}"
    (sk / "img").mkdir(parents=True)
    (sk / ".complete").write_text("x")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(sk / "img" / "p.png")
    return furn, pyb, sk


def test_catalogue_pieces_are_read_rotated_and_sized(tmp_path):
    furn, _, _ = fake_sources(tmp_path)
    pieces = read_catalogue(furn / "usr/share/sweethome3d/furniture/Test.sh3f")
    assert [(p.name, p.group, p.size_cm) for p in pieces] == [
        ("Kitchen chair", "chair", (40.0, 50.0, 90.0)),
        ("Desk lamp", "lamp", (20.0, 20.0, 50.0)),
    ]
    for p in pieces:
        obj = extract_piece(furn / "usr/share/sweethome3d/furniture/Test.sh3f", p.model, tmp_path / "x")
        asset = load_piece(obj, p.model_rotation)
        extent = asset.vertices.max(0) - asset.vertices.min(0)
        w, d, h = p.size_cm  # local frame: x = width, y = depth, z = height (up)
        assert extent * asset.size == pytest.approx([w, d, h], abs=1e-6), p.name


def test_build_is_reproducible_from_the_manifest(tmp_path):
    furn, pyb, sk = fake_sources(tmp_path / "cache")
    sh3f = furn / "usr/share/sweethome3d/furniture/Test.sh3f"
    objects = []
    for piece in read_catalogue(sh3f):
        obj = extract_piece(sh3f, piece.model, tmp_path / "x")
        asset = load_piece(obj, piece.model_rotation)
        occ = fingerprint(voxelize(asset.vertices, asset.faces))
        objects.append(
            {
                "name": f"Test/{piece.name}",
                "title": piece.name,
                "source": "sweethome3d-furniture",
                "catalogue": "usr/share/sweethome3d/furniture/Test.sh3f",
                "member": piece.model,
                "sha256": file_sha256(obj),
                "group": piece.group,
                "category": piece.category,
                "size_cm": list(piece.size_cm),
                "model_rotation": piece.model_rotation,
                "licence": "CC0-1.0",
                "attribution": piece.creator,
                "fingerprint": encode_fingerprint(occ),
            }
        )
    manifest = {
        "format": "sam3d-benchmark",
        "version": 1,
        "name": "test",
        "seed": 5,
        "image_size": [96, 80],
        "view_modes": ["alone", "occluded", "occluder"],
        "surface_points": 256,
        "sources": SOURCES,
        "objects": objects,
        "occluders": [
            {
                "name": "ball",
                "source": "pybullet",
                "member": "occ/ball.obj",
                "sha256": file_sha256(pyb / "occ" / "ball.obj"),
            }
        ],
        "backgrounds": [
            {
                "name": "p",
                "source": "scikit-image",
                "member": "img/p.png",
                "sha256": file_sha256(sk / "img" / "p.png"),
                "licence": "CC0-1.0",
                "attribution": "x",
            }
        ],
        "hdrs": [],
    }
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    reports = [build_benchmark(tmp_path / f"out{i}", manifest=path, cache=tmp_path / "cache") for i in (1, 2)]
    assert [r.written for r in reports] == [6, 6]
    # Same seeds -> the same samples (compared decoded: safetensors orders the metadata keys at random).
    ds, again = SampleDataset(tmp_path / "out1"), SampleDataset(tmp_path / "out2")
    assert list(ds.records()) == list(again.records())
    for i in range(len(ds)):
        x, y = ds[i], again[i]
        for f in ("photo", "mask", "amodal_mask", "occupancy", "surface_points", "pointmap"):
            assert np.array_equal(getattr(x, f), getattr(y, f), equal_nan=True), f
        # the stored point map is exact: on the visible pixels it lies on the box, to float precision (local
        # frame: the box spans +-half of its extents, and a surface point has one coordinate at +-half)
        local = ((x.pointmap[x.mask].astype(np.float64) - x.translation) @ x.rotation.T) / x.scale
        half = np.abs(x.surface_points).max(0)
        assert np.abs((np.abs(local) / half).max(1) - 1).max() < 1e-3, x.sample_id
        no_surface = ~np.isfinite(x.pointmap).all(-1)
        assert no_surface.any() and np.isnan(x.pointmap[no_surface]).all()  # NaN (not inf, not 0) on the photo
        if x.provenance["mode"] == "alone":
            np.testing.assert_array_equal(np.isfinite(x.pointmap).all(-1), x.mask)
    assert sorted({r["group"] for r in ds.records()}) == ["chair", "lamp"]
    assert {r["provenance"]["requested_mode"] for r in ds.records()} == {"alone", "occluded", "occluder"}
    # a changed source file is refused with a clear message, not rendered
    bad = dict(manifest, objects=[dict(objects[0], sha256="0" * 64)])
    path.write_text(json.dumps(bad))
    report = build_benchmark(tmp_path / "out3", manifest=path, cache=tmp_path / "cache")
    assert report.written == 0 and report.skipped == {"object unusable": 1}
    assert "differs from the manifest's sha256" in report.messages[0]
