"""One segmenter interface: prompts in original-image pixels in, candidate masks with scores out.

Coordinates are always pixels of the image given to `set_image`: x right, y down, (0, 0) the top-left
corner of the top-left pixel. Back-ends translate to their own frames (SAM's 1024-long-side frame, a
downscaled GrabCut frame) internally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

BASIC_LABEL = "basic (no weights)"


@dataclass(frozen=True, eq=False)  # eq=False: mask_input is an array
class Prompt:
    """What the user clicked, in original-image pixels.

    points: (x, y, label) with label 1 = include (+), 0 = exclude (-).
    box: (x0, y0, x1, y1), x0 < x1 and y0 < y1, or None.
    mask_input: a previous answer to refine: a MaskCandidate's `native` (SAM: [1, 256, 256] logits)
        or a [H, W] bool mask at the original size (back-ends without logits use it as a seed).
    """

    points: tuple[tuple[float, float, int], ...] = ()
    box: tuple[float, float, float, float] | None = None
    mask_input: np.ndarray | None = None

    def validate(self, height: int, width: int) -> None:
        """Raise ValueError naming the bad value and the fix."""
        if not self.points and self.box is None:
            raise ValueError("the prompt is empty: give at least one point (--point X,Y) or a box (--box X0,Y0,X1,Y1)")
        for x, y, label in self.points:
            if not (0 <= x < width and 0 <= y < height):
                raise ValueError(
                    f"point ({x:g}, {y:g}) lies outside the {width}x{height} image; "
                    f"use pixel coordinates with 0 <= x < {width} and 0 <= y < {height}"
                )
            if label not in (0, 1):
                raise ValueError(f"point label {label!r} at ({x:g}, {y:g}): expected 1 (+, include) or 0 (-, exclude)")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if not (x0 < x1 and y0 < y1):
                raise ValueError(f"box {self.box}: expected x0 < x1 and y0 < y1 (top-left corner first)")
            if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
                raise ValueError(f"box {self.box} does not overlap the {width}x{height} image")

    def as_arrays(self) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """(coords [N, 2] float32, labels [N] int64, box [4] float32), None where absent: SAM predictors' form."""
        if self.points:
            coords = np.array([[x, y] for x, y, _ in self.points], np.float32)
            labels = np.array([lab for *_, lab in self.points], np.int64)
        else:
            coords = labels = None
        box = np.array(self.box, np.float32) if self.box is not None else None
        return coords, labels, box

    @property
    def positives(self) -> list[tuple[float, float]]:
        return [(x, y) for x, y, lab in self.points if lab == 1]

    @property
    def negatives(self) -> list[tuple[float, float]]:
        return [(x, y) for x, y, lab in self.points if lab == 0]


@dataclass(eq=False)
class MaskCandidate:
    """One answer. mask: [H, W] bool at the original size. score: the back-end's own confidence
    (`score_kind` says which; never compare scores of different kinds)."""

    mask: np.ndarray
    score: float
    backend: str
    score_kind: str = ""
    native: np.ndarray | None = field(default=None, repr=False)  # back-end state to refine with
    detected_box: tuple[float, float, float, float] | None = None  # a detector's own box (SAM 3), photo pixels

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def box(self) -> tuple[int, int, int, int] | None:
        """(x0, y0, x1, y1) of the mask, x1/y1 exclusive; None for an empty mask."""
        ys, xs = np.nonzero(self.mask)
        if len(xs) == 0:
            return None
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@runtime_checkable
class Segmenter(Protocol):
    name: str  # shown in every UI, e.g. "sam vit_b" or "basic (no weights)"
    is_basic: bool  # True for back-ends with no learned model
    reason: str  # set by load_segmenter: which back-end answers and why

    def set_image(self, image: np.ndarray) -> None:
        """image: [H, W, 3] uint8 RGB. Does the expensive encoding once per photo."""

    def predict(self, prompt: Prompt, multimask: bool = True) -> list[MaskCandidate]:
        """Candidates for one object, best first."""

    def segment_all(self) -> list[MaskCandidate]:
        """Every object the back-end can find, largest first (parts and background filtered)."""


class PredictorSegmenter:
    """`set_image` / `predict` shared by the SAM and SAM 2 back-ends, whose predictors take the same prompt
    arrays and return (masks, scores, low-res logits). A subclass sets `self.predictor`, `self.model`,
    `self.name`, `self.image = None` and implements `_encode(image)` and `_pixels_to_logits(mask)`."""

    is_basic = False
    reason = ""  # set by load_segmenter: which back-end and why
    image: np.ndarray | None = None

    def _encode(self, image: np.ndarray) -> None:
        raise NotImplementedError

    def _pixels_to_logits(self, mask: np.ndarray) -> np.ndarray:
        """[H, W] bool at the photo's size -> [1, 256, 256] float32 logits in the predictor's frame."""
        raise NotImplementedError

    def set_image(self, image: np.ndarray) -> None:
        import torch

        self.image = check_image(image)
        with torch.inference_mode():
            self._encode(self.image)  # the image encoder runs once here

    def predict(self, prompt: Prompt, multimask: bool = True) -> list[MaskCandidate]:
        """Candidates best first; score = the model's predicted IoU; native = [1, 256, 256] logits."""
        import torch

        if self.image is None:
            raise RuntimeError("call set_image(image) before predict()")
        prompt.validate(*self.image.shape[:2])
        coords, labels, box = prompt.as_arrays()
        mi = prompt.mask_input
        if mi is not None and mi.shape == self.image.shape[:2]:
            mi = self._pixels_to_logits(mi)  # a previous mask given as pixels
        mask_input = mi.astype(np.float32) if mi is not None and mi.ndim == 3 and mi.shape[0] == 1 else None
        with torch.inference_mode():
            masks, scores, logits = self.predictor.predict(
                point_coords=coords, point_labels=labels, box=box, mask_input=mask_input, multimask_output=multimask
            )
        order = np.argsort(-scores)
        return [
            MaskCandidate(masks[i] > 0, float(scores[i]), self.name, "predicted IoU", logits[i : i + 1]) for i in order
        ]


def check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}"
        raise ValueError(
            f"image: expected an [H, W, 3] uint8 RGB array, got {got}; convert with "
            "np.asarray(PIL.Image.open(path).convert('RGB'))"
        )
    if min(image.shape[:2]) < 8:
        raise ValueError(f"image of {image.shape[1]}x{image.shape[0]} pixels is too small (at least 8x8)")
    return np.ascontiguousarray(image)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
