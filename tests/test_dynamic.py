"""Dynamic spatial shapes: the in-graph Swin mask, dynamic exports vs the PyTorch reference at odd
sizes and vs the static graphs, the whole-image / tile decision, ``dd-run info``, the memory
record, and TensorRT-RTX optimization profiles.

deltadiff-pixel runs in the default suite (one dynamo export, ~1 min on 2 cores); the latent
families take several minutes to export dynamically and are marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from deltadiff.errors import DeltaDiffError
from deltadiff.export.graphs import TileShape
from deltadiff.export.onnx_export import ExportOptions, export_onnx, preset_source
from deltadiff.export.verify import verify
from deltadiff.manifest import load_manifest, save_manifest
from deltadiff.model.bicubic_x4 import _border_index
from deltadiff.model.pipeline import Pipeline
from deltadiff.model.swin_unet import shift_mask, shift_mask_like
from deltadiff.runtime.backends import open_backend
from deltadiff.runtime.executor import Executor
from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler
from deltadiff.tiling import plan_tiles, reflect_pad

HAVE_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAVE_RTX, reason="tensorrt_rtx is not installed")

ODD_SIZES = [
    (37, 53),
    (64, 128),
    (100, 75),
]  # LR (h, w); padded to the multiple as the runtime does


# ----------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    ("h", "w", "ws", "shift"),
    [
        (8, 8, 8, 4),
        (8, 64, 8, 4),
        (16, 24, 8, 4),
        (32, 32, 8, 4),
        (40, 56, 8, 2),
        (64, 128, 8, 6),
        (128, 16, 8, 4),
        (16, 24, 4, 2),
    ],
)
def test_tensor_mask_equals_numpy_shift_mask(h, w, ws, shift):
    got = shift_mask_like(torch.zeros(1, 1, h, w), ws, shift)
    want = shift_mask(h, w, ws, shift)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert int((got == -100).sum()) > 0  # the last window row is masked


@pytest.mark.parametrize("mode", ["replicate", "symmetric"])
def test_border_index_tensor_ops_match_the_numpy_rule(mode):
    for n in range(1, 30):
        idx = np.arange(-2, n + 2)
        if mode == "replicate":
            want = np.clip(idx, 0, n - 1)
        else:  # symmetric with the edge repeated, folded for tiny n
            idx = np.mod(idx, 2 * n)
            want = np.where(idx >= n, 2 * n - 1 - idx, idx)
        assert np.array_equal(_border_index(n, mode).numpy(), want), n


def test_plan_whole_when_in_range_and_budget_else_largest_tile():
    kw = dict(multiple=4, lr_min=(4, 4), lr_max=(128, 128))
    p = plan_tiles(37, 53, max_lr_px=60 * 60, **kw)
    assert p.whole and p.tile == (40, 56)  # padded to the multiple
    p = plan_tiles(100, 75, max_lr_px=48 * 48, **kw)  # over the memory budget
    assert not p.whole and p.tile[0] * p.tile[1] <= 48 * 48 and p.tile[0] % 4 == 0
    assert p.tile == (48, 48)
    p = plan_tiles(300, 40, max_lr_px=None, **kw)  # over the model's maximum height
    assert not p.whole and p.tile == (128, 40)
    p = plan_tiles(100, 75, max_lr_px=None, tile=32, **kw)  # the user's choice
    assert p.tile == (32, 32) and not p.whole
    p = plan_tiles(20, 20, max_lr_px=None, tile=32, **kw)
    assert p.tile == (20, 20) and p.whole
    static = plan_tiles(100, 75, multiple=4, lr_min=(64, 64), lr_max=(64, 64))
    assert static.tile == (64, 64) and not static.whole


# ----------------------------------------------------------------------------- deltadiff-pixel


def test_static_export_folds_the_in_graph_index_ops(exported):
    """The tensor-op border index / mask fold to constants in a static export: no Range op,
    and the encoder keeps its 13 nodes (same as the numpy-constant version)."""
    d = exported("deltadiff-pixel")
    m = load_manifest(d)
    enc = onnx.load(str(d / m.graph("encoder").file))
    step = onnx.load(str(d / m.graph("step").file))
    for g in (enc, step):
        assert not [n for n in g.graph.node if n.op_type in ("Range", "Where")]
    assert len(enc.graph.node) == 13
    assert not m.dynamic and m.lr_range() == ((16, 16), (16, 16))


def test_dynamic_manifest_records_range_and_symbolic_axes(dynamic_exported):
    d = dynamic_exported("deltadiff-pixel")
    m = load_manifest(d)
    assert m.dynamic and m.lr_multiple == 4
    assert m.lr_range() == ((4, 4), (128, 128)) and m.tile == (16, 16)
    assert m.graph("encoder").inputs[0].shape == ("batch", 3, "4*h", "4*w")
    assert m.graph("step").inputs[0].shape == ("batch", 3, "16*h", "16*w")
    assert m.graph("unrolled").outputs[0].shape == ("batch", 3, "16*h", "16*w")
    assert m.accepts(40, 56) and not m.accepts(37, 56) and not m.accepts(132, 4)
    raw = json.loads((d / "manifest.json").read_text())
    assert raw["lr_min"] == [4, 4] and raw["lr_max"] == [128, 128] and raw["dynamic"] is True


@pytest.mark.parametrize("lr_hw", ODD_SIZES)
def test_pixel_dynamic_equals_torch_at_odd_sizes(dynamic_exported, lr_hw):
    rep = verify(dynamic_exported("deltadiff-pixel"), lr_hw=lr_hw, record=False, seed=2)
    assert rep.passed and rep.psnr >= 60.0, [r.line() for r in rep.end_to_end]
    assert len(rep.end_to_end) == 2 and all(r.psnr >= 60.0 for r in rep.stages)


def test_pixel_dynamic_equals_static_at_the_static_size(dynamic_exported, exported):
    lr = np.random.default_rng(5).random((2, 3, 16, 16), dtype=np.float32)
    outs = []
    for d in (exported("deltadiff-pixel"), dynamic_exported("deltadiff-pixel")):
        m = load_manifest(d)
        with open_backend("onnxruntime", d, m) as be:
            outs.append([Executor(m, be, mode=mode).run(lr) for mode in ("staged", "unrolled")])
    for a, b in zip(outs[0], outs[1], strict=True):
        assert a.shape == b.shape == (2, 3, 64, 64)
        assert np.abs(a - b).max() < 1e-4  # float rounding of two graphs (vs torch: ~1e-4)


def test_pixel_dynamic_fp16_graphs(dynamic_exported, tmp_path):
    from deltadiff.export.onnx_export import add_fp16

    d = tmp_path / "m"
    shutil.copytree(dynamic_exported("deltadiff-pixel"), d)
    m = add_fp16(d)
    assert m.dynamic and m.graph("step", "fp16").inputs[0].shape == ("batch", 3, "16*h", "16*w")
    rep = verify(d, precision="fp16", lr_hw=(13, 9), record=False, seed=2)
    assert rep.passed and rep.psnr >= 40.0, [r.line() for r in rep.end_to_end]


@pytest.fixture
def budgeted(dynamic_exported, tmp_path):
    """The dynamic pixel model with a memory record: 1 KiB per HR pixel + 0 base."""
    d = tmp_path / "m"
    shutil.copytree(dynamic_exported("deltadiff-pixel"), d)
    m = load_manifest(d)
    rec = {"base_bytes": 0, "bytes_per_hr_px": 1024.0}
    save_manifest(d, replace(m, memory={"onnxruntime/fp32/staged": rec}))
    return d


GIB_32 = 32 * 32 * 16 * 1024 / (1 << 30)  # budget of a 32x32 LR call at 1 KiB per HR pixel


def test_upscaler_runs_whole_image_when_it_fits(budgeted):
    img = np.random.default_rng(1).random((28, 30, 3), dtype=np.float32)
    with Upscaler(budgeted, UpscaleOptions(max_memory=GIB_32)) as up:
        plan = up.plan(28, 30)
        assert plan.whole and plan.tile == (28, 32)  # padded to the multiple, 896 <= 1024 px
        sr = up.upscale(img)
        lr = reflect_pad(np.ascontiguousarray(img.transpose(2, 0, 1)), 0, 2)[None]
        direct = up.executor.run(lr)[0, :, : 4 * 28, : 4 * 30].transpose(1, 2, 0)
        assert sr.shape == (112, 120, 3) and np.abs(sr - direct).max() < 1e-6
        big = up.plan(60, 50)  # 60x52 padded > 32x32: the largest tiles within the budget
        assert not big.whole and big.tile == (32, 32)
        out = up.upscale(np.random.default_rng(2).random((60, 50, 3), np.float32))
        assert out.shape == (240, 200, 3) and np.isfinite(out).all()


def test_without_memory_record_whole_images_stay_within_the_tile_area(dynamic_exported):
    with Upscaler(dynamic_exported("deltadiff-pixel")) as up:
        assert up.plan(16, 16).whole and up.plan(12, 20).whole  # 12x20 <= 16x16 area
        p = up.plan(40, 40)
        assert not p.whole and p.tile == (16, 16)


def test_tile_is_a_choice_on_dynamic_models_and_must_match_on_static(dynamic_exported, exported):
    with Upscaler(dynamic_exported("deltadiff-pixel"), UpscaleOptions(tile=32)) as up:
        assert up.plan(100, 75).tile == (32, 32)
    with pytest.raises(DeltaDiffError, match="multiple of 4"):
        Upscaler(dynamic_exported("deltadiff-pixel"), UpscaleOptions(tile=30))
    with pytest.raises(DeltaDiffError, match="static shapes"):
        Upscaler(exported("deltadiff-pixel"), UpscaleOptions(tile=32))


def test_dd_run_info_says_what_fits(budgeted, exported):
    from typer.testing import CliRunner

    from deltadiff.cli.run import app

    r = CliRunner().invoke(
        app,
        ["info", "--model", str(budgeted), "--max-memory", f"{GIB_32}", "--size", "30x28"]
        + ["--size", "75x100"],
    )
    assert r.exit_code == 0, r.output
    assert "dynamic: LR 4x4..128x128 (WxH), pad multiple 4" in r.output
    assert "whole images up to 128x128 LR" in r.output
    assert "30x28 LR -> 120x112: whole" in r.output
    assert "75x100 LR -> 300x400: tiles of 32x32" in r.output
    assert "memory      onnxruntime/fp32/staged" in r.output
    r = CliRunner().invoke(app, ["info", "--model", str(exported("deltadiff-pixel"))])
    assert r.exit_code == 0 and "static shapes" in r.output and "16x16 tiles" in r.output


def test_measure_memory_records_peak_rss_per_pixel(dynamic_exported, tmp_path):
    from typer.testing import CliRunner

    from deltadiff.cli.export import app

    d = tmp_path / "m"
    shutil.copytree(dynamic_exported("deltadiff-pixel"), d)
    r = CliRunner().invoke(
        app, ["measure-memory", "--model", str(d), "--sizes", "32,128", "--threads", "1"]
    )
    assert r.exit_code == 0, r.output
    rec = load_manifest(d).memory["onnxruntime/fp32/staged"]
    assert [p["lr"] for p in rec["points"]] == [[32, 32], [128, 128]]
    assert rec["points"][1]["peak_bytes"] > rec["points"][0]["peak_bytes"]
    assert rec["bytes_per_hr_px"] > 0 and "MiB per HR megapixel" in r.output


def _points(peak, sides):
    """Memory points as ``measure`` records them, from a peak(HR px) function in bytes."""
    return [{"lr": [n, n], "hr_px": 16 * n * n, "peak_bytes": int(peak(16 * n * n))} for n in sides]


def test_memory_fit_bounds_a_quadratic_peak_where_a_line_would_not():
    """A latent-like peak (VQ-f4 mid attention: a score matrix over all latent pixels, 4 bytes
    each, latent = HR / 16 pixels) measured at 64/128/192 LR. The old line through the two
    largest sizes sends a budget-sized image past the budget; the fitted curve does not."""
    from deltadiff.runtime.memory_budget import fit, max_hr_pixels, peak_bytes

    mib = 1 << 20

    def true_peak(px):
        return 300 * mib + 2500 * px + 4 * (px / 16) ** 2

    pts = _points(true_peak, (64, 128, 192))
    rec = fit(pts)
    assert rec["fit"] == "quadratic" and rec["bytes_per_hr_px2"] > 0
    for p in pts:  # the curve bounds every measured point
        assert peak_bytes(rec, p["hr_px"]) >= p["peak_bytes"]
    line = fit(pts[1:])  # two sizes: the linear model this replaces
    assert line["fit"] == "linear" and line["bytes_per_hr_px2"] == 0
    for gib in (8, 16, 32):
        budget = gib << 30
        lin, quad = max_hr_pixels(line, budget), max_hr_pixels(rec, budget)
        # the line would run it whole and overrun: by 6 % at 8 GiB, 55 % at 16, 2.6x at 32
        assert true_peak(lin) > budget * (1.05 if gib == 8 else 1.5)
        assert true_peak(quad) <= budget * 1.001  # the curve stays within the budget
        assert true_peak(quad * 1.05) > budget  # and is not needlessly small
        two = max_hr_pixels(rec, budget, batch=2)  # a batch of two images per call
        assert 2 * (true_peak(two) - 300 * mib) <= budget - 300 * mib


# Measured: deltadiff-latent-small, dynamic export, ONNX Runtime CPU FP32 staged, 2 threads, one
# fresh process per size (runtime.memory_budget.measure), Xeon AVX-512 VNNI shared with other jobs:
# peak RSS 432 / 990 / 1,849 / 2,893 MiB at 64x64 / 64x128 / 64x192 / 128x128 LR.
LATENT_PEAKS = [(64, 64, 453038080), (64, 128, 1038458880), (64, 192, 1939189760)]
LATENT_128 = (128, 128, 3033292800)


def test_memory_fit_of_measured_latent_peaks_bounds_the_next_size():
    """The fit from the three smaller sizes bounds the measured 128x128 peak; the old line
    through the two largest of them falls short of it (2,708 vs 2,893 MiB)."""
    from deltadiff.runtime.memory_budget import fit, peak_bytes

    pts = [{"lr": [h, w], "hr_px": 16 * h * w, "peak_bytes": p} for h, w, p in LATENT_PEAKS]
    h, w, measured = LATENT_128
    px = 16 * h * w
    rec = fit(pts)
    assert rec["fit"] == "quadratic"
    assert measured <= peak_bytes(rec, px) <= 1.1 * measured
    assert peak_bytes(fit(pts[1:]), px) < 0.95 * measured  # the line: unsafe


def test_memory_fit_of_a_linear_peak_stays_linear():
    from deltadiff.runtime.memory_budget import fit, max_hr_pixels

    pts = _points(lambda px: 53 * (1 << 20) + 8000 * px, (64, 128, 192))
    pts[0]["peak_bytes"] -= 3 << 20  # noise that bends it down: the negative c is dropped
    rec = fit(pts)
    assert rec["fit"] == "linear" and rec["bytes_per_hr_px2"] == 0
    assert rec["bytes_per_hr_px"] == pytest.approx(8000, rel=1e-6)
    assert max_hr_pixels(rec, 8 << 30) == pytest.approx((8 << 30) / 8000, rel=0.01)
    old = {"base_bytes": 53 << 20, "bytes_per_hr_px": 8000.0}  # a record from before the fit
    assert max_hr_pixels(old, 8 << 30) == int(((8 << 30) - (53 << 20)) / 8000)


def test_dynamic_export_errors_are_one_line(tmp_path):
    pipe = Pipeline.from_preset("deltadiff-pixel-small", seed=0)
    for opts, match in [
        (ExportOptions(TileShape(4, 4), dynamic=True, max_lr=(4, 4)), "widen the range"),
        (ExportOptions(TileShape(64, 64), dynamic=True, max_lr=(32, 32)), "outside the dynamic"),
        (ExportOptions(TileShape(16, 16), dynamic=True, opset=17), "dynamo exporter"),
    ]:
        with pytest.raises(DeltaDiffError, match=match) as e:
            export_onnx(pipe, tmp_path / "x", opts, source=preset_source("x", 0))
        assert "\n" not in str(e.value)


def _check_rtx_profiles(d, tmp_path, profiles, graphs=("encoder", "step", "decoder", "unrolled")):
    from deltadiff.export.engine import EngineOptions, build_engines

    m0 = load_manifest(d)
    out = tmp_path / "m"
    shutil.copytree(d, out)
    opts = EngineOptions(
        precision="fp32", flavour="tensorrt_rtx", batch_max=2, profiles=profiles, graphs=graphs
    )
    m, built = build_engines(out, opts)
    assert {e["graph"] for e in built} == set(graphs)
    for e in built:
        assert e["profiles"] == [[list(x) for x in p] for p in profiles]
        assert (out / e["file"]).stat().st_size == e["bytes"] > 0
    # same profiles: reused; another profile: a new cache key and a rebuild
    _, again = build_engines(out, replace(opts, graphs=("step",)))
    assert again[0].get("reused") is True
    lo, opt, hi = profiles[0]
    _, other = build_engines(out, replace(opts, graphs=("step",), profiles=((lo, opt, opt),)))
    assert not other[0].get("reused") and other[0]["cache_key"] != again[0]["cache_key"]
    assert m0.dynamic


PIXEL_PROFILES = (((8, 8), (16, 16), (64, 64)), ((64, 64), (96, 128), (128, 128)))


@needs_rtx
@pytest.mark.trt
def test_rtx_builds_dynamic_profiles_pixel_step(dynamic_exported, tmp_path):
    """Default suite: the step graph with two profiles (the others: the slow test below)."""
    _check_rtx_profiles(dynamic_exported("deltadiff-pixel"), tmp_path, PIXEL_PROFILES, ("step",))


@pytest.mark.slow
@needs_rtx
@pytest.mark.trt
def test_rtx_builds_dynamic_profiles_pixel_all_graphs(dynamic_exported, tmp_path):
    _check_rtx_profiles(dynamic_exported("deltadiff-pixel"), tmp_path, PIXEL_PROFILES)


def test_profile_outside_the_range_is_refused(dynamic_exported, exported):
    from deltadiff.errors import EngineError
    from deltadiff.export.engine import EngineOptions, engine_profiles

    m = load_manifest(dynamic_exported("deltadiff-pixel"))
    assert engine_profiles(m, EngineOptions()) == [((4, 4), (16, 16), (128, 128))]
    with pytest.raises(EngineError, match="accept LR 4x4..128x128 in multiples of 4"):
        engine_profiles(m, EngineOptions(profiles=(((4, 4), (16, 16), (130, 130)),)))
    with pytest.raises(EngineError, match="must hold the manifest tile"):
        engine_profiles(m, EngineOptions(profiles=(((32, 32), (64, 64), (128, 128)),)))
    with pytest.raises(EngineError, match="needs a dynamic model"):
        engine_profiles(
            load_manifest(exported("deltadiff-pixel")),
            EngineOptions(profiles=(((4, 4), (16, 16), (128, 128)),)),
        )


# ----------------------------------------------------------------------------- latent families


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deltadiff-latent", "resshift-v3"])
def test_latent_dynamic_equals_torch_at_odd_sizes_and_static(family, dynamic_exported, exported):
    d = dynamic_exported(family)
    m = load_manifest(d)
    assert m.dynamic and m.lr_multiple == 64 and m.lr_range() == ((64, 64), (192, 192))
    for lr_hw in ODD_SIZES:
        rep = verify(d, lr_hw=lr_hw, record=False, seed=2)
        assert rep.passed and rep.psnr >= 60.0, (lr_hw, [r.line() for r in rep.end_to_end])
    # Dynamic vs static graphs at the static tile: every state up to the decoder agrees
    # (2.0e-4 worst, the final state of deltadiff-latent), and the two decoders agree on the same
    # state (measured bit-equal). The images are not compared directly: a 2e-4 difference can
    # flip a VQ near-tie code, which the decoder's global attention spreads over the image
    # (seen: 46.7 dB, max 0.17 for deltadiff-latent, seed 5/7; "Tolerances").
    from deltadiff.noise import noise_field

    from .checks import REF_BATCH_STATE_ATOL

    lr = np.random.default_rng(5).random((1, 3, 64, 64), dtype=np.float32)
    traces, backends = [], []
    for md in (exported(family), d):
        mm = load_manifest(md)
        noise = noise_field(mm.noise_names, (1, 3, 64, 64), 7)
        be = open_backend("onnxruntime", md, mm)
        backends.append(be)
        traces.append({})
        Executor(mm, be, mode="staged").run(lr, noise, trace=traces[-1])
    assert set(traces[0]) == set(traces[1]) and "x_-1" in traces[0]
    for k in traces[0]:
        assert np.abs(traces[0][k] - traces[1][k]).max() < REF_BATCH_STATE_ATOL, k
    state = {"x": traces[0]["x_-1"]}
    static_img, dynamic_img = (be.run("decoder", state)["image"] for be in backends)
    assert np.abs(static_img - dynamic_img).max() < 1e-5
    for be in backends:
        be.close()


@pytest.mark.slow
@needs_rtx
@pytest.mark.trt
@pytest.mark.parametrize("family", ["deltadiff-latent", "resshift-v3"])
def test_rtx_builds_dynamic_profiles_latent(family, dynamic_exported, tmp_path):
    _check_rtx_profiles(
        dynamic_exported(family),
        tmp_path,
        # the VQ-f4 mid attention is quadratic in latent pixels: a 128x192 maximum asks
        # TensorRT-RTX for > 4 GB in the encoder/decoder builds on this machine
        (((64, 64), (64, 64), (64, 128)),),
    )


def test_mac_count_of_a_dynamic_graph_uses_the_benchmarked_size(dynamic_exported, exported):
    """The bench's FLOP floor: symbolic height / width are fixed from the LR size (in LR
    multiples), not set to the batch (which counted a 1x1 image: 0.001 GMACs per demo step)."""
    from deltadiff.export.flops import count_macs

    d, s = dynamic_exported("deltadiff-pixel"), exported("deltadiff-pixel")
    m = load_manifest(s)
    units = (m.tile[0] // m.lr_multiple, m.tile[1] // m.lr_multiple)
    dyn = count_macs(d / load_manifest(d).graph("step").file, lr_units=units)
    static = count_macs(s / m.graph("step").file)
    assert static.by_op["Conv"] > 1e6 and dyn.by_op["Conv"] == static.by_op["Conv"]
    assert (
        count_macs(d / load_manifest(d).graph("step").file).by_op.get("Conv", 0)
        < dyn.by_op["Conv"] / 100
    )
