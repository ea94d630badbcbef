"""torch -> ONNX: encoder / step / decoder graphs, the composed unrolled graph, and the manifest.

Static spatial shape per export, dynamic batch (the batch range is recorded in the manifest).
Exporter: the dynamo exporter at opset 21 (native GroupNormalization, 2-3x smaller graphs;
EXPORT-FINDINGS finding 4) or the TorchScript exporter at opset <= 20 (decomposed GroupNorm, for
TensorRT 10 <= 10.7 that rejects opset-21 GroupNormalization; DEPLOY-NOTES P6). Every graph goes
through ``onnx.checker`` (full check), onnxslim (constant folding, dead-code removal, shape
inference) and the checker again.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import deltadiff
from deltadiff._deps import require
from deltadiff.errors import DeltaDiffError
from deltadiff.export.compose import compose_unrolled
from deltadiff.export.graphs import (
    DecoderGraph,
    EncoderGraph,
    StepGraph,
    TileShape,
    cond_shape,
    state_shape,
)
from deltadiff.model.pipeline import Pipeline
from deltadiff.runtime.atomic import atomic_path
from deltadiff.runtime.manifest import (
    GraphRecord,
    Manifest,
    TensorSpec,
    save_manifest,
    sha256_file,
)
from deltadiff.runtime.steps import PRIOR_NOISE

log = logging.getLogger(__name__)

BATCH = "batch"


@dataclass(frozen=True)
class ExportOptions:
    tile: TileShape
    opset: int = 21
    max_batch: int = 8  # recorded batch range [1, max_batch] (dynamic batch axis)
    slim: bool = True
    graphs: tuple[str, ...] = ("encoder", "step", "decoder", "unrolled")

    @property
    def exporter(self) -> str:
        return "dynamo" if self.opset >= 21 else "torchscript"


def _np_dtype(elem_type: int) -> str:
    from onnx import helper

    return str(helper.tensor_dtype_to_np_dtype(elem_type))


def io_specs(model: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    def spec(v: Any) -> TensorSpec:
        tt = v.type.tensor_type
        dims = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim)
        return TensorSpec(v.name, dims, _np_dtype(tt.elem_type))

    inits = {i.name for i in model.graph.initializer}
    ins = tuple(spec(v) for v in model.graph.input if v.name not in inits)
    return ins, tuple(spec(v) for v in model.graph.output)


@contextlib.contextmanager
def _quiet_loggers(
    names: tuple[str, ...] = ("torch.onnx", "onnxscript", "onnx_ir", "torch.export"),
):  # noqa: ANN202
    """The exporters log INFO/WARNING chatter (torchvision ops, rewrite rules); keep errors only."""
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, lvl in saved.items():
            logging.getLogger(n).setLevel(lvl)


def _export_one(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    batched: list[str],
    opts: ExportOptions,
) -> Any:
    """Export one module to an in-memory ModelProto with a symbolic batch axis on ``batched``."""
    onnx = require("onnx")
    module.eval()
    with tempfile.TemporaryDirectory() as td:
        path = Path(td) / "g.onnx"
        kw: dict[str, Any] = dict(
            input_names=input_names, output_names=output_names, opset_version=opts.opset
        )
        if opts.exporter == "dynamo":
            batch = torch.export.Dim(BATCH, min=1, max=max(2, opts.max_batch))
            kw["dynamic_shapes"] = {n: ({0: batch} if n in batched else None) for n in input_names}
            kw.update(dynamo=True, external_data=False, verbose=False)
        else:
            axes = {n: {0: BATCH} for n in batched + output_names}
            kw.update(dynamo=False, dynamic_axes=axes, do_constant_folding=True)
        with (
            warnings.catch_warnings(),
            torch.no_grad(),
            contextlib.redirect_stdout(io.StringIO()),
            _quiet_loggers(),
        ):
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(module, args, str(path), **kw)
            except Exception as exc:  # surface exporter failures as one line + the cause
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise DeltaDiffError(
                    f"torch.onnx.export ({opts.exporter}, opset {opts.opset}) failed for "
                    f"{type(module).__name__}: {first}"
                ) from exc
        model = onnx.load(str(path))
    return model


def cleanup(model: Any, name: str, *, slim: bool = True) -> Any:
    """Checker (full) -> onnxslim (fold constants, drop dead code, infer shapes) -> checker."""
    onnx = require("onnx")
    onnx.checker.check_model(model, full_check=True)
    if slim:
        onnxslim = require("onnxslim")
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = onnxslim.slim(model)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    onnx.checker.check_model(model, full_check=True)
    model.graph.name = name
    model.producer_name = "deltadiff-trt"
    model.producer_version = deltadiff.__version__
    return model


def build_graphs(pipe: Pipeline, opts: ExportOptions) -> dict[str, Any]:
    """Export the encoder, step and decoder graphs (cleaned) and compose the unrolled graph."""
    # example batch 2: an example batch of 1 makes torch.export specialise the batch axis
    tile = TileShape(opts.tile.h, opts.tile.w, 2)
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(tile.batch, 3, tile.h, tile.w, generator=g)
    sshape, cshape = state_shape(pipe, tile), cond_shape(pipe, tile)
    x = torch.randn(sshape, generator=g)
    y = torch.randn(sshape, generator=g)  # distinct from x: the exporter merges aliased inputs
    cond = torch.randn(cshape, generator=g)
    t = torch.tensor([2], dtype=torch.int64)
    coef = torch.tensor([0.5, 0.5, 0.5, 0.0, 0.0], dtype=torch.float32)
    noisy = pipe.table.noisy
    models: dict[str, Any] = {}
    want = set(opts.graphs) | (
        {"encoder", "step", "decoder"} if "unrolled" in opts.graphs else set()
    )
    if "encoder" in want:
        ins = ["lr", PRIOR_NOISE] if noisy else ["lr"]
        args = (lr, torch.randn(sshape, generator=g)) if noisy else (lr,)
        models["encoder"] = _export_one(
            EncoderGraph(pipe), args, ins, ["x", "y", "cond"], ins, opts
        )
    if "step" in want:
        ins = ["x", "y", "cond", "t", "coef"] + (["noise"] if noisy else [])
        args = (x, y, cond, t, coef) + ((torch.randn(sshape, generator=g),) if noisy else ())
        batched = ["x", "y", "cond"] + (["noise"] if noisy else [])
        models["step"] = _export_one(StepGraph(pipe), args, ins, ["x_next"], batched, opts)
    if "decoder" in want:
        models["decoder"] = _export_one(DecoderGraph(pipe), (x,), ["x"], ["image"], ["x"], opts)
    models = {k: cleanup(m, k, slim=opts.slim) for k, m in models.items()}
    if "unrolled" in opts.graphs:
        un = compose_unrolled(models["encoder"], models["step"], models["decoder"], pipe.table)
        models["unrolled"] = cleanup(un, "unrolled", slim=opts.slim)
    return {k: v for k, v in models.items() if k in opts.graphs}


def write_graph(
    out: Path, name: str, model: Any, precision: str, islands: dict[str, int] | None = None
) -> GraphRecord:
    """Save ``<name>.onnx`` (fp32) or ``<name>.<precision>.onnx`` atomically; return its record."""
    onnx = require("onnx")
    path = out / (f"{name}.onnx" if precision == "fp32" else f"{name}.{precision}.onnx")
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    ins, outs = io_specs(model)
    log.info("wrote %s (%.1f MB, %d nodes)", path, path.stat().st_size / 1e6, len(model.graph.node))
    return GraphRecord(
        file=path.name,
        sha256=sha256_file(path),
        bytes=path.stat().st_size,
        precision=precision,
        inputs=ins,
        outputs=outs,
        fp32_islands=tuple(f"{k}:{v}" for k, v in sorted((islands or {}).items())),
    )


def preset_source(preset: str, seed: int = 0) -> dict[str, Any]:
    """The manifest ``source`` record of a preset with random weights (verify rebuilds it)."""
    return {
        "kind": "preset",
        "preset": preset,
        "seed": seed,
        "unet_weights": None,
        "vq_weights": None,
    }


def versions() -> dict[str, str]:
    out = {"deltadiff-trt": deltadiff.__version__, "torch": torch.__version__.split("+")[0]}
    for mod in ("onnx", "onnxslim", "onnxruntime"):
        with contextlib.suppress(Exception):
            out[mod] = require(mod).__version__
    return out


def export_onnx(
    pipe: Pipeline,
    out_dir: str | Path,
    opts: ExportOptions,
    *,
    source: dict[str, Any],
) -> Manifest:
    """Export all graphs into ``out_dir`` and write ``manifest.json``. Returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mult = pipe.cfg.lr_multiple
    if opts.tile.h % mult or opts.tile.w % mult:
        raise DeltaDiffError(
            f"tile {opts.tile.h}x{opts.tile.w} is not a multiple of {mult} (LR) for "
            f"{pipe.cfg.family}; choose --tile as a multiple of {mult}"
        )
    models = build_graphs(pipe, opts)
    records = {name: write_graph(out, name, m, "fp32") for name, m in models.items()}
    manifest = Manifest(
        name=pipe.cfg.name or pipe.cfg.family,
        family=pipe.cfg.family,
        scale=4,
        tile=(opts.tile.h, opts.tile.w),
        batch=(1, opts.max_batch),
        lr_multiple=mult,
        step_table=pipe.table,
        graphs=records,
        exporter={**versions(), "opset": opts.opset, "exporter": opts.exporter},
        source=source,
        model_config=pipe.cfg.to_dict(),
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )
    save_manifest(out, manifest)
    return manifest


