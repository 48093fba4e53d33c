"""`sam3d doctor`: what this Python environment offers the worker (versions, GPU, memory), as text or one
JSON line. Blender's "Check setup" runs it with the worker's interpreter (`python -m sam3d_core.cli.doctor
--json`), so the add-on never embeds code that imports torch."""

from __future__ import annotations

import argparse
import json
import sys


def probe() -> dict:
    """Python, sam3d and torch versions, and the first CUDA GPU with its total and free memory (GiB)."""
    from sam3d_core.version import __version__

    info: dict = {"python": sys.version.split()[0], "executable": sys.executable, "sam3d": __version__}
    try:
        import torch
    except Exception as e:  # a broken install: say what failed
        info["torch_error"] = f"{type(e).__name__}: {e}"
        return info
    info["torch"] = torch.__version__
    info["cuda"] = bool(torch.cuda.is_available())
    if info["cuda"]:
        free, total = torch.cuda.mem_get_info(0)
        info["gpu"] = torch.cuda.get_device_properties(0).name
        info["gpu_memory_gb"] = round(total / 2**30, 1)
        info["gpu_free_gb"] = round(free / 2**30, 1)
    return info


def cmd_doctor(args: argparse.Namespace) -> int:
    info = probe()
    if args.json:
        print(json.dumps(info))
        return 0
    for key, value in info.items():
        print(f"{key:>14}: {value}")
    return 0


def add_doctor_parser(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="versions, GPU and memory of this environment")
    p.add_argument("--json", action="store_true", help="one JSON line (for the Blender add-on)")
    p.set_defaults(func=cmd_doctor)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m sam3d_core.cli.doctor", description=__doc__)
    parser.add_argument("--json", action="store_true")
    sys.exit(cmd_doctor(parser.parse_args()))
