"""Tests for deltadiff.runtime.imageio: every file is made here, in tmp_path."""

from __future__ import annotations

import functools
import io
import logging
import os
from pathlib import Path

import numpy as np
import png
import pytest
import tifffile
from PIL import Image, ImageCms, ImageOps

from deltadiff.errors import DeltaDiffError, ImageError
from deltadiff.runtime import imageio
from deltadiff.runtime.imageio import (
    IMAGE_SUFFIXES,
    ImageData,
    find_images,
    is_image_file,
    output_path,
    read_image,
    upscale_alpha,
    write_image,
)

# ---------------------------------------------------------------------------------- helpers


def _rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _u8(shape: tuple[int, ...]) -> np.ndarray:
    return _rng().integers(0, 256, size=shape, dtype=np.uint8)


def _write_png16(path: Path, arr: np.ndarray, *, greyscale: bool, alpha: bool) -> None:
    """Write a (H, W, planes) uint16 array as a 16-bit PNG with pypng."""
    h, w = arr.shape[:2]
    writer = png.Writer(w, h, greyscale=greyscale, alpha=alpha, bitdepth=16)
    with path.open("wb") as f:
        writer.write_packed(f, np.ascontiguousarray(arr, ">u2").view(np.uint8).reshape(h, -1))


def _read_png16(path: Path) -> tuple[np.ndarray, dict]:
    with path.open("rb") as f:
        w, h, pixels, info = png.Reader(file=f).read_flat()
    return np.frombuffer(pixels, dtype=np.uint16).reshape(h, w, info["planes"]), info


@functools.lru_cache(maxsize=1)
def _srgb_icc() -> bytes:
    # cached: the generated profile carries a creation time, so two calls can differ
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _as_u8(x: np.ndarray) -> np.ndarray:
    return np.round(x * 255).astype(np.uint8)


def _as_u16(x: np.ndarray) -> np.ndarray:
    return np.round(x * 65535).astype(np.uint16)


