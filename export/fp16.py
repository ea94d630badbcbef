"""FP32 ONNX -> FP16 ONNX with FP32 islands and FP32 graph I/O (for strongly typed TensorRT).

The island list is data (``fp16_islands.json``): GroupNorm statistics, softmax, the timestep
sinusoids, the VQ distance + argmin, the state update between rows, the image output.

Why not onnxconverter-common's ``float16`` (the usual choice)? Measured here on our exports
(onnxconverter-common 1.16, onnx 1.23): 5 of 6 converted graphs fail to load in onnxruntime
(stale value_info types, ``Cast(to=FLOAT)`` left behind, FP32 inputs wired into FP16 Concats;
docs/precision.md), and its block lists put Cast16->Cast32 pairs between blocked nodes
so an "FP32" chain is still rounded to FP16. Patching its output takes three passes
plus pair collapsing; this pass instead assigns a precision per node and inserts each Cast once,
which keeps islands exactly FP32 and the result type-consistent by construction.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict, deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

from deltadiff._deps import require
from deltadiff.errors import DeltaDiffError

log = logging.getLogger(__name__)

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16
# inputs that must stay FP32 whatever the node's precision (op type -> input indices)
FP32_ONLY_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}
FP16_MAX = 65504.0


@dataclass(frozen=True)
class IslandRule:
    name: str
    op_types: tuple[str, ...] = ()
    from_input: str | None = None
    to_output: str | None = None
    until: tuple[str, ...] = ()
    graph: str | None = None  # apply only to this graph name


def load_rules() -> list[IslandRule]:
    text = (resources.files("deltadiff.export") / "fp16_islands.json").read_text(encoding="utf-8")
    data = json.loads(text)
    return [
        IslandRule(
            name=r["name"],
            op_types=tuple(r.get("op_types", ())),
            from_input=r.get("from_input"),
            to_output=r.get("to_output"),
            until=tuple(r.get("until", ())),
            graph=r.get("graph"),
        )
        for r in data["rules"]
    ]


def _walk(start: list[Any], step: Any, until: Any) -> list[str]:
    """Breadth-first node names from ``start`` along ``step(node)``, stopping at ``until`` op types."""
    seen: set[str] = set()
    names: list[str] = []
    q = deque(start)
    while q:
        n = q.popleft()
        if n.name in seen or n.op_type in until:
            continue
        seen.add(n.name)
        names.append(n.name)
        q.extend(step(n))
    return names


def select_islands(model: Any, graph_name: str, rules: list[IslandRule]) -> dict[str, list[str]]:
    """rule name -> names of the nodes it keeps in FP32."""
    g = model.graph
    consumers: dict[str, list[Any]] = defaultdict(list)
    producer: dict[str, Any] = {}
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
        for o in n.output:
            producer[o] = n
    out: dict[str, list[str]] = {}
    for r in rules:
        if r.graph is not None and r.graph != graph_name:
            continue
        chosen: list[str] = []
        if r.op_types:
            chosen += [n.name for n in g.node if n.op_type in r.op_types]
        if r.from_input and any(i.name == r.from_input for i in g.input):
            chosen += _walk(
                consumers[r.from_input],
                lambda n: [c for o in n.output for c in consumers[o]],
                r.until,
            )
        if r.to_output and any(o.name == r.to_output for o in g.output):
            chosen += _walk(
                [producer[r.to_output]] if r.to_output in producer else [],
                lambda n: [producer[i] for i in n.input if i in producer],
                r.until,
            )
        if chosen:
            out[r.name] = chosen
    return out


@dataclass
class _Fp16Pass:
    """One conversion in progress: the graph, its tensor types, the precision plan, and what the
    rewrite has produced so far (new node list, Casts, FP16 initializer copies)."""

    graph: Any
    dtype: dict[str, int]  # tensor name -> ONNX elem type before conversion
    inits: dict[str, Any]  # initializer name -> TensorProto
    half: set[str]  # names of the nodes that compute in FP16
    init_users: dict[str, set[int]]  # FP32 initializer -> precisions its consumers want
    prec: dict[str, int]  # precision of float activations
    new_nodes: list[Any] = field(default_factory=list)
    casts: dict[tuple[str, int], str] = field(default_factory=dict)
    init_copies: dict[str, str] = field(default_factory=dict)

    def fp16_init(self, name: str) -> str:
        """The FP16 version of an FP32 initializer: converted in place when every consumer wants
        FP16, else a ``__fp16`` copy next to it."""
        from onnx import numpy_helper

        if name in self.init_copies:
            return self.init_copies[name]
        src = self.inits[name]
        arr = numpy_helper.to_array(src).astype(np.float32)
        arr16 = np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16)
        if self.init_users[name] == {FLOAT16}:
            src.CopyFrom(numpy_helper.from_array(arr16, name))
            self.init_copies[name] = name
        else:
            new = name + "__fp16"
            self.graph.initializer.append(numpy_helper.from_array(arr16, new))
            self.init_copies[name] = new
        return self.init_copies[name]

    def cast(self, t: str, to: int) -> str:
        """The name of ``t`` cast to ``to``; one Cast node per (tensor, type)."""
        from onnx import helper

        key = (t, to)
        if key not in self.casts:
            out = f"{t}__to{'16' if to == FLOAT16 else '32'}"
            self.new_nodes.append(helper.make_node("Cast", [t], [out], name=f"cast_{out}", to=to))
            self.casts[key] = out
        return self.casts[key]


def convert_to_fp16(
    model: Any, graph_name: str, rules: list[IslandRule] | None = None
) -> tuple[Any, dict[str, int]]:
    """Return (FP16 model, {island rule: node count}). Graph inputs/outputs stay FP32."""
    onnx = require("onnx")
    m = _named_and_typed(onnx, model)
    islands = select_islands(m, graph_name, rules if rules is not None else load_rules())
    run = _plan_precisions(m.graph, islands)
    for n in run.graph.node:
        _convert_node(run, n)
    _keep_outputs_fp32(run)
    _retype_value_info(run)
    m = _checked(onnx, m, graph_name)
    counts = {k: len(v) for k, v in islands.items()}
    log.info(
        "%s: %d of %d nodes in FP16; FP32 islands %s",
        graph_name,
        len(run.half),
        len(model.graph.node),
        counts,
    )
    return m, counts


def _named_and_typed(onnx: Any, model: Any) -> Any:
    """A copy of ``model`` with unique, non-empty node names and inferred tensor types."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    # names must be unique and non-empty for island bookkeeping
    seen_names: set[str] = set()
    for i, n in enumerate(m.graph.node):
        if not n.name or n.name in seen_names:
            n.name = f"{n.op_type}__{i}"
        seen_names.add(n.name)
    # Keep the exporter's value_info: ONNX cannot infer GroupNormalization-21 outputs on its own.
    return onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)


