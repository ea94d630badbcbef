"""Latency + fidelity benchmark harness behind ``dd-run bench`` (DESIGN "Reports", STYLE §12).

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
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import importlib.metadata
import logging
import math
import os
import platform
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

import deltadiff
from deltadiff._deps import require
from deltadiff.errors import DeltaDiffError, MissingDependencyError
from deltadiff.runtime.backends import BACKENDS as RUNTIME_BACKENDS
from deltadiff.runtime.backends import Backend, open_backend
from deltadiff.runtime.compare import compare
from deltadiff.runtime.executor import Executor
from deltadiff.runtime.manifest import Manifest, load_manifest
from deltadiff.runtime.noise import noise_field

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BACKENDS = ("onnxruntime", "onnxruntime-cuda", "tensorrt", "torch", "torch-autocast")
TORCH_BACKENDS = ("torch", "torch-autocast")
PRECISIONS = ("fp32", "fp16", "int8")
MODES = ("staged", "unrolled")
EAGER = "eager"  # the torch backends' only mode
DEFAULT_COV_WARN = 0.10
# graphs each mode runs
MODE_GRAPHS = {"staged": ("encoder", "step", "decoder"), "unrolled": ("unrolled",)}
_GRAPH_ORDER = {"encoder": 0, "step": 1, "decoder": 2, "unrolled": 3}

WrapBackend = Callable[[Backend], Backend]
Progress = Callable[[str], None]


class CaseUnavailableError(DeltaDiffError):
    """A case cannot run on this machine / install; the message says why."""


# ---------------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class BenchOptions:
    models: tuple[Path, ...]
    backends: tuple[str, ...] = ("onnxruntime",)
    precisions: tuple[str, ...] = ("fp32",)
    modes: tuple[str, ...] = ("staged",)
    batches: tuple[int, ...] = (1,)
    threads: int = 0  # 0: the backend's default
    warmup: int = 2  # runs discarded after the first (time-to-first-result) run
    min_runs: int = 10
    min_seconds: float = 3.0
    seed: int = 0
    cov_warn: float = DEFAULT_COV_WARN  # flag a cell when stdev / mean exceeds this
    dataset: Path | None = None
    out: Path | None = None
    label: str | None = None  # machine name used in the output file names
    compare: Path | None = None  # an earlier bench JSON
    fail_on_regression: bool = False  # the CLI exits 1 when the comparison flags a cell
    regression_floor: float = 0.10
    regression_k: float = 3.0
    reference: bool = True  # fidelity vs the FP32 PyTorch reference
    peak: bool = True  # measure the conv peak for achieved / peak
    peak_seconds: float = 1.0
    plots: bool = True
    command: str | None = None  # recorded in the report; default: this process's argv

    def check(self) -> None:
        """Raise DeltaDiffError naming the first bad option."""
        if not self.models:
            raise DeltaDiffError("no model directories to benchmark; pass --model DIR")
        for b in self.backends:
            if b not in BACKENDS:
                raise DeltaDiffError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
        for p in self.precisions:
            if p not in PRECISIONS:
                raise DeltaDiffError(
                    f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}"
                )
        for m in self.modes:
            if m not in MODES:
                raise DeltaDiffError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
        if not self.backends or not self.precisions or not self.modes or not self.batches:
            raise DeltaDiffError("each of --backend, --precision, --mode and --batch needs a value")
        if any(b < 1 for b in self.batches):
            raise DeltaDiffError(f"--batch must be >= 1, got {list(self.batches)}")
        if self.threads < 0:
            raise DeltaDiffError(f"--threads must be >= 0 (0: backend default), got {self.threads}")
        if self.warmup < 0 or self.min_runs < 1 or self.min_seconds < 0:
            raise DeltaDiffError(
                f"need --warmup >= 0, --min-runs >= 1, --min-seconds >= 0 "
                f"(got {self.warmup}, {self.min_runs}, {self.min_seconds})"
            )
        if not self.cov_warn > 0:
            raise DeltaDiffError(f"--cov-warn must be > 0, got {self.cov_warn}")
        if self.label is not None and (not self.label or any(c in self.label for c in "/\\ ")):
            raise DeltaDiffError(
                f"--label {self.label!r} must be a non-empty name without / \\ or spaces"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": [str(p) for p in self.models],
            "backends": list(self.backends),
            "precisions": list(self.precisions),
            "modes": list(self.modes),
            "batches": list(self.batches),
            "threads": self.threads,
            "warmup": self.warmup,
            "min_runs": self.min_runs,
            "min_seconds": self.min_seconds,
            "seed": self.seed,
            "cov_warn": self.cov_warn,
            "dataset": str(self.dataset) if self.dataset else None,
            "label": self.label,
            "compare": str(self.compare) if self.compare else None,
            "fail_on_regression": self.fail_on_regression,
            "regression_floor": self.regression_floor,
            "regression_k": self.regression_k,
            "reference": self.reference,
            "peak": self.peak,
        }


# ---------------------------------------------------------------------------------------------
# statistics


@dataclass(frozen=True)
class Stats:
    """Summary of a list of durations (seconds). ``cov`` = sample stdev / mean."""

    n: int
    min: float
    mean: float
    median: float
    p90: float
    p95: float
    p99: float
    max: float
    stdev: float
    cov: float

    @classmethod
    def from_times(cls, times: list[float] | np.ndarray) -> Stats:
        a = np.asarray(times, dtype=np.float64)
        if a.size == 0:
            raise ValueError("no timings to summarise")
        p90, p95, p99, med = np.percentile(a, [90.0, 95.0, 99.0, 50.0])
        mean = float(a.mean())
        stdev = float(a.std(ddof=1)) if a.size > 1 else 0.0
        return cls(
            n=int(a.size),
            min=float(a.min()),
            mean=mean,
            median=float(med),
            p90=float(p90),
            p95=float(p95),
            p99=float(p99),
            max=float(a.max()),
            stdev=stdev,
            cov=stdev / mean if mean > 0 else 0.0,
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# ---------------------------------------------------------------------------------------------
# memory


def _proc_status_kb(key: str) -> int | None:
    try:
        with Path("/proc/self/status").open(encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


_NVML: dict[str, Any] = {}


def _nvml_handle() -> Any:
    """NVML handle of GPU 0 via pynvml (nvidia-ml-py), or None without NVML or a GPU."""
    if "handle" not in _NVML:
        _NVML["handle"] = None
        try:
            import pynvml  # optional: nvidia-ml-py

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() > 0:
                _NVML["handle"] = pynvml.nvmlDeviceGetHandleByIndex(0)
                _NVML["mod"] = pynvml
        except Exception as exc:  # ImportError, NVMLError (no driver / no GPU)
            log.debug("NVML unavailable: %s", exc)
    return _NVML["handle"]


def _gpu_used_mb() -> float | None:
    h = _nvml_handle()
    if h is None:
        return None
    try:
        return _NVML["mod"].nvmlDeviceGetMemoryInfo(h).used / 2**20
    except Exception:  # NVMLError
        return None


class MemorySampler:
    """Peak host RSS (and device-wide GPU memory used) while the ``with`` block runs."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.base_kb: int | None = None
        self.peak_kb: int | None = None
        self.gpu_base_mb: float | None = None
        self.gpu_peak_mb: float | None = None
        self.source = "unavailable"

    def _sample(self) -> None:
        rss = _proc_status_kb("VmRSS")
        if rss is not None:
            self.peak_kb = max(self.peak_kb or 0, rss)
        gpu = _gpu_used_mb()
        if gpu is not None:
            self.gpu_peak_mb = max(self.gpu_peak_mb or 0.0, gpu)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> MemorySampler:
        self.base_kb = _proc_status_kb("VmRSS")
        self.gpu_base_mb = _gpu_used_mb()
        self._hwm = _reset_hwm()
        self.source = "VmHWM+sampled" if self._hwm else "sampled VmRSS"
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        if self._hwm:
            hwm = _proc_status_kb("VmHWM")
            if hwm is not None:
                self.peak_kb = max(self.peak_kb or 0, hwm)
        if self.base_kb is None:
            self.source = "unavailable"

    def to_dict(self) -> dict[str, Any]:
        def mb(kb: int | None) -> float | None:
            return None if kb is None else kb / 1024.0

        delta = (
            None
            if self.base_kb is None or self.peak_kb is None
            else mb(self.peak_kb - self.base_kb)
        )
        gdelta = None
        if self.gpu_base_mb is not None and self.gpu_peak_mb is not None:
            gdelta = self.gpu_peak_mb - self.gpu_base_mb
        return {
            "rss_baseline_mb": mb(self.base_kb),
            "rss_peak_mb": mb(self.peak_kb),
            "rss_peak_delta_mb": delta,
            "rss_source": self.source,
            "gpu_used_baseline_mb": self.gpu_base_mb,
            "gpu_used_peak_mb": self.gpu_peak_mb,
            "gpu_used_peak_delta_mb": gdelta,
        }


