"""INT8 calibration (calibration/): both targets on a small exported preset, the ranges cache
(a re-run does no data pass), the gate's failing path, bad input, ORT running the INT8 graphs,
TensorRT-RTX building the INT8 engine, FP16 auto islands; the demo model's INT8 gate (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from deltadiff.calibration import ranges as R
from deltadiff.calibration.calibrate import CalibrateOptions, calibrate
from deltadiff.cli.export import app as export_app
from deltadiff.errors import DeltaDiffError
from deltadiff.manifest import load_manifest, save_manifest
from deltadiff.runtime.upscaler import max_lr_pixels

from .conftest import DATA, need_shared

HAVE_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
VAL = DATA / "val-bicubic-x4"
DEMO = Path(__file__).resolve().parents[1] / "runtime" / "models" / "demo-pixel"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Four real LR images (2 calibrate, 2 held out)."""
    src = need_shared(VAL / "lq")
    d = tmp_path_factory.mktemp("calib-images")
    for p in sorted(src.iterdir())[:4]:
        shutil.copy(p, d / p.name)
    return d


@pytest.fixture(scope="module")
def calibrated(exported, images, tmp_path_factory):
    """The small pixel preset calibrated for onnxruntime (search on), with a ranges cache."""
    d = tmp_path_factory.mktemp("int8-pixel")
    shutil.copytree(exported("deltadiff-pixel"), d, dirs_exist_ok=True)
    cache = d.parent / "ranges.json"
    feeds = []
    res = calibrate(
        CalibrateOptions(
            model=d,
            data=images,
            samples=2,
            cache=cache,
            method="percentile",
            sens_images=1,
            search_images=2,
            threads=2,
        ),
        on_feed=lambda: feeds.append(1),
    )
    return d, cache, res, len(feeds)


def _opts(d: Path, images: Path, **kw) -> CalibrateOptions:
    kw = {"samples": 2, "threads": 2, "sens_images": 1, "search_images": 2, **kw}
    return CalibrateOptions(model=d, data=images, **kw)


def _all_int8(d: Path, images: Path, **kw) -> CalibrateOptions:
    """Every Conv/MatMul INT8 with no quality bar (random weights): for tests about what the
    writers and builders see, not about the gate."""
    lax = {"search": False, "min_e2e_db": 0.0, "max_drop_db": 1e9, "method": "percentile"}
    return _opts(d, images, **{**lax, **kw})


def test_calibrate_onnxruntime_records_int8_graphs_and_passes_the_gate(calibrated):
    d, cache, res, feeds = calibrated
    assert feeds > 0 and res.data_pass  # the first run did the data pass ...
    assert cache.exists() and json.loads(cache.read_text())["kind"] == "deltadiff-int8-ranges"
    assert res.passed and res.score.e2e_min_db >= 35.0
    m = load_manifest(d)  # hashes of every file checked
    steps = {k: g for k, g in m.graphs.items() if k.startswith("step@")}
    assert set(steps) == {f"step@{t}.int8.onnxruntime" for t in (3, 2, 1, 0)}
    for g in steps.values():
        assert g.precision == "int8" and g.target == "onnxruntime" and g.usable
        assert g.quant["method"] == "percentile" and g.quant["calibration_images"]["count"] == 2
        assert g.quant["gate"]["passed"] and g.quant["gate"]["e2e_vs_fp32_min_db"] >= 35.0
    assert "int8" in m.precisions() and m.int8_status("onnxruntime") is None
    rep = json.loads((d / "int8-report.onnxruntime.json").read_text())
    assert rep["sensitivity"] and rep["rows"] and len(rep["spread"]) > 10
    assert {"amax", "spread"} <= set(rep["spread"][0])  # the per-row spread of ranges
    assert (d / "int8-report.onnxruntime.md").read_text().startswith("# INT8 calibration")
    # per-MAC ranking: every unit carries its MAC share; the plan's INT8 share is recorded
    assert rep["rank"] == "per-mac" and all(0 <= u["mac_share"] <= 1 for u in rep["sensitivity"])
    assert all(u["block"] != "*" for u in rep["sensitivity"])  # every row split into blocks
    assert set(rep["int8_mac_share"]) == {"3", "2", "1", "0"}
    assert any(v > 0 for v in rep["int8_mac_share"].values())


