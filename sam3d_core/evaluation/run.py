"""`sam3d eval`: run models and baselines over a folder of samples and score them with the paper's metrics.

    results, files = run_eval("bench/", ["tiny", "box", "ellipsoid"], "eval_out/", EvalSettings(limit=20))

Numbered steps: 1. check the output folder (new or empty) and the settings, 2. open the dataset, 3. resolve every
model name (a baseline, 'tiny', an imported model or a model folder) before any heavy work, 4. per model, per
sample: predict (in this process, on the model's device), then score (`score_prediction`: CPU-bound KD-trees, ICP,
the EMD assignment) in `workers` processes (`Scorer`; 1 = here, in order); a sample that cannot be read or
predicted or scored is recorded with its message and counted, and the run goes on, 5. aggregate (overall, per
object group, per occlusion level) and write results.json + results.md (temporary name, then renamed; never over
a file). A sample's scores depend on (seed, its index) only, so any number of workers gives the same results.
"""

from __future__ import annotations

import concurrent.futures as _cf
import datetime as _dt
import json
import math
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from sam3d_core.data.benchmark import OCCLUSION_LEVELS as _BENCH_LEVELS
from sam3d_core.data.sample import GRID, Sample, SampleDataset, read_manifest
from sam3d_core.evaluation import baselines
from sam3d_core.evaluation import metrics as _metrics
from sam3d_core.evaluation.metrics import EMD_POINTS, layout_metrics, shape_metrics
from sam3d_core.evaluation.prediction import Prediction, pose_points, target_points

FORMAT = "sam3d-eval"
VERSION = 1
RESULT_FILES = ("results.json", "results.md")
# Surface points per shape. F1@0.01 of a perfect prediction is 0.73-0.98 at 100k points, 0.98-1.0 at 300k, 1.0 at
# the paper's 1M (bench/eval_calibration.py; docs/evaluation.md).
POINTS = 300_000
# (key, column label, which way is better); the order of the tables.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("f1", "F1@0.01", "higher"),
    ("viou", "vIoU", "higher"),
    ("chamfer", "Chamfer", "lower"),
    ("emd", "EMD", "lower"),
    ("iou3d", "3D IoU", "higher"),
    ("icp_rot", "ICP-Rot (deg)", "lower"),
    ("rot_err", "Rot. err (deg)", "lower"),
    ("add_s", "ADD-S", "lower"),
    ("add_s_01", "ADD-S@0.1", "higher"),
)


def _labelled_levels() -> tuple[tuple[str, float], ...]:
    """The render-paste benchmark's occlusion bins (data/benchmark.py: (upper bound, name)), labelled with their
    bounds: (("none (<5%)", 0.05), ("low (5%-30%)", 0.3), ...)."""
    out, lower = [], 0.0
    for upper, name in _BENCH_LEVELS:
        span = f"<{upper:.0%}" if lower == 0 else f">={lower:.0%}" if upper > 1 else f"{lower:.0%}-{upper:.0%}"
        out.append((f"{name} ({span})", upper))
        lower = upper
    return tuple(out)


# Occlusion level of a sample: the first whose upper bound exceeds its hidden fraction.
OCCLUSION_LEVELS = _labelled_levels()

# progress(model, done, total, failed, message): message is the failure of the sample just done, else None
Progress = Callable[[str, int, int, int, "str | None"], None]


