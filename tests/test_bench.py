"""``dd-run bench``: statistics, MAC counts, report schema and Markdown cells, regression
comparison, the CLI (skips, --compare, no torch) and the ORT-vs-torch script's --small path.

No timing asserts: the comparison tests compare a run against saved reports scaled by 1/100 and
100, so no verdict depends on this machine's speed or noise."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from deltadiff.benchmarks.harness import (
    BenchOptions,
    CaseResult,
    CaseSpec,
    Stats,
    plan_cases,
    run_bench,
)
from deltadiff.benchmarks.report import (
    compare_reports,
    load_report,
    stage_columns,
    validate_report,
)
from deltadiff.errors import DeltaDiffError
from deltadiff.export.flops import count_macs

from .conftest import REPO
from .test_runtime_no_torch import BLOCK

PIXEL = "deltadiff-pixel"
STAGED = ["encode", "step_3", "step_2", "step_1", "step_0", "decode"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _tool(name: str):
    """A lab script of ``tools/`` (not packaged), imported by path."""
    spec = importlib.util.spec_from_file_location(f"_tools_{name}", REPO / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _opts(model: Path, **kw) -> BenchOptions:
    base = dict(
        models=(model,),
        threads=1,
        warmup=0,
        min_runs=3,
        min_seconds=0.0,
        peak=False,
        reference=False,
        plots=False,
        command="pytest",
    )
    base.update(kw)
    return BenchOptions(**base)


# ---------------------------------------------------------------------------------------------
# statistics and the case grid


def test_stats_on_known_timings():
    s = Stats.from_times([i / 1000 for i in range(1, 11)])  # 1..10 ms
    assert s.n == 10
    assert s.min == pytest.approx(0.001) and s.max == pytest.approx(0.010)
    assert s.median == pytest.approx(0.0055)
    assert s.mean == pytest.approx(0.0055)
    assert s.p90 == pytest.approx(0.0091)  # linear interpolation between 9 and 10
    assert s.p95 == pytest.approx(0.00955)
    assert s.p99 == pytest.approx(0.00991)
    assert s.stdev == pytest.approx(0.0030276504, rel=1e-6)  # sample stdev (ddof 1)
    assert s.cov == pytest.approx(0.5504819, rel=1e-6)
    one = Stats.from_times([0.5])
    assert one.median == 0.5 and one.cov == 0.0


def test_cov_over_threshold_sets_the_warning_flag():
    res = CaseResult(
        model="m@16x16", spec=CaseSpec("onnxruntime", "fp32", "unrolled", 1), out_hw=(64, 64)
    )
    res.stage_order = ["unrolled"]
    res.samples = {"unrolled": [0.010, 0.010, 0.030], "e2e": [0.010, 0.010, 0.030]}
    d = res.to_dict()
    assert d["cov_warning"] and d["noisy_stages"] == ["unrolled"]
    res.cov_warn = 2.0
    assert not res.to_dict()["cov_warning"]
    assert d["throughput"]["images_per_s"] == pytest.approx(100.0)
    assert d["throughput"]["megapixels_per_s"] == pytest.approx(64 * 64 / 1e6 / 0.010)


def test_plan_cases_normalises_torch_and_drops_duplicates():
    opts = BenchOptions(
        models=(Path(),),
        backends=("onnxruntime", "torch", "torch-autocast"),
        precisions=("fp32", "fp16"),
        modes=("staged", "unrolled"),
    )
    names = [c.name for c in plan_cases(opts)]
    assert names == [
        "onnxruntime/fp32/staged/b1",
        "onnxruntime/fp32/unrolled/b1",
        "onnxruntime/fp16/staged/b1",
        "onnxruntime/fp16/unrolled/b1",
        "torch/fp32/eager/b1",
        "torch-autocast/fp16/eager/b1",
    ]


def test_bad_options_name_the_option():
    with pytest.raises(DeltaDiffError, match="unknown backend 'tensorrtx'"):
        BenchOptions(models=(Path(),), backends=("tensorrtx",)).check()
    with pytest.raises(DeltaDiffError, match="--min-runs"):
        BenchOptions(models=(Path(),), min_runs=0).check()


# ---------------------------------------------------------------------------------------------
# MAC counter


def test_mac_counter_matches_an_independent_torch_count(exported):
    import torch

    from deltadiff.model.pipeline import Pipeline
    from deltadiff.model.swin_unet import WindowAttention

    pipe = Pipeline.from_preset("deltadiff-pixel-small", seed=0)
    tot = {"conv": 0, "linear": 0, "attn": 0}

    def conv(m, i, o):
        tot["conv"] += o.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, i, o):
        tot["linear"] += o.numel() * m.in_features

    def attn(m, i, o):
        bw, n, c = i[0].shape  # q @ k^T and attn @ v: 2 * Bw * N * N * C
        tot["attn"] += 2 * bw * n * n * c

    for mod in pipe.modules():
        if isinstance(mod, torch.nn.Conv2d):
            mod.register_forward_hook(conv)
        elif isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(linear)
        elif isinstance(mod, WindowAttention):
            mod.register_forward_hook(attn)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        pipe.step(x, x, x, torch.tensor([3]), 0.5, 0.0, 1.0, 0.0)
    assert tot["attn"] > 0 and tot["linear"] > 0

    model = exported(PIXEL)
    step = count_macs(model / "step.onnx", batch=1)
    assert step.uncounted == ()
    assert step.total == sum(tot.values())
    assert set(step.by_op) == {"Conv", "Gemm", "MatMul"}
    # batch 2 doubles everything except the timestep-embedding Gemms (t is (1,))
    step2 = count_macs(model / "step.onnx", batch=2)
    assert step2.total == 2 * step.total - step.by_op["Gemm"]
    # the unrolled graph = encoder + 4 steps, with the timestep embeddings constant-folded
    enc = count_macs(model / "encoder.onnx", batch=1)
    un = count_macs(model / "unrolled.onnx", batch=1)
    assert un.total == enc.total + 4 * (step.total - step.by_op["Gemm"])


def test_mac_counter_conv_transpose_gemm_matmul_einsum():
    from onnx import TensorProto, helper, numpy_helper

    def model(nodes, inputs, inits=()):
        g = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            list(inits),
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])

    w = numpy_helper.from_array(np.zeros((8, 4, 3, 3), np.float32), "w")
    ct = model(
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2])],
        [("x", ["batch", 8, 4, 4])],
        [w],
    )
    assert count_macs(ct, batch=2).total == 2 * 8 * 4 * 4 * 4 * 9
    gm = model(
        [helper.make_node("Gemm", ["a", "b"], ["y"], transA=1)], [("a", [7, 3]), ("b", [7, 5])]
    )
    assert count_macs(gm).total == 3 * 5 * 7
    mm = model(
        [helper.make_node("MatMul", ["a", "b"], ["y"])], [("a", [2, 1, 3, 4]), ("b", [5, 4, 6])]
    )
    assert count_macs(mm).total == 2 * 5 * 3 * 6 * 4
    es = model(
        [helper.make_node("Einsum", ["a", "b"], ["y"], equation="...ij,...jk->...ik")],
        [("a", [2, 3, 4]), ("b", [2, 4, 5])],
    )
    assert count_macs(es).total == 2 * 3 * 4 * 5
    gn = model(  # GroupNormalization (opset 21) has no onnx shape inference: still counted through
        [
            helper.make_node("GroupNormalization", ["x", "s", "s"], ["g"], num_groups=2),
            helper.make_node("Conv", ["g", "w2"], ["y"], kernel_shape=[1, 1]),
        ],
        [("x", ["batch", 4, 5, 5]), ("s", [4])],
        [numpy_helper.from_array(np.zeros((6, 4, 1, 1), np.float32), "w2")],
    )
    assert count_macs(gn, batch=3).total == 3 * 6 * 5 * 5 * 4


# ---------------------------------------------------------------------------------------------
# one real run: onnxruntime staged + unrolled, torch eager, reference, peak, quality, plots


@pytest.fixture(scope="module")
def bench_run(exported, tmp_path_factory):
    model = exported(PIXEL)
    root = tmp_path_factory.mktemp("bench")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):  # HR 64x64 -> LR 16x16: one tile each
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(data / f"img{i}.png")
    opts = _opts(
        model,
        backends=("onnxruntime", "torch"),
        modes=("staged", "unrolled"),
        warmup=1,
        peak=True,
        peak_seconds=0.1,
        reference=True,
        plots=True,
        dataset=data,
        out=root / "out",
        label="ci",
    )
    report = run_bench(opts)
    return report, root / "out"


def test_report_json_validates_against_the_schema(bench_run):
    report, out = bench_run
    d = json.loads((out / "bench-ci.json").read_text())
    validate_report(d)
    assert d["schema_version"] == 1
    env = d["environment"]
    assert env["cpu"]["logical_cores"] >= 1 and env["versions"]["onnxruntime"]
    assert env["command"] == "pytest" and env["label"] == "ci"
    assert {c["status"] for c in d["cases"]} == {"ok"}
    bad = json.loads(json.dumps(d))
    bad["cases"][0]["e2e"]["median"] = -1.0
    with pytest.raises(jsonschema.ValidationError, match="minimum"):
        validate_report(bad)


def test_old_reports_with_the_removed_isa_mask_fields_still_load_and_validate():
    """Committed reports from before the ISA mask was removed keep ``cpu.isa_mask``; new ones
    do not write it, and reading or comparing the old ones still works."""
    old = REPO / "benchmarks/results/int8/bench-cpu-2core-epyc-avx2-patch-mask-int8-lr128.json"
    d = load_report(old)
    assert d["environment"]["cpu"]["isa_mask"] == "avx2"
    validate_report(d)
    cmp = compare_reports(d, d)
    assert cmp.cells and not cmp.regressions


def test_report_numbers_are_consistent(bench_run):
    report, _ = bench_run
    d = report.to_dict()
    by = {(c["backend"], c["mode"]): c for c in d["cases"]}
    staged, unrolled, torch_c = (
        by[("onnxruntime", "staged")],
        by[("onnxruntime", "unrolled")],
        by[("torch", "eager")],
    )
    assert list(staged["stages"]) == STAGED and list(unrolled["stages"]) == ["unrolled"]
    assert list(torch_c["stages"]) == STAGED
    for c in (staged, unrolled, torch_c):
        assert c["runs"] >= 3 and len(c["samples"]["e2e"]) == c["runs"]
        e = c["e2e"]
        assert e["min"] <= e["median"] <= e["p90"] <= e["p95"] <= e["p99"] <= e["max"]
        assert c["throughput"]["images_per_s"] == pytest.approx(1 / e["median"])
        assert c["memory"]["rss_peak_mb"] >= c["memory"]["rss_baseline_mb"] > 0
        assert c["memory"]["gpu_used_peak_mb"] is None  # no GPU here
        assert c["ttfr"]["total_s"] > 0
        assert c["flops"]["gmacs"] > 0 and c["flops"]["achieved_over_peak"] > 0
    # fidelity: torch eager is the reference itself; ORT FP32 is close to it
    assert torch_c["fidelity"]["psnr_inf"] and torch_c["fidelity"]["max_abs"] == 0.0
    assert staged["fidelity"]["psnr_db"] > 60 and unrolled["fidelity"]["psnr_db"] > 60
    # staged and unrolled run the same MACs up to the folded timestep embeddings
    assert staged["flops"]["macs"] == pytest.approx(unrolled["flops"]["macs"], rel=1e-3)
    assert set(d["peaks"]) == {"onnxruntime-cpu", "torch-cpu"}
    assert d["models"][0]["reference"]["status"] == "ok"


def _md_rows(md: str, model: str) -> tuple[list[str], dict[tuple[str, str], list[str]]]:
    sec = md.split(f"## {model}", 1)[1]
    lines = [ln for ln in sec.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(header):
            break
        rows[(cells[0], cells[2])] = cells
    return header, rows


def test_markdown_has_every_backend_stage_cell(bench_run):
    report, out = bench_run
    md = (out / "bench-ci.md").read_text()
    header, rows = _md_rows(md, "deltadiff-pixel-small@16x16")
    assert header[4 : 4 + 7] == [*STAGED, "unrolled"]
    assert set(rows) == {("onnxruntime", "staged"), ("onnxruntime", "unrolled"), ("torch", "eager")}
    for (backend, mode), cells in rows.items():
        got = dict(zip(header, cells, strict=True))
        for stage in [*STAGED, "unrolled"]:
            applies = (stage == "unrolled") == (mode == "unrolled")
            if applies:
                assert float(got[stage]) > 0, (backend, mode, stage)
            else:
                assert got[stage] == "n/a", (backend, mode, stage)
        for col in (
            "e2e median",
            "e2e p90",
            "e2e p99",
            "img/s",
            "MP/s",
            "TTFR (s)",
            "GMACs",
            "peak RSS (MB)",
        ):
            assert float(got[col]) > 0, (backend, mode, col)
        assert got["CoV"].endswith("%") or "⚠" in got["CoV"]
        assert got["achieved/peak"].endswith("%")
    assert rows[("torch", "eager")][header.index("PSNR vs ref (dB)")] == "inf"
    assert "![per-stage latency](bench-ci-stages.png)" in md


def test_quality_section_and_plots(bench_run):
    report, out = bench_run
    d = report.to_dict()
    q = d["models"][0]["quality"]
    names = [s["upscaler"] for s in q["upscalers"]]
    assert names == ["bicubic", "onnxruntime/fp32"]
    assert q["n_images"] == 2
    skipped = {s["upscaler"]: s["reason"] for s in d["models"][0]["quality_skipped"]}
    assert "torch/fp32" in skipped
    md = (out / "bench-ci.md").read_text()
    assert "### Quality on" in md and "| onnxruntime/fp32 |" in md
    for kind in ("stages", "fidelity"):
        png = out / f"bench-ci-{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "bench-ci-tiles.png").exists()
    assert any(
        "one tile size" in n for n in json.loads((out / "bench-ci.json").read_text())["notes"]
    )


def test_cases_that_cannot_run_here_are_skipped_with_reasons(exported, tmp_path):
    opts = _opts(
        exported(PIXEL),
        backends=("onnxruntime", "onnxruntime-cuda", "tensorrt", "torch-autocast"),
        precisions=("fp32", "fp16"),
        modes=("unrolled",),
        batches=(1, 8),
        out=tmp_path,
    )
    report = run_bench(opts)
    status = {c.spec.name: (c.status, c.reason) for c in report.cases}
    assert status.pop("onnxruntime/fp32/unrolled/b1") == ("ok", None)
    assert all(st == "skipped" and why for st, why in status.values()), status
    assert "outside the model's batch range [1, 4]" in status["onnxruntime/fp32/unrolled/b8"][1]
    assert "no fp16 unrolled graph" in status["onnxruntime/fp16/unrolled/b1"][1]
    assert "CUDAExecutionProvider" in status["onnxruntime-cuda/fp32/unrolled/b1"][1]
    assert "torch-autocast (fp16) needs CUDA" in status["torch-autocast/fp16/eager/b1"][1]
    validate_report(load_report(tmp_path / "bench.json"))
    md = (tmp_path / "bench.md").read_text()
    for name, (_, why) in status.items():
        backend, precision, mode, b = name.split("/")
        assert f"- {backend} / {precision} / {mode} / {b}: skipped: {why}" in md


# ---------------------------------------------------------------------------------------------
# comparison


def _fake_report(cells: dict[str, tuple[float, float]]) -> dict:
    """{stage: (median, cov)} -> a minimal report dict with one ok case."""
    stages = {s: {"median": m, "cov": c} for s, (m, c) in cells.items() if s != "e2e"}
    return {
        "cases": [
            {
                "id": "m@16x16/onnxruntime/fp32/staged/b1",
                "status": "ok",
                "stages": stages,
                "e2e": {"median": cells["e2e"][0], "cov": cells["e2e"][1]},
            }
        ]
    }


def test_regression_rule_on_synthetic_reports():
    old = _fake_report({"step_3": (0.010, 0.02), "e2e": (0.040, 0.02)})
    same = compare_reports(_fake_report({"step_3": (0.0105, 0.02), "e2e": (0.040, 0.02)}), old)
    assert not same.regressions
    c = same.cells[0]
    assert c.ratio == pytest.approx(1.05)
    assert c.threshold == pytest.approx(1.10)  # floor wins: 3 * sqrt(2) * 0.02 = 0.085 < 0.10
    slow = compare_reports(_fake_report({"step_3": (0.012, 0.02), "e2e": (0.040, 0.02)}), old)
    assert [(r.stage, round(r.ratio, 3)) for r in slow.regressions] == [("step_3", 1.2)]
    noisy = compare_reports(_fake_report({"step_3": (0.012, 0.10), "e2e": (0.040, 0.10)}), old)
    assert not noisy.regressions  # 1 + 3 * sqrt(0.02^2 + 0.1^2) = 1.306 > 1.2
    assert noisy.cells[0].threshold == pytest.approx(1 + 3 * math.hypot(0.02, 0.10))
    faster = compare_reports(_fake_report({"step_3": (0.005, 0.02), "e2e": (0.040, 0.02)}), old)
    assert faster.cells[0].faster and not faster.regressions


def test_tiny_stages_are_not_flagged_for_jitter():
    # a 1 ms stage taking 4 ms in a 2 s pipeline: large ratio, immaterial shift (< 2 % of e2e)
    old = _fake_report({"encode": (0.001, 0.05), "e2e": (2.0, 0.05)})
    new = _fake_report({"encode": (0.004, 0.05), "e2e": (2.0, 0.05)})
    assert not compare_reports(new, old).regressions
    new = _fake_report({"encode": (0.100, 0.05), "e2e": (2.1, 0.05)})  # 99 ms more: material
    assert [r.stage for r in compare_reports(new, old).regressions] == ["encode"]


def test_bench_compare_command_compares_two_saved_reports(tmp_path):
    from typer.testing import CliRunner

    from deltadiff.cli.run import app

    old = _fake_report({"step_3": (0.010, 0.02), "e2e": (0.040, 0.02)})
    new = _fake_report({"step_3": (0.020, 0.02), "e2e": (0.050, 0.02)})
    for name, d in (("old", old), ("new", new)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"schema_version": 1, **d}))
    args = ["bench-compare", str(tmp_path / "new.json"), str(tmp_path / "old.json")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "2 regression(s)" in r.output, r.output
    r = CliRunner().invoke(app, [*args, "--fail-on-regression"])
    assert r.exit_code == 1
    r = CliRunner().invoke(app, ["bench-compare", str(tmp_path / "new.json"), str(tmp_path / "x")])
    assert r.exit_code == 1 and "file not found" in r.output


_TIME_KEYS = ("min", "mean", "median", "p90", "p95", "p99", "max", "stdev")


def _scaled_report(path: Path, factor: float, dest: Path) -> Path:
    """A copy of a saved report whose every latency is ``factor`` times the measured one."""
    d = json.loads(path.read_text())
    for case in d["cases"]:
        for st in [case["e2e"], *case["stages"].values()]:
            for k in _TIME_KEYS:
                if isinstance(st.get(k), int | float):
                    st[k] *= factor
    dest.write_text(json.dumps(d))
    return dest


def test_compare_against_a_report_100x_faster_or_slower(bench_run, exported, tmp_path):
    """--compare / --fail-on-regression end to end. The earlier reports are the fixture's own
    numbers scaled by 1/100 and by 100, so the verdicts do not depend on this machine's noise."""
    from deltadiff.cli.bench import bench_main

    _report, out = bench_run
    saved = out / "bench-ci.json"
    model = exported(PIXEL)
    kw = dict(modes=("staged",), min_runs=3, fail_on_regression=True)
    sink = io.StringIO()
    faster = _scaled_report(saved, 0.01, tmp_path / "faster.json")
    code = bench_main(_opts(model, out=tmp_path / "c", compare=faster, **kw), out=sink, err=sink)
    assert code == 1, sink.getvalue()[-2000:]
    assert "REGRESSION" in sink.getvalue() and "regression(s) against" in sink.getvalue()
    slowed = load_report(tmp_path / "c" / "bench.json")["comparison"]
    flagged = {c["stage"] for c in slowed["cells"] if c["regression"]}
    assert flagged == {*STAGED, "e2e"}, slowed["cells"]
    md = (tmp_path / "c" / "bench.md").read_text()
    assert "**REGRESSION**" in md and "## Comparison with an earlier report" in md

    slower = _scaled_report(saved, 100.0, tmp_path / "slower.json")
    sink = io.StringIO()
    code = bench_main(_opts(model, out=tmp_path / "d", compare=slower, **kw), out=sink, err=sink)
    assert code == 0, sink.getvalue()[-2000:]
    cmp = load_report(tmp_path / "d" / "bench.json")["comparison"]
    assert cmp["n_cells"] == 7 and cmp["n_regressions"] == 0, cmp