def test_onnxruntime_runs_the_int8_graphs_and_verify_reports_them(calibrated):
    from deltadiff.export.verify import verify
    from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler

    d, *_ = calibrated
    rng = np.random.default_rng(0)
    rgb = rng.random((16, 16, 3), dtype=np.float32)
    with Upscaler(d, UpscaleOptions(precision="int8", threads=2)) as up:
        out = up.upscale(rgb)
        sessions = set(up.backend._sessions)  # one session per distinct graph file
    assert out.shape == (64, 64, 3) and np.isfinite(out).all()
    files = {g.file for k, g in load_manifest(d).graphs.items() if k.startswith("step@")}
    assert files <= sessions
    rep = verify(d, precision="int8", seed=0, threads=2, record=False)
    assert rep.min_psnr == 35.0 and [r.name for r in rep.end_to_end] == ["end-to-end staged"]
    assert len([s for s in rep.stages if s.name.startswith("step")]) == 4


def test_cache_reuse_does_no_data_pass_and_a_failing_gate_is_not_usable(
    calibrated, images, tmp_path
):
    d0, cache, _res, _ = calibrated
    d = tmp_path / "m"
    shutil.copytree(d0, d)
    feeds = []
    # every Conv/MatMul in INT8 with MinMax ranges: random weights cannot hold 35 dB
    res = calibrate(
        _opts(d, images, cache=cache, method="minmax", search=False, target="tensorrt"),
        on_feed=lambda: feeds.append(1),
    )
    assert feeds == [] and not res.data_pass  # ... the second run did none
    assert not res.passed and res.score.e2e_min_db < 35.0
    m = load_manifest(d)
    assert m.int8_status("tensorrt") and "failed the calibration gate" in m.int8_status("tensorrt")
    assert m.int8_status("onnxruntime") is None  # the other target's graphs are untouched
    from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler

    with pytest.raises(DeltaDiffError, match="failed the calibration gate"):
        Upscaler(d, UpscaleOptions(backend="tensorrt", precision="int8"))


def test_cli_gate_failure_exits_nonzero(calibrated, images, tmp_path):
    d0, cache, *_ = calibrated
    d = tmp_path / "m"
    shutil.copytree(d0, d)
    r = CliRunner().invoke(
        export_app,
        [
            "calibrate",
            "--model",
            str(d),
            "--data",
            str(images),
            "--samples",
            "2",
            "--cache",
            str(cache),
            "--method",
            "minmax",
            "--no-search",
            "--threads",
            "2",
        ],
    )
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output and "not usable" in r.output


def test_cache_from_another_model_is_refused_in_one_line(calibrated, images, exported, tmp_path):
    _d, cache, *_ = calibrated
    data = json.loads(cache.read_text())
    data["graph_sha256"] = "0" * 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    d = tmp_path / "m"
    shutil.copytree(exported("deltadiff-pixel"), d)
    before = sorted(p.name for p in d.iterdir())
    with pytest.raises(R.CacheError, match="made for another model") as e:
        calibrate(_opts(d, images, cache=other))
    assert "\n" not in str(e.value) and sorted(p.name for p in d.iterdir()) == before


@pytest.mark.parametrize(
    "case, match",
    [
        ("empty", "has no images"),
        ("missing", "is not a folder"),
        ("too_few", "needs at least"),
        ("unreadable", "unreadable"),
        ("no_fp32", "no FP32"),
        ("bad_rank", "unknown --rank 'fastest'; choose one of per-mac, cost"),
        ("bad_units", "unknown --units 'node'; choose one of block, layer"),
        (
            "bad_method",
            "unknown --method 'best'; choose one of auto, minmax, percentile, entropy, mse",
        ),
        ("bad_target", "unknown --target 'cuda'; choose one of onnxruntime, tensorrt"),
    ],
)
def test_bad_input_is_one_line_naming_the_fix(case, match, exported, images, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(exported("deltadiff-pixel"), d)
    data = tmp_path / "data"
    data.mkdir()
    if case == "missing":
        data = tmp_path / "nope"
    elif case == "too_few":
        shutil.copy(next(images.iterdir()), data / "a.png")
    elif case == "unreadable":
        for p in images.iterdir():
            shutil.copy(p, data / p.name)
        (data / "zz-broken.png").write_bytes(b"not a png")
    elif case == "no_fp32":
        data = images
        m = json.loads((d / "manifest.json").read_text())
        m["graphs"].pop("step")
        (d / "manifest.json").write_text(json.dumps(m))
    extra = []
    if case == "bad_rank":  # refused before the data pass
        data, extra = images, ["--rank", "fastest"]
    if case == "bad_units":
        data, extra = images, ["--units", "node"]
    if case == "bad_method":
        data, extra = images, ["--method", "best"]
    if case == "bad_target":
        data, extra = images, ["--target", "cuda"]
    r = CliRunner().invoke(
        export_app, ["calibrate", "--model", str(d), "--data", str(data), "--samples", "2", *extra]
    )
    assert r.exit_code == 1
    assert match in r.output and "Traceback" not in r.output
    assert len([x for x in r.output.strip().splitlines() if x.startswith("error")]) == 1


def test_interrupted_calibration_leaves_the_model_dir_unchanged(
    exported, images, tmp_path, monkeypatch
):
    from deltadiff.calibration import calibrate as C

    d = tmp_path / "m"
    shutil.copytree(exported("deltadiff-pixel"), d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "update_manifest", boom)  # dies at the swap, after graph files exist
    with pytest.raises(KeyboardInterrupt):
        calibrate(_opts(d, images, method="minmax", search=False))
    after = {p.name: p.read_bytes() for p in d.iterdir() if not p.name.startswith("step@")}
    assert after == before  # the manifest (which vouches for the files) is the old one
    load_manifest(d)


def test_range_methods_clip_inside_minmax():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 200_000), [40.0]])  # one outlier
    h, _ = np.histogram(np.abs(x), bins=R.BINS, range=(0, 40.0))
    s = R.TensorStats(float(x.min()), 40.0, h.astype(np.int64))
    lo, hi = R.tensor_range(s, "minmax")
    assert hi == 40.0
    for meth, top in (("percentile", 10.0), ("entropy", 10.0), ("mse", 30.0)):
        lo, hi = R.tensor_range(s, meth)
        assert 2.0 < hi < top, (meth, hi)  # the outlier is clipped, the bulk kept
        assert lo >= x.min()  # (MSE weighs the outlier's squared error: it clips less)


