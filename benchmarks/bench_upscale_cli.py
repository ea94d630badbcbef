"""End-to-end wall time of the ``dd-run upscale`` command, as a user runs it.

Each run is a fresh process (interpreter start, imports, model load, image read, tiling, four steps,
write), so the number includes everything a user waits for. Runs are sequential; the first is a
warm-up (file cache) and is reported separately.

    python -m deltadiff.benchmarks.bench_upscale_cli examples/astronaut_lr.png --runs 5 \\
        --out benchmarks/results/upscale-cli --label cpu-2core [-- extra dd-run upscale options]

``--variant NAME:OPTIONS`` (repeatable) times several option sets in one run, interleaved round by
round, and reports each median and its speed relative to the first variant.
"""

from __future__ import annotations

import argparse
import shlex
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


def time_upscale(image: Path, runs: int, variants: dict[str, list[str]]) -> dict:
    """Time ``dd-run upscale`` once per variant per round (rounds interleave the variants, so
    machine drift hits all of them alike); the first round is the cold run."""
    exe = shutil.which("dd-run")
    cmd_head = [exe] if exe else [sys.executable, "-m", "deltadiff.runtime.cli"]
    times: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.png"
        for _ in range(runs + 1):
            for name, extra in variants.items():
                cmd = [*cmd_head, "upscale", str(image), "-o", str(out), "--overwrite", *extra]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                dt = time.perf_counter() - t0
                if proc.returncode != 0:
                    err = proc.stderr.strip().splitlines()[-1:]
                    raise SystemExit(f"dd-run upscale ({name}) failed: {err}")
                times[name].append(dt)
        from PIL import Image

        with Image.open(image) as a, Image.open(out) as b:
            sizes = (a.size, b.size)
    res = {}
    for name, extra in variants.items():
        t = times[name]
        res[name] = {
            "command": " ".join(["dd-run", "upscale", image.name, "-o", "out.png", *extra]),
            "first_s": t[0],
            "runs_s": t[1:],
            "median_s": statistics.median(t[1:]),
            "min_s": min(t[1:]),
            "max_s": max(t[1:]),
        }
    return {"input_size": list(sizes[0]), "output_size": list(sizes[1]), "variants": res}


def _variant(text: str) -> tuple[str, list[str]]:
    name, _, opts = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: write NAME:OPTIONS")
    return name, shlex.split(opts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image", type=Path)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--label", default="local")
    ap.add_argument(
        "--variant",
        type=_variant,
        action="append",
        default=[],
        help='NAME:OPTIONS, repeatable, e.g. "int8:--precision int8"; runs interleave',
    )
    ap.add_argument("extra", nargs="*", help="extra dd-run upscale options (after --)")
    a = ap.parse_args(argv)
    variants = dict(a.variant) if a.variant else {"default": []}
    variants = {k: [*v, *a.extra] for k, v in variants.items()}
    res = time_upscale(a.image, a.runs, variants)
    res["environment"] = environment(BenchOptions(models=(), label=a.label))
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"upscale-cli-{a.label}"
    write_json_atomic(stem.with_suffix(".json"), res)
    first = next(iter(res["variants"].values()))["median_s"]
    rows = "".join(
        f"| {k} | `{v['command']}` | {len(v['runs_s'])} | {v['median_s']:.2f} s | "
        f"{v['min_s']:.2f} s | {v['max_s']:.2f} s | {v['first_s']:.2f} s | "
        f"{first / v['median_s']:.2f}x |\n"
        for k, v in res["variants"].items()
    )
    md = (
        f"# `dd-run upscale` end to end ({a.label})\n\n"
        f"{res['input_size'][0]}x{res['input_size'][1]} -> "
        f"{res['output_size'][0]}x{res['output_size'][1]}, fresh process per run, "
        f"variants interleaved.\n\n"
        f"| variant | command | runs | median | min | max | first (cold) | speed vs first |\n"
        f"|---|---|---:|---:|---:|---:|---:|---:|\n{rows}"
    )
    write_text_atomic(stem.with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    main()
