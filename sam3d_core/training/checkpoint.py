"""Run checkpoints: written atomically, resumed exactly.

    <run>/checkpoints/step-000500/   trainable.safetensors   the trained parameters (full tensors)
                                     ema.safetensors         their moving average (when EMA is on)
                                     optimizer.pt            optimizer + schedule state (torch.load weights_only)
                                     rng.safetensors         torch CPU (+ CUDA) generator states
                                     state.json              step, data position, Python / NumPy RNG, signature
    <run>/checkpoints/latest         the name of the newest complete checkpoint

Each checkpoint is serialised to memory first, written into a temporary folder next to the others and
renamed into place; `latest` changes only after that. A failed write (a full disk) removes the temporary
folder and leaves every earlier checkpoint as it was. Frozen weights are not stored: they are the base
model's, whose hash is part of the signature checked on resume.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from sam3d_core.weights.store import CheckpointError

FORMAT = "sam3d-train-checkpoint"
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(OSError):
    """A checkpoint could not be written; the previous one is intact."""


@dataclass
class RunState:
    """What a checkpoint restores besides the tensors."""

    step: int  # optimizer steps done
    data_position: int  # samples of the global stream consumed (step * batch_size)
    signature: dict  # what the trained tensors belong to (stage, model config, base weights, parameters)
    metrics: dict  # last logged values (for the model card of a resumed run)
    elapsed_s: float = 0.0  # training wall time so far (device time = elapsed * processes)


def _write(path: Path, data: bytes) -> None:
    """Write bytes with os.write (one place where the disk can fail) and fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    py = random.getstate()
    extra = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, extra


def _set_rng_state(tensors: dict[str, torch.Tensor], extra: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    py = extra["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = extra["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save(
    run_dir: Path,
    state: RunState,
    trainable: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None,
    optimizer: dict,
    keep: int,
) -> Path:
    """Write checkpoint step-<state.step> atomically; prune to the newest `keep`. Raises DiskFullError."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:06d}"
    rng_tensors, rng_extra = _rng_state()
    buf = io.BytesIO()
    torch.save(optimizer, buf)
    files = {
        "trainable.safetensors": save_bytes({k: v.contiguous() for k, v in trainable.items()}),
        "optimizer.pt": buf.getvalue(),
        "rng.safetensors": save_bytes(rng_tensors),
        "state.json": json.dumps(
            {"format": FORMAT, **state.__dict__, "rng": rng_extra}, indent=1, default=float
        ).encode(),
    }
    if ema is not None:
        files["ema.safetensors"] = save_bytes({k: v.contiguous() for k, v in ema.items()})
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        for fname, data in files.items():
            _write(tmp / fname, data)
        final = root / name
        if final.exists():  # the same step saved again (a resumed run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_latest(root, name)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in DISK_ERRNOS:
            prev = latest(run_dir)
            raise DiskFullError(
                e.errno,
                f"the disk is full: checkpoint {name} could not be written to {root} ({os.strerror(e.errno)}); "
                + (f"the previous checkpoint {prev.name} is intact. " if prev else "")
                + "Free some space and continue with `sam3d train CONFIG --resume`",
            ) from None
        raise
    _prune(root, keep)
    return root / name


def _write_latest(root: Path, name: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".latest-", dir=root)
    os.close(fd)
    try:
        _write(Path(tmp), name.encode())
        os.replace(tmp, root / "latest")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".step-*"):  # leftovers of an interrupted write
        shutil.rmtree(p, ignore_errors=True)


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "state.json").is_file():
            return path
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load(path: Path, signature: dict) -> tuple[RunState, dict, dict | None, dict, Callable[[], None]]:
    """(state, trainable tensors, EMA tensors or None, optimizer state, restore_rng) of a checkpoint.

    restore_rng() sets the generators to their saved states; call it just before the first resumed step
    (after anything that draws at start-up, such as creating the data-loader iterator, as the saving run did).

    A checkpoint whose signature differs from `signature` (another stage, model, base weights or set of
    trained parameters) is refused with the differences named.
    """
    try:
        info = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable training checkpoint ({e})") from None
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a sam3d training checkpoint")
    theirs = info["signature"]
    diff = [k for k in sorted(set(signature) | set(theirs)) if signature.get(k) != theirs.get(k)]
    if diff:
        detail = "; ".join(
            f"{k}: checkpoint {_short(theirs.get(k))}, this run {_short(signature.get(k))}" for k in diff
        )
        raise CheckpointError(
            f"{path} is a checkpoint of another model ({detail}); resume with the configuration that wrote it, "
            "or start a new run in another output folder"
        )
    trainable = load_bytes((path / "trainable.safetensors").read_bytes())
    ema = load_bytes((path / "ema.safetensors").read_bytes()) if (path / "ema.safetensors").is_file() else None
    optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    rng = load_bytes((path / "rng.safetensors").read_bytes())
    state = RunState(info["step"], info["data_position"], theirs, info.get("metrics", {}), info.get("elapsed_s", 0.0))
    return state, trainable, ema, optimizer, lambda: _set_rng_state(rng, info["rng"])


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) < 80 else s[:77] + "..."
