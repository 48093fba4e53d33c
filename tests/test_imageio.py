"""Photo / mask loading and EXIF intrinsics on files written here by Pillow (and OpenCV for 16-bit colour)."""

from __future__ import annotations

import io
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sam3d_core.inputs.camera import DEFAULT_FOV_DEG, intrinsics_from_exif, intrinsics_from_fov, resolve_intrinsics
from sam3d_core.inputs.imageio import (
    InputError,
    Photo,
    blob_sizes,
    load_mask,
    load_photo,
    mask_from_alpha,
    mask_warnings,
)

EXIF_IFD = 0x8769


def rand_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(tmp_path, name: str, im: Image.Image, **kw):
    path = tmp_path / name
    im.save(path, **kw)
    return path


def exif(orientation: int = 1, **sub) -> Image.Exif:
    """EXIF with an orientation and Exif-IFD tags: f35, f_mm, px / py (focal-plane resolution), unit."""
    tags = {"f35": 0xA405, "f_mm": 0x920A, "px": 0xA20E, "py": 0xA20F, "unit": 0xA210}
    ex = Image.Exif()
    ex[0x0112] = orientation  # Pillow writes the Exif IFD only next to a base-IFD tag
    ifd = ex.get_ifd(EXIF_IFD)
    for k, v in sub.items():
        ifd[tags[k]] = v
    return ex


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels but holds almost no data (what a decompression bomb looks like)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def blob(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# ----------------------------------------------------------------------------------------------
# Photos: files that must load


def test_rgb_png_loads_exactly(tmp_path):
    a = rand_rgb(48, 64)
    p = load_photo(save(tmp_path, "a.png", Image.fromarray(a)))
    assert p.rgb.dtype == np.uint8 and p.rgb.flags.c_contiguous
    np.testing.assert_array_equal(p.rgb, a)
    assert (p.width, p.height, p.alpha, p.original_mode, p.format) == (64, 48, None, "RGB", "PNG")
    assert not p.exif_orientation_applied and p.notes == []


def test_bytes_and_stream_inputs(tmp_path):
    a = rand_rgb(40, 40, seed=1)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    for src in (buf.getvalue(), io.BytesIO(buf.getvalue())):
        p = load_photo(src)
        np.testing.assert_array_equal(p.rgb, a)
        assert p.path is None


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    v = np.linspace(0, 65535, 48 * 64).round().astype(np.uint16).reshape(48, 64)
    path = save(tmp_path, "g16.png", Image.fromarray(v))
    assert Image.open(path).mode.startswith("I;16")
    p = load_photo(path)
    expected = np.round(v / 257.0).astype(np.uint8)  # 65535 -> 255 linearly
    for c in range(3):
        np.testing.assert_array_equal(p.rgb[:, :, c], expected)
    assert any("16-bit" in n for n in p.notes)


def test_16bit_grey_tiff_is_scaled(tmp_path):
    v = np.full((40, 40), 32896, np.uint16)  # 128 * 257
    p = load_photo(save(tmp_path, "g16.tif", Image.fromarray(v)))
    assert (p.rgb == 128).all()


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16bit_rgb_is_scaled(tmp_path, ext):
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(2)
    v = rng.integers(0, 65536, (40, 48, 3), dtype=np.uint16)
    path = tmp_path / f"rgb16.{ext}"
    assert cv2.imwrite(str(path), v[:, :, ::-1])  # OpenCV writes BGR
    p = load_photo(path)
    diff = np.abs(p.rgb.astype(int) - np.round(v / 257.0).astype(int))
    assert diff.max() <= 1  # Pillow keeps the high byte: within one level of exact scaling
    assert "16-bit" in p.original_mode


def test_float_tiff_is_scaled_by_its_range(tmp_path):
    f = np.linspace(-5.0, 1000.0, 40 * 50, dtype=np.float32).reshape(40, 50)
    p = load_photo(save(tmp_path, "f.tif", Image.fromarray(f)))
    expected = np.round((f.astype(np.float64) + 5.0) / 1005.0 * 255.0)
    assert np.abs(p.rgb[:, :, 0].astype(int) - expected).max() <= 1
    assert p.rgb[0, 0, 0] == 0 and p.rgb[-1, -1, 0] == 255
    assert any("[-5, 1000]" in n for n in p.notes)


def test_float_tiff_in_unit_range(tmp_path):
    f = np.linspace(0.0, 1.0, 40 * 40, dtype=np.float32).reshape(40, 40)
    p = load_photo(save(tmp_path, "u.tif", Image.fromarray(f)))
    assert np.abs(p.rgb[:, :, 1].astype(int) - np.round(f * 255)).max() <= 1


def test_cmyk_jpeg_adobe_inverted_renders_correctly(tmp_path):
    blocks = {
        (0, 0, 0, 0): (255, 255, 255),
        (255, 0, 0, 0): (0, 255, 255),
        (0, 255, 255, 0): (255, 0, 0),
        (0, 0, 0, 255): (0, 0, 0),
    }
    im = Image.new("CMYK", (32 * len(blocks), 32))
    for i, cmyk in enumerate(blocks):
        im.paste(cmyk, (32 * i, 0, 32 * (i + 1), 32))
    path = save(tmp_path, "cmyk.jpg", im, quality=95)
    assert b"Adobe" in path.read_bytes()  # stored inverted, flagged by the Adobe APP14 marker
    p = load_photo(path)
    assert p.original_mode == "CMYK"
    for i, rgb in enumerate(blocks.values()):
        assert np.abs(p.rgb[16, 32 * i + 16].astype(int) - rgb).max() <= 6


def test_colour_profile_note(tmp_path):
    ImageCms = pytest.importorskip("PIL.ImageCms")
    im = Image.fromarray(rand_rgb(40, 40))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert load_photo(save(tmp_path, "s.jpg", im, icc_profile=srgb)).notes == []
    other = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    notes = load_photo(save(tmp_path, "o.jpg", im, icc_profile=other)).notes
    assert len(notes) == 1 and "colour profile" in notes[0]


def test_palette_without_and_with_transparency(tmp_path):
    idx = np.zeros((40, 40), np.uint8)
    idx[10:30, 10:30] = 1
    im = Image.fromarray(idx, mode="P")
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p = load_photo(save(tmp_path, "p.png", im))
    assert p.alpha is None
    np.testing.assert_array_equal(p.rgb[20, 20], [200, 100, 50])
    np.testing.assert_array_equal(p.rgb[0, 0], [10, 20, 30])

    p = load_photo(save(tmp_path, "pt.png", im, transparency=0))
    np.testing.assert_array_equal(p.alpha, np.where(idx == 1, 255, 0))
    np.testing.assert_array_equal(p.rgb[0, 0], [128, 128, 128])  # transparent: shown over grey
    np.testing.assert_array_equal(p.rgb[20, 20], [200, 100, 50])
    np.testing.assert_array_equal(mask_from_alpha(p, min_pixels=1), idx == 1)


def test_grey_and_la(tmp_path):
    g = np.random.default_rng(3).integers(0, 256, (36, 44), dtype=np.uint8)
    p = load_photo(save(tmp_path, "g.png", Image.fromarray(g)))
    np.testing.assert_array_equal(p.rgb, np.repeat(g[:, :, None], 3, axis=2))
    a = np.zeros((36, 44), np.uint8)
    a[5:30, 5:40] = 255
    p = load_photo(save(tmp_path, "la.png", Image.merge("LA", [Image.fromarray(g), Image.fromarray(a)])))
    np.testing.assert_array_equal(p.alpha, a)
    np.testing.assert_array_equal(p.rgb[10, 10], [g[10, 10]] * 3)


def test_rgba_cutout_alpha_is_the_mask(tmp_path):
    rgb = rand_rgb(48, 64, seed=4)
    yy, xx = np.mgrid[:48, :64]
    alpha = np.where((yy - 24) ** 2 + (xx - 32) ** 2 < 15**2, 255, 0).astype(np.uint8)
    p = load_photo(save(tmp_path, "cut.png", Image.fromarray(np.dstack([rgb, alpha]))))
    np.testing.assert_array_equal(p.alpha, alpha)
    inside = alpha == 255
    np.testing.assert_array_equal(p.rgb[inside], rgb[inside])
    assert (p.rgb[~inside] == 128).all()
    np.testing.assert_array_equal(mask_from_alpha(p), inside)


def test_opaque_rgba_drops_alpha(tmp_path):
    rgba = np.dstack([rand_rgb(40, 40, seed=5), np.full((40, 40), 255, np.uint8)])
    p = load_photo(save(tmp_path, "o.png", Image.fromarray(rgba)))
    assert p.alpha is None and any("opaque" in n for n in p.notes)
    with pytest.raises(InputError, match="no transparency"):
        mask_from_alpha(p)


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_animated_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    kw = {"lossless": True} if fmt == "webp" else {}
    path = save(tmp_path, f"anim.{fmt}", frames[0], save_all=True, append_images=frames[1:], duration=100, **kw)
    p = load_photo(path)
    assert (p.rgb == [255, 0, 0]).all()
    assert any("3 frames" in n for n in p.notes)


# EXIF orientations, written as the EXIF specification words them (independent of Pillow's names).
ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirror horizontal
    3: lambda a: np.rot90(a, 2),  # rotate 180
    4: lambda a: a[::-1],  # mirror vertical
    5: lambda a: np.rot90(a[:, ::-1], 1),  # mirror horizontal and rotate 270 CW
    6: lambda a: np.rot90(a, -1),  # rotate 90 CW
    7: lambda a: np.rot90(a[:, ::-1], -1),  # mirror horizontal and rotate 90 CW
    8: lambda a: np.rot90(a, 1),  # rotate 270 CW
}


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_exif_orientation_applied(tmp_path, orientation, ext):
    a = (
        rand_rgb(40, 56, seed=orientation)
        if ext == "png"
        else np.kron(np.random.default_rng(orientation).integers(0, 256, (5, 7, 3)), np.ones((8, 8, 1))).astype(
            np.uint8
        )
    )
    jpeg = {"quality": 98, "subsampling": 0} if ext == "jpg" else {}
    path = save(tmp_path, f"o{orientation}.{ext}", Image.fromarray(a), exif=exif(orientation), **jpeg)
    p = load_photo(path)
    expected = ORIENT[orientation](a)
    assert p.rgb.shape == expected.shape and p.rgb.flags.c_contiguous
    tol = 0 if ext == "png" else 6  # JPEG: flat 8x8 blocks, no chroma subsampling
    assert np.abs(p.rgb.astype(int) - expected).max() <= tol
    assert p.exif_orientation_applied == (orientation != 1) and p.exif_orientation == orientation


