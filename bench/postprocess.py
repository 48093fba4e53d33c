"""The chain after the networks (clean-up, decimation, UV atlas, bake): time and quality, before and after (issue 15).

    python bench/postprocess.py [--mesh noise] [--obj MODEL.obj ...] [--chain before,after] [--faces 20000]
        [--texture-size 1024] [--device cpu|cuda] [--workers N] [--cache DIR] [--samples 100000] [--repeats 3]
        [--out result.json]

Meshes (the stage-2 dense mesh: FlexiCubes on the decoder's 256^3 grid, local frame [-0.5, 0.5]^3):
  noise   what the official configuration with RANDOM weights gives (~1.28M faces, 4,000 components, most of them
          floaters, a rough surface): a noisy SDF on the 257^3 lattice with random FlexiCubes weights and
          deformations (`make_dense_mesh`).
  --obj   a real object's surface at the same resolution: the OBJ (with its .mtl and textures) is scaled into the
          unit cube, its surface thickened by 0.75 lattice steps into a closed SDF (outside found by flood fill),
          its colours (textures or material colours) sampled on the lattice, and FlexiCubes extracts the mesh
          (`make_object_mesh`): 0.2-1.2M faces, a few components, colour detail from the textures. Models used for
          docs/benchmarks.md, from Debian's `sweethome3d-furniture` (BlendSwap-CC-0.sh3f, CC0; not committed):
              apt-get download sweethome3d-furniture && dpkg -x sweethome3d-furniture_*.deb /tmp/furn
              cd /tmp/furn && python3 -c "import zipfile; zipfile.ZipFile('usr/share/sweethome3d/furniture/\\
          BlendSwap-CC-0.sh3f').extractall('objs')"
              python bench/postprocess.py --obj /tmp/furn/objs/blendswap-cc-0/{oakChair/oakChair,couch/couch,\\
          teddyBear/teddyBear,kitchenaid/kitchenaid}.obj --mesh noise --cache /tmp/pp_cache
Chains:
  before  the chain of the previous release: clean_mesh on the dense mesh (with colours), one quadric decimation
          to --faces, unwrap_uv (xatlas, 5000-face pieces), colour source, bake.
  after   the pipeline's chain now (`Pipeline._finish_mesh`): floaters dropped and the mesh cut into 16 parts on
          --device, each part decimated to 4 x --faces / 16 with its borders kept, in --workers processes; the parts
          joined, cleaned and decimated to --faces, unwrapped (xatlas); meanwhile the colour source is built; bake.
Quality, against the dense mesh cleaned without decimation (`clean_mesh(..., target_faces=None)`: floaters and
inner shells removed) and its colours:
  geometry   symmetric surface distance of the decimated mesh (--samples points each way), in lattice steps of
             the 256^3 grid: Hausdorff (max), 99th percentile, mean.
  texture    PSNR of the baked texture: at points on the low-poly surface, the bilinear texture colour against
             the colour of the nearest point of the dense surface (what the bake aims at); p50 / p99 of the
             error in 0..255. `appearance_psnr`: the same from points on the dense surface through their nearest
             low-poly point (geometry error included).
  uv         L2 stretch (Sander et al. 2001, normalised: 1 = isometric, area-weighted), the share of the surface
             stretched more than 2:1 in one direction, texel use (share of the texture covered by charts), charts.
Times: wall seconds per step, median of --repeats (the first run also warms the worker processes), and the
process CPU seconds of the main process. On a shared machine set OMP_NUM_THREADS to the free cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sam3d_core.export.bake import (  # noqa: E402
    VertexColorSource,
    _TriangleGrid,
    bake_texture,
    closest_point_barycentric,
    sample_texture,
)
from sam3d_core.export.cleanup import clean_mesh  # noqa: E402
from sam3d_core.export.uv import decimate_and_unwrap, unwrap_uv, worker_init, worker_ready  # noqa: E402
from sam3d_core.geometry.flexicubes import extract_mesh  # noqa: E402
from sam3d_core.pipeline.reconstruct import default_mesh_workers  # noqa: E402

RES = 256  # the mesh decoder's grid (official configuration)

# ---------------------------------------------------------------------------------------------------------
# dense meshes


def _colour(p: np.ndarray) -> np.ndarray:
    """Smooth colours of local-frame points [N, 3] -> [N, 3] in [0.1, 0.9]."""
    return np.stack(
        [0.5 + 0.4 * np.sin(6 * p[:, 0]), 0.5 + 0.4 * np.cos(5 * p[:, 1] + 1), 0.5 + 0.4 * np.sin(4 * p[:, 2] + 2)], 1
    )


def _flexicubes(sdf: np.ndarray, colour: np.ndarray, cells: np.ndarray, noise: np.random.Generator | None = None):
    """FlexiCubes mesh of lattice values sdf [n, n, n] and colours [n, n, n, 3] over the cells [res, res, res]
    bool -> (vertices float32, faces int64, colours float32). noise: random deformations and weights."""
    res = cells.shape[0]
    xyz = np.argwhere(cells)
    m = len(xyz)
    feats = np.zeros((m, 101), np.float32)
    col = np.clip(colour, 0.02, 0.98)
    for c in range(8):
        i, j, k = xyz[:, 0] + (c & 1), xyz[:, 1] + ((c >> 1) & 1), xyz[:, 2] + ((c >> 2) & 1)
        feats[:, c] = sdf[i, j, k] + 1 / res  # extract_mesh subtracts the decoder's sdf bias
        cc = col[i, j, k]
        feats[:, 53 + 6 * c : 56 + 6 * c] = np.log(cc / (1 - cc))  # colour logits, per corner
        feats[:, 56 + 6 * c : 59 + 6 * c] = 0.0  # the normal-map channels: 0.5
    if noise is not None:
        feats[:, 8:53] = noise.standard_normal((m, 45), dtype=np.float32) * 0.5  # deformations and weights
    coords = torch.from_numpy(np.concatenate([np.zeros((m, 1), np.int64), xyz], 1))
    mesh = extract_mesh(coords, torch.from_numpy(feats), res)
    return mesh.vertices.numpy(), mesh.faces.numpy(), mesh.vertex_attrs[:, :3].clamp(0, 1).numpy()


def make_dense_mesh(res: int = RES, seed: int = 0, roughness: float = 0.01):
    """(vertices [V, 3] float32 in [-0.5, 0.5]^3, faces [F, 3] int64, colours [V, 3] float32) of a FlexiCubes mesh
    like the official configuration's with random weights. roughness: amplitude of the fine noise on the blob's
    surface (0.01: about random weights; 0: smooth)."""
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
    cells = np.zeros((res, res, res), bool)
    for c in range(8):
        cells |= band[c & 1 : res + (c & 1), (c >> 1) & 1 : res + ((c >> 1) & 1), (c >> 2) & 1 : res + ((c >> 2) & 1)]
    lattice = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    colour = _colour(lattice).reshape(n, n, n, 3).astype(np.float32)
    return _flexicubes(sdf, colour, cells, noise=rng)


def _load_obj(path: Path) -> list[tuple]:
    """The parts of an OBJ scene: (vertices [V, 3] in the file's frame, faces, uvs [V, 2] or None, texture [H, W, 3]
    uint8 or None, material colour [3] in [0, 1])."""
    import trimesh

    scene = trimesh.load(path, force="scene")
    parts = []
    for node in scene.graph.nodes_geometry:
        transform, name = scene.graph[node]
        g = scene.geometry[name]
        if not isinstance(g, trimesh.Trimesh) or not len(g.faces):
            continue
        uv, image, colour = None, None, np.array([0.6, 0.6, 0.6])
        visual = g.visual
        if isinstance(visual, trimesh.visual.TextureVisuals):
            material = visual.material
            main = getattr(material, "main_color", None)
            if main is not None:
                colour = np.asarray(main[:3], float) / 255
            img = getattr(material, "image", None)
            if img is not None and visual.uv is not None and len(visual.uv) == len(g.vertices):
                image, uv = np.asarray(img.convert("RGB")), np.asarray(visual.uv, float)
        else:
            colour = visual.face_colors[:, :3].mean(0) / 255
        parts.append((trimesh.transform_points(g.vertices, transform), np.asarray(g.faces), uv, image, colour))
    if not parts:
        raise ValueError(f"{path}: no triangle geometry found; pass an OBJ with faces")
    return parts


def make_object_mesh(path: Path, res: int = RES, thickness: float = 0.75, fill: float = 0.9):
    """A real object's surface as the mesh decoder would give it: (vertices, faces, colours) of a FlexiCubes mesh.

    The OBJ is scaled so its longest side spans `fill` of the unit cube (y-up turned z-up), subdivided to edges
    of at most 1.5 lattice steps, and its unsigned distance measured at the lattice points within 3 steps of it
    (nearest of 8 candidate triangles). The SDF is distance - thickness lattice steps outside (the lattice
    points joined to the grid's border through points farther than that: a flood fill) and -|distance -
    thickness| elsewhere, so sheets of zero thickness become thin closed plates and closed solids get one
    surface. Colours: the texture (or the material colour) at the nearest surface point of each lattice point.
    """
    import trimesh
    from scipy import ndimage
    from scipy.spatial import cKDTree

    parts = _load_obj(path)
    every = np.concatenate([p[0] for p in parts])
    lo, hi = every.min(0), every.max(0)
    scale, centre = fill / (hi - lo).max(), (lo + hi) / 2
    verts, faces, face_uv, face_part = [], [], [], []
    offset = 0
    for k, (v, f, uv, _, _) in enumerate(parts):
        verts.append(((v - centre) * scale)[:, [0, 2, 1]] * [1, -1, 1])  # y-up -> z-up
        faces.append(f + offset)
        offset += len(v)
        face_uv.append(uv[f] if uv is not None else np.zeros((len(f), 3, 2)))
        face_part.append(np.full(len(f), k))
    v, f = np.concatenate(verts), np.concatenate(faces)
    face_uv, face_part = np.concatenate(face_uv), np.concatenate(face_part)
    h, n = 1.0 / res, res + 1
    sv, sf, origin = trimesh.remesh.subdivide_to_size(v, f, max_edge=1.5 * h, max_iter=14, return_index=True)
    # the band: lattice points within 3 steps of a vertex or face centre of the subdivided surface
    probe = np.concatenate([sv, sv[sf].mean(1)])
    ijk = np.clip(np.rint((probe + 0.5) / h).astype(np.int64), 0, res)
    near = np.zeros((n, n, n), bool)
    near[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = True
    band = ndimage.binary_dilation(near, iterations=3)
    q = np.argwhere(band) * h - 0.5  # [B, 3] lattice points
    tri = sv[sf]
    tree = cKDTree(tri.mean(1))
    dist, face = np.empty(len(q)), np.empty(len(q), np.int64)
    for a in range(0, len(q), 1 << 16):
        p = q[a : a + (1 << 16)]
        _, cand = tree.query(p, k=8, workers=-1)
        bary, d2 = closest_point_barycentric(p[:, None], tri[cand][:, :, 0], tri[cand][:, :, 1], tri[cand][:, :, 2])
        best = d2.argmin(1)
        rows = np.arange(len(p))
        dist[a : a + len(p)], face[a : a + len(p)] = np.sqrt(d2[rows, best]), cand[rows, best]
    t = thickness * h
    far = np.ones((n, n, n), bool)
    far[band] = dist > t
    label, _ = ndimage.label(far)
    rim = np.concatenate(
        [x.ravel() for x in (label[0], label[-1], label[:, 0], label[:, -1], label[..., 0], label[..., -1])]
    )
    outside = np.isin(label, np.unique(rim[rim > 0]))
    sdf = np.where(outside, 3 * h, -3 * h).astype(np.float32)
    sdf[band] = np.where(outside[band], dist - t, -np.abs(dist - t))
    # colours: the source face under each band point, its barycentrics there, texture or material colour
    src = origin[face]
    bary, _ = closest_point_barycentric(q, v[f[src, 0]], v[f[src, 1]], v[f[src, 2]])
    col = np.empty((len(q), 3))
    for k, (_, _, _, image, colour) in enumerate(parts):
        sel = face_part[src] == k
        if image is None:
            col[sel] = colour
        elif sel.any():
            uvq = np.einsum("nk,nkc->nc", bary[sel], face_uv[src[sel]]) % 1.0
            col[sel] = sample_texture(image, uvq, convention="trimesh")
    colour = np.zeros((n, n, n, 3), np.float32)
    colour[band] = col
    # the sparse voxels: cells with a sign change among their corners, and their neighbours
    inside = sdf < 0
    some, every_corner = np.zeros((res,) * 3, bool), np.ones((res,) * 3, bool)
    for c in range(8):
        s = inside[c & 1 : res + (c & 1), (c >> 1) & 1 : res + ((c >> 1) & 1), (c >> 2) & 1 : res + ((c >> 2) & 1)]
        some |= s
        every_corner &= s
    return _flexicubes(sdf, colour, ndimage.binary_dilation(some & ~every_corner))


def load_mesh(spec: str, cache: Path | None):
    """(name, vertices, faces, colours, reference) for 'noise' or an OBJ path; reference = the dense mesh cleaned
    without decimation (CleanMesh). Cached as npz in `cache`."""
    name = "noise" if spec == "noise" else Path(spec).stem
    file = cache / f"{name}.npz" if cache is not None else None
    if file is not None and file.exists():
        d = np.load(file)
        v, f, c = d["v"], d["f"], d["c"]
        ref = (d["rv"], d["rf"], d["rc"])
    else:
        v, f, c = make_dense_mesh() if spec == "noise" else make_object_mesh(Path(spec))
        cleaned = clean_mesh(v, f, c, target_faces=None)
        ref = (cleaned.vertices, cleaned.faces, cleaned.colors)
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            np.savez(file, v=v, f=f, c=c, rv=ref[0], rf=ref[1], rc=ref[2])
    return name, v, f, c, ref


# ---------------------------------------------------------------------------------------------------------
# chains


def run_before(v, f, c, args, device):
    """The previous release's `_finish_mesh`: clean_mesh with colours, one decimation, xatlas, source, bake."""
    times = {}
    t = time.perf_counter()
    cleaned = clean_mesh(v, f, c, target_faces=args.faces)
    times["clean_and_decimate"] = time.perf_counter() - t
    t = time.perf_counter()
    uv = unwrap_uv(cleaned.vertices, cleaned.faces, texture_size=args.texture_size, piece_faces=5000)
    times["uv"] = time.perf_counter() - t
    t = time.perf_counter()
    source = VertexColorSource(v, f, c, device=device)
    times["colour_source"] = time.perf_counter() - t
    t = time.perf_counter()
    texture = bake_texture(
        uv.vertices, uv.faces, uv.uvs, source, size=args.texture_size, convention="gltf", device=device
    )
    _sync(device)
    times["bake"] = time.perf_counter() - t
    return uv, texture, times, {k: cleaned.report[k] for k in ("faces_out", "step_seconds")}


def run_after(v, f, c, args, device, pool):
    """The pipeline's chain (`Pipeline._finish_mesh`): the CPU chain in worker processes while the colour source
    is built, then the bake."""
    times = {}
    dev = torch.device(device or "cpu")
    t = time.perf_counter()
    vt, ft = torch.from_numpy(v).to(dev), torch.from_numpy(f).to(dev)  # where stage 2 leaves the mesh
    ct = torch.from_numpy(c).to(dev)
    _sync(device)
    with ThreadPoolExecutor(1) as side:
        chain = side.submit(
            decimate_and_unwrap,
            vt,
            ft,
            target_faces=args.faces,
            texture_size=args.texture_size,
            executor=pool,
            uv_piece_faces=args.uv_piece_faces,
        )
        t_source = time.perf_counter()
        vn, fn, cn = vt.float().cpu().numpy(), ft.cpu().numpy().astype(np.int64), ct.clamp(0, 1).cpu().numpy()
        source = VertexColorSource(vn, fn, cn, device=device)
        times["colour_source (overlapped)"] = time.perf_counter() - t_source
        uv, report = chain.result()
    times["decimate_clean_uv"] = time.perf_counter() - t
    t = time.perf_counter()
    texture = bake_texture(
        uv.vertices, uv.faces, uv.uvs, source, size=args.texture_size, convention="gltf", device=device
    )
    _sync(device)
    times["bake"] = time.perf_counter() - t
    keep = ("faces_out", "first_pass_parts", "first_pass_faces", "first_pass_seconds", "first_pass_part_seconds")
    keep += ("seconds", "uv_seconds", "step_seconds")
    return uv, texture, times, {k: report[k] for k in keep if k in report}


def chain_only(v, f, c, chain: str, args, pool) -> tuple[float, float, dict]:
    """The mesh chain alone (no colour source, no bake): (wall s, CPU s of this process and its threads, report).
    With --workers 0 the CPU seconds are the chain's whole work; the first pass's parts could run side by side."""
    cpu, wall = time.process_time(), time.perf_counter()
    if chain == "before":
        cleaned = clean_mesh(v, f, c, target_faces=args.faces)
        unwrap_uv(cleaned.vertices, cleaned.faces, texture_size=args.texture_size, piece_faces=5000)
        report = {}
    else:
        _, report = decimate_and_unwrap(
            v,
            f,
            target_faces=args.faces,
            texture_size=args.texture_size,
            executor=pool,
            uv_piece_faces=args.uv_piece_faces,
        )
    return time.perf_counter() - wall, time.process_time() - cpu, report


def _sync(device) -> None:
    if device is not None and str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------
# quality


def sample_surface(v: np.ndarray, f: np.ndarray, n: int, rng: np.random.Generator):
    """n area-uniform points on a mesh -> (face [n], barycentrics [n, 3], points [n, 3] float64)."""
    tri = v[f].astype(np.float64)
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    face = rng.choice(len(f), n, p=area / area.sum())
    w = rng.dirichlet([1, 1, 1], n)
    return face, w, np.einsum("nk,nkc->nc", w, tri[face])


def nearest_on_mesh(v: np.ndarray, f: np.ndarray, points: np.ndarray):
    """Exact nearest surface point (`bake._TriangleGrid`) -> (face [n], barycentrics [n, 3], distance [n])."""
    grid = _TriangleGrid(torch.from_numpy(v[f].astype(np.float32)))
    face, bary = grid.nearest(torch.from_numpy(points.astype(np.float32)), 1 << 20)
    face, bary = face.numpy(), bary.numpy().astype(np.float64)
    q = np.einsum("nk,nkc->nc", bary, v[f[face]].astype(np.float64))
    return face, bary, np.linalg.norm(points - q, axis=1)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1 / max(float(((a - b) ** 2).mean()), 1e-12)))


