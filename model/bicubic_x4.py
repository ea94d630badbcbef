"""Exact x4 bicubic upsamplers as 4-phase filters (docs/design.md "Graphs"), exportable to ONNX.

Both kinds sample at the same positions (output k = 4m + p reads around m + p/4 - 3/8) and differ
in kernel and border:

- ``matlab``: Keys a = -0.5, symmetric border (edge repeated), as MATLAB ``imresize`` / upstream
  ``imresize_np`` (deltadiff-pixel);
- ``torch``: Keys a = -0.75, replicate border, as ``F.interpolate(mode='bicubic',
  align_corners=False)`` (ResShift's encode path, the latent families).

Each is a border pad by 2 (an index gather), one 5-tap depthwise conv per axis producing the four
phases as channels, and a pixel-shuffle along that axis; height first, then width. No ONNX Resize
is involved, so every backend computes the same thing.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from deltadiff.imresize import cubic

KERNEL_A = {"matlab": -0.5, "torch": -0.75}
BORDER = {"matlab": "symmetric", "torch": "replicate"}


def phase_weights(kind: str) -> np.ndarray:
    """(4, 5) float64: weights of phase p over padded taps m-2 .. m+2."""
    a = KERNEL_A[kind]
    w = np.zeros((4, 5), dtype=np.float64)
    for p in range(4):
        src = p / 4 - 0.375  # source offset relative to m
        for j, off in enumerate(range(-2, 3)):
            w[p, j] = cubic(np.array(src - off), a)
        w[p] /= w[p].sum()
    return w


def _border_index(n: int, mode: str, device: torch.device | None = None) -> torch.Tensor:
    """Indices of an axis of length n padded by 2 on both sides.

    Tensor ops, so a symbolic n (dynamic export) stays in the graph; a static export folds it.
    """
    idx = torch.arange(-2, n + 2, device=device)
    if mode == "replicate":
        return idx.clamp(0, n - 1)
    # symmetric, repeating the edge: one fold is exact for n >= 2; the clamp covers n == 1
    idx = torch.where(idx < 0, -1 - idx, idx)
    idx = torch.where(idx >= n, 2 * n - 1 - idx, idx)
    return idx.clamp(0, n - 1)


class BicubicUp4(nn.Module):
    """x (B, C, h, w) -> (B, C, 4h, 4w), MATLAB- or PyTorch-style bicubic."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in KERNEL_A:
            raise ValueError(f"unknown bicubic kind {kind!r}")
        self.kind = kind
        w = torch.from_numpy(phase_weights(kind).astype(np.float32))  # (4, 5)
        self.register_buffer("w_h", w[:, None, :, None].clone(), persistent=False)  # (4,1,5,1)
        self.register_buffer("w_w", w[:, None, None, :].clone(), persistent=False)  # (4,1,1,5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x.shape
        mode = BORDER[self.kind]
        y = x.reshape(B * C, 1, h, w)
        # height: pad, 4 phases as channels, interleave phases into rows
        y = torch.index_select(y, 2, _border_index(h, mode, x.device))  # (BC, 1, h+4, w)
        y = nn.functional.conv2d(y, self.w_h)  # (BC, 4, h, w)
        y = y.permute(0, 2, 1, 3).reshape(B * C, 1, 4 * h, w)
        # width
        y = torch.index_select(y, 3, _border_index(w, mode, x.device))  # (BC, 1, 4h, w+4)
        y = nn.functional.conv2d(y, self.w_w)  # (BC, 4, 4h, w)
        y = y.permute(0, 2, 3, 1).reshape(B, C, 4 * h, 4 * w)
        return y
