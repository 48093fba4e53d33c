"""`sam3d segment`: masks from clicks or a box, or every object, with the back-end named in the output.

    sam3d segment PHOTO --point X,Y [--point X,Y,-] [--box X0,Y0,X1,Y1] --out MASK.png
    sam3d segment PHOTO --all --out DIR

Wire into the main parser with `add_segment_parser(subparsers)`; errors are raised as ValueError /
FileNotFoundError / ImportError with the value and the fix, for the main CLI to print.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from sam3d_core.export.output import output_file, output_folder, save_mask_png
from sam3d_core.inputs.imageio import load_photo
from sam3d_core.segment import Prompt, load_segmenter
from sam3d_core.version import __version__


def path_arg(option: str):
    """An argparse type for the path given to `option`: non-empty, no NUL byte (the message says the fix)."""

    def parse(text: str) -> str:
        if not text.strip():  # argparse names the option: "argument --out: is empty; ..."
            raise argparse.ArgumentTypeError("is empty; give a path")
        if "\0" in text:
            raise argparse.ArgumentTypeError(f"{text!r} holds a NUL byte; give a plain file path")
        return text

    return parse


def _numbers(text: str, count: int) -> list[float]:
    values = [float(v) for v in text.split(",")[:count]]
    if not all(math.isfinite(v) and abs(v) < 1e9 for v in values):
        raise ValueError("not finite")
    return values


def parse_point(text: str) -> tuple[float, float, int]:
    """'X,Y' or 'X,Y,+' -> (x, y, 1); 'X,Y,-' -> (x, y, 0). Pixels of the original photo."""
    parts = text.split(",")
    label = {"+": 1, "1": 1, "-": 0, "0": 0}.get(parts[2].strip() if len(parts) == 3 else "+")
    try:
        if len(parts) not in (2, 3) or label is None:
            raise ValueError
        x, y = _numbers(text, 2)
        return x, y, label
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--point {text!r}: expected X,Y (include) or X,Y,- (exclude) in pixels, e.g. --point 320,200"
        ) from None


def parse_box(text: str) -> tuple[float, float, float, float]:
    try:
        if len(text.split(",")) != 4:
            raise ValueError
        x0, y0, x1, y1 = _numbers(text, 4)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--box {text!r}: expected X0,Y0,X1,Y1 in pixels (top-left, then bottom-right corner), finite numbers"
        ) from None
    return x0, y0, x1, y1


def check_clicks(points, box) -> None:
    """Clicks that say where the object is: at least one include click, or a box (before any model loads)."""
    if points and box is None and all(label == 0 for *_, label in points):
        raise ValueError(
            "every --point excludes (X,Y,-), so nothing says where the object is; add a click on the object "
            "(--point X,Y) or a --box X0,Y0,X1,Y1"
        )


def cmd_segment(args: argparse.Namespace) -> int:
    if args.all == bool(args.point or args.box):
        raise ValueError("give either --all or a prompt (--point X,Y and/or --box X0,Y0,X1,Y1), not both or neither")
    check_clicks(args.point, args.box)
    image = load_photo(args.photo).rgb  # the reader reconstruct uses: EXIF turn, 16-bit, limits
    prompt = None
    if not args.all:
        prompt = Prompt(points=tuple(args.point or ()), box=args.box)
        prompt.validate(*image.shape[:2])  # before loading any model
        folder, stem, suffix = output_file(  # never the photo; a taken name gets a suffix
            args.out, overwrite=args.overwrite, inputs=[args.photo], what="--out mask file"
        )
    else:
        folder = output_folder(args.out, overwrite=args.overwrite, inputs=[args.photo], what="--out folder")
    seg = load_segmenter(args.backend, checkpoint=args.checkpoint, device=args.device)
    print(f"segmenter: {seg.reason}")
    t0 = time.perf_counter()
    seg.set_image(image)
    if prompt is not None:
        best = seg.predict(prompt, multimask=prompt.box is None and len(prompt.points) == 1)[0]
        with folder.writer() as w:
            name = w.claim(stem, (suffix,)) + suffix
            save_mask_png(best.mask, w.staged(name))
        print(
            f"wrote {folder.path / name}: {best.area} pixels ({best.area / best.mask.size:.1%} of the photo), "
            f"score {best.score:.3f} ({best.score_kind}), {time.perf_counter() - t0:.1f} s"
        )
        return 0
    objects = seg.segment_all()
    records = []
    with folder.writer() as w:  # all or nothing; nothing of the user's replaced (export/output.py)
        index = w.claim("objects", (".json",), last=True) + ".json"
        for i, c in enumerate(objects):
            fname = w.claim(f"object_{i:03d}", (".png",)) + ".png"
            save_mask_png(c.mask, w.staged(fname))
            records.append(
                {"mask": fname, "box_xyxy": c.box, "area": c.area, "score": c.score, "score_kind": c.score_kind}
            )
        data = {
            "generator": f"sam3d {__version__}",
            "photo": str(Path(args.photo).resolve()),
            "size_wh": [image.shape[1], image.shape[0]],
            "backend": seg.name,
            "basic": seg.is_basic,
            "reason": seg.reason,
            "objects": records,
        }
        w.staged(index).write_text(json.dumps(data, indent=2))
    print(f"wrote {len(records)} object mask(s) and {index} to {folder.path} in {time.perf_counter() - t0:.1f} s")
    return 0


def add_segment_parser(subparsers) -> argparse.ArgumentParser:
    """Add `segment` to the main CLI's subparsers; returns the new parser (its func is cmd_segment)."""
    s = subparsers.add_parser(
        "segment", help="object mask(s) from clicks, a box, or --all", description=__doc__.split("\n\n")[0]
    )
    s.add_argument("photo", type=path_arg("photo"))
    s.add_argument(
        "--point",
        type=parse_point,
        action="append",
        metavar="X,Y[,+|-]",
        help="a click in photo pixels; ',-' excludes (repeatable)",
    )
    s.add_argument("--box", type=parse_box, metavar="X0,Y0,X1,Y1", help="a box around the object, in photo pixels")
    s.add_argument("--all", action="store_true", help="every object: one PNG each plus objects.json in --out")
    s.add_argument(
        "--backend",
        choices=("auto", "sam2", "sam", "basic"),
        default="auto",
        help="auto: SAM 2, else SAM, when installed with imported weights, else basic (GrabCut, no weights)",
    )
    s.add_argument(
        "--checkpoint",
        default=None,
        help="an imported SAM / SAM 2 checkpoint name (default: the largest of the chosen kind)",
    )
    s.add_argument("--device", default=None)
    s.add_argument(
        "--out",
        required=True,
        type=path_arg("--out"),
        help="MASK.png for a prompt, a folder for --all (a taken name gets a numbered suffix; nothing is replaced)",
    )
    s.add_argument("--overwrite", action="store_true", help="replace masks that sam3d wrote there earlier")
    s.set_defaults(func=cmd_segment)
    return s