@dataclass(frozen=True)
class EvalSettings:
    """points: surface points per shape (the paper: 1M); emd_points: points per side of the EMD assignment;
    seed: object i is sampled with seed + i, and its metric subsets with (seed, i); stage2: run stage 2 and score
    its mesh (else the stage-1 voxels); steps / max_voxels / device: as `sam3d reconstruct`; limit: the first
    N samples only; pointmap: give a model the sample's point map (False: the flat fallback plane, as a user
    without depth; layout then in relative units); refine_layout: move a model's stage-1 pose onto the sample's
    point map (pipeline/layout.py, as `sam3d reconstruct --refine-layout`; skipped on the fallback plane), with
    what it did in each sample's prediction info ("layout_refine"); carve: scored stage-1 voxels (no stage2) are
    cut down to the mask's silhouette cone after the layout step (export/project.SilhouetteCarve, as `sam3d
    reconstruct` does for a model without stage 2; grown by `carve_grow` voxels first, as the pipeline), the count
    in the prediction info ("carve")."""

    points: int = POINTS
    emd_points: int = EMD_POINTS
    seed: int = 0
    stage2: bool = False
    steps: int | None = None
    cfg_strength: float | None = None  # stage-1 guidance (None: the model's sampler setting)
    max_voxels: int | None = None
    device: str | None = None
    limit: int | None = None
    pointmap: bool = True
    refine_layout: bool = False
    carve: bool = False
    carve_grow: int = 3  # voxels the solid grows by before the carve (export/project.CARVE_GROW, the pipeline's)

    def check(self) -> EvalSettings:
        if not 1_000 <= self.points <= 10_000_000:
            raise ValueError(f"points={self.points}: expected 1000..10000000 (the paper samples 1000000)")
        if not 16 <= self.emd_points <= 8192:
            raise ValueError(f"emd_points={self.emd_points}: expected 16..8192 (1024 is the default)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit}: expected at least 1 sample")
        if self.steps is not None and not 1 <= self.steps <= 1000:
            raise ValueError(f"steps={self.steps}: expected 1..1000")
        if self.cfg_strength is not None and not 0 <= self.cfg_strength <= 100:
            raise ValueError(f"cfg_strength={self.cfg_strength}: expected 0..100 (0 turns guidance off)")
        if self.max_voxels is not None and self.max_voxels < 16:
            raise ValueError(f"max_voxels={self.max_voxels}: expected at least 16")
        return self


# ---------------------------------------------------------------------------------------------------
# Predictors: a sample -> a Prediction
# ---------------------------------------------------------------------------------------------------


class BaselinePredictor:
    """A model-free baseline (`baselines.BASELINES`); the seed is unused (they are deterministic)."""

    def __init__(self, name: str):
        self.name, self.description, self.weights = name, baselines.DESCRIPTIONS[name], "none"

    def load(self) -> None:
        pass

    def __call__(self, sample: Sample, seed: int) -> Prediction:
        return baselines.predict_baseline(self.name, sample)

    def close(self) -> None:
        pass


class ModelPredictor:
    """A model (tiny, imported, or a model folder) run on the sample's photo, visible mask, K and point map."""

    def __init__(self, name: str | None, settings: EvalSettings):
        self.name = name or "auto"
        self.requested, self.settings = name, settings
        self.description, self.weights, self.pipe = "", "", None
        if name not in (None, "tiny"):
            from sam3d_core.weights.hub import resolve_model_dir

            resolve_model_dir(name)  # CheckpointError with the fix, before any heavy work

    def load(self) -> None:
        from sam3d_core.pipeline.reconstruct import Pipeline

        s = self.settings
        self.pipe, self.description = Pipeline.load(self.requested, s.device, stage2=s.stage2, max_voxels=s.max_voxels)
        self.weights = self.pipe.weights
        if self.requested is None:  # name the model that "the best available" turned out to be
            self.name = "tiny" if self.pipe.stage1.weights_id.startswith("random:") else "official"

    def __call__(self, sample: Sample, seed: int) -> Prediction:
        from sam3d_core.inputs.imageio import Photo

        pipe, s = self.pipe, self.settings
        h, w = sample.mask.shape
        photo = Photo(
            rgb=np.ascontiguousarray(sample.photo),
            alpha=None,
            path=None,
            width=w,
            height=h,
            original_mode="RGB",
            exif_orientation_applied=False,
            source_width=w,
            source_height=h,
        )
        pointmap = sample.pointmap if s.pointmap else None
        ctx = pipe.open_photo(photo, K=sample.K, pointmap=pointmap, depth_model="none")
        out1 = pipe.stage1(photo.rgb, sample.mask, ctx.pointmap, seed=seed, steps=s.steps, cfg_strength=s.cfg_strength)
        pose = out1.pose
        info = {
            "pointmap": ctx.pointmap_source,
            # the point map's normalisation (median of the masked points, spread): what layout is decoded against
            "pointmap_shift": [round(float(x), 6) for x in out1.pointmap_shift[0]],
            "pointmap_scale": round(float(out1.pointmap_scale[0, 0]), 6),
            "downsample_factor": int(out1.downsample_factor),
        }
        rotation = pose.rotation[0].double().cpu().numpy()
        translation = pose.translation[0].double().cpu().numpy()
        scale = pose.scale[0].double().cpu().numpy()
        if s.refine_layout:  # on the voxels stage 2 runs on (the capped ones, the decoded pose's frame)
            rotation, translation, scale, info["layout_refine"] = _refine(
                out1, rotation, translation, scale, ctx, sample
            )
        if not s.stage2 or pipe.stage2 is None:
            # Every voxel with a positive logit, on the full grid: the decoded scale includes the cap's factor.
            occupancy = out1.coords_original[:, 1:].cpu().numpy().astype(np.int64)
            scale = scale / out1.downsample_factor
            if s.carve:
                occupancy, info["carve"] = _carve(occupancy, rotation, translation, scale, ctx, sample, s.carve_grow)
            info["voxels"] = len(occupancy)
            return Prediction(occupancy, rotation, translation, scale, info=info)
        out2 = pipe.stage2(
            photo.rgb, sample.mask, out1.coords, seed=seed, steps=s.steps, decode=("mesh",), shared=ctx.shared
        )
        mesh = out2.mesh
        occupancy = out1.coords[:, 1:].cpu().numpy().astype(np.int64)  # the voxels stage 2 ran on (mesh's frame)
        info.update(voxels=len(occupancy), mesh_faces=int(len(mesh.faces)))
        vertices = mesh.vertices.detach().double().cpu().numpy()
        faces = mesh.faces.detach().cpu().numpy().astype(np.int64)
        if len(faces) == 0:
            raise ValueError("stage 2 produced an empty mesh for this sample")
        return Prediction(occupancy, rotation, translation, scale, vertices, faces, info)

    def close(self) -> None:
        import torch

        self.pipe = None
        if torch.cuda.is_available():  # the next model gets the memory back
            torch.cuda.empty_cache()


