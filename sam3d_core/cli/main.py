"""`sam3d` command line: thin subcommands over library functions, one module per command group."""

from __future__ import annotations

import argparse
import sys

from sam3d_core.cli.batch import add_batch_parser
from sam3d_core.cli.doctor import add_doctor_parser
from sam3d_core.cli.reconstruct import add_reconstruct_parsers
from sam3d_core.cli.segment import add_segment_parser
from sam3d_core.cli.serve import add_serve_parser
from sam3d_core.cli.weights import add_weights_parser
from sam3d_core.inputs.imageio import InputError
from sam3d_core.pipeline.errors import ReconstructionError
from sam3d_core.weights.store import CheckpointError

# What a user can fix gets one line and exit code 2; anything else is our bug and keeps its traceback.
USER_ERRORS = (CheckpointError, InputError, ReconstructionError, FileNotFoundError, ValueError, ImportError)


def _fail(msg: str) -> int:
    print(f"sam3d: error: {msg}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sam3d", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    add_weights_parser(sub)
    add_segment_parser(sub)
    add_reconstruct_parsers(sub)
    add_doctor_parser(sub)
    add_serve_parser(sub)
    add_batch_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        return _fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
