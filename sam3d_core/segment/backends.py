"""Which segmentation back-ends can run here, and loading the best one (`load_segmenter`)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from sam3d_core.segment import sam1, sam2, weights
from sam3d_core.segment import sam3 as sam3_backend
from sam3d_core.segment.base import BASIC_LABEL, Segmenter
from sam3d_core.weights.store import CheckpointError

BACKENDS = ("sam2", "sam", "basic")  # preference order for "auto" (clicks and boxes)
CONCEPT_BACKENDS = ("sam3",)  # concept prompts: a noun phrase and/or exemplar boxes -> every instance


@dataclass(frozen=True)
class BackendStatus:
    name: str
    usable: bool
    detail: str  # what is installed and imported, or what is missing and how to fix it


def _sam2_status() -> BackendStatus:
    if importlib.util.find_spec("sam2") is None:
        return BackendStatus(
            "sam2", False, "not installed (optional; SAM 2.1 is more accurate than SAM); " + sam2.INSTALL_HINT
        )
    err = sam2.import_error()
    if err:
        return BackendStatus("sam2", False, f"sam2 unusable ({err}); {sam2.INSTALL_HINT}")
    imported = [m["name"] for m in weights.list_sam(kind="sam2")]
    if not imported:
        return BackendStatus(
            "sam2", False, f"sam2 imports, but no SAM 2 weights are imported; {weights.SAM2_WHERE_TO_GET}"
        )
    return BackendStatus("sam2", True, "imported: " + ", ".join(imported))


def _sam_status() -> BackendStatus:
    err = sam1.import_error()
    if err:
        return BackendStatus("sam", False, f"segment-anything unusable ({err}); {sam1.INSTALL_HINT}")
    imported = [m["name"] for m in weights.list_sam(kind="sam")]
    if not imported:
        return BackendStatus(
            "sam", False, f"segment-anything imports, but no SAM weights are imported; {weights.WHERE_TO_GET}"
        )
    return BackendStatus("sam", True, "imported: " + ", ".join(imported))


def _basic_status() -> BackendStatus:
    try:
        import cv2
    except ImportError:
        return BackendStatus("basic", False, "needs OpenCV: pip install opencv-python-headless")
    return BackendStatus("basic", True, f"GrabCut, OpenCV {cv2.__version__} (no weights)")


def _sam3_status() -> BackendStatus:
    imported = [m["name"] for m in weights.list_sam(kind="sam3")]
    err = sam3_backend.import_error()
    if err:
        have = f" (imported weights: {', '.join(imported)})" if imported else ""
        return BackendStatus("sam3", False, f"sam3 unusable ({err}){have}; {sam3_backend.INSTALL_HINT}")
    if not imported:
        why = f"sam3 imports, but no SAM 3 weights are imported; {sam3_backend.WHERE_TO_GET}"
        return BackendStatus("sam3", False, why)
    return BackendStatus("sam3", True, "imported: " + ", ".join(imported) + " (text and exemplar prompts)")


def available_backends() -> list[BackendStatus]:
    """Every back-end with whether it can be used now and why (not): the click back-ends best first, then SAM 3
    (concept prompts)."""
    return [_sam2_status(), _sam_status(), _basic_status(), _sam3_status()]


class ConceptUnavailable(CheckpointError):
    """A concept prompt (text or exemplar boxes) with no usable SAM 3: the message says what is missing and how to
    get it (a ValueError: the CLI prints it on one line, the worker answers missing_weights)."""


def check_concept_available(checkpoint: str | None = None) -> str:
    """The SAM 3 checkpoint that concept prompts would use, without loading it; ConceptUnavailable saying what is
    missing and how to get it otherwise (cheap: run it before any heavy work)."""
    imported = weights.list_sam(kind="sam3")
    if checkpoint is None and not imported:
        raise ConceptUnavailable(
            "text and exemplar prompts need SAM 3, and no SAM 3 weights are imported. "
            + sam3_backend.WHERE_TO_GET
            + (f"; the sam3 package is needed too: {sam3_backend.INSTALL_HINT}" if sam3_backend.import_error() else "")
        )
    err = sam3_backend.import_error()
    if err:
        raise ConceptUnavailable(
            f"text and exemplar prompts need Meta's sam3 package, which cannot be used here ({err}); "
            f"{sam3_backend.INSTALL_HINT}"
        )
    if checkpoint is None:
        checkpoint = max(imported, key=lambda m: m["bytes"])["name"]
    return checkpoint


def load_concept_segmenter(checkpoint: str | None = None, device: str | None = None):
    """A ready SAM 3 segmenter for concept prompts; ConceptUnavailable saying how to get SAM 3 when there is none.
    checkpoint: an imported SAM 3 checkpoint name (default: the largest imported)."""
    checkpoint = check_concept_available(checkpoint)
    if device is None:  # SAM 3 is large (840 M parameters): the GPU when there is one
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    seg = sam3_backend.Sam3Segmenter.from_imported(checkpoint, device)
    seg.reason = f"{seg.name} (imported weights {checkpoint!r}; concept prompts)"
    return seg


def load_segmenter(name: str = "auto", checkpoint: str | None = None, device: str | None = None) -> Segmenter:
    """A ready segmenter. name: auto | sam2 | sam | basic (auto: SAM 2 > SAM > basic, the first usable).
    checkpoint: an imported checkpoint name of that kind (default: the largest imported). The result's
    `reason` says which back-end was chosen and why."""
    if name in CONCEPT_BACKENDS:
        raise ValueError(
            f"backend {name!r} answers concept prompts (a noun phrase, exemplar boxes), not clicks: use "
            "load_concept_segmenter() (CLI: --text / --exemplar); clicks use auto, sam2, sam or basic"
        )
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"backend {name!r}: expected auto, sam2, sam or basic")
    status = {s.name: s for s in available_backends()}
    if name in ("sam2", "sam") and not status[name].usable:
        raise ValueError(f"backend {name!r} is not usable: {status[name].detail}")
    if name == "auto":
        name = next(b for b in BACKENDS if status[b].usable or b == "basic")
    if name in ("sam2", "sam"):
        if checkpoint is None:  # the largest imported model of that kind
            checkpoint = max(weights.list_sam(kind=name), key=lambda m: m["bytes"])["name"]
        if name == "sam2":
            from sam3d_core.segment.sam2 import Sam2Segmenter as cls
        else:
            from sam3d_core.segment.sam1 import SamSegmenter as cls
        seg = cls.from_imported(checkpoint, device)
        seg.reason = f"{seg.name} (imported weights {checkpoint!r})"
        return seg
    if not status["basic"].usable:
        raise ImportError(status["basic"].detail)
    from sam3d_core.segment.basic import BasicSegmenter

    seg = BasicSegmenter()
    why = "; ".join(f"{s.name}: {s.detail}" for s in status.values() if s.name in BACKENDS[:-1] and not s.usable)
    seg.reason = f"{BASIC_LABEL}" + (f" because {why}" if why else "")
    return seg