def test_mask_on_unrotated_pixels_is_explained(tmp_path):
    path = save(tmp_path, "r.png", Image.fromarray(rand_rgb(40, 56)), exif=exif(6))
    p = load_photo(path)
    assert (p.width, p.height) == (40, 56)
    with pytest.raises(InputError, match="EXIF orientation") as e:
        load_mask(blob(40, 56, 10, 30, 10, 40), p, min_pixels=1)
    assert e.value.field == "mask" and e.value.details["exif_orientation"] == 6
    assert load_mask(blob(56, 40, 10, 40, 10, 30), p, min_pixels=1).shape == (56, 40)


# ----------------------------------------------------------------------------------------------
# Photos: files that must be refused with the problem and the fix


def test_missing_folder_empty(tmp_path):
    with pytest.raises(InputError, match="does not exist") as e:
        load_photo(tmp_path / "nope.jpg")
    assert e.value.field == "photo" and "nope.jpg" in e.value.details["path"]
    with pytest.raises(InputError, match="is a folder"):
        load_photo(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_photo(tmp_path / "empty.png")


def test_not_an_image(tmp_path):
    (tmp_path / "notes.jpg").write_text("these are not pixels\n" * 10)
    with pytest.raises(InputError, match="not an image Pillow can read") as e:
        load_photo(tmp_path / "notes.jpg")
    assert "notes.jpg" in str(e.value) and "PNG" in str(e.value)


@pytest.mark.parametrize(("brand", "kind"), [(b"heic", "HEIC"), (b"mif1", "HEIC"), (b"avif", "AVIF")])
def test_heic_and_undecodable_avif(tmp_path, brand, kind):
    (tmp_path / "x.img").write_bytes(b"\0\0\0\x18ftyp" + brand + b"\0\0\0\0" + b"\0" * 200)
    with pytest.raises(InputError, match=kind) as e:
        load_photo(tmp_path / "x.img")
    assert "convert it to PNG or JPEG" in str(e.value)


def test_truncated_jpeg(tmp_path):
    path = save(tmp_path, "full.jpg", Image.fromarray(rand_rgb(256, 256, seed=6)), quality=95)
    data = path.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match="truncated or corrupt") as e:
        load_photo(tmp_path / "cut.jpg")
    assert "cut.jpg" in str(e.value)


