"""`sam3d train ...`: fine-tune either stage on sample folders (docs/training.md).

sam3d train CONFIG.toml [--recipe NAME] [--resume]        # one process; under torchrun: one per GPU
sam3d train --template sft-stage1 > my.toml               # a documented configuration to start from
sam3d train --merge ADAPTER_FOLDER --name NAME            # a LoRA adapter + its base -> an installed model
"""

from __future__ import annotations

import argparse
import sys
import time

HELP = "fine-tune a stage on sample folders (SFT, DPO, shortcut; full or LoRA; one GPU or torchrun)"


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressBar:
    """step / steps, loss, samples per second and ETA on one line of stderr (a line per 5% when not a tty)."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.last_pct = -1
        self.t0 = time.perf_counter()

    def __call__(self, p: dict) -> None:
        done, total = p["step"], p["steps"]
        width = 24
        fill = int(width * done / total)
        line = (
            f"[{'#' * fill}{'.' * (width - fill)}] {done}/{total}  loss {p['loss']:.4f}  "
            f"{p['samples_per_s']:.2f} samples/s  ETA {_fmt_time(p['eta_s'])}"
        )
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == total else ""))
            self.stream.flush()
        elif (pct := 100 * done // total // 5) != self.last_pct or done == total:
            self.last_pct = pct
            print(line, file=self.stream, flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    from sam3d_core.training import config as tcfg

    try:
        if args.template:
            cfg = tcfg.recipe(args.template) if args.template != "defaults" else tcfg.TrainConfig()
            sys.stdout.write(tcfg.describe(cfg))
            return 0
        if args.merge:
            return _merge(args)
        if not args.config:
            print(
                "sam3d train: error: give a CONFIG.toml (start from `sam3d train --template sft-stage1`)",
                file=sys.stderr,
            )
            return 2
        from sam3d_core.training.checkpoint import DiskFullError
        from sam3d_core.training.loop import TrainingError, train
        from sam3d_core.training.memory import GPUTooSmall

        cfg = tcfg.load_config(args.config, args.recipe)
        try:
            result = train(cfg, resume=args.resume, progress=None if args.quiet else ProgressBar())
        except (TrainingError, GPUTooSmall, DiskFullError) as e:
            print(f"sam3d train: error: {e}", file=sys.stderr)
            return 2
        if result.weights is not None:
            print(f"weights: {result.weights}  (use with --model {result.weights})")
        return 0
    except KeyboardInterrupt:
        print("\nsam3d train: interrupted; continue with --resume from the last checkpoint", file=sys.stderr)
        return 130


def _merge(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from sam3d_core.training.output import load_adapted_state, write_weights
    from sam3d_core.weights.store import models_dir

    folder = Path(args.merge)
    if not args.name:
        print("sam3d train: error: --merge needs --name (the installed model's name)", file=sys.stderr)
        return 2
    manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else {}
    stage = 2 if (folder / "stage2.json").is_file() and not (folder / "stage1.json").is_file() else 1
    cfg, state, digest = load_adapted_state(folder, stage)
    base = json.loads((folder / "adapter_base.json").read_text())["base"]
    card = (folder / "README.md").read_text() if (folder / "README.md").is_file() else f"# {args.name}\n"
    training = {**manifest.get("training", {}), "merged_adapter": str(folder), "weights": digest}
    out = write_weights(models_dir(), args.name, stage, cfg, state, base, card, training)
    print(f"installed {out} (base {base.get('name')} + adapter {folder.name}); use --model {args.name}")
    return 0


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add `train` to the `sam3d` subcommands."""
    p = subparsers.add_parser("train", help=HELP, description=HELP + ". Guide: docs/training.md")
    p.add_argument("config", nargs="?", help="the run's TOML configuration")
    p.add_argument("--recipe", default=None, help="start from a named recipe (overrides the file's `recipe`)")
    p.add_argument("--resume", action="store_true", help="continue the run in `output` from its newest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar (metrics.jsonl is written either way)")
    p.add_argument(
        "--template",
        metavar="RECIPE",
        default=None,
        help="print a documented configuration (a recipe name, or 'defaults') and exit",
    )
    p.add_argument("--merge", metavar="ADAPTER", default=None, help="merge a LoRA adapter folder into its base model")
    p.add_argument("--name", default=None, help="with --merge: the name to install the merged model under")
    p.set_defaults(func=cmd_train)
    return p
