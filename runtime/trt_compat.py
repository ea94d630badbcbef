"""One TensorRT compat module: picks ``tensorrt`` (10 / 11) or ``tensorrt_rtx`` in one function,
feature-detects API differences here, routes TensorRT's logger into ``logging`` (INFO -> DEBUG,
repeated warnings once), and checks engine records against this machine (stale / foreign engines).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from deltadiff._deps import require
from deltadiff.errors import EngineError, MissingDependencyError

log = logging.getLogger(__name__)

FLAVOURS = {"tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt_rtx"}
FLAVOUR_LABEL = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}
# TRT-RTX AOT targets when none are set (NVIDIA: the portable default covers Ampere .. Blackwell RTX)
RTX_DEFAULT_TARGETS = ("sm80", "sm86", "sm89", "sm120")


def import_trt(flavour: str | None = None) -> tuple[ModuleType, str]:
    """Import TensorRT. ``flavour``: 'tensorrt', 'tensorrt_rtx' or None (full TensorRT first)."""
    order = [flavour] if flavour else ["tensorrt", "tensorrt_rtx"]
    errors = []
    for name in order:
        if name not in FLAVOURS:
            raise EngineError(f"unknown TensorRT flavour {name!r}; choose tensorrt or tensorrt_rtx")
        try:
            mod = __import__(FLAVOURS[name])
            _ = mod.Builder  # placeholders on PyPI import but have no API
        except (ImportError, AttributeError, OSError) as exc:
            errors.append(f"{name}: {exc}")
            continue
        return mod, name
    raise MissingDependencyError(
        "no TensorRT found ("
        + "; ".join(errors)
        + "); install it with: pip install 'deltadiff-trt[trt]' "
        "(TensorRT-RTX) or NVIDIA's tensorrt wheels"
    )


class _Logger:
    """TensorRT ILogger -> logging; each distinct warning text is shown once."""

    def __init__(self, trt: ModuleType) -> None:
        self._seen: set[str] = set()
        base = trt.ILogger

        outer = self

        class L(base):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                base.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                outer.emit(trt, severity, msg)

        self.trt_logger = L()

    def emit(self, trt: ModuleType, severity: Any, msg: str) -> None:
        S = trt.ILogger.Severity
        if "cudaError 35" in msg or "driver version is insufficient" in msg:
            # building ahead of time on a machine without a CUDA driver (TensorRT-RTX): harmless
            if "no-driver" not in self._seen:
                self._seen.add("no-driver")
                log.info("TensorRT: no CUDA driver here; building ahead of time")
            return
        if severity in (S.INTERNAL_ERROR, S.ERROR):
            log.error("TensorRT: %s", msg)
        elif severity == S.WARNING:
            if msg not in self._seen:
                self._seen.add(msg)
                log.warning("TensorRT: %s", msg)
        else:
            log.debug("TensorRT: %s", msg)


@functools.lru_cache(maxsize=4)
def trt_logger(flavour: str) -> Any:
    trt, _ = import_trt(flavour)
    lg = _Logger(trt).trt_logger
    log.info("%s %s loaded", FLAVOUR_LABEL[flavour], trt.__version__)
    return lg


def runtime_config(
    trt: ModuleType, engine: Any, cache: Any | None
) -> tuple[Any | None, Any | None]:
    """``(IRuntimeConfig, runtime cache)`` for a new execution context; ``(None, None)`` where the
    API has no runtime config (TensorRT < 10.11).

    TensorRT-RTX compiles shape-specialised kernels just in time and, by default (LAZY), runs
    fallback kernels until they are ready, so a CUDA graph captured after one warm-up could freeze
    the fallback kernels. Here every context compiles them EAGERly (before the enqueue that first
    meets a shape returns), and all contexts of one engine share one runtime cache (``cache``, made
    by the first call and returned for the next), so what one context compiled the next reuses.
    The library's own CUDA-graph capture stays off: the backend captures the whole chain itself.
    """
    if not hasattr(engine, "create_runtime_config"):
        return None, None
    cfg = engine.create_runtime_config()
    if cfg is None:
        raise EngineError("TensorRT could not create a runtime config for an engine")
    strategy = getattr(trt, "DynamicShapesKernelSpecializationStrategy", None)
    if strategy is not None and hasattr(cfg, "dynamic_shapes_kernel_specialization_strategy"):
        cfg.dynamic_shapes_kernel_specialization_strategy = strategy.EAGER
    graphs = getattr(trt, "CudaGraphStrategy", None)
    if graphs is not None and hasattr(cfg, "cuda_graph_strategy"):
        cfg.cuda_graph_strategy = graphs.DISABLED
    if hasattr(cfg, "create_runtime_cache"):
        if cache is None:
            cache = cfg.create_runtime_cache()
        if cache is None or not cfg.set_runtime_cache(cache):
            raise EngineError("TensorRT rejected the shared runtime cache of an engine")
    return cfg, cache


def strongly_typed_flags(trt: ModuleType) -> int:
    """Network creation flags for a strongly typed network on every TensorRT version."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


