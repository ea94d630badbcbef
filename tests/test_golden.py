"""The conformance checker on tests/golden (in the repository: no shared folder needed), and on an
unseen folder in the same format."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import torch
import yaml

from deltadiff.imresize import imresize_matlab
from deltadiff.model.bicubic_x4 import BicubicUp4
from deltadiff.model.checkpoint import load_weights_into
from deltadiff.model.config import from_upstream_yaml, unet_from_params, vq_from_params
from deltadiff.model.golden import check_folder, main
from deltadiff.model.pipeline import Pipeline
from deltadiff.model.swin_unet import SwinUNet, shift_mask
from deltadiff.model.vq_f4 import VQModel

from .conftest import GOLDEN


def test_golden_folder_passes_every_output():
    results = check_folder(GOLDEN)
    assert set(results) >= {
        "deltadiff_unet_pixel",
        "matlab_bicubic",
        "resshift_step",
        "resshift_unet",
        "vqgan_f4",
    }
    failed = [r.line() for rs in results.values() for r in rs if not r.passed]
    assert not failed, failed
    assert sum(len(r) for r in results.values()) >= 50


def test_golden_module_cli_exit_codes(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "deltadiff.model.golden"],  # default: the repository's tests/golden
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "FAIL" not in ok.stdout and ok.stdout.count("PASS") >= 50
    empty = subprocess.run(
        [sys.executable, "-m", "deltadiff.model.golden", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert empty.returncode == 2 and "no golden cases" in empty.stderr


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def make_unseen_folder(dst, seed: int = 7):
    """A folder in the golden format with other seeds and non-square sizes. Expected outputs come
    from the reference itself (upstream code is not available here), so this proves the checker
    reads sizes from the arrays and iterates keys, not that the reference equals upstream."""
    g = torch.Generator().manual_seed(seed)
    for case in ("deltadiff_unet_pixel", "resshift_unet", "vqgan_f4", "resshift_step"):
        shutil.copytree(GOLDEN / case, dst / case, ignore=shutil.ignore_patterns("*.npz"))
    (dst / "matlab_bicubic").mkdir()
    shutil.copy(GOLDEN / "matlab_bicubic" / "config.yaml", dst / "matlab_bicubic")
    up_in = torch.rand(13, 22, 3, generator=g).numpy()
    down_in = torch.rand(40, 56, 3, generator=g).numpy()
    lq = imresize_matlab(down_in, 0.25)
    np.savez(
        dst / "matlab_bicubic" / "matlab_bicubic.npz",
        up_input_hwc=up_in,
        up_x4_output_hwc=imresize_matlab(up_in, 4),
        down_input_hwc=down_in,
        down_x025_output_hwc=lq,
        roundtrip_lq_hwc=lq,
        roundtrip_lq_up_hwc=imresize_matlab(lq, 4),
    )
    with torch.no_grad():
        # deltadiff pixel: single call and 4-step loop at a non-square size
        case = dst / "deltadiff_unet_pixel"
        pipe = Pipeline.from_yaml(case / "config.yaml")
        lr = torch.rand(12, 20, 3, generator=g).numpy()
        lq_up = BicubicUp4("matlab")(_t(lr).permute(2, 0, 1)[None] * 2 - 1)
        x_in = torch.randn(1, 3, 48, 80, generator=g)
        b2 = torch.randn(2, 3, 48, 80, generator=g)
        t = torch.tensor([1])
        np.savez(
            case / "single_call.npz",
            lr_hwc=lr,
            lq_up=lq_up.numpy(),
            t=t.numpy(),
            x_in=x_in.numpy(),
            output=pipe.unet(x_in, t, lq_up).numpy(),
            b2_x_in=b2.numpy(),
            b2_lq_up=torch.cat([lq_up] * 2).numpy(),
            b2_t=np.array([3, 0]),
            b2_output=pipe.unet(b2, torch.tensor([3, 0]), torch.cat([lq_up] * 2)).numpy(),
        )
        x0s, xts, xins = [], [], []
        x = lq_up
        for r in pipe.table.rows:
            xts.append(x.numpy())
            xins.append((r.in_scale * x).numpy())
            x = pipe.unet(r.in_scale * x, torch.tensor([r.t]), lq_up)
            x0s.append(x.numpy())
        np.savez(
            case / "loop_4step.npz",
            lr_hwc=lr,
            lq_up=lq_up.numpy(),
            t_seq=np.array([3, 2, 1, 0]),
            etas=np.array(pipe.table.eta),
            x_t=np.concatenate(xts),
            x_in=np.concatenate(xins),
            x0_hat=np.concatenate(x0s),
            final=x0s[-1],
            final_clamped=np.clip(x0s[-1], -1, 1),
        )
        # resshift unet at a non-square latent + masks for non-square maps
        case = dst / "resshift_unet"
        data = yaml.safe_load((case / "config.yaml").read_text())
        unet = SwinUNet(unet_from_params(data["model"]["params"]))
        load_weights_into(unet, case / data["model"]["ckpt_path"], what="UNet", config_desc="t")
        x_in, lq = (
            torch.randn(1, 3, 64, 128, generator=g),
            torch.rand(1, 3, 64, 128, generator=g) * 2 - 1,
        )
        np.savez(
            case / "unet_call.npz",
            x_in=x_in.numpy(),
            lq=lq.numpy(),
            t=np.array([1]),
            output=unet(x_in, torch.tensor([1]), lq).numpy(),
        )
        np.savez(
            case / "swin_masks.npz",
            **{
                f"mask_{h}x{w}": shift_mask(h, w, 8, 4).numpy()
                for h, w in ((24, 40), (16, 32), (32, 16))
            },
        )
        # vq at a non-square image
        case = dst / "vqgan_f4"
        data = yaml.safe_load((case / "config.yaml").read_text())
        vq = VQModel(vq_from_params(data["autoencoder"]["params"]))
        load_weights_into(vq, case / data["autoencoder"]["ckpt_path"], what="VQ", config_desc="t")
        img = torch.rand(1, 3, 48, 80, generator=g) * 2 - 1
        z = vq.encode(img)
        idx = vq.quantize.indices(z)
        np.savez(
            case / "vq_golden.npz",
            image=img.numpy(),
            encode=z.numpy(),
            indices=idx.numpy(),
            indices_bhw=idx.reshape(1, 12, 20).numpy(),
            quantized=vq.quantize(z).numpy(),
            codebook_lookup=vq.quantize(z).numpy(),
            decode_quantized=vq.decode(z).numpy(),
            decode_not_quantized=vq.decode(z, quantize=False).numpy(),
        )
        # one resshift step at a non-square latent
        case = dst / "resshift_step"
        cfg = from_upstream_yaml(case / "config.yaml")
        p = Pipeline.from_yaml(case / "config.yaml")
        from deltadiff.model.schedule import etas, sqrt_etas

        lq = torch.rand(1, 3, 64, 128, generator=g) * 2 - 1
        up = p.up(lq)
        z_y = p.vq.encode(up)
        z_t = z_y + torch.randn(z_y.shape, generator=g)
        noise = torch.randn(z_y.shape, generator=g)
        r = p.table.rows[1]
        tt = torch.tensor([r.t])
        x0 = p.unet(r.in_scale * z_t, tt, lq)
        rows = sorted(p.table.rows, key=lambda q: q.t)
        lv = np.log(np.array([rows[1].s, rows[1].s, rows[2].s, rows[3].s]) ** 2)
        np.savez(
            case / "step_golden.npz",
            lq=lq.numpy(),
            lq_up_torch_bicubic=up.numpy(),
            z_y=z_y.numpy(),
            z_t=z_t.numpy(),
            t=tt.numpy(),
            noise=noise.numpy(),
            x_in=(r.in_scale * z_t).numpy(),
            pred_xstart=x0.numpy(),
            mean=(r.a * z_t + r.b * x0).numpy(),
            sample=(r.a * z_t + r.b * x0 + r.s * noise).numpy(),
            sqrt_etas=sqrt_etas(cfg.schedule),
            etas=etas(cfg.schedule),
            posterior_mean_coef1=np.array([q.a for q in rows]),
            posterior_mean_coef2=np.array([q.b for q in rows]),
            posterior_log_variance_clipped=lv,
        )


def test_checker_runs_an_unseen_nonsquare_folder_and_catches_a_bad_output(tmp_path, capsys):
    make_unseen_folder(tmp_path)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mask_24x40" in out and "FAIL" not in out
    # corrupt one expected output: the checker must fail, naming it
    p = tmp_path / "deltadiff_unet_pixel" / "loop_4step.npz"
    d = dict(np.load(p))
    d["x0_hat"][2] += 2e-3
    np.savez(p, **d)
    assert main([str(tmp_path)]) == 1
    assert "FAIL  loop x0_hat[2]" in capsys.readouterr().out
