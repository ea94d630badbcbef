"""``dd-export fp16 --auto-islands``: find the FP32 islands of the FP16 step graph by measurement.

The same machinery as the INT8 search, with FP16 as the lower precision: units are the step
graph's op types (``op:Conv``, ``op:GroupNormalization``, ...) plus the structural walks of
the hand-written list (``timestep-sinusoids``, ``state-update``); each unit's cost is the
end-to-end PSNR vs FP32 when it alone runs in FP16; then the fewest most-costly units stay FP32
such that the FP16 chain is >= the gate (40 dB, like ``verify``) with a margin. The result is
compared with the hand-written ``fp16_islands.json`` on the same tiles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deltadiff.calibration.data import Image
from deltadiff.calibration.evaluate import Evaluator, Score
from deltadiff.calibration.search import bisect_keep
from deltadiff.export.fp16 import IslandRule, convert_to_fp16, load_rules
from deltadiff.manifest import load_manifest, verify_graph

log = logging.getLogger(__name__)

MIN_FP16_DB = 40.0
NON_FLOAT_OPS = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Reshape", "Concat", "Split", "Cast"}


@dataclass
class IslandResult:
    rules: list[IslandRule]
    table: list[dict[str, Any]]
    auto: Score
    hand: Score
    auto_fp32_nodes: int
    hand_fp32_nodes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "auto_islands": [r.name for r in self.rules],
            "auto": {**self.auto.to_dict(), "fp32_nodes": self.auto_fp32_nodes},
            "hand": {**self.hand.to_dict(), "fp32_nodes": self.hand_fp32_nodes},
            "sensitivity": self.table,
        }


def units(model: Any) -> list[IslandRule]:
    ops = sorted({n.op_type for n in model.graph.node} - NON_FLOAT_OPS)
    walks = [r for r in load_rules() if (r.from_input or r.to_output) and r.graph in (None, "step")]
    return [IslandRule(name=f"op:{o}", op_types=(o,)) for o in ops] + walks


def _score(ev: Evaluator, plan: dict[int, bytes]) -> Score:
    """A graph onnxruntime cannot load or run (no FP16 kernel) scores -inf."""
    try:
        return ev.score(plan)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own error types
        log.info("FP16 graph does not run on onnxruntime: %s", str(exc).splitlines()[0][:120])
        return Score(-np.inf, -np.inf, per_image_db=[-np.inf])


def _fp32_nodes(counts: dict[str, int]) -> int:
    return sum(counts.values())


def auto_islands(
    model_dir: str | Path,
    *,
    tiles: int = 2,
    seed: int = 0,
    threads: int = 0,
    min_db: float = MIN_FP16_DB,
    margin_db: float = 3.0,
) -> IslandResult:
    import onnx

    model_dir = Path(model_dir)
    m = load_manifest(model_dir)
    step = onnx.load(str(verify_graph(model_dir, m.graph("step"), what="graph step")))
    rng = np.random.default_rng(seed)
    imgs = [Image(f"random-{i}", rng.random((3, *m.tile), dtype=np.float32)) for i in range(tiles)]
    ev = Evaluator(model_dir, m, imgs, threads=threads)
    rows = [r.t for r in m.step_table.rows]
    us = units(step)

    def plan(rules: list[IslandRule]) -> tuple[dict[int, bytes], int]:
        fp16, counts = convert_to_fp16(step, "step", rules)
        blob = fp16.SerializeToString()
        return {t: blob for t in rows}, _fp32_nodes(counts)

    table = []
    for u in us:
        p, _ = plan([x for x in us if x is not u])  # u alone in FP16
        s = _score(ev, p)
        table.append({"unit": u.name, "e2e_db_alone_fp16": round(s.e2e_min_db, 2)})
        log.info("FP16 %-28s alone: end to end %.2f dB", u.name, s.e2e_min_db)
    order_idx = sorted(range(len(us)), key=lambda i: table[i]["e2e_db_alone_fp16"])
    order = [us[i] for i in order_idx]

    def check(k: int) -> Score:
        return _score(ev, plan(order[:k])[0])

    k, auto = bisect_keep(len(order), check, lambda s: s.e2e_min_db >= min_db + margin_db)
    rules = order[:k]
    _, auto_nodes = plan(rules)
    hand_plan, hand_nodes = plan(load_rules())
    hand = _score(ev, hand_plan)
    return IslandResult(rules, table, auto, hand, auto_nodes, hand_nodes)