# ----------------------------------------------------------------------------- GPU identity


@dataclass(frozen=True)
class Device:
    name: str
    sm: str  # e.g. "sm90"

    def label(self) -> str:
        return f"{self.name} ({self.sm})"


def cudart() -> ModuleType:
    """cuda-python's runtime API (the one place it is imported)."""
    return require("cuda.bindings.runtime", "trt")


def current_device(index: int = 0) -> Device | None:
    """The CUDA device through cuda-python, or None when there is no GPU / driver / cuda-python."""
    try:
        rt = cudart()
    except MissingDependencyError:
        return None
    try:
        err, prop = rt.cudaGetDeviceProperties(index)
    except Exception:  # noqa: BLE001 - no driver
        return None
    if int(err) != 0:
        return None
    name = (
        prop.name.decode(errors="replace").rstrip("\x00")
        if isinstance(prop.name, bytes)
        else str(prop.name)
    )
    return Device(name=name, sm=f"sm{prop.major}{prop.minor}")


def check_engine_record(
    rec: dict[str, Any],
    *,
    graph_sha256: str,
    flavour: str,
    version: str,
    device: Device | None,
    model_dir: str,
) -> None:
    """Refuse a stale or foreign engine with a one-line error that says how to rebuild."""
    fix = f"run dd-export build-engine --model {model_dir} --precision {rec.get('precision', 'fp16')} --flavour {flavour}"
    label = FLAVOUR_LABEL.get(rec.get("flavour", ""), rec.get("flavour", "?"))
    if rec.get("graph_sha256") != graph_sha256:
        raise EngineError(
            f"{rec.get('file')} was built from a different {rec.get('graph')} graph (sha256 changed); {fix}"
        )
    if rec.get("flavour") != flavour or rec.get("version") != version:
        raise EngineError(
            f"{rec.get('file')} was built by {label} {rec.get('version')}; this is "
            f"{FLAVOUR_LABEL.get(flavour, flavour)} {version}; {fix}"
        )
    if device is None:
        raise EngineError(
            f"{rec.get('file')}: no CUDA GPU is visible (TensorRT engines need one); use --backend onnxruntime"
        )
    targets = rec.get("targets") or []
    if rec.get("flavour") == "tensorrt_rtx":
        ok = device.sm in targets
    else:
        ok = rec.get("gpu", {}).get("sm") == device.sm
    if not ok:
        built_for = (
            ", ".join(targets)
            if rec.get("flavour") == "tensorrt_rtx"
            else rec.get("gpu", {}).get("sm", "?")
        )
        raise EngineError(
            f"{rec.get('file')} was built by {label} {rec.get('version')} for {built_for}; this is "
            f"{device.label()}; {fix}"
        )
