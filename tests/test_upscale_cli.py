"""``dd-run upscale`` on real files and on bad input: never a traceback, never a partial file."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image


def dd_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dd-run", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    rgb = (rng.random((18, 22, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(d / "rgb.png")
    Image.fromarray(rgb[:, :, 0]).save(d / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((18, 22), 128, np.uint8)])).save(d / "rgba.png")
    Image.fromarray(rgb).save(d / "photo.jpg", quality=90)
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg", quality=95)  # Adobe CMYK
    Image.fromarray(rgb[:1, :1]).save(d / "one.png")  # 1x1
    (d / "notes.txt").write_text("not an image")
    bad = d / "bad"
    bad.mkdir()
    data = (d / "rgb.png").read_bytes()
    (bad / "truncated.png").write_bytes(data[: len(data) // 2])
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.png").write_text("hello")
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    frames[0].save(bad / "anim.gif", save_all=True, append_images=frames[1:])
    big = Image.new("L", (20000, 10000))  # 2e8 px > Pillow's decompression-bomb limit
    big.save(bad / "bomb.png", optimize=False)
    return d


def test_folder_batch_reports_failures_and_continues(exported, images, tmp_path):
    model = exported("deltadiff-pixel")
    out = tmp_path / "out"
    r = dd_run("upscale", str(images), "-o", str(out), "--model", str(model), "-q")
    assert r.returncode == 1  # some inputs are bad
    assert "Traceback" not in r.stderr
    for name in ("truncated.png", "empty.png", "text.png", "anim.gif", "bomb.png"):
        assert name in r.stderr, name
        assert not (out / "bad" / name).exists()
    for name, shape in (
        ("rgb.png", (72, 88, 3)),
        ("gray.png", (72, 88)),
        ("rgba.png", (72, 88, 4)),
        ("photo.jpg", (72, 88, 3)),
        ("cmyk.jpg", (72, 88, 3)),
        ("one.png", (4, 4, 3)),
    ):
        assert np.asarray(Image.open(out / name)).shape == shape, name
    assert not (out / "notes.txt").exists()
    assert "6 upscaled" in r.stderr and "5 failed" in r.stderr
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert not leftovers


def test_existing_outputs_are_skipped_unless_overwrite(exported, images, tmp_path):
    model = exported("deltadiff-pixel")
    dst = tmp_path / "x.png"
    dst.write_bytes(b"keep me")
    r = dd_run("upscale", str(images / "rgb.png"), "-o", str(dst), "--model", str(model), "-q")
    assert r.returncode == 0 and "skipped" in r.stderr and dst.read_bytes() == b"keep me"
    r = dd_run(
        "upscale",
        str(images / "rgb.png"),
        "-o",
        str(dst),
        "--model",
        str(model),
        "-q",
        "--overwrite",
    )
    assert r.returncode == 0 and Image.open(dst).size == (88, 72)


def test_unwritable_output_is_one_line_error(exported, images, tmp_path):
    if os.geteuid() == 0:
        target = "/proc/deltadiff-no-such-dir/out.png"  # not creatable even as root
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = str(ro / "out.png")
    r = dd_run(
        "upscale",
        str(images / "rgb.png"),
        "-o",
        target,
        "--model",
        str(exported("deltadiff-pixel")),
        "-q",
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr and "failed" in r.stderr


def test_bad_model_dirs_are_refused_with_the_fix(exported, images, tmp_path):
    good = exported("deltadiff-pixel")
    edited = tmp_path / "edited"
    shutil.copytree(good, edited)
    with (edited / "decoder.onnx").open("ab") as fh:
        fh.write(b"x")
    nomani = tmp_path / "nomani"
    shutil.copytree(good, nomani)
    (nomani / "manifest.json").unlink()
    garbled = tmp_path / "garbled"
    shutil.copytree(good, garbled)
    (garbled / "manifest.json").write_text('{"schema_version": 1, "graphs": [')
    for d, match in (
        (edited, "modified after export"),
        (nomani, "manifest.json is missing"),
        (garbled, "not valid JSON"),
        (tmp_path / "none", "does not exist"),
    ):
        r = dd_run(
            "upscale",
            str(images / "rgb.png"),
            "-o",
            str(tmp_path / "o.png"),
            "--model",
            str(d),
            "-q",
        )
        assert r.returncode == 1 and match in r.stderr and "Traceback" not in r.stderr, (
            d,
            r.stderr,
        )
        assert not (tmp_path / "o.png").exists()


def test_wrong_tile_option_names_the_fix(exported, images, tmp_path):
    r = dd_run(
        "upscale",
        str(images / "rgb.png"),
        "-o",
        str(tmp_path / "o.png"),
        "--model",
        str(exported("deltadiff-pixel")),
        "--tile",
        "32",
    )
    assert r.returncode == 1 and "re-export" in r.stderr


def test_big_image_says_its_tile_count_and_quiet_silences_it(exported, tmp_path):
    # 256x192 LR with 16x16 tiles (overlap 4): 21 x 16 = 336 tiles
    rgb = (np.random.default_rng(1).random((64, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "big.png")
    model = str(exported("deltadiff-pixel"))
    r = dd_run(
        "upscale", str(tmp_path / "big.png"), "-o", str(tmp_path / "o.png"), "--model", model
    )
    assert r.returncode == 0, r.stderr
    assert "big.png: 20 tiles of 16x16 LR" in r.stderr
    r = dd_run(
        "upscale", str(tmp_path / "big.png"), "-o", str(tmp_path / "q.png"), "--model", model, "-q"
    )
    assert r.returncode == 0 and "tiles of" not in r.stderr
