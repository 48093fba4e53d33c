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
import zipfile
from collections.abc import Iterator
from pathlib import Path

MANIFEST_FORMAT = 1
MAX_MANIFEST_BYTES = 16 << 20


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


def check_model_name(name: object, what: str = "model name") -> str:
    """A model name is a name, never a path (no separators, no '..', no NUL): CheckpointError otherwise."""
    from sam3d_core.export.output import OutputError, check_name

    try:
        return check_name(name, what)
    except OutputError as e:
        raise CheckpointError(f"{e}; `sam3d weights list` shows the names") from None


def read_manifest(folder: Path) -> dict:
    """A model folder's manifest.json, checked: a JSON object whose "files" maps plain file names (no paths) to
    {"sha256": str, "bytes": int}. CheckpointError names the file and the fix otherwise."""
    path = folder / "manifest.json"
    fix = "re-import the model (`sam3d weights list` shows the broken ones)"
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise CheckpointError(f"{path} is {path.stat().st_size} bytes, too large for a manifest; {fix}")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no manifest.json, so it is not a model folder of ours; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:120]}); {fix}") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f'{path} lists no "files" (it is not a manifest written by sam3d); {fix}')
    for fname, rec in files.items():
        try:
            check_model_name(fname, "file name")
        except CheckpointError:
            raise CheckpointError(f"{path} lists {fname!r}, which is not a plain file name; {fix}") from None
        if not (
            isinstance(rec, dict)
            and isinstance(rec.get("sha256"), str)
            and isinstance(rec.get("bytes"), int)
            and not isinstance(rec.get("bytes"), bool)
        ):
            raise CheckpointError(f'{path}: the entry of {fname!r} has no "sha256" and "bytes"; {fix}')
    return data


def scan_models(root: Path) -> list[tuple[Path, dict | None, str]]:
    """Every folder of `root` with a manifest.json: (folder, manifest or None, problem or ""). Never raises: a
    broken folder is reported, so one bad manifest cannot hide the others or stop a command."""
    out = []
    try:
        manifests = sorted(root.glob("*/manifest.json")) if root.is_dir() else []
    except OSError:
        return out
    for m in manifests:
        try:
            out.append((m.parent, read_manifest(m.parent), ""))
        except CheckpointError as e:
            out.append((m.parent, None, str(e)))
    return out


def folder_bytes(manifest: dict) -> int:
    return sum(r["bytes"] for r in manifest["files"].values())


def _removable_extras(folder: Path, manifest: dict) -> list[str]:
    listed = set(manifest["files"]) | {"manifest.json"}
    return sorted(p.name for p in folder.iterdir() if p.name not in listed)


def remove_model_folder(root: Path, name: str, kind: str = "model") -> Path:
    """Delete what our manifest lists in `root/name` (and the manifest), then the folder if it is empty.

    `name` is a name (checked), resolved only inside `root`; a link or a folder without a valid manifest is left
    alone. Files the manifest does not list stay, with the folder, and the error names them."""
    name = check_model_name(name, f"{kind} name")
    folder = root / name
    if folder.is_symlink() or not folder.is_dir():
        raise CheckpointError(
            f"no imported {kind} {name!r} in {root}"
            + (" (it is a link: remove it yourself)" if folder.is_symlink() else "")
            + "; `sam3d weights list` shows what is there"
        )
    manifest = read_manifest(folder)
    for fname in manifest["files"]:
        with contextlib.suppress(FileNotFoundError):
            (folder / fname).unlink()
    (folder / "manifest.json").unlink()
    extras = _removable_extras(folder, manifest)
    if extras:
        raise CheckpointError(
            f"removed the {kind} files of {folder}, but kept the folder: it also holds files sam3d did not write "
            f"({', '.join(extras[:5])}{' ...' if len(extras) > 5 else ''}); move them away and delete the folder"
        )
    folder.rmdir()
    return folder


@contextlib.contextmanager
def staged_folder(root: Path, name: str, overwrite: bool) -> Iterator[Path]:
    """A temporary folder in `root` that replaces `root/name` only if the block completes.

    `name` is a name, never a path (checked). Nothing the user already had is touched on failure: the previous
    folder stays until the new one is whole. `overwrite` replaces only a model folder of ours (a valid manifest,
    no files it does not list); anything else at `root/name` is refused.
    """
    name = check_model_name(name)
    root = Path(root)
    dest = root / name
    if os.path.lexists(dest):
        if not overwrite:
            raise CheckpointError(f"{dest} already exists; pass --overwrite to replace it or choose another --name")
        if dest.is_symlink() or not dest.is_dir():
            raise CheckpointError(f"{dest} is not a model folder (a file or a link); choose another --name")
        manifest = read_manifest(dest)  # ours, or refused
        extras = _removable_extras(dest, manifest)
        if extras:
            raise CheckpointError(
                f"{dest} also holds files sam3d did not write ({', '.join(extras[:5])}); --overwrite replaces only "
                "our own files: move them away, or choose another --name"
            )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        yield tmp
        old = None
        if os.path.lexists(dest):
            old = Path(tempfile.mkdtemp(prefix=f".{name}-old-", dir=root))
            os.replace(dest, old / name)
        try:
            tmp.rename(dest)
        except BaseException:
            if old is not None:
                os.replace(old / name, dest)
            raise
        if old is not None:
            shutil.rmtree(old)  # our previous model folder: every file in it is listed by its manifest
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
    """Problems of a folder with a manifest.json (empty = intact): files missing, truncated or changed.
    A manifest that cannot be read raises CheckpointError naming it."""
    manifest = read_manifest(folder)
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


def pickle_globals(path: Path, limit: int = 64 << 20) -> list[str] | None:
    """The classes and functions a checkpoint's pickle names (module.name), read with pickletools, which parses
    opcodes and never runs them. For a torch.save zip the pickle is its data.pkl. None when the file holds no
    parseable pickle (random bytes, text, a truncated file)."""
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if member is None or z.getinfo(member).file_size > limit:
                    return None
                data = z.read(member)
        else:
            with open(path, "rb") as f:
                data = f.read(limit)
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
            if op.name == "STOP":
                break
        return found
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError, IndexError):
        return None


SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict")


def torch_load_refusal(path: Path, e: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in words. A pickle that names classes or functions other
    than torch's (which could run code when loaded) is called that; anything else (random bytes, text, a truncated
    file) is called unreadable, never code."""
    names = pickle_globals(path)
    risky = sorted({n for n in names or () if not n.startswith(SAFE_GLOBAL_PREFIXES)})
    if risky or "Unsupported global" in str(e):
        what = f" ({', '.join(risky[:3])})" if risky else ""
        return f"{path.name} holds pickled objects other than tensors{what} and was refused: loading it could run code"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "error" in ln.lower() or "operand" in ln.lower()), lines[0] if lines else "")
    kind = "not a pickle at all" if names is None else f"{type(e).__name__}: {detail[:160]}"
    return (
        f"{path.name} cannot be read as a PyTorch checkpoint and was refused ({kind}); a truncated or corrupt "
        "download, or another kind of file?"
    )
