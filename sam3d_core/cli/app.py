"""`sam3d app`: the desktop app (PySide6), and `--setup-worker` for the first-run installer without a window."""

from __future__ import annotations

import argparse
import sys


def cmd_app(args: argparse.Namespace) -> int:
    if args.setup_worker is not None:
        return _setup_worker(args.setup_worker or None, args.index_url, args.torch_index)
    try:
        from sam3d_core.app.window import run
    except ImportError as e:
        raise ImportError(
            f"the desktop app needs PySide6 ({e}); install it with `pip install 'sam3d-kit[app]'`"
        ) from None
    return run(args.photo, args.settings)


def _setup_worker(target: str | None, index_url: str | None, torch_index: str | None) -> int:
    from sam3d_core.serve import installer

    try:
        plan = installer.plan_install(target, index_url=index_url, torch_index=torch_index or "auto")
        print(f"sam3d: making {plan.describe()}")
        result = installer.install(plan, progress=lambda step, f, msg: print(f"[{f * 100:3.0f}%] {step}: {msg}"))
    except installer.InstallError as e:
        print(f"sam3d: error: {e.message}" + (f" (log: {e.log})" if e.log else ""), file=sys.stderr)
        return 2
    print(f"worker environment ready in {result.seconds:.0f} s: {result.python} (torch {result.doctor.get('torch')})")
    return 0


def add_app_parser(subparsers) -> None:
    p = subparsers.add_parser("app", help="the desktop app: photo -> placed 3D objects (needs PySide6)")
    p.add_argument("photo", nargs="?", default=None, help="a photo to open")
    p.add_argument("--settings", default=None, help="an .ini file for the settings (default: the user's)")
    p.add_argument(
        "--setup-worker",
        nargs="?",
        const="",
        default=None,
        metavar="FOLDER",
        help="make the worker's private environment (torch for this GPU or CPU, then sam3d) without a window",
    )
    p.add_argument("--index-url", default=None, help="package index for sam3d and its dependencies (a mirror)")
    p.add_argument("--torch-index", default=None, help="package index for torch (default: PyTorch's, by GPU)")
    p.set_defaults(func=cmd_app)
