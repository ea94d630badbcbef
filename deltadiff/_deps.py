"""The only place optional heavy modules are imported by name."""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from deltadiff.errors import MissingDependencyError

log = logging.getLogger(__name__)

_EXTRA_HINT = {
    "torch": "export",
    "onnx": "export",
    "onnxslim": "export",
    "onnxruntime": "",  # a base requirement: the install is broken
    "tensorrt": "trt",
    "tensorrt_rtx": "trt",
    "cuda": "trt",
    "matplotlib": "bench",
    "yaml": "export",
    "safetensors": "export",
    "pytriton": "serve",
    "tritonclient": "serve",
    "ray": "ray",
}


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` or raise MissingDependencyError naming the extra that provides it."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        hint = extra if extra is not None else _EXTRA_HINT.get(top, "dev")
        target = f"'deltadiff-trt[{hint}]'" if hint else "--force-reinstall deltadiff-trt"
        raise MissingDependencyError(
            f"{module} is not installed ({exc}); install it with: pip install {target}"
        ) from None
    return mod


def available(module: str) -> bool:
    """True if ``module`` can be imported (imports it)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
