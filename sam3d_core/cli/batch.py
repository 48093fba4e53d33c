"""`sam3d batch PHOTOS_DIR --out DIR`: every photo of a folder -> one folder of placed, textured objects each.

    sam3d batch photos/ --out out/                                  # one process (one GPU)
    torchrun --nproc-per-node 8 -m sam3d_core.cli batch photos/ --out out/    # one process per GPU

Masks beside a photo (`kitchen.jpg` + `kitchen_mask*.png`) name its objects; a photo without masks gets every
object the segmenter finds. A run skips the photos already done, so a killed run resumes where it stopped. See
`sam3d_core.pipeline.batch` for the rules and the output layout.
"""

from __future__ import annotations

import argparse
import sys
import time

from sam3d_core.cli.reconstruct import _check_sizes, add_model_args


class BatchBar:
    """Progress on stderr: one redrawn line (`3/10  kitchen  stage2 [####....] 12/25`) on a terminal with one
    process; one line per finished photo otherwise (several torchrun ranks share the terminal)."""

    def __init__(self, rank: int, world: int, stream=None, width: int = 20):
        self.stream = stream or sys.stderr
        self.prefix = f"[rank {rank}] " if world > 1 else ""
        self.live = world == 1 and getattr(self.stream, "isatty", lambda: False)()
        self.width = width

    def __call__(self, index: int, count: int, name: str, stage: str, step: int, total: int) -> None:
        if not self.live:
            return
        done = int(self.width * step / max(total, 1))
        bar = "#" * done + "." * (self.width - done)
        self.stream.write(f"\r{self.prefix}{index + 1}/{count}  {name[:24]:<24} {stage:<11} [{bar}] {step}/{total}   ")
        self.stream.flush()

    def photo(self, record: dict) -> None:
        if self.live:
            self.stream.write("\r" + " " * 100 + "\r")
        note = f"  ({record['error']})" if record.get("error") else ""
        objects = "" if record.get("objects") is None else f", {record['objects']} object(s)"
        self.stream.write(f"{self.prefix}{record['name']}: {record['status']}{objects}, {record['seconds']} s{note}\n")
        self.stream.flush()


def summary_table(records: list[dict]) -> str:
    """The batch's records as a plain-text table with a totals line."""
    head = ("photo", "status", "objects", "seconds", "note")
    rows = []
    for r in records:
        objects = "" if r.get("objects") is None else str(r["objects"])
        rows.append((r["photo"], r["status"], objects, f"{r['seconds']:.1f}", r.get("error", "")))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    widths[-1] = len(head[-1])  # the note is last and free
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    count = {s: sum(r["status"] == s for r in records) for s in ("done", "skipped", "failed")}
    objects = sum(r.get("objects") or 0 for r in records if r["status"] == "done")
    seconds = sum(r["seconds"] for r in records if r["status"] == "done")
    per = f", {seconds / objects:.1f} s per object" if objects else ""
    lines.append(
        f"{count['done']} done ({objects} objects{per}), {count['skipped']} skipped (done before), "
        f"{count['failed']} failed"
    )
    return "\n".join(lines)


def cmd_batch(args: argparse.Namespace) -> int:
    from sam3d_core.pipeline.batch import BatchOptions, find_photos, run_batch, start_distributed
    from sam3d_core.pipeline.reconstruct import Pipeline

    _check_sizes(args)
    if args.max_objects < 1:
        raise ValueError(f"--max-objects {args.max_objects}: expected at least 1")
    jobs = find_photos(args.photos)
    dist = start_distributed(args.device)
    try:
        t0 = time.perf_counter()
        pipe, which = Pipeline.load(
            args.model, dist.device, low_vram=args.low_vram, compile=args.compile, max_voxels=args.max_voxels
        )
        pipe.carve = args.carve  # models without stage 2: cut to each mask's silhouette cone (default on)
        bar = BatchBar(dist.rank, dist.world)
        if dist.rank == 0:
            masked = sum(bool(j.masks) for j in jobs)
            print(
                f"model: {which}; {len(jobs)} photo(s) ({masked} with masks beside them), {dist.world} process(es)",
                file=sys.stderr,
            )
        options = BatchOptions(
            seed=args.seed,
            steps=args.steps,
            fast=args.fast,
            texture_size=args.texture_size,
            faces=args.faces,
            gaussians=args.ply,
            max_objects=args.max_objects,
            fov=args.fov,
            depth_model=args.depth_model,
            refine_layout=args.refine_layout,
        )
        try:
            records = run_batch(pipe, jobs, args.out, options=options, dist=dist, progress=bar, on_photo=bar.photo)
        finally:
            pipe.close()
        if dist.rank != 0:
            return 0
        print(summary_table(records))
        print(f"{args.out}: {time.perf_counter() - t0:.1f} s in all; summary in batch_summary.json", file=sys.stderr)
        failed = [r for r in records if r["status"] == "failed"]
        return 2 if failed else 0
    finally:
        dist.stop()


def add_batch_parser(sub) -> None:
    b = sub.add_parser(
        "batch",
        help="a folder of photos -> placed, textured objects per photo (resumable; torchrun for several GPUs)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("photos", help="folder of photos (and NAME_mask*.png beside them)")
    add_model_args(b)
    b.add_argument("--max-objects", type=int, default=5, help="photos without masks: objects to segment (default 5)")
    b.add_argument("--ply", action="store_true", help="also write each object's Gaussians (NAME.ply)")
    b.set_defaults(func=cmd_batch, out="sam3d_batch_out")
