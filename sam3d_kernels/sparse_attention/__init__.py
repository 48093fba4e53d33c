"""Sparse attention: variable-length (block-diagonal) attention and shifted-window attention on voxels.

    out = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k)        # q [Tq, H, D] -> [Tq, H, D]
    perm, cu = window_partition(coords, window=8, shift=4)
    out = windowed_attention(q, k, v, coords, window=8, shift=4)       # [N, H, D], in the order of coords

The dispatcher runs, for CUDA fp16/bf16 inputs, one batched dense SDPA call (cuDNN's kernel first,
`dense.py`) when all segments have equal length, else PyTorch's flash varlen op (`flash.py`) where this
PyTorch has it, and the per-segment SDPA reference (`reference.py`) otherwise (CPU, fp32, unusual head dims).
Full sparse self-attention over each batch item is `varlen_attention` with one segment per batch item.
"""

from __future__ import annotations

import torch

from .dense import dense_attention, equal_segments
from .flash import supports, varlen_attention_flash
from .reference import check_varlen_inputs, varlen_attention_reference
from .windows import window_partition

__all__ = ["varlen_attention", "varlen_attention_reference", "window_partition", "windowed_attention"]

_BACKENDS = ("auto", "reference", "flash", "dense")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """q [Tq, H, D], k [Tk, H, D], v [Tk, H, Dv], cu_seqlens [S + 1] -> [Tq, H, Dv] (see `reference.py`).

    `max_seqlen_*` (the longest segment) are computed from cu_seqlens when not given (a host sync).
    `backend`: "auto", "reference", "flash" (CUDA fp16/bf16 only) or "dense" (equal-length segments only).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}; got {backend!r}")
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    segments = cu_seqlens_q.shape[0] - 1
    if backend == "dense" or (backend == "auto" and supports(q, v) and max_seqlen_q and max_seqlen_k):
        mq = max_seqlen_q if max_seqlen_q is not None else int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        mk = max_seqlen_k if max_seqlen_k is not None else int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
        if equal_segments(q.shape[0], k.shape[0], segments, mq, mk):
            return dense_attention(q, k, v, segments, scale)
        if backend == "dense":
            raise ValueError("backend='dense' needs segments of equal length; use backend='auto'")
    use_flash = backend == "flash" or (backend == "auto" and supports(q, v))
    if not use_flash or q.shape[0] == 0:
        return varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale)
    if not supports(q, v):
        raise ValueError(
            f"backend='flash' needs CUDA fp16/bf16 inputs with equal head dims (multiple of 8, <= 256) and a PyTorch "
            f"with torch.nn.attention.varlen; got {q.dtype} on {q.device}, D={q.shape[-1]}. Use backend='auto'."
        )
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    if max_seqlen_k is None:
        max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    return varlen_attention_flash(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)


def windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coords: torch.Tensor,
    window: int = 8,
    shift: int = 0,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Self-attention within the (shifted) windows of the voxels: q, k, v [N, H, D], coords [N, 4] -> [N, H, D].

    Partition (`window_partition`), varlen attention on the permuted rows, un-permute: the output rows
    follow `coords`. The official decoders use window 8 and shift 4 on odd blocks.
    """
    if coords.ndim != 2 or coords.shape != (q.shape[0], 4):
        raise ValueError(f"coords must be [N={q.shape[0]}, 4] (batch, x, y, z); got {tuple(coords.shape)}")
    perm, cu = window_partition(coords, window, shift)
    out_sorted = varlen_attention(q[perm], k[perm], v[perm], cu, cu, scale=scale, backend=backend)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.shape[0], device=perm.device)
    return out_sorted[inverse]
