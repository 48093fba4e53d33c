"""`sam3d weights ...`: import, list, verify, remove and (opt-in) download model weights.

sam3d weights import FOLDER [--name official]    # the official checkpoints/ folder (YAML + .ckpt)
sam3d weights import-sam FILE                    # segment-anything / SAM 2 checkpoints
sam3d weights import-depth FILE                  # MoGe v1 depth-model weights
sam3d weights list | verify NAME | remove NAME
sam3d weights download official|sam-vit_b|...    # the only command that uses the network
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from sam3d_core.cli.encoders import add_fit_encoder_parser
from sam3d_core.cli.segment import path_arg
from sam3d_core.inputs import depth
from sam3d_core.inputs.depth import MOGE_DEFAULT_WEIGHTS, import_depth_weights
from sam3d_core.segment import weights as sam_weights
from sam3d_core.weights import download, hub, store
from sam3d_core.weights.store import CheckpointError


def cmd_weights(args: argparse.Namespace) -> int:
    if args.action == "import":
        t0 = time.perf_counter()
        root = Path(args.root) if args.root else None
        rep = hub.import_official(args.folder, name=args.name, root=root, overwrite=args.overwrite)
        print(
            f"imported {' + '.join(rep.stages)}: {rep.num_tensors} tensors "
            f"({rep.num_parameters / 1e6:.1f} M parameters) "
            f"into {rep.folder} in {time.perf_counter() - t0:.1f} s"
            + (f"; {rep.ignored_keys} other entries ignored" if rep.ignored_keys else "")
        )
        for note in rep.notes:
            print(f"note: {note}")
    elif args.action == "list":
        models = hub.list_models()
        sams = sam_weights.list_sam()
        depths = depth.list_depth_weights()
        broken = (
            [("sam3d", b) for b in hub.list_broken()]
            + [("sam", b) for b in sam_weights.list_sam(broken=True)]
            + [("depth", b) for b in depth.list_depth_weights(broken=True)]
        )
        if not models and not sams and not depths and not broken:
            print(
                f"no models in {store.data_dir()}; import SAM 3D weights with `sam3d weights import FOLDER` "
                "and SAM weights with `sam3d weights import-sam FILE`"
            )
        for m in models:
            print(f"sam3d  {m['name']:<16} {m['bytes'] / 1e9:6.2f} GB  {m['folder']}  (from {m['source']})")
        for m in depths:
            print(f"depth  {m.get('name', '?'):<16} {m.get('bytes', 0) / 1e9:6.2f} GB  {m.get('folder', '')}")
        for m in sams:
            print(f"{m.get('kind', 'sam'):<6} {m['name']:<16} {m.get('bytes', 0) / 1e9:6.2f} GB  {m.get('folder', '')}")
        for kind, b in broken:  # listed, skipped everywhere else, never fatal
            print(f"BROKEN {kind:<6} {b['name']:<16} {b['folder']}: {b['problem']}")
    elif args.action == "verify":
        problems = _on_store(args.name, hub.verify, sam_weights.verify, depth.verify_depth_weights)
        for p in problems:
            print(f"FAIL {p}")
        print("ok" if not problems else f"{len(problems)} problem(s); re-import the model")
        return 0 if not problems else 1
    elif args.action == "remove":
        print(f"removed {_on_store(args.name, hub.remove, sam_weights.remove, depth.remove_depth_weights)}")
    return 0


def _on_store(name: str, sam3d_fn, sam_fn, depth_fn):
    """Apply to the SAM 3D model called `name`, else the SAM checkpoint, else the depth weights of that name.
    `name` is a name (checked), looked up only inside the data folder."""
    name = store.check_model_name(name)
    for root, fn in (
        (store.models_dir(), sam3d_fn),
        (sam_weights.segment_dir(), sam_fn),
        (depth.depth_dir(), depth_fn),
    ):
        if (root / name / "manifest.json").is_file() and not (root / name).is_symlink():
            return fn(name)
    raise CheckpointError(
        f"no imported model {name!r} (SAM 3D, SAM or depth) in {store.data_dir()}; "
        "`sam3d weights list` shows what is there"
    )


def cmd_import_sam(args: argparse.Namespace) -> int:
    dest = sam_weights.import_sam_checkpoint(args.file, name=args.name, overwrite=args.overwrite, bpe=args.bpe)
    print(f"imported {args.file} into {dest} (sha256 recorded; checked on every load)")
    manifest = json.loads((dest / "manifest.json").read_text())
    if manifest.get("kind") == "sam3":
        try:
            bpe = sam_weights.find_bpe(dest)
            print(f"SAM 3 text vocabulary: {bpe}")
        except CheckpointError as e:  # the weights are in; text prompts need the vocabulary too
            print(f"note: {e}")
    return 0


def add_weights_sam_parser(weights_subparsers) -> argparse.ArgumentParser:
    """Add `weights import-sam FILE` to the main CLI's `weights` subparsers."""
    s = weights_subparsers.add_parser(
        "import-sam",
        help="import a segment-anything (.pth), SAM 2 (.pt) or SAM 3 (sam3.pt) checkpoint, or its .safetensors",
    )
    s.add_argument("file", type=path_arg("FILE"))
    s.add_argument(
        "--name",
        default=None,
        help="default: the model type (vit_h, vit_l, vit_b; SAM 2: sam2.1_hiera_tiny, _small, _base_plus, _large; "
        "SAM 3: sam3)",
    )
    s.add_argument(
        "--bpe",
        type=path_arg("--bpe"),
        default=None,
        help="SAM 3 only: CLIP's bpe_simple_vocab_16e6.txt.gz for its text encoder, kept with the weights "
        "(default: one beside FILE; else sam3's or open_clip's copy is looked for when loading)",
    )
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_import_sam)
    return s


