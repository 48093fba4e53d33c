"""SAM-like mask noise on tensors: `synth.mask_noise` for many masks at once, on any device.

    params = [draw_mask_noise(rng, H, W) or None, ...]      # data.synth: the draws, shared with the cv2 version
    spots = [[(u, radius), ...], ...]                        # per mask: where its holes go (u in [0, 1)) and how big
    noisy = mask_noise_batch(masks, params, spots)           # masks [B, H, W] bool -> [B, H, W] bool (None: as is)

The steps of the cv2 version as tensor ops over the batch: erode or dilate with cv2's elliptic kernel (the image
border neither erodes nor dilates), the jitter field resized as cv2.INTER_CUBIC does (half-pixel centres,
a = -0.75, edge pixels repeated), cv2's Gaussian blur of a float image (kernel size round(8 sigma + 1) | 1,
reflect-101 border), the band rule, and filled circles of radius 1-3 in cv2's shapes. A hole goes at mask pixel
floor(u * count) in row-major order (the cv2 version draws that index directly: uniform over the mask either way).

Morphology and holes are exact; the jitter agrees with cv2 up to float rounding (a pixel whose value sits within
rounding of 0.5 may differ). Every float step is an elementwise op in a fixed order (no convolution kernels, whose
algorithms differ by device), so a mask comes out bit for bit the same on the CPU and on a GPU.
"""

from __future__ import annotations

import numpy as np
import torch

from sam3d_core.data.synth import NoiseParams

# cv2.circle(m, centre, r, 0, -1) for r = 1, 2, 3: the filled shapes it draws (one string per row, "#" = set).
_CIRCLES = {
    1: (".#.", "###", ".#."),
    2: ("..#..", ".###.", "#####", ".###.", "..#.."),
    3: ("...#...", ".#####.", ".#####.", "#######", ".#####.", ".#####.", "...#..."),
}
_BLUR_TAPS = 25  # the widest kernel: round(8 * 3 + 1) | 1 for sigma <= 3 (synth.draw_mask_noise)
_CUBIC_A = -0.75  # cv2's (and torch's) bicubic constant


def ellipse_kernel(k: int) -> np.ndarray:
    """cv2.getStructuringElement(MORPH_ELLIPSE, (2k + 1, 2k + 1)) as bool [2k + 1, 2k + 1]: row dy spans
    |dx| <= round(sqrt(k^2 - dy^2)) (half to even, as cv2's rounding)."""
    out = np.zeros((2 * k + 1, 2 * k + 1), bool)
    for dy in range(-k, k + 1):
        dx = int(np.rint(np.sqrt(k * k - dy * dy)))
        out[dy + k, k - dx : k + dx + 1] = True
    return out


def circle_offsets(radius: int) -> np.ndarray:
    """(dy, dx) [n, 2] of the pixels cv2.circle fills around its centre for radius 1, 2 or 3."""
    rows = _CIRCLES[radius]
    return np.array([(i - radius, j - radius) for i, row in enumerate(rows) for j, c in enumerate(row) if c == "#"])