def _refine(out1, rotation, translation, scale, ctx, sample: Sample) -> tuple:
    """`EvalSettings.refine_layout`: the stage-1 pose refined against the point map the model was given (the
    sample's, or the fallback plane: skipped), the visible mask and K -> (rotation, translation, scale, record)."""
    from sam3d_core.geometry import frames
    from sam3d_core.pipeline.layout import refine_placement

    pose4 = frames.pose_matrix(rotation, translation, scale)
    voxels = out1.coords[:, 1:].cpu().numpy().astype(np.int64)
    new4, rotation, report = refine_placement(pose4, voxels, sample.mask, ctx.pointmap, ctx.K)
    record = {"pointmap": ctx.pointmap_source, **report}
    return rotation, new4[:3, 3].copy(), np.linalg.norm(new4[:3, :3], axis=0), record


def _carve(occupancy, rotation, translation, scale, ctx, sample: Sample, grow: int) -> tuple[np.ndarray, dict]:
    """`EvalSettings.carve`: the voxels [N, 3] of the full grid, filled and grown by `grow` voxels as the pipeline
    does, that project inside the visible mask (or behind something nearer in the point map; none of that on the
    fallback plane) -> (kept voxels, record)."""
    from sam3d_core.export.project import SilhouetteCarve
    from sam3d_core.geometry import frames

    depth = None if ctx.pointmap_source == "fallback plane" else ctx.pointmap
    carve = SilhouetteCarve(frames.pose_matrix(rotation, translation, scale), ctx.K, sample.mask, depth, grow=grow)
    solid = np.zeros((GRID,) * 3, bool)
    solid[tuple(occupancy.T)] = True
    grown = np.argwhere(carve.grown(solid)) if grow else occupancy
    keep = carve((grown + 0.5) / GRID - 0.5)
    if not keep.any():  # as occupancy_surface: nothing inside the mask, nothing dropped (nor grown)
        return occupancy, {"removed": 0, "why": "no voxel projects inside the mask"}
    return grown[keep], {**carve.report, "grow": grow, "grown": len(grown) - len(occupancy)}


