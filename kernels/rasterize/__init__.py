"""Triangle rasterization for texture baking and screen-space rendering (our own; no nvdiffrast).

    raster = rasterize(pos, faces, height, width)      # pos [V, 3] (x, y in pixels, z depth), faces [F, 3]
    raster.face_id                                     # [H, W] int32, -1 = empty
    raster.bary                                        # [H, W, 3] float32 weights of faces[f, 0..2]
    colours = interpolate(vertex_colours, faces, raster)   # [H, W, C]

Pixel (row i, col j) is centred at (x, y) = (j + 0.5, i + 0.5); y runs down the rows. Coverage is exact
(1/256-pixel snapping, int64 edge functions) with a top-left edge rule and a (depth, face index) tie rule:
see `reference.py`. A UV raster of a mesh is `rasterize(stack([u * W, v_row * H, 0]), faces, H, W)`.

The dispatcher runs the Triton coverage kernel (`triton.py`) for CUDA tensors when `triton` imports, and the
pure-PyTorch reference otherwise; both share the setup and resolve passes and return identical rasters.
Not differentiable: coverage is integer arithmetic and the barycentrics carry no gradient.
"""

from __future__ import annotations

import torch

from .._triton import triton_available
from .reference import (
    Raster,
    check_raster_inputs,
    interpolate,
    rasterize_reference,
    resolve,
    setup,
)

__all__ = ["Raster", "interpolate", "rasterize", "rasterize_reference"]

_BACKENDS = ("auto", "reference", "triton")


def rasterize(pos: torch.Tensor, faces: torch.Tensor, height: int, width: int, backend: str = "auto") -> Raster:
    """pos [V, 3] float (x, y in pixels, z = depth, smaller wins), faces [F, 3] int -> Raster of [H, W].

    Both windings are drawn; degenerate triangles (zero snapped area, non-finite coordinates) are skipped; no
    faces gives an empty raster. `backend`: "auto" (Triton for CUDA tensors when triton imports, else the
    reference), "reference" or "triton".
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}; got {backend!r}")
    check_raster_inputs(pos, faces, height, width)
    use_triton = backend == "triton" or (backend == "auto" and pos.is_cuda and triton_available())
    if not use_triton:
        return rasterize_reference(pos, faces, height, width)
    if not pos.is_cuda:
        raise ValueError(f"backend='triton' needs CUDA tensors; pos is on {pos.device}. Use backend='auto'.")
    if not triton_available():
        raise ImportError(
            "backend='triton' needs the triton package (it ships with CUDA builds of torch): pip install triton"
        )
    from .triton import coverage_triton

    st = setup(pos, faces, height, width)
    return resolve(coverage_triton(st, height, width), st, height, width)
