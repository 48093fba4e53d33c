"""Shifted-window partition of sparse voxels (official `calc_window_partition`, spec §4.9).

A voxel (b, x, y, z) falls in window (b, ⌊(x+s)/w⌋, ⌊(y+s)/w⌋, ⌊(z+s)/w⌋). The window grid extent per
axis is ceil((max shifted coord + 1) / w), taken from the data over the whole batch, as in the official
code; windows are ordered by their linear id (batch-major). The official code sorts with a non-stable
argsort; we sort stably. Either order within a window gives the same attention (it is permutation-
equivariant), up to rounding.
"""

from __future__ import annotations

import torch


def window_partition(coords: torch.Tensor, window: int = 8, shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """coords [N, 4] integer (batch, x, y, z), non-negative -> (perm [N] int64, cu_seqlens [W + 1] int32).

    `coords[perm]` lists the voxels window by window; window i is rows cu_seqlens[i]:cu_seqlens[i+1] of
    it. Only non-empty windows appear.
    """
    if coords.ndim != 2 or coords.shape[1] != 4:
        raise ValueError(f"coords must be [N, 4] (batch, x, y, z); got {tuple(coords.shape)}")
    if window < 1 or shift < 0:
        raise ValueError(f"window must be >= 1 and shift >= 0; got window={window}, shift={shift}")
    device = coords.device
    if coords.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=device), torch.zeros(1, dtype=torch.int32, device=device)
    c = coords.to(torch.int64)
    shifted = c[:, 1:] + shift  # [N, 3]
    num = (shifted.amax(0) + 1 + window - 1) // window  # [3] windows per axis, from the data
    cell = shifted // window  # [N, 3]
    wid = ((c[:, 0] * num[0] + cell[:, 0]) * num[1] + cell[:, 1]) * num[2] + cell[:, 2]  # [N]
    wid_sorted, perm = torch.sort(wid, stable=True)
    counts = torch.unique_consecutive(wid_sorted, return_counts=True)[1]  # [W]
    cu_seqlens = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return perm, cu_seqlens
