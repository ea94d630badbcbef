"""``dd-export verify``: a backend against the PyTorch reference, per stage and end to end.

Per stage, the backend's graph gets the reference's own inputs (so each number isolates one
graph): encoder outputs, each of the four step rows, the decoder. End to end, the backend runs
the whole chain (staged and unrolled) from the same LR tile(s) and noise. Images are compared in
[0, 1] (PSNR with a data range of 1); intermediate states by max-abs and PSNR over their range.
The record is written into the manifest.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltadiff.compare import CompareResult, compare
from deltadiff.errors import DeltaDiffError, VerificationError
from deltadiff.manifest import Manifest, load_manifest, update_manifest
from deltadiff.model.pipeline import Pipeline
from deltadiff.noise import noise_field
from deltadiff.options import Backend, Mode, Precision, format_size, parse
from deltadiff.runtime.backends import open_backend
from deltadiff.runtime.executor import Executor
from deltadiff.steps import StepRow

log = logging.getLogger(__name__)

MIN_PSNR = {Precision.FP32: 60.0, Precision.FP16: 40.0, Precision.INT8: 35.0}


@dataclass
class VerifyReport:
    backend: str
    precision: str
    stages: list[CompareResult] = field(default_factory=list)
    end_to_end: list[CompareResult] = field(default_factory=list)
    min_psnr: float = 60.0
    inputs: str = ""

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.end_to_end) and all(r.finite for r in self.stages)

    @property
    def psnr(self) -> float:
        return min(r.psnr for r in self.end_to_end) if self.end_to_end else float("nan")

    def to_record(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "precision": self.precision,
            "passed": self.passed,
            "psnr_db": None if not np.isfinite(self.psnr) else round(self.psnr, 2),
            "min_psnr_db": self.min_psnr,
            "inputs": self.inputs,
            "stages": [r.to_dict() for r in self.stages],
            "end_to_end": [r.to_dict() for r in self.end_to_end],
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }


def image_tiles(m: Manifest, images: list[Path]) -> np.ndarray:
    """Centre crops (reflect-padded if small) of the tile size from image files, (N,3,h,w)."""
    from deltadiff.runtime.imageio import read_image
    from deltadiff.tiling import reflect_pad

    th, tw = m.tile
    out = []
    for p in images:
        a = read_image(p).rgb.transpose(2, 0, 1)
        a = reflect_pad(a, max(0, th - a.shape[1]), max(0, tw - a.shape[2]))
        y0, x0 = (a.shape[1] - th) // 2, (a.shape[2] - tw) // 2
        out.append(a[:, y0 : y0 + th, x0 : x0 + tw])
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


@dataclass(frozen=True)
class _Inputs:
    """What verify feeds the reference and the backend."""

    lr: np.ndarray  # (B, 3, h, w), contiguous
    noise: dict[str, np.ndarray]
    what: str  # how the report describes them


@dataclass(frozen=True)
class _Reference:
    """The PyTorch pipeline's tensors for the inputs: what each backend graph is compared to."""

    tensors: dict[str, np.ndarray]  # x, y, cond, and x_{t-1} after each step row
    rows: list[tuple[StepRow, np.ndarray]]  # each step row with its input state
    image: np.ndarray


@dataclass(frozen=True)
class _BackendGraphs:
    """An open backend and which graph kinds the manifest has for the precision verified."""

    be: Any
    manifest: Manifest
    precision: Precision
    target: str  # INT8 graph target ("tensorrt" / "onnxruntime"); "" for FP32 and FP16
    kinds: set[str]  # encoder, step, decoder, unrolled


def verify(
    model_dir: str | Path,
    *,
    backend: Backend | str = Backend.ONNXRUNTIME,
    precision: Precision | str = Precision.FP32,
    images: list[Path] | None = None,
    seed: int = 0,
    batch: int = 1,
    min_psnr: float | None = None,
    threads: int = 0,
    unet_weights: str | Path | None = None,
    vq_weights: str | Path | None = None,
    record: bool = True,
    modes: tuple[Mode, ...] = (Mode.STAGED, Mode.UNROLLED),
    lr_hw: tuple[int, int] | None = None,
) -> VerifyReport:
    """``lr_hw``: LR size to verify at (dynamic models; default the tile). A size that is not a
    multiple of the pad multiple is reflect-padded as the runtime does."""
    model_dir = Path(model_dir)
    backend = parse(Backend, backend, "backend")
    precision = parse(Precision, precision, "precision")
    modes = tuple(parse(Mode, x, "mode") for x in modes)
    m = load_manifest(model_dir)
    pipe = Pipeline.from_manifest(
        m, unet_weights=unet_weights, vq_weights=vq_weights, model_dir=model_dir
    )
    inputs = _verify_inputs(m, images=images, seed=seed, batch=batch, lr_hw=lr_hw)
    report = VerifyReport(
        backend,
        precision,
        min_psnr=MIN_PSNR[precision] if min_psnr is None else min_psnr,
        inputs=inputs.what,
    )
    ref = _reference(pipe, inputs)
    with open_backend(backend, model_dir, m, precision=precision, threads=threads) as be:
        graphs = _backend_graphs(be, m, backend, precision)
        _verify_stages(graphs, inputs, ref, report)
        _verify_end_to_end(graphs, inputs, ref, modes, report)
    if not report.end_to_end:
        raise VerificationError(f"no {precision} graphs to verify in {model_dir}")
    if record:
        _record_verification(model_dir, backend, precision, report)
    return report


