"""The `sam3d serve` wire protocol: versioned JSON messages, one per line. STDLIB ONLY.

Blender's addon and the desktop app import this module (and `client.py`) without torch or numpy, so
it must never import anything outside the Python standard library. See docs/protocol.md.

Framing: one JSON object per line, UTF-8, terminated by "\\n", over the worker's stdin (requests)
and stdout (responses and events). The worker's stdout carries nothing else; its logs go to stderr.

Every message has "v" (PROTOCOL_VERSION), "id" and "type". A request's id is chosen by the client;
the worker's messages about a request carry that id (null when the request could not be parsed).
Unknown fields are ignored; unknown types are answered with a `bad_request` error; a message of
another protocol version is answered with a `version_mismatch` error.
"""

from __future__ import annotations

import json
import math
import re
import uuid

PROTOCOL_VERSION = 1

REQUEST_TYPES = (
    "hello",
    "reconstruct",
    "cancel",
    "shutdown",
    "status",
    "open_photo",
    "segment",
    "segment_all",
    "segment_concept",
)
RESPONSE_TYPES = ("hello", "progress", "result", "error", "cancelled", "status", "photo", "instance")
# Responses that end a request (progress and instance events do not). A cancel request gets no reply of its own.
FINAL_TYPES = ("hello", "result", "error", "cancelled", "status", "photo")
# Progress stages this version sends, in order; clients must accept others (a newer worker may add some).
STAGES = ("preprocess", "stage1", "stage2", "postprocess", "bake", "export")
ERROR_CODES = (
    "bad_request",  # the message is malformed: not JSON, a missing or mistyped field, an unknown type
    "bad_input",  # the request is well formed but its inputs are not usable (missing file, empty mask)
    "missing_weights",  # the requested model is not imported or failed its integrity check
    "out_of_memory",  # the GPU ran out of memory
    "cancelled",  # used by clients for a job that ended with a "cancelled" message
    "internal",  # a bug, or the worker process died
    "version_mismatch",  # the message's "v" is not this protocol version
)

# GPU memory presets of a reconstruct request: "low" = one stage on the GPU at a time (<= 8 GB); "medium" and
# "high" keep both stages loaded (about 13 GB at the official size); "auto" = as the worker was started.
VRAM_PRESETS = ("auto", "low", "medium", "high")

MAX_LINE_BYTES = 1 << 20  # a request line longer than this (newline excluded) is rejected (paths, not pixels)
MAX_DEPTH = 32  # arrays and objects nested deeper than this are rejected (requests need 3 levels)
MAX_SEED = 2**63  # seeds are integers in (-MAX_SEED, MAX_SEED)


class ProtocolError(Exception):
    """A structured protocol error: `code` (one of ERROR_CODES), human `message`, `details` dict."""

    def __init__(self, code: str, message: str, details: dict | None = None, request_id: str | None = None):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}; expected one of {ERROR_CODES}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = dict(details or {})
        self.request_id = request_id  # the offending request's id when it could be read, else None

    def to_message(self, id: str | None = None) -> dict:
        return error(id if id is not None else self.request_id, self.code, self.message, self.details)


def new_id() -> str:
    """A fresh request id (any unique string works; clients may choose their own)."""
    return uuid.uuid4().hex[:12]


# ----------------------------------------------------------------------------------------------
# Framing


