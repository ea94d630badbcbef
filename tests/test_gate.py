"""The runtime gate (calibration/gate.py, dd-export gate): whole images through the runtime at
FP32 and the candidate precision, scored against HR.

The model is the bundled demo with INT8 records that point at its FP32 graphs (what calibrate
writes for a row kept FP32), so the real INT8 runtime path runs and its outputs equal FP32's;
the failing cases replace the candidate's output with FP32's plus a constructed error."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from deltadiff.calibration import gate as G
from deltadiff.calibration.calibrate import (
    CalibrateOptions,
    _check_gate_data,
    _runtime_gate,
    calibrate,
)
from deltadiff.cli.export import app as export_app
from deltadiff.errors import DeltaDiffError
from deltadiff.manifest import load_manifest, save_manifest, sha256_file
from deltadiff.metrics import degrade_x4

DEMO = Path(__file__).resolve().parents[1] / "runtime" / "models" / "demo-pixel"
N_REAL = 3  # pairs run for real (both precisions through the runtime)
LR_REAL = 8  # their LR side: HR 32 px, the smallest with two 8 px strips and an interior
N_IMAGES = 8  # pairs with synthetic outputs
LR = 12


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The demo's FP32 staged graphs, with INT8 records pointing at them (all rows kept FP32)."""
    d = tmp_path_factory.mktemp("gate-model")
    m = load_manifest(DEMO)
    keep = {k: m.graphs[k] for k in ("encoder", "step", "decoder")}
    for g in keep.values():
        shutil.copy(DEMO / g.file, d / g.file)
    quant = {"usable": True, "int8_nodes": 0, "why": "kept FP32 (test)"}
    int8 = {
        f"{name}.int8.onnxruntime": replace(
            keep[base], precision="int8", target="onnxruntime", quant=quant
        )
        for name, base in [("encoder", "encoder"), ("decoder", "decoder")]
        + [(f"step@{r.t}", "step") for r in m.step_table.rows]
    }
    mem = {k: v for k, v in m.memory.items() if k.endswith(("fp32/staged", "int8/staged"))}
    save_manifest(d, replace(m, graphs={**keep, **int8}, engines=[], memory=mem))
    return d


