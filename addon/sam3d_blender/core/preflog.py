"""The preference log: every pick and rejection of a candidate, one JSON object per line. Stdlib only.

Appended by the add-on ("best of N", re-rolls); read by the training entry point (preference tuning,
e.g. DPO on chosen/rejected pairs). One record per decision, schema version 1:

    {"version": 1, "time": "2025-11-22T06:30:00Z", "kind": "best_of_n" | "reroll",
     "photo": "/abs/photo.png", "mask": "/abs/mask.png", "weights": "sha256:...", "model": "...",
     "chosen": {"seed": 7, "settings": {...}, "mesh": "/abs/object.glb"} | null,
     "rejected": [{"seed": 3, "settings": {...}, "mesh": "..."}, ...]}

`chosen` is null when the artist rejected every candidate. The file only grows; a torn last line (a
crash mid-write) is skipped by `read_log`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

LOG_VERSION = 1
KINDS = ("best_of_n", "reroll")


def candidate(seed: int | None, settings: dict, mesh: str | None) -> dict:
    return {"seed": seed, "settings": dict(settings), "mesh": mesh}


def make_record(
    kind: str,
    photo: str,
    mask: str | None,
    chosen: dict | None,
    rejected: Sequence[dict],
    weights: str = "",
    model: str = "",
) -> dict:
    if kind not in KINDS:
        raise ValueError(f"preference record kind {kind!r}: expected one of {KINDS}")
    if chosen is None and not rejected:
        raise ValueError("a preference record needs a chosen candidate or at least one rejected one")
    return {
        "version": LOG_VERSION,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kind": kind,
        "photo": photo,
        "mask": mask,
        "weights": weights,
        "model": model,
        "chosen": chosen,
        "rejected": list(rejected),
    }


def append(path: str, record: dict) -> None:
    """Append one record as one line (a single write call, so concurrent appenders do not interleave)."""
    path = os.path.expanduser(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def read_log(path: str) -> list[dict]:
    """Every well-formed record of a log (lines that do not parse, e.g. a torn last line, are skipped)."""
    out = []
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("version") == LOG_VERSION:
                out.append(rec)
    return out


def pairs(records: Sequence[dict]) -> list[tuple[dict, dict, dict]]:
    """(record, chosen, rejected) for every chosen/rejected pair: the form preference training wants."""
    return [(r, r["chosen"], rej) for r in records if r.get("chosen") for rej in r.get("rejected", [])]
