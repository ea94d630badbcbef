"""The reference pipeline: [encode] -> 4 unrolled UNet steps -> [decode] (docs/design.md).

``Pipeline`` is an ``nn.Module`` whose pieces are exactly what gets exported:

- ``encode(lr)``  LR in [0, 1] -> (y, cond): upsample x4 (MATLAB or PyTorch bicubic), then the VQ
  encoder for the latent families; for ``deltadiff-pixel`` y = cond = lq_up;
- ``step(...)``   one row of the step table (coefficients as tensors or floats);
- ``decode(x)``   VQ decode with quantisation (latent) or identity (pixel), clamp, -> [0, 1];
- ``forward(lr, noise)`` the unrolled sequence with the table baked in.

Families are adapters behind ``encode``/``decode``; the step loop never asks which family it runs.
``upscale()`` adds the per-family padding for arbitrary sizes (reflect, bottom / right: latent
families pad the LR to a multiple of 64; ``deltadiff-pixel`` pads lq_up so HR is a multiple of 32).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from deltadiff.errors import ConfigError, DeltaDiffError
from deltadiff.manifest import Manifest, sha256_file
from deltadiff.model.bicubic_x4 import BicubicUp4
from deltadiff.model.checkpoint import load_weights_into
from deltadiff.model.config import (
    ModelConfig,
    checkpoint_paths_from_yaml,
    from_upstream_yaml,
    preset,
)
from deltadiff.model.schedule import StepRow, StepTable, step_table
from deltadiff.model.swin_unet import SwinUNet
from deltadiff.model.vq_f4 import VQModel
from deltadiff.noise import noise_field
from deltadiff.steps import PRIOR_NOISE
from deltadiff.tiling import pad_amounts, reflect_index

log = logging.getLogger(__name__)

Hook = Callable[[StepRow, torch.Tensor, torch.Tensor], None]  # (row, x0_hat, x_next)


def randomize_(module: nn.Module, seed: int) -> None:
    """Deterministic random weights with healthy activations (every conv, incl. zero-init ones).

    conv/linear weight ~ N(0, 1/fan_in), bias ~ N(0, 0.02^2); GroupNorm weight 1 + N(0, 0.1^2),
    bias N(0, 0.1^2); Swin bias tables and a VQ codebook N(0, 0.5^2).
    """
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for mod in module.modules():
            for leaf, p in mod.named_parameters(recurse=False):
                if isinstance(mod, nn.GroupNorm):
                    base = 1.0 if leaf == "weight" else 0.0
                    p.copy_(base + torch.randn(p.shape, generator=g) * 0.1)
                elif leaf == "relative_position_bias_table" or isinstance(mod, nn.Embedding):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                elif p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)


class Pipeline(nn.Module):
    """Reference DeltaDiff / ResShift x4 pipeline, float32, inference only."""

    def __init__(self, cfg: ModelConfig, unet: SwinUNet, vq: VQModel | None = None) -> None:
        super().__init__()
        if cfg.latent != (vq is not None):
            raise ConfigError(
                f"family {cfg.family} {'needs' if cfg.latent else 'has no'} autoencoder"
            )
        self.cfg = cfg
        self.table: StepTable = step_table(cfg)
        self.unet = unet
        self.vq = vq
        self.up = BicubicUp4(cfg.upsampler)
        self.eval()

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        cfg: ModelConfig,
        unet_weights: str | Path | None = None,
        vq_weights: str | Path | None = None,
        *,
        seed: int = 0,
        ema: bool = False,
    ) -> Pipeline:
        """Networks from ``cfg``; weights from files, or deterministic random weights if None."""
        unet = SwinUNet(cfg.unet)
        desc = f"{cfg.name or cfg.family} (model_channels {cfg.unet.model_channels})"
        if unet_weights is None:
            randomize_(unet, seed)
        else:
            load_weights_into(unet, unet_weights, what="UNet", config_desc=desc, ema=ema)
        vq = None
        if cfg.vq is not None:
            vq = VQModel(cfg.vq)
            if vq_weights is None:
                randomize_(vq, seed + 1)
            else:
                load_weights_into(
                    vq,
                    vq_weights,
                    what="VQ-f4 autoencoder",
                    config_desc=f"{cfg.name} (ch {cfg.vq.ch})",
                )
        elif vq_weights is not None:
            raise ConfigError(f"family {cfg.family} has no autoencoder; drop the VQ weights")
        return cls(cfg, unet, vq)

    @classmethod
    def from_preset(
        cls,
        name: str,
        unet_weights: str | Path | None = None,
        vq_weights: str | Path | None = None,
        *,
        seed: int = 0,
        ema: bool = False,
    ) -> Pipeline:
        return cls.build(preset(name), unet_weights, vq_weights, seed=seed, ema=ema)

    @classmethod
    def from_manifest(
        cls,
        m: Manifest,
        *,
        unet_weights: str | Path | None = None,
        vq_weights: str | Path | None = None,
        model_dir: Path | None = None,
    ) -> Pipeline:
        """The exact reference a model directory was exported from (manifest ``source``): the
        recorded weight files (checked against their sha256) or the preset's seeded weights."""
        src = m.source
        paths: dict[str, Path | None] = {}
        for key, override in (("unet_weights", unet_weights), ("vq_weights", vq_weights)):
            rec = src.get(key)
            if override is not None:
                paths[key] = Path(override)
            elif rec:
                p = Path(rec["path"])
                if not p.is_absolute() and model_dir is not None:
                    p = (model_dir / p).resolve()
                flag = "--" + key.replace("_", "-")
                if not p.exists():
                    raise DeltaDiffError(
                        f"the reference weights {p} recorded in the manifest are missing; pass "
                        f"{flag} FILE"
                    )
                if rec.get("sha256") and sha256_file(p) != rec["sha256"]:
                    raise DeltaDiffError(
                        f"{p} changed since export (sha256 differs from the manifest); re-export "
                        f"or pass {flag} with the original file"
                    )
                paths[key] = p
            else:
                paths[key] = None
        return cls.build(
            ModelConfig.from_dict(m.model_config),
            paths["unet_weights"],
            paths["vq_weights"],
            seed=int(src.get("seed") or 0),
            ema=bool(src.get("ema", False)),
        )

    @classmethod
    def from_yaml(
        cls,
        yaml_path: str | Path,
        unet_weights: str | Path | None = None,
        vq_weights: str | Path | None = None,
        *,
        family: str | None = None,
        ema: bool = False,
    ) -> Pipeline:
        """Upstream YAML + checkpoints (defaults: the YAML's own ``ckpt_path`` entries)."""
        cfg = from_upstream_yaml(yaml_path, family=family)
        paths = checkpoint_paths_from_yaml(yaml_path)
        unet_weights = unet_weights or paths.get("unet")
        vq_weights = vq_weights or (paths.get("vq") if cfg.latent else None)
        if unet_weights is None:
            raise ConfigError(f"{yaml_path}: no UNet checkpoint given and model.ckpt_path is empty")
        if cfg.latent and vq_weights is None:
            raise ConfigError(
                f"{yaml_path}: no VQ checkpoint given and autoencoder.ckpt_path is empty"
            )
        return cls.build(cfg, unet_weights, vq_weights, ema=ema)

    # ------------------------------------------------------------------ graph pieces
    def encode(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LR (B,3,h,w) in [0,1] -> (y, cond). Latent: y (B,3,h,w), cond = LR in [-1,1].
        Pixel: y = cond = lq_up (B,3,4h,4w)."""
        m = lr * 2.0 - 1.0
        up = self.up(m)
        if self.vq is not None:
            return self.vq.encode(up), m
        return up, up

    def step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        cond: torch.Tensor,
        t: torch.Tensor,
        in_scale: torch.Tensor | float,
        a: torch.Tensor | float,
        b: torch.Tensor | float,
        c: torch.Tensor | float,
        s: torch.Tensor | float = 0.0,
        noise: torch.Tensor | None = None,
        hook_row: StepRow | None = None,
        hook: Hook | None = None,
    ) -> torch.Tensor:
        """x_{t-1} = a x_t + b UNet(cat[in_scale x_t, cond], t) + c y + s n_t (docs/design.md)."""
        x0 = self.unet(in_scale * x, t, cond)
        out = a * x + b * x0
        if not (isinstance(c, float) and c == 0.0):
            out = out + c * y
        if noise is not None:
            out = out + s * noise
        if hook is not None and hook_row is not None:
            hook(hook_row, x0, out)
        return out

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Result state -> image in [0, 1] (clamped to [-1, 1] first)."""
        img = self.vq.decode(x) if self.vq is not None else x
        return img.clamp(-1.0, 1.0) * 0.5 + 0.5

    def prior(self, y: torch.Tensor, noise: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        if self.table.s_prior != 0.0:
            return y + self.table.s_prior * _need(noise, PRIOR_NOISE)
        return y

    def run_steps(
        self,
        y: torch.Tensor,
        cond: torch.Tensor,
        noise: Mapping[str, torch.Tensor] | None = None,
        hook: Hook | None = None,
    ) -> torch.Tensor:
        """The four rows, constants from the table (the loop every backend reproduces)."""
        x = self.prior(y, noise)
        B = x.shape[0]
        for r in self.table.rows:
            t = torch.full((B,), r.t, dtype=torch.int64, device=x.device)
            n = _need(noise, r.noise) if r.noise is not None else None
            x = self.step(x, y, cond, t, r.in_scale, r.a, r.b, r.c, r.s, n, hook_row=r, hook=hook)
        return x

    def forward(
        self,
        lr: torch.Tensor,
        noise: Mapping[str, torch.Tensor] | None = None,
        hook: Hook | None = None,
    ) -> torch.Tensor:
        """Unrolled: LR (B,3,h,w) in [0,1], sizes already valid -> SR (B,3,4h,4w) in [0,1]."""
        y, cond = self.encode(lr)
        return self.decode(self.run_steps(y, cond, noise, hook))

    # ------------------------------------------------------------------ user level
    @property
    def pad_multiple(self) -> int:
        """LR multiple the reference pads to: 64 for latent (upstream padding_offset), 8 for pixel
        (RESSampler), or the network's own requirement if larger."""
        if self.cfg.latent:
            return max(64, self.cfg.lr_multiple)
        return max(8, self.cfg.lr_multiple)

    def make_noise(
        self, shape: tuple[int, ...], seed: int, source: str = "numpy"
    ) -> dict[str, torch.Tensor]:
        """Noise inputs named by the step table. ``numpy``: the toolkit's generator (same in every
        backend); ``torch``: upstream's draw order on a CPU torch generator (to reproduce a CPU
        upstream run with ``torch.manual_seed(seed)``)."""
        names = self.table.noise_names()
        if source == "numpy":
            return {k: torch.from_numpy(v) for k, v in noise_field(names, shape, seed).items()}
        if source == "torch":
            g = torch.Generator().manual_seed(int(seed))
            return {k: torch.randn(shape, generator=g) for k in names}
        raise ConfigError(f"unknown noise source {source!r}; use numpy or torch")

    @torch.no_grad()
    def upscale(
        self,
        lr: torch.Tensor,
        *,
        noise: Mapping[str, torch.Tensor] | None = None,
        seed: int | None = None,
        hook: Hook | None = None,
    ) -> torch.Tensor:
        """LR (B,3,h,w) in [0,1], any size -> SR (B,3,4h,4w) in [0,1], padded per family
        (see the module docstring).

        Pads bottom/right with reflection (mirror tiling for pads larger than the image, which has
        no upstream equivalent), runs, crops. ``resshift-v3`` needs ``noise`` or ``seed``.
        """
        if lr.ndim != 4 or lr.shape[1] != 3:
            raise DeltaDiffError(
                f"expected an LR batch of shape (B, 3, h, w), got {tuple(lr.shape)}"
            )
        B, _, h, w = lr.shape
        ph, pw = pad_amounts(h, w, self.pad_multiple)
        if self.cfg.latent:
            lr_p = _reflect_pad_t(lr, ph, pw)
            y, cond = self.encode(lr_p)
        else:  # lq_up from the unpadded LR, then pad lq_up by 4x the LR amounts (RESSampler)
            y, _ = self.encode(lr)
            y = _reflect_pad_t(y, 4 * ph, 4 * pw)
            cond = y
        if self.table.noisy and noise is None:
            if seed is None:
                raise ConfigError(f"family {self.cfg.family} draws noise: pass noise= or seed=")
            noise = self.make_noise(tuple(y.shape), seed)
        out = self.decode(self.run_steps(y, cond, noise, hook))
        return out[:, :, : 4 * h, : 4 * w]


def _need(noise: Mapping[str, torch.Tensor] | None, name: str) -> torch.Tensor:
    if noise is None or name not in noise:
        raise ConfigError(
            f"noise input {name!r} is required by this step table; pass noise= or seed="
        )
    return noise[name]


def _reflect_pad_t(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    if ph == 0 and pw == 0:
        return x
    h, w = x.shape[-2:]
    ih = torch.from_numpy(reflect_index(h, h + ph)).to(x.device)
    iw = torch.from_numpy(reflect_index(w, w + pw)).to(x.device)
    return x.index_select(2, ih).index_select(3, iw)
