"""Facts about the machine and the installed stack, recorded in every report."""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import os
import platform
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

import deltadiff
from deltadiff._deps import require
from deltadiff.benchmarks.memory_sampler import NVML, nvml_handle
from deltadiff.benchmarks.options import BenchOptions
from deltadiff.runtime.memory_budget import cpu_name

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
    name = cpu_name()
    return None if name == "unknown" else name


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
    h = nvml_handle()
    if h is None:
        return None
    nv = NVML["mod"]

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
        "load_average_start": loadavg(),
    }


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
