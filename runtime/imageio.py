"""Image I/O for the lean runtime (``dd-run upscale``): read, write, find inputs, name outputs.

numpy, Pillow, pypng (``png``) and tifffile only; never torch. Who does what:

* Reading: Pillow always opens the file first (the *content* decides the format, not the suffix)
  and supplies the size, frame count, pixel mode, ICC profile and EXIF. Pixels then come from

  - pypng for every 16-bit PNG (Pillow truncates 16-bit RGB/RGBA/LA PNGs to 8 bits),
  - tifffile for 16-bit TIFF (Pillow truncates 16-bit RGB TIFF); when tifffile lacks the codec
    (LZW, JPEG, PackBits need ``imagecodecs``) Pillow decodes it instead, at 8-bit precision for
    colour (a warning says so) and exactly for gray,
  - Pillow for everything else (8-bit PNG/JPEG/WebP/TIFF/BMP, single-frame GIF, ``I;16`` gray).

* Modes: ``1``/``L``/``LA`` are gray (replicated to RGB, ``grayscale=True``); ``P``/``PA`` become
  RGB or RGBA (palette transparency becomes alpha); a ``tRNS`` colour key on L/RGB becomes alpha;
  ``RGBX``/``YCbCr`` become RGB; premultiplied ``RGBa``/``La`` are un-premultiplied. ``CMYK``
  (including YCCK JPEGs, which libjpeg hands over as CMYK, and Adobe's inverted CMYK JPEGs, which
  Pillow un-inverts) becomes RGB through the embedded ICC profile when there is one (LittleCMS via
  ``ImageCms``, perceptual intent, to sRGB; the output then carries an sRGB profile), else through
  Pillow's plain conversion; either is logged once per run. 32-bit integer ``I``, float ``F``,
  signed 16-bit and any other mode are refused with an ImageError that says how to convert.
* Frames: animated GIF/WebP/APNG with more than one frame are refused. Multi-page TIFF and MPO
  (camera JPEGs that carry a preview image) are read from their first page.
* Decompression bombs: before any pixel is decoded, a PNG's IDAT stream and a TIFF's zlib / LZMA
  (and, for tifffile, PackBits) segments are inflated in 1 MiB steps and discarded, against the
  size the header implies (``decode_limits``); data that inflates past it is refused at once.
  pypng and tifffile then only inflate data known to fit. Pillow's decoders (PNG, JPEG, WebP,
  GIF, libtiff for every other TIFF compression) fill a buffer of the header's size and stop.
* The pixel limit ``max_pixels`` is checked from the header before any decoding. While the
  header is parsed, Pillow's own decompression-bomb limit is set from ``max_pixels`` (under a
  lock, restored afterwards) so that ``max_pixels`` is the one limit in force, above or below
  Pillow's default, and Pillow's early checks (WebP, before it allocates the canvas) apply it.
* EXIF orientation is applied to the pixels (in numpy, so it works for 16-bit data too; same
  transposes as ``ImageOps.exif_transpose``) and the returned EXIF says orientation 1.

* Writing (format from the suffix): PNG via Pillow (8-bit) or pypng (16-bit, with ``iCCP`` and
  ``eXIf`` chunks added); JPEG, WebP and BMP via Pillow, 8-bit only (16-bit requested: written at
  8 bits, warned once per format); TIFF via tifffile (8 or 16-bit, zlib compression, ICC profile
  kept; EXIF is not written to TIFF). ``grayscale=True`` writes one channel, the *mean* of R, G
  and B (for a gray source the three channels differ only by model noise, which the mean
  averages). Alpha goes into PNG, WebP and TIFF; JPEG and BMP cannot hold it, so it is *dropped*
  with a warning (once per format) rather than failing a finished upscale. Every write is atomic:
  a temporary file beside the target, fsync, then ``os.replace``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import math
import os
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

from deltadiff.atomic import atomic_path
from deltadiff.errors import ImageError, MissingDependencyError
from deltadiff.imresize import imresize_matlab
from deltadiff.runtime import decode_limits

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 178_956_970  # 2 x Pillow's default MAX_IMAGE_PIXELS, where Pillow errors

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
)
"""Suffixes (lower case) that ``find_images`` picks up in folders. All but .gif can be written
(a GIF's output is written as PNG; an animated GIF is refused with a clear error)."""

_WRITE_FORMATS: dict[str, str] = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}
_SIXTEEN_BIT_FORMATS = frozenset({"PNG", "TIFF"})
_NO_ALPHA_FORMATS = frozenset({"JPEG", "BMP"})
# Formats Pillow may identify. GIF only so that animated GIFs get a clear error (a single-frame
# GIF reads fine). Everything else Pillow knows (EPS via Ghostscript, PSD, ICO...) is refused.
_READ_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")  # JPEG also opens MPO
_JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx", "@eadir"})
_ORIENTATION_TAG = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_HEADER = b"Exif\x00\x00"
_JPEG_MAX_EXIF = 65533  # one APP1 segment (Pillow refuses more)