def _check_layout(data: ImageData) -> None:
    assert data.rgb.dtype == np.float32 and data.rgb.ndim == 3 and data.rgb.shape[2] == 3
    assert data.rgb.flags.c_contiguous
    assert data.rgb.min() >= 0.0 and data.rgb.max() <= 1.0
    if data.alpha is not None:
        assert data.alpha.dtype == np.float32 and data.alpha.shape == data.rgb.shape[:2]
        assert data.alpha.flags.c_contiguous


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees the 'warn once' messages afresh."""
    monkeypatch.setattr(imageio, "_WARNED", set())


# ---------------------------------------------------------------------------------- reading


def test_png8_rgb_round_trip_is_exact(tmp_path: Path) -> None:
    src = _u8((17, 23, 3))
    Image.fromarray(src).save(tmp_path / "in.png")
    data = read_image(tmp_path / "in.png")
    _check_layout(data)
    assert (data.format, data.bit_depth, data.grayscale, data.alpha) == ("PNG", 8, False, None)
    np.testing.assert_array_equal(_as_u8(data.rgb), src)

    write_image(tmp_path / "out.png", data.rgb)
    with Image.open(tmp_path / "out.png") as im:
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), src)


def test_png16_rgb_read_keeps_16_bit_precision(tmp_path: Path) -> None:
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    arr = np.stack([ramp, ramp[::-1, ::-1], (ramp.astype(np.uint32) * 7 % 65536)], axis=-1)
    arr = arr.astype(np.uint16)
    _write_png16(tmp_path / "ramp.png", arr, greyscale=False, alpha=False)
    data = read_image(tmp_path / "ramp.png")
    _check_layout(data)
    assert (data.format, data.bit_depth, data.grayscale) == ("PNG", 16, False)
    np.testing.assert_array_equal(_as_u16(data.rgb), arr)


def test_png16_write_then_read_round_trips_rgb_and_alpha(tmp_path: Path) -> None:
    vals = _rng().integers(0, 65536, size=(9, 11, 4), dtype=np.uint16)
    rgb, alpha = vals[..., :3] / 65535.0, vals[..., 3] / 65535.0
    write_image(
        tmp_path / "out.png", rgb.astype(np.float32), alpha=alpha.astype(np.float32), bit_depth=16
    )
    stored, info = _read_png16(tmp_path / "out.png")
    assert info["bitdepth"] == 16 and info["alpha"] and not info["greyscale"]
    np.testing.assert_array_equal(stored, vals)
    data = read_image(tmp_path / "out.png")
    assert data.bit_depth == 16 and data.alpha is not None
    np.testing.assert_array_equal(_as_u16(data.rgb), vals[..., :3])
    np.testing.assert_array_equal(_as_u16(data.alpha), vals[..., 3])


def test_png16_gray_reads_as_gray_and_writes_one_channel(tmp_path: Path) -> None:
    gray = _rng().integers(0, 65536, size=(8, 5, 1), dtype=np.uint16)
    _write_png16(tmp_path / "g16.png", gray, greyscale=True, alpha=False)
    data = read_image(tmp_path / "g16.png")
    _check_layout(data)
    assert data.grayscale and data.bit_depth == 16 and data.alpha is None
    for c in range(3):
        np.testing.assert_array_equal(_as_u16(data.rgb[..., c]), gray[..., 0])

    write_image(tmp_path / "out.png", data.rgb, bit_depth=16, grayscale=True)
    stored, info = _read_png16(tmp_path / "out.png")
    assert info["greyscale"] and info["planes"] == 1 and info["bitdepth"] == 16
    np.testing.assert_array_equal(stored, gray)


def test_png16_gray_alpha_reads_gray_and_alpha(tmp_path: Path) -> None:
    la = _rng().integers(0, 65536, size=(4, 6, 2), dtype=np.uint16)
    _write_png16(tmp_path / "la16.png", la, greyscale=True, alpha=True)
    data = read_image(tmp_path / "la16.png")
    assert data.grayscale and data.bit_depth == 16 and data.alpha is not None
    np.testing.assert_array_equal(_as_u16(data.rgb[..., 1]), la[..., 0])
    np.testing.assert_array_equal(_as_u16(data.alpha), la[..., 1])


def test_rgba_png_splits_alpha(tmp_path: Path) -> None:
    src = _u8((6, 7, 4))
    Image.fromarray(src).save(tmp_path / "rgba.png")
    data = read_image(tmp_path / "rgba.png")
    _check_layout(data)
    assert data.alpha is not None and not data.grayscale
    np.testing.assert_array_equal(_as_u8(data.rgb), src[..., :3])
    np.testing.assert_array_equal(_as_u8(data.alpha), src[..., 3])


def test_la_png_is_gray_with_alpha(tmp_path: Path) -> None:
    src = _u8((5, 4, 2))
    Image.fromarray(src).save(tmp_path / "la.png")
    data = read_image(tmp_path / "la.png")
    _check_layout(data)
    assert data.grayscale and data.alpha is not None
    np.testing.assert_array_equal(_as_u8(data.rgb), np.repeat(src[..., :1], 3, axis=-1))
    np.testing.assert_array_equal(_as_u8(data.alpha), src[..., 1])


def test_gray_png_is_replicated_to_rgb(tmp_path: Path) -> None:
    src = _u8((5, 4))
    Image.fromarray(src).save(tmp_path / "l.png")
    data = read_image(tmp_path / "l.png")
    assert data.grayscale and data.alpha is None and data.bit_depth == 8
    np.testing.assert_array_equal(_as_u8(data.rgb), np.stack([src] * 3, axis=-1))


def test_palette_png_transparency_becomes_alpha(tmp_path: Path) -> None:
    im = Image.new("P", (3, 2))
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2, 2, 1, 0])
    im.save(tmp_path / "p.png", transparency=bytes([0, 255, 128]))
    data = read_image(tmp_path / "p.png")
    _check_layout(data)
    assert not data.grayscale and data.alpha is not None
    np.testing.assert_array_equal(_as_u8(data.rgb[0, 0]), [255, 0, 0])
    np.testing.assert_array_equal(_as_u8(data.rgb[0, 2]), [0, 0, 255])
    np.testing.assert_array_equal(_as_u8(data.alpha), [[0, 255, 128], [128, 255, 0]])


def test_rgb_png_colour_key_becomes_alpha(tmp_path: Path) -> None:
    src = np.zeros((2, 2, 3), np.uint8)
    src[0, 0] = (10, 20, 30)
    Image.fromarray(src).save(tmp_path / "key.png", transparency=(10, 20, 30))
    data = read_image(tmp_path / "key.png")
    assert data.alpha is not None
    np.testing.assert_array_equal(_as_u8(data.alpha), [[0, 255], [255, 255]])


def test_jpeg_reads_close_to_source(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:32, 0:48]
    src = np.stack([xx * 5, yy * 7, (xx + yy) * 3], axis=-1).astype(np.uint8)
    Image.fromarray(src).save(tmp_path / "in.jpg", quality=95)
    data = read_image(tmp_path / "in.jpg")
    _check_layout(data)
    assert (data.format, data.bit_depth, data.alpha) == ("JPEG", 8, None)
    assert np.abs(_as_u8(data.rgb).astype(int) - src).mean() < 3


def test_webp_lossless_reads_exactly_and_writes_alpha(tmp_path: Path) -> None:
    src = _u8((8, 9, 3))
    Image.fromarray(src).save(tmp_path / "in.webp", lossless=True)
    data = read_image(tmp_path / "in.webp")
    _check_layout(data)
    assert data.format == "WEBP"
    np.testing.assert_array_equal(_as_u8(data.rgb), src)

    alpha = np.zeros((8, 9), np.float32)
    alpha[:, 4:] = 1.0
    write_image(tmp_path / "out.webp", data.rgb, alpha=alpha, quality=90)
    back = read_image(tmp_path / "out.webp")
    assert back.alpha is not None
    np.testing.assert_allclose(back.alpha, alpha, atol=0.02)


def test_tiff_8bit_reads_exactly(tmp_path: Path) -> None:
    src = _u8((7, 5, 3))
    Image.fromarray(src).save(tmp_path / "in.tif")
    data = read_image(tmp_path / "in.tif")
    _check_layout(data)
    assert (data.format, data.bit_depth) == ("TIFF", 8)
    np.testing.assert_array_equal(_as_u8(data.rgb), src)


def test_tiff_16bit_rgb_reads_exactly_and_writes_16bit_with_alpha(tmp_path: Path) -> None:
    src = _rng().integers(0, 65536, size=(6, 8, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "in.tiff", src, photometric="rgb")
    data = read_image(tmp_path / "in.tiff")
    _check_layout(data)
    assert (data.format, data.bit_depth, data.grayscale) == ("TIFF", 16, False)
    np.testing.assert_array_equal(_as_u16(data.rgb), src)

    alpha = np.linspace(0, 1, 48, dtype=np.float32).reshape(6, 8)
    write_image(tmp_path / "out.tif", data.rgb, alpha=alpha, bit_depth=16, icc_profile=_srgb_icc())
    stored = tifffile.imread(tmp_path / "out.tif")
    assert stored.dtype == np.uint16 and stored.shape == (6, 8, 4)
    np.testing.assert_array_equal(stored[..., :3], src)
    back = read_image(tmp_path / "out.tif")
    assert back.bit_depth == 16 and back.alpha is not None
    assert back.icc_profile == _srgb_icc()
    np.testing.assert_array_equal(_as_u16(back.alpha), _as_u16(alpha))


def test_tiff_16bit_gray_reads_as_gray(tmp_path: Path) -> None:
    src = _rng().integers(0, 65536, size=(5, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "g.tif", src, photometric="minisblack")
    data = read_image(tmp_path / "g.tif")
    assert data.grayscale and data.bit_depth == 16
    np.testing.assert_array_equal(_as_u16(data.rgb[..., 2]), src)


def test_lzw_16bit_gray_tiff_falls_back_to_pillow_exactly(tmp_path: Path) -> None:
    src = _rng().integers(0, 65536, size=(4, 5), dtype=np.uint16)
    Image.fromarray(src).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    data = read_image(tmp_path / "lzw.tif")
    assert data.grayscale and data.bit_depth == 16
    np.testing.assert_array_equal(_as_u16(data.rgb[..., 0]), src)


def test_truncated_16bit_tiff_reports_corrupt_file(tmp_path: Path) -> None:
    src = _rng().integers(0, 65536, size=(64, 64, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "full.tif", src, photometric="rgb", compression="zlib")
    blob = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        read_image(tmp_path / "cut.tif")


def test_multipage_tiff_reads_first_page(tmp_path: Path) -> None:
    pages = _rng().integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "two.tif", pages, photometric="rgb")
    data = read_image(tmp_path / "two.tif")
    np.testing.assert_array_equal(_as_u8(data.rgb), pages[0])


def test_bmp_reads_exactly(tmp_path: Path) -> None:
    src = _u8((3, 5, 3))
    Image.fromarray(src).save(tmp_path / "in.bmp")
    data = read_image(tmp_path / "in.bmp")
    assert data.format == "BMP"
    np.testing.assert_array_equal(_as_u8(data.rgb), src)


def test_exif_orientation_6_rotates_pixels_and_resets_tag(tmp_path: Path) -> None:
    src = np.zeros((16, 32, 3), np.uint8)
    src[:, :16] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "TestCam"
    Image.fromarray(src).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    data = read_image(tmp_path / "rot.jpg")
    assert data.rgb.shape == (32, 16, 3)  # rotated 90 degrees clockwise
    assert data.rgb[:14].mean() > 0.95 and data.rgb[18:].mean() < 0.05  # left went to top
    assert data.exif is not None
    back = Image.Exif()
    back.load(data.exif)
    assert back[0x0112] == 1 and back[0x010F] == "TestCam"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow_exif_transpose(tmp_path: Path, orientation: int) -> None:
    src = _u8((3, 5, 4))
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(src).save(tmp_path / "o.png", exif=exif)
    with Image.open(tmp_path / "o.png") as im:
        expected = np.asarray(ImageOps.exif_transpose(im))
    data = read_image(tmp_path / "o.png")
    assert data.alpha is not None
    np.testing.assert_array_equal(_as_u8(data.rgb), expected[..., :3])
    np.testing.assert_array_equal(_as_u8(data.alpha), expected[..., 3])


def test_image_without_exif_returns_none(tmp_path: Path) -> None:
    Image.fromarray(_u8((2, 2, 3))).save(tmp_path / "plain.jpg")
    assert read_image(tmp_path / "plain.jpg").exif is None


def test_icc_profile_is_carried_to_written_png_and_jpeg(tmp_path: Path) -> None:
    icc = _srgb_icc()
    Image.fromarray(_u8((4, 4, 3))).save(tmp_path / "in.png", icc_profile=icc)
    data = read_image(tmp_path / "in.png")
    assert data.icc_profile == icc
    for name in ("out.png", "out.jpg", "out.webp"):
        write_image(tmp_path / name, data.rgb, icc_profile=data.icc_profile)
        with Image.open(tmp_path / name) as im:
            assert im.info.get("icc_profile") == icc, name


@pytest.mark.parametrize("name", ["out.png", "out.jpg", "out.webp"])
def test_exif_is_carried_to_written_png_jpeg_and_webp(tmp_path: Path, name: str) -> None:
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    exif[0x0112] = 6
    Image.fromarray(_u8((4, 6, 3))).save(tmp_path / "in.jpg", exif=exif)
    data = read_image(tmp_path / "in.jpg")
    write_image(tmp_path / name, data.rgb, exif=data.exif)
    back = read_image(tmp_path / name)
    assert back.rgb.shape == (6, 4, 3)  # not rotated a second time
    assert back.exif is not None
    again = Image.Exif()
    again.load(back.exif)
    assert again[0x010F] == "TestCam" and again[0x0112] == 1


def test_icc_and_exif_are_carried_to_16bit_png(tmp_path: Path) -> None:
    icc = _srgb_icc()
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    rgb = np.full((3, 3, 3), 0.25, np.float32)
    write_image(tmp_path / "out.png", rgb, bit_depth=16, icc_profile=icc, exif=exif.tobytes())
    data = read_image(tmp_path / "out.png")
    assert data.bit_depth == 16 and data.icc_profile == icc
    assert data.exif is not None
    back = Image.Exif()
    back.load(data.exif)
    assert back[0x010F] == "TestCam"


def test_png_suffix_holding_jpeg_data_loads(tmp_path: Path) -> None:
    Image.fromarray(_u8((8, 8, 3))).save(tmp_path / "liar.png", format="JPEG")
    data = read_image(tmp_path / "liar.png")
    assert data.format == "JPEG" and data.rgb.shape == (8, 8, 3)


def test_one_pixel_image_loads(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1), (255, 0, 0)).save(tmp_path / "dot.png")
    data = read_image(tmp_path / "dot.png")
    assert data.rgb.shape == (1, 1, 3)
    np.testing.assert_array_equal(data.rgb[0, 0], [1.0, 0.0, 0.0])


# ---------------------------------------------------------------------------------- bad inputs


def _assert_one_line(exc: pytest.ExceptionInfo[ImageError]) -> None:
    assert isinstance(exc.value, DeltaDiffError)
    assert "\n" not in str(exc.value)


def test_missing_file_reports_not_found(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="file not found") as exc:
        read_image(tmp_path / "nope.png")
    _assert_one_line(exc)


def test_directory_reports_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is a folder"):
        read_image(tmp_path)


def test_zero_byte_file_reports_empty(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty \(0 bytes\)"):
        read_image(tmp_path / "empty.png")


def test_truncated_png_reports_corrupt_file(tmp_path: Path) -> None:
    Image.fromarray(_u8((64, 64, 3))).save(tmp_path / "full.png")
    blob = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt") as exc:
        read_image(tmp_path / "cut.png")
    _assert_one_line(exc)
    assert "re-export" in str(exc.value)


def test_truncated_16bit_png_reports_corrupt_file(tmp_path: Path) -> None:
    arr = _rng().integers(0, 65536, size=(32, 32, 3), dtype=np.uint16)
    _write_png16(tmp_path / "full.png", arr, greyscale=False, alpha=False)
    blob = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt") as exc:
        read_image(tmp_path / "cut.png")
    _assert_one_line(exc)


def test_truncated_jpeg_reports_corrupt_file(tmp_path: Path) -> None:
    Image.fromarray(_u8((64, 64, 3))).save(tmp_path / "full.jpg")
    blob = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        read_image(tmp_path / "cut.jpg")


def test_text_file_named_png_reports_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("hello, this is not a picture\n")
    with pytest.raises(ImageError, match="not a supported image.*b'hello, this") as exc:
        read_image(tmp_path / "notes.png")
    _assert_one_line(exc)


_PATCHES = np.array([[200, 30, 40], [20, 180, 60], [30, 60, 220], [250, 240, 10]], np.uint8)
# Ghostscript's CMYK profile (Debian package libgs-common; .ci/run installs it).
_GS_CMYK = Path("/usr/share/color/icc/ghostscript/default_cmyk.icc")


# muted colours inside a print gamut, for the colour-managed round trip
_IN_GAMUT = np.array([[150, 90, 80], [90, 140, 100], [90, 110, 160], [200, 190, 120]], np.uint8)


def _patch_image(patches: np.ndarray = _PATCHES) -> np.ndarray:
    """Four flat 16x16 colour patches: JPEG keeps flat 8x8 blocks (almost) exactly."""
    return np.repeat(np.repeat(patches[None], 16, axis=0), 16, axis=1)


def test_adobe_cmyk_jpeg_reads_as_rgb_with_the_true_colours(tmp_path: Path, caplog) -> None:
    rgb = _patch_image()
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    raw = (tmp_path / "cmyk.jpg").read_bytes()
    assert raw[6:11] == b"Adobe"  # an APP14 Adobe marker: the samples are stored inverted
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "CMYK" and "icc_profile" not in im.info
    imageio._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="deltadiff.runtime.imageio"):
        data = read_image(tmp_path / "cmyk.jpg")
        read_image(tmp_path / "cmyk.jpg")
    # un-inverted and converted: every patch within 2/255 of the RGB it was made from
    assert np.abs(_as_u8(data.rgb).astype(int) - rgb).max() <= 2
    assert data.alpha is None and not data.grayscale and data.icc_profile is None
    assert sum("converted to RGB by Pillow" in r.message for r in caplog.records) == 1  # once


@pytest.mark.skipif(not _GS_CMYK.exists(), reason=f"no CMYK ICC profile at {_GS_CMYK}")
def test_cmyk_jpeg_with_icc_profile_is_colour_managed_to_srgb(tmp_path: Path, caplog) -> None:
    icc = _GS_CMYK.read_bytes()
    cmyk_profile = ImageCms.ImageCmsProfile(str(_GS_CMYK))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    rgb = _patch_image(_IN_GAMUT)
    # the CMYK separation of the patches under that profile, then back through LittleCMS
    cmyk = ImageCms.profileToProfile(Image.fromarray(rgb), srgb, cmyk_profile, outputMode="CMYK")
    cmyk.save(tmp_path / "managed.jpg", quality=95, icc_profile=icc)
    want = np.asarray(
        ImageCms.profileToProfile(cmyk, cmyk_profile, srgb, outputMode="RGB"), dtype=int
    )
    imageio._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="deltadiff.runtime.imageio"):
        data = read_image(tmp_path / "managed.jpg")
    got = _as_u8(data.rgb).astype(int)
    assert np.abs(got - want).max() <= 3  # JPEG of flat patches
    assert np.abs(got - rgb).max() <= 12  # the round trip through a print gamut keeps colours
    naive = np.asarray(cmyk.convert("RGB"), dtype=int)
    assert np.abs(naive - want).max() > 20  # so the profile really was used
    assert data.icc_profile is not None
    out_profile = ImageCms.ImageCmsProfile(io.BytesIO(data.icc_profile))
    assert ImageCms.getProfileDescription(out_profile).strip().lower().startswith("srgb")
    assert any("embedded ICC profile" in r.message for r in caplog.records)


def test_cmyk_jpeg_with_a_broken_icc_profile_falls_back(tmp_path: Path, caplog) -> None:
    rgb = _patch_image()
    Image.fromarray(rgb).convert("CMYK").save(
        tmp_path / "bad_icc.jpg", quality=95, icc_profile=b"not a profile" * 20
    )
    imageio._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="deltadiff.runtime.imageio"):
        data = read_image(tmp_path / "bad_icc.jpg")
    assert np.abs(_as_u8(data.rgb).astype(int) - rgb).max() <= 2
    assert data.icc_profile is None
    assert any("cannot be used" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    ("name", "fmt"), [("anim.gif", "GIF"), ("anim.webp", "WEBP"), ("anim.png", "PNG")]
)
def test_animated_image_reports_frame_count(tmp_path: Path, name: str, fmt: str) -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], duration=50)
    with pytest.raises(ImageError, match=f"animated {fmt} with 2 frames") as exc:
        read_image(tmp_path / name)
    _assert_one_line(exc)


def test_mpo_camera_jpeg_reads_first_image(tmp_path: Path) -> None:
    first, preview = Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (4, 3), (0, 0, 255))
    first.save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=[preview])
    data = read_image(tmp_path / "camera.jpg")
    assert data.rgb.shape == (6, 8, 3) and data.rgb[..., 0].mean() > 0.9


def test_single_frame_gif_loads(tmp_path: Path) -> None:
    Image.new("P", (4, 3), 0).save(tmp_path / "still.gif")
    assert read_image(tmp_path / "still.gif").rgb.shape == (3, 4, 3)


def test_float_tiff_reports_unsupported_mode(tmp_path: Path) -> None:
    Image.new("F", (3, 3), 0.5).save(tmp_path / "f.tif")
    with pytest.raises(ImageError, match=r"32-bit float pixels \(mode F\) is not supported"):
        read_image(tmp_path / "f.tif")


def test_image_over_max_pixels_reports_size_and_limit(tmp_path: Path) -> None:
    Image.new("RGB", (20, 10)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"20x10 = 200 pixels, over the limit of 199"):
        read_image(tmp_path / "big.png", max_pixels=199)
    assert read_image(tmp_path / "big.png", max_pixels=200).rgb.shape == (10, 20, 3)


def test_max_pixels_overrides_pillow_bomb_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # Pillow would refuse 64 > 2 * 10
    assert read_image(tmp_path / "img.png", max_pixels=100).rgb.shape == (8, 8, 3)
    assert Image.MAX_IMAGE_PIXELS == 10  # restored


# ---------------------------------------------------------------------------------- writing


def test_write_clips_rounds_and_zeroes_nan(tmp_path: Path) -> None:
    rgb = np.array([[[-0.5, 1.5, np.nan], [0.5, 1 / 255, 0.998]]], np.float32)
    write_image(tmp_path / "out.png", rgb)
    with Image.open(tmp_path / "out.png") as im:
        np.testing.assert_array_equal(np.asarray(im), [[[0, 255, 0], [128, 1, 254]]])


def test_grayscale_write_stores_channel_mean(tmp_path: Path) -> None:
    rgb = np.zeros((2, 2, 3), np.float32)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 0.3, 0.6, 0.9
    write_image(tmp_path / "g.png", rgb, grayscale=True)
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "L"
        assert np.all(np.asarray(im) == 153)


def test_gray_with_alpha_writes_la_png(tmp_path: Path) -> None:
    rgb = np.full((2, 3, 3), 0.5, np.float32)
    alpha = np.array([[0, 0.5, 1], [1, 1, 0]], np.float32)
    write_image(tmp_path / "la.png", rgb, alpha=alpha, grayscale=True)
    with Image.open(tmp_path / "la.png") as im:
        assert im.mode == "LA"
    back = read_image(tmp_path / "la.png")
    assert back.grayscale
    np.testing.assert_array_equal(_as_u8(back.alpha), _as_u8(alpha))


def test_jpeg_with_alpha_drops_alpha_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rgb = np.full((4, 4, 3), 0.5, np.float32)
    with caplog.at_level(logging.WARNING, logger=imageio.__name__):
        write_image(tmp_path / "a.jpg", rgb, alpha=np.ones((4, 4), np.float32))
        write_image(tmp_path / "b.jpg", rgb, alpha=np.ones((4, 4), np.float32))
    warnings = [r for r in caplog.records if "cannot hold transparency" in r.getMessage()]
    assert len(warnings) == 1
    with Image.open(tmp_path / "a.jpg") as im:
        assert im.mode == "RGB"


def test_16bit_jpeg_is_written_8bit_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=imageio.__name__):
        write_image(tmp_path / "a.jpg", np.zeros((2, 2, 3), np.float32), bit_depth=16)
    assert any("8 bits per channel only" in r.getMessage() for r in caplog.records)
    assert read_image(tmp_path / "a.jpg").bit_depth == 8


def test_unsupported_output_suffix_reports_the_suffix(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"cannot write suffix '\.gif'; use \.png"):
        write_image(tmp_path / "x.gif", np.zeros((2, 2, 3), np.float32))


def test_bad_bit_depth_and_quality_are_reported(tmp_path: Path) -> None:
    rgb = np.zeros((2, 2, 3), np.float32)
    with pytest.raises(ImageError, match="bit depth 12 is not supported"):
        write_image(tmp_path / "x.png", rgb, bit_depth=12)
    with pytest.raises(ImageError, match="quality 0 is out of range"):
        write_image(tmp_path / "x.jpg", rgb, quality=0)


def test_wrong_array_shape_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rgb must be an"):
        write_image(tmp_path / "x.png", np.zeros((2, 2), np.float32))


def test_write_into_missing_folder_reports_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "out.png"
    with pytest.raises(ImageError, match="does not exist; create it first") as exc:
        write_image(target, np.zeros((2, 2, 3), np.float32))
    _assert_one_line(exc)
    assert not (tmp_path / "missing").exists()
    assert list(tmp_path.iterdir()) == []


def test_write_into_unwritable_folder_reports_writable_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(*args: object, **kwargs: object) -> None:  # root ignores chmod, so simulate it
        raise PermissionError(13, "Permission denied")

    import deltadiff.atomic as atomic

    monkeypatch.setattr(atomic.tempfile, "mkstemp", denied)
    with pytest.raises(ImageError, match="Permission denied.*choose a writable output folder"):
        write_image(tmp_path / "out.png", np.zeros((2, 2, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_exif_without_header_is_valid_in_jpeg(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    bare = exif.tobytes()[6:]  # stored without the "Exif" header
    write_image(tmp_path / "out.jpg", np.zeros((2, 2, 3), np.float32), exif=bare)
    with Image.open(tmp_path / "out.jpg") as im:
        assert im.getexif()[0x010F] == "TestCam"


def test_failed_encode_keeps_existing_target_and_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out.png"
    target.write_bytes(b"previous good output")

    def crash(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        fp.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("simulated encoder crash")

    monkeypatch.setattr(Image.Image, "save", crash)
    with pytest.raises(ImageError, match="cannot write PNG.*simulated encoder crash") as exc:
        write_image(target, np.zeros((4, 4, 3), np.float32))
    _assert_one_line(exc)
    assert target.read_bytes() == b"previous good output"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_failed_16bit_encode_leaves_no_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise ValueError("simulated pypng failure")

    monkeypatch.setattr(png.Writer, "write_packed", crash)
    with pytest.raises(ImageError, match="cannot encode PNG.*simulated pypng failure"):
        write_image(tmp_path / "out.png", np.zeros((4, 4, 3), np.float32), bit_depth=16)
    assert list(tmp_path.iterdir()) == []


def test_write_replaces_existing_target_and_keeps_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    target.chmod(0o640)
    write_image(target, np.ones((2, 2, 3), np.float32))
    assert target.stat().st_mode & 0o777 == 0o640
    assert read_image(target).rgb.min() == 1.0


def test_new_file_gets_umask_mode_not_private_temp_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_image(tmp_path / "out.png", np.ones((2, 2, 3), np.float32))
    finally:
        os.umask(old)
    assert (tmp_path / "out.png").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------- alpha


def test_upscale_alpha_is_times_four_and_in_range() -> None:
    alpha = np.zeros((5, 7), np.float32)
    alpha[:, 3:] = 1.0  # a hard edge makes bicubic overshoot before clipping
    out = upscale_alpha(alpha)
    assert out.shape == (20, 28) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.all(out[:, :10] == 0.0) and np.all(out[:, 14:] == 1.0)


@pytest.mark.parametrize("value", [1.0, 0.5, 0.0])
def test_upscale_alpha_keeps_constant_alpha_exactly(value: float) -> None:
    out = upscale_alpha(np.full((3, 4), value, np.float32), scale=4)
    assert out.shape == (12, 16)
    assert np.all(out == np.float32(value))


def test_upscale_alpha_opaque_region_stays_exactly_one() -> None:
    alpha = np.ones((16, 16), np.float32)
    alpha[0, 0] = 0.0
    out = upscale_alpha(alpha)
    assert np.all(out[16:, 16:] == 1.0)


# ---------------------------------------------------------------------------------- inputs/outputs


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_find_images_recurses_sorted_and_skips_junk(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for rel in ("b.png", "a.JPG", "sub/z.webp", "sub/deeper/c.tiff", "sub0/d.bmp"):
        _touch(root / rel)
    for rel in (
        ".hidden.png",
        ".git/e.png",
        "notes.txt",
        "Thumbs.db",
        "__MACOSX/x.png",
        "sub/._f.jpg",
        "@eaDir/thumb.jpg",
    ):
        _touch(root / rel)
    found = find_images([root])
    assert [rel.as_posix() for _, rel in found] == [
        "a.JPG",
        "b.png",
        "sub/deeper/c.tiff",
        "sub/z.webp",
        "sub0/d.bmp",
    ]
    assert all(path == root / rel for path, rel in found)
    flat = find_images([root], recursive=False)
    assert [rel.as_posix() for _, rel in flat] == ["a.JPG", "b.png"]


def test_find_images_keeps_named_files_whatever_suffix_and_dedupes(tmp_path: Path) -> None:
    odd = _touch(tmp_path / "scan.raw")
    img = _touch(tmp_path / "dir" / "one.png")
    found = find_images([odd, tmp_path / "dir", img])
    assert found == [(odd, Path("scan.raw")), (img, Path("one.png"))]


def test_find_images_missing_input_reports_path(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file or folder"):
        find_images([tmp_path / "gone"])


def test_image_suffixes_and_is_image_file() -> None:
    assert {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"} <= IMAGE_SUFFIXES
    assert is_image_file(Path("A.PNG")) and not is_image_file(Path("a.txt"))


def test_output_path_rules(tmp_path: Path) -> None:
    src = tmp_path / "in" / "sub" / "cat.jpg"
    rel = Path("sub/cat.jpg")
    out = tmp_path / "out"
    assert output_path(src, Path("cat.jpg"), out / "x4.png", single=True) == out / "x4.png"
    assert output_path(src, rel, out, single=False) == out / "sub" / "cat.jpg"
    assert output_path(src, rel, out, suffix="png", single=False) == out / "sub" / "cat.png"
    assert output_path(src, rel, out, suffix=".tif", single=True) == out / "sub" / "cat.tif"
    gif = tmp_path / "anim.gif"
    assert output_path(gif, Path("anim.gif"), out, single=False) == out / "anim.png"


def test_rgba_png_with_icc_survives_read_write_read(tmp_path: Path) -> None:
    """An RGBA 8-bit PNG with ICC survives read -> write -> read unchanged."""
    src = _u8((5, 6, 4))
    Image.fromarray(src).save(tmp_path / "in.png", icc_profile=_srgb_icc())
    a = read_image(tmp_path / "in.png")
    write_image(
        tmp_path / "out.png",
        a.rgb,
        alpha=a.alpha,
        bit_depth=a.bit_depth,
        icc_profile=a.icc_profile,
        exif=a.exif,
    )
    b = read_image(tmp_path / "out.png")
    np.testing.assert_array_equal(a.rgb, b.rgb)
    np.testing.assert_array_equal(a.alpha, b.alpha)
    assert b.icc_profile == a.icc_profile
