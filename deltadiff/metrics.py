"""x4 super-resolution metrics and evaluation sets, numpy + Pillow only (no torch, no scipy).

Protocol (the usual BasicSR / ResShift-style one):

* SR outputs are quantised to 8 bits first (clip to [0, 1], x255, round half up), as if saved;
* PSNR-Y and SSIM-Y are computed on the BT.601 luma (``rgb_to_y``, [16, 235] scale, float, not
  re-rounded) after cropping ``border`` pixels from each side;
* SSIM is Wang et al. 2004: 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, L = 255,
  'valid' filtering (the filtered maps lose 5 px per side, as ``cv2.filter2D`` + ``[5:-5, 5:-5]``
  in BasicSR's ``calculate_ssim``), mean of the SSIM map;
* LPIPS (``deltadiff.lpips``) on the full 8-bit RGB images, no border crop.

Datasets: a folder with ``gt/`` + ``lq/`` (paired by file stem), or a folder of HR images that
are degraded on the fly with MATLAB-style bicubic x1/4 (``imresize_matlab``). Upscalers are plain
callables LR float32 HWC [0, 1] -> SR float32 HWC [0, 1] at 4x the size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from deltadiff.errors import DeltaDiffError, ImageError
from deltadiff.imresize import imresize_matlab

log = logging.getLogger(__name__)

SCALE = 4
SCHEMA_VERSION = 1
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
BICUBIC = "bicubic"

Upscaler = Callable[[np.ndarray], np.ndarray]

# SSIM constants (Wang et al. 2004, as in BasicSR's calculate_ssim)
_SSIM_C1 = (0.01 * 255.0) ** 2
_SSIM_C2 = (0.03 * 255.0) ** 2
_SSIM_WIN = 11
_SSIM_SIGMA = 1.5


def _gaussian_window_1d(size: int = _SSIM_WIN, sigma: float = _SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian, same as ``cv2.getGaussianKernel(size, sigma)``."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


# ---------------------------------------------------------------------------------------------
# pixel conventions


def to_uint8(img: np.ndarray) -> np.ndarray:
    """uint8 passes through; float in [0, 1] -> clip, x255, round half up (MATLAB ``im2uint8``)."""
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise DeltaDiffError(f"expected a uint8 or float image, got dtype {arr.dtype}; convert it")
    x = arr.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise DeltaDiffError("image has non-finite values (NaN/Inf); fix the upscaler output")
    return np.floor(np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma on the [16, 235] scale (MATLAB ``rgb2ycbcr``, BasicSR ``to_y_channel``), float64.

    Convention: with r, g, b the channel values normalised to [0, 1] (uint8 input: ``v / 255``;
    float input: taken as already in [0, 1]),
    ``Y = 16 + 65.481 r + 128.553 g + 24.966 b``, i.e. ``Y = 16 + (65.481 R + 128.553 G +
    24.966 B) / 255`` for 8-bit R, G, B. Y is returned unrounded (BasicSR keeps it float; MATLAB
    would round it back to uint8 for uint8 input). (H, W) input is returned as float64 on the same
    scale as the input (treated as luma already: uint8 as is, float x255).
    """
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        x = arr.astype(np.float64) / 255.0
    elif np.issubdtype(arr.dtype, np.floating):
        x = arr.astype(np.float64)
    else:
        raise DeltaDiffError(f"rgb_to_y expects uint8 or float, got dtype {arr.dtype}; convert it")
    if x.ndim == 2:
        return x * 255.0
    if x.ndim != 3 or x.shape[2] != 3:
        raise DeltaDiffError(f"rgb_to_y expects (H, W, 3) RGB, got shape {arr.shape}; pass RGB")
    coef = np.array([65.481, 128.553, 24.966], dtype=np.float64)
    return x @ coef + 16.0


def _y_pair(sr: np.ndarray, hr: np.ndarray, border: int) -> tuple[np.ndarray, np.ndarray]:
    """Both images -> 8-bit -> Y (float64) -> border crop."""
    sr8, hr8 = to_uint8(sr), to_uint8(hr)
    if sr8.shape != hr8.shape:
        raise DeltaDiffError(
            f"SR and HR shapes differ: {sr8.shape} vs {hr8.shape}; upscale to the HR size"
        )
    if border < 0:
        raise DeltaDiffError(f"border must be >= 0, got {border}; use 4 for x4 SR")
    ys, yh = rgb_to_y(sr8), rgb_to_y(hr8)
    if border:
        if min(ys.shape[:2]) <= 2 * border:
            raise DeltaDiffError(
                f"image {ys.shape[1]}x{ys.shape[0]} (WxH) is too small for border {border}; "
                "use a smaller border"
            )
        ys = ys[border:-border, border:-border]
        yh = yh[border:-border, border:-border]
    return ys, yh


