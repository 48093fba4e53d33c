"""The definition, in PyTorch: float32 statistics, one rounding to the input dtype at the end."""

from __future__ import annotations

import torch


def head_rms_norm_reference(x: torch.Tensor, gamma: torch.Tensor, eps: float = 1e-24) -> torch.Tensor:
    """y = x * rsqrt(mean(x^2, -1) + eps) * gamma, computed in float32, returned contiguous in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * gamma.float()
    return y.to(x.dtype).contiguous()
