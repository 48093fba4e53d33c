"""Where one stage-1 network evaluation spends its time (official configuration, random weights).

    python bench/profile_stage1.py [--dtype bf16] [--compile] [--top 25]

Prints the wall time of a guided (2B, CFG) and a conditional-only evaluation of the MoT fast path, the
GPU busy time inside them, and the kernels that take the most GPU time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sam3d_core.cli.reconstruct import EXAMPLE_MASK, EXAMPLE_PHOTO
from sam3d_core.inputs.camera import fallback_pointmap  # noqa: E402
from sam3d_core.inputs.imageio import load_mask, load_photo  # noqa: E402
from sam3d_core.pipeline.sampling import stage1_noise  # noqa: E402
from sam3d_core.pipeline.stage1 import Stage1Pipeline  # noqa: E402
from sam3d_core.registry import stage1_preset  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def wall(fn, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()

    pipe = Stage1Pipeline.from_random(
        stage1_preset("official"), device="cuda", dtype=DTYPES[args.dtype], compile=args.compile
    )
    photo = load_photo(EXAMPLE_PHOTO)
    image, mask = photo.rgb, load_mask(EXAMPLE_MASK, photo)
    inputs = pipe.prepare(image, mask, fallback_pointmap(*image.shape[:2])[0])
    with torch.no_grad():
        cond = pipe.encode(inputs)
        gen = pipe.model.generator
        cache = gen.prepare_condition(cond)
        x = stage1_noise(1, gen.cfg, torch.Generator("cuda").manual_seed(0), "cuda")
        t = torch.full((1,), 300.0, device="cuda")
        d = torch.zeros(1, device="cuda")
        guided = lambda: gen.forward_cfg(x, t, cache, d, 7.0)  # noqa: E731
        plain = lambda: gen.forward_cfg(x, t, cache, d, 0.0)  # noqa: E731
        for f in (guided, plain):
            for _ in range(3):
                f()
        print(f"guided eval (2B): {wall(guided, 10) * 1e3:.2f} ms   cond-only eval: {wall(plain, 10) * 1e3:.2f} ms")
        print(f"prepare_condition: {wall(lambda: gen.prepare_condition(cond), 5) * 1e3:.2f} ms")
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            guided()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=60)
        print(table)


if __name__ == "__main__":
    main()
