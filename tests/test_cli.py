"""CLI surface: --help everywhere, unbuilt commands say so and exit non-zero, errors are one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

EXPORT_CMDS = ["onnx", "verify", "build-engine", "calibrate", "golden"]
RUN_CMDS = ["upscale", "info", "bench", "bench-cli"]


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
    r = run(sys.executable, "-m", "deltadiff.cli.run", "--help")
    assert r.returncode == 0


def test_sizes_are_width_x_height_in_both_clis(monkeypatch, tmp_path):
    """One parser (deltadiff.options.parse_size): ``640x480`` is 640 wide and 480 high in dd-export
    (--size, --tile, --min-lr / --max-lr, --profile, --sizes) and in dd-run (--size, --lr)."""
    from typer.testing import CliRunner

    import deltadiff.export.onnx_export as onnx_export
    import deltadiff.runtime.upscaler as upscaler
    from deltadiff.cli import export as export_cli
    from deltadiff.cli.run import app as run_app
    from deltadiff.errors import DeltaDiffError
    from deltadiff.options import parse_size

    assert parse_size("640x480") == (480, 640) and parse_size("64") == (64, 64)  # (h, w) inside
    seen: dict = {}

    def fake_verify(*args, lr_hw=None, **kw):
        seen["verify"] = lr_hw
        return True

    monkeypatch.setattr(export_cli, "_verify_and_print", fake_verify)
    r = CliRunner().invoke(
        export_cli.app, ["verify", "--model", str(tmp_path), "--size", "640x480"]
    )
    assert r.exit_code == 0, r.output
    assert seen["verify"] == (480, 640)

    def fake_export(pipe, out, opts, **kw):
        seen["export"] = (opts.tile.h, opts.tile.w, opts.min_lr, opts.max_lr)
        raise DeltaDiffError("stopped by the test")

    monkeypatch.setattr(onnx_export, "export_onnx", fake_export)
    args = ["onnx", "--preset", "deltadiff-pixel-small", "-o", str(tmp_path / "m"), "--dynamic"]
    args += ["--tile", "64x48", "--min-lr", "8x4", "--max-lr", "640x480"]
    r = CliRunner().invoke(export_cli.app, args)
    assert "stopped by the test" in r.output
    assert seen["export"] == (48, 64, (4, 8), (480, 640))
    assert export_cli.parse_profile("64x48:128x96:640x480") == ((48, 64), (96, 128), (480, 640))

    real_plan = upscaler.plan_image

    def spy_plan(m, opts, h, w, max_px):
        seen["info"] = (h, w)
        return real_plan(m, opts, h, w, max_px)

    monkeypatch.setattr(upscaler, "plan_image", spy_plan)
    r = CliRunner().invoke(run_app, ["info", "--size", "640x480"])  # the bundled demo model
    assert r.exit_code == 0, r.output
    assert seen["info"] == (480, 640)
    assert "plan        640x480 LR -> 2560x1920" in r.output


@pytest.mark.parametrize("bad", ["64,48", "0x4", "4x", "1x2x3", "wide"])
def test_a_bad_size_is_one_line_naming_the_format(bad):
    r = run("dd-run", "info", "--size", bad)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "--size" in r.stderr and ("WIDTHxHEIGHT" in r.stderr or "positive" in r.stderr)
