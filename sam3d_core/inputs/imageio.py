"""Photo and mask files -> checked arrays, or an `InputError` that names the problem and the fix.

Everything lives in the photo's *displayed* frame: the EXIF orientation is applied when a photo (or a
mask file) is loaded, so a mask drawn on the photo as an image viewer shows it lines up with
`Photo.rgb`. A mask drawn on the unrotated pixels of a photo with an EXIF rotation of 90 degrees is
refused with that explanation (flips and 180-degree turns keep the size and cannot be detected).

Photo rules, chosen so that any reasonable file works and nothing is silently wrong:
* formats: those in `FORMATS` that this Pillow can read; HEIC and unreadable AVIF get "convert to PNG/JPEG";
* more than `max_pixels` (default 100 MP, checked from the header before decoding) is refused; Pillow's
  own hard limit (2 x Image.MAX_IMAGE_PIXELS, ~179 MP) applies above it, and we never change it;
* a longest side above `max_side` (default 8192) is downscaled (Lanczos) with a note; masks at the
  original size are then downscaled to match by `load_mask`;
* a side under `min_side` (default 32 px) is refused;
* 16-bit grey is scaled to 8 bits (v * 255 / 65535, never clipped); 16-bit colour is reduced by Pillow to
  its high byte (within one level of that); 32-bit float is scaled by its value range;
* an alpha channel is kept in `Photo.alpha` (a cut-out's alpha can be the object mask) and the
  transparent pixels of `rgb` are composited over neutral grey; a fully opaque alpha is dropped;
* animated or multi-page files: the first frame, with a note.
No colour management: pixel values are used as stored (a non-sRGB ICC profile is named in a note).
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

MAX_PIXELS = 100_000_000  # our decompression-bomb limit, checked before decoding (Pillow's own is ~89 MP)
MAX_SIDE = 8192  # longer photos are downscaled to this longest side
MIN_SIDE = 32  # shorter sides are refused: the model works on 518 x 518 crops
MIN_MASK_PIXELS = 100
MAX_MASK_FRACTION = 0.98  # a mask covering more of the photo is most likely inverted
FORMATS = ("JPEG", "MPO", "PNG", "TIFF", "WEBP", "BMP", "GIF", "AVIF", "TGA", "PPM")
FORMATS_HINT = "JPEG, PNG, TIFF, WebP, BMP, GIF, AVIF, TGA, PPM"
GREY = 128  # background for transparent pixels

EXIF_IFD = 0x8769
TAG_ORIENTATION = 0x0112
TAG_FOCAL_LENGTH = 0x920A
TAG_FOCAL_35MM = 0xA405
TAG_FOCAL_PLANE_X, TAG_FOCAL_PLANE_Y, TAG_FOCAL_PLANE_UNIT = 0xA20E, 0xA20F, 0xA210
FOCAL_PLANE_UNIT_MM = {2: 25.4, 3: 10.0, 4: 1.0, 5: 0.001}  # EXIF unit code -> mm (2 = inch, the default)
ORIENTATION_WORDS = {
    2: "mirrored",
    3: "rotated 180 degrees",
    4: "flipped upside down",
    5: "mirrored and rotated 90 degrees",
    6: "rotated 90 degrees",
    7: "mirrored and rotated 90 degrees",
    8: "rotated 90 degrees",
}
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


class InputError(ValueError):
    """A photo or mask we cannot use. `field` names the input ("photo", "mask", "K", "fov"); `details`
    holds JSON-serialisable facts (sizes, counts, path) for the worker protocol and the UI."""

    def __init__(self, message: str, field: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.field = field
        self.details = dict(details or {})

    def to_dict(self) -> dict[str, Any]:
        return {"message": str(self), "field": self.field, "details": self.details}


@dataclass
class Photo:
    """A loaded photo in its displayed frame (EXIF orientation applied).

    rgb [H, W, 3] uint8 C-contiguous; alpha [H, W] uint8 or None. width/height: of `rgb`;
    source_width/source_height: of the file as displayed, before any downscale.
    focal_plane_px_per_mm: sensor pixels per mm along the displayed x and y, at the source size.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    path: Path | None
    width: int
    height: int
    original_mode: str
    exif_orientation_applied: bool
    focal_length_35mm: float | None = None
    focal_length_mm: float | None = None
    notes: list[str] = field(default_factory=list)
    format: str | None = None
    exif_orientation: int = 1
    source_width: int = 0
    source_height: int = 0
    focal_plane_px_per_mm: tuple[float, float] | None = None

    @property
    def scale(self) -> float:
        """Pixels of `rgb` per pixel of the source (1.0 unless the photo was downscaled)."""
        return self.width / self.source_width if self.source_width else 1.0

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<photo bytes>"


