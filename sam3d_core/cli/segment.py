"""`sam3d segment`: masks from clicks or a box, or every object, with the back-end named in the output.

    sam3d segment PHOTO --point X,Y [--point X,Y,-] [--box X0,Y0,X1,Y1] --out MASK.png
    sam3d segment PHOTO --all --out DIR

Wire into the main parser with `add_segment_parser(subparsers)`; errors are raised as ValueError /
FileNotFoundError / ImportError with the value and the fix, for the main CLI to print.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sam3d_core.inputs.imageio import load_photo
from sam3d_core.segment import Prompt, load_segmenter
from sam3d_core.segment.session import save_mask


def parse_point(text: str) -> tuple[float, float, int]:
    """'X,Y' or 'X,Y,+' -> (x, y, 1); 'X,Y,-' -> (x, y, 0). Pixels of the original photo."""
    parts = text.split(",")
    label = {"+": 1, "1": 1, "-": 0, "0": 0}.get(parts[2].strip() if len(parts) == 3 else "+")
    try:
        if len(parts) not in (2, 3) or label is None:
            raise ValueError
        return float(parts[0]), float(parts[1]), label
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--point {text!r}: expected X,Y (include) or X,Y,- (exclude) in pixels, e.g. --point 320,200"
        ) from None


def parse_box(text: str) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--box {text!r}: expected X0,Y0,X1,Y1 in pixels (top-left, then bottom-right corner)"
        ) from None
    return x0, y0, x1, y1


def cmd_segment(args: argparse.Namespace) -> int:
    if args.all == bool(args.point or args.box):
        raise ValueError("give either --all or a prompt (--point X,Y and/or --box X0,Y0,X1,Y1), not both or neither")
    image = load_photo(args.photo).rgb  # the reader reconstruct uses: EXIF turn, 16-bit, limits
    prompt = None
    if not args.all:
        prompt = Prompt(points=tuple(args.point or ()), box=args.box)
        prompt.validate(*image.shape[:2])  # before loading any model
    seg = load_segmenter(args.backend, checkpoint=args.checkpoint, device=args.device)
    print(f"segmenter: {seg.reason}")
    t0 = time.perf_counter()
    seg.set_image(image)
    out = Path(args.out)
    if prompt is not None:
        best = seg.predict(prompt, multimask=prompt.box is None and len(prompt.points) == 1)[0]
        save_mask(best.mask, out)
        print(
            f"wrote {out}: {best.area} pixels ({best.area / best.mask.size:.1%} of the photo), "
            f"score {best.score:.3f} ({best.score_kind}), {time.perf_counter() - t0:.1f} s"
        )
        return 0
    objects = seg.segment_all()
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, c in enumerate(objects):
        fname = f"object_{i:03d}.png"
        save_mask(c.mask, out / fname)
        records.append({"mask": fname, "box_xyxy": c.box, "area": c.area, "score": c.score, "score_kind": c.score_kind})
    index = {
        "photo": str(Path(args.photo).resolve()),
        "size_wh": [image.shape[1], image.shape[0]],
        "backend": seg.name,
        "basic": seg.is_basic,
        "reason": seg.reason,
        "objects": records,
    }
    (out / "objects.json").write_text(json.dumps(index, indent=2))
    print(f"wrote {len(records)} object mask(s) and objects.json to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def add_segment_parser(subparsers) -> argparse.ArgumentParser:
    """Add `segment` to the main CLI's subparsers; returns the new parser (its func is cmd_segment)."""
    s = subparsers.add_parser(
        "segment", help="object mask(s) from clicks, a box, or --all", description=__doc__.split("\n\n")[0]
    )
    s.add_argument("photo")
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
    s.add_argument("--out", required=True, help="MASK.png for a prompt, a folder for --all")
    s.set_defaults(func=cmd_segment)
    return s
