"""Which precision a run uses when the user does not say: per model *and* per machine.

INT8 is the default only where it is both usable and faster:

1. ``--precision`` always wins.
2. Only ONNX Runtime's CPU provider in staged mode has an INT8 default (GPUs: FP32 unless asked).
3. The model's INT8 graphs for the onnxruntime target must have passed the calibration gate.
4. Speed: a probe measured on this machine (``dd-run probe``, cached per CPU and model graphs)
   decides when there is one; otherwise the CPU's ISA does: INT8 needs an 8-bit dot product that
   accumulates in 32 bits (AVX-512 VNNI, AVX-VNNI, AMX). On an AVX2-only EPYC the demo's INT8 ran
   0.90x FP32 end to end, so such CPUs default to FP32.

The reason is kept with the choice, so ``dd-run info`` and each run can say why.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deltadiff.atomic import write_bytes_atomic
from deltadiff.cpu import CpuInfo, cpu_info
from deltadiff.options import Backend, Mode, Precision

if TYPE_CHECKING:
    from deltadiff.manifest import Manifest

log = logging.getLogger(__name__)

MIN_SPEEDUP = 1.05  # INT8 must beat FP32 by this much in the probe to become the default
PROBE_FILE = "precision-probe.json"


@dataclass(frozen=True)
class PrecisionChoice:
    precision: Precision
    reason: str
    explicit: bool = False

    def line(self) -> str:
        how = "asked for" if self.explicit else "default here"
        return f"precision {self.precision} ({how}: {self.reason})"


@dataclass(frozen=True)
class ProbeRecord:
    """A measured FP32 vs INT8 comparison on one machine for one model's graphs."""

    cpu_key: str
    cpu: str
    isa: str
    model_key: str
    lr: int
    threads: int
    fp32_s: float
    int8_s: float
    runs: int
    date: str

    @property
    def speedup(self) -> float:
        return self.fp32_s / self.int8_s


def cache_dir() -> Path:
    """Where per-machine measurements live (``DELTADIFF_CACHE`` or the XDG cache)."""
    root = os.environ.get("DELTADIFF_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "deltadiff"


def model_key(m: Manifest) -> str:
    """The graphs a probe timed: the FP32 step graph and every onnxruntime INT8 graph."""
    hashes = sorted(
        g.sha256
        for key, g in m.graphs.items()
        if key == "step" or (g.precision == "int8" and g.target == "onnxruntime")
    )
    return "-".join(h[:12] for h in hashes)


def _load_probes() -> dict[str, dict]:
    path = cache_dir() / PROBE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def find_probe(m: Manifest, cpu: CpuInfo) -> ProbeRecord | None:
    rec = _load_probes().get(f"{cpu.key}/{model_key(m)}")
    try:
        return ProbeRecord(**rec) if rec else None
    except TypeError:  # a record from another version: ignore it
        return None


def save_probe(rec: ProbeRecord) -> Path:
    data = _load_probes()
    data[f"{rec.cpu_key}/{rec.model_key}"] = asdict(rec)
    path = cache_dir() / PROBE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
    return path


def choose_precision(
    m: Manifest,
    backend: Backend,
    mode: Mode,
    asked: Precision | None,
    cpu: CpuInfo | None = None,
) -> PrecisionChoice:
    """The precision a run of ``m`` uses here, with the reason (see the module docstring)."""
    if asked is not None:
        return PrecisionChoice(asked, "--precision", explicit=True)
    if backend is not Backend.ONNXRUNTIME or mode is not Mode.STAGED:
        return PrecisionChoice(Precision.FP32, "INT8 is a default only on onnxruntime CPU, staged")
    why_not = m.int8_status("onnxruntime")
    if why_not:
        return PrecisionChoice(Precision.FP32, why_not.split(";")[0])
    cpu = cpu or cpu_info()
    probe = find_probe(m, cpu)
    if probe is not None:
        faster = probe.speedup >= MIN_SPEEDUP
        return PrecisionChoice(
            Precision.INT8 if faster else Precision.FP32,
            f"measured on this CPU ({probe.date}, {probe.lr}² LR, {probe.threads} threads): "
            f"INT8 {probe.int8_s:.2f} s vs FP32 {probe.fp32_s:.2f} s ({probe.speedup:.2f}x)",
        )
    if cpu.int8_dot:
        return PrecisionChoice(
            Precision.INT8,
            f"INT8 graphs passed the gate and this CPU has {cpu.int8_dot} (fast 8-bit dot "
            "products); dd-run probe measures it",
        )
    return PrecisionChoice(
        Precision.FP32,
        f"this CPU ({cpu.isa}) has no VNNI/AMX, where INT8 ran slower than FP32; "
        "dd-run probe measures it here",
    )
