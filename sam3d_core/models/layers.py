"""Leaf layers shared by the SAM 3D models. Parameter names match the official checkpoints."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sam3d_kernels.head_norm import head_rms_norm
from sam3d_kernels.sparse_conv import submanifold_conv3d


def _half_on_cuda(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 (affine parameters too) and cast back to the input dtype.

    For half inputs on CUDA the kernel itself accumulates in float32, so one pass replaces the upcast /
    normalise / downcast round trip (a third of the memory traffic); the gains are rounded to the input
    dtype, an error of the size of the output's own rounding.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _half_on_cuda(x):
            w = None if self.weight is None else self.weight.to(x.dtype)
            b = None if self.bias is None else self.bias.to(x.dtype)
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type(x.dtype)


class MultiHeadRMSNorm(nn.Module):
    """Per-head L2 normalisation times a learned gain and sqrt(head_dim).

    Not the classic RMSNorm: y = normalize(x) * gamma * sqrt(D), with no epsilon term.
    """

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__()
        self.scale = head_dim**0.5
        self.gamma = nn.Parameter(torch.ones(num_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H, D]
        if _half_on_cuda(x):
            # normalize(x) * sqrt(D) == x / rms(x): one fused pass with fp32 statistics for half inputs
            # (sam3d_kernels/head_norm: Triton where present, reading q/k straight out of the packed qkv)
            return head_rms_norm(x, self.gamma.to(x.dtype))
        return (F.normalize(x, dim=-1) * self.gamma * self.scale).to(x.dtype)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding ([cos, sin], 256 frequencies) followed by a 2-layer MLP.

    The input is the network time, i.e. t already multiplied by the time scale (1000).
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        # Built on t's device: no host-to-device copy, so the embedding can be captured in a CUDA graph.
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # [B, half]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # [B] -> [B, C]
        freq = self.sinusoid(t.reshape(-1), self.frequency_size)  # [B, 256] float32
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


def absolute_position_embedding(coords: torch.Tensor, channels: int) -> torch.Tensor:
    """Fixed sin/cos embedding of integer grid coordinates. coords [N, 3] -> [N, channels].

    Per axis: freq_dim = channels // 3 // 2 frequencies 10000^(-m/freq_dim), [sin, cos] per axis,
    axes concatenated, zero-padded to `channels`.
    """
    n, axes = coords.shape
    freq_dim = channels // axes // 2
    freqs = 1.0 / (10000 ** (torch.arange(freq_dim, dtype=torch.float32) / freq_dim))
    out = torch.outer(coords.reshape(-1).float(), freqs.to(coords.device))  # [N*3, F]
    emb = torch.cat([torch.sin(out), torch.cos(out)], dim=-1).reshape(n, -1)
    return F.pad(emb, (0, channels - emb.shape[1]))


class FeedForwardNet(nn.Module):
    """Linear -> GELU(tanh) -> Linear, as in the DiT blocks."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class SwiGLU(nn.Module):
    """Llama-3 feed-forward: w2(silu(w1 x) * w3 x), bias-free.

    The hidden size follows the llama rule: int(2 * hidden / 3) rounded up to `multiple_of`.
    """

    def __init__(self, dim: int, hidden_dim: int, out_dim: int, multiple_of: int = 256):
        super().__init__()
        hidden = int(2 * hidden_dim / 3)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, out_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention on [B, L, H, D] tensors (the layout of the official code).

    Goes through torch SDPA, which picks flash / memory-efficient kernels on a GPU.
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # [B, L, H, D]


class _ConvParams(nn.Module):
    """Holds `weight` [Cout, k, k, k, Cin] then `bias` [Cout], in the official state-dict order."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, kernel, kernel, kernel, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.xavier_uniform_(self.weight.view(out_channels, -1))


class SparseConv3d(nn.Module):
    """Submanifold sparse convolution (3x3x3 or 1x1x1), official parameter layout `conv.weight [Cout, k, k, k, Cin]`
    (spconv's); shared by the SLAT flow model and the SLAT decoders. Keys: `<name>.conv.weight`, `<name>.conv.bias`."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int):
        super().__init__()
        if kernel not in (1, 3):
            raise ValueError(f"kernel must be 1 or 3; got {kernel}")
        self.conv = _ConvParams(in_channels, out_channels, kernel)

    def forward(self, feats: torch.Tensor, coords: torch.Tensor, neighbours: torch.Tensor | None) -> torch.Tensor:
        """feats [N, Cin] on the voxels coords [N, 4] (neighbours: their 3x3x3 map, shareable) -> [N, Cout]."""
        weight, bias = self.conv.weight, self.conv.bias
        if weight.shape[1] == 1:
            # 1x1x1: spconv 2.x multiplies by the [Cout, 1, 1, 1, Cin] buffer VIEWED as [Cin, Cout] (a reshape,
            # not a transpose); the checkpoints were trained that way, so we reproduce it.
            cout = weight.shape[0]
            return torch.addmm(bias.to(feats.dtype), feats, weight.reshape(-1, cout).to(feats.dtype))
        return submanifold_conv3d(feats, coords, weight, bias, neighbours=neighbours)
