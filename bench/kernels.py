"""Sparse voxel kernels: each fast path against its pure-PyTorch reference, at the stage-2 sizes.

    python bench/kernels.py [--dtype fp16] [--repeats 20] [--out result.json]

Voxel sets: a sphere shell on the 64³ grid (~27k voxels, the size of a typical stage-2 object) and its
2x-downsampled 32³ version (~7k voxels). Cases follow spec §4.8-4.9: the SLAT flow convolutions
(64³: 128->128, 256->128, 2048->128; 32³: 128->1024, 1024->1024), its resampling, its full attention at
32³ (16 heads x 64) and the decoders' 8³ window attention at 64³ (12 heads x 64, shift 0 and 4).
Forward times and forward+backward times (CUDA events, median of --repeats after warm-up). Prints a
markdown table. Needs a CUDA GPU (the references are what CPUs run; there is nothing to compare there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sam3d_kernels.sparse_attention import varlen_attention, windowed_attention  # noqa: E402
from sam3d_kernels.sparse_conv import build_neighbour_map, submanifold_conv3d  # noqa: E402
from sam3d_kernels.sparse_resample import downsample2, upsample2  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sphere_shell(res: int, thickness: float) -> torch.Tensor:
    """[N, 4] int32 (batch 0, x, y, z): voxels within thickness/2 of a sphere filling the res³ grid."""
    r = torch.arange(res, dtype=torch.float32) - (res - 1) / 2
    d = (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2).sqrt()
    xyz = ((d - (res / 2 - 2)).abs() < thickness / 2).nonzero()
    return torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1).to(torch.int32)


def cuda_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fwd_bwd(fn, inputs):
    """A closure: out = fn(*inputs) with grad-requiring copies of the inputs, then out.backward(ones)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    grad = torch.ones_like(fn(*leaves))

    def run():
        fn(*leaves).backward(grad)

    return run


def conv_rows(coords64, coords32, dtype, repeats):
    rows, dev = [], coords64.device
    for name, coords in (("64³", coords64), ("32³", coords32)):
        nbr, ms = build_neighbour_map(coords), cuda_ms(lambda c=coords: build_neighbour_map(c), repeats)
        rows.append({"op": "build_neighbour_map", "case": name, "N": len(coords), "reference_ms": ms})
    cases = [
        ("64³", coords64, 128, 128),
        ("64³", coords64, 256, 128),
        ("64³", coords64, 2048, 128),
        ("32³", coords32, 128, 1024),
        ("32³", coords32, 1024, 1024),
    ]
    for grid, coords, cin, cout in cases:
        nbr = build_neighbour_map(coords)
        x = torch.randn(len(coords), cin, device=dev, dtype=dtype)
        w = torch.randn(cout, 3, 3, 3, cin, device=dev, dtype=dtype) / (27 * cin) ** 0.5
        b = torch.zeros(cout, device=dev, dtype=dtype)
        row = {"op": "submanifold_conv3d", "case": f"{grid} {cin}->{cout}", "N": len(coords)}
        for backend in ("reference", "triton"):

            def f(x, w, b, backend=backend, coords=coords, nbr=nbr):
                return submanifold_conv3d(x, coords, w, b, nbr, backend=backend)

            row[f"{backend}_ms"] = cuda_ms(lambda f=f, x=x, w=w, b=b: f(x, w, b), repeats)
            row[f"{backend}_fwd_bwd_ms"] = cuda_ms(fwd_bwd(f, [x, w, b]), repeats)
        rows.append(row)
    return rows


def resample_rows(coords64, dtype, repeats):
    dev = coords64.device
    x = torch.randn(len(coords64), 128, device=dev, dtype=dtype)
    coords32, down, inverse = downsample2(coords64, x)
    h = torch.randn(len(coords32), 2048, device=dev, dtype=dtype)
    return [
        {
            "op": "downsample2",
            "case": "64³->32³ C=128",
            "N": len(coords64),
            "reference_ms": cuda_ms(lambda: downsample2(coords64, x), repeats),
            "reference_fwd_bwd_ms": cuda_ms(fwd_bwd(lambda x: downsample2(coords64, x)[1], [x]), repeats),
        },
        {
            "op": "upsample2",
            "case": "32³->64³ C=2048",
            "N": len(coords64),
            "reference_ms": cuda_ms(lambda: upsample2(h, inverse), repeats),
            "reference_fwd_bwd_ms": cuda_ms(fwd_bwd(lambda h: upsample2(h, inverse), [h]), repeats),
        },
    ]


def attention_rows(coords64, coords32, dtype, repeats):
    rows, dev = [], coords64.device
    n = len(coords32)
    cu = torch.tensor([0, n], device=dev, dtype=torch.int32)
    q, k, v = (torch.randn(n, 16, 64, device=dev, dtype=dtype) for _ in range(3))
    row = {"op": "varlen_attention", "case": "32³ full, 16x64", "N": n}
    for backend in ("reference", "flash"):

        def f(q, k, v, backend=backend):
            return varlen_attention(q, k, v, cu, cu, n, n, backend=backend)

        row[f"{backend}_ms"] = cuda_ms(lambda f=f: f(q, k, v), repeats)
        row[f"{backend}_fwd_bwd_ms"] = cuda_ms(fwd_bwd(f, [q, k, v]), repeats)
    rows.append(row)
    n = len(coords64)
    q, k, v = (torch.randn(n, 12, 64, device=dev, dtype=dtype) for _ in range(3))
    for shift in (0, 4):
        row = {"op": "windowed_attention", "case": f"64³ 8³ shift {shift}, 12x64", "N": n}
        for backend in ("reference", "flash"):

            def f(q, k, v, backend=backend, shift=shift):
                return windowed_attention(q, k, v, coords64, 8, shift, backend=backend)

            row[f"{backend}_ms"] = cuda_ms(lambda f=f: f(q, k, v), repeats)
            row[f"{backend}_fwd_bwd_ms"] = cuda_ms(fwd_bwd(f, [q, k, v]), repeats)
        rows.append(row)
    return rows


def markdown(rows) -> str:
    lines = [
        "| op | case | N | reference fwd ms | fast fwd ms | speed-up | reference fwd+bwd ms | fast fwd+bwd ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fast = r.get("triton_ms", r.get("flash_ms"))
        fast_fb = r.get("triton_fwd_bwd_ms", r.get("flash_fwd_bwd_ms"))
        speed = f"{r['reference_ms'] / fast:.1f}x" if fast else "-"

        def fmt(v):
            return "-" if v is None else f"{v:.3f}"

        lines.append(
            f"| {r['op']} | {r['case']} | {r['N']} | {fmt(r['reference_ms'])} | {fmt(fast)} | {speed} | "
            f"{fmt(r.get('reference_fwd_bwd_ms'))} | {fmt(fast_fb)} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA GPU here, nothing to compare (the references are the CPU path); skipping.")
        return
    dtype = DTYPES[args.dtype]
    coords64 = sphere_shell(64, thickness=2.4).cuda()
    coords32 = downsample2(coords64, torch.zeros(len(coords64), 1, device="cuda"))[0]
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}; "
        f"64³ shell: {len(coords64)} voxels, 32³: {len(coords32)} voxels\n"
    )
    rows = conv_rows(coords64, coords32, dtype, args.repeats)
    rows += resample_rows(coords64, dtype, args.repeats)
    rows += attention_rows(coords64, coords32, dtype, args.repeats)
    print(markdown(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
