"""Fast path for segments of equal length: one batched dense SDPA call, cuDNN's kernel first.

When every query segment has the same length Lq and every key segment the same length Lk (one object,
or the conditional and unconditional copies of one object that classifier-free guidance runs
together), block-diagonal attention is plain batched attention over [S, H, L, D]. On an H100, cuDNN's
SDPA kernel runs these shapes 1.4-1.6x faster than the flash varlen kernel (bench/profile_stage2.py);
PyTorch falls back to flash, memory-efficient or math kernels where cuDNN declines the inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_PRIORITY = None


def _priority():
    global _PRIORITY
    if _PRIORITY is None:
        from torch.nn.attention import SDPBackend

        _PRIORITY = [
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH,
        ]
    return _PRIORITY


def equal_segments(total_q: int, total_k: int, segments: int, max_seqlen_q: int, max_seqlen_k: int) -> bool:
    """True when every segment has the longest segment's length (no host sync: the maxima are ints)."""
    return segments > 0 and max_seqlen_q * segments == total_q and max_seqlen_k * segments == total_k


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: int, scale: float | None = None
) -> torch.Tensor:
    """q [S * Lq, H, D], k [S * Lk, H, D], v [S * Lk, H, Dv] (segments of equal length) -> [S * Lq, H, Dv]."""
    tq, h, _ = q.shape
    tk = k.shape[0]
    qd = q.reshape(segments, tq // segments, h, -1).transpose(1, 2)  # [S, H, Lq, D]
    kd = k.reshape(segments, tk // segments, h, -1).transpose(1, 2)
    vd = v.reshape(segments, tk // segments, h, -1).transpose(1, 2)
    if q.is_cuda:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(_priority(), set_priority=True):
            out = F.scaled_dot_product_attention(qd, kd, vd, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qd, kd, vd, scale=scale)
    return out.transpose(1, 2).reshape(tq, h, -1)