_PIL_LIMIT_LOCK = threading.Lock()
_WARNED: set[str] = set()


@dataclass(frozen=True, eq=False)
class ImageData:
    """A decoded image. ``rgb`` is float32 (H, W, 3) in [0, 1], C-contiguous (gray sources are
    replicated to three channels); ``alpha`` is float32 (H, W) in [0, 1] or None."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    bit_depth: int
    grayscale: bool
    icc_profile: bytes | None
    exif: bytes | None
    format: str

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


# --------------------------------------------------------------------------------------------
# helpers


def _reason(exc: BaseException) -> str:
    """An exception as one short line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _warn_once(key: str, message: str) -> None:
    if key in _WARNED:
        log.debug("%s", message)
        return
    _WARNED.add(key)
    log.warning("%s", message)


def _import_png() -> ModuleType:
    try:
        import png
    except ImportError as exc:  # pragma: no cover - pypng is a runtime dependency
        raise MissingDependencyError(
            f"16-bit PNG needs pypng, which is not installed ({_reason(exc)}); "
            "run `pip install pypng`"
        ) from exc
    return png


def _import_tifffile() -> ModuleType:
    try:
        import tifffile
    except ImportError as exc:  # pragma: no cover - tifffile is a runtime dependency
        raise MissingDependencyError(
            f"16-bit TIFF needs tifffile, which is not installed ({_reason(exc)}); "
            "run `pip install tifffile`"
        ) from exc
    return tifffile


def _decode_error(path: Path, exc: BaseException) -> ImageError:
    """A one-line ImageError for an exception a decoding library raised."""
    if isinstance(exc, ImageError):
        return exc
    if isinstance(exc, MemoryError):
        return ImageError(
            f"{path}: not enough memory to decode the image; downscale it or free memory"
        )
    if isinstance(exc, Image.DecompressionBombError):
        return ImageError(
            f"{path}: image is over Pillow's decompression-bomb limit ({_reason(exc)}); "
            "downscale it first"
        )
    if isinstance(exc, PermissionError):
        return ImageError(
            f"{path}: cannot read the file (permission denied); check its permissions"
        )
    return ImageError(f"{path}: file is truncated or corrupt ({_reason(exc)}); re-export it")


@contextlib.contextmanager
def _corrupt_guard(path: Path) -> Iterator[None]:
    """Turn any library exception raised while decoding into a one-line ImageError."""
    try:
        yield
    except ImageError:
        raise
    except Exception as exc:
        raise _decode_error(path, exc) from exc


@contextlib.contextmanager
def _pillow_limit(max_pixels: int) -> Iterator[None]:
    """Set Pillow's decompression-bomb limit to ``max_pixels`` while a header is parsed.

    Pillow raises above twice ``MAX_IMAGE_PIXELS`` (warns above once), so it is set to half of
    ``max_pixels``, rounded up, and the warning is silenced: Pillow then refuses only what
    ``max_pixels`` refuses anyway, but early where it matters (its WebP decoder allocates the
    canvas when the file is opened, after this check).
    """
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = (max_pixels + 1) // 2
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


# --------------------------------------------------------------------------------------------
# reading


def _check_input_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: file not found; check the path") from exc
    except OSError as exc:
        raise ImageError(
            f"{path}: cannot access the file ({_reason(exc)}); check the path"
        ) from exc
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image file; pass an image file")
    if not path.is_file():
        raise ImageError(f"{path}: is not a regular file; pass an image file")
    if st.st_size == 0:
        raise ImageError(f"{path}: file is empty (0 bytes); re-export or re-copy it")


