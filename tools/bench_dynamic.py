"""Dynamic vs static demo model: whole-image vs tiled quality (PSNR-Y vs HR) and speed.

    python tools/bench_dynamic.py --static STATIC_DIR --dynamic DYNAMIC_DIR \\
        --data /work/shared/data/val-bicubic-x4 --out benchmarks/results/dynamic

1. Validation set (16 pairs, LR 64x64): the dynamic model whole, the dynamic model in 48x48 tiles
   (forced, 2x2 tiles), the static model (its tile; a 64x64 image is one padded tile), bicubic.
2. 96x96 LR images: 2x2 mosaics of four validation pairs (LR 128x128 -> centre 96x96, HR the
   matching 384x384), whole (dynamic) vs the static model's tiles; PSNR-Y vs HR and between the two.
3. Speed at the static tile size: the static and the dynamic graphs on the same LR tile, runs
   interleaved in this one process, medians (staged, ONNX Runtime CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from deltadiff.manifest import load_manifest, write_json_atomic
from deltadiff.metrics import bicubic_upscaler, load_dataset, psnr_y
from deltadiff.runtime.backends import open_backend
from deltadiff.runtime.executor import Executor
from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler


def _f(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32) / 255.0


def quality(static: Path, dynamic: Path, data: Path, threads: int) -> dict:
    pairs = load_dataset(data)
    ups = {
        "dynamic-whole": Upscaler(dynamic, UpscaleOptions(threads=threads, max_memory=8.0)),
        "dynamic-tiles-48": Upscaler(dynamic, UpscaleOptions(threads=threads, tile=48)),
        "static-tile": Upscaler(static, UpscaleOptions(threads=threads)),
    }
    val: dict[str, list[float]] = {k: [] for k in ["bicubic", *ups]}
    plans = {}
    for p in pairs:
        lr = _f(p.lr)
        val["bicubic"].append(psnr_y(bicubic_upscaler(lr), _f(p.hr)))
        for k, up in ups.items():
            plans[k] = up.plan(*lr.shape[:2]).__dict__
            val[k].append(psnr_y(up.upscale(lr), _f(p.hr)))
    # 96x96 LR mosaics of four validation pairs
    mos: dict[str, list[float]] = {"bicubic": [], "dynamic-whole": [], "static-tile": []}
    between, times = [], {"dynamic-whole": [], "static-tile": []}
    for i in range(0, len(pairs) - 3, 4):
        q = pairs[i : i + 4]
        lr = np.concatenate(
            [np.concatenate([q[0].lr, q[1].lr], 1), np.concatenate([q[2].lr, q[3].lr], 1)], 0
        )[16:112, 16:112]
        hr = np.concatenate(
            [np.concatenate([q[0].hr, q[1].hr], 1), np.concatenate([q[2].hr, q[3].hr], 1)], 0
        )[64:448, 64:448]
        lr, hr = _f(lr), _f(hr)
        mos["bicubic"].append(psnr_y(bicubic_upscaler(lr), hr))
        outs = {}
        for k in ("dynamic-whole", "static-tile"):
            plans[f"96x96 {k}"] = ups[k].plan(96, 96).__dict__
            t0 = time.perf_counter()
            outs[k] = ups[k].upscale(lr)
            times[k].append(time.perf_counter() - t0)
            mos[k].append(psnr_y(outs[k], hr))
        diff = float(np.mean((outs["dynamic-whole"] - outs["static-tile"]) ** 2))
        between.append(10 * np.log10(1.0 / max(diff, 1e-20)))
    for up in ups.values():
        up.close()
    return {
        "val_64x64_psnr_y": {k: round(float(np.mean(v)), 3) for k, v in val.items()},
        "val_n": len(pairs),
        "mosaic_96x96_psnr_y": {k: round(float(np.mean(v)), 3) for k, v in mos.items()},
        "mosaic_96x96_whole_vs_tiled_psnr_rgb": [round(float(b), 2) for b in between],
        "mosaic_96x96_seconds_median": {
            k: round(statistics.median(v), 3) for k, v in times.items()
        },
        "plans": plans,
    }


def speed(static: Path, dynamic: Path, runs: int, threads: int) -> dict:
    ms = load_manifest(static)
    lr = np.random.default_rng(0).random((1, 3, *ms.tile), dtype=np.float32)
    exes = {}
    for k, d in (("static", static), ("dynamic", dynamic)):
        m = load_manifest(d)
        exes[k] = Executor(m, open_backend("onnxruntime", d, m, threads=threads))
        exes[k].run(lr)  # warm-up (session creation, first run)
    t: dict[str, list[float]] = {k: [] for k in exes}
    outs = {}
    for _ in range(runs):
        for k, ex in exes.items():
            t0 = time.perf_counter()
            outs[k] = ex.run(lr)
            t[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
    return {
        "lr": list(ms.tile),
        "runs": runs,
        "threads": threads,
        "median_ms": {k: round(v, 1) for k, v in med.items()},
        "all_ms": {k: [round(x * 1e3, 1) for x in v] for k, v in t.items()},
        "dynamic_over_static": round(med["dynamic"] / med["static"], 3),
        "max_abs_diff": float(np.abs(outs["static"] - outs["dynamic"]).max()),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--static", type=Path, required=True)
    ap.add_argument("--dynamic", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/dynamic"))
    ap.add_argument("--skip-quality", action="store_true")
    a = ap.parse_args(argv)
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "?",
    )
    res = {"cpu": cpu, "speed": speed(a.static, a.dynamic, a.runs, a.threads)}
    print(json.dumps(res["speed"], indent=1))
    if not a.skip_quality:
        res["quality"] = quality(a.static, a.dynamic, a.data, a.threads)
        print(json.dumps(res["quality"], indent=1))
    a.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.out / "bench-dynamic.json", res)


if __name__ == "__main__":
    main()
