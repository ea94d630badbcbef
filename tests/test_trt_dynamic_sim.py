"""Dynamic shapes on the TensorRT backend, run for real on the CPU simulation (``tests/sim``):
engines with two optimization profiles, any LR size inside one of them, the profile chosen per
call, buffers sized for the profile maximum, CUDA graphs per LR size, and the upscaler running
an odd-sized image whole. Every output is compared with the ONNX Runtime backend on the same
graphs, so a backend that ran the manifest tile (or any other shape) instead would fail."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from deltadiff.errors import BackendError, DeltaDiffError
from deltadiff.manifest import load_manifest
from deltadiff.runtime.backends.ort import OrtBackend
from deltadiff.runtime.executor import Executor
from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler

from .sim import install

# the first profile holds the manifest tile (16x16); a size in both runs on the smaller one
PROFILES = (((4, 4), (8, 8), (16, 16)), ((16, 16), (24, 24), (32, 32)))


@pytest.fixture(scope="module")
def dyn(dynamic_exported, tmp_path_factory):
    """The small dynamic pixel export with simulated fp32 TensorRT-RTX engines, two profiles."""
    from deltadiff.export.engine import EngineOptions, build_engines

    d = tmp_path_factory.mktemp("sim-dyn")
    shutil.copytree(dynamic_exported("deltadiff-pixel"), d, dirs_exist_ok=True)
    with install():
        build_engines(
            d,
            EngineOptions(
                precision="fp32",
                flavour="tensorrt_rtx",
                batch_max=2,
                targets=("sm89",),
                profiles=PROFILES,
            ),
        )
    return d


@pytest.fixture
def sim():
    with install() as s:
        yield s


def _lr(B, h, w, seed):
    return np.random.default_rng(seed).random((B, 3, h, w), dtype=np.float32)


def _ort(d, m, mode, lr):
    with OrtBackend(d, m, precision="fp32", threads=1) as be:
        return Executor(m, be, mode=mode).run(lr)


def _trt(d, m):
    from deltadiff.runtime.backends.trt import TrtBackend

    return TrtBackend(d, m, precision="fp32")


@pytest.mark.parametrize("mode", ["staged", "unrolled"])
def test_sizes_in_either_profile_equal_onnxruntime(dyn, sim, mode):
    m = load_manifest(dyn)
    cases = [(1, 20, 28, 1), (2, 8, 12, 0), (1, 16, 16, 0), (2, 32, 24, 1)]  # B, h, w, profile
    with _trt(dyn, m) as be:
        ex = Executor(m, be, mode=mode)
        for B, h, w, profile in cases:
            lr = _lr(B, h, w, seed=h * w)
            got = ex.run(lr)
            assert got.shape == (B, 3, 4 * h, 4 * w)
            assert np.array_equal(got, _ort(dyn, m, mode, lr)), (B, h, w)
            chain = be._chains[(mode, B, profile)]
            assert chain.box == (PROFILES[profile][0], PROFILES[profile][2])
            for eng, ctx, _, _ in chain.launches:
                assert ctx.active_optimization_profile == profile, eng.path.name
        assert set(be._chains) == {(mode, B, p) for B, _, _, p in cases}
    assert sim.cuda.captures == 0  # every size ran once: eagerly, no capture
    assert not sim.cuda.device and not sim.cuda.host  # all freed


def test_one_chain_per_profile_graphs_per_size_buffers_at_the_maximum(dyn, sim):
    """Sizes alternate inside profile 1: the buffers are allocated once (for 32x32), a size is
    captured on its second call in a row and replayed later even after another size changed the
    contexts' shapes."""
    m = load_manifest(dyn)
    a, b = _lr(1, 20, 28, seed=1), _lr(1, 32, 32, seed=2)
    b2 = _lr(1, 32, 32, seed=3)
    calls = [a, a, b, b, a, b2]  # eager, capture a, eager, capture b, replay a, replay b
    with _trt(dyn, m) as be:
        ex = Executor(m, be, mode="staged")
        got = [ex.run(calls[0])]
        allocated = len(sim.cuda.device)
        got += [ex.run(x) for x in calls[1:]]
        assert len(sim.cuda.device) == allocated  # no buffer grew or was added
        chain = be._chains[("staged", 1, 1)]
        assert set(chain.graphs) == {(20, 28), (32, 32)} and len(be._chains) == 1
    assert sim.cuda.captures == 2 and sim.cuda.launches == 4
    assert sim.trt.fallback_captured == 0
    for g, x in zip(got, calls, strict=True):
        assert np.array_equal(g, _ort(dyn, m, "staged", x))


