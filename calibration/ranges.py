"""Activation statistics per row (timestep-aware) and the range methods computed from them.

One data pass collects, for every activation that a quantizable node (Conv / MatMul / Gemm)
reads or writes, at every row of the step table: min, max and a histogram of |x| over
[0, max|x|] (``BINS`` bins, a second pass over the same feeds once the range is known). Every
range method is then a function of these statistics, so the JSON cache of them lets a re-run
with another method, target or exclusion list skip the data pass entirely:

    minmax      [min, max]
    percentile  |x| clipped at its 99.99th percentile
    entropy     TensorRT's KL-divergence threshold (128 levels)
    mse         the clip threshold minimising the expected 8-bit quantisation MSE
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deltadiff.atomic import write_text_atomic
from deltadiff.errors import DeltaDiffError
from deltadiff.options import RangeMethod, parse

log = logging.getLogger(__name__)

BINS = 2048
PERCENTILE = 99.99
CACHE_VERSION = 1
QUANT_OPS = ("Conv", "MatMul", "Gemm")


class CacheError(DeltaDiffError):
    """A ranges cache is unreadable or belongs to another model."""


@dataclass
class TensorStats:
    lo: float
    hi: float
    hist: np.ndarray  # |x| counts over [0, amax], BINS bins (int64)

    @property
    def amax(self) -> float:
        return max(abs(self.lo), abs(self.hi))


# ---------------------------------------------------------------------------------------------
# collection


def activation_tensors(model: Any, op_types: Iterable[str] = QUANT_OPS) -> list[str]:
    """Float activations (not initializers) read or written by the quantizable nodes."""
    inits = {i.name for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    names: list[str] = []
    for n in model.graph.node:
        if n.op_type not in op_types:
            continue
        for t in list(n.input[:2]) + list(n.output[:1]):
            if t and t not in inits and t not in consts and t not in names:
                names.append(t)
    return names


def collect(
    model: Any,
    feeds_by_row: dict[int, list[dict[str, np.ndarray]]],
    *,
    threads: int = 0,
    on_feed: Callable[[], None] | None = None,
) -> dict[str, dict[int, TensorStats]]:
    """Two passes over the feeds (min/max, then |x| histograms) -> tensor -> row -> stats.

    ``on_feed`` is called once per model run (tests count the data passes with it).
    """
    import onnx
    import onnxruntime as ort

    names = activation_tensors(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t in names:
        if t not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    # no graph fusions: the captured tensors must be the exported graph's own tensors
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    in_names = {i.name for i in sess.get_inputs()}

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if on_feed:
            on_feed()
        outs = sess.run(names, {k: v for k, v in feeds.items() if k in in_names})
        return dict(zip(names, outs, strict=True))

    lo: dict[str, dict[int, float]] = {t: {} for t in names}
    hi: dict[str, dict[int, float]] = {t: {} for t in names}
    for row, feeds in feeds_by_row.items():
        for f in feeds:
            for t, a in run(f).items():
                lo[t][row] = min(lo[t].get(row, np.inf), float(a.min()))
                hi[t][row] = max(hi[t].get(row, -np.inf), float(a.max()))
    hist: dict[str, dict[int, np.ndarray]] = {t: {} for t in names}
    for row, feeds in feeds_by_row.items():
        for f in feeds:
            for t, a in run(f).items():
                amax = max(abs(lo[t][row]), abs(hi[t][row])) or 1e-12
                h, _ = np.histogram(np.abs(a), bins=BINS, range=(0.0, amax))
                hist[t][row] = hist[t].get(row, 0) + h.astype(np.int64)
    return {
        t: {r: TensorStats(lo[t][r], hi[t][r], hist[t][r]) for r in feeds_by_row} for t in names
    }


# ---------------------------------------------------------------------------------------------
# methods


def _threshold_percentile(s: TensorStats, pct: float = PERCENTILE) -> float:
    cdf = np.cumsum(s.hist) / max(1, int(s.hist.sum()))
    i = int(np.searchsorted(cdf, pct / 100.0))
    return s.amax * min(BINS, i + 1) / BINS


def _threshold_entropy(s: TensorStats, levels: int = 128, stride: int = 8) -> float:
    """TensorRT's entropy calibration: the |x| clip minimising KL(P || Q) over 128 levels."""
    hist = s.hist.astype(np.float64)
    if hist.sum() == 0:
        return s.amax
    best, best_i = np.inf, BINS
    for i in range(levels, BINS + 1, stride):
        sliced = hist[:i]
        p = sliced.copy()
        p[i - 1] += hist[i:].sum()
        # quantise the i bins into `levels` groups; spread each group's mass over its non-empty bins
        edges = np.linspace(0, i, levels + 1).astype(int)
        nonzero = (sliced > 0).astype(np.float64)
        sums = np.add.reduceat(sliced, edges[:-1])
        counts = np.add.reduceat(nonzero, edges[:-1])
        per = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
        q = nonzero * np.repeat(per, np.diff(edges))
        nz = p > 0
        pn = p[nz] / p.sum()
        qn = np.maximum(q[nz] / max(q.sum(), 1e-30), 1e-12)
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best:
            best, best_i = kl, i
    return s.amax * best_i / BINS