def make_predictors(models: Sequence[str | None], settings: EvalSettings) -> list:
    """One predictor per name, every name checked now (baselines win over imported models of the same name;
    pass an imported model's folder path to use it instead). Nothing heavy is loaded yet."""
    if not models:
        raise ValueError("no model to evaluate; pass --model NAME (tiny, official, box, ellipsoid, ...)")
    seen, out = set(), []
    for name in models:
        key = name or "auto"
        if key in seen:
            raise ValueError(f"model {key!r} is listed twice; list each model once")
        seen.add(key)
        out.append(BaselinePredictor(name) if name in baselines.BASELINES else ModelPredictor(name, settings))
    return out


# ---------------------------------------------------------------------------------------------------
# Scoring one sample
# ---------------------------------------------------------------------------------------------------


def score_prediction(
    sample: Sample, pred: Prediction, *, points: int = POINTS, emd_points: int = EMD_POINTS, rng: np.random.Generator
) -> tuple[dict, dict]:
    """The metrics of one prediction against one sample, and what they were computed on.

    Shape: predicted and target surface points in their own local frames (`shape_metrics`); layout: the same
    points posed with each side's pose into the camera frame (`layout_metrics`)."""
    pred.check()
    pred_pts, pred_src = pred.surface_points(points, rng)
    target_pts, target_src = target_points(sample, points, rng)
    metrics = shape_metrics(pred_pts, target_pts, emd_points=emd_points, rng=rng)
    target_posed = pose_points(target_pts, sample.rotation, sample.translation, sample.scale)
    metrics.update(layout_metrics(pred.posed(pred_pts), target_posed, pred.rotation, sample.rotation, rng=rng))
    used = {"prediction_points": pred_src, "target_points": target_src, "target_count": len(target_pts)}
    return metrics, used


