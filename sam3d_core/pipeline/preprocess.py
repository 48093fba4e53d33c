"""Stage-1 preprocessing: point-map normalization, crop around the mask, square pad, resize.

Reproduces the official `ss_preprocessor` (pipeline.yaml) operation for operation, in plain torch:
1. Normalize the full-resolution point map by the object median (shift) and the scene's median
   Chebyshev radius (scale) (`ObjectCentricSSI`).
2. Cropped branch: box of 1.2x the mask's bounding box (zero outside the image, the point map too),
   centred square pad (0 for RGB and mask, NaN for the point map), resize.
3. Full branch: centred square pad with 0 everywhere (the point map too), resize.
Resizes: bilinear with antialias for RGB, legacy nearest for masks and point maps (torchvision's
tensor `Resize`, which skips the call when the size already matches).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from sam3d_core.config import PreprocessConfig

# ----------------------------------------------------------------------------------------------
# 1. Point-map normalization


def apply_pointmap_normalization(pointmap: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(p - shift) / scale per pixel, as the official 4x4 homogeneous transform computes it.

    pointmap [3, H, W], scale [3], shift [3] -> [3, H, W]. The official code applies the inverse of
    `Transform3d().scale(scale).translate(shift)` to [x, y, z, 1] row vectors and divides by w.
    Because w = 0*x + 0*y + 0*z + 1, a non-finite coordinate makes w NaN and so turns all three
    coordinates of that pixel into NaN. We keep that: invalid pixels come out all-NaN.
    """
    inv_scale = 1.0 / scale  # [3]
    matrix = torch.zeros(4, 4, dtype=pointmap.dtype, device=pointmap.device)
    matrix[[0, 1, 2], [0, 1, 2]] = inv_scale
    matrix[3, :3] = -shift * inv_scale
    matrix[3, 3] = 1.0
    points = pointmap.permute(1, 2, 0).reshape(-1, 3)  # [HW, 3]
    homog = torch.cat([points, torch.ones_like(points[:, :1])], dim=1)  # [HW, 4]
    out = torch.bmm(homog[None], matrix[None])[0]  # [HW, 4]
    out = out[:, :3] / out[:, 3:]
    return out.reshape(pointmap.shape[1], pointmap.shape[2], 3).permute(2, 0, 1)


