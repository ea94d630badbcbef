"""CPU simulation of the TensorRT backend: a fake ``cuda.bindings.runtime`` and a fake
``tensorrt_rtx`` backed by ONNX Runtime, injected so that the real ``TrtBackend`` and the real
engine builder run on them (``install``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .fake_cuda import FakeCuda
from .fake_trt import FakeTrt


@dataclass
class Sim:
    cuda: FakeCuda
    trt: FakeTrt


@contextmanager
def install(*, sm: tuple[int, int] = (8, 9), name: str = "Simulated RTX") -> Iterator[Sim]:
    """Put the fakes in ``sys.modules`` (full ``tensorrt`` hidden) for the duration."""
    from deltadiff.runtime.trt_compat import trt_logger

    cuda = FakeCuda(name=name, sm=sm)
    trt = FakeTrt(cuda)
    names = ("cuda.bindings.runtime", "tensorrt_rtx", "tensorrt")
    saved = {n: sys.modules.get(n, KeyError) for n in names}
    sys.modules["cuda.bindings.runtime"] = cuda.module()
    sys.modules["tensorrt_rtx"] = trt.module()
    sys.modules["tensorrt"] = None  # type: ignore[assignment]  # import raises ImportError
    trt_logger.cache_clear()
    try:
        yield Sim(cuda, trt)
    finally:
        trt_logger.cache_clear()
        for n, mod in saved.items():
            if mod is KeyError:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod
