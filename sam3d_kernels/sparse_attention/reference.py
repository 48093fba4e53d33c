"""Variable-length (block-diagonal) attention in pure PyTorch: the reference and the CPU fallback.

Packed layout, as in flash-attention's varlen API:
  q [Tq, H, D], k [Tk, H, D], v [Tk, H, Dv]; segment i is rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q
  and rows cu_seqlens_k[i]:cu_seqlens_k[i+1] of k and v; cu_seqlens_* [S + 1] integer, starting at 0.
  out [Tq, H, Dv]: every query attends to the keys of its own segment only (softmax scale 1/sqrt(D) by
  default). A query segment whose key segment is empty gets zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_varlen_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor
):
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3 or k.shape[:2] != v.shape[:2] or q.shape[1:] != k.shape[1:]:
        raise ValueError(
            f"q, k, v must be packed [T, H, D] with matching H and D (and k, v matching T); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if cu_seqlens_q.ndim != 1 or cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.numel() == 0:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must both be [S + 1] (S segments); got {tuple(cu_seqlens_q.shape)} "
            f"and {tuple(cu_seqlens_k.shape)}"
        )


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """q [Tq, H, D], k [Tk, H, D], v [Tk, H, Dv], cu_seqlens [S + 1] -> [Tq, H, Dv]; one SDPA call per segment."""
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if bq[-1] != q.shape[0] or bk[-1] != k.shape[0]:
        raise ValueError(
            f"cu_seqlens must end at the packed lengths: cu_seqlens_q[-1]={bq[-1]} vs Tq={q.shape[0]}, "
            f"cu_seqlens_k[-1]={bk[-1]} vs Tk={k.shape[0]}"
        )
    pieces = []
    for i in range(len(bq) - 1):
        q0, q1, k0, k1 = bq[i], bq[i + 1], bk[i], bk[i + 1]
        if q1 == q0:
            continue
        if k1 == k0:
            pieces.append(v.new_zeros(q1 - q0, q.shape[1], v.shape[2]))
            continue
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1]))  # [1, H, L, D]
        pieces.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale)[0].transpose(0, 1))
    if not pieces:
        return v.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    return torch.cat(pieces)
