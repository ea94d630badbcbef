"""Padding, tiling and blending in numpy (docs/design.md "Tiling and GroupNorm statistics")."""

from __future__ import annotations

from dataclasses import dataclass

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


def pad_amounts(
    h: int, w: int, multiple: int, minimum: tuple[int, int] = (0, 0)
) -> tuple[int, int]:
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


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap``.

    The last tile is clamped to end at ``length`` (as upstream's ImageSpliterTh does), so real
    overlaps can exceed the nominal one. ``length <= tile``: one tile (the caller pads).
    """
    if length <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile {tile})")
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def _ramp(n: int) -> np.ndarray:
    """Raised-cosine ramp rising over n samples; ramp + reversed ramp == 1 exactly (symmetric)."""
    i = np.arange(n, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(np.pi * (i + 0.5) / n)


def axis_weights(starts: list[int], tile: int, scale: int, blend: str) -> list[np.ndarray]:
    """Per-tile 1-D blend weights (length tile*scale) along one axis, in output pixels.

    ``cosine``: complementary raised-cosine ramps across each overlap with a neighbour;
    ``crop``:   hard cut at the middle of each overlap (naive cropping, for comparison).
    """
    n = tile * scale
    out = []
    for k, s in enumerate(starts):
        w = np.ones(n, dtype=np.float64)
        if k > 0:  # overlap with the previous tile: [s, prev_end)
            ov = (starts[k - 1] + tile - s) * scale
            if ov > 0:
                if blend == "cosine":
                    w[:ov] *= _ramp(ov)
                else:
                    w[: ov // 2] = 0.0
        if k + 1 < len(starts):  # overlap with the next tile: [next_start, end)
            ov = (s + tile - starts[k + 1]) * scale
            if ov > 0:
                if blend == "cosine":
                    w[n - ov :] *= _ramp(ov)[::-1]
                else:
                    w[n - (ov - ov // 2) :] = 0.0
        out.append(w)
    return out


class Blender:
    """Accumulates weighted tiles into an output canvas and normalises at the end."""

    def __init__(self, channels: int, height: int, width: int) -> None:
        self.acc = np.zeros((channels, height, width), dtype=np.float64)
        self.wsum = np.zeros((height, width), dtype=np.float64)

    def add(self, tile: np.ndarray, y: int, x: int, wy: np.ndarray, wx: np.ndarray) -> None:
        th, tw = tile.shape[-2:]
        w = wy[:, None] * wx[None, :]
        self.acc[:, y : y + th, x : x + tw] += tile * w
        self.wsum[y : y + th, x : x + tw] += w

    def result(self) -> np.ndarray:
        if (self.wsum <= 0).any():
            raise RuntimeError("tiling left output pixels uncovered")  # internal invariant
        return (self.acc / self.wsum).astype(np.float32)


# ----------------------------------------------------------------------------- tile choice


@dataclass(frozen=True)
class TilePlan:
    """How one image runs: LR tile (h, w) per backend call; ``whole`` if one call covers it."""

    tile: tuple[int, int]
    whole: bool
    reason: str


def plan_tiles(
    h: int,
    w: int,
    *,
    multiple: int,
    lr_min: tuple[int, int],
    lr_max: tuple[int, int],
    max_lr_px: int | None = None,
    tile: int | None = None,
) -> TilePlan:
    """Choose the tile for an (h, w) LR image on graphs that accept LR sizes that are multiples
    of ``multiple`` in [lr_min, lr_max] (a static export: lr_min == lr_max == its tile).

    ``tile``: the user's choice of side (clamped to the padded image). Otherwise the padded image
    runs whole when it is in range and has at most ``max_lr_px`` LR pixels (the memory budget);
    else it runs in the largest square-ish tiles that fit both.
    """
    ph, pw = pad_amounts(h, w, multiple, lr_min)
    H, W = h + ph, w + pw  # the padded image
    fixed = lr_min == lr_max
    if fixed:
        return TilePlan(lr_min, lr_min[0] >= H and lr_min[1] >= W, "static export")
    if tile is not None:
        t = (min(H, tile), min(W, tile))
        return TilePlan(t, t == (H, W), f"--tile {tile}")
    budget = max_lr_px if max_lr_px is not None else H * W
    if lr_max[0] >= H and lr_max[1] >= W and budget >= H * W:
        return TilePlan((H, W), True, "fits the model's range and the memory budget")
    side = max(lr_max)
    side -= side % multiple
    while side > multiple:
        th = min(H, side, lr_max[0] - lr_max[0] % multiple)
        tw = min(W, side, lr_max[1] - lr_max[1] % multiple)
        if th * tw <= budget and th >= lr_min[0] and tw >= lr_min[1]:
            break
        side -= multiple
    th = max(lr_min[0], min(H, side, lr_max[0] - lr_max[0] % multiple))
    tw = max(lr_min[1], min(W, side, lr_max[1] - lr_max[1] % multiple))
    hmax, wmax = lr_max[0] - lr_max[0] % multiple, lr_max[1] - lr_max[1] % multiple
    why = "the memory budget" if th * tw < min(H, hmax) * min(W, wmax) else "the model's maximum"
    return TilePlan((th, tw), False, f"largest tile within {why}")
