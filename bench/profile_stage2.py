"""Where stage-2 sampling spends its time (official configuration, random weights, ~27k voxels).

    python bench/profile_stage2.py [--dtype bf16] [--compile] [--top 30]

Prints the wall time of a guided (2 objects: cond + uncond) and a conditional-only evaluation of the SLAT
flow fast path, the wall time of a whole 25-step sample, and the kernels that take the most GPU time in
one guided evaluation. --compile wraps each transformer block in torch.compile (dynamic shapes: the
number of voxels changes per object).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stage2 import DTYPES, sphere_shell  # noqa: E402
from sam3d_core.models.slat_flow import SLatFlowModel  # noqa: E402
from sam3d_core.pipeline.sampling import sample_stage2, stage2_noise  # noqa: E402
from sam3d_core.pipeline.stage1 import init_random_weights  # noqa: E402
from sam3d_core.registry import stage2_preset  # noqa: E402


def wall(fn, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--mode", default=None, help="torch.compile mode with --compile, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    cfg = stage2_preset("official")
    with torch.device("cuda"):
        flow = init_random_weights(SLatFlowModel(cfg.flow), seed=0).to(dtype).eval().requires_grad_(False)
    if args.compile:
        for blk in flow.blocks:
            blk.compile(dynamic=True, mode=args.mode)
    coords = sphere_shell().cuda()
    cond = torch.randn(1, 2 * 1374, cfg.flow.cond_channels, device="cuda", dtype=dtype)
    with torch.no_grad():
        grids = flow.build_grids(coords, 1)
        cache = flow.prepare_condition(cond)
        x = stage2_noise(len(coords), generator=torch.Generator("cuda").manual_seed(0), device="cuda")
        t = torch.full((1,), 300.0, device="cuda")
        guided = lambda: flow.forward_cfg(x, t, cache, grids, 1.0)  # noqa: E731
        plain = lambda: flow.forward_cfg(x, t, cache, grids, 0.0)  # noqa: E731
        for f in (guided, plain):
            for _ in range(3):
                f()
        print(f"voxels {len(coords)}, 32^3 tokens {grids.coarse.coords.shape[0]}")
        g_ms, p_ms = wall(guided, 5) * 1e3, wall(plain, 5) * 1e3
        print(f"guided eval (2 objects): {g_ms:.2f} ms   cond-only eval: {p_ms:.2f} ms")
        sample = lambda: sample_stage2(flow, cond, coords, x, cfg.sampler, grids=grids)  # noqa: E731
        sample()
        print(f"25-step sample: {wall(sample, 2) * 1e3:.1f} ms")
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            guided()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))


if __name__ == "__main__":
    main()
