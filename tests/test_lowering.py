"""GroupNorm lowering (export/lowering.py): the InstanceNormalization form computes what
GroupNormalization-21 computes, for symbolic shapes, and an export writes it by default."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from deltadiff.export.lowering import lower_group_norm
from deltadiff.manifest import load_manifest
from deltadiff.options import GroupNormForm

from .conftest import SMALL


def _group_norm_model(channels: int, groups: int, rank: int, eps: float) -> onnx.ModelProto:
    rng = np.random.default_rng(channels * 10 + rank)
    shape = ["n", channels] + [f"d{i}" for i in range(rank - 2)]
    node = helper.make_node(
        "GroupNormalization",
        ["x", "s", "b"],
        ["y"],
        name="blk.norm",
        num_groups=groups,
        epsilon=eps,
    )
    node.metadata_props.add(key="namespace", value="blk")
    g = helper.make_graph(
        [node],
        "gn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [
            numpy_helper.from_array(
                (1 + 0.3 * rng.standard_normal(channels)).astype(np.float32), "s"
            ),
            numpy_helper.from_array((0.2 * rng.standard_normal(channels)).astype(np.float32), "b"),
        ],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


@pytest.mark.parametrize(
    ("channels", "groups", "rank", "size"),
    [(64, 32, 4, (2, 64, 13, 7)), (96, 32, 4, (1, 96, 5, 9)), (32, 4, 3, (3, 32, 11))],
)
def test_lowered_group_norm_equals_the_op_at_any_shape(channels, groups, rank, size):
    eps = 1e-6 if rank == 3 else 1e-5
    native = _group_norm_model(channels, groups, rank, eps)
    lowered, count = lower_group_norm(_group_norm_model(channels, groups, rank, eps))
    onnx.checker.check_model(lowered, full_check=True)
    ops = [n.op_type for n in lowered.graph.node]
    assert count == 1 and "GroupNormalization" not in ops and "InstanceNormalization" in ops
    assert all(n.name.startswith("blk.norm/") for n in lowered.graph.node)
    assert all(n.metadata_props[0].value == "blk" for n in lowered.graph.node)
    x = np.random.default_rng(1).standard_normal(size).astype(np.float32) * 3 + 1
    want = _run(native, x)
    got = _run(lowered, x)
    assert np.abs(got - want).max() < 2e-5 * max(1.0, float(np.abs(want).max()))
    # the affine is per channel, not per group: a model that mixed them up would differ here
    assert np.abs(got - want).max() < 0.01 * float(np.abs(want).std())


def test_group_norm_with_computed_scale_is_left_alone():
    m = _group_norm_model(64, 32, 4, 1e-5)
    m.graph.node.insert(0, helper.make_node("Identity", ["s"], ["s2"]))
    m.graph.node[1].input[1] = "s2"
    _, count = lower_group_norm(m)
    assert count == 0 and [n.op_type for n in m.graph.node][-1] == "GroupNormalization"


def test_export_lowers_by_default_and_native_keeps_the_op(exported, tmp_path):
    """The suite's exports use the default (lowered); a native export of the same weights gives
    the same images through onnxruntime."""
    from deltadiff.export.graphs import TileShape
    from deltadiff.export.onnx_export import ExportOptions, export_onnx, preset_source
    from deltadiff.model.pipeline import Pipeline
    from deltadiff.runtime.backends import open_backend
    from deltadiff.runtime.executor import Executor

    fam = "deltadiff-pixel"
    lowered = exported(fam)
    m = load_manifest(lowered)
    assert m.exporter["group_norm"] == "instance"
    step = onnx.load(str(lowered / m.graph("step").file))
    ops = collections.Counter(n.op_type for n in step.graph.node)
    assert ops["GroupNormalization"] == 0 and ops["InstanceNormalization"] > 0

    native = tmp_path / "native"
    preset_name = SMALL[fam][0]
    export_onnx(
        Pipeline.from_preset(preset_name, seed=0),
        native,
        ExportOptions(
            TileShape(*m.tile),
            group_norm=GroupNormForm.NATIVE,
            graphs=("encoder", "step", "decoder"),
        ),
        source=preset_source(preset_name, 0),
    )
    mn = load_manifest(native)
    nstep = onnx.load(str(native / mn.graph("step").file))
    assert (
        collections.Counter(n.op_type for n in nstep.graph.node)["GroupNormalization"]
        == ops["InstanceNormalization"]
    )
    lr = np.random.default_rng(3).random((1, 3, *m.tile), dtype=np.float32)
    outs = []
    for d, mm in ((lowered, m), (native, mn)):
        with open_backend("onnxruntime", d, mm) as be:
            outs.append(Executor(mm, be, mode="staged").run(lr, {}))
    assert np.abs(outs[0] - outs[1]).max() < 1e-4
