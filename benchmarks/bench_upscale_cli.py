"""End-to-end wall time of the ``dd-run upscale`` command, as a user runs it.

Each run is a fresh process (interpreter start, imports, model load, image read, tiling, four steps,
write), so the number includes everything a user waits for. Runs are sequential; the first is a
warm-up (file cache) and is reported separately.

    python -m deltadiff.benchmarks.bench_upscale_cli examples/astronaut_lr.png --runs 5 \\
        --out benchmarks/results/upscale-cli --label cpu-2core [-- extra dd-run upscale options]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deltadiff.benchmarks.harness import BenchOptions, environment
from deltadiff.runtime.atomic import write_text_atomic
from deltadiff.runtime.manifest import write_json_atomic


def time_upscale(image: Path, runs: int, extra: list[str]) -> dict:
    exe = shutil.which("dd-run")
    cmd_head = [exe] if exe else [sys.executable, "-m", "deltadiff.runtime.cli"]
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.png"
        for _ in range(runs + 1):
            cmd = [*cmd_head, "upscale", str(image), "-o", str(out), "--overwrite", *extra]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            dt = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"dd-run upscale failed: {proc.stderr.strip().splitlines()[-1:]}")
            times.append(dt)
        from PIL import Image

        with Image.open(image) as a, Image.open(out) as b:
            sizes = (a.size, b.size)
    return {
        "command": " ".join(["dd-run", "upscale", image.name, "-o", "out.png", *extra]),
        "input_size": list(sizes[0]),
        "output_size": list(sizes[1]),
        "first_s": times[0],
        "runs_s": times[1:],
        "median_s": statistics.median(times[1:]),
        "min_s": min(times[1:]),
        "max_s": max(times[1:]),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image", type=Path)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--label", default="local")
    ap.add_argument("extra", nargs="*", help="extra dd-run upscale options (after --)")
    a = ap.parse_args(argv)
    res = time_upscale(a.image, a.runs, a.extra)
    res["environment"] = environment(BenchOptions(models=(), label=a.label))
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"upscale-cli-{a.label}"
    write_json_atomic(stem.with_suffix(".json"), res)
    md = (
        f"# `dd-run upscale` end to end ({a.label})\n\n"
        f"`{res['command']}`: {res['input_size'][0]}x{res['input_size'][1]} -> "
        f"{res['output_size'][0]}x{res['output_size'][1]}, fresh process per run.\n\n"
        f"| runs | median | min | max | first (cold) |\n|---:|---:|---:|---:|---:|\n"
        f"| {len(res['runs_s'])} | {res['median_s']:.2f} s | {res['min_s']:.2f} s | "
        f"{res['max_s']:.2f} s | {res['first_s']:.2f} s |\n"
    )
    write_text_atomic(stem.with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    main()
