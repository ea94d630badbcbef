# ruff: noqa: N801, N802, N815, N818 - the names mirror cuda-python's API
"""A CPU stand-in for ``cuda.bindings.runtime`` (the subset the TensorRT backend calls).

Semantics kept from the real API, so that the backend's mistakes show up here:

* every call returns ``(cudaError_t, value...)`` tuples, as cuda-python does;
* device memory lives in a separate, fake address space: a device pointer is an integer that
  only this module can resolve (reading it from the host is impossible, as on a GPU);
  pinned host memory is real host memory (``cudaMallocHost`` hands out the address of a numpy
  buffer, so ``ctypes.from_address`` works on it);
* copies, memsets on a stream and kernels (``enqueue``) are *recorded* on a stream and run only
  when the stream is synchronized, so a host read before the sync sees stale data and a host
  write after an enqueue but before the sync changes what is copied, as on a GPU;
* stream capture records the work into a graph instead; ``cudaGraphLaunch`` replays it with the
  addresses bound when it was recorded; synchronizing a capturing stream is an error that
  invalidates the capture, as in CUDA;
* a copy or kernel that touches bytes outside an allocation fails at the next synchronize with
  ``cudaErrorIllegalAddress``.

Failure injection (``FakeCuda.fail``): ``end_capture`` (invalidated capture: an error and a NULL
graph), ``end_capture_null`` (success but a NULL graph), ``instantiate`` (instantiation error),
``begin_capture``. Counters (``live_graphs``, ``live_execs``, ``launches``, ...) let tests check
that nothing leaks.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np


class cudaError_t(enum.IntEnum):  # noqa: N801 - the real name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevicePointer = 17
    cudaErrorInvalidMemcpyDirection = 21
    cudaErrorNoDevice = 100
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalState = 401
    cudaErrorIllegalAddress = 700
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901
    cudaErrorStreamCaptureUnmatched = 903
    cudaErrorStreamCaptureImplicit = 906


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStreamCaptureMode(enum.IntEnum):  # noqa: N801
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class _Handle:
    """An opaque handle like cuda-python's ``cudaStream_t`` / ``cudaGraph_t``: ``int()`` works."""

    def __init__(self, kind: str, value: int) -> None:
        self.kind, self.value = kind, value

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"<{self.kind} {self.value:#x}>"


class CudaFault(Exception):
    """An error inside recorded device work; surfaces as an error code at synchronize."""

    def __init__(self, err: cudaError_t, what: str) -> None:
        super().__init__(what)
        self.err = err


@dataclass
class _Stream:
    handle: int
    pending: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    capturing: list[tuple[str, Callable[[], None]]] | None = None
    capture_broken: str | None = None
    sticky: cudaError_t | None = None


@dataclass
class _Props:
    name: bytes
    major: int
    minor: int
    totalGlobalMem: int = 80 << 30  # noqa: N815 - the real field name
    multiProcessorCount: int = 132  # noqa: N815


S = cudaError_t.cudaSuccess


