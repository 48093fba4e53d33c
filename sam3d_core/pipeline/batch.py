"""A folder of photos -> one folder of placed, textured objects per photo: resumable, and shared out over the
processes of `torchrun` (one GPU each).

    jobs = find_photos("photos/")                       # photos, each with the masks found beside it
    dist = start_distributed()                          # rank / world from torchrun's environment (or 1 process)
    pipe, which = Pipeline.load(device=dist.device)
    records = run_batch(pipe, jobs, "out/", dist=dist)  # this rank's share; a photo already done is skipped

Masks beside a photo (the same folder): for `kitchen.jpg`, every `kitchen_mask*.png` (`kitchen_mask.png`,
`kitchen_mask_1.png`, `kitchen_mask-chair.png`, ...) is one object, in name order; the object is named by what
follows `_mask` (`chair`; `object_N` when that is empty or a number, N its place in name order). Those PNGs are
masks, not photos. A photo
without masks gets every object the segmenter finds (at most `max_objects`, largest first).

Output: `OUT/<photo stem>/` holds what `sam3d reconstruct` writes (`scene.json`, `scene.glb`, one GLB and mask per
object, a PLY per object when asked). Each photo is written into a temporary folder in OUT and renamed into place
when complete (an atomic rename), so a folder there is always a finished photo: a killed run leaves at most a
temporary folder (`.sam3d-partial-*`, removed by the next run) and a new run skips every photo whose folder
exists. `OUT/batch_summary.json` lists every photo of the last run (done, skipped or failed, objects, seconds).

Several processes (`torchrun --nproc-per-node N -m sam3d_core.cli batch ...`): rank 0 lists what is left to do
and broadcasts it; photo i goes to rank i mod N; the records are gathered to rank 0 for the summary. Each photo's
objects use seeds seed, seed + 1, ... whatever rank runs it, so the files equal a one-process run's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".avif", ".tga", ".ppm")
PARTIAL_PREFIX = ".sam3d-partial-"
SUMMARY = "batch_summary.json"
_MASK = re.compile(r"^(?P<stem>.+)_mask(?P<tag>.*)$", re.IGNORECASE)

# progress(photo index in this rank's share, share size, photo name, stage, step, total)
BatchProgress = Callable[[int, int, str, str, int, int], None]


@dataclass(frozen=True)
class PhotoJob:
    """One photo, the masks given beside it (empty: segment it) and the name of its output folder."""

    photo: Path
    masks: tuple[Path, ...]
    name: str

    def object_names(self) -> list[str]:
        """One name per mask: what follows `_mask` in its file name, or object_N."""
        names = []
        for i, m in enumerate(self.masks):
            tag = re.sub(r"[^A-Za-z0-9_-]", "_", _MASK.match(m.stem).group("tag")).strip("_-")
            names.append(tag if tag and not tag.isdigit() else f"object_{i}")
        seen: dict[str, int] = {}
        out = []
        for n in names:  # names are file names: keep them unique
            seen[n] = seen.get(n, 0) + 1
            out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
        return out


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


def find_photos(folder: str | os.PathLike) -> list[PhotoJob]:
    """The photos of a folder (not its subfolders), sorted by name, each with its masks (module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; give the folder that holds the photos")
    images = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES), key=_natural_key
    )
    stems = {p.stem for p in images}
    masks: dict[str, list[Path]] = {}
    photos = []
    for p in images:
        m = _MASK.match(p.stem)
        if m and p.suffix.lower() == ".png" and m.group("stem") in stems and m.group("stem") != p.stem:
            masks.setdefault(m.group("stem"), []).append(p)
        else:
            photos.append(p)
    taken: dict[str, int] = {}
    for p in photos:
        taken[p.stem] = taken.get(p.stem, 0) + 1
    jobs = []
    for p in photos:
        name = p.stem if taken[p.stem] == 1 else p.name  # kitchen.jpg and kitchen.png: folders by full name
        if name.startswith("."):
            name = "_" + name
        jobs.append(PhotoJob(p, tuple(sorted(masks.get(p.stem, []), key=_natural_key)), name))
    if not jobs:
        raise FileNotFoundError(
            f"{folder}: no photos ({', '.join(PHOTO_SUFFIXES)}); put the photos (and any NAME_mask*.png) there"
        )
    return jobs


