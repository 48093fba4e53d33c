"""Training views per second: the render-paste recipe at 518 x 518 on one device.

    python bench/render.py [--device cpu|cuda] [--size 518] [--views 200] [--batch 32] [--subdiv 5] [--mesh PATH]
                           [--occluders 1] [--threads N] [--json out.json]

Each view: a random camera and pose (`data.synth`), a random light, one target mesh (an icosphere of
20 * 4^subdiv triangles with vertex colours, or --mesh), --occluders flying occluders (icospheres of 320
triangles) in front of it, a background photo crop already on the device, shading, the visible mask, the
amodal mask (a second raster pass of the target alone), depth and point map. Two rates are printed on one line:
`views/s` keeps everything on the device (what on-the-fly training does), `samples/s` also copies each view
to host memory as numpy (what the sample writer does). Both rates are measured one view at a time
(`render_view`) and --batch views per call (`render_views`: one raster call, one parameter upload and vectorised
shading per batch; --batch 1 skips it), on the same scenes, and the first batch is checked against the views
rendered one at a time (masks exact). Median over 3 timed rounds after one warm-up round. On CUDA the rasteriser
runs its Triton kernel; on a CPU the pure-PyTorch reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sam3d_core.data.meshio import asset_from_arrays, load_asset  # noqa: E402
from sam3d_core.data.render import Light, RenderMesh, Shot, render_view, render_views  # noqa: E402
from sam3d_core.data.synth import SceneConfig, intrinsics, place_occluder, place_target  # noqa: E402


def icosphere(subdiv: int, colour) -> object:
    import trimesh

    s = trimesh.creation.icosphere(subdivisions=subdiv)
    rng = np.random.default_rng(subdiv)
    colours = np.clip(np.asarray(colour) + rng.uniform(-0.1, 0.1, (len(s.vertices), 3)), 0, 1)
    return asset_from_arrays(f"icosphere{subdiv}", s.vertices, s.faces, colours)


def scenes(n: int, target: RenderMesh, occluder: RenderMesh, cfg: SceneConfig, occluders: int, seed: int = 0):
    """Pre-drawn random scenes (numpy draws are not what we measure)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        K = intrinsics(rng, cfg)
        t = place_target(rng, cfg, K, target, 1.0)
        occ = [place_occluder(rng, K, t, occluder, 1.0) for _ in range(occluders)]
        out.append((K, [t, *occ], Light.random(rng)))
    return out


def rate(views, size: int, background: torch.Tensor, to_numpy: bool, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for K, placed, light in views:
        v = render_view(placed, K, size, size, light, background, amodal=len(placed) > 1, to_numpy=to_numpy)
    if cuda:
        torch.cuda.synchronize()
    del v
    return len(views) / (time.perf_counter() - start)


def rate_batched(views, size: int, background: torch.Tensor, to_numpy: bool, cuda: bool, batch: int) -> float:
    shots = [Shot(placed, K, light, background) for K, placed, light in views]
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(shots), batch):
        v = render_views(shots[i : i + batch], size, size, to_numpy=to_numpy)
    if cuda:
        torch.cuda.synchronize()
    del v
    return len(views) / (time.perf_counter() - start)


def check_batched(views, size: int, background: torch.Tensor) -> tuple[bool, str]:
    """The batch against the same views one at a time -> (masks identical, a line saying how close the rest is)."""
    batch = render_views([Shot(placed, K, light, background) for K, placed, light in views], size, size)
    worst_rgb, worst_depth, bad = 0, 0.0, []
    for i, (K, placed, light) in enumerate(views):
        one = render_view(placed, K, size, size, light, background, amodal=len(placed) > 1)
        for name in ("mask", "amodal", "coverage"):
            if not np.array_equal(getattr(one, name), getattr(batch[i], name)):
                bad.append(f"view {i} {name}")
        worst_rgb = max(worst_rgb, int(np.abs(one.rgb.astype(int) - batch[i].rgb.astype(int)).max()))
        seen = one.coverage & batch[i].coverage
        worst_depth = max(worst_depth, float(np.abs(one.depth[seen] - batch[i].depth[seen]).max(initial=0.0)))
    masks = "masks exact" if not bad else f"MASKS DIFFER ({', '.join(bad[:4])})"
    return (
        not bad,
        f"batch of {len(views)} vs one at a time: {masks}, rgb max diff {worst_rgb}, depth {worst_depth:.2g}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--views", type=int, default=200, help="views per timed round")
    parser.add_argument("--batch", type=int, default=32, help="views per render_views call (1: one at a time only)")
    parser.add_argument("--subdiv", type=int, default=5, help="target icosphere subdivisions (5: 20480 triangles)")
    parser.add_argument("--mesh", type=Path, help="render this mesh file instead of the icosphere")
    parser.add_argument("--occluders", type=int, default=1)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    asset = load_asset(args.mesh) if args.mesh else icosphere(args.subdiv, [0.8, 0.3, 0.2])
    target = RenderMesh.from_asset(asset, dev)
    occluder = RenderMesh.from_asset(icosphere(2, [0.2, 0.4, 0.8]), dev)
    cfg = SceneConfig(width=args.size, height=args.size)
    bg = torch.randint(0, 256, (args.size, args.size, 3), dtype=torch.uint8, device=dev)
    views = scenes(args.views, target, occluder, cfg, args.occluders)
    rate(views[: max(2, args.views // 10)], args.size, bg, False, cuda)  # warm-up (Triton compile)
    on_device = statistics.median(rate(views, args.size, bg, False, cuda) for _ in range(3))
    to_host = statistics.median(rate(views, args.size, bg, True, cuda) for _ in range(3))
    batched = batched_host = None
    same = True
    if args.batch > 1:
        same, check = check_batched(views[: args.batch], args.size, bg)
        rate_batched(views[: 2 * args.batch], args.size, bg, False, cuda, args.batch)  # warm-up
        batched = statistics.median(rate_batched(views, args.size, bg, False, cuda, args.batch) for _ in range(3))
        batched_host = statistics.median(rate_batched(views, args.size, bg, True, cuda, args.batch) for _ in range(3))
    name = torch.cuda.get_device_name(dev) if cuda else f"CPU x{torch.get_num_threads()} threads"
    result = {
        "device": name,
        "torch": torch.__version__,
        "size": args.size,
        "faces": int(len(asset.faces)),
        "occluders": args.occluders,
        "views_per_s": round(on_device, 1),
        "samples_per_s": round(to_host, 1),
    }
    head = f"render: {name}, torch {torch.__version__}, {args.size}x{args.size}, target {len(asset.faces)} faces + "
    print(
        f"{head}{args.occluders} occluder(s), {args.views} views a round\n"
        f"  one at a time:    {on_device:.1f} views/s on the device, {to_host:.1f} views/s to host numpy"
    )
    if batched is not None:
        result.update(
            batch=args.batch, batched_views_per_s=round(batched, 1), batched_samples_per_s=round(batched_host, 1)
        )
        print(
            f"  batches of {args.batch:<4}: {batched:.1f} views/s on the device, {batched_host:.1f} views/s to host "
            f"numpy\n  {check}"
        )
    if args.json:
        args.json.write_text(json.dumps(result | {"batch_masks_identical": same}, indent=1))
    if not same:
        sys.exit("render: the batched masks differ from the one-at-a-time ones (a bug: they must be identical)")


if __name__ == "__main__":
    main()