def _open_pillow(path: Path, max_pixels: int) -> Image.Image:
    try:
        with _pillow_limit(max_pixels):
            return Image.open(path, formats=_READ_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"{path}: image is over the limit of {max_pixels:,} pixels ({_reason(exc)}); "
            "downscale it first or raise the pixel limit"
        ) from exc
    except UnidentifiedImageError as exc:
        try:
            with path.open("rb") as f:
                head = f.read(12)
        except OSError:
            head = b""
        raise ImageError(
            f"{path}: not a supported image (content starts with {head!r}); "
            "use a PNG, JPEG, WebP, TIFF or BMP file"
        ) from exc
    except Exception as exc:
        raise _decode_error(path, exc) from exc


def _png_header(path: Path) -> tuple[int, int]:
    """(bit depth, colour type) from the PNG IHDR chunk."""
    with path.open("rb") as f:
        head = f.read(33)
    if len(head) < 33 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        raise ImageError(f"{path}: PNG header is truncated or corrupt; re-export it")
    return head[24], head[25]


def _read_png16(path: Path) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """16-bit PNG via pypng: (colour (H, W) or (H, W, 3) uint16, alpha uint16 or None, gray)."""
    png = _import_png()
    with _corrupt_guard(path):
        with path.open("rb") as f:
            width, height, pixels, info = png.Reader(file=f).read_flat()
        arr = np.frombuffer(pixels, dtype=np.uint16).reshape(height, width, info["planes"])
    gray = bool(info["greyscale"])
    color = arr[..., 0] if gray else arr[..., :3]
    alpha = arr[..., -1] if info["alpha"] else None
    key = info.get("transparent")
    if alpha is None and key is not None:  # tRNS colour key
        hit = color == key if gray else np.all(color == np.asarray(key, np.uint16), axis=-1)
        alpha = np.where(hit, 0, 65535).astype(np.uint16)
    return color, alpha, gray


def _check_inflated_size(path: Path, im: Image.Image, fmt: str, *, tiff16: bool) -> None:
    """Refuse a PNG / TIFF whose compressed data inflates past its header (decode_limits), before
    any decoder runs. PackBits is counted only for tifffile (16-bit); libtiff bounds it itself."""
    with _corrupt_guard(path):
        if fmt == "PNG":
            decode_limits.check_png(path)
        elif fmt == "TIFF":
            tags = getattr(im, "tag_v2", None)
            segs = None if tags is None else decode_limits.tiff_segments(tags, *im.size)
            if segs is not None:
                decode_limits.check_tiff(path, segs, im.size, packbits=tiff16)


def _tiff_sixteen_bit(im: Image.Image) -> bool:
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return False
    bits = tags.get(258, 8)
    fmt = tags.get(339, 1)
    bits_t = tuple(bits) if isinstance(bits, tuple | list) else (bits,)
    fmt_t = tuple(fmt) if isinstance(fmt, tuple | list) else (fmt,)
    return max(bits_t) == 16 and all(f == 1 for f in fmt_t)


def _read_tiff16(path: Path) -> tuple[np.ndarray, np.ndarray | None, bool] | None:
    """16-bit TIFF via tifffile, or None when tifffile lacks the codec (caller uses Pillow)."""
    tifffile = _import_tifffile()
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            arr = page.asarray()
            photometric = int(page.photometric)
            extras = tuple(int(e) for e in page.extrasamples)
            planar = int(page.planarconfig)
    except Exception as exc:
        if "imagecodecs" in str(exc):
            log.debug("%s: tifffile cannot decode it (%s); using Pillow", path, _reason(exc))
            return None
        raise _decode_error(path, exc) from exc
    if arr.dtype != np.uint16:
        raise ImageError(
            f"{path}: 16-bit TIFF decoded as {arr.dtype}; convert it to 8- or 16-bit RGB"
        )
    if planar == 2 and arr.ndim == 3:  # separate planes: (S, H, W)
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[..., None]
    if photometric in (0, 1):  # MINISWHITE, MINISBLACK
        gray, ncolor = True, 1
    elif photometric == 2:
        gray, ncolor = False, 3
    else:
        raise ImageError(
            f"{path}: TIFF photometric interpretation {photometric} is not supported; "
            "convert it to RGB or grayscale"
        )
    if arr.ndim != 3 or arr.shape[-1] < ncolor:
        raise ImageError(f"{path}: TIFF has unexpected shape {arr.shape}; convert it to RGB")
    color = arr[..., 0] if gray else arr[..., :3]
    if photometric == 0:
        color = 65535 - color
    alpha = None
    if arr.shape[-1] > ncolor and extras and extras[0] in (1, 2):
        alpha = arr[..., ncolor]
        if extras[0] == 1:  # associated (premultiplied) alpha
            a = alpha.astype(np.float32)[..., None] if not gray else alpha.astype(np.float32)
            with np.errstate(divide="ignore", invalid="ignore"):
                un = np.where(a > 0, color.astype(np.float32) * 65535.0 / a, 0.0)
            color = np.clip(np.round(un), 0, 65535).astype(np.uint16)
    return color, alpha, gray


