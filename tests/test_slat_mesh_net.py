"""SLAT mesh decoder network (up to the FlexiCubes input): official key table, subdivision, fixture parity."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sam3d_core.models.slat_vae import MESH_FEATS_CHANNELS, SLatMeshDecoder, SparseConv3d, subdivide
from sam3d_core.registry import stage2_preset

FIXTURE = Path(__file__).parent / "fixtures" / "stage2_small"


def _official_table(c: int = 768, blocks: int = 12) -> dict[str, tuple[int, ...]]:
    """slat_decoder_mesh.ckpt keys and shapes, written out from spec section 4.10."""
    table = {"input_layer.weight": (c, 8), "input_layer.bias": (c,)}
    for i in range(blocks):
        p = f"blocks.{i}"
        table |= {f"{p}.attn.to_qkv.weight": (3 * c, c), f"{p}.attn.to_qkv.bias": (3 * c,)}
        table |= {f"{p}.attn.to_out.weight": (c, c), f"{p}.attn.to_out.bias": (c,)}
        table |= {f"{p}.mlp.mlp.0.weight": (4 * c, c), f"{p}.mlp.mlp.0.bias": (4 * c,)}
        table |= {f"{p}.mlp.mlp.2.weight": (c, 4 * c), f"{p}.mlp.mlp.2.bias": (c,)}
    for i, (cin, cout) in enumerate(((c, c // 4), (c // 4, c // 8))):
        p = f"upsample.{i}"
        table |= {f"{p}.act_layers.0.weight": (cin,), f"{p}.act_layers.0.bias": (cin,)}
        table |= {f"{p}.out_layers.0.conv.weight": (cout, 3, 3, 3, cin), f"{p}.out_layers.0.conv.bias": (cout,)}
        table |= {f"{p}.out_layers.1.weight": (cout,), f"{p}.out_layers.1.bias": (cout,)}
        table |= {f"{p}.out_layers.3.conv.weight": (cout, 3, 3, 3, cout), f"{p}.out_layers.3.conv.bias": (cout,)}
        table |= {f"{p}.skip_connection.conv.weight": (cout, 1, 1, 1, cin), f"{p}.skip_connection.conv.bias": (cout,)}
    table |= {"out_layer.weight": (101, c // 8), "out_layer.bias": (101,)}
    return table


def test_official_keys_and_shapes_on_meta():
    with torch.device("meta"):
        model = SLatMeshDecoder(stage2_preset("official").mesh)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _official_table()
    assert len(got) == 120


def test_model_channels_must_suit_group_norm():
    with pytest.raises(ValueError, match="multiple of 256"):
        SLatMeshDecoder(dataclasses.replace(stage2_preset("tiny").mesh, model_channels=128))


def test_subdivide_child_order():
    feats = torch.tensor([[1.0], [2.0]])
    coords = torch.tensor([[0, 1, 2, 3], [1, 0, 0, 0]], dtype=torch.int32)
    fine_feats, fine = subdivide(feats, coords)
    assert fine.dtype == torch.int32 and fine.shape == (16, 4)
    assert fine[:8].tolist() == [[0, 2 + x, 4 + y, 6 + z] for x in (0, 1) for y in (0, 1) for z in (0, 1)]
    assert fine[8:, 0].tolist() == [1] * 8
    assert fine_feats[:, 0].tolist() == [1.0] * 8 + [2.0] * 8


def test_skip_connection_uses_the_spconv_1x1_view():
    """spconv's 1x1x1 path multiplies by the [Cout,1,1,1,Cin] weight viewed as [Cin, Cout] (no transpose)."""
    conv = SparseConv3d(3, 2, 1)
    with torch.no_grad():
        conv.conv.weight.copy_(torch.arange(6.0).reshape(2, 1, 1, 1, 3))
        conv.conv.bias.zero_()
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out = conv(x, torch.zeros(2, 4, dtype=torch.int32), neighbours=torch.empty(0))
    assert out.tolist() == [[0.0, 1.0], [4.0, 5.0]]


def test_parity_with_official():
    data = load_file(FIXTURE / "data.safetensors")
    model = SLatMeshDecoder(stage2_preset("tiny").mesh).eval()
    ckpt = torch.load(FIXTURE / "official" / "slat_decoder_mesh.ckpt", weights_only=True, map_location="cpu")
    model.load_state_dict(ckpt, strict=True)
    with torch.no_grad():
        coords, feats = model(data["sample/slat_feats"], data["input/coords"].int())
    assert torch.equal(coords.long(), data["mesh/fine_coords"].long())
    want = data["mesh/fine_feats"]  # captured before the extractor's in-place sdf bias
    assert feats.shape == want.shape == (64 * data["input/coords"].shape[0], MESH_FEATS_CHANNELS)
    rel = (feats - want).abs().max() / want.abs().max()
    assert rel <= 1e-4, f"relative error {rel:.2e}"
