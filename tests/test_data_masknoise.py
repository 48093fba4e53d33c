"""`data.masknoise.mask_noise_batch`, the tensor twin of `data.synth.mask_noise` (cv2): the same noise for the same
draws, boundary band only, never empty."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import torch

from sam3d_core.data import masknoise as mn
from sam3d_core.data.synth import draw_mask_noise, mask_noise


def _blob(h: int, w: int, seed: int) -> np.ndarray:
    """A mask with a smooth random outline (an object's silhouette), touching the border for some seeds."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    ang = np.arctan2(yy - cy, xx - cx)
    r = min(h, w) * (0.25 + 0.08 * np.sin(3 * ang + rng.uniform(0, 6)) + rng.uniform(0, 0.2))
    return np.hypot(yy - cy, xx - cx) < r


def test_kernels_shapes_and_blur_taps_are_cv2s():
    for k in (1, 2, 3):
        ref = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)).astype(bool)
        assert np.array_equal(mn.ellipse_kernel(k), ref)
    for r in (1, 2, 3):
        canvas = np.zeros((9, 9), np.uint8)
        cv2.circle(canvas, (4, 4), r, 1, -1)
        assert sorted(map(tuple, np.argwhere(canvas) - 4)) == sorted(map(tuple, mn.circle_offsets(r)))
    for sigma in (1.0, 1.73, 2.5, 3.0):
        taps = mn.gaussian_taps(sigma)
        n = int(np.rint(sigma * 8 + 1)) | 1
        assert np.array_equal(taps[taps != 0], cv2.getGaussianKernel(n, sigma, cv2.CV_32F)[:, 0])


def test_the_same_draws_give_cv2s_noise():
    """Morphology and holes exact; the jitter's floats within rounding (a pixel at 0.5 +- 1e-6 may flip)."""
    exact, differing, total = 0, 0, 0
    for seed in range(40):
        h, w = (70, 90) if seed % 2 else (96, 64)
        mask = _blob(h, w, seed)
        ref, how = mask_noise(mask, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)  # the draws of mask_noise, in its order
        p = draw_mask_noise(rng, h, w)
        m = torch.from_numpy(mask)[None]
        spots = []
        if p.holes:  # where cv2 cut its holes: the same pixel index of the mask before the holes
            before = mn.mask_noise_batch(m, [replace(p, holes=0)])[0]
            count = int(before.sum())
            for _ in range(p.holes if count else 0):
                i, r = int(rng.integers(0, count)), int(rng.integers(1, 4))
                spots.append(((i + 0.5) / count, r))
        got = mn.mask_noise_batch(m, [p], [spots])[0].numpy()
        assert how == p.how() or "fallback" in how
        if not p.cell:
            assert np.array_equal(got, ref), how
            exact += 1
        differing += int((got != ref).sum())
        total += got.size
    assert exact >= 8 and differing <= 1e-4 * total


def test_noise_stays_in_the_boundary_band_and_never_empties_a_mask():
    from scipy.ndimage import distance_transform_edt

    big = np.zeros((400, 400), bool)
    big[150:210, 160:240] = True
    far = distance_transform_edt(~big)
    rng = np.random.default_rng(0)
    params = [draw_mask_noise(rng, 400, 400) for _ in range(12)]
    spots = [[(float(rng.uniform()), int(rng.integers(1, 4))) for _ in range(p.holes)] for p in params]
    noisy = mn.mask_noise_batch(torch.from_numpy(big)[None].repeat(12, 1, 1), params, spots).numpy()
    for p, n in zip(params, noisy, strict=True):
        assert far[n].max() <= 3 + 9, p.how()  # dilation (<= 3 px) + the blur's band (3 sigma <= 9 px)
        assert not np.array_equal(n, big)
    tiny = np.zeros((3, 50, 50), bool)
    tiny[:, 25, 25] = True  # erosion empties it: the input comes back
    eroding = [replace(draw_mask_noise(np.random.default_rng(s), 50, 50), erode=True) for s in range(3)]
    assert np.array_equal(mn.mask_noise_batch(torch.from_numpy(tiny), eroding, [[(0.5, 1)]] * 3).numpy(), tiny)


def test_masks_without_params_pass_through_and_each_mask_gets_its_own_noise():
    masks = torch.from_numpy(np.stack([_blob(64, 64, s) for s in range(4)]))
    rng = np.random.default_rng(5)
    params = [None, draw_mask_noise(rng, 64, 64), None, draw_mask_noise(rng, 64, 64)]
    out = mn.mask_noise_batch(masks, params, [[(0.3, 2)] * (p.holes if p else 0) for p in params])
    assert torch.equal(out[0], masks[0]) and torch.equal(out[2], masks[2])
    for i in (1, 3):  # a batch of one gives the same
        one = mn.mask_noise_batch(masks[i : i + 1], [params[i]], [[(0.3, 2)] * params[i].holes])[0]
        assert torch.equal(out[i], one) and not torch.equal(out[i], masks[i])
