"""Padding, tiling and blending in numpy (DESIGN "Tiling"; MODEL.md §4.3, §4.7)."""

from __future__ import annotations

import numpy as np


def reflect_index(n: int, total: int) -> np.ndarray:
    """Indices 0..total-1 into an axis of length n, reflected past the end without repeating the
    edge pixel (numpy/torch 'reflect'), folding again as often as needed (mirror tiling) when the
    pad exceeds the size. n == 1 repeats the single pixel."""
    idx = np.arange(total)
    if n == 1:
        return np.zeros(total, dtype=np.int64)
    period = 2 * n - 2
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx).astype(np.int64)


def pad_amounts(h: int, w: int, multiple: int, minimum: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """Bottom/right pad that makes (h, w) multiples of ``multiple`` and at least ``minimum``."""
    ph = max(-(-h // multiple) * multiple, minimum[0]) - h
    pw = max(-(-w // multiple) * multiple, minimum[1]) - w
    return ph, pw


def reflect_pad(x: np.ndarray, ph: int, pw: int) -> np.ndarray:
    """Reflect-pad the last two axes at the bottom/right (mirror tiling for large pads)."""
    if ph == 0 and pw == 0:
        return x
    h, w = x.shape[-2:]
    return x[..., reflect_index(h, h + ph)[:, None], reflect_index(w, w + pw)[None, :]]
