"""MAC counts from the exported ONNX graphs, and the machine's measured peak, for the FLOP floor.

Counter choice: ``onnx-tool`` 1.0.1 (PyPI, the best-kept ONNX profiler) was tried first on the
exported graphs. It cannot profile the step or unrolled graphs: its shape inference stops with
``NotImplementedError: this Node GroupNormalization-... has no value_infer`` (opset-21
GroupNormalization), and its profiler would count that op as 0 MACs anyway. Instead, this module
counts MACs itself, from ``onnx.shape_inference`` shapes with the batch axis fixed:

    Conv           prod(Y) * prod(W[1:])        W = (Cout, Cin/group, k...)
    ConvTranspose  prod(X) * prod(W[1:])        W = (Cin, Cout/group, k...)
    MatMul         prod(Y) * K                  K = A[-1] (numpy matmul semantics, batch broadcast)
    Gemm           prod(Y) * K                  K = A[1], or A[0] with transA
    Einsum         prod(size of every index)    (two or more operands; one operand counts 0)

Convention: MACs of conv + linear + attention matmuls; bias adds, norms,
activations, softmax and resizes are not counted. A node whose shapes cannot be inferred is
listed in ``MacCount.uncounted`` rather than guessed. Large initializers are turned into typed
graph inputs before inference, so counting a 500 MB UNet does not copy its weights.

Validated against an independent torch forward-hook count (Conv2d / Linear modules plus the
window-attention matmuls computed by hand) in ``tests/test_bench.py``, and by hand against the
full-size MACs of the upstream models.

The peak: ``measure_peak`` times one 3x3 convolution, 128 -> 128 channels at 128 x 128, in
ONNX Runtime (graph built with ``onnx.helper``) or in torch, with the thread count of the
benchmark, and reports 2 * MACs / best time. Achieved / peak of a case is then
``(2 * MACs of the case / median seconds) / peak``.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deltadiff._deps import require

log = logging.getLogger(__name__)

COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum")
# initializers with more elements than this become typed graph inputs before shape inference
_KEEP_INITIALIZER_ELEMS = 64
# output 0 has the shape of input 0; onnx.shape_inference leaves their outputs unknown (opset 21)
_SAME_SHAPE_OPS = ("GroupNormalization", "InstanceNormalization", "LayerNormalization")

PEAK_CHANNELS = 128
PEAK_SIDE = 128
PEAK_MACS = PEAK_CHANNELS * PEAK_CHANNELS * 9 * PEAK_SIDE * PEAK_SIDE  # batch 1


@dataclass(frozen=True)
class MacCount:
    """MACs of one graph at one batch size."""

    total: int
    by_op: dict[str, int] = field(default_factory=dict)
    nodes: int = 0  # counted nodes
    uncounted: tuple[str, ...] = ()  # counted-op nodes whose shapes were unknown
    batch: int = 1

    @property
    def gmacs(self) -> float:
        return self.total / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {
            "macs": self.total,
            "gmacs": self.gmacs,
            "by_op": dict(self.by_op),
            "nodes": self.nodes,
            "uncounted": list(self.uncounted),
            "batch": self.batch,
        }


def _dim_value(label: str, batch: int, units: tuple[int, int] | None) -> int:
    """A symbolic dim's value: ``batch``, or ``k*h`` / ``k*w`` / ``h`` / ``w`` (the dynamic
    export's labels, h and w counted in LR multiples) from ``units`` = (h, w)."""
    if units is not None:
        k, _, axis = label.rpartition("*")
        if axis in ("h", "w") and (not k or k.isdigit()):
            return int(k or 1) * units[0 if axis == "h" else 1]
    return batch


def _shapes_only(model: Any, batch: int, units: tuple[int, int] | None = None) -> Any:
    """A copy of ``model`` with symbolic input dims fixed (batch, and a dynamic export's height /
    width from ``units``) and big weights as inputs."""
    onnx = require("onnx", "export")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    keep, moved = [], []
    for init in g.initializer:
        n = math.prod(init.dims) if len(init.dims) else 1
        if n > _KEEP_INITIALIZER_ELEMS:
            moved.append(
                onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            )
        else:
            keep.append(init)
    moved_names = {v.name for v in moved}
    inputs = [v for v in g.input if v.name not in moved_names]
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.input[:]
    g.input.extend(inputs + moved)
    for vi in g.input:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.dim_value = _dim_value(d.dim_param, batch, units)
    for vi in g.output:
        vi.type.tensor_type.ClearField("shape")  # re-inferred from the fixed batch
    for node in g.node:
        if node.op_type in _SAME_SHAPE_OPS and node.domain in ("", "ai.onnx"):
            # onnx has no shape inference for these (function ops); only the shape matters here
            del node.input[1:]
            del node.output[1:]
            del node.attribute[:]
            node.op_type = "Identity"
    del g.value_info[:]
    return onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)


