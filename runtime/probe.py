"""``dd-run probe``: time FP32 against INT8 on this machine for one model, for the precision
default (``runtime/precision.py`` reads the cached record)."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np

from deltadiff.cpu import cpu_info
from deltadiff.errors import DeltaDiffError
from deltadiff.options import Precision
from deltadiff.runtime.precision import ProbeRecord, model_key
from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler


def _probe_image(lr: int) -> np.ndarray:
    """A smooth, textured, deterministic LR test image in [0, 1] (no data files needed)."""
    y, x = np.mgrid[0:lr, 0:lr].astype(np.float32) / lr
    rng = np.random.default_rng(0)
    img = np.stack([0.5 + 0.4 * np.sin(6 * x + 3 * y), 0.5 + 0.3 * np.cos(5 * y), x * y], -1)
    return np.clip(img + 0.05 * rng.standard_normal(img.shape, dtype=np.float32), 0, 1)


def run_probe(
    model_dir: Path | None, *, lr: int = 64, runs: int = 3, threads: int = 0
) -> ProbeRecord:
    """Time FP32 and INT8 upscales of one ``lr``² image, interleaved, after a warm-up each;
    medians of ``runs``. Needs INT8 graphs that passed the gate."""
    img = _probe_image(lr)
    ups = {}
    try:
        for p in (Precision.FP32, Precision.INT8):
            ups[p] = Upscaler(model_dir, UpscaleOptions(precision=p, threads=threads))
            ups[p].upscale(img)  # warm-up: session init, arena growth
        times: dict[Precision, list[float]] = {p: [] for p in ups}
        for _ in range(runs):
            for p, up in ups.items():
                t0 = time.perf_counter()
                up.upscale(img)
                times[p].append(time.perf_counter() - t0)
        m = ups[Precision.FP32].m
    finally:
        for up in ups.values():
            up.close()
    cpu = cpu_info()
    if not times[Precision.FP32]:
        raise DeltaDiffError("dd-run probe: --runs must be at least 1")
    return ProbeRecord(
        cpu_key=cpu.key,
        cpu=cpu.model,
        isa=cpu.isa,
        model_key=model_key(m),
        lr=lr,
        threads=threads or (os.cpu_count() or 1),
        fp32_s=round(statistics.median(times[Precision.FP32]), 4),
        int8_s=round(statistics.median(times[Precision.INT8]), 4),
        runs=runs,
        date=time.strftime("%Y-%m-%d"),
    )
