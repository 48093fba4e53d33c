"""The on-disk sample format: round trip, checks, atomic shards, refusal to write over a folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open

from sam3d_core.data.sample import VERSION, Sample, SampleDataset, SampleError, ShardWriter


def make_sample(i: int, rng=None, *, latents: bool = True) -> Sample:
    rng = rng or np.random.default_rng(i)
    photo = rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)
    mask = np.zeros((40, 52), bool)
    mask[10:30, 12:40] = True
    amodal = mask.copy()
    amodal[8:10, 12:40] = True
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    return Sample(
        sample_id=f"s{i}",
        photo=photo,
        mask=mask,
        amodal_mask=amodal,
        K=np.array([[50.0, 0, 26], [0, 50, 20], [0, 0, 1]]),
        rotation=q,
        translation=np.array([0.1, -0.2, 2.5]),
        scale=np.array([0.5, 0.5, 0.5]),
        occupancy=rng.integers(0, 64, (30, 3)),
        pointmap=rng.normal(size=(40, 52, 3)).astype(np.float32),
        ss_latent=rng.normal(size=(8, 16, 16, 16)).astype(np.float32) if latents else None,
        slat_coords=rng.integers(0, 64, (20, 3)) if latents else None,
        slat_feats=rng.normal(size=(20, 8)).astype(np.float32) if latents else None,
        surface_points=rng.uniform(-0.5, 0.5, (100, 3)).astype(np.float32),
        rejected={"ss_latent": rng.normal(size=(8, 16, 16, 16)).astype(np.float32), "rotation": np.eye(3)}
        if latents
        else None,
        source="test",
        licence="CC0-1.0",
        group="box",
        occlusion=0.1,
        provenance={"mesh": "cube.obj"},
    )


def test_round_trip_across_shards(tmp_path):
    samples = [make_sample(i, latents=i % 2 == 0) for i in range(5)]
    with ShardWriter(tmp_path / "ds", samples_per_shard=2, info={"builder": "test"}) as w:
        for s in samples:
            w.add(s)
    manifest = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert [sh["samples"] for sh in manifest["shards"]] == [2, 2, 1]
    assert manifest["licences"] == {"CC0-1.0": 5}
    ds = SampleDataset(tmp_path / "ds", verify=True)
    assert len(ds) == 5 and ds.ids() == [s.sample_id for s in samples]
    for want, got in zip(samples, (ds[i] for i in range(5)), strict=True):
        np.testing.assert_array_equal(got.photo, want.photo)  # PNG is lossless
        np.testing.assert_array_equal(got.mask, want.mask)
        np.testing.assert_array_equal(got.amodal_mask, want.amodal_mask)
        np.testing.assert_array_equal(got.occupancy, want.occupancy)
        np.testing.assert_allclose(got.rotation, want.rotation)
        np.testing.assert_array_equal(got.pointmap, want.pointmap)
        assert (got.ss_latent is None) == (want.ss_latent is None)
        if want.ss_latent is not None:
            np.testing.assert_array_equal(got.ss_latent, want.ss_latent)
            np.testing.assert_array_equal(got.slat_coords, want.slat_coords)
            np.testing.assert_array_equal(got.rejected["ss_latent"], want.rejected["ss_latent"])
            np.testing.assert_array_equal(got.rejected["rotation"], np.eye(3))
        np.testing.assert_array_equal(got.surface_points, want.surface_points)
        assert got.provenance == want.provenance and got.group == "box"


def test_writer_refuses_a_folder_with_files(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(SampleError, match="not empty"):
        ShardWriter(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_append_and_duplicate_ids(tmp_path):
    with ShardWriter(tmp_path / "ds") as w:
        w.add(make_sample(0))
    with ShardWriter(tmp_path / "ds", append=True) as w:
        with pytest.raises(SampleError, match="already in this dataset"):
            w.add(make_sample(0))
        w.add(make_sample(1))
    assert SampleDataset(tmp_path / "ds").ids() == ["s0", "s1"]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("mask", np.zeros((40, 52), bool), "visible mask is empty"),
        ("rotation", np.diag([1.0, 1.0, -1.0]), "not a proper rotation"),
        ("scale", np.array([0.5, -1.0, 0.5]), "must be positive"),
        ("occupancy", np.array([[0, 0, 64]]), "0..63"),
        ("K", np.eye(2), r"expected \(3, 3\)"),
        ("pointmap", np.full((40, 52, 3), np.inf, np.float32), "pointmap: holds infinite values"),
        ("surface_points", np.full((5, 3), np.nan, np.float32), "surface_points: holds NaN or infinite values"),
    ],
)
def test_bad_samples_are_named(tmp_path, field, value, message):
    s = make_sample(0)
    setattr(s, field, value)
    with pytest.raises(SampleError, match=message):
        s.check()


def test_truncated_shard_is_reported(tmp_path):
    with ShardWriter(tmp_path / "ds") as w:
        w.add(make_sample(0))
    shard = tmp_path / "ds" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(SampleError, match="missing or truncated"):
        SampleDataset(tmp_path / "ds")
    with pytest.raises(SampleError, match="has no dataset.json"):
        SampleDataset(tmp_path)


def test_samples_sharing_an_array_are_written(tmp_path):
    a, b = make_sample(0), make_sample(1)
    b.occupancy = a.occupancy  # one array in two samples: each gets its own copy on disk
    b.pointmap = a.pointmap
    with ShardWriter(tmp_path / "ds") as w:
        w.add(a)
        w.add(b)
    ds = SampleDataset(tmp_path / "ds")
    np.testing.assert_array_equal(ds[1].occupancy, a.occupancy)


def _ray_pointmap(h: int, w: int, K: np.ndarray, rng) -> np.ndarray:
    """A point map on the pixel rays of K (as a renderer's), written out by hand: pixel (i, j) centre
    (j + 0.5, i + 0.5), OpenCV x = (u - cx) z / fx, y = (v - cy) z / fy, then PyTorch3D (-x, -y, z); NaN on a
    third of the pixels (no surface)."""
    z = rng.uniform(1.0, 3.0, (h, w))
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    pm = np.stack([-(u - K[0, 2]) * z / K[0, 0], -(v - K[1, 2]) * z / K[1, 1], z], axis=-1).astype(np.float32)
    pm[rng.random((h, w)) < 1 / 3] = np.nan
    return pm


def _keys(folder) -> list[str]:
    with safe_open(str(folder / "shard-00000.safetensors"), framework="pt") as f:
        return sorted(k for k in f.keys() if k.startswith("0/pointmap"))


def test_a_point_map_on_the_pixel_rays_is_stored_as_depths(tmp_path):
    s = make_sample(0, latents=False)
    s.K = np.array([[61.0, 0, 23.5], [0, 57.0, 21.0], [0, 0, 1]])  # off-centre, fx != fy
    s.pointmap = _ray_pointmap(40, 52, s.K, np.random.default_rng(1))
    raw = make_sample(1, latents=False)
    raw.pointmap = s.pointmap.copy()
    raw.pointmap[5, 7, 0] += 0.01  # one point off its ray: the point map is kept as it is
    zeros = make_sample(2, latents=False)
    zeros.K = s.K
    zeros.pointmap = np.nan_to_num(s.pointmap, nan=0.0)  # the renderer's own 0 = no surface: not a ray point
    for name, sample in (("rays", s), ("raw", raw), ("zeros", zeros)):
        with ShardWriter(tmp_path / name) as w:
            w.add(sample)
    assert _keys(tmp_path / "rays") == ["0/pointmap_valid_png", "0/pointmap_z"]
    assert _keys(tmp_path / "raw") == _keys(tmp_path / "zeros") == ["0/pointmap"]
    got = SampleDataset(tmp_path / "rays")[0].pointmap
    assert got.dtype == np.float32 and got.shape == (40, 52, 3)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(s.pointmap))  # no surface stays NaN, all 3 coordinates
    np.testing.assert_allclose(got, s.pointmap, rtol=1e-6, atol=1e-6)
    # the depth form holds a third of the bytes of the raw one here (1 value per valid pixel + a PNG)
    sizes = {n: (tmp_path / n / "shard-00000.safetensors").stat().st_size for n in ("rays", "raw")}
    assert sizes["raw"] - sizes["rays"] > 40 * 52 * 3 * 4 * 0.6
    for name, sample in (("raw", raw), ("zeros", zeros)):
        np.testing.assert_array_equal(SampleDataset(tmp_path / name)[0].pointmap, sample.pointmap)  # exact


def test_version_1_folders_read_and_newer_ones_are_refused(tmp_path):
    with ShardWriter(tmp_path / "ds") as w:
        w.add(make_sample(0))
    manifest_path = tmp_path / "ds" / "dataset.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["version"] == VERSION == 2
    manifest_path.write_text(json.dumps(dict(manifest, version=1)))  # a version-1 folder: same keys, still read
    np.testing.assert_array_equal(SampleDataset(tmp_path / "ds")[0].pointmap, make_sample(0).pointmap)
    manifest_path.write_text(json.dumps(dict(manifest, version=3)))
    with pytest.raises(SampleError, match=r"has format version 3; this sam3d reads versions \(1, 2\)"):
        SampleDataset(tmp_path / "ds")
