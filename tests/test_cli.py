"""CLI surface: --help everywhere, unbuilt commands say so and exit non-zero, errors are one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

EXPORT_CMDS = ["onnx", "verify", "build-engine", "calibrate", "golden"]
RUN_CMDS = ["upscale", "info", "bench"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("tool", "cmds"), [("dd-export", EXPORT_CMDS), ("dd-run", RUN_CMDS)])
def test_help_works_for_every_command(tool, cmds):
    top = run(tool, "--help")
    assert top.returncode == 0 and "Usage" in top.stdout
    for c in cmds:
        assert c in top.stdout
        r = run(tool, c, "--help")
        assert r.returncode == 0, (c, r.stderr)


def test_calibrate_without_its_required_options_fails_without_traceback():
    r = run("dd-export", "calibrate")
    assert r.returncode != 0 and "--model" in r.stderr
    assert "Traceback" not in r.stderr


def test_export_errors_are_one_line_without_traceback(tmp_path):
    r = run("dd-export", "onnx", "--preset", "nope", "-o", str(tmp_path / "m"), "--no-verify")
    assert r.returncode == 1 and "unknown preset" in r.stderr and "Traceback" not in r.stderr
    r = run(
        "dd-export",
        "onnx",
        "--preset",
        "deltadiff-pixel-small",
        "--tile",
        "10",
        "-o",
        str(tmp_path / "m"),
        "--no-verify",
    )
    assert r.returncode == 1 and "multiple of 4" in r.stderr and "Traceback" not in r.stderr
    r = run("dd-export", "verify", "--model", str(tmp_path / "nothing"))
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_golden_subcommand_defaults_to_the_repository_golden_folder(tmp_path):
    r = run("dd-export", "golden")  # tests/golden, committed: no shared folder needed
    assert r.returncode == 0, r.stdout[-2000:]
    assert "FAIL" not in r.stdout and r.stdout.count("PASS") >= 50
    r = run("dd-export", "golden", str(tmp_path / "none"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_python_m_entry_points():
    r = run(sys.executable, "-m", "deltadiff.runtime.cli", "--help")
    assert r.returncode == 0