def test_per_stage_calls_pick_the_profile_too(dyn, sim):
    m = load_manifest(dyn)
    lr = _lr(1, 20, 24, seed=4)
    with OrtBackend(dyn, m, precision="fp32", threads=1) as ob:
        want: dict = {}
        Executor(m, ob).run(lr, trace=want)
    with _trt(dyn, m) as be:
        got: dict = {}
        Executor(m, be).run(lr, trace=got)
        assert {k[1] for k in be._contexts} == {1}
    for k in want:
        assert np.array_equal(got[k], want[k]), k


def test_size_outside_every_profile_is_one_clear_error(dyn, sim):
    m = load_manifest(dyn)
    with _trt(dyn, m) as be:
        ex = Executor(m, be, mode="staged")
        with pytest.raises(BackendError, match="no optimization profile holds lr") as e:
            ex.run(_lr(1, 48, 48, seed=5))  # inside the model's range, outside the profiles
        assert "--profile" in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(BackendError, match="outside the model's shapes") as e:
            ex.run(_lr(1, 17, 27, seed=5))  # not a multiple of 4: the upscaler pads it
        assert "\n" not in str(e.value)


def test_upscaler_runs_an_odd_image_whole_and_a_large_one_in_profile_tiles(dyn, sim):
    rng = np.random.default_rng(6)
    small, large = rng.random((17, 27, 3), np.float32), rng.random((50, 37, 3), np.float32)
    with Upscaler(dyn, UpscaleOptions(backend="tensorrt", precision="fp32")) as up:
        p = up.plan(17, 27)
        assert p.whole and p.tile == (20, 28) and "TensorRT profile 1" in p.reason
        q = up.plan(50, 37)
        assert not q.whole and q.tile == (32, 32) and up.tile_count(50, 37) == 4
        got_small, got_large = up.upscale(small), up.upscale(large)
        assert ("staged", 1, 1) in up.backend._chains
    assert sim.cuda.captures == 1  # the large image's four tiles: warm-up, capture, 2 replays
    with Upscaler(dyn, UpscaleOptions(threads=1, tile=28)) as ort_up:  # whole on ONNX Runtime
        assert ort_up.plan(17, 27).whole and ort_up.plan(17, 27).tile == (20, 28)
        want_small = ort_up.upscale(small)
    with Upscaler(dyn, UpscaleOptions(threads=1, tile=32)) as ort_up:
        want_large = ort_up.upscale(large)
    assert got_small.shape == (68, 108, 3) and got_large.shape == (200, 148, 3)
    assert np.abs(got_small - want_small).max() < 1e-6
    assert np.abs(got_large - want_large).max() < 1e-6


def test_tile_is_a_choice_within_the_profiles(dyn, sim):
    with Upscaler(dyn, UpscaleOptions(backend="tensorrt", precision="fp32", tile=24)) as up:
        assert up.plan(100, 75).tile == (24, 24) and up.plan(12, 12).tile == (12, 12)
    with pytest.raises(DeltaDiffError, match="profiles hold square tiles of 4..16, 16..32") as e:
        Upscaler(dyn, UpscaleOptions(backend="tensorrt", precision="fp32", tile=48))
    assert "\n" not in str(e.value)


def test_dd_run_info_says_what_the_engines_accept(dyn, dynamic_exported):
    from typer.testing import CliRunner

    from deltadiff.cli.run import app

    args = ["info", "--model", str(dyn), "--backend", "tensorrt", "--size", "27x17"]
    r = CliRunner().invoke(app, args + ["--size", "75x100", "--size", "20x12"])
    assert r.exit_code == 0, r.output
    assert "whole images inside one of 4x4..16x16, 16x16..32x32 LR" in r.output
    assert "the engines' optimization profiles" in r.output
    assert "27x17 LR -> 108x68: whole" in r.output and "TensorRT profile 1" in r.output
    assert "75x100 LR -> 300x400: tiles of 32x32" in r.output
    assert "20x12 LR -> 80x48: whole" in r.output
    # no engines yet: the model's range, and how to set profiles
    r = CliRunner().invoke(
        app, ["info", "--model", str(dynamic_exported("deltadiff-pixel")), "--backend", "tensorrt"]
    )
    assert r.exit_code == 0 and "no fp32 engines built yet" in r.output
