"""Sparse-structure VAE: 64^3 occupancy <-> the stage-1 shape latent; logits -> voxel coordinates.

The decoder is a dense 3D CNN (TRELLIS "D_S"): a 16^3 x 8 latent goes through residual blocks and two
x2 pixel-shuffle upsamplings to a 64^3 grid of logits. Occupied voxels are the cells with logit > 0.
The official pipeline then drops interior voxels (every 3x3x3 neighbour occupied) and, when more than
42000 voxels remain, shrinks the structure by 2 around its centre (an int32 limit in mesh decoding).

Parameter names match the official flat checkpoint `ss_decoder.ckpt` (74 tensors at the official size).

The encoder (TRELLIS "E_S", official `ss_encoder.ckpt` where released) is the mirror: a 64^3 occupancy grid
through residual blocks and two stride-2 convolutions to 16^3, then a head giving the latent's mean and
log-variance (8 + 8 channels). Its mean is the shape latent a training sample stores.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sam3d_core.config import SSDecoderConfig, SSEncoderConfig

# ---------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------


class ChannelLayerNorm32(nn.LayerNorm):
    """LayerNorm over the channel axis (dim 1) of a [B, C, *spatial] tensor, computed in float32.

    The affine parameters are used in float32 too, so the block also works when the module is cast
    to bf16/fp16 as a whole. The output has the input dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, D, H, W]
        h = x.float().movedim(1, -1)  # [B, D, H, W, C]
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        h = F.layer_norm(h, self.normalized_shape, weight, bias, self.eps)
        h = h.movedim(-1, 1).to(x.dtype)  # [B, C, D, H, W], channels-last strides
        # Keep the input's memory format: CPU convs are slow on channels-last views, while a model
        # converted to channels_last_3d runs ~20% faster on a GPU without the copies.
        channels_last = x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
        return h.contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)


class ResBlock3d(nn.Module):
    """Pre-norm residual block: (LN -> SiLU -> conv3) x 2, plus the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = ChannelLayerNorm32(channels, eps=1e-5)
        self.norm2 = ChannelLayerNorm32(channels, eps=1e-5)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, D, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + x


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, C*f^3, D, H, W] -> [B, C, D*f, H*f, W*f].

    Input channel c*f^3 + i*f^2 + j*f + k lands at output voxel (f*d + i, f*h + j, f*w + k).
    """
    b, c, d, h, w = x.shape
    c_out = c // factor**3
    x = x.reshape(b, c_out, factor, factor, factor, d, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # [B, C, D, i, H, j, W, k]
    return x.reshape(b, c_out, d * factor, h * factor, w * factor)


class UpsampleBlock3d(nn.Module):
    """x2 upsampling: a 3^3 conv to 8x the output channels, then a 3D pixel shuffle."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, Cin, D, H, W]
        return pixel_shuffle_3d(self.conv(x), 2)  # [B, Cout, 2D, 2H, 2W]


class DownsampleBlock3d(nn.Module):
    """x2 downsampling: a 2^3 convolution with stride 2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, Cin, D, H, W]
        return self.conv(x)  # [B, Cout, D/2, H/2, W/2]


# ---------------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------------


