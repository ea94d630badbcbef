"""A small, reproducible trainer for ``deltadiff-pixel`` models (docs/demo-model.md "Recipe").

Recipe: random HR crops with 8-way flips/rotations; LR = MATLAB bicubic x1/4 (antialiased),
optionally rounded to 8 bits as real LR files are; lq_up = MATLAB bicubic x4 of the LR;
t ~ Uniform{0..3}; x_t = (1 - eta_t) gt + eta_t lq_up (no noise); the network sees
in_scale_t * x_t with cond = lq_up and predicts x0; loss = MSE(x0_hat, gt) in [-1, 1], plus
``lpips_weight`` x LPIPS(x0_hat, gt) (AlexNet, ``model/lpips_loss.py``) when asked. AdamW,
linear warm-up then cosine decay, EMA of the weights, fixed seed, resumable.

Outputs in OUT:
  ckpts/model_{iter}.pth        upstream trainer layout ({'state_dict': '_orig_mod.' keys, ...})
  ema_ckpts/ema_model_{iter}.pth raw EMA state dict (upstream layout)
  train_state.pth                optimizer + EMA + RNG state for --resume (weights_only readable)
  config.yaml                    upstream-schema YAML (loads like an official config)
  log.jsonl                      loss (MSE, LPIPS) / lr / validation PSNR-Y, LPIPS per log interval
  data-sources.json              every training image: folder, file, size, sha256
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from deltadiff.atomic import atomic_path, write_text_atomic
from deltadiff.errors import ConfigError
from deltadiff.imresize import imresize_matlab
from deltadiff.lpips import LPIPS, WEIGHTS_FILE, default_lpips_weights
from deltadiff.metrics import load_dataset, psnr_y, to_uint8
from deltadiff.model.bicubic_x4 import BicubicUp4
from deltadiff.model.checkpoint import load_weights_into, save_trainer_checkpoint
from deltadiff.model.config import ModelConfig, preset, to_upstream_yaml_dict
from deltadiff.model.lpips_loss import LPIPSLoss
from deltadiff.model.pipeline import Pipeline, randomize_
from deltadiff.model.qat import FakeQuant
from deltadiff.model.schedule import StepTable, make_step_table
from deltadiff.model.swin_unet import SwinUNet

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class TrainOptions:
    data: tuple[Path, ...] | Path  # one or more folders of HR images
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
    # LPIPS (AlexNet) on the x0 prediction, added to the MSE with this weight (official recipe)
    lpips_weight: float = 0.0
    lpips_weights: Path | None = None  # the npz; default: deltadiff.lpips.default_lpips_weights


def _folder_images(folder: Path, min_side: int) -> list[tuple[Path, np.ndarray]]:
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
            imgs.append((p, a))
    if not imgs:
        raise ConfigError(f"no training images of at least {min_side}px in {folder}")
    return imgs


def load_training_images(
    folders: Sequence[Path] | Path, min_side: int, record: Path | None = None
) -> list[np.ndarray]:
    """The images of every ``--data`` folder; ``record`` gets the source list (folder, file,
    size, sha256 of the file) so a run says what it trained on."""
    folders = [Path(folders)] if isinstance(folders, (str, Path)) else [Path(f) for f in folders]
    rows, imgs = [], []
    for folder in folders:
        for path, img in _folder_images(folder, min_side):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            rows.append(
                {
                    "folder": str(folder),
                    "file": path.name,
                    "hw": list(img.shape[:2]),
                    "sha256": digest,
                }
            )
            imgs.append(img)
    if record is not None:
        write_text_atomic(record, json.dumps({"images": rows}, indent=1) + "\n")
    log.info("training on %d images from %d folders", len(imgs), len(folders))
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
def validate(pipe: Pipeline, pairs: list, lpips: LPIPS | None = None) -> dict[str, float]:
    """Mean PSNR-Y (4-px border) and, with ``lpips``, mean LPIPS of the reference pipeline on
    (HR, LR) pairs (``deltadiff.metrics.load_dataset``)."""
    psnr, lp = [], []
    for p in pairs:
        lr = torch.from_numpy(p.lr.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
        sr = pipe.upscale(lr)[0].permute(1, 2, 0).numpy()
        psnr.append(psnr_y(sr, p.hr))
        if lpips is not None:
            lp.append(lpips(to_uint8(sr), p.hr))
    rec = {"val_psnr_y_ema": float(np.mean(psnr))}
    if lp:
        rec["val_lpips_ema"] = float(np.mean(lp))
    return rec


@dataclass
class _Run:
    """The state one training run carries between its phases."""

    o: TrainOptions
    cfg: ModelConfig
    out: Path
    net: SwinUNet
    ema: dict[str, torch.Tensor]
    opt: torch.optim.Optimizer
    rng: np.random.Generator
    start: int = 0
    lpips: LPIPSLoss | None = None
    lpips_np: LPIPS | None = None
    val_pairs: list = field(default_factory=list)

    @property
    def state_path(self) -> Path:
        return self.out / "train_state.pth"

    @property
    def end(self) -> int:
        return min(self.o.iters, self.o.stop_at or self.o.iters)


@dataclass
class _Batch:
    gt: torch.Tensor
    lq_up: torch.Tensor
    t: torch.Tensor
    x_in: torch.Tensor


@dataclass
class _Losses:
    total: torch.Tensor
    mse: float
    lpips: float | None  # None: no LPIPS term, or a non-finite one dropped for this batch


def _check(o: TrainOptions) -> ModelConfig:
    cfg: ModelConfig = preset(o.preset)
    if cfg.latent:
        raise ConfigError(
            "the trainer covers deltadiff-pixel models; latent training is not implemented"
        )
    if o.crop % 16:
        raise ConfigError(f"--crop {o.crop} must be a multiple of 16 (HR % 16 for the UNet)")
    if o.lpips_weight < 0:
        raise ConfigError(f"--lpips-weight {o.lpips_weight} must be >= 0")
    return cfg


def _new_net(o: TrainOptions, cfg: ModelConfig) -> SwinUNet:
    net = SwinUNet(cfg.unet)
    if o.init is not None:
        load_weights_into(net, o.init, what="UNet", config_desc=f"preset {o.preset}")
        return net
    randomize_(net, o.seed)
    with torch.no_grad():  # zero-init the last conv of every ResBlock and the head (upstream)
        for name, p in net.named_parameters():
            if "out_layers.3" in name or name.startswith("out.2"):
                p.zero_()
    return net


def _lpips_path(o: TrainOptions) -> Path:
    path = o.lpips_weights or default_lpips_weights()
    if path is None:
        raise ConfigError(
            f"--lpips-weight needs the LPIPS AlexNet weights ({WEIGHTS_FILE}); pass "
            "--lpips-weights PATH or set DD_LPIPS_WEIGHTS"
        )
    return Path(path)


def _start(o: TrainOptions, resume: bool) -> _Run:
    """Check the options, build the net / EMA / optimizer, resume if asked, write the run files."""
    cfg = _check(o)
    if o.threads:
        torch.set_num_threads(o.threads)
    out = Path(o.out)
    (out / "ckpts").mkdir(parents=True, exist_ok=True)
    (out / "ema_ckpts").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(o.seed)
    net = _new_net(o, cfg)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    run = _Run(o, cfg, out, net, ema, opt, np.random.default_rng(o.seed))
    if resume and run.state_path.exists():
        st = torch.load(run.state_path, map_location="cpu", weights_only=True)
        net.load_state_dict(st["model"])
        run.ema = st["ema"]
        opt.load_state_dict(st["optimizer"])
        run.start = int(st["iters"])
        run.rng.bit_generator.state = st["numpy_rng"]
        torch.set_rng_state(st["torch_rng"])
        log.info("resumed from %s at iteration %d", run.state_path, run.start)
    path = _lpips_path(o) if o.lpips_weight > 0 else o.lpips_weights or default_lpips_weights()
    if o.lpips_weight > 0:
        run.lpips = LPIPSLoss(path)
    if o.val and path is not None:
        run.lpips_np = LPIPS(path)
    if o.val:
        run.val_pairs = load_dataset(o.val)
    write_text_atomic(out / "config.yaml", _yaml_dump(to_upstream_yaml_dict(cfg)))
    write_text_atomic(out / "options.json", json.dumps(asdict(o), default=str, indent=1))
    return run


def _sample(run: _Run, sampler: CropSampler, tables: _Tables) -> _Batch:
    """A batch: HR crops, their bicubic lq_up, rows t, and the network inputs of those rows."""
    o, rng = run.o, run.rng
    gt_np, lq_np = sampler.batch(o.batch)
    gt = torch.from_numpy(gt_np) * 2 - 1
    with torch.no_grad():
        lq_up = tables.up4(torch.from_numpy(lq_np) * 2 - 1)
        t = torch.from_numpy(rng.integers(0, len(tables.eta), size=o.batch)).long()
        e = tables.eta[t][:, None, None, None]
        x_t = (1 - e) * gt + e * lq_up
        last = len(tables.eta) - 1
        if o.rollout and rng.random() < o.rollout and int(t.min()) < last:
            chain = rollout(run.net, tables.roll, lq_up, t)
            x_t = torch.where((t < last)[:, None, None, None], chain, x_t)
        x_in = tables.in_scale[t][:, None, None, None] * x_t
    return _Batch(gt, lq_up, t, x_in)


def _losses(run: _Run, x0: torch.Tensor, gt: torch.Tensor) -> _Losses:
    """MSE on x̂₀, plus ``lpips_weight`` x LPIPS(x̂₀, gt) when asked; a non-finite LPIPS batch
    falls back to the MSE alone (as the official trainer does)."""
    mse = torch.mean((x0 - gt) ** 2)
    if run.lpips is None:
        return _Losses(mse, float(mse.detach()), None)
    lp = run.lpips(x0.clamp(-1, 1), gt).mean()  # clamped as the official trainer does
    if not torch.isfinite(lp):
        log.warning("non-finite LPIPS in this batch: MSE only")
        return _Losses(mse, float(mse.detach()), None)
    return _Losses(mse + run.o.lpips_weight * lp, float(mse.detach()), float(lp.detach()))


def _step(run: _Run, it: int, batch: _Batch) -> _Losses:
    """One optimizer step on the batch, then the EMA update."""
    for g in run.opt.param_groups:
        g["lr"] = lr_at(it, run.o)
    x0 = run.net(batch.x_in, batch.t, batch.lq_up)
    losses = _losses(run, x0, batch.gt)
    run.opt.zero_grad(set_to_none=True)
    losses.total.backward()
    run.opt.step()
    losses.total = losses.total.detach()  # the log window keeps values, not graphs
    with torch.no_grad():
        rate = min(run.o.ema_rate, (1 + it) / (10 + it))
        for k, v in run.net.state_dict().items():
            if v.dtype.is_floating_point:
                run.ema[k].mul_(rate).add_(v.detach(), alpha=1 - rate)
            else:
                run.ema[k].copy_(v)
    return losses


def _validate_ema(run: _Run) -> dict[str, float]:
    ema_net = SwinUNet(run.cfg.unet)
    ema_net.load_state_dict(run.ema)
    rec = validate(Pipeline(run.cfg, ema_net), run.val_pairs, run.lpips_np)
    run.net.train()
    return rec


def _checkpoint(run: _Run, done: int) -> None:
    save_trainer_checkpoint(run.out / "ckpts" / f"model_{done}.pth", run.net.state_dict(), done)
    _save(
        run.out / "ema_ckpts" / f"ema_model_{done}.pth",
        {"_orig_mod." + k: v for k, v in run.ema.items()},
    )
    _save(
        run.state_path,
        {
            "model": run.net.state_dict(),
            "ema": run.ema,
            "optimizer": run.opt.state_dict(),
            "iters": done,
            "numpy_rng": run.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
        },
    )


@dataclass
class _Tables:
    eta: torch.Tensor
    in_scale: torch.Tensor
    roll: StepTable
    up4: BicubicUp4


def _tables(run: _Run) -> _Tables:
    table = Pipeline(run.cfg, run.net).table
    in_scale = torch.zeros(len(table.eta), dtype=torch.float32)
    for r in table.rows:
        in_scale[r.t] = r.in_scale
    return _Tables(
        eta=torch.tensor(table.eta, dtype=torch.float32),
        in_scale=in_scale,
        roll=make_step_table(run.cfg.schedule, run.o.rollout_rule),
        up4=BicubicUp4("matlab"),
    )


def _progress(disable: bool):
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
    return Progress(*cols, disable=disable)


@torch.enable_grad()
def train(o: TrainOptions, *, resume: bool = False, progress: bool = True) -> Path:
    """Train; returns the path of the final EMA checkpoint."""
    run = _start(o, resume)
    tables = _tables(run)
    if o.qat:  # the training net only: the EMA copy validated below runs in float
        FakeQuant(run.net)
    images = load_training_images(o.data, o.crop, run.out / "data-sources.json")
    sampler = CropSampler(images, o.crop, o.quantize_lr, run.rng)
    t0 = time.time()
    window: list[_Losses] = []
    with (
        (run.out / "log.jsonl").open("a", encoding="utf-8") as logf,
        _progress(not progress) as bar,
    ):
        task = bar.add_task("train", total=o.iters, completed=run.start, loss=float("nan"))
        run.net.train()
        for it in range(run.start, run.end):
            losses = _step(run, it, _sample(run, sampler, tables))
            window.append(losses)
            bar.update(task, advance=1, loss=float(losses.total))
            done = it + 1
            saving = done % o.save_every == 0 or done in (o.iters, o.stop_at)
            if done % o.log_every == 0 or done == o.iters:
                rec = _log_record(run, done, it, window, time.time() - t0, validate_now=saving)
                window = []
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                log.info("%s", rec)
            if saving:
                _checkpoint(run, done)
    return run.out / "ema_ckpts" / f"ema_model_{run.end}.pth"


def _log_record(
    run: _Run, done: int, it: int, window: list[_Losses], elapsed: float, *, validate_now: bool
) -> dict[str, float]:
    rec: dict[str, float] = {
        "iter": done,
        "loss": float(np.mean([float(w.total) for w in window])) if window else 0.0,
        "mse": float(np.mean([w.mse for w in window])) if window else 0.0,
        "lr": lr_at(it, run.o),
        "elapsed_s": round(elapsed, 1),
    }
    lp = [w.lpips for w in window if w.lpips is not None]
    if lp:
        rec["lpips"] = float(np.mean(lp))
    if run.val_pairs and validate_now:
        rec.update(_validate_ema(run))
    return rec


def _save(path: Path, obj: object) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _yaml_dump(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)