@pytest.mark.trt
@pytest.mark.skipif(
    not HAVE_RTX, reason="tensorrt_rtx is not installed (pip install 'deltadiff-trt[trt]')"
)
def test_tensorrt_target_builds_int8_engines_with_rtx(calibrated, images, tmp_path):
    import onnx

    from deltadiff.export.engine import EngineOptions, build_engines

    d0, cache, *_ = calibrated
    d = tmp_path / "m"
    shutil.copytree(d0, d)
    # every Conv/MatMul quantized and no quality bar (random weights): this test is about the
    # engine build seeing real Q/DQ; the quality gate is tested above
    res = calibrate(_all_int8(d, images, cache=cache, target="tensorrt"))
    assert res.passed
    m = load_manifest(d)
    qdq = 0
    for k, g in m.graphs.items():
        if k.startswith("step@") and g.target == "tensorrt" and g.file != m.graph("step").file:
            model = onnx.load(str(d / g.file))
            ops = [n.op_type for n in model.graph.node]
            qdq += ops.count("QuantizeLinear")
            zps = [i for i in model.graph.initializer if i.name.endswith("__s8_zp")]
            assert all(z.data_type == onnx.TensorProto.INT8 for z in zps)  # symmetric S8
            biases = [
                n.input[2] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 2
            ]
            inits = {i.name: i for i in model.graph.initializer}
            assert all(inits[b].data_type == onnx.TensorProto.FLOAT for b in biases if b in inits)
    assert qdq > 0
    m2, built = build_engines(
        d,
        EngineOptions(
            precision="int8", flavour="tensorrt_rtx", graphs=("encoder", "step", "decoder")
        ),
    )
    names = {e["graph"] for e in built}
    assert {"encoder", "decoder"} <= names and any(n.startswith("step") for n in names)
    for e in m2.engines:
        assert e["precision"] == "int8" and (d / e["file"]).stat().st_size == e["bytes"] > 0


@pytest.mark.slow
def test_fp16_auto_islands_compares_with_the_hand_written_list(exported, tmp_path):
    from deltadiff.calibration.islands import auto_islands

    d = tmp_path / "m"
    shutil.copytree(exported("deltadiff-pixel"), d)
    res = auto_islands(d, tiles=1, threads=2)
    assert res.table and all(r["unit"] for r in res.table)
    assert res.auto.e2e_min_db >= 40.0 and res.hand.e2e_min_db >= 40.0
    r = CliRunner().invoke(
        export_app, ["fp16", "--model", str(d), "--auto-islands", "--threads", "2"]
    )
    assert r.exit_code == 0, r.output
    assert "hand-written list" in r.output and "PASS" in r.output


