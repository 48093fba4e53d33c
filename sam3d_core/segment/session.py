"""The segmentation session a worker process holds: one segmenter, a few encoded photos, click-by-click masks.

    s = SegmentSession()                          # back-end chosen on first use (load_segmenter("auto"))
    s.open("photo.jpg")                           # encodes once; reopening an unchanged file is free
    mask, score, backend, t = s.predict([[320, 200, 1]], box=[250, 120, 420, 300])
    mask, *_ = s.predict([[320, 200, 1], [330, 260, 0]], previous=mask)    # refine with a - click
    s.save_mask(mask, "mask.png")                 # PNG, 0 / 255
    s.describe()                                  # {"name", "fallback", "reason", ...}
    for inst in s.segment_concept("photo.jpg", text="chair", min_score=0.5): ...   # SAM 3: every chair

Inputs are JSON-friendly: points as [[x, y, label], ...] (photo pixels, label 1 = include, 0 = exclude),
box as [x0, y0, x1, y1]. Bad input raises ValueError naming the value and the fix.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from sam3d_core.inputs.imageio import load_photo
from sam3d_core.segment.backends import load_concept_segmenter, load_segmenter
from sam3d_core.segment.base import MaskCandidate, Prompt
from sam3d_core.segment.sam3 import ConceptPrompt, check_limits

MAX_PHOTOS = 4  # encoded photos kept; a SAM 2 embedding with its high-res features is ~16 MB


def save_mask(mask: np.ndarray, path: str | os.PathLike) -> Path:
    """[H, W] bool (or 0/1, 0/255) -> an 8-bit greyscale PNG with 0 = background, 255 = object."""
    from PIL import Image

    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask of shape {m.shape}: expected a 2-D [H, W] array; pass one candidate's mask")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(m > 0, 255, 0).astype(np.uint8), mode="L").save(path, format="PNG")
    return path


def _points(points) -> tuple[tuple[float, float, int], ...]:
    out = []
    for p in points or ():
        ok = isinstance(p, (list, tuple)) and len(p) == 3
        if ok:
            x, y, lab = p
            ok = all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in (x, y, lab))
        if not ok or lab not in (0, 1):
            raise ValueError(
                f"point {p!r}: expected [x, y, label] in photo pixels with label 1 (include) or "
                "0 (exclude), e.g. [[320, 200, 1], [40, 30, 0]]"
            )
        out.append((float(x), float(y), int(lab)))
    return tuple(out)


def _box(box) -> tuple[float, float, float, float] | None:
    if box is None:
        return None
    if (
        not isinstance(box, (list, tuple, np.ndarray))
        or len(box) != 4
        or not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in box)
    ):
        raise ValueError(
            f"box {box!r}: expected [x0, y0, x1, y1] in photo pixels (top-left corner, then bottom-right), or None"
        )
    return tuple(float(v) for v in box)


def _exemplar(box) -> tuple[float, float, float, float, int]:
    """[x0, y0, x1, y1] (an example) or [x0, y0, x1, y1, label] -> (x0, y0, x1, y1, label)."""
    ok = isinstance(box, (list, tuple, np.ndarray)) and len(box) in (4, 5)
    ok = ok and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in box)
    if not ok or (len(box) == 5 and box[4] not in (0, 1)):
        raise ValueError(
            f"exemplar box {box!r}: expected [x0, y0, x1, y1] or [x0, y0, x1, y1, label] in photo pixels, label 1 "
            "(an example of what to find) or 0 (not one)"
        )
    return (*(float(v) for v in box[:4]), int(box[4]) if len(box) == 5 else 1)


class SegmentSession:
    """One segmenter plus an LRU cache of encoded photos (at most `max_photos`).

    backend / checkpoint / device go to `load_segmenter` on first use; or pass a ready `segmenter`.
    Not thread-safe: the worker calls it from one thread.
    """

    def __init__(
        self,
        backend: str = "auto",
        checkpoint: str | None = None,
        device: str | None = None,
        max_photos: int = MAX_PHOTOS,
        segmenter=None,
        concept_segmenter=None,
    ):
        if max_photos < 1:
            raise ValueError(f"max_photos={max_photos}: keep at least 1 encoded photo")
        self._spec = (backend, checkpoint, device)
        self._seg = segmenter
        self.max_photos = max_photos
        self._cache: OrderedDict[tuple, tuple] = OrderedDict()  # key -> segmenter image state
        self._current: tuple | None = None
        self._last: dict = {}  # key -> (mask, native) of the last answer, to refine with its logits
        self._concept = concept_segmenter  # SAM 3, loaded on the first concept prompt
        self._concept_cache: OrderedDict[tuple, tuple] = OrderedDict()  # key -> SAM 3 image state

    # -- the back-end -----------------------------------------------------------------------------
    @property
    def segmenter(self):
        if self._seg is None:
            backend, checkpoint, device = self._spec
            self._seg = load_segmenter(backend, checkpoint=checkpoint, device=device)
        return self._seg

    def describe(self) -> dict:
        """{"name": shown in every UI, "fallback": True for the no-weights back-end, "reason": why this one,
        "photos_cached": how many encoded photos are kept, "max_photos"}."""
        seg = self.segmenter
        return {
            "name": seg.name,
            "fallback": bool(seg.is_basic),
            "reason": seg.reason,
            "photos_cached": len(self._cache),
            "max_photos": self.max_photos,
        }

    # -- photos -----------------------------------------------------------------------------------
    def open(self, photo: str | os.PathLike | np.ndarray, key: str | None = None) -> dict:
        """Make `photo` current, encoding it unless cached. photo: a file path or an [H, W, 3] uint8 RGB array.

        A path is cached by (resolved path, mtime, size): an edited file is encoded again. An array is
        cached by `key` (e.g. its source path) plus a digest of its pixels. Returns {"width", "height",
        "cached": bool, "encode_s"}.
        """
        t0 = time.perf_counter()
        if isinstance(photo, np.ndarray):
            rgb = photo
            digest = hashlib.blake2b(np.ascontiguousarray(rgb).data, digest_size=16).hexdigest()
            cache_key = ("array", key, rgb.shape, digest)
        elif isinstance(photo, (str, os.PathLike)):
            path = Path(photo).expanduser()
            if not path.is_file():
                raise ValueError(f"photo {str(path)!r} does not exist; give the path of an image file")
            st = path.stat()
            cache_key = ("file", str(path.resolve()), st.st_mtime_ns, st.st_size)
            rgb = None
        else:
            raise ValueError(
                f"photo of type {type(photo).__name__}: expected a file path or an [H, W, 3] uint8 RGB array"
            )
        seg = self.segmenter
        cached = cache_key in self._cache
        if cached:
            if self._current != cache_key:
                self._restore(cache_key)
            self._cache.move_to_end(cache_key)
        else:
            if rgb is None:
                rgb = load_photo(path).rgb  # the same reader as reconstruct: masks line up with its photo
            seg.set_image(rgb)
            self._remember(cache_key)
        self._current = cache_key
        h, w = seg.image.shape[:2]
        return {
            "width": int(w),
            "height": int(h),
            "cached": cached,
            "encode_s": 0.0 if cached else round(time.perf_counter() - t0, 4),
        }

    def _remember(self, cache_key: tuple) -> None:
        seg = self.segmenter
        if not hasattr(seg, "image_state"):  # a back-end without state export: keep only the current photo
            self._cache.clear()
            self._cache[cache_key] = ()
            return
        self._cache[cache_key] = seg.image_state()
        while len(self._cache) > self.max_photos:
            old, _ = self._cache.popitem(last=False)
            self._last.pop(old, None)

    def _restore(self, cache_key: tuple) -> None:
        self.segmenter.restore_image_state(self._cache[cache_key])

    # -- masks ------------------------------------------------------------------------------------
    def predict(
        self, points=(), box=None, previous: np.ndarray | None = None
    ) -> tuple[np.ndarray, float | None, str, dict]:
        """The best mask for clicks and/or a box on the current photo.

        points: [[x, y, label], ...]; box: [x0, y0, x1, y1] or None; previous: the [H, W] mask being
        refined (this session's last answer refines with the back-end's own logits). Returns (mask
        [H, W] bool, score or None for back-ends without one, back-end name, {"predict_s"}).
        """
        if self._current is None:
            raise ValueError("no photo is open; call open(photo) before predict()")
        seg = self.segmenter
        h, w = seg.image.shape[:2]
        mask_input = None
        if previous is not None:
            previous = np.asarray(previous)
            if previous.shape != (h, w):
                raise ValueError(
                    f"previous mask is {previous.shape[1] if previous.ndim > 1 else '?'}x"
                    f"{previous.shape[0]} pixels but the photo is {w}x{h}; pass a mask of this photo"
                )
            previous = previous > 0
            last = self._last.get(self._current)
            if last is not None and last[1] is not None and np.array_equal(last[0], previous):
                mask_input = last[1]  # the back-end's logits behind that mask
            else:
                mask_input = previous
        prompt = Prompt(points=_points(points), box=_box(box), mask_input=mask_input)
        prompt.validate(h, w)
        t0 = time.perf_counter()
        one_click = prompt.box is None and len(prompt.points) == 1 and mask_input is None
        best = seg.predict(prompt, multimask=one_click)[0]  # candidates come best first
        seconds = time.perf_counter() - t0
        self._last[self._current] = (best.mask, best.native)
        score = None if best.score_kind in ("", "none") else float(best.score)
        return best.mask, score, best.backend, {"predict_s": round(seconds, 4)}

    # -- concept prompts (SAM 3) --------------------------------------------------------------------
    @property
    def concept_segmenter(self):
        """SAM 3 (loaded on first use); ConceptUnavailable, saying how to get it, when there is none."""
        if self._concept is None:
            _, _, device = self._spec
            self._concept = load_concept_segmenter(device=device)
        return self._concept

    def segment_concept(
        self,
        photo: str | os.PathLike | np.ndarray,
        text: str | None = None,
        boxes=(),
        min_score: float = 0.5,
        max_objects: int | None = None,
        key: str | None = None,
    ) -> list[MaskCandidate]:
        """Every instance of a concept on `photo` (a path, or an array cached by `key` as in `open`), best first.

        text: a noun phrase; boxes: exemplars [[x0, y0, x1, y1, label], ...] in photo pixels (label 1 = an example,
        0 = not one; [x0, y0, x1, y1] alone is an example). Inputs are checked before SAM 3 is loaded."""
        if text is not None and not isinstance(text, str):
            raise ValueError(f"text {text!r}: expected a noun phrase such as 'chair', or none")
        exemplars = tuple(_exemplar(b) for b in boxes or ())
        check_limits(min_score, max_objects)
        prompt = ConceptPrompt(text=text, boxes=exemplars)
        if isinstance(photo, np.ndarray):
            digest = hashlib.blake2b(np.ascontiguousarray(photo).data, digest_size=16).hexdigest()
            rgb, cache_key = photo, ("array", key, photo.shape, digest)
        else:
            path = Path(photo).expanduser()
            if not path.is_file():
                raise ValueError(f"photo {str(path)!r} does not exist; give the path of an image file")
            st = path.stat()
            rgb, cache_key = None, ("file", str(path.resolve()), st.st_mtime_ns, st.st_size)
        if rgb is None:
            rgb = load_photo(path).rgb
        prompt.validate(*rgb.shape[:2])  # before SAM 3 loads
        seg = self.concept_segmenter
        if cache_key in self._concept_cache:
            seg.restore_image_state(self._concept_cache[cache_key])
            self._concept_cache.move_to_end(cache_key)
        else:
            seg.set_image(rgb)
            self._concept_cache[cache_key] = seg.image_state()
            while len(self._concept_cache) > self.max_photos:
                self._concept_cache.popitem(last=False)
        return seg.segment_concept(prompt, min_score=min_score, max_objects=max_objects)

    def segment_all(self) -> list[np.ndarray]:
        """Every object the back-end finds on the current photo: [H, W] bool masks, largest first."""
        if self._current is None:
            raise ValueError("no photo is open; call open(photo) before segment_all()")
        return [c.mask for c in self.segmenter.segment_all()]

    def save_mask(self, mask: np.ndarray, path: str | os.PathLike) -> Path:
        """Write a mask as an 8-bit PNG, 0 = background, 255 = object (see `save_mask`)."""
        return save_mask(mask, path)
