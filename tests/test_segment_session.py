"""SegmentSession, the object the worker holds: open (cached encodings), click-by-click predict, segment_all,
save_mask, describe. Basic back-end on the assets photos; the tiny SAM where torchvision loads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam3d_core.segment import BASIC_LABEL, SegmentSession, mask_iou

pytest.importorskip("cv2", reason="the basic back-end needs opencv-python-headless")
from sam3d_core.segment.basic import BasicSegmenter  # noqa: E402

EVAL = Path(__file__).resolve().parent.parent / "assets" / "segment_eval"
VASE_BOX = [290, 105, 400, 262]  # around the vase in chelsea_vase.jpg (451x300)


@pytest.fixture()
def session() -> SegmentSession:
    return SegmentSession(segmenter=BasicSegmenter(work_long_side=200), max_photos=2)  # small: fast tests


def test_open_predict_refine_and_save(session, tmp_path):
    d = session.describe()
    assert d["name"] == BASIC_LABEL and d["fallback"] is True and d["photos_cached"] == 0
    info = session.open(EVAL / "chelsea_vase.jpg")
    assert (info["width"], info["height"], info["cached"]) == (451, 300, False)
    ref = np.asarray(Image.open(EVAL / "chelsea_vase_mask.png")) > 0

    mask, score, backend, timings = session.predict([], box=VASE_BOX)  # JSON-style box, no clicks
    assert mask.shape == (300, 451) and mask.dtype == bool and backend == BASIC_LABEL
    assert score is None and timings["predict_s"] >= 0  # GrabCut has no confidence to report
    assert mask_iou(mask, ref) > 0.8

    assert mask[232, 345]  # low on the vase; a - click there, refining the previous answer, takes it out
    fixed, *_ = session.predict([[345, 232, 0]], box=VASE_BOX, previous=mask)
    assert not fixed[232, 345] and fixed.sum() < mask.sum()

    out = session.save_mask(fixed, tmp_path / "sub" / "mask.png")
    png = np.asarray(Image.open(out))
    assert png.dtype == np.uint8 and set(np.unique(png)) == {0, 255} and np.array_equal(png == 255, fixed)


def test_encodings_are_cached_per_file_version_and_bounded(session, tmp_path):
    photo = tmp_path / "photo.jpg"
    shutil.copy(EVAL / "chelsea_vase.jpg", photo)
    assert not session.open(photo)["cached"]
    assert session.open(str(photo))["cached"]  # same file, same mtime: no second encoding
    Image.open(EVAL / "rocket_torus.jpg").save(photo)  # the file changes under the same name
    os.utime(photo, ns=(1, 1))  # a different mtime even on coarse file-system clocks
    info = session.open(photo)
    assert not info["cached"] and (info["width"], info["height"]) == (640, 427)

    session.open(EVAL / "coffee_mug.jpg")
    assert session.describe()["photos_cached"] == 2  # max_photos=2: the oldest version was dropped
    assert session.open(photo)["cached"]  # still kept, and restored as the current photo
    mask, *_ = session.predict([[120, 250, 1]], box=[40, 165, 250, 380])  # the torus in rocket_torus.jpg
    assert mask.shape == (427, 640)

    rgb = np.asarray(Image.open(EVAL / "astronaut_horse.jpg").convert("RGB"))
    assert not session.open(rgb, key="astronaut")["cached"]
    assert session.open(rgb.copy(), key="astronaut")["cached"]  # same pixels, same key
    changed = rgb.copy()
    changed[0, 0] ^= 1
    assert not session.open(changed, key="astronaut")["cached"]  # edited pixels are encoded again


def test_bad_input_names_problem_and_fix(session, tmp_path):
    with pytest.raises(ValueError, match=r"no photo is open; call open\(photo\)"):
        session.predict([[1, 1, 1]])
    with pytest.raises(ValueError, match="does not exist"):
        session.open(tmp_path / "missing.jpg")
    session.open(EVAL / "chelsea_vase.jpg")
    with pytest.raises(ValueError, match=r"expected \[x, y, label\].*label 1 \(include\) or 0"):
        session.predict([[10, 10, 2]])
    with pytest.raises(ValueError, match=r"expected \[x, y, label\]"):
        session.predict([[10, 10]])
    with pytest.raises(ValueError, match=r"box \[1, 2, 3\]: expected \[x0, y0, x1, y1\]"):
        session.predict([], box=[1, 2, 3])
    with pytest.raises(ValueError, match=r"point \(500, 10\) lies outside the 451x300 image"):
        session.predict([[500, 10, 1]])
    with pytest.raises(ValueError, match="previous mask is 10x20 pixels but the photo is 451x300"):
        session.predict([[100, 100, 1]], previous=np.zeros((20, 10), bool))
    with pytest.raises(ValueError, match="expected a 2-D"):
        session.save_mask(np.zeros((4, 4, 3), bool), tmp_path / "m.png")


def test_segment_all_gives_masks_of_the_photo(tmp_path):
    s = SegmentSession(segmenter=BasicSegmenter(work_long_side=160))
    with pytest.raises(ValueError, match="no photo is open"):
        s.segment_all()
    s.open(EVAL / "chelsea_vase.jpg")
    masks = s.segment_all()
    assert masks and all(m.shape == (300, 451) and m.dtype == bool for m in masks)
    assert [int(m.sum()) for m in masks] == sorted((int(m.sum()) for m in masks), reverse=True)


def test_default_session_reports_the_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path))  # no imported weights: the basic back-end answers
    d = SegmentSession().describe()
    assert d["fallback"] is True and d["name"] == BASIC_LABEL and d["reason"].startswith(BASIC_LABEL)


def test_tiny_sam_session_reuses_the_encoding():
    from sam3d_core.segment.sam1 import SamSegmenter, import_error

    if import_error() is not None:
        pytest.skip(f"segment-anything unusable here: {import_error()} (it needs a torchvision built for this torch)")
    from test_segment_sam1 import tiny_sam

    seg = SamSegmenter(tiny_sam(), name="sam tiny")
    s = SegmentSession(segmenter=seg, max_photos=2)
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (48, 80, 3), dtype=np.uint8) for _ in range(2))
    s.open(a, key="a")
    first, score, backend, _ = s.predict([[40, 20, 1]])
    assert backend == "sam tiny" and isinstance(score, float) and first.shape == (48, 80)
    s.open(b, key="b")
    assert s.open(a, key="a")["cached"]  # restored, not re-encoded
    again, *_ = s.predict([[40, 20, 1]])
    assert np.array_equal(again, first)
    refined, *_ = s.predict([[40, 20, 1], [5, 5, 0]], previous=again)  # refines with the stored logits
    assert refined.shape == (48, 80)
