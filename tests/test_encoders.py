"""The VAE encoders: parity with the official classes (fixture), official key tables, shapes, determinism.
(Round trips through the decoder: tests/test_encoders_fit.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sam3d_core.config import SLatEncoderConfig, SSEncoderConfig
from sam3d_core.models.slat_vae import SLatEncoder, SLatGaussianDecoder
from sam3d_core.models.ss_vae import SSDecoder, SSEncoder, occupancy_grid
from sam3d_core.models.stages import init_random_weights
from sam3d_core.registry import encoder_preset, stage1_preset, stage2_preset

FIXTURE = Path(__file__).parent / "fixtures" / "encoders_small"


@pytest.fixture(scope="module")
def fixture() -> tuple[dict, dict]:
    return load_file(str(FIXTURE / "data.safetensors")), json.loads((FIXTURE / "meta.json").read_text())


def _weights(data: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}


def test_ss_encoder_reproduces_the_official_class(fixture):
    data, meta = fixture
    args = meta["ss"]["args"]
    cfg = SSEncoderConfig(
        in_channels=args["in_channels"],
        latent_channels=args["latent_channels"],
        channels=tuple(args["channels"]),
        num_res_blocks=args["num_res_blocks"],
        num_res_blocks_middle=args["num_res_blocks_middle"],
    )
    enc = SSEncoder(cfg)
    enc.load_state_dict(_weights(data, "ss/weights/"), strict=True)
    with torch.no_grad():
        mean, logvar = enc(occupancy_grid(data["ss/input_coords"].long(), meta["ss"]["grid"]))
    assert mean.shape == logvar.shape == (1, 8, 8, 8, 8)
    torch.testing.assert_close(mean, data["ss/mean"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar, data["ss/logvar"], rtol=1e-5, atol=1e-5)


def test_slat_encoder_reproduces_the_official_class(fixture):
    data, meta = fixture
    a = meta["slat"]["args"]
    cfg = SLatEncoderConfig(
        resolution=a["resolution"],
        in_channels=a["in_channels"],
        model_channels=a["model_channels"],
        latent_channels=a["latent_channels"],
        num_blocks=a["num_blocks"],
        num_heads=a["num_heads"],
        mlp_ratio=float(a["mlp_ratio"]),
        window_size=a["window_size"],
    )
    enc = SLatEncoder(cfg)
    enc.load_state_dict(_weights(data, "slat/weights/"), strict=True)
    coords = data["slat/coords"].int()
    assert set(coords[:, 0].tolist()) == {0, 1}  # two objects in one batch: windows must not mix them
    with torch.no_grad():
        mean, logvar = enc(data["slat/feats"], coords)
    torch.testing.assert_close(mean, data["slat/mean"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logvar, data["slat/logvar"], rtol=1e-4, atol=1e-4)


def test_official_ss_encoder_keys_mirror_the_decoder():
    with torch.device("meta"):
        enc = SSEncoder(encoder_preset("official").ss_encoder)
        dec = SSDecoder(stage1_preset("official").decoder)
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert len(shapes) == len(dec.state_dict()) == 74
    assert shapes["input_layer.weight"] == (32, 1, 3, 3, 3)
    assert shapes["blocks.2.conv.weight"] == (128, 32, 2, 2, 2)  # stride-2 downsampling between levels
    assert shapes["blocks.5.conv.weight"] == (512, 128, 2, 2, 2)
    assert shapes["middle_block.1.conv2.weight"] == (512, 512, 3, 3, 3)
    assert shapes["out_layer.0.weight"] == (512,)
    assert shapes["out_layer.2.weight"] == (16, 512, 3, 3, 3)  # mean + logvar


def test_official_slat_encoder_keys():
    with torch.device("meta"):
        enc = SLatEncoder(encoder_preset("official").slat_encoder)
        dec = SLatGaussianDecoder(stage2_preset("official").gaussian)
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert len(shapes) == 2 + 12 * 8 + 2
    assert shapes["input_layer.weight"] == (768, 1024)
    assert shapes["out_layer.weight"] == (16, 768)
    # the transformer blocks are the decoders' own (shared class): identical keys and shapes
    blocks = {k: v for k, v in shapes.items() if k.startswith("blocks.")}
    assert blocks == {k: tuple(v.shape) for k, v in dec.state_dict().items() if k.startswith("blocks.")}


def test_ss_encoder_shapes_and_determinism():
    cfg = encoder_preset("tiny").ss_encoder
    enc = init_random_weights(SSEncoder(cfg), seed=3)
    coords = torch.tensor([[10, 20, 30], [11, 20, 30], [40, 41, 42]])
    x = occupancy_grid(coords)
    assert x.shape == (1, 1, 64, 64, 64) and int(x.sum()) == 3
    with torch.no_grad():
        m1, lv1 = enc(x)
        again, _ = init_random_weights(SSEncoder(cfg), seed=3)(x)  # same seed, new module: same latent
    assert m1.shape == lv1.shape == (1, 8, 16, 16, 16)
    assert m1.dtype == torch.float32 and torch.isfinite(m1).all()
    assert torch.equal(m1, again)
    with pytest.raises(ValueError, match="expected integer voxel indices"):
        occupancy_grid(coords.float())
    with pytest.raises(ValueError, match=r"0\.\.63"):
        occupancy_grid(torch.tensor([[0, 0, 64]]))
    with pytest.raises(ValueError, match="multiple of 4"):
        enc(torch.zeros(1, 1, 30, 30, 30))


def test_slat_encoder_shapes_determinism_and_locality():
    cfg = encoder_preset("tiny").slat_encoder
    enc = init_random_weights(SLatEncoder(cfg), seed=4)
    g = torch.Generator().manual_seed(0)
    xyz = torch.unique(torch.randint(26, 38, (80, 3), generator=g), dim=0)  # a few windows, shifted or not
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1)
    feats = torch.randn(len(xyz), cfg.in_channels, generator=g)
    with torch.no_grad():
        mean, logvar = enc(feats, coords)
        mean2, _ = enc(feats, coords)
        # a second object in the batch does not change the first one's latents
        both, _ = enc(torch.cat([feats, feats]), torch.cat([coords, coords + torch.tensor([1, 0, 0, 0])]))
    assert mean.shape == logvar.shape == (len(xyz), 8)
    assert torch.isfinite(mean).all() and torch.equal(mean, mean2)
    torch.testing.assert_close(both[: len(xyz)], mean, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=f"feats must be \\[N, {cfg.in_channels}\\]"):
        enc(feats[:, :3], coords)