def _threshold_mse(s: TensorStats, levels: int = 127) -> float:
    """Clip threshold T minimising clip error + uniform rounding error (step T/levels)."""
    hist = s.hist.astype(np.float64)
    centers = (np.arange(BINS) + 0.5) * s.amax / BINS
    total = hist.sum()
    if total == 0:
        return s.amax
    # suffix sums for the clipping error sum_{x > T} (x - T)^2 = S2 - 2 T S1 + T^2 S0
    s0 = np.cumsum(hist[::-1])[::-1]
    s1 = np.cumsum((hist * centers)[::-1])[::-1]
    s2 = np.cumsum((hist * centers**2)[::-1])[::-1]
    ts = (np.arange(1, BINS + 1)) * s.amax / BINS
    nxt = np.append(s0[1:], 0.0), np.append(s1[1:], 0.0), np.append(s2[1:], 0.0)
    clip = nxt[2] - 2 * ts * nxt[1] + ts**2 * nxt[0]
    step = ts / levels
    rnd = (total - nxt[0]) * step**2 / 12.0
    return float(ts[int(np.argmin(clip + rnd))])


THRESHOLDS: dict[RangeMethod, Callable[[TensorStats], float]] = {
    RangeMethod.PERCENTILE: _threshold_percentile,
    RangeMethod.ENTROPY: _threshold_entropy,
    RangeMethod.MSE: _threshold_mse,
}  # |x| clip of each clipped method (minmax: none)


def tensor_range(s: TensorStats, method: str) -> tuple[float, float]:
    """(lo, hi) for one tensor at one row; clipped methods clip |x| symmetrically."""
    method = parse(RangeMethod, method, "--method")
    if method is RangeMethod.MINMAX:
        return min(s.lo, 0.0), max(s.hi, 0.0)
    t = THRESHOLDS[method](s)
    return max(min(s.lo, 0.0), -t), min(max(s.hi, 0.0), t)


def row_ranges(
    stats: dict[str, dict[int, TensorStats]], method: str, row: int | None
) -> dict[str, tuple[float, float]]:
    """Ranges for one row's graph, or (row None) one set shared by all rows (union of min/max;
    histogram methods on the summed, re-binned histograms)."""
    out = {}
    for t, per_row in stats.items():
        if row is not None:
            out[t] = tensor_range(per_row[row], method)
            continue
        amax = max(s.amax for s in per_row.values()) or 1e-12
        merged = np.zeros(BINS, np.int64)
        for s in per_row.values():  # re-bin each row's histogram onto the common range
            centers = (np.arange(BINS) + 0.5) * s.amax / BINS
            idx = np.minimum((centers / amax * BINS).astype(int), BINS - 1)
            np.add.at(merged, idx, s.hist)
        lo = min(s.lo for s in per_row.values())
        hi = max(s.hi for s in per_row.values())
        out[t] = tensor_range(TensorStats(lo, hi, merged), method)
    return out


