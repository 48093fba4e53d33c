"""Where results are written, and how, so that nothing the user has is ever lost.

One policy for the CLI, the worker (and through it the Blender add-on and the app) and `Pipeline.export`:

1. Results go into a new or empty folder, or are added beside what is there without replacing anything: a name
   that is taken gets a numbered suffix, per group of files that belong together (`object_0_1.glb`,
   `object_0_1.ply`, `object_0_1_mask.png`; `scene_1.json` with `scene_1.glb`). With `overwrite=True`, files
   of our own earlier results are replaced instead: those an index file of ours (`scene.json`,
   `objects.json`) lists, and mask PNGs carrying our marker. Anything else is still never replaced.
2. An input (the photo, a mask, a depth file) is never written over, whatever the mode.
3. The folder is checked before the heavy work: a folder (or one that can be made), writable, with room.
4. Every file of a job is written under a temporary name, in a private folder made with mkdtemp inside the
   destination, and renamed into place only when every file is complete; the index file goes last. A job
   that fails (disk full, cancel, crash) leaves nothing half-written, and nothing at all.
5. Names (objects, models) are names, never paths: no separators, no '..', no NUL (`check_name`).

    folder = output_folder("out/", overwrite=False, inputs=[photo, mask])  # before the GPU work
    folder.check_room(estimated_bytes)
    with folder.writer() as w:                                              # after it
        stem = w.claim("object_0", (".glb", ".ply"))                        # "object_0" or "object_0_1", ...
        save_glb(w.staged(stem + ".glb"))                                   # written into the private folder
    # leaving the block renames every file into place (or, on an exception, removes them all)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "OutputError",
    "OutputFolder",
    "Writer",
    "atomic_path",
    "check_name",
    "check_path_text",
    "is_our_png",
    "os_error_message",
    "output_file",
    "output_folder",
    "save_mask_png",
]

GENERATOR = "sam3d"  # written into our index files (scene.json "generator") and mask PNGs (tEXt "Software")
INDEX_RE = re.compile(r"^(scene|objects)(_\d+)?\.json$")  # our index files: they list the files they belong to
MAX_INDEX_BYTES = 64 << 20  # a larger "index" is not ours; never parse it
MAX_NAME_CHARS = 100
TMP_PREFIX = ".sam3d-tmp-"
MAX_SUFFIX = 9999
_LINK_UNSUPPORTED = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


class OutputError(ValueError):
    """An output we must not or cannot write: the message names it and the fix. `field` names the request field
    or option ("out", "name"), `details` holds JSON-able facts (path, sizes) for the worker protocol."""

    def __init__(self, message: str, field: str = "out", details: dict[str, Any] | None = None):
        super().__init__(message)
        self.field = field
        self.details = dict(details or {})


# ------------------------------------------------------------------------------------------------
# Names and path text


def check_name(name: object, what: str = "name") -> str:
    """A name that is safe as a single file or folder name, else OutputError: non-empty, at most 100 characters,
    no path separator, no NUL or control character, not '.' or '..', not starting with '.' or '-' (hidden
    files, our temporary names, options), not ending with a space or '.' (Windows drops those)."""
    if not isinstance(name, str) or not name:
        raise OutputError(f"{what} {name!r} is empty; give a name such as 'official' or 'cup'", "name")
    problem = None
    if len(name) > MAX_NAME_CHARS:
        problem = f"is {len(name)} characters long (at most {MAX_NAME_CHARS})"
    elif any(c in name for c in "/\\"):
        problem = "holds a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "holds a NUL or control character"
    elif name in (".", "..") or name.startswith((".", "-")):
        problem = "starts with '.' or '-'"
    elif name.endswith((" ", ".")) or ":" in name:
        problem = "ends with a space or '.', or holds ':'"
    if problem:
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise OutputError(
            f"{what} {shown!r} {problem}; a name is a name, not a path: use letters, digits, '_', '-' and '.'",
            "name",
            {"name": shown},
        )
    return name


def check_path_text(text: object, what: str = "path") -> str:
    """A path string as given by a user or a request: non-empty, no NUL byte (the OS cannot take one)."""
    if not isinstance(text, str) or not text.strip():
        raise OutputError(f"{what} is empty; give a path", what)
    if "\0" in text:
        raise OutputError(f"{what} {text!r} holds a NUL byte; give a plain file path", what)
    return text


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path))))


def os_error_message(e: OSError, action: str) -> str | None:
    """One line for the OS errors a user can act on (disk full, permissions, read-only, ...); None for others."""
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    fixes = {
        errno.ENOSPC: "the disk is full: free some space or choose a folder on another disk",
        errno.EDQUOT: "the disk quota is used up: free some space or choose another folder",
        errno.EFBIG: "the file is larger than this system allows (a file-size limit): raise the limit or "
        "choose another disk",
        errno.EROFS: "the disk is read-only: choose a writable folder",
        errno.EACCES: "permission denied: choose a folder you can write, or fix its permissions",
        errno.EPERM: "the operation is not permitted: choose another folder, or fix its permissions",
        errno.ENAMETOOLONG: "the path is too long: choose a shorter one",
        errno.ELOOP: "too many levels of symbolic links: the path points at itself through a link",
        errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
        errno.EISDIR: "it is a folder, not a file: give a file path",
        errno.EEXIST: "it already exists: choose another name",
        errno.ENOENT: "no such file or folder: check the path",
        errno.EIO: "an input/output error (a failing disk or a disconnected drive): check the disk",
    }
    fix = fixes.get(e.errno)
    if fix is None:
        return None
    return f"{action}{where} failed: {fix}"


# ------------------------------------------------------------------------------------------------
# Marked masks: a PNG text chunk says "written by sam3d", so --overwrite knows it may replace it


def save_mask_png(mask: Any, path: str | os.PathLike) -> Path:
    """A bool / 0-1 / 0-255 mask [H, W] as an 8-bit PNG (0 or 255) carrying our marker, written atomically."""
    import numpy as np
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", GENERATOR)
    image = Image.fromarray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8), mode="L")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def is_our_png(path: str | os.PathLike) -> bool:
    """True for a PNG whose text chunks (before the image data) say Software = sam3d. Reads the header only."""
    import struct

    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            for _ in range(64):  # text chunks come before IDAT in our files
                head = f.read(8)
                if len(head) < 8:
                    return False
                length, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND") or length > 1 << 20:
                    return False
                data = f.read(length)
                f.seek(4, os.SEEK_CUR)  # CRC
                if kind == b"tEXt" and data == b"Software\0" + GENERATOR.encode():
                    return True
    except OSError:
        return False
    return False


# ------------------------------------------------------------------------------------------------
# One file, atomically (library writers: gltf, voxels, masks)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path in a private folder beside `path`; renamed onto `path` when the block completes, removed
    when it raises. Replaces `path` itself (a symlink there is replaced, never followed)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=dest.parent))
    tmp = tmpdir / dest.name
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Output folders


@dataclass(frozen=True)
class OutputFolder:
    """An output folder that passed the early checks (`output_folder`); `writer()` writes a job's files."""

    path: Path  # absolute
    overwrite: bool = False
    inputs: frozenset[str] = frozenset()  # real paths of the job's inputs: never written over
    existing: Path = Path(".")  # the folder itself when it exists, else its nearest existing parent
    what: str = "output folder"

    def check_room(self, need_bytes: int) -> None:
        """OutputError when the disk holding the folder has less than `need_bytes` free."""
        free = shutil.disk_usage(self.existing).free
        if need_bytes > free:
            raise OutputError(
                f"{self.what} {self.path} is on a disk with {free / 1e6:.0f} MB free, but about "
                f"{need_bytes / 1e6:.0f} MB are needed; free some space or choose a folder on another disk",
                details={"path": str(self.path), "free_bytes": free, "need_bytes": int(need_bytes)},
            )

    def writer(self) -> Writer:
        return Writer(self)


