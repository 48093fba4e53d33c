"""Stage-2 flow model: a sparse DiT over the structured latent (SLAT) of the occupied 64^3 voxels.

    feats [N, 8] at 64^3 -> input_layer -> SparseResBlock3d (64^3) -> SparseResBlock3d (2x down, 32^3)
      -> + APE(32^3 coords) -> num_blocks x (self-attention per object, cross-attention to the
      condition tokens, MLP; adaLN) -> SparseResBlock3d (2x up, cat skip) -> SparseResBlock3d (cat skip)
      -> LayerNorm (no affine, eps 1e-5) -> out_layer -> velocity [N, 8]

The coordinate-dependent pieces (neighbour maps of both grids, the 2x parent map, attention segment
offsets, the position embedding) depend only on the coords, so `build_grids` computes them once per
object and every block of every sampling step reuses them.

Two ways to run it:
  forward(...)                      the reference, one pass, the official semantics
  prepare_condition + forward_cfg   the fast exact path for sampling: condition K/V projected once,
                                    the unconditional cross-attention replaced by its constant,
                                    cond + uncond run as one batch of 2B objects.

State-dict keys equal the official checkpoint's after stripping
`_base_models.generator.reverse_fn.backbone.` (526 tensors at the official preset).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from sam3d_core.config import SLatFlowConfig
from sam3d_core.models.layers import (
    FeedForwardNet,
    LayerNorm32,
    MultiHeadRMSNorm,
    SparseConv3d,
    TimestepEmbedder,
    absolute_position_embedding,
)
from sam3d_kernels.sparse_attention import varlen_attention
from sam3d_kernels.sparse_conv import build_neighbour_map
from sam3d_kernels.sparse_resample import downsample2, upsample2

# --- coordinate-dependent data, built once per object -----------------------------------------------


@dataclass(frozen=True)
class SparseLevel:
    """One grid: coords [N, 4] (batch, x, y, z), neighbours [N, 27], batch_index [N] int64,
    cu_seqlens [B + 1] int32 (rows of each object; the rows are grouped by object)."""

    coords: torch.Tensor
    neighbours: torch.Tensor
    batch_index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


def _level(coords: torch.Tensor, batch: int) -> SparseLevel:
    b = coords[:, 0].long()
    if coords.shape[0] and bool((b[1:] < b[:-1]).any()):
        raise ValueError("coords rows must be grouped by object (batch column non-decreasing); sort the coords")
    if coords.shape[0] and not 0 <= int(b[0]) <= int(b[-1]) < batch:
        raise ValueError(
            f"coords batch column spans {int(b[0])}..{int(b[-1])}, expected 0..{batch - 1} for {batch} objects; "
            "pass one condition row (and one t) per object"
        )
    counts = torch.bincount(b, minlength=batch)  # [B]
    cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    return SparseLevel(coords, build_neighbour_map(coords), b, cu, int(counts.max()) if batch else 0)


def _double(level: SparseLevel, batch: int) -> SparseLevel:
    """The level of the coords repeated as objects B..2B-1 (the unconditional half of a CFG batch)."""
    n = level.coords.shape[0]
    shift = level.coords.new_tensor([batch, 0, 0, 0])
    nbr = level.neighbours
    return SparseLevel(
        torch.cat([level.coords, level.coords + shift]),
        torch.cat([nbr, torch.where(nbr >= 0, nbr + n, nbr)]),
        torch.cat([level.batch_index, level.batch_index + batch]),
        torch.cat([level.cu_seqlens, level.cu_seqlens[1:] + n]),
        level.max_seqlen,
    )


@dataclass
class SLatGrids:
    """The 64^3 grid of the input voxels and its 32^3 parent grid, with the maps between them.

    parent [N] is the 32^3 row of each 64^3 row; parent_count [M, 1] is the number of children + 1
    (the official 2x average pool divides by it); ape [M, C] is the position embedding of the 32^3 grid.
    Build with `from_coords` (or SLatFlowModel.build_grids).
    """

    batch: int
    fine: SparseLevel
    coarse: SparseLevel
    parent: torch.Tensor
    parent_count: torch.Tensor
    ape: torch.Tensor
    _doubled: SLatGrids | None = field(default=None, repr=False)

    @classmethod
    def from_coords(cls, coords: torch.Tensor, batch: int, ape_channels: int) -> SLatGrids:
        if coords.ndim != 2 or coords.shape[1] != 4 or coords.dtype.is_floating_point:
            raise ValueError(
                f"coords must be an integer [N, 4] (batch, x, y, z) tensor; got {coords.dtype} {tuple(coords.shape)}"
            )
        coords = coords.contiguous()
        coarse, _, parent = downsample2(coords, coords.new_zeros(coords.shape[0], 0, dtype=torch.float32))
        count = torch.bincount(parent, minlength=coarse.shape[0]) + 1  # [M]
        return cls(
            batch=batch,
            fine=_level(coords, batch),
            coarse=_level(coarse, batch),
            parent=parent,
            parent_count=count[:, None].float(),
            ape=absolute_position_embedding(coarse[:, 1:], ape_channels),  # [M, C] float32
        )

    def downsample(self, feats: torch.Tensor) -> torch.Tensor:  # [N, C] -> [M, C]
        m = self.coarse.coords.shape[0]
        total = feats.new_zeros(m, feats.shape[1]).index_add_(0, self.parent, feats)
        return total / self.parent_count.to(feats.dtype)

    def upsample(self, feats: torch.Tensor) -> torch.Tensor:  # [M, C] -> [N, C]
        return upsample2(feats, self.parent)

    def doubled(self) -> SLatGrids:
        """These grids with every object repeated once more (objects B..2B-1), built on first use."""
        if self._doubled is None:
            self._doubled = SLatGrids(
                batch=2 * self.batch,
                fine=_double(self.fine, self.batch),
                coarse=_double(self.coarse, self.batch),
                parent=torch.cat([self.parent, self.parent + self.coarse.coords.shape[0]]),
                parent_count=torch.cat([self.parent_count, self.parent_count]),
                ape=torch.cat([self.ape, self.ape]),
            )
        return self._doubled


# --- layers -------------------------------------------------------------------------------------------


def _per_row(per_object: torch.Tensor, level: SparseLevel) -> torch.Tensor:
    """Per-object values [B, K] -> one row per voxel [N, K]; a single row [1, K] (one time shared by every
    object) stays [1, K] and broadcasts."""
    return per_object if per_object.shape[0] == 1 else per_object[level.batch_index]


class SparseResBlock3d(nn.Module):
    """Resample (optional, first) -> LN -> SiLU -> conv -> LN * (1 + scale) + shift -> SiLU -> conv, + skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, resample: str | None = None):
        super().__init__()
        self.resample = resample  # None, "down" or "up"
        self.norm1 = LayerNorm32(channels, eps=1e-6)
        self.norm2 = LayerNorm32(out_channels, elementwise_affine=False, eps=1e-6)
        self.conv1 = SparseConv3d(channels, out_channels, 3)
        self.conv2 = SparseConv3d(out_channels, out_channels, 3)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.skip_connection = nn.Linear(channels, out_channels) if channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor, grids: SLatGrids) -> torch.Tensor:
        """x [N_in, C_in] on the input level, emb [B, C_emb] -> [N_out, C_out] on the output level."""
        if self.resample == "down":
            x, level = grids.downsample(x), grids.coarse
        elif self.resample == "up":
            x, level = grids.upsample(x), grids.fine
        else:
            level = grids.fine  # with one io stage every block that does not resample runs at 64^3
        scale, shift = _per_row(self.emb_layers(emb).to(x.dtype), level).chunk(2, dim=1)  # [N or 1, C_out] each
        h = self.conv1(F.silu(self.norm1(x)), level.coords, level.neighbours)
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        h = self.conv2(F.silu(h), level.coords, level.neighbours)
        return h + self.skip_connection(x)