@pytest.mark.slow
def test_demo_model_int8_gate_on_held_out_validation_images():
    """The bundled INT8 graphs, re-measured: >= 35 dB vs FP32 on every held-out validation image
    and PSNR-Y vs HR within 0.10 dB of FP32 (images the calibration did not use)."""
    from deltadiff.calibration.data import load_images
    from deltadiff.calibration.evaluate import Evaluator

    need_shared(VAL)
    m = load_manifest(DEMO)
    assert m.int8_status("onnxruntime") is None
    rep = json.loads((DEMO / "int8-report.onnxruntime.json").read_text())
    used = set(rep["calibration_images"]["files"])
    s = load_images(VAL, 1)
    held = [im for im in s.calib + s.held_out if im.sha256 not in used]
    assert len(held) == 16 - len(used)
    ev = Evaluator(DEMO, m, held, threads=2)
    plan = {}
    for r in m.step_table.rows:
        g = m.graph(f"step@{r.t}", "int8")
        plan[r.t] = None if g.file == m.graph("step").file else (DEMO / g.file).read_bytes()
    score = ev.score(plan)
    print("demo INT8:", score.line())
    assert score.passes(35.0, 0.10), score.line()


FULL_TILES = {"deltadiff-pixel": 16, "deltadiff-latent": 64, "resshift-v3": 64}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FULL_TILES))
def test_full_preset_calibrates_gates_and_builds_int8_with_rtx(family, images, tmp_path):
    """Full-size presets with RANDOM weights: the quality numbers are a sanity check only (a
    random network has no trained activation structure). Made cheap for CI: the smallest valid
    tile, 1 calibration image (3 held out for the gate), the coarse search (units = whole
    graphs: the rows and, for the latent families, the VQ-f4 encoder / decoder); the TensorRT
    target reuses the onnxruntime target's search and ranges cache (no second data pass, no
    second search). Both targets must pass the gate; TensorRT-RTX builds the INT8 engines
    (encoder, step rows, decoder)."""
    from deltadiff.export.engine import EngineOptions, build_engines
    from deltadiff.export.graphs import TileShape
    from deltadiff.export.onnx_export import ExportOptions, export_onnx, preset_source
    from deltadiff.model.pipeline import Pipeline

    d = tmp_path / family
    tile = FULL_TILES[family]
    export_onnx(
        Pipeline.from_preset(family, seed=0),
        d,
        ExportOptions(TileShape(tile, tile), max_batch=1),
        source=preset_source(family, 0),
    )
    cache = tmp_path / "ranges.json"
    cheap = {"samples": 1, "sens_images": 1, "search_images": 1, "coarse": True}
    for target in ("onnxruntime", "tensorrt"):
        prior = d / "int8-report.onnxruntime.json" if target == "tensorrt" else None
        res = calibrate(
            _opts(
                d,
                images,
                cache=cache,
                target=target,
                method="percentile",
                search_from=prior,
                rtx_check=False,
                **cheap,
            )
        )
        kept = [(k["row"], k["block"]) for k in res.report["kept_fp32"]]
        print(family, target, res.score.line(), "kept FP32:", kept, res.report["seconds"])
        assert res.passed
    if not HAVE_RTX:
        return
    # random weights may keep every graph FP32 above; the RTX build must see real Q/DQ: every
    # Conv/MatMul INT8 (no quality bar), each graph built by the calibrate-time RTX check, then
    # the engines
    res = calibrate(_all_int8(d, images, cache=cache, target="tensorrt", samples=1))
    rtx = res.report["tensorrt_rtx_check"]
    print(family, "all INT8:", res.score.line(), "RTX check:", rtx, res.report["seconds"])
    assert res.passed and rtx and all(v == "builds" for v in rtx.values())
    assert all(g.quant["int8_nodes"] > 0 for g in res.records.values() if g.file.count(".int8."))
    _m, built = build_engines(
        d,
        EngineOptions(
            precision="int8", flavour="tensorrt_rtx", graphs=("encoder", "step", "decoder")
        ),
    )
    assert built and all(e["bytes"] > 0 for e in built)
    print(family, "RTX INT8 engines:", sorted(e["graph"] for e in built))


def test_calibrate_works_on_dynamic_shape_graphs(exported, images, tmp_path):
    """Graphs whose batch / H / W are symbolic (as a dynamic-shape export writes them)."""
    import onnx

    from deltadiff.manifest import sha256_file

    d = tmp_path / "m"
    shutil.copytree(exported("deltadiff-pixel"), d)
    man = json.loads((d / "manifest.json").read_text())
    for g in ("encoder", "step", "decoder"):
        rec = man["graphs"][g]
        model = onnx.load(str(d / rec["file"]))
        for v in list(model.graph.input) + list(model.graph.output):
            dims = v.type.tensor_type.shape.dim
            if len(dims) == 4:
                dims[0].dim_param, dims[2].dim_param, dims[3].dim_param = "batch", "h", "w"
        onnx.save(model, str(d / rec["file"]))
        rec["sha256"], rec["bytes"] = sha256_file(d / rec["file"]), (d / rec["file"]).stat().st_size
        for s in rec["inputs"] + rec["outputs"]:
            if len(s["shape"]) == 4:
                s["shape"] = ["batch", 3, "h", "w"]
    (d / "manifest.json").write_text(json.dumps(man))
    for target in ("onnxruntime", "tensorrt"):
        res = calibrate(_opts(d, images, target=target, method="percentile", search=False))
        assert res.records and np.isfinite(res.score.e2e_mean_db)
    m = load_manifest(d)
    step = onnx.load(str(d / m.graph("step@3", "int8", "tensorrt").file))
    assert step.graph.input[0].type.tensor_type.shape.dim[2].dim_param == "h"


