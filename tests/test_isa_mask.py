"""The AVX2 ISA mask (benchmarks/isa_mask.c + isa.py + isa_patch.py): child processes under it see
no AVX-512 in CPUID, PyTorch and onnxruntime pick AVX2 kernels and still compute the same numbers,
real crashes still crash, and reports record the mask. Each masked test runs with both methods:
"fault" (CPUID faulting, where the CPU offers it) and "patch" (patched library copies, anywhere)."""

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


@pytest.fixture(scope="module", params=isa.METHODS)
def masked_env(request, tmp_path_factory):
    """The environment of an avx2-masked child (each method), shim built into a fresh cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DD_ISA_METHOD", request.param)
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    isa._build_shim.cache_clear()
    try:
        reason = isa.unavailable_reason()
        if reason:
            pytest.skip(reason)
        env = isa.isa_env("avx2")
        assert ("DD_ISA_PATCHED" in env) == (request.param == "patch")
        yield env
    finally:
        mp.undo()
        isa._build_shim.cache_clear()


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
cpu = environment(BenchOptions(models=()))["cpu"]
print(json.dumps({"isa": active_isa(), "avx512f": avx512f(), "thread": seen[0],
                  "traps": lib.dd_isa_traps(), "isa_mask": cpu["isa_mask"],
                  "method": cpu["isa_mask_method"]}))
"""


