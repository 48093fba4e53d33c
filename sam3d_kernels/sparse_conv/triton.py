"""Triton fast path for the submanifold 3x3x3 sparse convolution: an implicit gather-GEMM.

Each program computes a [BLOCK_N sites, BLOCK_CO output channels] tile of the output. It walks the 27
offsets; for each one it gathers the neighbouring rows of `feats` through the neighbour map (absent
neighbours load zeros) and multiplies them by the offset's [Cin, Cout] weight slice, accumulating in fp32
with `tl.dot`. An offset that no site of the tile has is skipped (on a surface shell most are absent).
The weight is re-laid out once per call to [27, Cin, Cout] so that its tile loads are contiguous.

Autograd (`SubmConvFunction`): the input gradient is itself a submanifold convolution of `grad_out` with
the flipped, transposed kernel (site q receives W_k^T grad_out[p] from every p with q = p + d_k, i.e.
p = q + d_(26-k)), so it runs on the same Triton kernel. The weight gradient uses the reference
formulation (`submanifold_conv3d_weight_grad`: one gather + cuBLAS matmul per offset) and the bias gradient
is a column sum.

Imported lazily by the dispatcher in `sam3d_kernels.sparse_conv`; importing this module needs `triton`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import submanifold_conv3d_weight_grad

_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_CO": bco, "BLOCK_CI": bci}, num_warps=w, num_stages=s)
    for bn, bco, bci, w, s in [
        (64, 64, 32, 4, 3),
        (128, 64, 32, 4, 3),
        (64, 128, 32, 4, 3),
        (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 2),
        (32, 64, 64, 4, 3),
        (64, 32, 32, 4, 4),
    ]
]


@triton.autotune(configs=_CONFIGS, key=["CIN", "COUT"])
@triton.jit
def _subm_conv3d_kernel(
    x_ptr,  # [N, CIN] contiguous
    w_ptr,  # [27, CIN, COUT] contiguous
    nbr_ptr,  # [N, 27] int64, -1 where absent
    b_ptr,  # [COUT] or a dummy pointer
    out_ptr,  # [N, COUT] contiguous
    N,
    CIN: tl.constexpr,  # compile-time: the channel loop unrolls, and Triton's interpreter needs a plain int here
    COUT,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_CI: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_co = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cos = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    row_ok = rows < N
    co_ok = cos < COUT
    acc = tl.zeros((BLOCK_N, BLOCK_CO), dtype=tl.float32)
    for k in range(27):
        nb = tl.load(nbr_ptr + rows.to(tl.int64) * 27 + k, mask=row_ok, other=-1)
        if tl.max(nb, axis=0) >= 0:
            nb_ok = nb >= 0
            nb_safe = tl.where(nb_ok, nb, 0)
            for c0 in range(0, CIN, BLOCK_CI):
                cis = c0 + tl.arange(0, BLOCK_CI)
                ci_ok = cis < CIN
                a = tl.load(
                    x_ptr + nb_safe[:, None] * CIN + cis[None, :],
                    mask=nb_ok[:, None] & ci_ok[None, :],
                    other=0.0,
                )
                w = tl.load(
                    w_ptr + (k * CIN + cis[:, None]).to(tl.int64) * COUT + cos[None, :],
                    mask=ci_ok[:, None] & co_ok[None, :],
                    other=0.0,
                )
                if IEEE:
                    acc = tl.dot(a, w, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, w, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cos, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * COUT + cos[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & co_ok[None, :])


def _launch(
    feats: torch.Tensor,
    w_kic: torch.Tensor,
    bias: torch.Tensor | None,
    nbr: torch.Tensor,
    config: dict | None = None,
) -> torch.Tensor:
    """feats [N, Cin], w_kic [27, Cin, Cout] (same dtype), bias [Cout] | None, nbr [N, 27] int64 -> [N, Cout].

    `config` fixes the block sizes ({"BLOCK_N", "BLOCK_CO", "BLOCK_CI"}) instead of autotuning; the tests
    use it to run the kernel under TRITON_INTERPRET=1, where the autotuner cannot time configs.
    """
    n, cin = feats.shape
    cout = w_kic.shape[2]
    out = torch.empty(n, cout, dtype=feats.dtype, device=feats.device)
    if n == 0 or cout == 0:
        return out
    if cin == 0:
        return out.zero_() + (bias if bias is not None else 0)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(cout, meta["BLOCK_CO"]))

    kernel = _subm_conv3d_kernel if config is None else _subm_conv3d_kernel.fn
    kernel[grid](
        feats.contiguous(),
        w_kic.contiguous(),
        nbr.contiguous(),
        bias if bias is not None else out,
        out,
        n,
        cin,
        cout,
        HAS_BIAS=bias is not None,
        IEEE=feats.dtype == torch.float32,
        **(config or {}),
    )
    return out


class SubmConvFunction(torch.autograd.Function):
    """out = submanifold_conv3d(feats, weight, bias) on a fixed neighbour map; see the module doc for backward."""

    @staticmethod
    def forward(ctx, feats, weight, bias, neighbours):
        cout, cin = weight.shape[0], weight.shape[4]
        w_kic = weight.reshape(cout, 27, cin).permute(1, 2, 0).contiguous()  # [27, Cin, Cout]
        ctx.save_for_backward(feats, weight, neighbours)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _launch(feats, w_kic, bias, neighbours)

    @staticmethod
    def backward(ctx, grad_out):
        feats, weight, neighbours = ctx.saved_tensors
        cout, cin = weight.shape[0], weight.shape[4]
        grad_out = grad_out.contiguous()
        grad_feats = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # Transposed conv = conv with w'[k] = W[26 - k]^T, laid out [27, Cout, Cin].
            w_flip = weight.reshape(cout, 27, cin).flip(1).permute(1, 0, 2).contiguous()
            grad_feats = _launch(grad_out, w_flip.to(grad_out.dtype), None, neighbours).to(feats.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = submanifold_conv3d_weight_grad(grad_out, feats, neighbours, cin).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_out.float().sum(0).to(ctx.bias_dtype)
        return grad_feats, grad_weight, grad_bias, None


def submanifold_conv3d_triton(
    feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, neighbours: torch.Tensor
) -> torch.Tensor:
    """feats [N, Cin] CUDA fp16/bf16/fp32, weight [Cout, 3, 3, 3, Cin] (same dtype), neighbours [N, 27] -> [N, Cout]."""
    return SubmConvFunction.apply(feats, weight, bias, neighbours)
