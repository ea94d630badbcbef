"""TensorRT backend: cuda-python device memory, pinned host buffers, one stream,
``set_tensor_address`` + ``execute_async_v3``; the whole encode -> four rows -> decode sequence
for a batch size is captured once as a CUDA graph and replayed.

The staged chain stays on the device: the encoder writes x / y / cond, the step engine ping-pongs
the state between two buffers with each row's ``t`` / ``coef`` (and noise) in their own device
buffers, the decoder writes the image; only the LR (+ noise) goes up and the image comes down.

Status: written against the TensorRT 10/11 and TensorRT-RTX Python APIs and cuda-python 12/13;
NOT yet run on a GPU (the development machine has none). ``benchmarks/gpu_check.py`` exercises it.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deltadiff.errors import BackendError, EngineError, MissingDependencyError
from deltadiff.runtime.backends import check_feeds
from deltadiff.runtime.manifest import Manifest, verify_file
from deltadiff.runtime.trt_compat import check_engine_record, current_device, import_trt, trt_logger

log = logging.getLogger(__name__)


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise MissingDependencyError(
                "cuda-python is not installed; pip install 'deltadiff-trt[trt]'"
            ) from None
    return cudart


def _check(res: Any, what: str) -> Any:
    """cuda-python returns (err, *values); raise on error, return the values."""
    err, *vals = res if isinstance(res, tuple) else (res,)
    if int(err) != 0:
        cudart = _cudart()
        _, name = cudart.cudaGetErrorName(err)
        raise BackendError(
            f"CUDA {what} failed: {name.decode() if isinstance(name, bytes) else name}"
        )
    if not vals:
        return None
    return vals[0] if len(vals) == 1 else tuple(vals)


@dataclass
class DeviceBuffer:
    ptr: int
    nbytes: int


class _Engine:
    """One deserialized engine + execution context, with its I/O names and dtypes."""

    def __init__(self, trt: Any, runtime: Any, path: Path) -> None:
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(
                f"TensorRT could not deserialize {path.name}; rebuild it with dd-export build-engine"
            )
        if hasattr(self.engine, "create_runtime_config"):  # TensorRT-RTX / TRT 10.11+: JIT + caches
            cfg = self.engine.create_runtime_config()
            self.context = self.engine.create_execution_context(cfg)
        else:
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"TensorRT could not create an execution context for {path.name}")
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.dtypes: dict[str, np.dtype] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            mode = self.engine.get_tensor_mode(name)
            (self.inputs if mode == trt.TensorIOMode.INPUT else self.outputs).append(name)
            self.dtypes[name] = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))

    def run(
        self, addresses: dict[str, int], shapes: dict[str, tuple[int, ...]], stream: int
    ) -> None:
        for name in self.inputs:
            if not self.context.set_input_shape(name, shapes[name]):
                raise BackendError(f"TensorRT rejected shape {shapes[name]} for input {name}")
        for name in self.inputs + self.outputs:
            if not self.context.set_tensor_address(name, addresses[name]):
                raise BackendError(f"TensorRT rejected the address of {name}")
        if not self.context.execute_async_v3(stream):
            raise BackendError("TensorRT execute_async_v3 failed (see the TensorRT errors above)")

    def output_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.context.get_tensor_shape(name))


class TrtBackend:
    name = "tensorrt"

    def __init__(
        self,
        model_dir: str | Path,
        manifest: Manifest,
        *,
        precision: str = "fp16",
        device: int = 0,
        flavour: str | None = None,
        cuda_graph: bool = True,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.m = manifest
        self.precision = precision
        self.cuda_graph = cuda_graph
        self.trt, self.flavour = import_trt(flavour or self._recorded_flavour())
        self.cudart = _cudart()
        if current_device(device) is None:
            raise EngineError(
                "no CUDA GPU is visible (or no driver); TensorRT engines need one: use --backend onnxruntime"
            )
        _check(self.cudart.cudaSetDevice(device), "cudaSetDevice")
        self.device = current_device(device)
        self.runtime = self.trt.Runtime(trt_logger(self.flavour))
        self.stream = _check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.stream_handle = int(self.stream)
        self._engines: dict[str, _Engine] = {}
        self._dev: dict[tuple[str, int], DeviceBuffer] = {}  # (tensor key, nbytes) -> buffer
        self._host: dict[tuple[str, int], tuple[int, np.ndarray]] = {}
        self._graphs: dict[tuple[str, int], Any] = {}  # (mode, batch) -> cudaGraphExec

    # ------------------------------------------------------------------ engines
    def _recorded_flavour(self) -> str | None:
        flavours = {e["flavour"] for e in self.m.engines if e.get("precision") == self.precision}
        if len(flavours) == 1:
            return flavours.pop()
        return None

    def engine(self, graph: str) -> _Engine:
        if graph in self._engines:
            return self._engines[graph]
        recs = [
            e
            for e in self.m.engines
            if e.get("graph") == graph
            and e.get("precision") == self.precision
            and e.get("flavour") == self.flavour
        ]
        fix = f"run dd-export build-engine --model {self.model_dir} --precision {self.precision}"
        if not recs:
            raise EngineError(
                f"no {self.precision} {graph} engine for {self.flavour} in {self.model_dir}; {fix}"
            )
        rec = recs[-1]
        graph_rec = self.m.graph(graph, self.precision)
        check_engine_record(
            rec,
            graph_sha256=graph_rec.sha256,
            flavour=self.flavour,
            version=str(self.trt.__version__),
            device=self.device,
            model_dir=str(self.model_dir),
        )
        path = verify_file(self.model_dir, rec["file"], rec["sha256"], what=f"engine {graph}")
        eng = _Engine(self.trt, self.runtime, path)
        self._engines[graph] = eng
        return eng

    def input_names(self, graph: str) -> list[str]:
        return [s.name for s in self.m.graph(graph, self.precision).inputs]

    # ------------------------------------------------------------------ memory
    def _device(self, key: str, nbytes: int) -> DeviceBuffer:
        buf = self._dev.get((key, nbytes))
        if buf is None:
            ptr = _check(self.cudart.cudaMalloc(max(1, nbytes)), "cudaMalloc")
            buf = DeviceBuffer(int(ptr), nbytes)
            self._dev[(key, nbytes)] = buf
        return buf

    def _pinned(self, key: str, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, np.ndarray]:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        hit = self._host.get((key, nbytes))
        if hit is None or hit[1].shape != tuple(shape) or hit[1].dtype != dtype:
            ptr = int(_check(self.cudart.cudaMallocHost(max(1, nbytes)), "cudaMallocHost"))
            raw = (ctypes.c_byte * max(1, nbytes)).from_address(ptr)
            arr = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
            hit = (ptr, arr)
            self._host[(key, nbytes)] = hit
        return hit

    def _h2d(self, dst: int, src: int, nbytes: int) -> None:
        _check(
            self.cudart.cudaMemcpyAsync(
                dst, src, nbytes, self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream
            ),
            "cudaMemcpyAsync H2D",
        )

    def _d2h(self, dst: int, src: int, nbytes: int) -> None:
        _check(
            self.cudart.cudaMemcpyAsync(
                dst, src, nbytes, self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream
            ),
            "cudaMemcpyAsync D2H",
        )

    def sync(self) -> None:
        _check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    # ------------------------------------------------------------------ one graph
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One engine call with host arrays (verification, per-stage benchmarks)."""
        rec = self.m.graph(graph, self.precision)
        feeds = {s.name: feeds[s.name] for s in rec.inputs if s.name in feeds}
        check_feeds(graph, rec.inputs, feeds)
        eng = self.engine(graph)
        addr, shapes = {}, {}
        for name in eng.inputs:
            a = np.ascontiguousarray(feeds[name], dtype=eng.dtypes[name])
            hptr, harr = self._pinned(f"{graph}:{name}", a.shape, a.dtype)
            harr[...] = a
            buf = self._device(f"{graph}:{name}", a.nbytes)
            self._h2d(buf.ptr, hptr, a.nbytes)
            addr[name], shapes[name] = buf.ptr, a.shape
        B = next(iter(feeds.values())).shape[0]
        out_shapes = {
            o.name: tuple(B if isinstance(d, str) else d for d in o.shape) for o in rec.outputs
        }
        host_out = {}
        for name in eng.outputs:
            shape = out_shapes[name]
            nbytes = int(np.prod(shape)) * eng.dtypes[name].itemsize
            addr[name] = self._device(f"{graph}:{name}", nbytes).ptr
        eng.run(addr, shapes, self.stream_handle)
        for name in eng.outputs:
            shape = out_shapes[name]
            hptr, harr = self._pinned(f"{graph}:{name}:out", shape, eng.dtypes[name])
            self._d2h(hptr, addr[name], harr.nbytes)
            host_out[name] = harr
        self.sync()
        return {k: v.copy() for k, v in host_out.items()}

    # ------------------------------------------------------------------ the whole sequence
    def _sequence(
        self, mode: str, B: int, noise_names: list[str]
    ) -> tuple[dict[str, np.ndarray], np.ndarray, Any]:
        """Enqueue the whole chain for batch B on the stream; returns (pinned inputs, pinned image, launcher)."""
        th, tw = self.m.tile
        sh, sw = self.m.state_hw()
        f32 = np.dtype(np.float32)
        state = (B, 3, sh, sw)
        cond_shape = (B, 3, th, tw) if self.m.latent else state
        img_shape = (B, 3, self.m.scale * th, self.m.scale * tw)
        pinned = {"lr": self._pinned("seq:lr", (B, 3, th, tw), f32)}
        for n in noise_names:
            pinned[n] = self._pinned(f"seq:{n}", state, f32)
        img = self._pinned("seq:image", img_shape, f32)
        dev = {k: self._device(f"seq:{k}:{B}", v[1].nbytes).ptr for k, v in pinned.items()}
        image_dev = self._device(f"seq:image:{B}", img[1].nbytes).ptr
        nb = int(np.prod(state)) * 4
        # row constants and a zero noise buffer live on the device before any capture starts
        consts = {}
        if mode == "staged":
            for r in self.m.step_table["rows"]:
                t = int(r["t"])
                consts[f"t{t}"] = self._row_const(f"t{t}", np.array([t], np.int64))
                coef = np.array([r["in_scale"], r["a"], r["b"], r["c"], r["s"]], np.float32)
                consts[f"c{t}"] = self._row_const(f"c{t}", coef)
        zeros = self._device(f"seq:zeros:{B}", nb).ptr
        _check(self.cudart.cudaMemset(zeros, 0, nb), "cudaMemset")

        def enqueue() -> None:
            for k, (hptr, harr) in pinned.items():
                self._h2d(dev[k], hptr, harr.nbytes)
            if mode == "unrolled":
                eng = self.engine("unrolled")
                addr = {"lr": dev["lr"], "image": image_dev, **{n: dev[n] for n in noise_names}}
                shapes = {"lr": (B, 3, th, tw), **{n: state for n in noise_names}}
                eng.run(addr, shapes, self.stream_handle)
            else:
                enc, step, dec = self.engine("encoder"), self.engine("step"), self.engine("decoder")
                xa, xb = self._device(f"seq:xa:{B}", nb).ptr, self._device(f"seq:xb:{B}", nb).ptr
                y = self._device(f"seq:y:{B}", nb).ptr
                cond = self._device(f"seq:cond:{B}", int(np.prod(cond_shape)) * 4).ptr
                eaddr = {"lr": dev["lr"], "x": xa, "y": y, "cond": cond}
                eshapes = {"lr": (B, 3, th, tw)}
                if "n_prior" in enc.inputs:
                    eaddr["n_prior"], eshapes["n_prior"] = dev["n_prior"], state
                enc.run(eaddr, eshapes, self.stream_handle)
                for r in self.m.step_table["rows"]:
                    t = int(r["t"])
                    addr = {
                        "x": xa,
                        "y": y,
                        "cond": cond,
                        "x_next": xb,
                        "t": consts[f"t{t}"],
                        "coef": consts[f"c{t}"],
                    }
                    shapes = {"x": state, "y": state, "cond": cond_shape, "t": (1,), "coef": (5,)}
                    if "noise" in step.inputs:
                        key = f"n_{t}"
                        addr["noise"] = dev.get(key, zeros)
                        shapes["noise"] = state
                    step.run(
                        addr,
                        {k: v for k, v in shapes.items() if k in step.inputs},
                        self.stream_handle,
                    )
                    xa, xb = xb, xa
                dec.run({"x": xa, "image": image_dev}, {"x": state}, self.stream_handle)
            self._d2h(img[0], image_dev, img[1].nbytes)

        return {k: v[1] for k, v in pinned.items()}, img[1], enqueue

    def _row_const(self, key: str, value: np.ndarray) -> int:
        buf = self._device(f"const:{key}", value.nbytes)
        hptr, harr = self._pinned(f"const:{key}", value.shape, value.dtype)
        harr[...] = value
        self._h2d(buf.ptr, hptr, value.nbytes)
        self.sync()
        return buf.ptr

    def run_sequence(self, mode: str, lr: np.ndarray, noise: dict[str, np.ndarray]) -> np.ndarray:
        """LR batch -> image batch, the whole chain on the device; CUDA-graph replay after the first call."""
        B = lr.shape[0]
        names = [n for n in self.m.noise_names if n in noise]
        inputs, image, enqueue = self._sequence(mode, B, names)
        inputs["lr"][...] = lr
        for n in names:
            inputs[n][...] = noise[n]
        key = (mode, B)
        if not self.cuda_graph:
            enqueue()
        elif key in self._graphs:
            _check(self.cudart.cudaGraphLaunch(self._graphs[key], self.stream), "cudaGraphLaunch")
        else:
            enqueue()  # warm-up: lazy init / JIT happens outside the capture
            self.sync()
            mode_g = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            _check(
                self.cudart.cudaStreamBeginCapture(self.stream, mode_g), "cudaStreamBeginCapture"
            )
            try:
                enqueue()
            finally:
                graph = _check(
                    self.cudart.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture"
                )
            gexec = _check(self.cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            self._graphs[key] = gexec
            _check(self.cudart.cudaGraphLaunch(gexec, self.stream), "cudaGraphLaunch")
        self.sync()
        return image.copy()

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        cudart = self.cudart
        for g in self._graphs.values():
            cudart.cudaGraphExecDestroy(g)
        for buf in self._dev.values():
            cudart.cudaFree(buf.ptr)
        for ptr, _ in self._host.values():
            cudart.cudaFreeHost(ptr)
        self._graphs.clear()
        self._dev.clear()
        self._host.clear()
        self._engines.clear()
        if self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __enter__(self) -> TrtBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
