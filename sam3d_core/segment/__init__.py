"""Object selection: one Segmenter interface over SAM 2, SAM (segment-anything) and a no-weights GrabCut back-end.

seg = load_segmenter("auto")            # SAM 2 / SAM when installed with imported weights, else basic
print(seg.name, seg.reason)             # always say which back-end answers, and why
seg.set_image(rgb)                      # [H, W, 3] uint8, encoded once
best = seg.predict(Prompt(points=((320, 200, 1),)))[0].mask   # [H, W] bool, original pixels
"""

from __future__ import annotations

from sam3d_core.segment.backends import BackendStatus, available_backends, load_segmenter
from sam3d_core.segment.base import BASIC_LABEL, MaskCandidate, Prompt, Segmenter, mask_iou
from sam3d_core.segment.session import SegmentSession

__all__ = [
    "BASIC_LABEL",
    "BackendStatus",
    "MaskCandidate",
    "Prompt",
    "SegmentSession",
    "Segmenter",
    "available_backends",
    "load_segmenter",
    "mask_iou",
]
