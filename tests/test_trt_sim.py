"""The TensorRT backend and engine builder, run for real on a CPU simulation of cuda-python and
TensorRT-RTX (``tests/sim``: device memory in a separate address space, streams that run their
work at synchronize, stream capture / graph replay, engines that are ONNX Runtime sessions of the
same graphs). Results must equal the ONNX Runtime backend bit for bit."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace

import numpy as np
import pytest

from deltadiff.errors import BackendError, EngineError
from deltadiff.manifest import load_manifest
from deltadiff.runtime.backends.ort import OrtBackend
from deltadiff.runtime.executor import Executor

from .sim import install
from .sim.fake_trt import DataType, DynamicShapesKernelSpecializationStrategy

FAMILIES = ("deltadiff-pixel", "resshift-v3")  # noiseless, noisy


@pytest.fixture(scope="module")
def engines_dir(exported, tmp_path_factory):
    """family -> a copy of the small export with simulated fp32 engines (the real builder)."""
    from deltadiff.export.engine import EngineOptions, build_engines

    out = {}
    for fam in FAMILIES:
        d = tmp_path_factory.mktemp(f"sim-{fam}")
        shutil.copytree(exported(fam), d, dirs_exist_ok=True)
        with install():
            build_engines(
                d,
                EngineOptions(
                    precision="fp32", flavour="tensorrt_rtx", batch_max=2, targets=("sm89",)
                ),
            )
        out[fam] = d
    return out


@pytest.fixture
def sim():
    with install() as s:
        yield s


def _inputs(m, B, seed):
    rng = np.random.default_rng(seed)
    lr = rng.random((B, 3, *m.tile), dtype=np.float32)
    noise = {n: rng.standard_normal((B, 3, *m.state_hw()), dtype=np.float32) for n in m.noise_names}
    return lr, noise


_REF: dict = {}


def _ort(d, m, mode, lr, noise):
    """The ONNX Runtime backend's output (cached: the noisy family's runs take seconds)."""
    key = (str(d), mode, lr.tobytes(), tuple(v.tobytes() for v in noise.values()))
    if key not in _REF:
        with OrtBackend(d, m, precision="fp32", threads=1) as be:
            _REF[key] = Executor(m, be, mode=mode).run(lr, noise)
    return _REF[key]


def _trt(d, m, **kw):
    from deltadiff.runtime.backends.trt import TrtBackend

    return TrtBackend(d, m, precision="fp32", **kw)


SLOW = pytest.mark.slow  # the noisy family takes seconds per run on a 2-core machine
CASES = [  # every mode x batch for the fast family; the noisy one is also in the replay test
    ("deltadiff-pixel", "staged", 1),
    ("deltadiff-pixel", "staged", 2),
    ("deltadiff-pixel", "unrolled", 1),
    ("deltadiff-pixel", "unrolled", 2),
    pytest.param("resshift-v3", "staged", 2, marks=SLOW),
    pytest.param("resshift-v3", "unrolled", 2, marks=SLOW),
]


@pytest.mark.parametrize(("family", "mode", "batch"), CASES)
def test_captured_chain_equals_onnxruntime_bit_for_bit(engines_dir, sim, family, mode, batch):
    d = engines_dir[family]
    m = load_manifest(d)
    lr, noise = _inputs(m, batch, seed=1)
    want = _ort(d, m, mode, lr, noise)
    with _trt(d, m) as be:
        ex = Executor(m, be, mode=mode)
        first = ex.run(lr, noise)  # eager: the warm-up of this size
        assert be._chains[(mode, batch, 0)].graph_state == "untried"
        got = ex.run(lr, noise)  # the same size again: captured, then replayed
        assert be._chains[(mode, batch, 0)].graph_state == "captured"
    assert sim.cuda.captures == 1 and sim.cuda.launches == 1
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want) and np.array_equal(first, want)
    assert sim.trt.fallback_captured == 0  # TensorRT-RTX kernels compiled before the capture
    assert not sim.cuda.device and not sim.cuda.host and not sim.cuda.execs  # all freed


@pytest.mark.parametrize("family", FAMILIES)
def test_one_captured_graph_replays_new_inputs(engines_dir, sim, family):
    """Different inputs through one captured graph: it reads the pinned buffers the host has just
    filled, not the capturing call's data: a new LR (fast family, batch 2), new noise for the same
    LR (the noisy family, batch 1: n_prior into the encoder, n_t into the steps). The first call
    runs eagerly (the warm-up), the second captures."""
    d = engines_dir[family]
    m = load_manifest(d)
    batch = 1 if m.noise_names else 2
    a = _inputs(m, batch, seed=2)
    b = _inputs(m, batch, seed=3)
    calls = [a, a, (a[0], b[1])] if m.noise_names else [a, a, b, a]
    want = [_ort(d, m, "staged", *x) for x in calls]
    assert not np.array_equal(want[1], want[2])
    with _trt(d, m) as be:
        ex = Executor(m, be, mode="staged")
        got = [ex.run(*x) for x in calls]
    assert sim.cuda.captures == 1 and sim.cuda.launches == len(calls) - 1
    assert sim.trt.fallback_captured == 0
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w)


def test_per_stage_calls_equal_onnxruntime_and_reuse_contexts(engines_dir, sim):
    d = engines_dir["deltadiff-pixel"]
    m = load_manifest(d)
    lr, noise = _inputs(m, 2, seed=4)
    with OrtBackend(d, m, precision="fp32", threads=1) as ob:
        want: dict = {}
        Executor(m, ob).run(lr, noise, trace=want)
    with _trt(d, m) as be:
        got: dict = {}
        Executor(m, be).run(lr, noise, trace=got)
        n_ctx = len(sim.trt.contexts)
        Executor(m, be).run(lr, noise, on_stage=lambda *_: None)
        assert len(sim.trt.contexts) == n_ctx == 3  # one per graph, reused
    assert set(got) == set(want)
    for k in want:
        assert np.array_equal(got[k], want[k]), k


@pytest.mark.parametrize(
    "failure",
    [
        "end_capture",
        "end_capture_null",
        "instantiate",
        "begin_capture",
        "enqueue",
        "not_capturable",
    ],
)
def test_capture_failure_falls_back_to_eager_once(engines_dir, sim, failure, caplog):
    d = engines_dir["deltadiff-pixel"]
    m = load_manifest(d)
    if failure == "not_capturable":
        sim.trt.capturable = False
    elif failure != "enqueue":
        sim.cuda.fail.add(failure)
    lr, noise = _inputs(m, 1, seed=5)
    want = _ort(d, m, "staged", lr, noise)
    with _trt(d, m) as be, caplog.at_level(logging.WARNING):
        ex = Executor(m, be, mode="staged")
        if failure == "enqueue":  # TensorRT refuses to enqueue while the stream is capturing
            real = sim.cuda.record

            def refuse(stream, label, op):
                st = sim.cuda.streams[int(stream)]
                if st.capturing is not None and label.startswith("engine"):
                    return 1  # cudaErrorInvalidValue
                return real(stream, label, op)

            sim.cuda.record = refuse
        got = [ex.run(lr, noise) for _ in range(3)]
        assert be._chains[("staged", 1, 0)].graph_state == "eager"
    for g in got:
        assert np.array_equal(g, want)
    assert sim.cuda.captures <= 1  # tried once, never again
    assert sim.cuda.launches == 0
    assert not sim.cuda.graphs and not sim.cuda.execs  # the failed graph was destroyed
    warnings = [r for r in caplog.records if "CUDA graph capture" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()


def test_rtx_contexts_compile_eagerly_and_share_one_cache_per_engine(engines_dir, sim):
    d = engines_dir["deltadiff-pixel"]
    m = load_manifest(d)
    lr, noise = _inputs(m, 1, seed=6)
    with _trt(d, m) as be:
        Executor(m, be, mode="staged").run(lr, noise)  # chain: 3 contexts
        Executor(m, be, mode="staged").run(lr, noise, on_stage=lambda *_: None)  # 3 more
        eager = DynamicShapesKernelSpecializationStrategy.EAGER
        assert all(
            c.dynamic_shapes_kernel_specialization_strategy == eager for c in sim.trt.configs
        )
        caches = {}
        for ctx in sim.trt.contexts:
            caches.setdefault(ctx.engine.id, set()).add(id(ctx.cache))
        assert len(caches) == 3 and all(len(v) == 1 for v in caches.values())
    # encoder, step, decoder at batch 1: compiled once each, whichever context met them first
    assert sim.trt.jit_compiles == 3
    assert sim.trt.fallback_launches == 0


def test_the_simulation_sees_fallback_kernels_frozen_into_the_graph(engines_dir, sim, monkeypatch):
    """The control for the test above: with TensorRT-RTX's default (LAZY) strategy and no shared
    cache, the graph captured after one warm-up holds fallback kernels."""
    import deltadiff.runtime.backends.trt as trt_mod

    monkeypatch.setattr(trt_mod, "runtime_config", lambda trt, engine, cache: (None, None))
    d = engines_dir["deltadiff-pixel"]
    m = load_manifest(d)
    lr, noise = _inputs(m, 1, seed=6)
    with _trt(d, m) as be:
        ex = Executor(m, be, mode="staged")
        ex.run(lr, noise)  # warm-up: LAZY starts compiling and runs fallback kernels
        ex.run(lr, noise)  # captured while the compilation still runs
    assert sim.cuda.captures == 1 and sim.trt.fallback_captured > 0


def test_engine_dtypes_size_the_buffers(engines_dir, sim):
    """FP16 I/O engines: host and device buffers follow the engine's dtypes (a float32 guess
    would overrun or under-read the simulated device memory)."""
    d = engines_dir["deltadiff-pixel"]
    m = load_manifest(d)
    lr, noise = _inputs(m, 2, seed=7)
    want = _ort(d, m, "unrolled", lr, noise)
    sim.trt.io_dtypes = {"lr": DataType.HALF, "image": DataType.HALF}
    with _trt(d, m) as be:
        got = Executor(m, be, mode="unrolled").run(lr, noise)
        staged = Executor(m, be, mode="staged").run(lr, noise)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() < 2e-2 and np.abs(staged - want).max() < 2e-2
    assert not np.array_equal(got, want)  # it really went through FP16


def test_mismatched_handover_dtypes_are_refused(engines_dir, sim):
    d = engines_dir["deltadiff-pixel"]
    m = load_manifest(d)
    sim.trt.io_dtypes = {"x_next": DataType.HALF}
    lr, noise = _inputs(m, 1, seed=8)
    with _trt(d, m) as be, pytest.raises(BackendError, match="writes x_next as float16") as e:
        Executor(m, be, mode="staged").run(lr, noise)
    assert "\n" not in str(e.value)


def test_manifest_and_engine_shapes_must_agree(engines_dir, sim):
    d = engines_dir["deltadiff-pixel"]
    m = load_manifest(d)
    lr, noise = _inputs(m, 1, seed=9)
    bad = replace(m, scale=2)  # host buffers from the manifest would be a quarter too small
    with _trt(d, bad) as be, pytest.raises(BackendError, match="manifest implies") as e:
        Executor(bad, be, mode="unrolled").run(lr, noise)
    assert "rebuild" in str(e.value) and "\n" not in str(e.value)


def test_rejected_compute_capability_is_one_clear_error(exported, tmp_path, sim):
    from deltadiff.export.engine import EngineOptions, build_engines

    d = tmp_path / "m"
    shutil.copytree(exported("deltadiff-pixel"), d)
    sim.trt.reject_targets = {"current"}
    with pytest.raises(EngineError, match="--target current: TensorRT-RTX .* rejected") as e:
        build_engines(
            d, EngineOptions(precision="fp32", flavour="tensorrt_rtx", targets=("current",))
        )
    assert "\n" not in str(e.value)
    with pytest.raises(
        EngineError,
        match="--target sm90: .* knows sm75, sm80, sm86, sm89, sm120, sm121 and current",
    ):
        build_engines(d, EngineOptions(precision="fp32", flavour="tensorrt_rtx", targets=("sm90",)))