# ----------------------------------------------------------------------------------------------
# Opening a file


def _open_source(
    source: str | os.PathLike | bytes | bytearray | memoryview | BinaryIO, what: str
) -> tuple[Path | None, BinaryIO, str]:
    """(path or None, seekable binary stream, name for messages); missing files, folders and empty files refused."""
    if isinstance(source, (bytes, bytearray, memoryview)) or hasattr(source, "read"):
        data = bytes(source) if not hasattr(source, "read") else source.read()
        if not data:
            raise InputError(f"the {what} data is empty; pass the contents of an image file", what)
        return None, io.BytesIO(data), f"<{what} bytes>"
    path = Path(source).expanduser()
    name = str(path)
    if path.is_dir():
        raise InputError(f"{what} {name} is a folder, not an image file; pass the file itself", what, {"path": name})
    if not path.exists():
        raise InputError(
            f"{what} file {name} does not exist; check the path (relative paths are read from {os.getcwd()})",
            what,
            {"path": name},
        )
    try:
        if path.stat().st_size == 0:
            raise InputError(
                f"{what} file {name} is empty (0 bytes); the copy or download failed, export it again",
                what,
                {"path": name},
            )
        return path, open(path, "rb"), name
    except PermissionError:
        raise InputError(
            f"{what} file {name} cannot be read (permission denied); check its permissions", what, {"path": name}
        ) from None


def _allowed_formats() -> list[str]:
    Image.init()  # registers every plugin once; Image.open fails on a format id it does not know
    return [f for f in FORMATS if f in Image.OPEN]


def _sniff(head: bytes) -> str | None:
    """A format name for files Pillow could not identify, from their first bytes."""
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIC/HEIF"
        if brand in (b"avif", b"avis"):
            return "AVIF"
        return "an MP4/QuickTime-family file"
    if head.startswith(b"%PDF"):
        return "PDF"
    if head.startswith(b"8BPS"):
        return "Photoshop PSD"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF (or camera raw)"
    return None


def _not_readable(name: str, what: str, head: bytes) -> InputError:
    kind = _sniff(head)
    details = {"path": name, "detected": kind}
    if kind in ("HEIC/HEIF", "AVIF"):
        return InputError(
            f"{what} {name} is a {kind} image, which this Pillow cannot read; convert it to PNG or "
            "JPEG (e.g. export from Photos/Preview, or `magick in.heic out.png`)",
            what,
            details,
        )
    why = f"it looks like {kind}" if kind else "its first bytes match no supported format"
    return InputError(
        f"{what} {name} is not an image Pillow can read ({why}); save it as PNG or JPEG "
        f"(readable formats: {FORMATS_HINT})",
        what,
        details,
    )


def _corrupt(name: str, what: str, cause: Exception) -> InputError:
    return InputError(
        f"{what} {name} is truncated or corrupt ({type(cause).__name__}: {str(cause)[:160]}); copy "
        "the original file again, or open it in an image editor and save it as PNG or JPEG",
        what,
        {"path": name},
    )


def _bomb_error(name: str, what: str, pixels: int | None, limit: int) -> InputError:
    size = f"{pixels:,} pixels" if pixels else "more pixels than Pillow allows"
    return InputError(
        f"{what} {name} has {size}, above the limit of {limit:,} (a decompression-bomb guard); "
        f"downscale it below {limit // 1_000_000} megapixels first (e.g. `magick in.jpg -resize 50% "
        "out.jpg`, or export at a smaller size)",
        what,
        {"path": name, "pixels": pixels, "limit": limit},
    )


