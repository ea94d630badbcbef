"""Sensitivity search (Polygraphy's ``debug precision`` idea, done for this pipeline).

Units are (row, block): a block is one UNet block (``input_blocks.1``, ``middle_block.1``, ...,
from the Conv weight names; attention MatMuls belong to the block around them) or, with
``units="layer"``, one layer of it (``output_blocks.3.0.skip_connection``); a row is one
step-table row, because the rows have their own graphs and their own ranges. For the latent
families the VQ-f4 encoder and decoder are two more "rows" (one graph each, blocks such as
``down.0.block.1`` / ``mid.attn_1``); their cost is their own output's MSE (encoder: the latent
state, decoder: the image from the FP32 latent) scaled by the same propagation gain.

1. Cost of each unit when it alone is quantized: its step graph is run teacher-forced on the
   FP32 state (one step, cheap) and the step-output MSE is scaled by the row's propagation
   gain (end-to-end MSE / step MSE with the whole row quantized, measured once per row), so
   costs of different rows are comparable as estimated end-to-end dB.
2. Greedy: units sorted by cost per MAC (``rank="per-mac"``, the default: the estimated
   end-to-end MSE a unit adds, divided by the multiply-accumulates it moves to INT8), or by cost
   alone (``rank="cost"``); keep the fewest units of that order in FP32 such that the gate (with
   a margin) holds on the search images - a bisection over how many to keep. Ranking by cost
   alone keeps the most damaging units FP32 whatever their size: on the demo model it kept the
   whole t = 0 row (a quarter of all MACs, at 48 dB) ahead of small blocks. Ranking per MAC is
   the knapsack heuristic for "most INT8 compute for the quality budget"; MACs stand in for the
   time a unit saves (the Q/DQ overhead around it is not modelled).
The table of costs (with each unit's MAC share) is printed and recorded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deltadiff.calibration.evaluate import Evaluator, Score
from deltadiff.calibration.qdq import quantizable_nodes, write
from deltadiff.options import SearchRank, SearchUnit, parse

log = logging.getLogger(__name__)

Key = int | str  # a step-table row t, or a stage ("encoder", "decoder")
Unit = tuple[Key, str]  # (row t or stage, block); block ROW = the whole row / stage
ROW = "*"


def _block_of(weight: str) -> str:
    """A weight name's block: ``input_blocks.1`` (UNet), ``down.0.block.1`` / ``mid.attn_1`` /
    ``conv_in`` (VQ-f4 encoder / decoder)."""
    parts = weight.split(".")
    if "vq" in parts:
        parts = parts[parts.index("vq") + 1 :]
        if parts and parts[0] in ("encoder", "decoder"):
            parts = parts[1:]
        if parts and parts[0] in ("down", "up"):
            return ".".join(parts[: 4 if len(parts) > 4 and parts[2] == "block" else 3])
        return ".".join(parts[: 2 if parts and parts[0] == "mid" else 1])
    if "unet" in parts:
        parts = parts[parts.index("unet") + 1 :]
    keep = 2 if len(parts) > 2 and parts[1].isdigit() else 1
    return ".".join(parts[:keep])


def _layer_of(weight: str) -> str:
    """A weight name's layer: the module that owns it (``output_blocks.3.0.skip_connection``)."""
    parts = weight.split(".")
    for root in ("unet", "vq"):
        if root in parts:
            parts = parts[parts.index(root) + 1 :]
            break
    return ".".join(parts[:-1]) or weight


