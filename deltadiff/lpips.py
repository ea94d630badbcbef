"""LPIPS v0.1 (AlexNet trunk) in plain numpy: no torch, runs in the lean runtime install.

Weights: ``lpips_alex_v0.1.npz`` (the LPIPS v0.1 AlexNet release as npz; ``DD_LPIPS_WEIGHTS`` or
``--lpips-weights`` points at it). The network and
formula follow Zhang et al. 2018 / richzhang/PerceptualSimilarity, ``net='alex'``, ``version='0.1'``:

1. inputs RGB in [-1, 1]; scaling layer ``x = (x - shift) / scale`` per channel;
2. AlexNet ``features``: conv1 (11x11, stride 4, pad 2) -> ReLU = f1 -> max-pool 3x3 s2;
   conv2 (5x5, pad 2) -> ReLU = f2 -> max-pool 3x3 s2; conv3, conv4, conv5 (3x3, pad 1), each
   -> ReLU = f3, f4, f5 (max-pools: no padding, floor mode);
3. per tap: unit-normalise along channels ``n = f / (sqrt(sum_c f^2) + 1e-10)``,
   ``d = (n_a - n_b)^2``, 1x1 "lin" weights (>= 0, no bias) over channels, mean over (y, x);
4. LPIPS = sum of the 5 per-tap values.

Convolutions are im2col + one matmul per block of output rows (memory bounded for large images);
activations stay in HWC layout. Compute dtype defaults to float32 (agrees with a float64
reference to ~1e-6 absolute); pass ``dtype=np.float64`` for a reference-grade value.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from deltadiff.errors import CheckpointError, DeltaDiffError

log = logging.getLogger(__name__)

WEIGHTS_FILE = "lpips_alex_v0.1.npz"
ENV_WEIGHTS = "DD_LPIPS_WEIGHTS"

# (npz prefix, out channels, in channels, kernel, stride, padding, max-pool after the ReLU)
_CONVS: tuple[tuple[str, int, int, int, int, int, bool], ...] = (
    ("features.0", 64, 3, 11, 4, 2, True),
    ("features.3", 192, 64, 5, 1, 2, True),
    ("features.6", 384, 192, 3, 1, 1, False),
    ("features.8", 256, 384, 3, 1, 1, False),
    ("features.10", 256, 256, 3, 1, 1, False),
)
_EPS = 1e-10
# smallest side that leaves >= 1 pixel after conv1 + two 3x3/s2 pools
MIN_SIDE = 31
# im2col block budget (elements) per matmul
_BLOCK_ELEMS = 8 * 1024 * 1024


def default_lpips_weights() -> Path | None:
    """Env ``DD_LPIPS_WEIGHTS`` if set, else ``<repo root>/../shared/weights/lpips_alex_v0.1.npz``
    if that file exists, else None."""
    env = os.environ.get(ENV_WEIGHTS)
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[1]
    candidate = repo_root.parent / "shared" / "weights" / WEIGHTS_FILE
    return candidate if candidate.is_file() else None


@dataclass(frozen=True)
class _Conv:
    name: str
    weight: np.ndarray  # (C_in * k * k, C_out), rows ordered (c, ky, kx) like OIHW.reshape(O, -1)
    bias: np.ndarray  # (C_out,)
    kernel: int
    stride: int
    padding: int
    pool: bool


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (prefix, c_out, c_in, k, _, _, _) in enumerate(_CONVS):
        shapes[f"{prefix}.weight"] = (c_out, c_in, k, k)
        shapes[f"{prefix}.bias"] = (c_out,)
        shapes[f"lin{i}.weight"] = (1, c_out, 1, 1)
    shapes["scaling.shift"] = (1, 3, 1, 1)
    shapes["scaling.scale"] = (1, 3, 1, 1)
    return shapes


def _conv2d_hwc(x: np.ndarray, conv: _Conv) -> np.ndarray:
    """Cross-correlation of an (H, W, C) array with bias, HWC out (im2col, blocked over rows)."""
    p, k, s = conv.padding, conv.kernel, conv.stride
    if p:
        x = np.pad(x, ((p, p), (p, p), (0, 0)))
    h_out = (x.shape[0] - k) // s + 1
    w_out = (x.shape[1] - k) // s + 1
    # (H', W', C, k, k) view; [::s, ::s] applies the stride
    win = sliding_window_view(x, (k, k), axis=(0, 1))[::s, ::s]
    c_out = conv.weight.shape[1]
    out = np.empty((h_out, w_out, c_out), dtype=x.dtype)
    rows = max(1, _BLOCK_ELEMS // max(1, w_out * conv.weight.shape[0]))
    for r0 in range(0, h_out, rows):
        r1 = min(h_out, r0 + rows)
        cols = win[r0:r1].reshape((r1 - r0) * w_out, -1)  # copies the windows
        blk = cols @ conv.weight
        blk += conv.bias
        out[r0:r1] = blk.reshape(r1 - r0, w_out, c_out)
    return out


def _maxpool3s2_hwc(x: np.ndarray) -> np.ndarray:
    """3x3 max-pool, stride 2, no padding, floor mode, on (H, W, C)."""
    win = sliding_window_view(x, (3, 3), axis=(0, 1))[::2, ::2]
    return win.max(axis=(-2, -1))


def load_weights(path: Path) -> dict[str, np.ndarray]:
    """The LPIPS AlexNet arrays of ``path`` (npz, no pickle), checked for names, shapes and finite
    values; the numpy metric here and the torch training loss (``model/lpips_loss.py``) share it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"LPIPS weights not found: {path}; point {ENV_WEIGHTS} or --lpips-weights at "
            f"{WEIGHTS_FILE}"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in npz.files}
    except Exception as exc:  # noqa: BLE001 - any read failure is a bad weight file
        raise CheckpointError(
            f"cannot read LPIPS weights {path}: {type(exc).__name__}: {exc}; re-copy {WEIGHTS_FILE}"
        ) from None
    for key, shape in _expected_shapes().items():
        if key not in arrays:
            raise CheckpointError(
                f"LPIPS weights {path.name} lack array {key!r} (has {len(arrays)} arrays); "
                f"use the LPIPS v0.1 AlexNet {WEIGHTS_FILE}"
            )
        if arrays[key].shape != shape:
            raise CheckpointError(
                f"LPIPS weights {path.name}: {key} has shape {arrays[key].shape}, expected "
                f"{shape}; use the LPIPS v0.1 AlexNet {WEIGHTS_FILE}"
            )
        if not np.all(np.isfinite(arrays[key])):
            raise CheckpointError(
                f"LPIPS weights {path.name}: {key} has non-finite values; re-copy {WEIGHTS_FILE}"
            )
    return arrays


