"""The no-weights back-end: OpenCV GrabCut seeded by clicks and/or a box. Labelled "basic (no weights)".

GrabCut fits two colour models (GMMs) and cuts the graph between them. It has no notion of "object":
it fails when object and background share colours, on thin parts (spokes, cables, hair), on
transparent or shiny objects and on busy textures, and it needs a box or several clicks where SAM
needs one. Its `segment_all` is a guess (see there). Use it when no SAM weights are present.

What this version adds to plain `cv2.grabCut` (docs/segmentation.md has the measurements):
- a centre-weighted start: only the box's central part starts as "probably object", its outer band
  as "probably background" (a box drawn around an object has background in its corners and edges);
- a deterministic colour-model start (Orchard-Bouman splitting, as in the GrabCut paper) instead of
  OpenCV's randomly seeded k-means, whose outcome flips between runs on hard photos;
- coarse-to-fine: the cut runs at <= `WORK_LONG_SIDE` px, and its upsampled mask is refined at the
  photo's full resolution with an edge-aware guided filter guided by the photo.
"""

from __future__ import annotations

import numpy as np

from sam3d_core.segment.base import BASIC_LABEL, MaskCandidate, Prompt, check_image

WORK_LONG_SIDE = 320  # GrabCut cost grows with pixels x iterations; the guided filter restores full-res edges
ITERATIONS = 10  # GrabCut rounds (re-fit colour models, cut again); masks still change after 6 on hard photos
CORE = 0.7  # box prompts: the central CORE x CORE of the box starts as "probably object", the rest "probably bg"
MIN_BOX_FILL = 0.02  # a box answer below this fraction of the box falls back to the seeds' "object" region
COMPONENTS = 5  # GMM components per side: fixed by OpenCV's model layout (1 x 65 = 5 x (1 + 3 + 9))
GUIDE_EPS = 1e-3  # guided-filter regulariser (grey levels in [0, 1]): smaller follows weaker edges
ISLAND_FRACTION = 0.01  # drop blobs smaller than this fraction of the kept mask
HOLE_FRACTION = 0.0005  # fill enclosed holes smaller than this fraction of the image
ALL_LONG_SIDE = 256  # work size of segment_all


def import_cv2():
    try:
        import cv2
    except ImportError as e:
        raise ImportError("the basic segmenter needs OpenCV: pip install opencv-python-headless") from e
    return cv2


def _split_labels(z: np.ndarray, k: int) -> np.ndarray:
    """Orchard-Bouman: split the cluster with the largest variance along its principal axis at its mean,
    k - 1 times. z: [N, 3] float64 -> [N] component labels. Deterministic."""
    labels = np.zeros(len(z), np.int64)
    for new in range(1, k):
        best = None
        for c in range(new):
            zc = z[labels == c]
            if len(zc) < 2:
                continue
            w, v = np.linalg.eigh(np.cov(zc.T))
            if best is None or w[-1] * len(zc) > best[0]:
                best = (w[-1] * len(zc), c, v[:, -1], zc.mean(0))
        if best is None or best[0] <= 0:
            break
        _, c, axis, mean = best
        labels[(labels == c) & ((z - mean) @ axis > 0)] = new
    return labels