def _nearest_existing(p: Path, what: str) -> Path:
    for q in (p, *p.parents):
        try:
            if os.path.lexists(q):
                return q
        except ValueError:  # a NUL byte
            break
    raise OutputError(f"{what} {p}: no part of this path exists; check it", details={"path": str(p)})


def _probe_writable(folder: Path, what: str, target: Path) -> None:
    """Create and delete a file in `folder`: the only check that sees read-only disks and ACLs (and root)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        why = os_error_message(e, "writing a test file") or f"{type(e).__name__}: {e}"
        raise OutputError(
            f"cannot write into {what} {target} ({why}); choose a writable folder", details={"path": str(target)}
        ) from None


def output_folder(
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    what: str = "output folder",
) -> OutputFolder:
    """Check an output folder before the heavy work: the path is a folder or can become one, and it is writable.

    Nothing is created here. `inputs`: the job's input files (never written over)."""
    text = check_path_text(os.fspath(out) if not isinstance(out, str) else out, what)
    path = Path(os.path.abspath(os.path.expanduser(text)))  # as given (links kept); inputs compare real paths
    try:
        existing = _nearest_existing(path, what)
        if existing == path and not path.is_dir():
            raise OutputError(
                f"{what} {path} is a file (or a broken link), not a folder; give a new or empty folder (or one "
                "with earlier results, to add to them)",
                details={"path": str(path)},
            )
        if existing != path and not existing.is_dir():
            raise OutputError(
                f"{what} {path} cannot be made: {existing} is a file, not a folder; check the path",
                details={"path": str(path)},
            )
    except OSError as e:
        raise OutputError(
            f"{what} {path}: {os_error_message(e, 'checking it') or e}", details={"path": str(path)}
        ) from None
    _probe_writable(existing, what, path)
    real_inputs = frozenset(_real(p) for p in inputs if p is not None)
    return OutputFolder(path, bool(overwrite), real_inputs, existing, what)


def output_file(
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    what: str = "output file",
) -> tuple[OutputFolder, str, str]:
    """Check a single output file (e.g. a mask PNG). Returns (its folder, the stem, the suffix) for
    `Writer.claim(stem, (suffix,))`: a taken name gets a numbered suffix, or with `overwrite` is replaced when it
    is ours (a mask PNG with our marker). An input is never replaced: asking for one is an OutputError."""
    text = check_path_text(os.fspath(out) if not isinstance(out, str) else out, what)
    path = Path(os.path.abspath(os.path.expanduser(text)))
    real_inputs = frozenset(_real(p) for p in inputs if p is not None)
    if _real(path) in real_inputs:
        raise OutputError(
            f"{what} {path} is one of this job's inputs; choose another file name (an input is never written over)",
            details={"path": str(path)},
        )
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name such as mask.png", details={"path": str(path)})
    if overwrite and os.path.lexists(path) and not (path.suffix == ".png" and is_our_png(path)):
        raise OutputError(
            f"{what} {path} exists and was not written by sam3d, so --overwrite does not replace it; choose "
            "another file name, or leave out --overwrite to write beside it with a numbered suffix",
            details={"path": str(path)},
        )
    folder = output_folder(path.parent, overwrite=overwrite, inputs=inputs, what=f"folder of the {what}")
    check_name(path.name, what)
    stem, suffix = (path.stem, path.suffix) if path.suffix else (path.name, "")
    return folder, stem, suffix


# ------------------------------------------------------------------------------------------------
# Writing a job's files


def _listed_names(value: Any, out: set[str]) -> None:
    """Every string in a JSON value that could be a file name in the same folder (no separator)."""
    if isinstance(value, str):
        if value and "/" not in value and "\\" not in value and len(value) < 256:
            out.add(value)
    elif isinstance(value, dict):
        for v in value.values():
            _listed_names(v, out)
    elif isinstance(value, list):
        for v in value[:10000]:
            _listed_names(v, out)


def _is_our_index(data: Any) -> bool:
    """Our scene.json / objects.json: a generator of ours, or the keys every version wrote."""
    if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
        return False
    if str(data.get("generator", "")).startswith(GENERATOR):
        return True
    legacy_scene = ("frames" in data or "frame" in data) and "model" in data  # scene.json before "generator"
    legacy_masks = "backend" in data and "photo" in data  # objects.json of `sam3d segment --all`
    return legacy_scene or legacy_masks


