"""`sam3d segment`: masks from clicks or a box, or every object, with the back-end named in the output.

    sam3d segment PHOTO --point X,Y [--point X,Y,-] [--box X0,Y0,X1,Y1] --out MASK.png
    sam3d segment PHOTO --all --out DIR
    sam3d segment PHOTO --text "chair" [--exemplar X0,Y0,X1,Y1[,-]] [--min-score 0.5] [--max-objects N] --out DIR

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


def parse_exemplar(text: str) -> tuple[float, float, float, float, int]:
    """'X0,Y0,X1,Y1' (an example of the concept) or 'X0,Y0,X1,Y1,-' (not one) -> (x0, y0, x1, y1, label)."""
    parts = text.split(",")
    label = {"+": 1, "1": 1, "-": 0, "0": 0}.get(parts[4].strip() if len(parts) == 5 else "+")
    try:
        if len(parts) not in (4, 5) or label is None:
            raise ValueError
        x0, y0, x1, y1 = _numbers(text, 4)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--exemplar {text!r}: expected X0,Y0,X1,Y1 (a box around one instance) or X0,Y0,X1,Y1,- (not one), "
            "in pixels, e.g. --exemplar 40,60,180,300"
        ) from None
    return x0, y0, x1, y1, label


def min_score_arg(text: str) -> float:
    try:
        v = float(text)
        if not 0.0 <= v < 1.0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a score 0 <= s < 1 (0.5 is SAM 3's default)") from None
    return v


def add_concept_args(sp: argparse.ArgumentParser, repeat_text: bool = False) -> None:
    """--text, --exemplar, --min-score, --max-objects (segment and scene)."""
    sp.add_argument(
        "--text",
        action="append" if repeat_text else None,
        default=None,
        metavar="PHRASE",
        help="SAM 3: every instance of a short noun phrase, e.g. --text chair"
        + (" (repeatable: --text chair --text lamp)" if repeat_text else ""),
    )
    sp.add_argument(
        "--exemplar",
        type=parse_exemplar,
        action="append",
        metavar="X0,Y0,X1,Y1[,-]",
        help="SAM 3: a box around one instance as an example (',-': a box around something that is not one); "
        "alone or with --text (repeatable)",
    )
    sp.add_argument(
        "--min-score",
        type=min_score_arg,
        default=0.5,
        help="SAM 3: keep instances scoring above this (presence x probability; default 0.5)",
    )
    sp.add_argument(
        "--max-objects",
        type=int,
        default=None,
        help="at most this many objects, best first: per --text phrase (default: every instance above --min-score)"
        + ("; without --text, of those the segmenter finds (default 5)" if repeat_text else ""),
    )


def concept_instances(seg, image, text, exemplars, min_score: float, max_objects) -> list:
    """Every instance for one phrase (and/or the exemplars) on an image the segmenter has already encoded."""
    from sam3d_core.segment import ConceptPrompt

    prompt = ConceptPrompt(text=text, boxes=tuple(exemplars or ()))
    return seg.segment_concept(prompt, min_score=min_score, max_objects=max_objects)


def check_clicks(points, box) -> None:
    """Clicks that say where the object is: at least one include click, or a box (before any model loads)."""
    if points and box is None and all(label == 0 for *_, label in points):
        raise ValueError(
            "every --point excludes (X,Y,-), so nothing says where the object is; add a click on the object "
            "(--point X,Y) or a --box X0,Y0,X1,Y1"
        )


def cmd_segment(args: argparse.Namespace) -> int:
    concept = args.text is not None or bool(args.exemplar)
    modes = [args.all, bool(args.point or args.box), concept]
    if sum(modes) != 1:
        raise ValueError(
            "give one of: --all, a click prompt (--point X,Y and/or --box X0,Y0,X1,Y1), or a concept "
            '(--text "chair" and/or --exemplar X0,Y0,X1,Y1)'
        )
    if concept:
        return _cmd_concept(args)
    if args.min_score != 0.5 or args.max_objects is not None:
        raise ValueError("--min-score and --max-objects go with --text / --exemplar (SAM 3 concept prompts)")
    if args.backend == "sam3":
        raise ValueError("--backend sam3 answers concept prompts (--text / --exemplar); clicks use sam2, sam or basic")
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


def _cmd_concept(args: argparse.Namespace) -> int:
    from sam3d_core.segment import ConceptPrompt, load_concept_segmenter
    from sam3d_core.segment.backends import check_concept_available

    if args.backend not in ("auto", "sam3"):
        raise ValueError(f"--backend {args.backend} answers clicks; --text / --exemplar need SAM 3 (--backend sam3)")
    if args.max_objects is not None and args.max_objects < 1:
        raise ValueError(f"--max-objects {args.max_objects}: expected at least 1 (or leave it out: every instance)")
    text = (args.text or "").strip() or None
    image = load_photo(args.photo).rgb
    ConceptPrompt(text=text, boxes=tuple(args.exemplar or ())).validate(*image.shape[:2])  # before SAM 3 loads
    check_concept_available(args.checkpoint)  # no SAM 3: say how to get it, before anything is written
    folder = output_folder(args.out, overwrite=args.overwrite, inputs=[args.photo], what="--out folder")
    seg = load_concept_segmenter(checkpoint=args.checkpoint, device=args.device)
    print(f"segmenter: {seg.reason}")
    t0 = time.perf_counter()
    seg.set_image(image)
    found = concept_instances(seg, image, text, args.exemplar, args.min_score, args.max_objects)
    records = []
    with folder.writer() as w:  # all or nothing; nothing of the user's replaced
        index = w.claim("objects", (".json",), last=True) + ".json"
        for i, c in enumerate(found):
            fname = w.claim(f"object_{i:03d}", (".png",)) + ".png"
            save_mask_png(c.mask, w.staged(fname))
            records.append({
                "mask": fname, "box_xyxy": c.box, "detected_box_xyxy": [round(v, 2) for v in c.detected_box],
                "area": c.area, "score": round(c.score, 5), "score_kind": c.score_kind,
            })  # fmt: skip
        data = {
            "generator": f"sam3d {__version__}",
            "photo": str(Path(args.photo).resolve()),
            "size_wh": [image.shape[1], image.shape[0]],
            "backend": seg.name,
            "basic": False,
            "reason": seg.reason,
            "concept": {"text": text, "exemplars": [list(b) for b in args.exemplar or ()],
                        "min_score": args.min_score, "max_objects": args.max_objects},
            "objects": records,
        }  # fmt: skip
        w.staged(index).write_text(json.dumps(data, indent=2))
    what = " and ".join(p for p in (f"{text!r}" if text else "", f"{len(args.exemplar or ())} exemplar(s)") if p)
    print(f"found {len(found)} instance(s) of {what} above score {args.min_score}: {time.perf_counter() - t0:.1f} s")
    for r in records:
        print(f"  {r['mask']}: score {r['score']:.3f}, box {r['detected_box_xyxy']}, {r['area']} pixels")
    print(f"wrote {len(records)} mask(s) and {index} to {folder.path}")
    return 0


def add_segment_parser(subparsers) -> argparse.ArgumentParser:
    """Add `segment` to the main CLI's subparsers; returns the new parser (its func is cmd_segment)."""
    s = subparsers.add_parser(
        "segment",
        help="object mask(s) from clicks, a box, --all, or a concept (--text, --exemplar)",
        description=__doc__.split("\n\n")[0],
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
    add_concept_args(s)
    s.add_argument(
        "--backend",
        choices=("auto", "sam2", "sam", "basic", "sam3"),
        default="auto",
        help="clicks: SAM 2, else SAM, when installed with imported weights, else basic (GrabCut, no weights); "
        "--text / --exemplar: SAM 3",
    )
    s.add_argument(
        "--checkpoint",
        default=None,
        help="an imported SAM / SAM 2 / SAM 3 checkpoint name (default: the largest of the chosen kind)",
    )
    s.add_argument("--device", default=None)
    s.add_argument(
        "--out",
        required=True,
        type=path_arg("--out"),
        help="MASK.png for a click prompt, a folder for --all and --text (a taken name gets a numbered suffix; "
        "nothing is replaced)",
    )
    s.add_argument("--overwrite", action="store_true", help="replace masks that sam3d wrote there earlier")
    s.set_defaults(func=cmd_segment)
    return s
