"""TensorRT backend: cuda-python device memory, pinned host buffers, one stream,
``set_tensor_address`` + ``execute_async_v3``; the whole encode -> four rows -> decode sequence
for a (mode, batch, optimization profile) runs on the device as one chain, captured as a CUDA
graph per LR size and replayed.

Dynamic shapes: any LR size inside one of the engines' optimization profiles runs. The profile
is chosen per call from the engine (``get_tensor_profile_shape``: the one that holds the size,
the smallest maximum if several do); each chain's contexts are put on their engine's profile
(``set_optimization_profile_async``) once, its buffers are sized for the profile's maximum, and
``set_input_shape`` runs whenever the LR size changes. CUDA graphs are keyed by LR size: a size
is captured on its second call in a row (the first is its warm-up), replayed after that, and a
size seen once (a whole image) runs eagerly (``_Chain``).

The staged chain stays on the device: the encoder writes x / y / cond, the step engine ping-pongs
the state between two buffers with each row's ``t`` / ``coef`` (and noise) in their own device
buffers (uploaded once), the decoder writes the image; only the LR (+ noise) goes up and the image
comes down. Each chain owns its execution contexts, so every captured graph has fixed shapes and
addresses; all contexts of one engine share one TensorRT-RTX runtime cache and compile their
shape-specialised kernels eagerly, in the warm-up before the capture (``trt_compat.runtime_config``).
Buffers are sized from the engines' own dtypes and shapes, which must agree with the manifest.

Capture is given up for a chain at its first failure. If it cannot be done
(``is_stream_capturable`` false, an error while enqueuing, an invalidated capture at
``cudaStreamEndCapture``, a failing ``cudaGraphInstantiate``) the partial graph is destroyed, a
warning says why, and that chain is enqueued normally from then on.

Status: written against the TensorRT 10/11 and TensorRT-RTX Python APIs and cuda-python 12/13;
not yet run on a GPU. ``tests/test_trt_sim.py`` and ``tests/test_trt_dynamic_sim.py`` (profiles,
sizes) run it on a CPU simulation of cuda-python and TensorRT (ONNX Runtime underneath);
``tools/device_check.sh`` runs it on a GPU.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import numpy as np

from deltadiff.errors import BackendError, EngineError
from deltadiff.manifest import Manifest, verify_file
from deltadiff.runtime.backends import check_feeds
from deltadiff.runtime.trt_compat import (
    check_engine_record,
    cudart,
    current_device,
    import_trt,
    runtime_config,
    trt_logger,
)
from deltadiff.steps import PRIOR_NOISE, noise_name

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

    # ------------------------------------------------------------------ optimization profiles
    @property
    def num_profiles(self) -> int:
        return int(getattr(self.engine, "num_optimization_profiles", 1))

    def profile_range(self, name: str, index: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(min, max) shape of input ``name`` under profile ``index``, from the engine itself."""
        mn, _opt, mx = self.engine.get_tensor_profile_shape(name, index)
        return tuple(int(d) for d in mn), tuple(int(d) for d in mx)

    def dynamic(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The inputs among ``shapes`` that the engine leaves open (-1 axes): what profiles set."""
        return {
            n: shp
            for n, shp in shapes.items()
            if any(int(d) < 0 for d in self.engine.get_tensor_shape(n))
        }

    def holds(self, index: int, shapes: dict[str, tuple[int, ...]]) -> bool:
        for name, shp in self.dynamic(shapes).items():
            mn, mx = self.profile_range(name, index)
            if len(mn) != len(shp) or not all(
                a <= s <= b for a, s, b in zip(mn, shp, mx, strict=True)
            ):
                return False
        return True

    def pick_profile(self, *shape_sets: dict[str, tuple[int, ...]]) -> int:
        """The profile that holds every given set of input shapes (the smallest maximum if
        several do: its buffers are the smallest); a one-line error if none does."""
        fits = [i for i in range(self.num_profiles) if all(self.holds(i, s) for s in shape_sets)]
        names = list(self.dynamic(shape_sets[0]))
        if not fits:
            name = names[0]
            ranges = ", ".join(
                "{}..{}".format(*self.profile_range(name, i)) for i in range(self.num_profiles)
            )
            raise BackendError(
                f"{self.path.name}: no optimization profile holds {name} "
                f"{' / '.join(str(s[name]) for s in shape_sets)} (profiles: {ranges}); choose "
                "a size inside one or rebuild with dd-export build-engine --profile MIN:OPT:MAX"
            )

        def volume(i: int) -> int:
            return sum(int(np.prod(self.profile_range(n, i)[1])) for n in names)

        return min(fits, key=lambda i: (volume(i), i))

    def context(self, profile: int = 0, stream: int = 0) -> Any:
        """A new execution context on optimization profile ``profile``."""
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
        multi = profile != 0 or self.num_profiles > 1
        if multi and not ctx.set_optimization_profile_async(profile, stream):
            raise BackendError(
                f"{self.path.name}: TensorRT rejected optimization profile {profile}"
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


LrBox = tuple[tuple[int, int], tuple[int, int]]  # (min, max) LR (h, w) of one profile


class _Chain:
    """The device-resident sequence for one (mode, batch, optimization profile): own contexts,
    each on the profile of its engine that holds the chain's whole LR range; buffers sized for
    the range's maximum (a smaller size uses the front of each buffer, so every address stays
    fixed); constants uploaded once.

    Shapes: each call sets the input shapes of every context when the LR size differs from the
    last call's. CUDA graphs are captured per LR size: a size's first call runs eagerly and is
    its warm-up (TensorRT-RTX compiles that shape's kernels, TensorRT's first enqueue after a
    shape change happens outside any capture); a second call in a row of the same size captures
    it, and later calls of a captured size replay its graph (a graph holds the shapes it was
    captured with, whatever the contexts were set to since). At most ``MAX_GRAPHS`` sizes are
    captured per chain; further sizes run eagerly. So a folder of differently sized whole images
    runs eagerly (no capture that would not pay off) and the tiles of a large image are replayed.
    """

    MAX_GRAPHS = 8

    def __init__(self, be: TrtBackend, mode: str, B: int, profile: int, box: LrBox) -> None:
        m = be.m
        self.be, self.mode, self.B, self.profile, self.box = be, mode, B, profile, box
        mem, stream = be.mem, be.stream_handle
        lo, hi = box
        self.noise_names = list(m.noise_names)
        # (engine, context, addresses, input shapes for an LR size)
        self.launches: list[tuple[_Engine, Any, dict[str, int], Any]] = []
        if mode == "unrolled":
            eng = be.engine("unrolled")
            ctx = eng.context(profile, stream)

            def u_in(hw: tuple[int, int]) -> dict[str, tuple[int, ...]]:
                return {"lr": self.lr_shape(hw), **{n: self.state(hw) for n in self.noise_names}}

            outs = eng.set_shapes(ctx, u_in(hi))
            eng.expect({"image": (outs["image"], self.out_shape(hi))})
            self._inputs({n: (shp, eng.dtypes[n]) for n, shp in u_in(hi).items()})
            img = mem.dev(_nbytes(outs["image"], eng.dtypes["image"]))
            self.launches.append((eng, ctx, {**self.dev_in, "image": img}, u_in))
            last = eng
        else:
            first = m.resolve(f"step@{m.step_table.rows[0].t}", be.precision, be._target())
            enc, step, dec = be.engine("encoder"), be.engine(first), be.engine("decoder")
            ectx = enc.context(profile, stream)
            prior = PRIOR_NOISE in enc.inputs

            def e_in(hw: tuple[int, int]) -> dict[str, tuple[int, ...]]:
                return {"lr": self.lr_shape(hw), **({PRIOR_NOISE: self.state(hw)} if prior else {})}

            e_lo = enc.set_shapes(ectx, e_in(lo))
            e_out = enc.set_shapes(ectx, e_in(hi))
            enc.expect({"x": (e_lo["x"], self.state(lo))})
            enc.expect({"x": (e_out["x"], self.state(hi))})
            enc_shapes = {lo: e_lo, hi: e_out}
            noisy = "noise" in step.inputs
            hand_over = [(enc, k, step, k) for k in ("x", "y", "cond")]
            hand_over += [(step, "x_next", step, "x"), (step, "x_next", dec, "x")]
            _same_dtype(hand_over)
            host = {k: (shp, enc.dtypes[k]) for k, shp in e_in(hi).items()}
            for n in self.noise_names:
                if n != PRIOR_NOISE:
                    host[n] = (self.state(hi), step.dtypes["noise"])
            self._inputs(host)
            buf = {k: mem.dev(_nbytes(shp, enc.dtypes[k])) for k, shp in e_out.items()}
            x_b = mem.dev(_nbytes(e_out["x"], step.dtypes["x"]))  # ping-pong partner of buf["x"]

            def enc_out(hw: tuple[int, int]) -> dict[str, tuple[int, ...]]:
                if hw not in enc_shapes:
                    enc_shapes[hw] = enc.set_shapes(ectx, e_in(hw))
                return enc_shapes[hw]

            def s_in(hw: tuple[int, int]) -> dict[str, tuple[int, ...]]:
                e = enc_out(hw)
                shp = {"x": e["x"], "y": e["y"], "cond": e["cond"], "t": (1,), "coef": (5,)}
                return {**shp, "noise": self.state(hw)} if noisy else shp

            def d_in(hw: tuple[int, int]) -> dict[str, tuple[int, ...]]:
                return {"x": enc_out(hw)["x"]}

            self.launches.append(
                (enc, ectx, {**{k: self.dev_in[k] for k in e_in(hi)}, **buf}, e_in)
            )
            zeros = None
            if noisy:
                zbytes = _nbytes(self.state(hi), step.dtypes["noise"])
                zeros = mem.dev(zbytes)
                _check(be.rt.cudaMemset(zeros, 0, zbytes), "cudaMemset")
            xa, xb = buf["x"], x_b
            row_ctx: dict[str, tuple[_Engine, Any]] = {}
            for r in m.step_table.rows:
                name = m.resolve(f"step@{r.t}", be.precision, be._target())  # INT8: per row
                if name not in row_ctx:
                    eng_r = be.engine(name)
                    ctx_r = eng_r.context(eng_r.pick_profile(s_in(lo), s_in(hi)), stream)
                    s_out = eng_r.set_shapes(ctx_r, s_in(hi))
                    eng_r.expect({"x_next": (s_out["x_next"], e_out["x"])})
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
                    addr["noise"] = self.dev_in.get(noise_name(r.t), zeros)
                self.launches.append((step, sctx, addr, s_in))
                xa, xb = xb, xa
            dctx = dec.context(dec.pick_profile(d_in(lo), d_in(hi)), stream)
            d_out = dec.set_shapes(dctx, d_in(hi))
            dec.expect({"image": (d_out["image"], self.out_shape(hi))})
            img = mem.dev(_nbytes(d_out["image"], dec.dtypes["image"]))
            self.launches.append((dec, dctx, {"x": xa, "image": img}, d_in))
            last = dec
        be.sync()  # profile switches may have enqueued copies on the stream
        self.image_dev = img
        self.host_out = mem.pinned(self.out_shape(hi), last.dtypes["image"])
        self.current: tuple[int, int] | None = None  # LR size the contexts' shapes are set to
        self.graphs: dict[tuple[int, int], Any] = {}  # LR size -> executable CUDA graph
        self.graph_state = "untried"  # -> "captured" (some size) | "eager" (capture failed)

    # ------------------------------------------------------------------ shapes
    def lr_shape(self, hw: tuple[int, int]) -> tuple[int, ...]:
        return (self.B, 3, *hw)

    def state(self, hw: tuple[int, int]) -> tuple[int, ...]:
        return (self.B, 3, *self.be.m.state_hw(hw))

    def out_shape(self, hw: tuple[int, int]) -> tuple[int, ...]:
        s = self.be.m.scale
        return (self.B, 3, s * hw[0], s * hw[1])

    def _inputs(self, spec: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        """Pinned host + device buffers of the chain's inputs (at the range's maximum), in the
        consuming engine's dtype."""
        self.host_in = {k: self.be.mem.pinned(s, dt) for k, (s, dt) in spec.items()}
        self.dev_in = {k: self.be.mem.dev(a.nbytes) for k, (_, a) in self.host_in.items()}

    def _view(self, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The front of a maximum-size buffer as a contiguous array of ``shape``."""
        return arr.reshape(-1)[: int(np.prod(shape))].reshape(shape)

    def _in_shapes(self, hw: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        shp = {"lr": self.lr_shape(hw)}
        return {**shp, **{n: self.state(hw) for n in self.noise_names}}

    def _set_shapes(self, hw: tuple[int, int]) -> None:
        """Set every context's input shapes for LR size ``hw`` (outside any capture)."""
        if self.current == hw:
            return
        self.current = None
        for eng, ctx, _addr, shapes in self.launches:
            outs = eng.set_shapes(ctx, shapes(hw))
            if "image" in outs:
                eng.expect({"image": (outs["image"], self.out_shape(hw))})
        self.current = hw

    def enqueue(self, hw: tuple[int, int]) -> None:
        be = self.be
        shapes = self._in_shapes(hw)
        for k, (hptr, arr) in self.host_in.items():
            nbytes = int(np.prod(shapes[k])) * arr.dtype.itemsize
            be.copy(self.dev_in[k], hptr, nbytes, to_device=True)
        for eng, ctx, addr, _shapes in self.launches:
            eng.enqueue(ctx, addr, be.stream_handle)
        nbytes = int(np.prod(self.out_shape(hw))) * self.host_out[1].dtype.itemsize
        be.copy(self.host_out[0], self.image_dev, nbytes, to_device=False)

    def _no_graph(self, why: str) -> None:
        self.graph_state = "eager"
        log.warning(
            "CUDA graph capture of the %s batch-%d chain failed (%s); running it without a "
            "CUDA graph",
            self.mode,
            self.B,
            why,
        )

    def capture(self, hw: tuple[int, int]) -> Any:
        """Capture the chain at LR size ``hw`` (the contexts' current shapes, warmed up by the
        previous call). Any failure leaves the chain eager, for good; returns the graph or None."""
        be, rt = self.be, self.be.rt
        for eng, ctx, _, _ in self.launches:
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
            self.enqueue(hw)
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
        self.graphs[hw] = graph_exec
        self.graph_state = "captured"
        return graph_exec

    def run(self, lr: np.ndarray, noise: dict[str, np.ndarray]) -> np.ndarray:
        be = self.be
        hw = (int(lr.shape[2]), int(lr.shape[3]))
        shapes = self._in_shapes(hw)
        self._view(self.host_in["lr"][1], shapes["lr"])[...] = lr
        for n in self.noise_names:
            self._view(self.host_in[n][1], shapes[n])[...] = noise[n]
        graph = self.graphs.get(hw)
        if (
            graph is None
            and be.cuda_graph
            and self.graph_state != "eager"
            and self.current == hw  # the previous call ran this size: its warm-up
            and len(self.graphs) < self.MAX_GRAPHS
        ):
            graph = self.capture(hw)
        if graph is not None:
            _check(be.rt.cudaGraphLaunch(graph, be.stream), "cudaGraphLaunch")
        else:
            self._set_shapes(hw)
            self.enqueue(hw)
        be.sync()
        return self._view(self.host_out[1], self.out_shape(hw)).astype(np.float32, copy=True)

    def close(self) -> None:
        for graph_exec in self.graphs.values():
            self.be.rt.cudaGraphExecDestroy(graph_exec)
        self.graphs.clear()


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
        self._contexts: dict[tuple[str, int], Any] = {}
        self._chains: dict[tuple[str, int, int], _Chain] = {}  # (mode, batch, profile)
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
            verify_file(
                self.model_dir,
                rec["file"],
                str(rec.get("sha256", "")),
                what=f"engine {graph}",
                hint=f"rebuild it with dd-export build-engine --model {self.model_dir}",
            ),
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
        shapes = {n: tuple(feeds[n].shape) for n in eng.inputs}
        profile = eng.pick_profile(shapes)
        if (graph, profile) not in self._contexts:  # one context per graph and profile, reused
            self._contexts[(graph, profile)] = eng.context(profile, self.stream_handle)
        ctx = self._contexts[(graph, profile)]
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
        """LR batch -> image batch, the chain on the device; any LR size inside one of the
        engines' optimization profiles (a static export: its tile). The chain of the profile
        that holds the size runs it (see ``_Chain`` for buffers and CUDA graphs)."""
        B = lr.shape[0]
        lo, hi = self.m.batch
        if not lo <= B <= hi:
            raise BackendError(f"batch {B} is outside the engines' range [{lo}, {hi}]")
        if lr.ndim != 4 or lr.shape[1] != 3 or lr.dtype != np.float32:
            raise BackendError(
                f"LR batch has shape {lr.shape} {lr.dtype}, expected (B, 3, h, w) float32"
            )
        h, w = int(lr.shape[2]), int(lr.shape[3])
        if not self.m.accepts(h, w):
            raise BackendError(
                f"LR {w}x{h} (WxH) is outside the model's shapes ({self.m.lr_range_text()}); "
                "pad or tile it (the upscaler does)"
            )
        state = (B, 3, *self.m.state_hw((h, w)))
        for n in self.m.noise_names:
            if n not in noise or noise[n].shape != state:
                raise BackendError(f"noise input {n} missing or mis-shaped (expected {state})")
        first = self.engine("unrolled" if mode == "unrolled" else "encoder")
        profile = first.pick_profile({"lr": (B, 3, h, w)})
        key = (mode, B, profile)
        if key not in self._chains:
            mn, mx = first.profile_range("lr", profile)
            self._chains[key] = _Chain(self, mode, B, profile, ((mn[2], mn[3]), (mx[2], mx[3])))
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
