"""Which segmentation back-ends can run here, and loading the best one (`load_segmenter`)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from sam3d_core.segment import sam1, sam2, weights
from sam3d_core.segment.base import BASIC_LABEL, Segmenter

BACKENDS = ("sam2", "sam", "basic")  # preference order for "auto"


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


def available_backends() -> list[BackendStatus]:
    """Every back-end, best first, with whether it can be used now and why (not)."""
    return [_sam2_status(), _sam_status(), _basic_status()]


def load_segmenter(name: str = "auto", checkpoint: str | None = None, device: str | None = None) -> Segmenter:
    """A ready segmenter. name: auto | sam2 | sam | basic (auto: SAM 2 > SAM > basic, the first usable).
    checkpoint: an imported checkpoint name of that kind (default: the largest imported). The result's
    `reason` says which back-end was chosen and why."""
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
    why = "; ".join(f"{s.name}: {s.detail}" for s in status.values() if s.name != "basic" and not s.usable)
    seg.reason = f"{BASIC_LABEL}" + (f" because {why}" if why else "")
    return seg
