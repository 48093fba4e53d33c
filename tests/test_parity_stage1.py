"""Whole stage 1 against the official implementation: photo + mask + point map -> latents, voxels, pose.

The fixture (tests/fixtures/stage1_small, see its meta.json) was made by running the official code with
random weights at a reduced size. Here its official-layout folder goes through `sam3d weights import`
and our pipeline runs on the same raw inputs with the same seed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sam3d_core.pipeline.stage1 import Stage1Pipeline
from sam3d_core.weights import hub

FIXTURE = Path(__file__).parent / "fixtures" / "stage1_small"
SEED = 42  # meta.json: torch.manual_seed(42) before sample_sparse_structure


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> Stage1Pipeline:
    root = tmp_path_factory.mktemp("models")
    hub.import_official(FIXTURE / "official", name="fixture", root=root)
    return Stage1Pipeline.from_pretrained(str(root / "fixture"), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def data() -> dict:
    return load_file(FIXTURE / "data.safetensors")


def _coords(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32)  # stored as uint8 to keep the fixture small (values 0..63)


@pytest.mark.slow
def test_default_mode_matches_official(pipe, data):
    out = pipe(data["input/rgb"].numpy(), data["input/mask"].numpy() > 0, data["input/pointmap"].numpy(), seed=SEED)
    for name, value in out.latents.items():
        ref = data[f"sample/final/{name}"]
        torch.testing.assert_close(value, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()), msg=name)
    torch.testing.assert_close(out.coords_original, _coords(data["sample/coords_original"]), rtol=0, atol=0)
    torch.testing.assert_close(out.coords, _coords(data["sample/coords"]), rtol=0, atol=0)
    assert out.downsample_factor == 1
    torch.testing.assert_close(out.pose.translation, data["pose/translation"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.pose.quaternion, data["pose/rotation"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.pose.scale, data["pose/scale"], rtol=1e-4, atol=1e-5)


def test_shortcut_mode_matches_official(pipe, data):
    out = pipe(
        data["input/rgb"].numpy(),
        data["input/mask"].numpy() > 0,
        data["input/pointmap"].numpy(),
        seed=SEED,
        shortcut=True,
        steps=4,
    )
    for name, value in out.latents.items():
        ref = data[f"shortcut/final/{name}"]
        torch.testing.assert_close(value, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()), msg=name)
    torch.testing.assert_close(out.pose.translation, data["shortcut/pose/translation"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.pose.quaternion, data["shortcut/pose/rotation"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.pose.scale, data["shortcut/pose/scale"], rtol=1e-4, atol=1e-5)
