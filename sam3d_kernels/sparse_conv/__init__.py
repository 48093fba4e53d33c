"""Submanifold 3x3x3 sparse convolution (spconv `SubMConv3d` semantics, weights [Cout, 3, 3, 3, Cin]).

    nbr = build_neighbour_map(coords)                      # [N, 27], once per coordinate set
    out = submanifold_conv3d(feats, coords, weight, bias, neighbours=nbr)   # [N, Cout]

The dispatcher runs the Triton gather-GEMM (`triton.py`) for CUDA tensors when `triton` imports, and the
pure-PyTorch reference (`reference.py`) otherwise. `weight` and `bias` are cast to the dtype of `feats`
(as autocast would do for a dense layer); the output has the dtype of `feats`. A 1x1x1 sparse
convolution is a linear layer: `F.linear(feats, weight.reshape(Cout, Cin), bias)`.
"""

from __future__ import annotations

import torch

from .._triton import triton_available
from .reference import (
    KERNEL_OFFSETS,
    build_neighbour_map,
    check_conv_inputs,
    submanifold_conv3d_reference,
)

__all__ = ["KERNEL_OFFSETS", "build_neighbour_map", "submanifold_conv3d", "submanifold_conv3d_reference"]

_BACKENDS = ("auto", "reference", "triton")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def submanifold_conv3d(
    feats: torch.Tensor,
    coords: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    neighbours: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """feats [N, Cin], coords [N, 4] int (batch, x, y, z), weight [Cout, 3, 3, 3, Cin], bias [Cout] -> [N, Cout].

    out[p] = bias + sum_d W[:, d + 1, :] @ feats[coords[p] + d] over d in {-1, 0, 1}³, at the input sites
    only. `neighbours` = `build_neighbour_map(coords)`, computed here when not given. `backend`: "auto"
    (Triton for CUDA fp16/bf16/fp32 when triton imports, else the reference), "reference" or "triton".
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}; got {backend!r}")
    check_conv_inputs(feats, coords, weight, bias)
    if neighbours is None:
        neighbours = build_neighbour_map(coords)
    if neighbours.shape != (feats.shape[0], 27):
        raise ValueError(
            f"neighbours must be [N={feats.shape[0]}, 27] from build_neighbour_map(coords); "
            f"got {tuple(neighbours.shape)}"
        )
    weight = weight.to(feats.dtype)
    bias = None if bias is None else bias.to(feats.dtype)
    fast_ok = feats.is_cuda and feats.dtype in _TRITON_DTYPES
    use_triton = backend == "triton" or (backend == "auto" and fast_ok and triton_available())
    if not use_triton:
        return submanifold_conv3d_reference(feats, coords, weight, bias, neighbours)
    if not fast_ok:
        raise ValueError(
            f"backend='triton' needs CUDA fp16/bf16/fp32 tensors; feats is {feats.dtype} on {feats.device}. "
            "Use backend='auto'."
        )
    if not triton_available():
        raise ImportError(
            "backend='triton' needs the triton package (it ships with CUDA builds of torch): pip install triton"
        )
    from .triton import submanifold_conv3d_triton

    return submanifold_conv3d_triton(feats.contiguous(), weight, bias, neighbours.to(torch.int64))