_PILLOW_CONVERT = {
    "1": "L",
    "La": "LA",
    "RGBa": "RGBA",
    "PA": "RGBA",
    "RGBX": "RGB",
    "YCbCr": "RGB",
}
_PILLOW_READY = frozenset({"L", "LA", "RGB", "RGBA", "P", "I;16", "I;16L", "I;16B", "I;16N"})
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I;16", "I;16L", "I;16B", "I;16N"})


def _unsupported_mode(path: Path, mode: str) -> ImageError:
    what = {"I": "32-bit integer", "F": "32-bit float", "I;16S": "signed 16-bit"}.get(mode)
    desc = f"{what} pixels (mode {mode})" if what else f"pixel mode {mode}"
    return ImageError(f"{path}: {desc} is not supported; convert to 8- or 16-bit RGB")


_SRGB_ICC: bytes | None = None


def _srgb_icc() -> bytes:
    global _SRGB_ICC
    if _SRGB_ICC is None:
        _SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return _SRGB_ICC


def cmyk_to_rgb(path: Path, im: Image.Image) -> tuple[Image.Image, bytes | None]:
    """A decoded CMYK image as RGB, and the ICC profile the RGB pixels are in (None: untagged).

    With an embedded profile the conversion is colour-managed (to sRGB); a profile LittleCMS
    cannot use is reported and the plain conversion is used instead.
    """
    icc = im.info.get("icc_profile")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            rgb = ImageCms.profileToProfile(
                im,
                src,
                ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")),
                renderingIntent=ImageCms.Intent.PERCEPTUAL,
                outputMode="RGB",
            )
        except (ImageCms.PyCMSError, OSError, ValueError) as exc:
            _warn_once(
                "cmyk-bad-icc",
                f"{path}: CMYK image with an ICC profile that cannot be used ({_reason(exc)}); "
                "converted to RGB without colour management",
            )
        else:
            if rgb is not None:
                _warn_once(
                    "cmyk-icc", f"{path}: CMYK converted to sRGB through its embedded ICC profile"
                )
                return rgb, _srgb_icc()
    else:
        _warn_once("cmyk-plain", f"{path}: CMYK without an ICC profile; converted to RGB by Pillow")
    return im.convert("RGB"), None


def _read_pillow(
    path: Path, im: Image.Image
) -> tuple[np.ndarray, np.ndarray | None, int, bytes | None]:
    """Decode with Pillow: (colour (H, W) or (H, W, 3), alpha or None, max value, ICC profile of
    the returned pixels)."""
    icc = im.info.get("icc_profile") or None
    with _corrupt_guard(path):
        im.load()  # force a full decode: truncation shows up here
        mode = im.mode
        if mode == "CMYK":
            im, icc = cmyk_to_rgb(path, im)
        elif mode in _PILLOW_CONVERT:
            im = im.convert(_PILLOW_CONVERT[mode])
        elif mode == "P":
            im = im.convert("RGBA" if im.has_transparency_data else "RGB")
        elif mode in ("L", "RGB") and "transparency" in im.info:
            im = im.convert("RGBA")  # tRNS colour key -> alpha
        arr = np.asarray(im)
    if arr.dtype == np.uint8:
        maxval = 255
    elif arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
        maxval = 65535
    else:  # pragma: no cover - modes are filtered before decoding
        raise _unsupported_mode(path, im.mode)
    if arr.ndim == 2:
        return arr, None, maxval, icc
    if arr.shape[-1] == 2:  # LA
        return arr[..., 0], arr[..., 1], maxval, icc
    if mode in _GRAY_MODES and arr.shape[-1] == 4:  # L with tRNS went through RGBA
        return arr[..., 0], arr[..., 3], maxval, icc
    return arr[..., :3], (arr[..., 3] if arr.shape[-1] == 4 else None), maxval, icc


