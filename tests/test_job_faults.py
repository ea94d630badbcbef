"""Faults that stay one file's fault: out of memory (numpy's MemoryError, onnxruntime's own
allocation errors) is retried with smaller tiles, then recorded for that file; any other
exception is recorded with its type and message; the job goes on. An output folder inside the
input folder is never read back. Uses the bundled (dynamic) demo model, run at FP32."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, RuntimeException
from PIL import Image

from deltadiff.errors import BackendError, ImageError
from deltadiff.runtime.executor import Executor
from deltadiff.runtime.faults import allocation_failure, one_line
from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler, plan_outputs, run_job

BAD = 31  # the pixel value of the file whose backend calls fail
ORT_OOM = (
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running "
    "Conv node. Name:'/enc/conv' Status Message: Failed to allocate memory for requested buffer "
    "of size 1073741824"
)


@pytest.fixture(scope="module")
def up():
    with Upscaler(None, UpscaleOptions(precision="fp32", threads=1)) as u:
        yield u


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(src / "a.png")
    Image.fromarray(np.full((16, 16, 3), BAD, np.uint8)).save(src / "b.png")
    Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)).save(src / "c.png")
    return src


class Inject:
    """Executor.run that raises ``make()`` for calls on the BAD image while ``when(h, w)``."""

    def __init__(self, monkeypatch, make, when=lambda h, w: True) -> None:
        self.calls: list[tuple[int, int, bool]] = []  # BAD image calls: (tile h, tile w, raised)
        real = Executor.run

        def run(ex, lr, noise=None, **kw):
            bad = bool(np.all(lr == np.float32(BAD) / np.float32(255)))
            hit = bad and when(*lr.shape[-2:])
            if bad:
                self.calls.append((*lr.shape[-2:], hit))
            if hit:
                raise make()
            return real(ex, lr, noise, **kw)

        monkeypatch.setattr(Executor, "run", run)

    def bad_tiles(self) -> list[tuple[int, int]]:
        return [(h, w) for h, w, hit in self.calls if hit]


def test_allocation_failures_are_recognised() -> None:
    assert allocation_failure(MemoryError())
    assert allocation_failure(RuntimeException(ORT_OOM))
    assert allocation_failure(Fail("[ONNXRuntimeError] : 1 : FAIL : bad allocation"))
    assert allocation_failure(BackendError("CUDA cudaMalloc failed: cudaErrorMemoryAllocation"))
    try:
        try:
            raise MemoryError
        except MemoryError as inner:
            raise BackendError("the decoder failed") from inner
    except BackendError as wrapped:
        assert allocation_failure(wrapped)
    assert not allocation_failure(ValueError("shapes (1,3,8,8) and (1,3,4,4) do not match"))
    assert not allocation_failure(ImageError("x.png: file is truncated or corrupt; re-export it"))
    assert one_line(RuntimeException("a\n  b\tc")) == "a b c"


def test_memory_error_is_retried_with_smaller_tiles(up, folder, tmp_path, monkeypatch, caplog):
    """The 16x16 image runs whole; a MemoryError there makes it run again in tiles of a quarter
    of the pixels, which succeed: every file is done."""
    inj = Inject(monkeypatch, MemoryError, when=lambda h, w: h * w > 64)
    pairs = plan_outputs([folder], tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="deltadiff.runtime.upscaler"):
        summary = run_job(up, pairs)
    assert summary.failed == [] and len(summary.done) == 3
    bad = [(h, w, hit) for h, w, hit in inj.calls if hit]
    assert bad == [(16, 16, True)]  # the whole image, once
    after = inj.calls[inj.calls.index((16, 16, True)) + 1 :]
    assert len(after) > 1 and all((h, w) == (8, 8) for h, w, _ in after)  # then 8x8 tiles
    assert any("b.png: out of memory with 16x16 LR tiles" in r.message for r in caplog.records)
    assert any("retrying with tiles of at most 64 LR pixels" in r.message for r in caplog.records)
    assert Image.open(tmp_path / "out" / "b.png").size == (64, 64)


def test_ort_allocation_failure_gives_up_after_smaller_tiles(up, folder, tmp_path, monkeypatch):
    """onnxruntime's own RuntimeException on every call for one file: the tiles shrink to the
    smallest the model runs, then that file fails with one line and the others are done."""
    inj = Inject(monkeypatch, lambda: RuntimeException(ORT_OOM))
    seen: list[tuple[str, str]] = []
    summary = run_job(
        up,
        plan_outputs([folder], tmp_path / "out"),
        on_file=lambda s, st: seen.append((s.name, st)),
    )
    assert seen == [("a.png", "done"), ("b.png", "failed"), ("c.png", "done")]
    [(src, why)] = summary.failed
    assert src.name == "b.png" and "\n" not in why
    assert why.startswith(f"{src}: out of memory with ") and "Failed to allocate memory" in why
    assert inj.bad_tiles() == [(16, 16), (8, 8)]  # whole, then a quarter; 4x4 < the overlap
    assert "out of memory with 8x8 LR tiles, 1 per call, the smallest this model runs" in why
    assert not (tmp_path / "out" / "b.png").exists()


def test_unexpected_exception_is_recorded_per_file(up, folder, tmp_path, monkeypatch, caplog):
    Inject(monkeypatch, lambda: ZeroDivisionError("float division by zero"))
    with caplog.at_level(logging.DEBUG, logger="deltadiff.runtime.faults"):
        summary = run_job(up, plan_outputs([folder], tmp_path / "out"))
    assert len(summary.done) == 2
    [(src, why)] = summary.failed
    assert why == (
        f"{src}: unexpected ZeroDivisionError: float division by zero "
        "(the debug log has the traceback)"
    )
    tb = [r for r in caplog.records if r.exc_info and r.exc_info[0] is ZeroDivisionError]
    assert tb, "the traceback is in the debug log"


def test_cli_reports_the_failed_file_and_exits_1(folder, tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from deltadiff.cli.run import app

    Inject(monkeypatch, lambda: Fail("[ONNXRuntimeError] : 1 : FAIL : bad allocation"))
    out = tmp_path / "out"
    r = CliRunner().invoke(
        app, ["upscale", str(folder), "-o", str(out), "--precision", "fp32", "-q"]
    )
    assert r.exit_code == 1, r.output
    assert "2 upscaled, 0 skipped, 1 failed" in r.output
    assert "b.png: out of memory" in r.output and "Traceback" not in r.output
    assert "retrying with tiles" in r.output  # the warning is shown


def test_output_folder_inside_the_input_is_not_read(folder: Path) -> None:
    out = folder / "x4"
    first = plan_outputs([folder], out)
    for _src, dst in first:
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(dst)
    (out / "deeper").mkdir()
    Image.new("RGB", (4, 4)).save(out / "deeper" / "d.png")
    again = plan_outputs([folder], out)
    assert again == first and all(out not in src.parents for src, _ in again)
    # the same folder is an input like any other when it is not the output
    assert len(plan_outputs([folder], folder.parent / "elsewhere")) == 3 + 4


def test_upscale_into_a_folder_inside_the_input_twice(folder: Path) -> None:
    """``dd-run upscale in/ -o in/x4`` run twice: the second run skips the three outputs and
    creates no in/x4/x4."""
    import subprocess

    args = ["dd-run", "upscale", str(folder), "-o", str(folder / "x4"), "--precision", "fp32"]
    r1 = subprocess.run([*args, "-q"], capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0 and "3 upscaled, 0 skipped" in r1.stderr, r1.stderr
    r2 = subprocess.run([*args, "-q"], capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0 and "0 upscaled, 3 skipped, 0 failed" in r2.stderr, r2.stderr
    assert not (folder / "x4" / "x4").exists()
    assert sorted(p.name for p in (folder / "x4").iterdir()) == ["a.png", "b.png", "c.png"]