class _StubScore:
    def __init__(self, mse: float) -> None:
        self.e2e_mean_db = 10 * np.log10(1 / mse)
        self.hr_delta = None

    def line(self) -> str:
        return f"{self.e2e_mean_db:.2f} dB"

    def passes(self, *_: float) -> bool:
        return False


class _StubEval:
    """Cost of a unit = the sum of its nodes' costs (teacher-forced step MSE); gain 1."""

    def __init__(self, cost: dict[str, float]) -> None:
        self.cost = cost

    def stage_mse(self, t, blob, images):
        return sum(self.cost[n] for n in blob.decode().split(","))

    def score(self, plan, limit=None):
        (blob,) = [b for b in plan.values() if b]
        return _StubScore(self.stage_mse(0, blob, 1))


def test_search_ranks_units_by_cost_per_mac_or_by_cost():
    """Per MAC, a big block that quantizes almost for free goes INT8 before a tiny damaging
    one is given up; ranked by cost alone, the big block (more total damage) is kept first."""
    from deltadiff.calibration.search import PlanBuilder, sensitivity

    blocks = {"big": ["b1", "b2"], "tiny": ["s1"], "mid": ["m1"]}
    macs = {"b1": 500, "b2": 500, "s1": 10, "m1": 100}
    cost = {"b1": 5e-5, "b2": 5e-5, "s1": 8e-5, "m1": 5e-5}

    class Stub(PlanBuilder):
        def graph(self, t, nodes):
            return ",".join(nodes).encode() if nodes else None

        def node_macs(self, t):
            return macs

    pb = Stub("onnxruntime", None, {0: {}}, blocks)
    ev = _StubEval(cost)
    per_mac, _ = sensitivity(ev, pb, [0], images=1, rank="per-mac")
    by_cost, _ = sensitivity(ev, pb, [0], images=1, rank="cost")
    assert [u["block"] for u in per_mac] == ["tiny", "mid", "big"]  # 8e-6, 5e-7, 1e-7 per MAC
    assert [u["block"] for u in by_cost] == ["big", "tiny", "mid"]
    assert {u["block"]: u["mac_share"] for u in per_mac} == {
        "big": 0.9009,
        "tiny": 0.009,
        "mid": 0.0901,
    }


def test_bisection_finds_the_nodes_a_builder_rejects():
    from deltadiff.calibration.trt_check import culprits

    nodes = [f"n{i}" for i in range(13)]
    bad = {"n3", "n11"}
    calls = []

    def builds(ns):
        calls.append(len(ns))
        return not (bad & set(ns))

    assert sorted(culprits(nodes, builds)) == ["n11", "n3"]
    assert len(calls) < len(nodes) * 2
    assert culprits(nodes, lambda ns: True) == []


def _island_matmul_float(model) -> bool:
    """The VQ distance MatMul (the one reading the codebook) reads no dequantized tensor."""
    from deltadiff.calibration.evaluate import vq_codebook

    assert vq_codebook(model) is not None
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    vq = [
        n
        for n in model.graph.node
        if n.op_type == "MatMul" and any(i in inits and len(inits[i].dims) == 2 for i in n.input)
    ]
    return len(vq) == 1 and not (set(vq[0].input) & dq)