def quality(ref, uv, texture, n: int, seed: int = 0) -> dict:
    """Geometry, texture and UV measures of an unwrapped, baked mesh against the reference (see the docstring)."""
    rv, rf, rc = ref
    rng = np.random.default_rng(seed)
    lv, lf, luv = uv.vertices, uv.faces, uv.uvs
    # geometry, both ways
    d_face, d_bary, d_pts = sample_surface(rv, rf, n, rng)
    l_face, l_bary, l_pts = sample_surface(lv, lf, n, rng)
    near_l = nearest_on_mesh(lv, lf, d_pts)
    near_d = nearest_on_mesh(rv, rf, l_pts)
    dist = np.concatenate([near_l[2], near_d[2]]) * RES
    # texture: low-poly points (their UVs) against the dense colour at their nearest dense point
    got = sample_texture(texture, np.einsum("nk,nkc->nc", l_bary, luv[lf[l_face]].astype(np.float64)), "gltf")
    want = np.einsum("nk,nkc->nc", near_d[1], rc[rf[near_d[0]]].astype(np.float64))
    err = np.abs(got - want).max(1) * 255
    # appearance: dense points against the texture at their nearest low-poly point
    seen = sample_texture(texture, np.einsum("nk,nkc->nc", near_l[1], luv[lf[near_l[0]]].astype(np.float64)), "gltf")
    truth = np.einsum("nk,nkc->nc", d_bary, rc[rf[d_face]].astype(np.float64))
    return {
        "hausdorff_vox": round(float(dist.max()), 3),
        "p99_vox": round(float(np.percentile(dist, 99)), 3),
        "mean_vox": round(float(dist.mean()), 4),
        "texture_psnr": round(_psnr(got, want), 2),
        "texture_err_p50": round(float(np.median(err)), 3),
        "texture_err_p99": round(float(np.percentile(err, 99)), 2),
        "appearance_psnr": round(_psnr(seen, truth), 2),
        **uv_measures(lv, lf, luv),
    }