def node_blocks(
    model: Any, wanted: set[str] | None = None, units: str = SearchUnit.BLOCK
) -> dict[str, list[str]]:
    """unit -> its quantizable nodes (``wanted``, default every Conv / MatMul), in graph order.
    ``units="block"``: a UNet block (``input_blocks.1``); ``"layer"``: the module owning the
    weight (``output_blocks.3.0.skip_connection``), so a block whose error comes from one cheap
    layer (a ResBlock's 1x1 skip conv adds unnormalised features straight to its output) is not
    kept FP32 whole. The unit is read from a node's weight name; a node without a named weight
    joins the unit of the previous named node (the attention MatMuls of a Swin block)."""
    by_layer = parse(SearchUnit, units, "--units") is SearchUnit.LAYER
    unit_of = _layer_of if by_layer else _block_of
    wanted = set(quantizable_nodes(model)) if wanted is None else wanted
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, list[str]] = {}
    current = "stem"
    for n in model.graph.node:
        w = next((i for i in n.input[1:2] if i in inits and "." in i), None)
        if w is not None:
            current = unit_of(w)
        if n.name in wanted:
            out.setdefault(current, []).append(n.name)
    return out


@dataclass(frozen=True)
class Stage:
    """A graph quantized once for all rows (the VQ-f4 encoder / decoder): its model, ranges
    and blocks. Plan keys: the row t (int) for the step graph, the stage name for these."""

    model: Any
    ranges: dict[str, tuple[float, float]]
    blocks: dict[str, list[str]]


class PlanBuilder:
    """Writes (and caches) the graphs of an exclusion set: one step graph per row, and the
    encoder / decoder graphs where ``stages`` has them."""

    def __init__(
        self,
        target: str,
        model: Any,
        ranges: dict[int, dict[str, tuple[float, float]]],
        blocks: dict[str, list[str]],
        fixed_exclude: set[str] | None = None,
        stages: dict[str, Stage] | None = None,
        lr_units: tuple[int, int] = (1, 1),
    ) -> None:
        self.target, self.model, self.ranges, self.blocks = target, model, ranges, blocks
        self.fixed_exclude = fixed_exclude or set()
        self.stages = stages or {}
        self.lr_units = lr_units  # the tile in LR multiples: MACs are counted at this size
        self._cache: dict[tuple[Key, frozenset[str]], bytes | None] = {}
        self._macs: dict[str, dict[str, int]] = {}

    def node_macs(self, t: Key) -> dict[str, int]:
        """MACs per quantizable node of the graph of ``t`` (0 where shapes are unknown: the
        attention MatMuls of a dynamic-shape graph)."""
        g = t if isinstance(t, str) else "step"
        if g not in self._macs:
            from deltadiff.export.flops import node_macs

            model = self.stages[t].model if isinstance(t, str) else self.model
            counted = node_macs(model, lr_units=self.lr_units)
            self._macs[g] = {k: v or 0 for k, v in counted.items()}
        return self._macs[g]

    def macs(self, t: Key, nodes: list[str]) -> int:
        per = self.node_macs(t)
        return sum(per.get(n, 0) for n in nodes)

    def mac_share(self, t: Key, nodes: list[str]) -> float:
        """The fraction of the graph's counted MACs that ``nodes`` carry (0 if none counted)."""
        total = sum(self.node_macs(t).values())
        return self.macs(t, nodes) / total if total else 0.0

    def _fixed(self, t: Key) -> set[str]:
        # node names repeat across graphs: TensorRT-rejected nodes are recorded as "stage:node"
        if isinstance(t, str):
            return {n.split(":", 1)[1] for n in self.fixed_exclude if n.startswith(f"{t}:")}
        return {n for n in self.fixed_exclude if ":" not in n}

    def blocks_of(self, t: Key) -> dict[str, list[str]]:
        return self.stages[t].blocks if isinstance(t, str) else self.blocks

    def nodes(self, t: Key, excluded: set[Unit]) -> list[str]:
        if (t, ROW) in excluded:
            return []
        fixed = self._fixed(t)
        return [
            n
            for b, ns in self.blocks_of(t).items()
            if (t, b) not in excluded
            for n in ns
            if n not in fixed
        ]

    def graph(self, t: Key, nodes: list[str]) -> bytes | None:
        key = (t, frozenset(nodes))
        if key not in self._cache:
            if isinstance(t, str):
                model, ranges = self.stages[t].model, self.stages[t].ranges
            else:
                model, ranges = self.model, self.ranges[t]
            self._cache[key] = (
                write(self.target, model, ranges, nodes).SerializeToString() if nodes else None
            )
        return self._cache[key]

    def plan(self, rows: list[Key], excluded: set[Unit]) -> dict[Key, bytes | None]:
        return {t: self.graph(t, self.nodes(t, excluded)) for t in rows}

    def only(self, t: Key, block: str) -> bytes | None:
        fixed = self._fixed(t)
        return self.graph(t, [n for n in self.blocks_of(t)[block] if n not in fixed])


