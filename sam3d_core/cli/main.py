"""`sam3d` command line: thin subcommands over library functions, one module per command group."""

from __future__ import annotations

import argparse
import sys

from sam3d_core.cli.app import add_app_parser
from sam3d_core.cli.batch import add_batch_parser
from sam3d_core.cli.data import add_data_parser
from sam3d_core.cli.doctor import add_doctor_parser
from sam3d_core.cli.eval import add_eval_parser
from sam3d_core.cli.reconstruct import add_reconstruct_parsers
from sam3d_core.cli.segment import add_segment_parser
from sam3d_core.cli.serve import add_serve_parser
from sam3d_core.cli.train import add_train_parser
from sam3d_core.cli.train_default import add_train_default_parser
from sam3d_core.cli.weights import add_weights_parser
from sam3d_core.export.output import OutputError, os_error_message
from sam3d_core.inputs.imageio import InputError
from sam3d_core.pipeline.errors import ReconstructionError
from sam3d_core.weights.store import CheckpointError

# What a user can fix gets one line and exit code 2; anything else is our bug and keeps its traceback.
# (InputError, OutputError and CheckpointError are ValueErrors; they are named for the reader.)
USER_ERRORS = (
    CheckpointError,
    InputError,
    OutputError,
    ReconstructionError,
    FileNotFoundError,
    ValueError,
    ImportError,
)


def _fail(msg: str) -> int:
    line = "; ".join(part.strip() for part in str(msg).splitlines() if part.strip())  # one line, always
    print(f"sam3d: error: {line}", file=sys.stderr)
    return 2


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one `--help` away), exit code 2 as before."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="sam3d", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)  # subparsers are Parsers too (parser_class)
    add_weights_parser(sub)
    add_segment_parser(sub)
    add_reconstruct_parsers(sub)
    add_doctor_parser(sub)
    add_serve_parser(sub)
    add_app_parser(sub)
    add_data_parser(sub)
    add_eval_parser(sub)
    add_train_parser(sub)
    add_train_default_parser(sub)
    add_batch_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        return _fail(str(e))
    except OSError as e:  # disk full, read-only, permissions, ...: the user's to fix; others are our bugs
        msg = os_error_message(e, "reading or writing a file")
        if msg is None:
            raise
        return _fail(msg)
    except MemoryError:
        return _fail(
            "ran out of memory (RAM); use a smaller photo, a lower --max-voxels or --texture-size, or close other "
            "programs"
        )
    except KeyboardInterrupt:
        print("sam3d: interrupted; the unfinished job wrote nothing", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