def pointmap_scale_shift(pointmap: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Object-centric scale-shift statistics (official `ObjectCentricSSI`, scene scale).

    pointmap [3, H, W], mask [H, W] bool -> scale [3], shift [3]:
    shift = per-axis nanmedian of the masked points (+-inf count as numbers, NaN is skipped);
    scale = nanmedian over all pixels of max_axis |p - shift| (NaN if any axis is NaN), x3.
    With no finite masked value at all: scale 1, shift 0 (the official fallback).
    """
    flat = pointmap.reshape(3, -1)  # [3, HW]
    masked = flat[:, mask.reshape(-1)]  # [3, M]
    if not masked.isfinite().any():
        return torch.ones_like(flat[:, 0]), torch.zeros_like(flat[:, 0])
    shift = masked.nanmedian(dim=-1).values  # [3]
    radius = (flat - shift[:, None]).abs().max(dim=0).values  # [HW]
    scale = radius.nanmedian(dim=-1).values.expand(3) * 1.0  # scale_factor 1.0
    return scale, shift


def normalize_pointmap(pointmap: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pointmap [3, H, W] float32, mask [H, W] bool -> (normalized [3, H, W], scale [3], shift [3])."""
    if pointmap.ndim != 3 or pointmap.shape[0] != 3:
        raise ValueError(f"pointmap: got shape {tuple(pointmap.shape)}, expected [3, H, W]")
    if mask.shape != pointmap.shape[1:] or mask.dtype != torch.bool:
        raise ValueError(f"mask: got {mask.dtype} {tuple(mask.shape)}, expected bool {tuple(pointmap.shape[1:])}")
    scale, shift = pointmap_scale_shift(pointmap, mask)
    return apply_pointmap_normalization(pointmap, scale, shift), scale, shift


# ----------------------------------------------------------------------------------------------
# 2. Crop around the mask


def mask_crop_box(mask: torch.Tensor, box_size_factor: float) -> tuple[int, int, int, int]:
    """mask [H, W] -> crop box (x0, y0, x1, y1), end-exclusive, possibly outside the image.

    Official rounding: w = max_x - min_x (no +1), size = int(max(w, h, 2) * factor), float centre,
    corners int(centre -+ size // 2) truncated toward zero (so the box may be one pixel narrower
    where a corner is negative).
    """
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        raise ValueError("mask: got an empty mask (no pixel set); pass a mask that covers the object")
    x_min, x_max, y_min, y_max = (int(v) for v in (xs.min(), xs.max(), ys.min(), ys.max()))
    w, h = x_max - x_min, y_max - y_min
    if w < 2 or h < 2:
        raise ValueError(
            f"mask: bounding box is {w + 1}x{h + 1} pixels (x {x_min}..{x_max}, y {y_min}..{y_max}), "
            f"expected at least 3x3; pass a mask that covers more of the object"
        )
    cx, cy = (x_min + x_max) / 2, (y_min + y_max) / 2
    half = int(max(w, h, 2) * box_size_factor) // 2
    return math.trunc(cx - half), math.trunc(cy - half), math.trunc(cx + half), math.trunc(cy + half)


def crop_with_zero_padding(x: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """x [C, H, W] -> [C, y1 - y0, x1 - x0]; the parts outside the image are 0 (as torchvision crop)."""
    x0, y0, x1, y1 = box
    h, w = x.shape[-2:]
    inside = x[:, max(y0, 0) : y1, max(x0, 0) : x1]
    pad = (max(-x0, 0), max(x1 - w, 0), max(-y0, 0), max(y1 - h, 0))  # left, right, top, bottom
    return F.pad(inside, pad, value=0.0)


def pad_to_square(x: torch.Tensor, value: float) -> torch.Tensor:
    """x [C, H, W] -> [C, S, S], S = max(H, W), centred; the odd extra pixel goes bottom/right."""
    h, w = x.shape[-2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return F.pad(x, (left, side - w - left, top, side - h - top), value=value)


def crop_around_mask(
    image: torch.Tensor,
    mask: torch.Tensor,
    pointmap: torch.Tensor,
    box_size_factor: float = 1.2,
    padding_factor: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """image [3, H, W], mask [1, H, W], pointmap [3, H, W] -> the same three, cropped and square.

    Zero outside the image for all three; the square pad (and the optional padding_factor border)
    is 0 for image and mask and NaN for the point map.
    """
    box = mask_crop_box(mask[0], box_size_factor)
    rgba = pad_to_square(crop_with_zero_padding(torch.cat([image, mask]), box), 0.0)
    pointmap = pad_to_square(crop_with_zero_padding(pointmap, box), float("nan"))
    if padding_factor > 0:
        extra = int(rgba.shape[-1] * padding_factor)
        rgba = F.pad(rgba, (extra,) * 4, value=0.0)
        pointmap = F.pad(pointmap, (extra,) * 4, value=float("nan"))
    return rgba[:3], rgba[3:], pointmap


# ----------------------------------------------------------------------------------------------
# 3. Square pad + resize


def resize_square(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """x [C, S, S] -> [C, size, size]; "bilinear" (antialiased) or "nearest"; no-op at the size."""
    if tuple(x.shape[-2:]) == (size, size):
        return x  # torchvision's Resize returns its input unchanged here
    if mode == "bilinear":
        return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return F.interpolate(x[None], size=(size, size), mode="nearest")[0]


def _to_size(image: torch.Tensor, mask: torch.Tensor, pointmap: torch.Tensor, size: int):
    """Official img/mask/pointmap transforms: centred square pad with 0, then resize."""
    return (
        resize_square(pad_to_square(image, 0.0), size, "bilinear"),
        resize_square(pad_to_square(mask, 0.0), size, "nearest"),
        resize_square(pad_to_square(pointmap, 0.0), size, "nearest"),
    )


# ----------------------------------------------------------------------------------------------
# The stage-1 recipe


def _as_tensor(name: str, x, expected: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.array(x, copy=True))  # a copy: callers' arrays may be read-only
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    raise ValueError(f"{name}: got {type(x).__name__}, expected a numpy array or torch tensor {expected}")


def _check_inputs(image, mask, pointmap) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate and convert to image [3, H, W] float32 in [0, 1], mask [H, W] bool, pointmap [3, H, W]."""
    image = _as_tensor("image", image, "uint8 [H, W, 3]")
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(
            f"image: got {image.dtype} {tuple(image.shape)}, expected uint8 [H, W, 3] (RGB in 0..255); "
            f"convert with (img * 255).round().astype(np.uint8) if it is float in [0, 1]"
        )
    h, w = image.shape[:2]
    mask = _as_tensor("mask", mask, "bool [H, W]")
    if mask.ndim != 2 or mask.is_floating_point() or mask.is_complex():
        raise ValueError(
            f"mask: got {mask.dtype} {tuple(mask.shape)}, expected bool or integer [H, W] (nonzero = "
            f"object); threshold a soft mask first, e.g. mask > 0.5"
        )
    if tuple(mask.shape) != (h, w):
        raise ValueError(
            f"mask: got size {tuple(mask.shape)}, expected the image size {(h, w)}; "
            f"resize the mask (nearest) to the image"
        )
    pointmap = _as_tensor("pointmap", pointmap, "float [H, W, 3]")
    if pointmap.ndim != 3 or pointmap.shape[-1] != 3 or not pointmap.is_floating_point():
        raise ValueError(
            f"pointmap: got {pointmap.dtype} {tuple(pointmap.shape)}, expected float [H, W, 3] "
            f"(PyTorch3D camera frame; invalid pixels inf or NaN)"
        )
    # Official pipeline: [0, 255] -> float64 / 255 -> float32.
    image = (image[..., :3].permute(2, 0, 1).double() / 255).float()  # [3, H, W]
    pointmap = pointmap.float().permute(2, 0, 1)  # [3, h, w]
    if tuple(pointmap.shape[1:]) != (h, w):  # the official pipeline resizes a user point map
        pointmap = F.interpolate(pointmap[None], size=(h, w), mode="nearest")[0]
    return image, mask != 0, pointmap


def preprocess_stage1(
    image: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    pointmap: np.ndarray | torch.Tensor,
    cfg: PreprocessConfig,
) -> dict[str, torch.Tensor]:
    """One photo + one object mask + the photo's point map -> the stage-1 condition inputs.

    image: uint8 [H, W, 3] (numpy or torch, RGB 0..255); mask: bool/integer [H, W], nonzero =
    object; pointmap: float [H, W, 3] in the PyTorch3D camera frame (x left, y up, z forward),
    invalid pixels inf/NaN (resized with nearest to the image size if it differs).
    Returns float32 tensors with a batch dim of 1 (official key names):
    image, rgb_image, pointmap, rgb_pointmap [1, 3, S, S]; mask, rgb_image_mask [1, 1, S, S];
    pointmap_scale, pointmap_shift [1, 3]. "rgb_*" are the full-image views.
    """
    image, mask, pointmap = _check_inputs(image, mask, pointmap)
    size = cfg.image_size
    # 1. Normalize the full-resolution point map; the same scale/shift serve both branches.
    normed, scale, shift = normalize_pointmap(pointmap, mask)
    mask = mask[None].float()  # [1, H, W] in {0, 1}
    # 2. Cropped branch.
    crop_image, crop_mask, crop_points = crop_around_mask(image, mask, normed, cfg.box_size_factor, cfg.padding_factor)
    crop_image, crop_mask, crop_points = _to_size(crop_image, crop_mask, crop_points, size)
    # 3. Full branch (the point map's square pad is 0, not NaN: an official quirk we keep).
    full_image, full_mask, full_points = _to_size(image, mask, normed, size)
    out = {
        "image": crop_image,
        "mask": crop_mask,
        "rgb_image": full_image,
        "rgb_image_mask": full_mask,
        "pointmap": crop_points,
        "rgb_pointmap": full_points,
        "pointmap_scale": scale,
        "pointmap_shift": shift,
    }
    return {k: v[None].contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# The stage-1 recipe for a batch on any device (training views rendered on the GPU)


def preprocess_stage1_batch(
    images: torch.Tensor, masks: torch.Tensor, pointmaps: torch.Tensor, cfg: PreprocessConfig
) -> dict[str, torch.Tensor]:
    """`preprocess_stage1` of B views of one size at once, on their device: images [B, H, W, 3] uint8, masks
    [B, H, W] bool, pointmaps [B, H, W, 3] float (tensors on one device) -> the same dict with batch B
    (pointmap_scale / pointmap_shift [B, 3]). On the CPU view b equals `preprocess_stage1` of view b bit for bit
    (statistics, masks, point maps, the full branch, an upsampled crop), except a downsampled cropped image, within
    2 ulp: its antialiased resize (torch's weights, gathered per view instead of one interpolate call per crop
    size) sums the taps in another order. Elementwise ops throughout, so a GPU gives the same numbers but for the
    full branch's interpolate call (the CUDA kernel's rounding).
    """
    b, h, w = masks.shape
    if images.shape != (b, h, w, 3) or images.dtype != torch.uint8 or masks.dtype != torch.bool:
        raise ValueError(
            f"images / masks: got {images.dtype} {tuple(images.shape)} and {masks.dtype} {tuple(masks.shape)}; "
            "expected uint8 [B, H, W, 3] and bool [B, H, W]"
        )
    if pointmaps.shape != (b, h, w, 3) or not pointmaps.is_floating_point():
        raise ValueError(
            f"pointmaps: got {pointmaps.dtype} {tuple(pointmaps.shape)}, expected float [{b}, {h}, {w}, 3]"
        )
    size = cfg.image_size
    image = (images.permute(0, 3, 1, 2).double() / 255).float()  # [B, 3, H, W], as _check_inputs
    points = pointmaps.float().permute(0, 3, 1, 2)  # [B, 3, H, W]
    # 1. Normalize (per view: the object median, the scene's median Chebyshev radius; NaN = not counted).
    flat = points.reshape(b, 3, -1)
    inside = masks.reshape(b, 1, -1)
    shift = torch.where(inside, flat, float("nan")).nanmedian(dim=-1).values  # [B, 3]
    scale = (flat - shift[..., None]).abs().max(dim=1).values.nanmedian(dim=-1).values[:, None].expand(b, 3) * 1.0
    usable = (flat.isfinite() & inside).flatten(1).any(1)[:, None]  # else the official fallback: scale 1, shift 0
    scale, shift = torch.where(usable, scale, 1.0), torch.where(usable, shift, 0.0)
    matrix = torch.zeros(b, 4, 4, dtype=flat.dtype, device=flat.device)  # as apply_pointmap_normalization
    inv_scale = 1.0 / scale
    matrix[:, [0, 1, 2], [0, 1, 2]] = inv_scale
    matrix[:, 3, :3] = -shift * inv_scale
    matrix[:, 3, 3] = 1.0
    homog = torch.cat([flat.transpose(1, 2), torch.ones_like(flat[:, :1].transpose(1, 2))], dim=2)  # [B, HW, 4]
    normed = torch.bmm(homog, matrix)
    normed = (normed[..., :3] / normed[..., 3:]).transpose(1, 2).reshape(b, 3, h, w)
    # 2. Cropped branch: each view's box, square pad and border, resize (taps gathered per view).
    crop = _CropMap(masks, cfg)
    crop_image = crop.resample(image, size)
    crop_mask = crop.nearest(masks[:, None].float(), size, outside=0.0)
    crop_points = crop.nearest(normed, size, outside=float("nan"))
    # 3. Full branch: one padded square per view, one interpolate call for the batch.
    full = [_pad_square_batch(x) for x in (image, masks[:, None].float(), normed)]
    out = {
        "image": crop_image,
        "mask": crop_mask,
        "rgb_image": _resize_batch(full[0], size, "bilinear"),
        "rgb_image_mask": _resize_batch(full[1], size, "nearest"),
        "pointmap": crop_points,
        "rgb_pointmap": _resize_batch(full[2], size, "nearest"),
        "pointmap_scale": scale,
        "pointmap_shift": shift,
    }
    return {k: v.contiguous() for k, v in out.items()}


def _pad_square_batch(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] -> [B, C, S, S] centred with 0, as pad_to_square."""
    h, w = x.shape[-2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return F.pad(x, (left, side - w - left, top, side - h - top), value=0.0)


def _resize_batch(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """resize_square of a batch [B, C, S, S]: the same interpolate call, batched."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    if mode == "bilinear":
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(x, size=(size, size), mode="nearest")


class _CropMap:
    """The cropped branch's geometry for a batch: per view, the box of `mask_crop_box`, its square pad and the
    optional border, as a map from the padded square's rows / columns to image rows / columns (`valid`: inside
    the crop box, whose parts outside the image read 0; elsewhere the pad value)."""

    def __init__(self, masks: torch.Tensor, cfg: PreprocessConfig):
        b, h, w = masks.shape
        rows, cols = masks.any(2), masks.any(1)  # [B, H], [B, W]
        if not bool(rows.any(1).all()):
            empty = int((~rows.any(1)).nonzero()[0])
            raise ValueError(f"masks[{empty}]: got an empty mask (no pixel set); pass masks that cover the objects")
        r = torch.arange(h, device=masks.device)
        c = torch.arange(w, device=masks.device)
        y0 = torch.where(rows, r, h).min(1).values
        y1 = torch.where(rows, r, -1).max(1).values
        x0 = torch.where(cols, c, w).min(1).values
        x1 = torch.where(cols, c, -1).max(1).values
        self.h, self.w = h, w
        # per view: image row / column of the square's first pixel, the square's side, the box y0, y1, x0, x1
        self.boxes = []
        for i, (ya, yb, xa, xb) in enumerate(torch.stack([y0, y1, x0, x1], 1).tolist()):  # one host copy
            bw, bh = xb - xa, yb - ya
            if bw < 2 or bh < 2:
                raise ValueError(f"masks[{i}]: bounding box is {bw + 1}x{bh + 1} pixels, expected at least 3x3")
            cx, cy = (xa + xb) / 2, (ya + yb) / 2
            half = int(max(bw, bh, 2) * cfg.box_size_factor) // 2
            bx0, by0, bx1, by1 = (math.trunc(v) for v in (cx - half, cy - half, cx + half, cy + half))
            side = max(bx1 - bx0, by1 - by0)
            extra = int(side * cfg.padding_factor) if cfg.padding_factor > 0 else 0
            top, left = (side - (by1 - by0)) // 2 + extra, (side - (bx1 - bx0)) // 2 + extra
            self.boxes.append((by0 - top, bx0 - left, side + 2 * extra, by0, by1, bx0, bx1))
        self.dev = masks.device
        t = torch.tensor(self.boxes, device=self.dev)  # [B, 7]
        self.origin_y, self.origin_x, self.side = t[:, 0], t[:, 1], t[:, 2]
        self.crop = t[:, 3:7]

    def _axis(self, idx: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Square indices idx [B, ...] along rows (0) or columns (1) -> (image index clamped, in the crop box,
        in the crop box and the image)."""
        origin, lo, hi, n = (
            (self.origin_y, self.crop[:, 0], self.crop[:, 1], self.h)
            if axis == 0
            else (self.origin_x, self.crop[:, 2], self.crop[:, 3], self.w)
        )
        shape = (-1,) + (1,) * (idx.ndim - 1)
        img = idx + origin.view(shape)
        in_box = (img >= lo.view(shape)) & (img < hi.view(shape))
        return img.clamp(0, n - 1), in_box, in_box & (img >= 0) & (img < n)

    def nearest(self, x: torch.Tensor, size: int, outside: float) -> torch.Tensor:
        """x [B, C, H, W] -> the crops resized with legacy nearest [B, C, size, size]: inside the box, outside
        the image 0; outside the box (square pad, border) `outside`."""
        b, ch = x.shape[:2]
        o = torch.arange(size, device=self.dev, dtype=torch.float32)
        scale = self.side.float() / size  # float32, as torch's nearest
        src = torch.minimum((o[None] * scale[:, None]).floor().long(), self.side[:, None] - 1)
        src = torch.where(self.side[:, None] == size, torch.arange(size, device=self.dev)[None], src)  # [B, size]
        ry, by, iy = self._axis(src, 0)
        rx, bx, ix = self._axis(src, 1)
        rows = x.gather(2, ry[:, None, :, None].expand(b, ch, size, self.w))
        vals = rows.gather(3, rx[:, None, None, :].expand(b, ch, size, size))
        in_img = (iy[:, :, None] & ix[:, None, :])[:, None]
        in_box = (by[:, :, None] & bx[:, None, :])[:, None]
        return torch.where(in_img, vals, torch.where(in_box, 0.0, outside))

    def _taps(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """torch's antialiased bilinear weights (align_corners=False) of each view's side -> size: first
        source index [B, size] and weights [B, size, K] float32 (0 past each pixel's span)."""
        scale = self.side.float() / size  # [B] float32 (torch computes the weights in the input's type)
        support = torch.where(scale >= 1.0, scale, torch.ones_like(scale))
        invscale = torch.where(scale >= 1.0, (1.0 / scale.double()).float(), 1.0).double()  # [B] as torch rounds it
        centre = scale[:, None] * (torch.arange(size, device=self.dev, dtype=torch.float32)[None] + 0.5)
        xmin = ((centre - support[:, None]).double() + 0.5).trunc().long().clamp(min=0)
        xsize = torch.minimum(((centre + support[:, None]).double() + 0.5).trunc().long(), self.side[:, None]) - xmin
        k = int(math.ceil(2 * float(support.max()))) + 2
        weights = []
        for j in range(k):
            x = (((j + xmin).float() - centre).double() + 0.5) * invscale[:, None]
            weights.append(torch.where(j < xsize, (1.0 - x.float().abs()).clamp(min=0.0), 0.0))
        total = weights[0]
        for wj in weights[1:]:
            total = total + wj
        weights = torch.stack(weights, -1)
        return xmin, torch.where(total[..., None] != 0, weights / total[..., None], weights)

    def resample(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """x [B, C, H, W] -> the crops resized bilinear with antialiasing [B, C, size, size] (0 outside the image
        and the box): along the width, then the height, each pixel's taps accumulated in order with fused
        multiply-adds (emulated in float64), as torch's CPU kernel does: the same bits."""
        b, ch = x.shape[:2]
        first, weights = self._taps(size)  # [B, size], [B, size, K]
        cols = None
        for j in range(weights.shape[-1]):
            rx, _, ix = self._axis(first + j, 1)
            v = torch.where(ix[:, None, None, :], x.gather(3, rx[:, None, None, :].expand(b, ch, self.h, size)), 0.0)
            cols = _fma(weights[:, None, None, :, j], v, cols)
        out = None
        for j in range(weights.shape[-1]):
            ry, _, iy = self._axis(first + j, 0)
            v = torch.where(iy[:, None, :, None], cols.gather(2, ry[:, None, :, None].expand(b, ch, size, size)), 0.0)
            out = _fma(weights[:, None, :, None, j], v, out)
        return out


def _fma(w: torch.Tensor, v: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
    """acc + w * v rounded once to float32 (w * v alone when acc is None): a float32 product is exact in float64."""
    if acc is None:
        return w * v
    return (w.double() * v.double() + acc.double()).float()


# ----------------------------------------------------------------------------------------------
# The stage-2 recipe


def preprocess_stage2(
    image: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    cfg: PreprocessConfig,
) -> dict[str, torch.Tensor]:
    """One photo + one object mask -> the stage-2 (SLAT) condition inputs; no point map.

    The official `slat_preprocessor` crops, pads and resizes image and mask exactly as the stage-1
    branch does (box 1.2x the mask's bounding box, square pad with 0, bilinear/nearest resize); only
    the point map is absent. Same inputs as `preprocess_stage1`. Returns float32 tensors with a batch
    dim of 1: image, rgb_image [1, 3, S, S]; mask, rgb_image_mask [1, 1, S, S].
    """
    raw = _as_tensor("image", image, "uint8 [H, W, 3]")
    # _check_inputs validates image and mask; a zero point map of the image size stands in for the absent one.
    image, mask, _ = _check_inputs(raw, mask, torch.zeros(*raw.shape[:2], 3))
    size = cfg.image_size
    mask = mask[None].float()  # [1, H, W] in {0, 1}
    # 1. Cropped branch: box around the mask, zero outside the image, square pad, optional border.
    box = mask_crop_box(mask[0], cfg.box_size_factor)
    rgba = pad_to_square(crop_with_zero_padding(torch.cat([image, mask]), box), 0.0)
    if cfg.padding_factor > 0:
        rgba = F.pad(rgba, (int(rgba.shape[-1] * cfg.padding_factor),) * 4, value=0.0)
    out = {
        "image": resize_square(pad_to_square(rgba[:3], 0.0), size, "bilinear"),
        "mask": resize_square(pad_to_square(rgba[3:], 0.0), size, "nearest"),
        # 2. Full branch: square pad and resize only.
        "rgb_image": resize_square(pad_to_square(image, 0.0), size, "bilinear"),
        "rgb_image_mask": resize_square(pad_to_square(mask, 0.0), size, "nearest"),
    }
    return {k: v[None].contiguous() for k, v in out.items()}