def test_latent_vq_encoder_decoder_int8_both_targets(exported, images, tmp_path):
    """Small resshift-v3 preset (its encoder also reads the n_prior noise): the VQ-f4 encoder /
    decoder get INT8 graphs for both targets (the VQ distance + argmin stays FP32), recorded like
    the step rows, with per-graph fidelity and the VQ code flips in the score; the second target
    reuses the cache (no data pass). Every Conv/MatMul quantized and no quality bar here (random
    weights); the gate is tested below (deltadiff-latent), the RTX build in the slow test."""
    family = "resshift-v3"
    import onnx

    from deltadiff.calibration.qdq import quantized_nodes
    from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler

    d = tmp_path / "m"
    shutil.copytree(exported(family), d)
    cache = tmp_path / "ranges.json"
    feeds: list[int] = []
    for target in ("onnxruntime", "tensorrt"):
        opts = _all_int8(d, images, cache=cache, target=target, samples=1, rtx_check=False)
        res = calibrate(opts, on_feed=lambda: feeds.append(1))
        assert res.passed and res.data_pass == (target == "onnxruntime")
        assert res.score.codes_flipped is not None and 0.0 <= res.score.codes_flipped <= 1.0
        assert {"encoder", "decoder", "3"} <= set(res.report["graph_psnr_db"])
        m = load_manifest(d)
        for g in ("encoder", "decoder"):
            rec = m.graph(g, "int8", target)
            assert rec.file != m.graph(g).file and rec.file.startswith(f"{g}.int8.{target}.")
            q = rec.quant
            assert q["int8_nodes"] > 20 and q["int8_nodes"] <= q["candidates"]
            assert q["psnr_vs_fp32_db"] == res.report["graph_psnr_db"][g]
            model = onnx.load(str(d / rec.file))
            assert len(quantized_nodes(model)) == q["int8_nodes"]
            if target == "tensorrt":
                zps = [i for i in model.graph.initializer if i.name.endswith("__s8_zp")]
                assert zps and all(z.data_type == onnx.TensorProto.INT8 for z in zps)
        dec = m.graph("decoder", "int8", target)
        assert any("argmin" in k["why"] for k in dec.quant["kept_fp32"])
        assert _island_matmul_float(onnx.load(str(d / dec.file)))
    n_first = len(feeds)
    assert n_first > 0  # the data pass ran once (the tensorrt run added none)
    assert json.loads(cache.read_text())["stages"].keys() == {"encoder", "decoder"}
    rgb = np.random.default_rng(0).random((64, 64, 3), dtype=np.float32)
    with Upscaler(d, UpscaleOptions(precision="int8", threads=2)) as up:
        out = up.upscale(rgb)
        sessions = set(up.backend._sessions)
    m = load_manifest(d)
    assert {m.graph(g, "int8").file for g in ("encoder", "decoder")} <= sessions
    assert out.shape == (256, 256, 3) and np.isfinite(out).all()
    # dd-run bench times the INT8 latent model beside FP32 (stage by stage, VQ stages included)
    from deltadiff.cli.run import app as run_app

    args = ["bench", "--model", str(d), "--precision", "fp32", "--precision", "int8"]
    args += ["--threads", "2", "--warmup", "0", "--min-runs", "1", "--min-seconds", "0"]
    args += ["--no-reference", "--no-peak", "--no-plots", "--label", "t", "-o", str(tmp_path)]
    r = CliRunner().invoke(run_app, args)
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "bench-t.json").read_text())
    cells = {(c["precision"], c["mode"]): c for c in rep["cases"] if c["backend"] == "onnxruntime"}
    int8 = cells[("int8", "staged")]
    assert int8["status"] == "ok" and cells[("fp32", "staged")]["status"] == "ok"
    assert {"encode", "step_3", "decode"} <= set(int8["stages"])
    assert all(v["median"] > 0 for v in int8["stages"].values())


def test_latent_coarse_search_gates_the_vq_stages_with_the_rows(exported, images, tmp_path):
    """--coarse: the units are whole graphs (VQ encoder, the four rows, VQ decoder); the gate
    (>= 35 dB end to end vs FP32 on held-out images) holds with the fewest kept FP32."""
    d = tmp_path / "m"
    shutil.copytree(exported("deltadiff-latent"), d)
    res = calibrate(_opts(d, images, method="percentile", coarse=True, samples=1))
    assert res.passed and res.score.e2e_min_db >= 35.0
    units = {(r["row"], r["block"]) for r in res.report["sensitivity"]}
    assert units == {("encoder", "*"), ("decoder", "*"), *((t, "*") for t in (3, 2, 1, 0))}
    m = load_manifest(d)
    for k in res.report["kept_fp32"]:  # a unit kept FP32 points at the FP32 file
        stage = isinstance(k["row"], str)
        g = m.graph(k["row"] if stage else f"step@{k['row']}", "int8")
        assert g.quant["int8_nodes"] == 0
        base = k["row"] if stage else "step"
        assert g.file == m.graph(base).file


