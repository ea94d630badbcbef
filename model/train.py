"""A small, reproducible trainer for ``deltadiff-pixel`` models (docs/demo-model.md "Recipe").

Recipe: random HR crops with 8-way flips/rotations; LR = MATLAB bicubic x1/4 (antialiased),
optionally rounded to 8 bits as real LR files are; lq_up = MATLAB bicubic x4 of the LR;
t ~ Uniform{0..3}; x_t = (1 - eta_t) gt + eta_t lq_up (no noise); the network sees
in_scale_t * x_t with cond = lq_up and predicts x0; loss = MSE(x0_hat, gt) in [-1, 1]. AdamW,
linear warm-up then cosine decay, EMA of the weights, fixed seed, resumable.

Outputs in OUT:
  ckpts/model_{iter}.pth        upstream trainer layout ({'state_dict': '_orig_mod.' keys, ...})
  ema_ckpts/ema_model_{iter}.pth raw EMA state dict (upstream layout)
  train_state.pth                optimizer + EMA + RNG state for --resume (weights_only readable)
  config.yaml                    upstream-schema YAML (loads like an official config)
  log.jsonl                      loss / lr / validation PSNR per log interval
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from deltadiff.errors import ConfigError
from deltadiff.model.checkpoint import load_weights_into, save_trainer_checkpoint
from deltadiff.model.config import ModelConfig, preset, to_upstream_yaml_dict
from deltadiff.model.pipeline import Pipeline, randomize_
from deltadiff.model.qat import FakeQuant
from deltadiff.model.resize import BicubicUp4
from deltadiff.model.schedule import StepTable, make_step_table
from deltadiff.model.swin_unet import SwinUNet
from deltadiff.runtime.atomic import atomic_path, write_text_atomic
from deltadiff.runtime.resize import imresize_matlab

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class TrainOptions:
    data: Path
    out: Path
    preset: str = "demo-pixel"
    iters: int = 5000
    batch: int = 8
    crop: int = 96  # HR crop side (multiple of 16)
    lr: float = 2.5e-4
    lr_min: float = 2e-5
    warmup: int = 200
    weight_decay: float = 0.0
    ema_rate: float = 0.999
    seed: int = 123456
    quantize_lr: bool = True  # round the LR to 8 bits, as LR files are
    save_every: int = 500
    log_every: int = 50
    val: Path | None = None  # folder with gt/ and lq/ (only logged, never trained on)
    threads: int = 0  # 0: torch default
    # Exposure-bias fix (not in the DeltaDiff code): with this probability a batch's states for
    # t < 3 come from the model's own chain, rolled out from x_3 = lq_up with ``rollout_rule``
    # (no gradient), so the later rows learn to refine their real inputs, not only the marginals.
    rollout: float = 0.0
    rollout_rule: str = "posterior"
    # stop (after saving) at this iteration; the LR schedule still spans ``iters``
    stop_at: int | None = None
    # start from these weights (any layout ``load_weights_into`` reads) instead of random ones
    init: Path | None = None
    # quantization-aware fine-tuning: INT8 fake quantization in every forward (model/qat.py)
    qat: bool = False


def load_hr_images(folder: Path, min_side: int) -> list[np.ndarray]:
    """All RGB images of a folder as uint8 HWC arrays (images smaller than a crop are skipped)."""
    from PIL import Image

    if not folder.is_dir():
        raise ConfigError(
            f"training data folder {folder} does not exist; pass --data DIR of HR images"
        )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    imgs = []
    for p in files:
        with Image.open(p) as im:
            a = np.asarray(im.convert("RGB"))
        if min(a.shape[:2]) >= min_side:
            imgs.append(a)
    if not imgs:
        raise ConfigError(f"no training images of at least {min_side}px in {folder}")
    return imgs


class CropSampler:
    """Random crops + dihedral augmentation -> (gt, lq) float32 batches, numpy, seeded."""

    def __init__(
        self, images: list[np.ndarray], crop: int, quantize_lr: bool, rng: np.random.Generator
    ) -> None:
        self.images = images
        self.crop = crop
        self.quantize_lr = quantize_lr
        self.rng = rng

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        c = self.crop
        gts, lqs = [], []
        for _ in range(n):
            img = self.images[self.rng.integers(len(self.images))]
            y = self.rng.integers(img.shape[0] - c + 1)
            x = self.rng.integers(img.shape[1] - c + 1)
            patch = img[y : y + c, x : x + c].astype(np.float32) / 255.0
            k = int(self.rng.integers(8))
            patch = np.rot90(patch, k % 4)
            if k >= 4:
                patch = patch[:, ::-1]
            patch = np.ascontiguousarray(patch)
            lq = imresize_matlab(patch, 0.25)
            if self.quantize_lr:
                lq = np.clip(np.round(lq * 255.0), 0, 255) / 255.0
            gts.append(patch.transpose(2, 0, 1))
            lqs.append(lq.transpose(2, 0, 1).astype(np.float32))
        return np.stack(gts), np.stack(lqs)


@torch.no_grad()
def rollout(net: SwinUNet, table: StepTable, lq_up: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per sample, the state entering row t[i] when the chain runs from x_3 = lq_up (no noise)."""
    x = lq_up
    out = lq_up.clone()
    B = x.shape[0]
    for r in table.rows:
        sel = t == r.t
        out[sel] = x[sel]
        if r.t <= int(t.min()):
            break
        x0 = net(r.in_scale * x, torch.full((B,), r.t, dtype=torch.int64), lq_up)
        x = r.a * x + r.b * x0 + r.c * lq_up
    return out


