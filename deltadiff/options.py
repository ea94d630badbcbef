"""The one typed definition of the user-facing choices: backend, precision, execution mode.

Every consumer (CLIs, the Python API, the benchmark harness, ``open_backend``) reads these enums and
parses user text with :func:`parse`, so a choice is spelled and validated in exactly one place. They
are ``StrEnum``s: a member compares equal to its string, and JSON / manifests keep plain strings.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from deltadiff.errors import DeltaDiffError


class Backend(StrEnum):
    """Where the lean runtime runs a graph (``torch*`` are benchmark-only references)."""

    ONNXRUNTIME = "onnxruntime"
    ONNXRUNTIME_CUDA = "onnxruntime-cuda"
    TENSORRT = "tensorrt"
    TORCH = "torch"  # the PyTorch reference, eager FP32 (benchmarks / verify only)
    TORCH_AUTOCAST = "torch-autocast"  # the reference under autocast FP16 (benchmarks only)

    @property
    def is_torch(self) -> bool:
        return self in (Backend.TORCH, Backend.TORCH_AUTOCAST)


RUNTIME_BACKENDS = (Backend.ONNXRUNTIME, Backend.ONNXRUNTIME_CUDA, Backend.TENSORRT)


class Precision(StrEnum):
    """Numeric precision of a model's graphs (FP32 is the source of truth)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class Mode(StrEnum):
    """How the executor runs the four rows: one graph call per stage, or one unrolled graph."""

    STAGED = "staged"
    UNROLLED = "unrolled"


DEFAULT_MODE = Mode.STAGED


class GroupNormForm(StrEnum):
    """How an export writes GroupNorm (``export/lowering.py``)."""

    INSTANCE = "instance"  # Reshape + InstanceNormalization + Reshape + affine (faster on ORT CPU)
    NATIVE = "native"  # the opset-21 GroupNormalization op


E = TypeVar("E", bound=StrEnum)


def parse(kind: type[E], value: str | E, what: str | None = None) -> E:
    """``value`` as a member of ``kind``, or one line naming the bad value and the choices."""
    try:
        return kind(str(value).strip().lower())
    except ValueError:
        label = what or kind.__name__.lower()
        choices = ", ".join(m.value for m in kind)
        raise DeltaDiffError(f"unknown {label} {value!r}; choose one of {choices}") from None