def test_search_from_another_target_skips_the_data_pass_and_the_search(
    calibrated, images, tmp_path
):
    d0, cache, res0, _ = calibrated
    d = tmp_path / "m"
    shutil.copytree(d0, d)
    feeds: list[int] = []
    res = calibrate(
        _opts(
            d,
            images,
            cache=cache,
            target="tensorrt",
            search_from=d / "int8-report.onnxruntime.json",
        ),
        on_feed=lambda: feeds.append(1),
    )
    assert feeds == [] and res.passed and res.method == res0.method
    assert res.report["sensitivity"] == res0.report["sensitivity"]
    assert len(res.report["kept_fp32"]) >= len(res0.report["kept_fp32"])
    assert res.seconds["methods"] < 1.0  # no method comparison either
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(DeltaDiffError, match="not a calibration report"):
        calibrate(_opts(d, images, cache=cache, target="tensorrt", search_from=bad))


def test_layer_units_split_blocks_and_the_other_target_reuses_them(calibrated, images, tmp_path):
    """--units layer: a ResBlock's convs are separate search units (its 1x1 skip conv, which
    adds unnormalised features to the block's output, can stay FP32 alone); the units partition
    the same nodes as the blocks; a --search-from run takes the other report's units."""
    import onnx

    from deltadiff.calibration.search import node_blocks

    d0, cache, _, _ = calibrated
    model = onnx.load(str(d0 / load_manifest(d0).graph("step").file))
    blocks, layers = node_blocks(model), node_blocks(model, units="layer")
    assert len(layers) > len(blocks)
    assert sorted(n for v in layers.values() for n in v) == sorted(
        n for v in blocks.values() for n in v
    )
    owner = {n: b for b, ns in blocks.items() for n in ns}
    for name, ns in layers.items():
        assert len({owner[n] for n in ns}) == 1, name  # a layer never spans two blocks
    skips = [k for k in layers if k.endswith("skip_connection")]
    assert skips and all(len(layers[k]) == 1 for k in skips)

    d = tmp_path / "m"
    shutil.copytree(d0, d)
    res = calibrate(_opts(d, images, cache=cache, method="percentile", units="layer"))
    assert res.report["units"] == "layer"
    searched = {r["block"] for r in res.report["sensitivity"]}
    assert searched <= set(layers) and searched - set(blocks)  # layers, not blocks, were searched
    assert "units: layer" in (d / "int8-report.onnxruntime.md").read_text()
    trt = calibrate(
        _opts(
            d,
            images,
            cache=cache,
            target="tensorrt",
            search_from=d / "int8-report.onnxruntime.json",
            rtx_check=False,
        )
    )
    assert trt.report["units"] == "layer"
    assert trt.report["sensitivity"] == res.report["sensitivity"]


@pytest.mark.trt
@pytest.mark.skipif(
    not HAVE_RTX, reason="tensorrt_rtx is not installed (pip install 'deltadiff-trt[trt]')"
)
def test_rtx_check_builds_dynamic_graphs_at_the_optimum_tile():
    """The bundled demo is a dynamic-shape export: its FP32 step graph must pass the
    calibrate-time RTX check (symbolic sizes built at the manifest tile, not left 0, which
    made every node look like a culprit)."""
    from deltadiff.calibration.trt_check import rtx_builds

    m = load_manifest(DEMO)
    assert m.dynamic
    assert rtx_builds((DEMO / m.graph("step").file).read_bytes(), m.graph("step").inputs, m)


def test_calibrate_records_int8_memory_so_int8_runs_images_whole(
    dynamic_exported, images, tmp_path
):
    """A dynamic model with an FP32 memory record gets an INT8 one from calibrate (measured at
    the same sizes), so dd-run runs INT8 images whole instead of inside the exported tile; a
    recalibration whose gate fails drops the record of the graphs it replaced. Also: the INT8
    rows' sessions share one CPU arena (four arenas of full-size activations were kept before)."""
    from deltadiff.runtime.memory_budget import measure, record_key
    from deltadiff.runtime.upscaler import UpscaleOptions, default_precision, plan_image

    d = tmp_path / "m"
    shutil.copytree(dynamic_exported("deltadiff-pixel"), d)
    m = load_manifest(d)
    fp32 = measure(d, [(32, 32), (64, 64)], threads=1)
    save_manifest(d, replace(m, memory={record_key("onnxruntime", "fp32", "staged"): fp32}))
    int8 = UpscaleOptions(precision="int8", max_memory=8.0)
    assert not plan_image(m, int8, 64, 64, max_lr_pixels(m, int8)).whole  # no INT8 record yet
    res = calibrate(_all_int8(d, images, threads=1))
    assert res.passed
    m = load_manifest(d)
    rec = m.memory["onnxruntime/int8/staged"]
    assert [p["lr"] for p in rec["points"]] == [[32, 32], [64, 64]]
    assert rec["points"][1]["peak_bytes"] > rec["points"][0]["peak_bytes"] > 0
    assert "onnxruntime/int8/staged" in res.report["memory"]
    assert plan_image(m, int8, 64, 64, max_lr_pixels(m, int8)).whole

    def peak(arena: str) -> int:
        cmd = [sys.executable, "-m", "deltadiff.runtime.memory_budget", str(d), "128", "128"]
        env = {**os.environ, "DELTADIFF_ORT_ARENA": arena}
        out = subprocess.run(
            [*cmd, "onnxruntime", "int8", "staged", "1"], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]

    shared, own = peak("shared"), peak("session")
    assert shared < 0.8 * own, (shared, own)

    res = calibrate(_all_int8(d, images, threads=1, min_e2e_db=1000.0))
    assert not res.passed
    assert "onnxruntime/int8/staged" not in load_manifest(d).memory
    # graphs that failed the gate are never the default
    assert default_precision(load_manifest(d), UpscaleOptions()) == "fp32"