class SparseSelfAttention(nn.Module):
    """Full self-attention within each object (varlen segments), q/k RMS-normalised per head."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.q_rms_norm = MultiHeadRMSNorm(channels // num_heads, num_heads)
        self.k_rms_norm = MultiHeadRMSNorm(channels // num_heads, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, level: SparseLevel) -> torch.Tensor:  # [M, C] -> [M, C]
        m, c = x.shape
        q, k, v = self.to_qkv(x).reshape(m, 3, self.num_heads, -1).unbind(1)  # [M, H, D] each
        q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        cu, n = level.cu_seqlens, level.max_seqlen
        return self.to_out(varlen_attention(q, k, v, cu, cu, n, n).reshape(m, c))


class SparseCrossAttention(nn.Module):
    """Each object's voxels attend to that object's condition tokens. No q/k norm (qk_rms_norm_cross off)."""

    def __init__(self, channels: int, ctx_channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(ctx_channels, 2 * channels)
        self.to_out = nn.Linear(channels, channels)

    def project_kv(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = cond.shape
        k, v = self.to_kv(cond).reshape(b * n, 2, self.num_heads, -1).unbind(1)  # [B*Nc, H, D] each
        return k.contiguous(), v.contiguous()

    def attend(self, x: torch.Tensor, level: SparseLevel, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m, c = x.shape
        b = level.cu_seqlens.shape[0] - 1
        nc = k.shape[0] // b
        cu_k = torch.arange(b + 1, dtype=torch.int32, device=x.device) * nc
        q = self.to_q(x).reshape(m, self.num_heads, -1)  # [M, H, D]
        out = varlen_attention(q, k, v, level.cu_seqlens, cu_k, level.max_seqlen, nc)
        return self.to_out(out.reshape(m, c))

    def forward(self, x: torch.Tensor, level: SparseLevel, cond: torch.Tensor) -> torch.Tensor:
        return self.attend(x, level, *self.project_kv(cond))

    def zero_condition_output(self) -> torch.Tensor:  # [C]
        """The output for an all-zero condition: k = b_k, v = b_v for every token, so the softmax is
        uniform and the attention returns b_v whatever the query."""
        return self.to_out(self.to_kv.bias[self.to_q.out_features :])


class SLatTransformerBlock(nn.Module):
    """x += gate_msa * SelfAttn(norm1(x) * (1 + scale_msa) + shift_msa)
    x += CrossAttn(norm2(x), cond)
    x += gate_mlp * MLP(norm3(x) * (1 + scale_mlp) + shift_mlp)"""

    def __init__(self, cfg: SLatFlowConfig):
        super().__init__()
        c = cfg.model_channels
        self.norm1 = LayerNorm32(c, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(c, eps=1e-6)
        self.norm3 = LayerNorm32(c, elementwise_affine=False, eps=1e-6)
        self.self_attn = SparseSelfAttention(c, cfg.num_heads)
        self.cross_attn = SparseCrossAttention(c, cfg.cond_channels, cfg.num_heads)
        self.mlp = FeedForwardNet(c, cfg.mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, level: SparseLevel, cross: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """x [M, C], emb [B, C]; cross(h [M, C]) -> the cross-attention output [M, C] (the condition is bound)."""
        mod = _per_row(self.adaLN_modulation(emb).to(x.dtype), level)  # [M, 6C], or [1, 6C] for a shared time
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        h = self.self_attn(torch.addcmul(shift_msa, self.norm1(x), 1 + scale_msa), level)
        x = torch.addcmul(x, h, gate_msa)
        x = x + cross(self.norm2(x))
        h = self.mlp(torch.addcmul(shift_mlp, self.norm3(x), 1 + scale_mlp))
        return torch.addcmul(x, h, gate_mlp)


# --- the model -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SLatConditionCache:
    """kv[i] = (k, v) of block i, each [B * Nc, H, D]; zero_out[i] [C], the unconditional cross-attention."""

    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    zero_out: tuple[torch.Tensor, ...]
    batch: int


class SLatFlowModel(nn.Module):
    """The stage-2 sparse flow transformer: velocities of the SLAT feats at network time t * 1000."""

    def __init__(self, cfg: SLatFlowConfig):
        super().__init__()
        if cfg.patch_size != 2 or len(cfg.io_block_channels) != 1:
            raise ValueError(
                f"SLatFlowConfig.patch_size={cfg.patch_size}, io_block_channels={cfg.io_block_channels}: only "
                "patch_size 2 with one io stage (as every released model) is implemented"
            )
        if not cfg.qk_rms_norm or cfg.model_channels % cfg.num_heads:
            raise ValueError(
                f"SLatFlowConfig needs qk_rms_norm=True and num_heads dividing model_channels; got "
                f"qk_rms_norm={cfg.qk_rms_norm}, model_channels={cfg.model_channels}, num_heads={cfg.num_heads}"
            )
        self.cfg = cfg
        c, io = cfg.model_channels, cfg.io_block_channels[0]
        # Registration order follows the official module, so state_dict() lists keys in its order.
        self.t_embedder = TimestepEmbedder(c)
        self.input_layer = nn.Linear(cfg.latent_channels, io)
        self.input_blocks = nn.ModuleList(
            [SparseResBlock3d(io, c, io) for _ in range(cfg.num_io_res_blocks - 1)]
            + [SparseResBlock3d(io, c, c, resample="down")]
        )
        self.blocks = nn.ModuleList([SLatTransformerBlock(cfg) for _ in range(cfg.num_blocks)])
        self.out_blocks = nn.ModuleList(
            [SparseResBlock3d(2 * c, c, io, resample="up")]
            + [SparseResBlock3d(2 * io, c, io) for _ in range(cfg.num_io_res_blocks - 1)]
        )
        self.out_layer = nn.Linear(io, cfg.latent_channels)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the blocks compute in (the time embedding and the output layer stay float32)."""
        return self.blocks[0].adaLN_modulation[1].weight.dtype

    def build_grids(self, coords: torch.Tensor, batch: int | None = None) -> SLatGrids:
        """Everything that depends on the voxel coords [N, 4] (batch, x, y, z) only; reuse it across calls.

        batch: the number of objects (default: the largest batch index + 1).
        """
        if batch is None:
            batch = int(coords[:, 0].max()) + 1 if coords.shape[0] else 0
        return SLatGrids.from_coords(coords, batch, self.cfg.model_channels)

    def _check(self, feats: torch.Tensor, t: torch.Tensor, grids: SLatGrids) -> None:
        n, c = grids.fine.coords.shape[0], self.cfg.latent_channels
        if tuple(feats.shape) != (n, c):
            raise ValueError(f"feats has shape {tuple(feats.shape)}, expected ({n}, {c}): one row per voxel")
        if tuple(t.shape) not in ((grids.batch,), (1,)):
            raise ValueError(
                f"t has shape {tuple(t.shape)}, expected ({grids.batch},) or (1,): one network time (t * 1000) per "
                "object, or one for every object"
            )

    def _check_cond(self, cond: torch.Tensor, batch: int) -> None:
        if cond.ndim != 3 or cond.shape[0] != batch or cond.shape[2] != self.cfg.cond_channels:
            raise ValueError(
                f"cond has shape {tuple(cond.shape)}, expected ({batch}, Nc, {self.cfg.cond_channels}); "
                "pass the stage-2 condition tokens, one row per object"
            )

    def _run(self, feats: torch.Tensor, t: torch.Tensor, grids: SLatGrids, crosses: list[Callable]) -> torch.Tensor:
        """The network, with crosses[i](h) giving block i's cross-attention output at the 32^3 level."""
        emb = self.t_embedder(t).to(self.dtype)  # [B, C]
        h = self.input_layer(feats.to(self.input_layer.weight.dtype)).to(self.dtype)  # [N, io]
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, grids)
            skips.append(h)
        h = h + grids.ape.to(h.dtype)  # [M, C]
        for block, cross in zip(self.blocks, crosses, strict=True):
            h = block(h, emb, grids.coarse, cross)
        for block, skip in zip(self.out_blocks, reversed(skips), strict=True):
            h = block(torch.cat([h, skip], dim=1), emb, grids)
        h = F.layer_norm(h, h.shape[-1:])  # eps 1e-5: the functional default, as the official code
        return self.out_layer(h.to(self.out_layer.weight.dtype)).float()

    def forward(
        self,
        feats: torch.Tensor,
        coords: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        grids: SLatGrids | None = None,
    ) -> torch.Tensor:
        """Velocity [N, 8] float32 for feats [N, 8] at coords [N, 4], network time t [B] (or [1], shared by
        every object), cond [B, Nc, Cc].

        `grids` = build_grids(coords), computed here when not given. The official unconditional pass
        is this with cond * 0.
        """
        grids = grids if grids is not None else self.build_grids(coords, cond.shape[0])
        self._check(feats, t, grids)
        self._check_cond(cond, grids.batch)
        cond = cond.to(self.dtype)
        crosses = [partial(blk.cross_attn, level=grids.coarse, cond=cond) for blk in self.blocks]
        return self._run(feats, t, grids, crosses)

    # --- fast exact path ---

    @torch.no_grad()
    def prepare_condition(self, cond: torch.Tensor) -> SLatConditionCache:
        """Project the condition tokens [B, Nc, Cc] to every block's cross-attention K/V, once per sample."""
        if cond.ndim != 3:
            raise ValueError(f"cond has shape {tuple(cond.shape)}, expected (B, Nc, {self.cfg.cond_channels})")
        self._check_cond(cond, cond.shape[0])
        cond = cond.to(self.dtype)
        kv = tuple(blk.cross_attn.project_kv(cond) for blk in self.blocks)
        zero = tuple(blk.cross_attn.zero_condition_output() for blk in self.blocks)
        return SLatConditionCache(kv=kv, zero_out=zero, batch=cond.shape[0])

    def forward_cfg(
        self,
        feats: torch.Tensor,
        t: torch.Tensor,
        cache: SLatConditionCache,
        grids: SLatGrids,
        strength: float = 0.0,
    ) -> torch.Tensor:
        """Guided velocity [N, 8] float32: (1 + s) * v(cond) - s * v(cond * 0); v(cond) when s == 0.

        Equal to forward(cond) and forward(cond * 0) combined; the two passes run as one batch of 2B
        objects and the unconditional cross-attention is its closed form. t [B], or [1]: one time shared by
        every object (what the sampler passes); the time embedding and modulation are then one row broadcast
        over the voxels, so an object's result does not depend on the others in the batch (bit for bit on CPU).
        """
        self._check(feats, t, grids)
        if cache.batch != grids.batch:
            raise ValueError(
                f"cache holds a condition batch of {cache.batch}, the grids {grids.batch} objects; "
                "call prepare_condition with one condition row per object"
            )
        if strength == 0.0:
            crosses = [
                partial(blk.cross_attn.attend, level=grids.coarse, k=k, v=v)
                for blk, (k, v) in zip(self.blocks, cache.kv, strict=True)
            ]
            return self._run(feats, t, grids, crosses)
        pair = grids.doubled()
        m = grids.coarse.coords.shape[0]

        def make(blk: SLatTransformerBlock, kv: tuple, zero: torch.Tensor):
            def cross(x: torch.Tensor) -> torch.Tensor:  # [2M, C]: the cond rows, then the uncond rows
                h = blk.cross_attn.attend(x[:m], grids.coarse, *kv)  # [M, C], the conditional half
                return torch.cat([h, zero.to(h.dtype).expand_as(h)])

            return cross

        crosses = [make(*a) for a in zip(self.blocks, cache.kv, cache.zero_out, strict=True)]
        v = self._run(torch.cat([feats, feats]), t if t.shape[0] == 1 else torch.cat([t, t]), pair, crosses)
        n = feats.shape[0]
        return (1 + strength) * v[:n] - strength * v[n:]
