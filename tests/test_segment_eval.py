"""The basic (GrabCut) back-end with one box on real photos whose reference masks nobody drew.

assets/segment_eval/README.md says where each photo and mask comes from. The box is the reference
mask's bounding box padded by 5 % of its size on each side (what a user drags around an object).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam3d_core.segment import Prompt, mask_iou

pytest.importorskip("cv2", reason="the basic back-end needs opencv-python-headless")
from sam3d_core.segment.basic import BasicSegmenter  # noqa: E402

EVAL = Path(__file__).resolve().parent.parent / "assets" / "segment_eval"
ISSUE_PHOTOS = ("motorcycle", "chelsea_vase", "rocket_torus", "astronaut_horse")  # the issue's acceptance set
ADDED_PHOTOS = ("coffee_mug", "garage_knot")  # added later; measured while settings were chosen (no clean hold-out)
# Measured (docs/benchmarks.md, segmentation section): 0.615, 0.977, 0.894, 0.678 (mean 0.791) on the issue's
# four; 0.964 and 0.576 on the added two (mean of six 0.784). The issue asks for a mean of 0.75 with one box.
TARGET = 0.75


def padded_box(mask: np.ndarray, pad: float = 0.05) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    px, py = pad * (x1 - x0), pad * (y1 - y0)
    h, w = mask.shape
    return max(0.0, x0 - px), max(0.0, y0 - py), min(float(w), x1 + px), min(float(h), y1 + py)


def box_iou(name: str, seg: BasicSegmenter) -> float:
    image = np.asarray(Image.open(EVAL / f"{name}.jpg").convert("RGB"))
    ref = np.asarray(Image.open(EVAL / f"{name}_mask.png")) > 0
    seg.set_image(image)
    return mask_iou(seg.predict(Prompt(box=padded_box(ref)))[0].mask, ref)


@pytest.mark.slow  # about 10 s of CPU: GrabCut, 10 iterations at 320 px on six photos
def test_basic_one_box_mean_iou():
    seg = BasicSegmenter()
    ious = {name: box_iou(name, seg) for name in ISSUE_PHOTOS + ADDED_PHOTOS}
    issue = float(np.mean([ious[n] for n in ISSUE_PHOTOS]))
    every = float(np.mean(list(ious.values())))
    print(
        "basic back-end, one box: "
        + ", ".join(f"{k} {v:.3f}" for k, v in ious.items())
        + f"; mean of the issue's four {issue:.3f}, of all {every:.3f}"
    )
    assert all(v > 0.5 for v in ious.values()), ious
    assert issue >= TARGET and every >= TARGET, ious
