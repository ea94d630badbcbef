"""The default precision per model and per machine (runtime/precision.py, deltadiff/cpu.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from deltadiff.cpu import CpuInfo, parse_cpuinfo
from deltadiff.manifest import Manifest, load_manifest
from deltadiff.options import Backend, Mode, Precision
from deltadiff.runtime import precision as P
from deltadiff.runtime.probe import run_probe
from deltadiff.runtime.upscaler import default_model_dir

EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni
"""
XEON_VNNI = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_int8
processor\t: 1
model name\t: ignored second block
flags\t\t: sse2
"""
ALDER_AVX_VNNI = "model name\t: 12th Gen Intel(R) Core(TM) i7-1260P\nflags\t: avx2 fma avx_vnni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\nCPU part\t: 0xd0c\n"


def test_cpuinfo_parsing_finds_the_int8_dot_product_flags():
    epyc = parse_cpuinfo(EPYC_AVX2)
    assert (epyc.model, epyc.int8_dot, epyc.isa) == ("AMD EPYC", None, "AVX2 + FMA")
    xeon = parse_cpuinfo(XEON_VNNI)
    assert xeon.model.startswith("Intel(R) Xeon") and xeon.int8_dot == "amx_int8"
    assert xeon.isa == "AVX-512 + FMA + AMX-INT8 + AVX512-VNNI"
    assert parse_cpuinfo(ALDER_AVX_VNNI).int8_dot == "avx_vnni"
    arm = parse_cpuinfo(ARM, arch="aarch64")
    assert arm.int8_dot is None and arm.isa == "aarch64"
    # the cache key changes with the flags that matter, not with others
    assert epyc.key != parse_cpuinfo(EPYC_AVX2.replace("avx2", "avx2 avx512_vnni")).key
    assert epyc.key == parse_cpuinfo(EPYC_AVX2.replace("sha_ni", "sha_ni clzero")).key


@pytest.fixture(scope="module")
def demo() -> Manifest:
    return load_manifest(default_model_dir(), check_hashes=False)


def _gate(m: Manifest, passed: bool) -> Manifest:
    """``m`` with its onnxruntime INT8 graphs marked as passing / failing the gate."""
    graphs = {
        k: replace(g, quant={**g.quant, "usable": passed, "runtime_gate": {"passed": passed}})
        if g.precision == "int8" and g.target == "onnxruntime"
        else g
        for k, g in m.graphs.items()
    }
    return replace(m, graphs=graphs)


@pytest.fixture
def no_probes(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTADIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


AVX2, VNNI = parse_cpuinfo(EPYC_AVX2), parse_cpuinfo(XEON_VNNI)
ORT, STAGED = Backend.ONNXRUNTIME, Mode.STAGED


def test_isa_rule_when_the_gate_passed(demo, no_probes):
    m = _gate(demo, True)
    pick = P.choose_precision(m, ORT, STAGED, None, cpu=AVX2)
    assert pick.precision is Precision.FP32 and "no VNNI/AMX" in pick.reason
    assert "AVX2" in pick.line() and not pick.explicit
    pick = P.choose_precision(m, ORT, STAGED, None, cpu=VNNI)
    assert pick.precision is Precision.INT8 and "amx_int8" in pick.reason


def test_failed_gate_or_other_backends_mean_fp32_and_explicit_always_wins(demo, no_probes):
    failed = _gate(demo, False)
    pick = P.choose_precision(failed, ORT, STAGED, None, cpu=VNNI)
    assert pick.precision is Precision.FP32 and "failed the runtime gate" in pick.reason
    ok = _gate(demo, True)
    for backend, mode in [(Backend.TENSORRT, STAGED), (ORT, Mode.UNROLLED)]:
        assert P.choose_precision(ok, backend, mode, None, cpu=VNNI).precision is Precision.FP32
    pick = P.choose_precision(failed, ORT, STAGED, Precision.INT8, cpu=AVX2)
    assert pick.precision is Precision.INT8 and pick.explicit


def _record(m: Manifest, cpu: CpuInfo, fp32: float, int8: float) -> P.ProbeRecord:
    return P.ProbeRecord(
        cpu_key=cpu.key,
        cpu=cpu.model,
        isa=cpu.isa,
        model_key=P.model_key(m),
        lr=64,
        threads=2,
        fp32_s=fp32,
        int8_s=int8,
        runs=3,
        date="2026-12-07",
    )


def test_a_cached_probe_overrides_the_isa_rule_both_ways(demo, no_probes):
    m = _gate(demo, True)
    path = P.save_probe(_record(m, AVX2, fp32=2.0, int8=1.5))
    assert path.parent == no_probes
    pick = P.choose_precision(m, ORT, STAGED, None, cpu=AVX2)
    assert pick.precision is Precision.INT8 and "1.33x" in pick.reason
    P.save_probe(_record(m, VNNI, fp32=2.0, int8=1.98))  # within MIN_SPEEDUP: not worth it
    pick = P.choose_precision(m, ORT, STAGED, None, cpu=VNNI)
    assert pick.precision is Precision.FP32 and "measured on this CPU" in pick.reason
    # both records are kept, keyed by CPU; another model's graphs do not match them
    assert len(json.loads(path.read_text())) == 2
    other = replace(m, graphs={k: replace(g, sha256="0" * 64) for k, g in m.graphs.items()})
    assert "no VNNI" in P.choose_precision(other, ORT, STAGED, None, cpu=AVX2).reason


def test_a_corrupt_probe_cache_is_ignored(demo, no_probes):
    no_probes.mkdir(parents=True)
    (no_probes / P.PROBE_FILE).write_text("{not json")
    assert P.find_probe(demo, AVX2) is None
    (no_probes / P.PROBE_FILE).write_text(json.dumps({f"{AVX2.key}/{P.model_key(demo)}": {"x": 1}}))
    assert P.find_probe(demo, AVX2) is None


def test_dd_run_info_prints_the_choice_and_its_reason(no_probes):
    env = {"DELTADIFF_CACHE": str(no_probes), "PATH": str(Path(sys.executable).parent)}
    r = subprocess.run(
        [sys.executable, "-m", "deltadiff.cli.run", "info"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.strip()}
    assert lines["cpu"].startswith("cpu ") and lines["precision"].split()[1] in ("fp32", "int8")
    assert "default:" in lines["precision"]
    r = subprocess.run(
        [sys.executable, "-m", "deltadiff.cli.run", "info", "--precision", "fp32"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert "precision   fp32 (asked for: --precision)" in r.stdout


def test_probe_times_both_precisions_and_its_record_drives_the_default(tmp_path, no_probes):
    """A real (tiny) probe on the bundled demo: 8x8 LR, one timed run each."""
    import shutil

    src = default_model_dir()
    d = tmp_path / "demo"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.tensorrt.*", "*fp16*", "unrolled*"))
    m = json.loads((d / "manifest.json").read_text())
    for g in m["graphs"].values():  # this test is about the probe, not the gate's verdict
        if g["precision"] == "int8":
            g.setdefault("quant", {}).update(usable=True, runtime_gate={"passed": True})
    (d / "manifest.json").write_text(json.dumps(m))
    rec = run_probe(d, lr=8, runs=1, threads=1)
    assert rec.fp32_s > 0 and rec.int8_s > 0 and rec.runs == 1 and rec.threads == 1
    P.save_probe(rec)
    man = load_manifest(d, check_hashes=False)
    pick = P.choose_precision(man, ORT, STAGED, None)
    assert "measured on this CPU" in pick.reason and f"{rec.speedup:.2f}x" in pick.reason
    assert pick.precision is (Precision.INT8 if rec.speedup >= P.MIN_SPEEDUP else Precision.FP32)
