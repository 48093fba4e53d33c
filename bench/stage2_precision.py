"""How far stage 2 in bf16 lands from stage 2 in float32 (official configuration, random weights).

    python bench/stage2_precision.py [--voxels 27584]

The float32 path matches the official code (docs/benchmarks.md, parity at the full configuration), so this
measures what the bf16 fast path costs in accuracy: the same condition tokens, voxels and noise through
both, then the SLAT, the Gaussians and the mesh compared (relative errors; mesh: surface distance between
point samples of the two meshes, in voxels of the 256³ grid, and the face counts).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stage2 import sphere_shell  # noqa: E402
from sam3d_core.pipeline.stage1 import init_random_weights  # noqa: E402
from sam3d_core.pipeline.stage2 import Stage2Model, Stage2Pipeline  # noqa: E402
from sam3d_core.registry import stage2_preset  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def surface_distance(va: torch.Tensor, vb: torch.Tensor, n: int = 20000) -> dict:
    g = torch.Generator(device=va.device).manual_seed(0)
    a = va[torch.randint(len(va), (min(n, len(va)),), generator=g, device=va.device)]
    b = vb[torch.randint(len(vb), (min(n, len(vb)),), generator=g, device=vb.device)]
    d_ab = torch.cat([torch.cdist(x, vb).min(1).values for x in a.split(2048)])
    d_ba = torch.cat([torch.cdist(x, va).min(1).values for x in b.split(2048)])
    d = torch.cat([d_ab, d_ba]) * 256  # in fine voxels
    return {"mean_voxels": float(d.mean()), "p99_voxels": float(d.quantile(0.99)), "max_voxels": float(d.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="official")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = stage2_preset(args.preset)
    with torch.device(args.device):
        model = init_random_weights(Stage2Model(cfg), seed=0)
    fp32 = Stage2Pipeline(model, args.device, torch.float32, "random:0")
    bf16 = Stage2Pipeline(copy.deepcopy(model), args.device, torch.bfloat16, "random:0")
    coords = sphere_shell().to(args.device)
    s = cfg.condition.dino.image_size
    g = torch.Generator(device=args.device).manual_seed(1)
    views = {
        k: torch.rand(1, c, s, s, device=args.device, generator=g)
        for k, c in (("image", 3), ("rgb_image", 3), ("mask", 1), ("rgb_image_mask", 1))
    }
    out = {}
    for name, pipe in (("fp32", fp32), ("bf16", bf16)):
        with torch.no_grad():
            cond = pipe.encode(views)
            slat = pipe.sample(cond, coords, seed=42)
            gs = pipe.model.decoder_gs(slat.to(pipe.dtype), coords)
            mesh = pipe.decode_mesh(slat, coords)
        out[name] = (cond, slat, gs, mesh)
    (c32, s32, g32, m32), (c16, s16, g16, m16) = out["fp32"], out["bf16"]
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "voxels": len(coords),
        "condition_tokens_rel": rel(c16, c32),
        "slat_rel": rel(s16, s32),
        "slat_mean_abs_over_std": float((s16 - s32).abs().mean() / s32.std()),
        "gaussian_xyz_rel": rel(g16.get_xyz, g32.get_xyz),
        "gaussian_color_rel": rel(g16._features_dc, g32._features_dc),
        "faces_fp32": len(m32.faces),
        "faces_bf16": len(m16.faces),
        "mesh_surface_distance": surface_distance(m16.vertices.float(), m32.vertices.float()),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
