"""The user data folder and what every stored model folder shares: manifests with sha256, atomic folder swaps.

Used by the SAM 3D weights (`hub`), the SAM weights (`segment.weights`) and the depth models (`inputs.depth`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

MANIFEST_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be used, with what is wrong and how to fix it."""


def data_dir() -> Path:
    """The user data folder: $SAM3D_HOME, else the platform's per-user data location."""
    if os.environ.get("SAM3D_HOME"):
        return Path(os.environ["SAM3D_HOME"]).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "sam3d"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "sam3d"
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "sam3d"


def models_dir() -> Path:
    return data_dir() / "models"


@contextlib.contextmanager
def staged_folder(root: Path, name: str, overwrite: bool) -> Iterator[Path]:
    """A temporary folder in `root` that replaces `root/name` only if the block completes.

    Nothing the user already had is touched on failure: the previous folder stays until the new one is whole.
    """
    dest = root / name
    if dest.exists() and not overwrite:
        raise CheckpointError(f"{dest} already exists; pass --overwrite to replace it or choose another --name")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_folder(folder: Path) -> list[str]:
    """Problems of a folder with a manifest.json (empty = intact): files missing, truncated or changed."""
    manifest = json.loads((folder / "manifest.json").read_text())
    problems = []
    for fname, rec in manifest["files"].items():
        path = folder / fname
        if not path.is_file():
            problems.append(f"{fname}: missing")
        elif path.stat().st_size != rec["bytes"]:
            problems.append(f"{fname}: {path.stat().st_size} bytes, expected {rec['bytes']} (truncated?)")
        elif sha256_file(path) != rec["sha256"]:
            problems.append(f"{fname}: sha256 differs from the one recorded at import (modified or corrupt)")
    return problems
