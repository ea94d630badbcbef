"""The AVX2 ISA mask (benchmarks/isa_mask.c + isa.py): child processes under it see no AVX-512 in
CPUID, PyTorch and onnxruntime pick AVX2 kernels and still compute the same numbers, real crashes
still crash, and reports record the mask."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deltadiff.benchmarks import bench_upscale_cli, isa
from deltadiff.benchmarks.machine import environment
from deltadiff.benchmarks.options import BenchOptions


@pytest.fixture(scope="module")
def masked_env(tmp_path_factory):
    """The environment of an avx2-masked child, with the shim built into a fresh cache."""
    reason = isa.unavailable_reason()
    if reason:
        pytest.skip(reason)
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    isa.build_shim.cache_clear()
    try:
        yield isa.isa_env("avx2")
    finally:
        mp.undo()
        isa.build_shim.cache_clear()


def run_py(code: str, env: dict[str, str], *args: str, flags=(), timeout: float = 120):
    return subprocess.run(
        [sys.executable, *flags, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# CPUID leaf 7.0 EBX bit 16 = AVX512F, seen by the main thread and by a new thread
_CPUID_CHILD = """
import ctypes, json, threading
from deltadiff.benchmarks.isa import active_isa
from deltadiff.benchmarks.machine import environment
from deltadiff.benchmarks.options import BenchOptions
lib = ctypes.CDLL(None)
def avx512f():
    out = (ctypes.c_uint32 * 4)()
    lib.dd_isa_cpuid(7, 0, out)
    return bool(out[1] >> 16 & 1)
seen = []
t = threading.Thread(target=lambda: seen.append((active_isa(), avx512f())))
t.start(); t.join()
print(json.dumps({"isa": active_isa(), "avx512f": avx512f(), "thread": seen[0],
                  "traps": lib.dd_isa_traps(),
                  "isa_mask": environment(BenchOptions(models=()))["cpu"]["isa_mask"]}))