def test_decompression_bombs(tmp_path):
    (tmp_path / "big.png").write_bytes(png_header_only(12000, 10000))  # above our 100 MP, below Pillow's error
    with pytest.raises(InputError, match="120,000,000 pixels") as e:
        load_photo(tmp_path / "big.png")
    assert e.value.details["limit"] == 100_000_000 and "downscale" in str(e.value)
    (tmp_path / "huge.png").write_bytes(png_header_only(20000, 20000))  # Pillow itself refuses this one
    with pytest.raises(InputError, match="400,000,000 pixels"):
        load_photo(tmp_path / "huge.png")
    path = save(tmp_path, "small.png", Image.fromarray(rand_rgb(48, 64)))
    with pytest.raises(InputError, match="3,072 pixels"):
        load_photo(path, max_pixels=1000)


@pytest.mark.parametrize(("w", "h"), [(20, 40), (1, 100), (100, 1)])
def test_tiny_images_refused(tmp_path, w, h):
    path = save(tmp_path, "t.png", Image.new("RGB", (w, h)))
    with pytest.raises(InputError, match=f"{w}x{h} pixels") as e:
        load_photo(path)
    assert e.value.details["min_side"] == 32


def test_large_photo_downscaled_and_mask_follows(tmp_path):
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, 150:] = 200
    p = load_photo(save(tmp_path, "wide.png", Image.fromarray(a)), max_side=150)
    assert (p.width, p.height, p.source_width, p.source_height) == (150, 50, 300, 100)
    assert p.scale == 0.5 and any("downscaled" in n for n in p.notes)
    assert (p.rgb[:, :70] == 0).all() and (p.rgb[:, 80:] == 200).all()
    notes: list[str] = []
    m = load_mask(blob(100, 300, 20, 60, 100, 200), p, min_pixels=1, notes=notes)
    np.testing.assert_array_equal(m, blob(50, 150, 10, 30, 50, 100))
    assert any("downscaled" in n for n in notes)


