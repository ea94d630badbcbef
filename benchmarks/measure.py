"""Measuring one case (first run, warm-up, timed runs, memory), the conv peak, and quality vs HR."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np

from deltadiff._deps import require
from deltadiff.benchmarks.cases import CaseResult, CaseSpec
from deltadiff.benchmarks.context import ModelContext
from deltadiff.benchmarks.memory_sampler import MemorySampler
from deltadiff.benchmarks.options import EAGER, BenchOptions, CaseUnavailableError, WrapBackend
from deltadiff.benchmarks.runners import RuntimeRunner, TorchRunner
from deltadiff.errors import DeltaDiffError, MissingDependencyError
from deltadiff.options import RUNTIME_BACKENDS, Backend, Mode

# ---------------------------------------------------------------------------------------------
# measuring one case


def measure_case(
    result: CaseResult,
    runner: Any,
    ctx: ModelContext,
    opts: BenchOptions,
) -> np.ndarray | None:
    spec = result.spec
    lr, noise = ctx.inputs(spec.batch)
    samples: dict[str, list[float]] = {s: [] for s in result.stage_order}
    samples["e2e"] = []
    out = None
    prebuilt = ctx.build_s  # the torch module, if the reference already built it
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        try:
            runner.open()
        except CaseUnavailableError:
            raise
        except DeltaDiffError as exc:  # cannot load here: a skip with the loader's reason
            raise CaseUnavailableError(str(exc)) from None
        result.load_s = time.perf_counter() - t0
        if isinstance(runner, TorchRunner) and prebuilt is not None:
            result.load_s += prebuilt  # building the module is part of its "load"
        result.device = runner.device
        t0 = time.perf_counter()
        out = runner.run(lr, noise, None)
        result.first_run_s = time.perf_counter() - t0
        for _ in range(opts.warmup):
            runner.run(lr, noise, None)

        def on_stage(stage: str, seconds: float) -> None:
            samples.setdefault(stage, []).append(seconds)

        t_start = time.perf_counter()
        while (
            len(samples["e2e"]) < opts.min_runs or time.perf_counter() - t_start < opts.min_seconds
        ):
            t0 = time.perf_counter()
            out = runner.run(lr, noise, on_stage)
            samples["e2e"].append(time.perf_counter() - t0)
        chain = runner.chain()
        if chain is not None:
            chain(lr, noise)
            for _ in range(len(samples["e2e"])):
                t0 = time.perf_counter()
                chain(lr, noise)
                result.chain_samples.append(time.perf_counter() - t0)
    result.memory = mem.to_dict()
    result.samples = samples
    return out


def run_case(
    ctx: ModelContext,
    spec: CaseSpec,
    opts: BenchOptions,
    peaks: dict[str, Any],
    wrap: WrapBackend | None,
) -> CaseResult:
    res = CaseResult(
        model=ctx.key,
        spec=spec,
        threads=opts.threads,
        warmup=opts.warmup,
        out_hw=ctx.out_hw,
        stage_order=ctx.stages(Mode.STAGED if spec.mode == EAGER else spec.mode),
        cov_warn=opts.cov_warn,
    )
    runner: Any = (
        TorchRunner(ctx, spec, opts.threads)
        if spec.backend.is_torch
        else RuntimeRunner(ctx, spec, opts.threads, wrap)
    )
    try:
        out = measure_case(res, runner, ctx, opts)
    except CaseUnavailableError as exc:
        res.status, res.reason = "skipped", str(exc)
        res.samples = {}
        return res
    except DeltaDiffError as exc:
        res.status, res.reason = "failed", str(exc)
        res.samples = {}
        return res
    finally:
        runner.close()
    res.macs = ctx.case_macs(spec)
    res.peak_key = peak_key(spec.backend, res.device, peaks)
    if res.peak_key is not None:
        res.peak_flops = peaks[res.peak_key].flops
    res.fidelity = ctx.fidelity(out, spec.batch, spec.name)
    return res


def peak_key(backend: Backend, device: str | None, peaks: dict[str, Any]) -> str | None:
    if backend is Backend.ONNXRUNTIME:
        want = ["onnxruntime-cpu"]
    elif backend is Backend.ONNXRUNTIME_CUDA:
        want = ["onnxruntime-cuda"]
    elif backend is Backend.TENSORRT:
        want = ["torch-cuda", "onnxruntime-cuda"]
    elif backend is Backend.TORCH_AUTOCAST:
        want = ["torch-cuda-fp16"]
    else:
        want = [f"torch-{device}"]
    return next((k for k in want if k in peaks), None)


def measure_peaks(opts: BenchOptions, specs: list[CaseSpec], notes: list[str]) -> dict[str, Any]:
    from deltadiff.export import flops

    peaks: dict[str, Any] = {}
    if not opts.peak:
        notes.append("achieved/peak not measured (--no-peak)")
        return peaks
    backends = {s.backend for s in specs}
    kw = {"threads": opts.threads, "min_seconds": opts.peak_seconds}
    try:
        peaks["onnxruntime-cpu"] = flops.measure_peak_ort(**kw)
    except MissingDependencyError as exc:
        notes.append(f"no ONNX Runtime conv peak: {exc}")
    with contextlib.suppress(MissingDependencyError, CaseUnavailableError):
        if Backend.ONNXRUNTIME_CUDA in backends:
            ort = require("onnxruntime")
            if "CUDAExecutionProvider" in ort.get_available_providers():
                peaks["onnxruntime-cuda"] = flops.measure_peak_ort(
                    providers=["CUDAExecutionProvider", "CPUExecutionProvider"], **kw
                )
    if backends & {Backend.TORCH, Backend.TORCH_AUTOCAST, Backend.TENSORRT}:
        try:
            torch = require("torch", "export")
        except MissingDependencyError as exc:
            notes.append(f"no torch conv peak: {exc}")
        else:
            cuda = bool(torch.cuda.is_available())
            if Backend.TORCH in backends:
                p = flops.measure_peak_torch(device="cuda" if cuda else "cpu", **kw)
                peaks[p.key] = p
            if cuda and Backend.TENSORRT in backends and "torch-cuda" not in peaks:
                peaks["torch-cuda"] = flops.measure_peak_torch(device="cuda", **kw)
            if cuda and Backend.TORCH_AUTOCAST in backends:
                peaks["torch-cuda-fp16"] = flops.measure_peak_torch(device="cuda", fp16=True, **kw)
    return peaks


# ---------------------------------------------------------------------------------------------
# quality (--dataset)


def quality_vs_hr(
    ctx: ModelContext,
    specs: list[CaseSpec],
    opts: BenchOptions,
    mdict: dict[str, Any],
    pairs: list[Any],
) -> None:
    from deltadiff.benchmarks.quality import evaluate
    from deltadiff.lpips import LPIPS, default_lpips_weights
    from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler

    mode = next(iter(opts.modes), Mode.STAGED)
    seen: set[tuple[str, str]] = set()
    ups: dict[str, Any] = {}
    opened: list[Any] = []
    for s in specs:
        if (s.backend, s.precision) in seen:
            continue
        seen.add((s.backend, s.precision))
        name = f"{s.backend}/{s.precision}"
        if s.backend not in RUNTIME_BACKENDS:
            why = (
                "quality runs through the runtime Upscaler (tiled); torch is the fidelity reference above"
                if s.backend.is_torch
                else f"the runtime Upscaler has no {s.backend} backend"
            )
            mdict["quality_skipped"].append({"upscaler": name, "reason": why})
            continue
        try:
            up = Upscaler(
                ctx.dir,
                UpscaleOptions(
                    backend=s.backend, precision=s.precision, mode=mode, threads=opts.threads
                ),
            )
        except DeltaDiffError as exc:
            mdict["quality_skipped"].append({"upscaler": name, "reason": str(exc)})
            continue
        opened.append(up)
        ups[name] = up.upscale
    try:
        if not ups:
            return
        weights = default_lpips_weights()
        lp = LPIPS(weights) if weights is not None and weights.is_file() else None
        if lp is None:
            mdict["quality_skipped"].append(
                {"upscaler": "LPIPS", "reason": "no LPIPS weights (set DD_LPIPS_WEIGHTS)"}
            )
        rep = evaluate(pairs, ups, lpips=lp, dataset=str(opts.dataset))
        mdict["quality"] = {**rep.to_dict(), "mode": mode}
    finally:
        for up in opened:
            up.close()
