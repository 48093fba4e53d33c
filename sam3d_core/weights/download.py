"""Opt-in weight downloads: the only code of this project that uses the network, and only when asked.

    sam3d weights download official [--dest DIR] [--token T] [--revision R] [--yes]
    sam3d weights download sam-vit_b|sam-vit_l|sam-vit_h [--dest DIR] [--yes]

Stdlib only (urllib). A file is streamed into `<name>.part` while its sha256 is computed, and renamed
only when complete (and, where the server publishes a sha256, equal to it); an interrupted download
resumes from the .part file with an HTTP Range request. The Hugging Face token is sent to the
Hugging Face host only, never along a redirect to its CDN.

Expected hashes: Hugging Face publishes the sha256 of every LFS file (the X-Linked-Etag header of its
resolve URL), so the official checkpoints are checked against it. Meta publishes no hash for the
segment-anything checkpoints; their sha256 is computed, printed and recorded by `import-sam`.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HF_REPO = "facebook/sam-3d-objects"  # gated: the licence must be accepted on the model page first
HF_ENDPOINT = "https://huggingface.co"
HF_SUBFOLDER = "checkpoints"
# What `sam3d weights import` reads (stages 1 and 2); the repository also holds slat_decoder_gs_4, a .pt copy
# of the mesh decoder and the encoders, which the pipeline does not use.
OFFICIAL_FILES = (
    "pipeline.yaml",
    "ss_generator.yaml",
    "ss_generator.ckpt",
    "ss_decoder.yaml",
    "ss_decoder.ckpt",
    "slat_generator.yaml",
    "slat_generator.ckpt",
    "slat_decoder_gs.yaml",
    "slat_decoder_gs.ckpt",
    "slat_decoder_mesh.yaml",
    "slat_decoder_mesh.ckpt",
)
OFFICIAL_APPROX_BYTES = 11.6e9  # from the published listing (6.3 + 4.6 GB generators, 0.65 GB decoders)
SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
# file name and approximate size (third-party listings); Meta publishes no checksum for these files
SAM_FILES = {
    "vit_b": ("sam_vit_b_01ec64.pth", 375e6),
    "vit_l": ("sam_vit_l_0b3195.pth", 1.25e9),
    "vit_h": ("sam_vit_h_4b8939.pth", 2.56e9),
}
CHOICES = ("official", "sam-vit_b", "sam-vit_l", "sam-vit_h")
CHUNK = 1 << 20
USER_AGENT = "sam3d-download/1 (urllib)"

Progress = Callable[[str, int, int | None], None]  # (file name, bytes done, total or None)


class DownloadError(RuntimeError):
    """A failed download. kind: auth | not_found | offline | disk_full | interrupted | hash | http | declined."""

    def __init__(self, message: str, kind: str, url: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.url = url


@dataclass(frozen=True)
class Fetched:
    path: Path
    bytes: int
    sha256: str
    resumed_from: int  # bytes already on disk when this run started (0: fresh download)
    skipped: bool  # the file was already complete


@dataclass(frozen=True)
class Remote:
    """What a HEAD request tells about a file: its size, published sha256 and the repository commit."""

    size: int | None
    sha256: str | None
    commit: str | None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # the 3xx reaches us as an HTTPError, headers intact
        return None


def _request(
    url: str,
    token: str | None,
    *,
    method: str = "GET",
    headers: dict | None = None,
    timeout: float = 60.0,
    follow: bool = True,
    hints: dict | None = None,
):
    req = urllib.request.Request(url, method=method, headers={"User-Agent": USER_AGENT, **(headers or {})})
    if token:
        req.add_unredirected_header("Authorization", f"Bearer {token}")  # not forwarded to a redirect target
    opener = urllib.request.build_opener() if follow else urllib.request.build_opener(_NoRedirect)
    try:
        return opener.open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if not follow and 300 <= e.code < 400:
            return e
        raise _http_error(e, url, token, hints or {}) from None
    except (urllib.error.URLError, OSError) as e:
        raise _offline_error(url, getattr(e, "reason", e), hints or {}) from None


def _http_error(e: urllib.error.HTTPError, url: str, token: str | None, hints: dict) -> DownloadError:
    if e.code in (401, 403):
        sent = (
            "a token was sent but refused: check that it has read access and that your access request was approved"
            if token
            else "no token was sent"
        )
        return DownloadError(
            f"access denied (HTTP {e.code}) for {url}: {sent}. {hints.get('auth', '')}".strip(), "auth", url
        )
    if e.code == 404:
        return DownloadError(
            f"not found (HTTP 404): {url}; check the name and --revision. {hints.get('not_found', '')}".strip(),
            "not_found",
            url,
        )
    if e.code == 429 or e.code >= 500:
        return DownloadError(
            f"the server answered HTTP {e.code} ({e.reason}) for {url}; try again later (a partial "
            "download is kept and resumes)",
            "http",
            url,
        )
    return DownloadError(f"HTTP {e.code} ({e.reason}) for {url}", "http", url)


def _offline_error(url: str, reason: object, hints: dict) -> DownloadError:
    host = urllib.parse.urlsplit(url).netloc
    return DownloadError(
        f"cannot reach {host} ({reason}): this machine looks offline, or a firewall blocks it. "
        f"{hints.get('offline', '')}".strip(),
        "offline",
        url,
    )


def _disk_full(folder: Path, need: int, url: str | None = None) -> DownloadError:
    free = shutil.disk_usage(folder).free
    return DownloadError(
        f"not enough disk space in {folder}: {need / 1e9:.2f} GB more needed, {free / 1e9:.2f} GB "
        "free; free some space or pass another --dest (a partial download is kept and resumes)",
        "disk_full",
        url,
    )


def _check_space(folder: Path, need: int, url: str | None = None) -> None:
    if need > 0 and shutil.disk_usage(folder).free < need:
        raise _disk_full(folder, need, url)


def _hash_file(path: Path) -> tuple[Any, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
            n += len(block)
    return h, n


def fetch(
    url: str,
    dest: str | Path,
    *,
    token: str | None = None,
    sha256: str | None = None,
    size: int | None = None,
    progress: Progress | None = None,
    timeout: float = 60.0,
    hints: dict | None = None,
) -> Fetched:
    """Download `url` to `dest`, resuming `dest.part`, hashing while streaming; check sha256 and size if known.

    An existing `dest` is kept when it matches the known size and sha256, else downloaded again.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        h, n = _hash_file(dest)
        if (size is None or n == size) and (sha256 is None or h.hexdigest() == sha256):
            return Fetched(dest, n, h.hexdigest(), n, True)
        dest.unlink()  # our own earlier file, no longer matching what the server publishes
    part = dest.with_name(dest.name + ".part")
    h, have = _hash_file(part) if part.is_file() else (hashlib.sha256(), 0)
    resumed_from = have
    if size is not None and have > size:
        part.unlink()
        h, have, resumed_from = hashlib.sha256(), 0, 0
    if size is None or have < size:
        resp = _request(url, token, headers={"Range": f"bytes={have}-"} if have else None, timeout=timeout, hints=hints)
        with resp:
            if have and resp.status != 206:  # the server ignored the range: start over
                h, have, resumed_from = hashlib.sha256(), 0, 0
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length is not None else size
            if size is not None and total is not None and total != size:
                raise DownloadError(
                    f"{url}: the server sends {total} bytes but {size} were announced; try again later", "http", url
                )
            _check_space(dest.parent, (total or 0) - have, url)
            have = _stream(resp, part, h, have, total, dest.name, progress, url)
        if total is not None and have != total:
            raise DownloadError(
                f"{dest.name}: the connection closed after {have} of {total} bytes; run the same "
                "command again to resume",
                "interrupted",
                url,
            )
    digest = h.hexdigest()
    if sha256 is not None and digest != sha256:
        part.unlink()
        raise DownloadError(
            f"{dest.name}: sha256 {digest} differs from the published {sha256}; the corrupt "
            "download was deleted, run the command again",
            "hash",
            url,
        )
    os.replace(part, dest)
    return Fetched(dest, have, digest, resumed_from, False)


