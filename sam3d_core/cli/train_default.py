"""`sam3d train-default`: train our default model from scratch (sam3d_core/training/default_model.py).

sam3d data pack --out PACK
sam3d train-default --pack PACK --out RUN --minutes 9      # repeat: each call resumes; the last one exports RUN/default
"""

from __future__ import annotations

import argparse
import sys

HELP = "train the default model from scratch on a render pack, in resumable calls"


def cmd_train_default(args: argparse.Namespace) -> int:
    from sam3d_core.cli.train import ProgressBar
    from sam3d_core.training.default_model import DefaultPlan, run

    plan = DefaultPlan(
        pack=args.pack,
        out=args.out,
        minutes=args.minutes,
        device=args.device,
        workers=args.workers,
        view_device=args.view_device,
        seed=args.seed,
        decoder_steps=args.decoder_steps,
        decoder_batch=args.decoder_batch,
        decoder_minutes=args.decoder_minutes,
        flow_minutes=args.flow_minutes,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        one_call=args.one_call,
        ema_decay=args.ema_decay,
        warmup_steps=args.warmup_steps,
        cfg_views=args.cfg_views,
    )
    result = run(plan, log=lambda s: print(s, file=sys.stderr, flush=True), progress=ProgressBar())
    print(f"{result['status']}: " + ", ".join(f"{k} {v}" for k, v in result.items() if k != "status"))
    return 0


def add_train_default_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train-default", help=HELP, description=HELP + ". Guide: docs/training.md")
    p.add_argument("--pack", required=True, help="a render pack (`sam3d data pack`)")
    p.add_argument("--out", required=True, help="the run folder (created; a later call resumes in it)")
    p.add_argument("--minutes", type=float, default=0.0, help="this call's time budget (0 = until done)")
    p.add_argument("--device", default="", help="torch device (default: cuda when present)")
    p.add_argument("--workers", type=int, default=-1, help="view-rendering processes (default: cores - 1)")
    p.add_argument(
        "--view-device", choices=("auto", "cpu", "device"), default="auto",
        help="where the training views are rendered: cpu (the --workers processes, view by view), device (the "
        "training device, a micro-batch at once; the processes only draw scenes), auto (device on a GPU)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decoder-steps", type=int, default=3000, help="occupancy-decoder optimizer steps")
    p.add_argument("--decoder-batch", type=int, default=32)
    p.add_argument("--decoder-minutes", type=float, default=0.0, help="time box of the decoder phase (0: the steps)")
    p.add_argument(
        "--flow-minutes", type=float, default=15.0,
        help="training time of the flow model: the first call measures its steps per second and fixes the number of "
        "steps (the learning-rate schedule's length) so that the run takes this long",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=0, help="flow-model optimizer steps (0: from --flow-minutes)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights (lower for short runs)")
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--one-call", action="store_true", help="end and export within --minutes (no later call)")
    p.add_argument(
        "--cfg-views", type=int, default=32, help="fresh views that choose the shipped guidance strength (at export)"
    )
    p.set_defaults(func=cmd_train_default)
    return p
