"""Compose ``unrolled.onnx`` from the staged graphs: encoder -> step x4 -> decoder, one graph.

The step graph's nodes are copied once per row of the step table with their intermediate tensors
renamed (``r3/...``), the row's ``t`` and ``coef`` inputs replaced by constants, and every
initializer shared: the unrolled file holds each weight once. The result is exactly the staged
computation, so staged and unrolled outputs agree to float rounding of the same ops.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deltadiff.model.schedule import StepTable


def _rename_subgraph_refs(node: onnx.NodeProto, mapping: dict[str, str]) -> None:
    """Rename tensor references inside If/Loop/Scan bodies (outer-scope captures)."""
    for attr in node.attribute:
        graphs = list(attr.g and [attr.g] or []) + list(attr.graphs)
        for g in graphs:
            for n in g.node:
                n.input[:] = [mapping.get(i, i) for i in n.input]
                _rename_subgraph_refs(n, mapping)


def compose_unrolled(
    encoder: onnx.ModelProto,
    step: onnx.ModelProto,
    decoder: onnx.ModelProto,
    table: StepTable,
    *,
    name: str = "unrolled",
) -> onnx.ModelProto:
    """Inputs: ``lr`` [+ ``n_prior`` + one ``n_t`` per noisy row]. Output: ``image``."""
    nodes: list[onnx.NodeProto] = []
    inits: dict[str, onnx.TensorProto] = {}
    value_info: list[onnx.ValueInfoProto] = []
    graph_inputs = [i for i in encoder.graph.input]
    opsets = {o.domain: o.version for o in encoder.opset_import}

    def register_inits(g: onnx.GraphProto, prefix: str) -> dict[str, str]:
        """Add g's initializers once (shared by every copy of g); rename on a name clash."""
        out = {}
        for init in g.initializer:
            final = init.name
            if init.name in inits and not _same_tensor(init, inits[init.name]):
                final = prefix + init.name
            if final not in inits:
                t = onnx.TensorProto()
                t.CopyFrom(init)
                t.name = final
                inits[final] = t
            out[init.name] = final
        return out

    def add_graph(
        g: onnx.GraphProto, prefix: str, bind: dict[str, str], init_map: dict[str, str]
    ) -> dict[str, str]:
        """Copy g's nodes under ``prefix``; inputs in ``bind`` map to existing tensors."""
        mapping: dict[str, str] = {**init_map, **bind}
        for n in g.node:
            for o in n.output:
                if o:
                    mapping.setdefault(o, prefix + o)
        for n in g.node:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = prefix + (n.name or n.op_type)
            c.input[:] = [mapping.get(i, prefix + i) if i else i for i in n.input]
            c.output[:] = [mapping.get(o, o) for o in n.output]
            _rename_subgraph_refs(c, mapping)
            nodes.append(c)
        for vi in g.value_info:
            if vi.name in mapping and vi.name not in bind and vi.name not in init_map:
                v = onnx.ValueInfoProto()
                v.CopyFrom(vi)
                v.name = mapping[vi.name]
                value_info.append(v)
        return {o.name: mapping.get(o.name, o.name) for o in g.output}

    enc_inits = register_inits(encoder.graph, "enc/")
    step_inits = register_inits(step.graph, "step/")
    dec_inits = register_inits(decoder.graph, "dec/")
    enc_out = add_graph(
        encoder.graph, "enc/", {i.name: i.name for i in encoder.graph.input}, enc_inits
    )
    x, y, cond = enc_out["x"], enc_out["y"], enc_out["cond"]
    step_inputs = {i.name for i in step.graph.input}
    for r in table.rows:
        pre = f"r{r.t}/"
        t_name, c_name = f"{pre}t", f"{pre}coef"
        inits[t_name] = numpy_helper.from_array(np.array([r.t], dtype=np.int64), t_name)
        inits[c_name] = numpy_helper.from_array(r.coef(), c_name)
        bind = {"x": x, "y": y, "cond": cond, "t": t_name, "coef": c_name}
        if "noise" in step_inputs:
            if r.noise is not None:
                n_name = r.noise
                graph_inputs.append(_copy_input(step.graph, "noise", n_name))
                bind["noise"] = n_name
            else:  # a noise-free row: feed zeros of the state's shape (s = 0 anyway)
                bind["noise"] = _zeros_like(nodes, x, pre)
        out = add_graph(
            step.graph, pre, {k: v for k, v in bind.items() if k in step_inputs}, step_inits
        )
        x = out["x_next"]
    dec_out = add_graph(decoder.graph, "dec/", {"x": x}, dec_inits)
    outputs = []
    for o in decoder.graph.output:
        v = onnx.ValueInfoProto()
        v.CopyFrom(o)
        src = dec_out[o.name]
        if src != o.name:
            nodes.append(helper.make_node("Identity", [src], [o.name], name=f"out/{o.name}"))
        outputs.append(v)
    graph = helper.make_graph(
        nodes, name, graph_inputs, outputs, initializer=list(inits.values()), value_info=value_info
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
        producer_name="deltadiff-trt compose_unrolled",
    )
    model.ir_version = encoder.ir_version
    return model


def _same_tensor(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    if a.data_type != b.data_type or list(a.dims) != list(b.dims):
        return False
    if a.raw_data and b.raw_data:
        return a.raw_data == b.raw_data
    return bool(np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b)))


def _copy_input(g: onnx.GraphProto, name: str, new: str) -> onnx.ValueInfoProto:
    for i in g.input:
        if i.name == name:
            v = onnx.ValueInfoProto()
            v.CopyFrom(i)
            v.name = new
            return v
    raise KeyError(name)


def _zeros_like(nodes: list[onnx.NodeProto], ref: str, prefix: str) -> str:
    shape, out = prefix + "zshape", prefix + "zeros"
    nodes.append(helper.make_node("Shape", [ref], [shape], name=prefix + "ZeroShape"))
    nodes.append(
        helper.make_node(
            "ConstantOfShape",
            [shape],
            [out],
            name=prefix + "Zeros",
            value=numpy_helper.from_array(np.zeros(1, dtype=np.float32)),
        )
    )
    return out
