"""Stage-1 flow model: a mixture-of-transformers (MoT) DiT over a shape stream and a pose stream.

Two token streams share one adaLN modulation but own every other weight:
  shape  4096 tokens, the 16^3 x 8 occupancy latent
  pose   4 tokens: [6drotation_normalized, translation, scale, translation_scale]
Self-attention is masked: shape attends to shape only, pose attends to [pose; shape]. Each stream
cross-attends to the condition tokens (no gate, no modulation on that branch).

Two ways to run it:
  forward(...)                 the reference, one pass, exactly the official semantics
  prepare_condition + forward_cfg
                               the fast exact path for sampling: condition K/V projected once per
                               sample, the unconditional cross-attention replaced by its closed form,
                               cond + uncond run as one 2B batch. Static shapes, no host syncs.

State-dict keys equal the official checkpoint's after stripping
`_base_models.generator.reverse_fn.backbone.` (945 tensors at the official preset).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sam3d_core.config import POSE_LATENTS, SSFlowConfig
from sam3d_core.models.layers import (
    FeedForwardNet,
    LayerNorm32,
    MultiHeadRMSNorm,
    TimestepEmbedder,
    absolute_position_embedding,
    attention,
)

POSE = POSE_LATENTS[0][0]  # the pose stream is keyed by its first latent, as in the official code
STREAMS = ("shape", POSE)  # official `latent_names` order: unmerged latents, then merged ones
# Official `latent_mapping` insertion order (the YAML's), which is also the sorted order.
LATENT_NAMES = ("6drotation_normalized", "scale", "shape", "translation", "translation_scale")


def latent_shapes(cfg: SSFlowConfig) -> dict[str, tuple[int, int]]:
    """Per-latent (tokens, channels): shape (res^3, 8), pose latents (1, c)."""
    shapes = {name: (1, c) for name, c in POSE_LATENTS}
    shapes["shape"] = (cfg.num_shape_tokens, cfg.latent_channels)
    return {name: shapes[name] for name in LATENT_NAMES}


# --- leaf layers -----------------------------------------------------------------------------------


class LatentMapping(nn.Module):
    """Per-latent input projection + position embedding, and the output head (non-affine LN + linear)."""

    def __init__(self, in_channels: int, model_channels: int, pos_emb: torch.Tensor, learnt: bool):
        super().__init__()
        self.input_layer = nn.Linear(in_channels, model_channels)
        self.out_layer = nn.Linear(model_channels, in_channels)
        if learnt:
            self.pos_emb = nn.Parameter(pos_emb)  # [1, C]
        else:
            self.register_buffer("pos_emb", pos_emb)  # [N, C], persistent: it is in the checkpoint

    def to_input(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, c] -> [B, N, C]
        return _batch_exact_linear(self.input_layer, x.to(self.input_layer.weight.dtype)) + self.pos_emb[None]

    def to_output(self, h: torch.Tensor) -> torch.Tensor:  # [B, N, C] -> [B, N, c] float32
        h = F.layer_norm(h.float(), h.shape[-1:])  # no affine, eps 1e-5
        return _batch_exact_linear(self.out_layer, h.to(self.out_layer.weight.dtype)).float()


_MIN_CPU_ROWS = 16


def _batch_exact_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for x [..., c]; on the CPU, fewer than 16 rows are padded with zero rows to 16 first.

    MKL's float32 GEMM rounds a row of a 1-3 or 5-11-row product differently from the same row in a larger
    product (measured with MKL 2024.2; 4, 8 and >= 12 rows agree). The pose latents are one token per sample,
    so without the padding a sample's pose would depend on how many samples share the batch; with it, a batch
    of objects equals one-at-a-time runs bit for bit. GPUs are left alone (no exactness claim there).
    """
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows >= _MIN_CPU_ROWS or rows == 0:
        return layer(x)
    flat = torch.cat([x.reshape(rows, -1), x.new_zeros(_MIN_CPU_ROWS - rows, x.shape[-1])])
    return layer(flat)[:rows].reshape(*x.shape[:-1], layer.out_features)