def cmd_import_depth(args) -> int:
    dest = import_depth_weights(args.file, name=args.name, overwrite=args.overwrite)
    manifest = json.loads((dest / "manifest.json").read_text())
    print(
        f"imported {args.file} into {dest} (source sha256 {manifest['source_file']['sha256']}; the files' "
        "sha256 is checked on every load)"
    )
    return 0


def add_depth_parser(weights_subparsers):
    """Add `weights import-depth FILE_OR_DIR [--name moge-vitl] [--overwrite]` to the `weights` subparsers."""
    s = weights_subparsers.add_parser(
        "import-depth",
        help="import MoGe v1 depth-model weights (model.pt of "
        "Ruicheng/moge-vitl, or a folder holding it) for metric point maps",
    )
    s.add_argument(
        "file",
        type=path_arg("FILE"),
        help="model.pt, a folder holding it, or model.safetensors with config.json beside it",
    )
    s.add_argument("--name", default=MOGE_DEFAULT_WEIGHTS, help=f"default {MOGE_DEFAULT_WEIGHTS}")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_import_depth)
    return s


def add_download_parser(subparsers) -> argparse.ArgumentParser:
    """Add `download` to a subparsers object (the main CLI puts it under `sam3d weights`)."""
    d = subparsers.add_parser(
        "download", help="download weights from the internet (opt-in; the only command that uses the network)"
    )
    d.add_argument(
        "what",
        choices=download.CHOICES,
        help="official: SAM 3D Objects (gated, about 11.6 GB); sam-vit_*: segment-anything checkpoints",
    )
    d.add_argument("--dest", type=Path, default=None, help="folder (default: <data dir>/downloads/<what>)")
    d.add_argument("--token", default=None, help="Hugging Face read token (default: $HF_TOKEN)")
    d.add_argument("--revision", default=None, help="Hugging Face branch, tag or commit (default: main)")
    d.add_argument(
        "--endpoint",
        default=None,
        help=f"Hugging Face endpoint or mirror (default: $HF_ENDPOINT, else {download.HF_ENDPOINT})",
    )
    d.add_argument("--yes", action="store_true", help="do not ask before downloading")
    d.set_defaults(func=cmd_download)
    return d


def _confirm(question: str) -> bool:
    if not sys.stdin or not sys.stdin.isatty():
        raise download.DownloadError(f"{question} -- no terminal to ask: pass --yes to confirm", "declined")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _printer() -> download.Progress:
    last = [0.0]

    def show(name: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] < 0.5 and done != total:
            return
        last[0] = now
        of = f" / {total / 1e9:.2f} GB ({100 * done / total:.0f}%)" if total else ""
        print(f"\r{name}: {done / 1e9:.2f} GB{of}   ", end="" if done != total else "\n", file=sys.stderr, flush=True)

    return show


def cmd_download(args: argparse.Namespace) -> int:
    dest = args.dest
    if dest is None:
        dest = store.data_dir() / "downloads" / args.what
    try:
        if args.what == "official":
            endpoint = args.endpoint or os.environ.get("HF_ENDPOINT") or download.HF_ENDPOINT
            question = (
                f"Download about {download.OFFICIAL_APPROX_BYTES / 1e9:.1f} GB "
                f"({len(download.OFFICIAL_FILES)} files) from "
                f"{endpoint}/{download.HF_REPO} into {dest}?"
            )
            if not args.yes and not _confirm(question):
                print("nothing downloaded")
                return 1
            folder = download.download_official(dest, args.token, args.revision, endpoint, progress=_printer())
            print(f"downloaded into {folder}; next: sam3d weights import {folder}")
        else:
            kind = args.what.removeprefix("sam-")
            name, approx = download.SAM_FILES[kind]
            question = f"Download {name} (about {approx / 1e9:.2f} GB) from {download.SAM_BASE_URL} into {dest}?"
            if not args.yes and not _confirm(question):
                print("nothing downloaded")
                return 1
            got = download.download_sam(kind, dest, progress=_printer())
            print(
                f"{'already there' if got.skipped else 'downloaded'}: {got.path} ({got.bytes} bytes, sha256 "
                f"{got.sha256}); next: sam3d weights import-sam {got.path}"
            )
    except download.DownloadError as e:
        print(f"sam3d: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; the partial file is kept: run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def add_weights_parser(subparsers) -> argparse.ArgumentParser:
    w = subparsers.add_parser("weights", help="import, list, verify or remove model weights (offline)")
    wsub = w.add_subparsers(dest="action", required=True)
    wi = wsub.add_parser("import", help="convert an official checkpoint folder (YAML + .ckpt)")
    wi.add_argument("folder", type=path_arg("FOLDER"))
    wi.add_argument("--name", default="official", help="a name (not a path) for the model (default: official)")
    wi.add_argument(
        "--root", type=path_arg("--root"), default=None, help="models folder (default: the user data folder)"
    )
    wi.add_argument("--overwrite", action="store_true")
    wsub.add_parser("list")
    for action in ("verify", "remove"):
        wsub.add_parser(action).add_argument("name")
    w.set_defaults(func=cmd_weights)
    add_weights_sam_parser(wsub)
    add_download_parser(wsub)
    add_depth_parser(wsub)
    add_fit_encoder_parser(wsub)
    return w
