"""`sam3d weights fit-encoder`: fit a sparse-structure encoder against an imported model's frozen decoder.

    sam3d weights fit-encoder official --data SAMPLES [--data MORE] [--target-iou 0.9] [--max-steps 20000]
                              [--device cuda] [--overwrite]

For weight folders without encoders (early releases shipped them empty). The encoder is added to the model folder
(`ss_encoder.safetensors`, recorded in its manifest) only when the held-out IoU reaches the target; docs/encoders.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sam3d_core.data.fit_encoder import FitConfig, fit_for_model


def cmd_fit_encoder(args: argparse.Namespace) -> int:
    cfg = FitConfig(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        target_iou=args.target_iou,
        eval_every=args.eval_every,
        seed=args.seed,
    )
    t0 = time.perf_counter()

    def show(step: int, loss: float, iou: float) -> None:
        elapsed = time.perf_counter() - t0
        print(f"step {step}/{cfg.max_steps}  loss {loss:.4f}  held-out IoU {iou:.4f}  {elapsed:.0f} s", file=sys.stderr)

    result = fit_for_model(args.name, args.data, cfg, device=args.device, overwrite=args.overwrite, progress=show)
    if not result.reached:
        print(
            f"held-out IoU {result.iou:.4f} after {result.steps} steps is below the target {cfg.target_iou}; nothing "
            "saved. Fit on more samples or run longer (--max-steps).",
            file=sys.stderr,
        )
        return 1
    print(
        f"ss_encoder fitted: held-out IoU {result.iou:.4f} after {result.steps} steps (latents mean "
        f"{result.latent_mean:.3f}, std {result.latent_std:.3f}); added to model {args.name!r}"
    )
    return 0


def add_fit_encoder_parser(weights_subparsers) -> argparse.ArgumentParser:
    """Add `weights fit-encoder NAME --data FOLDER ...` to the main CLI's `weights` subparsers."""
    d = FitConfig()
    s = weights_subparsers.add_parser(
        "fit-encoder",
        help="fit a sparse-structure encoder against an imported model's frozen decoder (for folders without one)",
    )
    s.add_argument("name", help="the imported model (sam3d weights list)")
    s.add_argument(
        "--data", type=Path, action="append", required=True, help="a sample folder (dataset.json); repeatable"
    )
    s.add_argument(
        "--target-iou", type=float, default=d.target_iou, help=f"held-out IoU to reach (default {d.target_iou})"
    )
    s.add_argument("--max-steps", type=int, default=d.max_steps, help=f"default {d.max_steps}")
    s.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    s.add_argument("--lr", type=float, default=d.lr, help=f"default {d.lr}")
    s.add_argument("--eval-every", type=int, default=d.eval_every, help=f"default {d.eval_every}")
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    s.add_argument("--overwrite", action="store_true", help="replace an ss_encoder the model already has")
    s.set_defaults(func=cmd_fit_encoder)
    return s
