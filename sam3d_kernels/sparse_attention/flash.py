"""Fast path for variable-length attention: PyTorch's own flash varlen op.

PyTorch ships `torch.nn.attention.varlen.varlen_attn` (flash-attention's varlen kernels, forward and
backward, CUDA fp16/bf16; added in PyTorch 2.10), so there is no Triton kernel of ours here. It is
imported on call; `varlen_attn_available()` says whether this PyTorch build has it. Builds whose
`varlen_attn` has no `scale` argument get a custom scale by pre-scaling q.
"""

from __future__ import annotations

import importlib.util
import inspect

import torch


def varlen_attn_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def supports(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Inputs the flash kernel takes: CUDA, fp16/bf16, head dims equal, a multiple of 8 and at most 256."""
    d = q.shape[-1]
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and v.shape[-1] == d
        and d % 8 == 0
        and d <= 256
        and varlen_attn_available()
    )


def varlen_attention_flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Same contract as `varlen_attention_reference`; cu_seqlens are passed as int32 on q's device."""
    from torch.nn.attention.varlen import varlen_attn

    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32)
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32)
    kwargs = {}
    if scale is not None:
        if "scale" in inspect.signature(varlen_attn).parameters:
            kwargs["scale"] = scale
        else:
            q = q * (scale * q.shape[-1] ** 0.5)  # the op applies 1/sqrt(D)
    return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max_seqlen_q, max_seqlen_k, **kwargs)