def spread_table(stats: dict[str, dict[int, TensorStats]]) -> list[dict[str, Any]]:
    """Per tensor: max|x| at each row and the ratio largest / smallest (the per-row spread)."""
    rows = []
    for t, per_row in stats.items():
        am = {r: s.amax for r, s in per_row.items()}
        lo = min(am.values())
        rows.append(
            {
                "tensor": t,
                "amax": {str(r): round(v, 4) for r, v in sorted(am.items(), reverse=True)},
                "spread": round(max(am.values()) / lo, 2) if lo > 0 else None,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# cache


def _dump(stats: dict[str, dict[int, TensorStats]]) -> dict[str, Any]:
    return {
        t: {str(r): {"lo": s.lo, "hi": s.hi, "hist": s.hist.tolist()} for r, s in per_row.items()}
        for t, per_row in stats.items()
    }


def _parse(tensors: dict[str, Any]) -> dict[str, dict[int, TensorStats]]:
    return {
        t: {
            int(r): TensorStats(float(v["lo"]), float(v["hi"]), np.asarray(v["hist"], np.int64))
            for r, v in per_row.items()
        }
        for t, per_row in tensors.items()
    }


def save_cache(
    path: Path,
    graph_sha256: str,
    stats: dict[str, dict[int, TensorStats]],
    *,
    stages: dict[str, tuple[str, dict[str, dict[int, TensorStats]]]] | None = None,
    **meta: Any,
) -> None:
    """``stages``: name -> (graph sha256, stats) of the graphs quantized once for all rows
    (the VQ-f4 encoder / decoder; their single set of statistics is row 0)."""
    data = {
        "kind": "deltadiff-int8-ranges",
        "version": CACHE_VERSION,
        "graph_sha256": graph_sha256,
        "bins": BINS,
        **meta,
        "stages": {
            name: {"graph_sha256": sha, "tensors": _dump(st)}
            for name, (sha, st) in (stages or {}).items()
        },
        "tensors": _dump(stats),
    }
    write_text_atomic(path, json.dumps(data, separators=(",", ":")) + "\n")


def load_cache(path: Path, graph_sha256: str) -> tuple[dict[str, dict[int, TensorStats]], dict]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(
            f"ranges cache {path} is unreadable ({type(exc).__name__}); delete it to recalibrate"
        ) from None
    if not isinstance(data, dict) or data.get("kind") != "deltadiff-int8-ranges":
        raise CacheError(
            f"{path} is not a deltadiff ranges cache; delete it or pass another --cache"
        )
    if data.get("version") != CACHE_VERSION or data.get("bins") != BINS:
        raise CacheError(f"ranges cache {path} has an old format; delete it to recalibrate")
    if data.get("graph_sha256") != graph_sha256:
        raise CacheError(
            f"ranges cache {path} was made for another model (step graph sha256 "
            f"{str(data.get('graph_sha256'))[:12]}… != {graph_sha256[:12]}…); delete it or pass "
            "another --cache"
        )
    stats = _parse(data["tensors"])
    meta = {k: v for k, v in data.items() if k != "tensors"}
    return stats, meta


def stage_stats(
    path: Path, meta: dict[str, Any], name: str, graph_sha256: str
) -> dict[str, dict[int, TensorStats]]:
    """The cached statistics of one stage graph (from ``load_cache``'s meta)."""
    st = (meta.get("stages") or {}).get(name)
    if st is None:
        raise CacheError(
            f"ranges cache {path} has no {name} statistics (made before the VQ {name} was "
            "calibrated); delete it to recalibrate"
        )
    if st.get("graph_sha256") != graph_sha256:
        raise CacheError(
            f"ranges cache {path} was made for another {name} graph; delete it or pass another "
            "--cache"
        )
    return _parse(st["tensors"])
