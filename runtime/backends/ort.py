"""ONNX Runtime backend (CPU by default; CUDA EP when asked and available)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from deltadiff._deps import require
from deltadiff.errors import BackendError
from deltadiff.manifest import Manifest, verify_graph
from deltadiff.runtime.backends import check_feeds

log = logging.getLogger(__name__)
_logged = False
_env_arena: bool | None = None  # None: not tried yet in this process


def shared_cpu_arena(ort: Any) -> bool:
    """Register one CPU arena for the whole process (once) that every session built here uses.

    Each ONNX Runtime session otherwise grows its own arena and keeps it: a staged INT8 model
    has one step graph per row, so four arenas of full-size activations were alive at once (demo
    at 512x512: 3.7 GiB peak RSS instead of 1.2, and each row's first run page-faulted fresh
    memory). Sessions run one at a time in the staged executor, so one arena serves them all.
    Returns False, and sessions keep their own arenas, when ``DELTADIFF_ORT_ARENA=session`` is set
    (the A/B switch measured in docs/results/2026-11-30-epyc-int8-default.md) or this onnxruntime
    build cannot register one.
    """
    global _env_arena
    if _env_arena is None:
        mode = os.environ.get("DELTADIFF_ORT_ARENA", "shared")
        if mode not in ("shared", "session"):
            raise BackendError(
                f"DELTADIFF_ORT_ARENA={mode!r}: use 'shared' (the default) or 'session'"
            )
        if mode == "session":
            _env_arena = False
            return False
        try:
            info = ort.OrtMemoryInfo(
                "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
            )
            ort.create_and_register_allocator(info, None)
            _env_arena = True
        except Exception as exc:  # an older or stripped build: per-session arenas, as before
            log.info("onnxruntime: no shared CPU arena (%s)", str(exc).strip().split("\n")[0])
            _env_arena = False
    return _env_arena


class OrtBackend:
    name = "onnxruntime"

    def __init__(
        self,
        model_dir: str | Path,
        manifest: Manifest,
        *,
        precision: str = "fp32",
        threads: int = 0,
        providers: list[str] | None = None,
        device: int = 0,
    ) -> None:
        global _logged
        self.ort = require("onnxruntime")
        if not _logged:
            log.info(
                "onnxruntime %s (%s)",
                self.ort.__version__,
                ", ".join(self.ort.get_available_providers()),
            )
            _logged = True
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self.precision = precision
        self.threads = threads
        if providers == ["cuda"]:
            if "CUDAExecutionProvider" not in self.ort.get_available_providers():
                raise BackendError(
                    "onnxruntime has no CUDAExecutionProvider here; install onnxruntime-gpu and use a CUDA GPU"
                )
            providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
        self.providers = providers or ["CPUExecutionProvider"]
        self._sessions: dict[str, Any] = {}

    def session(self, graph: str) -> Any:
        rec = self.manifest.graph(graph, self.precision)
        s = self._sessions.get(rec.file)  # per-row names share a file when there is one graph
        if s is None:
            so = self.ort.SessionOptions()
            so.log_severity_level = 3
            so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # ORT's memory pattern plans one block per input shape: it doubled the peak of a demo
            # step at 512x512 (1964 vs 1024 MiB RSS) for no speed (1.00x, interleaved A/B), and a
            # dynamic-shape model would keep one plan per image size seen.
            so.enable_mem_pattern = False
            if shared_cpu_arena(self.ort):
                so.add_session_config_entry("session.use_env_allocators", "1")
            if self.threads:
                so.intra_op_num_threads = self.threads
                so.inter_op_num_threads = 1
            # Checked here, once per graph actually loaded (not at manifest load): inside the
            # model directory (symlinks resolved), sha256, external data; ORT opens the real path.
            path = verify_graph(self.model_dir, rec, what=f"graph {rec.file}")
            try:
                s = self.ort.InferenceSession(str(path), so, providers=self.providers)
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise BackendError(f"onnxruntime cannot load {path.name}: {first}") from None
            self._sessions[rec.file] = s
        return s

    def input_names(self, graph: str) -> list[str]:
        return [s.name for s in self.manifest.graph(graph, self.precision).inputs]

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rec = self.manifest.graph(graph, self.precision)
        feeds = {s.name: feeds[s.name] for s in rec.inputs if s.name in feeds}
        check_feeds(graph, rec.inputs, feeds)
        sess = self.session(graph)
        outs = sess.run(None, feeds)
        return {o.name: a for o, a in zip(sess.get_outputs(), outs, strict=True)}

    def close(self) -> None:
        self._sessions.clear()

    def __enter__(self) -> OrtBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
