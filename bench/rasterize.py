"""Triangle rasterizer: the pure-PyTorch reference against the Triton path, at texture-baking sizes.

    python bench/rasterize.py [--device cpu|cuda] [--size 1024] [--faces 50000] [--repeats 5] [--threads N]
                              [--out result.json]

Cases: a UV raster (a jittered grid of ~50k triangles filling the square, shuffled, depth 0: what baking a
decimated, unwrapped mesh into a 1024² texture asks for) and a screen raster (a ~50k-triangle UV sphere in
perspective filling most of a 1024² image, front and back faces overlapping, so the z-test matters).
On CUDA both the reference and the Triton path run (and their outputs are compared); on a CPU only the
reference exists. Prints a markdown table: median milliseconds of --repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sam3d_kernels.rasterize import rasterize, triton_available  # noqa: E402


def uv_grid(faces: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A jittered n x n quad grid over [0, size]², two triangles per quad, faces shuffled -> pos [V, 3], faces."""
    n = max(1, round(math.sqrt(faces / 2)))
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, n + 1)
    uv = torch.stack(torch.meshgrid(t, t, indexing="xy"), -1).reshape(-1, 2)
    inner = ((uv > 0) & (uv < 1)).all(1, keepdim=True)
    uv = uv + inner * (torch.rand(uv.shape, generator=g) - 0.5) * (0.6 / n)
    idx = torch.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    tris = torch.cat([torch.stack([a, b, c], -1).reshape(-1, 3), torch.stack([b, d, c], -1).reshape(-1, 3)])
    tris = tris[torch.randperm(tris.shape[0], generator=g)]
    return torch.cat([uv * size, torch.zeros(uv.shape[0], 1)], 1), tris


def screen_sphere(faces: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A latitude-longitude sphere of about `faces` triangles, seen in perspective -> pos [V, 3] (x, y, depth)."""
    rings = max(2, round(math.sqrt(faces / 4)))
    segs = 2 * rings
    theta = torch.linspace(0, math.pi, rings + 1)[:, None]
    phi = torch.linspace(0, 2 * math.pi, segs + 1)[None, :]
    shape = (rings + 1, segs + 1)
    xyz = torch.stack([theta.sin() * phi.cos(), theta.cos().expand(shape), theta.sin() * phi.sin()], -1)
    xyz = xyz.reshape(-1, 3) + torch.tensor([0.0, 0.0, 3.0])  # camera at the origin looking down +z
    f = 0.5 * size / math.tan(math.radians(20))  # 40 degree field of view
    pos = torch.stack([f * xyz[:, 0] / xyz[:, 2] + size / 2, f * xyz[:, 1] / xyz[:, 2] + size / 2, xyz[:, 2]], 1)
    idx = torch.arange((rings + 1) * (segs + 1)).reshape(rings + 1, segs + 1)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    return pos, torch.cat([torch.stack([a, b, c], -1).reshape(-1, 3), torch.stack([b, d, c], -1).reshape(-1, 3)])


def median_ms(fn, repeats: int, cuda: bool) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--faces", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, cuda = torch.device(args.device), args.device.startswith("cuda")
    backends = ["reference"] + (["triton"] if cuda and triton_available() else [])
    rows = []
    for case, (pos, faces) in {
        "uv": uv_grid(args.faces, args.size),
        "screen": screen_sphere(args.faces, args.size),
    }.items():
        pos, faces = pos.to(device), faces.to(device)
        outs = {}
        for backend in backends:
            outs[backend] = rasterize(pos, faces, args.size, args.size, backend=backend)
            run = functools.partial(rasterize, pos, faces, args.size, args.size, backend=backend)
            ms = median_ms(run, args.repeats, cuda)
            covered = int((outs[backend].face_id >= 0).sum())
            rows.append(
                {
                    "case": case,
                    "faces": faces.shape[0],
                    "size": args.size,
                    "device": str(device),
                    "backend": backend,
                    "ms": ms,
                    "covered": covered,
                }
            )
        if "triton" in outs:
            same = torch.equal(outs["triton"].face_id, outs["reference"].face_id)
            rows[-1]["identical_to_reference"] = same and torch.equal(outs["triton"].bary, outs["reference"].bary)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}, torch {torch.__version__}\n")
    print("| case | faces | size | backend | ms | covered pixels |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['faces']} | {r['size']}² | {r['backend']} | {r['ms']:.1f} | {r['covered']} |")
    if args.out:
        args.out.write_text(json.dumps({"device": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
