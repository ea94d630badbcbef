"""Benchmark options, the case-level constants, and the error a case raises when it cannot run here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltadiff.errors import DeltaDiffError
from deltadiff.options import Backend, Mode, Precision, parse
from deltadiff.runtime.backends import RuntimeBackend

SCHEMA_VERSION = 1
EAGER = "eager"  # the torch backends' only mode
DEFAULT_COV_WARN = 0.10
# graphs each mode runs
MODE_GRAPHS = {Mode.STAGED: ("encoder", "step", "decoder"), Mode.UNROLLED: ("unrolled",)}
GRAPH_ORDER = {"encoder": 0, "step": 1, "decoder": 2, "unrolled": 3}

WrapBackend = Callable[[RuntimeBackend], RuntimeBackend]
Progress = Callable[[str], None]


class CaseUnavailableError(DeltaDiffError):
    """A case cannot run on this machine / install; the message says why."""


# ---------------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class BenchOptions:
    models: tuple[Path, ...]
    backends: tuple[Backend, ...] = (Backend.ONNXRUNTIME,)
    precisions: tuple[Precision, ...] = (Precision.FP32,)
    modes: tuple[Mode, ...] = (Mode.STAGED,)
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
    lr: tuple[int, int] | None = None  # LR (h, w) per call; None: each model's tile

    def __post_init__(self) -> None:
        """Parse backend / precision / mode text into the typed options (one line if unknown)."""
        for name, kind in (("backends", Backend), ("precisions", Precision), ("modes", Mode)):
            object.__setattr__(self, name, tuple(parse(kind, v) for v in getattr(self, name)))

    def check(self) -> None:
        """Raise DeltaDiffError naming the first bad option."""
        if not self.models:
            raise DeltaDiffError("no model directories to benchmark; pass --model DIR")
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
        if self.lr is not None and (len(self.lr) != 2 or min(self.lr) < 1):
            raise DeltaDiffError(f"--lr {self.lr}: give the LR size as HxW, e.g. --lr 128x128")
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
            "lr": list(self.lr) if self.lr else None,
            "label": self.label,
            "compare": str(self.compare) if self.compare else None,
            "fail_on_regression": self.fail_on_regression,
            "regression_floor": self.regression_floor,
            "regression_k": self.regression_k,
            "reference": self.reference,
            "peak": self.peak,
        }
