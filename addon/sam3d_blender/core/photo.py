"""A photo's pixel size from its file header, and the size limit the worker and the CLI apply. Stdlib only.

Blender's image loader has no size limit, so the add-on reads the width and height from the header (PNG,
JPEG, GIF, BMP, WebP, TIFF, TGA, PPM) and refuses a photo above MAX_PIXELS before Blender loads it: a
30000 x 30000 photo would take 3.6 GB in Blender and set the render size to 30000 x 30000.
"""

from __future__ import annotations

import os
import struct

MAX_PIXELS = 100_000_000  # = sam3d_core.inputs.imageio.MAX_PIXELS (tests/test_addon_limits.py checks)
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class PhotoTooLarge(ValueError):
    """A photo with more pixels than MAX_PIXELS, or one whose size cannot be read from its header."""


def _jpeg_size(f) -> tuple[int, int] | None:
    f.seek(2)
    for _ in range(10000):  # markers before the frame header; each is skipped by its length
        byte = f.read(1)
        while byte and byte != b"\xff":
            byte = f.read(1)
        while byte == b"\xff":
            byte = f.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            continue
        if marker == 0xDA:  # start of scan: no frame header before it
            return None
        head = f.read(2)
        if len(head) < 2:
            return None
        length = struct.unpack(">H", head)[0]
        if marker in _JPEG_SOF:
            data = f.read(5)
            if len(data) < 5:
                return None
            height, width = struct.unpack(">HH", data[1:5])
            return width, height
        f.seek(length - 2, os.SEEK_CUR)
    return None


def _tiff_size(f, head: bytes) -> tuple[int, int] | None:
    end = "<" if head[:2] == b"II" else ">"
    f.seek(4)
    (offset,) = struct.unpack(end + "I", f.read(4))
    f.seek(offset)
    raw = f.read(2)
    if len(raw) < 2:
        return None
    (count,) = struct.unpack(end + "H", raw)
    found: dict[int, int] = {}
    for _ in range(min(count, 1000)):
        entry = f.read(12)
        if len(entry) < 12:
            break
        tag, kind = struct.unpack(end + "HH", entry[:4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            fmt = "H" if kind == 3 else "I"
            found[tag] = struct.unpack(end + fmt, entry[8 : 8 + struct.calcsize(fmt)])[0]
    return (found[256], found[257]) if 256 in found and 257 in found else None


def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file header, or None when the format is not one of these or the header is cut."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
                return struct.unpack(">II", head[16:24])
            if head[:2] == b"\xff\xd8":
                return _jpeg_size(f)
            if head[:6] in (b"GIF87a", b"GIF89a"):
                return struct.unpack("<HH", head[6:10])
            if head[:2] == b"BM" and len(head) >= 26:
                (dib,) = struct.unpack("<I", head[14:18])
                if dib == 12:
                    return struct.unpack("<HH", head[18:22])
                w, h = struct.unpack("<ii", head[18:26])
                return abs(w), abs(h)
            if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
                kind = head[12:16]
                if kind == b"VP8X":
                    return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
                if kind == b"VP8L":
                    b = head[21:25]
                    w = 1 + (((b[1] & 0x3F) << 8) | b[0])
                    h = 1 + (((b[3] & 0xF) << 10) | (b[2] << 2) | ((b[1] & 0xC0) >> 6))
                    return w, h
                if kind == b"VP8 ":
                    w, h = struct.unpack("<HH", head[26:30])
                    return w & 0x3FFF, h & 0x3FFF
                return None
            if head[:4] in (b"II*\x00", b"MM\x00*"):
                return _tiff_size(f, head)
            if head[:1] == b"P" and head[1:2] in b"123456":
                fields = head[2:].split()
                if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit():
                    return int(fields[0]), int(fields[1])
                return None
            if path.lower().endswith(".tga") and len(head) >= 16:
                return struct.unpack("<HH", head[12:16])
    except (OSError, struct.error, ValueError, IndexError):
        return None
    return None


def check_photo_size(path: str, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of a photo within the limit; PhotoTooLarge (a ValueError) naming the size and the fix
    otherwise, before anything decodes the pixels."""
    size = image_size(path)
    name = os.path.basename(path)
    if size is None:
        raise PhotoTooLarge(
            f"cannot read the size of {name} from its header (not PNG, JPEG, TIFF, WebP, BMP, GIF, TGA or PPM, or "
            "a damaged file); save it as PNG or JPEG"
        )
    w, h = size
    if w < 1 or h < 1:
        raise PhotoTooLarge(f"{name} says it is {w}x{h} pixels; save it again as PNG or JPEG")
    if w * h > max_pixels:
        raise PhotoTooLarge(
            f"{name} is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,} (a decompression-bomb "
            f"guard); downscale it below {max_pixels // 1_000_000} megapixels first"
        )
    return w, h