class FakeCuda:
    """One simulated GPU. ``module()`` returns it as a ``cuda.bindings.runtime`` look-alike."""

    DEVICE_BASE = 0x7F00_0000_0000

    def __init__(self, *, name: str = "Simulated GPU", sm: tuple[int, int] = (8, 9)) -> None:
        self.props = _Props(name.encode(), *sm)
        self.device: dict[int, np.ndarray] = {}  # base -> bytes
        self.host: dict[int, np.ndarray] = {}  # real address -> bytes (pinned)
        self.streams: dict[int, _Stream] = {}
        self.graphs: dict[int, list[tuple[str, Callable[[], None]]]] = {}
        self.execs: dict[int, list[tuple[str, Callable[[], None]]]] = {}
        self._next_dev = self.DEVICE_BASE
        self._ids = itertools.count(0x1000)
        self.fail: set[str] = set()  # injected failures, see the module docstring
        self.launches = 0  # cudaGraphLaunch calls
        self.captures = 0  # cudaStreamBeginCapture calls
        self.executed: list[str] = []  # labels of device work, in execution order
        self.current = 0

    # ------------------------------------------------------------------ memory
    def resolve(self, ptr: int, nbytes: int) -> np.ndarray:
        """The device bytes [ptr, ptr + nbytes) as a writable view; CudaFault when out of range."""
        for base, buf in self.device.items():
            if base <= ptr < base + len(buf):
                off = ptr - base
                if off + nbytes > len(buf):
                    raise CudaFault(
                        cudaError_t.cudaErrorIllegalAddress,
                        f"{nbytes} bytes at {ptr:#x} run past an allocation of {len(buf)} bytes",
                    )
                return buf[off : off + nbytes]
        raise CudaFault(cudaError_t.cudaErrorIllegalAddress, f"{ptr:#x} is not device memory")

    def _host(self, ptr: int, nbytes: int) -> np.ndarray:
        for base, buf in self.host.items():
            if base <= ptr < base + len(buf):
                off = ptr - base
                if off + nbytes > len(buf):
                    raise CudaFault(
                        cudaError_t.cudaErrorInvalidValue,
                        f"{nbytes} bytes at host {ptr:#x} run past a pinned buffer of {len(buf)}",
                    )
                return buf[off : off + nbytes]
        raise CudaFault(
            cudaError_t.cudaErrorInvalidValue, f"host {ptr:#x} is not pinned (cudaMallocHost)"
        )

    def cudaMalloc(self, nbytes: int) -> tuple[cudaError_t, int]:
        if nbytes <= 0:
            return cudaError_t.cudaErrorInvalidValue, 0
        base = self._next_dev
        self._next_dev += (nbytes + 511) // 256 * 256  # a gap: overruns do not land in a neighbour
        self.device[base] = np.full(nbytes, 0xA5, np.uint8)  # poisoned, like uninitialized memory
        return S, base

    def cudaMallocHost(self, nbytes: int) -> tuple[cudaError_t, int]:
        buf = np.zeros(nbytes, np.uint8)
        ptr = int(buf.ctypes.data)
        self.host[ptr] = buf
        return S, ptr

    def cudaFree(self, ptr: int) -> tuple[cudaError_t]:
        return (
            (S,)
            if self.device.pop(int(ptr), None) is not None
            else (cudaError_t.cudaErrorInvalidDevicePointer,)
        )

    def cudaFreeHost(self, ptr: int) -> tuple[cudaError_t]:
        return (
            (S,)
            if self.host.pop(int(ptr), None) is not None
            else (cudaError_t.cudaErrorInvalidValue,)
        )

    def cudaMemset(self, ptr: int, value: int, nbytes: int) -> tuple[cudaError_t]:
        try:
            self.resolve(int(ptr), nbytes)[...] = value
        except CudaFault as f:
            return (f.err,)
        return (S,)

    # ------------------------------------------------------------------ streams
    def _stream(self, stream: Any) -> _Stream | None:
        return self.streams.get(int(stream))

    def record(self, stream: Any, label: str, op: Callable[[], None]) -> cudaError_t:
        """Put device work on a stream (or into its capture). Used by the fake TensorRT too."""
        st = self._stream(stream)
        if st is None:
            return cudaError_t.cudaErrorInvalidResourceHandle
        if st.capturing is not None:
            st.capturing.append((label, op))
        else:
            st.pending.append((label, op))
        return S

    def cudaStreamCreate(self) -> tuple[cudaError_t, _Handle]:
        h = next(self._ids)
        self.streams[h] = _Stream(h)
        return S, _Handle("cudaStream_t", h)

    def cudaStreamDestroy(self, stream: Any) -> tuple[cudaError_t]:
        return (
            (S,)
            if self.streams.pop(int(stream), None) is not None
            else (cudaError_t.cudaErrorInvalidResourceHandle,)
        )

    def cudaStreamSynchronize(self, stream: Any) -> tuple[cudaError_t]:
        st = self._stream(stream)
        if st is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if st.capturing is not None:  # illegal during capture; CUDA invalidates the capture
            st.capture_broken = "cudaStreamSynchronize during capture"
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        work, st.pending = st.pending, []
        for label, op in work:
            try:
                op()
            except CudaFault as f:
                st.sticky = f.err
                return (f.err,)
            self.executed.append(label)
        return (S,)

    def cudaMemcpyAsync(
        self, dst: int, src: int, nbytes: int, kind: cudaMemcpyKind, stream: Any
    ) -> tuple[cudaError_t]:
        dst, src, nbytes = int(dst), int(src), int(nbytes)
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:

            def op() -> None:
                self.resolve(dst, nbytes)[...] = self._host(src, nbytes)

        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:

            def op() -> None:
                self._host(dst, nbytes)[...] = self.resolve(src, nbytes)

        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToDevice:

            def op() -> None:
                self.resolve(dst, nbytes)[...] = self.resolve(src, nbytes)

        else:
            return (cudaError_t.cudaErrorInvalidMemcpyDirection,)
        return (self.record(stream, f"memcpy {kind.name}", op),)

    # ------------------------------------------------------------------ graphs
    def cudaStreamBeginCapture(
        self, stream: Any, mode: cudaStreamCaptureMode
    ) -> tuple[cudaError_t]:
        st = self._stream(stream)
        if st is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if "begin_capture" in self.fail:
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        if st.capturing is not None:
            return (cudaError_t.cudaErrorIllegalState,)
        self.captures += 1
        st.capturing, st.capture_broken = [], None
        return (S,)

    def cudaStreamEndCapture(self, stream: Any) -> tuple[cudaError_t, _Handle]:
        st = self._stream(stream)
        if st is None:
            return cudaError_t.cudaErrorInvalidResourceHandle, _Handle("cudaGraph_t", 0)
        if st.capturing is None:
            return cudaError_t.cudaErrorStreamCaptureUnmatched, _Handle("cudaGraph_t", 0)
        work, st.capturing = st.capturing, None
        if st.capture_broken or "end_capture" in self.fail:
            return cudaError_t.cudaErrorStreamCaptureInvalidated, _Handle("cudaGraph_t", 0)
        if "end_capture_null" in self.fail:
            return S, _Handle("cudaGraph_t", 0)
        h = next(self._ids)
        self.graphs[h] = work
        return S, _Handle("cudaGraph_t", h)

    def cudaGraphInstantiate(self, graph: Any, flags: int = 0) -> tuple[cudaError_t, _Handle]:
        work = self.graphs.get(int(graph))
        if work is None:
            return cudaError_t.cudaErrorInvalidValue, _Handle("cudaGraphExec_t", 0)
        if "instantiate" in self.fail:
            return cudaError_t.cudaErrorInvalidValue, _Handle("cudaGraphExec_t", 0)
        h = next(self._ids)
        self.execs[h] = list(work)
        return S, _Handle("cudaGraphExec_t", h)

    def cudaGraphDestroy(self, graph: Any) -> tuple[cudaError_t]:
        return (
            (S,)
            if self.graphs.pop(int(graph), None) is not None
            else (cudaError_t.cudaErrorInvalidValue,)
        )

    def cudaGraphExecDestroy(self, exec_: Any) -> tuple[cudaError_t]:
        return (
            (S,)
            if self.execs.pop(int(exec_), None) is not None
            else (cudaError_t.cudaErrorInvalidValue,)
        )

    def cudaGraphLaunch(self, exec_: Any, stream: Any) -> tuple[cudaError_t]:
        work = self.execs.get(int(exec_))
        st = self._stream(stream)
        if work is None or st is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        self.launches += 1
        st.pending.extend((f"graph: {label}", op) for label, op in work)
        return (S,)

    # ------------------------------------------------------------------ device
    def cudaGetDeviceCount(self) -> tuple[cudaError_t, int]:
        return S, 1

    def cudaGetDeviceProperties(self, index: int) -> tuple[cudaError_t, _Props | None]:
        if index != 0:
            return cudaError_t.cudaErrorInvalidValue, None
        return S, self.props

    def cudaSetDevice(self, index: int) -> tuple[cudaError_t]:
        if index != 0:
            return (cudaError_t.cudaErrorInvalidValue,)
        self.current = index
        return (S,)

    def cudaGetErrorName(self, err: Any) -> tuple[cudaError_t, bytes]:
        try:
            return S, cudaError_t(int(err)).name.encode()
        except ValueError:
            return S, b"cudaErrorUnknown"

    # ------------------------------------------------------------------ the module face
    def module(self) -> ModuleType:
        mod = ModuleType("cuda.bindings.runtime")
        mod.cudaError_t = cudaError_t
        mod.cudaMemcpyKind = cudaMemcpyKind
        mod.cudaStreamCaptureMode = cudaStreamCaptureMode
        for name in dir(self):
            if name.startswith("cuda"):
                setattr(mod, name, getattr(self, name))
        mod.fake = self  # tests reach the simulator through the module
        return mod