def occlusion_level(fraction: float) -> str:
    for name, upper in OCCLUSION_LEVELS:
        if fraction < upper:
            return name
    return OCCLUSION_LEVELS[-1][0]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; all of them where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Scoring processes by default: the usable cores minus one (the main process predicts), at least 1."""
    return max(1, usable_cores() - 1)


@dataclass(frozen=True)
class ScoreJob:
    """What scoring one sample needs, small enough to send to a process: the sample without its photo, masks,
    point map and latents (the targets: surface points or occupancy, and the pose), the prediction, the row."""

    row: dict
    target: Sample
    prediction: Prediction
    points: int
    emd_points: int
    seed: int


_NO_PIXELS = np.zeros((1, 1), bool)


def _score_job(job: ScoreJob) -> dict:
    """Score one job -> its finished row (status, metrics, points, prediction info, seconds; or the error).
    Runs in a scoring process or in this one; never raises for a bad sample."""
    row = dict(job.row)
    t0 = time.perf_counter()
    try:
        rng = np.random.default_rng([job.seed, row["index"]])
        metrics, used = score_prediction(
            job.target, job.prediction, points=job.points, emd_points=job.emd_points, rng=rng
        )
        row.update(status="ok", metrics=metrics, points=used, prediction=job.prediction.info)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - one bad sample is recorded and counted; the run goes on
        row["error"] = f"score: {type(e).__name__}: {e}"
    row["seconds"] = dict(row.get("seconds", {}), score=round(time.perf_counter() - t0, 3))
    return row


def _init_scoring_process(kdtree_threads: int) -> None:
    _metrics.KDTREE_WORKERS = kdtree_threads


class Scorer:
    """Scores jobs in `workers` processes (spawned: the parent may hold CUDA), at most 2 x workers in flight so
    that prediction and scoring overlap without piling up memory; workers=1 scores in this process, in order.

        with Scorer(2) as scorer:
            for row in scorer.submit(job): ...   # rows finished meanwhile (any order)
            for row in scorer.drain(): ...       # the rest

    A scoring process that dies (killed, out of memory) fails the rows it held with that message; a fresh pool
    takes the next jobs."""

    def __init__(self, workers: int):
        if workers < 1:
            raise ValueError(f"workers={workers}: expected at least 1 scoring process")
        self.workers = int(workers)
        self.pool: _cf.ProcessPoolExecutor | None = None
        self.pending: dict[_cf.Future, ScoreJob] = {}

    def _pool(self) -> _cf.ProcessPoolExecutor:
        if self.pool is None:
            self.pool = _cf.ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_scoring_process,
                initargs=(max(1, usable_cores() // self.workers),),
            )
        return self.pool

    def submit(self, job: ScoreJob) -> Iterator[dict]:
        if self.workers == 1:
            yield _score_job(job)
            return
        while len(self.pending) >= 2 * self.workers:
            yield from self._collect(_cf.FIRST_COMPLETED)
        try:
            self.pending[self._pool().submit(_score_job, job)] = job
        except _cf.process.BrokenProcessPool:
            yield from self._collect(_cf.ALL_COMPLETED)  # fails what the dead pool held, then a fresh pool
            self.pending[self._pool().submit(_score_job, job)] = job
        yield from self._collect(None)

    def drain(self) -> Iterator[dict]:
        while self.pending:
            yield from self._collect(_cf.FIRST_COMPLETED)

    def _collect(self, wait: str | None) -> Iterator[dict]:
        """Rows of finished jobs: those done now (wait=None), or after waiting for the first / all of them."""
        if wait is None:
            done = [f for f in self.pending if f.done()]
        else:
            done, _ = _cf.wait(list(self.pending), return_when=wait)
        broken = False
        for f in sorted(done, key=lambda f: self.pending[f].row["index"]):
            job = self.pending.pop(f)
            try:
                yield f.result()
            except _cf.process.BrokenProcessPool as e:
                broken = True
                yield dict(job.row, error=f"score: the scoring process died ({e}); out of memory? try --workers 1")
        if broken:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=not cancel, cancel_futures=cancel)
            self.pool = None
        self.pending = {}

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(cancel=exc_type is not None)


def _scoring_view(sample: Sample) -> Sample:
    """The sample without what scoring never reads (photo, masks, point map, latents): less to send."""
    return replace(
        sample,
        photo=np.zeros((1, 1, 3), np.uint8),
        mask=_NO_PIXELS,
        amodal_mask=None,
        pointmap=None,
        ss_latent=None,
        slat_coords=None,
        slat_feats=None,
        rejected=None,
    )


def _predict_one(
    predictor, dataset: SampleDataset, i: int, record: dict | None, settings: EvalSettings
) -> tuple[dict, ScoreJob | None]:
    """Read and predict sample i here -> (its row, the job that scores it); (the failed row, None) when reading or
    predicting failed."""
    row = {
        "index": i,
        "sample_id": (record or {}).get("sample_id", f"#{i}"),
        "group": (record or {}).get("group") or "(none)",
        "occlusion": float((record or {}).get("occlusion", 0.0)),
        "status": "failed",
    }
    row["occlusion_level"] = occlusion_level(row["occlusion"])
    stage = "read"
    try:
        t0 = time.perf_counter()
        sample = dataset[i].check()
        stage = "predict"
        pred = predictor(sample, settings.seed + i)
        pred.check()  # here: a bad prediction is a predict failure, whatever process scores it
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - one bad sample is recorded and counted; the run goes on
        row["error"] = f"{stage}: {type(e).__name__}: {e}"
        return row, None
    row["seconds"] = {"predict": round(time.perf_counter() - t0, 3)}
    return row, ScoreJob(row, _scoring_view(sample), pred, settings.points, settings.emd_points, settings.seed)


def _evaluate_one(predictor, dataset: SampleDataset, i: int, record: dict | None, settings: EvalSettings) -> dict:
    """Read, predict and score sample i in this process -> its row."""
    row, job = _predict_one(predictor, dataset, i, record, settings)
    return row if job is None else _score_job(job)


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


def aggregate(rows: Sequence[dict]) -> dict:
    """Means of every metric over the rows that succeeded (ADD-S@0.1: the share of successes), with n and the
    failure count; overall, per object group and per occlusion level."""

    def mean(subset: list[dict]) -> dict:
        ok = [r for r in subset if r["status"] == "ok"]
        out = {"n": len(ok), "failed": len(subset) - len(ok)}
        for key, _, _ in METRICS:
            vals = [float(r["metrics"][key]) for r in ok]
            out[key] = float(np.mean(vals)) if vals else None
        return out

    groups = sorted({r["group"] for r in rows})
    levels = [name for name, _ in OCCLUSION_LEVELS if any(r["occlusion_level"] == name for r in rows)]
    return {
        "overall": mean(list(rows)),
        "by_group": {g: mean([r for r in rows if r["group"] == g]) for g in groups},
        "by_occlusion": {lv: mean([r for r in rows if r["occlusion_level"] == lv]) for lv in levels},
    }


@dataclass
class OpenDataset:
    """A sample folder, opened and checked: its samples, manifest and per-sample JSON records (None each when
    the records cannot be read; the samples themselves then say what is wrong)."""

    folder: Path
    samples: SampleDataset
    manifest: dict
    records: list


def open_dataset(folder: str | Path) -> OpenDataset:
    """Step 2: SampleError (a ValueError) naming the problem when the folder is not a readable dataset."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"dataset {folder} is not a folder; pass a folder of samples (with dataset.json)")
    samples = SampleDataset(folder)  # no manifest, wrong format, missing or truncated shard, no samples
    try:
        records: list = list(samples.records())
    except Exception:  # noqa: BLE001 - unreadable metadata: each sample's read will fail with its own message
        records = [None] * len(samples)
    return OpenDataset(folder, samples, read_manifest(folder), records)