def encode(msg: dict) -> bytes:
    """One message -> one UTF-8 line (compact JSON + "\\n"). Checks the envelope; no NaN or inf."""
    if not isinstance(msg, dict):
        raise TypeError(f"a protocol message is a dict, got {type(msg).__name__}")
    for key in ("v", "id", "type"):
        if key not in msg:
            raise ValueError(f"a protocol message needs {key!r}: {msg!r}")
    text = json.dumps(msg, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return (text + "\n").encode("utf-8")  # json.dumps escapes newlines inside strings
    except UnicodeEncodeError:  # a lone surrogate (e.g. echoed from a request): \u-escaped, still valid JSON
        return (json.dumps(msg, ensure_ascii=True, separators=(",", ":"), allow_nan=False) + "\n").encode("ascii")


def _parse(line: bytes | str) -> dict:
    """One line -> a dict, or ProtocolError("bad_request"). Never raises anything else, for any input: over-long
    lines, invalid UTF-8, deep nesting, non-finite numbers and non-objects are all answered."""
    if isinstance(line, (bytes, bytearray)):
        line = bytes(line).rstrip(b"\r\n")
        if len(line) > MAX_LINE_BYTES:
            raise ProtocolError(
                "bad_request",
                f"message of {len(line)} bytes is longer than the limit of "
                f"{MAX_LINE_BYTES}; send file paths, not pixel data",
                {"bytes": len(line), "limit": MAX_LINE_BYTES},
            )
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError("bad_request", f"message is not valid UTF-8 ({e}); encode lines as UTF-8") from None
    elif len(line) > MAX_LINE_BYTES:
        raise ProtocolError("bad_request", f"message of {len(line)} characters is longer than {MAX_LINE_BYTES}")
    depth = _nesting(line)
    if depth > MAX_DEPTH:
        raise ProtocolError(
            "bad_request",
            f"message nests arrays or objects more than {MAX_DEPTH} levels deep; requests need 3 at most",
            {"limit": MAX_DEPTH},
        )
    try:
        msg = json.loads(line, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, a number out of range, nesting (belt and braces)
        raise ProtocolError(
            "bad_request",
            f"message is not valid JSON ({str(e)[:200]}); send one JSON object per line",
            {"line": line[:200]},
        ) from None
    if not isinstance(msg, dict):
        raise ProtocolError(
            "bad_request",
            f'message is a JSON {type(msg).__name__}, expected an object {{"v": 1, "id": ..., "type": ...}}',
        )
    return msg


_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]')  # strings (skipped whole, even unterminated) and brackets


def _nesting(text: str) -> int:
    """The deepest nesting of arrays and objects in a JSON text, counted outside strings (stops past MAX_DEPTH)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:  # cannot nest deeper: skip the scan
        return 0
    depth = deepest = 0
    for m in _TOKENS.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    break
        elif c in "]}":
            depth -= 1
    return deepest


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range (larger than a double)")
    return value


def _check_envelope(msg: dict, types: tuple[str, ...], what: str, id_required: bool) -> dict:
    v = msg.get("v")
    if "v" not in msg or isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError("bad_request", f'{what} has no integer "v" (protocol version); add "v": {PROTOCOL_VERSION}')
    if v != PROTOCOL_VERSION:
        raise ProtocolError(
            "version_mismatch",
            f"{what} uses protocol version {v} but this side speaks version {PROTOCOL_VERSION}; "
            f"update the addon or app and sam3d so that both are the same release",
            {"expected": PROTOCOL_VERSION, "got": v},
        )
    mid = msg.get("id")
    if id_required and (not isinstance(mid, str) or not mid):
        raise ProtocolError("bad_request", f'{what} needs a non-empty string "id", got {mid!r}')
    if not id_required and mid is not None and not isinstance(mid, str):
        raise ProtocolError("bad_request", f'{what} has a non-string "id" {mid!r}')
    mtype = msg.get("type")
    if mtype not in types:
        raise ProtocolError(
            "bad_request",
            f"unknown {what} type {mtype!r}; expected one of {list(types)}",
            {"type": mtype if isinstance(mtype, str) else None},
        )
    return msg


def _safe_id(msg: dict) -> str | None:
    mid = msg.get("id")
    return mid if isinstance(mid, str) and mid else None


def decode_request(line: bytes | str) -> dict:
    """Parse and validate one request line (worker side). Raises ProtocolError.

    The error's `request_id` holds the request's id when it could be read, so the answer can carry it.
    """
    msg = _parse(line)
    try:
        _check_envelope(msg, REQUEST_TYPES, "request", id_required=True)
        _REQUEST_CHECKS.get(msg["type"], lambda m: None)(msg)
    except ProtocolError as e:
        e.request_id = _safe_id(msg)
        raise
    return msg


def decode_response(line: bytes | str) -> dict:
    """Parse and validate one response/event line (client side). Raises ProtocolError."""
    msg = _parse(line)
    _check_envelope(msg, RESPONSE_TYPES, "response", id_required=False)
    _RESPONSE_CHECKS.get(msg["type"], lambda m: None)(msg)
    return msg


# ----------------------------------------------------------------------------------------------
# Per-type field checks


def _field(msg: dict, name: str, kinds: tuple[type, ...], required: bool, what: str):
    if name not in msg or msg[name] is None:
        if required:
            raise ProtocolError("bad_request", f'{msg["type"]} request needs "{name}" ({what})', {"field": name})
        return None
    value = msg[name]
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        raise ProtocolError(
            "bad_request", f'{msg["type"]} request: "{name}" is {value!r}, expected {what}', {"field": name}
        )
    return value


def _check_reconstruct(msg: dict) -> None:
    _path(msg, "photo", "a file path string")
    _path(msg, "mask", "a file path string")
    _path(msg, "out", "a folder path string")
    seed = _field(msg, "seed", (int,), False, "an integer or null")
    if seed is not None and not -MAX_SEED < seed < MAX_SEED:
        raise ProtocolError(
            "bad_request", f'reconstruct request: "seed" must lie within +-2**63, got {seed}', {"field": "seed"}
        )
    _field(msg, "overwrite", (bool,), False, "true (replace our own earlier results) or false")
    steps = _field(msg, "steps", (int,), False, "an integer >= 1 or null (the model's default)")
    if steps is not None and not 1 <= steps <= 1000:
        raise ProtocolError(
            "bad_request", f'reconstruct request: "steps" is {steps}, expected 1..1000 or null', {"field": "steps"}
        )
    _field(msg, "fast", (bool,), False, "true or false")
    _field(msg, "stage2", (bool,), False, "true or false (false: stage 1 only, its shape textured from the photo)")
    _field(msg, "voxels", (bool,), False, "true or false (true: without stage 2, the voxels instead of a mesh)")
    _field(msg, "refine_layout", (bool,), False, "true, false or null (null: on when the point map comes from depth)")
    _field(msg, "name", (str,), False, "an object name string")
    vram = _field(msg, "vram", (str,), False, '"auto", "low", "medium" or "high"')
    if vram is not None and vram not in VRAM_PRESETS:
        raise ProtocolError(
            "bad_request", f'reconstruct request: "vram" is {vram!r}, expected one of {VRAM_PRESETS}', {"field": "vram"}
        )
    _bounded(msg, "texture_size", 64, 8192, "texture size in pixels")
    _bounded(msg, "faces", 100, 2_000_000, "target face count")


def _bounded(msg: dict, name: str, lo: int, hi: int, what: str) -> None:
    value = _field(msg, name, (int,), False, f"an integer {lo}..{hi} or null ({what})")
    if value is not None and not lo <= value <= hi:
        raise ProtocolError(
            "bad_request", f'{msg["type"]} request: "{name}" is {value}, expected {lo}..{hi} ({what})', {"field": name}
        )


def _path(msg: dict, name: str, what: str, required: bool = True) -> None:
    value = _field(msg, name, (str,), required, what)
    if value is None and not required:
        return
    if not value:
        raise ProtocolError("bad_request", f'{msg["type"]} request: "{name}" is empty; give a path', {"field": name})
    if "\0" in value:
        raise ProtocolError(
            "bad_request", f'{msg["type"]} request: "{name}" holds a NUL byte; send a plain file path', {"field": name}
        )


def _check_open_photo(msg: dict) -> None:
    _path(msg, "photo", "an image file path string")
    _field(msg, "fov", (int, float), False, "a horizontal field of view in degrees, or null")


def _check_segment(msg: dict) -> None:
    _path(msg, "photo", "an image file path string")
    _path(msg, "out", "the mask PNG path to write")
    points = _field(msg, "points", (list,), False, "a list of [x, y, label] (label 1 include, 0 exclude)") or []
    for p in points:
        if (
            not isinstance(p, list)
            or len(p) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
            or p[2] not in (0, 1)
        ):
            raise ProtocolError(
                "bad_request",
                f"segment request: point {p!r} is not [x, y, label] with label 1 "
                "(include) or 0 (exclude), in photo pixels",
                {"field": "points"},
            )
    box = _field(msg, "box", (list,), False, "[x0, y0, x1, y1] in photo pixels, or null")
    if box is not None and (
        len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
    ):
        raise ProtocolError("bad_request", f"segment request: box {box!r} is not [x0, y0, x1, y1]", {"field": "box"})
    if not points and box is None:
        raise ProtocolError("bad_request", "segment request needs at least one point or a box", {"field": "points"})
    if box is None and all(p[2] == 0 for p in points):
        raise ProtocolError(
            "bad_request",
            "segment request: every point excludes (label 0), so nothing says where the object is; add a point "
            "on the object (label 1) or a box",
            {"field": "points"},
        )
    _path(msg, "previous", "the path of a previous mask to refine, or null", required=False)
    _field(msg, "overwrite", (bool,), False, "true (replace a mask sam3d wrote there) or false")


def _check_segment_all(msg: dict) -> None:
    _path(msg, "photo", "an image file path string")
    _path(msg, "out_dir", "a folder path string for the mask PNGs")
    _bounded(msg, "max_objects", 1, 100, "the most objects to return")
    _field(msg, "overwrite", (bool,), False, "true (replace masks sam3d wrote there) or false")


def _check_segment_concept(msg: dict) -> None:
    _path(msg, "photo", "an image file path string")
    _path(msg, "out_dir", "a folder path string for the mask PNGs")
    text = _field(msg, "text", (str,), False, 'a short noun phrase such as "chair", or null')
    if text is not None and len(text) > 200:
        raise ProtocolError(
            "bad_request", f"segment_concept request: text of {len(text)} characters; send a short noun phrase",
            {"field": "text"},
        )  # fmt: skip
    boxes = _field(msg, "boxes", (list,), False, "a list of exemplar boxes [x0, y0, x1, y1, label]") or []
    for b in boxes:
        if (
            not isinstance(b, list)
            or len(b) not in (4, 5)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)
            or (len(b) == 5 and b[4] not in (0, 1))
        ):
            raise ProtocolError(
                "bad_request",
                f"segment_concept request: exemplar box {b!r} is not [x0, y0, x1, y1] or [x0, y0, x1, y1, label] "
                "with label 1 (an example of the concept) or 0 (not one), in photo pixels",
                {"field": "boxes"},
            )
    if not (text or "").strip() and not boxes:
        raise ProtocolError(
            "bad_request",
            'segment_concept request needs a "text" (a noun phrase) and/or exemplar "boxes"',
            {"field": "text"},
        )
    score = _field(msg, "min_score", (int, float), False, "a score 0 <= s < 1, or null (0.5)")
    if score is not None and not 0 <= score < 1:
        raise ProtocolError(
            "bad_request", f"segment_concept request: min_score {score} is not in [0, 1)", {"field": "min_score"}
        )
    _bounded(msg, "max_objects", 1, 100, "the most instances to return")
    _field(msg, "overwrite", (bool,), False, "true (replace masks sam3d wrote there) or false")


def _check_cancel(msg: dict) -> None:
    _field(msg, "target", (str,), True, "the id of the job to cancel")


def _check_progress(msg: dict) -> None:
    if not isinstance(msg.get("stage"), str) or not msg["stage"]:  # unknown names are fine (see STAGES)
        raise ProtocolError("bad_request", f"progress event needs a stage name, got {msg.get('stage')!r}")
    for k in ("step", "total"):
        if isinstance(msg.get(k), bool) or not isinstance(msg.get(k), int):
            raise ProtocolError("bad_request", f"progress event needs an integer {k!r}")


def _check_error(msg: dict) -> None:
    if msg.get("code") not in ERROR_CODES or not isinstance(msg.get("message"), str):
        raise ProtocolError("bad_request", f"error message needs a known 'code' and a 'message': {msg!r}")
    if not isinstance(msg.get("details", {}), dict):
        raise ProtocolError("bad_request", "error message 'details' must be an object")


_REQUEST_CHECKS = {
    "reconstruct": _check_reconstruct,
    "cancel": _check_cancel,
    "open_photo": _check_open_photo,
    "segment": _check_segment,
    "segment_all": _check_segment_all,
    "segment_concept": _check_segment_concept,
}
_RESPONSE_CHECKS = {"progress": _check_progress, "error": _check_error}


# ----------------------------------------------------------------------------------------------
# Message constructors


def request(type: str, id: str | None = None, **fields) -> dict:
    """A request dict: request("reconstruct", photo=..., mask=..., out=...). Validated like the worker does."""
    msg = {"v": PROTOCOL_VERSION, "id": id or new_id(), "type": type, **fields}
    _check_envelope(msg, REQUEST_TYPES, "request", id_required=True)
    _REQUEST_CHECKS.get(type, lambda m: None)(msg)
    return msg


def response(type: str, id: str | None, **fields) -> dict:
    if type not in RESPONSE_TYPES:
        raise ValueError(f"unknown response type {type!r}; expected one of {RESPONSE_TYPES}")
    return {"v": PROTOCOL_VERSION, "id": id, "type": type, **fields}


def progress(id: str, stage: str, step: int, total: int) -> dict:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    return response("progress", id, stage=stage, step=int(step), total=int(total))


def error(id: str | None, code: str, message: str, details: dict | None = None) -> dict:
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}; expected one of {ERROR_CODES}")
    return response("error", id, code=code, message=message, details=_jsonable(details or {}))


def _jsonable(obj):
    """Make details JSON-safe (non-finite floats -> None, unknown objects -> str)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)