def _stream(resp, part: Path, h, have: int, total: int | None, name: str, progress: Progress | None, url: str) -> int:
    """Append the response body to `part`, updating the hash; returns the bytes now in `part`."""
    with open(part, "ab" if have else "wb") as f:
        while True:
            try:
                block = resp.read(CHUNK)
            except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                raise DownloadError(
                    f"{name}: the download broke off after {have} bytes ({type(e).__name__}); run "
                    "the same command again to resume",
                    "interrupted",
                    url,
                ) from None
            if not block:
                return have
            try:
                f.write(block)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise _disk_full(part.parent, (total or have) - have, url) from None
                raise
            h.update(block)
            have += len(block)
            if progress:
                progress(name, have, total)


# ----------------------------------------------------------------------------------------------
# Hugging Face: the official SAM 3D Objects checkpoints


def _hf_token(token: str | None) -> str | None:
    return token or os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def _hf_hints(endpoint: str) -> dict:
    page = f"{endpoint.rstrip('/')}/{HF_REPO}"
    return {
        "auth": f"The repository is gated: accept the licence on the model page ({page}) while logged in, create a "
        f"read token ({endpoint.rstrip('/')}/settings/tokens), then pass --token or set HF_TOKEN.",
        "offline": "Only this command needs the network. Without it: download the checkpoints/ folder of "
        f"{page} on another machine, copy it here and run `sam3d weights import FOLDER`.",
        "not_found": f"The files are expected under {HF_SUBFOLDER}/ of {HF_REPO}.",
    }


