"""Object selection: one Segmenter interface over SAM 2, SAM (segment-anything) and a no-weights GrabCut back-end;
concept prompts (a noun phrase and/or exemplar boxes -> every instance) with SAM 3.

seg = load_segmenter("auto")            # SAM 2 / SAM when installed with imported weights, else basic
print(seg.name, seg.reason)             # always say which back-end answers, and why
seg.set_image(rgb)                      # [H, W, 3] uint8, encoded once
best = seg.predict(Prompt(points=((320, 200, 1),)))[0].mask   # [H, W] bool, original pixels
sam3 = load_concept_segmenter()         # ConceptUnavailable (says how to get SAM 3) without weights
sam3.set_image(rgb); chairs = sam3.segment_concept(ConceptPrompt(text="chair"), min_score=0.5)
"""

from __future__ import annotations

from sam3d_core.segment.backends import (
    BackendStatus,
    ConceptUnavailable,
    available_backends,
    load_concept_segmenter,
    load_segmenter,
)
from sam3d_core.segment.base import BASIC_LABEL, MaskCandidate, Prompt, Segmenter, mask_iou
from sam3d_core.segment.sam3 import ConceptPrompt
from sam3d_core.segment.session import SegmentSession

__all__ = [
    "BASIC_LABEL",
    "BackendStatus",
    "ConceptPrompt",
    "ConceptUnavailable",
    "MaskCandidate",
    "Prompt",
    "SegmentSession",
    "Segmenter",
    "available_backends",
    "load_concept_segmenter",
    "load_segmenter",
    "mask_iou",
]
