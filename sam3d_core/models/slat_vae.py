"""SLAT VAE: the shared swin sparse transformer, the encoder, the Gaussian decoder and the mesh decoder network.

A structured latent (SLAT) is a set of active voxels on the 64³ grid, `coords [N, 4]` int (batch, x, y, z),
with `feats [N, 8]` (de-normalised). Both decoders run the same sparse transformer over the voxels
(shifted-window self-attention, window 8, shift 4 on odd blocks). The Gaussian decoder turns each voxel
into `num_gaussians` 3D Gaussians; the mesh decoder subdivides twice to the 256³ grid and predicts the
101 FlexiCubes channels per fine voxel (the FlexiCubes extraction itself lives elsewhere). The encoder runs the
same transformer over per-voxel DINO features (1024-d) and gives each voxel's latent mean and log-variance.
Parameter names match the official flat checkpoints (strict load).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sam3d_core.config import SLatEncoderConfig, SLatGaussianDecoderConfig, SLatMeshDecoderConfig
from sam3d_core.geometry.gaussians import Gaussians
from sam3d_core.models.layers import FeedForwardNet, LayerNorm32, SparseConv3d, absolute_position_embedding
from sam3d_kernels.sparse_attention import windowed_attention
from sam3d_kernels.sparse_conv import build_neighbour_map

# Channels per voxel of the FlexiCubes input: sdf 8 | deform 8x3 | weights 21 | color 8x6.
MESH_FEATS_CHANNELS = 101


def _check_sparse(feats: torch.Tensor, coords: torch.Tensor, channels: int) -> None:
    if feats.ndim != 2 or feats.shape[1] != channels:
        raise ValueError(f"feats must be [N, {channels}]; got {tuple(feats.shape)}")
    if coords.shape != (feats.shape[0], 4) or coords.is_floating_point():
        raise ValueError(
            f"coords must be an int tensor [N={feats.shape[0]}, 4] (batch, x, y, z); got {tuple(coords.shape)} "
            f"{coords.dtype}"
        )


# ---------------------------------------------------------------------------------------------------
# Sparse transformer (shared by both decoders)
# ---------------------------------------------------------------------------------------------------


class SparseWindowSelfAttention(nn.Module):
    """Multi-head self-attention within (shifted) cubic windows of the voxels, no qk norm."""

    def __init__(self, channels: int, num_heads: int, window: int, shift: int):
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.shift = shift
        self.to_qkv = nn.Linear(channels, channels * 3)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:  # [N, C] -> [N, C]
        n, c = x.shape
        q, k, v = self.to_qkv(x).reshape(n, 3, self.num_heads, -1).unbind(dim=1)  # [N, H, D] each
        h = windowed_attention(q, k, v, coords, window=self.window, shift=self.shift)
        return self.to_out(h.reshape(n, c))


class SparseTransformerBlock(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + mlp(LN(x)); norms without affine parameters."""

    def __init__(self, channels: int, num_heads: int, mlp_ratio: float, window: int, shift: int):
        super().__init__()
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.attn = SparseWindowSelfAttention(channels, num_heads, window, shift)
        self.mlp = FeedForwardNet(channels, mlp_ratio)

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:  # [N, C]
        x = x + self.attn(self.norm1(x), coords)
        return x + self.mlp(self.norm2(x))


