"""Target-latent encoders at the official sizes with random weights: encode_sample throughput and fit-encoder speed.

    python bench/encoders.py [--device cuda] [--preset official] [--views 150] [--fit-steps 20] [--batch 4]
                             [--out result.json]

Cases
  encode   LatentEncoder.encode_sample at the official preset (DINOv2 ViT-L/14 at 518 px, `--views` views, both
           encoders) on a 20k-face sphere and its surface voxels (~25k): seconds per sample, split into the parts.
  fit      data.fit_encoder steps of the official SS encoder against the official-size decoder (frozen) at 64^3,
           batch `--batch`: steps per second, so `sam3d weights fit-encoder --max-steps N` can be timed.
Random weights: the numbers are speeds, not quality. `--preset tiny` is a quick CPU smoke run. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sam3d_core.data.fit_encoder import FitConfig, fit_ss_encoder, mirror_config  # noqa: E402
from sam3d_core.data.latents import LatentEncoder  # noqa: E402
from sam3d_core.models.ss_vae import SSDecoder, SSEncoder  # noqa: E402
from sam3d_core.models.stages import init_random_weights  # noqa: E402
from sam3d_core.registry import stage1_preset  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def sphere_sample(radius: float = 0.4):
    import trimesh

    mesh = trimesh.creation.icosphere(subdivisions=5, radius=radius)  # 20480 faces
    g = np.stack(np.meshgrid(*[np.arange(64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    d = np.linalg.norm((g + 0.5) / 64 - 0.5, axis=1)
    return mesh, g[np.abs(d - radius) <= 0.5 / 64]


def bench_encode(device: str, preset: str, views: int) -> dict:
    enc = LatentEncoder.from_random(preset, seed=0, device=device).with_views(views)
    mesh, occ = sphere_sample()
    enc.encode_sample(mesh, occ[:2000])  # warm-up (kernels, allocator)
    sync(device)
    t0 = time.perf_counter()
    feats, counts = enc.voxel_features(mesh, occ)
    sync(device)
    t1 = time.perf_counter()
    out = enc.encode_sample(mesh, occ)
    sync(device)
    t2 = time.perf_counter()
    return {
        "views": views,
        "voxels": len(occ),
        "visible_voxels": int((counts > 0).sum()),
        "render_dino_project_s": round(t1 - t0, 3),
        "encode_sample_s": round(t2 - t1, 3),
        "slat_voxels": len(out["slat_coords"]),
    }


def bench_fit(device: str, preset: str, steps: int, batch: int) -> dict:
    dcfg = stage1_preset(preset).decoder
    decoder = init_random_weights(SSDecoder(dcfg), seed=0).to(device)
    encoder = SSEncoder(mirror_config(dcfg)).to(device)
    _, occ = sphere_sample()
    cfg = FitConfig(max_steps=steps, batch_size=batch, eval_every=10**9, target_iou=2.0)
    fit_ss_encoder(encoder, decoder, [occ], [occ], FitConfig(max_steps=1, batch_size=batch, eval_every=10**9))
    sync(device)
    t0 = time.perf_counter()
    fit_ss_encoder(encoder, decoder, [occ], [occ], cfg)  # includes 2 held-out evaluations + the latent statistics
    sync(device)
    dt = time.perf_counter() - t0
    return {"steps": steps, "batch": batch, "seconds": round(dt, 2), "steps_per_s": round(steps / dt, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="official", choices=("official", "tiny"))
    ap.add_argument("--views", type=int, default=150)
    ap.add_argument("--fit-steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "preset": args.preset,
        "encode": bench_encode(args.device, args.preset, args.views),
        "fit": bench_fit(args.device, args.preset, args.fit_steps, args.batch),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