def uv_measures(v: np.ndarray, f: np.ndarray, uvs: np.ndarray) -> dict:
    """L2 stretch of the UV -> surface map (Sander et al. 2001; normalised so that 1 = isometric), the surface share
    stretched more than 2:1, texel use (the UV area covered: charts do not overlap) and the number of charts."""
    import scipy.sparse
    import scipy.sparse.csgraph

    p = v[f].astype(np.float64)
    s, t = uvs[f][..., 0].astype(np.float64), uvs[f][..., 1].astype(np.float64)
    twice_uv = (s[:, 1] - s[:, 0]) * (t[:, 2] - t[:, 0]) - (s[:, 2] - s[:, 0]) * (t[:, 1] - t[:, 0])
    area = np.linalg.norm(np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), axis=1) / 2
    ok = np.abs(twice_uv) > 1e-20
    p, s, t, twice_uv, area = p[ok], s[ok], t[ok], twice_uv[ok], area[ok]
    d = twice_uv[:, None]
    ds = (p[:, 0] * (t[:, 1] - t[:, 2])[:, None] + p[:, 1] * (t[:, 2] - t[:, 0])[:, None]
          + p[:, 2] * (t[:, 0] - t[:, 1])[:, None]) / d  # fmt: skip
    dt = (p[:, 0] * (s[:, 2] - s[:, 1])[:, None] + p[:, 1] * (s[:, 0] - s[:, 2])[:, None]
          + p[:, 2] * (s[:, 1] - s[:, 0])[:, None]) / d  # fmt: skip
    a, b, c = (ds * ds).sum(1), (ds * dt).sum(1), (dt * dt).sum(1)
    root = np.sqrt(np.maximum((a - c) ** 2 + 4 * b * b, 0))
    big, small = np.sqrt(np.maximum((a + c + root) / 2, 0)), np.sqrt(np.maximum((a + c - root) / 2, 0))
    uv_area = np.abs(twice_uv) / 2
    l2 = np.sqrt((((a + c) / 2) * uv_area).sum() / uv_area.sum()) / np.sqrt(area.sum() / uv_area.sum())
    edges = f[:, [0, 1, 1, 2]].reshape(-1, 2)
    graph = scipy.sparse.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(len(uvs), len(uvs)))
    return {
        "l2_stretch": round(float(l2), 4),
        "stretched_2to1": round(float(area[big > 2 * np.maximum(small, 1e-30)].sum() / area.sum()), 5),
        "texel_use": round(float(uv_area.sum()), 4),
        "charts": int(scipy.sparse.csgraph.connected_components(graph, directed=False)[0]),
    }


