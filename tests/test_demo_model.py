"""The bundled demo model: present in the package, verified, not a bicubic pass-through, better
than bicubic (slow: the whole validation set through onnxruntime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deltadiff.benchmarks.quality import bicubic_upscaler, load_dataset, psnr_y
from deltadiff.runtime.compare import psnr
from deltadiff.runtime.manifest import load_manifest
from deltadiff.runtime.upscaler import Upscaler, default_model_dir

from .conftest import DATA, REPO, need_shared

EXAMPLE = REPO / "examples" / "astronaut_lr.png"
WEIGHTS = REPO / "weights" / "demo-pixel"


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


def test_bundled_model_is_packaged_and_verified():
    d = default_model_dir()
    m = load_manifest(d)  # checks every graph's sha256
    assert m.family == "deltadiff-pixel" and m.name == "demo-pixel"
    byb = m.verification["by_backend"]
    assert byb["onnxruntime/fp32"]["passed"] and byb["onnxruntime/fp32"]["psnr_db"] >= 60
    assert byb["onnxruntime/fp16"]["passed"] and byb["onnxruntime/fp16"]["psnr_db"] >= 40
    assert sum(g.bytes for g in m.graphs.values()) < 20e6  # a few MB


def test_default_upscale_differs_from_bicubic_and_beats_it_on_the_example():
    from skimage import data

    lr = _rgb(EXAMPLE)
    with Upscaler() as up:
        sr = up.upscale(lr)
    bic = bicubic_upscaler(lr)
    assert sr.shape == bic.shape == (512, 512, 3)
    assert psnr(bic, sr, data_range=1.0) < 40.0 and float(np.abs(sr - bic).mean()) > 2e-3
    hr = data.astronaut().astype(np.float32) / 255.0
    assert psnr_y(sr, hr) > psnr_y(bic, hr)


def test_bundled_weights_load_like_an_official_checkpoint():
    import torch

    from deltadiff.model.checkpoint import canonicalize, read_weights
    from deltadiff.model.pipeline import Pipeline

    pipe = Pipeline.from_yaml(WEIGHTS / "config.yaml")
    st = canonicalize(read_weights(WEIGHTS / "demo-pixel.safetensors"))
    sd = pipe.unet.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in st.items())
    raw = torch.load(WEIGHTS / "demo-pixel.pth", weights_only=True)
    assert set(raw) >= {"iters_start", "state_dict"}


@pytest.mark.slow
def test_bundled_model_beats_bicubic_on_the_validation_set_through_onnxruntime():
    pairs = load_dataset(need_shared(DATA / "val-bicubic-x4"))
    gains = []
    with Upscaler() as up:
        for p in pairs:
            lr = p.lr.astype(np.float32) / 255.0
            gains.append(psnr_y(up.upscale(lr), p.hr) - psnr_y(bicubic_upscaler(lr), p.hr))
    assert float(np.mean(gains)) >= 0.5, gains


def test_tiling_keeps_the_demo_models_quality(tmp_path):
    """Tiles change the output (GroupNorm statistics are per tile) but not its quality: one
    validation image upscaled whole (64x64 LR export) and as 3x3 tiles of 32x32 LR."""
    from deltadiff.export.graphs import TileShape
    from deltadiff.export.onnx_export import ExportOptions, export_onnx, preset_source
    from deltadiff.model.pipeline import Pipeline
    from deltadiff.runtime.upscaler import UpscaleOptions

    pair = load_dataset(need_shared(DATA / "val-bicubic-x4"))[0]
    lr = pair.lr.astype(np.float32) / 255.0
    assert lr.shape[:2] == (64, 64)
    rule = load_manifest(default_model_dir(), check_hashes=False).source["step_rule"]
    base = Pipeline.from_yaml(WEIGHTS / "config.yaml")
    pipe = Pipeline(base.cfg.replace(step_rule=rule), base.unet)
    out = {}
    for tile in (64, 32):
        d = tmp_path / f"tile{tile}"
        export_onnx(
            pipe,
            d,
            ExportOptions(TileShape(tile, tile), graphs=("encoder", "step", "decoder")),
            source=preset_source("demo-pixel", 0),
        )
        with Upscaler(d, UpscaleOptions(overlap=8)) as up:
            out[tile] = up.upscale(lr)
    whole, tiled = psnr_y(out[64], pair.hr), psnr_y(out[32], pair.hr)
    bic = psnr_y(bicubic_upscaler(lr), pair.hr)
    print(f"PSNR-Y whole {whole:.3f} tiled {tiled:.3f} bicubic {bic:.3f}")
    assert abs(whole - tiled) <= 0.3 and tiled > bic, (whole, tiled, bic)
    assert psnr(out[64], out[32], data_range=1.0) >= 25.0
