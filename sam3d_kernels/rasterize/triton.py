"""Triton fast path for the coverage pass of `rasterize` and `rasterize_batch`: one program per triangle, an int64
atomic min per pixel.

Program t walks the pixel centres of triangle t's clipped bounding box in flat blocks of BLOCK, evaluates the
three integer edge functions exactly as `reference.coverage_reference` does, and for covered centres
atomically min-reduces the packed (depth, triangle) key into its view's [H * W] band of the [views * H * W]
buffer (the box is clipped to the view, so a triangle never writes outside its band). The setup before and the
resolve after are the shared PyTorch passes of `reference.py`, so both backends give the same bits: the edge
values are exact int64, and the depth is computed in the reference's float32 order with FMA contraction
turned off (`enable_fp_fusion=False`).

Imported lazily by the dispatcher in `sam3d_kernels.rasterize`; importing this module needs `triton`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import EMPTY_KEY, SUBPIXEL, Setup

_BLOCK = 128


@triton.jit
def _coverage_kernel(
    coef_ptr,  # [T, 3, 4] int64: (A, B, C, bias) per edge
    zw_ptr,  # [T, 4] float32: z0, z1, z2, 1 / (2 area)
    box_ptr,  # [T, 4] int64: first column, first row, width, height
    view_ptr,  # [T] int64: the view (band of the buffer) of each triangle
    key_ptr,  # [views * H * W] int64, EMPTY_KEY-initialised
    width,
    band,  # H * W, pixels per view
    SUB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    c = coef_ptr + t * 12
    a0, b0, c0, d0 = tl.load(c + 0), tl.load(c + 1), tl.load(c + 2), tl.load(c + 3)
    a1, b1, c1, d1 = tl.load(c + 4), tl.load(c + 5), tl.load(c + 6), tl.load(c + 7)
    a2, b2, c2, d2 = tl.load(c + 8), tl.load(c + 9), tl.load(c + 10), tl.load(c + 11)
    z0, z1, z2 = tl.load(zw_ptr + t * 4 + 0), tl.load(zw_ptr + t * 4 + 1), tl.load(zw_ptr + t * 4 + 2)
    inv = tl.load(zw_ptr + t * 4 + 3)
    col0, row0 = tl.load(box_ptr + t * 4 + 0), tl.load(box_ptr + t * 4 + 1)
    bw = tl.load(box_ptr + t * 4 + 2).to(tl.int32)
    bh = tl.load(box_ptr + t * 4 + 3).to(tl.int32)
    n = bw * bh
    base = key_ptr + tl.load(view_ptr + t) * band  # int64: the start of the triangle's view
    for start in range(0, n, BLOCK):
        k = start + tl.arange(0, BLOCK)  # int32 flat index in the box
        ok = k < n
        dy = k // bw
        col = col0 + (k - dy * bw).to(tl.int64)
        row = row0 + dy.to(tl.int64)
        px = col * SUB + SUB // 2
        py = row * SUB + SUB // 2
        e0 = a0 * px + b0 * py + c0
        e1 = a1 * px + b1 * py + c1
        e2 = a2 * px + b2 * py + c2
        inside = ok & (e0 + d0 > 0) & (e1 + d1 > 0) & (e2 + d2 > 0)
        w0 = e0.to(tl.float32) * inv
        w1 = e1.to(tl.float32) * inv
        w2 = e2.to(tl.float32) * inv
        z = w0 * z0 + w1 * z1 + w2 * z2
        bits = z.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, (bits ^ 0x7FFFFFFF) + 1, bits)
        key = (ordered.to(tl.int64) << 32) | t
        tl.atomic_min(base + row * width + col, key, mask=inside)


def coverage_triton(st: Setup, height: int, width: int, views: int = 1) -> torch.Tensor:
    """The Triton twin of `reference.coverage_reference` (CUDA tensors) -> [views * H * W] int64 keys."""
    key = torch.full((views * height * width,), EMPTY_KEY, dtype=torch.int64, device=st.face.device)
    if st.face.numel() == 0:
        return key
    _coverage_kernel[(st.face.shape[0],)](
        st.coef,
        st.zw,
        st.box,
        st.view,
        key,
        width,
        height * width,
        SUB=SUBPIXEL,
        BLOCK=_BLOCK,
        num_warps=4,
        enable_fp_fusion=False,
    )
    return key
