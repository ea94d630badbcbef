"""Latency statistics of one stage or of end to end (mean, median, percentiles, CoV)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

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
