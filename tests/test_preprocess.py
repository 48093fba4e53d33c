"""Stage-1 preprocessing: normalization statistics, crop box rounding, padding values, validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sam3d_core.config import PreprocessConfig
from sam3d_core.pipeline.preprocess import (
    crop_around_mask,
    mask_crop_box,
    normalize_pointmap,
    preprocess_stage1,
)

NAN, INF = float("nan"), float("inf")
CFG = PreprocessConfig(image_size=70)


def _points(rows: list[list[tuple[float, float, float]]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]


# ---------------------------------------------------------------------------------------------
# normalization


def test_shift_is_masked_median_and_scale_is_scene_median_chebyshev_radius():
    pm = _points([[(1, 0, 2), (5, 0, 4), (3, 0, 10)], [(3, 6, 4), (3, 0, 5), (0, 0, 4)]])
    mask = torch.tensor([[True, True, True], [False, False, False]])
    normed, scale, shift = normalize_pointmap(pm, mask)
    torch.testing.assert_close(shift, torch.tensor([3.0, 0.0, 4.0]))
    # max_axis |p - shift| per pixel: 2, 2, 6, 6, 1, 3 -> lower median of 6 values = 2
    torch.testing.assert_close(scale, torch.tensor([2.0, 2.0, 2.0]))
    torch.testing.assert_close(normed, (pm - shift[:, None, None]) / 2.0)


def test_even_counts_take_the_lower_median_and_inf_counts_as_a_number():
    pm = _points([[(1, 1, 1), (2, 2, 2), (3, 3, 3), (4, 4, 4)], [(INF, INF, INF), (0, 0, 0), (2, 2, 2), (2, 2, 2)]])
    mask = torch.tensor([[True, True, True, True], [False] * 4])
    _, scale, shift = normalize_pointmap(pm, mask)
    torch.testing.assert_close(shift, torch.full((3,), 2.0))
    # radii: 1, 0, 1, 2, inf, 2, 0, 0 -> sorted 0 0 0 1 1 2 2 inf -> lower median 1 (inf kept, not dropped)
    torch.testing.assert_close(scale, torch.full((3,), 1.0))


def test_a_non_finite_coordinate_turns_the_whole_pixel_nan():
    pm = _points([[(1, 2, 3), (-INF, -INF, INF)], [(NAN, 1, 1), (2, INF, 2)]])
    mask = torch.tensor([[True, False], [False, False]])
    normed, _, _ = normalize_pointmap(pm, mask)
    assert torch.isfinite(normed[:, 0, 0]).all()
    assert torch.isnan(normed[:, 0, 1]).all() and torch.isnan(normed[:, 1, 0]).all()
    assert torch.isnan(normed[:, 1, 1]).all()


def test_no_finite_masked_point_falls_back_to_identity():
    pm = _points([[(NAN, NAN, NAN), (1, 2, 3)]])
    normed, scale, shift = normalize_pointmap(pm, torch.tensor([[True, False]]))
    torch.testing.assert_close(scale, torch.ones(3))
    torch.testing.assert_close(shift, torch.zeros(3))
    torch.testing.assert_close(normed[:, 0, 1], torch.tensor([1.0, 2.0, 3.0]))


# ---------------------------------------------------------------------------------------------
# crop box and padding


def _box_mask(h: int, w: int, x: tuple[int, int], y: tuple[int, int]) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y[0] : y[1] + 1, x[0] : x[1] + 1] = True
    return m


def test_crop_box_official_rounding():
    # w = 27 (no +1), size = int(27 * 1.2) = 32, centre 13.5: x0 = int(-2.5) = -2 (toward zero), x1 = 29
    assert mask_crop_box(_box_mask(60, 60, (0, 27), (30, 40)), 1.2) == (-2, 19, 29, 51)
    # centre 1.5, size int(4 * 1.2) = 4: x0 = int(-0.5) = 0
    assert mask_crop_box(_box_mask(20, 20, (0, 3), (10, 14)), 1.2) == (0, 10, 3, 14)


def test_crop_zero_pads_outside_the_image_and_nan_pads_the_square():
    h = w = 60
    image = torch.rand(3, h, w)
    points = torch.randn(3, h, w)
    mask = _box_mask(h, w, (0, 27), (30, 40))[None].float()
    crop_img, crop_mask, crop_pts = crop_around_mask(image, mask, points, 1.2, 0.0)
    assert crop_img.shape == (3, 32, 32) and crop_mask.shape == (1, 32, 32) and crop_pts.shape == (3, 32, 32)
    # box x -2..29 (31 wide), y 19..51: 2 zero columns on the left, 1 square-pad column on the right
    torch.testing.assert_close(crop_img[:, :, 2:31], image[:, 19:51, 0:29])
    torch.testing.assert_close(crop_pts[:, :, 2:31], points[:, 19:51, 0:29])
    torch.testing.assert_close(crop_mask[:, :, 2:31], mask[:, 19:51, 0:29])
    assert (crop_img[:, :, :2] == 0).all() and (crop_pts[:, :, :2] == 0).all()  # torchvision crop: 0
    assert (crop_img[:, :, 31] == 0).all() and torch.isnan(crop_pts[:, :, 31]).all()  # square pad


def test_padding_factor_adds_a_border():
    mask = _box_mask(30, 30, (10, 19), (10, 19))[None].float()
    img, _, pts = crop_around_mask(torch.rand(3, 30, 30), mask, torch.randn(3, 30, 30), 1.2, 0.1)
    assert img.shape == (3, 12, 12)  # 10 + 2 * int(10 * 0.1)
    assert (img[:, 0] == 0).all() and torch.isnan(pts[:, 0]).all()


# ---------------------------------------------------------------------------------------------
# the recipe


def _scene(h: int = 40, w: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=bool)
    mask[5:30, 40:60] = True  # touches the right border
    pointmap = rng.normal(size=(h, w, 3)).astype(np.float32)
    pointmap[..., 2] += 3.0
    pointmap[0, 0] = INF  # MoGe marks invalid pixels with inf
    return image, mask, pointmap


def test_recipe_keys_shapes_and_padding_values():
    image, mask, pointmap = _scene()
    out = preprocess_stage1(image, mask, pointmap, CFG)
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {
        "image": (1, 3, 70, 70), "mask": (1, 1, 70, 70), "rgb_image": (1, 3, 70, 70),
        "rgb_image_mask": (1, 1, 70, 70), "pointmap": (1, 3, 70, 70), "rgb_pointmap": (1, 3, 70, 70),
        "pointmap_scale": (1, 3), "pointmap_shift": (1, 3),
    }  # fmt: skip
    assert all(v.dtype == torch.float32 for v in out.values())
    # Full branch: H 40 < W 60 -> 10 rows of zero padding on top and bottom, for the point map too.
    assert (out["rgb_pointmap"][0, :, :5] == 0).all() and (out["rgb_pointmap"][0, :, -5:] == 0).all()
    assert (out["rgb_image"][0, :, :5] == 0).all() and (out["rgb_image_mask"][0, :, :5] == 0).all()
    # Cropped branch: the object touches the right border, so the crop extends past it (zeros)...
    assert (out["image"][0, :, :, -3:] == 0).all() and (out["pointmap"][0, :, :, -3:] == 0).all()
    assert set(out["mask"].unique().tolist()) == {0.0, 1.0}
    # ...the inf pixel became NaN in the normalized full map, at (0, 0) -> row 10 of the padded frame.
    assert torch.isnan(out["rgb_pointmap"][0, :, 12, 0]).all()


def test_recipe_matches_the_steps_written_out():
    image, mask, pointmap = _scene(seed=1)
    out = preprocess_stage1(torch.from_numpy(image), torch.from_numpy(mask), pointmap, CFG)
    rgb = torch.from_numpy(image).permute(2, 0, 1).double().div(255).float()
    canvas = torch.zeros(3, 60, 60)
    canvas[:, 10:50] = rgb
    want = F.interpolate(canvas[None], size=(70, 70), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(out["rgb_image"], want)
    pm = torch.from_numpy(pointmap).permute(2, 0, 1)
    shift = out["pointmap_shift"][0]
    torch.testing.assert_close(shift, pm[:, torch.from_numpy(mask)].nanmedian(dim=-1).values)
    scale = out["pointmap_scale"][0]
    normed = (pm - shift[:, None, None]) / scale[:, None, None]
    canvas = torch.zeros(3, 60, 60)
    canvas[:, 10:50] = normed
    want = F.interpolate(canvas[None], size=(70, 70), mode="nearest")
    finite = torch.isfinite(want)
    torch.testing.assert_close(out["rgb_pointmap"][finite], want[finite], rtol=1e-5, atol=1e-6)


def test_mask_dtypes_are_equivalent():
    image, mask, pointmap = _scene()
    a = preprocess_stage1(image, mask, pointmap, CFG)
    b = preprocess_stage1(image, mask.astype(np.uint8) * 255, pointmap, CFG)
    for k in a:
        torch.testing.assert_close(a[k], b[k], equal_nan=True)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda i, m, p: (i.astype(np.float32), m, p), "image: got torch.float32"),
        (lambda i, m, p: (i[..., 0], m, p), r"expected uint8 \[H, W, 3\]"),
        (lambda i, m, p: (i, m[:-1], p), "mask: got size"),
        (lambda i, m, p: (i, m.astype(np.float32), p), "threshold a soft mask"),
        (lambda i, m, p: (i, np.zeros_like(m), p), "empty mask"),
        (lambda i, m, p: (i, _tiny_mask(m), p), r"bounding box is 2x9"),
        (lambda i, m, p: (i, m, p[..., :2]), r"pointmap: got .* expected float \[H, W, 3\]"),
        (lambda i, m, p: (i, m, [1, 2, 3]), "pointmap: got list"),
    ],
)
def test_bad_inputs_are_clear_errors(change, match):
    with pytest.raises(ValueError, match=match):
        preprocess_stage1(*change(*_scene()), CFG)


def _tiny_mask(m: np.ndarray) -> np.ndarray:
    out = np.zeros_like(m)
    out[3:12, 7:9] = True  # 2 pixels wide: w = max - min = 1 < 2
    return out


def test_pointmap_of_another_size_is_resized_nearest():
    image, mask, pointmap = _scene()
    half = pointmap[::2, ::2]
    up = np.repeat(np.repeat(half, 2, axis=0), 2, axis=1)
    a = preprocess_stage1(image, mask, half, CFG)
    b = preprocess_stage1(image, mask, up, CFG)
    torch.testing.assert_close(a["rgb_pointmap"], b["rgb_pointmap"], equal_nan=True)


# ---------------------------------------------------------------------------------------------
# parity with the official code (fixture made by running it; see tests/fixtures/stage1_small/meta.json)

FIXTURE = Path(__file__).parent / "fixtures" / "stage1_small" / "data.safetensors"


@pytest.mark.skipif(not FIXTURE.is_file(), reason="parity fixture tests/fixtures/stage1_small missing")
@pytest.mark.parametrize(("tag", "mask_key"), [("pre", "input/mask"), ("pre_border", "input/mask_border")])
def test_matches_official_preprocessing(tag, mask_key):
    from safetensors.torch import load_file

    data = load_file(FIXTURE)
    out = preprocess_stage1(data["input/rgb"], data[mask_key], data["input/pointmap"], CFG)
    for key, value in out.items():
        # The fixture stores rgb_image once: the full photo is the same for both masks.
        ref = data[f"{tag}/{key}"] if f"{tag}/{key}" in data else data[f"pre/{key}"]
        torch.testing.assert_close(value, ref, rtol=0, atol=0, equal_nan=True, msg=key)
