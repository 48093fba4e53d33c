"""Sparse 2x down/upsampling in pure PyTorch (the reference, the CPU fallback and the GPU path).

No Triton here: both ops are one `unique` plus one scatter / gather, which PyTorch already runs as single
bandwidth-bound kernels (see bench/kernels.py).

Layouts: coords [N, 4] integer (batch, x, y, z), non-negative; feats [N, C].
"""

from __future__ import annotations

import torch


def downsample2(coords: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Average-pool 2x2x2 cells: coords [N, 4], feats [N, C] -> (coords_down [M, 4], feats_down [M, C], inverse [N]).

    Matches the official `SparseDownsample(2)`: spatial coords //= 2 (the batch index is kept), parents in
    sorted (batch, x, y, z) order, and each parent's mean computed with
    `scatter_reduce(zeros, "mean", include_self=True)`, so the zero initial value counts and every mean
    divides by (children + 1). `inverse[i]` is the parent row of input row i (for `upsample2`).
    """
    if coords.ndim != 2 or coords.shape[1] != 4 or feats.ndim != 2 or feats.shape[0] != coords.shape[0]:
        raise ValueError(
            f"coords must be [N, 4] (batch, x, y, z) and feats [N, C]; got coords {tuple(coords.shape)} "
            f"and feats {tuple(feats.shape)}"
        )
    if coords.shape[0] == 0:
        return coords.clone(), feats.clone(), torch.empty(0, dtype=torch.int64, device=coords.device)
    parent = coords.to(torch.int64).clone()
    parent[:, 1:] = parent[:, 1:] // 2
    ext = parent[:, 1:].amax(0) + 1  # [3]; the official code also takes the extent from the data
    stride = torch.stack([ext[0] * ext[1] * ext[2], ext[1] * ext[2], ext[2], torch.ones_like(ext[2])])
    code = (parent * stride).sum(1)  # [N]
    code, inverse = torch.unique(code, sorted=True, return_inverse=True)  # sorted code = (b, x, y, z) order
    coords_down = torch.stack([code // stride[0]] + [(code // stride[i + 1]) % ext[i] for i in range(3)], dim=1)
    feats_down = torch.scatter_reduce(
        feats.new_zeros(code.shape[0], feats.shape[1]),
        0,
        inverse[:, None].expand(-1, feats.shape[1]),
        feats,
        reduce="mean",
        include_self=True,
    )
    return coords_down.to(coords.dtype), feats_down, inverse


def upsample2(feats_down: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Copy parent features back to the children: feats_down [M, C], inverse [N] from `downsample2` -> [N, C].

    The output rows follow the original (pre-downsampling) order, so the original coords go with it.
    """
    if feats_down.ndim != 2 or inverse.ndim != 1:
        raise ValueError(
            f"feats_down must be [M, C] and inverse [N]; got {tuple(feats_down.shape)} and {tuple(inverse.shape)}"
        )
    return feats_down[inverse]
