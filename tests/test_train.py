"""The demo-model trainer: upstream checkpoint layout, resumability, determinism (tiny runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deltadiff.model.checkpoint import canonicalize, read_weights
from deltadiff.model.pipeline import Pipeline
from deltadiff.model.train import TrainOptions, train


@pytest.fixture(scope="module")
def hr_folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hr")
    rng = np.random.default_rng(0)
    for i in range(3):
        img = (rng.random((48, 56, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"img{i}.png")
    (d / "notes.txt").write_text("ignored")
    return d


def _opts(data: Path, out: Path, iters: int) -> TrainOptions:
    return TrainOptions(
        data=data,
        out=out,
        preset="deltadiff-pixel-small",
        iters=iters,
        batch=2,
        crop=32,
        save_every=2,
        log_every=2,
        warmup=2,
        threads=1,
    )


def test_training_writes_upstream_layouts_that_load_like_official_files(hr_folder, tmp_path):
    final = train(_opts(hr_folder, tmp_path, 4), progress=False)
    ck = torch.load(tmp_path / "ckpts" / "model_4.pth", weights_only=True)
    assert ck["iters_start"] == 4 and all(k.startswith("_orig_mod.") for k in ck["state_dict"])
    assert final.exists() and (tmp_path / "log.jsonl").read_text().count("loss") == 2
    pipe = Pipeline.from_yaml(tmp_path / "config.yaml", tmp_path / "ckpts" / "model_4.pth")
    assert pipe.cfg.unet.model_channels == 32
    Pipeline.from_yaml(tmp_path / "config.yaml", final)  # the EMA file loads too
    out = pipe.upscale(torch.rand(1, 3, 8, 8))
    assert out.shape == (1, 3, 32, 32)


def test_resume_continues_exactly(hr_folder, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(_opts(hr_folder, a, 4), progress=False)
    train(_opts(hr_folder, b, 2), progress=False)
    train(_opts(hr_folder, b, 4), resume=True, progress=False)
    sa = canonicalize(read_weights(a / "ckpts" / "model_4.pth"))
    sb = canonicalize(read_weights(b / "ckpts" / "model_4.pth"))
    # same machine, same kernels, state restored exactly: a resumed run is bit-identical
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