# ---------------------------------------------------------------------------------------------
# environment


_DISTS: dict[str, list[str]] = {}


def _version(module: str) -> str | None:
    """Installed version of the distribution providing ``module`` (no import of the module)."""
    try:
        if not _DISTS:
            _DISTS.update(importlib.metadata.packages_distributions())
        dists = _DISTS.get(module, [])
        for d in dists:
            return importlib.metadata.version(d)
    except Exception:  # broken metadata must not stop a benchmark
        return None
    return None


def _cpu_model() -> str | None:
    try:
        for line in (
            Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
        ):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _physical_cores() -> int | None:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    cores, phys = set(), "0"
    for line in text.splitlines():
        if line.startswith("physical id"):
            phys = line.split(":", 1)[1].strip()
        elif line.startswith("core id"):
            cores.add((phys, line.split(":", 1)[1].strip()))
    return len(cores) or None


def _gpu_info() -> dict[str, Any] | None:
    h = _nvml_handle()
    if h is None:
        return None
    nv = _NVML["mod"]

    def s(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    try:
        return {
            "name": s(nv.nvmlDeviceGetName(h)),
            "driver": s(nv.nvmlSystemGetDriverVersion()),
            "memory_total_mb": nv.nvmlDeviceGetMemoryInfo(h).total / 2**20,
            "count": int(nv.nvmlDeviceGetCount()),
        }
    except Exception as exc:  # NVMLError
        return {"name": None, "driver": None, "error": str(exc)}


def environment(opts: BenchOptions) -> dict[str, Any]:
    """Machine, library versions, threads and the command line of this run."""
    mem_total = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) / 1024.0
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    providers = None
    with contextlib.suppress(Exception):
        providers = list(require("onnxruntime").get_available_providers())
    mods = (
        "numpy",
        "onnxruntime",
        "onnx",
        "torch",
        "tensorrt",
        "tensorrt_rtx",
        "matplotlib",
        "pynvml",
    )
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "label": opts.label,
        "command": opts.command if opts.command is not None else shlex.join(sys.argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": {
            "model": _cpu_model(),
            "logical_cores": os.cpu_count(),
            "physical_cores": _physical_cores(),
            "affinity_cores": affinity,
        },
        "memory_total_mb": mem_total,
        "gpu": _gpu_info(),
        "versions": {"deltadiff-trt": deltadiff.__version__, **{m: _version(m) for m in mods}},
        "onnxruntime_providers": providers,
        "threads": {
            "requested": opts.threads,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        },
        "load_average_start": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# cases


