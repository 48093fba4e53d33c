"""Source (c): the add-on's preference log -> DPO pairs; the latents files come from `Pipeline.export`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sam3d_core.cli.reconstruct import EXAMPLE_MASK, EXAMPLE_PHOTO
from sam3d_core.data.preferences import build_preferences, latents_path, read_latents
from sam3d_core.data.sample import SampleDataset
from sam3d_core.pipeline.reconstruct import Pipeline, save_latents

trimesh = pytest.importorskip("trimesh")
K = np.array([[600.0, 0.0, 320.0], [0.0, 600.0, 240.0], [0.0, 0.0, 1.0]])


@pytest.fixture
def exports(tmp_path):
    """Three candidates as the export leaves them: NAME.glb and NAME_latents.safetensors (`save_latents`)."""
    meshes = []
    for seed in (1, 2, 3):
        rng = np.random.default_rng(seed)
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        trimesh.creation.icosphere(subdivisions=1).export(folder / "cup.glb")
        n = 20 + seed
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        latents = {
            "ss_latent": rng.normal(size=(8, 16, 16, 16)),
            "rotation": q * np.sign(np.linalg.det(q)),
            "translation": [0.1 * seed, 0.0, 2.0],
            "scale": [0.5, 0.5, 0.5],
            "slat_coords": rng.integers(0, 64, (n, 3)),
            "slat_feats": rng.normal(size=(n, 8)),
        }
        save_latents(folder / "cup_latents.safetensors", latents, K)
        meshes.append(folder / "cup.glb")
    return tmp_path, meshes


@pytest.mark.slow
def test_export_writes_the_latents_a_pair_needs(tmp_path):
    pipe, _ = Pipeline.load("tiny", "cpu", max_voxels=150)
    ctx = pipe.open_photo(EXAMPLE_PHOTO)
    mask = pipe.load_mask(ctx, EXAMPLE_MASK)
    [res] = pipe.reconstruct(ctx, [mask], names=["cup"], seed=1, steps=2, texture_size=64, faces=300)
    scene = pipe.export(ctx, [res], tmp_path, latents=True)
    assert scene["objects"][0]["latents"] == "cup_latents.safetensors"
    arrays, k = read_latents(latents_path(tmp_path / "cup.glb"))
    assert arrays["ss_latent"].shape == (8, 16, 16, 16) and arrays["rotation"].shape == (3, 3)
    assert arrays["slat_coords"].shape[1] == 3 and arrays["slat_feats"].shape == (len(arrays["slat_coords"]), 8)
    assert np.array_equal(arrays["slat_coords"], res.voxels) and np.allclose(k, ctx.K)
    assert arrays["translation"] == pytest.approx(scene["objects"][0]["pose"]["translation"])


def cand(seed, mesh):
    return {"seed": seed, "settings": {"steps": 2}, "mesh": str(mesh)}


def record(chosen, rejected, photo=str(EXAMPLE_PHOTO), mask=str(EXAMPLE_MASK)):
    return {
        "version": 1,
        "time": "2026-01-01T00:00:00Z",
        "kind": "best_of_n",
        "photo": photo,
        "mask": mask,
        "weights": "random:0",
        "model": "tiny",
        "chosen": chosen,
        "rejected": rejected,
    }


def test_log_becomes_pairs_and_bad_lines_are_counted(exports, tmp_path):
    root, (m1, m2, m3) = exports
    gone = root / "seed3" / "gone.glb"  # a pick whose file was deleted
    lines = [
        json.dumps(record(cand(1, m1), [cand(2, m2), cand(3, m3)])),  # 2 pairs
        json.dumps(record(cand(2, m2), [cand(9, gone)])),  # rejected file gone
        json.dumps(record(None, [cand(1, m1)])),  # everything rejected: no pair
        json.dumps(record(cand(1, m1), [cand(2, m2)], mask=str(tmp_path / "deleted_mask.png"))),
        json.dumps({"version": 7, "kind": "best_of_n"}),
        json.dumps(record(cand(3, m3), [cand(1, m1)]))[:57],  # torn last line
    ]
    log = tmp_path / "preferences.jsonl"
    log.write_text("\n".join(lines) + "\n")
    report = build_preferences(log, tmp_path / "out")
    assert report.written == 2
    assert report.skipped == {
        "files gone": 2,
        "no chosen candidate": 1,
        "unknown record version": 1,
        "torn log line": 1,
    }
    ds = SampleDataset(tmp_path / "out", verify=True)
    assert ds.ids() == ["line1-0", "line1-1"]
    chosen, _ = read_latents(latents_path(m1))
    for i, other in enumerate((m2, m3)):
        s = ds[i]
        rejected, _ = read_latents(latents_path(other))
        assert np.array_equal(s.ss_latent, chosen["ss_latent"]) and np.allclose(s.rotation, chosen["rotation"])
        assert np.array_equal(s.occupancy, chosen["slat_coords"])
        assert set(s.rejected) == {"ss_latent", "rotation", "translation", "scale", "slat_coords", "slat_feats"}
        assert np.array_equal(s.rejected["ss_latent"], rejected["ss_latent"])
        assert np.array_equal(s.rejected["slat_coords"], rejected["slat_coords"])
        assert s.provenance["rejected"]["mesh"] == str(other) and s.source == "preference"
        assert np.allclose(s.K, K) and s.mask.shape == s.photo.shape[:2]
