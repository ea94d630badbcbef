"""x4 super-resolution quality evaluator (numpy / scipy / Pillow only, no torch).

Protocol (the usual BasicSR / ResShift-style one):

* SR outputs are quantised to 8 bits first (clip to [0, 1], x255, round half up), as if saved;
* PSNR-Y and SSIM-Y are computed on the BT.601 luma (``rgb_to_y``, [16, 235] scale, float, not
  re-rounded) after cropping ``border`` pixels from each side;
* SSIM is Wang et al. 2004: 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, L = 255,
  'valid' filtering (the filtered maps lose 5 px per side, as ``cv2.filter2D`` + ``[5:-5, 5:-5]``
  in BasicSR's ``calculate_ssim``), mean of the SSIM map;
* LPIPS (optional, ``deltadiff.benchmarks.lpips``) on the full 8-bit RGB images, no border crop.

Datasets: a folder with ``gt/`` + ``lq/`` (paired by file stem), or a folder of HR images that
are degraded on the fly with MATLAB-style bicubic x1/4 (``imresize_matlab``). Upscalers are plain
callables LR float32 HWC [0, 1] -> SR float32 HWC [0, 1] at 4x the size.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from deltadiff.benchmarks.lpips import LPIPS, default_lpips_weights
from deltadiff.errors import DeltaDiffError, ImageError
from deltadiff.runtime.atomic import write_text_atomic
from deltadiff.runtime.resize import imresize_matlab

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
    r = _SSIM_WIN // 2
    a = a.astype(np.float64)
    b = b.astype(np.float64)

    def filt(x: np.ndarray) -> np.ndarray:
        # separable correlation; the border mode does not matter because it is cropped away
        y = ndimage.correlate1d(x, g, axis=0, mode="reflect")
        y = ndimage.correlate1d(y, g, axis=1, mode="reflect")
        return y[r:-r, r:-r]

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


# ---------------------------------------------------------------------------------------------
# report


def _finite_or_none(v: float | None) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return float(v)


def _mean(values: list[float]) -> float:
    return float(np.mean(np.asarray(values, dtype=np.float64))) if values else math.nan


@dataclass(frozen=True)
class ImageScore:
    """One (upscaler, image) row. ``psnr_y`` is inf for a bit-exact output."""

    upscaler: str
    name: str
    psnr_y: float
    ssim_y: float
    lpips: float | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "upscaler": self.upscaler,
            "name": self.name,
            "psnr_y": _finite_or_none(self.psnr_y),
            "psnr_y_inf": math.isinf(self.psnr_y),
            "ssim_y": self.ssim_y,
            "lpips": self.lpips,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class UpscalerSummary:
    """Means over the images for one upscaler (inf PSNR-Y if any image was bit-exact)."""

    upscaler: str
    n_images: int
    psnr_y: float
    ssim_y: float
    lpips: float | None
    seconds_total: float
    delta_psnr_y_vs_bicubic: float | None

    @property
    def seconds_per_image(self) -> float:
        return self.seconds_total / self.n_images if self.n_images else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "upscaler": self.upscaler,
            "n_images": self.n_images,
            "psnr_y": _finite_or_none(self.psnr_y),
            "psnr_y_inf": math.isinf(self.psnr_y),
            "ssim_y": self.ssim_y,
            "lpips": self.lpips,
            "delta_psnr_y_vs_bicubic": _finite_or_none(self.delta_psnr_y_vs_bicubic),
            "seconds_total": self.seconds_total,
            "seconds_per_image": self.seconds_per_image,
        }


def _fmt(v: float | None, spec: str, *, signed: bool = False) -> str:
    if v is None or math.isnan(v):
        return "—"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, ("+" if signed else "") + spec)


@dataclass(frozen=True)
class QualityReport:
    """Result of ``evaluate``. JSON (``to_dict``): non-finite PSNR values are written as null with
    a ``psnr_y_inf`` flag, so the output is strict JSON."""

    dataset: str
    n_images: int
    border: int
    lpips_weights: str | None  # weight file name, or None when LPIPS was not computed
    summaries: tuple[UpscalerSummary, ...]
    rows: tuple[ImageScore, ...]

    def summary(self, upscaler: str) -> UpscalerSummary:
        for s in self.summaries:
            if s.upscaler == upscaler:
                return s
        names = ", ".join(s.upscaler for s in self.summaries)
        raise DeltaDiffError(f"no upscaler {upscaler!r} in the report; it has: {names}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "dataset": self.dataset,
            "n_images": self.n_images,
            "scale": SCALE,
            "border": self.border,
            "lpips_weights": self.lpips_weights,
            "protocol": (
                "8-bit quantised SR; PSNR/SSIM on BT.601 Y [16,235] with border crop; "
                "SSIM 11x11 Gaussian sigma 1.5 valid; LPIPS v0.1 alex on full RGB"
            ),
            "upscalers": [s.to_dict() for s in self.summaries],
            "images": [r.to_dict() for r in self.rows],
        }

    def to_markdown(self) -> str:
        lp = self.lpips_weights is not None
        lines = [
            f"# x{SCALE} SR quality: {self.dataset}",
            "",
            (
                f"{self.n_images} images, border {self.border} px, PSNR-Y / SSIM-Y on 8-bit Y; "
                f"LPIPS: {self.lpips_weights or 'not computed'}."
            ),
            "",
            "| upscaler | PSNR-Y (dB) | SSIM-Y | LPIPS | Δ PSNR-Y vs bicubic | s/image |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for s in self.summaries:
            lines.append(
                f"| {s.upscaler} | {_fmt(s.psnr_y, '.3f')} | {_fmt(s.ssim_y, '.4f')} | "
                f"{_fmt(s.lpips, '.4f') if lp else '—'} | "
                f"{_fmt(s.delta_psnr_y_vs_bicubic, '.3f', signed=True)} | "
                f"{_fmt(s.seconds_per_image, '.4f')} |"
            )
        lines += [
            "",
            "## Per image",
            "",
            "| image | upscaler | PSNR-Y (dB) | SSIM-Y | LPIPS | s |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.name} | {r.upscaler} | {_fmt(r.psnr_y, '.3f')} | {_fmt(r.ssim_y, '.4f')} | "
                f"{_fmt(r.lpips, '.4f') if lp else '—'} | {_fmt(r.seconds, '.4f')} |"
            )
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# evaluation


def evaluate(
    pairs: list[Pair],
    upscalers: dict[str, Upscaler],
    *,
    border: int = 4,
    lpips: LPIPS | None = None,
    include_bicubic: bool = True,
    progress: Callable[[int, int], None] | None = None,
    dataset: str = "dataset",
) -> QualityReport:
    """Run every upscaler on every pair and score it (PSNR-Y, SSIM-Y, optional LPIPS).

    ``include_bicubic`` adds ``bicubic_upscaler`` under the name "bicubic" (first) unless the
    dict already has that name. Wall time is ``time.perf_counter`` around the upscaler calls only.
    ``progress(done, total)`` is called after each (upscaler, image) step.
    """
    if not pairs:
        raise DeltaDiffError("no image pairs to evaluate; load a dataset with images first")
    runs: dict[str, Upscaler] = {}
    if include_bicubic and BICUBIC not in upscalers:
        runs[BICUBIC] = bicubic_upscaler
    runs.update(upscalers)
    if not runs:
        raise DeltaDiffError("no upscalers to evaluate; pass some or set include_bicubic=True")
    total = len(runs) * len(pairs)
    done = 0
    hr_feats: dict[int, list[np.ndarray]] = {}  # LPIPS features of each HR, reused per upscaler
    rows: list[ImageScore] = []
    timings: dict[str, float] = {}
    for up_name, fn in runs.items():
        elapsed = 0.0
        for idx, pair in enumerate(pairs):
            lr = pair.lr.astype(np.float32) / np.float32(255.0)
            t0 = time.perf_counter()
            out = fn(lr)
            dt = time.perf_counter() - t0
            elapsed += dt
            sr = np.asarray(out)
            if sr.shape != pair.hr.shape:
                raise DeltaDiffError(
                    f"upscaler {up_name!r} returned shape {sr.shape} for {pair.name} (LR "
                    f"{pair.lr.shape}); it must return the HR shape {pair.hr.shape}"
                )
            if not np.issubdtype(sr.dtype, np.floating):
                raise DeltaDiffError(
                    f"upscaler {up_name!r} returned dtype {sr.dtype} for {pair.name}; "
                    "return float32 in [0, 1]"
                )
            if not np.all(np.isfinite(sr)):
                raise DeltaDiffError(
                    f"upscaler {up_name!r} returned non-finite values for {pair.name}; "
                    "fix the upscaler"
                )
            sr8 = to_uint8(sr)
            p = psnr_y(sr8, pair.hr, border)
            s = ssim_y(sr8, pair.hr, border)
            lp_val: float | None = None
            if lpips is not None:
                if idx not in hr_feats:
                    hr_feats[idx] = lpips.features(pair.hr)
                lp_val = lpips.distance(lpips.features(sr8), hr_feats[idx])
            rows.append(ImageScore(up_name, pair.name, p, s, lp_val, dt))
            done += 1
            if progress is not None:
                progress(done, total)
        timings[up_name] = elapsed
        log.debug("%s: %.3f s for %d images", up_name, elapsed, len(pairs))

    means: dict[str, tuple[float, float, float | None]] = {}
    for up_name in runs:
        mine = [r for r in rows if r.upscaler == up_name]
        lp_mean = (
            _mean([r.lpips for r in mine if r.lpips is not None]) if lpips is not None else None
        )
        means[up_name] = (_mean([r.psnr_y for r in mine]), _mean([r.ssim_y for r in mine]), lp_mean)
    base = means[BICUBIC][0] if BICUBIC in means else None
    summaries = tuple(
        UpscalerSummary(
            upscaler=up_name,
            n_images=len(pairs),
            psnr_y=means[up_name][0],
            ssim_y=means[up_name][1],
            lpips=means[up_name][2],
            seconds_total=timings[up_name],
            delta_psnr_y_vs_bicubic=None if base is None else means[up_name][0] - base,
        )
        for up_name in runs
    )
    return QualityReport(
        dataset=dataset,
        n_images=len(pairs),
        border=border,
        lpips_weights=lpips.weights_path.name if lpips is not None else None,
        summaries=summaries,
        rows=tuple(rows),
    )


def write_report(report: QualityReport, out_dir: Path, stem: str = "quality") -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir`` atomically; returns both paths."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
        write_text_atomic(json_path, json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
        write_text_atomic(md_path, report.to_markdown())
    except OSError as exc:
        raise DeltaDiffError(
            f"cannot write the quality report to {out_dir}: {exc.strerror or exc}; "
            "check the folder and its permissions"
        ) from None
    log.info("wrote %s and %s", json_path, md_path)
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    """``python -m deltadiff.benchmarks.quality``: score model dirs (any runtime backend) and
    bicubic on a dataset; optionally the PyTorch reference of each model too."""
    import argparse

    from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler, default_model_dir

    ap = argparse.ArgumentParser(
        prog="python -m deltadiff.benchmarks.quality", description=main.__doc__
    )
    ap.add_argument("--dataset", type=Path, required=True, help="gt/ + lq/ pairs, or HR images")
    ap.add_argument(
        "--model", type=Path, action="append", help="model dir (default: the bundled one)"
    )
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--mode", default="staged")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--torch-reference", action="store_true", help="also score the PyTorch reference"
    )
    ap.add_argument("--lpips-weights", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("quality-results"))
    ap.add_argument("--stem", default="quality")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    ups: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    opened: list[Upscaler] = []
    try:
        pairs = load_dataset(args.dataset)
        weights = args.lpips_weights or default_lpips_weights()
        lp = LPIPS(weights) if weights else None
        for d in args.model or [default_model_dir()]:
            up = Upscaler(
                d,
                UpscaleOptions(
                    backend=args.backend,
                    precision=args.precision,
                    mode=args.mode,
                    threads=args.threads,
                ),
            )
            opened.append(up)
            ups[f"{up.m.name}/{args.backend}/{args.precision}"] = up.upscale
            if args.torch_reference:
                ups[f"{up.m.name}/torch-reference"] = _torch_upscaler(d)
        rep = evaluate(pairs, ups, lpips=lp, dataset=args.dataset.name)
        js, md = write_report(rep, args.out, args.stem)
    except DeltaDiffError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    finally:
        for up in opened:
            up.close()
    sys.stdout.write(rep.to_markdown().split("\n\n## ")[0] + f"\n\nwrote {js} and {md}\n")
    return 0


def _torch_upscaler(model_dir: Path) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    from deltadiff.model.pipeline import Pipeline
    from deltadiff.runtime.manifest import load_manifest

    pipe = Pipeline.from_manifest(load_manifest(model_dir), model_dir=model_dir)

    def up(lr: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = pipe.upscale(torch.from_numpy(lr).permute(2, 0, 1)[None].contiguous(), seed=0)
        return out[0].permute(1, 2, 0).numpy()

    return up


if __name__ == "__main__":
    raise SystemExit(main())