@dataclass(frozen=True)
class CaseSpec:
    backend: str
    precision: str
    mode: str  # staged | unrolled | eager
    batch: int

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.precision}/{self.mode}/b{self.batch}"


def plan_cases(opts: BenchOptions) -> list[CaseSpec]:
    """The case grid, normalised: torch backends run ``eager``; torch fp16 = torch-autocast,
    which is always fp16. Duplicates are dropped, order kept."""
    out: list[CaseSpec] = []
    for backend in opts.backends:
        for precision in opts.precisions:
            for mode in opts.modes:
                for batch in opts.batches:
                    b, p, m = backend, precision, mode
                    if b in TORCH_BACKENDS:
                        m = EAGER
                        b = "torch-autocast" if (b == "torch-autocast" or p == "fp16") else "torch"
                        p = "fp16" if b == "torch-autocast" else "fp32"
                    spec = CaseSpec(b, p, m, batch)
                    if spec not in out:
                        out.append(spec)
    return out


@dataclass
class CaseResult:
    model: str
    spec: CaseSpec
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    device: str | None = None
    threads: int = 0
    warmup: int = 0
    out_hw: tuple[int, int] = (0, 0)
    stage_order: list[str] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)  # stage -> seconds; "e2e"
    chain_samples: list[float] = field(default_factory=list)
    load_s: float | None = None
    first_run_s: float | None = None
    memory: dict[str, Any] | None = None
    macs: int | None = None
    peak_key: str | None = None
    peak_flops: float | None = None
    fidelity: dict[str, Any] | None = None
    cov_warn: float = DEFAULT_COV_WARN

    @property
    def id(self) -> str:
        return f"{self.model}/{self.spec.name}"

    @property
    def e2e(self) -> Stats | None:
        return Stats.from_times(self.samples["e2e"]) if self.samples.get("e2e") else None

    def stage_stats(self) -> dict[str, Stats]:
        return {
            s: Stats.from_times(self.samples[s]) for s in self.stage_order if self.samples.get(s)
        }

    def to_dict(self) -> dict[str, Any]:
        e2e = self.e2e
        stages = self.stage_stats()
        thr = None
        flops: dict[str, Any] = {
            "macs": self.macs,
            "gmacs": None if self.macs is None else self.macs / 1e9,
            "achieved_tflops": None,
            "peak_key": self.peak_key,
            "peak_tflops": None if self.peak_flops is None else self.peak_flops / 1e12,
            "achieved_over_peak": None,
        }
        if e2e is not None and e2e.median > 0:
            b = self.spec.batch
            thr = {
                "images_per_s": b / e2e.median,
                "megapixels_per_s": b * self.out_hw[0] * self.out_hw[1] / 1e6 / e2e.median,
            }
            if self.macs is not None:
                achieved = 2.0 * self.macs / e2e.median
                flops["achieved_tflops"] = achieved / 1e12
                if self.peak_flops:
                    flops["achieved_over_peak"] = achieved / self.peak_flops
        noisy = [s for s, st in stages.items() if st.cov > self.cov_warn]
        ttfr = None
        if self.load_s is not None and self.first_run_s is not None:
            ttfr = {
                "load_s": self.load_s,
                "first_run_s": self.first_run_s,
                "total_s": self.load_s + self.first_run_s,
            }
        return {
            "id": self.id,
            "model": self.model,
            "backend": self.spec.backend,
            "precision": self.spec.precision,
            "mode": self.spec.mode,
            "batch": self.spec.batch,
            "status": self.status,
            "reason": self.reason,
            "device": self.device,
            "threads": self.threads,
            "warmup": self.warmup,
            "runs": e2e.n if e2e else 0,
            "output_hw": list(self.out_hw),
            "stage_order": list(self.stage_order),
            "stages": {s: st.to_dict() for s, st in stages.items()},
            "e2e": e2e.to_dict() if e2e else None,
            "e2e_device_chain": Stats.from_times(self.chain_samples).to_dict()
            if self.chain_samples
            else None,
            "cov_threshold": self.cov_warn,
            "cov_warning": bool(e2e is not None and e2e.cov > self.cov_warn),
            "noisy_stages": noisy,
            "throughput": thr,
            "memory": self.memory,
            "ttfr": ttfr,
            "flops": flops,
            "fidelity": self.fidelity,
            "samples": {k: list(v) for k, v in self.samples.items()},
        }


