"""Source (c): the preference log of the Blender add-on (and the app) -> DPO pairs.

    report = build_preferences("~/.local/share/sam3d/preferences.jsonl", "out/")

The log (format in addon/sam3d_blender/core/preflog.py, schema version 1) holds one JSON object per line:
{"version": 1, "kind": "best_of_n" | "reroll", "photo": "/abs/photo.png", "mask": "/abs/mask.png",
 "chosen": {"seed", "settings", "mesh": "/abs/out/object_0.glb"} | null, "rejected": [{...}, ...], ...}.

Every (chosen, rejected) pair of a record becomes one Sample: the photo and mask of the record, the CHOSEN
candidate's targets as the sample's own (pose, occupancy = its stage-1 voxels, ss_latent, SLAT) and the
rejected one's in `Sample.rejected`. Targets come from the file that `Pipeline.export(..., latents=True)`
writes beside each GLB: NAME_latents.safetensors (ss_latent [8, 16, 16, 16], rotation [3, 3], translation
[3], scale [3], slat_coords [N, 3], slat_feats [N, 8]; the photo's K in its metadata).

Skipped and counted, never fatal: a torn or non-JSON line, an unknown schema version, a record without a
chosen candidate (nothing to prefer), a pick whose photo, mask, GLB or latents file is gone, a latents file
that cannot be read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sam3d_core.data.build import BuildReport, check_output
from sam3d_core.data.sample import REJECTED_KEYS, Sample, SampleError, ShardWriter

LOG_VERSION = 1
LATENT_KEYS = ("ss_latent", "rotation", "translation", "scale", "slat_coords", "slat_feats")


class PairError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def latents_path(mesh: str | Path) -> Path:
    """Where `Pipeline.export(latents=True)` puts a GLB's latents: NAME.glb -> NAME_latents.safetensors."""
    mesh = Path(mesh)
    return mesh.with_name(mesh.stem + "_latents.safetensors")


def read_latents(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """NAME_latents.safetensors -> (arrays, K or None). Raises PairError naming the problem."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise PairError("unreadable latents", f"{path.name} cannot be read ({type(e).__name__}: {e})") from None
    if meta.get("format") != "sam3d-latents":
        raise PairError("unreadable latents", f"{path.name} is not a sam3d latents file (no format tag)")
    missing = [k for k in LATENT_KEYS if k not in arrays]
    if missing:
        raise PairError("unreadable latents", f"{path.name} lacks {missing}; re-export with latents=True")
    K = np.asarray(json.loads(meta["K"]), np.float64) if "K" in meta else None
    arrays["slat_coords"] = arrays["slat_coords"].astype(np.int64)
    for k in ("rotation", "translation", "scale"):
        arrays[k] = arrays[k].astype(np.float64)
    return arrays, K


def _candidate(cand: dict, what: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    mesh = cand.get("mesh") if isinstance(cand, dict) else None
    if not mesh:
        raise PairError("files gone", f"the {what} candidate names no mesh file")
    if not Path(mesh).is_file():
        raise PairError("files gone", f"the {what} mesh {mesh} is gone")
    lat = latents_path(mesh)
    if not lat.is_file():
        raise PairError(
            "no latents beside the mesh",
            f"{lat.name} is missing beside the {what} mesh; export picks with latents=True",
        )
    return read_latents(lat)


def pair_sample(record: dict, chosen: dict, rejected: dict, sample_id: str) -> Sample:
    """One (chosen, rejected) pair of a log record -> Sample with `rejected` (raises PairError)."""
    from sam3d_core.inputs.imageio import InputError, load_mask, load_photo

    photo_path, mask_path = record.get("photo"), record.get("mask")
    if not photo_path or not Path(photo_path).is_file():
        raise PairError("files gone", f"the photo {photo_path} is gone")
    if not mask_path or not Path(mask_path).is_file():
        raise PairError("files gone", f"the mask {mask_path} is gone (a photo without its mask)")
    ours, K = _candidate(chosen, "chosen")
    theirs, _ = _candidate(rejected, "rejected")
    try:
        photo = load_photo(photo_path)
        mask = load_mask(mask_path, photo, notes=[])
    except (InputError, OSError) as e:
        raise PairError("unreadable photo or mask", str(e)) from None
    if K is None:
        from sam3d_core.inputs.camera import resolve_intrinsics

        K, _ = resolve_intrinsics(photo, notes=[])
    return Sample(
        sample_id=sample_id,
        photo=photo.rgb,
        mask=mask,
        K=K,
        rotation=ours["rotation"],
        translation=ours["translation"],
        scale=ours["scale"],
        occupancy=ours["slat_coords"],
        ss_latent=ours["ss_latent"].astype(np.float32),
        slat_coords=ours["slat_coords"],
        slat_feats=ours["slat_feats"].astype(np.float32),
        rejected={k: theirs[k] for k in REJECTED_KEYS},
        source="preference",
        licence="user",
        provenance={
            "kind": record.get("kind"),
            "time": record.get("time"),
            "photo": str(photo_path),
            "chosen": {"mesh": chosen.get("mesh"), "seed": chosen.get("seed")},
            "rejected": {"mesh": rejected.get("mesh"), "seed": rejected.get("seed")},
            "weights": record.get("weights", ""),
            "model": record.get("model", ""),
        },
    )


def read_records(path: Path, report: BuildReport) -> list[tuple[int, dict]]:
    """(line number, record) of every well-formed version-1 record; torn lines and others are counted."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                report.skip("torn log line", f"line {n}", "is not complete JSON (a torn write?)")
                continue
            if not isinstance(rec, dict) or rec.get("version") != LOG_VERSION:
                version = rec.get("version") if isinstance(rec, dict) else None
                report.skip("unknown record version", f"line {n}", f"has version {version!r}, expected {LOG_VERSION}")
                continue
            out.append((n, rec))
    return out


def build_preferences(
    log: str | Path,
    out: str | Path,
    *,
    samples_per_shard: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> BuildReport:
    """The preference log -> DPO pair samples in `out` (new or empty); see the module doc."""
    log = Path(log).expanduser()
    if not log.is_file():
        raise FileNotFoundError(f"preference log {log} does not exist (the add-on writes it on each pick)")
    out = check_output(out)
    report = BuildReport("preferences")
    records = read_records(log, report)
    with ShardWriter(out, samples_per_shard=samples_per_shard) as writer:
        for i, (n, rec) in enumerate(records):
            chosen, rejected = rec.get("chosen"), rec.get("rejected") or []
            if not chosen:
                report.skip("no chosen candidate", f"line {n}", "every candidate was rejected; no pair to learn from")
            elif not rejected:
                report.skip("no rejected candidate", f"line {n}", "a pick without alternatives; no pair")
            for j, rej in enumerate(rejected if chosen else []):
                try:
                    writer.add(pair_sample(rec, chosen, rej, f"line{n}-{j}"))
                    report.written += 1
                except PairError as e:
                    report.skip(e.reason, f"line {n} pair {j}", str(e))
                except SampleError as e:
                    report.skip("invalid pair", f"line {n} pair {j}", str(e))
            if progress:
                progress(i + 1, len(records))
        writer.info = {"builder": "preferences", "log": str(log), "report": report.as_dict()}
    return report
