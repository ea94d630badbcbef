"""Peak memory of a real run, per output pixel, and the budget that sizes whole images and tiles.

``measure`` runs the model once per LR size, each in a fresh process (``python -m
deltadiff.runtime.memory_budget``), reads that process's peak RSS (VmHWM) and fits, per image of a
batch, ``peak = base_bytes + bytes_per_hr_px * px + bytes_per_hr_px2 * px**2`` (px: HR pixels):
with three or more sizes the curve through the three largest, with two the line through them
(``bytes_per_hr_px2`` = 0); the base is then raised until the curve is at or above every measured
point (an upper bound, not a mean). The quadratic term is what the latent families' VQ-f4
encoder/decoder need: their mid attention is global over all latent pixels, so its score matrix
grows with px**2 and a line through two sizes underestimates every larger image. For
deltadiff-pixel (convolutions and 8x8 windows) the term comes out near zero; a negative one
(measurement noise) is dropped. ``dd-export measure-memory`` stores the record in the manifest
under ``<backend>/<precision>/<mode>``; the upscaler reads it back (no torch here).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from deltadiff.errors import DeltaDiffError

DEFAULT_BUDGET_FRACTION = 0.5  # of MemAvailable at start-up, when --max-memory is not given
FALLBACK_BUDGET = 4 << 30  # when /proc/meminfo cannot be read


def record_key(backend: str, precision: str, mode: str) -> str:
    return f"{backend}/{precision}/{mode}"


def available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def default_budget() -> int:
    avail = available_bytes()
    return int(avail * DEFAULT_BUDGET_FRACTION) if avail else FALLBACK_BUDGET


def peak_bytes(rec: dict[str, Any], hr_px: float, batch: int = 1) -> float:
    """The record's peak RSS for one backend call of ``batch`` images of ``hr_px`` HR pixels."""
    b, c = float(rec["bytes_per_hr_px"]), float(rec.get("bytes_per_hr_px2", 0.0))
    return float(rec["base_bytes"]) + batch * (b * hr_px + c * hr_px * hr_px)


def memory_text(rec: dict[str, Any]) -> str:
    """One line for a record: its per-pixel slope, base and (if any) quadratic term."""
    text = f"{rec.get('mib_per_hr_megapixel')} MiB per HR megapixel"
    c = float(rec.get("bytes_per_hr_px2", 0.0))
    if c > 0:  # bytes per px^2 -> MiB per (HR megapixel)^2
        text += f" + {c * 1e12 / (1 << 20):.1f} MiB per (HR megapixel)^2"
    return text + f" + {rec['base_bytes'] / (1 << 20):.0f} MiB"


def max_hr_pixels(rec: dict[str, Any], budget: int, batch: int = 1) -> int:
    """HR pixels per image that one backend call of ``batch`` images may produce within
    ``budget`` bytes of peak RSS (the largest px with ``peak_bytes`` <= budget)."""
    room = (budget - float(rec["base_bytes"])) / max(1, batch)
    if room <= 0:
        return 0
    b, c = max(0.0, float(rec["bytes_per_hr_px"])), max(0.0, float(rec.get("bytes_per_hr_px2", 0)))
    if c <= 0:
        return int(room / max(1.0, b))
    return int((-b + (b * b + 4 * c * room) ** 0.5) / (2 * c))