def our_files(folder: Path) -> frozenset[str]:
    """Names of the files in `folder` that our earlier results made: our index files and what they list."""
    names: set[str] = set()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return frozenset()
    for entry in entries:
        if not INDEX_RE.match(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if entry.stat().st_size > MAX_INDEX_BYTES:
                continue
            data = json.loads(Path(entry.path).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        if _is_our_index(data):
            names.add(entry.name)
            listed: set[str] = set()
            _listed_names(data.get("objects"), listed)
            for key in ("scene_glb", "scene_json"):
                _listed_names(data.get(key), listed)
            names |= {n for n in listed if n != entry.name and not INDEX_RE.match(n)}
    return frozenset(names)


@dataclass
class Writer:
    """One job's files: `claim` names, write each at `staged(name)`, and leave the `with` block to rename them all
    into place (the index file last). On an exception inside the block nothing is left behind."""

    folder: OutputFolder
    written: list[Path] = field(default_factory=list)  # final paths, after commit
    _claimed: dict[str, bool] = field(default_factory=dict)  # name -> renamed last (an index file)
    _staging: Path | None = None
    _created: list[Path] = field(default_factory=list)
    _ours: frozenset[str] = frozenset()

    def __enter__(self) -> Writer:
        dest = self.folder.path
        missing = [p for p in (dest, *dest.parents) if not os.path.lexists(p)]
        try:
            for p in reversed(missing):
                p.mkdir()
                self._created.append(p)
            self._staging = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=dest))
        except OSError as e:
            self._cleanup()
            msg = os_error_message(e, f"creating {self.folder.what} {dest}") or f"creating {dest} failed: {e}"
            raise OutputError(f"{msg}; nothing was written", details={"path": str(dest)}) from None
        self._ours = our_files(dest) if self.folder.overwrite else frozenset()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self._cleanup()

    # names --------------------------------------------------------------------------------------
    def _replaceable(self, path: Path) -> bool:
        if not self.folder.overwrite or _real(path) in self.folder.inputs or path.is_dir():
            return False
        return path.name in self._ours or (path.suffix == ".png" and is_our_png(path))

    def _taken(self, name: str) -> bool:
        path = self.folder.path / name
        if name in self._claimed or _real(path) in self.folder.inputs:
            return True
        return os.path.lexists(path) and not self._replaceable(path)

    def claim(self, stem: str, suffixes: Iterable[str] = ("",), *, last: bool = False) -> str:
        """The first of `stem`, `stem_1`, `stem_2`, ... for which no `stem + suffix` is taken (by a file that may
        not be replaced, an input, or a name claimed earlier in this job); claims those names and returns it.
        `last`: these files are renamed into place after all others (an index file that lists them)."""
        suffixes = tuple(suffixes)
        check_name(stem + suffixes[0] if suffixes else stem, "file name")
        for i in range(MAX_SUFFIX + 1):
            cand = stem if i == 0 else f"{stem}_{i}"
            names = [cand + s for s in suffixes]
            if not any(self._taken(n) for n in names):
                for n in names:
                    self._claimed[n] = last
                return cand
        raise OutputError(
            f"{self.folder.what} {self.folder.path} already holds {stem} up to {stem}_{MAX_SUFFIX}; choose a new folder"
        )

    def staged(self, name: str) -> Path:
        """Where to write the claimed file `name` now (it is renamed into place at commit)."""
        if name not in self._claimed:
            raise KeyError(f"{name!r} was not claimed; call claim() first")
        assert self._staging is not None, "use the writer in a with block"
        return self._staging / name

    # commit -------------------------------------------------------------------------------------
    def commit(self) -> list[Path]:
        assert self._staging is not None, "use the writer in a with block"
        dest, staging = self.folder.path, self._staging
        names = [n for n in self._claimed if (staging / n).is_file()]
        names.sort(key=lambda n: self._claimed[n])
        placed: list[Path] = []
        backups: list[tuple[Path, Path]] = []
        try:
            for name in names:
                src, dst = staging / name, dest / name
                if os.path.lexists(dst):
                    if not self._replaceable(dst):
                        raise OutputError(
                            f"{dst} appeared while this job was writing; run it again (nothing was written)",
                            details={"path": str(dst)},
                        )
                    backup = staging / f".old-{len(backups)}"
                    os.replace(dst, backup)
                    backups.append((backup, dst))
                    os.replace(src, dst)
                else:
                    _place_new(src, dst)
                placed.append(dst)
        except BaseException:
            for p in reversed(placed):
                with contextlib.suppress(OSError):
                    os.unlink(p)
            for backup, dst in reversed(backups):
                with contextlib.suppress(OSError):
                    os.replace(backup, dst)
            self._cleanup()
            raise
        self.written = placed
        shutil.rmtree(staging, ignore_errors=True)  # with the replaced files of earlier results
        self._staging = None
        return placed

    def _cleanup(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        for p in reversed(self._created):  # the folders this job made, deepest first, if still empty
            with contextlib.suppress(OSError):
                p.rmdir()
        self._created = []


def _place_new(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, which must not exist: a hard link fails if something appeared there meanwhile."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise OutputError(
            f"{dst} appeared while this job was writing; run it again (nothing was written)",
            details={"path": str(dst)},
        ) from None
    except OSError as e:
        if e.errno not in _LINK_UNSUPPORTED:
            raise
        if os.path.lexists(dst):  # a file system without hard links: check, then rename
            raise OutputError(f"{dst} appeared while this job was writing; run it again") from None
        os.replace(src, dst)
        return
    os.unlink(src)
