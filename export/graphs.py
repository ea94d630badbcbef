"""The three exported graphs as thin torch wrappers around the reference ``Pipeline``.

    encoder(lr[, n_prior])                 -> x, y, cond      x = y + s_prior * n_prior
    step(x, y, cond, t, coef[, noise])     -> x_next          coef = [in_scale, a, b, c, s]
    decoder(x)                             -> image in [0, 1]

One step graph serves all four rows: the row's constants are inputs (``t`` of shape (1,) int64
broadcasts over the batch; ``coef`` is (5,) float32). The unrolled graph is composed from these
three graphs (``compose.py``), so its weights are shared and its maths is the staged maths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltadiff.model.pipeline import Pipeline


@dataclass(frozen=True)
class TileShape:
    """Static LR tile (h, w) and batch of one export."""

    h: int
    w: int
    batch: int = 1


class EncoderGraph(nn.Module):
    def __init__(self, pipe: Pipeline) -> None:
        super().__init__()
        self.pipe = pipe
        self.s_prior = float(pipe.table.s_prior)

    def forward(
        self, lr: torch.Tensor, n_prior: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, cond = self.pipe.encode(lr)
        x = y + self.s_prior * n_prior if n_prior is not None else y * 1.0
        return x, y, cond * 1.0  # distinct tensors, so every output has its own name


class StepGraph(nn.Module):
    def __init__(self, pipe: Pipeline) -> None:
        super().__init__()
        self.pipe = pipe

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        cond: torch.Tensor,
        t: torch.Tensor,
        coef: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x0 = self.pipe.unet(coef[0] * x, t, cond)
        out = coef[1] * x + coef[2] * x0 + coef[3] * y
        if noise is not None:
            out = out + coef[4] * noise
        return out


class DecoderGraph(nn.Module):
    def __init__(self, pipe: Pipeline) -> None:
        super().__init__()
        self.pipe = pipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pipe.decode(x)


def state_shape(pipe: Pipeline, tile: TileShape) -> tuple[int, int, int, int]:
    """Shape of x / y (the diffusion state) for an LR tile."""
    if pipe.cfg.latent:
        return (tile.batch, 3, tile.h, tile.w)
    return (tile.batch, 3, 4 * tile.h, 4 * tile.w)


def cond_shape(pipe: Pipeline, tile: TileShape) -> tuple[int, int, int, int]:
    return (tile.batch, 3, tile.h, tile.w) if pipe.cfg.latent else state_shape(pipe, tile)