"""


def test_masked_child_hides_avx512_in_every_thread_even_with_faulthandler(masked_env):
    # -X faulthandler installs a SIGSEGV handler, which the shim must keep from replacing its own
    proc = run_py(_CPUID_CHILD, masked_env, flags=("-X", "faulthandler"))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["isa"] == "avx2" and got["isa_mask"] == "avx2"
    assert got["avx512f"] is False and got["thread"] == ["avx2", False]
    assert got["traps"] >= 2  # our two CPUIDs at least went through the handler
    # this (unmasked) process: no mask, and reports say so
    assert isa.active_isa() == "native"
    assert environment(BenchOptions(models=()))["cpu"]["isa_mask"] is None


def test_torch_takes_its_avx2_kernels_under_the_mask(masked_env):
    if not isa.host_has_avx512():
        pytest.skip("host CPU has no AVX-512: the mask hides nothing, torch reports the same")
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    native = run_py(code, isa.isa_env("native", masked_env))
    masked = run_py(code, masked_env)
    assert native.returncode == 0 and masked.returncode == 0, native.stderr + masked.stderr
    assert native.stdout.strip().startswith("AVX512")
    assert masked.stdout.strip() == "AVX2"


_ORT_CHILD = """
import ctypes, sys
import numpy as np, onnxruntime as ort
from deltadiff.benchmarks.isa import active_isa
so = ort.SessionOptions(); so.intra_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((1, 32, 40, 40), dtype=np.float32)
np.save(sys.argv[2], s.run(None, {"x": x})[0])
traps = ctypes.CDLL(None).dd_isa_traps() if active_isa() != "native" else 0
print(active_isa(), traps)
"""


def test_onnxruntime_output_under_the_mask_equals_native(masked_env, tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    w = numpy_helper.from_array((0.05 * rng.standard_normal((32, 32, 3, 3))).astype("f4"), "w")
    m = numpy_helper.from_array((0.1 * rng.standard_normal((40, 24))).astype("f4"), "m")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("MatMul", ["r", "m"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 40, 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 40, 24])],
        [w, m],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "tiny.onnx")
    outs = {}
    for name, env in (("native", isa.isa_env("native", masked_env)), ("avx2", masked_env)):
        npy = tmp_path / f"{name}.npy"
        proc = run_py(_ORT_CHILD, env, str(tmp_path / "tiny.onnx"), str(npy))
        assert proc.returncode == 0, proc.stderr
        seen, traps = proc.stdout.split()
        assert seen == name
        if name == "avx2":
            assert int(traps) > 0  # onnxruntime's CPUIDs were answered by the shim
        outs[name] = np.load(npy)
    assert np.abs(outs["native"]).max() > 0.1
    np.testing.assert_allclose(outs["avx2"], outs["native"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("flags", [(), ("-X", "faulthandler")], ids=["plain", "faulthandler"])
def test_a_real_segfault_in_a_masked_child_still_crashes(masked_env, flags):
    proc = run_py("import ctypes; ctypes.string_at(0)", masked_env, flags=flags, timeout=60)
    assert proc.returncode == -signal.SIGSEGV
    if flags:  # the program's own SIGSEGV handler was called, then the default action
        assert "Fatal Python error: Segmentation fault" in proc.stderr


def test_runner_execs_a_command_under_the_mask(masked_env):
    code = "from deltadiff.benchmarks.isa import active_isa; print(active_isa())"
    cmd = [sys.executable, "-m", "deltadiff.benchmarks.isa", "avx2", "--", sys.executable, "-c"]
    proc = subprocess.run([*cmd, code], env=masked_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "avx2", proc.stderr
    # native under a masked parent: the inherited mask is removed
    cmd[3] = "native"
    proc = subprocess.run([*cmd, code], env=masked_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "native", proc.stderr


def test_bad_isa_name_is_one_line():
    with pytest.raises(isa.IsaMaskError, match="ISA 'avx512' is not known; use one of") as e:
        isa.isa_env("avx512")
    assert "\n" not in str(e.value)
    proc = subprocess.run(
        [sys.executable, "-m", "deltadiff.benchmarks.isa", "avx512", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: ISA 'avx512' is not known; use one of native, avx2"


def test_native_env_removes_only_the_mask():
    base = {
        "LD_PRELOAD": "/x/libother.so:/c/deltadiff/isa_mask-0123.so",
        "DD_ISA": "avx2",
        "GLIBC_TUNABLES": "glibc.malloc.check=0:" + isa._GLIBC_TUNABLES["avx2"],
        "HOME": "/h",
    }
    assert isa.isa_env("native", base) == {
        "LD_PRELOAD": "/x/libother.so",
        "GLIBC_TUNABLES": "glibc.malloc.check=0",
        "HOME": "/h",
    }


def test_missing_compiler_is_one_clear_line(monkeypatch):
    if sys.platform != "linux" or "cpuid_fault" not in isa._cpu_flags():
        pytest.skip("the compiler check comes after the platform / cpuid_fault checks")
    monkeypatch.setattr(isa.shutil, "which", lambda name: None)
    isa.build_shim.cache_clear()
    try:
        with pytest.raises(isa.IsaMaskError, match="needs a C compiler") as e:
            isa.build_shim()
    finally:
        isa.build_shim.cache_clear()
    assert "\n" not in str(e.value)


def test_bench_upscale_cli_interleaves_isas_and_records_them(monkeypatch, tmp_path):
    """Wiring only (dd-run itself is replaced): every variant runs under every ISA, round by
    round, each process gets its ISA's environment, and the report names the ISA."""
    calls = []

    def fake_run(cmd, env):
        calls.append(
            (cmd[cmd.index("-o") - 1 :], env.get("DD_ISA"), env.get("LD_PRELOAD"), env.get("K_V"))
        )
        Image.new("RGB", (8, 8)).save(cmd[cmd.index("-o") + 1], format="PNG")
        return 0.5, 300 << 20  # seconds, peak RSS bytes

    monkeypatch.setattr(bench_upscale_cli, "_run", fake_run)
    monkeypatch.setattr(
        bench_upscale_cli,
        "isa_env",
        lambda name: {"DD_ISA": name, "LD_PRELOAD": "/c/isa_mask-1.so"} if name == "avx2" else {},
    )
    img = tmp_path / "in.png"
    Image.new("RGB", (2, 2)).save(img)
    argv = [str(img), "--runs", "1", "--out", str(tmp_path), "--label", "t"]
    argv += ["--variant", "fp32:", "--variant", "int8:K_V=a=b --precision int8"]
    bench_upscale_cli.main([*argv, "--isa", "native", "--isa", "avx2"])
    order = ["fp32@native", "int8@native", "fp32@avx2", "int8@avx2"]
    rep = json.loads((tmp_path / "upscale-cli-t.json").read_text())
    assert list(rep["variants"]) == order
    assert [rep["variants"][k]["isa"] for k in order] == ["native", "native", "avx2", "avx2"]
    assert [c[1] for c in calls] == [None, None, "avx2", "avx2"] * 2  # cold round + 1 run
    assert calls[2][2] == "/c/isa_mask-1.so" and calls[1][2] is None
    assert calls[1][0][-2:] == ["--precision", "int8"]
    # leading KEY=VALUE words of a variant are its processes' environment, not dd-run options
    assert [c[3] for c in calls[:4]] == [None, "a=b", None, "a=b"]
    assert "K_V=a=b" not in calls[1][0]
    assert rep["variants"]["int8@native"]["command"].startswith("K_V=a=b dd-run upscale")
    assert rep["variants"]["fp32@native"]["peak_rss_mib"] == 300
    md = (tmp_path / "upscale-cli-t.md").read_text()
    assert "| fp32@avx2 | avx2 |" in md and "not another machine" in md and "| 300 MiB |" in md
    # no --isa under a masked parent (the ISA runner): the children are masked too
    monkeypatch.setattr(bench_upscale_cli, "active_isa", lambda: "avx2")
    calls.clear()
    bench_upscale_cli.main(argv)
    rep = json.loads((tmp_path / "upscale-cli-t.json").read_text())
    assert [v["isa"] for v in rep["variants"].values()] == ["avx2", "avx2"]
    assert [c[1] for c in calls] == ["avx2"] * 4
    with pytest.raises(SystemExit):  # argparse: one line naming the choices
        bench_upscale_cli.main([str(img), "--isa", "avx512"])


def test_shim_source_ships_with_the_package():
    assert Path(isa.SHIM_SOURCE).is_file()
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"deltadiff.benchmarks" = ["*.json", "*.c"]' in pyproject


def test_bench_markdown_names_the_isa_mask():
    from deltadiff.benchmarks.report import _env_section

    masked = "\n".join(_env_section({"environment": {"cpu": {"model": "X", "isa_mask": "avx2"}}}))
    native = "\n".join(_env_section({"environment": {"cpu": {"model": "X", "isa_mask": None}}}))
    assert "ISA mask avx2" in masked and "ISA mask" not in native
