"""segment-anything (SAM 1) back-end: its own model registry, SamPredictor and SamAutomaticMaskGenerator.

The model is built with checkpoint=None and our verified safetensors are loaded with strict keys:
segment-anything's own loader calls torch.load without weights_only (a full unpickle on old torch).
segment-anything needs torchvision (resize in its transforms, batched_nms in its mask generator).
"""

from __future__ import annotations

import numpy as np

from sam3d_core.segment.base import MaskCandidate, PredictorSegmenter

INSTALL_HINT = "pip install segment-anything torchvision (torchvision matching your torch build)"
LOGIT = 8.0  # magnitude given to a plain bool mask turned into mask_input logits (sigmoid(8) ~ 0.9997)


def mask_to_logits(mask: np.ndarray, long_side: int = 1024, size: int = 256) -> np.ndarray:
    """[H, W] bool at the photo's size -> [1, size, size] float32 logits in SamPredictor's frame: the photo
    resized to `long_side` on its long side, padded at the bottom/right to a square, then / 4."""
    import cv2

    h, w = mask.shape
    s = long_side / max(h, w)
    nh, nw = int(h * s + 0.5), int(w * s + 0.5)  # segment-anything's ResizeLongestSide rounding
    k = size / long_side
    small = cv2.resize(
        mask.astype(np.float32), (max(1, round(nw * k)), max(1, round(nh * k))), interpolation=cv2.INTER_AREA
    )
    out = np.zeros((size, size), np.float32)
    out[: small.shape[0], : small.shape[1]] = small
    return ((out - 0.5) * 2 * LOGIT)[None]


def import_error() -> str | None:
    """Why segment-anything cannot be used here, or None when it imports."""
    try:
        import segment_anything  # noqa: F401
    except Exception as e:  # a torchvision built for another torch raises RuntimeError, not ImportError
        return f"{type(e).__name__}: {e}"
    return None


def _segment_anything():
    try:
        import segment_anything
    except Exception as e:
        raise ImportError(f"the SAM back-end needs segment-anything ({type(e).__name__}: {e}); {INSTALL_HINT}") from e
    return segment_anything


def filter_objects(
    masks: list[np.ndarray],
    scores: list[float],
    max_fraction: float = 0.6,
    min_fraction: float = 0.001,
    contained: float = 0.8,
) -> list[int]:
    """Indices of whole objects among automatic masks, largest first.

    Drops background/stuff (area > max_fraction of the image), crumbs (< min_fraction), and parts:
    masks whose area lies at least `contained` inside a larger mask already kept.
    """
    if not masks:
        return []
    total = masks[0].size
    areas = [int(m.sum()) for m in masks]
    order = sorted(range(len(masks)), key=lambda i: (-areas[i], -scores[i]))
    kept: list[int] = []
    for i in order:
        if not (min_fraction * total <= areas[i] <= max_fraction * total):
            continue
        if any(np.logical_and(masks[i], masks[j]).sum() >= contained * areas[i] for j in kept):
            continue
        kept.append(i)
    return kept


class SamSegmenter(PredictorSegmenter):
    """SamPredictor around a built `segment_anything.modeling.Sam`."""

    def __init__(self, sam, name: str = "sam", device: str | None = None, amg: dict | None = None):
        sa = _segment_anything()
        self.model = sam.to(device or "cpu").eval()
        self.predictor = sa.SamPredictor(self.model)
        self.name = name
        self.amg = {"points_per_side": 32, "pred_iou_thresh": 0.88, "stability_score_thresh": 0.95} | (amg or {})
        self.image: np.ndarray | None = None

    @classmethod
    def from_state_dict(cls, model_type: str, state: dict, name: str | None = None, device: str | None = None):
        """Build through segment-anything's registry (vit_h / vit_l / vit_b) and load strictly."""
        sa = _segment_anything()
        if model_type not in ("vit_h", "vit_l", "vit_b"):
            raise ValueError(
                f"model_type {model_type!r}: expected vit_h, vit_l or vit_b "
                "(a custom-size checkpoint needs its Sam built in code)"
            )
        sam = sa.sam_model_registry[model_type](checkpoint=None)
        sam.load_state_dict(state, strict=True)
        return cls(sam, name or f"sam {model_type}", device)

    @classmethod
    def from_imported(cls, name: str, device: str | None = None, root=None):
        from sam3d_core.segment.weights import load_sam_state

        model_type, state, _ = load_sam_state(name, root)
        return cls.from_state_dict(model_type, state, f"sam {model_type}", device)

    def _encode(self, image: np.ndarray) -> None:
        self.predictor.set_image(image, image_format="RGB")

    def _pixels_to_logits(self, mask: np.ndarray) -> np.ndarray:
        return mask_to_logits(mask, self.model.image_encoder.img_size, self.model.prompt_encoder.mask_input_size[0])

    def image_state(self) -> tuple:
        """What set_image computed, to keep for a later `restore_image_state` (the session's cache)."""
        p = self.predictor
        return self.image, p.features, p.original_size, p.input_size

    def restore_image_state(self, state: tuple) -> None:
        p = self.predictor
        self.image, p.features, p.original_size, p.input_size = state
        p.is_image_set = True

    def segment_all(self) -> list[MaskCandidate]:
        """SamAutomaticMaskGenerator (it encodes the image again), then `filter_objects`."""
        import torch

        if self.image is None:
            raise RuntimeError("call set_image(image) before segment_all()")
        gen = _segment_anything().SamAutomaticMaskGenerator(self.model, **self.amg)
        with torch.inference_mode():
            records = gen.generate(self.image)
        masks = [r["segmentation"].astype(bool) for r in records]
        scores = [float(r["predicted_iou"]) for r in records]
        return [MaskCandidate(masks[i], scores[i], self.name, "predicted IoU") for i in filter_objects(masks, scores)]
