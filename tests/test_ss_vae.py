"""Sparse-structure decoder and voxel extraction: official key table, tiny forward, voxel functions."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sam3d_core.models.ss_vae import (
    ChannelLayerNorm32,
    SSDecoder,
    cap_voxels,
    occupied_voxels,
    pixel_shuffle_3d,
    prune_interior,
    shape_latent_to_grid,
)
from sam3d_core.registry import stage1_preset

FIXTURE = Path(__file__).parent / "fixtures" / "stage1_small"


def _official_table() -> dict[str, tuple[int, ...]]:
    """ss_decoder.ckpt keys and shapes, written out from spec section 4.7."""
    table: dict[str, tuple[int, ...]] = {
        "input_layer.weight": (512, 8, 3, 3, 3),
        "input_layer.bias": (512,),
    }

    def res_block(prefix: str, c: int) -> None:
        for norm in ("norm1", "norm2"):
            table[f"{prefix}.{norm}.weight"] = (c,)
            table[f"{prefix}.{norm}.bias"] = (c,)
        for conv in ("conv1", "conv2"):
            table[f"{prefix}.{conv}.weight"] = (c, c, 3, 3, 3)
            table[f"{prefix}.{conv}.bias"] = (c,)

    for i in (0, 1):
        res_block(f"middle_block.{i}", 512)
    for i, c in ((0, 512), (1, 512), (3, 128), (4, 128), (6, 32), (7, 32)):
        res_block(f"blocks.{i}", c)
    table["blocks.2.conv.weight"] = (1024, 512, 3, 3, 3)
    table["blocks.2.conv.bias"] = (1024,)
    table["blocks.5.conv.weight"] = (256, 128, 3, 3, 3)
    table["blocks.5.conv.bias"] = (256,)
    table["out_layer.0.weight"] = (32,)
    table["out_layer.0.bias"] = (32,)
    table["out_layer.2.weight"] = (1, 32, 3, 3, 3)
    table["out_layer.2.bias"] = (1,)
    return table


def test_official_keys_and_shapes_on_meta():
    with torch.device("meta"):
        model = SSDecoder(stage1_preset("official").decoder)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = _official_table()
    assert len(expected) == 74
    assert sorted(got) == sorted(expected)
    assert got == expected


@pytest.fixture(scope="module")
def tiny() -> SSDecoder:
    torch.manual_seed(0)
    model = SSDecoder(stage1_preset("tiny").decoder).eval()
    with torch.no_grad():  # conv2 and norms are zero/one at init in training code; randomise all
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def test_tiny_forward_matches_functional_reference(tiny):
    """Re-derive the decoder graph with plain torch ops on a 4^3 latent."""
    latent = torch.randn(2, 8, 4, 4, 4)

    def ln(mod, x):
        return F.layer_norm(x.movedim(1, -1), (x.shape[1],), mod.weight, mod.bias, 1e-5).movedim(-1, 1)

    def res(blk, x):
        h = F.conv3d(F.silu(ln(blk.norm1, x)), blk.conv1.weight, blk.conv1.bias, padding=1)
        h = F.conv3d(F.silu(ln(blk.norm2, h)), blk.conv2.weight, blk.conv2.bias, padding=1)
        return h + x

    with torch.no_grad():
        h = F.conv3d(latent, tiny.input_layer.weight, tiny.input_layer.bias, padding=1)
        for blk in tiny.middle_block:
            h = res(blk, h)
        for blk in tiny.blocks:
            if hasattr(blk, "conv"):
                h = F.conv3d(h, blk.conv.weight, blk.conv.bias, padding=1)
                b, c, d, hh, w = h.shape
                out = torch.empty(b, c // 8, 2 * d, 2 * hh, 2 * w)
                for i, j, k in itertools.product(range(2), repeat=3):
                    out[:, :, i::2, j::2, k::2] = h[:, i * 4 + j * 2 + k :: 8]
                h = out
            else:
                h = res(blk, h)
        norm, conv = tiny.out_layer[0], tiny.out_layer[2]
        ref = F.conv3d(F.silu(ln(norm, h)), conv.weight, conv.bias, padding=1)
        got = tiny(latent)
    assert got.shape == (2, 1, 16, 16, 16)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_tiny_forward_bf16(tiny):
    latent = torch.randn(1, 8, 2, 2, 2)
    model = SSDecoder(tiny.cfg).eval()
    model.load_state_dict(tiny.state_dict())
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        ref = tiny(latent)
        got = model(latent)
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()


def test_channels_last_3d_model_gives_same_logits(tiny):
    latent = torch.randn(1, 8, 2, 2, 2)
    model = SSDecoder(tiny.cfg).eval()
    model.load_state_dict(tiny.state_dict())
    model = model.to(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        ref = tiny(latent)
        got = model(latent.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_pixel_shuffle_3d_index_map():
    x = torch.arange(16 * 2 * 3 * 2, dtype=torch.float32).reshape(1, 16, 2, 3, 2)
    y = pixel_shuffle_3d(x, 2)
    assert y.shape == (1, 2, 4, 6, 4)
    for c, i, j, k, h, w, d in itertools.product(range(2), range(2), range(2), range(2), range(2), range(3), range(2)):
        assert y[0, c, 2 * h + i, 2 * w + j, 2 * d + k] == x[0, c * 8 + i * 4 + j * 2 + k, h, w, d]


def test_channel_layer_norm_fp32_under_bf16():
    norm = ChannelLayerNorm32(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6))
        norm.bias.copy_(torch.randn(6))
    x = torch.randn(2, 6, 3, 4, 5)
    ref = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-5)
    ref = ref * norm.weight[None, :, None, None, None] + norm.bias[None, :, None, None, None]
    torch.testing.assert_close(norm(x), ref, rtol=1e-5, atol=1e-5)
    out = norm.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16


def test_shape_latent_to_grid_token_order():
    tokens = torch.randn(2, 4096, 8)
    grid = shape_latent_to_grid(tokens)
    assert grid.shape == (2, 8, 16, 16, 16)
    for n in (0, 1, 17, 300, 4095):
        assert torch.equal(grid[:, :, n // 256, (n // 16) % 16, n % 16], tokens[:, n])


def test_occupied_voxels_lexicographic():
    logits = -torch.ones(2, 1, 4, 4, 4)
    logits[1, 0, 3, 0, 2] = 1.0
    logits[0, 0, 2, 1, 0] = 0.5
    logits[0, 0, 0, 3, 3] = 2.0
    logits[0, 0, 1, 1, 1] = 0.0  # not > 0
    coords = occupied_voxels(logits)
    assert coords.dtype == torch.int32
    assert coords.tolist() == [[0, 0, 3, 3], [0, 2, 1, 0], [1, 3, 0, 2]]


def _cube(lo: int, hi: int, batch: int = 0) -> torch.Tensor:
    r = torch.arange(lo, hi)
    xyz = torch.cartesian_prod(r, r, r)
    return torch.cat([torch.full((len(xyz), 1), batch), xyz], dim=1).int()


def test_prune_solid_cube_keeps_surface_in_order():
    cube = _cube(10, 15)  # 5^3 solid
    kept = prune_interior(cube)
    interior = ((cube[:, 1:] > 10) & (cube[:, 1:] < 14)).all(dim=1)
    assert torch.equal(kept, cube[~interior])
    assert kept.shape[0] == 125 - 27


def test_prune_batch_items_are_independent():
    shell = _cube(0, 3)
    shell = shell[(shell[:, 1:] != 1).any(dim=1)]  # 3^3 block without its centre
    centre = torch.tensor([[1, 1, 1, 1]], dtype=torch.int32)
    coords = torch.cat([shell, centre])
    assert torch.equal(prune_interior(coords), coords)  # one grid for both would drop the centre


def test_prune_empty_and_grid_border():
    empty = torch.zeros(0, 4, dtype=torch.int32)
    assert prune_interior(empty).shape == (0, 4)
    slab = _cube(0, 3)  # every voxel touches the bounding box: nothing is interior except the centre
    assert prune_interior(slab).shape[0] == 26


def test_cap_voxels_under_cap_is_identity():
    cube = _cube(0, 4)
    out, factor = cap_voxels(cube, max_voxels=64)
    assert factor == 1 and out is cube


def test_cap_voxels_halves_about_the_centre():
    for offset in (0, 20):
        out, factor = cap_voxels(_cube(offset, offset + 10), max_voxels=200)
        # x in 0..9 -> round(x / 9 * 4 + 2.5) (half to even) = {2, 3, 4, 5, 6}
        assert factor == 2 and out.dtype == torch.int32
        assert torch.equal(out, _cube(offset + 2, offset + 7))


def test_cap_voxels_random_subset_when_still_too_many():
    out, factor = cap_voxels(_cube(0, 10), max_voxels=50, generator=torch.Generator().manual_seed(0))
    assert factor == 2 and out.shape == (50, 4)
    assert torch.unique(out, dim=0).shape[0] == 50
    full = {tuple(r) for r in _cube(2, 7).tolist()}
    assert {tuple(r) for r in out.tolist()} <= full
    again, _ = cap_voxels(_cube(0, 10), max_voxels=50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m(torch.randn(1, 4, 4, 4, 4)), "latent"),
        (lambda m: m(torch.randn(1, 64, 8)), "latent"),
        (lambda m: shape_latent_to_grid(torch.randn(1, 100, 8)), "cube"),
        (lambda m: shape_latent_to_grid(torch.randn(100, 8)), "tokens"),
        (lambda m: occupied_voxels(torch.randn(1, 2, 4, 4, 4)), "logits"),
        (lambda m: prune_interior(torch.zeros(3, 4)), "dtype"),
        (lambda m: prune_interior(torch.zeros(3, 3, dtype=torch.int32)), r"\[N, 4\]"),
        (lambda m: cap_voxels(torch.zeros(3, 4, dtype=torch.int32), max_voxels=0), "max_voxels"),
    ],
)
def test_bad_inputs(tiny, call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny)


@pytest.mark.skipif(not (FIXTURE / "data.safetensors").exists(), reason="parity fixture stage1_small absent")
def test_parity_with_official_fixture():
    """Official ss_decoder.ckpt (tiny channels) on the official 25-step shape latent: logits and voxels."""
    from safetensors import safe_open

    state = torch.load(FIXTURE / "official" / "ss_decoder.ckpt", weights_only=True)
    model = SSDecoder(stage1_preset("tiny").decoder).eval()
    model.load_state_dict(state, strict=True)
    with safe_open(FIXTURE / "data.safetensors", "pt") as data:
        shape_latent = data.get_tensor("sample/final/shape")  # [1, 4096, 8]
        ref_logits = data.get_tensor("sample/decoder_logits")  # [1, 1, 64, 64, 64]
        ref_original = data.get_tensor("sample/coords_original")
        ref_coords = data.get_tensor("sample/coords")
    with torch.no_grad():
        logits = model(shape_latent_to_grid(shape_latent))
    assert logits.shape == (1, 1, 64, 64, 64)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4 * ref_logits.abs().max().item())
    coords = occupied_voxels(ref_logits)
    assert torch.equal(coords, ref_original)
    assert torch.equal(occupied_voxels(logits), ref_original)
    pruned = prune_interior(coords)
    assert torch.equal(pruned, ref_coords)
    capped, factor = cap_voxels(pruned)
    assert factor == 1 and torch.equal(capped, ref_coords)
