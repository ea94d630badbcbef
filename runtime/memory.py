"""Peak memory of a real run, per output pixel, and the budget that sizes whole images and tiles.

``measure`` runs the model once per LR size, each in a fresh process (``python -m
deltadiff.runtime.memory``), reads that process's peak RSS (VmHWM) and fits
``peak = base_bytes + bytes_per_hr_px * HR pixels``: the slope through the two largest sizes, the
base raised until the line is at or above every measured point (an upper bound, not a mean).
The line is right for deltadiff-pixel (convolutions and 8x8 windows: linear in pixels). The
latent families' VQ-f4 encoder/decoder have one global attention over all latent pixels, which is
quadratic: measure them at the largest size you will run whole (``--max-lr`` no larger). ``dd-export measure-memory`` stores the record in
the manifest under ``<backend>/<precision>/<mode>``; the upscaler reads it back (no torch here).
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


def max_hr_pixels(rec: dict[str, Any], budget: int) -> int:
    """HR pixels one backend call may produce within ``budget`` bytes of peak RSS."""
    room = budget - float(rec["base_bytes"])
    return max(0, int(room / max(1.0, float(rec["bytes_per_hr_px"]))))


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
    from deltadiff.runtime.backends import open_backend
    from deltadiff.runtime.executor import Executor
    from deltadiff.runtime.manifest import load_manifest
    from deltadiff.runtime.noise import noise_field

    m = load_manifest(model_dir)
    if not m.accepts(h, w):
        (h0, w0), (h1, w1) = m.lr_range()
        raise DeltaDiffError(
            f"LR {h}x{w} is not accepted by {model_dir} ({h0}x{w0}..{h1}x{w1}, "
            f"multiple {m.lr_multiple}); choose another size"
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
    """Peak RSS of one run per size (fresh process each); fit through the two largest sizes."""
    if len(sizes) < 2:
        raise DeltaDiffError("measure memory at two LR sizes at least, e.g. --sizes 64,128")
    points = []
    for h, w in sizes:
        cmd = [sys.executable, "-m", "deltadiff.runtime.memory", str(model_dir), str(h), str(w)]
        cmd += [backend, precision, mode, str(threads)]
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or ["no output"])[-1]
            raise DeltaDiffError(f"memory probe at LR {h}x{w} failed: {last}")
        points.append(json.loads(p.stdout.strip().splitlines()[-1]))
    return {
        **fit(points),
        "points": sorted(points, key=lambda r: r["hr_px"]),
        "threads": threads,
        "cpu": cpu_name(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "how": "peak RSS (VmHWM) of one run per size in a fresh process; slope through "
        "the two largest sizes, base bounding every point",
    }


def fit(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Slope through the two largest sizes; base = the largest residual (bounds every point)."""
    pts = sorted(points, key=lambda r: r["hr_px"])
    a, b = pts[-2], pts[-1]
    if b["hr_px"] == a["hr_px"]:
        raise DeltaDiffError("measure memory at two different sizes")
    slope = max(0.0, (b["peak_bytes"] - a["peak_bytes"]) / (b["hr_px"] - a["hr_px"]))
    base = max(p["peak_bytes"] - slope * p["hr_px"] for p in pts)
    return {
        "base_bytes": int(base),
        "bytes_per_hr_px": round(slope, 1),
        "mib_per_hr_megapixel": round(slope * 1e6 / (1 << 20), 1),
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
