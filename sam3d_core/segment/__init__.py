"""Object selection: one Segmenter interface over SAM (segment-anything) and a no-weights GrabCut back-end.

    seg = load_segmenter("auto")            # SAM when installed and weights are imported, else basic
    print(seg.name, seg.reason)             # always say which back-end answers, and why
    seg.set_image(rgb)                      # [H, W, 3] uint8, encoded once
    best = seg.predict(Prompt(points=((320, 200, 1),)))[0].mask   # [H, W] bool, original pixels
"""

from __future__ import annotations

from dataclasses import dataclass

from sam3d_core.segment.base import BASIC_LABEL, MaskCandidate, Prompt, Segmenter, mask_iou

__all__ = ["BASIC_LABEL", "BackendStatus", "MaskCandidate", "Prompt", "Segmenter", "available_backends",
           "load_segmenter", "mask_iou"]

BACKENDS = ("sam2", "sam", "basic")  # preference order for "auto"


@dataclass(frozen=True)
class BackendStatus:
    name: str
    usable: bool
    detail: str  # what is installed and imported, or what is missing and how to fix it


def _sam2_status() -> BackendStatus:
    import importlib.util

    if importlib.util.find_spec("sam2") is None:
        return BackendStatus("sam2", False, "not installed (optional; SAM 2.1 is more accurate than SAM)")
    return BackendStatus("sam2", False, "the sam2 package is installed, but this version has no SAM 2 adapter yet; "
                                        "use --backend sam or basic")


def _sam_status() -> BackendStatus:
    from sam3d_core.segment import sam1, weights

    err = sam1.import_error()
    if err:
        return BackendStatus("sam", False, f"segment-anything unusable ({err}); {sam1.INSTALL_HINT}")
    imported = [m["name"] for m in weights.list_sam()]
    if not imported:
        return BackendStatus("sam", False, f"segment-anything imports, but no SAM weights are imported; "
                                           f"{weights.WHERE_TO_GET}")
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
    """A ready segmenter. name: auto | sam | basic. checkpoint: an imported SAM name (default: the
    largest imported). The result's `reason` says which back-end was chosen and why."""
    from sam3d_core.segment import weights

    if name not in ("auto", "sam", "basic", "sam2"):
        raise ValueError(f"backend {name!r}: expected auto, sam or basic")
    status = {s.name: s for s in available_backends()}
    if name in ("sam2", "sam") and not status[name].usable:
        raise ValueError(f"backend {name!r} is not usable: {status[name].detail}")
    if name == "auto":
        name = "sam" if status["sam"].usable else "basic"
    if name == "sam":
        from sam3d_core.segment.sam1 import SamSegmenter

        if checkpoint is None:  # the largest imported model: vit_h > vit_l > vit_b
            checkpoint = max(weights.list_sam(), key=lambda m: m["bytes"])["name"]
        seg = SamSegmenter.from_imported(checkpoint, device)
        seg.reason = f"{seg.name} (imported weights {checkpoint!r})"
        return seg
    if not status["basic"].usable:
        raise ImportError(status["basic"].detail)
    from sam3d_core.segment.basic import BasicSegmenter

    seg = BasicSegmenter()
    why = "; ".join(f"{s.name}: {s.detail}" for s in status.values() if s.name != "basic" and not s.usable)
    seg.reason = f"{BASIC_LABEL}" + (f" because {why}" if why else "")
    return seg