def _peak_rss_bytes() -> int:
    """This process's own peak RSS. Linux: VmHWM (ru_maxrss would include the parent's RSS at
    fork, which Linux carries across exec); elsewhere ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(ru) if platform.system() == "Darwin" else int(ru) * 1024  # Linux reports KiB


def probe(
    model_dir: str, h: int, w: int, backend: str, precision: str, mode: str, threads: int
) -> dict[str, Any]:
    """One real run at LR (h, w), batch 1, in this process; returns the peak RSS."""
    from deltadiff.manifest import load_manifest
    from deltadiff.noise import noise_field
    from deltadiff.runtime.backends import open_backend
    from deltadiff.runtime.executor import Executor

    m = load_manifest(model_dir)
    if not m.accepts(h, w):
        raise DeltaDiffError(
            f"LR {w}x{h} (WxH) is not accepted by {model_dir} ({m.lr_range_text()}); "
            "choose another size"
        )
    rng = np.random.default_rng(0)
    lr = rng.random((1, 3, h, w), dtype=np.float32)
    noise = noise_field(m.noise_names, (1, 3, *m.state_hw((h, w))), 1)
    with open_backend(backend, model_dir, m, precision=precision, threads=threads) as be:
        out = Executor(m, be, mode=mode).run(lr, noise)
    return {
        "lr": [h, w],
        "hr_px": int(out.shape[2] * out.shape[3]),
        "peak_bytes": _peak_rss_bytes(),
    }


def measure(
    model_dir: str | Path,
    sizes: list[tuple[int, int]],
    *,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    mode: str = "staged",
    threads: int = 0,
) -> dict[str, Any]:
    """Peak RSS of one run per size (fresh process each); ``fit`` through the largest sizes."""
    if len(sizes) < 2:
        raise DeltaDiffError("measure memory at two LR sizes at least, e.g. --sizes 64,128")
    points = []
    for h, w in sizes:
        cmd = [
            sys.executable,
            "-m",
            "deltadiff.runtime.memory_budget",
            str(model_dir),
            str(h),
            str(w),
        ]
        cmd += [backend, precision, mode, str(threads)]
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or ["no output"])[-1]
            raise DeltaDiffError(f"memory probe at LR {w}x{h} (WxH) failed: {last}")
        points.append(json.loads(p.stdout.strip().splitlines()[-1]))
    return {
        **fit(points),
        "points": sorted(points, key=lambda r: r["hr_px"]),
        "threads": threads,
        "cpu": cpu_name(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "how": "peak RSS (VmHWM) of one run per size in a fresh process; a + b*px + c*px^2 "
        "through the three largest sizes (a line through two), base bounding every point",
    }


def fit(points: list[dict[str, Any]]) -> dict[str, Any]:
    """``a + b*px + c*px**2`` through the three largest sizes (two sizes: the line, c = 0; a
    negative c: the line through the two largest; a negative b: c alone through the two
    largest), then a = the largest residual, so the curve bounds every point (a may be
    negative: it is a curve's intercept, not a measured base)."""
    pts = sorted(points, key=lambda r: r["hr_px"])
    xs = [float(p["hr_px"]) for p in pts]
    ys = [float(p["peak_bytes"]) for p in pts]
    if len(set(xs)) < 2:
        raise DeltaDiffError("measure memory at two different sizes")
    (x1, y1), (x2, y2) = (xs[-2], ys[-2]), (xs[-1], ys[-1])
    b, c = max(0.0, (y2 - y1) / (x2 - x1)), 0.0
    if len(set(xs[-3:])) == 3:
        sol = np.linalg.solve(np.array([[1.0, x, x * x] for x in xs[-3:]]), np.array(ys[-3:]))
        if sol[2] > 0 and sol[1] >= 0:
            b, c = float(sol[1]), float(sol[2])
        elif sol[2] > 0:
            b, c = 0.0, max(0.0, (y2 - y1) / (x2 * x2 - x1 * x1))
    b, c = round(b, 4), float(f"{c:.6g}")  # as recorded; the base bounds with these
    base = max(y - b * x - c * x * x for x, y in zip(xs, ys, strict=True))
    return {
        "base_bytes": int(np.ceil(base)),
        "bytes_per_hr_px": b,
        "bytes_per_hr_px2": c,
        "mib_per_hr_megapixel": round(b * 1e6 / (1 << 20), 1),
        "fit": "quadratic" if c > 0 else "linear",
    }


def cpu_name() -> str:
    """The CPU's model name (for records next to measured numbers)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str]) -> int:
    model_dir, h, w, backend, precision, mode, threads = argv
    try:
        rec = probe(model_dir, int(h), int(w), backend, precision, mode, int(threads))
    except DeltaDiffError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