def _exif_info(path: Path, im: Image.Image) -> tuple[int, bytes | None]:
    """(orientation 1..8, EXIF bytes with orientation reset to 1 or None)."""
    raw = im.info.get("exif")
    try:
        exif = im.getexif()
        orientation = int(exif.get(_ORIENTATION_TAG, 1) or 1)
    except Exception as exc:  # noqa: BLE001 - broken EXIF must not fail the read
        log.warning("%s: ignoring unreadable EXIF (%s)", path, _reason(exc))
        return 1, None
    if not 1 <= orientation <= 8:
        log.warning("%s: ignoring invalid EXIF orientation %d", path, orientation)
        orientation = 1
    if not isinstance(raw, bytes | bytearray) or not raw:
        return orientation, None
    if exif.get(_ORIENTATION_TAG, 1) == 1:  # absent or already 1: keep the bytes as they are
        return orientation, bytes(raw)
    try:
        exif[_ORIENTATION_TAG] = 1
        return orientation, exif.tobytes()
    except Exception as exc:  # noqa: BLE001 - broken EXIF must not fail the read
        log.warning("%s: dropping EXIF that cannot be rewritten (%s)", path, _reason(exc))
        return orientation, None


_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.swapaxes(0, 1),  # TRANSPOSE
    6: lambda a: np.rot90(a, -1),  # ROTATE_270 (90 degrees clockwise)
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],  # TRANSVERSE
    8: lambda a: np.rot90(a, 1),  # ROTATE_90 (90 degrees counter-clockwise)
}


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Transpose an (H, W[, C]) array as ``ImageOps.exif_transpose`` does for ``orientation``."""
    fn = _ORIENT.get(orientation)
    return arr if fn is None else fn(arr)


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageData:
    """Read an image file as float32 RGB (+ alpha) in [0, 1]; see the module doc for the rules.

    Raises ImageError (one line: what, the value seen, the fix) for a missing file, a folder, an
    empty, truncated, corrupt or non-image file, an image over ``max_pixels``, compressed data
    that inflates past its header (a decompression bomb), animation, unsupported pixel modes, and
    running out of memory while decoding.
    """
    path = Path(path)
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    try:
        return _read_image(path, max_pixels)
    except MemoryError as exc:
        raise ImageError(
            f"{path}: not enough memory to decode the image; free memory, downscale it or "
            "lower the pixel limit"
        ) from exc


def _read_image(path: Path, max_pixels: int) -> ImageData:
    _check_input_file(path)
    im = _open_pillow(path, max_pixels)
    with im:
        width, height = im.size
        if width < 1 or height < 1:
            raise ImageError(f"{path}: image has an impossible size {width}x{height}; re-export it")
        if width * height > max_pixels:
            raise ImageError(
                f"{path}: image is {width}x{height} = {width * height:,} pixels, over the limit "
                f"of {max_pixels:,}; downscale it first or raise the pixel limit"
            )
        fmt = str(im.format)
        with _corrupt_guard(path):
            frames = int(getattr(im, "n_frames", 1))
        if frames > 1:
            if fmt in ("TIFF", "MPO"):
                level = logging.WARNING if fmt == "TIFF" else logging.DEBUG
                log.log(level, "%s: %s has %d pages; reading the first", path, fmt, frames)
            else:
                raise ImageError(
                    f"{path}: animated {fmt} with {frames} frames is not supported; "
                    "save the frame you want as a still PNG"
                )
        mode = im.mode
        if mode not in _PILLOW_READY and mode not in _PILLOW_CONVERT and mode != "CMYK":
            raise _unsupported_mode(path, mode)

        bit_depth = 8
        grayscale = mode in _GRAY_MODES
        decoded: tuple[np.ndarray, np.ndarray | None, bool] | None = None
        tiff16 = fmt == "TIFF" and _tiff_sixteen_bit(im)
        _check_inflated_size(path, im, fmt, tiff16=tiff16)
        if fmt == "PNG" and _png_header(path)[0] == 16:
            decoded, bit_depth = _read_png16(path), 16
        elif tiff16:
            bit_depth = 16
            decoded = _read_tiff16(path)
            if decoded is None and mode not in _GRAY_MODES:
                log.warning(
                    "%s: 16-bit colour TIFF with a compression tifffile cannot decode without "
                    "imagecodecs; read at 8-bit precision (pip install imagecodecs for 16-bit)",
                    path,
                )
        icc = im.info.get("icc_profile") or None
        if decoded is not None:
            color, alpha_i, grayscale = decoded
            maxval = 65535
        else:
            color, alpha_i, maxval, icc = _read_pillow(path, im)
            if maxval == 65535:
                bit_depth = 16
        orientation, exif = _exif_info(path, im)

    if color.ndim == 2:
        color = color[..., None]
    rgb = color.astype(np.float32) / np.float32(maxval)
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    alpha = None if alpha_i is None else alpha_i.astype(np.float32) / np.float32(maxval)
    if orientation != 1:
        rgb = apply_orientation(rgb, orientation)
        alpha = None if alpha is None else apply_orientation(alpha, orientation)
    rgb = np.ascontiguousarray(rgb, dtype=np.float32)
    alpha = None if alpha is None else np.ascontiguousarray(alpha, dtype=np.float32)
    log.debug(
        "read %s: %s %dx%d, %d-bit%s%s",
        path,
        fmt,
        rgb.shape[1],
        rgb.shape[0],
        bit_depth,
        ", gray" if grayscale else "",
        ", alpha" if alpha is not None else "",
    )
    return ImageData(
        rgb=rgb,
        alpha=alpha,
        bit_depth=bit_depth,
        grayscale=bool(grayscale),
        icc_profile=bytes(icc) if icc else None,
        exif=exif,
        format=fmt,
    )


# --------------------------------------------------------------------------------------------
# writing


def _quantize(x: np.ndarray, bit_depth: int) -> np.ndarray:
    """Float [0, 1] -> uint8 / uint16: NaN -> 0, clip, round to the integer grid."""
    maxval = 65535 if bit_depth == 16 else 255
    y = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    np.clip(y, 0.0, 1.0, out=y)
    y = np.round(y * np.float32(maxval))
    return y.astype(np.uint16 if bit_depth == 16 else np.uint8)


def _png_text_chunks(icc_profile: bytes | None, exif: bytes | None) -> list[tuple[bytes, bytes]]:
    chunks: list[tuple[bytes, bytes]] = []
    if icc_profile:
        chunks.append((b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc_profile)))
    if exif:
        data = exif.removeprefix(_EXIF_HEADER)
        chunks.append((b"eXIf", data))
    return chunks


def _encode_png16(
    f: BinaryIO, arr: np.ndarray, icc_profile: bytes | None, exif: bytes | None
) -> None:
    png = _import_png()
    height, width, planes = arr.shape
    writer = png.Writer(
        width, height, greyscale=planes in (1, 2), alpha=planes in (2, 4), bitdepth=16
    )
    rows = np.ascontiguousarray(arr, dtype=">u2").view(np.uint8).reshape(height, -1)
    extra = _png_text_chunks(icc_profile, exif)
    if not extra:
        writer.write_packed(f, rows)
        return
    buf = io.BytesIO()
    writer.write_packed(buf, rows)
    chunks = list(png.Reader(bytes=buf.getvalue()).chunks())
    png.write_chunks(f, chunks[:1] + extra + chunks[1:])  # iCCP/eXIf right after IHDR


def _encode(
    f: BinaryIO,
    fmt: str,
    arr: np.ndarray,
    *,
    bit_depth: int,
    icc_profile: bytes | None,
    exif: bytes | None,
    quality: int,
) -> None:
    """Encode (H, W, C) uint8/uint16 ``arr`` (C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA) to ``f``."""
    if fmt == "TIFF":
        tifffile = _import_tifffile()
        channels = arr.shape[-1]
        tifffile.imwrite(
            f,
            arr[..., 0] if channels == 1 else arr,
            photometric="minisblack" if channels in (1, 2) else "rgb",
            extrasamples=["unassalpha"] if channels in (2, 4) else None,
            compression="zlib",
            iccprofile=icc_profile,
            metadata=None,
        )
        return
    if fmt == "PNG" and bit_depth == 16:
        _encode_png16(f, arr, icc_profile, exif)
        return
    im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    params: dict[str, Any] = {}
    if icc_profile:
        params["icc_profile"] = icc_profile
    if exif and fmt in ("PNG", "JPEG", "WEBP"):
        if fmt == "JPEG" and len(exif) > _JPEG_MAX_EXIF:
            log.warning(
                "EXIF of %d bytes is too long for JPEG (max %d); not writing it",
                len(exif),
                _JPEG_MAX_EXIF,
            )
        else:
            params["exif"] = exif  # with the b"Exif\0\0" header; Pillow strips it for PNG/WebP
    if fmt == "JPEG":
        params.update(quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "WEBP":
        params["quality"] = quality
    im.save(f, format=fmt, **params)


def _atomic_write(path: Path, fmt: str, encode: Callable[[BinaryIO], None]) -> None:
    """Encode into a temp file beside ``path``, fsync it, then ``os.replace`` it onto ``path``."""
    parent = path.parent
    if path.is_dir():
        raise ImageError(f"{path}: output path is a folder; give a file name")
    if not parent.exists():
        raise ImageError(f"{path}: output folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise ImageError(f"{path}: {parent} is not a folder; choose another output path")
    try:
        with atomic_path(path, fsync=True) as tmp, tmp.open("wb") as f:  # named: tifffile wants one
            encode(f)
    except ImageError:
        raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            fix = "free disk space"
        elif isinstance(exc, PermissionError):
            fix = "choose a writable output folder"
        else:
            fix = "check the output folder and free disk space"
        raise ImageError(f"{path}: cannot write {fmt} ({_reason(exc)}); {fix}") from exc
    except MemoryError as exc:
        raise ImageError(f"{path}: not enough memory to encode {fmt}; free memory") from exc
    except Exception as exc:
        raise ImageError(
            f"{path}: cannot encode {fmt} ({_reason(exc)}); try another output format"
        ) from exc


def write_image(
    path: str | Path,
    rgb: np.ndarray,
    *,
    alpha: np.ndarray | None = None,
    bit_depth: int = 8,
    grayscale: bool = False,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
    quality: int = 95,
) -> None:
    """Write float ``rgb`` (H, W, 3) in [0, 1] (and ``alpha`` (H, W)) atomically to ``path``.

    The format comes from the suffix (.png, .jpg/.jpeg, .webp, .tif/.tiff, .bmp). Values are
    clipped and rounded (``round(x * 255)`` / ``round(x * 65535)``); NaN becomes 0. 16-bit is
    written for PNG and TIFF only (others: 8-bit, with a warning once). ``grayscale`` writes one
    channel, the mean of R, G, B. JPEG and BMP drop ``alpha`` with a warning once. ``quality``
    (1..100) applies to JPEG (4:4:4 chroma from 90 up) and WebP. Raises ImageError for a bad
    suffix, bit depth or quality, a missing or unwritable folder, or an encoder failure; the
    target is then untouched and no temporary file is left. Array shape/dtype mistakes are
    programming errors and raise ValueError.
    """
    path = Path(path)
    fmt = _WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ImageError(
            f"{path}: cannot write suffix {path.suffix or '(none)'!r}; "
            "use .png, .jpg, .webp, .tif or .bmp"
        )
    if bit_depth not in (8, 16):
        raise ImageError(f"{path}: bit depth {bit_depth} is not supported; use 8 or 16")
    if not 1 <= int(quality) <= 100:
        raise ImageError(f"{path}: quality {quality} is out of range; use 1..100")
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"rgb must be an (H, W, 3) array, got shape {rgb.shape}")
    if rgb.dtype.kind != "f":
        raise ValueError(f"rgb must be float in [0, 1], got dtype {rgb.dtype}")
    if alpha is not None:
        alpha = np.asarray(alpha)
        if alpha.shape != rgb.shape[:2]:
            raise ValueError(f"alpha must have shape {rgb.shape[:2]}, got {alpha.shape}")
        if alpha.dtype.kind != "f":
            raise ValueError(f"alpha must be float in [0, 1], got dtype {alpha.dtype}")
    if exif and not exif.startswith(_EXIF_HEADER):
        exif = _EXIF_HEADER + exif  # JPEG's APP1 needs it; the PNG/WebP writers remove it
    if bit_depth == 16 and fmt not in _SIXTEEN_BIT_FORMATS:
        _warn_once(f"8bit:{fmt}", f"{fmt} holds 8 bits per channel only; writing 8-bit {path}")
        bit_depth = 8
    if alpha is not None and fmt in _NO_ALPHA_FORMATS:
        _warn_once(
            f"alpha:{fmt}",
            f"{fmt} cannot hold transparency; dropping the alpha channel of {path} "
            "(write .png, .webp or .tif to keep it)",
        )
        alpha = None

    color = rgb.mean(axis=-1, dtype=np.float32)[..., None] if grayscale else rgb
    planes = [_quantize(color, bit_depth)]
    if alpha is not None:
        planes.append(_quantize(alpha, bit_depth)[..., None])
    arr = np.ascontiguousarray(np.concatenate(planes, axis=-1) if len(planes) > 1 else planes[0])

    _atomic_write(
        path,
        fmt,
        lambda f: _encode(
            f, fmt, arr, bit_depth=bit_depth, icc_profile=icc_profile, exif=exif, quality=quality
        ),
    )
    log.debug("wrote %s: %s %dx%d, %d-bit", path, fmt, arr.shape[1], arr.shape[0], bit_depth)


# --------------------------------------------------------------------------------------------
# alpha, inputs and outputs


def upscale_alpha(alpha: np.ndarray, scale: int = 4) -> np.ndarray:
    """Bicubic (MATLAB-style) upscale of an (H, W) alpha channel, clipped to [0, 1], float32.

    A constant alpha (e.g. all opaque) stays exactly that constant; values within 1e-6 of 0 or 1
    (float32 rounding of the kernel sums) are snapped to 0 or 1.
    """
    a = np.asarray(alpha, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"alpha must be an (H, W) array, got shape {a.shape}")
    if a.size and a.min() == a.max():
        out_shape = (math.ceil(a.shape[0] * scale), math.ceil(a.shape[1] * scale))
        return np.full(out_shape, np.clip(a.flat[0], 0.0, 1.0), dtype=np.float32)
    out = np.clip(imresize_matlab(a, scale), 0.0, 1.0).astype(np.float32, copy=False)
    out[out > 1.0 - 1e-6] = 1.0
    out[out < 1e-6] = 0.0
    return np.ascontiguousarray(out)


def is_image_file(path: Path) -> bool:
    """True when ``path``'s suffix (any case) is one of IMAGE_SUFFIXES."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _skipped(name: str) -> bool:
    return name.startswith(".") or name.lower() in _JUNK_NAMES


