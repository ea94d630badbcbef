"""One encoded image file held in memory -> the PNG ``dd-run upscale`` would write for it.

Shared by ``dd-run serve`` (``runtime/serving/serve.py``), the Python model of ``dd-export triton``
repositories (``runtime/serving/triton_service.py``) and ``dd-run batch`` (``runtime/serving/ray_job.py``): every
one of them writes the bytes to a private temporary file and runs ``upscale_file`` on it, so the
decoder, its limits (``read_image``: pixel limit, bounded inflating) and the writer are exactly
those of ``dd-run upscale``.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from deltadiff.errors import DeltaDiffError, ImageError

DEFAULT_MAX_BYTES = 32 << 20  # encoded request image
DEFAULT_MAX_PIXELS = 4 << 20  # LR pixels (2048 x 2048); the output has 16x as many


class RequestError(DeltaDiffError):
    """A request a server refuses (HTTP 400): not an image, too large, a bad parameter."""


def upscale_bytes(
    up: Any,
    data: bytes,
    dst: Path,
    *,
    name: str,
    workdir: Path | None = None,
    max_pixels: int | None = None,
) -> None:
    """Upscale an encoded image file held in memory and write ``dst`` atomically, exactly as
    ``dd-run upscale`` does for a file (same decoder, checks and writer). Errors name ``name``.

    ``max_pixels``: a server's limit, checked from the header (Pillow parses the header only)
    before anything is decoded; a file Pillow cannot parse goes on to ``upscale_file``, whose
    decoder names the problem.
    """
    from PIL import Image

    from deltadiff.runtime.upscaler import upscale_file

    work = Path(tempfile.mkdtemp(prefix="dd-in-", dir=workdir))
    src = work / "input"
    try:
        src.write_bytes(data)
        if max_pixels:
            w = h = 0
            with contextlib.suppress(Exception), Image.open(src) as im:  # header only
                w, h = im.size
            if w * h > max_pixels:
                raise RequestError(
                    f"image is too large: {w}x{h} = {w * h} pixels, the server's limit is "
                    f"{max_pixels} (dd-run serve --max-pixels)"
                )
        try:
            upscale_file(up, src, dst)
        except ImageError as exc:
            raise ImageError(str(exc).replace(str(src), name)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


class SeededView:
    """An Upscaler seen with another noise seed (``resshift-v3``), for one request."""

    def __init__(self, up: Any, seed: int) -> None:
        self._up, self._seed, self.m = up, seed, up.m

    def upscale(self, rgb: np.ndarray, **kw: Any) -> np.ndarray:
        return self._up.upscale(rgb, seed=self._seed, **kw)


def with_seed(up: Any, seed: int) -> Any:
    """``up`` itself when ``seed`` is its own, else a ``SeededView``."""
    return up if seed == up.opts.seed else SeededView(up, seed)


def upscale_request(
    up: Any, data: bytes, seed: int, *, workdir: Path, max_pixels: int | None
) -> bytes:
    """PNG bytes for one request's image; a bad image is a ``RequestError`` (HTTP 400)."""
    dst = Path(tempfile.mkdtemp(dir=workdir)) / "upscaled.png"
    try:
        upscale_bytes(
            with_seed(up, seed), data, dst, name="image", workdir=workdir, max_pixels=max_pixels
        )
        return dst.read_bytes()
    except ImageError as exc:
        raise RequestError(str(exc)) from None
    finally:
        shutil.rmtree(dst.parent, ignore_errors=True)