def _fit(z: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """[1, 13 k] GMM in OpenCV's GrabCut layout (k weights, k x 3 means, k x 9 covariances) from hard
    component labels, computed as OpenCV's learnGMMs does (population covariance, + 0.01 on the diagonal
    only when singular)."""
    model = np.zeros(13 * k)
    for c in range(k):
        zc = z[labels == c]
        if len(zc) == 0:
            continue
        mean = zc.mean(0)
        cov = zc.T @ zc / len(zc) - np.outer(mean, mean)
        if np.linalg.det(cov) <= np.finfo(np.float64).eps:
            cov += 0.01 * np.eye(3)
        model[c] = len(zc) / len(z)
        model[k + 3 * c : k + 3 * c + 3] = mean
        model[4 * k + 9 * c : 4 * k + 9 * c + 9] = cov.ravel()
    return model.reshape(1, -1)


def gmm_model(pixels: np.ndarray, k: int = COMPONENTS) -> np.ndarray:
    """pixels: [N, 3] colours -> a [1, 13 k] GMM in OpenCV's GrabCut layout, started deterministically
    by Orchard-Bouman splitting (as in the GrabCut paper) instead of OpenCV's randomly seeded k-means."""
    z = pixels.reshape(-1, 3).astype(np.float64)
    return _fit(z, _split_labels(z, k), k)


def guided_filter(guide: np.ndarray, p: np.ndarray, radius: int, eps: float = GUIDE_EPS) -> np.ndarray:
    """Edge-aware smoothing of p ([H, W] float32) by guide ([H, W] float32 in [0, 1]); He et al. 2010.

    The output is locally a linear function of the guide, so a blurry upsampled mask snaps to the
    photo's edges. Cost: a few box filters, linear in pixels whatever the radius.
    """
    cv2 = import_cv2()

    def box(x):
        return cv2.boxFilter(x, -1, (2 * radius + 1, 2 * radius + 1), borderType=cv2.BORDER_REFLECT)

    mi, mp = box(guide), box(p)
    a = (box(guide * p) - mi * mp) / (box(guide * guide) - mi * mi + eps)
    b = mp - a * mi
    return box(a) * guide + box(b)


def clean_mask(
    fg: np.ndarray, keep_points: list[tuple[int, int]] = (), keep_region: np.ndarray | None = None
) -> np.ndarray:
    """fg: [H, W] bool -> the component(s) under `keep_points`, else those overlapping `keep_region`
    ([H, W] bool, e.g. the box's centre), else the largest; small islands dropped and small enclosed
    holes filled."""
    cv2 = import_cv2()
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(fg)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = {int(labels[y, x]) for x, y in keep_points if labels[y, x] > 0}
    if not keep and keep_region is not None:
        keep = set(np.unique(labels[keep_region & (labels > 0)]).tolist())
    if not keep:
        keep = {1 + int(np.argmax(areas))}
    kept_area = sum(int(areas[i - 1]) for i in keep)
    if not keep_points:
        keep = {i for i in keep if areas[i - 1] >= ISLAND_FRACTION * kept_area}
        keep |= {i + 1 for i, a in enumerate(areas) if a >= ISLAND_FRACTION * kept_area and keep_region is None}
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
    """GrabCut on a copy downscaled to <= work_long_side px; masks come back at the original size,
    refined there by a guided filter."""

    name = BASIC_LABEL
    is_basic = True
    reason = ""  # set by load_segmenter: which back-end and why

    def __init__(self, seed: int = 0, work_long_side: int = WORK_LONG_SIDE):
        self.seed = seed  # kept for API compatibility: the colour-model start is deterministic now
        self.work_long_side = work_long_side
        self.image: np.ndarray | None = None
        self.work: np.ndarray | None = None
        self.guide: np.ndarray | None = None  # [H, W] float32 grey in [0, 1], made on first use
        self.scale = 1.0

    def set_image(self, image: np.ndarray) -> None:
        cv2 = import_cv2()
        self.image = check_image(image)
        h, w = image.shape[:2]
        self.scale = min(1.0, self.work_long_side / max(h, w))
        size = (round(w * self.scale), round(h * self.scale))
        self.work = image if self.scale == 1.0 else cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        self.guide = None

    def image_state(self) -> tuple:
        """What set_image computed, to keep for a later `restore_image_state` (the session's cache)."""
        return self.image, self.work, self.scale, self.guide

    def restore_image_state(self, state: tuple) -> None:
        self.image, self.work, self.scale, self.guide = state

    def _seed_mask(self, prompt: Prompt) -> tuple[np.ndarray, list[tuple[int, int]], np.ndarray | None]:
        """The GrabCut label image in the work frame, the positive clicks there, and (box prompts) the
        box's central region whose components are kept."""
        cv2 = import_cv2()
        h, w = self.work.shape[:2]
        s = self.scale
        pos = [(min(w - 1, int(x * s)), min(h - 1, int(y * s))) for x, y in prompt.positives]
        neg = [(min(w - 1, int(x * s)), min(h - 1, int(y * s))) for x, y in prompt.negatives]
        gc = np.full((h, w), cv2.GC_BGD, np.uint8)
        core = None
        if prompt.box is not None:  # a box says "the object fills this", mostly its middle
            bx0, by0, bx1, by1 = (v * s for v in prompt.box)
            x0, y0 = max(0, int(round(bx0))), max(0, int(round(by0)))
            x1, y1 = min(w, max(x0 + 1, int(round(bx1)))), min(h, max(y0 + 1, int(round(by1))))
            gc[y0:y1, x0:x1] = cv2.GC_PR_BGD
            mx, my = (1 - CORE) / 2 * (x1 - x0), (1 - CORE) / 2 * (y1 - y0)
            cx0, cy0 = int(round(x0 + mx)), int(round(y0 + my))
            cx1, cy1 = max(cx0 + 1, int(round(x1 - mx))), max(cy0 + 1, int(round(y1 - my)))
            gc[cy0:cy1, cx0:cx1] = cv2.GC_PR_FGD
            core = np.zeros((h, w), bool)
            core[cy0:cy1, cx0:cx1] = True
        else:  # clicks only: work inside the clicks' bounding box grown by a quarter of the image diagonal
            xs, ys = [p[0] for p in pos], [p[1] for p in pos]
            grow = max(np.hypot(h, w) / 8, 0.5 * (max(xs) - min(xs) + max(ys) - min(ys)))
            x0, y0 = max(0, int(min(xs) - grow)), max(0, int(min(ys) - grow))
            gc[y0 : int(max(ys) + grow), x0 : int(max(xs) + grow)] = cv2.GC_PR_BGD
        if prompt.mask_input is not None and prompt.mask_input.shape == self.image.shape[:2]:
            prev = cv2.resize(prompt.mask_input.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
            gc[prev] = cv2.GC_PR_FGD
        r = max(2, int(0.01 * np.hypot(h, w)))  # disc radius: 1 % of the diagonal
        for x, y in pos:
            if prompt.box is None:
                cv2.circle(gc, (x, y), 4 * r, int(cv2.GC_PR_FGD), -1)
            cv2.circle(gc, (x, y), r, int(cv2.GC_FGD), -1)
        for x, y in neg:
            cv2.circle(gc, (x, y), r, int(cv2.GC_BGD), -1)
        return gc, pos, core

    def _grabcut(self, gc: np.ndarray, work: np.ndarray | None = None) -> np.ndarray:
        """gc: [h, w] uint8 GrabCut labels, updated in place -> [h, w] bool object mask."""
        cv2 = import_cv2()
        work = self.work if work is None else work
        fg = gc % 2 == 1
        if fg.all() or not fg.any():
            return fg  # GrabCut needs both sides; a box over the whole image has none outside
        pixels = work.reshape(-1, 3)
        bgd, fgd = gmm_model(pixels[~fg.ravel()]), gmm_model(pixels[fg.ravel()])
        cv2.grabCut(work, gc, None, bgd, fgd, ITERATIONS, cv2.GC_EVAL)  # re-learns both GMMs every iteration
        return gc % 2 == 1

    def _to_original(self, m: np.ndarray) -> np.ndarray:
        """A work-frame mask -> [H, W] bool at the original size, edges refined against the photo."""
        cv2 = import_cv2()
        if self.scale == 1.0:
            return m
        h, w = self.image.shape[:2]
        p = cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        if self.guide is None:
            self.guide = cv2.cvtColor(self.image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255
        radius = max(1, round(2 / self.scale))  # two work pixels: the blur that upsampling left
        return guided_filter(self.guide, p, radius) >= 0.5

    def predict(self, prompt: Prompt, multimask: bool = True) -> list[MaskCandidate]:
        """One candidate (GrabCut has no alternatives to offer); score 1.0 of kind 'none'."""
        if self.work is None:
            raise RuntimeError("call set_image(image) before predict()")
        prompt.validate(*self.image.shape[:2])
        gc, pos, core = self._seed_mask(prompt)
        seeds = gc % 2 == 1  # what the prompt alone calls object: box centre, + discs, a previous mask
        fg = clean_mask(self._grabcut(gc), pos, core)
        if core is not None and fg.sum() < MIN_BOX_FILL * (gc != 0).sum():
            fg = seeds  # the colours found no object in the box (object and surroundings alike): keep the prompt's
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
        gc[my : h - my, mx : w - mx] = cv2.GC_PR_FGD
        fg = self._grabcut(gc, work)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
        order = sorted(range(1, n), key=lambda i: -stats[i, cv2.CC_STAT_AREA])
        out = []
        for i in order[:max_objects]:
            if stats[i, cv2.CC_STAT_AREA] < min_fraction * h * w:
                break
            m = clean_mask(labels == i)
            big = cv2.resize(m.astype(np.float32), self.image.shape[1::-1], interpolation=cv2.INTER_LINEAR) >= 0.5
            out.append(MaskCandidate(big, float(stats[i, cv2.CC_STAT_AREA]) / (h * w), self.name, "area fraction"))
        return out
