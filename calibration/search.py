"""Sensitivity search (Polygraphy's ``debug precision`` idea, done for this pipeline).

Units are (row, block): a block is one UNet block (``input_blocks.1``, ``middle_block.1``, ...,
from the Conv weight names; attention MatMuls belong to the block around them), a row is one
step-table row, because the rows have their own graphs and their own ranges.

1. Cost of each unit when it alone is quantized: its step graph is run teacher-forced on the
   FP32 state (one step, cheap) and the step-output MSE is scaled by the row's propagation
   gain (end-to-end MSE / step MSE with the whole row quantized, measured once per row), so
   costs of different rows are comparable as estimated end-to-end dB.
2. Greedy: units sorted by cost; keep the fewest most-costly units in FP32 such that the gate
   (with a margin) holds on the search images - a bisection over how many to keep.
The table of costs is printed and recorded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deltadiff.calibration.evaluate import Evaluator, Score
from deltadiff.calibration.qdq import quantizable_nodes, write

log = logging.getLogger(__name__)

Unit = tuple[int, str]  # (row t, block); block ROW = the whole row
ROW = "*"


def node_blocks(model: Any) -> dict[str, list[str]]:
    """block -> its quantizable nodes, in graph order. A Conv's block is read from its weight
    name (``...unet.<part>.<index>...``); a node without a named weight joins the block of the
    previous named node (the attention MatMuls of a Swin block)."""
    wanted = set(quantizable_nodes(model))
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, list[str]] = {}
    current = "stem"
    for n in model.graph.node:
        w = next((i for i in n.input[1:2] if i in inits and "." in i), None)
        if w is not None:
            parts = w.split(".")
            if "unet" in parts:
                parts = parts[parts.index("unet") + 1 :]
            keep = 2 if len(parts) > 2 and parts[1].isdigit() else 1
            current = ".".join(parts[:keep])
        if n.name in wanted:
            out.setdefault(current, []).append(n.name)
    return out


class PlanBuilder:
    """Writes (and caches) the per-row step graphs of an exclusion set."""

    def __init__(
        self,
        target: str,
        model: Any,
        ranges: dict[int, dict[str, tuple[float, float]]],
        blocks: dict[str, list[str]],
        fixed_exclude: set[str] | None = None,
    ) -> None:
        self.target, self.model, self.ranges, self.blocks = target, model, ranges, blocks
        self.fixed_exclude = fixed_exclude or set()
        self._cache: dict[tuple[int, frozenset[str]], bytes | None] = {}

    def nodes(self, t: int, excluded: set[Unit]) -> list[str]:
        if (t, ROW) in excluded:
            return []
        return [
            n
            for b, ns in self.blocks.items()
            if (t, b) not in excluded
            for n in ns
            if n not in self.fixed_exclude
        ]

    def graph(self, t: int, nodes: list[str]) -> bytes | None:
        key = (t, frozenset(nodes))
        if key not in self._cache:
            self._cache[key] = (
                write(self.target, self.model, self.ranges[t], nodes).SerializeToString()
                if nodes
                else None
            )
        return self._cache[key]

    def plan(self, rows: list[int], excluded: set[Unit]) -> dict[int, bytes | None]:
        return {t: self.graph(t, self.nodes(t, excluded)) for t in rows}

    def only(self, t: int, block: str) -> bytes | None:
        return self.graph(t, [n for n in self.blocks[block] if n not in self.fixed_exclude])


def _db(mse: float) -> float:
    return math.inf if mse <= 0 else 10 * math.log10(1.0 / mse)


@dataclass
class SearchResult:
    excluded: list[Unit]
    table: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    search_score: Score | None = None
    evaluations: int = 0
    trail: list[dict[str, Any]] = field(default_factory=list)


def sensitivity(
    ev: Evaluator,
    pb: PlanBuilder,
    rows: list[int],
    *,
    images: int = 2,
    refine: Callable[[Score], bool] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(unit table sorted by cost, per-row table). Coarse to fine: each row is first measured
    whole (end to end, quantized alone); a row for which ``refine(score)`` is true is split into
    its blocks (cost of each block alone), the others stay one unit (block ``*``)."""
    row_table, table = [], []
    for t in rows:
        full = pb.graph(t, pb.nodes(t, set()))
        if full is None:
            continue
        step = ev.step_mse(t, full, images)
        e2e_score = ev.score({t: full}, limit=images)
        e2e = 10 ** (-e2e_score.e2e_mean_db / 10)
        gain = e2e / step if step > 0 else 1.0
        split = refine is None or refine(e2e_score)
        row_table.append(
            {
                "row": t,
                "step_db": round(_db(step), 2),
                "e2e_db": round(e2e_score.e2e_mean_db, 2),
                "gain": round(gain, 3),
                "split_into_blocks": split,
                **(
                    {"psnr_y_hr_delta_db": round(e2e_score.hr_delta, 4)}
                    if e2e_score.hr_delta is not None
                    else {}
                ),
            }
        )
        log.info(
            "row t=%d quantized alone: step %.2f dB, end to end %s", t, _db(step), e2e_score.line()
        )
        if not split:
            n = len(pb.nodes(t, set()))
            table.append(
                {"row": t, "block": ROW, "nodes": n, "est_e2e_db": round(_db(e2e), 2), "_mse": e2e}
            )
            continue
        for b in pb.blocks:
            blob = pb.only(t, b)
            if blob is None:
                continue
            mse = ev.step_mse(t, blob, images) * gain
            table.append(
                {
                    "row": t,
                    "block": b,
                    "nodes": len(pb.blocks[b]),
                    "est_e2e_db": round(_db(mse), 2),
                    "_mse": mse,
                }
            )
            log.info("  t=%d %-18s alone: est. end to end %.2f dB", t, b, _db(mse))
    table.sort(key=lambda r: -r["_mse"])
    for r in table:
        r.pop("_mse")
    return table, row_table


def bisect_keep(
    n: int, check: Callable[[int], Score], ok: Callable[[Score], bool]
) -> tuple[int, Score]:
    """Smallest k in 0..n with ``ok(check(k))``, by bisection (k = how many of the most costly
    units stay in higher precision; the score is monotone enough in k for the usual choice)."""
    s0 = check(0)
    if ok(s0):
        return 0, s0
    lo, hi = 0, n
    best: tuple[int, Score] | None = None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        s = check(mid)
        if ok(s):
            hi, best = mid, (mid, s)
        else:
            lo = mid
    return best if best is not None else (n, check(n))


def greedy(
    ev: Evaluator,
    pb: PlanBuilder,
    rows: list[int],
    order: list[Unit],
    ok: Callable[[Score], bool],
    *,
    limit: int | None,
    trail: list[dict[str, Any]],
) -> tuple[int, Score]:
    """Fewest of ``order`` (most costly first) kept FP32 so that ``ok`` holds."""

    def check(k: int) -> Score:
        s = ev.score(pb.plan(rows, set(order[:k])), limit=limit)
        trail.append({"keep_fp32": k, "images": len(s.per_image_db), **s.to_dict()})
        log.info("keep %2d units in FP32: %s", k, s.line())
        return s

    return bisect_keep(len(order), check, ok)
