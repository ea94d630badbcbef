"""GroupNormalization-21 -> Reshape / InstanceNormalization / Reshape / Mul / Add.

onnxruntime (1.32) has no CPU kernel for GroupNormalization: it inlines the ONNX function body
(Cast to the stash type, ReduceMean, Sub, Mul, Sqrt, Div, ... over the whole activation), which is
memory-bound and cut off from the NCHWc convolutions around it. The same normalization written as
an InstanceNormalization over ``(N, G, C/G * H * W)`` runs on ORT's InstanceNormalization kernel:
on the demo model's step graph at 512x512 that made the FP32 step 13 % faster (1954 -> 1692 ms;
docs/results/2026-11-30-xeon-int8-dynamic-scaleout.md). TensorRT and TensorRT-RTX parse both
forms into a normalization layer (no parse or build errors from either op).

The lowered nodes are named ``<GroupNorm node name>/<role>`` and keep the GroupNorm's metadata, so
tools that locate nodes by name prefix (the FP16 islands, the INT8 block search) still find them;
``InstanceNormalization`` is an FP32 island in ``fp16_islands.json`` like GroupNormalization.
The reshape back uses the input's runtime shape, so batch, height and width may be symbolic.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deltadiff._deps import require

GROUP_NORM = "GroupNormalization"


def _attr(node: Any, name: str, default: Any) -> Any:
    onnx = require("onnx")
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def lower_group_norm(model: Any) -> tuple[Any, int]:
    """Rewrite every GroupNormalization node in ``model.graph`` in place; return (model, count).

    Needs the scale and bias as initializers (per-channel, as the exporter writes them); a
    GroupNorm whose scale or bias is computed in the graph is left as it is.
    """
    onnx = require("onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes: list[Any] = []
    added: list[Any] = []
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.input, *g.value_info]}
    count = 0
    for n in g.node:
        if n.op_type != GROUP_NORM or n.domain not in ("", "ai.onnx"):
            nodes.append(n)
            continue
        x, scale, bias = n.input[0], n.input[1], n.input[2]
        if scale not in inits or bias not in inits:
            nodes.append(n)
            continue
        groups = int(_attr(n, "num_groups", 0))
        eps = float(_attr(n, "epsilon", 1e-5))
        gamma = numpy_helper.to_array(inits[scale]).astype(np.float32)
        beta = numpy_helper.to_array(inits[bias]).astype(np.float32)
        c = gamma.shape[0]
        per_channel = (c,) + (1,) * (ranks.get(x, 4) - 2)  # broadcast over N and the spatial axes
        p = f"{n.name or f'group_norm_{count}'}"
        added += [
            numpy_helper.from_array(np.array([0, groups, -1], np.int64), f"{p}/groups_shape"),
            numpy_helper.from_array(np.ones(groups, np.float32), f"{p}/ones"),
            numpy_helper.from_array(np.zeros(groups, np.float32), f"{p}/zeros"),
            numpy_helper.from_array(gamma.reshape(per_channel), f"{p}/scale"),
            numpy_helper.from_array(beta.reshape(per_channel), f"{p}/bias"),
        ]
        made = [
            helper.make_node("Shape", [x], [f"{p}/shape"], name=f"{p}/shape"),
            helper.make_node(
                "Reshape", [x, f"{p}/groups_shape"], [f"{p}/grouped"], name=f"{p}/to_groups"
            ),
            helper.make_node(
                "InstanceNormalization",
                [f"{p}/grouped", f"{p}/ones", f"{p}/zeros"],
                [f"{p}/normed"],
                name=f"{p}/normalize",
                epsilon=eps,
            ),
            helper.make_node(
                "Reshape", [f"{p}/normed", f"{p}/shape"], [f"{p}/back"], name=f"{p}/from_groups"
            ),
            helper.make_node(
                "Mul", [f"{p}/back", f"{p}/scale"], [f"{p}/scaled"], name=f"{p}/mul_scale"
            ),
            helper.make_node(
                "Add", [f"{p}/scaled", f"{p}/bias"], [n.output[0]], name=f"{p}/add_bias"
            ),
        ]
        for m in made:
            m.metadata_props.extend(n.metadata_props)
        nodes += made
        count += 1
    if count:
        used = {i for n in nodes for i in n.input}
        keep = [i for i in g.initializer if i.name in used]
        del g.node[:]
        g.node.extend(nodes)
        del g.initializer[:]
        g.initializer.extend(keep + added)
    return model, count
