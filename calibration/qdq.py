"""Two Q/DQ writers fed by the same ranges.

``onnxruntime``: onnxruntime.quantization's QDQ quantizer (the layout its CPU kernels fuse into
QLinearConv / MatMulInteger): U8 asymmetric activations, S8 symmetric per-channel weights in 7 bits
(levels -64..64, ``ORT_WEIGHT_QMAX``), INT32 biases. Seven bits because x86 CPUs without VNNI
(AVX2-only, AVX-512 without VNNI) multiply U8 by S8 with VPMADDUBSW, which adds each pair of
products in 16 bits and saturates: 255 * 127 * 2 overflows, 255 * 64 * 2 = 32640 does not, so the
INT8 products are the same on every x86 CPU. With full S8 weights the demo's worst held-out image
fell from 35.9 to 34.9 dB on AVX2 kernels (docs/precision.md "INT8"); ONNX Runtime's own remedy,
the session option ``session.x64quantprecision`` (U8U8 kernels), made the demo slower than FP32
there and 1.6x slower on a VNNI CPU too. We call its ``QDQQuantizer`` with our own ranges
(``quantize_static`` would re-run its own calibration); no ``quant_pre_process`` (it inlines
GroupNormalization-21 and then emits a QuantizeLinear inside it that does not load).

``tensorrt``: TensorRT explicit quantization, written here with onnx.helper: symmetric S8
Q/DQ (zero point 0) on the activation inputs of each quantized Conv / MatMul, S8 per-channel
weights through a DequantizeLinear, biases left in float (TensorRT accepts Q/DQ only on 8-bit
tensors), outputs unquantized (TensorRT fuses the following DQ/Q itself).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from deltadiff.options import Int8Target, parse

log = logging.getLogger(__name__)

OP_TYPES = ("Conv", "MatMul")  # Gemm is the timestep/FiLM path: tiny and sensitive; never quantized


def quantizable_nodes(model: Any) -> list[str]:
    """Conv / MatMul nodes in graph order (the candidates of the search)."""
    return [n.name for n in model.graph.node if n.op_type in OP_TYPES]


def stage_candidates(model: Any, graph: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Quantizable nodes of the encoder / decoder graph and the nodes kept FP32 with why.

    Candidates: the VQ-f4 encoder's / decoder's own Conv (weights ``...vq.encoder.`` /
    ``...vq.decoder.``) and the MatMuls of its mid attention. Kept FP32: the VQ distance +
    argmin (the ``vq-distance-argmin`` FP16 island: its z.e^T MatMul decides the codes),
    quant_conv / post_quant_conv (3 -> 3 channels: nothing to gain, they carry the latent)
    and the bicubic x4 filter (its output is y itself). A pixel family has no candidates."""
    from deltadiff.export.fp16 import load_rules, select_islands

    rules = [r for r in load_rules() if r.name == "vq-distance-argmin"]
    island = set(select_islands(model, graph, rules).get("vq-distance-argmin", []))
    inits = {i.name for i in model.graph.initializer}
    nodes: list[str] = []
    vq_island, small = [], []
    for n in model.graph.node:
        if n.op_type not in OP_TYPES:
            continue
        w = next((i for i in n.input[1:2] if i in inits), None)
        if n.name in island:
            vq_island.append(n.name)
        elif w is None or f"vq.{graph}." in w:
            nodes.append(n.name)
        else:
            small.append(n.name)
    kept = []
    if vq_island:
        kept.append(
            {
                "nodes": vq_island,
                "why": "VQ distance + argmin: FP32 island as in FP16 (a near-tie code flips)",
            }
        )
    if small and nodes:
        kept.append(
            {
                "nodes": small,
                "why": "quant_conv / post_quant_conv / bicubic filter: tiny, carry the latent",
            }
        )
    return nodes, kept


def write(
    target: str,
    model: Any,
    ranges: dict[str, tuple[float, float]],
    nodes: list[str],
) -> Any:
    """A copy of ``model`` with ``nodes`` quantized for ``target`` (others stay FP32)."""
    if parse(Int8Target, target, "--target") is Int8Target.ONNXRUNTIME:
        return write_ort(model, ranges, nodes)
    return write_trt(model, ranges, nodes)


