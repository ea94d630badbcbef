"""MATLAB-style bicubic resize in numpy (``imresize(..., 'bicubic')``).

Keys cubic with a = -0.5, antialiased (kernel widened by 1/scale) when shrinking, symmetric border
that repeats the edge pixel, weights normalised per output pixel, height first, then width,
output size ceil(in * scale). This is the degradation that makes DeltaDiff's and ResShift's
bicubic LR images, and the upsampler of ``deltadiff-pixel``. numpy only (the runtime uses it for
alpha channels; the trainer and the quality evaluator for the x1/4 degradation).
"""

from __future__ import annotations

import math

import numpy as np


def cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys cubic kernel."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (a + 2) * ax3 - (a + 3) * ax2 + 1
    far = a * ax3 - 5 * a * ax2 + 8 * a * ax - 4 * a
    return np.where(ax <= 1, near, np.where(ax < 2, far, 0.0))


def resize_matrix(in_len: int, scale: float, out_len: int | None = None) -> np.ndarray:
    """(out_len, in_len) float64 matrix M with out = M @ in along one axis (symmetric border folded in)."""
    if out_len is None:
        out_len = math.ceil(in_len * scale)
    kernel_width = 4.0
    antialias = scale < 1
    if antialias:
        kernel_width /= scale
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # 1-based source coordinate
    left = np.floor(u - kernel_width / 2)
    taps = int(math.ceil(kernel_width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]  # 1-based tap positions, (out, taps)
    dist = u[:, None] - idx
    w = scale * cubic(dist * scale) if antialias else cubic(dist)
    w = w / w.sum(axis=1, keepdims=True)
    # symmetric mirror including the edge pixel: 0-based p < 0 -> -p-1, p >= n -> 2n-1-p
    p = (idx - 1).astype(np.int64)
    period = 2 * in_len
    p = np.mod(p, period)
    p = np.where(p >= in_len, period - 1 - p, p)
    m = np.zeros((out_len, in_len), dtype=np.float64)
    np.add.at(m, (np.repeat(np.arange(out_len), taps), p.reshape(-1)), w.reshape(-1))
    return m


def imresize_matlab(img: np.ndarray, scale: float) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) float array by ``scale``; float32 out, no clamping or rounding."""
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {img.shape}")
    x = np.asarray(img, dtype=np.float32)
    mh = resize_matrix(x.shape[0], scale).astype(np.float32)
    mw = resize_matrix(x.shape[1], scale).astype(np.float32)
    out = np.tensordot(mh, x, axes=(1, 0))  # (H', W, C): height first
    out = np.tensordot(mw, out, axes=(1, 1))  # (W', H', C)
    out = np.swapaxes(out, 0, 1)
    return np.ascontiguousarray(out, dtype=np.float32)