def find_images(
    inputs: Sequence[str | Path], *, recursive: bool = True, exclude: Sequence[str | Path] = ()
) -> list[tuple[Path, Path]]:
    """Expand files and folders into ``(path, relative path)`` pairs, in input order.

    A folder contributes its image files (suffix in IMAGE_SUFFIXES, any case), sorted by
    relative path, walking sub-folders when ``recursive``; hidden names (leading '.') and junk
    (Thumbs.db, desktop.ini, __MACOSX, @eaDir) are skipped; symlinked folders are not followed;
    sub-folders in ``exclude`` (the job's output folder) are not entered, so outputs written
    inside an input folder are never read back as inputs. ``rel`` is relative to that folder.
    A file named explicitly is kept whatever its suffix, with ``rel`` = its name. A file reached
    twice is listed once. A missing input raises ImageError.
    """
    found: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    skip_dirs = {Path(p).resolve() for p in exclude}

    def wanted_dir(here: Path, name: str) -> bool:
        if not recursive or _skipped(name):
            return False
        if skip_dirs and (here / name).resolve() in skip_dirs:
            log.info("%s: the output folder; not read as input", here / name)
            return False
        return True

    def add(path: Path, rel: Path) -> None:
        key = path.resolve()
        if key in seen:
            log.debug("%s: listed more than once; processing it once", path)
            return
        seen.add(key)
        found.append((path, rel))

    for item in inputs:
        root = Path(item)
        if root.is_file():
            add(root, Path(root.name))
            continue
        if not root.exists():
            raise ImageError(f"{root}: no such file or folder; check the input path")
        if not root.is_dir():
            raise ImageError(f"{root}: not a regular file or folder; pass images or folders")
        rels: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if wanted_dir(here, d))
            for name in filenames:
                if not _skipped(name) and is_image_file(Path(name)):
                    rels.append((here / name).relative_to(root))
        rels.sort(key=lambda r: r.parts)
        if not rels:
            log.warning(
                "%s: no image files found (looked for %s)", root, ", ".join(sorted(IMAGE_SUFFIXES))
            )
        for rel in rels:
            add(root / rel, rel)
    return found


def output_path(
    src: Path, rel: Path, out: Path, *, suffix: str | None = None, single: bool
) -> Path:
    """Where the upscale of ``src`` (listed as ``rel`` by find_images) goes.

    ``single`` (one input file) and ``out`` with an image suffix: ``out`` itself. Otherwise
    ``out / rel`` with the suffix set to ``suffix`` (".jpg" or "jpg") when given, else the
    source's suffix when it can be written, else ".png". Names are kept; nothing is created.
    """
    out = Path(out)
    if single and is_image_file(out):
        return out
    if suffix:
        new = suffix if suffix.startswith(".") else f".{suffix}"
    else:
        src_suffix = Path(src).suffix
        new = src_suffix if src_suffix.lower() in _WRITE_FORMATS else ".png"
    return (out / rel).with_suffix(new)