def add_fp16(
    model_dir: str | Path, *, slim: bool = True, rules: dict[str, list[Any]] | None = None
) -> Manifest:
    """Add FP16 graphs (FP32 islands, FP32 I/O) next to the FP32 ones: ``<graph>.fp16.onnx``.

    ``rules``: graph name -> island rules replacing ``fp16_islands.json`` for that graph (the
    list ``dd-export fp16 --auto-islands`` found).

    The FP16 unrolled graph is composed from the FP16 staged graphs, so the state between rows
    crosses each step boundary in FP32.
    """
    from dataclasses import replace

    from deltadiff.export.fp16 import convert_to_fp16
    from deltadiff.runtime.manifest import load_manifest

    onnx = require("onnx")
    out = Path(model_dir)
    m = load_manifest(out)
    staged = {}
    islands: dict[str, dict[str, int]] = {}
    for name in ("encoder", "step", "decoder"):
        src = onnx.load(str(out / m.graph(name).file))
        staged[name], islands[name] = convert_to_fp16(src, name, (rules or {}).get(name))
    models = dict(staged)
    if "unrolled" in m.graphs:
        un = compose_unrolled(staged["encoder"], staged["step"], staged["decoder"], m.step_table)
        models["unrolled"] = cleanup(un, "unrolled", slim=slim)
        islands["unrolled"] = {
            k: sum(v.get(k, 0) for v in islands.values()) for k in set().union(*islands.values())
        }
    graphs = dict(m.graphs)
    for name, model in models.items():
        graphs[f"{name}.fp16"] = write_graph(out, name, model, "fp16", islands[name])
    m2 = replace(m, graphs=graphs)
    save_manifest(out, m2)
    return m2