def _verify_inputs(
    m: Manifest,
    *,
    images: list[Path] | None,
    seed: int,
    batch: int,
    lr_hw: tuple[int, int] | None,
) -> _Inputs:
    """LR tiles (random, padded to ``lr_hw``, or crops of ``images``) and the noise fields."""
    if lr_hw is not None and tuple(lr_hw) != tuple(m.tile):
        from deltadiff.tiling import pad_amounts, reflect_pad

        if images:
            raise DeltaDiffError("verify at another size (--size) takes random tiles, not --images")
        ph, pw = pad_amounts(*lr_hw, m.lr_multiple, m.lr_range()[0])
        if not m.accepts(lr_hw[0] + ph, lr_hw[1] + pw):
            raise DeltaDiffError(
                f"--size {format_size(lr_hw)}: the graphs accept {m.lr_range_text()}"
            )
        rng = np.random.default_rng(seed)
        lr = reflect_pad(rng.random((batch, 3, *lr_hw), dtype=np.float32), ph, pw)
        padded = format_size(lr.shape[2:])
        what = f"{batch} random LR {format_size(lr_hw)} padded to {padded} (WxH), seed {seed}"
    elif images:
        lr = image_tiles(m, images)
        what = f"{len(images)} image tile(s)"
    else:
        rng = np.random.default_rng(seed)
        lr = rng.random((batch, 3, *m.tile), dtype=np.float32)
        what = f"{batch} random LR tile(s), seed {seed}"
    lr = np.ascontiguousarray(lr)
    B = lr.shape[0]
    sh, sw = m.state_hw(lr.shape[2:])
    noise = noise_field(m.noise_names, (B, 3, sh, sw), seed + 1)
    return _Inputs(lr=lr, noise=noise, what=what)


def _reference(pipe: Pipeline, inputs: _Inputs) -> _Reference:
    """The PyTorch reference, stage by stage: encoder outputs, each row's state, the image."""
    tn = {k: torch.from_numpy(v) for k, v in inputs.noise.items()}
    ref: dict[str, np.ndarray] = {}
    xs: list[tuple[StepRow, np.ndarray]] = []  # (row, its input state)

    def keep(r: StepRow, _x0: torch.Tensor, x_next: torch.Tensor) -> None:
        xs.append((r, ref[f"x_{r.t}"] if xs else ref["x"]))
        ref[f"x_{r.t - 1}"] = x_next.numpy()

    with torch.no_grad():
        y, cond = pipe.encode(torch.from_numpy(inputs.lr))
        ref.update(x=pipe.prior(y, tn).numpy(), y=y.numpy(), cond=cond.numpy())
        image = pipe.decode(pipe.run_steps(y, cond, tn, hook=keep)).numpy()
    return _Reference(tensors=ref, rows=xs, image=image)


def _backend_graphs(be: Any, m: Manifest, backend: Backend, precision: Precision) -> _BackendGraphs:
    target = ("tensorrt" if backend == "tensorrt" else "onnxruntime") if precision == "int8" else ""
    kinds = {
        k.split(".")[0].split("@")[0]  # step@3.int8.onnxruntime -> step
        for k, g in m.graphs.items()
        if g.precision == precision and g.target == target
    }
    return _BackendGraphs(be=be, manifest=m, precision=precision, target=target, kinds=kinds)


def _verify_stages(
    b: _BackendGraphs, inputs: _Inputs, ref: _Reference, report: VerifyReport
) -> None:
    """Each backend graph on the reference's own inputs: encoder, every step row, decoder."""
    be, noise, tensors = b.be, inputs.noise, ref.tensors
    if "encoder" in b.kinds:
        enc = be.run("encoder", {"lr": inputs.lr, **noise})
        for k in ("x", "y", "cond"):
            report.stages.append(compare(tensors[k], enc[k], name=f"encoder.{k}"))
    if "step" in b.kinds:
        for r, x_in in ref.rows:
            feeds = {
                "x": x_in,
                "y": tensors["y"],
                "cond": tensors["cond"],
                "t": r.t_input(),
                "coef": r.coef(),
            }
            step_name = b.manifest.resolve(f"step@{r.t}", b.precision, b.target or None)
            if "noise" in be.input_names(step_name):
                feeds["noise"] = noise[r.noise] if r.noise in noise else np.zeros_like(x_in)
            out = be.run(step_name, feeds)["x_next"]  # the row's own graph (INT8)
            report.stages.append(compare(tensors[f"x_{r.t - 1}"], out, name=f"step t={r.t}"))
    if "decoder" in b.kinds:
        out = be.run("decoder", {"x": tensors["x_-1"]})["image"]
        report.stages.append(compare(ref.image, out, name="decoder.image", data_range=1.0))


def _verify_end_to_end(
    b: _BackendGraphs,
    inputs: _Inputs,
    ref: _Reference,
    modes: tuple[Mode, ...],
    report: VerifyReport,
) -> None:
    """The whole chain per mode (staged, unrolled) whose graphs the backend has."""
    for mode in modes:
        if mode is Mode.UNROLLED and "unrolled" not in b.kinds:
            continue
        if mode is Mode.STAGED and not {"encoder", "step", "decoder"} <= b.kinds:
            continue
        ex = Executor(b.manifest, b.be, mode=mode)
        out = ex.run(inputs.lr, inputs.noise)
        report.end_to_end.append(
            compare(
                ref.image, out, name=f"end-to-end {mode}", data_range=1.0, min_psnr=report.min_psnr
            )
        )


def _record_verification(
    model_dir: Path, backend: Backend, precision: Precision, report: VerifyReport
) -> None:
    """The report into the manifest (latest, and by backend/precision)."""
    rec = report.to_record()

    def add_record(cur: Manifest) -> Manifest:  # the manifest on disk now, under its lock
        verifs = dict(cur.verification.get("by_backend", {})) if cur.verification else {}
        verifs[f"{backend}/{precision}"] = rec
        return replace(cur, verification={**rec, "by_backend": verifs})

    update_manifest(model_dir, add_record)
