"""Tests for the torch-free x4 SR metrics and evaluator (deltadiff/metrics.py, deltadiff/lpips.py,
benchmarks/quality.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from scipy import signal

from deltadiff import lpips as lpips_mod
from deltadiff.benchmarks.quality import QualityReport, evaluate, write_report
from deltadiff.errors import DeltaDiffError
from deltadiff.lpips import LPIPS, default_lpips_weights
from deltadiff.metrics import (
    Pair,
    bicubic_upscaler,
    degrade_x4,
    load_dataset,
    psnr_y,
    rgb_to_y,
    ssim_y,
    to_uint8,
)

from .conftest import SHARED  # the team's shared data folder (DD_SHARED; docs/testing.md)

VAL = SHARED / "data" / "val-bicubic-x4"
WEIGHTS = SHARED / "weights" / "lpips_alex_v0.1.npz"

needs_val = pytest.mark.skipif(not (VAL / "gt").is_dir(), reason=f"{VAL} not present")
needs_weights = pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"{WEIGHTS} not present")


def _gt_image(i: int = 0) -> np.ndarray:
    path = sorted((VAL / "gt").glob("*.png"))[i]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)


def _textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish synthetic uint8 RGB image (no dataset needed)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = 128 + 60 * np.sin(xx / 5.0)[..., None] * np.cos(yy / 7.0)[..., None]
    img = base + rng.normal(0, 20, size=(h, w, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def lp() -> LPIPS:
    if not WEIGHTS.is_file():
        pytest.skip(f"{WEIGHTS} not present")
    return LPIPS(WEIGHTS)


# ---------------------------------------------------------------------------------------------
# Y conversion, PSNR, SSIM


def test_rgb_to_y_convention() -> None:
    black = np.zeros((2, 2, 3), np.uint8)
    white = np.full((2, 2, 3), 255, np.uint8)
    np.testing.assert_allclose(rgb_to_y(black), 16.0)
    np.testing.assert_allclose(rgb_to_y(white), 235.0)
    px = np.array([[[200, 100, 50]]], np.uint8)
    expected = 16 + (65.481 * 200 + 128.553 * 100 + 24.966 * 50) / 255
    assert rgb_to_y(px)[0, 0] == pytest.approx(expected, abs=1e-12)
    # float input is taken as [0, 1]
    assert rgb_to_y(px.astype(np.float32) / 255)[0, 0] == pytest.approx(expected, abs=1e-4)
    assert rgb_to_y(px).dtype == np.float64


def test_identities() -> None:
    img = _textured(48, 40)
    assert psnr_y(img, img) == math.inf
    assert ssim_y(img, img) == pytest.approx(1.0, abs=1e-12)
    # floats are quantised to 8 bits first: a sub-half-step perturbation is invisible
    f = img.astype(np.float32) / 255 + np.float32(0.4 / 255)
    assert psnr_y(f, img) == math.inf
    assert ssim_y(f, img) == pytest.approx(1.0, abs=1e-12)


def test_psnr_constant_offset() -> None:
    hr = np.full((32, 32, 3), 100, np.uint8)
    sr = np.full((32, 32, 3), 110, np.uint8)
    dy = 10 * (65.481 + 128.553 + 24.966) / 255  # = 10 * 219 / 255
    assert psnr_y(sr, hr) == pytest.approx(20 * math.log10(255 / dy), abs=1e-9)
    assert psnr_y(sr, hr) == pytest.approx(psnr_y(hr, sr))


def test_to_uint8_rounds_half_up_and_clips() -> None:
    x = np.array([-0.1, 0.0, 0.5 / 255, 1.49 / 255, 254.5 / 255, 1.2], np.float64)
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 1, 1, 255, 255])
    with pytest.raises(DeltaDiffError):
        to_uint8(np.array([np.nan]))


def test_border_crop() -> None:
    hr = _textured(40, 40, seed=1)
    sr = hr.copy()
    sr[:4] = 0
    sr[:, -3:] = 255
    assert psnr_y(sr, hr, border=4) == math.inf
    assert ssim_y(sr, hr, border=4) == pytest.approx(1.0, abs=1e-12)
    assert math.isfinite(psnr_y(sr, hr, border=0))
    assert psnr_y(sr, hr, border=2) < 20
    assert ssim_y(sr, hr, border=0) < 0.99
    with pytest.raises(DeltaDiffError):
        psnr_y(sr, hr, border=20)
    with pytest.raises(DeltaDiffError):
        psnr_y(sr, hr[:-4])


def test_ssim_matches_skimage() -> None:
    skm = pytest.importorskip("skimage.metrics")
    hr = _textured(64, 56, seed=2)
    rng = np.random.default_rng(3)
    worst = 0.0
    for noise, border in ((3, 4), (15, 4), (40, 0), (15, 7)):
        sr = np.clip(hr.astype(np.int16) + rng.normal(0, noise, hr.shape), 0, 255).astype(np.uint8)
        ours = ssim_y(sr, hr, border=border)
        b = border
        ys, yh = rgb_to_y(sr), rgb_to_y(hr)
        if b:
            ys, yh = ys[b:-b, b:-b], yh[b:-b, b:-b]
        ref = skm.structural_similarity(
            ys,
            yh,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
        )
        worst = max(worst, abs(ours - ref))
        assert 0 < ours < 1
    # skimage filters the full image (reflect border) and then drops (win-1)/2 = 5 px per side
    # before averaging: the same pixels as 'valid' filtering, so they agree to rounding error.
    assert worst < 1e-9


def test_ssim_symmetric_and_ordered() -> None:
    hr = _textured(48, 48, seed=4)
    rng = np.random.default_rng(5)
    small = np.clip(hr + rng.normal(0, 5, hr.shape), 0, 255).astype(np.uint8)
    large = np.clip(hr + rng.normal(0, 30, hr.shape), 0, 255).astype(np.uint8)
    assert ssim_y(small, hr) == pytest.approx(ssim_y(hr, small), abs=1e-12)
    assert ssim_y(large, hr) < ssim_y(small, hr) < 1
    assert psnr_y(large, hr) < psnr_y(small, hr)


# ---------------------------------------------------------------------------------------------
# LPIPS


def _reference_lpips(weights: Path, a: np.ndarray, b: np.ndarray) -> float:
    """Independent float64 LPIPS: CHW layout, scipy.signal.correlate per output channel (stride
    by subsampling the dense result), explicit-loop max-pool, formula from shared/weights/README.md."""
    npz = dict(np.load(weights))
    shift = npz["scaling.shift"].reshape(3, 1, 1).astype(np.float64)
    scale = npz["scaling.scale"].reshape(3, 1, 1).astype(np.float64)
    layers = [("features.0", 4, 2, True), ("features.3", 1, 2, True)] + [
        (f"features.{i}", 1, 1, False) for i in (6, 8, 10)
    ]

    def taps(img: np.ndarray) -> list[np.ndarray]:
        x = (img.astype(np.float64).transpose(2, 0, 1) * 2 - 1 - shift) / scale
        out = []
        for name, stride, pad, pool in layers:
            w = npz[f"{name}.weight"].astype(np.float64)
            bias = npz[f"{name}.bias"].astype(np.float64)
            xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
            y = np.stack(
                [signal.correlate(xp, w[o], mode="valid", method="auto")[0] for o in range(len(w))]
            )
            y = np.maximum(y[:, ::stride, ::stride] + bias[:, None, None], 0.0)
            out.append(y)
            if pool:
                c, h, wd = y.shape
                ho, wo = (h - 3) // 2 + 1, (wd - 3) // 2 + 1
                z = np.empty((c, ho, wo))
                for i in range(ho):
                    for j in range(wo):
                        z[:, i, j] = y[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max(axis=(1, 2))
                y = z
            x = y
        return out

    total = 0.0
    for layer, (fa, fb) in enumerate(zip(taps(a), taps(b), strict=True)):
        na = fa / (np.sqrt(np.sum(fa**2, axis=0, keepdims=True)) + 1e-10)
        nb = fb / (np.sqrt(np.sum(fb**2, axis=0, keepdims=True)) + 1e-10)
        lin = npz[f"lin{layer}.weight"].reshape(-1, 1, 1).astype(np.float64)
        total += float(np.mean(np.sum(lin * (na - nb) ** 2, axis=0)))
    return total


@needs_weights
@needs_val
def test_lpips_matches_independent_reference(lp: LPIPS) -> None:
    hr = _gt_image(3)
    # non-square, not a multiple of the strides: exercises floor-mode pooling and H/W order
    a = hr[10:77, 20:95].astype(np.float64) / 255  # 67 x 75
    b = np.asarray(
        Image.fromarray(hr[10:77, 20:95]).filter(ImageFilter.GaussianBlur(1)), np.float64
    )
    b = b / 255
    ref = _reference_lpips(WEIGHTS, a, b)
    ours32 = lp(a, b)
    ours64 = LPIPS(WEIGHTS, dtype=np.float64)(a, b)
    assert ref > 0.01
    assert abs(ours64 - ref) < 1e-9  # float64 throughout: rounding only
    # float32 features: ~1e-7 relative per layer, summed over 5 layers of a ~0.1 distance
    assert abs(ours32 - ref) < 1e-5


@needs_weights
@needs_val
def test_lpips_properties(lp: LPIPS) -> None:
    img = np.ascontiguousarray(_gt_image(0)[64:192, 32:160])
    x = img.astype(np.float32) / 255
    rng = np.random.default_rng(0)
    y = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1).astype(np.float32)
    assert lp(x, x) == 0.0
    assert lp(img, img) == 0.0
    assert lp(x, y) == pytest.approx(lp(y, x), abs=1e-9)
    assert lp(img, y) == pytest.approx(lp(x, y), abs=1e-6)  # uint8 accepted (/255)
    assert lp.distance(lp.features(x), lp.features(y)) == lp(x, y)


@needs_weights
@needs_val
def test_lpips_monotonic_in_blur(lp: LPIPS) -> None:
    im = Image.fromarray(_gt_image(5))
    x = np.asarray(im, np.float32) / 255
    vals = [
        lp(x, np.asarray(im.filter(ImageFilter.GaussianBlur(r)), np.float32) / 255)
        for r in (0.5, 1, 2)
    ]
    assert 0 < vals[0] < vals[1] < vals[2]


@needs_weights
def test_lpips_input_validation(lp: LPIPS) -> None:
    a = np.zeros((64, 64, 3), np.float32)
    with pytest.raises(DeltaDiffError, match="shape"):
        lp(a, np.zeros((64, 60, 3), np.float32))
    with pytest.raises(DeltaDiffError, match="too small"):
        lp(a[:30], a[:30])
    with pytest.raises(DeltaDiffError, match="RGB"):
        lp(a[..., 0], a[..., 0])


@needs_weights
def test_lpips_weight_validation(tmp_path: Path) -> None:
    with pytest.raises(DeltaDiffError, match="not found"):
        LPIPS(tmp_path / "missing.npz")
    arrays = dict(np.load(WEIGHTS))
    missing = dict(arrays)
    del missing["lin3.weight"]
    np.savez(tmp_path / "missing_lin.npz", **missing)
    with pytest.raises(DeltaDiffError, match="lin3.weight"):
        LPIPS(tmp_path / "missing_lin.npz")
    bad = dict(arrays)
    bad["features.3.weight"] = bad["features.3.weight"][:, :, :3, :3]
    np.savez(tmp_path / "bad_shape.npz", **bad)
    with pytest.raises(DeltaDiffError, match="features.3.weight"):
        LPIPS(tmp_path / "bad_shape.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DeltaDiffError, match="cannot read"):
        LPIPS(tmp_path / "junk.npz")


def test_default_lpips_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(lpips_mod.ENV_WEIGHTS, str(tmp_path / "x.npz"))
    assert default_lpips_weights() == tmp_path / "x.npz"
    monkeypatch.delenv(lpips_mod.ENV_WEIGHTS)
    found = default_lpips_weights()
    # the product's fallback is beside the checkout, whatever DD_SHARED says
    beside = Path(lpips_mod.__file__).resolve().parents[1].parent / "shared" / "weights"
    beside = beside / lpips_mod.WEIGHTS_FILE
    assert found == (beside if beside.is_file() else None)


# ---------------------------------------------------------------------------------------------
# datasets


@needs_val
def test_load_paired_real_set() -> None:
    pairs = load_dataset(VAL)
    assert len(pairs) == 16
    assert [p.name for p in pairs] == sorted(p.stem for p in (VAL / "gt").glob("*.png"))
    for p in pairs:
        assert p.hr.shape == (256, 256, 3) and p.hr.dtype == np.uint8
        assert p.lr.shape == (64, 64, 3) and p.lr.dtype == np.uint8
        assert not p.hr.flags.writeable


@needs_val
def test_on_the_fly_degradation_reproduces_lq() -> None:
    paired = load_dataset(VAL)
    degraded = load_dataset(VAL, degrade=True)  # HR from gt/, lq/ ignored
    assert [p.name for p in paired] == [p.name for p in degraded]
    lq = np.stack([p.lr for p in paired]).astype(np.int16)
    ours = np.stack([p.lr for p in degraded]).astype(np.int16)
    assert lq.size == 196_608
    assert np.mean(lq == ours) >= 0.9999
    assert np.abs(lq - ours).max() <= 1


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_load_hr_folder_degrades(tmp_path: Path) -> None:
    a = _textured(53, 70, seed=10)
    b = _textured(32, 32, seed=11)
    _save(tmp_path / "b.png", b)
    _save(tmp_path / "a.png", a)
    Image.fromarray(b[..., 0]).save(tmp_path / "gray.bmp")  # grayscale -> RGB
    (tmp_path / "notes.txt").write_text("ignored")
    pairs = load_dataset(tmp_path)
    assert [p.name for p in pairs] == ["a", "b", "gray"]
    pa = pairs[0]
    assert pa.hr.shape == (52, 68, 3)  # cropped top-left to multiples of 4
    np.testing.assert_array_equal(pa.hr, a[:52, :68])
    assert pa.lr.shape == (13, 17, 3) and pa.lr.dtype == np.uint8
    np.testing.assert_array_equal(pa.lr, degrade_x4(a[:52, :68]))
    assert pairs[2].hr.shape == (32, 32, 3)
    with pytest.raises(DeltaDiffError, match="gt/ and lq/"):
        load_dataset(tmp_path, degrade=False)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DeltaDiffError, match="not found"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeltaDiffError, match="no images"):
        load_dataset(tmp_path / "empty")
    hr, lr = _textured(32, 32), _textured(8, 8)
    # missing LR partner
    _save(tmp_path / "p1" / "gt" / "one.png", hr)
    _save(tmp_path / "p1" / "gt" / "two.png", hr)
    _save(tmp_path / "p1" / "lq" / "one.png", lr)
    with pytest.raises(DeltaDiffError, match="two.png"):
        load_dataset(tmp_path / "p1")
    # size mismatch names the file and both sizes
    _save(tmp_path / "p2" / "gt" / "img.png", hr)
    _save(tmp_path / "p2" / "lq" / "img.png", _textured(9, 8))
    with pytest.raises(DeltaDiffError, match=r"img.*8x9.*32x32"):
        load_dataset(tmp_path / "p2")
    # unreadable image
    (tmp_path / "p3").mkdir()
    (tmp_path / "p3" / "broken.png").write_bytes(b"garbage")
    with pytest.raises(DeltaDiffError, match="broken.png"):
        load_dataset(tmp_path / "p3")
    # HR smaller than 4 px
    _save(tmp_path / "p4" / "tiny.png", _textured(3, 8))
    with pytest.raises(DeltaDiffError, match="tiny.png"):
        load_dataset(tmp_path / "p4")


# ---------------------------------------------------------------------------------------------
# evaluate + report


def _synthetic_pairs(n: int = 3) -> list[Pair]:
    out = []
    for i in range(n):
        hr = _textured(64, 48, seed=20 + i)
        out.append(Pair(name=f"img{i}", hr=hr, lr=degrade_x4(hr)))
    return out


def _oracle(pairs: list[Pair]) -> Callable[[np.ndarray], np.ndarray]:
    by_lr = {p.lr.tobytes(): p.hr for p in pairs}

    def up(lr: np.ndarray) -> np.ndarray:
        key = to_uint8(lr).tobytes()
        return by_lr[key].astype(np.float32) / 255

    return up


def _zeros(lr: np.ndarray) -> np.ndarray:
    return np.zeros((lr.shape[0] * 4, lr.shape[1] * 4, 3), np.float32)


def test_bicubic_upscaler_shape_and_range() -> None:
    lr = np.random.default_rng(0).random((13, 17, 3)).astype(np.float32)
    sr = bicubic_upscaler(lr)
    assert sr.shape == (52, 68, 3) and sr.dtype == np.float32
    assert sr.min() >= 0 and sr.max() <= 1


def test_evaluate_and_report(tmp_path: Path) -> None:
    pairs = _synthetic_pairs()
    calls: list[tuple[int, int]] = []
    rep = evaluate(
        pairs,
        {"oracle": _oracle(pairs), "zeros": _zeros},
        progress=lambda d, t: calls.append((d, t)),
        dataset="synthetic",
    )
    assert [s.upscaler for s in rep.summaries] == ["bicubic", "oracle", "zeros"]
    assert calls[-1] == (9, 9) and len(calls) == 9
    bic, orc, zer = (rep.summary(n) for n in ("bicubic", "oracle", "zeros"))
    assert math.isfinite(bic.psnr_y) and 10 < bic.psnr_y < 60
    assert orc.psnr_y == math.inf and orc.ssim_y == pytest.approx(1.0)
    assert zer.psnr_y < bic.psnr_y and zer.ssim_y < bic.ssim_y
    assert bic.delta_psnr_y_vs_bicubic == 0.0
    assert zer.delta_psnr_y_vs_bicubic is not None and zer.delta_psnr_y_vs_bicubic < 0
    assert bic.lpips is None and rep.lpips_weights is None
    assert len(rep.rows) == 9 and all(r.seconds >= 0 for r in rep.rows)
    assert bic.psnr_y == pytest.approx(np.mean([r.psnr_y for r in rep.rows[:3]]))

    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert d["schema_version"] == 1 and d["dataset"] == "synthetic" and d["n_images"] == 3
    assert d["border"] == 4 and d["lpips_weights"] is None
    assert [u["upscaler"] for u in d["upscalers"]] == ["bicubic", "oracle", "zeros"]
    assert d["upscalers"][1]["psnr_y"] is None and d["upscalers"][1]["psnr_y_inf"] is True
    assert len(d["images"]) == 9
    md = rep.to_markdown()
    for name in ("bicubic", "oracle", "zeros", "img0", "img2"):
        assert name in md
    assert "| oracle | inf |" in md

    jp, mp = write_report(rep, tmp_path / "out", stem="q")
    assert json.loads(jp.read_text()) == d
    assert mp.read_text() == md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["q.json", "q.md"]


def test_evaluate_options_and_errors() -> None:
    pairs = _synthetic_pairs(2)
    rep = evaluate(pairs, {"zeros": _zeros}, include_bicubic=False, border=0)
    assert [s.upscaler for s in rep.summaries] == ["zeros"]
    assert rep.summaries[0].delta_psnr_y_vs_bicubic is None and rep.border == 0
    assert "—" in rep.to_markdown()
    with pytest.raises(DeltaDiffError, match="half.*shape"):
        evaluate(pairs, {"half": lambda lr: lr}, include_bicubic=False)
    with pytest.raises(DeltaDiffError, match="nan.*non-finite"):
        evaluate(pairs, {"nan": lambda lr: _zeros(lr) * np.nan}, include_bicubic=False)
    with pytest.raises(DeltaDiffError):
        evaluate([], {"zeros": _zeros})
    with pytest.raises(DeltaDiffError):
        evaluate(pairs, {}, include_bicubic=False)


@needs_weights
@needs_val
def test_evaluate_with_lpips_real_subset(lp: LPIPS) -> None:
    pairs = load_dataset(VAL)[:3]
    rep = evaluate(pairs, {"oracle": _oracle(pairs), "zeros": _zeros}, lpips=lp)
    bic, orc, zer = (rep.summary(n) for n in ("bicubic", "oracle", "zeros"))
    assert orc.lpips == 0.0 and orc.psnr_y == math.inf
    assert bic.lpips is not None and zer.lpips is not None and 0 < bic.lpips < zer.lpips
    assert rep.lpips_weights == WEIGHTS.name
    assert isinstance(rep, QualityReport)
    json.dumps(rep.to_dict(), allow_nan=False)


@pytest.mark.slow
@needs_weights
@needs_val
def test_bicubic_baseline_on_val_set(lp: LPIPS) -> None:
    """Pins the bicubic baseline on val-bicubic-x4 (16 images): full LPIPS pass, a few seconds."""
    rep = evaluate(load_dataset(VAL), {}, lpips=lp, dataset=VAL.name)
    bic = rep.summary("bicubic")
    assert bic.psnr_y == pytest.approx(25.502, abs=5e-3)
    assert bic.ssim_y == pytest.approx(0.6694, abs=5e-4)
    assert bic.lpips == pytest.approx(0.4821, abs=5e-4)


@pytest.mark.slow
@needs_weights
@needs_val
def test_lpips_blur_matches_weights_readme(lp: LPIPS) -> None:
    """shared/weights/README.md: LPIPS(x, blur r=1) on val gt is 0.12-0.62, median 0.21."""
    vals = []
    for path in sorted((VAL / "gt").glob("*.png")):
        im = Image.open(path).convert("RGB")
        vals.append(
            lp(
                np.asarray(im, np.float32) / 255,
                np.asarray(im.filter(ImageFilter.GaussianBlur(1)), np.float32) / 255,
            )
        )
    assert min(vals) == pytest.approx(0.12, abs=5e-3)
    assert max(vals) == pytest.approx(0.62, abs=5e-3)
    assert float(np.median(vals)) == pytest.approx(0.21, abs=5e-3)
