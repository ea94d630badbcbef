"""The prepared GPU check: its dry run (every step that needs no GPU runs), the TensorRT probe on
the simulated GPU, the bare-checkout import, and the headline numbers it reports."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO
from .sim import install

sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402

SCRIPT = REPO / "tools" / "device_check.sh"


def _parts(dev: Path) -> None:
    """A small stand-in for the prepared TensorRT-RTX parts: a real zip split in three."""
    wheels = dev / "wheels"
    wheels.mkdir(parents=True)
    name = "tensorrt_rtx_cu13_libs-1.7.1.116-py3-none-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheels / name, "w") as z:
        z.writestr("tensorrt_rtx_libs/__init__.py", "# stand-in\n" * 5000)
    data = (wheels / name).read_bytes()
    third = len(data) // 3 + 1
    for i in range(3):
        d = dev / f"part{i + 1}"
        d.mkdir()
        (d / f"libs.whl.part{i}").write_bytes(data[i * third : (i + 1) * third])
    (dev / "part3" / "LAST").write_text("3\n")
    (dev / "part3" / "libs.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {name}\n")


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=e, capture_output=True, text=True, timeout=600
    )


def test_dry_run_of_the_whole_device_check(tmp_path):
    dev = tmp_path / "devcheck"
    _parts(dev)
    r = _run(["--dry-run", "all"], tmp_path, DD_DEVCHECK=str(dev))
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    for i in (1, 2, 3):
        assert f"staged part {i}" in out
    assert "would export deltadiff-latent (tile 64, batch 1..4) + FP16" in out
    assert ": OK" in out and "joined wheel is intact" in out  # sha256 of the joined parts
    assert "would: " in out and "pip install --no-index --no-deps --target" in out
    assert '"step": "dry-run"' in out  # the probe
    assert "model demo-pixel: deltadiff-pixel" in out
    assert "would build FP16 engines ('encoder', 'step', 'decoder', 'unrolled')" in out
    assert "tensorrt/fp16/staged/b4" in out and "torch-autocast/fp16/eager/b1" in out
    assert "would: run the model step on" in out and "deltadiff-latent-tile64" in out
    assert (tmp_path / "out" / "device-check-all.log").stat().st_size > 0
    assert (tmp_path / "out" / "probe.json").exists()


def test_a_later_call_on_a_fresh_machine_says_start_again(tmp_path):
    dev = tmp_path / "devcheck"
    _parts(dev)
    r = _run(["call", "2"], tmp_path, DD_DEVCHECK=str(dev), DD_STAGE=str(tmp_path / "stage"))
    assert r.returncode == 4
    assert "FRESH MACHINE" in r.stdout and "start again with 'call 1'" in r.stdout


def test_gpu_check_runs_from_a_bare_checkout(tmp_path):
    """No install: with the editable-install finder removed, the script maps the package itself."""
    code = (
        "import runpy, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "for k in [k for k in sys.modules if k.startswith('deltadiff')]: del sys.modules[k]\n"
        f"sys.argv = ['gpu_check.py', '--dry-run', '--work', {str(tmp_path)!r}, '--out', "
        f"{str(tmp_path)!r}, 'probe']\n"
        f"try:\n    runpy.run_path({str(REPO / 'tools' / 'gpu_check.py')!r}, run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "import deltadiff.benchmarks.harness, deltadiff.export.engine, deltadiff.export.verify\n"
        "import deltadiff.export.onnx_export, deltadiff.runtime.backends.trt\n"
        "print('IMPORTED', deltadiff.export.engine.__file__)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "deltadiff imported from the checkout" in r.stderr
    assert '"step": "dry-run"' in r.stdout
    assert f"IMPORTED {REPO / 'export' / 'engine.py'}" in r.stdout


def test_probe_runs_a_tiny_network_on_the_simulated_gpu(tmp_path):
    with install() as sim:
        ok = gpu_check.probe(tmp_path / "a")
        sim.trt.reject_targets = {"current"}
        refused = gpu_check.probe(tmp_path / "b")
        full = gpu_check.probe(tmp_path / "c", "tensorrt")  # asked for full TensorRT: no swap
    assert ok["ok"] and ok["max_abs_vs_onnxruntime"] < 1e-3 and ok["gpu"].endswith("(sm89)")
    assert not refused["ok"] and refused["step"] == "build"
    assert "rejected this compute capability" in refused["error"]
    assert not full["ok"] and full["step"] == "import" and "no TensorRT found" in full["error"]


def _case(backend, precision, mode, batch, e2e, chain=None, status="ok"):
    st = {"median": e2e}
    return {
        "id": f"m/{backend}/{precision}/{mode}/b{batch}",
        "backend": backend,
        "precision": precision,
        "mode": mode,
        "batch": batch,
        "status": status,
        "reason": None if status == "ok" else "no engine",
        "e2e": st,
        "e2e_device_chain": {"median": chain} if chain else None,
        "stages": {"encode": {"median": e2e / 6}},
        "fidelity": {"psnr_db": 45.0},
    }


def test_headline_uses_the_cuda_graph_chain_not_the_per_stage_path():
    report = {
        "cases": [
            _case("torch", "fp32", "eager", 1, 0.100),
            _case("torch-autocast", "fp16", "eager", 1, 0.050),
            _case("tensorrt", "fp16", "staged", 1, 0.030, chain=0.010),
            _case("tensorrt", "fp16", "unrolled", 1, 0.025, chain=0.012),
            _case("tensorrt", "fp32", "staged", 1, 0.0, status="skipped"),
        ]
    }
    s = gpu_check.summarize(report, "m")
    h = s["batches"][1]["headline"]
    assert h["trt_case"] == "tensorrt/fp16/staged" and h["trt_chain_ms"] == pytest.approx(10.0)
    assert h["trt_per_stage_path_ms"] == pytest.approx(30.0)
    assert h["speedup_vs_fp32"] == pytest.approx(10.0) and h["speedup_vs_amp"] == pytest.approx(5.0)
    assert "m/tensorrt/fp32/staged/b1" in s["skipped"]
    md = gpu_check.summary_markdown(s, ["note"])
    assert "| 1 | 100.00 ms | 50.00 ms | 10.00 ms | 30.00 ms | 10.00× | 5.00× |" in md


@pytest.mark.slow  # ~2 min on the 2-core machine (torch reference, verify, benchmark)
def test_model_step_end_to_end_on_the_simulated_gpu(exported, tmp_path):
    """The device call's model step, for real on the simulation: FP16 engines (target current),
    verify vs the FP32 reference, one benchmark run (torch on the CPU here), the summary."""
    import json
    import shutil

    from deltadiff.export.onnx_export import add_fp16

    d = tmp_path / "pixel"
    shutil.copytree(exported("deltadiff-pixel"), d)
    add_fp16(d)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--work", str(tmp_path / "w"), "model", "--model", str(d)]
    argv += ["--name", "px", "--modes", "staged", "--batches", "1,2", "--min-runs", "2"]
    argv += ["--min-seconds", "0"]
    with install() as sim:
        assert gpu_check.main(argv) == 0
    s = json.loads((out / "summary-px.json").read_text())
    for b in ("1", "2"):
        h = s["batches"][b]["headline"]
        assert h["trt_case"] == "tensorrt/fp16/staged" and h["trt_chain_ms"] > 0
        assert h["torch_fp32_ms"] > 0 and h["speedup_vs_fp32"] > 0
    assert any("verify TensorRT FP16 vs FP32 reference: PASS" in n for n in s["notes"])
    assert "target current" in " ".join(s["notes"])
    assert sim.cuda.launches > 0  # the chain was replayed from a captured graph
    assert (out / "summary-px.md").read_text().startswith("# GPU check: px")
    assert any(p.name.startswith("bench-gpu-px") and p.suffix == ".json" for p in out.iterdir())
