"""Runners: one per backend family. ``open()`` is timed as load, ``run()`` returns the SR batch.

``RuntimeRunner`` drives the lean runtime's backends through the Executor; ``TorchRunner`` the PyTorch
reference, eager, stage by stage."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from deltadiff._deps import require
from deltadiff.benchmarks.cases import CaseSpec
from deltadiff.benchmarks.context import ModelContext
from deltadiff.benchmarks.options import MODE_GRAPHS, CaseUnavailableError, WrapBackend
from deltadiff.errors import MissingDependencyError
from deltadiff.options import RUNTIME_BACKENDS, Backend, Precision
from deltadiff.runtime.backends import RuntimeBackend, open_backend
from deltadiff.runtime.executor import Executor
from deltadiff.steps import StepRow

# ---------------------------------------------------------------------------------------------
# runners: one per backend family; open() is timed as "load", run() returns the SR batch


class RuntimeRunner:
    """onnxruntime / onnxruntime-cuda / tensorrt through the runtime's backends + Executor."""

    def __init__(
        self, ctx: ModelContext, spec: CaseSpec, threads: int, wrap: WrapBackend | None
    ) -> None:
        self.ctx, self.spec, self.threads, self.wrap = ctx, spec, threads, wrap
        self.backend: RuntimeBackend | None = None
        self.device = "cpu" if spec.backend is Backend.ONNXRUNTIME else "cuda"

    def open(self) -> None:
        m, spec = self.ctx.m, self.spec
        lo, hi = m.batch
        if not lo <= spec.batch <= hi:
            raise CaseUnavailableError(
                f"batch {spec.batch} is outside the model's batch range [{lo}, {hi}]; "
                f"re-export with dd-export onnx --max-batch {spec.batch}"
            )
        target = "tensorrt" if spec.backend is Backend.TENSORRT else "onnxruntime"
        if spec.precision is Precision.INT8 and m.int8_status(target):
            raise CaseUnavailableError(str(m.int8_status(target)))
        graphs = [  # the step as one name per row: INT8 has a graph per row
            x
            for g in MODE_GRAPHS[spec.mode]
            for x in ([f"step@{r.t}" for r in m.step_table.rows] if g == "step" else [g])
        ]
        for g in graphs:
            m.graph(g, spec.precision)  # ManifestError: no such graph (e.g. fp16 not exported)
        if spec.backend is Backend.ONNXRUNTIME_CUDA:
            ort = require("onnxruntime")
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise CaseUnavailableError(
                    "onnxruntime has no CUDAExecutionProvider here (needs onnxruntime-gpu and a CUDA GPU)"
                )
        # a DeltaDiffError from here on (no GPU, no engine, ...) becomes a skip in _measure
        if spec.backend in RUNTIME_BACKENDS:
            be = open_backend(
                spec.backend, self.ctx.dir, m, precision=spec.precision, threads=self.threads
            )
        else:  # a runtime whose open_backend has no onnxruntime-cuda: the CUDA EP directly
            from deltadiff.runtime.backends.ort import OrtBackend

            be = OrtBackend(
                self.ctx.dir,
                m,
                precision=spec.precision,
                threads=self.threads,
                providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
            )
        self.backend = be
        # load what the first run would load lazily, so "load" and "first run" separate cleanly
        for g in graphs:
            for attr in ("session", "engine"):  # OrtBackend.session / TrtBackend.engine
                fn = getattr(be, attr, None)
                if callable(fn):
                    fn(g)
                    break
        if spec.backend is Backend.ONNXRUNTIME_CUDA:
            sess = be.session(MODE_GRAPHS[spec.mode][0])  # type: ignore[attr-defined]
            if sess.get_providers()[0] != "CUDAExecutionProvider":
                raise CaseUnavailableError(
                    "onnxruntime fell back to the CPU provider (CUDA EP failed to start)"
                )
        self.backend = self.wrap(be) if self.wrap is not None else be
        self.executor = Executor(m, self.backend, mode=spec.mode)

    def run(
        self,
        lr: np.ndarray,
        noise: dict[str, np.ndarray],
        on_stage: Callable[[str, float], None] | None,
    ) -> np.ndarray:
        return self.executor.run(lr, noise, on_stage=on_stage)

    def chain(self) -> Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray] | None:
        """The device-resident end-to-end path (TensorRT's CUDA graph), if the backend has one."""
        if getattr(self.backend, "run_sequence", None) is None:
            return None
        return lambda lr, noise: self.executor.run(lr, noise)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()


class TorchRunner:
    """The PyTorch reference pipeline, eager, stage by stage under ``torch.no_grad()``."""

    def __init__(self, ctx: ModelContext, spec: CaseSpec, threads: int) -> None:
        self.ctx, self.spec, self.threads = ctx, spec, threads
        self._old_threads: int | None = None
        self.device: str | None = None
        self.torch: Any = None

    def open(self) -> None:
        try:
            torch = require("torch", "export")
        except MissingDependencyError as exc:
            raise CaseUnavailableError(f"torch is not installed ({exc})") from None
        self.torch = torch
        cuda = bool(torch.cuda.is_available())
        self.autocast = self.spec.backend is Backend.TORCH_AUTOCAST
        if self.autocast and not cuda:
            raise CaseUnavailableError(
                "torch-autocast (fp16) needs CUDA; torch sees no CUDA device here"
            )
        self.device = "cuda" if cuda else "cpu"
        self._old_threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        pipe = self.ctx.pipeline()
        self.pipe = copy.deepcopy(pipe).to(self.device) if cuda else pipe

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def run(
        self,
        lr: np.ndarray,
        noise: dict[str, np.ndarray],
        on_stage: Callable[[str, float], None] | None,
    ) -> np.ndarray:
        torch, pipe, dev = self.torch, self.pipe, self.device

        def done(stage: str, t0: float) -> float:
            self._sync()
            t1 = time.perf_counter()
            if on_stage is not None:
                on_stage(stage, t1 - t0)
            return t1

        amp = (
            torch.autocast("cuda", dtype=torch.float16)
            if self.autocast
            else contextlib.nullcontext()
        )
        # host <-> device copies count in encode / decode, as the runtime backends' I/O does
        with torch.no_grad(), amp:
            t0 = time.perf_counter()
            lr_t = torch.from_numpy(lr).to(dev)
            tn = {k: torch.from_numpy(v).to(dev) for k, v in noise.items()}
            y, cond = pipe.encode(lr_t)
            t0 = done("encode", t0)

            def row_done(r: StepRow, _x0: Any, _x_next: Any) -> None:
                nonlocal t0
                t0 = done(r.stage, t0)

            x = pipe.run_steps(y, cond, tn, hook=row_done)
            img = pipe.decode(x).float().cpu().numpy()
            done("decode", t0)
        return img

    def chain(self) -> None:
        return None

    def close(self) -> None:
        if self._old_threads is not None:
            self.torch.set_num_threads(self._old_threads)
        if self.device == "cuda" and hasattr(self, "pipe"):
            del self.pipe
            self.torch.cuda.empty_cache()