# ---------------------------------------------------------------------------------------------
# CLI


def _dd_run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["dd-run", *args], capture_output=True, text=True, timeout=600, env=env or ENV
    )


def test_dd_run_bench_help():
    r = _dd_run("bench", "--help")
    assert r.returncode == 0, r.stderr
    for opt in (
        "--model",
        "--backend",
        "--min-runs",
        "--min-seconds",
        "--compare",
        "--label",
        "--dataset",
    ):
        assert opt in r.stdout


def test_dd_run_bench_skips_tensorrt_with_a_reason_and_writes_the_report(exported, tmp_path):
    model = str(exported(PIXEL))
    common = [
        "--model",
        model,
        "--backend",
        "onnxruntime",
        "--backend",
        "tensorrt",
        "--mode",
        "unrolled",
        "--threads",
        "1",
        "--warmup",
        "0",
        "--min-runs",
        "2",
        "--min-seconds",
        "0",
        "--no-peak",
        "--no-reference",
        "--no-plots",
        "--label",
        "ci",
    ]
    r = _dd_run("bench", *common, "--out", str(tmp_path / "one"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tensorrt/fp32/unrolled/b1" in r.stderr and "skipped" in r.stderr
    d = load_report(tmp_path / "one" / "bench-ci.json")
    validate_report(d)
    trt = next(c for c in d["cases"] if c["backend"] == "tensorrt")
    assert trt["status"] == "skipped" and trt["reason"]
    md = (tmp_path / "one" / "bench-ci.md").read_text()
    assert f"tensorrt / fp32 / unrolled / b1: skipped: {trt['reason']}" in md
    # --compare against it: ratios printed, exit 0 without --fail-on-regression
    r2 = _dd_run(
        "bench",
        *common,
        "--out",
        str(tmp_path / "two"),
        "--compare",
        str(tmp_path / "one" / "bench-ci.json"),
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "compare vs" in r2.stdout and "onnxruntime/fp32/unrolled/b1" in r2.stdout
    cmp = load_report(tmp_path / "two" / "bench-ci.json")["comparison"]
    assert cmp["n_cells"] == 2


def test_dd_run_bench_errors_are_one_line(tmp_path):
    r = _dd_run("bench", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _dd_run(
        "bench", "--model", str(tmp_path), "--backend", "nope", "--out", str(tmp_path / "o")
    )
    assert (
        r.returncode == 1 and "unknown backend 'nope'" in r.stderr and "Traceback" not in r.stderr
    )


def test_dd_run_bench_works_without_torch(exported, tmp_path):
    model = str(exported(PIXEL))
    code = (
        "import sys\nfrom deltadiff.cli.run import app\n"
        f"sys.argv=['dd-run','bench','--model',{model!r},'--backend','onnxruntime','--backend','torch',"
        f"'--threads','1','--warmup','0','--min-runs','2','--min-seconds','0','--no-plots','--out',{str(tmp_path)!r}]\n"
        "try:\n    app()\nexcept SystemExit as e:\n    sys.exit(e.code)\n"
        "finally:\n    assert 'torch' not in sys.modules\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=600, env=ENV
    )
    assert r.returncode == 0, r.stderr[-3000:]
    d = load_report(tmp_path / "bench.json")
    torch_case = next(c for c in d["cases"] if c["backend"] == "torch")
    assert torch_case["status"] == "skipped" and "torch is not installed" in torch_case["reason"]
    ort = next(c for c in d["cases"] if c["backend"] == "onnxruntime")
    assert ort["status"] == "ok" and ort["fidelity"]["psnr_db"] is None
    assert "torch is not installed" in ort["fidelity"]["reason"]
    assert d["environment"]["versions"]["torch"]  # installed, only blocked: still recorded


def test_stage_columns_keep_every_stage():
    model = {"stages": STAGED}
    assert stage_columns(model, []) == [*STAGED, "unrolled"]


# ---------------------------------------------------------------------------------------------
# the ORT-vs-torch script


def test_ort_vs_torch_script_small_path_reuses_the_cache(exported, tmp_path, capsys):
    script = _tool("bench_ort_vs_torch")

    cache = tmp_path / "cache"
    cached = script.model_dir(cache, "deltadiff-pixel-small", 16)
    shutil.copytree(exported(PIXEL), cached)
    stamp = (cached / "manifest.json").stat().st_mtime_ns
    code = script.main(
        [
            "--small",
            "--presets",
            PIXEL,
            "--cache",
            str(cache),
            "--out",
            str(tmp_path / "out"),
            "--threads",
            "1",
            "--warmup",
            "0",
            "--min-runs",
            "2",
            "--no-peak",
        ]
    )
    assert code == 0
    assert (cached / "manifest.json").stat().st_mtime_ns == stamp  # reused, not re-exported
    text = capsys.readouterr().out
    assert "speed-up" in text
    rows = {
        ln.split()[0] + " " + ln.split()[1]: ln
        for ln in text.splitlines()
        if ln.startswith(("torch ", "onnxruntime "))
    }
    assert set(rows) == {"torch eager", "onnxruntime staged", "onnxruntime unrolled"}
    assert rows["torch eager"].rstrip().endswith("1.00x")
    d = load_report(tmp_path / "out" / "bench.json")
    validate_report(d)
    assert [c["status"] for c in d["cases"]] == ["ok", "ok", "ok"]


@pytest.mark.slow
def test_ort_vs_torch_script_exports_when_the_cache_is_empty(tmp_path):
    script = _tool("bench_ort_vs_torch")

    code = script.main(
        [
            "--small",
            "--presets",
            PIXEL,
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "out"),
            "--threads",
            "1",
            "--warmup",
            "0",
            "--min-runs",
            "2",
            "--no-peak",
        ]
    )
    assert code == 0
    assert (
        script.model_dir(tmp_path / "cache", "deltadiff-pixel-small", 16) / "manifest.json"
    ).exists()


def test_int8_runtimes_script_times_fp32_and_each_int8_row(tmp_path, capsys):
    """tools/bench_int8_runtimes.py on the bundled demo (ONNX Runtime; OpenVINO too when
    installed): one cell per runtime x graph, FP32 equal to itself, INT8 rows close but not
    equal, the report written."""
    b = _tool("bench_int8_runtimes")
    from deltadiff.runtime.upscaler import default_model_dir

    extra = ["--runtime", "openvino"] if importlib.util.find_spec("openvino") else []
    args = ["--model", str(default_model_dir()), "--lr", "16", "--runs", "1", *extra]
    b.main([*args, "--out", str(tmp_path), "--label", "t"])
    res = json.loads((tmp_path / "int8-runtimes-t.json").read_text())
    cells = {(c["runtime"], c["graph"]): c for c in res["cells"]}
    rows = {g for _, g in cells if g.startswith("int8 t=")}
    assert rows and ("onnxruntime", "fp32") in cells
    assert cells[("onnxruntime", "fp32")]["psnr_vs_ort_fp32_db"] is None  # equal to itself
    for g in rows:
        assert 30 < cells[("onnxruntime", g)]["psnr_vs_ort_fp32_db"] < 150
    assert all(c["median_ms"] > 0 for c in cells.values())
    assert "| onnxruntime | fp32 |" in (tmp_path / "int8-runtimes-t.md").read_text()
    with pytest.raises(SystemExit, match="NAME=FILE"):
        b.main([*args, "--graph", "nofile", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="accepts LR 4x4..512x512 in multiples of 4"):  # 15: no
        b.main(["--model", str(default_model_dir()), "--lr", "15", "--out", str(tmp_path)])


def test_bench_at_an_lr_size_runs_a_dynamic_model_whole(dynamic_exported, exported, tmp_path):
    """``--lr``: the harness feeds the dynamic model (and the torch reference) an LR image of that
    size instead of the tile, so it times what ``dd-run upscale`` runs on a whole image; a static
    export or a size the graphs do not accept is one line naming the fix."""
    from deltadiff.manifest import load_manifest

    d = dynamic_exported(PIXEL)
    m = load_manifest(d)
    hw = (2 * m.lr_multiple, 3 * m.lr_multiple)
    assert hw != tuple(m.tile)
    out = tmp_path / "o"
    run_bench(_opts(d, lr=hw, reference=True, out=out, label="lr"))
    rep = json.loads((out / "bench-lr.json").read_text())
    validate_report(rep)
    (model,) = rep["models"]
    assert model["key"] == f"{m.name}@{hw[0]}x{hw[1]}" and model["lr_hw"] == list(hw)
    assert rep["options"]["lr"] == list(hw)
    (case,) = rep["cases"]
    assert case["status"] == "ok" and case["output_hw"] == [4 * hw[0], 4 * hw[1]]
    fid = case["fidelity"]  # ONNX Runtime vs the torch reference, both at this LR size
    assert fid["psnr_inf"] or fid["psnr_db"] > 60, fid
    with pytest.raises(DeltaDiffError, match="static export"):
        run_bench(_opts(exported(PIXEL), lr=hw))
    with pytest.raises(DeltaDiffError, match="multiples of"):
        run_bench(_opts(d, lr=(m.lr_multiple + 1, m.lr_multiple)))
    r = _dd_run("bench", "--model", str(d), "--lr", "0x3", "--out", str(tmp_path / "p"))
    assert r.returncode == 1 and "--lr '0x3'" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# dd-run bench-cli: the end-to-end `dd-run upscale` timing


def test_bench_cli_times_fresh_upscale_processes(tmp_path):
    """One cold + one timed run of one variant on a 16x16 image with the bundled demo model:
    the report names the sizes (WIDTHxHEIGHT), the command and the peak RSS, and no ISA."""
    from typer.testing import CliRunner

    from deltadiff.cli.run import app

    img = tmp_path / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((16, 24, 3)) * 255).astype(np.uint8)).save(img)  # W=24, H=16
    args = [
        "bench-cli",
        str(img),
        "--runs",
        "1",
        "--variant",
        "fp32:OMP_NUM_THREADS=1 --precision fp32",
    ]
    r = CliRunner().invoke(
        app, [*args, "-o", str(tmp_path / "o"), "--label", "t", "--", "--threads", "1"]
    )
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "o" / "upscale-cli-t.json").read_text())
    assert d["input_size"] == [24, 16] and d["output_size"] == [96, 64]
    v = d["variants"]["fp32"]
    assert v["command"] == (
        "OMP_NUM_THREADS=1 dd-run upscale in.png -o out.png --precision fp32 --threads 1"
    )
    assert len(v["runs_s"]) == 1 and v["median_s"] == v["runs_s"][0] > 0 and v["first_s"] > 0
    assert v["peak_rss_mib"] > 20  # the child's own peak: Python + numpy + onnxruntime
    assert "isa" not in json.dumps(d["variants"]) and "isa_mask" not in d["environment"]["cpu"]
    md = (tmp_path / "o" / "upscale-cli-t.md").read_text()
    assert "24x16 -> 96x64" in md and "| fp32 | `OMP_NUM_THREADS=1 dd-run upscale" in md


def test_bench_cli_bad_input_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from deltadiff.benchmarks.bench_upscale_cli import Variant
    from deltadiff.cli.run import app

    assert Variant.parse("a:K=1 'L=x y' --tile 64") == Variant(
        "a", {"K": "1", "L": "x y"}, ("--tile", "64")
    )
    img = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    cases = [
        (["bench-cli", str(tmp_path / "none.png")], "does not exist"),
        (["bench-cli", str(img), "--variant", ":--precision fp32"], "write NAME:OPTIONS"),
        (["bench-cli", str(img), "--runs", "0"], "at least 1 run"),
        (["bench-cli", str(img), "--variant", "a:", "--variant", "a:-v"], "must be unique"),
        (["bench-cli", str(img), "--label", "a/b"], "a plain name"),
        # dd-run upscale itself fails: its last stderr line, named by variant
        (
            ["bench-cli", str(img), "--runs", "1", "--variant", "bad:--precision int9"],
            "(bad) failed",
        ),
    ]
    for args, msg in cases:
        r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "o")])
        assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, (
            args,
            r.output,
        )
        assert len(r.output.strip().splitlines()) <= 2, r.output  # one line (rich may wrap once)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
