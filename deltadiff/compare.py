"""One way to compare outputs (numpy only): ``compare(ref, out, atol) -> CompareResult``.

Used by the golden checker, ``dd-export verify``, the FP16 policy check and the benchmarks.
Arrays are cast to float64 first; NaN/Inf in the output fail; the result records the tolerance
that would have passed (the max-abs error itself).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from deltadiff.errors import VerificationError


@dataclass(frozen=True)
class CompareResult:
    name: str
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    psnr: float  # dB, against data_range (inf when identical)
    atol: float | None
    min_psnr: float | None
    finite: bool
    shape: tuple[int, ...]

    @property
    def passed(self) -> bool:
        if not self.finite:
            return False
        if self.atol is not None and not self.max_abs <= self.atol:
            return False
        return not (self.min_psnr is not None and not self.psnr >= self.min_psnr)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["psnr"] = None if math.isinf(self.psnr) else self.psnr
        d["shape"] = list(self.shape)
        return d

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        tol = []
        if self.atol is not None:
            tol.append(f"atol {self.atol:.1e}")
        if self.min_psnr is not None:
            tol.append(f"min {self.min_psnr:.0f} dB")
        psnr = "inf" if math.isinf(self.psnr) else f"{self.psnr:.1f}"
        extra = "" if self.finite else "  NON-FINITE VALUES"
        return (
            f"{verdict}  {self.name:<44} max_abs {self.max_abs:.2e}  PSNR {psnr:>6} dB"
            f"  ({', '.join(tol) or 'no tolerance'}){extra}"
        )


def psnr(ref: np.ndarray, out: np.ndarray, data_range: float | None = None) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    mse = float(np.mean((ref - out) ** 2))
    if data_range is None:
        data_range = float(ref.max() - ref.min()) or 1.0
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def compare(
    ref: np.ndarray,
    out: np.ndarray,
    *,
    name: str = "output",
    atol: float | None = None,
    min_psnr: float | None = None,
    data_range: float | None = None,
) -> CompareResult:
    """Compare ``out`` with ``ref`` (same shape). ``data_range`` for PSNR defaults to ref's range."""
    r = np.asarray(ref, dtype=np.float64)
    o = np.asarray(out, dtype=np.float64)
    if r.shape != o.shape:
        raise VerificationError(
            f"{name}: output shape {o.shape} does not match the reference {r.shape}"
        )
    finite = bool(np.isfinite(o).all())
    if not finite or r.size == 0:
        nan = math.nan
        return CompareResult(name, nan, nan, nan, nan, -math.inf, atol, min_psnr, finite, r.shape)
    d = np.abs(r - o)
    rel = d / np.maximum(np.abs(r), 1e-6)
    return CompareResult(
        name=name,
        max_abs=float(d.max()),
        mean_abs=float(d.mean()),
        p99_abs=float(np.quantile(d, 0.99)),
        max_rel=float(rel.max()),
        psnr=psnr(r, o, data_range),
        atol=atol,
        min_psnr=min_psnr,
        finite=finite,
        shape=tuple(r.shape),
    )


def compare_equal(ref: np.ndarray, out: np.ndarray, *, name: str) -> CompareResult:
    """Exact comparison (integer outputs such as codebook indices): max_abs must be 0."""
    return compare(ref, out, name=name, atol=0.0)