def write_ort(model: Any, ranges: dict[str, tuple[float, float]], nodes: list[str]) -> Any:
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    m = onnx.ModelProto()
    m.CopyFrom(model)
    if not nodes:
        return m
    td = TensorsData(
        CalibrationMethod.MinMax,
        {t: (np.float32(lo), np.float32(hi)) for t, (lo, hi) in ranges.items()},
    )
    q = QDQQuantizer(
        m,
        True,  # per-channel weights
        True,  # reduce_range: 7-bit weights, -ORT_WEIGHT_QMAX..ORT_WEIGHT_QMAX
        QuantType.QInt8,
        QuantType.QUInt8,
        td,
        list(nodes),
        [],
        list(OP_TYPES),
        {"ActivationSymmetric": False, "WeightSymmetric": True},
    )
    q.quantize_model()
    return q.model.model


def _symmetric_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    red = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=red)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def write_trt(model: Any, ranges: dict[str, tuple[float, float]], nodes: list[str]) -> Any:
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    chosen = set(nodes)
    new_nodes = []
    qdq_of: dict[str, str] = {}  # activation -> its DQ output (one Q/DQ pair per tensor)
    wq_of: dict[tuple[str, int], str] = {}

    def act_qdq(t: str) -> str:
        if t in qdq_of:
            return qdq_of[t]
        lo, hi = ranges[t]
        amax = max(abs(lo), abs(hi)) or 1e-8
        s, z = f"{t}__s8_scale", f"{t}__s8_zp"
        g.initializer.extend(
            [
                numpy_helper.from_array(np.array(amax / 127.0, np.float32), s),
                numpy_helper.from_array(np.array(0, np.int8), z),
            ]
        )
        new_nodes.append(helper.make_node("QuantizeLinear", [t, s, z], [f"{t}__q"], name=f"{t}__Q"))
        new_nodes.append(
            helper.make_node("DequantizeLinear", [f"{t}__q", s, z], [f"{t}__dq"], name=f"{t}__DQ")
        )
        qdq_of[t] = f"{t}__dq"
        return qdq_of[t]

    def weight_dq(name: str, axis: int) -> str:
        key = (name, axis)
        if key in wq_of:
            return wq_of[key]
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        q, scale = _symmetric_weight(w, axis)
        qn, sn, zn = f"{name}__s8", f"{name}__s8_scale", f"{name}__s8_zp"
        g.initializer.extend(
            [
                numpy_helper.from_array(q, qn),
                numpy_helper.from_array(scale, sn),
                numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), zn),
            ]
        )
        new_nodes.append(
            helper.make_node(
                "DequantizeLinear", [qn, sn, zn], [f"{name}__dq"], name=f"{name}__DQ", axis=axis
            )
        )
        wq_of[key] = f"{name}__dq"
        return wq_of[key]

    for n in g.node:
        if n.name in chosen and n.op_type in OP_TYPES:
            for k in range(2):
                t = n.input[k]
                if t in inits:
                    if inits[t].data_type == onnx.TensorProto.FLOAT:
                        dims = len(inits[t].dims)
                        axis = 0 if n.op_type == "Conv" else dims - 1
                        n.input[k] = weight_dq(t, axis)
                elif t in ranges:
                    n.input[k] = act_qdq(t)
        new_nodes.append(n)
    # keep a topological order: each Q/DQ right before its first consumer is guaranteed because
    # every activation it reads is produced earlier in the original order and the DQ nodes were
    # appended before the node that reads them.
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return m


def quantized_nodes(model: Any) -> list[str]:
    """Conv / MatMul nodes whose second operand (the weight; the other activation of an
    attention MatMul) is dequantized, in both Q/DQ layouts. (A float node can read a
    dequantized activation: the ORT layout also quantizes a quantized Conv's output.)"""
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [
        n.name
        for n in model.graph.node
        if n.op_type in OP_TYPES and len(n.input) > 1 and n.input[1] in dq
    ]
