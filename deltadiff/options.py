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


class Int8Target(StrEnum):
    """The Q/DQ layout an INT8 graph is written for: ONNX Runtime's CPU provider (U8 activations,
    7-bit S8 weights) or TensorRT (symmetric S8 activations and weights)."""

    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class SearchUnit(StrEnum):
    """What the INT8 search keeps in FP32 or quantizes as one: a whole UNet block or one layer."""

    BLOCK = "block"
    LAYER = "layer"


class SearchRank(StrEnum):
    """How the INT8 search orders candidates: PSNR lost per MAC saved, or by cost alone."""

    PER_MAC = "per-mac"
    COST = "cost"


class RangeMethod(StrEnum):
    """How a calibration histogram becomes an INT8 range."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


class TritonEngine(StrEnum):
    """What runs the model inside a ``dd-export triton`` repository."""

    TENSORRT = "tensorrt"
    ONNXRUNTIME = "onnxruntime"
    PYTHON = "python"


# onnxruntime INT8 target: weight levels -64..64 (7 bits, so x86 CPUs without VNNI cannot
# saturate U8S8 products); QAT (model/qat.py) and the Q/DQ writer (calibration/qdq.py) share it.
ORT_WEIGHT_QMAX = 64


E = TypeVar("E", bound=StrEnum)


def parse(kind: type[E], value: str | E, what: str | None = None) -> E:
    """``value`` as a member of ``kind``, or one line naming the bad value and the choices."""
    try:
        return kind(str(value).strip().lower())
    except ValueError:
        label = what or kind.__name__.lower()
        choices = ", ".join(m.value for m in kind)
        raise DeltaDiffError(f"unknown {label} {value!r}; choose one of {choices}") from None


def parse_size(text: str, option: str = "--size") -> tuple[int, int]:
    """A size as every CLI takes it: ``WIDTHxHEIGHT`` (``640x480``: 640 wide, 480 high) or ``N``
    for an N x N square. Returns ``(height, width)``, the order arrays, tiles and manifests use
    inside; bad text is one line naming the option and the format."""
    words = str(text).strip().lower().split("x")
    try:
        values = [int(v) for v in words]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise DeltaDiffError(f"{option} {text!r}: give WIDTHxHEIGHT or N (a square), e.g. 640x480")
    w, h = values * 2 if len(values) == 1 else values
    if w <= 0 or h <= 0:
        raise DeltaDiffError(f"{option} {text!r}: width and height must be positive")
    return h, w


def format_size(hw: tuple[int, int] | list[int]) -> str:
    """``(height, width)`` as the CLIs print sizes: ``WIDTHxHEIGHT``."""
    return f"{hw[1]}x{hw[0]}"