def evaluate(
    dataset: OpenDataset,
    predictors: Sequence,
    settings: EvalSettings,
    progress: Progress | None = None,
    workers: int | None = None,
) -> dict:
    """Steps 4-5 without writing anything: the results dict (the content of results.json). workers: scoring
    processes (None: `default_workers()`); the results are the same for any count but for the timings."""
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers={workers}: expected at least 1 scoring process")
    t_start = time.perf_counter()
    count = len(dataset.samples) if settings.limit is None else min(settings.limit, len(dataset.samples))
    results = {
        "format": FORMAT,
        "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": {"path": str(dataset.folder.resolve()), "samples": len(dataset.samples), "evaluated": count},
        "dataset_info": dataset.manifest.get("info", {}),
        "settings": asdict(settings),
        "run": {"workers": workers},
        "metrics": [{"key": k, "label": label, "better": b} for k, label, b in METRICS],
        "models": [],
    }
    with Scorer(workers) as scorer:
        for predictor in predictors:
            results["models"].append(_evaluate_model(predictor, dataset, settings, count, scorer, progress))
    results["run"]["seconds"] = round(time.perf_counter() - t_start, 1)
    return results


def _evaluate_model(predictor, dataset: OpenDataset, settings: EvalSettings, count: int, scorer: Scorer, progress):
    """One model over the first `count` samples -> its entry of results["models"] (rows in sample order)."""
    predictor.load()
    rows: list[dict | None] = [None] * count
    failed = 0

    def finished(row: dict) -> None:
        nonlocal failed
        rows[row["index"]] = row
        failed += row["status"] != "ok"
        if progress is not None:
            progress(predictor.name, sum(r is not None for r in rows), count, failed, row.get("error"))

    if progress is not None:
        progress(predictor.name, 0, count, 0, None)
    try:
        for i in range(count):
            row, job = _predict_one(predictor, dataset.samples, i, dataset.records[i], settings)
            for done in [row] if job is None else scorer.submit(job):
                finished(done)
        for done in scorer.drain():
            finished(done)
    finally:
        predictor.close()
    return {
        "name": predictor.name,
        "description": predictor.description,
        "weights": predictor.weights,
        "failed": failed,
        "aggregates": aggregate(rows),
        "samples": rows,
    }


def prepare_out_dir(out: str | Path) -> Path:
    """Step 1: the output folder must be new or empty (then created) and writable; never anything else."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a new or empty folder for the results")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} already holds files; give a new or empty folder (nothing is overwritten)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written ({e.strerror}); choose a folder you can write to") from None
    return out


def _write_new(path: Path, text: str) -> None:
    if path.exists():
        raise ValueError(f"{path} appeared during the run; it is left as it is (results not written; use a new --out)")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(results: dict, out: str | Path) -> list[Path]:
    """results.json and results.md in `out` (temporary names, then renamed; an existing file is never replaced)."""
    out = Path(out)
    paths = [out / name for name in RESULT_FILES]
    _write_new(paths[0], json.dumps(_finite(results), indent=1))
    _write_new(paths[1], to_markdown(results))
    return paths


def run_eval(
    dataset_dir: str | Path,
    models: Sequence[str | None],
    out: str | Path,
    settings: EvalSettings = EvalSettings(),
    progress: Progress | None = None,
    workers: int | None = None,
) -> tuple[dict, list[Path]]:
    """All five steps: everything that can be wrong with the request is found before the output folder is made
    and before any model is loaded. workers: scoring processes (None: `default_workers()`). Returns (results,
    [results.json, results.md])."""
    settings.check()
    if workers is not None and workers < 1:
        raise ValueError(f"--workers {workers}: expected at least 1 scoring process")
    predictors = make_predictors(models, settings)  # names resolved; weights not loaded yet
    dataset = open_dataset(dataset_dir)
    out = prepare_out_dir(out)
    results = evaluate(dataset, predictors, settings, progress, workers)
    return results, write_results(results, out)


def _finite(x):
    """JSON has no NaN / inf: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if key in ("icp_rot", "rot_err") else f"{value:.4f}"


