"""The `serve` subcommand. The lead wires it into `sam3d_core/cli.py` with `add_serve_parser(sub)`."""

from __future__ import annotations

import argparse

HELP = "run the worker that Blender and the desktop app talk to (JSON lines on stdin/stdout)"


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="an imported model name, or 'tiny' (default: 'official' if imported and a GPU is "
        "present, else the tiny random-weight model)",
    )
    p.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--low-vram", action="store_true", help="one stage on the GPU at a time (whole object <= 8 GB)")
    p.add_argument(
        "--max-voxels",
        type=int,
        default=None,
        help="cap on stage-1 voxels (default: the model's; fewer is faster and coarser)",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from sam3d_core.serve import worker

    if args.max_voxels is not None and not 16 <= args.max_voxels <= 10_000_000:
        raise ValueError(f"--max-voxels {args.max_voxels}: expected at least 16 (default: the model's cap)")
    if args.device is not None:
        import torch

        try:
            torch.device(args.device)
        except (RuntimeError, ValueError):
            raise ValueError(f"--device {args.device!r}: expected cpu, cuda or cuda:N") from None

    return worker.main(model=args.model, device=args.device, low_vram=args.low_vram, max_voxels=args.max_voxels)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to the `sam3d` subcommands (the result of `ArgumentParser.add_subparsers`)."""
    p = subparsers.add_parser("serve", help=HELP, description=HELP + ". Protocol: docs/protocol.md")
    _add_options(p)
    p.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sam3d_core.serve", description=HELP)
    _add_options(p)
    return cmd_serve(p.parse_args(argv))
