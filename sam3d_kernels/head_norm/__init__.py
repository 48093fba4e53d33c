"""Per-head RMS normalisation with a gain: y = x / rms(x) * gamma over the last dim (the q/k norm of the
flow transformers' attention).

    y = head_rms_norm(q, gamma)          # q [..., H, D] (any strides, e.g. a slice of a packed qkv), gamma [H, D]

For CUDA fp16/bf16 inputs with `triton` present, one Triton pass (`triton.py`) reads the strided input and
writes a contiguous output, computing in float32 and rounding once; otherwise the PyTorch reference
(`reference.py`). Inference only (no backward): training paths use the reference.
"""

from __future__ import annotations

import torch

from .._triton import triton_available
from .reference import head_rms_norm_reference

__all__ = ["head_rms_norm", "head_rms_norm_reference"]


def head_rms_norm(x: torch.Tensor, gamma: torch.Tensor, eps: float = 1e-24, backend: str = "auto") -> torch.Tensor:
    """x [..., H, D], gamma [H, D] -> [..., H, D] contiguous, in x's dtype."""
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"backend must be 'auto', 'reference' or 'triton'; got {backend!r}")
    if x.ndim < 2 or x.shape[-2:] != gamma.shape:
        raise ValueError(f"x must be [..., H, D] with gamma [H, D]; got x {tuple(x.shape)}, gamma {tuple(gamma.shape)}")
    fast = (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and triton_available()
        and not (torch.is_grad_enabled() and (x.requires_grad or gamma.requires_grad))
    )
    if backend == "triton" and not fast:
        raise ValueError("backend='triton' needs CUDA fp16/bf16 inputs without gradients and the triton package")
    if backend == "reference" or not fast or x.numel() == 0:
        return head_rms_norm_reference(x, gamma, eps)
    from .triton import head_rms_norm_triton

    return head_rms_norm_triton(x, gamma, eps)