def test_default_precision_is_int8_on_onnxruntime_cpu_once_the_gate_passed(
    calibrated, exported, tmp_path, monkeypatch
):
    """No --precision: INT8 on ONNX Runtime's CPU provider (staged) for a model whose INT8
    graphs passed the gate, on a CPU with fast 8-bit dot products (VNNI here: the CPU is
    stubbed, so the test means the same on every machine); FP32 for every other backend / mode,
    for models without INT8 graphs and on an AVX2-only CPU; an explicit --precision wins."""
    from deltadiff.cli.run import app as run_app
    from deltadiff.cpu import parse_cpuinfo
    from deltadiff.runtime import precision as P
    from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler, default_precision

    monkeypatch.setenv("DELTADIFF_CACHE", str(tmp_path / "cache"))  # no probe records
    avx2 = parse_cpuinfo("model name\t: AMD EPYC\nflags\t: avx avx2 fma\n")
    vnni = parse_cpuinfo("model name\t: Xeon\nflags\t: avx2 fma avx512f avx512_vnni\n")
    d, *_ = calibrated
    m = load_manifest(d)
    monkeypatch.setattr(P, "cpu_info", lambda: avx2)
    assert default_precision(m, UpscaleOptions()) == "fp32"
    monkeypatch.setattr(P, "cpu_info", lambda: vnni)
    assert default_precision(m, UpscaleOptions()) == "int8"
    assert default_precision(m, UpscaleOptions(mode="unrolled")) == "fp32"
    assert default_precision(m, UpscaleOptions(backend="tensorrt")) == "fp32"
    assert default_precision(m, UpscaleOptions(backend="onnxruntime-cuda")) == "fp32"
    assert default_precision(m, UpscaleOptions(precision="fp32")) == "fp32"
    assert default_precision(load_manifest(exported("deltadiff-pixel")), UpscaleOptions()) == "fp32"
    rgb = np.random.default_rng(1).random((16, 16, 3), dtype=np.float32)
    with Upscaler(d, UpscaleOptions(threads=1)) as up:
        assert up.opts.precision == "int8"
        default = up.upscale(rgb)
    with Upscaler(d, UpscaleOptions(precision="int8", threads=1)) as up:
        np.testing.assert_array_equal(default, up.upscale(rgb))
    with Upscaler(d, UpscaleOptions(precision="fp32", threads=1)) as up:
        assert np.abs(default - up.upscale(rgb)).max() > 0  # the INT8 graphs really ran
    src = tmp_path / "in.png"
    Image.fromarray((rgb * 255).astype(np.uint8)).save(src)
    r = CliRunner().invoke(
        run_app, ["upscale", str(src), "-o", str(tmp_path / "out.png"), "--model", str(d), "-q"]
    )
    assert r.exit_code == 0, r.output
    assert "onnxruntime/int8, staged" in r.output
    r = CliRunner().invoke(run_app, ["info", "--model", str(d)])
    assert r.exit_code == 0 and "onnxruntime/int8/staged" in r.output


def test_ort_arena_switch_is_checked_in_one_line(monkeypatch):
    import onnxruntime

    from deltadiff.errors import BackendError
    from deltadiff.runtime.backends import ort as ort_backend

    monkeypatch.setattr(ort_backend, "_env_arena", None)
    monkeypatch.setenv("DELTADIFF_ORT_ARENA", "bogus")
    with pytest.raises(BackendError, match="use 'shared'") as e:
        ort_backend.shared_cpu_arena(onnxruntime)
    assert "\n" not in str(e.value)
    monkeypatch.setenv("DELTADIFF_ORT_ARENA", "session")
    assert ort_backend.shared_cpu_arena(onnxruntime) is False
