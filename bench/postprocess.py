"""Per-object mesh post-processing and texture bake on a FlexiCubes-like dense mesh (CPU stages of the pipeline).

    python bench/postprocess.py [--faces 20000] [--texture-size 1024] [--device cpu|cuda] [--lookup auto|torch|scipy]
                                [--roughness 0.01] [--cache /tmp/pp_mesh.npz] [--profile] [--check]

The input imitates the stage-2 mesh of the official configuration with random weights (about 1.25M faces,
630k vertices, 4000 components, most of them floaters): a noisy SDF on the 257^3 lattice (a wrinkled blob plus
small blobs in a shell around it), its narrow band turned into fine voxels with random FlexiCubes weights and
deformations, and smoothly varying vertex colours, extracted with `sam3d_core.geometry.flexicubes.extract_mesh`.
`--cache` keeps the generated mesh (generation takes ~10 s on 2 cores).

Runs what `Pipeline._finish_mesh` runs: clean_mesh (decimating to --faces), unwrap_uv, VertexColorSource,
bake_texture; prints the seconds of each step (clean_mesh's own steps from its report; the bake split into the
colour lookup and the rest). `--lookup auto` does as the pipeline: the torch grid lookup and UV raster on --device
when it is a GPU, the scipy lookup (and the CPU raster) otherwise. `--profile` adds a cProfile of clean_mesh;
`--check` compares the torch colour lookup with the scipy one on the baked texels and measures the bake's error at
random surface points. On a shared machine set OMP_NUM_THREADS to the free cores: torch's CPU kernels slow down
badly when their threads compete with other processes.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sam3d_core.export.bake import VertexColorSource, bake_texture, sample_texture  # noqa: E402
from sam3d_core.export.cleanup import clean_mesh  # noqa: E402
from sam3d_core.export.uv import unwrap_uv  # noqa: E402
from sam3d_core.geometry.flexicubes import extract_mesh  # noqa: E402


def _colour(p: np.ndarray) -> np.ndarray:
    """Smooth colours of local-frame points [N, 3] -> [N, 3] in [0.1, 0.9]."""
    return np.stack(
        [0.5 + 0.4 * np.sin(6 * p[:, 0]), 0.5 + 0.4 * np.cos(5 * p[:, 1] + 1), 0.5 + 0.4 * np.sin(4 * p[:, 2] + 2)], 1
    )


def make_dense_mesh(
    res: int = 256, seed: int = 0, roughness: float = 0.01
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vertices [V, 3] float32 in [-0.5, 0.5]^3, faces [F, 3] int64, colours [V, 3] float32) of a FlexiCubes mesh.
    roughness: amplitude of the fine noise on the blob's surface (0.01: about random weights; 0: smooth)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    n = res + 1
    g = np.arange(n, dtype=np.float32) / res - 0.5
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    r = np.sqrt(x * x + y * y + z * z)
    del x, y, z
    low = ndimage.gaussian_filter(rng.standard_normal((n, n, n), dtype=np.float32), 12)
    high = ndimage.gaussian_filter(rng.standard_normal((n, n, n), dtype=np.float32), 1.5)
    low, high = low / low.std(), high / high.std()
    body = r - 0.3 - 0.05 * low + roughness * high  # a wrinkled blob of radius ~0.3
    blobs = (2.1 - high) * 4 / res + (r < 0.36)  # floaters: the peaks of the fine noise, in a shell only
    sdf = np.where((r > 0.36) & (r < 0.46), np.minimum(body, blobs), body).astype(np.float32)
    del low, high, body, blobs
    band = np.abs(sdf) < 3 / res  # the decoder's sparse voxels: a narrow band around the surface
    cube = np.zeros((res, res, res), bool)
    for c in range(8):
        cube |= band[c & 1 : res + (c & 1), (c >> 1) & 1 : res + ((c >> 1) & 1), (c >> 2) & 1 : res + ((c >> 2) & 1)]
    xyz = np.argwhere(cube)
    m = len(xyz)
    feats = np.zeros((m, 101), np.float32)
    for c in range(8):
        feats[:, c] = sdf[xyz[:, 0] + (c & 1), xyz[:, 1] + ((c >> 1) & 1), xyz[:, 2] + ((c >> 2) & 1)] + 1 / res
    feats[:, 8:53] = rng.standard_normal((m, 45), dtype=np.float32) * 0.5  # deformations and weights
    col = np.concatenate([_colour((xyz + 0.5) / res - 0.5), np.full((m, 3), 0.5)], 1)
    feats[:, 53:] = np.repeat(np.log(col / (1 - col))[:, None], 8, 1).reshape(m, 48)  # logits, per corner
    coords = torch.from_numpy(np.concatenate([np.zeros((m, 1), np.int64), xyz], 1))
    mesh = extract_mesh(coords, torch.from_numpy(feats), res)
    return mesh.vertices.numpy(), mesh.faces.numpy(), mesh.vertex_attrs[:, :3].clamp(0, 1).numpy()


class _TimedSource:
    """Wraps a colour source and adds up the seconds spent in its `colors`."""

    def __init__(self, source):
        self.source, self.seconds, self.points = source, 0.0, None

    def colors(self, points: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        out = self.source.colors(points)
        self.seconds += time.perf_counter() - t
        self.points = points
        return out


def _source(v, f, c, lookup: str, device: str):
    if lookup == "scipy":
        return VertexColorSource(v, f, c)
    return VertexColorSource(v, f, c, device=device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, default=20000)
    ap.add_argument("--texture-size", type=int, default=1024)
    ap.add_argument("--device", default="cpu", help="device of the torch colour lookup")
    ap.add_argument("--lookup", choices=("auto", "torch", "scipy"), default="auto")
    ap.add_argument("--roughness", type=float, default=0.01, help="fine noise on the surface (0: smooth)")
    ap.add_argument("--cache", type=Path, default=None, help="npz file to keep the generated mesh in")
    ap.add_argument("--profile", action="store_true", help="cProfile clean_mesh")
    ap.add_argument("--check", action="store_true", help="compare with the scipy lookup; bake error")
    args = ap.parse_args()
    if args.lookup == "auto":
        args.lookup = "torch" if args.device.startswith("cuda") else "scipy"
    bake_device = args.device if args.lookup == "torch" else None
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    t = time.perf_counter()
    if args.cache is not None and args.cache.exists():
        data = np.load(args.cache)
        v, f, c = data["v"], data["f"], data["c"]
    else:
        v, f, c = make_dense_mesh(roughness=args.roughness)
        if args.cache is not None:
            np.savez(args.cache, v=v, f=f, c=c)
    print(f"dense mesh: {len(v)} vertices, {len(f)} faces ({time.perf_counter() - t:.1f} s to make or load)")

    for module in ("scipy.sparse.csgraph", "scipy.spatial", "fast_simplification", "xatlas"):
        importlib.import_module(module)  # as in the pipeline after its first object: imports are not timed
    times: dict[str, float] = {}
    t = time.perf_counter()
    if args.profile:
        prof = cProfile.Profile()
        cleaned = prof.runcall(clean_mesh, v, f, c, target_faces=args.faces)
    else:
        cleaned = clean_mesh(v, f, c, target_faces=args.faces)
    times["clean_mesh"] = time.perf_counter() - t
    t = time.perf_counter()
    uv = unwrap_uv(cleaned.vertices, cleaned.faces, texture_size=args.texture_size)
    times["unwrap_uv"] = time.perf_counter() - t
    sync()
    t = time.perf_counter()
    source = _TimedSource(_source(v, f, c, args.lookup, args.device))
    sync()
    times["source"] = time.perf_counter() - t
    t = time.perf_counter()
    texture = bake_texture(
        uv.vertices, uv.faces, uv.uvs, source, size=args.texture_size, convention="gltf", device=bake_device
    )
    sync()
    times["bake"] = time.perf_counter() - t
    times["bake: colour lookup"] = source.seconds
    times["bake: raster, gutter, fill"] = times["bake"] - source.seconds

    report = cleaned.report
    print(f"clean_mesh report: { {k: val for k, val in report.items() if k != 'step_seconds'} }")
    for step, sec in report.get("step_seconds", {}).items():
        print(f"  clean_mesh: {step:<24s} {sec:7.3f} s")
    charts = _chart_count(uv.faces, len(uv.vertices))
    print(f"unwrap: {len(uv.vertices)} vertices, {charts} charts, UV area used {_uv_area(uv):.3f}")
    print(f"colour lookups: {len(source.points)} texels")
    for step, sec in times.items():
        print(f"{step:<28s} {sec:7.3f} s")
    total = times["clean_mesh"] + times["unwrap_uv"] + times["source"] + times["bake"]
    print(f"{'postprocess + bake':<28s} {total:7.3f} s")
    if args.profile:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    if args.check:
        _check(v, f, c, source, uv, texture, args)


def _chart_count(faces: np.ndarray, n_vertices: int) -> int:
    import scipy.sparse
    import scipy.sparse.csgraph

    e = faces[:, [0, 1, 1, 2]].reshape(-1, 2)
    graph = scipy.sparse.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n_vertices, n_vertices))
    return scipy.sparse.csgraph.connected_components(graph, directed=False)[0]


def _uv_area(uv) -> float:
    tri = uv.uvs[uv.faces].astype(np.float64)
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    return float(np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).sum() / 2)


def _check(v, f, c, source: _TimedSource, uv, texture: np.ndarray, args) -> None:
    """The lookup against the scipy reference on the baked texels, and the texture against the source."""
    points = source.points
    if args.lookup == "torch":
        ref = VertexColorSource(v, f, c)
        t = time.perf_counter()
        expected = ref.colors(points)
        print(f"scipy lookup on the same texels: {time.perf_counter() - t:.3f} s")
        diff = np.abs(source.source.colors(points) - expected) * 255
        print(
            f"torch vs scipy lookup, 0..255: mean {diff.mean():.4f}, p99.9 {np.percentile(diff, 99.9):.3f}, "
            f"max {diff.max():.3f}, texels differing by > 1: {(diff.max(1) > 1).mean():.2e}"
        )
    rng = np.random.default_rng(0)
    tri = uv.vertices[uv.faces].astype(np.float64)
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    pick = rng.choice(len(tri), 50000, p=area / area.sum())
    w = rng.dirichlet([1, 1, 1], len(pick))
    p = np.einsum("nk,nkc->nc", w, tri[pick])
    uvp = np.einsum("nk,nkc->nc", w, uv.uvs[uv.faces[pick]].astype(np.float64))
    err = np.abs(sample_texture(texture, uvp, convention="gltf") - source.source.colors(p)) * 255
    print(f"bake error at 50k surface points, 0..255: mean {err.mean():.3f}, p99 {np.percentile(err, 99):.2f}")


if __name__ == "__main__":
    main()
