"""Backends run named graphs of a model directory on arrays they own.

A backend is a context manager with ``run(graph, feeds) -> {name: array}`` and
``input_names(graph)``. Graph names are the manifest's (``encoder``, ``step``, ``decoder``,
``unrolled``). ``open_backend`` is the only place that picks an implementation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from deltadiff.errors import BackendError
from deltadiff.manifest import Manifest, TensorSpec
from deltadiff.options import RUNTIME_BACKENDS, Backend, Precision, parse


class RuntimeBackend(Protocol):
    name: str
    precision: str

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def input_names(self, graph: str) -> list[str]: ...

    def close(self) -> None: ...

    def __enter__(self) -> RuntimeBackend: ...

    def __exit__(self, *exc: object) -> None: ...


def check_feeds(graph: str, specs: tuple[TensorSpec, ...], feeds: dict[str, np.ndarray]) -> None:
    """The one feed validator: every declared input present with the right dtype and shape."""
    for s in specs:
        if s.name not in feeds:
            raise BackendError(
                f"{graph}: input {s.name!r} was not fed (expects {s.dtype} {list(s.shape)})"
            )
        a = feeds[s.name]
        if str(a.dtype) != s.dtype:
            raise BackendError(f"{graph}: input {s.name!r} has dtype {a.dtype}, expected {s.dtype}")
        if a.ndim != len(s.shape) or any(
            isinstance(d, int) and d != n for d, n in zip(s.shape, a.shape, strict=False)
        ):
            raise BackendError(
                f"{graph}: input {s.name!r} has shape {list(a.shape)}, expected {list(s.shape)}"
            )


def open_backend(
    name: Backend | str,
    model_dir: str | Path,
    manifest: Manifest,
    *,
    precision: Precision | str = Precision.FP32,
    threads: int = 0,
    device: int = 0,
) -> RuntimeBackend:
    """The one place that picks a backend implementation (typed options, deltadiff.options)."""
    b = parse(Backend, name, "backend")
    precision = parse(Precision, precision, "precision")
    if b is Backend.ONNXRUNTIME or b is Backend.ONNXRUNTIME_CUDA:
        from deltadiff.runtime.backends.ort import OrtBackend

        cuda = b is Backend.ONNXRUNTIME_CUDA
        return OrtBackend(
            model_dir,
            manifest,
            precision=precision,
            threads=threads,
            **({"providers": ["cuda"], "device": device} if cuda else {}),
        )
    if b is Backend.TENSORRT:
        from deltadiff.runtime.backends.trt import TrtBackend

        return TrtBackend(model_dir, manifest, precision=precision, device=device)
    choices = ", ".join(RUNTIME_BACKENDS)
    raise BackendError(f"{b} is not a runtime backend (the reference is); choose one of {choices}")
