"""torch -> ONNX: encoder / step / decoder graphs, the composed unrolled graph, and the manifest.

Static spatial shape per export by default, dynamic batch (the batch range is recorded in the
manifest). ``--dynamic`` exports symbolic height and width too: the LR side is ``multiple * k`` for
k in the range given by ``--min-lr`` / ``--max-lr`` (the manifest records the range and the pad
multiple; ``tile`` becomes the optimum size for TensorRT profiles and the default tile).
Exporter: the dynamo exporter at opset 21 (native GroupNormalization, 2-3x smaller graphs) or
the TorchScript exporter at opset <= 20 (decomposed GroupNorm, for
TensorRT 10 <= 10.7 that rejects opset-21 GroupNormalization). By default every
GroupNormalization is then lowered to InstanceNormalization (``export/lowering.py``: ONNX Runtime's
CPU provider has no GroupNormalization kernel); ``group_norm="native"`` keeps the op. Every graph goes
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
from deltadiff.atomic import atomic_path
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
from deltadiff.manifest import (
    GraphRecord,
    Manifest,
    TensorSpec,
    save_manifest,
    sha256_file,
)
from deltadiff.model.pipeline import Pipeline
from deltadiff.options import GroupNormForm
from deltadiff.steps import PRIOR_NOISE

log = logging.getLogger(__name__)

BATCH = "batch"


DEFAULT_MAX_LR = 512  # LR side; the default upper end of a dynamic export's range


@dataclass(frozen=True)
class ExportOptions:
    tile: TileShape
    opset: int = 21
    max_batch: int = 8  # recorded batch range [1, max_batch] (dynamic batch axis)
    slim: bool = True
    graphs: tuple[str, ...] = ("encoder", "step", "decoder", "unrolled")
    dynamic: bool = False  # symbolic LR height/width (multiples of the model's LR multiple)
    min_lr: tuple[int, int] | None = None  # dynamic range, LR pixels; default: one multiple
    max_lr: tuple[int, int] | None = None  # default: DEFAULT_MAX_LR
    # GroupNorm lowered to InstanceNormalization (export/lowering.py) or kept as the opset-21 op
    group_norm: GroupNormForm = GroupNormForm.INSTANCE

    @property
    def exporter(self) -> str:
        return "dynamo" if self.opset >= 21 else "torchscript"


@dataclass(frozen=True)
class SpatialRange:
    """A dynamic export's LR range: sides are ``multiple * k``, k in [lo, hi] per axis."""

    multiple: int
    lo: tuple[int, int]  # in multiples
    hi: tuple[int, int]

    @property
    def lr_min(self) -> tuple[int, int]:
        return (self.multiple * self.lo[0], self.multiple * self.lo[1])

    @property
    def lr_max(self) -> tuple[int, int]:
        return (self.multiple * self.hi[0], self.multiple * self.hi[1])


def spatial_range(mult: int, opts: ExportOptions) -> SpatialRange:
    """Round --min-lr up and --max-lr down to the multiple; the tile must lie inside."""
    mn = opts.min_lr or (mult, mult)
    mx = opts.max_lr or (max(DEFAULT_MAX_LR, opts.tile.h), max(DEFAULT_MAX_LR, opts.tile.w))
    lo = (max(1, -(-mn[0] // mult)), max(1, -(-mn[1] // mult)))
    hi = (mx[0] // mult, mx[1] // mult)
    r = SpatialRange(mult, lo, hi)
    if hi[0] < lo[0] + 1 or hi[1] < lo[1] + 1:
        raise DeltaDiffError(
            f"--min-lr {mn[0]}x{mn[1]} / --max-lr {mx[0]}x{mx[1]}: a dynamic range needs at least "
            f"two sizes that are multiples of {mult} per axis; widen the range"
        )
    t = opts.tile
    if not (r.lr_min[0] <= t.h <= r.lr_max[0] and r.lr_min[1] <= t.w <= r.lr_max[1]):
        raise DeltaDiffError(
            f"--tile {t.h}x{t.w} (the optimum size) is outside the dynamic range "
            f"{r.lr_min[0]}x{r.lr_min[1]}..{r.lr_max[0]}x{r.lr_max[1]}; choose a tile inside it"
        )
    return r


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
    spatial: dict[str, tuple[Any, Any]] | None = None,
) -> Any:
    """Export one module to an in-memory ModelProto with a symbolic batch axis on ``batched``.

    ``spatial``: input name -> (height, width) ``torch.export`` dims (dynamic exports, dynamo only).
    """
    onnx = require("onnx")
    module.eval()
    with tempfile.TemporaryDirectory() as td:
        path = Path(td) / "g.onnx"
        kw: dict[str, Any] = dict(
            input_names=input_names, output_names=output_names, opset_version=opts.opset
        )
        if opts.exporter == "dynamo":
            batch = torch.export.Dim(BATCH, min=1, max=max(2, opts.max_batch))
            spatial = spatial or {}

            def dims(n: str) -> dict[int, Any] | None:
                d = {0: batch} if n in batched else {}
                if n in spatial:
                    d.update({2: spatial[n][0], 3: spatial[n][1]})
                return d or None

            kw["dynamic_shapes"] = {n: dims(n) for n in input_names}
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


def _spatial_dims(
    pipe: Pipeline, opts: ExportOptions
) -> tuple[TileShape, dict[str, tuple[Any, Any]]]:
    """Example tile and per-input (h, w) dims of a dynamic export (empty when static).

    The example sizes are >= 2 multiples and differ between axes and from the batch, so
    torch.export neither specialises an axis (0/1) nor merges two axes (equal example sizes).
    """
    if not opts.dynamic:
        return TileShape(opts.tile.h, opts.tile.w, 2), {}
    if opts.exporter != "dynamo":
        raise DeltaDiffError(
            "--dynamic needs the dynamo exporter (--opset 21): the TorchScript exporter bakes the "
            "trace size's Swin mask into the graph"
        )
    mult = pipe.cfg.lr_multiple
    r = spatial_range(mult, opts)
    # example multiples: >= 2 (no 0/1 specialisation) and different per axis (no merged axes)
    lo_h, lo_w = max(2, r.lo[0]), max(2, r.lo[1])
    kh = min(max(lo_h, opts.tile.h // mult), r.hi[0])
    kw = min(max(lo_w, opts.tile.w // mult), r.hi[1])
    if kw == kh:
        if kw + 1 <= r.hi[1]:
            kw += 1
        elif kw - 1 >= lo_w:
            kw -= 1
        elif kh + 1 <= r.hi[0]:
            kh += 1
    if min(kh, kw) < 2 or kh == kw:
        raise DeltaDiffError(
            f"--min-lr/--max-lr: the dynamic range {r.lr_min[0]}x{r.lr_min[1]}.."
            f"{r.lr_max[0]}x{r.lr_max[1]} is too narrow to trace; allow at least "
            f"{3 * mult} LR pixels on one axis"
        )
    Dim = torch.export.Dim
    hk = Dim("h", min=r.lo[0], max=r.hi[0])
    wk = Dim("w", min=r.lo[1], max=r.hi[1])
    lr = (mult * hk, mult * wk)
    ratio = 1 if pipe.cfg.latent else 4  # state pixels per LR pixel
    state = (ratio * mult * hk, ratio * mult * wk)
    cond = lr if pipe.cfg.latent else state
    spatial = {"lr": lr, "n_prior": state, "x": state, "y": state, "noise": state, "cond": cond}
    return TileShape(mult * kh, mult * kw, 2), spatial


def _label_dims(model: Any, labels: dict[str, tuple[str, str]]) -> None:
    """Name the spatial axes of graph inputs/outputs by what they are (``4*h``: 4 x the LR
    multiple count), so every graph, the manifest and TensorRT see one consistent name per size."""
    for v in list(model.graph.input) + list(model.graph.output):
        if v.name in labels:
            dims = v.type.tensor_type.shape.dim
            for axis, label in zip((2, 3), labels[v.name], strict=True):
                dims[axis].ClearField("dim_value")
                dims[axis].dim_param = label


def _dim_labels(pipe: Pipeline) -> dict[str, tuple[str, str]]:
    mult = pipe.cfg.lr_multiple
    ratio = 1 if pipe.cfg.latent else 4

    def lab(k: int) -> tuple[str, str]:
        return (f"{k}*h", f"{k}*w") if k != 1 else ("h", "w")

    lr, state, hr = lab(mult), lab(ratio * mult), lab(4 * mult)
    out = {k: state for k in ("x", "y", "noise", "n_prior", "x_next")}
    out.update(lr=lr, cond=lr if pipe.cfg.latent else state, image=hr)
    return out


def build_graphs(pipe: Pipeline, opts: ExportOptions) -> dict[str, Any]:
    """Export the encoder, step and decoder graphs (cleaned) and compose the unrolled graph."""
    # example batch 2: an example batch of 1 makes torch.export specialise the batch axis
    tile, spatial = _spatial_dims(pipe, opts)
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
            EncoderGraph(pipe), args, ins, ["x", "y", "cond"], ins, opts, spatial
        )
    if "step" in want:
        ins = ["x", "y", "cond", "t", "coef"] + (["noise"] if noisy else [])
        args = (x, y, cond, t, coef) + ((torch.randn(sshape, generator=g),) if noisy else ())
        batched = ["x", "y", "cond"] + (["noise"] if noisy else [])
        models["step"] = _export_one(StepGraph(pipe), args, ins, ["x_next"], batched, opts, spatial)
    if "decoder" in want:
        models["decoder"] = _export_one(
            DecoderGraph(pipe), (x,), ["x"], ["image"], ["x"], opts, spatial
        )
    if spatial:
        for m in models.values():
            _label_dims(m, _dim_labels(pipe))
    if opts.group_norm == GroupNormForm.INSTANCE:
        from deltadiff.export.lowering import lower_group_norm

        for m in models.values():
            lower_group_norm(m)
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
    rng = spatial_range(mult, opts) if opts.dynamic else None
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
        exporter={
            **versions(),
            "opset": opts.opset,
            "exporter": opts.exporter,
            "group_norm": opts.group_norm,
        },
        source=source,
        model_config=pipe.cfg.to_dict(),
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        dynamic=opts.dynamic,
        lr_min=rng.lr_min if rng else None,
        lr_max=rng.lr_max if rng else None,
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
    from deltadiff.manifest import load_manifest, update_manifest, verify_graph

    onnx = require("onnx")
    out = Path(model_dir)
    m = load_manifest(out)
    staged = {}
    islands: dict[str, dict[str, int]] = {}
    for name in ("encoder", "step", "decoder"):
        src = onnx.load(str(verify_graph(out, m.graph(name), what=f"graph {name}")))
        staged[name], islands[name] = convert_to_fp16(src, name, (rules or {}).get(name))
    models = dict(staged)
    if "unrolled" in m.graphs:
        un = compose_unrolled(staged["encoder"], staged["step"], staged["decoder"], m.step_table)
        models["unrolled"] = cleanup(un, "unrolled", slim=slim)
        islands["unrolled"] = {
            k: sum(v.get(k, 0) for v in islands.values()) for k in set().union(*islands.values())
        }
    fp16 = {
        f"{name}.fp16": write_graph(out, name, model, "fp16", islands[name])
        for name, model in models.items()
    }
    return update_manifest(out, lambda cur: replace(cur, graphs={**cur.graphs, **fp16}))
