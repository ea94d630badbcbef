"""The case grid (model x backend x precision x mode x batch) and one case's result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deltadiff.benchmarks.options import DEFAULT_COV_WARN, EAGER, BenchOptions
from deltadiff.benchmarks.stats import Stats
from deltadiff.options import Backend, Precision

# ---------------------------------------------------------------------------------------------
# cases


@dataclass(frozen=True)
class CaseSpec:
    backend: Backend
    precision: Precision
    mode: str  # a Mode, or EAGER for the torch backends
    batch: int

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.precision}/{self.mode}/b{self.batch}"


def plan_cases(opts: BenchOptions) -> list[CaseSpec]:
    """The case grid, normalised: torch backends run ``eager``; torch fp16 = torch-autocast,
    which is always fp16. Duplicates are dropped, order kept."""
    out: list[CaseSpec] = []
    for backend in opts.backends:
        for precision in opts.precisions:
            for mode in opts.modes:
                for batch in opts.batches:
                    b, p, m = backend, precision, mode
                    if b.is_torch:
                        m = EAGER
                        autocast = b is Backend.TORCH_AUTOCAST or p is Precision.FP16
                        b = Backend.TORCH_AUTOCAST if autocast else Backend.TORCH
                        p = Precision.FP16 if autocast else Precision.FP32
                    spec = CaseSpec(b, p, m, batch)
                    if spec not in out:
                        out.append(spec)
    return out


@dataclass
class CaseResult:
    model: str
    spec: CaseSpec
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    device: str | None = None
    threads: int = 0
    warmup: int = 0
    out_hw: tuple[int, int] = (0, 0)
    stage_order: list[str] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)  # stage -> seconds; "e2e"
    chain_samples: list[float] = field(default_factory=list)
    load_s: float | None = None
    first_run_s: float | None = None
    memory: dict[str, Any] | None = None
    macs: int | None = None
    peak_key: str | None = None
    peak_flops: float | None = None
    fidelity: dict[str, Any] | None = None
    cov_warn: float = DEFAULT_COV_WARN

    @property
    def id(self) -> str:
        return f"{self.model}/{self.spec.name}"

    @property
    def e2e(self) -> Stats | None:
        return Stats.from_times(self.samples["e2e"]) if self.samples.get("e2e") else None

    def stage_stats(self) -> dict[str, Stats]:
        return {
            s: Stats.from_times(self.samples[s]) for s in self.stage_order if self.samples.get(s)
        }

    def to_dict(self) -> dict[str, Any]:
        e2e = self.e2e
        stages = self.stage_stats()
        thr = None
        flops: dict[str, Any] = {
            "macs": self.macs,
            "gmacs": None if self.macs is None else self.macs / 1e9,
            "achieved_tflops": None,
            "peak_key": self.peak_key,
            "peak_tflops": None if self.peak_flops is None else self.peak_flops / 1e12,
            "achieved_over_peak": None,
        }
        if e2e is not None and e2e.median > 0:
            b = self.spec.batch
            thr = {
                "images_per_s": b / e2e.median,
                "megapixels_per_s": b * self.out_hw[0] * self.out_hw[1] / 1e6 / e2e.median,
            }
            if self.macs is not None:
                achieved = 2.0 * self.macs / e2e.median
                flops["achieved_tflops"] = achieved / 1e12
                if self.peak_flops:
                    flops["achieved_over_peak"] = achieved / self.peak_flops
        noisy = [s for s, st in stages.items() if st.cov > self.cov_warn]
        ttfr = None
        if self.load_s is not None and self.first_run_s is not None:
            ttfr = {
                "load_s": self.load_s,
                "first_run_s": self.first_run_s,
                "total_s": self.load_s + self.first_run_s,
            }
        return {
            "id": self.id,
            "model": self.model,
            "backend": self.spec.backend,
            "precision": self.spec.precision,
            "mode": self.spec.mode,
            "batch": self.spec.batch,
            "status": self.status,
            "reason": self.reason,
            "device": self.device,
            "threads": self.threads,
            "warmup": self.warmup,
            "runs": e2e.n if e2e else 0,
            "output_hw": list(self.out_hw),
            "stage_order": list(self.stage_order),
            "stages": {s: st.to_dict() for s, st in stages.items()},
            "e2e": e2e.to_dict() if e2e else None,
            "e2e_device_chain": Stats.from_times(self.chain_samples).to_dict()
            if self.chain_samples
            else None,
            "cov_threshold": self.cov_warn,
            "cov_warning": bool(e2e is not None and e2e.cov > self.cov_warn),
            "noisy_stages": noisy,
            "throughput": thr,
            "memory": self.memory,
            "ttfr": ttfr,
            "flops": flops,
            "fidelity": self.fidelity,
            "samples": {k: list(v) for k, v in self.samples.items()},
        }
