"""End-to-end wall time of the ``dd-run upscale`` command, as a user runs it.

Each run is a fresh process (interpreter start, imports, model load, image read, tiling, four steps,
write), so the number includes everything a user waits for. Runs are sequential; the first is a
warm-up (file cache) and is reported separately.

    python -m deltadiff.benchmarks.bench_upscale_cli examples/astronaut_lr.png --runs 5 \\
        --out benchmarks/results/upscale-cli --label cpu-2core [-- extra dd-run upscale options]

``--variant NAME:OPTIONS`` (repeatable) times several option sets in one run, interleaved round by
round, and reports each median and its speed relative to the first variant. Leading ``KEY=VALUE``
words of OPTIONS are environment variables for that variant's processes (e.g.
``"per-session-arena:DELTADIFF_ORT_ARENA=session --precision int8"``). Each run's peak RSS is
reported too (the child's own, from ``wait4``).

``--isa native --isa avx2`` runs every variant natively and under the AVX2 ISA mask
(``deltadiff.benchmarks.isa``: AVX-512 / VNNI / AMX hidden from CPUID, so onnxruntime takes its
AVX2 kernels on this CPU), interleaved like the variants; the variant names get ``@ISA``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deltadiff.benchmarks.harness import BenchOptions, environment
from deltadiff.benchmarks.isa import (
    ISAS,
    METHOD_NOTES,
    active_isa,
    active_method,
    isa_env,
    mask_method,
)
from deltadiff.errors import DeltaDiffError
from deltadiff.runtime.atomic import write_text_atomic
from deltadiff.runtime.manifest import write_json_atomic

_ENV_WORD = re.compile(r"[A-Z_][A-Z0-9_]*=")


def _split_env(extra: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading ``KEY=VALUE`` words of a variant's options -> (environment, dd-run options)."""
    env: dict[str, str] = {}
    i = 0
    while i < len(extra) and _ENV_WORD.match(extra[i]):
        k, _, v = extra[i].partition("=")
        env[k] = v
        i += 1
    return env, extra[i:]


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and the child's peak RSS (bytes); the child is waited with
    ``wait4`` so the peak is its own, not the maximum over every child so far."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        pid = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env).pid
        _, status, usage = os.wait4(pid, 0)
        dt = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-1:]
    if code != 0:
        raise RuntimeError(tail[0] if tail else f"exit status {code}")
    return dt, usage.ru_maxrss * 1024


def time_upscale(
    image: Path, runs: int, variants: dict[str, list[str]], isas: dict[str, str] | None = None
) -> dict:
    """Time ``dd-run upscale`` once per variant per round (rounds interleave the variants, so
    machine drift hits all of them alike); the first round is the cold run. ``isas`` maps a
    variant to the ISA its processes run with (default: native)."""
    exe = shutil.which("dd-run")
    cmd_head = [exe] if exe else [sys.executable, "-m", "deltadiff.runtime.cli"]
    isas = {k: (isas or {}).get(k, "native") for k in variants}
    split = {k: _split_env(v) for k, v in variants.items()}
    envs = {k: {**isa_env(isas[k]), **split[k][0]} for k in variants}
    times: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, list[int]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.png"
        for _ in range(runs + 1):
            for name in variants:
                cmd = [*cmd_head, "upscale", str(image), "-o", str(out), "--overwrite"]
                try:
                    dt, peak = _run([*cmd, *split[name][1]], envs[name])
                except RuntimeError as exc:
                    raise SystemExit(f"dd-run upscale ({name}) failed: {exc}") from None
                times[name].append(dt)
                peaks[name].append(peak)
        from PIL import Image

        with Image.open(image) as a, Image.open(out) as b:
            sizes = (a.size, b.size)
    res = {}
    for name in variants:
        t = times[name]
        env, opts = split[name]
        words = [f"{k}={v}" for k, v in env.items()]
        res[name] = {
            "command": " ".join([*words, "dd-run", "upscale", image.name, "-o", "out.png", *opts]),
            "peak_rss_mib": statistics.median(peaks[name][1:]) / 2**20,
            "isa": isas[name],
            "isa_method": None if isas[name] == "native" else (active_method() or mask_method()),
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


def cross_isas(
    variants: dict[str, list[str]], isas: list[str]
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Every variant under every ISA (names get ``@ISA`` when there is more than one ISA)."""
    isas = list(dict.fromkeys(isas or ["native"]))
    out, isa_of = {}, {}
    for isa in isas:
        for name, extra in variants.items():
            key = f"{name}@{isa}" if len(isas) > 1 else name
            out[key], isa_of[key] = extra, isa
    return out, isa_of


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
    ap.add_argument(
        "--isa",
        choices=ISAS,
        action="append",
        default=[],
        help="run every variant with this ISA (repeatable: interleaved); avx2 = the ISA mask; "
        "default: this process's ISA",
    )
    ap.add_argument("extra", nargs="*", help="extra dd-run upscale options (after --)")
    a = ap.parse_args(argv)
    variants = dict(a.variant) if a.variant else {"default": []}
    variants = {k: [*v, *a.extra] for k, v in variants.items()}
    # no --isa: this process's own (so the ISA runner around this command masks the children too)
    variants, isas = cross_isas(variants, a.isa or [active_isa()])
    try:
        res = time_upscale(a.image, a.runs, variants, isas)
    except DeltaDiffError as exc:
        raise SystemExit(f"error: {exc}") from None
    res["environment"] = environment(BenchOptions(models=(), label=a.label))
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"upscale-cli-{a.label}"
    write_json_atomic(stem.with_suffix(".json"), res)
    first = next(iter(res["variants"].values()))["median_s"]
    cpu = res["environment"]["cpu"]
    methods = {v["isa_method"] for v in res["variants"].values()} - {None}
    isa_note = (
        "; ISA avx2 = this CPU with AVX-512 / VNNI / AMX hidden from CPUID (an emulation of an "
        "AVX2-only CPU's kernels, not another machine; "
        + "; ".join(METHOD_NOTES[m] for m in sorted(methods))
        + ")"
        if methods
        else ""
    )
    rows = "".join(
        f"| {k} | {v['isa']} | `{v['command']}` | {len(v['runs_s'])} | {v['median_s']:.2f} s | "
        f"{v['min_s']:.2f} s | {v['max_s']:.2f} s | {v['first_s']:.2f} s | "
        f"{first / v['median_s']:.2f}x | {v['peak_rss_mib']:.0f} MiB |\n"
        for k, v in res["variants"].items()
    )
    md = (
        f"# `dd-run upscale` end to end ({a.label})\n\n"
        f"{res['input_size'][0]}x{res['input_size'][1]} -> "
        f"{res['output_size'][0]}x{res['output_size'][1]}, fresh process per run, "
        f"variants interleaved. CPU: {cpu['model']} ({cpu['logical_cores']} logical cores)"
        f"{isa_note}.\n\n"
        f"| variant | ISA | command | runs | median | min | max | first (cold) | speed vs first "
        f"| peak RSS (median) |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n{rows}"
    )
    write_text_atomic(stem.with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    main()
