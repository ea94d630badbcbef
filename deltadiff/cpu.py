"""What this CPU offers for INT8 inference, read from ``/proc/cpuinfo`` (torch-free, no deps).

ONNX Runtime's INT8 convolutions are only worth it where the CPU has an 8-bit dot-product
instruction that accumulates in 32 bits: AVX-512 VNNI, AVX-VNNI (Alder Lake and later, Zen 5) or
AMX. Without one (AVX2-only x86), MLAS multiplies U8 x S8 with ``VPMADDUBSW`` + ``VPMADDWD`` and
the INT8 graphs measured slower than FP32 (docs/results/2026-12-07-cpu-defaults.md).
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# Flags (as /proc/cpuinfo spells them) that give onnxruntime fast INT8 dot products, best first.
INT8_DOT_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    arch: str

    @property
    def int8_dot(self) -> str | None:
        """The first fast INT8 dot-product flag this CPU has, or None."""
        return next((f for f in INT8_DOT_FLAGS if f in self.flags), None)

    @property
    def isa(self) -> str:
        """A short ISA summary for reports: the widest vector set plus the INT8 dot flag."""
        if self.arch not in ("x86_64", "AMD64"):
            return self.arch
        wide = next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in self.flags), "sse2")
        parts = [wide.upper().replace("AVX512F", "AVX-512")]
        if "fma" in self.flags:
            parts.append("FMA")
        parts += [f.upper().replace("_", "-") for f in INT8_DOT_FLAGS if f in self.flags]
        return " + ".join(parts)

    @property
    def key(self) -> str:
        """Identifies the CPU for cached measurements: model name + ISA flags that matter."""
        text = self.model + "|" + ",".join(sorted(self.flags & _KEY_FLAGS))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


_KEY_FLAGS = frozenset(
    {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16"}
)


def parse_cpuinfo(text: str, arch: str = "x86_64") -> CpuInfo:
    """The first processor block of a ``/proc/cpuinfo`` text."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return CpuInfo(model or platform.processor() or "unknown", flags, arch)


@cache
def cpu_info() -> CpuInfo:
    """This machine's CPU (cached for the process)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    return parse_cpuinfo(text, platform.machine())