def _table(first: list[str], rows: list[tuple[list[str], dict]]) -> list[str]:
    arrows = {"higher": "↑", "lower": "↓"}
    head = first + ["n", "failed"] + [f"{label} {arrows[b]}" for _, label, b in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for names, agg in rows:
        cells = names + [str(agg["n"]), str(agg["failed"])] + [_cell(k, agg[k]) for k, _, _ in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _pointmap_words(settings: dict) -> str:
    refined = "; stage-1 poses refined against it (--refine-layout)" if settings.get("refine_layout") else ""
    if settings.get("carve"):
        grow = settings.get("carve_grow", 0)
        grown = f"grown by {grow} voxels, then " if grow else ""
        refined += f"; stage-1 voxels {grown}cut to the mask's silhouette cone (--carve)"
    if settings.get("pointmap", True):
        return "each sample's point map (the flat fallback plane where a sample has none)" + refined
    return "the flat fallback plane (--no-pointmap; layout in relative units)" + refined


def _run_line(run: dict) -> str:
    scored = f"Scored in {run['workers']} process{'es' if run['workers'] > 1 else ''}" if "workers" in run else ""
    took = f", {run['seconds']:.0f} s in all" if "seconds" in run else ""
    return f"{scored}{took}." if scored else ""


def to_markdown(results: dict) -> str:
    """The tables of results.md: overall, per object group, per occlusion level; then failures and settings."""
    ds, st, models = results["dataset"], results["settings"], results["models"]
    lines = [
        f"# sam3d eval: {Path(ds['path']).name}",
        "",
        f"Dataset `{ds['path']}`: {ds['evaluated']} of {ds['samples']} samples. Created {results['created']}.",
        f"Shape from {'stage 2 meshes' if st['stage2'] else 'stage-1 voxels'} for models; {st['points']} surface "
        f"points per shape, EMD on {st['emd_points']}, seed {st['seed']}. Metric definitions: docs/evaluation.md.",
        f"Models were given {_pointmap_words(st)}; the baselines the true depth. {_run_line(results.get('run', {}))}",
        "",
        "Models:",
        *[f"- `{m['name']}`: {m['description']} (weights {m['weights']})" for m in models],
        "",
        "## Overall",
        "",
        *_table(["model"], [([m["name"]], m["aggregates"]["overall"]) for m in models]),
        "",
        "## By object group",
        "",
        *_table(
            ["model", "group"],
            [([m["name"], g], a) for m in models for g, a in m["aggregates"]["by_group"].items()],
        ),
        "",
        "## By occlusion level",
        "",
        *_table(
            ["model", "occlusion"],
            [([m["name"], lv], a) for m in models for lv, a in m["aggregates"]["by_occlusion"].items()],
        ),
    ]
    sparse = sorted(
        {r["points"]["target_count"] for m in models for r in m["samples"] if r["status"] == "ok"} - {st["points"]}
    )
    if sparse:
        lines += [
            "",
            f"Note: some targets have fewer surface points than {st['points']} (as few as {sparse[0]}); F1@0.01 "
            "falls with the point density (docs/evaluation.md gives the ceiling per count).",
        ]
    failures = [(m["name"], r) for m in models for r in m["samples"] if r["status"] != "ok"]
    if failures:
        lines += ["", f"## Failures ({len(failures)})", ""]
        lines += [f"- `{name}` / `{r['sample_id']}`: {r['error']}" for name, r in failures]
    return "\n".join(lines) + "\n"
