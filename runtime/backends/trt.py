"""TensorRT backend: cuda-python device memory, pinned host buffers, one stream,
``set_tensor_address`` + ``execute_async_v3``; the whole encode -> four rows -> decode sequence
for a (mode, batch) is captured once as a CUDA graph and replayed.

The staged chain stays on the device: the encoder writes x / y / cond, the step engine ping-pongs
the state between two buffers with each row's ``t`` / ``coef`` (and noise) in their own device
buffers (uploaded once), the decoder writes the image; only the LR (+ noise) goes up and the image
comes down. Each chain owns its execution contexts, so every captured graph has fixed shapes and
addresses; all contexts of one engine share one TensorRT-RTX runtime cache and compile their
shape-specialised kernels eagerly, in the warm-up before the capture (``trt_compat.runtime_config``).
Buffers are sized from the engines' own dtypes and shapes, which must agree with the manifest.

Capture is tried once per chain. If it cannot be done (``is_stream_capturable`` false, an error
while enqueuing, an invalidated capture at ``cudaStreamEndCapture``, a failing
``cudaGraphInstantiate``) the partial graph is destroyed, a warning says why, and that chain is
enqueued normally from then on.

Status: written against the TensorRT 10/11 and TensorRT-RTX Python APIs and cuda-python 12/13;
not yet run on a GPU. ``tests/test_trt_sim.py`` runs it on a CPU simulation of cuda-python and
TensorRT (ONNX Runtime underneath); ``scripts/device_check.sh`` runs it on a GPU.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import numpy as np

from deltadiff.errors import BackendError, EngineError
from deltadiff.runtime.backends import check_feeds
from deltadiff.runtime.manifest import Manifest, verify_file
from deltadiff.runtime.steps import PRIOR_NOISE, noise_name
from deltadiff.runtime.trt_compat import (
    check_engine_record,
    cudart,
    current_device,
    import_trt,
    runtime_config,
    trt_logger,
)

log = logging.getLogger(__name__)


def _err_name(err: Any) -> str:
    _, name = cudart().cudaGetErrorName(err)
    return name.decode() if isinstance(name, bytes) else str(name)


def _check(res: Any, what: str) -> Any:
    """cuda-python returns (err, *values); raise on error, return the value(s)."""
    err, *vals = res if isinstance(res, tuple) else (res,)
    if int(err) != 0:
        raise BackendError(f"CUDA {what} failed: {_err_name(err)}")
    if not vals:
        return None
    return vals[0] if len(vals) == 1 else tuple(vals)


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


class _Memory:
    """Device and pinned host allocations of one backend, freed together."""

    def __init__(self) -> None:
        self.rt = cudart()
        self.device: list[int] = []
        self.host: list[int] = []

    def dev(self, nbytes: int) -> int:
        ptr = int(_check(self.rt.cudaMalloc(max(1, nbytes)), "cudaMalloc"))
        self.device.append(ptr)
        return ptr

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, np.ndarray]:
        n = int(np.prod(shape))
        nbytes = max(1, n * dtype.itemsize)
        ptr = int(_check(self.rt.cudaMallocHost(nbytes), "cudaMallocHost"))
        self.host.append(ptr)
        raw = (ctypes.c_byte * nbytes).from_address(ptr)
        return ptr, np.frombuffer(raw, dtype=dtype, count=n).reshape(shape)

    def free(self) -> None:
        bad = [p for p in self.device if int(self.rt.cudaFree(p)[0]) != 0]
        bad += [p for p in self.host if int(self.rt.cudaFreeHost(p)[0]) != 0]
        if bad:
            log.warning("CUDA could not free %d of the backend's buffers", len(bad))
        self.device.clear()
        self.host.clear()


class _Engine:
    """One deserialized engine; hands out execution contexts; knows its I/O names and dtypes."""

    def __init__(self, trt: Any, runtime: Any, path: Path) -> None:
        self.trt = trt
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(
                f"TensorRT could not deserialize {path.name}; rebuild it with dd-export build-engine"
            )
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.dtypes: dict[str, np.dtype] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            mode = self.engine.get_tensor_mode(name)
            (self.inputs if mode == trt.TensorIOMode.INPUT else self.outputs).append(name)
            dt = self.engine.get_tensor_dtype(name)
            try:
                self.dtypes[name] = np.dtype(trt.nptype(dt))
            except (TypeError, KeyError, ValueError):
                raise EngineError(
                    f"{path.name}: tensor {name} has type {dt}, which the runtime cannot hold; "
                    "rebuild the engine from the manifest's graphs"
                ) from None
        self.path = path
        self.runtime_cache: Any = None  # TensorRT-RTX: shared by every context of this engine
        self._configs: list[Any] = []  # keep runtime configs alive as long as their contexts

    def context(self) -> Any:
        cfg, self.runtime_cache = runtime_config(self.trt, self.engine, self.runtime_cache)
        if cfg is not None:
            self._configs.append(cfg)
            ctx = self.engine.create_execution_context(cfg)
        else:
            ctx = self.engine.create_execution_context()
        if ctx is None:
            raise EngineError(
                f"TensorRT could not create an execution context for {self.path.name}"
            )
        return ctx

    def set_shapes(
        self, ctx: Any, shapes: dict[str, tuple[int, ...]]
    ) -> dict[str, tuple[int, ...]]:
        """Set input shapes; return every output's shape as TensorRT resolves it."""
        for name in self.inputs:
            if not ctx.set_input_shape(name, shapes[name]):
                raise BackendError(
                    f"{self.path.name}: TensorRT rejected shape {shapes[name]} for input {name}"
                )
        outs = {o: tuple(int(d) for d in ctx.get_tensor_shape(o)) for o in self.outputs}
        for o, shp in outs.items():
            if any(d < 0 for d in shp):
                raise BackendError(
                    f"{self.path.name}: TensorRT left output {o} unresolved {shp} for inputs {shapes}"
                )
        return outs

    def expect(self, what: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        """Buffers sized from the manifest must be the sizes TensorRT computes."""
        for name, (engine_shape, manifest_shape) in what.items():
            if tuple(engine_shape) != tuple(manifest_shape):
                raise BackendError(
                    f"{self.path.name}: TensorRT gives {name} the shape {tuple(engine_shape)} but "
                    f"the manifest implies {tuple(manifest_shape)}; rebuild the engines from "
                    "this model directory (dd-export build-engine)"
                )

    def enqueue(self, ctx: Any, addresses: dict[str, int], stream: int) -> None:
        for name in self.inputs + self.outputs:
            if not ctx.set_tensor_address(name, addresses[name]):
                raise BackendError(f"{self.path.name}: TensorRT rejected the address of {name}")
        if not ctx.execute_async_v3(stream):
            raise BackendError(
                f"{self.path.name}: execute_async_v3 failed (see the TensorRT errors above)"
            )


def _same_dtype(pairs: list[tuple[_Engine, str, _Engine, str]]) -> None:
    """Tensors handed from one engine to another on the device must have one dtype."""
    for a, an, b, bn in pairs:
        if a.dtypes[an] != b.dtypes[bn]:
            raise BackendError(
                f"{a.path.name} writes {an} as {a.dtypes[an]} but {b.path.name} reads {bn} as "
                f"{b.dtypes[bn]}; build all engines of a model with one dd-export build-engine"
            )


class _Chain:
    """The device-resident sequence for one (mode, batch): own contexts, buffers and constants."""

    def __init__(self, be: TrtBackend, mode: str, B: int) -> None:
        m = be.m
        self.be, self.mode, self.B = be, mode, B
        mem = be.mem
        th, tw = m.tile
        sh, sw = m.state_hw()
        self.state = (B, 3, sh, sw)
        lr_shape = (B, 3, th, tw)
        out_shape = (B, 3, m.scale * th, m.scale * tw)
        self.noise_names = list(m.noise_names)
        self.launches: list[tuple[_Engine, Any, dict[str, int]]] = []
        if mode == "unrolled":
            eng = be.engine("unrolled")
            ctx = eng.context()
            in_shapes = {"lr": lr_shape, **{n: self.state for n in self.noise_names}}
            outs = eng.set_shapes(ctx, in_shapes)
            eng.expect({"image": (outs["image"], out_shape)})
            self._inputs({n: (in_shapes[n], eng.dtypes[n]) for n in in_shapes})
            img = mem.dev(_nbytes(outs["image"], eng.dtypes["image"]))
            self.launches.append((eng, ctx, {**self.dev_in, "image": img}))
            last = eng
        else:
            first = m.resolve(f"step@{m.step_table.rows[0].t}", be.precision, be._target())
            enc, step, dec = be.engine("encoder"), be.engine(first), be.engine("decoder")
            ectx, sctx, dctx = enc.context(), step.context(), dec.context()
            e_in = {
                "lr": lr_shape,
                **({PRIOR_NOISE: self.state} if PRIOR_NOISE in enc.inputs else {}),
            }
            e_out = enc.set_shapes(ectx, e_in)
            enc.expect({"x": (e_out["x"], self.state)})
            noisy = "noise" in step.inputs
            hand_over = [(enc, k, step, k) for k in ("x", "y", "cond")]
            hand_over += [(step, "x_next", step, "x"), (step, "x_next", dec, "x")]
            _same_dtype(hand_over)
            host = {k: (s, enc.dtypes[k]) for k, s in e_in.items()}
            for n in self.noise_names:
                if n != PRIOR_NOISE:
                    host[n] = (self.state, step.dtypes["noise"])
            self._inputs(host)
            buf = {k: mem.dev(_nbytes(s, enc.dtypes[k])) for k, s in e_out.items()}
            x_b = mem.dev(_nbytes(e_out["x"], step.dtypes["x"]))  # ping-pong partner of buf["x"]
            self.launches.append((enc, ectx, {**{k: self.dev_in[k] for k in e_in}, **buf}))
            s_in = {
                "x": e_out["x"],
                "y": e_out["y"],
                "cond": e_out["cond"],
                "t": (1,),
                "coef": (5,),
            }
            zeros = None
            if noisy:
                s_in["noise"] = self.state
                zbytes = _nbytes(self.state, step.dtypes["noise"])
                zeros = mem.dev(zbytes)
                _check(be.rt.cudaMemset(zeros, 0, zbytes), "cudaMemset")
            s_out = step.set_shapes(sctx, s_in)
            step.expect({"x_next": (s_out["x_next"], e_out["x"])})
            xa, xb = buf["x"], x_b
            row_ctx = {first: (step, sctx)}
            for r in m.step_table.rows:
                t = r.t
                name = m.resolve(f"step@{t}", be.precision, be._target())  # INT8: per-row graphs
                if name not in row_ctx:
                    eng_r = be.engine(name)
                    ctx_r = eng_r.context()
                    eng_r.set_shapes(ctx_r, s_in)
                    row_ctx[name] = (eng_r, ctx_r)
                step, sctx = row_ctx[name]
                addr = {
                    "x": xa,
                    "y": buf["y"],
                    "cond": buf["cond"],
                    "x_next": xb,
                    "t": be.const(r.t_input().astype(step.dtypes["t"])),
                    "coef": be.const(r.coef().astype(step.dtypes["coef"])),
                }
                if noisy:
                    addr["noise"] = self.dev_in.get(noise_name(t), zeros)
                self.launches.append((step, sctx, addr))
                xa, xb = xb, xa
            d_out = dec.set_shapes(dctx, {"x": e_out["x"]})
            dec.expect({"image": (d_out["image"], out_shape)})
            img = mem.dev(_nbytes(d_out["image"], dec.dtypes["image"]))
            self.launches.append((dec, dctx, {"x": xa, "image": img}))
            last = dec
        self.image_dev = img
        self.host_out = mem.pinned(out_shape, last.dtypes["image"])
        self.graph_exec: Any = None
        self.graph_state = "untried"  # -> "captured" | "eager" (one attempt per chain)

    def _inputs(self, spec: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        """Pinned host + device buffers of the chain's inputs, in the consuming engine's dtype."""
        self.host_in = {k: self.be.mem.pinned(s, dt) for k, (s, dt) in spec.items()}
        self.dev_in = {k: self.be.mem.dev(a.nbytes) for k, (_, a) in self.host_in.items()}

    def enqueue(self) -> None:
        be = self.be
        for k, (hptr, arr) in self.host_in.items():
            be.copy(self.dev_in[k], hptr, arr.nbytes, to_device=True)
        for eng, ctx, addr in self.launches:
            eng.enqueue(ctx, addr, be.stream_handle)
        be.copy(self.host_out[0], self.image_dev, self.host_out[1].nbytes, to_device=False)

    def _no_graph(self, why: str) -> None:
        self.graph_state = "eager"
        log.warning(
            "CUDA graph capture of the %s batch-%d chain failed (%s); running it without a "
            "CUDA graph",
            self.mode,
            self.B,
            why,
        )

    def capture(self) -> None:
        """Warm up (lazy init and TensorRT-RTX's kernel compilation happen outside the capture),
        then capture the chain once. Any failure leaves the chain eager, for good."""
        be, rt = self.be, self.be.rt
        self.enqueue()
        be.sync()
        self.graph_state = "eager"
        for eng, ctx, _ in self.launches:
            if hasattr(ctx, "is_stream_capturable") and not ctx.is_stream_capturable(
                be.stream_handle
            ):
                return self._no_graph(f"TensorRT says {eng.path.name} cannot be stream-captured")
        err = rt.cudaStreamBeginCapture(
            be.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        )[0]
        if int(err) != 0:
            return self._no_graph(f"cudaStreamBeginCapture: {_err_name(err)}")
        failure = None
        try:
            self.enqueue()
        except Exception as exc:  # noqa: BLE001 - any refusal while capturing: run eagerly
            failure = f"enqueue during capture: {exc}"
        err, graph = rt.cudaStreamEndCapture(be.stream)  # always end it, even after a failure
        if failure is None and int(err) != 0:
            failure = f"cudaStreamEndCapture: {_err_name(err)}"
        if failure is None and (graph is None or int(graph) == 0):
            failure = "cudaStreamEndCapture returned no graph (capture invalidated)"
        if failure is not None:
            if graph is not None and int(graph) != 0:
                rt.cudaGraphDestroy(graph)
            return self._no_graph(failure)
        err, graph_exec = rt.cudaGraphInstantiate(graph, 0)
        destroyed = rt.cudaGraphDestroy(graph)[0]  # the executable graph does not need it
        if int(err) != 0 or graph_exec is None or int(graph_exec) == 0:
            return self._no_graph(f"cudaGraphInstantiate: {_err_name(err)}")
        if int(destroyed) != 0:
            log.warning("cudaGraphDestroy failed: %s", _err_name(destroyed))
        self.graph_exec = graph_exec
        self.graph_state = "captured"
        return None

    def run(self, lr: np.ndarray, noise: dict[str, np.ndarray]) -> np.ndarray:
        be = self.be
        self.host_in["lr"][1][...] = lr
        for n in self.noise_names:
            self.host_in[n][1][...] = noise[n]
        if self.graph_state == "untried" and be.cuda_graph:
            self.capture()
        if self.graph_exec is not None:
            _check(be.rt.cudaGraphLaunch(self.graph_exec, be.stream), "cudaGraphLaunch")
        else:
            self.enqueue()
        be.sync()
        return self.host_out[1].astype(np.float32, copy=True)

    def close(self) -> None:
        if self.graph_exec is not None:
            self.be.rt.cudaGraphExecDestroy(self.graph_exec)
            self.graph_exec = None


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
        self.rt = cudart()
        self.device = current_device(device)
        if self.device is None:
            raise EngineError(
                "no CUDA GPU is visible (or no driver); TensorRT engines need one: use --backend onnxruntime"
            )
        self.trt, self.flavour = import_trt(flavour or self._recorded_flavour())
        _check(self.rt.cudaSetDevice(device), "cudaSetDevice")
        self.runtime = self.trt.Runtime(trt_logger(self.flavour))
        self.stream = _check(self.rt.cudaStreamCreate(), "cudaStreamCreate")
        self.stream_handle = int(self.stream)
        self.mem = _Memory()
        self._engines: dict[str, _Engine] = {}
        self._contexts: dict[str, Any] = {}
        self._chains: dict[tuple[str, int], _Chain] = {}
        self._consts: dict[bytes, int] = {}
        self._single: dict[tuple[str, str, tuple[int, ...]], tuple[int, np.ndarray, int]] = {}

    # ------------------------------------------------------------------ engines
    def _recorded_flavour(self) -> str | None:
        flavours = {e["flavour"] for e in self.m.engines if e.get("precision") == self.precision}
        return flavours.pop() if len(flavours) == 1 else None

    def _target(self) -> str | None:
        return "tensorrt" if self.precision == "int8" else None

    def engine(self, graph: str) -> _Engine:
        graph = self.m.resolve(graph, self.precision, self._target())
        if graph in self._engines:
            return self._engines[graph]
        recs = [
            e
            for e in self.m.engines
            if e.get("graph") == graph
            and e.get("precision") == self.precision
            and e.get("flavour") == self.flavour
        ]
        if not recs:
            raise EngineError(
                f"no {self.precision} {graph} engine for {self.flavour} in {self.model_dir}; "
                f"run dd-export build-engine --model {self.model_dir} --precision {self.precision}"
            )
        rec = recs[-1]
        check_engine_record(
            rec,
            graph_sha256=self.m.graph(graph, self.precision, self._target()).sha256,
            flavour=self.flavour,
            version=str(self.trt.__version__),
            device=self.device,
            model_dir=str(self.model_dir),
        )
        eng = _Engine(
            self.trt,
            self.runtime,
            verify_file(self.model_dir, rec["file"], rec["sha256"], what=f"engine {graph}"),
        )
        self._engines[graph] = eng
        return eng

    def input_names(self, graph: str) -> list[str]:
        return [s.name for s in self.m.graph(graph, self.precision, self._target()).inputs]

    # ------------------------------------------------------------------ memory helpers
    def copy(self, dst: int, src: int, nbytes: int, *, to_device: bool) -> None:
        kind = (
            self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            if to_device
            else self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        )
        _check(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream), "cudaMemcpyAsync")

    def sync(self) -> None:
        _check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def const(self, value: np.ndarray) -> int:
        """A device copy of a small constant, uploaded once (outside any capture)."""
        key = value.dtype.str.encode() + value.tobytes()
        if key not in self._consts:
            ptr = self.mem.dev(value.nbytes)
            hptr, harr = self.mem.pinned(value.shape, value.dtype)
            harr[...] = value
            self.copy(ptr, hptr, value.nbytes, to_device=True)
            self.sync()
            self._consts[key] = ptr
        return self._consts[key]

    # ------------------------------------------------------------------ one graph call
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One engine call with host arrays (verification, per-stage benchmarks)."""
        graph = self.m.resolve(graph, self.precision, self._target())
        rec = self.m.graph(graph, self.precision, self._target())
        feeds = {s.name: feeds[s.name] for s in rec.inputs if s.name in feeds}
        check_feeds(graph, rec.inputs, feeds)
        eng = self.engine(graph)
        if graph not in self._contexts:  # one context per graph for single calls, reused
            self._contexts[graph] = eng.context()
        ctx = self._contexts[graph]
        shapes = {n: tuple(feeds[n].shape) for n in eng.inputs}
        out_shapes = eng.set_shapes(ctx, shapes)
        addr: dict[str, int] = {}
        for name in eng.inputs:
            a = np.ascontiguousarray(feeds[name], dtype=eng.dtypes[name])
            hptr, harr, dptr = self._buffer(graph, name, a.shape, a.dtype)
            harr[...] = a
            self.copy(dptr, hptr, a.nbytes, to_device=True)
            addr[name] = dptr
        outs = {}
        for name in eng.outputs:
            outs[name] = self._buffer(graph, name, out_shapes[name], eng.dtypes[name])
            addr[name] = outs[name][2]
        eng.enqueue(ctx, addr, self.stream_handle)
        for _name, (hptr, harr, dptr) in outs.items():
            self.copy(hptr, dptr, harr.nbytes, to_device=False)
        self.sync()
        return {
            k: v[1].astype(np.float32) if v[1].dtype == np.float16 else v[1].copy()
            for k, v in outs.items()
        }

    def _buffer(
        self, graph: str, name: str, shape: tuple[int, ...], dtype: np.dtype
    ) -> tuple[int, np.ndarray, int]:
        key = (graph, name, tuple(shape))
        if key not in self._single:
            hptr, harr = self.mem.pinned(tuple(shape), np.dtype(dtype))
            self._single[key] = (hptr, harr, self.mem.dev(harr.nbytes))
        return self._single[key]

    # ------------------------------------------------------------------ the whole sequence
    def run_sequence(self, mode: str, lr: np.ndarray, noise: dict[str, np.ndarray]) -> np.ndarray:
        """LR batch -> image batch, the chain on the device; a CUDA-graph replay after the first call."""
        B = lr.shape[0]
        lo, hi = self.m.batch
        if not lo <= B <= hi:
            raise BackendError(f"batch {B} is outside the engines' range [{lo}, {hi}]")
        th, tw = self.m.tile
        if lr.shape != (B, 3, th, tw) or lr.dtype != np.float32:
            raise BackendError(
                f"LR batch has shape {lr.shape} {lr.dtype}, expected ({B}, 3, {th}, {tw}) float32"
            )
        for n in self.m.noise_names:
            if n not in noise or noise[n].shape != (B, 3, *self.m.state_hw()):
                raise BackendError(
                    f"noise input {n} missing or mis-shaped (expected {(B, 3, *self.m.state_hw())})"
                )
        key = (mode, B)
        if key not in self._chains:
            self._chains[key] = _Chain(self, mode, B)
        return self._chains[key].run(lr, noise)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        for c in self._chains.values():
            c.close()
        self._chains.clear()
        self._contexts.clear()
        self._engines.clear()
        self.mem.free()
        self._consts.clear()
        self._single.clear()
        if self.stream is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None

    def __enter__(self) -> TrtBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
