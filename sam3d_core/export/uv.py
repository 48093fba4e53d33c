"""UV unwrapping with xatlas (the `export` extra), in the object's local frame.

UV convention: glTF's (see `cleanup.py`'s module docstring): (0, 0) is the top-left of texel [row 0, col 0].
"""

from __future__ import annotations

import importlib
import math
import sys
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam3d_core.export.cleanup import (
    as_numpy,
    check_mesh,
    clean_mesh,
    drop_floaters,
    optional_import,
    simplify_piece,
    split_mesh,
    stitch_pieces,
)

__all__ = ["UVMesh", "clean_and_unwrap", "decimate_and_unwrap", "unwrap_uv", "worker_init", "worker_ready"]


@dataclass
class UVMesh:
    """Result of `unwrap_uv`. Vertices are split along chart seams: vertices [V', 3] = input[vmapping],
    faces [F, 3] (same face order as the input), uvs [V', 2] float32 in [0, 1] (glTF convention, module
    docstring), vmapping [V'] int64 index of each new vertex in the input (carry colours with it)."""

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    vmapping: np.ndarray


def unwrap_uv(
    vertices: np.ndarray,
    faces: np.ndarray,
    *,
    texture_size: int = 1024,
    padding: int = 2,
    chart_iterations: int = 1,
    piece_faces: int | None = 5000,
) -> UVMesh:
    """xatlas charts packed for a texture_size^2 texture, `padding` texels between charts.

    chart_iterations is xatlas' ChartOptions.max_iterations (1, its default, as the official code); 0 skips
    chart refinement: about a fifth of the time for ~1.2-1.7x as many charts (more texture seams).

    piece_faces: meshes with more faces are cut into pieces of at most this many (halved at the median face
    centre along the longest extent, recursively), handed to xatlas as separate meshes of one atlas: xatlas
    grows charts per mesh in time superlinear in its faces (and on its own thread per mesh), then packs every
    chart together. The cuts become chart borders; at 5000 faces per piece that changed the chart count by
    under 1% on a stage-2 mesh decimated to 20k faces, for a third of the time. None: one piece.

    xatlas picks its atlas size close to (not exactly) texture_size; the UVs are scaled uniformly so the
    larger side spans [0, 1], so the final gap is padding x texture_size / atlas size texels (0.7-0.9x padding
    on typical meshes). Slow on large meshes (chart growth): decimate first.
    """
    v, f, _ = check_mesh(vertices, faces, None)
    if texture_size < 16:
        raise ValueError(f"texture_size={texture_size}: expected at least 16 texels")
    if piece_faces is not None and piece_faces < 1:
        raise ValueError(f"piece_faces={piece_faces}: expected a positive face count, or None for one piece")
    xatlas = optional_import("xatlas")
    atlas = xatlas.Atlas()
    pieces = _split_faces(v[f].mean(axis=1), piece_faces or len(f))
    used = []  # per piece: the input vertices it uses
    for idx in pieces:
        ids, local = np.unique(f[idx], return_inverse=True)
        atlas.add_mesh(v[ids].astype(np.float32), local.reshape(-1, 3).astype(np.uint32))
        used.append(ids)
    pack = xatlas.PackOptions()
    pack.resolution = texture_size
    pack.padding = padding
    pack.bilinear = True  # keep a half-texel border inside each chart for bilinear sampling
    charts = xatlas.ChartOptions()
    charts.max_iterations = chart_iterations
    atlas.generate(charts, pack)
    if atlas.atlas_count != 1:
        raise RuntimeError(f"xatlas produced {atlas.atlas_count} atlases; expected 1 (texture_size={texture_size})")
    new_faces, vmapping, uvs = np.empty_like(f), [], []
    offset = 0
    for k, (idx, ids) in enumerate(zip(pieces, used, strict=True)):
        piece_vmapping, piece_faces_out, piece_uvs = atlas[k]
        new_faces[idx] = piece_faces_out.astype(np.int64) + offset
        vmapping.append(ids[piece_vmapping.astype(np.int64)])
        uvs.append(piece_uvs)
        offset += len(piece_vmapping)
    vmapping = np.concatenate(vmapping)
    # xatlas normalises u by the atlas width and v by its height: back to texels, then one scale for both
    uvs = np.concatenate(uvs).astype(np.float64) * [atlas.width, atlas.height] / max(atlas.width, atlas.height)
    return UVMesh(v[vmapping].astype(np.float32), new_faces, uvs.astype(np.float32), vmapping)


