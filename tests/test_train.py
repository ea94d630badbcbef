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


def test_fake_quant_rounds_to_the_int8_grid_and_passes_gradients_straight():
    from deltadiff.model.qat import fake_quant_activation, fake_quant_weight

    x = (torch.randn(2, 8, 16, 16) * 3 + 1).requires_grad_()
    q = fake_quant_activation(x)
    lo, hi = min(float(x.detach().min()), 0.0), max(float(x.detach().max()), 0.0)
    step = (hi - lo) / 255
    assert torch.unique(q.detach()).numel() <= 256
    assert float((q - x).detach().abs().max()) <= step / 2 + 1e-6
    assert float(fake_quant_activation(torch.tensor([0.0, 2.0]))[0]) == 0.0  # 0 is exact
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through

    w = torch.randn(4, 3, 3, 3)
    w[1] *= 100  # per output channel: a large channel does not coarsen the others
    qw = fake_quant_weight(w)  # the ONNX Runtime target's 7-bit levels, -64..64
    for c in range(4):
        s = float(w[c].abs().max()) / 64
        levels = qw[c] / s
        assert torch.allclose(levels, levels.round(), atol=1e-4)
        assert float(levels.abs().max()) == pytest.approx(64, abs=1e-4)  # 7 bits, not 127
        assert float((qw[c] - w[c]).abs().max()) <= s / 2 + 1e-6


def test_fake_quant_changes_the_forward_and_removes_cleanly():
    from deltadiff.model.config import preset
    from deltadiff.model.pipeline import randomize_
    from deltadiff.model.qat import FakeQuant
    from deltadiff.model.swin_unet import SwinUNet

    net = SwinUNet(preset("deltadiff-pixel-small").unet)
    randomize_(net, 0)
    net.eval()
    x, c = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    t = torch.tensor([2])
    keys = list(net.state_dict())
    with torch.no_grad():
        ref = net(x, t, c)
        with FakeQuant(net) as fq:
            n = len(fq.modules)
            q = net(x, t, c)
        back = net(x, t, c)
    convs = sum(isinstance(m, torch.nn.Conv2d | torch.nn.Linear) for m in net.modules())
    assert n == convs > 0
    err = float((q - ref).abs().max())
    assert 0 < err < 0.5 * float(ref.abs().max())  # INT8 noise, not a different network
    assert torch.equal(back, ref) and list(net.state_dict()) == keys


def test_qat_fine_tune_starts_from_the_given_weights(hr_folder, tmp_path):
    from dataclasses import replace

    from deltadiff.errors import DeltaDiffError

    base = train(_opts(hr_folder, tmp_path / "base", 2), progress=False)
    o = replace(_opts(hr_folder, tmp_path / "qat", 2), init=base, qat=True, lr=1e-5)
    final = train(o, progress=False)
    w0, w1 = canonicalize(read_weights(base)), canonicalize(read_weights(final))
    diffs = [float((w1[k] - w0[k]).abs().max()) for k in w0 if w0[k].is_floating_point()]
    # a fine-tune of the base weights: they moved, a little (a random start would be far away)
    assert 0 < max(diffs) < 1e-2
    Pipeline.from_yaml(tmp_path / "qat" / "config.yaml", final)  # loads like any EMA file
    bad = replace(_opts(hr_folder, tmp_path / "bad", 2), preset="demo-pixel", init=base, qat=True)
    with pytest.raises(DeltaDiffError, match="does not fit the UNet"):
        train(bad, progress=False)


# --- LPIPS on the x0 prediction (dd-export train --lpips-weight) --------------------------------


def _lpips_weights() -> Path:
    from deltadiff.lpips import default_lpips_weights

    w = default_lpips_weights()
    if w is None or not w.is_file():
        pytest.skip("needs the LPIPS AlexNet weights (DD_LPIPS_WEIGHTS)")
    return w


def test_torch_lpips_loss_equals_the_numpy_metric_and_has_gradients() -> None:
    from deltadiff.lpips import LPIPS
    from deltadiff.model.lpips_loss import LPIPSLoss

    w = _lpips_weights()
    rng = np.random.default_rng(3)
    a = rng.random((2, 40, 36, 3))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    want = [LPIPS(w, dtype=np.float64)(a[i], b[i]) for i in range(2)]
    ta = (torch.from_numpy(a).permute(0, 3, 1, 2).float() * 2 - 1).requires_grad_(True)
    tb = torch.from_numpy(b).permute(0, 3, 1, 2).float() * 2 - 1
    loss = LPIPSLoss(w)
    got = loss(ta, tb)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-6)
    got.sum().backward()
    assert ta.grad is not None and float(ta.grad.abs().sum()) > 0
    assert all(p.grad is None for p in loss.parameters())  # the trunk is frozen
    assert float(loss(tb, tb).abs().max()) == 0.0


def test_lpips_training_logs_both_terms_records_sources_and_survives_nan(
    hr_folder, tmp_path, monkeypatch
):
    import dataclasses
    import json

    from deltadiff.model import train as T

    w = _lpips_weights()
    d2 = tmp_path / "more"
    d2.mkdir()
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(d2 / "flat.png")
    o = dataclasses.replace(
        _opts(hr_folder, tmp_path / "run", 4),
        data=(hr_folder, d2),
        lpips_weight=0.5,
        lpips_weights=w,
    )
    calls = {"n": 0}
    real = T.LPIPSLoss.forward

    def flaky(self, a, b):  # the second batch's LPIPS is NaN: that batch trains on MSE alone
        calls["n"] += 1
        out = real(self, a, b)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(T.LPIPSLoss, "forward", flaky)
    train(o, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    assert "lpips" in rows[0] and rows[0]["loss"] > rows[0]["mse"]  # MSE + 0.5 LPIPS
    src = json.loads((tmp_path / "run" / "data-sources.json").read_text())["images"]
    assert sorted(r["file"] for r in src) == ["flat.png", "img0.png", "img1.png", "img2.png"]
    assert all(len(r["sha256"]) == 64 for r in src)
    opts = json.loads((tmp_path / "run" / "options.json").read_text())
    assert opts["lpips_weight"] == 0.5


def test_lpips_weight_without_weights_is_a_one_line_error(hr_folder, tmp_path, monkeypatch):
    import dataclasses

    from deltadiff.errors import ConfigError

    monkeypatch.setenv("DD_LPIPS_WEIGHTS", str(tmp_path / "missing.npz"))
    o = dataclasses.replace(_opts(hr_folder, tmp_path / "r", 2), lpips_weight=1.0)
    with pytest.raises(Exception, match="LPIPS weights not found") as e:
        train(o, progress=False)
    assert "\n" not in str(e.value)
    o = dataclasses.replace(o, lpips_weight=-1.0)
    with pytest.raises(ConfigError, match="must be >= 0"):
        train(o, progress=False)