# ----------------------------------------------------------------------------------------------
# Masks


def test_mask_file_modes(tmp_path):
    size = (64, 48)
    grey = np.zeros((48, 64), np.uint8)
    grey[10:30, 10:30] = 128
    grey[30:40, 30:40] = 127  # at the threshold: background
    expect = blob(48, 64, 10, 30, 10, 30)
    np.testing.assert_array_equal(load_mask(save(tmp_path, "l.png", Image.fromarray(grey)), size, min_pixels=1), expect)
    np.testing.assert_array_equal(
        load_mask(save(tmp_path, "b.png", Image.fromarray(expect).convert("1")), size, min_pixels=1), expect
    )
    v16 = np.where(expect, 40000, 30000).astype(np.uint16)
    np.testing.assert_array_equal(
        load_mask(save(tmp_path, "m16.png", Image.fromarray(v16)), size, min_pixels=1), expect
    )


def test_mask_rgb_uses_luminance_and_rgba_its_alpha(tmp_path):
    size = (64, 48)
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[5:20, 5:20] = (255, 0, 0)  # luma 76: background
    rgb[25:40, 25:40] = (0, 255, 0)  # luma 150: object
    expect = blob(48, 64, 25, 40, 25, 40)
    np.testing.assert_array_equal(
        load_mask(save(tmp_path, "rgb.png", Image.fromarray(rgb)), size, min_pixels=1), expect
    )
    opaque = np.dstack([rgb, np.full((48, 64), 255, np.uint8)])
    np.testing.assert_array_equal(
        load_mask(save(tmp_path, "op.png", Image.fromarray(opaque)), size, min_pixels=1), expect
    )
    white = np.full((48, 64, 3), 255, np.uint8)
    alpha = np.where(blob(48, 64, 8, 30, 8, 50), 255, 0).astype(np.uint8)
    notes: list[str] = []
    m = load_mask(save(tmp_path, "a.png", Image.fromarray(np.dstack([white, alpha]))), size, min_pixels=1, notes=notes)
    np.testing.assert_array_equal(m, alpha > 127)
    assert any("alpha" in n for n in notes)


