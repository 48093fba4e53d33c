"""Submanifold 3x3x3 sparse convolution in pure PyTorch (the reference and the CPU fallback).

Layouts:
  coords  [N, 4] integer (batch, x, y, z), non-negative, unique rows
  feats   [N, Cin]
  weight  [Cout, kD, kH, kW, Cin], spconv's SubMConv3d layout; kD runs along x, kH along y, kW along z
  out     [N, Cout], one row per input site (submanifold: the sparsity pattern does not change)

Semantics (spconv SubMConv3d, i.e. dense cross-correlation restricted to the active sites):
  out[p] = bias + sum_{d in {-1,0,1}^3} W[:, d + 1, :] @ feats[site at coords[p] + d]   (absent sites count as 0)
This equals torch Conv3d(padding=1) with weight.permute(0, 4, 1, 2, 3) on the scattered dense grid, and
spconv 2.3.8's SubMConv3d with the same weight tensor (both checked in tests/kernels/test_sparse_conv.py).

A 1x1x1 sparse convolution (weight [Cout, 1, 1, 1, Cin]) needs no kernel: it is
`F.linear(feats, weight.reshape(Cout, Cin), bias)`.
"""

from __future__ import annotations

import torch

KERNEL_OFFSETS = torch.tensor([(dx, dy, dz) for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1)])
"""[27, 3] offsets in the order of the flattened (kD, kH, kW) weight axes: k = 9 (dx+1) + 3 (dy+1) + (dz+1)."""


def check_conv_inputs(feats: torch.Tensor, coords: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    if feats.ndim != 2 or coords.ndim != 2 or coords.shape != (feats.shape[0], 4):
        raise ValueError(
            f"feats must be [N, Cin] and coords [N, 4] (batch, x, y, z); got feats {tuple(feats.shape)} "
            f"and coords {tuple(coords.shape)}"
        )
    cin = feats.shape[1]
    if weight.ndim != 5 or tuple(weight.shape[1:4]) != (3, 3, 3) or weight.shape[4] != cin:
        raise ValueError(
            f"weight must be spconv's [Cout, 3, 3, 3, Cin] with Cin={cin}; got {tuple(weight.shape)} "
            "(a [Cout, Cin, 3, 3, 3] torch Conv3d weight needs .permute(0, 2, 3, 4, 1))"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [Cout={weight.shape[0]}]; got {tuple(bias.shape)}")


def build_neighbour_map(coords: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """For each site and each of the kernel³ offsets, the row of the neighbouring site, or -1.

    coords [N, 4] integer (batch, x, y, z), non-negative and unique -> [N, kernel³] int64, offsets ordered as
    the flattened (kD, kH, kW) weight axes. Computed once per coordinate set and shared by every convolution
    on it. A hash by sorting: sites are linearised to int64 keys, sorted once, and every neighbour key is
    looked up with `searchsorted` (vectorised; no loop over sites).
    """
    if kernel != 3:
        raise ValueError(f"kernel must be 3 (the only size the models use); got {kernel}")
    if coords.ndim != 2 or coords.shape[1] != 4:
        raise ValueError(f"coords must be [N, 4] (batch, x, y, z); got {tuple(coords.shape)}")
    n = coords.shape[0]
    if n == 0:
        return torch.empty(0, 27, dtype=torch.int64, device=coords.device)
    c = coords.to(torch.int64)
    # Pad each spatial axis by one on both sides so that p + d never wraps into a neighbouring row.
    ext = c[:, 1:].amax(0) + 3  # [3]
    c = c.clone()
    c[:, 1:] += 1
    stride = torch.stack([ext[0] * ext[1] * ext[2], ext[1] * ext[2], ext[2], torch.ones_like(ext[2])])  # [4]
    keys = (c * stride).sum(1)  # [N]
    sorted_keys, order = torch.sort(keys)
    delta = (KERNEL_OFFSETS.to(c.device) * stride[1:]).sum(1)  # [27]
    query = keys[:, None] + delta[None, :]  # [N, 27]
    pos = torch.searchsorted(sorted_keys, query).clamp_(max=n - 1)
    found = sorted_keys[pos] == query
    return torch.where(found, order[pos], torch.full_like(pos, -1))


def submanifold_conv3d_reference(
    feats: torch.Tensor,
    coords: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    neighbours: torch.Tensor | None = None,
) -> torch.Tensor:
    """feats [N, Cin], coords [N, 4], weight [Cout, 3, 3, 3, Cin], bias [Cout] -> [N, Cout] (see module doc).

    One gather and one [N, Cin] x [Cin, Cout] matmul per offset, in the dtype of `feats`; autograd comes
    from the ops themselves. `neighbours` is `build_neighbour_map(coords)`, recomputed when not given.
    """
    check_conv_inputs(feats, coords, weight, bias)
    if neighbours is None:
        neighbours = build_neighbour_map(coords)
    n, cout = feats.shape[0], weight.shape[0]
    w = weight.reshape(cout, 27, -1)  # [Cout, 27, Cin]
    padded = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])  # [N + 1, Cin]; row N is the absent site
    idx = torch.where(neighbours < 0, n, neighbours)  # [N, 27]
    out = feats.new_zeros(n, cout)
    for k in range(27):
        out = out + padded[idx[:, k]] @ w[:, k, :].t()
    if bias is not None:
        out = out + bias
    return out


def submanifold_conv3d_weight_grad(
    grad_out: torch.Tensor, feats: torch.Tensor, neighbours: torch.Tensor, cin: int
) -> torch.Tensor:
    """dL/dW [Cout, 3, 3, 3, Cin] = sum_p grad_out[p] ⊗ feats[nbr(p, k)], one gather + matmul per offset.

    Used by the Triton path's backward. The matmuls run in the input dtype (cuBLAS accumulates fp16/bf16
    products in fp32) and the result is returned in fp32.
    """
    n, cout = grad_out.shape
    padded = torch.cat([feats, feats.new_zeros(1, cin)]).to(grad_out.dtype)  # [N + 1, Cin]
    idx = torch.where(neighbours < 0, n, neighbours)  # [N, 27]
    g = grad_out.t()  # [Cout, N]
    dw = torch.stack([(g @ padded[idx[:, k]]).float() for k in range(27)], dim=1)  # [Cout, 27, Cin]
    return dw.reshape(cout, 3, 3, 3, cin)
