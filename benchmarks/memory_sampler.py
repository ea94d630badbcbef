"""Peak memory: host RSS (a sampler thread plus VmHWM) and GPU memory through NVML."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

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


NVML: dict[str, Any] = {}


def nvml_handle() -> Any:
    """NVML handle of GPU 0 via pynvml (nvidia-ml-py), or None without NVML or a GPU."""
    if "handle" not in NVML:
        NVML["handle"] = None
        try:
            import pynvml  # optional: nvidia-ml-py

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() > 0:
                NVML["handle"] = pynvml.nvmlDeviceGetHandleByIndex(0)
                NVML["mod"] = pynvml
        except Exception as exc:  # ImportError, NVMLError (no driver / no GPU)
            log.debug("NVML unavailable: %s", exc)
    return NVML["handle"]


def _gpu_used_mb() -> float | None:
    h = nvml_handle()
    if h is None:
        return None
    try:
        return NVML["mod"].nvmlDeviceGetMemoryInfo(h).used / 2**20
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