# ---------------------------------------------------------------------------------------------
# runners: one per backend family; open() is timed as "load", run() returns the SR batch


class _RuntimeRunner:
    """onnxruntime / onnxruntime-cuda / tensorrt through the runtime's backends + Executor."""

    def __init__(
        self, ctx: _ModelContext, spec: CaseSpec, threads: int, wrap: WrapBackend | None
    ) -> None:
        self.ctx, self.spec, self.threads, self.wrap = ctx, spec, threads, wrap
        self.backend: Backend | None = None
        self.device = "cuda" if spec.backend in ("onnxruntime-cuda", "tensorrt") else "cpu"

    def open(self) -> None:
        m, spec = self.ctx.m, self.spec
        lo, hi = m.batch
        if not lo <= spec.batch <= hi:
            raise CaseUnavailableError(
                f"batch {spec.batch} is outside the model's batch range [{lo}, {hi}]; "
                f"re-export with dd-export onnx --max-batch {spec.batch}"
            )
        target = "tensorrt" if spec.backend == "tensorrt" else "onnxruntime"
        if spec.precision == "int8" and m.int8_status(target):
            raise CaseUnavailableError(str(m.int8_status(target)))
        graphs = [  # the step as one name per row: INT8 has a graph per row
            x
            for g in MODE_GRAPHS[spec.mode]
            for x in ([f"step@{int(r['t'])}" for r in m.step_table["rows"]] if g == "step" else [g])
        ]
        for g in graphs:
            m.graph(g, spec.precision)  # ManifestError: no such graph (e.g. fp16 not exported)
        if spec.backend == "onnxruntime-cuda":
            ort = require("onnxruntime", "ort")
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise CaseUnavailableError(
                    "onnxruntime has no CUDAExecutionProvider here (needs onnxruntime-gpu and a CUDA GPU)"
                )
        # a DeltaDiffError from here on (no GPU, no engine, ...) becomes a skip in _measure
        if spec.backend in RUNTIME_BACKENDS:
            be = open_backend(
                spec.backend, self.ctx.dir, m, precision=spec.precision, threads=self.threads
            )
        else:  # a runtime whose open_backend has no onnxruntime-cuda: the CUDA EP directly
            from deltadiff.runtime.backends.ort import OrtBackend

            be = OrtBackend(
                self.ctx.dir,
                m,
                precision=spec.precision,
                threads=self.threads,
                providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
            )
        self.backend = be
        # load what the first run would load lazily, so "load" and "first run" separate cleanly
        for g in graphs:
            for attr in ("session", "engine"):  # OrtBackend.session / TrtBackend.engine
                fn = getattr(be, attr, None)
                if callable(fn):
                    fn(g)
                    break
        if spec.backend == "onnxruntime-cuda":
            sess = be.session(MODE_GRAPHS[spec.mode][0])  # type: ignore[attr-defined]
            if sess.get_providers()[0] != "CUDAExecutionProvider":
                raise CaseUnavailableError(
                    "onnxruntime fell back to the CPU provider (CUDA EP failed to start)"
                )
        self.backend = self.wrap(be) if self.wrap is not None else be
        self.executor = Executor(m, self.backend, mode=spec.mode)

    def run(
        self,
        lr: np.ndarray,
        noise: dict[str, np.ndarray],
        on_stage: Callable[[str, float], None] | None,
    ) -> np.ndarray:
        return self.executor.run(lr, noise, on_stage=on_stage)

    def chain(self) -> Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray] | None:
        """The device-resident end-to-end path (TensorRT's CUDA graph), if the backend has one."""
        if getattr(self.backend, "run_sequence", None) is None:
            return None
        return lambda lr, noise: self.executor.run(lr, noise)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()


