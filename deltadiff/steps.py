"""The step table: the one typed home of the rows every backend executes, and of the noise names.

    x_T     = y + s_prior * n_prior
    for row in table.rows:                      # t = T-1 .. 0
        x0  = UNet(concat[row.in_scale * x, cond], row.t)
        x   = row.a * x + row.b * x0 + row.c * y + row.s * n_<t>
    result  = x

``deltadiff.model.schedule`` computes a table from a schedule; the manifest stores it
(``StepTable.to_dict``) and the runtime reads it back (``StepTable.from_dict``). Nothing else spells a
row field or a noise name. numpy + stdlib only (the lean runtime imports this).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

PRIOR_NOISE = "n_prior"
ROW_FIELDS = ("t", "in_scale", "a", "b", "c", "s")


def noise_name(t: int) -> str:
    """The name of the noise input row ``t`` consumes."""
    return f"n_{int(t)}"


@dataclass(frozen=True)
class StepRow:
    """One UNet call: x_{t-1} = a*x_t + b*UNet(cat[in_scale*x_t, cond], t) + c*y + s*n_t."""

    t: int
    in_scale: float
    a: float
    b: float
    c: float
    s: float

    @property
    def noise(self) -> str | None:
        """The noise input this row adds, or None for a noiseless row."""
        return noise_name(self.t) if self.s != 0.0 else None

    @property
    def stage(self) -> str:
        """The row's stage name in timings and traces (``step_<t>``)."""
        return f"step_{self.t}"

    def coef(self) -> np.ndarray:
        """The step graph's ``coef`` input: [in_scale, a, b, c, s] float32."""
        return np.array([self.in_scale, self.a, self.b, self.c, self.s], dtype=np.float32)

    def t_input(self, batch: int = 1) -> np.ndarray:
        """The step graph's ``t`` input (int64)."""
        return np.full((batch,), self.t, dtype=np.int64)


@dataclass(frozen=True)
class StepTable:
    rule: str
    eta: tuple[float, ...]  # the family's eta (index t = 0..T-1)
    s_prior: float
    rows: tuple[StepRow, ...]  # in execution order, t = T-1 .. 0

    @property
    def noisy(self) -> bool:
        return self.s_prior != 0.0 or any(r.s != 0.0 for r in self.rows)

    def noise_names(self) -> list[str]:
        """Names of the noise inputs the table consumes, in draw order (prior first)."""
        if not self.noisy:
            return []
        return [PRIOR_NOISE] + [r.noise for r in self.rows if r.noise is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "eta": list(self.eta),
            "s_prior": self.s_prior,
            "rows": [asdict(r) for r in self.rows],
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> StepTable:
        """Parse a stored table; raises KeyError / TypeError / ValueError on a malformed one."""
        return StepTable(
            rule=str(d["rule"]),
            eta=tuple(float(x) for x in d.get("eta", ())),
            s_prior=float(d["s_prior"]),
            rows=tuple(
                StepRow(int(r["t"]), *(float(r[k]) for k in ROW_FIELDS[1:])) for r in d["rows"]
            ),
        )
