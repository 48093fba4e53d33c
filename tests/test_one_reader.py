"""`sam3d segment` and `reconstruct` see the same photo: one reader (`inputs.imageio.load_photo`), so a mask made
by `sam3d segment` lines up with the photo `reconstruct` uses, also for EXIF-rotated and 16-bit files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sam3d_core.cli.main import main
from sam3d_core.inputs.imageio import load_mask, load_photo

H, W = 96, 128  # stored size; the object: a bright square at rows 20..60, cols 30..70 of the STORED pixels


def _stored() -> tuple[np.ndarray, np.ndarray]:
    rgb = np.full((H, W, 3), 40, np.uint8)
    rgb[:, :, 2] = np.linspace(30, 90, W, dtype=np.uint8)[None]  # a gradient, so orientation matters
    obj = np.zeros((H, W), bool)
    obj[20:60, 30:70] = True
    rgb[obj] = (230, 200, 60)
    return rgb, obj


def _segment_then_reconstruct_view(tmp_path, photo_path, expected_obj: np.ndarray) -> None:
    ys, xs = np.nonzero(expected_obj)
    box = f"{xs.min() - 6},{ys.min() - 6},{xs.max() + 7},{ys.max() + 7}"  # displayed pixels
    out = tmp_path / "mask.png"
    assert main(["segment", str(photo_path), "--box", box, "--backend", "basic", "--out", str(out)]) == 0
    photo = load_photo(photo_path)  # what `reconstruct` opens (Pipeline.open_photo)
    mask = load_mask(out, photo, min_pixels=1)  # refuses a mask of another size
    assert mask.shape == expected_obj.shape == photo.rgb.shape[:2]
    iou = (mask & expected_obj).sum() / (mask | expected_obj).sum()
    assert iou > 0.9, f"the segment mask does not line up with reconstruct's photo (IoU {iou:.3f})"


@pytest.mark.parametrize("orientation", [6, 8, 3])  # 90 degrees clockwise, counter-clockwise, 180
def test_segment_mask_lines_up_on_an_exif_rotated_photo(tmp_path, orientation):
    rgb, obj = _stored()
    ex = Image.Exif()
    ex[0x0112] = orientation
    path = tmp_path / "rotated.jpg"
    Image.fromarray(rgb).save(path, exif=ex, quality=95)
    turn = {6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1), 3: lambda a: np.rot90(a, 2)}[orientation]
    displayed = turn(obj)
    assert displayed.shape != obj.shape or orientation == 3
    _segment_then_reconstruct_view(tmp_path, path, displayed)


def test_segment_mask_lines_up_on_a_16bit_photo(tmp_path):
    cv2 = pytest.importorskip("cv2")
    rgb, obj = _stored()
    path = tmp_path / "deep.png"
    assert cv2.imwrite(str(path), (rgb.astype(np.uint16) * 257)[:, :, ::-1])  # 16-bit RGB, OpenCV writes BGR
    _segment_then_reconstruct_view(tmp_path, path, obj)
