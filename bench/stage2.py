"""Stage-2 speed and memory: one object at the official configuration, random weights.

    python bench/stage2.py [--dtype bf16] [--repeats 3] [--out result.json]

Times (CUDA-synchronised wall clock, median of --repeats after one warm-up) of the stage-2 steps on a
64^3 sphere shell of ~27k voxels (the size of a typical object): the condition embedding (4 DINO passes),
25-step sampling with CFG 1 (13 guided steps), the Gaussian decoder, the mesh decoder network, and
FlexiCubes; and the peak GPU memory of the whole object. The official code is not run here: its sparse
convolutions need spconv's CUDA build, which is larger than what the GPU machine can be sent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sam3d_core.geometry.flexicubes import extract_mesh  # noqa: E402
from sam3d_core.models.condition import ConditionEmbedder  # noqa: E402
from sam3d_core.models.slat_flow import SLatFlowModel  # noqa: E402
from sam3d_core.models.slat_vae import SLatGaussianDecoder, SLatMeshDecoder  # noqa: E402
from sam3d_core.pipeline.sampling import denormalize_slat, sample_stage2, stage2_noise  # noqa: E402
from sam3d_core.pipeline.stage1 import init_random_weights  # noqa: E402
from sam3d_core.registry import stage2_preset  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sphere_shell(res: int = 64, radius: float = 0.42, thickness: float = 3.0) -> torch.Tensor:
    """Voxels [N, 4] (batch 0) within `thickness` voxels of a sphere: ~27k at the defaults."""
    r = torch.arange(res)
    g = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3).float()
    d = ((g + 0.5) / res - 0.5).norm(dim=-1) * res
    keep = (d - radius * res).abs() < thickness / 2
    xyz = g[keep].int()
    return torch.cat([torch.zeros(len(xyz), 1, dtype=torch.int32), xyz], 1)


def timed(fn):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--preset", default="official", help="'tiny' with --device cpu checks the script quickly")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = stage2_preset(args.preset)
    with dev:
        nets = {
            "cond": ConditionEmbedder(cfg.condition),
            "flow": SLatFlowModel(cfg.flow),
            "gs": SLatGaussianDecoder(cfg.gaussian),
            "mesh": SLatMeshDecoder(cfg.mesh),
        }
    for i, m in enumerate(nets.values()):
        init_random_weights(m, seed=i).to(dtype).eval().requires_grad_(False)
    coords = sphere_shell().to(dev)
    s = cfg.condition.dino.image_size
    views = {
        k: torch.rand(1, c, s, s, device=dev, dtype=dtype)
        for k, c in (("image", 3), ("rgb_image", 3), ("mask", 1), ("rgb_image_mask", 1))
    }

    @torch.no_grad()
    def one_object() -> dict[str, float]:
        t: dict[str, float] = {}
        cond, t["condition"] = timed(lambda: nets["cond"](**views))
        noise = stage2_noise(len(coords), generator=torch.Generator(dev).manual_seed(0), device=dev)
        slat, t["sample_25_steps_cfg1"] = timed(lambda: sample_stage2(nets["flow"], cond, coords, noise, cfg.sampler))
        feats = denormalize_slat(slat, cfg).to(dtype)
        gauss, t["gaussian_decoder"] = timed(lambda: nets["gs"](feats, coords))
        (fine_coords, fine_feats), t["mesh_decoder"] = timed(lambda: nets["mesh"](feats, coords))
        mesh, t["flexicubes"] = timed(lambda: extract_mesh(fine_coords, fine_feats.float()))
        t["total"] = sum(t.values())
        t["gaussians"], t["faces"] = float(len(gauss)), float(len(mesh.faces))
        return t

    first = one_object()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = [one_object() for _ in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    if dev.type == "cuda":
        med["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    med["first_call_s"] = first["total"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = {
        "device": name,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "voxels": len(coords),
        "date": time.strftime("%Y-%m-%d"),
        "ours": med,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
