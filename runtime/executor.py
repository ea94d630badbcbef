"""The unrolled executor: encode -> the four rows of the step table -> decode, on any backend.

    staged    encoder, step x4 (row constants fed as inputs), decoder: four graph calls + two
    unrolled  one graph with the rows baked in

Both read the same step table from the manifest; neither re-derives a coefficient.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from deltadiff.errors import BackendError
from deltadiff.manifest import Manifest
from deltadiff.options import DEFAULT_MODE, Backend, Mode, Precision, parse
from deltadiff.runtime.backends import RuntimeBackend

StageHook = Callable[[str, float], None]  # (stage name, seconds)


class Executor:
    def __init__(
        self, manifest: Manifest, backend: RuntimeBackend, *, mode: Mode | str = DEFAULT_MODE
    ) -> None:
        self.m = manifest
        self.backend = backend
        self.mode = parse(Mode, mode, "execution mode")
        self.rows = manifest.step_table.rows

    def run(
        self,
        lr: np.ndarray,
        noise: dict[str, np.ndarray] | None = None,
        *,
        on_stage: StageHook | None = None,
        trace: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """LR batch (B,3,h,w) float32 in [0,1] -> SR (B,3,4h,4w) float32 in [0,1].

        ``noise``: arrays named by the manifest (``n_prior``, ``n_t``) for noisy tables.
        ``trace``: if a dict is given, stage outputs are stored in it (verification).
        """
        noise = noise or {}
        missing = [n for n in self.m.noise_names if n not in noise]
        if missing:
            raise BackendError(f"family {self.m.family} needs noise inputs {missing}; pass a seed")
        seq = getattr(self.backend, "run_sequence", None)
        if seq is not None and trace is None and on_stage is None:
            return seq(self.mode, lr, noise)  # device-resident chain (TensorRT, CUDA graph)
        if self.mode is Mode.UNROLLED:
            t0 = time.perf_counter()
            img = self.backend.run("unrolled", {"lr": lr, **noise})["image"]
            if on_stage:
                on_stage("unrolled", time.perf_counter() - t0)
            return img
        t0 = time.perf_counter()
        enc = self.backend.run("encoder", {"lr": lr, **noise})
        if on_stage:
            on_stage("encode", time.perf_counter() - t0)
        x, y, cond = enc["x"], enc["y"], enc["cond"]
        if trace is not None:
            trace.update(x_T=x, y=y, cond=cond)
        # "step@t" names row t's own graph where the precision has one per row (INT8), else "step"
        prec = getattr(self.backend, "precision", Precision.FP32)
        target = "tensorrt" if getattr(self.backend, "name", "") == Backend.TENSORRT else None
        names = {r.t: self.m.resolve(f"step@{r.t}", prec, target) for r in self.rows}
        step_inputs = set(self.backend.input_names(names[self.rows[0].t]))
        for r in self.rows:
            feeds = {"x": x, "y": y, "cond": cond, "t": r.t_input(), "coef": r.coef()}
            if "noise" in step_inputs:
                feeds["noise"] = noise[r.noise] if r.noise in noise else np.zeros_like(x)
            t0 = time.perf_counter()
            x = self.backend.run(names[r.t], feeds)["x_next"]
            if on_stage:
                on_stage(r.stage, time.perf_counter() - t0)
            if trace is not None:
                trace[f"x_{r.t - 1}"] = x
        t0 = time.perf_counter()
        img = self.backend.run("decoder", {"x": x})["image"]
        if on_stage:
            on_stage("decode", time.perf_counter() - t0)
        return img