class CrossAttention(nn.Module):
    """Query tokens attend to condition tokens. No q/k norm (qk_rms_norm_cross is off in all configs)."""

    def __init__(self, channels: int, ctx_channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(ctx_channels, 2 * channels)
        self.to_out = nn.Linear(channels, channels)

    def project_kv(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = cond.shape
        kv = self.to_kv(cond).reshape(b, n, 2, self.num_heads, -1)  # [B, Nc, 2, H, D]
        return kv[:, :, 0], kv[:, :, 1]  # [B, Nc, H, D] each

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.to_q(x).reshape(b, n, self.num_heads, -1)  # [B, L, H, D]
        return self.to_out(attention(q, k, v).reshape(b, n, c))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.attend(x, *self.project_kv(cond))

    def zero_condition_output(self) -> torch.Tensor:  # [C]
        """The output for an all-zero condition, for any query.

        Zero tokens project to k = b_k and v = b_v for every token, so every query's softmax is
        uniform and the attention returns b_v; the block output is to_out(b_v).
        """
        c = self.to_q.out_features
        return self.to_out(self.to_kv.bias[c:])  # the bias's second half is v (layout [2, H, D])


class MoTSelfAttention(nn.Module):
    """Per-stream qkv / q-k RMS norm / out projections; shape attends to shape, pose to [pose; shape]."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        head_dim = channels // num_heads
        self.num_heads = num_heads
        self.to_qkv = nn.ModuleDict({s: nn.Linear(channels, 3 * channels) for s in STREAMS})
        self.q_rms_norm = nn.ModuleDict({s: MultiHeadRMSNorm(head_dim, num_heads) for s in STREAMS})
        self.k_rms_norm = nn.ModuleDict({s: MultiHeadRMSNorm(head_dim, num_heads) for s in STREAMS})
        self.to_out = nn.ModuleDict({s: nn.Linear(channels, channels) for s in STREAMS})

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        q, k, v = {}, {}, {}
        for s, h in x.items():
            b, n, _ = h.shape
            qs, ks, v[s] = self.to_qkv[s](h).reshape(b, n, 3, self.num_heads, -1).unbind(2)
            q[s], k[s] = self.q_rms_norm[s](qs), self.k_rms_norm[s](ks)  # [B, L, H, D]
        out = {
            "shape": attention(q["shape"], k["shape"], v["shape"]),
            POSE: pose_attention(q[POSE], (k[POSE], k["shape"]), (v[POSE], v["shape"])),
        }
        return {s: self.to_out[s](out[s].flatten(2)) for s in x}


def pose_attention(q: torch.Tensor, keys: tuple[torch.Tensor, ...], values: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Attention of a few queries [B, Lq, H, D] over the concatenation of several K/V blocks [B, Li, H, D].

    Equal to attention(q, cat(keys), cat(values)) with one softmax (in float32) over all keys, but
    without materialising the concatenated K/V (16 MB per block for the 4 pose tokens over the 4096
    shape tokens) and with plain matmuls, which use the GPU better than a flash kernel at 4 queries.
    """
    qh = q.transpose(1, 2) * q.shape[-1] ** -0.5  # [B, H, Lq, D]
    scores = torch.cat([qh @ k.permute(0, 2, 3, 1) for k in keys], dim=-1)  # [B, H, Lq, sum Li]
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    out, start = 0, 0
    for v in values:
        out = out + probs[..., start : start + v.shape[1]] @ v.transpose(1, 2)  # [B, H, Lq, D]
        start += v.shape[1]
    return out.transpose(1, 2)  # [B, Lq, H, D]


# --- the block -------------------------------------------------------------------------------------


class MoTBlock(nn.Module):
    """adaLN-modulated self-attention, plain cross-attention, adaLN-modulated MLP, per stream.

    x += gate_msa * SelfAttn(norm1(x) * (1 + scale_msa) + shift_msa)
    x += CrossAttn(norm2(x), cond)
    x += gate_mlp * MLP(norm3(x) * (1 + scale_mlp) + shift_mlp)
    """

    def __init__(self, cfg: SSFlowConfig):
        super().__init__()
        c = cfg.model_channels
        # norm1 / norm3 carry no parameters, so one instance serves both streams.
        self.norm1 = LayerNorm32(c, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.ModuleDict({s: LayerNorm32(c, eps=1e-6) for s in STREAMS})
        self.norm3 = LayerNorm32(c, elementwise_affine=False, eps=1e-6)
        self.self_attn = MoTSelfAttention(c, cfg.num_heads)
        self.cross_attn = nn.ModuleDict({s: CrossAttention(c, cfg.cond_channels, cfg.num_heads) for s in STREAMS})
        self.mlp = nn.ModuleDict({s: FeedForwardNet(c, cfg.mlp_ratio) for s in STREAMS})
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))  # shared by the streams

    def modulation(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, ...]:  # [B, C] -> 6 x [B, 1, C]
        return tuple(m[:, None] for m in self.adaLN_modulation(t_emb).chunk(6, dim=1))

    def attend(self, x: dict, mod: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        shift, scale, gate = mod[:3]
        h = self.self_attn({s: torch.addcmul(shift, self.norm1(v), 1 + scale) for s, v in x.items()})
        return {s: torch.addcmul(v, h[s], gate) for s, v in x.items()}

    def feed_forward(self, x: dict, mod: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        shift, scale, gate = mod[3:]
        return {
            s: torch.addcmul(v, self.mlp[s](torch.addcmul(shift, self.norm3(v), 1 + scale)), gate) for s, v in x.items()
        }

    def forward(self, x: dict, t_emb: torch.Tensor, cond: torch.Tensor) -> dict[str, torch.Tensor]:
        mod = self.modulation(t_emb)
        x = self.attend(x, mod)
        x = {s: v + self.cross_attn[s](self.norm2[s](v), cond) for s, v in x.items()}
        return self.feed_forward(x, mod)

    def forward_cached(self, x: dict, t_emb: torch.Tensor, kv: dict, zero_out: dict | None) -> dict[str, torch.Tensor]:
        """As forward, with the condition K/V precomputed for the first B rows.

        zero_out None: x holds B rows, all conditional. Otherwise x holds 2B rows, [cond; uncond], and
        the unconditional rows get the constant zero-condition output zero_out[stream] ([C]).
        """
        mod = self.modulation(t_emb)
        x = self.attend(x, mod)
        out = {}
        for s, v in x.items():
            k, val = kv[s]
            b = k.shape[0]
            h = self.cross_attn[s].attend(self.norm2[s](v[:b]), k, val)  # [B, L, C]
            if zero_out is not None:
                h = torch.cat([h, zero_out[s].expand_as(h)])  # [2B, L, C]
            out[s] = v + h
        return self.feed_forward(out, mod)


# --- the model -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConditionCache:
    """Everything of the condition that the blocks need, computed once per sample.

    kv[i][stream] = (k, v), each [B, Nc, H, D]; zero_out[i][stream] = [C], the cross-attention output
    for an all-zero condition (the unconditional CFG branch).
    """

    kv: tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], ...]
    zero_out: tuple[dict[str, torch.Tensor], ...]

    @property
    def batch(self) -> int:
        return self.kv[0]["shape"][0].shape[0]


class SSFlowModel(nn.Module):
    """The stage-1 MoT flow transformer. Velocities for the 5 latents, given network time t*1000."""

    def __init__(self, cfg: SSFlowConfig):
        super().__init__()
        if not cfg.qk_rms_norm:
            raise ValueError(
                "SSFlowConfig.qk_rms_norm=False: the MoT self-attention exists only with q/k RMS norm "
                "(the official code raises NotImplementedError too); set qk_rms_norm=True"
            )
        if cfg.model_channels % cfg.num_heads:
            raise ValueError(
                f"SSFlowConfig.model_channels={cfg.model_channels} is not divisible by "
                f"num_heads={cfg.num_heads}; pick num_heads dividing model_channels"
            )
        self.cfg = cfg
        c = cfg.model_channels
        # Registration order follows the official module, so state_dict() lists keys in its order.
        if cfg.is_shortcut_model:
            self.d_embedder = TimestepEmbedder(c)  # step size d * 1000
        self.t_embedder = TimestepEmbedder(c)
        self.blocks = nn.ModuleList([MoTBlock(cfg) for _ in range(cfg.num_blocks)])
        self.latent_mapping = nn.ModuleDict()
        for name, (tokens, channels) in latent_shapes(cfg).items():
            if name == "shape":
                r = torch.arange(cfg.resolution)
                grid = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)
                pos = absolute_position_embedding(grid, c)  # [res^3, C], x slowest
                self.latent_mapping[name] = LatentMapping(channels, c, pos, learnt=False)
            else:
                self.latent_mapping[name] = LatentMapping(channels, c, torch.randn(tokens, c), learnt=True)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the transformer blocks compute in (embeddings and norms may stay float32)."""
        return self.blocks[0].adaLN_modulation[1].weight.dtype

    # --- shared pieces ---

    def check_latents(self, latents: dict[str, torch.Tensor]) -> int:
        """Validate the latent dict against the config; return the batch size."""
        expected = latent_shapes(self.cfg)
        if set(latents) != set(expected):
            raise ValueError(
                f"latents has keys {sorted(latents)}, expected {sorted(expected)}; "
                "pass one tensor per stage-1 latent (see stage1_noise)"
            )
        b = latents["shape"].shape[0]
        for name, (n, c) in expected.items():
            if tuple(latents[name].shape) != (b, n, c):
                raise ValueError(
                    f"latents[{name!r}] has shape {tuple(latents[name].shape)}, expected {(b, n, c)}; "
                    "all latents need the same batch and the config's token / channel counts"
                )
        return b

    def _check_time(self, name: str, value: torch.Tensor | None, batch: int) -> None:
        if value is not None and tuple(value.shape) not in ((batch,), (1,)):
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}, expected ({batch},) or (1,); pass one network time "
                "(t * time_scale) per sample, or one for every sample"
            )
        if name == "d" and value is not None and not self.cfg.is_shortcut_model:
            raise ValueError("d was given but the model has no d_embedder (is_shortcut_model=False); pass d=None")

    def embed_time(self, t: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:  # [B] -> [B, C]
        t_emb = self.t_embedder(t)
        if d is not None:
            t_emb = t_emb + self.d_embedder(d)  # added even for d = 0, as the official pipeline does
        return t_emb

    def project_input(self, latents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = {name: self.latent_mapping[name].to_input(x) for name, x in latents.items()}
        pose = torch.cat([h[name] for name, _ in POSE_LATENTS], dim=1)  # [B, 4, C]
        return {"shape": h["shape"], POSE: pose}

    def project_output(self, h: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        parts = {"shape": h["shape"]}
        for i, (name, _) in enumerate(POSE_LATENTS):  # every pose latent is one token
            parts[name] = h[POSE][:, i : i + 1]
        return {name: self.latent_mapping[name].to_output(parts[name]) for name in LATENT_NAMES}

    # --- reference path ---

    def forward(
        self,
        latents: dict[str, torch.Tensor],
        t: torch.Tensor,
        cond: torch.Tensor,
        d: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Velocities (float32, shapes of `latents`) at network time t [B] for condition cond [B, Nc, Cc].

        The official unconditional pass is this with cond * 0. d is the shortcut step size in network
        units ([B], d * time_scale), or None for a model without d_embedder. t and d may also be [1]:
        one time for every sample (see forward_cfg).
        """
        b = self.check_latents(latents)
        self._check_time("t", t, b)
        self._check_time("d", d, b)
        self._check_cond(cond, b)
        t_emb = self.embed_time(t, d).to(self.dtype)  # [B, C]
        h = {s: v.to(self.dtype) for s, v in self.project_input(latents).items()}
        cond = cond.to(self.dtype)
        for block in self.blocks:
            h = block(h, t_emb, cond)
        return self.project_output(h)

    def _check_cond(self, cond: torch.Tensor, batch: int | None) -> None:
        batch_ok = cond.ndim == 3 and (batch is None or cond.shape[0] == batch)
        if not batch_ok or cond.shape[-1] != self.cfg.cond_channels:
            want = "B" if batch is None else batch
            raise ValueError(
                f"cond has shape {tuple(cond.shape)}, expected ({want}, Nc, {self.cfg.cond_channels}); "
                "pass the condition tokens of the stage-1 embedder, one row per sample"
            )

    # --- fast exact path ---

    @torch.no_grad()
    def prepare_condition(self, cond: torch.Tensor, out: ConditionCache | None = None) -> ConditionCache:
        """Project the condition tokens [B, Nc, Cc] to every block's cross-attention K/V, once.

        With `out`, the values are written into its tensors (static buffers of a captured CUDA graph)
        one block at a time, so no second full-size cache is ever held.
        """
        self._check_cond(cond, None)
        if out is not None and tuple(out.kv[0]["shape"][0].shape[:2]) != tuple(cond.shape[:2]):
            raise ValueError(
                f"cond has {tuple(cond.shape[:2])} (batch, tokens) but the cache holds "
                f"{tuple(out.kv[0]['shape'][0].shape[:2])}; allocate a cache for this size"
            )
        cond = cond.to(self.dtype)
        kv, zero = [], []
        for i, blk in enumerate(self.blocks):
            pairs = {}
            for s in STREAMS:
                k, v = blk.cross_attn[s].project_kv(cond)  # [B, Nc, H, D] views of one projection
                if out is None:
                    pairs[s] = (k.contiguous(), v.contiguous())
                else:
                    out.kv[i][s][0].copy_(k)
                    out.kv[i][s][1].copy_(v)
                    out.zero_out[i][s].copy_(blk.cross_attn[s].zero_condition_output())
            kv.append(pairs)
            zero.append({s: blk.cross_attn[s].zero_condition_output() for s in STREAMS})
        return out if out is not None else ConditionCache(kv=tuple(kv), zero_out=tuple(zero))

    def empty_condition_cache(self, batch: int, num_tokens: int, device: torch.device | str) -> ConditionCache:
        """Uninitialised cache tensors for `batch` samples of `num_tokens` condition tokens."""
        c, h = self.cfg.model_channels, self.cfg.num_heads
        shape = (batch, num_tokens, h, c // h)

        def new():
            return torch.empty(shape, dtype=self.dtype, device=device)

        kv = tuple({s: (new(), new()) for s in STREAMS} for _ in self.blocks)
        zero = tuple({s: torch.empty(c, dtype=self.dtype, device=device) for s in STREAMS} for _ in self.blocks)
        return ConditionCache(kv=kv, zero_out=zero)

    def forward_cfg(
        self,
        latents: dict[str, torch.Tensor],
        t: torch.Tensor,
        cache: ConditionCache,
        d: torch.Tensor | None = None,
        strength: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Guided velocities (float32): (1 + s) * v_cond - s * v_uncond; v_cond alone when s == 0.

        Equal to forward(cond) / forward(cond * 0) combined, with the cond and uncond passes run as
        one 2B batch and the unconditional cross-attention replaced by its constant.

        t and d: [B], or [1] for one time shared by every sample (what the samplers pass). Shared, the time
        embedding and the blocks' modulation are computed once, as one row, and broadcast over the batch:
        a row's result then does not depend on the batch size (a float32 CPU GEMM of 1 or 2 rows rounds
        differently from a larger one), so B objects sampled together equal B runs of one, bit for bit.
        """
        b = self.check_latents(latents)
        self._check_time("t", t, b)
        self._check_time("d", d, b)
        if cache.batch != b or len(cache.kv) != len(self.blocks):
            raise ValueError(
                f"cache holds {len(cache.kv)} blocks for a condition batch of {cache.batch}, expected "
                f"{len(self.blocks)} blocks for a batch of {b}; call this model's prepare_condition "
                "with one condition row per sample"
            )
        guided = strength != 0.0  # a Python float: decided outside any captured graph
        t_emb = self.embed_time(t, d).to(self.dtype)  # [B, C], or [1, C] for a shared time
        h = {s: v.to(self.dtype) for s, v in self.project_input(latents).items()}
        if guided:
            if t_emb.shape[0] != 1:
                t_emb = torch.cat([t_emb, t_emb])  # [2B, C]
            h = {s: torch.cat([v, v]) for s, v in h.items()}  # [2B, L, C]
        for block, kv, zero in zip(self.blocks, cache.kv, cache.zero_out, strict=True):
            h = block.forward_cached(h, t_emb, kv, zero if guided else None)
        v = self.project_output(h)
        if not guided:
            return v
        return {k: (1 + strength) * x[:b] - strength * x[b:] for k, x in v.items()}