def _open(fp: BinaryIO, name: str, what: str, max_pixels: int) -> Image.Image:
    """Image.open restricted to FORMATS, with our pixel limit checked from the header (before decoding)."""
    head = fp.read(16)
    fp.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's bomb warning (we check max_pixels) and format hints
            im = Image.open(fp, formats=_allowed_formats())
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise _bomb_error(name, what, int(found.group(1)) if found else None, max_pixels) from None
    except UnidentifiedImageError:
        raise _not_readable(name, what, head) from None
    except DECODE_ERRORS as e:  # a format was recognised but its header is broken
        raise _corrupt(name, what, e) from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise _bomb_error(name, what, w * h, max_pixels)
    return im


def _decode(im: Image.Image, name: str, what: str, max_pixels: int, notes: list[str]) -> tuple[Image.Image, int]:
    """(frame 0 decoded and EXIF-transposed, the EXIF orientation applied: 1..8).

    Truncated or corrupt data -> InputError; unreadable EXIF -> orientation not applied, with a note.
    """
    try:
        orientation = im.getexif().get(TAG_ORIENTATION, 1)  # read before loading: TIFF applies it while loading
    except DECODE_ERRORS:
        orientation = None
    try:
        if getattr(im, "is_animated", False):
            notes.append(f"{what} has {im.n_frames} frames (animated or multi-page); the first one is used")
            im.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
    except Image.DecompressionBombError:
        raise _bomb_error(name, what, im.size[0] * im.size[1], max_pixels) from None
    except DECODE_ERRORS as e:
        raise _corrupt(name, what, e) from None
    try:
        if orientation is None:
            raise ValueError("unreadable EXIF")
        if orientation == 1:  # nothing to turn: no copy (exif_transpose copies, 400 MB for a 100 MP photo)
            return im, 1
        out = ImageOps.exif_transpose(im)
    except DECODE_ERRORS:
        notes.append(f"{what}: the EXIF data is unreadable; its orientation is not applied")
        return im, 1
    return out, orientation if orientation in ORIENTATION_WORDS else 1


# ----------------------------------------------------------------------------------------------
# Modes -> 8-bit RGB (+ alpha)


def _scale16(a: np.ndarray) -> np.ndarray:
    return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # 0..65535 -> 0..255, rounded


def _scale_range(a: np.ndarray, what: str, notes: list[str]) -> np.ndarray:
    """A float or wide-integer grey image -> uint8 by its value range ([0, 1] kept as such)."""
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        notes.append(f"{what}: {int((~finite).sum())} non-finite values set to black")
        a = np.where(finite, a, np.nan)
    lo, hi = (float(np.nanmin(a)), float(np.nanmax(a))) if finite.any() else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
        notes.append(f"{what}: floating-point values in [0, 1] scaled to 0..255")
    else:
        notes.append(f"{what}: values in [{lo:g}, {hi:g}] scaled to 0..255 (lowest = black, highest = white)")
    out = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    return np.nan_to_num(np.round(out), nan=0.0).clip(0, 255).astype(np.uint8)


def _grey_to_uint8(im: Image.Image, what: str, notes: list[str]) -> np.ndarray:
    """I;16*, I and F modes -> [H, W] uint8, scaled (Pillow's convert("L") would clip at 255)."""
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        notes.append(f"{what}: 16-bit grey scaled to 8 bits")
        return _scale16(a)
    if im.mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535:
        if a.max() <= 255:
            return a.astype(np.uint8)
        notes.append(f"{what}: integer grey with values up to {int(a.max())} read as 16-bit and scaled to 8 bits")
        return _scale16(a)
    return _scale_range(a, what, notes)


def _icc_name(icc: bytes) -> str:
    """The description of an embedded ICC profile ("sRGB IEC61966-2.1", "Display P3", ...)."""
    try:
        from PIL import ImageCms  # needs Pillow built with littlecms

        return ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).strip() or "unnamed"
    except (ImportError, OSError):
        return "unreadable"


def _rawmode(im: Image.Image) -> str:
    args = im.tile[0].args if im.tile else None
    args = args[0] if isinstance(args, tuple) and args else args
    return args if isinstance(args, str) else ""


