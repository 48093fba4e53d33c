"""The stage-1-only textured mesh (export/project.py): time per step on one CPU core, and quality.

    python bench/project_texture.py [--obj MODEL.obj ...] [--faces 20000] [--texture-size 1024]
        [--photo 1024x768] [--cores 1] [--repeats 3] [--out result.json]

Per object: a "perfect stage 1" is built from a real mesh: its surface voxels on the 64^3 grid (surface-only, as
the official decoder and our data give) as binary logits +-4 (an overconfident decoder: the worst staircase),
and a pose (30 degree yaw, 20 degree pitch, 2.2 units in front of a 50 degree camera). The photo is the mesh
rendered with its own colours and a Lambert light (`data/render.py`), the mask its exact silhouette. Without
--obj the meshes are three CC0 models of Debian's `sweethome3d-furniture` (not committed):
    apt-get download sweethome3d-furniture && dpkg -x sweethome3d-furniture_*.deb /tmp/furn
    cd /tmp/furn && python3 -c "import zipfile; zipfile.ZipFile('usr/share/sweethome3d/furniture/\\
BlendSwap-CC-0.sh3f').extractall('objs')"

Steps timed (wall seconds, median of --repeats, the process pinned to --cores cores, one BLAS / torch thread):
  surface     occupancy_surface: fill, smoothing, marching cubes
  chain       decimate_and_unwrap in-process: clean-up, decimation to --faces, xatlas (the pipeline runs it in its
              mesh worker processes when it has 4+ cores)
  projection  PhotoProjection: depth buffer of the placed mesh, the mask, the seen points, the fill grid
  bake        bake_texture with that source: UV raster, gutter, per-texel visibility and colour, push-pull
Quality:
  geometry    surface distance between the decimated mesh and the real mesh (50k points each way), in voxels of
              the 64^3 grid: Chamfer (mean of both directions); p99 and max of accuracy (result -> real) and of
              completeness (real -> result; the real mesh's enclosed inner parts count as missing)
  silhouette  IoU of the placed mesh's silhouette with the mask
  texture     the textured result rendered from the photo's camera without lighting (the texture's colours as
              they are) against the photo, on the pixels both cover: PSNR and the median error (0..255)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scipy.spatial import cKDTree  # noqa: E402

from sam3d_core.data.meshio import load_asset  # noqa: E402
from sam3d_core.data.render import Light, Placed, RenderMesh, render_view  # noqa: E402
from sam3d_core.data.voxelize import sample_surface, voxelize  # noqa: E402
from sam3d_core.export.bake import bake_texture  # noqa: E402
from sam3d_core.export.gltf import TexturedMesh  # noqa: E402
from sam3d_core.export.project import PhotoProjection, occupancy_surface  # noqa: E402
from sam3d_core.export.uv import decimate_and_unwrap  # noqa: E402
from sam3d_core.geometry import frames  # noqa: E402

FURNITURE = Path("/tmp/furn/objs/blendswap-cc-0")
DEFAULT_OBJS = [FURNITURE / n / f"{n}.obj" for n in ("oakChair", "couch", "kitchenaid")]  # 4.4k, 10k, 23k voxels
R = 64


def camera(width: int, height: int, fov_deg: float = 50.0) -> np.ndarray:
    f = width / 2 / np.tan(np.deg2rad(fov_deg) / 2)
    return np.array([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])


def pose(yaw_deg: float = 30.0, pitch_deg: float = 20.0, distance: float = 2.2) -> np.ndarray:
    """4x4 local -> PyTorch3D camera: upright (local z -> camera y), turned, tilted so the top shows."""
    up = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    a, b = np.deg2rad(yaw_deg), np.deg2rad(pitch_deg)
    yaw = np.array([[np.cos(a), 0.0, np.sin(a)], [0.0, 1.0, 0.0], [-np.sin(a), 0.0, np.cos(a)]])
    pitch = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(b), np.sin(b)], [0.0, -np.sin(b), np.cos(b)]])
    return frames.homogeneous(pitch @ yaw @ up, [0.0, 0.0, distance])


def render(mesh: RenderMesh, pose4: np.ndarray, K: np.ndarray, width: int, height: int, light: Light):
    placed = Placed(mesh, pose4[:3, :3].T, pose4[:3, 3], 1.0)  # row-vector rotation
    return render_view([placed], K, height, width, light, np.full((height, width, 3), 90, np.uint8), amodal=False)


def surface_distance(v, f, ref_v, ref_f, n: int = 50000) -> dict:
    """In voxels: accuracy (result -> real surface) and completeness (real surface -> result), mean / p99 / max.
    Completeness also counts the real mesh's inner parts (a couch's inner frame), which the filled surface
    encloses: a large completeness maximum can be such a part, not a missing piece."""
    a = sample_surface(np.asarray(v, np.float64), np.asarray(f, np.int64), n, seed=0)
    b = sample_surface(ref_v, ref_f, n, seed=1)
    ab, ba = cKDTree(b).query(a)[0] * R, cKDTree(a).query(b)[0] * R
    return {
        "chamfer_voxels": round(float((ab.mean() + ba.mean()) / 2), 3),
        "accuracy_p99_max_voxels": [round(float(np.percentile(ab, 99)), 3), round(float(ab.max()), 3)],
        "completeness_p99_max_voxels": [round(float(np.percentile(ba, 99)), 3), round(float(ba.max()), 3)],
    }


def run_one(path: Path, args) -> dict:
    asset = load_asset(path)
    occ = voxelize(asset.vertices, asset.faces)  # [N, 3] surface voxels
    logits = np.full((R, R, R), -4.0, np.float32)
    logits[tuple(occ.T)] = 4.0
    width, height = (int(x) for x in args.photo.split("x"))
    K, pose4 = camera(width, height), pose()
    light = Light(np.array([0.3, 0.6, -1.0]) / np.linalg.norm([0.3, 0.6, -1.0]), ambient=0.5, diffuse=0.6)
    view = render(RenderMesh.from_asset(asset), pose4, K, width, height, light)
    photo, mask = view.rgb, view.mask

    times: dict[str, list[float]] = {k: [] for k in ("surface", "chain", "projection", "bake", "total")}
    for _ in range(args.repeats):
        t0 = t = time.perf_counter()
        v, f = occupancy_surface(logits)
        times["surface"].append(time.perf_counter() - t)
        t = time.perf_counter()
        uv, report = decimate_and_unwrap(v, f, target_faces=args.faces, texture_size=args.texture_size)
        times["chain"].append(time.perf_counter() - t)
        t = time.perf_counter()
        source = PhotoProjection(uv.vertices, uv.faces, photo, mask, pose4, K)
        times["projection"].append(time.perf_counter() - t)
        t = time.perf_counter()
        texture = bake_texture(uv.vertices, uv.faces, uv.uvs, source, size=args.texture_size)
        times["bake"].append(time.perf_counter() - t)
        times["total"].append(time.perf_counter() - t0)
    mesh = TexturedMesh(uv.vertices, uv.faces, uv.uvs, texture)

    sil = frames.render_silhouette(frames.transform_points(pose4, mesh.vertices), mesh.faces, K, width, height)
    # the result as the photo's camera sees it, unlit: its texture's colours (uvs: glTF v down -> render's v up)
    flat = Light(np.array([0.0, 0.0, -1.0]), ambient=1.0, diffuse=0.0)
    textured = RenderMesh(
        vertices=torch.as_tensor(mesh.vertices, dtype=torch.float32),
        faces=torch.as_tensor(mesh.faces, dtype=torch.int64),
        colors=torch.ones(len(mesh.vertices), 3),
        uvs=torch.as_tensor(np.stack([mesh.uvs[:, 0], 1 - mesh.uvs[:, 1]], 1), dtype=torch.float32),
        face_texture=torch.zeros(len(mesh.faces), dtype=torch.int64),
        textures=(torch.as_tensor(texture).float() / 255.0,),
    )
    again = render(textured, pose4, K, width, height, flat)
    both = again.mask & mask
    err = np.abs(again.rgb[both].astype(np.float64) - photo[both].astype(np.float64))
    mse = float((err**2).mean())
    return {
        "object": path.stem,
        "surface_voxels": int(len(occ)),
        "surface_faces": int(len(f)),
        "faces": int(len(mesh.faces)),
        "texture_size": args.texture_size,
        "photo": [width, height],
        "seconds": {k: round(statistics.median(x), 3) for k, x in times.items()},
        "chain_report": {k: report.get(k) for k in ("seconds", "uv_seconds", "components", "floaters_removed")},
        "visible_fraction": source.stats.get("visible_fraction"),
        "geometry": surface_distance(mesh.vertices, mesh.faces, asset.vertices, asset.faces),
        "silhouette_iou": round(frames.mask_iou(sil, mask), 4),
        "texture_psnr_db": round(10 * np.log10(255.0**2 / max(mse, 1e-12)), 2),
        "texture_median_error": float(np.median(err)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--obj", nargs="*", type=Path, default=None, help="mesh files (default: three CC0 furniture models)"
    )
    ap.add_argument("--faces", type=int, default=20000)
    ap.add_argument("--texture-size", type=int, default=1024)
    ap.add_argument("--photo", default="1024x768", help="WIDTHxHEIGHT of the rendered photo")
    ap.add_argument("--cores", type=int, default=1, help="cores the process is pinned to (xatlas' threads included)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    objs = args.obj or DEFAULT_OBJS
    missing = [str(p) for p in objs if not p.is_file()]
    if missing:
        sys.exit(f"missing mesh files {missing}; see the module doc for the furniture models, or pass --obj")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    torch.set_num_threads(args.cores)
    results = [run_one(p, args) for p in objs]
    out = {"cores": args.cores, "torch": torch.__version__, "results": results}
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
