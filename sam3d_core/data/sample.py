"""One training / evaluation sample, and the sharded on-disk format that holds many.

A dataset is a folder:

    dataset.json                 {"format": "sam3d-samples", "version": 2, "shards": [{"file", "samples",
                                  "sha256", "bytes"}], "samples": N, "licences": {...}, "info": {...}}
    shard-00000.safetensors      up to `samples_per_shard` samples
    ...

Each shard is a safetensors file (no pickle: safe to read from anyone). Sample i of a shard stores its tensors
under the prefix "i/" (e.g. "3/photo_png") and its JSON record (ids, pose, intrinsics, provenance, licence)
in the file's metadata under the key "i". Photos and masks are stored PNG-encoded (uint8 byte tensors), so
a 518 x 518 sample takes ~0.4 MB instead of ~1 MB.

Point maps: NaN marks a pixel without a surface (all three coordinates; the official pipeline's "invalid point",
which `pipeline.preprocess` skips in its scale / shift medians, while a 0 would count as a point at the camera).
A point map whose every valid point lies on its pixel's ray through K (a rendered one, or one back-projected from
a depth map) is stored as its rays' depths: the valid pixels as a PNG ("i/pointmap_valid_png") and their z, in
row-major order, as float32 ("i/pointmap_z"); reading back-projects them through K at the pixel centres (points
within POINTMAP_RAY_TOLERANCE of the original, relative to z; a 518 x 518 benchmark sample: ~0.1-0.3 MB instead
of 3.2 MB). Any other point map is stored as is, [H, W, 3] float32 ("i/pointmap"). Version 2 added the depth form;
version 1 folders read unchanged.

Frames (see `geometry.frames`): the pose maps the object's local frame ([-0.5, 0.5]^3, z up) into the
PyTorch3D camera frame of the photo, p_cam = (p_local * scale) @ R + t with row vectors (`Pose`); K is the
3x3 OpenCV pixel intrinsics of the photo (pixel centres at i + 0.5). Occupancy and the structured latent live
on the 64^3 grid of the local frame: voxel (x, y, z) spans [x, x + 1] / 64 - 0.5 on each axis.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save as save_bytes

FORMAT = "sam3d-samples"
VERSION = 2  # 2: point maps may be stored as depths along the pixel rays (module doc)
READABLE_VERSIONS = (1, 2)
POINTMAP_RAY_TOLERANCE = 1e-4  # stored as depths when every point is this close to its ray (x z); renders: ~4e-6
GRID = 64  # occupancy / SLAT grid resolution
REJECTED_KEYS = ("ss_latent", "rotation", "translation", "scale", "slat_coords", "slat_feats")
MANIFEST = "dataset.json"


class SampleError(ValueError):
    """A sample or dataset folder that cannot be used; the message names the problem and the fix."""


@dataclass
class Sample:
    """One object in one photo, with exact targets.

    photo [H, W, 3] uint8 RGB; mask [H, W] bool (visible pixels); amodal_mask [H, W] bool or None (the whole
    object, occluded parts included); K [3, 3] float64 OpenCV pixel intrinsics; rotation [3, 3] (row-vector,
    `Pose.rotation`), translation [3], scale [3]: local -> PyTorch3D camera; pointmap [H, W, 3] float32 in the
    PyTorch3D camera frame (NaN = no surface at that pixel) or None; occupancy [N, 3] int voxel indices on the
    64^3 grid (surface or solid, see `info["occupancy"]`); ss_latent [C, R, R, R] float32 (the stage-1 shape
    latent: [8, 16, 16, 16] officially, [8, 8, 8, 8] for our default model) or None;
    slat_coords [M, 3] int + slat_feats [M, 8] float32 (the stage-2 structured latent) or None;
    surface_points [P, 3] float32 points on the true surface in the local frame (evaluation) or None;
    rejected: for preference pairs (DPO), the rejected alternative's targets, a dict with any of the keys
    REJECTED_KEYS (same shapes as the fields of those names); this sample's own targets are the chosen one.
    sample_id: unique in a dataset; source: "capture" | "asset" | "benchmark" | ...; licence: SPDX-like id
    or a short text; provenance: free JSON (files, generator settings, fitted-pose IoU ...).
    """

    sample_id: str
    photo: np.ndarray
    mask: np.ndarray
    K: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    scale: np.ndarray
    occupancy: np.ndarray
    amodal_mask: np.ndarray | None = None
    pointmap: np.ndarray | None = None
    ss_latent: np.ndarray | None = None
    slat_coords: np.ndarray | None = None
    slat_feats: np.ndarray | None = None
    surface_points: np.ndarray | None = None
    rejected: dict[str, np.ndarray] | None = None
    source: str = "unknown"
    licence: str = "unknown"
    group: str = ""  # object group for per-group metrics (e.g. "chair")
    occlusion: float = 0.0  # fraction of the amodal mask that is hidden
    provenance: dict[str, Any] = field(default_factory=dict)

    def check(self) -> Sample:
        """Validate shapes, dtypes and ranges; returns self. Raises SampleError naming the field."""
        h, w = _shape(self.photo, "photo", (None, None, 3), np.uint8).shape[:2]
        _shape(self.mask, "mask", (h, w), np.bool_)
        if self.amodal_mask is not None:
            _shape(self.amodal_mask, "amodal_mask", (h, w), np.bool_)
        _shape(self.K, "K", (3, 3), None)
        _shape(self.rotation, "rotation", (3, 3), None)
        _shape(self.translation, "translation", (3,), None)
        _shape(self.scale, "scale", (3,), None)
        if not np.allclose(self.rotation @ self.rotation.T, np.eye(3), atol=1e-4) or np.linalg.det(self.rotation) < 0:
            raise SampleError(f"sample {self.sample_id}: rotation is not a proper rotation matrix (R R^T != I)")
        if not (np.asarray(self.scale) > 0).all():
            raise SampleError(f"sample {self.sample_id}: scale {np.asarray(self.scale).tolist()} must be positive")
        occ = _shape(self.occupancy, "occupancy", (None, 3), None)
        if occ.size and (occ.min() < 0 or occ.max() >= GRID):
            raise SampleError(f"sample {self.sample_id}: occupancy indices must lie in 0..{GRID - 1}")
        if self.pointmap is not None:
            _shape(self.pointmap, "pointmap", (h, w, 3), np.float32, allow_nan=True)
        if self.ss_latent is not None:
            lat = _shape(self.ss_latent, "ss_latent", (None, None, None, None), np.float32)
            if not lat.shape[1] == lat.shape[2] == lat.shape[3]:
                raise SampleError(
                    f"ss_latent: got shape {lat.shape}, expected [C, R, R, R] (officially [8, 16, 16, 16])"
                )
        if (self.slat_coords is None) != (self.slat_feats is None):
            raise SampleError(f"sample {self.sample_id}: slat_coords and slat_feats come together")
        if self.slat_coords is not None:
            n = _shape(self.slat_coords, "slat_coords", (None, 3), None).shape[0]
            _shape(self.slat_feats, "slat_feats", (n, None), np.float32)
        if self.surface_points is not None:
            _shape(self.surface_points, "surface_points", (None, 3), np.float32)
        if self.rejected is not None:
            unknown = set(self.rejected) - set(REJECTED_KEYS)
            if unknown or not self.rejected:
                raise SampleError(
                    f"sample {self.sample_id}: rejected keys {sorted(unknown)}; expected some of {REJECTED_KEYS}"
                )
            for k, v in self.rejected.items():
                mine = getattr(self, k)
                want = (
                    None
                    if mine is None
                    else tuple(None if k.startswith("slat") and i == 0 else d for i, d in enumerate(mine.shape))
                )
                _shape(v, f"rejected[{k}]", want or (None,) * v.ndim, None)
        if not self.mask.any():
            raise SampleError(f"sample {self.sample_id}: the visible mask is empty")
        return self

    def record(self) -> dict[str, Any]:
        """The JSON part: everything but the arrays stored as tensors."""
        return {
            "sample_id": self.sample_id,
            "K": np.asarray(self.K, np.float64).tolist(),
            "rotation": np.asarray(self.rotation, np.float64).tolist(),
            "translation": np.asarray(self.translation, np.float64).tolist(),
            "scale": np.asarray(self.scale, np.float64).tolist(),
            "source": self.source,
            "licence": self.licence,
            "group": self.group,
            "occlusion": float(self.occlusion),
            "provenance": self.provenance,
            "size_wh": [int(self.photo.shape[1]), int(self.photo.shape[0])],
        }

    def pose_matrix(self) -> np.ndarray:
        """4x4 column-vector local -> PyTorch3D camera (`frames.pose_matrix`)."""
        from sam3d_core.geometry import frames

        return frames.pose_matrix(self.rotation, self.translation, self.scale)


def _shape(a: Any, name: str, shape: tuple, dtype, allow_nan: bool = False) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise SampleError(f"{name}: got {type(a).__name__}, expected a numpy array of shape {shape}")
    if a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape, strict=True)):
        raise SampleError(f"{name}: got shape {a.shape}, expected {shape} (None = any)")
    if dtype is not None and a.dtype != dtype:
        raise SampleError(f"{name}: got dtype {a.dtype}, expected {np.dtype(dtype)}")
    if a.dtype.kind == "f" and not (np.isfinite(a) | (allow_nan & np.isnan(a))).all():
        raise SampleError(f"{name}: holds {'infinite' if allow_nan else 'NaN or infinite'} values")
    return a


def _tensor(a: np.ndarray, dtype=None) -> torch.Tensor:
    """A private copy: safetensors refuses tensors that share memory (two samples built from one array)."""
    return torch.from_numpy(np.array(a, dtype=dtype, copy=True, order="C"))


def _png(a: np.ndarray) -> torch.Tensor:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=3)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _unpng(t: torch.Tensor) -> np.ndarray:
    with Image.open(io.BytesIO(t.numpy().tobytes())) as im:
        return np.asarray(im)


def pixel_rays(height: int, width: int, K: np.ndarray) -> np.ndarray:
    """[H, W, 3] float64 PyTorch3D camera-frame points at z = 1 on the rays through the pixel centres (i + 0.5):
    K^-1 [u, v, 1] in OpenCV axes, x and y flipped (`frames`: PyTorch3D x left, y up)."""
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)  # [H, W] each
    pix = np.stack([u, v, np.ones_like(u)], axis=-1)  # [H, W, 3]
    rays = pix @ np.linalg.inv(np.asarray(K, np.float64)).T  # OpenCV, z = K[2] row's 1
    rays = rays / rays[..., 2:]
    return rays * np.array([-1.0, -1.0, 1.0])


def _pointmap_as_depth(pm: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(valid [H, W] bool, z [N] float32) when every valid point of `pm` lies on its pixel's ray (within
    POINTMAP_RAY_TOLERANCE x z) in front of the camera and every other pixel is all-NaN; else None."""
    valid = np.isfinite(pm).all(axis=-1)  # [H, W]
    if not np.isnan(pm[~valid]).all():
        return None  # a partly finite pixel: keep it as it is
    z = pm[..., 2][valid].astype(np.float64)  # [N]
    if not (z > 0).all():
        return None
    back = pixel_rays(*pm.shape[:2], K)[valid] * z[:, None]  # [N, 3]
    if not (np.abs(back - pm[valid]) <= POINTMAP_RAY_TOLERANCE * z[:, None]).all():
        return None
    return valid, pm[..., 2][valid].astype(np.float32)