def test_masked_child_hides_avx512_in_every_thread_even_with_faulthandler(masked_env):
    # -X faulthandler installs a SIGSEGV handler, which the shim must keep from replacing its own
    proc = run_py(_CPUID_CHILD, masked_env, flags=("-X", "faulthandler"))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["isa"] == "avx2" and got["isa_mask"] == "avx2"
    assert got["method"] == ("patch" if "DD_ISA_PATCHED" in masked_env else "fault")
    assert got["avx512f"] is False and got["thread"] == ["avx2", False]
    assert got["traps"] >= 2  # our two CPUIDs at least went through the handler
    # this (unmasked) process: no mask, and reports say so
    assert isa.active_isa() == "native"
    assert environment(BenchOptions(models=()))["cpu"]["isa_mask"] is None
    assert environment(BenchOptions(models=()))["cpu"]["isa_mask_method"] is None


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
import ctypes, os, sys
import numpy as np
from deltadiff.benchmarks.isa import active_isa
masked = active_isa() != "native"
before = ctypes.CDLL(None).dd_isa_traps() if masked else 0
import onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((1, 32, 40, 40), dtype=np.float32)
np.save(sys.argv[2], s.run(None, {"x": x})[0])
traps = ctypes.CDLL(None).dd_isa_traps() - before if masked else 0
site = os.environ.get("DD_ISA_PATCHED")
assert not site or ort.__file__.startswith(site), ort.__file__  # the patched copy
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
            assert int(traps) > 0  # onnxruntime's own CPUIDs (after numpy's) went to the shim
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
    # patch method: the copy on PYTHONPATH and the PyTorch switches it set go too; a switch the
    # user had set is neither overridden nor removed
    so = Path("/c/deltadiff/isa_mask-0123.so")
    user = {"PYTHONPATH": "/mine", "HOME": "/h", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    patched = isa._masked_env(user, "avx2", so, Path("/c/site"))
    assert patched["PYTHONPATH"] == "/c/site:/mine" and patched["ATEN_CPU_CAPABILITY"] == "avx2"
    assert patched["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE"
    assert isa.isa_env("native", patched) == user


def test_missing_compiler_is_one_clear_line(monkeypatch):
    if (reason := isa.unavailable_reason()) is not None:
        pytest.skip(f"the compiler check comes after the platform / method checks: {reason}")
    monkeypatch.setattr(isa.shutil, "which", lambda name: None)
    isa._build_shim.cache_clear()
    try:
        with pytest.raises(isa.IsaMaskError, match="needs a C compiler") as e:
            isa.build_shim()
    finally:
        isa._build_shim.cache_clear()
    assert "\n" not in str(e.value)


def test_missing_capstone_and_unknown_method_are_one_line(monkeypatch):
    if sys.platform != "linux" or isa.platform.machine() != "x86_64":
        pytest.skip("the method checks come after the platform check")
    monkeypatch.setenv("DD_ISA_METHOD", "patch")
    real = isa.importlib.util.find_spec
    monkeypatch.setattr(
        isa.importlib.util, "find_spec", lambda n, *a: None if n == "capstone" else real(n, *a)
    )
    reason = isa.unavailable_reason()
    assert "pip install capstone" in reason and "\n" not in reason
    monkeypatch.setenv("DD_ISA_METHOD", "trap")
    with pytest.raises(isa.IsaMaskError, match="DD_ISA_METHOD=trap is not known; use one of"):
        isa.mask_method()


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

    cpu = {"model": "X", "isa_mask": "avx2", "isa_mask_method": "patch"}
    masked = "\n".join(_env_section({"environment": {"cpu": cpu}}))
    native = "\n".join(_env_section({"environment": {"cpu": {"model": "X", "isa_mask": None}}}))
    assert "ISA mask avx2" in masked and "ISA mask" not in native
    assert isa.METHOD_NOTES["patch"] in masked


# f: a real CPUID; g: 0F A2 inside an instruction's immediate; blob: 0F A2 as data
_CPUID_LIB = r"""
unsigned f(unsigned leaf) {
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(0));
    return b;
}
unsigned g(void) { unsigned x; __asm__ volatile("movl $0x00a20f00, %0" : "=r"(x)); return x; }
const unsigned char blob[] = {0x0f, 0xa2, 0x0f, 0xa2};
"""

_CALL_F = """
import ctypes, json, os, signal, sys
lib = ctypes.CDLL(sys.argv[1])
leaf7 = lib.f(7)
print(json.dumps({"avx512f": bool(leaf7 >> 16 & 1), "avx2": bool(leaf7 >> 5 & 1), "g": lib.g()}))
sys.stdout.flush()
if len(sys.argv) > 2:  # a SIGTRAP that is no patched CPUID: the default action
    os.kill(os.getpid(), signal.SIGTRAP)
"""


def test_patch_finds_cpuids_by_disassembly_and_the_shim_answers_only_patched_folders(tmp_path):
    """Not a byte search: 0F A2 in an immediate or in data is left alone. The patched CPUID traps
    into the shim, which masks it for a library inside DD_ISA_PATCHED only; any other SIGTRAP
    (outside that folder, or sent by kill) still gets the default action."""
    from deltadiff.benchmarks import isa_patch

    mp = pytest.MonkeyPatch()
    mp.setenv("DD_ISA_METHOD", "patch")  # on a faulting machine too
    mp.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    try:
        reason = isa.unavailable_reason()
    finally:
        mp.undo()
    if reason:
        pytest.skip(reason)
    (tmp_path / "c.c").write_text(_CPUID_LIB)
    lib = tmp_path / "orig" / "libc_cpuid.so"
    lib.parent.mkdir()
    cc = [isa._compiler(), "-O1", "-shared", "-fPIC", str(tmp_path / "c.c"), "-o", str(lib)]
    subprocess.run(cc, check=True)
    data = lib.read_bytes()
    execs = b"".join(data[o : o + n] for o, n in isa_patch._code_ranges(data))
    assert execs.count(isa_patch.CPUID) >= 2 and data.count(isa_patch.CPUID) >= 4
    sites = isa_patch.cpuid_sites(data)
    assert len(sites) == 1
    with pytest.MonkeyPatch.context() as mp:  # tiny windows: cuts everywhere, same answer
        mp.setattr(isa_patch, "_WINDOW", 40)
        assert isa_patch.cpuid_sites(data) == sites
    site = tmp_path / "site"
    site.mkdir()
    patched = site / lib.name
    patched.write_bytes(data)
    assert isa_patch.patch_file(patched) == 1
    new = patched.read_bytes()
    assert new[sites[0] : sites[0] + 2] == isa_patch.TRAP
    assert new.count(isa_patch.CPUID) == data.count(isa_patch.CPUID) - 1
    assert isa_patch.cpuid_sites(new) == []

    # the shim alone, not the library copies
    so = tmp_path / "isa_mask.so"
    isa.compile_shim(so)
    env = {**isa.isa_env("native"), "LD_PRELOAD": str(so), "DD_ISA": "avx2"}
    env["DD_ISA_PATCHED"] = str(site)
    native = run_py(_CALL_F, isa.isa_env("native"), str(lib))
    masked = run_py(_CALL_F, env, str(patched))
    assert native.returncode == 0 and masked.returncode == 0, native.stderr + masked.stderr
    native, masked = json.loads(native.stdout), json.loads(masked.stdout)
    assert masked == {"avx512f": False, "avx2": native["avx2"], "g": 0xA20F00}
    assert native["g"] == 0xA20F00 and native["avx512f"] == isa.host_has_avx512()
    # the same patched library outside DD_ISA_PATCHED: its INT3 is not ours, the process dies
    outside = tmp_path / "orig" / "libc_cpuid_patched.so"
    outside.write_bytes(new)
    proc = run_py(_CALL_F, env, str(outside))
    assert proc.returncode == -signal.SIGTRAP and proc.stdout == ""
    proc = run_py(_CALL_F, env, str(patched), "kill")
    assert proc.returncode == -signal.SIGTRAP and '"g": 10620672' in proc.stdout


_ORT_RUN = """
import sys
import numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
print(float(s.run(None, {"x": np.ones((1, 64, 4, 4), np.float32)})[0].mean()))
"""


def test_int8_graphs_compute_exactly_on_avx2_kernels(masked_env, tmp_path):
    """AVX2 kernels multiply U8 by S8 with VPMADDUBSW, which adds pairs of products in 16 bits
    and saturates. The onnxruntime target's 7-bit weights stay clear of it even in the worst case
    (every input at the top of its range, every weight at +max): the INT8 conv computes 32 under
    the mask. The same graph with 8-bit weight levels (same float weights) computes ~16 there."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from deltadiff.calibration import qdq

    w = numpy_helper.from_array(np.full((8, 64, 1, 1), 0.5, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        "worst",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    q = qdq.write("onnxruntime", model, {"x": (0.0, 1.0), "y": (0.0, 32.0)}, ["conv"])
    levels = [a for i in q.graph.initializer if (a := numpy_helper.to_array(i)).ndim == 4]
    assert levels and all(int(np.abs(a).max()) == qdq.ORT_WEIGHT_QMAX for a in levels)
    onnx.save(q, tmp_path / "w7.onnx")
    # the same float weights on the full S8 grid: levels 127, scale 0.5 / 127
    for i in q.graph.initializer:
        a = numpy_helper.to_array(i)
        if a.ndim == 4:  # the weight levels (not their zero points)
            i.CopyFrom(numpy_helper.from_array(np.full_like(a, 127), i.name))
        elif i.name.startswith("w") and a.size == 8 and a.dtype == np.float32:
            i.CopyFrom(numpy_helper.from_array(np.full_like(a, 0.5 / 127), i.name))
    onnx.save(q, tmp_path / "w8.onnx")
    got = {}
    for name in ("w7", "w8"):
        proc = run_py(_ORT_RUN, masked_env, str(tmp_path / f"{name}.onnx"))
        assert proc.returncode == 0, proc.stderr
        got[name] = float(proc.stdout)
    assert abs(got["w7"] - 32.0) < 0.2, got
    assert got["w8"] < 20.0, got  # saturated: the reason the target uses 7 bits