def _shape_table(model: Any) -> dict[str, tuple[int, ...] | None]:
    out: dict[str, tuple[int, ...] | None] = {}
    g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            out[vi.name] = None
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        out[vi.name] = None if any(d is None for d in dims) else tuple(int(d) for d in dims)
    for init in g.initializer:
        out[init.name] = tuple(int(d) for d in init.dims)
    return out


def _attr(node: Any, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _einsum_macs(equation: str, shapes: list[tuple[int, ...]]) -> int | None:
    lhs = equation.replace(" ", "").split("->")[0]
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        return None
    if len(terms) < 2:
        return 0
    sizes: dict[str, int] = {}
    free = iter("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    ell: list[str] = []
    for term, shape in zip(terms, shapes, strict=True):
        if "..." in term:
            n_ell = len(shape) - (len(term) - 3)
            while len(ell) < n_ell:
                ell.insert(0, next(free))
            term = term.replace("...", "".join(ell[len(ell) - n_ell :]))
        if len(term) != len(shape):
            return None
        for ch, n in zip(term, shape, strict=True):
            sizes[ch] = max(sizes.get(ch, 1), n)
    return math.prod(sizes.values())


def _node_macs(node: Any, shapes: dict[str, tuple[int, ...] | None]) -> int | None:
    def sh(i: int, outputs: bool = False) -> tuple[int, ...] | None:
        names = node.output if outputs else node.input
        return shapes.get(names[i]) if i < len(names) and names[i] else None

    op = node.op_type
    if op == "Conv":
        y, w = sh(0, True), sh(1)
        return None if y is None or w is None else math.prod(y) * math.prod(w[1:])
    if op == "ConvTranspose":
        x, w = sh(0), sh(1)
        return None if x is None or w is None else math.prod(x) * math.prod(w[1:])
    if op == "MatMul":
        a, y = sh(0), sh(0, True)
        return None if a is None or y is None else math.prod(y) * a[-1]
    if op == "Gemm":
        a, y = sh(0), sh(0, True)
        if a is None or y is None:
            return None
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return math.prod(y) * k
    if op == "Einsum":
        ins = [shapes.get(n) for n in node.input]
        if any(s is None for s in ins):
            return None
        eq = next((a.s.decode() for a in node.attribute if a.name == "equation"), "")
        return _einsum_macs(eq, ins)  # type: ignore[arg-type]
    return 0


def _each_node_macs(
    proto: Any, batch: int, lr_units: tuple[int, int] | None
) -> list[tuple[Any, int | None]]:
    inferred = _shapes_only(proto, batch, lr_units)
    shapes = _shape_table(inferred)
    return [(node, _node_macs(node, shapes)) for node in inferred.graph.node]


def node_macs(
    model: Any, *, batch: int = 1, lr_units: tuple[int, int] | None = None
) -> dict[str, int | None]:
    """MACs of each counted node (Conv / MatMul / ...) of a ``ModelProto`` by node name; None
    where its shapes could not be inferred (the calibration search weighs blocks by these)."""
    return {
        node.name: macs
        for node, macs in _each_node_macs(model, batch, lr_units)
        if node.op_type in COUNTED_OPS
    }


def count_macs(
    model: str | Path | Any, *, batch: int = 1, lr_units: tuple[int, int] | None = None
) -> MacCount:
    """MACs of an ONNX graph (a path or a ``ModelProto``) with its batch axis set to ``batch``;
    a dynamic-shape graph needs ``lr_units``: the LR height and width in LR multiples."""
    onnx = require("onnx", "export")
    proto = (
        onnx.load(str(model), load_external_data=False) if isinstance(model, str | Path) else model
    )
    by_op: dict[str, int] = {}
    uncounted: list[str] = []
    nodes = 0
    for node, macs in _each_node_macs(proto, batch, lr_units):
        if node.op_type not in COUNTED_OPS:
            if any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute):
                uncounted.append(f"{node.op_type}:{node.name} (subgraph)")
            continue
        if macs is None:
            uncounted.append(f"{node.op_type}:{node.name}")
            continue
        by_op[node.op_type] = by_op.get(node.op_type, 0) + macs
        nodes += 1
    if uncounted:
        log.warning(
            "%d node(s) without inferred shapes were not counted: %s",
            len(uncounted),
            ", ".join(uncounted[:5]),
        )
    return MacCount(sum(by_op.values()), by_op, nodes, tuple(uncounted), batch)


class GraphMacs:
    """MAC counts of a model directory's fp32 graphs, counted lazily and cached per batch."""

    def __init__(
        self,
        model_dir: str | Path,
        graphs: dict[str, str],
        lr_units: tuple[int, int] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.graphs = dict(graphs)  # graph name -> file name
        self.lr_units = lr_units  # dynamic graphs: the benchmarked LR size in LR multiples
        self._cache: dict[tuple[str, int], MacCount] = {}

    def get(self, graph: str, batch: int) -> MacCount:
        key = (graph, batch)
        if key not in self._cache:
            t0 = time.perf_counter()
            self._cache[key] = count_macs(
                self.model_dir / self.graphs[graph], batch=batch, lr_units=self.lr_units
            )
            log.debug("counted %s at batch %d in %.2f s", graph, batch, time.perf_counter() - t0)
        return self._cache[key]

    def pipeline(self, mode: str, batch: int, steps: int) -> int:
        """MACs of one end-to-end call: unrolled graph, or encoder + steps x step + decoder."""
        if mode == "unrolled":
            return self.get("unrolled", batch).total
        return (
            self.get("encoder", batch).total
            + steps * self.get("step", batch).total
            + self.get("decoder", batch).total
        )


# ---------------------------------------------------------------------------------------------
# peak


@dataclass(frozen=True)
class Peak:
    """Measured throughput of a large 3x3 convolution: the attainable FLOP/s of one engine."""

    key: str  # e.g. onnxruntime-cpu, torch-cuda
    flops: float  # FLOP/s, 2 * MACs / best seconds
    median_flops: float
    macs: int
    runs: int
    threads: int
    what: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "tflops": self.flops / 1e12,
            "median_tflops": self.median_flops / 1e12,
            "macs": self.macs,
            "runs": self.runs,
            "threads": self.threads,
            "what": self.what,
        }


def _time_fn(fn: Any, *, min_runs: int, min_seconds: float, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - t_start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _peak_from(key: str, times: list[float], threads: int, what: str) -> Peak:
    flops = 2.0 * PEAK_MACS
    return Peak(
        key=key,
        flops=flops / min(times),
        median_flops=flops / float(np.median(np.asarray(times, dtype=np.float64))),
        macs=PEAK_MACS,
        runs=len(times),
        threads=threads,
        what=what,
    )


def peak_conv_onnx() -> bytes:
    """Serialized ONNX graph of the peak probe: Conv 3x3, 128 -> 128, pad 1, 1x128x128x128."""
    onnx = require("onnx", "export")
    h = onnx.helper
    c, s = PEAK_CHANNELS, PEAK_SIDE
    w = np.random.default_rng(0).standard_normal((c, c, 3, 3), dtype=np.float32) * np.float32(0.03)
    graph = h.make_graph(
        [h.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
        "peak_conv",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, c, s, s])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, c, s, s])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def measure_peak_ort(
    *,
    threads: int = 0,
    providers: list[str] | None = None,
    min_runs: int = 10,
    min_seconds: float = 1.0,
) -> Peak:
    """ONNX Runtime FP32 conv peak with the benchmark's thread count (0: ORT default)."""
    ort = require("onnxruntime")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    providers = providers or ["CPUExecutionProvider"]
    sess = ort.InferenceSession(peak_conv_onnx(), so, providers=providers)
    x = np.random.default_rng(1).random((1, PEAK_CHANNELS, PEAK_SIDE, PEAK_SIDE), dtype=np.float32)
    times = _time_fn(lambda: sess.run(None, {"x": x}), min_runs=min_runs, min_seconds=min_seconds)
    dev = "cuda" if providers[0].startswith("CUDA") else "cpu"
    return _peak_from(f"onnxruntime-{dev}", times, threads, "ORT Conv 3x3 128->128 @128x128 fp32")