def _pointmap_from_depth(valid: np.ndarray, z: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Inverse of `_pointmap_as_depth` -> [H, W, 3] float32, NaN where `valid` is False."""
    pm = np.full((*valid.shape, 3), np.nan, np.float32)
    if len(z) != int(valid.sum()):
        raise SampleError(f"pointmap_z holds {len(z)} depths for {int(valid.sum())} valid pixels; rebuild the dataset")
    pm[valid] = pixel_rays(*valid.shape, K)[valid] * z.astype(np.float64)[:, None]
    return pm


def encode(sample: Sample, index: int) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors (under prefix f"{index}/") and the JSON record of one checked sample."""
    s = sample.check()
    p = f"{index}/"
    out = {
        p + "photo_png": _png(s.photo),
        p + "mask_png": _png(s.mask.astype(np.uint8) * 255),
        p + "occupancy": _tensor(s.occupancy, dtype=np.uint8),
    }
    if s.amodal_mask is not None:
        out[p + "amodal_png"] = _png(s.amodal_mask.astype(np.uint8) * 255)
    if s.pointmap is not None:
        as_depth = _pointmap_as_depth(s.pointmap, s.K)
        if as_depth is None:
            out[p + "pointmap"] = _tensor(s.pointmap)
        else:
            out[p + "pointmap_valid_png"] = _png(as_depth[0].astype(np.uint8) * 255)
            out[p + "pointmap_z"] = _tensor(as_depth[1])
    if s.ss_latent is not None:
        out[p + "ss_latent"] = _tensor(s.ss_latent)
    if s.slat_coords is not None:
        out[p + "slat_coords"] = _tensor(s.slat_coords, dtype=np.uint8)
        out[p + "slat_feats"] = _tensor(s.slat_feats)
    if s.surface_points is not None:
        out[p + "surface_points"] = _tensor(s.surface_points)
    for k, v in (s.rejected or {}).items():
        dtype = np.uint8 if k == "slat_coords" else np.float32
        out[p + "rejected/" + k] = _tensor(v, dtype=dtype)
    return out, json.dumps(s.record())


def decode(tensors: dict[str, torch.Tensor], record: str, index: int) -> Sample:
    p = f"{index}/"
    rec = json.loads(record)

    def get(name):
        return tensors.get(p + name)

    slat_c = get("slat_coords")
    pointmap = get("pointmap").numpy() if get("pointmap") is not None else None
    if get("pointmap_z") is not None:
        pointmap = _pointmap_from_depth(_unpng(get("pointmap_valid_png")) > 127, get("pointmap_z").numpy(), rec["K"])
    rejected = {k: get("rejected/" + k).numpy() for k in REJECTED_KEYS if get("rejected/" + k) is not None}
    if "slat_coords" in rejected:
        rejected["slat_coords"] = rejected["slat_coords"].astype(np.int64)
    for k in ("rotation", "translation", "scale"):
        if k in rejected:
            rejected[k] = rejected[k].astype(np.float64)
    return Sample(
        sample_id=rec["sample_id"],
        photo=_unpng(get("photo_png")),
        mask=_unpng(get("mask_png")) > 127,
        amodal_mask=_unpng(get("amodal_png")) > 127 if get("amodal_png") is not None else None,
        K=np.asarray(rec["K"]),
        rotation=np.asarray(rec["rotation"]),
        translation=np.asarray(rec["translation"]),
        scale=np.asarray(rec["scale"]),
        occupancy=get("occupancy").numpy().astype(np.int64),
        pointmap=pointmap,
        ss_latent=get("ss_latent").numpy() if get("ss_latent") is not None else None,
        slat_coords=slat_c.numpy().astype(np.int64) if slat_c is not None else None,
        slat_feats=get("slat_feats").numpy() if get("slat_feats") is not None else None,
        surface_points=get("surface_points").numpy() if get("surface_points") is not None else None,
        rejected=rejected or None,
        source=rec["source"],
        licence=rec["licence"],
        group=rec.get("group", ""),
        occlusion=rec.get("occlusion", 0.0),
        provenance=rec.get("provenance", {}),
    )


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ShardWriter:
    """Writes samples into a new or empty folder as shards plus dataset.json (written last, atomically).

        with ShardWriter(out_dir, info={"builder": "assets"}) as w:
            w.add(sample)              # checked; duplicate sample_id refused

    A folder that already holds files is refused unless `append=True` and it holds one of our datasets (its
    shards are kept and new shards follow). Each shard is written to a temporary name and renamed into place.
    """

    def __init__(
        self, folder: str | Path, *, samples_per_shard: int = 256, info: dict | None = None, append: bool = False
    ):
        self.folder = Path(folder)
        self.samples_per_shard = int(samples_per_shard)
        if self.samples_per_shard < 1:
            raise SampleError(f"samples_per_shard={samples_per_shard}: expected at least 1")
        self.info = dict(info or {})
        self.shards: list[dict] = []
        self.licences: dict[str, int] = {}
        self.ids: set[str] = set()
        if self.folder.exists() and any(self.folder.iterdir()):
            if not append or not (self.folder / MANIFEST).is_file():
                raise SampleError(
                    f"{self.folder} is not empty; write the dataset into a new or empty folder "
                    "(or pass append=True for one of our dataset folders)"
                )
            old = read_manifest(self.folder)
            self.shards, self.licences = old["shards"], old.get("licences", {})
            self.ids = set(SampleDataset(self.folder).ids())
        self.folder.mkdir(parents=True, exist_ok=True)
        self._pending: list[Sample] = []

    def add(self, sample: Sample) -> None:
        sample.check()
        if sample.sample_id in self.ids:
            raise SampleError(f"sample_id {sample.sample_id!r} is already in this dataset; ids must be unique")
        self.ids.add(sample.sample_id)
        self.licences[sample.licence] = self.licences.get(sample.licence, 0) + 1
        self._pending.append(sample)
        if len(self._pending) >= self.samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        tensors, meta = {}, {}
        for i, s in enumerate(self._pending):
            t, rec = encode(s, i)
            tensors.update(t)
            meta[str(i)] = rec
        meta["count"] = str(len(self._pending))
        data = save_bytes(tensors, metadata=meta)
        name = f"shard-{len(self.shards):05d}.safetensors"
        _atomic_write(self.folder / name, data)
        self.shards.append(
            {
                "file": name,
                "samples": len(self._pending),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        self._pending = []

    def close(self) -> Path:
        self._flush()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "samples": sum(s["samples"] for s in self.shards),
            "shards": self.shards,
            "licences": self.licences,
            "info": self.info,
        }
        _atomic_write(self.folder / MANIFEST, json.dumps(manifest, indent=2).encode())
        return self.folder

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise SampleError(f"{folder} has no {MANIFEST}; it is not a sample folder (build one with `sam3d data`)")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SampleError(f"{path} is not valid JSON ({e}); rebuild the dataset") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("shards"), list):
        raise SampleError(f"{path} is not a {FORMAT} manifest; rebuild the dataset with `sam3d data`")
    if m.get("version") not in READABLE_VERSIONS:
        raise SampleError(
            f"{path} has format version {m.get('version')}; this sam3d reads versions {READABLE_VERSIONS} "
            "(a newer sam3d wrote it: update sam3d, or rebuild the dataset)"
        )
    return m


class SampleDataset(torch.utils.data.Dataset):
    """Random access to the samples of one or more dataset folders (a torch Dataset of `Sample`).

    `verify=True` checks every shard's sha256 against the manifest first (slow on big sets).
    """

    def __init__(self, *folders: str | Path, verify: bool = False):
        if not folders:
            raise SampleError("give at least one dataset folder")
        self._index: list[tuple[Path, int]] = []
        for folder in folders:
            folder = Path(folder)
            m = read_manifest(folder)
            for sh in m["shards"]:
                path = folder / sh["file"]
                if not path.is_file() or path.stat().st_size != sh["bytes"]:
                    raise SampleError(f"{path} is missing or truncated; rebuild the dataset")
                if verify and hashlib.sha256(path.read_bytes()).hexdigest() != sh["sha256"]:
                    raise SampleError(f"{path} differs from its recorded sha256; rebuild the dataset")
                self._index += [(path, i) for i in range(sh["samples"])]
        if not self._index:
            raise SampleError(f"no samples in {', '.join(map(str, folders))}; build some with `sam3d data`")

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> Sample:
        path, k = self._index[i]
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            keys = [n for n in f.keys() if n.startswith(f"{k}/")]
            tensors = {n: f.get_tensor(n) for n in keys}
        return decode(tensors, meta[str(k)], k)

    def records(self) -> Iterator[dict]:
        """The JSON records in order, without decoding any array."""
        last, meta = None, {}
        for path, k in self._index:
            if path != last:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata()
                last = path
            yield json.loads(meta[str(k)])

    def ids(self) -> list[str]:
        return [r["sample_id"] for r in self.records()]