def lr_at(it: int, o: TrainOptions) -> float:
    if it < o.warmup:
        return o.lr * (it + 1) / o.warmup
    p = (it - o.warmup) / max(1, o.iters - o.warmup)
    return o.lr_min + 0.5 * (o.lr - o.lr_min) * (1 + math.cos(math.pi * min(1.0, p)))


@torch.no_grad()
def validate(pipe: Pipeline, pairs: list) -> float:
    """Mean PSNR-Y (4-px border) of the reference pipeline on (HR, LR) pairs of the evaluator."""
    from deltadiff.benchmarks.quality import psnr_y

    vals = []
    for p in pairs:
        lr = torch.from_numpy(p.lr.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
        sr = pipe.upscale(lr)[0].permute(1, 2, 0).numpy()
        vals.append(psnr_y(sr, p.hr))
    return float(np.mean(vals))


@torch.enable_grad()
def train(o: TrainOptions, *, resume: bool = False, progress: bool = True) -> Path:
    """Train; returns the path of the final EMA checkpoint."""
    cfg: ModelConfig = preset(o.preset)
    if cfg.latent:
        raise ConfigError(
            "the trainer covers deltadiff-pixel models; latent training is not implemented"
        )
    if o.crop % 16:
        raise ConfigError(f"--crop {o.crop} must be a multiple of 16 (HR % 16 for the UNet)")
    if o.threads:
        torch.set_num_threads(o.threads)
    out = Path(o.out)
    (out / "ckpts").mkdir(parents=True, exist_ok=True)
    (out / "ema_ckpts").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(o.seed)
    rng = np.random.default_rng(o.seed)
    net = SwinUNet(cfg.unet)
    if o.init is not None:
        load_weights_into(net, o.init, what="UNet", config_desc=f"preset {o.preset}")
    else:
        randomize_(net, o.seed)
        with torch.no_grad():  # zero-init the last conv of every ResBlock and the head (upstream)
            for name, p in net.named_parameters():
                if "out_layers.3" in name or name.startswith("out.2"):
                    p.zero_()
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    start = 0
    state_path = out / "train_state.pth"
    if resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        net.load_state_dict(st["model"])
        ema = st["ema"]
        opt.load_state_dict(st["optimizer"])
        start = int(st["iters"])
        rng.bit_generator.state = st["numpy_rng"]
        torch.set_rng_state(st["torch_rng"])
        log.info("resumed from %s at iteration %d", state_path, start)
    table = Pipeline(cfg, net).table
    roll_table = make_step_table(cfg.schedule, o.rollout_rule)
    eta = torch.tensor(table.eta, dtype=torch.float32)
    in_scale = torch.tensor([0.0] * len(table.eta), dtype=torch.float32)
    for r in table.rows:
        in_scale[r.t] = r.in_scale
    up4 = BicubicUp4("matlab")
    if o.qat:  # the training net only: the EMA copy validated below runs in float
        FakeQuant(net)
    sampler = CropSampler(load_hr_images(o.data, o.crop), o.crop, o.quantize_lr, rng)
    pairs = []
    if o.val:
        from deltadiff.benchmarks.quality import load_dataset

        pairs = load_dataset(o.val)
    write_text_atomic(out / "config.yaml", _yaml_dump(to_upstream_yaml_dict(cfg)))
    write_text_atomic(out / "options.json", json.dumps(asdict(o), default=str, indent=1))

    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = [
        TextColumn("train"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.5f}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    t0 = time.time()
    run_loss, run_n = 0.0, 0
    with (
        (out / "log.jsonl").open("a", encoding="utf-8") as logf,
        Progress(*cols, disable=not progress) as bar,
    ):
        task = bar.add_task("train", total=o.iters, completed=start, loss=float("nan"))
        net.train()
        for it in range(start, min(o.iters, o.stop_at or o.iters)):
            gt_np, lq_np = sampler.batch(o.batch)
            gt = torch.from_numpy(gt_np) * 2 - 1
            with torch.no_grad():
                lq_up = up4(torch.from_numpy(lq_np) * 2 - 1)
                t = torch.from_numpy(rng.integers(0, len(eta), size=o.batch)).long()
                e = eta[t][:, None, None, None]
                x_t = (1 - e) * gt + e * lq_up
                if o.rollout and rng.random() < o.rollout and int(t.min()) < len(eta) - 1:
                    x_t = torch.where(
                        (t < len(eta) - 1)[:, None, None, None],
                        rollout(net, roll_table, lq_up, t),
                        x_t,
                    )
                x_in = in_scale[t][:, None, None, None] * x_t
            for g in opt.param_groups:
                g["lr"] = lr_at(it, o)
            x0 = net(x_in, t, lq_up)
            loss = torch.mean((x0 - gt) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                rate = min(o.ema_rate, (1 + it) / (10 + it))
                for k, v in net.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[k].mul_(rate).add_(v.detach(), alpha=1 - rate)
                    else:
                        ema[k].copy_(v)
            run_loss += float(loss.detach())
            run_n += 1
            bar.update(task, advance=1, loss=float(loss.detach()))
            done = it + 1
            if done % o.log_every == 0 or done == o.iters:
                rec = {
                    "iter": done,
                    "loss": run_loss / max(1, run_n),
                    "lr": lr_at(it, o),
                    "elapsed_s": round(time.time() - t0, 1),
                }
                run_loss, run_n = 0.0, 0
                if pairs and (done % o.save_every == 0 or done == o.iters):
                    ema_net = SwinUNet(cfg.unet)
                    ema_net.load_state_dict(ema)
                    rec["val_psnr_y_ema"] = validate(Pipeline(cfg, ema_net), pairs)
                    net.train()
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                log.info("%s", rec)
            if done % o.save_every == 0 or done in (o.iters, o.stop_at):
                save_trainer_checkpoint(out / "ckpts" / f"model_{done}.pth", net.state_dict(), done)
                _save(
                    out / "ema_ckpts" / f"ema_model_{done}.pth",
                    {"_orig_mod." + k: v for k, v in ema.items()},
                )
                _save(
                    state_path,
                    {
                        "model": net.state_dict(),
                        "ema": ema,
                        "optimizer": opt.state_dict(),
                        "iters": done,
                        "numpy_rng": rng.bit_generator.state,
                        "torch_rng": torch.get_rng_state(),
                    },
                )
    return out / "ema_ckpts" / f"ema_model_{min(o.iters, o.stop_at or o.iters)}.pth"


def _save(path: Path, obj: object) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _yaml_dump(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)