def test_mask_arrays():
    size = (40, 32)
    expect = blob(32, 40, 8, 24, 8, 30)
    np.testing.assert_array_equal(load_mask(expect, size, min_pixels=1), expect)
    np.testing.assert_array_equal(load_mask(expect.astype(np.uint8) * 255, size, min_pixels=1), expect)
    notes: list[str] = []
    np.testing.assert_array_equal(load_mask(expect.astype(np.uint8), size, min_pixels=1, notes=notes), expect)
    assert any("0/1" in n for n in notes)
    soft = np.where(expect, 0.6, 0.4).astype(np.float32)
    np.testing.assert_array_equal(load_mask(soft, size, min_pixels=1), expect)
    np.testing.assert_array_equal(load_mask(np.where(expect, 200.0, 100.0), size, min_pixels=1), expect)
    np.testing.assert_array_equal(load_mask(np.dstack([expect * 255] * 3).astype(np.uint8), size, min_pixels=1), expect)
    with pytest.raises(InputError, match="shape"):
        load_mask(np.zeros((32, 40, 2), np.uint8), size)
    with pytest.raises(InputError, match="values span"):
        load_mask(np.where(expect, 1, -1), size)


def test_mask_size_mismatch_names_both_sizes():
    with pytest.raises(InputError) as e:
        load_mask(blob(24, 32, 5, 20, 5, 20), (64, 48), min_pixels=1)
    msg = str(e.value)
    assert "32x24" in msg and "64x48" in msg and "nearest" in msg
    assert e.value.details == {"mask_size": [32, 24], "photo_size": [64, 48]}


def test_mask_empty_small_and_inverted():
    size = (64, 48)
    with pytest.raises(InputError, match="empty"):
        load_mask(np.zeros((48, 64), bool), size)
    with pytest.raises(InputError, match="only 12 pixels") as e:
        load_mask(blob(48, 64, 10, 13, 10, 14), size, min_pixels=50)
    assert e.value.details["pixels"] == 12
    inverted = ~blob(48, 64, 20, 22, 20, 22)
    with pytest.raises(InputError, match="inverted"):
        load_mask(inverted, size)


def test_mask_warnings_border_and_parts(caplog):
    size = (64, 48)
    notes: list[str] = []
    load_mask(blob(48, 64, 10, 30, 10, 30), size, min_pixels=1, notes=notes)
    assert notes == []
    two = blob(48, 64, 0, 20, 10, 30) | blob(48, 64, 30, 40, 40, 50)
    load_mask(two, size, min_pixels=1, notes=notes)
    assert any("top edge" in n for n in notes) and any("2 separate parts" in n for n in notes)
    with caplog.at_level(logging.WARNING, logger="sam3d_core.inputs.imageio"):
        load_mask(two, size, min_pixels=1)
    assert "separate parts" in caplog.text


def test_blob_sizes_8_connectivity_and_pooling():
    m = np.zeros((10, 10), bool)
    m[2, 2] = m[3, 3] = True  # diagonal neighbours: one part
    m[7, 7] = True
    assert blob_sizes(m) == [2, 1]
    big = np.zeros((40, 400), bool)
    big[5:10, 10:50] = big[20:30, 300:390] = True
    assert len(blob_sizes(big, max_side=100)) == 2  # pooled by 4, still apart
    assert mask_warnings(blob(40, 40, 10, 20, 10, 20)) == []


def test_blob_sizes_match_scipy_label():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(7)
    for density in (0.2, 0.45, 0.6):
        m = rng.random((60, 70)) < density
        labels, n = ndimage.label(m, structure=np.ones((3, 3)))
        expected = sorted(np.bincount(labels.ravel())[1:].tolist(), reverse=True)
        assert blob_sizes(m) == expected


# ----------------------------------------------------------------------------------------------
# Intrinsics from EXIF


def photo_with(tmp_path, size=(64, 48), orientation=1, **tags) -> Photo:
    im = Image.fromarray(rand_rgb(size[1], size[0]))
    return load_photo(save(tmp_path, "e.png", im, exif=exif(orientation, **tags)))


