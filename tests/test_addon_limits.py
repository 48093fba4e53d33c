"""The add-on's stdlib photo-size reader (addon/sam3d_blender/core/photo.py) against Pillow, and its pixel limit
against the one the CLI and the worker apply: Blender must refuse what the worker would refuse, before loading."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam3d_core.inputs.imageio import MAX_PIXELS

PATH = Path(__file__).resolve().parent.parent / "addon" / "sam3d_blender" / "core" / "photo.py"


@pytest.fixture(scope="module")
def photo_mod():
    spec = importlib.util.spec_from_file_location("addon_core_photo", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_addon_limit_is_the_cli_limit(photo_mod):
    assert photo_mod.MAX_PIXELS == MAX_PIXELS


@pytest.mark.parametrize(
    "suffix, kwargs",
    [
        (".png", {}),
        (".jpg", {"quality": 80}),
        (".jpg", {"progressive": True}),
        (".gif", {}),
        (".bmp", {}),
        (".webp", {"lossless": True}),
        (".webp", {"quality": 70}),
        (".tif", {}),
        (".tga", {}),
        (".ppm", {}),
    ],
)
@pytest.mark.parametrize("size", [(37, 23), (300, 1201)])
def test_header_size_matches_pillow(photo_mod, tmp_path, suffix, kwargs, size):
    path = tmp_path / f"p{suffix}"
    rgb = (np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(path, **kwargs)
    with Image.open(path) as im:
        assert photo_mod.image_size(str(path)) == im.size == size
    assert photo_mod.check_photo_size(str(path)) == size


def test_over_the_limit_and_unreadable_headers_are_refused(photo_mod, tmp_path):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)))
    with pytest.raises(ValueError, match=r"30000x30000 = 900,000,000 pixels, above the limit of 100,000,000"):
        photo_mod.check_photo_size(str(big))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read the size"):
        photo_mod.check_photo_size(str(tmp_path / "text.png"))
