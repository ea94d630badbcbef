"""TensorRT: FP16 graphs with FP32 islands (CPU check), engines built with TensorRT-RTX on this
CPU machine for every family, manifest engine records, the engine cache, stale-engine refusal."""

from __future__ import annotations

import importlib.util
import shutil

import onnx
import pytest

from deltadiff.errors import DeltaDiffError, EngineError
from deltadiff.export.onnx_export import add_fp16
from deltadiff.export.verify import verify
from deltadiff.manifest import load_manifest
from deltadiff.runtime.trt_compat import Device, check_engine_record

from .conftest import SMALL

HAVE_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(
    not HAVE_RTX, reason="tensorrt_rtx is not installed (pip install 'deltadiff-trt[trt]')"
)


@pytest.fixture(scope="module")
def fp16_models(exported, tmp_path_factory):
    out = {}
    for fam in sorted(SMALL):
        d = tmp_path_factory.mktemp(f"fp16-{fam}")
        shutil.copytree(exported(fam), d, dirs_exist_ok=True)
        add_fp16(d)
        out[fam] = d
    return out


@pytest.mark.parametrize("family", sorted(SMALL))
def test_fp16_graphs_keep_islands_in_fp32_and_io_in_fp32(fp16_models, family):
    d = fp16_models[family]
    m = load_manifest(d)
    step = onnx.load(str(d / m.graph("step", "fp16").file))
    types = {
        i.name: i.type.tensor_type.elem_type
        for i in list(step.graph.input) + list(step.graph.output)
    }
    assert types["x"] == types["x_next"] == onnx.TensorProto.FLOAT
    vi = {v.name: v.type.tensor_type.elem_type for v in step.graph.value_info}
    norms = ("GroupNormalization", "InstanceNormalization")  # native or lowered GroupNorm
    gn = [n for n in step.graph.node if n.op_type in norms]
    assert gn and all(
        vi.get(n.input[0], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for n in gn
    )
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in step.graph.initializer)
    islands = dict(x.split(":") for x in m.graph("step", "fp16").fp32_islands)
    assert {"groupnorm-statistics", "softmax", "timestep-sinusoids", "state-update"} <= set(islands)
    if m.latent:
        dec = dict(x.split(":") for x in m.graph("decoder", "fp16").fp32_islands)
        assert int(dec["vq-distance-argmin"]) >= 5


def test_fp16_policy_pixel_within_40db_of_fp32_reference(fp16_models):
    rep = verify(fp16_models["deltadiff-pixel"], precision="fp16", seed=1)
    assert rep.passed and rep.psnr >= 40.0, [r.line() for r in rep.end_to_end]


@needs_rtx
@pytest.mark.trt
@pytest.mark.parametrize("family", sorted(SMALL))
def test_rtx_builds_engines_without_gpu_and_records_them(fp16_models, family):
    from deltadiff.export.engine import EngineOptions, build_engines

    d = fp16_models[family]
    m, built = build_engines(
        d, EngineOptions(precision="fp16", flavour="tensorrt_rtx", batch_opt=1, batch_max=2)
    )
    assert {e["graph"] for e in built} == {"encoder", "step", "decoder", "unrolled"}
    for e in m.engines:
        assert (d / e["file"]).stat().st_size == e["bytes"] > 0
        assert e["flavour"] == "tensorrt_rtx" and e["targets"] and e["version"].startswith("1.")
        assert e["graph_sha256"] == m.graph(e["graph"], "fp16").sha256
        assert len(e["cache_key"]) == 64 and e["batch"] == [1, 1, 2]
    # unchanged key -> reused; a changed option -> rebuilt
    _, again = build_engines(
        d,
        EngineOptions(
            precision="fp16", flavour="tensorrt_rtx", batch_opt=1, batch_max=2, graphs=("step",)
        ),
    )
    assert again[0].get("reused") is True
    _, other = build_engines(
        d,
        EngineOptions(
            precision="fp16", flavour="tensorrt_rtx", batch_opt=2, batch_max=2, graphs=("step",)
        ),
    )
    assert not other[0].get("reused") and other[0]["batch"] == [1, 2, 2]


