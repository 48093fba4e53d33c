"""DINOv2 ViT with registers: official key table (meta device), token layout, block math (tiny, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sam3d_core.models.dinov2 import DinoVisionTransformer, ViTBlock
from sam3d_core.registry import stage1_preset


def spec_dino_table(c: int, depth: int, tokens: int, registers: int, patch: int) -> dict[str, tuple]:
    """The key table of spec section 4.1, written out independently of the module."""
    table = {
        "cls_token": (1, 1, c),
        "pos_embed": (1, tokens, c),
        "register_tokens": (1, registers, c),
        "mask_token": (1, c),
        "patch_embed.proj.weight": (c, 3, patch, patch),
        "patch_embed.proj.bias": (c,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        table.update({
            b + "norm1.weight": (c,), b + "norm1.bias": (c,),
            b + "attn.qkv.weight": (3 * c, c), b + "attn.qkv.bias": (3 * c,),
            b + "attn.proj.weight": (c, c), b + "attn.proj.bias": (c,),
            b + "ls1.gamma": (c,),
            b + "norm2.weight": (c,), b + "norm2.bias": (c,),
            b + "mlp.fc1.weight": (4 * c, c), b + "mlp.fc1.bias": (4 * c,),
            b + "mlp.fc2.weight": (c, 4 * c), b + "mlp.fc2.bias": (c,),
            b + "ls2.gamma": (c,),
        })  # fmt: skip
    table.update({"norm.weight": (c,), "norm.bias": (c,)})
    return table


def test_official_keys_and_shapes_on_meta():
    cfg = stage1_preset("official").condition.dino
    with torch.device("meta"):
        model = DinoVisionTransformer(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = spec_dino_table(1024, 24, 1370, 4, 14)
    assert len(got) == len(want) == 344
    assert got == want


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = stage1_preset("tiny").condition.dino
    return cfg, DinoVisionTransformer(cfg).eval()


def test_forward_features_shapes(tiny):
    cfg, model = tiny
    s, r, p = cfg.image_size, cfg.num_register_tokens, cfg.num_patches
    out = model.forward_features(torch.randn(2, 3, s, s))
    assert out["x_norm_clstoken"].shape == (2, cfg.embed_dim)
    assert out["x_norm_patchtokens"].shape == (2, p, cfg.embed_dim)
    assert out["x_prenorm"].shape == (2, 1 + r + p, cfg.embed_dim)
    normed = F.layer_norm(out["x_prenorm"], (cfg.embed_dim,), model.norm.weight, model.norm.bias, 1e-6)
    torch.testing.assert_close(out["x_norm_patchtokens"], normed[:, 1 + r :])
    torch.testing.assert_close(out["x_norm_clstoken"], normed[:, 0])


def test_token_order_registers_carry_no_position(tiny):
    cfg, model = tiny
    s, r = cfg.image_size, cfg.num_register_tokens
    x = torch.randn(1, 3, s, s)
    tokens = model.prepare_tokens(x)
    patches = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens[:, 0], model.cls_token[:, 0] + model.pos_embed[:, 0])
    torch.testing.assert_close(tokens[:, 1 : 1 + r], model.register_tokens)
    torch.testing.assert_close(tokens[:, 1 + r :], patches + model.pos_embed[:, 1:])


def test_block_matches_written_out_math():
    torch.manual_seed(1)
    dim, heads = 16, 4
    block = ViTBlock(dim, heads, 4.0, layer_scale=True).eval()
    with torch.no_grad():
        block.ls1.gamma.uniform_(0.5, 1.5)
        block.ls2.gamma.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, dim)
    h = F.layer_norm(x, (dim,), block.norm1.weight, block.norm1.bias, 1e-6)
    q, k, v = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).view(2, 7, 3, heads, 4).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v  # [B, H, L, D], scale 1/sqrt(4)
    a = attn.transpose(1, 2).reshape(2, 7, dim) @ block.attn.proj.weight.T + block.attn.proj.bias
    x1 = x + a * block.ls1.gamma
    h = F.layer_norm(x1, (dim,), block.norm2.weight, block.norm2.bias, 1e-6)
    m = F.gelu(h @ block.mlp.fc1.weight.T + block.mlp.fc1.bias) @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    torch.testing.assert_close(block(x), x1 + m * block.ls2.gamma)


def test_block_without_layer_scale_has_no_ls_keys():
    keys = set(ViTBlock(8, 2, 2.0, layer_scale=False).state_dict())
    assert not any(k.startswith("ls") for k in keys)
    assert "mlp.fc1.weight" in keys and len(keys) == 12


def test_wrong_input_size_is_a_clear_error(tiny):
    cfg, model = tiny
    with pytest.raises(ValueError, match=r"expected \[B, 3, 70, 70\]"):
        model.forward_features(torch.randn(1, 3, cfg.image_size + 14, cfg.image_size))
    with pytest.raises(ValueError, match="expected"):
        model.forward_features(torch.randn(1, 1, cfg.image_size, cfg.image_size))


def test_image_size_not_multiple_of_patch_is_rejected():
    cfg = stage1_preset("tiny").condition.dino
    with pytest.raises(ValueError, match="patch_size"):
        DinoVisionTransformer(type(cfg)(image_size=71, embed_dim=64, depth=1, num_heads=2))