def _to_rgb8(im: Image.Image, what: str, notes: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """Any decoded mode -> (rgb [H, W, 3] uint8, alpha [H, W] uint8 or None)."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        g = _grey_to_uint8(im, what, notes)
        return np.repeat(g[:, :, None], 3, axis=2), None
    icc = _icc_name(im.info["icc_profile"]) if im.info.get("icc_profile") else None
    if mode == "CMYK":
        notes.append(
            f"{what}: CMYK converted to RGB without colour management"
            + (f" (its colour profile, {icc}, is ignored)" if icc else "")
        )
    elif icc and "srgb" not in icc.lower():
        notes.append(f"{what}: its colour profile ({icc}) is ignored; values are used as if sRGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in im.info)
    try:
        target = "RGBA" if has_alpha else "RGB"
        conv = im if im.mode == target else im.convert(target)  # no full-size copy when already there
    except ValueError as e:
        raise InputError(
            f"{what} has colour mode {mode!r}, which cannot be converted to RGB ({e}); save it as "
            "8-bit RGB PNG or JPEG",
            what,
            {"mode": mode},
        ) from None
    arr = np.asarray(conv)
    if not has_alpha:
        return np.ascontiguousarray(arr), None
    rgb, alpha = arr[:, :, :3], np.ascontiguousarray(arr[:, :, 3])
    if alpha.min() == 255:
        notes.append(f"{what}: the alpha channel is fully opaque and was dropped")
        return np.ascontiguousarray(rgb), None
    a = alpha[:, :, None].astype(np.uint16)
    rgb = ((rgb * a + GREY * (255 - a) + 127) // 255).astype(np.uint8)
    notes.append(f"{what}: transparent pixels shown over grey; the alpha channel is kept (usable as the mask)")
    return np.ascontiguousarray(rgb), alpha


def _fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so that the longest side is max_side."""
    f = max_side / max(width, height)
    return max(1, round(width * f)), max(1, round(height * f))


def _resize(a: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """uint8 [H, W] or [H, W, 3] -> the same at size (width, height)."""
    return np.ascontiguousarray(np.asarray(Image.fromarray(a).resize(size, resample, reducing_gap=3.0)))


# ----------------------------------------------------------------------------------------------
# EXIF


def _positive(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return f if np.isfinite(f) and f > 0 else None


def _read_exif(im: Image.Image, notes: list[str]) -> dict[str, Any]:
    """Focal lengths and focal-plane resolution (pixels per mm, stored-image axes) from EXIF."""
    try:
        exif = im.getexif()
        tags = {**dict(exif), **dict(exif.get_ifd(EXIF_IFD))}
    except DECODE_ERRORS:
        notes.append("photo: the EXIF data is unreadable; focal length ignored")
        return {}
    out: dict[str, Any] = {
        "focal_35mm": _positive(tags.get(TAG_FOCAL_35MM)),
        "focal_mm": _positive(tags.get(TAG_FOCAL_LENGTH)),
    }
    px, py = _positive(tags.get(TAG_FOCAL_PLANE_X)), _positive(tags.get(TAG_FOCAL_PLANE_Y))
    unit_mm = FOCAL_PLANE_UNIT_MM.get(tags.get(TAG_FOCAL_PLANE_UNIT, 2))
    if px and unit_mm:
        out["px_per_mm"] = (px / unit_mm, (py or px) / unit_mm)
    return out


# ----------------------------------------------------------------------------------------------
# Photos


def load_photo(
    source: str | os.PathLike | bytes | BinaryIO,
    *,
    max_pixels: int = MAX_PIXELS,
    max_side: int = MAX_SIDE,
    min_side: int = MIN_SIDE,
) -> Photo:
    """A photo file (path, bytes or binary stream) -> Photo, or InputError naming the problem and the fix.

    See the module docstring for the rules (limits, modes, orientation, alpha).
    """
    path, fp, name = _open_source(source, "photo")
    notes: list[str] = []
    try:
        im = _open(fp, name, "photo", max_pixels)
        with im:
            w, h = im.size
            if min(w, h) < min_side:
                raise InputError(
                    f"photo {name} is {w}x{h} pixels; at least {min_side} pixels on each side are "
                    "needed (the model works on 518 x 518 crops); use a larger photo",
                    "photo",
                    {"path": name, "width": w, "height": h, "min_side": min_side},
                )
            raw16 = ";16" in _rawmode(im) and im.mode in ("RGB", "RGBA")  # before decoding clears the tiles
            original_mode = f"{im.mode} (16-bit)" if raw16 else im.mode
            frame, orientation = _decode(im, name, "photo", max_pixels, notes)
            fmt, exif = im.format, _read_exif(im, notes)
            if raw16:
                notes.append("photo: 16-bit colour reduced to 8 bits (high byte)")
            src_w, src_h = frame.size
            early = frame.mode == "RGB" and max(src_w, src_h) > max_side
            if early:  # the same Lanczos downscale as below, on the decoded image: no full-size array copies
                frame = frame.resize(_fit(src_w, src_h, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
            rgb, alpha = _to_rgb8(frame, "photo", notes)
    finally:
        if path is not None:
            fp.close()
    if orientation != 1:
        notes.append(
            f"photo: EXIF orientation {orientation} applied ({ORIENTATION_WORDS[orientation]}); "
            "draw masks on the photo as displayed"
        )
    px_per_mm = exif.get("px_per_mm")
    if px_per_mm and orientation >= 5:  # 90-degree turn: the displayed x is the sensor's y
        px_per_mm = (px_per_mm[1], px_per_mm[0])
    if not early:
        src_h, src_w = rgb.shape[:2]
    if max(src_w, src_h) > max_side:
        size = _fit(src_w, src_h, max_side)
        if not early:
            rgb = _resize(rgb, size, Image.Resampling.LANCZOS)
            alpha = _resize(alpha, size, Image.Resampling.BOX) if alpha is not None else None
        notes.append(
            f"photo: {src_w}x{src_h} downscaled to {size[0]}x{size[1]} (longest side limit {max_side}); "
            "masks at the original size are downscaled to match"
        )
    return Photo(
        rgb=rgb,
        alpha=alpha,
        path=path,
        width=rgb.shape[1],
        height=rgb.shape[0],
        original_mode=original_mode,
        exif_orientation_applied=orientation != 1,
        focal_length_35mm=exif.get("focal_35mm"),
        focal_length_mm=exif.get("focal_mm"),
        notes=notes,
        format=fmt,
        exif_orientation=orientation,
        source_width=src_w,
        source_height=src_h,
        focal_plane_px_per_mm=px_per_mm,
    )


# ----------------------------------------------------------------------------------------------
# Masks


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, as Pillow's convert("L"): [H, W, 3] -> [H, W] float."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _threshold(a: np.ndarray, notes: list[str]) -> np.ndarray:
    """A mask array [H, W] / [H, W, 1|3|4] of bool, integers or floats -> bool [H, W].

    Integers by their largest value: 0/1 -> > 0, up to 255 -> > 127, up to 65535 -> > 32767.
    Floats: in [0, 1] -> > 0.5, else read as 0..255 -> > 127. RGB: luminance. RGBA: the alpha channel where
    it varies, else (uniform alpha, e.g. fully opaque) the luminance.
    """
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        if a.shape[2] == 1:
            a = a[:, :, 0]
        elif a.shape[2] == 4 and a.dtype != bool and a[:, :, 3].min() < a[:, :, 3].max():
            notes.append("mask: its alpha channel is used")
            a = a[:, :, 3]
        else:
            a = _luma(a[:, :, :3].astype(np.float64)) if a.dtype != bool else a[:, :, :3].any(axis=2)
    if a.ndim != 2:
        raise InputError(
            f"mask has shape {list(a.shape)}; expected [H, W] (or [H, W, 1|3|4])", "mask", {"shape": list(a.shape)}
        )
    if a.dtype == bool:
        return a.copy()
    if np.issubdtype(a.dtype, np.integer):
        hi = int(a.max()) if a.size else 0
        if int(a.min()) < 0 or hi > 65535:
            raise InputError(
                f"mask values span [{int(a.min())}, {hi}]; expected 0/1, 0..255 or 0..65535 (white = object)",
                "mask",
                {"min": int(a.min()), "max": hi},
            )
        if hi == 1:
            notes.append("mask: 0/1 values read as background/object")
        return a > (0 if hi <= 1 else 127 if hi <= 255 else 32767)
    if np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float64), nan=0.0)
        return a > (0.5 if a.max(initial=0.0) <= 1.0 else 127.0)
    raise InputError(f"mask has dtype {a.dtype}; expected bool, integers or floats", "mask", {"dtype": str(a.dtype)})


def _read_mask_file(source: str | os.PathLike | bytes | BinaryIO, notes: list[str]) -> np.ndarray:
    """A mask image -> its raw array (bool / uint8 / uint16 / float, [H, W] or [H, W, 4]) in the displayed frame."""
    path, fp, name = _open_source(source, "mask")
    try:
        im = _open(fp, name, "mask", MAX_PIXELS)
        with im:
            im, orientation = _decode(im, name, "mask", MAX_PIXELS, notes)
            if orientation != 1:
                notes.append(f"mask: its EXIF orientation {orientation} was applied (it is read as displayed)")
            if im.mode == "1" or im.mode.startswith("I") or im.mode == "F" or im.mode == "L":
                return np.asarray(im)
            if im.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in im.info:
                return np.asarray(im.convert("RGBA"))
            return np.asarray(im.convert("L"))
    finally:
        if path is not None:
            fp.close()


def load_mask(
    source: str | os.PathLike | bytes | BinaryIO | np.ndarray,
    photo: Photo | tuple[int, int],
    *,
    min_pixels: int = MIN_MASK_PIXELS,
    max_fraction: float = MAX_MASK_FRACTION,
    notes: list[str] | None = None,
) -> np.ndarray:
    """A mask file or array -> bool [H, W] in the photo's frame (white / nonzero = object).

    `photo`: a Photo or its (width, height). Warnings (object touching the border, several separate
    parts, conversions) go to `notes` when given, else to the log. Errors: another size than the photo,
    an empty mask, fewer than `min_pixels` pixels, more than `max_fraction` of the photo (inverted?).
    """
    own: list[str] = []
    raw = np.asarray(source) if isinstance(source, np.ndarray) else _read_mask_file(source, own)
    m = _threshold(raw, own)
    m = _match_size(m, photo, own)
    count, total = int(m.sum()), m.size
    details = {"pixels": count, "photo_pixels": total}
    if count == 0:
        raise InputError(
            "mask is empty (no pixel above the threshold); paint the object white (or opaque) on "
            "black (or transparent)",
            "mask",
            details,
        )
    if count < min_pixels:
        raise InputError(
            f"mask has only {count} pixels (at least {min_pixels} needed); the object is too small "
            "to reconstruct: use a closer photo or a mask that covers the whole object",
            "mask",
            details,
        )
    if count > max_fraction * total:
        raise InputError(
            f"mask covers {100 * count / total:.1f}% of the photo; it is probably inverted (background "
            "white, object black): invert it so that only the object is white",
            "mask",
            details,
        )
    own += mask_warnings(m)
    if notes is not None:
        notes.extend(own)
    else:
        for n in own:
            log.warning(n)
    return m


def _match_size(m: np.ndarray, photo: Photo | tuple[int, int], notes: list[str]) -> np.ndarray:
    """Check the mask's size against the photo; a mask at a downscaled photo's source size is downscaled."""
    w, h = (photo.width, photo.height) if isinstance(photo, Photo) else (int(photo[0]), int(photo[1]))
    mh, mw = m.shape
    if (mh, mw) == (h, w):
        return m
    details = {"mask_size": [mw, mh], "photo_size": [w, h]}
    if isinstance(photo, Photo):
        sw, sh = photo.source_width, photo.source_height
        if (sw, sh) != (w, h) and (mh, mw) == (sh, sw):
            notes.append(f"mask: {mw}x{mh} downscaled to {w}x{h} like the photo")
            return _resize(m.astype(np.uint8) * 255, (w, h), Image.Resampling.BOX) > 127
        if photo.exif_orientation >= 5 and (mw, mh) in ((h, w), (sh, sw)):
            raise InputError(
                f"mask is {mw}x{mh} pixels but the photo as displayed is {w}x{h}: the photo's EXIF orientation "
                f"({photo.exif_orientation}, {ORIENTATION_WORDS[photo.exif_orientation]}) was applied, and the mask "
                "seems drawn on the unrotated pixels; draw it on the photo as an image viewer shows it, or rotate "
                "the mask the same way",
                "mask",
                {**details, "exif_orientation": photo.exif_orientation},
            )
    raise InputError(
        f"mask is {mw}x{mh} pixels but the photo is {w}x{h}; draw the mask on this photo, or resize "
        f"it to {w}x{h} with nearest-neighbour interpolation",
        "mask",
        details,
    )


def mask_from_alpha(photo: Photo, *, min_pixels: int = MIN_MASK_PIXELS, notes: list[str] | None = None) -> np.ndarray:
    """The object mask of a cut-out photo: alpha > 127, checked like `load_mask`."""
    if photo.alpha is None:
        raise InputError(
            f"photo {photo.name} has no transparency, so it carries no mask; give a mask file or select the object",
            "mask",
            {"path": photo.name},
        )
    return load_mask(photo.alpha, photo, min_pixels=min_pixels, notes=notes)


# ----------------------------------------------------------------------------------------------
# Mask warnings


def mask_warnings(mask: np.ndarray) -> list[str]:
    """Warnings (not errors) about a bool mask [H, W]: touching the border, several separate parts."""
    out = []
    edges = [
        name
        for name, line in (("top", mask[0]), ("bottom", mask[-1]), ("left", mask[:, 0]), ("right", mask[:, -1]))
        if line.any()
    ]
    if edges:
        out.append(
            f"mask touches the photo's {', '.join(edges)} edge: the object is probably cut off, and its "
            "hidden part will be guessed"
        )
    sizes = blob_sizes(mask)
    if sizes is not None and len(sizes) > 1:
        shares = ", ".join(f"{100 * s / sum(sizes):.1f}%" for s in sizes[:4])
        out.append(
            f"mask has {len(sizes)} separate parts ({shares}{', ...' if len(sizes) > 4 else ''} of it): "
            "one mask should hold one object; remove stray specks"
        )
    return out


def blob_sizes(mask: np.ndarray, max_side: int = 1024, max_runs: int = 200_000) -> list[int] | None:
    """Sizes of the 8-connected parts of a bool mask [H, W], largest first; None if too fragmented to count.

    Counted on a copy max-pooled to at most `max_side` per side (parts closer than the pooling factor
    merge), by union-find over horizontal runs of adjacent rows.
    """
    f = max(1, -(-max(mask.shape) // max_side))
    if f > 1:
        h, w = mask.shape
        pad = np.zeros((-(-h // f) * f, -(-w // f) * f), bool)
        pad[:h, :w] = mask
        mask = pad.reshape(pad.shape[0] // f, f, pad.shape[1] // f, f).any(axis=(1, 3))
    edge = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)  # +1 run start, -1 run end (exclusive)
    rows, starts = np.nonzero(edge == 1)
    ends = np.nonzero(edge == -1)[1]
    if len(starts) > max_runs:
        return None
    ptr = np.searchsorted(rows, np.arange(mask.shape[0] + 1)).tolist()
    s, e = starts.tolist(), ends.tolist()
    parent = list(range(len(s)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for r in range(mask.shape[0] - 1):
        i, j = ptr[r], ptr[r + 1]
        while i < ptr[r + 1] and j < ptr[r + 2]:
            if s[j] <= e[i] and s[i] <= e[j]:  # overlapping or diagonal neighbours (8-connected)
                parent[find(i)] = find(j)
            if e[i] < e[j]:
                i += 1
            else:
                j += 1
    sizes: dict[int, int] = {}
    for k in range(len(s)):
        root = find(k)
        sizes[root] = sizes.get(root, 0) + e[k] - s[k]
    return sorted(sizes.values(), reverse=True)