def test_35mm_equivalent_is_defined_on_the_diagonal(tmp_path):
    p = photo_with(tmp_path, f35=43)  # EXIF stores whole millimetres
    K, how = intrinsics_from_exif(p)
    assert K[0, 0] == pytest.approx(43 / 43.27 * 80.0)  # 64 x 48: diagonal 80 px
    assert K[1, 1] == K[0, 0] and (K[0, 2], K[1, 2]) == (32.0, 24.0)
    assert "35 mm" in how
    assert resolve_intrinsics(p)[1] == "exif"


@pytest.mark.parametrize(("unit", "res"), [(2, 254.0), (3, 100.0), (4, 10.0), (None, 254.0)])
def test_focal_plane_resolution_units(tmp_path, unit, res):
    tags = {"f_mm": 4.0, "px": res, "py": res} | ({"unit": unit} if unit else {})  # no unit: inches
    K, how = intrinsics_from_exif(photo_with(tmp_path, **tags))
    assert K[0, 0] == pytest.approx(40.0) and K[1, 1] == pytest.approx(40.0)  # 4 mm * 10 px/mm


def test_focal_plane_follows_rotation_and_downscale(tmp_path):
    p = photo_with(tmp_path, orientation=6, f_mm=4.0, px=10.0, py=20.0, unit=4)
    K, _ = intrinsics_from_exif(p)
    assert (K[0, 0], K[1, 1]) == pytest.approx((80.0, 40.0))  # displayed x is the sensor's y
    big = Image.fromarray(rand_rgb(100, 200))
    p = load_photo(save(tmp_path, "d.png", big, exif=exif(f_mm=4.0, px=10.0, unit=4)), max_side=100)
    K, _ = intrinsics_from_exif(p)
    assert K[0, 0] == pytest.approx(20.0) and (K[0, 2], K[1, 2]) == (50.0, 25.0)


def test_implausible_or_missing_exif_is_ignored(tmp_path):
    K, how = intrinsics_from_exif(photo_with(tmp_path, f35=2000))
    assert K is None and "outside 10..150" in how
    K, how = intrinsics_from_exif(photo_with(tmp_path, f_mm=4.2))
    assert K is None and "no sensor size" in how
    p = photo_with(tmp_path)
    assert intrinsics_from_exif(p) == (None, "no focal length in the photo's EXIF")
    notes: list[str] = []
    K, source = resolve_intrinsics(p, notes=notes)
    assert source == "default_fov" and notes
    np.testing.assert_allclose(K, intrinsics_from_fov(64, 48, DEFAULT_FOV_DEG))


def test_resolve_order_user_then_exif(tmp_path):
    p = photo_with(tmp_path, f35=26)
    user = np.array([[50.0, 0, 30], [0, 52.0, 20], [0, 0, 1]])
    K, source = resolve_intrinsics(p, K=user)
    assert source == "user"
    np.testing.assert_array_equal(K, user)
    K, source = resolve_intrinsics(p, fov=90.0)
    assert source == "user" and K[0, 0] == pytest.approx(32.0)  # half width / tan(45 deg)
    assert resolve_intrinsics((64, 48))[1] == "default_fov"
    with pytest.raises(InputError, match="one of them"):
        resolve_intrinsics(p, K=user, fov=60.0)
    with pytest.raises(InputError, match="outside the 64x48 photo") as e:
        resolve_intrinsics(p, K=[[50.0, 0, 300], [0, 50, 20], [0, 0, 1]])
    assert e.value.field == "K"
    with pytest.raises(InputError, match="3x3"):
        resolve_intrinsics(p, K=np.eye(2))
    with pytest.raises(InputError) as e:
        resolve_intrinsics(p, fov=0.5)
    assert e.value.field == "fov"


def test_user_K_scales_with_a_downscaled_photo(tmp_path):
    p = load_photo(save(tmp_path, "w.png", Image.fromarray(rand_rgb(100, 200))), max_side=100)
    user = np.array([[180.0, 0, 100], [0, 180.0, 50], [0, 0, 1]])  # for the 200 x 100 source
    K, _ = resolve_intrinsics(p, K=user)
    np.testing.assert_allclose(K, [[90.0, 0, 50], [0, 90.0, 25], [0, 0, 1]])