@dataclass
class Distributed:
    """Where this process stands: rank, world size and the device it should use. `active`: a process group is
    running (started by `start_distributed`), so the collective calls below talk to the other ranks."""

    rank: int = 0
    world: int = 1
    device: str | None = None
    active: bool = False

    def broadcast(self, value):
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        if not self.active:
            return [value]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def stop(self) -> None:
        if self.active:
            torch.distributed.destroy_process_group()
            self.active = False


def start_distributed(device: str | None = None) -> Distributed:
    """Join torchrun's process group when WORLD_SIZE > 1 (nccl on GPUs, gloo on CPUs), one GPU per local rank;
    otherwise a single process. `device`: "cpu" or "cuda" (default: cuda when present)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local} but only {torch.cuda.device_count()} GPU(s): start torchrun with "
                "--nproc-per-node at most the number of GPUs"
            )
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(rank, world, f"cuda:{local}" if use_cuda else "cpu", active=True)


@dataclass
class BatchOptions:
    """Per-photo settings, as `sam3d reconstruct` takes them."""

    seed: int = 42
    steps: int | None = None
    fast: bool = False
    texture_size: int = 1024
    faces: int = 20000
    gaussians: bool = False  # write NAME.ply (the Gaussians) too
    max_objects: int = 5  # photos without masks: at most this many segmented objects
    fov: float | None = None
    depth_model: str | None = "auto"
    refine_layout: bool | None = None  # pipeline/layout.py; None: when the point map comes from depth
    segmenter: str = "auto"
    extra: dict = field(default_factory=dict)


def photo_state(out: Path, name: str) -> str:
    """ "done" (out/name holds a finished photo: scene.json, written last, renamed in as a whole), "todo" (no
    such folder) or "foreign" (a folder we did not finish: never touched)."""
    folder = out / name
    if not folder.exists() and not folder.is_symlink():
        return "todo"
    return "done" if folder.is_dir() and not folder.is_symlink() and (folder / "scene.json").is_file() else "foreign"


def remove_partial(out: Path) -> list[str]:
    """Delete the temporary folders a killed run left in `out` (ours by their prefix). Returns their names."""
    gone = []
    for p in out.glob(PARTIAL_PREFIX + "*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


def run_batch(
    pipe,
    jobs: list[PhotoJob],
    out: str | os.PathLike,
    *,
    options: BatchOptions | None = None,
    dist: Distributed | None = None,
    progress: BatchProgress | None = None,
    on_photo: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Reconstruct this process's share of `jobs` into `out` (module docstring); returns the records of every
    photo, of every rank on rank 0 (this rank's only on the others). A photo that fails (unreadable, a bad mask,
    nothing segmented, ...) gets status "failed" with the error, and the run goes on. Files are written by a
    background thread while the next photo is reconstructed."""
    options = options or BatchOptions()
    dist = dist or Distributed()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder (it is created when missing)")
    # 1. Rank 0: leftovers of a killed run away, then the photos still to do; every rank gets the same list.
    plan = None
    if dist.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_partial(out)
        plan = {"todo": [], "early": []}
        for i, job in enumerate(jobs):
            state = photo_state(out, job.name)
            if state == "todo":
                plan["todo"].append(i)
                continue
            record = {"photo": job.photo.name, "name": job.name, "status": "skipped", "objects": None, "seconds": 0.0}
            if state == "foreign":
                record["status"] = "failed"
                record["error"] = (
                    f"{out / job.name} exists but is not a finished photo of ours (no scene.json); "
                    "move it away or choose another --out"
                )
            plan["early"].append(record)
    plan = dist.broadcast(plan)
    mine = [jobs[i] for k, i in enumerate(plan["todo"]) if k % dist.world == dist.rank]
    # 2. This rank's photos; each one's files are written on a thread while the next one runs.
    records: list[dict] = []
    writer = ThreadPoolExecutor(1, thread_name_prefix="sam3d-batch-files")
    pending: list[tuple[dict, Future]] = []
    segmenter = None
    lock = threading.Lock()
    try:
        for k, job in enumerate(mine):
            t0 = time.perf_counter()
            record = {"photo": job.photo.name, "name": job.name, "status": "failed", "objects": None, "rank": dist.rank}

            def report(stage: str, step: int, total: int, k=k, job=job) -> None:
                if progress is not None:
                    with lock:
                        progress(k, len(mine), job.name, stage, step, total)

            try:
                if not job.masks and segmenter is None:
                    from sam3d_core.segment import load_segmenter

                    segmenter = load_segmenter(options.segmenter)
                results, ctx = _reconstruct_photo(pipe, job, options, segmenter, report)
                record["objects"] = len(results)
                record["seconds"] = round(time.perf_counter() - t0, 2)
                pending.append((record, writer.submit(_write_photo, pipe, ctx, results, out, job.name)))
            except Exception as e:  # one photo's problem must not stop the folder
                if not _is_user_error(e):
                    raise
                record["error"] = str(e)
                record["seconds"] = round(time.perf_counter() - t0, 2)
                _done(records, record, on_photo)
            while pending and pending[0][1].done():
                _finish_write(records, *pending.pop(0), on_photo)
        while pending:
            _finish_write(records, *pending.pop(0), on_photo)
    finally:
        writer.shutdown(wait=True)
    # 3. Every rank's records to rank 0.
    gathered = dist.gather(records)
    if dist.rank != 0:
        return records
    every = plan["early"] + [r for part in gathered for r in part]
    order = {j.name: i for i, j in enumerate(jobs)}
    every.sort(key=lambda r: order.get(r["name"], len(order)))
    _write_summary(out, every, pipe)
    return every