class SSEncoder(nn.Module):
    """Occupancy [B, 1, 64, 64, 64] -> (mean, logvar) of the shape latent, [B, 8, 16, 16, 16] each.

    input conv -> per level: res blocks (+ x2 downsample between levels) -> middle res blocks
    -> LN, SiLU, conv to 2 * latent_channels, split into mean and logvar. Official keys: 74 tensors.
    """

    def __init__(self, cfg: SSEncoderConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        self.input_layer = nn.Conv3d(cfg.in_channels, ch[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for level, width in enumerate(ch):
            blocks += [ResBlock3d(width) for _ in range(cfg.num_res_blocks)]
            if level < len(ch) - 1:
                blocks.append(DownsampleBlock3d(width, ch[level + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.middle_block = nn.Sequential(*[ResBlock3d(ch[-1]) for _ in range(cfg.num_res_blocks_middle)])
        self.out_layer = nn.Sequential(
            ChannelLayerNorm32(ch[-1], eps=1e-5), nn.SiLU(), nn.Conv3d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)
        )

    def forward(self, occupancy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """occupancy [B, in, S, S, S] (1 = occupied) -> float32 (mean, logvar), [B, C_lat, R, R, R] each.

        R = S / 2^(levels - 1): 16 for the official 64^3 grid and three channel levels.
        """
        factor = 2 ** (len(self.cfg.channels) - 1)
        if occupancy.ndim != 5 or occupancy.shape[1] != self.cfg.in_channels or occupancy.shape[-1] % factor:
            raise ValueError(
                f"occupancy: got shape {tuple(occupancy.shape)}, expected [B, {self.cfg.in_channels}, S, S, S] "
                f"with S a multiple of {factor} (64 for the official model); build it with occupancy_grid()"
            )
        h = self.input_layer(occupancy.to(self.input_layer.weight.dtype))  # [B, C0, S, S, S]
        for block in self.blocks:
            h = block(h)  # resolution halves at each DownsampleBlock3d
        h = self.middle_block(h)
        mean, logvar = self.out_layer(h).float().chunk(2, dim=1)  # [B, C_lat, R, R, R] each
        return mean, logvar


def occupancy_grid(coords: torch.Tensor, resolution: int = 64) -> torch.Tensor:
    """Voxel indices [N, 3] int (x, y, z) -> float32 grid [1, 1, R, R, R], 1 at each voxel: the encoder's input.

    Grid axes are (x, y, z), as `occupied_voxels` reads them back.
    """
    if coords.ndim != 2 or coords.shape[1] != 3 or coords.is_floating_point():
        raise ValueError(f"coords: got {coords.dtype} {tuple(coords.shape)}, expected integer voxel indices [N, 3]")
    if coords.numel() and (int(coords.min()) < 0 or int(coords.max()) >= resolution):
        raise ValueError(
            f"coords: indices span {int(coords.min())}..{int(coords.max())}, expected 0..{resolution - 1} "
            f"(the {resolution}^3 grid of the local frame)"
        )
    grid = torch.zeros(1, 1, resolution, resolution, resolution, device=coords.device)
    c = coords.long()
    grid[0, 0, c[:, 0], c[:, 1], c[:, 2]] = 1.0
    return grid


# ---------------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------------


class SSDecoder(nn.Module):
    """Shape latent grid [B, 8, 16, 16, 16] -> occupancy logits [B, 1, 64, 64, 64].

    input conv -> middle res blocks -> per level: res blocks (+ x2 upsample between levels)
    -> LN, SiLU, conv to `out_channels`.
    """

    def __init__(self, cfg: SSDecoderConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        self.input_layer = nn.Conv3d(cfg.latent_channels, ch[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[ResBlock3d(ch[0]) for _ in range(cfg.num_res_blocks_middle)])
        blocks: list[nn.Module] = []
        for level, width in enumerate(ch):
            blocks += [ResBlock3d(width) for _ in range(cfg.num_res_blocks)]
            if level < len(ch) - 1:
                blocks.append(UpsampleBlock3d(width, ch[level + 1]))
        self.blocks = nn.ModuleList(blocks)
        # Indices .0 and .2 match the official checkpoint (.1 is the parameter-free SiLU).
        self.out_layer = nn.Sequential(
            ChannelLayerNorm32(ch[-1], eps=1e-5), nn.SiLU(), nn.Conv3d(ch[-1], cfg.out_channels, 3, padding=1)
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, C_lat, R, R, R] (any float dtype) -> float32 logits [B, out, S, S, S].

        S = R * 2^(levels - 1): 64 for the official 16^3 latent and three channel levels.
        """
        if latent.ndim != 5 or latent.shape[1] != self.cfg.latent_channels:
            raise ValueError(
                f"latent: got shape {tuple(latent.shape)}, "
                f"expected [B, {self.cfg.latent_channels}, R, R, R]; "
                "turn flow tokens [B, R^3, C] into a grid with shape_latent_to_grid()"
            )
        h = self.input_layer(latent.to(self.input_layer.weight.dtype))  # [B, C0, R, R, R]
        h = self.middle_block(h)
        for block in self.blocks:
            h = block(h)  # resolution doubles at each UpsampleBlock3d
        return self.out_layer(h).float()  # [B, out, S, S, S]


def shape_latent_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """Flow-model shape tokens [B, R^3, C] -> decoder grid [B, C, R, R, R].

    Token n sits at grid cell (n // R^2, (n // R) % R, n % R).
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens: got shape {tuple(tokens.shape)}, expected [B, R^3, C] such as [B, 4096, 8]")
    b, n, c = tokens.shape
    r = round(n ** (1 / 3))
    if r**3 != n:
        raise ValueError(f"tokens: got {n} tokens, expected a cube number R^3 (4096 for R = 16)")
    return tokens.permute(0, 2, 1).reshape(b, c, r, r, r)  # [B, C, R, R, R]


# ---------------------------------------------------------------------------------------------------
# Voxel extraction: logits -> (batch, x, y, z) coordinates
# ---------------------------------------------------------------------------------------------------


def occupied_voxels(logits: torch.Tensor) -> torch.Tensor:
    """Occupancy logits [B, 1, R, R, R] -> coords [N, 4] int32 (batch, x, y, z) of cells with logit > 0.

    Rows are in lexicographic order (batch, then x, y, z).
    """
    if logits.ndim != 5 or logits.shape[1] != 1:
        raise ValueError(f"logits: got shape {tuple(logits.shape)}, expected [B, 1, R, R, R]; pass SSDecoder's output")
    return torch.nonzero(logits > 0)[:, [0, 2, 3, 4]].int()  # [N, 4]


def _check_coords(coords: torch.Tensor) -> None:
    if coords.ndim != 2 or coords.shape[1] != 4:
        raise ValueError(f"coords: got shape {tuple(coords.shape)}, expected [N, 4] (batch, x, y, z)")
    if coords.dtype.is_floating_point or coords.dtype == torch.bool:
        raise ValueError(f"coords: got dtype {coords.dtype}, expected an integer dtype; use coords.int()")


def prune_interior(coords: torch.Tensor) -> torch.Tensor:
    """Drop interior voxels: keep those with fewer than 27 occupied cells in their 3x3x3 neighbourhood.

    coords [N, 4] int (batch, x, y, z) -> [M, 4], order preserved. Cells outside the grid count as
    empty, so a voxel on the bounding box is always kept. Each batch item is pruned on its own
    (the official code builds one grid for all items; the two agree for a single item).
    """
    _check_coords(coords)
    if coords.shape[0] == 0:
        return coords
    xyz = coords[:, 1:].long()
    xyz = xyz - xyz.min(dim=0).values  # [N, 3], bounding box starts at 0
    batch = coords[:, 0].long()
    size = (int(batch.max()) + 1, 1, *(xyz.max(dim=0).values + 1).tolist())
    occupancy = torch.zeros(size, dtype=torch.float32, device=coords.device)  # [B, 1, D, H, W]
    occupancy[batch, 0, xyz[:, 0], xyz[:, 1], xyz[:, 2]] = 1.0
    kernel = torch.ones(1, 1, 3, 3, 3, dtype=torch.float32, device=coords.device)
    counts = F.conv3d(occupancy, kernel, padding=1)  # [B, 1, D, H, W], exact small integers
    keep = counts[batch, 0, xyz[:, 0], xyz[:, 1], xyz[:, 2]] < 27
    return coords[keep]


def cap_voxels(
    coords: torch.Tensor, max_voxels: int = 42000, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, int]:
    """Limit the voxel count as the official `downsample_sparse_structure` does.

    coords [N, 4] int (batch, x, y, z). At most `max_voxels` rows: returned unchanged with factor 1.
    Otherwise the structure is shrunk by 2 into a box of half the size centred in its bounding box
    (rescale, round half to even, clamp, drop duplicates -> sorted rows), and if still too many,
    a random subset of `max_voxels` rows is kept (a `torch.randperm` draw, from `generator` or the
    global RNG of coords' device). Returns (int32 coords [M, 4], downsample factor 1 or 2); the
    object's scale must be multiplied by the factor.
    """
    _check_coords(coords)
    if max_voxels < 1:
        raise ValueError(f"max_voxels: got {max_voxels}, expected a positive count such as 42000")
    if coords.shape[0] <= max_voxels:
        return coords, 1
    factor = 2
    xyz = coords[:, 1:].float()  # [N, 3]
    lo, hi = xyz.min(dim=0).values, xyz.max(dim=0).values
    size = hi - lo + 1
    target = size / factor
    target_lo = lo + (size - target) / 2
    target_hi = lo + (size - target) / 2 + target - 1
    # Official divides by (hi - lo) as is; a flat axis (hi == lo) would give NaN there, so keep 0.
    normalized = (xyz - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    rescaled = torch.round(normalized * (target - 1) + target_lo).int()
    rescaled = torch.clamp(rescaled, target_lo.int(), target_hi.int())
    out = torch.unique(torch.cat([coords[:, :1].int(), rescaled], dim=1), dim=0)  # [M, 4], sorted
    if out.shape[0] > max_voxels:
        keep = torch.randperm(out.shape[0], device=coords.device, generator=generator)[:max_voxels]
        out = out[keep]
    return out.int(), factor