def measure_peak_torch(
    *,
    device: str = "cpu",
    threads: int = 0,
    fp16: bool = False,
    min_runs: int = 10,
    min_seconds: float = 1.0,
) -> Peak:
    """torch conv2d peak on ``device`` (CUDA: synchronized; ``fp16``: autocast)."""
    torch = require("torch", "export")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(1, PEAK_CHANNELS, PEAK_SIDE, PEAK_SIDE, generator=g).to(device)
        w = (torch.randn(PEAK_CHANNELS, PEAK_CHANNELS, 3, 3, generator=g) * 0.03).to(device)
        cuda = device.startswith("cuda")

        def run() -> None:
            amp = torch.autocast("cuda", dtype=torch.float16) if fp16 and cuda else nullcontext()
            with torch.no_grad(), amp:
                torch.nn.functional.conv2d(x, w, padding=1)
            if cuda:
                torch.cuda.synchronize()

        times = _time_fn(run, min_runs=min_runs, min_seconds=min_seconds)
    finally:
        torch.set_num_threads(old_threads)
    prec = "fp16 autocast" if fp16 and cuda else "fp32"
    key = f"torch-{'cuda' if cuda else 'cpu'}" + ("-fp16" if fp16 and cuda else "")
    return _peak_from(key, times, threads, f"torch conv2d 3x3 128->128 @128x128 {prec}")