def _head(url: str, token: str | None, timeout: float, hints: dict) -> Remote:
    """Size, published sha256 (LFS files) and commit of a Hugging Face resolve URL, without following redirects."""
    resp = _request(url, token, method="HEAD", timeout=timeout, follow=False, hints=hints)
    with resp:
        hd = resp.headers
        etag = (hd.get("X-Linked-Etag") or "").removeprefix("W/").strip('"')
        size = hd.get("X-Linked-Size") or (hd.get("Content-Length") if resp.getcode() == 200 else None)
        return Remote(
            int(size) if size else None, etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None, hd.get("X-Repo-Commit")
        )


def download_official(
    dest: str | Path,
    token: str | None = None,
    revision: str | None = None,
    endpoint: str = HF_ENDPOINT,
    *,
    files: tuple[str, ...] | None = None,
    progress: Progress | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download the official checkpoints (gated HF repo facebook/sam-3d-objects, folder checkpoints/) into `dest`.

    token: argument, else $HF_TOKEN. Every file is looked up first (access, size, sha256, commit), so a
    missing licence or disk space fails before any large transfer; the files then come from that one commit.
    files: names under checkpoints/ (default OFFICIAL_FILES). Writes `dest/download.json` (commit, sha256 and
    size per file). Returns `dest`, ready for
    `sam3d weights import`.
    """
    dest, token, hints = Path(dest).expanduser(), _hf_token(token), _hf_hints(endpoint)
    files = OFFICIAL_FILES if files is None else files
    dest.mkdir(parents=True, exist_ok=True)
    rev = revision or "main"

    def url(name: str, at: str) -> str:
        return f"{endpoint.rstrip('/')}/{HF_REPO}/resolve/{urllib.parse.quote(at, safe='')}/{HF_SUBFOLDER}/{name}"

    remote: dict[str, Remote] = {}
    commit = None
    for name in files:
        remote[name] = _head(url(name, commit or rev), token, timeout, hints)
        commit = commit or remote[name].commit
    missing = sum((r.size or 0) - _size_on_disk(dest, n, r.size) for n, r in remote.items())
    _check_space(dest, missing)
    record = {}
    for name in files:
        r = remote[name]
        got = fetch(
            url(name, commit or rev),
            dest / name,
            token=token,
            sha256=r.sha256,
            size=r.size,
            progress=progress,
            timeout=timeout,
            hints=hints,
        )
        record[name] = {"sha256": got.sha256, "bytes": got.bytes, "sha256_published": r.sha256 is not None}
    manifest = {
        "repo": HF_REPO,
        "revision": rev,
        "commit": commit,
        "endpoint": endpoint,
        "files": record,
        "downloaded_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (dest / "download.json").write_text(json.dumps(manifest, indent=2))
    return dest


def _size_on_disk(folder: Path, name: str, size: int | None) -> int:
    """Bytes of `name` already downloaded (complete file or .part), for the free-space check."""
    for p in (folder / name, folder / f"{name}.part"):
        if p.is_file():
            return min(p.stat().st_size, size or 0)
    return 0


# ----------------------------------------------------------------------------------------------
# segment-anything checkpoints


def download_sam(
    kind: str,
    dest: str | Path,
    *,
    base_url: str = SAM_BASE_URL,
    progress: Progress | None = None,
    timeout: float = 60.0,
) -> Fetched:
    """Download a segment-anything checkpoint (vit_b, vit_l or vit_h) into the folder `dest`.

    No published checksum exists: the sha256 is computed while downloading and returned (and recorded
    again by `sam3d weights import-sam`, which also checks that the file is a SAM state dict).
    """
    if kind not in SAM_FILES:
        raise ValueError(f"kind={kind!r}: expected one of {sorted(SAM_FILES)}")
    name = SAM_FILES[kind][0]
    url = base_url.rstrip("/") + "/" + name
    hints = {
        "offline": f"Only this command needs the network. Without it: download {url} on another machine, "
        f"copy it here and run `sam3d weights import-sam {name}`."
    }
    return fetch(url, Path(dest).expanduser() / name, progress=progress, timeout=timeout, hints=hints)
