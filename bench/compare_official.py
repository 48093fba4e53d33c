"""Compare our stage 1 with a run of the official code at the full official configuration.

    python bench/compare_official.py --official-run DIR --model MODEL_DIR [--device cuda] [--out result.json]

DIR holds what a run of the official implementation saved (random weights, official-layout checkpoint
folder imported into MODEL_DIR with `sam3d weights import`): official_inputs.safetensors (photo, mask,
point map), official_preprocessed.safetensors, official_outputs.safetensors (fp32/* with TF32 off, and
fp16/* at the official autocast precision) and official_outputs.json. This script never runs the
official code; it reproduces each saved output with ours and reports the differences:
  fp32: preprocessing, condition tokens, one velocity evaluation (cond, uncond, CFG 7), the 25-step
        sample from the same seed, decoder logits, voxels and pose, the 4-step shortcut sample;
  bf16 (ours, the default on a GPU) against the official fp16: voxel IoU and pose.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sam3d_core.models.ss_vae import shape_latent_to_grid  # noqa: E402
from sam3d_core.pipeline.sampling import stage1_noise  # noqa: E402
from sam3d_core.pipeline.stage1 import Stage1Pipeline  # noqa: E402


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (0 for identical tensors)."""
    a, ref = a.double().cpu(), ref.double().cpu()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def voxel_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    key = lambda c: set(map(tuple, c[:, 1:].cpu().tolist()))  # noqa: E731
    ka, kb = key(a), key(b)
    return len(ka & kb) / max(1, len(ka | kb))


def pose_diff(pose, ref: dict, prefix: str) -> dict:
    q, rq = pose.quaternion.cpu(), ref[f"{prefix}pose/rotation"]
    dot = (q * rq).sum(-1).abs().clamp(max=1.0)
    return {
        "rotation_deg": float(2 * torch.rad2deg(torch.arccos(dot)).max()),
        "translation_rel": rel(pose.translation, ref[f"{prefix}pose/translation"]),
        "scale_rel": rel(pose.scale, ref[f"{prefix}pose/scale"]),
    }


@torch.no_grad()
def compare_fp32(pipe: Stage1Pipeline, run: Path, meta: dict) -> dict:
    ref = {k[5:]: v for k, v in load_file(run / "official_outputs.safetensors").items() if k.startswith("fp32/")}
    inp = load_file(run / "official_inputs.safetensors")
    pre = load_file(run / "official_preprocessed.safetensors")
    res: dict = {}
    inputs = pipe.prepare(inp["input/rgb"].numpy(), inp["input/mask"].numpy() > 0, inp["input/pointmap"].numpy())
    res["preprocess_max_abs"] = max(
        float((inputs[k].cpu() - pre[f"pre/{k}"]).nan_to_num(0.0).abs().max()) for k in inputs
    )
    cond = pipe.encode(inputs)
    stride = cond.shape[1] // ref["cond/tokens_every_8"].shape[1] if "cond/tokens_every_8" in ref else 8
    res["cond_tokens_rel"] = rel(cond[:, ::8][:, : ref["cond/tokens_every_8"].shape[1]], ref["cond/tokens_every_8"])
    res["cond_token_std_rel"] = rel(cond.float().std(-1), ref["cond/token_std"])
    del stride

    gen = pipe.model.generator
    t = torch.full((1,), float(meta["single_eval"]["network_time"]), device=pipe.device)
    d = torch.zeros(1, device=pipe.device) if gen.cfg.is_shortcut_model else None
    lat = {k.split("/")[-1]: v.to(pipe.device) for k, v in ref.items() if k.startswith("eval/latent/")}
    v_c = gen(lat, t, cond, d)
    v_u = gen(lat, t, cond * 0, d)
    v_g = gen.forward_cfg(lat, t, gen.prepare_condition(cond), d, 7.0)
    res["eval_rel"] = {
        name: max(
            rel(v_c[k], ref[f"eval/cond/{k}"]), rel(v_u[k], ref[f"eval/uncond/{k}"]), rel(v_g[k], ref[f"eval/cfg/{k}"])
        )
        for name, k in ((k, k) for k in v_c)
    }

    noise = stage1_noise(1, gen.cfg, torch.Generator(pipe.device).manual_seed(42), pipe.device)
    res["noise_max_abs"] = max(float((noise[k].cpu() - ref[f"sample/noise/{k}"]).abs().max()) for k in noise)
    out = pipe.sample(inputs, cond, seed=42)
    res["sample_rel"] = {k: rel(v, ref[f"sample/final/{k}"]) for k, v in out.latents.items()}
    logits = pipe.model.decoder(shape_latent_to_grid(out.latents["shape"].to(pipe.dtype)))
    res["logits_rel"] = rel(logits, ref["sample/decoder_logits"])
    res["voxels"] = {
        "ours": len(out.coords),
        "official": len(ref["sample/coords"]),
        "iou_pruned": voxel_iou(out.coords, ref["sample/coords"]),
        "iou_all": voxel_iou(out.coords_original, ref["sample/coords_original"]),
    }
    res["pose"] = pose_diff(out.pose, ref, "")
    short = pipe.sample(inputs, cond, seed=42, shortcut=True, steps=len(ref["shortcut/t_steps"]))
    res["shortcut_rel"] = {k: rel(v, ref[f"shortcut/final/{k}"]) for k, v in short.latents.items()}
    res["shortcut_pose"] = pose_diff(short.pose, ref, "shortcut/")
    return res


@torch.no_grad()
def compare_low_precision(pipe: Stage1Pipeline, run: Path) -> dict:
    ref = {k[5:]: v for k, v in load_file(run / "official_outputs.safetensors").items() if k.startswith("fp16/")}
    inp = load_file(run / "official_inputs.safetensors")
    out = pipe(inp["input/rgb"].numpy(), inp["input/mask"].numpy() > 0, inp["input/pointmap"].numpy(), seed=42)
    res = {
        "dtype": str(pipe.dtype),
        "sample_rel": {k: rel(v, ref[f"sample/final/{k}"]) for k, v in out.latents.items()},
    }
    if "sample/coords" in ref:
        res["voxels"] = {
            "ours": len(out.coords),
            "official": len(ref["sample/coords"]),
            "iou_pruned": voxel_iou(out.coords, ref["sample/coords"]),
        }
    if "pose/rotation" in ref:
        res["pose"] = pose_diff(out.pose, ref, "")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-run", type=Path, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    meta = json.loads((args.official_run / "official_outputs.json").read_text())

    torch.backends.cuda.matmul.allow_tf32 = False  # the official fp32 run had TF32 off
    torch.backends.cudnn.allow_tf32 = False
    result = {}
    pipe = Stage1Pipeline.from_pretrained(args.model, device=args.device, dtype=torch.float32)
    result["fp32"] = compare_fp32(pipe, args.official_run, meta)
    print(json.dumps(result, indent=1), flush=True)
    del pipe
    torch.cuda.empty_cache() if args.device.startswith("cuda") else None
    low = Stage1Pipeline.from_pretrained(args.model, device=args.device, check_hashes=False)
    result["low_precision_vs_official_fp16"] = compare_low_precision(low, args.official_run)
    print(json.dumps(result["low_precision_vs_official_fp16"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
