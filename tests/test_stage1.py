"""Stage 1 end to end at the tiny preset: photo + mask + point map -> voxels + pose, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sam3d_core.cli.main import main
from sam3d_core.cli.reconstruct import EXAMPLE_MASK, EXAMPLE_PHOTO
from sam3d_core.inputs.camera import fallback_pointmap
from sam3d_core.inputs.imageio import load_mask, load_photo
from sam3d_core.pipeline.stage1 import Stage1Model, Stage1Pipeline
from sam3d_core.registry import stage1_preset


@pytest.fixture(scope="module")
def pipe() -> Stage1Pipeline:
    return Stage1Pipeline.from_random(stage1_preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def example():
    photo = load_photo(EXAMPLE_PHOTO)
    image, mask = photo.rgb, load_mask(EXAMPLE_MASK, photo)
    pointmap, K = fallback_pointmap(*image.shape[:2])
    return image, mask, pointmap


def test_official_model_tensor_counts_match_the_release():
    with torch.device("meta"):
        model = Stage1Model(stage1_preset("official"))
    sd = model.state_dict()
    count = lambda prefix: sum(k.startswith(prefix) for k in sd)  # noqa: E731
    assert count("condition_embedder.") == 722
    assert count("generator.") == 945
    assert count("decoder.") == 74
    n = lambda prefix: sum(v.numel() for k, v in sd.items() if k.startswith(prefix))  # noqa: E731
    assert abs(n("condition_embedder.") + n("generator.") - 1.599e9) < 0.005e9  # measured_facts.md


def test_photo_and_mask_to_voxels_and_pose(pipe, example):
    out = pipe(*example, seed=3, steps=2)
    coords = out.coords
    assert coords.dtype == torch.int32 and coords.shape[1] == 4 and len(coords) > 0
    assert int(coords[:, 1:].min()) >= 0 and int(coords[:, 1:].max()) < 64
    assert len(coords) <= pipe.cfg.max_voxels
    R = out.pose.rotation[0]
    torch.testing.assert_close(R @ R.T, torch.eye(3), atol=1e-5, rtol=0)
    assert torch.det(R) > 0
    assert torch.all(out.pose.scale > 0)
    assert out.settings["seed"] == 3 and out.settings["steps"] == 2 and out.settings["weights"] == "random:0"


def test_same_seed_same_result_other_seed_other_result(pipe, example):
    a = pipe(*example, seed=5, steps=2)
    b = pipe(*example, seed=5, steps=2)
    c = pipe(*example, seed=6, steps=2)
    torch.testing.assert_close(a.latents["shape"], b.latents["shape"], rtol=0, atol=0)
    assert not torch.allclose(a.latents["shape"], c.latents["shape"])


def test_shortcut_mode_runs_without_guidance(pipe, example):
    out = pipe(*example, seed=1, shortcut=True)
    assert out.settings["mode"] == "shortcut" and out.settings["cfg_strength"] == 0.0
    assert out.settings["steps"] == pipe.cfg.sampler.shortcut_steps


def test_encode_once_sample_many(pipe, example):
    inputs = pipe.prepare(*example)
    cond = pipe.encode(inputs)
    assert cond.shape == (1, pipe.cfg.condition.num_tokens, pipe.cfg.flow.cond_channels)
    r1 = pipe.sample(inputs, cond, seed=1, steps=2)
    r2 = pipe(*example, seed=1, steps=2)
    torch.testing.assert_close(r1.latents["scale"], r2.latents["scale"], rtol=0, atol=0)


def test_empty_mask_is_a_clear_error(pipe, example):
    image, mask, pointmap = example
    with pytest.raises(ValueError, match="mask: got an empty mask"):
        pipe(image, np.zeros_like(mask), pointmap, steps=1)


def test_cli_stage1_writes_a_placed_glb_and_json(tmp_path, monkeypatch):
    trimesh = pytest.importorskip("trimesh")
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    out = tmp_path / "out"
    rc = main(
        [
            "stage1",
            str(EXAMPLE_PHOTO),
            "--mask",
            str(EXAMPLE_MASK),
            "--steps",
            "2",
            "--model",
            "tiny",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    scene = json.loads((out / "scene.json").read_text())
    obj = scene["objects"][0]
    assert "tiny random-weight" in scene["model"]
    mesh = trimesh.load(out / obj["glb"], force="mesh")
    assert len(mesh.faces) > 0
    # The mesh sits in front of the glTF camera (looking down -z), around the predicted translation.
    t = np.array(obj["translation"]) * np.array([-1.0, 1.0, -1.0])
    assert np.linalg.norm(mesh.vertices.mean(0) - t) < 2.0 * max(obj["scale"])


def test_cli_reports_missing_photo(tmp_path, capsys):
    rc = main(["stage1", str(tmp_path / "nope.png"), "--mask", str(EXAMPLE_MASK), "--model", "tiny"])
    assert rc == 2 and "nope.png does not exist" in capsys.readouterr().err
