"""Schedule -> step table (docs/design.md "The pipeline and the step table"). numpy, no torch.

The step table is the whole difference between the families. Every backend executes

    x_3     = y + s_prior * n_prior
    for row in table.rows:                      # t = 3, 2, 1, 0
        x0  = UNet(concat[row.in_scale * x, cond], row.t)
        x   = row.a * x + row.b * x0 + row.c * y + row.s * n_row
    result  = x

and never re-derives a coefficient.
"""

from __future__ import annotations

import math

import numpy as np

from deltadiff.errors import ConfigError
from deltadiff.model.config import ModelConfig, ScheduleConfig
from deltadiff.steps import StepRow, StepTable

__all__ = ["StepRow", "StepTable", "etas", "make_step_table", "sqrt_etas", "step_table"]


def sqrt_etas(s: ScheduleConfig) -> np.ndarray:
    """The exponential generator of the DeltaDiff and ResShift repositories, float64."""
    T = s.steps
    if T < 2:
        raise ConfigError(f"schedule needs at least 2 steps, got {T}")
    start = min(s.min_noise_level / s.kappa, s.min_noise_level)
    increaser = math.exp(math.log(s.etas_end / start) / (T - 1))
    power_ts = (np.arange(T, dtype=np.float64) / (T - 1)) ** s.power * (T - 1)
    return start * increaser**power_ts


def etas(s: ScheduleConfig) -> np.ndarray:
    se = sqrt_etas(s)
    return se**2 if s.squared else se


def make_step_table(schedule: ScheduleConfig, rule: str) -> StepTable:
    """Build the step table for one rule."""
    eta = etas(schedule)
    kappa = schedule.kappa
    T = len(eta)
    eta_prev = np.concatenate([[0.0], eta[:-1]])  # eta[-1] := 0
    in_scale = 1.0 / np.sqrt(kappa**2 * eta + 1.0)
    rows = []
    s_prior = 0.0
    for t in range(T - 1, -1, -1):
        a = eta_prev[t] / eta[t]
        if rule == "posterior":
            ra, rb, rc, rs = a, 1.0 - a, 0.0, 0.0
        elif rule == "x0":
            ra, rb, rc, rs = 0.0, 1.0, 0.0, 0.0
        elif rule == "pixel-renoise":
            ra, rb, rc, rs = 0.0, 1.0 - eta_prev[t], eta_prev[t], 0.0
            if t == 0:
                rb, rc = 1.0, 0.0
        elif rule == "posterior-noise":
            ra, rb, rc = a, 1.0 - a, 0.0
            # posterior variance kappa^2 * eta_{t-1}/eta_t * (eta_t - eta_{t-1}); ResShift clips
            # the log-variance table as log([var_1, var_1, var_2, var_3]) and adds no noise at t=0.
            var = kappa**2 * eta_prev / eta * (eta - eta_prev)
            var_clipped = np.concatenate([[var[1]], var[1:]])
            rs = float(np.exp(0.5 * np.log(var_clipped[t]))) if t != 0 else 0.0
            s_prior = kappa * float(np.sqrt(eta[-1]))
        else:
            raise ConfigError(f"unknown step rule {rule!r}")
        rows.append(
            StepRow(
                t=t, in_scale=float(in_scale[t]), a=float(ra), b=float(rb), c=float(rc), s=float(rs)
            )
        )
    return StepTable(rule=rule, eta=tuple(float(e) for e in eta), s_prior=s_prior, rows=tuple(rows))


def step_table(cfg: ModelConfig) -> StepTable:
    return make_step_table(cfg.schedule, cfg.step_rule)
