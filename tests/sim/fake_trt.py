"""A CPU stand-in for the TensorRT-RTX Python API (the subset ``export/engine.py`` and
``runtime/backends/trt.py`` call), backed by ONNX Runtime sessions of the same graphs.

* The builder "serializes" a plan that holds the ONNX bytes and every optimization profile;
  ``set_compute_capability`` returns False for targets listed in ``FakeTrt.reject_targets``.
* An engine reports its I/O tensors from the ONNX graph (names, modes, dtypes, shapes with -1
  for dynamic axes) and its profiles (``num_optimization_profiles``,
  ``get_tensor_profile_shape(name, index)`` -> [min, opt, max]); ``io_dtypes`` makes it report
  other dtypes (e.g. FP16 I/O), and the engine then converts at its boundary as a real FP16-I/O
  engine would.
* A context starts on profile 0; ``set_optimization_profile_async(index, stream)`` switches it
  (False for an index out of range) and, as TensorRT documents, drops the input shapes set so
  far. ``set_input_shape`` returns False for a shape outside the active profile. Output shapes
  are resolved from the exporter's dim labels (``16*h`` from an input's ``4*h``), as TensorRT's
  shape inference would.
* ``execute_async_v3`` records a kernel on the fake CUDA stream with the tensor addresses and
  shapes bound *at enqueue time*; when the stream runs it, it reads its inputs from fake device
  memory, runs ONNX Runtime and writes its outputs back (bounds-checked).
* Kernel specialisation is modelled as TensorRT-RTX documents it: for a new shape a context
  with the LAZY strategy (the default) runs a fallback kernel while the specialised one compiles;
  EAGER compiles before it enqueues; NONE never specialises. Compiled kernels live in a runtime
  cache (per context unless one is shared through ``IRuntimeConfig.set_runtime_cache``).
  ``fallback_captured`` counts fallback kernels frozen into a CUDA graph; ``jit_compiles``
  counts compilations.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .fake_cuda import FakeCuda

MAGIC = b"DDSIM-PLAN-1\n"
_SESSIONS: dict[tuple[str, int], Any] = {}  # (sha256 of the ONNX bytes, threads) -> session
VERSION = "1.7.1.116-sim"


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    BF16 = 7
    INT64 = 8


_NP = {
    DataType.FLOAT: np.float32,
    DataType.HALF: np.float16,
    DataType.INT8: np.int8,
    DataType.INT32: np.int32,
    DataType.BOOL: np.bool_,
    DataType.UINT8: np.uint8,
    DataType.INT64: np.int64,
}
_FROM_ONNX = {
    onnx.TensorProto.FLOAT: DataType.FLOAT,
    onnx.TensorProto.FLOAT16: DataType.HALF,
    onnx.TensorProto.INT64: DataType.INT64,
    onnx.TensorProto.INT32: DataType.INT32,
    onnx.TensorProto.BOOL: DataType.BOOL,
}


def nptype(dt: DataType) -> type:
    return _NP[DataType(dt)]


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ComputeCapability(enum.IntEnum):
    NONE = 0
    CURRENT = 1
    SM75 = 75
    SM80 = 80
    SM86 = 86
    SM89 = 89
    SM120 = 120
    SM121 = 121


class DynamicShapesKernelSpecializationStrategy(enum.IntEnum):
    LAZY = 0
    EAGER = 1
    NONE = 2


class CudaGraphStrategy(enum.IntEnum):
    DISABLED = 0
    WHOLE_GRAPH_CAPTURE = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class BuilderFlag(enum.IntEnum):
    TF32 = 7
    REQUIRE_USER_ALLOCATION = 26


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        pass

    def log(self, severity: Any, msg: str) -> None:  # pragma: no cover - overridden
        pass


class FakeTrt:
    """The simulated library. ``module()`` returns it as a ``tensorrt_rtx`` look-alike."""

    def __init__(self, cuda: FakeCuda, *, threads: int = 1) -> None:
        self.cuda = cuda
        self.threads = threads
        self.reject_targets: set[str] = set()  # set_compute_capability returns False for these
        self.capturable = True  # IExecutionContext.is_stream_capturable
        self.io_dtypes: dict[str, DataType] = {}  # engines report these I/O dtypes instead
        self.fail_execute: set[str] = set()  # tensor names whose engine's execute_async_v3 fails
        self.jit_compiles = 0
        self.fallback_captured = 0  # fallback kernels frozen into a captured graph
        self.fallback_launches = 0
        self.compiling: set[tuple[Any, ...]] = set()  # LAZY compilations in the background
        self.contexts: list[_Context] = []
        self.configs: list[_RuntimeConfig] = []
        self._ids = itertools.count(1)

    def module(self) -> ModuleType:
        mod = ModuleType("tensorrt_rtx")
        sim = self
        mod.__version__ = VERSION
        for obj in (
            DataType,
            TensorIOMode,
            ComputeCapability,
            DynamicShapesKernelSpecializationStrategy,
            CudaGraphStrategy,
            MemoryPoolType,
            BuilderFlag,
            NetworkDefinitionCreationFlag,
            ILogger,
        ):
            setattr(mod, obj.__name__, obj)
        mod.nptype = nptype

        class Builder:
            def __init__(self, logger: Any) -> None:
                self.logger = logger

            def create_network(self, flags: int = 0) -> _Network:
                return _Network(flags)

            def create_builder_config(self) -> _BuilderConfig:
                return _BuilderConfig(sim)

            def create_optimization_profile(self) -> _Profile:
                return _Profile()

            def build_serialized_network(self, network: _Network, config: _BuilderConfig) -> Any:
                if network.onnx is None or not config.profiles:
                    return None
                header = {
                    "profiles": [p.shapes for p in config.profiles],
                    "targets": [c.name for c in config.cc if c is not None],
                }
                return MAGIC + json.dumps(header).encode() + b"\n" + network.onnx

        class OnnxParser:
            def __init__(self, network: _Network, logger: Any) -> None:
                self.network = network
                self.num_errors = 0

            def parse_from_file(self, path: str) -> bool:
                data = Path(path).read_bytes()
                model = onnx.load_model_from_string(data)
                self.network.onnx = data
                self.network.inputs = [i.name for i in model.graph.input]
                return True

        class Runtime:
            def __init__(self, logger: Any) -> None:
                self.logger = logger

            def deserialize_cuda_engine(self, plan: bytes) -> _Engine | None:
                if not bytes(plan).startswith(MAGIC):
                    return None
                return _Engine(sim, bytes(plan))

        mod.Builder, mod.OnnxParser, mod.Runtime = Builder, OnnxParser, Runtime
        mod.fake = sim
        return mod


def _label(d: str) -> tuple[int, str]:
    """A dim label of the exporter: ``16*h`` -> (16, "h"); ``batch`` -> (1, "batch")."""
    k, sep, base = d.partition("*")
    return (int(k), base) if sep and k.isdigit() else (1, d)


class _Input:
    def __init__(self, name: str) -> None:
        self.name = name


class _Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.onnx: bytes | None = None
        self.inputs: list[str] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> _Input:
        return _Input(self.inputs[i])


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, list[list[int]]] = {}

    def set_shape(self, name: str, mn: Any, opt: Any, mx: Any) -> None:
        self.shapes[name] = [list(mn), list(opt), list(mx)]


class _BuilderConfig:
    def __init__(self, sim: FakeTrt) -> None:
        self.sim = sim
        self.builder_optimization_level = 3
        self.flags: set[int] = {BuilderFlag.TF32}
        self.cc: list[ComputeCapability | None] = []
        self.profiles: list[_Profile] = []

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.workspace = size

    def set_flag(self, flag: Any) -> None:
        self.flags.add(int(flag))

    def clear_flag(self, flag: Any) -> None:
        self.flags.discard(int(flag))

    @property
    def num_compute_capabilities(self) -> int:
        return len(self.cc)

    @num_compute_capabilities.setter
    def num_compute_capabilities(self, n: int) -> None:
        self.cc = [None] * n

    def set_compute_capability(self, cc: ComputeCapability, index: int) -> bool:
        if not 0 <= index < len(self.cc) or cc.name.lower() in self.sim.reject_targets:
            return False
        if cc == ComputeCapability.CURRENT and (index != 0 or len(self.cc) != 1):
            return False  # TensorRT-RTX: CURRENT only as the one and only target
        self.cc[index] = cc
        return True

    def add_optimization_profile(self, profile: _Profile) -> int:
        if not profile.shapes:
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1


class _RuntimeCache:
    def __init__(self) -> None:
        self.kernels: set[tuple[Any, ...]] = set()


class _RuntimeConfig:
    def __init__(self, sim: FakeTrt) -> None:
        self.dynamic_shapes_kernel_specialization_strategy = (
            DynamicShapesKernelSpecializationStrategy.LAZY
        )
        self.cuda_graph_strategy = CudaGraphStrategy.DISABLED
        self.cache: _RuntimeCache | None = None
        sim.configs.append(self)

    def create_runtime_cache(self) -> _RuntimeCache:
        return _RuntimeCache()

    def set_runtime_cache(self, cache: _RuntimeCache) -> bool:
        if not isinstance(cache, _RuntimeCache):
            return False
        self.cache = cache
        return True

    def get_runtime_cache(self) -> _RuntimeCache | None:
        return self.cache


class _Engine:
    def __init__(self, sim: FakeTrt, plan: bytes) -> None:
        self.sim = sim
        self.id = next(sim._ids)
        head, _, body = plan[len(MAGIC) :].partition(b"\n")
        self.header = json.loads(head)
        self.model = onnx.load_model_from_string(body)
        key = (hashlib.sha256(body).hexdigest(), sim.threads)
        if key not in _SESSIONS:  # sessions are stateless between runs: share them across tests
            so = ort.SessionOptions()  # as OrtBackend(threads=1) makes them
            so.log_severity_level = 3
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.intra_op_num_threads = sim.threads
            so.inter_op_num_threads = 1
            _SESSIONS[key] = ort.InferenceSession(body, so, providers=["CPUExecutionProvider"])
        self.session = _SESSIONS[key]
        g = self.model.graph
        self.io: dict[str, tuple[TensorIOMode, DataType, list[int | str]]] = {}
        for mode, vis in ((TensorIOMode.INPUT, g.input), (TensorIOMode.OUTPUT, g.output)):
            for v in vis:
                tt = v.type.tensor_type
                dims = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
                self.io[v.name] = (mode, _FROM_ONNX[tt.elem_type], dims)
        self.names = list(self.io)
        self.onnx_dtypes = {n: nptype(t) for n, (_, t, _) in self.io.items()}

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.io[name][0] if name in self.io else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.sim.io_dtypes.get(name, self.io[name][1])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(-1 if isinstance(d, str) else d for d in self.io[name][2])

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.header["profiles"])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        if self.get_tensor_mode(name) != TensorIOMode.INPUT:
            raise ValueError(f"{name} is not an input tensor")
        if not 0 <= int(profile_index) < self.num_optimization_profiles:
            raise ValueError(f"profile index {profile_index} is out of range")
        prof = self.header["profiles"][int(profile_index)].get(name)
        if prof is None:  # a static input: min = opt = max = its shape
            return [self.get_tensor_shape(name)] * 3
        return [tuple(d) for d in prof]

    def create_runtime_config(self) -> _RuntimeConfig:
        return _RuntimeConfig(self.sim)

    def create_execution_context(self, config: _RuntimeConfig | None = None) -> _Context:
        ctx = _Context(self, config or _RuntimeConfig(self.sim))
        self.sim.contexts.append(ctx)
        return ctx


class _Context:
    def __init__(self, engine: _Engine, config: _RuntimeConfig) -> None:
        self.engine = engine
        self.config = config
        self.cache = config.cache or _RuntimeCache()  # no shared cache: one of its own
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.profile = 0
        self.profile_switches = 0

    @property
    def active_optimization_profile(self) -> int:
        return self.profile

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        if not 0 <= int(profile_index) < self.engine.num_optimization_profiles:
            return False
        self.profile = int(profile_index)
        self.profile_switches += 1
        self.shapes.clear()  # input shapes must be set again for the new profile
        return True

    def set_input_shape(self, name: str, shape: Any) -> bool:
        e = self.engine
        if e.get_tensor_mode(name) != TensorIOMode.INPUT:
            return False
        shape = tuple(int(s) for s in shape)
        dims = e.io[name][2]
        prof = e.header["profiles"][self.profile].get(name)
        if len(shape) != len(dims):
            return False
        for i, (d, s) in enumerate(zip(dims, shape, strict=True)):
            if isinstance(d, int) and d != s:
                return False
            if isinstance(d, str) and prof and not prof[0][i] <= s <= prof[2][i]:
                return False
        self.shapes[name] = shape
        return True

    def _symbols(self) -> dict[str, int]:
        """Dim labels -> sizes from the input shapes set (``4*h`` = 40 gives ``h`` = 10)."""
        sym: dict[str, int] = {}
        for name, shape in self.shapes.items():
            for d, s in zip(self.engine.io[name][2], shape, strict=True):
                if isinstance(d, str):
                    sym[d] = s
                    k, base = _label(d)
                    if s % k == 0:
                        sym.setdefault(base, s // k)
        return sym

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        sym = self._symbols()

        def size(d: int | str) -> int:
            if isinstance(d, int):
                return d
            if d in sym:
                return sym[d]
            k, base = _label(d)
            return k * sym[base] if base in sym else -1

        return tuple(size(d) for d in self.engine.io[name][2])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if name not in self.engine.io or int(ptr) == 0:
            return False
        self.addresses[name] = int(ptr)
        return True

    def is_stream_capturable(self, stream: int) -> bool:
        return self.engine.sim.capturable

    def _kernel(self, key: tuple[Any, ...]) -> bool:
        """True if a specialised kernel runs for this shape key (the JIT model)."""
        sim = self.engine.sim
        strategy = self.config.dynamic_shapes_kernel_specialization_strategy
        if key in self.cache.kernels:
            return True
        if strategy == DynamicShapesKernelSpecializationStrategy.EAGER:
            sim.jit_compiles += 1
            self.cache.kernels.add(key)
            return True
        if strategy == DynamicShapesKernelSpecializationStrategy.LAZY and key not in sim.compiling:
            sim.jit_compiles += 1  # starts in the background; far slower than one inference,
            sim.compiling.add(key)  # so it is still running when the chain is captured
        return False

    def execute_async_v3(self, stream: int) -> bool:
        e, sim = self.engine, self.engine.sim
        inputs = [n for n in e.names if e.io[n][0] == TensorIOMode.INPUT]
        if any(n not in self.shapes for n in inputs) or any(
            n not in self.addresses for n in e.names
        ):
            return False
        if sim.fail_execute & set(e.names):
            return False
        shapes = {n: self.get_tensor_shape(n) for n in e.names}
        if any(d < 0 for s in shapes.values() for d in s):
            return False
        addr = dict(self.addresses)  # bound now, as TensorRT reads them at enqueue
        key = (e.id, tuple(sorted(shapes.items())))
        specialised = self._kernel(key)
        st = sim.cuda.streams.get(int(stream))
        if not specialised:
            sim.fallback_launches += 1
            if st is not None and st.capturing is not None:
                sim.fallback_captured += 1
        dtypes = {n: nptype(e.get_tensor_dtype(n)) for n in e.names}

        def op() -> None:
            feeds = {}
            for n in inputs:
                nbytes = int(np.prod(shapes[n])) * np.dtype(dtypes[n]).itemsize
                raw = sim.cuda.resolve(addr[n], nbytes)
                a = np.frombuffer(raw.tobytes(), dtype=dtypes[n]).reshape(shapes[n])
                feeds[n] = a.astype(e.onnx_dtypes[n], copy=False)
            outs = e.session.run(None, feeds)
            for o, a in zip(e.session.get_outputs(), outs, strict=True):
                a = np.ascontiguousarray(a, dtype=dtypes[o.name])
                if a.shape != shapes[o.name]:
                    raise AssertionError(f"{o.name}: ran {a.shape}, promised {shapes[o.name]}")
                sim.cuda.resolve(addr[o.name], a.nbytes)[...] = a.view(np.uint8).reshape(-1)

        label = (
            f"engine {e.id} ({', '.join(n for n in e.names if e.io[n][0] == TensorIOMode.OUTPUT)})"
        )
        return int(sim.cuda.record(stream, label, op)) == 0