class LPIPS:
    """LPIPS v0.1 (AlexNet) distance between two RGB images; lower = more similar.

    ``LPIPS(weights)(a, b)`` with ``a``, ``b`` HWC RGB arrays of the same shape, float in [0, 1]
    (uint8 is accepted and divided by 255); converted to [-1, 1] inside. Sides must be >= 31 px.
    ``features`` / ``distance`` split the computation so a reference image's features can be
    reused against several candidates.
    """

    def __init__(self, weights: str | Path, *, dtype: type[np.floating] = np.float32) -> None:
        path = Path(weights).expanduser()
        self.weights_path = path
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise DeltaDiffError(
                f"LPIPS dtype must be float32 or float64, got {self.dtype}; pass np.float32"
            )
        arrays = load_weights(path)
        dt = self.dtype
        self._convs: tuple[_Conv, ...] = tuple(
            _Conv(
                name=prefix,
                weight=np.ascontiguousarray(arrays[f"{prefix}.weight"].reshape(c_out, -1).T, dt),
                bias=arrays[f"{prefix}.bias"].astype(dt),
                kernel=k,
                stride=s,
                padding=p,
                pool=pool,
            )
            for prefix, c_out, _, k, s, p, pool in _CONVS
        )
        self._lins: tuple[np.ndarray, ...] = tuple(
            arrays[f"lin{i}.weight"].reshape(-1).astype(dt) for i in range(len(_CONVS))
        )
        self._shift = arrays["scaling.shift"].reshape(3).astype(dt)
        self._scale = arrays["scaling.scale"].reshape(3).astype(dt)
        log.debug("loaded LPIPS weights %s (%s)", path, dt)

    def _prepare(self, img: np.ndarray, what: str) -> np.ndarray:
        arr = np.asarray(img)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise DeltaDiffError(
                f"LPIPS {what} must be an (H, W, 3) RGB array, got shape {arr.shape}; "
                "convert to RGB HWC first"
            )
        if min(arr.shape[:2]) < MIN_SIDE:
            raise DeltaDiffError(
                f"LPIPS {what} is too small: {arr.shape[1]}x{arr.shape[0]} (WxH); "
                f"both sides must be >= {MIN_SIDE} px"
            )
        if arr.dtype == np.uint8:
            x = arr.astype(self.dtype) / self.dtype.type(255.0)
        elif np.issubdtype(arr.dtype, np.floating):
            x = arr.astype(self.dtype)
        else:
            raise DeltaDiffError(
                f"LPIPS {what} has dtype {arr.dtype}; pass float in [0, 1] or uint8"
            )
        if not np.all(np.isfinite(x)):
            raise DeltaDiffError(f"LPIPS {what} has non-finite values; pass finite pixels")
        x = x * 2 - 1  # [0, 1] -> [-1, 1]
        return (x - self._shift) / self._scale

    def features(self, img: np.ndarray) -> list[np.ndarray]:
        """The 5 channel-normalised ReLU taps (HWC each) of an HWC RGB image in [0, 1]."""
        x = self._prepare(img, "image")
        taps: list[np.ndarray] = []
        for conv in self._convs:
            x = _conv2d_hwc(x, conv)
            np.maximum(x, 0, out=x)
            norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
            taps.append(x / (norm + self.dtype.type(_EPS)))
            if conv.pool:
                x = _maxpool3s2_hwc(x)
        return taps

    def distance(self, fa: list[np.ndarray], fb: list[np.ndarray]) -> float:
        """LPIPS from two ``features`` lists (same image size)."""
        if len(fa) != len(self._lins) or len(fb) != len(self._lins):
            raise DeltaDiffError(
                f"LPIPS.distance needs {len(self._lins)} taps per image, got {len(fa)} and "
                f"{len(fb)}; pass LPIPS.features(...) outputs"
            )
        total = 0.0
        for na, nb, lin in zip(fa, fb, self._lins, strict=True):
            if na.shape != nb.shape:
                raise DeltaDiffError(
                    f"LPIPS feature shapes differ: {na.shape} vs {nb.shape}; "
                    "compare images of the same size"
                )
            d = na - nb
            d *= d
            total += float(np.mean(d @ lin, dtype=np.float64))
        return total

    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        """LPIPS distance between HWC RGB images ``a`` and ``b`` (float [0, 1] or uint8)."""
        sa, sb = np.shape(a), np.shape(b)
        if sa != sb:
            raise DeltaDiffError(
                f"LPIPS images differ in shape: {sa} vs {sb}; compare images of the same size"
            )
        return self.distance(self.features(a), self.features(b))
