"""Rendering for ``dd-run bench``: run the harness, print progress, the summary and the comparison.

``deltadiff/cli/run.py`` parses the options into ``BenchOptions`` and calls ``bench_main``; everything
else (measuring, comparing, writing) is library code in ``harness.py`` / ``report.py``.
"""

from __future__ import annotations

import sys
from typing import TextIO

from deltadiff.benchmarks.harness import BenchOptions, BenchReport, WrapBackend, run_bench
from deltadiff.benchmarks.report import comparison_lines


def summary_lines(report: BenchReport) -> list[str]:
    """One line per case: e2e median, p90, CoV flag, throughput, TTFR, PSNR vs reference."""
    d = report.to_dict()
    lines = []
    for c in d["cases"]:
        if c["status"] != "ok":
            lines.append(f"{c['id']:<60} {c['status']}: {c['reason']}")
            continue
        e, thr, fid = c["e2e"], c["throughput"] or {}, c["fidelity"] or {}
        psnr = (
            "inf"
            if fid.get("psnr_inf")
            else (f"{fid['psnr_db']:.1f}" if fid.get("psnr_db") is not None else "n/a")
        )
        ratio = c["flops"].get("achieved_over_peak")
        lines.append(
            f"{c['id']:<60} {e['median'] * 1e3:9.2f} ms  p90 {e['p90'] * 1e3:9.2f}  CoV {e['cov']:6.1%}"
            f"{' (!)' if c['cov_warning'] else '    '}  {thr.get('images_per_s', 0):7.2f} img/s"
            f"  TTFR {c['ttfr']['total_s']:6.2f} s  peak {'n/a' if ratio is None else f'{ratio:5.1%}'}"
            f"  PSNR {psnr} dB"
        )
    return lines


def bench_main(
    opts: BenchOptions,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    wrap_backend: WrapBackend | None = None,
) -> int:
    """Run ``dd-run bench``; returns the exit code (1 only for a regression with
    ``fail_on_regression``). DeltaDiffError propagates to the caller (the CLI prints it)."""
    out = out or sys.stdout
    err = err or sys.stderr

    def progress(msg: str) -> None:
        print(msg, file=err, flush=True)

    report = run_bench(opts, wrap_backend=wrap_backend, progress=progress)
    print("", file=out)
    for line in summary_lines(report):
        print(line, file=out)
    if report.comparison is not None:
        print("", file=out)
        for line in comparison_lines(report.comparison):
            print(line, file=out)
    if report.files:
        print("", file=out)
        print("wrote " + ", ".join(report.files.values()), file=out)
    n_reg = report.comparison["n_regressions"] if report.comparison else 0
    if n_reg and opts.fail_on_regression:
        print(f"error: {n_reg} regression(s) against {opts.compare}", file=err)
        return 1
    return 0