def smooth(rng: np.random.Generator, side: int, i: int) -> np.ndarray:
    """A smooth colour field with a vertical edge, uint8 (side x side x 3)."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    c = rng.random((3, 3))
    img = np.stack([c[k, 0] + c[k, 1] * xx + c[k, 2] * np.sin(6 * yy + i) for k in range(3)], -1)
    img[:, side // 2 + i :] *= 0.5
    return np.clip(img / img.max() * 220 + 16, 0, 255).astype(np.uint8)


def write_pairs(d: Path, hrs: dict[str, np.ndarray]) -> Path:
    """gt/ + lq/ (LR = MATLAB bicubic x1/4 of HR) and a corpus manifest with two sources."""
    (d / "gt").mkdir()
    (d / "lq").mkdir()
    for name, hr in hrs.items():
        Image.fromarray(hr).save(d / "gt" / f"{name}.png")
        Image.fromarray(degrade_x4(hr)).save(d / "lq" / f"{name}.png")
    entries = [{"name": n, "source": f"synth-{'ab'[i % 2]}"} for i, n in enumerate(hrs)]
    (d / "manifest.json").write_text(json.dumps({"images": entries}))
    return d


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    rng = np.random.default_rng(7)
    hrs = {f"img{i}": smooth(rng, 4 * LR_REAL, i) for i in range(N_REAL)}
    return write_pairs(tmp_path_factory.mktemp("gate-pairs"), hrs)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gate-cache")


def _opts(model: Path, pairs: Path, cache: Path, out: Path, **kw) -> G.GateOptions:
    return G.GateOptions(model=model, data=pairs, cache=cache, out=out, threads=2, **kw)


@pytest.fixture(scope="module")
def identical(model, pairs, cache, tmp_path_factory) -> G.GateResult:
    """A real run of both precisions (INT8 records on the FP32 graphs): fills the FP32 cache."""
    return G.run_gate(_opts(model, pairs, cache, tmp_path_factory.mktemp("gate-out")))


def gray_noise(rng: np.random.Generator, hw: tuple[int, ...], var: float) -> np.ndarray:
    """Integer noise, the same in R, G and B, zero mean, variance ``var`` (levels^2)."""
    s = 1 if var <= 1 else int(np.ceil(np.sqrt(var)))
    p = var / (2 * s * s)
    n = s * rng.choice([-1, 0, 1], size=hw, p=[p, 1 - 2 * p, p])
    return n[..., None].astype(np.int16)


def add(img: np.ndarray, noise: np.ndarray, cols: slice | None = None) -> np.ndarray:
    y = img.astype(np.int16)
    if cols is None:
        y = y + noise
    else:
        y[:, cols] += noise[:, cols]
    return np.clip(y, 0, 255).astype(np.uint8)


HR_NOISE = 10.0  # FP32's error vs the tuned HR: gray noise of this variance, the same everywhere


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """Pairs whose FP32 outputs are given (synthetic) and HR = FP32 output + noise: FP32's error
    is known and uniform, so extra candidate noise of variance v costs 10 log10(1 + v /
    HR_NOISE) dB in every region."""
    rng = np.random.default_rng(11)
    fp32 = {f"img{i}": smooth(rng, 4 * LR, i) for i in range(N_IMAGES)}
    hrs = {n: add(o, gray_noise(rng, o.shape[:2], HR_NOISE)) for n, o in fp32.items()}
    return write_pairs(tmp_path_factory.mktemp("gate-tuned"), hrs), fp32


def loss_var(db: float) -> float:
    """Extra candidate noise variance that costs ``db`` against the tuned HR."""
    return HR_NOISE * (10 ** (db / 10) - 1)


def band(seed: int):
    """A 3 px band along the right edge with noise of variance 40 (inside the 4 px shave)."""
    rng = np.random.default_rng(seed)
    return lambda name, out: add(
        out, gray_noise(rng, out.shape[:2], 40.0), slice(out.shape[1] - 3, None)
    )


def synthetic(monkeypatch, tuned: tuple[Path, dict[str, np.ndarray]], perturb) -> None:
    """Outputs without runs: FP32 gives the tuned FP32 image, the candidate
    ``perturb(name, that image)`` (use a fresh cache: these FP32 outputs are not the model's)."""
    pairs, fp32 = tuned
    names = {
        hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest(): p.stem
        for p in (pairs / "lq").iterdir()
    }

    def fake(up, lr):
        name = names[hashlib.sha256(np.round(lr * 255).astype(np.uint8).tobytes()).hexdigest()]
        return fp32[name] if up.opts.precision == "fp32" else perturb(name, fp32[name])

    monkeypatch.setattr(G, "upscale_8bit", fake)


def test_identical_outputs_pass_and_the_report_lists_every_image(identical):
    res = identical
    assert res.passed, res.line()
    assert [im.delta_db for im in res.images] == [0.0] * N_REAL
    assert all(v == 0.0 for im in res.images for v in im.border_db.values())
    assert not any(im.fp32_cached for im in res.images)
    assert all(20 < im.fp32_db < 60 for im in res.images)  # the demo really upscaled them
    assert [im.ran for im in res.images] == ["whole"] * N_REAL and "(3 whole)" in res.line()
    rep = json.loads(res.report_path.read_text())
    assert rep["passed"] and [i["name"] for i in rep["images"]] == ["img0", "img1", "img2"]
    assert {i["source"] for i in rep["images"]} == {"synth-a", "synth-b"}
    assert set(rep["sources"]) == {"synth-a", "synth-b"}
    assert rep["images"][0]["lr_size"] == [LR_REAL, LR_REAL]
    assert set(rep["images"][0]["border_delta_db"]) == set(G.EDGES)
    assert [c["passed"] for c in rep["criteria"]] == [True, True, True]
    md = res.report_path.with_suffix(".md").read_text()
    assert all(f"| img{i} | synth-" in md for i in range(N_REAL))
    with Image.open(res.strip_path) as strip:  # one row per image: FP32 | candidate | HR
        assert strip.size[0] > 3 * 2 * 4 * LR_REAL and strip.size[1] > N_REAL * 2 * 4 * LR_REAL


def test_fp32_cache_is_hit_on_the_second_run(identical, model, pairs, cache, tmp_path, monkeypatch):
    opened = []
    real = G.open_upscaler
    monkeypatch.setattr(G, "open_upscaler", lambda d, m, p, t: opened.append(p) or real(d, m, p, t))
    res = G.run_gate(_opts(model, pairs, cache, tmp_path))
    assert all(im.fp32_cached for im in res.images) and res.fp32_cache_hits == N_REAL
    assert opened == ["int8"]  # the FP32 upscaler is never opened
    assert res.passed and [im.delta_db for im in res.images] == [0.0] * N_REAL


@pytest.mark.parametrize(
    ("case", "fails"),
    [
        # every image 0.15 dB worse: the mean fails, the worst (< 0.3) and border pass
        ("mean", {"mean"}),
        # one of eight images 0.6 dB worse: the mean (-0.075) passes, the worst fails
        ("worst", {"worst"}),
        # noise in a 3 px band along the right edge, inside the 4 px shave: whole-image PSNR-Y
        # unchanged (mean and worst pass), the right strip loses more than the interior
        ("border", {"border"}),
    ],
)
def test_each_criterion_fails_on_its_own_case(case, fails, model, tuned, tmp_path, monkeypatch):
    rng = np.random.default_rng(3)

    def perturb(name, out):
        if case == "mean":
            return add(out, gray_noise(rng, out.shape[:2], loss_var(0.15)))
        if case == "worst" and name == "img3":
            return add(out, gray_noise(rng, out.shape[:2], loss_var(0.6)))
        return band(4)(name, out) if case == "border" else out

    synthetic(monkeypatch, tuned, perturb)
    res = G.run_gate(_opts(model, tuned[0], tmp_path / "cache", tmp_path))
    failed = {c.name for c in res.criteria if not c.passed}
    assert failed == fails, res.line()
    assert not res.passed and res.line().startswith("FAIL")
    by = {c.name: c for c in res.criteria}
    if case == "mean":
        assert by["mean"].value == pytest.approx(-0.15, abs=0.05)
    if case == "worst":
        assert by["worst"].where == "img3"
        assert by["worst"].value == pytest.approx(-0.6, abs=0.15)
    if case == "border":
        assert [im.delta_db for im in res.images] == [0.0] * N_IMAGES
        assert min(res.border_pooled_db, key=res.border_pooled_db.get) == "right"
        assert res.worst_image_edge[1] == "right"
        assert res.border_pooled_db["left"] == 0.0
    rep = json.loads(res.report_path.read_text())
    assert [c["passed"] for c in rep["criteria"]] == [c.passed for c in res.criteria]
    assert len(rep["images"]) == N_IMAGES and rep["sources"]["synth-a"]["images"] == 4


def test_cli_exits_1_with_one_line_and_record_marks_the_int8_graphs(
    identical, model, pairs, tuned, cache, tmp_path, monkeypatch
):
    d = tmp_path / "model"
    shutil.copytree(model, d)
    synthetic(monkeypatch, tuned, band(5))
    args = ["gate", "--model", str(d), "--precision", "int8", "--threads", "2"]
    args += ["--out", str(tmp_path / "rep")]
    fake = ["--data", str(tuned[0]), "--cache", str(tmp_path / "cache")]
    r = CliRunner().invoke(export_app, [*args, *fake, "--record"])
    assert r.exit_code == 1, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("FAIL: int8 vs fp32") and "border" in lines[0]
    m = load_manifest(d)
    recs = [g for g in m.graphs.values() if g.precision == "int8"]
    assert recs and all(not g.usable and g.quant["runtime_gate"]["passed"] is False for g in recs)
    assert "runtime gate" in m.int8_status("onnxruntime")
    assert "int8" not in m.precisions()
    # a re-gate (real runs) of graphs recorded as failed still runs them, and records a pass
    monkeypatch.undo()
    real = ["--data", str(pairs), "--cache", str(cache), "--limit", "2"]
    r = CliRunner().invoke(export_app, [*args, *real, "--record"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("PASS") and "recorded" in r.stdout
    m = load_manifest(d)
    assert m.int8_status("onnxruntime") is None
    rg = m.graphs["step@3.int8.onnxruntime"].quant["runtime_gate"]
    assert rg["passed"] and rg["images"] == 2 and rg["report"].endswith(".json")


def test_bad_input_is_one_line(model, pairs, tmp_path):
    with pytest.raises(DeltaDiffError, match="no gt/ and lq/"):
        G.run_gate(_opts(model, tmp_path, tmp_path, tmp_path))
    with pytest.raises(DeltaDiffError, match="--target tensorrt"):
        G.run_gate(_opts(model, pairs, tmp_path, tmp_path, target="tensorrt"))
    with pytest.raises(
        DeltaDiffError, match="unknown --target 'cuda'; choose one of onnxruntime, "
    ):
        G.run_gate(_opts(model, pairs, tmp_path, tmp_path, target="cuda"))
    with pytest.raises(DeltaDiffError, match="compares another precision"):
        G.run_gate(_opts(model, pairs, tmp_path, tmp_path, precision="fp32"))
    with pytest.raises(DeltaDiffError, match="no fp16 graphs"):
        G.run_gate(_opts(model, pairs, tmp_path, tmp_path, precision="fp16"))
    with pytest.raises(DeltaDiffError, match="--limit 0"):
        G.run_gate(_opts(model, pairs, tmp_path, tmp_path, limit=0))
    r = CliRunner().invoke(export_app, ["gate", "--model", str(model), "--data", str(tmp_path)])
    assert r.exit_code == 1 and "no gt/ and lq/" in r.output and "Traceback" not in r.output


def test_calibrate_runtime_gate_decides_and_records(model, pairs, tuned, tmp_path, monkeypatch):
    """calibrate --gate-data: the runtime gate's verdict is the result and the manifest's
    ``usable`` (the tile gate passed here); a failed tile gate skips it; gate pairs may not hold
    calibration images; only the onnxruntime target is gated."""
    d = tmp_path / "model"
    shutil.copytree(model, d)
    gate = dict(gate_data=tuned[0], gate_cache=tmp_path / "cache")
    opts = CalibrateOptions(model=d, data=pairs / "lq", **gate)
    synthetic(monkeypatch, tuned, band(5))
    passed, rec, res = _runtime_gate(opts, d, True, lambda s: None)
    assert not passed and rec["ran"] and not rec["passed"] and res is not None
    assert (d / rec["report"]).is_file() and (d / "gate-strip.int8.onnxruntime.png").is_file()
    assert all(not g.usable for g in load_manifest(d).graphs.values() if g.precision == "int8")
    passed, rec, res = _runtime_gate(opts, d, False, lambda s: None)
    assert (passed, rec["ran"], res) == (False, False, None)
    lq = sorted((pairs / "lq").iterdir())
    with pytest.raises(DeltaDiffError, match="holds 1 calibration image"):
        _check_gate_data(pairs, {sha256_file(lq[0])})
    _check_gate_data(pairs, {"0" * 64})
    with pytest.raises(DeltaDiffError, match="--gate-data runs the INT8 graphs through onnx"):
        calibrate(replace(opts, target="tensorrt"))


@pytest.mark.slow
def test_calibrate_with_gate_data_end_to_end(exported, pairs, tmp_path):
    """A real calibrate --gate-data on the small pixel preset (every Conv INT8, no tile-gate
    bar): the runtime gate runs on the written graphs and its verdict is the result."""
    from .conftest import DATA, need_shared

    d = tmp_path / "m"
    shutil.copytree(exported("deltadiff-pixel"), d)
    calib = tmp_path / "calib"
    calib.mkdir()
    for p in sorted(need_shared(DATA / "val-bicubic-x4" / "lq").iterdir())[:4]:
        shutil.copy(p, calib / p.name)
    lax = {"search": False, "min_e2e_db": 0.0, "max_drop_db": 1e9, "method": "percentile"}
    res = calibrate(
        CalibrateOptions(
            model=d,
            data=calib,
            samples=2,
            threads=2,
            gate_data=pairs,
            gate_cache=tmp_path / "cache",
            **lax,
        )
    )
    assert res.gate is not None and res.report["runtime_gate"]["ran"]
    assert res.passed == res.gate.passed == res.report["passed"]
    assert res.report["tile_gate_passed"] is True
    recs = [g for g in load_manifest(d).graphs.values() if g.precision == "int8"]
    assert all(g.usable == res.gate.passed for g in recs)
    assert all(g.quant["runtime_gate"]["images"] == N_REAL for g in recs)
    assert "Runtime gate" in res.report_path.with_suffix(".md").read_text()