def _tensor_types(g: Any) -> dict[str, int]:
    """Tensor name -> ONNX elem type, from the graph's I/O, value_info and initializers."""
    dtype: dict[str, int] = {}
    for v in list(g.input) + list(g.value_info) + list(g.output):
        dtype[v.name] = v.type.tensor_type.elem_type
    for i in g.initializer:
        dtype[i.name] = i.data_type
    for n in g.node:  # outputs ONNX did not type (e.g. GroupNormalization-21): same as input 0
        for o in n.output:
            if (
                o
                and not dtype.get(o)
                and dtype.get(n.input[0] if n.input else "")
                and n.op_type not in ("Shape", "Size", "Cast")
            ):
                dtype[o] = dtype[n.input[0]]
    return dtype


def _is_float_node(n: Any, dtype: dict[str, int]) -> bool:
    if n.op_type == "Constant":
        return any(a.name == "value" and a.t.data_type == FLOAT for a in n.attribute)
    return any(dtype.get(t) == FLOAT for t in list(n.input) + list(n.output) if t)


def _plan_precisions(g: Any, islands: dict[str, list[str]]) -> _Fp16Pass:
    """Which nodes compute in FP16 (float nodes outside the islands), and which precisions the
    consumers of each FP32 initializer want."""
    island_nodes = {name for names in islands.values() for name in names}
    dtype = _tensor_types(g)
    inits = {i.name: i for i in g.initializer}
    half = {n.name for n in g.node if n.name not in island_nodes and _is_float_node(n, dtype)}
    init_users: dict[str, set[int]] = defaultdict(set)
    for n in g.node:  # which precision does each initializer's consumer want?
        want = FLOAT16 if n.name in half else FLOAT
        for k, t in enumerate(n.input):
            if t in inits and inits[t].data_type == FLOAT:
                fixed = k in FP32_ONLY_INPUTS.get(n.op_type, set())
                init_users[t].add(FLOAT if fixed else want)
    return _Fp16Pass(
        graph=g,
        dtype=dtype,
        inits=inits,
        half=half,
        init_users=init_users,
        prec={i.name: FLOAT for i in g.input},
    )


