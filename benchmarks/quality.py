"""x4 super-resolution quality evaluator: upscalers scored on an evaluation set, JSON + Markdown
report (the metrics and set loading are ``deltadiff.metrics``).

The protocol (8-bit quantisation, Y, border crop, SSIM window, LPIPS) is ``deltadiff.metrics``'s.
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

from deltadiff.atomic import write_text_atomic
from deltadiff.errors import DeltaDiffError
from deltadiff.lpips import LPIPS, default_lpips_weights
from deltadiff.metrics import (
    BICUBIC,
    SCALE,
    Pair,
    Upscaler,
    bicubic_upscaler,
    load_dataset,
    psnr_y,
    ssim_y,
    to_uint8,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


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

    from deltadiff.manifest import load_manifest
    from deltadiff.model.pipeline import Pipeline

    pipe = Pipeline.from_manifest(load_manifest(model_dir), model_dir=model_dir)

    def up(lr: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = pipe.upscale(torch.from_numpy(lr).permute(2, 0, 1)[None].contiguous(), seed=0)
        return out[0].permute(1, 2, 0).numpy()

    return up


if __name__ == "__main__":
    raise SystemExit(main())
