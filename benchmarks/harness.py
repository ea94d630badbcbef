"""Latency + fidelity benchmark harness behind ``dd-run bench`` (docs/benchmarks.md).

One *case* = model directory x backend x precision x mode x batch. For each case:

1. time to first result: backend load (sessions / engines / the torch module) + the first run;
2. ``warmup`` more runs, discarded;
3. measured runs until both ``min_runs`` and ``min_seconds`` are reached (trtexec's rule), with
   per-stage times from the executor's ``on_stage`` hook (``encode``, ``step_<t>`` per row,
   ``decode``; or ``unrolled``) and the end-to-end wall time around each call;
4. statistics (``Stats``), throughput, peak host RSS (a 5 ms sampler thread on
   ``/proc/self/status`` plus ``VmHWM`` after a ``clear_refs`` reset), GPU memory via NVML;
5. MACs of the graphs the case ran (``flops.py``) and achieved / measured peak;
6. fidelity: PSNR and max-abs of the output vs the FP32 PyTorch reference on the same seeded
   inputs (computed once per model, on the CPU).

Backends: ``onnxruntime`` (CPU), ``onnxruntime-cuda`` (CUDA EP), ``tensorrt`` (engines in the
model dir), ``torch`` (the reference ``Pipeline``, eager, stage by stage) and
``torch-autocast`` (the same under CUDA FP16 autocast). A case that cannot run here is *skipped*
with its reason and the report is still written. torch is imported only inside the functions
that need it, so the harness runs with onnxruntime alone.

Times are seconds in the JSON; ``cov`` uses the sample standard deviation (ddof 1);
percentiles are numpy's linear interpolation.

This module is the driver (``run_bench`` -> ``BenchReport``). One job per module:

    options.py   BenchOptions (typed backend / precision / mode), constants, CaseUnavailableError
    cases.py     the case grid (plan_cases), CaseSpec, CaseResult
    runners.py   RuntimeRunner (lean runtime backends + Executor), TorchRunner (the reference)
    context.py   per model: manifest, MACs, seeded inputs, the reference output
    measure.py   one case: first run, warm-up, timed runs, memory; the conv peak; quality vs HR
    stats.py     latency statistics          memory.py   RSS sampler, NVML
    machine.py   machine + stack facts       report.py   JSON / Markdown / plots, comparisons
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deltadiff.benchmarks.cases import CaseResult, CaseSpec, plan_cases
from deltadiff.benchmarks.context import ModelContext, lr_size
from deltadiff.benchmarks.machine import environment, loadavg
from deltadiff.benchmarks.measure import measure_peaks, quality_vs_hr, run_case
from deltadiff.benchmarks.options import (
    SCHEMA_VERSION,
    BenchOptions,
    Progress,
    WrapBackend,
)
from deltadiff.benchmarks.stats import Stats
from deltadiff.manifest import load_manifest

log = logging.getLogger(__name__)

__all__ = [
    "BenchOptions",
    "BenchReport",
    "CaseResult",
    "CaseSpec",
    "Stats",
    "WrapBackend",
    "environment",
    "plan_cases",
    "run_bench",
]

# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class BenchReport:
    """Everything one ``run_bench`` measured; ``to_dict()`` is the versioned JSON."""

    environment: dict[str, Any]
    options: dict[str, Any]
    models: list[dict[str, Any]]
    cases: list[CaseResult]
    peaks: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    comparison: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": "dd-run bench",
            "environment": self.environment,
            "options": self.options,
            "method": {
                "timer": "time.perf_counter around each call; CUDA synchronized before reading (torch)",
                "warmup": "first run (time to first result) + --warmup runs discarded",
                "stop_rule": "measure until both --min-runs and --min-seconds are reached",
                "statistics": "seconds; percentiles: numpy linear interpolation; cov: sample stdev / mean",
                "throughput": "images/s = batch / median e2e; MP/s = batch * output pixels / 1e6 / median e2e",
                "flops": "MACs from the fp32 ONNX graphs (conv + linear + attention matmuls); "
                "achieved = 2 * MACs / median e2e; peak = best of a 3x3 conv 128->128 @128x128",
                "fidelity": "PSNR (data range 1) and max-abs vs the FP32 PyTorch reference (CPU) on the same "
                "seeded inputs, computed once per model at the largest batch; smaller batches compare with "
                "its first tiles (batch-size-dependent kernels differ at ~1e-6)",
                "memory": "peak host RSS during the case (load + runs) and minus the RSS before it",
            },
            "peaks": {k: p.to_dict() for k, p in self.peaks.items()},
            "models": self.models,
            "cases": [c.to_dict() for c in self.cases],
            "comparison": self.comparison,
            "notes": list(self.notes),
        }


def _model_keys(dirs: tuple[Path, ...], lr: tuple[int, int] | None) -> list[str]:
    keys: list[str] = []
    for d in dirs:
        m = load_manifest(d, check_hashes=False)
        h, w = lr_size(m, lr, d)
        base = f"{m.name}@{h}x{w}"
        k, i = base, 2
        while k in keys:
            k, i = f"{base}#{i}", i + 1
        keys.append(k)
    return keys


def run_bench(
    opts: BenchOptions,
    *,
    wrap_backend: WrapBackend | None = None,
    progress: Progress | None = None,
) -> BenchReport:
    """Run every case of ``opts``, compare with ``opts.compare`` and write ``opts.out``.

    ``wrap_backend`` is applied to each opened runtime backend (tests inject slow-downs with it).
    ``progress`` receives one line per step (the CLI prints them).
    """
    opts.check()
    say = progress or (lambda msg: log.info("%s", msg))
    opts = replace(opts, models=tuple(Path(p) for p in opts.models))
    specs = plan_cases(opts)
    notes: list[str] = []
    old = None
    if opts.compare is not None:  # read it first: a bad path fails before the long part
        from deltadiff.benchmarks.report import load_report

        old = load_report(opts.compare)
    env = environment(opts)
    keys = _model_keys(opts.models, opts.lr)
    pairs = None
    if opts.dataset is not None:
        from deltadiff.metrics import load_dataset

        pairs = load_dataset(Path(opts.dataset))
    peaks = measure_peaks(opts, specs, notes)
    for p in peaks.values():
        say(f"peak {p.key}: {p.flops / 1e12:.3f} TFLOP/s ({p.what})")
    models: list[dict[str, Any]] = []
    cases: list[CaseResult] = []
    for model_dir, key in zip(opts.models, keys, strict=True):
        ctx = ModelContext(model_dir, opts, key)
        say(f"model {key} ({ctx.m.family}) from {model_dir}")
        ctx.compute_reference()
        if ctx.ref_info.get("status") == "ok":
            say(f"  reference: FP32 PyTorch on the CPU, {ctx.ref_info['seconds']:.2f} s")
        elif opts.reference:
            say(f"  reference skipped: {ctx.ref_info.get('reason')}")
        for spec in specs:
            res = run_case(ctx, spec, opts, peaks, wrap_backend)
            cases.append(res)
            if res.status == "ok":
                e2e = res.e2e
                assert e2e is not None  # ok cases always have samples
                fid = res.fidelity or {}
                psnr = (
                    "inf"
                    if fid.get("psnr_inf")
                    else (f"{fid['psnr_db']:.1f} dB" if fid.get("psnr_db") is not None else "n/a")
                )
                say(
                    f"  {spec.name:<34} median {e2e.median * 1e3:9.2f} ms  p90 {e2e.p90 * 1e3:9.2f} ms"
                    f"  CoV {e2e.cov:6.1%}{' !' if e2e.cov > opts.cov_warn else '  '}  n={e2e.n:<4}"
                    f" PSNR vs ref {psnr}"
                )
            else:
                say(f"  {spec.name:<34} {res.status}: {res.reason}")
        mdict = ctx.to_dict()
        if pairs is not None:
            say(f"  quality on {opts.dataset} ({len(pairs)} images)")
            quality_vs_hr(ctx, specs, opts, mdict, pairs)
        models.append(mdict)
        ctx.release()
    env["load_average_end"] = loadavg()
    report = BenchReport(env, opts.to_dict(), models, cases, peaks, notes)
    if old is not None:
        from deltadiff.benchmarks.report import compare_reports

        cmp = compare_reports(
            report.to_dict(), old, floor=opts.regression_floor, k=opts.regression_k
        )
        report.comparison = {**cmp.to_dict(), "old_path": str(opts.compare)}
    if opts.out is not None:
        from deltadiff.benchmarks.report import write_report

        paths = write_report(report.to_dict(), Path(opts.out), label=opts.label, plots=opts.plots)
        report.files = {k: str(v) for k, v in paths.items()}
    return report