class _TorchRunner:
    """The PyTorch reference pipeline, eager, stage by stage under ``torch.no_grad()``."""

    def __init__(self, ctx: _ModelContext, spec: CaseSpec, threads: int) -> None:
        self.ctx, self.spec, self.threads = ctx, spec, threads
        self._old_threads: int | None = None
        self.device: str | None = None
        self.torch: Any = None

    def open(self) -> None:
        try:
            torch = require("torch", "export")
        except MissingDependencyError as exc:
            raise CaseUnavailableError(f"torch is not installed ({exc})") from None
        self.torch = torch
        cuda = bool(torch.cuda.is_available())
        self.autocast = self.spec.backend == "torch-autocast"
        if self.autocast and not cuda:
            raise CaseUnavailableError(
                "torch-autocast (fp16) needs CUDA; torch sees no CUDA device here"
            )
        self.device = "cuda" if cuda else "cpu"
        self._old_threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        pipe = self.ctx.pipeline()
        self.pipe = copy.deepcopy(pipe).to(self.device) if cuda else pipe
        self.rows = list(self.pipe.table.rows)

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def run(
        self,
        lr: np.ndarray,
        noise: dict[str, np.ndarray],
        on_stage: Callable[[str, float], None] | None,
    ) -> np.ndarray:
        torch, pipe, dev = self.torch, self.pipe, self.device

        def done(stage: str, t0: float) -> float:
            self._sync()
            t1 = time.perf_counter()
            if on_stage is not None:
                on_stage(stage, t1 - t0)
            return t1

        amp = (
            torch.autocast("cuda", dtype=torch.float16)
            if self.autocast
            else contextlib.nullcontext()
        )
        # host <-> device copies count in encode / decode, as the runtime backends' I/O does
        with torch.no_grad(), amp:
            t0 = time.perf_counter()
            lr_t = torch.from_numpy(lr).to(dev)
            tn = {k: torch.from_numpy(v).to(dev) for k, v in noise.items()}
            y, cond = pipe.encode(lr_t)
            x = pipe.prior(y, tn)
            t0 = done("encode", t0)
            B = x.shape[0]
            for r in self.rows:
                t = torch.full((B,), r.t, dtype=torch.int64, device=dev)
                n = tn.get(f"n_{r.t}") if r.s != 0.0 else None
                x = pipe.step(x, y, cond, t, r.in_scale, r.a, r.b, r.c, r.s, n)
                t0 = done(f"step_{r.t}", t0)
            img = pipe.decode(x).float().cpu().numpy()
            done("decode", t0)
        return img

    def chain(self) -> None:
        return None

    def close(self) -> None:
        if self._old_threads is not None:
            self.torch.set_num_threads(self._old_threads)
        if self.device == "cuda" and hasattr(self, "pipe"):
            del self.pipe
            self.torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# per-model context: manifest, MACs, inputs, the torch reference