def _db(mse: float) -> float:
    return math.inf if mse <= 0 else 10 * math.log10(1.0 / mse)


def _unit(pb: PlanBuilder, t: Key, block: str, nodes: list[str], mse: float) -> dict[str, Any]:
    return {
        "row": t,
        "block": block,
        "nodes": len(nodes),
        "est_e2e_db": round(_db(mse), 2),
        "mac_share": round(pb.mac_share(t, nodes), 4),
        "_mse": mse,
        "_macs": pb.macs(t, nodes),
    }


def sensitivity(
    ev: Evaluator,
    pb: PlanBuilder,
    rows: list[Key],
    *,
    images: int = 2,
    refine: Callable[[Score], bool] | None = None,
    rank: str = SearchRank.PER_MAC,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(unit table sorted by ``rank``, most costly first; per-row table). Coarse to fine: each
    row is first measured whole (end to end, quantized alone); a row for which
    ``refine(score)`` is true is split into its blocks (cost of each block alone), the others
    stay one unit (block ``*``). Each unit records its MACs and share of the graph's MACs.
    ``rank`` is a ``SearchRank`` (``calibrate`` checks the option before its data pass)."""
    rank = parse(SearchRank, rank, "--rank")
    row_table, table = [], []
    for t in rows:
        full = pb.graph(t, pb.nodes(t, set()))
        if full is None:
            continue
        step = ev.stage_mse(t, full, images)
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
            "row t=%s quantized alone: step %.2f dB, end to end %s", t, _db(step), e2e_score.line()
        )
        if not split:
            table.append(_unit(pb, t, ROW, pb.nodes(t, set()), e2e))
            continue
        for b in pb.blocks_of(t):
            blob = pb.only(t, b)
            if blob is None:
                continue
            mse = ev.stage_mse(t, blob, images) * gain
            table.append(_unit(pb, t, b, pb.blocks_of(t)[b], mse))
            log.info("  t=%s %-18s alone: est. end to end %.2f dB", t, b, _db(mse))
    if rank is SearchRank.COST:
        table.sort(key=lambda r: -r["_mse"])
    else:  # a unit without counted MACs saves no time in INT8: it goes first (kept FP32)
        table.sort(key=lambda r: (-r["_mse"] / r["_macs"]) if r["_macs"] else -math.inf)
    for r in table:
        r.pop("_mse")
        r.pop("_macs")
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
    rows: list[Key],
    order: list[Unit],
    ok: Callable[[Score], bool],
    *,
    limit: int | None,
    trail: list[dict[str, Any]],
    fixed: list[Unit] | None = None,
) -> tuple[int, Score]:
    """Fewest of ``order`` (most costly first) kept FP32, on top of ``fixed``, so that ``ok``
    holds."""

    def check(k: int) -> Score:
        s = ev.score(pb.plan(rows, {*(fixed or []), *order[:k]}), limit=limit)
        n = len(fixed or []) + k
        trail.append({"keep_fp32": n, "images": len(s.per_image_db), **s.to_dict()})
        log.info("keep %2d units in FP32: %s", n, s.line())
        return s

    return bisect_keep(len(order), check, ok)
