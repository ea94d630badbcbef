"""One file's fault stays that file's: classify and word the exceptions a folder job meets.

``allocation_failure`` recognises running out of memory wherever it comes from: Python's
``MemoryError`` (numpy buffers), ONNX Runtime's own exception types (``RuntimeException`` /
``Fail`` from ``onnxruntime.capi.onnxruntime_pybind11_state``, which are plain ``Exception``
subclasses whose message says "bad allocation" / "Failed to allocate memory" / CUDA "out of
memory"), and the TensorRT backend's ``BackendError`` around ``cudaErrorMemoryAllocation``. The
check follows ``__cause__`` / ``__context__``, so a wrapped error is recognised too.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Lower-case fragments of the allocation-failure messages of onnxruntime (CPU and CUDA
# providers), CUDA / cuDNN / cuBLAS and TensorRT.
_ALLOC_WORDS = (
    "bad allocation",
    "bad_alloc",
    "failed to allocate",
    "out of memory",
    "cannot allocate memory",
    "cudaerrormemoryallocation",
    "cuda_error_out_of_memory",
    "alloc_failed",
)
_MAX_REASON = 300


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (whitespace collapsed, cut at 300 characters)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def allocation_failure(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is an out-of-memory failure."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, MemoryError):
            return True
        text = str(cur).lower()
        if any(w in text for w in _ALLOC_WORDS):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def unexpected_failure(src: Path | str, exc: BaseException) -> str:
    """The one-line record of an exception no layer turned into a DeltaDiffError; its traceback
    goes to the debug log (``dd-run -v``)."""
    log.debug("%s: unexpected failure", src, exc_info=exc)
    if isinstance(exc, MemoryError):
        return f"{src}: not enough memory; free memory or lower --max-memory"
    return (
        f"{src}: unexpected {type(exc).__name__}: {one_line(exc)} (the debug log has the traceback)"
    )
