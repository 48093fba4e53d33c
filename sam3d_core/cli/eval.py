"""`sam3d eval`: score models and baselines on a folder of samples with the paper's metrics.

    sam3d eval DATASET_DIR --out DIR [--model tiny,box,ellipsoid] [--limit N] [--stage2] [--points N] [--workers N]

Writes DIR/results.json (every sample, every metric, aggregates) and DIR/results.md (tables per model, object
group and occlusion level); DIR must be new or empty. A sample that fails is listed and counted; the run goes on.
Progress goes to stderr, one line per model.
"""

from __future__ import annotations

import argparse
import sys
import time


class EvalBar:
    """`tiny       [########........] 12/40  1 failed  31.4 s` on stderr; a failure is printed above the bar."""

    def __init__(self, stream=None, width: int = 24):
        self.stream, self.width = stream or sys.stderr, width
        self.model, self.t0 = None, time.perf_counter()

    def __call__(self, model: str, done: int, total: int, failed: int, message: str | None) -> None:
        if model != self.model:
            self.close()
            self.model, self.t0 = model, time.perf_counter()
        if message:
            self.stream.write(f"\r\x1b[K{model}: sample {done} failed: {message}\n")
        bar = "#" * int(self.width * done / max(total, 1))
        tail = f"  {failed} failed" if failed else ""
        elapsed = time.perf_counter() - self.t0
        self.stream.write(f"\r{model:<10} [{bar:.<{self.width}}] {done}/{total}{tail}  {elapsed:6.1f} s")
        self.stream.flush()

    def close(self) -> None:
        if self.model is not None:
            self.stream.write("\n")
        self.model = None


def _models(text: str | None) -> list[str | None]:
    if text is None:
        return [None]
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise ValueError(f"--model {text!r}: expected names separated by commas, e.g. tiny,box,ellipsoid")
    return names


def cmd_eval(args: argparse.Namespace) -> int:
    from sam3d_core.evaluation.run import EvalSettings, run_eval

    defaults = EvalSettings()
    settings = EvalSettings(
        points=defaults.points if args.points is None else args.points,
        emd_points=defaults.emd_points if args.emd_points is None else args.emd_points,
        seed=args.seed,
        stage2=args.stage2,
        steps=args.steps,
        cfg_strength=args.cfg_strength,
        max_voxels=args.max_voxels,
        device=args.device,
        limit=args.limit,
        pointmap=not args.no_pointmap,
        refine_layout=args.refine_layout,
        carve=args.carve,
    )
    bar = EvalBar()
    try:
        results, paths = run_eval(
            args.dataset, _models(args.model), args.out, settings, progress=bar, workers=args.workers
        )
    finally:
        bar.close()
    for m in results["models"]:
        o = m["aggregates"]["overall"]
        scores = "  ".join(f"{k} {o[k]:.4f}" for k in ("f1", "viou", "iou3d", "add_s") if o[k] is not None)
        print(f"{m['name']}: {o['n']} scored, {o['failed']} failed  {scores}", file=sys.stderr)
    failed = sum(m["failed"] for m in results["models"])
    if failed:
        print(f"{failed} sample runs failed; their messages are in {paths[1]}", file=sys.stderr)
    run = results["run"]
    print(f"{run['seconds']:.0f} s, scored in {run['workers']} process(es)", file=sys.stderr)
    print("\n".join(str(p) for p in paths))
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="score models and baselines on a folder of samples (paper metrics)")
    p.add_argument("dataset", metavar="DATASET_DIR", help="a folder of samples (dataset.json + shards)")
    p.add_argument("--out", required=True, help="a new or empty folder for results.json and results.md")
    p.add_argument(
        "--model",
        default=None,
        help="comma-separated: tiny, official, an imported model name or folder, or a baseline: box, ellipsoid, "
        "oracle (default: the best available model)",
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N samples only")
    p.add_argument("--stage2", action="store_true", help="run stage 2 and score its mesh (default: stage-1 voxels)")
    p.add_argument("--points", type=int, default=None, help="surface points per shape (default 300000; paper 1M)")
    p.add_argument("--emd-points", type=int, default=None, help="points per side of the EMD assignment (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="sample i runs with seed + i (default 0)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 25)")
    p.add_argument(
        "--cfg-strength", type=float, default=None, help="stage-1 guidance strength (default: the model's; 0 = off)"
    )
    p.add_argument("--max-voxels", type=int, default=None, help="cap on stage-1 voxels (default: the model's)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="scoring processes (default: usable cores - 1, at least 1); prediction stays in this process; "
        "the results are the same for any count",
    )
    p.add_argument(
        "--no-pointmap",
        action="store_true",
        help="give models the flat fallback plane instead of the samples' point maps (as a user without depth)",
    )
    p.add_argument(
        "--refine-layout",
        action="store_true",
        help="refine each model's stage-1 pose against the sample's point map, mask and K (as sam3d reconstruct "
        "--refine-layout); what it did goes into each sample's prediction info",
    )
    p.add_argument(
        "--carve",
        action="store_true",
        help="when stage-1 voxels are scored (no --stage2): cut them down to what projects inside the sample's "
        "visible mask (or behind an occluder), after --refine-layout, as sam3d reconstruct does for a model "
        "without stage 2",
    )
    p.set_defaults(func=cmd_eval)
