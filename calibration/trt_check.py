"""Does TensorRT-RTX build a Q/DQ graph? If not, which quantized nodes make it fail?

TensorRT-RTX builds ahead of time on a CPU machine, so the TensorRT target's graphs are
checked at calibration time. ModelOpt's placement of this network trips a Myelin CHECK
(an internal assertion of TensorRT's builder); ours (Q/DQ on Conv / MatMul inputs only, float
biases, Gemm unquantized) has built for every graph tried, but if a build fails the quantized
node set is bisected down to the nodes whose Q/DQ the builder rejects, and those stay FP32 for
this target.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def rtx_available() -> bool:
    return importlib.util.find_spec("tensorrt_rtx") is not None


def rtx_builds(blob: bytes, inputs: tuple[Any, ...], m: Any = None) -> bool:
    """True if TensorRT-RTX parses and builds the serialized ONNX graph (batch 1, sm86; a
    dynamic-shape model ``m`` is built for its optimum tile, so no symbolic size is left 0)."""
    from deltadiff.errors import EngineError
    from deltadiff.export.engine import EngineOptions, build_engine

    with tempfile.TemporaryDirectory(prefix="dd-rtx-") as tmp:
        p = Path(tmp) / "graph.onnx"
        p.write_bytes(blob)
        try:
            build_engine(
                p,
                inputs=inputs,
                opts=EngineOptions(precision="int8", flavour="tensorrt_rtx", targets=("sm86",)),
                batch=(1, 1, 1),
                flavour="tensorrt_rtx",
                **(
                    {"profiles": [(m.tile, m.tile, m.tile)], "multiple": m.lr_multiple}
                    if m is not None and m.dynamic
                    else {}
                ),
            )
        except (EngineError, RuntimeError) as exc:
            log.info("TensorRT-RTX rejects the graph: %s", str(exc).splitlines()[0][:160])
            return False
    return True


def culprits(nodes: list[str], builds: Callable[[list[str]], bool]) -> list[str]:
    """Nodes whose quantization makes ``builds`` fail: halve the set while one half alone
    fails; nodes that fail alone are culprits (delta debugging, single-node granularity)."""
    if not nodes or builds(nodes):
        return []
    if len(nodes) == 1:
        return list(nodes)
    mid = len(nodes) // 2
    bad = culprits(nodes[:mid], builds) + culprits(nodes[mid:], builds)
    if not bad:  # only the combination fails: keep the second half FP32
        return list(nodes[mid:])
    rest = [n for n in nodes if n not in bad]
    return bad + culprits(rest, builds)