@needs_rtx
@pytest.mark.trt
def test_rtx_builds_fp32_engine_with_tf32_off(exported, tmp_path):
    from deltadiff.export.engine import EngineOptions, build_engines

    d = tmp_path / "m"
    shutil.copytree(exported("deltadiff-pixel"), d)
    m, built = build_engines(
        d, EngineOptions(precision="fp32", flavour="tensorrt_rtx", graphs=("step",))
    )
    assert built[0]["options"]["tf32"] is False and built[0]["precision"] == "fp32"


def _record(**kw):
    rec = {
        "graph": "step",
        "file": "step.fp16.tensorrt_rtx.engine",
        "precision": "fp16",
        "flavour": "tensorrt_rtx",
        "version": "1.7.1.116",
        "graph_sha256": "abc",
        "targets": ["sm86", "sm89"],
        "gpu": None,
    }
    rec.update(kw)
    return rec


@pytest.mark.parametrize(
    ("rec", "device", "match"),
    [
        (_record(graph_sha256="old"), Device("RTX 4090", "sm89"), "different step graph"),
        (
            _record(version="1.6.0"),
            Device("RTX 4090", "sm89"),
            "built by TensorRT-RTX 1.6.0; this is TensorRT-RTX 1.7.1.116",
        ),
        (_record(), Device("H100", "sm90"), "for sm86, sm89; this is H100 \\(sm90\\)"),
        (
            _record(flavour="tensorrt", version="10.13", gpu={"sm": "sm87"}),
            Device("Orin", "sm87"),
            "built by TensorRT 10.13",
        ),
        (_record(), None, "no CUDA GPU"),
    ],
)
def test_stale_or_foreign_engine_is_refused_with_rebuild_hint(rec, device, match):
    with pytest.raises(EngineError, match=match) as e:
        check_engine_record(
            rec,
            graph_sha256="abc",
            flavour="tensorrt_rtx",
            version="1.7.1.116",
            device=device,
            model_dir="M",
        )
    assert "dd-export build-engine --model M" in str(e.value) or "onnxruntime" in str(e.value)


def test_matching_engine_record_is_accepted():
    check_engine_record(
        _record(),
        graph_sha256="abc",
        flavour="tensorrt_rtx",
        version="1.7.1.116",
        device=Device("RTX 4090", "sm89"),
        model_dir="M",
    )
    check_engine_record(
        _record(flavour="tensorrt", version="10.13", gpu={"sm": "sm87"}),
        graph_sha256="abc",
        flavour="tensorrt",
        version="10.13",
        device=Device("Orin", "sm87"),
        model_dir="M",
    )


def test_tensorrt_backend_without_gpu_gives_one_line_error(exported):
    from deltadiff.runtime.backends import open_backend
    from deltadiff.runtime.trt_compat import current_device

    if current_device() is not None:
        pytest.skip("a GPU is present; this checks the CPU-only error path")
    d = exported("deltadiff-pixel")
    with pytest.raises(DeltaDiffError, match="no CUDA GPU|no TensorRT|cuda-python") as e:
        open_backend("tensorrt", d, load_manifest(d), precision="fp16")
    assert "\n" not in str(e.value)


@needs_rtx
@pytest.mark.trt
def test_unparsable_graph_names_the_node(tmp_path):
    from onnx import TensorProto, helper

    from deltadiff.export.engine import EngineOptions, build_engine
    from deltadiff.manifest import TensorSpec

    node = helper.make_node("FancyOp", ["x"], ["y"], name="my_bad_node", domain="com.example")
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.example", 1)]
    )
    p = tmp_path / "bad.onnx"
    onnx.save(m, str(p))
    with pytest.raises(EngineError, match="my_bad_node") as e:
        build_engine(
            p,
            inputs=(TensorSpec("x", (1, 3), "float32"),),
            opts=EngineOptions(),
            batch=(1, 1, 1),
            flavour="tensorrt_rtx",
        )
    assert "\n" not in str(e.value)
