"""Per-model context: manifest, MACs, seeded inputs, the torch reference output (computed once)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from deltadiff._deps import require
from deltadiff.benchmarks.cases import CaseSpec
from deltadiff.benchmarks.options import EAGER, GRAPH_ORDER, MODE_GRAPHS, BenchOptions
from deltadiff.compare import compare
from deltadiff.errors import DeltaDiffError, MissingDependencyError
from deltadiff.manifest import Manifest, load_manifest
from deltadiff.noise import noise_field
from deltadiff.options import Mode, Precision

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# per-model context: manifest, MACs, inputs, the torch reference


def lr_size(m: Manifest, lr: tuple[int, int] | None, model_dir: Path) -> tuple[int, int]:
    """The LR (h, w) the harness feeds ``m``: ``--lr`` if the graphs accept it, else the tile."""
    if lr is None or tuple(lr) == tuple(m.tile):
        return tuple(m.tile)  # type: ignore[return-value]
    h, w = lr
    if not m.dynamic:
        raise DeltaDiffError(
            f"--lr {h}x{w}: {model_dir} is a static export ({m.tile[0]}x{m.tile[1]} tiles); "
            "re-export with dd-export onnx --dynamic or leave --lr out"
        )
    if not m.accepts(h, w):
        raise DeltaDiffError(
            f"--lr {h}x{w}: {model_dir} accepts {m.lr_range_text()}; choose a size in that range"
        )
    return (h, w)


class ModelContext:
    def __init__(self, model_dir: Path, opts: BenchOptions, key: str) -> None:
        self.dir = model_dir
        self.m: Manifest = load_manifest(model_dir)
        self.opts = opts
        self.key = key
        h, w = self.hw = lr_size(self.m, opts.lr, model_dir)
        self.out_hw = (self.m.scale * h, self.m.scale * w)
        self.steps = len(self.m.step_table.rows)
        self.step_stages = [r.stage for r in self.m.step_table.rows]
        bmax = max(opts.batches)
        rng = np.random.default_rng(opts.seed)
        self.lr = rng.random((bmax, 3, h, w), dtype=np.float32)
        sh, sw = self.m.state_hw(self.hw)
        self.noise = noise_field(self.m.noise_names, (bmax, 3, sh, sw), opts.seed + 1)
        self._pipe: Any = None
        self.build_s: float | None = None
        self.ref: np.ndarray | None = None
        self.ref_info: dict[str, Any] = {"status": "not computed", "reason": "--no-reference"}
        self.macs: Any = None  # flops.GraphMacs
        self.macs_info: dict[str, Any] = {"status": "not counted", "reason": None, "graphs": []}
        self._count_macs()

    def inputs(self, batch: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        lr = np.ascontiguousarray(self.lr[:batch])
        return lr, {k: np.ascontiguousarray(v[:batch]) for k, v in self.noise.items()}

    def stages(self, mode: str) -> list[str]:
        return ["unrolled"] if mode == "unrolled" else ["encode", *self.step_stages, "decode"]

    # MACs ------------------------------------------------------------------------------------
    def _count_macs(self) -> None:
        """MACs are counted lazily per (graph, batch) by ``case_macs``; this checks onnx is here."""
        from deltadiff.export.flops import GraphMacs

        try:
            require("onnx", "export")
        except MissingDependencyError as exc:
            self.macs = None
            self.macs_info = {
                "status": "skipped",
                "reason": f"MAC counts need onnx: {exc}",
                "graphs": [],
            }
            return
        files = {g: r.file for g, r in self.m.graphs.items() if r.precision == Precision.FP32}
        units = None
        if self.m.dynamic:  # the harness runs the manifest tile, or --lr
            units = (self.hw[0] // self.m.lr_multiple, self.hw[1] // self.m.lr_multiple)
        self.macs = GraphMacs(self.dir, files, units)
        self.macs_info = {"status": "ok", "reason": None, "graphs": []}

    def case_macs(self, spec: CaseSpec) -> int | None:
        """MACs of one end-to-end call of ``spec`` (torch eager counts as staged)."""
        if self.macs is None:
            return None
        mode = Mode.STAGED if spec.mode == EAGER else spec.mode
        need = MODE_GRAPHS[mode]
        if any(g not in self.macs.graphs for g in need):
            return None
        try:
            total = self.macs.pipeline(mode, spec.batch, self.steps)
        except Exception as exc:  # a graph onnx cannot parse or infer: report it, keep measuring
            log.warning("MAC count failed for %s: %s", self.key, exc)
            self.macs_info.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
            return None
        for g in need:
            rec = {"graph": g, **self.macs.get(g, spec.batch).to_dict()}
            if rec not in self.macs_info["graphs"]:
                self.macs_info["graphs"].append(rec)
        return total

    # reference -------------------------------------------------------------------------------
    def pipeline(self) -> Any:
        """The FP32 reference ``Pipeline`` the model was exported from (CPU), built once."""
        if self._pipe is None:
            from deltadiff.model.pipeline import Pipeline

            t0 = time.perf_counter()
            self._pipe = Pipeline.from_manifest(self.m, model_dir=self.dir)
            self.build_s = time.perf_counter() - t0
        return self._pipe

    def compute_reference(self) -> None:
        if not self.opts.reference:
            return
        try:
            torch = require("torch", "export")
        except MissingDependencyError:
            self.ref_info = {
                "status": "skipped",
                "reason": "torch is not installed: no PyTorch reference for fidelity",
            }
            return
        old = torch.get_num_threads()
        if self.opts.threads:
            torch.set_num_threads(self.opts.threads)
        try:
            pipe = self.pipeline()
            t0 = time.perf_counter()
            with torch.no_grad():
                tn = {k: torch.from_numpy(v) for k, v in self.noise.items()}
                self.ref = pipe(torch.from_numpy(self.lr), tn).numpy()
            secs = time.perf_counter() - t0
        except DeltaDiffError as exc:
            self.ref_info = {"status": "skipped", "reason": f"cannot rebuild the reference: {exc}"}
            return
        finally:
            torch.set_num_threads(old)
        self.ref_info = {
            "status": "ok",
            "reason": None,
            "device": "cpu",
            "precision": "fp32",
            "batch": int(self.lr.shape[0]),
            "build_s": self.build_s,
            "seconds": secs,
            "inputs": f"{self.lr.shape[0]} random LR tile(s) seed {self.opts.seed}"
            + (f", noise seed {self.opts.seed + 1}" if self.noise else ""),
        }

    def fidelity(self, out: np.ndarray, batch: int, name: str) -> dict[str, Any]:
        if self.ref is None:
            return {
                "psnr_db": None,
                "psnr_inf": False,
                "max_abs": None,
                "mean_abs": None,
                "reason": self.ref_info.get("reason") or "no reference",
            }
        r = compare(self.ref[:batch], np.asarray(out, dtype=np.float32), name=name, data_range=1.0)
        inf = math.isinf(r.psnr) and r.psnr > 0
        return {
            "psnr_db": None if not math.isfinite(r.psnr) else r.psnr,
            "psnr_inf": inf,
            "max_abs": r.max_abs if math.isfinite(r.max_abs) else None,
            "mean_abs": r.mean_abs if math.isfinite(r.mean_abs) else None,
            "reason": None if r.finite else "output has NaN/Inf",
        }

    def release(self) -> None:
        self._pipe = None
        self.ref = None

    def to_dict(self) -> dict[str, Any]:
        m = self.m
        return {
            "key": self.key,
            "name": m.name,
            "family": m.family,
            "dir": str(self.dir),
            "tile": list(m.tile),
            "lr_hw": list(self.hw),
            "output_hw": list(self.out_hw),
            "batch_range": list(m.batch),
            "precisions": m.precisions(),
            "noise": bool(m.noise_names),
            "stages": ["encode", *self.step_stages, "decode"],
            "macs": {
                **self.macs_info,
                "graphs": sorted(
                    self.macs_info["graphs"],
                    key=lambda g: (g["batch"], GRAPH_ORDER.get(g["graph"], 9)),
                ),
            },
            "reference": self.ref_info,
            "quality": None,
            "quality_skipped": [],
        }
