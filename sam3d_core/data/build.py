"""What every sample builder shares: the skip-and-count report, the output-folder check, the latent encoder
call, and photo reading.

A builder never stops on one bad input: it calls `report.skip(reason, item, message)` and goes on; the
report's `summary()` lists the counts per reason (the CLI prints it), and `as_dict()` goes into the dataset's
`info` so the counts travel with the samples.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sam3d_core.data.sample import MANIFEST, SampleError

log = logging.getLogger("sam3d.data")

PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class LatentEncoderLike(Protocol):
    """What a builder needs from a latent encoder (implemented by `sam3d_core.data.latents.LatentEncoder`).

    mesh: the `meshio.Asset` in the local frame (its colours and textures feed the SLAT features), or a
    trimesh.Trimesh."""

    def encode_sample(self, mesh, occupancy: np.ndarray) -> dict[str, np.ndarray]: ...


@dataclass
class BuildReport:
    """Counts of written samples and of skipped inputs per reason, with one message per skip."""

    builder: str
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def skip(self, reason: str, item: str, message: str) -> None:
        self.skipped[reason] += 1
        text = message if message.startswith(item) else f"{item}: {message}"
        self.messages.append(text)
        log.info("skipped %s", text)

    def summary(self) -> str:
        lines = [f"{self.builder}: {self.written} samples written, {sum(self.skipped.values())} inputs skipped"]
        lines += [f"  {n} x {reason}" for reason, n in sorted(self.skipped.items())]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"written": self.written, "skipped": dict(self.skipped), "messages": self.messages[:200]}


def check_output(out: str | Path) -> Path:
    """The output folder must be new or empty (ours or not: we never mix a new build into old files)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SampleError(f"--out {out} is a file; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        what = "a dataset" if (out / MANIFEST).is_file() else "files"
        raise SampleError(f"--out {out} already holds {what}; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    probe = out / ".sam3d-write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SampleError(f"--out {out} is not writable ({e.strerror}); choose another folder") from None
    return out


def encode_latents(encoder: LatentEncoderLike | None, mesh, occupancy: np.ndarray) -> dict[str, np.ndarray]:
    """Call the encoder (if any) and check its output: ss_latent [8, 16, 16, 16] float32, slat_coords [M, 3]
    int64, slat_feats [M, 8] float32. Raises ValueError naming the bad key."""
    if encoder is None:
        return {}
    out = encoder.encode_sample(mesh, occupancy)
    want = {"ss_latent": ((8, 16, 16, 16), np.float32), "slat_coords": ((None, 3), np.int64)}
    want["slat_feats"] = ((None, 8), np.float32)
    res = {}
    for key, (shape, dtype) in want.items():
        a = np.asarray(out.get(key)) if out.get(key) is not None else None
        if a is None:
            raise ValueError(f"the encoder returned no {key!r}; encode_sample must return {sorted(want)}")
        if a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape, strict=True)):
            raise ValueError(f"the encoder's {key} has shape {a.shape}, expected {shape}")
        res[key] = a.astype(dtype)
    if len(res["slat_coords"]) != len(res["slat_feats"]):
        raise ValueError("the encoder's slat_coords and slat_feats differ in length")
    return res


def read_rgb(path: str | Path) -> np.ndarray:
    """A photo file -> [H, W, 3] uint8 RGB (EXIF orientation applied, alpha dropped) via our photo reader."""
    from sam3d_core.inputs.imageio import load_photo

    return load_photo(path).rgb


def photo_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
