"""Triangle rasterization for texture baking and screen-space rendering (our own; no nvdiffrast).

    raster = rasterize(pos, faces, height, width)      # pos [V, 3] (x, y in pixels, z depth), faces [F, 3]
    raster.face_id                                     # [H, W] int32, -1 = empty
    raster.bary                                        # [H, W, 3] float32 weights of faces[f, 0..2]
    colours = interpolate(vertex_colours, faces, raster)   # [H, W, C]

    batch = rasterize_batch(pos, faces, face_view, views, height, width)   # face_view [F]: each face's view
    batch.face_id, batch.bary                          # [views, H, W] (indices into faces), [views, H, W, 3]

Pixel (row i, col j) is centred at (x, y) = (j + 0.5, i + 0.5); y runs down the rows. Coverage is exact
(1/256-pixel snapping, int64 edge functions) with a top-left edge rule and a (depth, face index) tie rule:
see `reference.py`. A UV raster of a mesh is `rasterize(stack([u * W, v_row * H, 0]), faces, H, W)`.

A batch rasterises many independent views of one size in one coverage pass (one kernel launch, however many
views): each face is drawn into its own view only, with its coordinates in that view's pixels and its box clipped
to it, so view b equals `rasterize` of view b's faces alone, bit for bit. What it saves is the per-call overhead
(setup, launches, syncs) of many small rasters; at most 2^31 - 1 faces per call, all views together.

The dispatcher runs the Triton coverage kernel (`triton.py`) for CUDA tensors when `triton` imports, and the
pure-PyTorch reference otherwise; both share the setup and resolve passes and return identical rasters.
Not differentiable: coverage is integer arithmetic and the barycentrics carry no gradient.
"""

from __future__ import annotations

import torch

from .._triton import triton_available
from .reference import (
    Raster,
    check_batch_inputs,
    check_raster_inputs,
    interpolate,
    rasterize_batch_reference,
    rasterize_reference,
    resolve,
    setup,
)

__all__ = ["Raster", "interpolate", "rasterize", "rasterize_batch", "rasterize_batch_reference", "rasterize_reference"]

_BACKENDS = ("auto", "reference", "triton")


def rasterize(pos: torch.Tensor, faces: torch.Tensor, height: int, width: int, backend: str = "auto") -> Raster:
    """pos [V, 3] float (x, y in pixels, z = depth, smaller wins), faces [F, 3] int -> Raster of [H, W].

    Both windings are drawn; degenerate triangles (zero snapped area, non-finite coordinates) are skipped; no
    faces gives an empty raster. `backend`: "auto" (Triton for CUDA tensors when triton imports, else the
    reference), "reference" or "triton".
    """
    check_raster_inputs(pos, faces, height, width)
    if not _use_triton(pos, backend):
        return rasterize_reference(pos, faces, height, width)
    from .triton import coverage_triton

    st = setup(pos, faces, height, width)
    return resolve(coverage_triton(st, height, width), st, height, width)


def rasterize_batch(
    pos: torch.Tensor,
    faces: torch.Tensor,
    face_view: torch.Tensor,
    views: int,
    height: int,
    width: int,
    backend: str = "auto",
) -> Raster:
    """Many views in one pass: pos [V, 3] (each vertex in the pixels of the views that use it), faces [F, 3],
    face_view [F] int (the view 0 .. views - 1 each face is drawn into) -> Raster of [views, H, W].

    face_id indexes `faces` (the whole batch's); view b is bit for bit `rasterize(pos, faces[face_view == b], ...)`
    with its face ids mapped back. Ties within a view go to the smaller index in `faces`, as in `rasterize`.
    `backend` as in `rasterize`.
    """
    check_batch_inputs(pos, faces, face_view, views, height, width)
    if not _use_triton(pos, backend):
        return rasterize_batch_reference(pos, faces, face_view, views, height, width)
    from .triton import coverage_triton

    st = setup(pos, faces, height, width, face_view)
    return resolve(coverage_triton(st, height, width, views), st, height, width, views)


def _use_triton(pos: torch.Tensor, backend: str) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}; got {backend!r}")
    if backend == "reference" or (backend == "auto" and not (pos.is_cuda and triton_available())):
        return False
    if not pos.is_cuda:
        raise ValueError(f"backend='triton' needs CUDA tensors; pos is on {pos.device}. Use backend='auto'.")
    if not triton_available():
        raise ImportError(
            "backend='triton' needs the triton package (it ships with CUDA builds of torch): pip install triton"
        )
    return True
