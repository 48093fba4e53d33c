"""DINOv2 vision transformer with register tokens (the `dinov2_vitl14_reg` backbone of SAM 3D).

Built locally so that no hub download is needed: the weights come from the SAM 3D checkpoint.
Parameter names match the official DINOv2 code, so `module_list.{0,1}.backbone.*` loads strictly.

Token sequence: [CLS, registers, patches]. The position table covers CLS + patches only; the
registers are inserted after the position embedding has been added. The position table is used as
is, so the input must have exactly `cfg.image_size` pixels per side (no interpolation).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sam3d_core.config import DinoConfig
from sam3d_core.models.layers import attention


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size patches -> one token each."""

    def __init__(self, patch_size: int, embed_dim: int, in_channels: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, P, C]
        return self.proj(x).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (biases on qkv and proj)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, C]
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)
        return self.proj(attention(q, k, v).reshape(b, n, c))  # q, k, v: [B, L, H, D]


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel learned gain on a residual branch."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ViTBlock(nn.Module):
    """Pre-norm ViT block (LN eps 1e-6): x += [ls1](attn(norm1 x)); x += [ls2](mlp(norm2 x)).

    With `layer_scale` False it is the timm `Block` used by the point-map embedder (no ls1/ls2 keys).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layer_scale: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, C]
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT with register tokens. `forward_features` returns the official output dict."""

    def __init__(self, cfg: DinoConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(
                f"DinoConfig.image_size {cfg.image_size} is not a multiple of patch_size "
                f"{cfg.patch_size}; choose an image_size divisible by the patch size"
            )
        self.cfg = cfg
        c = cfg.embed_dim
        # Own parameters first, then submodules: the official state_dict order.
        # Small random init (the real values come from the checkpoint).
        self.cls_token = nn.Parameter(torch.randn(1, 1, c) * 1e-6)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + cfg.num_patches, c) * 0.02)
        self.register_tokens = nn.Parameter(torch.randn(1, cfg.num_register_tokens, c) * 1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, c))  # unused at inference; kept for the keys
        self.patch_embed = PatchEmbed(cfg.patch_size, c)
        self.blocks = nn.ModuleList(
            ViTBlock(c, cfg.num_heads, cfg.mlp_ratio, layer_scale=True) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(c, eps=1e-6)

    def _check_input(self, x: torch.Tensor) -> None:
        s = self.cfg.image_size
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (s, s):
            raise ValueError(
                f"DinoVisionTransformer input: got shape {tuple(x.shape)}, expected [B, 3, {s}, {s}]; "
                f"resize the image to {s}x{s} first (DinoEmbedder does this)"
            )

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, 1+R+P, C]
        self._check_input(x)
        b = x.shape[0]
        x = self.patch_embed(x)  # [B, P, C]
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed
        registers = self.register_tokens.expand(b, -1, -1)  # [B, R, C]
        return torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [B, 3, S, S] (ImageNet-normalized) -> dict of token tensors, as the official code names them."""
        x = self.prepare_tokens(x)
        for block in self.blocks:
            x = block(x)
        x_norm = self.norm(x)
        r = self.cfg.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],  # [B, C]
            "x_norm_regtokens": x_norm[:, 1 : 1 + r],  # [B, R, C]
            "x_norm_patchtokens": x_norm[:, 1 + r :],  # [B, P, C]
            "x_prenorm": x,  # [B, 1+R+P, C]
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, C]
        return self.forward_features(x)["x_norm_clstoken"]