def _split_faces(centres: np.ndarray, max_faces: int) -> list[np.ndarray]:
    """Face index groups of at most max_faces: recursive halving at the median of the face centres [F, 3] along
    their longest extent. Deterministic (stable sorts), every face in exactly one group."""
    out, stack = [], [np.arange(len(centres))]
    while stack:
        idx = stack.pop()
        if len(idx) <= max_faces:
            out.append(idx)
            continue
        c = centres[idx]
        order = idx[np.argsort(c[:, np.argmax(c.max(axis=0) - c.min(axis=0))], kind="stable")]
        stack += [order[len(order) // 2 :], order[: len(order) // 2]]
    return out


# ---------------------------------------------------------------------------------------------------------
# the whole chain from the dense stage-2 mesh to an unwrapped low-poly mesh


def _simplify_timed(vertices: np.ndarray, faces: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray, float]:
    t = time.perf_counter()
    v, f = simplify_piece(vertices, faces, target)
    return v, f, time.perf_counter() - t


def clean_and_unwrap(
    parts: list[tuple[np.ndarray, np.ndarray]],
    target_faces: int | None,
    texture_size: int,
    piece_faces: int | None = 5000,
) -> tuple[UVMesh, dict[str, Any]]:
    """Join mesh parts (`stitch_pieces`), `clean_mesh` the result (decimating it to target_faces) and
    `unwrap_uv` it. A module-level function of plain arrays, so a process pool can run it. -> (UVMesh, the
    clean-up report with `uv_seconds` added)."""
    v, f = stitch_pieces(parts)
    cleaned = clean_mesh(v, f, None, target_faces=target_faces)
    t = time.perf_counter()
    uv = unwrap_uv(cleaned.vertices, cleaned.faces, texture_size=texture_size, piece_faces=piece_faces)
    return uv, {**cleaned.report, "uv_seconds": round(time.perf_counter() - t, 3)}


def decimate_and_unwrap(
    vertices: Any,
    faces: Any,
    *,
    target_faces: int | None,
    texture_size: int = 1024,
    executor: Executor | None = None,
    pieces: int = 16,
    first_pass: float = 4.0,
    min_piece_faces: int = 20000,
    uv_piece_faces: int | None = 5000,
) -> tuple[UVMesh, dict[str, Any]]:
    """Dense stage-2 mesh -> cleaned, decimated, unwrapped mesh (the geometry of the exported object).

    vertices [V, 3], faces [F, 3]: torch tensors (the split runs on their device, e.g. the GPU) or numpy arrays.
    Steps: 1. when the mesh has more than 2 x first_pass x target_faces faces, drop its floaters
    (`drop_floaters`, on the GPU when the tensors are there), cut it into up to `pieces` parts
    (`split_mesh`, at least min_piece_faces faces each) and decimate every part to its share of
    first_pass x target_faces faces with its borders kept (`simplify_piece`), the parts in parallel on
    `executor`; 2. join the parts, `clean_mesh` (floaters, winding, inner shells, holes, and the final
    decimation to target_faces) and `unwrap_uv`, as one task on `executor`.

    executor: a concurrent.futures executor (a process pool: fast_simplification and xatlas hold the GIL) or
    None to run everything here, one step after another; the result is the same either way. The parts are
    fixed by the mesh (not by the number of workers), so results do not depend on the machine.

    The first pass replaces one quadric decimation of the whole dense mesh (~1.5-3 s for 1.2M faces, one core)
    by 16 small ones; the clean-up then runs on ~80k faces instead of ~1M. Quality before / after (Hausdorff
    distance, texture PSNR, UV stretch, texel use): bench/postprocess.py and docs/benchmarks.md.
    """
    t0 = time.perf_counter()
    n_faces = len(faces)
    n_parts = min(pieces, n_faces // max(min_piece_faces, 1))
    report: dict[str, Any] = {"dense_faces": n_faces, "first_pass_parts": 0}
    if target_faces is not None and n_parts >= 2 and n_faces > 2 * first_pass * target_faces:
        faces = drop_floaters(vertices, faces)  # before the split: the face budget then goes to the object
        report["first_pass_floater_faces"] = n_faces - len(faces)
        parts = split_mesh(vertices, faces, n_parts)
        budget = first_pass * target_faces
        jobs = [(pv, pf, math.ceil(len(pf) * budget / len(faces))) for pv, pf in parts]
        if executor is None:
            timed = [_simplify_timed(*job) for job in jobs]
        else:
            timed = [fut.result() for fut in [executor.submit(_simplify_timed, *job) for job in jobs]]
        parts = [(pv, pf) for pv, pf, _ in timed]
        report["first_pass_parts"] = n_parts
        report["first_pass_faces"] = int(sum(len(p[1]) for p in parts))
        # the parts' own decimation times: their sum is the CPU work, their maximum the time with one core each
        report["first_pass_part_seconds"] = {
            "sum": round(sum(t for _, _, t in timed), 3),
            "max": round(max(t for _, _, t in timed), 3),
        }
    else:
        parts = [(as_numpy(vertices).astype(np.float32), as_numpy(faces).astype(np.int64))]
    report["first_pass_seconds"] = round(time.perf_counter() - t0, 3)
    args = (parts, target_faces, texture_size, uv_piece_faces)
    uv, clean = clean_and_unwrap(*args) if executor is None else executor.submit(clean_and_unwrap, *args).result()
    report.update(clean)
    report["total_seconds"] = round(time.perf_counter() - t0, 3)
    return uv, report


def worker_init() -> None:
    """Initializer of a mesh worker process: one BLAS / OpenMP thread (the pool supplies the parallelism;
    xatlas keeps its own threads)."""
    import os

    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")


# Every library the mesh chain, the bake and the projected texture import lazily (scipy's submodules import one
# another). Two threads importing them for the first time at once can stop on Python's per-module import locks
# (`_DeadlockError ... scipy.linalg.cython_lapack`, seen once when the app's first object ran its chain beside the
# bake's colour lookup), so the pipeline imports them all in one thread before it starts any other.
CHAIN_MODULES = (
    "scipy.linalg",
    "scipy.ndimage",
    "scipy.spatial",
    "scipy.sparse.csgraph",
    "skimage.measure",
    "fast_simplification",
    "xatlas",
)


def import_chain() -> None:
    """Import CHAIN_MODULES in this thread (a no-op after the first call). A missing one is skipped here: the step
    that needs it says what to install when it runs."""
    for module in CHAIN_MODULES:
        if module not in sys.modules:
            try:
                importlib.import_module(module)
            except ImportError:
                pass


def worker_ready() -> bool:
    """Import the chain's libraries in a worker process (a no-op task that warms the pool up)."""
    for module in ("scipy.sparse.csgraph", "scipy.spatial", "fast_simplification", "xatlas"):
        optional_import(module)
    return True