def _is_user_error(e: Exception) -> bool:
    from sam3d_core.inputs.imageio import InputError
    from sam3d_core.pipeline.errors import ReconstructionError

    return isinstance(e, (InputError, ReconstructionError, ValueError, FileNotFoundError))


def _reconstruct_photo(pipe, job: PhotoJob, options: BatchOptions, segmenter, report):
    ctx = pipe.open_photo(job.photo, fov_deg=options.fov, depth_model=options.depth_model)
    if job.masks:
        masks, names = [pipe.load_mask(ctx, m) for m in job.masks], job.object_names()
    else:
        report("segment", 0, 1)
        segmenter.set_image(ctx.photo.rgb)
        cands = segmenter.segment_all()[: options.max_objects]
        if not cands:
            raise ValueError(
                f"{job.photo.name}: the segmenter found no object; add {job.photo.stem}_mask.png beside it"
            )
        masks, names = [pipe.load_mask(ctx, c.mask) for c in cands], [f"object_{i}" for i in range(len(cands))]
    results = pipe.reconstruct(
        ctx,
        masks,
        names=names,
        seed=options.seed,
        steps=options.steps,
        fast=options.fast,
        texture_size=options.texture_size,
        faces=options.faces,
        gaussians=options.gaussians,
        refine_layout=options.refine_layout,
        progress=report,
    )
    return results, ctx


def _umask() -> int:
    """This process's file-creation mask, read without changing it (Linux); 0o022 elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _write_photo(pipe, ctx, results, out: Path, name: str) -> None:
    """Export into a fresh temporary folder in `out`, then rename it to out/name (atomic: all or nothing)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{name}-", dir=out))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would make the finished folder private
        pipe.export(ctx, results, tmp)
        if (out / name).exists():  # appeared meanwhile: keep what is there
            raise FileExistsError(f"{out / name} appeared while this photo was written; it was left as it is")
        os.rename(tmp, out / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finish_write(records: list, record: dict, fut: Future, on_photo) -> None:
    try:
        fut.result()
        record["status"] = "done"
    except OSError as e:
        record["error"] = f"writing the files failed: {e}"
    except Exception as e:  # export's own checks (a bad name, ...) fail this photo only
        if not _is_user_error(e):
            raise
        record["error"] = str(e)
    _done(records, record, on_photo)


def _done(records: list, record: dict, on_photo) -> None:
    records.append(record)
    if on_photo is not None:
        on_photo(record)


def _write_summary(out: Path, records: list[dict], pipe) -> None:
    summary = {
        "version": 1,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": pipe.description,
        "weights": pipe.weights,
        "photos": records,
    }
    fd, tmp = tempfile.mkstemp(prefix=".sam3d-summary-", suffix=".json", dir=out)
    with os.fdopen(fd, "w") as fh:
        json.dump(summary, fh, indent=1)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, out / SUMMARY)