class _ModelContext:
    def __init__(self, model_dir: Path, opts: BenchOptions, key: str) -> None:
        self.dir = model_dir
        self.m: Manifest = load_manifest(model_dir)
        self.opts = opts
        self.key = key
        h, w = self.m.tile
        self.out_hw = (self.m.scale * h, self.m.scale * w)
        self.steps = len(self.m.step_table["rows"])
        self.step_stages = [f"step_{int(r['t'])}" for r in self.m.step_table["rows"]]
        bmax = max(opts.batches)
        rng = np.random.default_rng(opts.seed)
        self.lr = rng.random((bmax, 3, h, w), dtype=np.float32)
        sh, sw = self.m.state_hw()
        self.noise = noise_field(self.m.noise_names, (bmax, 3, sh, sw), opts.seed + 1)
        self._pipe: Any = None
        self.build_s: float | None = None
        self.ref: np.ndarray | None = None
        self.ref_info: dict[str, Any] = {"status": "not computed", "reason": "--no-reference"}
        self.macs: Any = None  # flops.GraphMacs
        self.macs_info: dict[str, Any] = {"status": "not counted", "reason": None, "graphs": []}
        self._count_macs()

    def inputs(self, batch: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        lr = np.ascontiguousarray(self.lr[:batch])
        return lr, {k: np.ascontiguousarray(v[:batch]) for k, v in self.noise.items()}

    def stages(self, mode: str) -> list[str]:
        return ["unrolled"] if mode == "unrolled" else ["encode", *self.step_stages, "decode"]

    # MACs ------------------------------------------------------------------------------------
    def _count_macs(self) -> None:
        """MACs are counted lazily per (graph, batch) by ``case_macs``; this checks onnx is here."""
        from deltadiff.benchmarks.flops import GraphMacs

        try:
            require("onnx", "export")
        except MissingDependencyError as exc:
            self.macs = None
            self.macs_info = {
                "status": "skipped",
                "reason": f"MAC counts need onnx: {exc}",
                "graphs": [],
            }
            return
        files = {g: r.file for g, r in self.m.graphs.items() if r.precision == "fp32"}
        self.macs = GraphMacs(self.dir, files)
        self.macs_info = {"status": "ok", "reason": None, "graphs": []}

    def case_macs(self, spec: CaseSpec) -> int | None:
        """MACs of one end-to-end call of ``spec`` (torch eager counts as staged)."""
        if self.macs is None:
            return None
        mode = "staged" if spec.mode == EAGER else spec.mode
        need = MODE_GRAPHS[mode]
        if any(g not in self.macs.graphs for g in need):
            return None
        try:
            total = self.macs.pipeline(mode, spec.batch, self.steps)
        except Exception as exc:  # a graph onnx cannot parse or infer: report it, keep measuring
            log.warning("MAC count failed for %s: %s", self.key, exc)
            self.macs_info.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
            return None
        for g in need:
            rec = {"graph": g, **self.macs.get(g, spec.batch).to_dict()}
            if rec not in self.macs_info["graphs"]:
                self.macs_info["graphs"].append(rec)
        return total

    # reference -------------------------------------------------------------------------------
    def pipeline(self) -> Any:
        """The FP32 reference ``Pipeline`` the model was exported from (CPU), built once."""
        if self._pipe is None:
            from deltadiff.export.verify import reference_pipeline

            t0 = time.perf_counter()
            self._pipe = reference_pipeline(self.m, model_dir=self.dir)
            self.build_s = time.perf_counter() - t0
        return self._pipe

    def compute_reference(self) -> None:
        if not self.opts.reference:
            return
        try:
            torch = require("torch", "export")
        except MissingDependencyError:
            self.ref_info = {
                "status": "skipped",
                "reason": "torch is not installed: no PyTorch reference for fidelity",
            }
            return
        old = torch.get_num_threads()
        if self.opts.threads:
            torch.set_num_threads(self.opts.threads)
        try:
            pipe = self.pipeline()
            t0 = time.perf_counter()
            with torch.no_grad():
                tn = {k: torch.from_numpy(v) for k, v in self.noise.items()}
                self.ref = pipe(torch.from_numpy(self.lr), tn).numpy()
            secs = time.perf_counter() - t0
        except DeltaDiffError as exc:
            self.ref_info = {"status": "skipped", "reason": f"cannot rebuild the reference: {exc}"}
            return
        finally:
            torch.set_num_threads(old)
        self.ref_info = {
            "status": "ok",
            "reason": None,
            "device": "cpu",
            "precision": "fp32",
            "batch": int(self.lr.shape[0]),
            "build_s": self.build_s,
            "seconds": secs,
            "inputs": f"{self.lr.shape[0]} random LR tile(s) seed {self.opts.seed}"
            + (f", noise seed {self.opts.seed + 1}" if self.noise else ""),
        }

    def fidelity(self, out: np.ndarray, batch: int, name: str) -> dict[str, Any]:
        if self.ref is None:
            return {
                "psnr_db": None,
                "psnr_inf": False,
                "max_abs": None,
                "mean_abs": None,
                "reason": self.ref_info.get("reason") or "no reference",
            }
        r = compare(self.ref[:batch], np.asarray(out, dtype=np.float32), name=name, data_range=1.0)
        inf = math.isinf(r.psnr) and r.psnr > 0
        return {
            "psnr_db": None if not math.isfinite(r.psnr) else r.psnr,
            "psnr_inf": inf,
            "max_abs": r.max_abs if math.isfinite(r.max_abs) else None,
            "mean_abs": r.mean_abs if math.isfinite(r.mean_abs) else None,
            "reason": None if r.finite else "output has NaN/Inf",
        }

    def release(self) -> None:
        self._pipe = None
        self.ref = None

    def to_dict(self) -> dict[str, Any]:
        m = self.m
        return {
            "key": self.key,
            "name": m.name,
            "family": m.family,
            "dir": str(self.dir),
            "tile": list(m.tile),
            "output_hw": list(self.out_hw),
            "batch_range": list(m.batch),
            "precisions": m.precisions(),
            "noise": bool(m.noise_names),
            "stages": ["encode", *self.step_stages, "decode"],
            "macs": {
                **self.macs_info,
                "graphs": sorted(
                    self.macs_info["graphs"],
                    key=lambda g: (g["batch"], _GRAPH_ORDER.get(g["graph"], 9)),
                ),
            },
            "reference": self.ref_info,
            "quality": None,
            "quality_skipped": [],
        }


# ---------------------------------------------------------------------------------------------
# measuring one case


def _measure(
    result: CaseResult,
    runner: Any,
    ctx: _ModelContext,
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
        if isinstance(runner, _TorchRunner) and prebuilt is not None:
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


def _run_case(
    ctx: _ModelContext,
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
        stage_order=ctx.stages("staged" if spec.mode == EAGER else spec.mode),
        cov_warn=opts.cov_warn,
    )
    runner: Any = (
        _TorchRunner(ctx, spec, opts.threads)
        if spec.backend in TORCH_BACKENDS
        else _RuntimeRunner(ctx, spec, opts.threads, wrap)
    )
    try:
        out = _measure(res, runner, ctx, opts)
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
    res.peak_key = _peak_key(spec.backend, res.device, peaks)
    if res.peak_key is not None:
        res.peak_flops = peaks[res.peak_key].flops
    res.fidelity = ctx.fidelity(out, spec.batch, spec.name)
    return res


def _peak_key(backend: str, device: str | None, peaks: dict[str, Any]) -> str | None:
    if backend == "onnxruntime":
        want = ["onnxruntime-cpu"]
    elif backend == "onnxruntime-cuda":
        want = ["onnxruntime-cuda"]
    elif backend == "tensorrt":
        want = ["torch-cuda", "onnxruntime-cuda"]
    elif backend == "torch-autocast":
        want = ["torch-cuda-fp16"]
    else:
        want = [f"torch-{device}"]
    return next((k for k in want if k in peaks), None)


def _measure_peaks(opts: BenchOptions, specs: list[CaseSpec], notes: list[str]) -> dict[str, Any]:
    from deltadiff.benchmarks import flops

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
        if "onnxruntime-cuda" in backends:
            ort = require("onnxruntime", "ort")
            if "CUDAExecutionProvider" in ort.get_available_providers():
                peaks["onnxruntime-cuda"] = flops.measure_peak_ort(
                    providers=["CUDAExecutionProvider", "CPUExecutionProvider"], **kw
                )
    if backends & {"torch", "torch-autocast", "tensorrt"}:
        try:
            torch = require("torch", "export")
        except MissingDependencyError as exc:
            notes.append(f"no torch conv peak: {exc}")
        else:
            cuda = bool(torch.cuda.is_available())
            if "torch" in backends:
                p = flops.measure_peak_torch(device="cuda" if cuda else "cpu", **kw)
                peaks[p.key] = p
            if cuda and backends & {"tensorrt"} and "torch-cuda" not in peaks:
                peaks["torch-cuda"] = flops.measure_peak_torch(device="cuda", **kw)
            if cuda and "torch-autocast" in backends:
                peaks["torch-cuda-fp16"] = flops.measure_peak_torch(device="cuda", fp16=True, **kw)
    return peaks


# ---------------------------------------------------------------------------------------------
# quality (--dataset)


def _quality(
    ctx: _ModelContext,
    specs: list[CaseSpec],
    opts: BenchOptions,
    mdict: dict[str, Any],
    pairs: list[Any],
) -> None:
    from deltadiff.benchmarks.lpips import LPIPS, default_lpips_weights
    from deltadiff.benchmarks.quality import evaluate
    from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler

    mode = next((m for m in opts.modes if m in MODES), "staged")
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
                if s.backend in TORCH_BACKENDS
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
                "flops": "MACs from the fp32 ONNX graphs (conv + linear + matmuls, MODEL.md 7.4); "
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


def _model_keys(dirs: tuple[Path, ...]) -> list[str]:
    keys: list[str] = []
    for d in dirs:
        m = load_manifest(d, check_hashes=False)
        base = f"{m.name}@{m.tile[0]}x{m.tile[1]}"
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
    keys = _model_keys(opts.models)
    pairs = None
    if opts.dataset is not None:
        from deltadiff.benchmarks.quality import load_dataset

        pairs = load_dataset(Path(opts.dataset))
    peaks = _measure_peaks(opts, specs, notes)
    for p in peaks.values():
        say(f"peak {p.key}: {p.flops / 1e12:.3f} TFLOP/s ({p.what})")
    models: list[dict[str, Any]] = []
    cases: list[CaseResult] = []
    for model_dir, key in zip(opts.models, keys, strict=True):
        ctx = _ModelContext(model_dir, opts, key)
        say(f"model {key} ({ctx.m.family}) from {model_dir}")
        ctx.compute_reference()
        if ctx.ref_info.get("status") == "ok":
            say(f"  reference: FP32 PyTorch on the CPU, {ctx.ref_info['seconds']:.2f} s")
        elif opts.reference:
            say(f"  reference skipped: {ctx.ref_info.get('reason')}")
        for spec in specs:
            res = _run_case(ctx, spec, opts, peaks, wrap_backend)
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
            _quality(ctx, specs, opts, mdict, pairs)
        models.append(mdict)
        ctx.release()
    env["load_average_end"] = _loadavg()
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