# ---------------------------------------------------------------------------------------------
# metrics


def psnr_y(sr: np.ndarray, hr: np.ndarray, border: int = 4) -> float:
    """PSNR (dB, peak 255) on 8-bit-quantised Y, ``border`` px cropped per side; inf if identical.

    ``sr`` / ``hr``: HWC RGB, uint8 or float in [0, 1] (floats are quantised like saved images).
    """
    ys, yh = _y_pair(sr, hr, border)
    mse = float(np.mean((ys - yh) ** 2, dtype=np.float64))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(255.0**2 / mse)


def ssim_map_valid(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM map of two 2-D float arrays in [0, 255], 'valid' 11x11 Gaussian filtering
    (output 10 px smaller per axis), as BasicSR's ``_ssim``."""
    if a.shape != b.shape or a.ndim != 2:
        raise DeltaDiffError(f"ssim needs two equal 2-D arrays, got {a.shape} and {b.shape}")
    if min(a.shape) < _SSIM_WIN:
        raise DeltaDiffError(
            f"SSIM needs at least {_SSIM_WIN}x{_SSIM_WIN} px after the border crop, got "
            f"{a.shape[1]}x{a.shape[0]}; use larger images or a smaller border"
        )
    g = _gaussian_window_1d()
    a = a.astype(np.float64)
    b = b.astype(np.float64)

    def filt(x: np.ndarray) -> np.ndarray:
        # separable 'valid' correlation, one shifted slice per tap: (H - 10, W - 10)
        h, w = x.shape[0] - _SSIM_WIN + 1, x.shape[1] - _SSIM_WIN + 1
        y = sum(g[k] * x[k : k + h] for k in range(_SSIM_WIN))
        return sum(g[k] * y[:, k : k + w] for k in range(_SSIM_WIN))

    mu1, mu2 = filt(a), filt(b)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = filt(a * a) - mu1_sq
    sigma2_sq = filt(b * b) - mu2_sq
    sigma12 = filt(a * b) - mu1_mu2
    num = (2.0 * mu1_mu2 + _SSIM_C1) * (2.0 * sigma12 + _SSIM_C2)
    den = (mu1_sq + mu2_sq + _SSIM_C1) * (sigma1_sq + sigma2_sq + _SSIM_C2)
    return num / den


def ssim_y(sr: np.ndarray, hr: np.ndarray, border: int = 4) -> float:
    """SSIM (Wang et al. 2004) on 8-bit-quantised Y, ``border`` px cropped per side; 1.0 if equal.

    11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, L 255, 'valid' filtering, map mean.
    """
    ys, yh = _y_pair(sr, hr, border)
    return float(np.mean(ssim_map_valid(ys, yh), dtype=np.float64))


# ---------------------------------------------------------------------------------------------
# datasets


@dataclass(frozen=True, eq=False)
class Pair:
    """One evaluation image: ``hr`` (H, W, 3) uint8 and ``lr`` (H/4, W/4, 3) uint8 (read-only)."""

    name: str
    hr: np.ndarray
    lr: np.ndarray


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - any decode failure is an unreadable image
        raise ImageError(
            f"cannot read image {path}: {type(exc).__name__}: {exc}; remove or replace the file"
        ) from None
    return np.ascontiguousarray(arr)


def _by_stem(paths: list[Path], folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in paths:
        if p.stem in out:
            raise DeltaDiffError(
                f"two images share the name {p.stem!r} in {folder} ({out[p.stem].name}, {p.name}); "
                "keep one"
            )
        out[p.stem] = p
    return out


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


def degrade_x4(hr: np.ndarray) -> np.ndarray:
    """MATLAB-bicubic x1/4 of an 8-bit HWC image (sides multiples of 4), rounded to uint8."""
    lr = imresize_matlab(np.asarray(hr, dtype=np.float64) / 255.0, 1.0 / SCALE)
    return to_uint8(lr)


def _load_paired(folder: Path) -> list[Pair]:
    gt_dir, lq_dir = folder / "gt", folder / "lq"
    gts = _by_stem(_list_images(gt_dir), gt_dir)
    lqs = _by_stem(_list_images(lq_dir), lq_dir)
    if not gts:
        raise DeltaDiffError(f"no images in {gt_dir}; add HR images (png/jpg/...)")
    orphans = sorted(set(lqs) - set(gts))
    if orphans:
        raise DeltaDiffError(
            f"LR image {lqs[orphans[0]].name} in {lq_dir} has no HR partner in {gt_dir} "
            f"({len(orphans)} unpaired); add the HR image or remove the LR one"
        )
    pairs: list[Pair] = []
    for stem, gt_path in gts.items():
        lq_path = lqs.get(stem)
        if lq_path is None:
            raise DeltaDiffError(
                f"HR image {gt_path.name} in {gt_dir} has no LR partner in {lq_dir}; "
                "add it (same file name) or remove the HR image"
            )
        hr, lr = _read_rgb(gt_path), _read_rgb(lq_path)
        if (lr.shape[0] * SCALE, lr.shape[1] * SCALE) != hr.shape[:2]:
            raise DeltaDiffError(
                f"{stem}: LR {lr.shape[1]}x{lr.shape[0]} x{SCALE} != HR {hr.shape[1]}x"
                f"{hr.shape[0]} (WxH); fix the pair so HR is exactly {SCALE}x the LR size"
            )
        pairs.append(Pair(name=stem, hr=_readonly(hr), lr=_readonly(lr)))
    return pairs


def _load_degraded(folder: Path) -> list[Pair]:
    paths = _list_images(folder)
    if not paths:
        raise DeltaDiffError(
            f"no images in {folder}; pass a folder of HR images or one with gt/ and lq/"
        )
    _by_stem(paths, folder)
    pairs: list[Pair] = []
    for path in paths:
        hr = _read_rgb(path)
        h, w = (hr.shape[0] // SCALE) * SCALE, (hr.shape[1] // SCALE) * SCALE
        if h == 0 or w == 0:
            raise DeltaDiffError(
                f"HR image {path.name} is {hr.shape[1]}x{hr.shape[0]} (WxH); it must be at least "
                f"{SCALE}x{SCALE}"
            )
        if (h, w) != hr.shape[:2]:
            log.debug("cropping %s from %dx%d to %dx%d", path.name, hr.shape[1], hr.shape[0], w, h)
            hr = np.ascontiguousarray(hr[:h, :w])
        pairs.append(Pair(name=path.stem, hr=_readonly(hr), lr=_readonly(degrade_x4(hr))))
    return pairs


def load_dataset(folder: Path, *, degrade: bool | None = None) -> list[Pair]:
    """Load an x4 evaluation set, sorted by name.

    ``folder/gt`` + ``folder/lq`` -> pairs matched by file stem (a missing partner or LR x4 !=
    HR size is an error). Otherwise every image in ``folder`` is HR: cropped top-left to a
    multiple of 4, LR = MATLAB-bicubic x1/4 rounded to uint8. ``degrade``: None = auto (paired
    layout if both subfolders exist); True = degrade on the fly (from ``gt/`` if present, ``lq/``
    ignored); False = require the paired layout.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DeltaDiffError(f"dataset folder not found: {folder}; pass an existing folder")
    paired = (folder / "gt").is_dir() and (folder / "lq").is_dir()
    if degrade is None:
        degrade = not paired
    if not degrade:
        if not paired:
            raise DeltaDiffError(
                f"{folder} has no gt/ and lq/ subfolders; add them or use degrade=True"
            )
        pairs = _load_paired(folder)
    else:
        hr_dir = folder / "gt" if (folder / "gt").is_dir() else folder
        pairs = _load_degraded(hr_dir)
    log.info(
        "loaded %d pairs from %s (%s)", len(pairs), folder, "degraded" if degrade else "paired"
    )
    return pairs


# ---------------------------------------------------------------------------------------------
# upscalers


def bicubic_upscaler(lr: np.ndarray) -> np.ndarray:
    """MATLAB-style bicubic x4 of an LR float32 HWC image in [0, 1], clipped to [0, 1]."""
    return np.clip(imresize_matlab(lr, SCALE), 0.0, 1.0).astype(np.float32)