class SparseTransformerBase(nn.Module):
    """input_layer (latent -> C) + fixed sin/cos position embedding + swin blocks (shift 0, w/2, 0, w/2, ...)."""

    def __init__(
        self, latent_channels: int, model_channels: int, num_blocks: int, num_heads: int, mlp_ratio: float, window: int
    ):
        super().__init__()
        self.latent_channels = latent_channels
        self.model_channels = model_channels
        self.input_layer = nn.Linear(latent_channels, model_channels)
        self.blocks = nn.ModuleList(
            SparseTransformerBlock(model_channels, num_heads, mlp_ratio, window, shift=window // 2 * (i % 2))
            for i in range(num_blocks)
        )

    def forward(self, feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:  # [N, 8], [N, 4] -> [N, C]
        _check_sparse(feats, coords, self.latent_channels)
        h = self.input_layer(feats)
        h = h + absolute_position_embedding(coords[:, 1:], self.model_channels).to(h.dtype)
        # The blocks may hold half weights (the official fp16 torso) while the input layer stays float32.
        h = h.to(self.blocks[0].attn.to_qkv.weight.dtype) if len(self.blocks) else h
        for block in self.blocks:
            h = block(h, coords)
        return h


# ---------------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------------


class SLatEncoder(SparseTransformerBase):
    """Per-voxel features [N, in_channels] on the 64³ grid -> (mean, logvar) [N, 8] each (official `SLatEncoder`).

    The shared transformer, a LayerNorm without affine parameters, then `out_layer` to 2 * latent_channels.
    The mean is the (de-normalised) SLAT the decoders read. Official keys: 2 + 8 per block + 2 tensors.
    """

    def __init__(self, cfg: SLatEncoderConfig):
        super().__init__(
            cfg.in_channels, cfg.model_channels, cfg.num_blocks, cfg.num_heads, cfg.mlp_ratio, cfg.window_size
        )
        self.cfg = cfg
        self.out_layer = nn.Linear(cfg.model_channels, 2 * cfg.latent_channels)

    def forward(self, feats: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [N, in_channels], coords [N, 4] int (batch, x, y, z) -> float32 (mean, logvar), [N, 8] each."""
        h = super().forward(feats.to(self.input_layer.weight.dtype), coords).float()
        h = F.layer_norm(h, h.shape[-1:])  # eps 1e-5, no affine
        h = self.out_layer(h.to(self.out_layer.weight.dtype)).float()  # [N, 2 * C_lat]
        mean, logvar = h.chunk(2, dim=-1)
        return mean, logvar


# ---------------------------------------------------------------------------------------------------
# Gaussian decoder
# ---------------------------------------------------------------------------------------------------


def radical_inverse(base: int, n: int) -> float:
    """The base-`base` digits of n mirrored about the radix point (van der Corput)."""
    value, scale = 0.0, 1.0 / base
    while n > 0:
        value += (n % base) * scale
        n //= base
        scale /= base
    return value


def hammersley_offsets(num_gaussians: int, voxel_size: float) -> torch.Tensor:
    """Default `offset_perturbation` [G, 3]: atanh of the 3D Hammersley points (i/G, r2(i), r3(i)) mapped to
    [-1, 1] / voxel_size, so that tanh(0 + perturbation) spreads the Gaussians evenly inside the voxel."""
    points = [[i / num_gaussians, radical_inverse(2, i), radical_inverse(3, i)] for i in range(num_gaussians)]
    return torch.atanh((torch.tensor(points, dtype=torch.float32) * 2 - 1) / voxel_size)


class SLatGaussianDecoder(SparseTransformerBase):
    """SLAT -> `Gaussians` (num_gaussians per voxel, voxel-major). Official keys: 101 tensors at 12 blocks."""

    def __init__(self, cfg: SLatGaussianDecoderConfig):
        super().__init__(
            cfg.latent_channels, cfg.model_channels, cfg.num_blocks, cfg.num_heads, cfg.mlp_ratio, cfg.window_size
        )
        self.cfg = cfg
        g = cfg.num_gaussians
        # Per-voxel output channels, in this order (shape per Gaussian): xyz offset, DC colour, scaling, rotation,
        # opacity: 14 * G channels, each field G-major ([N, G * k] -> [N, G, k]).
        self.layout = {"_xyz": (3,), "_features_dc": (1, 3), "_scaling": (3,), "_rotation": (4,), "_opacity": (1,)}
        self.lr = {
            "_xyz": cfg.lr_xyz,
            "_features_dc": cfg.lr_features_dc,
            "_scaling": cfg.lr_scaling,
            "_rotation": cfg.lr_rotation,
            "_opacity": cfg.lr_opacity,
        }
        out_channels = g * sum(math.prod(shape) for shape in self.layout.values())
        self.out_layer = nn.Linear(cfg.model_channels, out_channels)
        self.register_buffer("offset_perturbation", hammersley_offsets(g, cfg.voxel_size))  # [G, 3]

    def forward(self, feats: torch.Tensor, coords: torch.Tensor) -> Gaussians:
        """feats [N, 8] (de-normalised SLAT), coords [N, 4] int of ONE object -> Gaussians with N * G points."""
        if coords.shape[0] and bool((coords[:, 0] != coords[0, 0]).any()):
            raise ValueError("SLatGaussianDecoder decodes one object at a time; split coords by batch index first")
        h = super().forward(feats, coords).float()
        h = F.layer_norm(h, h.shape[-1:])  # eps 1e-5, no affine
        h = self.out_layer(h.to(self.out_layer.weight.dtype)).float()  # [N, G * 14]; a half model stays usable
        return self.to_gaussians(h, coords)

    def to_gaussians(self, h: torch.Tensor, coords: torch.Tensor) -> Gaussians:
        """Split the [N, G*14] output into the raw Gaussian fields; xyz = voxel centre + bounded offset."""
        n, g, res = h.shape[0], self.cfg.num_gaussians, self.cfg.resolution
        fields, start = {}, 0
        for name, shape in self.layout.items():
            size = g * math.prod(shape)
            fields[name] = h[:, start : start + size].reshape(n, g, *shape) * self.lr[name]  # [N, G, ...]
            start += size
        centre = (coords[:, 1:].float() + 0.5) / res  # [N, 3] in [0, 1]
        offset = torch.tanh(fields["_xyz"] + self.offset_perturbation) / res * 0.5 * self.cfg.voxel_size
        fields["_xyz"] = centre[:, None] + offset  # [N, G, 3]
        return Gaussians(
            **{name: value.flatten(0, 1) for name, value in fields.items()},
            scaling_bias=self.cfg.scaling_bias,
            opacity_bias=self.cfg.opacity_bias,
            min_kernel_size=self.cfg.filter_3d,
        )


# ---------------------------------------------------------------------------------------------------
# Mesh decoder network (SLAT -> 256³ FlexiCubes features)
# ---------------------------------------------------------------------------------------------------

# The 8 children of a voxel, (0,0,0), (0,0,1), (0,1,0), ..., (1,1,1): z fastest, the official order.
CHILD_OFFSETS = torch.tensor([[0, (i >> 2) & 1, (i >> 1) & 1, i & 1] for i in range(8)])  # [8, 4]


def subdivide(feats: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each voxel -> its 8 children on the 2x finer grid, features copied: [N, C], [N, 4] -> [8N, C], [8N, 4]."""
    parent = coords * coords.new_tensor([1, 2, 2, 2])
    children = parent[:, None] + CHILD_OFFSETS.to(coords)[None]  # [N, 8, 4]
    return feats.repeat_interleave(8, dim=0), children.flatten(0, 1)


class SparseGroupNorm32(nn.GroupNorm):
    """GroupNorm over all the voxels of each batch item, computed in float32."""

    def forward(self, feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:  # [N, C] -> [N, C]
        out = torch.empty_like(feats)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        for batch in torch.unique(coords[:, 0]):
            rows = coords[:, 0] == batch
            x = feats[rows].float().t()[None]  # [1, C, n]
            out[rows] = F.group_norm(x, self.num_groups, w, b, self.eps)[0].t().to(feats.dtype)
        return out


class SparseSubdivideBlock3d(nn.Module):
    """GroupNorm + SiLU, subdivide to the 2x grid, conv-GN-SiLU-conv, plus a 1x1 skip of the subdivided input."""

    def __init__(self, channels: int, out_channels: int, num_groups: int = 32):
        super().__init__()
        self.act_layers = nn.ModuleList([SparseGroupNorm32(num_groups, channels), nn.SiLU()])
        self.out_layers = nn.ModuleList(
            [
                SparseConv3d(channels, out_channels, 3),
                SparseGroupNorm32(num_groups, out_channels),
                nn.SiLU(),
                SparseConv3d(out_channels, out_channels, 3),
            ]
        )
        self.skip_connection = SparseConv3d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, C], coords [N, 4] -> [8N, Cout], fine coords [8N, 4]."""
        norm, act = self.act_layers
        h = act(norm(x, coords))
        h, fine = subdivide(h, coords)
        x, _ = subdivide(x, coords)
        neighbours = build_neighbour_map(fine)  # shared by both 3x3x3 convs
        conv1, norm1, act1, conv2 = self.out_layers
        h = conv1(h, fine, neighbours)
        h = conv2(act1(norm1(h, fine)), fine, neighbours)
        return h + self.skip_connection(x, fine, neighbours), fine


class SLatMeshDecoder(SparseTransformerBase):
    """SLAT -> (fine coords [64N, 4] on the 256³ grid, FlexiCubes feats [64N, 101]). No final LayerNorm.

    The 101 channels are sdf 8 | deform 24 | weights 21 | color 48, before the sdf bias (-1/256) that the
    mesh extraction adds. model_channels must be a multiple of 256 (GroupNorm 32 on C, C/4 and C/8).
    """

    def __init__(self, cfg: SLatMeshDecoderConfig):
        if cfg.model_channels % 256:
            raise ValueError(
                f"SLatMeshDecoderConfig.model_channels must be a multiple of 256 (32 groups on C/8); "
                f"got {cfg.model_channels}"
            )
        super().__init__(
            cfg.latent_channels, cfg.model_channels, cfg.num_blocks, cfg.num_heads, cfg.mlp_ratio, cfg.window_size
        )
        self.cfg = cfg
        c = cfg.model_channels
        self.upsample = nn.ModuleList([SparseSubdivideBlock3d(c, c // 4), SparseSubdivideBlock3d(c // 4, c // 8)])
        self.out_layer = nn.Linear(c // 8, MESH_FEATS_CHANNELS)

    def forward(self, feats: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [N, 8] (de-normalised SLAT), coords [N, 4] int on the 64³ grid -> ([64N, 4], [64N, 101])."""
        h = super().forward(feats, coords)
        for block in self.upsample:
            h, coords = block(h, coords)
        return coords, self.out_layer(h.to(self.out_layer.weight.dtype)).float()
