"""SAM 2 back-end (facebookresearch/sam2): build_sam2, SAM2ImagePredictor and SAM2AutomaticMaskGenerator.

The model is built from the package's own Hydra config with ckpt_path=None, then our verified
safetensors are loaded with strict keys: sam2's `_load_checkpoint` reads the .pt with torch.load (with
weights_only only in recent versions), so it is never given a file. sam2 needs torchvision (its
transforms) and hydra-core; it runs on CPU, slowly.

Frames: SAM2ImagePredictor resizes the photo to a 1024 x 1024 square without keeping the aspect ratio;
its 256 x 256 mask logits live in that stretched frame (unlike SAM 1's padded frame).
"""

from __future__ import annotations

import numpy as np

from sam3d_core.segment.base import MaskCandidate, PredictorSegmenter

INSTALL_HINT = "pip install sam2 torchvision (or the facebookresearch/sam2 repository; torchvision matching your torch)"
CONFIG_SHORT = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
LOGIT = 8.0  # magnitude given to a plain bool mask turned into mask_input logits (sigmoid(8) ~ 0.9997)


def import_error() -> str | None:
    """Why sam2 cannot be used here, or None when it imports."""
    try:
        import sam2.build_sam  # noqa: F401
        import sam2.sam2_image_predictor  # noqa: F401
    except Exception as e:  # a torchvision built for another torch raises RuntimeError, not ImportError
        return f"{type(e).__name__}: {e}"
    return None


def config_name(size: str, version: str = "2.1") -> str:
    """The sam2 package's Hydra config for a model size, e.g. configs/sam2.1/sam2.1_hiera_t.yaml."""
    if size not in CONFIG_SHORT:
        raise ValueError(
            f"SAM 2 size {size!r}: expected one of {', '.join(CONFIG_SHORT)} "
            "(a custom-size checkpoint needs its SAM2Base built in code: Sam2Segmenter(model))"
        )
    short = CONFIG_SHORT[size]
    return f"configs/sam2.1/sam2.1_hiera_{short}.yaml" if version == "2.1" else f"configs/sam2/sam2_hiera_{short}.yaml"


def mask_to_logits(mask: np.ndarray, size: int = 256) -> np.ndarray:
    """[H, W] bool at the photo's size -> [1, size, size] float32 logits in the stretched square frame."""
    import cv2

    small = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return ((small - 0.5) * 2 * LOGIT)[None].astype(np.float32)


def _sam2():
    err = import_error()
    if err:
        raise ImportError(f"the SAM 2 back-end needs the sam2 package ({err}); {INSTALL_HINT}")
    import sam2.automatic_mask_generator
    import sam2.build_sam
    import sam2.sam2_image_predictor

    return sam2


class Sam2Segmenter(PredictorSegmenter):
    """SAM2ImagePredictor around a built `sam2.modeling.sam2_base.SAM2Base`."""

    def __init__(self, model, name: str = "sam2", device: str | None = None, amg: dict | None = None):
        s2 = _sam2()
        self.model = model.to(device or "cpu").eval()
        self.predictor = s2.sam2_image_predictor.SAM2ImagePredictor(self.model)
        self.name = name
        self.amg = {"points_per_side": 32, "pred_iou_thresh": 0.8, "stability_score_thresh": 0.95} | (amg or {})
        self.image: np.ndarray | None = None

    @classmethod
    def from_state_dict(
        cls, size: str, version: str, state: dict, name: str | None = None, device: str | None = None
    ) -> Sam2Segmenter:
        """Build from the package's config (tiny / small / base_plus / large) and load strictly."""
        s2 = _sam2()
        model = s2.build_sam.build_sam2(config_name(size, version), ckpt_path=None, device="cpu")
        model.load_state_dict(state, strict=True)
        return cls(model, name or f"sam{version} {size}", device)

    @classmethod
    def from_imported(cls, name: str, device: str | None = None, root=None) -> Sam2Segmenter:
        from sam3d_core.segment.weights import load_sam2_state

        size, version, state, _ = load_sam2_state(name, root)
        return cls.from_state_dict(size, version, state, f"sam{version} {size}", device)

    def _encode(self, image: np.ndarray) -> None:
        self.predictor.set_image(image)  # HWC uint8 RGB

    def _pixels_to_logits(self, mask: np.ndarray) -> np.ndarray:
        return mask_to_logits(mask, self.model.sam_prompt_encoder.mask_input_size[0])

    def image_state(self) -> tuple:
        """What set_image computed, to keep for a later `restore_image_state` (the session's cache)."""
        p = self.predictor
        return self.image, p._features, p._orig_hw, p._is_batch

    def restore_image_state(self, state: tuple) -> None:
        p = self.predictor
        self.image, p._features, p._orig_hw, p._is_batch = state
        p._is_image_set = True

    def segment_all(self) -> list[MaskCandidate]:
        """SAM2AutomaticMaskGenerator (it encodes the image again), then `filter_objects`."""
        import torch

        from sam3d_core.segment.sam1 import filter_objects

        if self.image is None:
            raise RuntimeError("call set_image(image) before segment_all()")
        gen = _sam2().automatic_mask_generator.SAM2AutomaticMaskGenerator(self.model, **self.amg)
        with torch.inference_mode():
            records = gen.generate(self.image)
        masks = [np.asarray(r["segmentation"]).astype(bool) for r in records]
        scores = [float(r["predicted_iou"]) for r in records]
        return [MaskCandidate(masks[i], scores[i], self.name, "predicted IoU") for i in filter_objects(masks, scores)]