def _convert_node(run: _Fp16Pass, n: Any) -> None:
    """Feed ``n`` its inputs in its precision (Casts, FP16 initializers), retype its FP32
    attributes if it computes in FP16, and record the precision of its outputs."""
    want = FLOAT16 if n.name in run.half else FLOAT
    for k, t in enumerate(n.input):
        if not t or run.dtype.get(t) != FLOAT:
            continue
        target = FLOAT if k in FP32_ONLY_INPUTS.get(n.op_type, set()) else want
        if t in run.inits:
            if target == FLOAT16:
                n.input[k] = run.fp16_init(t)
            continue
        have = run.prec.get(t, FLOAT)
        if have != target:
            n.input[k] = run.cast(t, target)
    if want == FLOAT16:
        _attributes_to_fp16(n)
    for o in n.output:
        if run.dtype.get(o) == FLOAT:
            run.prec[o] = want
    run.new_nodes.append(n)


def _attributes_to_fp16(n: Any) -> None:
    """``Cast(to=FLOAT)`` casts to FLOAT16; FP32 Constant / ConstantOfShape values become FP16."""
    from onnx import numpy_helper

    for a in n.attribute:
        if n.op_type == "Cast" and a.name == "to" and a.i == FLOAT:
            a.i = FLOAT16
        if (
            n.op_type in ("Constant", "ConstantOfShape")
            and a.name == "value"
            and a.t.data_type == FLOAT
        ):
            arr = numpy_helper.to_array(a.t).astype(np.float16)
            a.t.CopyFrom(numpy_helper.from_array(arr, a.t.name))


def _keep_outputs_fp32(run: _Fp16Pass) -> None:
    """Graph outputs stay FP32: an FP16 output is renamed ``__fp16`` and Cast back; the rewritten
    node list replaces the graph's."""
    from onnx import helper

    g = run.graph
    for o in g.output:
        if run.prec.get(o.name) == FLOAT16:
            inner = o.name + "__fp16"
            for n in run.new_nodes:
                n.output[:] = [inner if x == o.name else x for x in n.output]
                n.input[:] = [inner if x == o.name else x for x in n.input]
            run.new_nodes.append(
                helper.make_node("Cast", [inner], [o.name], name=f"cast_out_{o.name}", to=FLOAT)
            )
    del g.node[:]
    g.node.extend(run.new_nodes)


def _retype_value_info(run: _Fp16Pass) -> None:
    """Retype the recorded value_info and describe the new Cast outputs."""
    g = run.graph
    out_names = {o.name for o in g.output}
    keep = [v for v in g.value_info if v.name not in out_names]
    del g.value_info[:]
    g.value_info.extend(keep)
    shapes = {v.name: v for v in g.value_info}
    for v in g.value_info:
        if run.prec.get(v.name) == FLOAT16:
            v.type.tensor_type.elem_type = FLOAT16
        elif not v.type.tensor_type.elem_type and run.dtype.get(v.name):
            v.type.tensor_type.elem_type = run.dtype[v.name]
    for (t, to), out in run.casts.items():
        src = shapes.get(t) or next((i for i in g.input if i.name == t), None)
        if src is not None:
            v = g.value_info.add()
            v.CopyFrom(src)
            v.name = out
            v.type.tensor_type.elem_type = to
    for o in g.output:
        if run.prec.get(o.name) == FLOAT16:
            v = g.value_info.add()
            v.CopyFrom(o)
            v.name = o.name + "__fp16"
            v.type.tensor_type.elem_type = FLOAT16


def _checked(onnx: Any, m: Any, graph_name: str) -> Any:
    """Strict shape inference and the full ONNX checker over the converted model."""
    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=True, data_prop=True)
        onnx.checker.check_model(m, full_check=True)
    except Exception as exc:  # onnx raises InferenceError / ValidationError
        raise DeltaDiffError(
            f"FP16 conversion of {graph_name} produced an invalid graph: {exc}"
        ) from exc
    return m
