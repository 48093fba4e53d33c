"""`sam3d eval`: run models and baselines over a folder of samples and score them with the paper's metrics.

    results, files = run_eval("bench/", ["tiny", "box", "ellipsoid"], "eval_out/", EvalSettings(limit=20))

Numbered steps: 1. check the output folder (new or empty) and the settings, 2. open the dataset, 3. resolve every
model name (a baseline, 'tiny', an imported model or a model folder) before any heavy work, 4. per model, per
sample: predict, then score (`score_prediction`); a sample that cannot be read or predicted or scored is
recorded with its message and counted, and the run goes on, 5. aggregate (overall, per object group, per
occlusion level) and write results.json + results.md (temporary name, then renamed; never over a file).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sam3d_core.data.benchmark import OCCLUSION_LEVELS as _BENCH_LEVELS
from sam3d_core.data.sample import Sample, SampleDataset, read_manifest
from sam3d_core.evaluation import baselines
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
    N samples only."""

    points: int = POINTS
    emd_points: int = EMD_POINTS
    seed: int = 0
    stage2: bool = False
    steps: int | None = None
    max_voxels: int | None = None
    device: str | None = None
    limit: int | None = None

    def check(self) -> EvalSettings:
        if not 1_000 <= self.points <= 10_000_000:
            raise ValueError(f"points={self.points}: expected 1000..10000000 (the paper samples 1000000)")
        if not 16 <= self.emd_points <= 8192:
            raise ValueError(f"emd_points={self.emd_points}: expected 16..8192 (1024 is the default)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit}: expected at least 1 sample")
        if self.steps is not None and not 1 <= self.steps <= 1000:
            raise ValueError(f"steps={self.steps}: expected 1..1000")
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
        ctx = pipe.open_photo(photo, K=sample.K, pointmap=sample.pointmap, depth_model="none")
        out1 = pipe.stage1(photo.rgb, sample.mask, ctx.pointmap, seed=seed, steps=s.steps)
        pose = out1.pose
        info = {"pointmap": ctx.pointmap_source, "downsample_factor": int(out1.downsample_factor)}
        rotation = pose.rotation[0].double().cpu().numpy()
        translation = pose.translation[0].double().cpu().numpy()
        scale = pose.scale[0].double().cpu().numpy()
        if not s.stage2 or pipe.stage2 is None:
            # Every voxel with a positive logit, on the full grid: the decoded scale includes the cap's factor.
            occupancy = out1.coords_original[:, 1:].cpu().numpy().astype(np.int64)
            info["voxels"] = len(occupancy)
            return Prediction(occupancy, rotation, translation, scale / out1.downsample_factor, info=info)
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


def _evaluate_one(predictor, dataset: SampleDataset, i: int, record: dict | None, settings: EvalSettings) -> dict:
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
        t1 = time.perf_counter()
        stage = "score"
        rng = np.random.default_rng([settings.seed, i])
        metrics, used = score_prediction(sample, pred, points=settings.points, emd_points=settings.emd_points, rng=rng)
        row.update(status="ok", metrics=metrics, points=used, prediction=pred.info)
        row["seconds"] = {"predict": round(t1 - t0, 3), "score": round(time.perf_counter() - t1, 3)}
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - one bad sample is recorded and counted; the run goes on
        row["error"] = f"{stage}: {type(e).__name__}: {e}"
    return row


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
    dataset: OpenDataset, predictors: Sequence, settings: EvalSettings, progress: Progress | None = None
) -> dict:
    """Steps 4-5 without writing anything: the results dict (the content of results.json)."""
    count = len(dataset.samples) if settings.limit is None else min(settings.limit, len(dataset.samples))
    results = {
        "format": FORMAT,
        "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": {"path": str(dataset.folder.resolve()), "samples": len(dataset.samples), "evaluated": count},
        "dataset_info": dataset.manifest.get("info", {}),
        "settings": asdict(settings),
        "metrics": [{"key": k, "label": label, "better": b} for k, label, b in METRICS],
        "models": [],
    }
    for predictor in predictors:
        predictor.load()
        rows, failed = [], 0
        if progress is not None:
            progress(predictor.name, 0, count, 0, None)
        try:
            for i in range(count):
                row = _evaluate_one(predictor, dataset.samples, i, dataset.records[i], settings)
                rows.append(row)
                failed += row["status"] != "ok"
                if progress is not None:
                    progress(predictor.name, i + 1, count, failed, row.get("error"))
        finally:
            predictor.close()
        results["models"].append(
            {
                "name": predictor.name,
                "description": predictor.description,
                "weights": predictor.weights,
                "failed": failed,
                "aggregates": aggregate(rows),
                "samples": rows,
            }
        )
    return results


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
) -> tuple[dict, list[Path]]:
    """All five steps: everything that can be wrong with the request is found before the output folder is made
    and before any model is loaded. Returns (results, [results.json, results.md])."""
    settings.check()
    predictors = make_predictors(models, settings)  # names resolved; weights not loaded yet
    dataset = open_dataset(dataset_dir)
    out = prepare_out_dir(out)
    results = evaluate(dataset, predictors, settings, progress)
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


def to_markdown(results: dict) -> str:
    """The tables of results.md: overall, per object group, per occlusion level; then failures and settings."""
    ds, st, models = results["dataset"], results["settings"], results["models"]
    lines = [
        f"# sam3d eval: {Path(ds['path']).name}",
        "",
        f"Dataset `{ds['path']}`: {ds['evaluated']} of {ds['samples']} samples. Created {results['created']}.",
        f"Shape from {'stage 2 meshes' if st['stage2'] else 'stage-1 voxels'} for models; {st['points']} surface "
        f"points per shape, EMD on {st['emd_points']}, seed {st['seed']}. Metric definitions: docs/evaluation.md.",
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