# ---------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mesh", action="append", default=[], choices=["noise"], help="the random-weight noise mesh")
    ap.add_argument("--obj", action="append", default=[], type=Path, help="a real object (OBJ) made into a mesh")
    ap.add_argument("--chain", default="before,after")
    ap.add_argument("--faces", type=int, default=20000)
    ap.add_argument("--texture-size", type=int, default=1024)
    ap.add_argument("--device", default="cpu", help="cuda: the colour lookup, raster, floaters and split there")
    ap.add_argument("--workers", type=int, default=None, help="mesh worker processes (default: the pipeline's)")
    ap.add_argument("--cache", type=Path, default=None, help="folder for the generated meshes (npz)")
    ap.add_argument("--samples", type=int, default=100000, help="surface samples per quality measure")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--uv-piece-faces", type=int, default=5000, help="after chain: xatlas piece size (pipeline's)")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--chain-only", action="store_true", help="time the mesh chain alone (no bake), wall and CPU")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    specs = args.mesh + [str(p) for p in args.obj] or ["noise"]
    device = args.device if args.device.startswith("cuda") else None  # the pipeline's choice on a CPU: scipy
    workers = default_mesh_workers() if args.workers is None else args.workers
    pool = None
    if workers > 0:
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=worker_init)
        for fut in [pool.submit(worker_ready) for _ in range(workers)]:
            fut.result()
    results = {
        "device": torch.cuda.get_device_name() if device else "cpu",
        "cpu_cores": os.cpu_count(),
        "mesh_workers": workers,
        "date": time.strftime("%Y-%m-%d"),
        "faces": args.faces,
        "texture_size": args.texture_size,
        "meshes": {},
    }
    for spec in specs:
        t = time.perf_counter()
        name, v, f, c, ref = load_mesh(spec, args.cache)
        print(
            f"{name}: {len(f)} faces, reference {len(ref[1])} faces ({time.perf_counter() - t:.1f} s to make or load)"
        )
        entry = results["meshes"][name] = {"dense_faces": int(len(f))}
        for chain in args.chain.split(","):
            if args.chain_only:
                timed = [chain_only(v, f, c, chain, args, pool) for _ in range(args.repeats)]
                part = timed[-1][2].get("first_pass_part_seconds")
                entry[chain] = {
                    "wall_s_min": round(min(t[0] for t in timed), 3),
                    "cpu_s_min": round(min(t[1] for t in timed), 3),
                }
                if part:
                    entry[chain]["first_pass_parts_s"] = part
                print(f"  {chain:<6} {json.dumps(entry[chain])}", flush=True)
                continue
            runs = []
            for _ in range(args.repeats):
                cpu = time.process_time()
                wall = time.perf_counter()
                out = run_before(v, f, c, args, device) if chain == "before" else run_after(v, f, c, args, device, pool)
                runs.append((time.perf_counter() - wall, time.process_time() - cpu, out))
            uv, texture, _, report = runs[-1][2]
            row = {
                "total_s": round(statistics.median(r[0] for r in runs), 3),
                "main_process_cpu_s": round(statistics.median(r[1] for r in runs), 3),
                "steps_s": {k: round(statistics.median(r[2][2][k] for r in runs), 3) for k in runs[-1][2][2]},
                "report": report,
            }
            if not args.no_quality:
                row["quality"] = quality(ref, uv, texture, args.samples)
            entry[chain] = row
            print(f"  {chain:<6} {json.dumps(row)}", flush=True)
    if pool is not None:
        pool.shutdown()
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
