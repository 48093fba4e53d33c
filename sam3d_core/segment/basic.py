"""The no-weights back-end: OpenCV GrabCut seeded by clicks and/or a box. Labelled "basic (no weights)".

GrabCut fits two colour models (GMMs) and cuts the graph between them. It has no notion of "object":
it fails when object and background share colours, on thin parts (spokes, cables, hair), on
transparent or shiny objects and on busy textures, and it needs a box or several clicks where SAM
needs one. Its `segment_all` is a guess (see there). Use it when no SAM weights are present.
"""

from __future__ import annotations

import numpy as np

from sam3d_core.segment.base import BASIC_LABEL, MaskCandidate, Prompt, check_image

WORK_LONG_SIDE = 384  # GrabCut cost grows with pixels x iterations: ~1 s per box on a laptop core here
ITERATIONS = 10  # close to convergence; 5 leaves more background colours in the object model
ISLAND_FRACTION = 0.01  # drop blobs smaller than this fraction of the kept mask
HOLE_FRACTION = 0.0005  # fill enclosed holes smaller than this fraction of the image
ALL_LONG_SIDE = 256  # work size of segment_all


def import_cv2():
    try:
        import cv2
    except ImportError as e:
        raise ImportError("the basic segmenter needs OpenCV: pip install opencv-python-headless") from e
    return cv2


def clean_mask(fg: np.ndarray, keep_points: list[tuple[int, int]] = ()) -> np.ndarray:
    """fg: [H, W] bool -> the component(s) under `keep_points` (else the largest), small islands
    dropped and small enclosed holes filled."""
    cv2 = import_cv2()
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(fg)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = {int(labels[y, x]) for x, y in keep_points if labels[y, x] > 0}
    if not keep:
        keep = {1 + int(np.argmax(areas))}
    kept_area = sum(int(areas[i - 1]) for i in keep)
    keep |= {i + 1 for i, a in enumerate(areas) if a >= ISLAND_FRACTION * kept_area and not keep_points}
    out = np.isin(labels, list(keep))
    # holes: background components that do not touch the border
    n, labels, stats, _ = cv2.connectedComponentsWithStats((~out).astype(np.uint8), connectivity=4)
    h, w = out.shape
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])).tolist())
    small = [i for i in range(1, n) if i not in border and stats[i, cv2.CC_STAT_AREA] < HOLE_FRACTION * h * w]
    if small:
        out |= np.isin(labels, small)
    return out