def gaussian_taps(sigma: float) -> np.ndarray:
    """cv2.GaussianBlur's 1-D kernel of a float image for `sigma`, centred in _BLUR_TAPS taps (float32)."""
    n = int(np.rint(sigma * 8 + 1)) | 1
    x = np.arange(n) - (n - 1) * 0.5
    w = np.exp(-0.5 / (sigma * sigma) * x * x)
    w = (w / w.sum()).astype(np.float32)
    out = np.zeros(_BLUR_TAPS, np.float32)
    out[(_BLUR_TAPS - n) // 2 : (_BLUR_TAPS + n) // 2] = w
    return out


def _reflect101(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Indices reflected into 0 .. n - 1 without repeating the edge (cv2.BORDER_REFLECT_101)."""
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    i = idx.remainder(period)
    return torch.where(i >= n, period - i, i)


def _morph(m: torch.Tensor, erode: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """Erode or dilate masks m [n, H, W] bool by cv2's ellipse of radius px [n] (1-3). Erosion is the dilation
    of the complement, whose outside counts as empty: the image border neither erodes nor dilates (cv2's
    default border values). A max over the kernel's offsets (at most 37 shifted copies): exact, any device."""
    n, h, w = m.shape
    table = np.zeros((3, 7, 7), bool)  # the three kernels centred in 7 x 7
    for k in (1, 2, 3):
        table[k - 1, 3 - k : 4 + k, 3 - k : 4 + k] = ellipse_kernel(k)
    kernel = torch.from_numpy(table).to(m.device)[px - 1]  # [n, 7, 7]
    x = torch.where(erode[:, None, None], ~m, m)
    padded = torch.nn.functional.pad(x, (3, 3, 3, 3))
    out = torch.zeros_like(x)
    for dy, dx in np.argwhere(table[2]) - 3:
        out |= padded[:, 3 + dy : 3 + dy + h, 3 + dx : 3 + dx + w] & kernel[:, dy + 3, dx + 3, None, None]
    return torch.where(erode[:, None, None], ~out, out)


def _cubic_weights(out_size: int, in_size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cv2.INTER_CUBIC taps of a resize in_size [n] -> out_size: source indices [n, out, 4] (clamped to the edge)
    and weights [n, out, 4] float32."""
    dev = in_size.device
    scale = in_size.double() / out_size  # [n]
    fx = ((torch.arange(out_size, device=dev, dtype=torch.float64)[None] + 0.5) * scale[:, None] - 0.5).float()
    sx = fx.floor()
    t = fx - sx
    a = _CUBIC_A
    c0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    c1 = ((a + 2) * t - (a + 3)) * t * t + 1
    c2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    weights = torch.stack([c0, c1, c2, 1 - c0 - c1 - c2], -1)
    idx = sx.long()[..., None] + torch.arange(-1, 3, device=dev)
    return torch.minimum(idx.clamp(min=0), (in_size - 1)[:, None, None]), weights


def _jitter_field(fields: list[np.ndarray], h: int, w: int, dev: torch.device) -> torch.Tensor:
    """The jitter fields (each [h // cell + 2, w // cell + 2]) cubic-resized to [n, h, w] float32."""
    fh, fw = max(f.shape[0] for f in fields), max(f.shape[1] for f in fields)
    pad = np.zeros((len(fields), fh, fw), np.float32)
    for i, f in enumerate(fields):
        pad[i, : f.shape[0], : f.shape[1]] = f
    src = torch.from_numpy(pad).to(dev)
    sizes = torch.tensor([f.shape for f in fields], device=dev)  # [n, 2]
    ix, wx = _cubic_weights(w, sizes[:, 1])  # [n, w, 4]
    iy, wy = _cubic_weights(h, sizes[:, 0])  # [n, h, 4]
    rows = torch.zeros(len(fields), fh, w, device=dev)
    for j in range(4):  # horizontal then vertical, the taps in order (as cv2's separable resize)
        rows = rows + wx[:, None, :, j] * src.gather(2, ix[:, None, :, j].expand(-1, fh, -1))
    out = torch.zeros(len(fields), h, w, device=dev)
    for j in range(4):
        out = out + wy[:, :, j, None] * rows.gather(1, iy[:, :, j, None].expand(-1, -1, w))
    return out


def _blur(m: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of m [n, H, W] float32 with per-mask kernels taps [n, _BLUR_TAPS], reflect-101."""
    n, h, w = m.shape
    r = _BLUR_TAPS // 2
    cols = _reflect101(torch.arange(-r, w + r, device=m.device), w)
    padded = m[:, :, cols]
    rows = torch.zeros_like(m)
    for t in range(_BLUR_TAPS):
        rows = rows + taps[:, t, None, None] * padded[:, :, t : t + w]
    padded = rows[:, _reflect101(torch.arange(-r, h + r, device=m.device), h)]
    out = torch.zeros_like(m)
    for t in range(_BLUR_TAPS):
        out = out + taps[:, t, None, None] * padded[:, t : t + h]
    return out


def _holes(m: torch.Tensor, spots: list[list[tuple[float, int]]]) -> torch.Tensor:
    """Filled circles (cv2's shapes) cleared at mask pixel floor(u * count) (row-major) of each spot; the places
    are chosen on m before any hole is cut, as the cv2 version does. m [n, H, W] bool, spots per mask."""
    n, h, w = m.shape
    flat = m.reshape(n, -1)
    count = flat.sum(1)  # [n]
    owner = [i for i, s in enumerate(spots) for _ in s]
    if not owner:
        return m
    dev = m.device
    u = torch.tensor([p[0] for s in spots for p in s], dtype=torch.float64, device=dev)
    radius = [p[1] for s in spots for p in s]
    who = torch.tensor(owner, device=dev)
    k = torch.minimum((u * count[who]).floor().long(), count[who] - 1)  # the k-th set pixel (0-based)
    cums = flat.long().cumsum(1)  # [n, HW]
    pos = torch.searchsorted(cums[who], (k + 1)[:, None]).squeeze(1)  # first index whose count reaches k + 1
    offsets = [circle_offsets(r) for r in radius]
    size = max(len(o) for o in offsets)
    table = np.zeros((len(offsets), size, 2), np.int64)
    valid = np.zeros((len(offsets), size), bool)
    for i, o in enumerate(offsets):
        table[i, : len(o)], valid[i, : len(o)] = o, True
    table_t, valid_t = torch.from_numpy(table).to(dev), torch.from_numpy(valid).to(dev)
    y = (pos // w)[:, None] + table_t[..., 0]  # [spots, size]
    x = (pos % w)[:, None] + table_t[..., 1]
    keep = valid_t & (count[who] > 0)[:, None] & (y >= 0) & (y < h) & (x >= 0) & (x < w)
    out = m.clone()
    out[who[:, None].expand_as(y)[keep], y[keep], x[keep]] = False
    return out


def mask_noise_batch(
    masks: torch.Tensor, params: list[NoiseParams | None], spots: list[list[tuple[float, int]]] | None = None
) -> torch.Tensor:
    """`synth.mask_noise` of every mask whose params are not None: masks [B, H, W] bool (any device) ->
    [B, H, W] bool. spots[b]: (u, radius) of each of mask b's holes (len = params[b].holes). A mask the noise
    empties comes back as it was (as the cv2 version)."""
    if masks.ndim != 3 or masks.dtype != torch.bool or len(params) != masks.shape[0]:
        raise ValueError(f"masks: got {masks.dtype} {tuple(masks.shape)} for {len(params)} params; expected [B, H, W]")
    sel = [i for i, p in enumerate(params) if p is not None]
    if not sel:
        return masks
    dev, (_, h, w) = masks.device, masks.shape
    ps = [params[i] for i in sel]
    m0 = masks[sel]
    erode = torch.tensor([p.erode for p in ps], device=dev)
    px = torch.tensor([p.px for p in ps], device=dev)
    m = _morph(m0, erode, px)
    jit = [i for i, p in enumerate(ps) if p.cell]
    if jit:
        field = _jitter_field([ps[i].field for i in jit], h, w, dev)
        taps = torch.from_numpy(np.stack([gaussian_taps(ps[i].sigma) for i in jit])).to(dev)
        amp = torch.tensor([ps[i].amplitude for i in jit], dtype=torch.float32, device=dev)[:, None, None]
        blurred = _blur(m[jit].float(), taps)
        band = (blurred > 0.02) & (blurred < 0.98)
        m[jit] = torch.where(band, (blurred + amp * field) > 0.5, blurred > 0.5)
    holes = [list(spots[i]) if spots and ps[j].holes else [] for j, i in enumerate(sel)]
    m = _holes(m, holes)
    m = torch.where(m.flatten(1).any(1)[:, None, None], m, m0)  # never empty: the input comes back
    out = masks.clone()
    out[sel] = m
    return out


__all__ = ["circle_offsets", "ellipse_kernel", "gaussian_taps", "mask_noise_batch"]