class BasicSegmenter:
    """GrabCut on a copy downscaled to <= work_long_side px; masks come back at the original size."""

    name = BASIC_LABEL
    is_basic = True
    reason = ""  # set by load_segmenter: which back-end and why

    def __init__(self, seed: int = 0, work_long_side: int = WORK_LONG_SIDE):
        self.seed = seed
        self.work_long_side = work_long_side
        self.image: np.ndarray | None = None
        self.work: np.ndarray | None = None
        self.scale = 1.0

    def set_image(self, image: np.ndarray) -> None:
        cv2 = import_cv2()
        self.image = check_image(image)
        h, w = image.shape[:2]
        self.scale = min(1.0, self.work_long_side / max(h, w))
        size = (round(w * self.scale), round(h * self.scale))
        self.work = image if self.scale == 1.0 else cv2.resize(image, size, interpolation=cv2.INTER_AREA)

    def _seed_mask(self, prompt: Prompt) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """The GrabCut label image in the work frame, and the positive clicks there."""
        cv2 = import_cv2()
        h, w = self.work.shape[:2]
        s = self.scale
        pos = [(min(w - 1, int(x * s)), min(h - 1, int(y * s))) for x, y in prompt.positives]
        neg = [(min(w - 1, int(x * s)), min(h - 1, int(y * s))) for x, y in prompt.negatives]
        if prompt.box is not None:
            x0, y0, x1, y1 = (int(round(v * s)) for v in prompt.box)
            inside = cv2.GC_PR_FGD  # a box says "the object fills this"
        else:  # clicks only: work inside the clicks' bounding box grown by half the image diagonal / 4
            xs, ys = [p[0] for p in pos], [p[1] for p in pos]
            grow = max(np.hypot(h, w) / 8, 0.5 * (max(xs) - min(xs) + max(ys) - min(ys)))
            x0, y0, x1, y1 = int(min(xs) - grow), int(min(ys) - grow), int(max(xs) + grow), int(max(ys) + grow)
            inside = cv2.GC_PR_BGD
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        gc = np.full((h, w), cv2.GC_BGD, np.uint8)
        gc[y0:y1, x0:x1] = inside
        if prompt.mask_input is not None and prompt.mask_input.shape == self.image.shape[:2]:
            prev = cv2.resize(prompt.mask_input.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
            gc[prev] = cv2.GC_PR_FGD
        r = max(2, int(0.01 * np.hypot(h, w)))  # disc radius: 1 % of the diagonal
        for x, y in pos:
            if inside == cv2.GC_PR_BGD:
                cv2.circle(gc, (x, y), 4 * r, int(cv2.GC_PR_FGD), -1)
            cv2.circle(gc, (x, y), r, int(cv2.GC_FGD), -1)
        for x, y in neg:
            cv2.circle(gc, (x, y), r, int(cv2.GC_BGD), -1)
        return gc, pos

    def _grabcut(self, gc: np.ndarray, work: np.ndarray | None = None) -> np.ndarray:
        cv2 = import_cv2()
        work = self.work if work is None else work
        if not ((gc == cv2.GC_BGD) | (gc == cv2.GC_PR_BGD)).any() or not (gc % 2 == 1).any():
            return gc % 2 == 1  # GrabCut needs both sides; a box over the whole image has none outside
        cv2.setRNGSeed(self.seed)  # GMM init uses k-means: make runs reproducible
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.grabCut(work, gc, None, bgd, fgd, ITERATIONS, cv2.GC_INIT_WITH_MASK)
        return (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)

    def _to_original(self, m: np.ndarray) -> np.ndarray:
        cv2 = import_cv2()
        if self.scale == 1.0:
            return m
        h, w = self.image.shape[:2]
        return cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) >= 0.5

    def predict(self, prompt: Prompt, multimask: bool = True) -> list[MaskCandidate]:
        """One candidate (GrabCut has no alternatives to offer); score 1.0 of kind 'none'."""
        if self.work is None:
            raise RuntimeError("call set_image(image) before predict()")
        prompt.validate(*self.image.shape[:2])
        gc, pos = self._seed_mask(prompt)
        fg = clean_mask(self._grabcut(gc), pos)
        return [MaskCandidate(self._to_original(fg), 1.0, self.name, "none")]

    def segment_all(self, max_objects: int = 5, min_fraction: float = 0.02) -> list[MaskCandidate]:
        """A salient-object guess, not instance segmentation: GrabCut with the image minus a 5 % border
        as the box, then each connected foreground blob over `min_fraction` of the image is one
        "object". Assumes the objects do not touch the border and stand out in colour; touching
        objects of similar colour come back as one, and large patterned background as objects."""
        if self.work is None:
            raise RuntimeError("call set_image(image) before segment_all()")
        cv2 = import_cv2()
        work = self.work
        s = ALL_LONG_SIDE / max(work.shape[:2])
        if s < 1:  # a whole-image GrabCut is the slowest case; this is a rough guess anyway
            work = cv2.resize(work, (round(work.shape[1] * s), round(work.shape[0] * s)), interpolation=cv2.INTER_AREA)
        h, w = work.shape[:2]
        mx, my = max(1, w // 20), max(1, h // 20)
        gc = np.full((h, w), cv2.GC_BGD, np.uint8)
        gc[my:h - my, mx:w - mx] = cv2.GC_PR_FGD
        fg = self._grabcut(gc, work)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
        order = sorted(range(1, n), key=lambda i: -stats[i, cv2.CC_STAT_AREA])
        out = []
        for i in order[:max_objects]:
            if stats[i, cv2.CC_STAT_AREA] < min_fraction * h * w:
                break
            m = clean_mask(labels == i)
            out.append(MaskCandidate(self._to_original(m), float(stats[i, cv2.CC_STAT_AREA]) / (h * w),
                                     self.name, "area fraction"))
        return out
