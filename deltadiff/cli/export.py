"""``dd-export``: checkpoints -> ONNX graphs (-> engines), verification, training, conformance.

Thin typer commands over library functions; ``DeltaDiffError`` -> ``error: ...``, exit 1.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from deltadiff.errors import DeltaDiffError
from deltadiff.options import Backend, GroupNormForm, Precision, format_size, parse, parse_size

app = typer.Typer(
    name="dd-export",
    help="Export DeltaDiff / ResShift checkpoints to ONNX and TensorRT, verify them, train the demo model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

NOISY_LOGGERS = (
    "onnxscript",
    "onnx_ir",
    "torch.onnx",
    "torch._dynamo",
    "torch.export",
    "torch._export",
    "onnxslim",
)


def setup_logging(verbose: bool) -> None:
    from deltadiff.cli.run import setup_logging as base

    base(verbose)
    if not verbose:
        logging.getLogger("deltadiff").setLevel(logging.INFO)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def fail(exc: BaseException) -> None:
    from deltadiff.cli.run import fail as base

    base(exc)


def build_reference(
    preset: str | None,
    config: Path | None,
    unet_weights: Path | None,
    vq_weights: Path | None,
    family: str | None,
    schedule: str | None,
    step_rule: str | None,
    seed: int,
    ema: bool,
) -> tuple[Any, dict[str, Any]]:
    """The reference pipeline + the manifest ``source`` record that lets verify rebuild it."""
    from deltadiff.manifest import sha256_file
    from deltadiff.model import config as mc
    from deltadiff.model.pipeline import Pipeline

    if (preset is None) == (config is None):
        raise DeltaDiffError("pass exactly one of --preset NAME or --config UPSTREAM.yaml")
    if config is not None:
        cfg = mc.from_upstream_yaml(config, family=family)
        paths = mc.checkpoint_paths_from_yaml(config)
        unet_weights = unet_weights or paths.get("unet")
        vq_weights = vq_weights or (paths.get("vq") if cfg.latent else None)
        if unet_weights is None:
            raise DeltaDiffError(f"{config}: pass --unet-weights (the YAML has no model.ckpt_path)")
        if cfg.latent and vq_weights is None:
            raise DeltaDiffError(f"{config}: pass --vq-weights (autoencoder_vq_f4.pth)")
    else:
        cfg = mc.preset(preset)
        if family is not None and family != cfg.family:
            raise DeltaDiffError(f"--family {family} contradicts preset {preset} ({cfg.family})")
    if schedule is not None:
        try:
            lo, hi = (float(v) for v in schedule.split(","))
        except ValueError:
            raise DeltaDiffError(
                f"--schedule {schedule!r}: give MIN_NOISE_LEVEL,ETAS_END, e.g. 0.01,0.99"
            ) from None
        cfg = cfg.replace(
            schedule=dataclasses.replace(cfg.schedule, min_noise_level=lo, etas_end=hi)
        )
    if step_rule is not None:
        cfg = cfg.replace(step_rule=step_rule)
    pipe = Pipeline.build(cfg, unet_weights, vq_weights, seed=seed, ema=ema)

    def rec(p: Path | None) -> dict[str, str] | None:
        return None if p is None else {"path": str(Path(p).resolve()), "sha256": sha256_file(p)}

    source = {
        "kind": "yaml" if config else "preset",
        "preset": preset,
        "config": str(Path(config).resolve()) if config else None,
        "unet_weights": rec(unet_weights),
        "vq_weights": rec(vq_weights),
        "seed": seed if unet_weights is None else None,
        "ema": ema,
    }
    return pipe, source


@app.command()
def onnx(
    out: Annotated[Path, typer.Option("-o", "--out", help="Model directory to write.")],
    preset: Annotated[
        str | None, typer.Option(help="Preset name (random weights unless given).")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="Upstream ResShift/DeltaDiff YAML.")] = None,
    unet_weights: Annotated[
        Path | None, typer.Option(help="UNet checkpoint (.pth / .safetensors).")
    ] = None,
    vq_weights: Annotated[
        Path | None, typer.Option(help="VQ-f4 checkpoint (latent families).")
    ] = None,
    family: Annotated[
        str | None, typer.Option(help="deltadiff-latent | deltadiff-pixel | resshift-v3")
    ] = None,
    schedule: Annotated[
        str | None, typer.Option(help="min_noise_level,etas_end override, e.g. 0.5,0.999")
    ] = None,
    step_rule: Annotated[
        str | None, typer.Option(help="posterior | x0 | posterior-noise | pixel-renoise")
    ] = None,
    tile: Annotated[
        str,
        typer.Option(
            help="LR tile WIDTHxHEIGHT or N (static shape; with --dynamic the optimum size)."
        ),
    ] = "64",
    dynamic: Annotated[
        bool,
        typer.Option(help="Dynamic LR height/width (any multiple of the pad multiple in range)."),
    ] = False,
    min_lr: Annotated[
        str | None,
        typer.Option(help="--dynamic: smallest LR, WIDTHxHEIGHT or N (default: one multiple)."),
    ] = None,
    max_lr: Annotated[
        str | None, typer.Option(help="--dynamic: largest LR, WIDTHxHEIGHT or N (default 512).")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Largest batch the graphs are declared for.")] = 8,
    opset: Annotated[
        int, typer.Option(help="21: dynamo exporter; <=20: TorchScript exporter.")
    ] = 21,
    group_norm: Annotated[
        str,
        typer.Option(
            help="instance: GroupNorm as InstanceNormalization (faster on ONNX Runtime CPU); "
            "native: the opset-21 GroupNormalization op."
        ),
    ] = "instance",
    seed: Annotated[
        int, typer.Option(help="Seed of random weights (presets without weights).")
    ] = 0,
    ema: Annotated[
        bool, typer.Option(help="Prefer EMA weights inside trainer checkpoints.")
    ] = False,
    verify: Annotated[
        bool, typer.Option(help="Verify with onnxruntime against the reference.")
    ] = True,
    name: Annotated[
        str | None,
        typer.Option(help="Model name in the manifest and reports (default: preset or YAML stem)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Export encoder / step / decoder / unrolled ONNX graphs and manifest.json."""
    setup_logging(verbose)
    try:
        from deltadiff.export.graphs import TileShape
        from deltadiff.export.onnx_export import ExportOptions, export_onnx

        if opset > 21 or opset < 17:
            raise DeltaDiffError(f"--opset {opset}: use 17..21 (TensorRT parses up to 21)")
        pipe, source = build_reference(
            preset, config, unet_weights, vq_weights, family, schedule, step_rule, seed, ema
        )
        if name:
            from deltadiff.model.pipeline import Pipeline

            pipe = Pipeline(pipe.cfg.replace(name=name), pipe.unet, pipe.vq)
        h, w = parse_size(tile, "--tile")
        if not dynamic and (min_lr or max_lr):
            raise DeltaDiffError(
                "--min-lr / --max-lr set the range of a --dynamic export; add --dynamic"
            )
        m = export_onnx(
            pipe,
            out,
            ExportOptions(
                TileShape(h, w),
                opset=opset,
                max_batch=max_batch,
                dynamic=dynamic,
                min_lr=parse_size(min_lr, "--min-lr") if min_lr else None,
                max_lr=parse_size(max_lr, "--max-lr") if max_lr else None,
                group_norm=parse(GroupNormForm, group_norm, "--group-norm"),
            ),
            source=source,
        )
        if m.dynamic:
            typer.echo(
                f"dynamic    LR {format_size(m.lr_min)}..{format_size(m.lr_max)} (WxH) in "
                f"multiples of {m.lr_multiple} (optimum {format_size(m.tile)})"
            )
        for k, g in m.graphs.items():
            typer.echo(f"{k:<10} {out / g.file}  {g.bytes / 1e6:.1f} MB")
        ok = (
            _verify_and_print(out, Backend.ONNXRUNTIME, Precision.FP32, None, 0, 1, None, 0)
            if verify
            else True
        )
    except DeltaDiffError as exc:
        fail(exc)
    if not ok:
        raise typer.Exit(1)


def _verify_and_print(
    model: Path,
    backend: str,
    precision: str,
    images: list[Path] | None,
    seed: int,
    batch: int,
    min_psnr: float | None,
    threads: int,
    **kw: Any,
) -> bool:
    from deltadiff.export.verify import verify as run_verify

    rep = run_verify(
        model,
        backend=backend,
        precision=precision,
        images=images,
        seed=seed,
        batch=batch,
        min_psnr=min_psnr,
        threads=threads,
        **kw,
    )
    typer.echo(f"verify {backend}/{precision} vs PyTorch reference ({rep.inputs}):")
    for r in rep.stages + rep.end_to_end:
        typer.echo("  " + r.line())
    typer.echo(
        ("PASS" if rep.passed else "FAIL")
        + f": end-to-end PSNR {rep.psnr:.1f} dB (min {rep.min_psnr:.0f} dB)"
    )
    return rep.passed


@app.command()
def verify(
    model: Annotated[Path, typer.Option(help="Model directory.")],
    backend: Annotated[
        str, typer.Option(help="onnxruntime | onnxruntime-cuda | tensorrt")
    ] = Backend.ONNXRUNTIME,
    precision: Annotated[str, typer.Option(help="fp32 | fp16 | int8")] = Precision.FP32,
    images: Annotated[
        list[Path] | None, typer.Option(help="Image files to take tiles from (repeatable).")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    batch: Annotated[int, typer.Option(help="Random tiles per run when no images are given.")] = 1,
    min_psnr: Annotated[
        float | None,
        typer.Option(help="End-to-end PSNR threshold (default 60 fp32 / 40 fp16 / 35 int8)."),
    ] = None,
    threads: Annotated[int, typer.Option()] = 0,
    unet_weights: Annotated[
        Path | None, typer.Option(help="Override the reference UNet weights.")
    ] = None,
    vq_weights: Annotated[
        Path | None, typer.Option(help="Override the reference VQ weights.")
    ] = None,
    size: Annotated[
        list[str] | None,
        typer.Option(
            help="Dynamic models: LR size WIDTHxHEIGHT or N to verify at (repeatable; padded)."
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run a backend against the PyTorch reference; exit 1 below the PSNR threshold."""
    setup_logging(verbose)
    try:
        ok = True
        for lr_hw in [parse_size(x, "--size") for x in size or []] or [None]:
            ok = (
                _verify_and_print(
                    model,
                    backend,
                    precision,
                    images,
                    seed,
                    batch,
                    min_psnr,
                    threads,
                    unet_weights=unet_weights,
                    vq_weights=vq_weights,
                    lr_hw=lr_hw,
                    record=lr_hw is None,
                )
                and ok
            )
    except DeltaDiffError as exc:
        fail(exc)
    if not ok:
        raise typer.Exit(1)


@app.command()
def fp16(
    model: Annotated[Path, typer.Option(help="Model directory made by dd-export onnx.")],
    verify: Annotated[
        bool, typer.Option(help="Verify the FP16 graphs with onnxruntime (CPU).")
    ] = True,
    auto_islands: Annotated[
        bool,
        typer.Option(
            help="Find the step graph's FP32 islands by measurement instead of fp16_islands.json "
            "(and compare both)."
        ),
    ] = False,
    threads: Annotated[int, typer.Option(help="onnxruntime CPU threads (0: all).")] = 0,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Add FP16 graphs with FP32 islands (GroupNorm, softmax, sinusoids, VQ argmin, state update)."""
    setup_logging(verbose)
    try:
        from deltadiff.export.onnx_export import add_fp16

        rules = None
        if auto_islands:
            from deltadiff.calibration.islands import auto_islands as find_islands

            res = find_islands(model, threads=threads)
            typer.echo(
                "FP16 sensitivity (step graph; end to end vs FP32 with the unit alone in FP16):"
            )
            for r in sorted(res.table, key=lambda r: r["e2e_db_alone_fp16"]):
                typer.echo(f"  {r['unit']:<28} {r['e2e_db_alone_fp16']:8.2f} dB")
            typer.echo(
                f"auto islands ({', '.join(r.name for r in res.rules) or 'none'}): "
                f"{res.auto.e2e_min_db:.2f} dB, {res.auto_fp32_nodes} FP32 nodes; hand-written list: "
                f"{res.hand.e2e_min_db:.2f} dB, {res.hand_fp32_nodes} FP32 nodes"
            )
            rules = {"step": res.rules}
        m = add_fp16(model, rules=rules)
        for k, g in m.graphs.items():
            if g.precision == Precision.FP16:
                typer.echo(
                    f"{k:<14} {model / g.file}  {g.bytes / 1e6:.1f} MB  FP32 islands: {', '.join(g.fp32_islands)}"
                )
        ok = (
            _verify_and_print(model, Backend.ONNXRUNTIME, Precision.FP16, None, 0, 1, None, 0)
            if verify
            else True
        )
    except DeltaDiffError as exc:
        fail(exc)
    if not ok:
        raise typer.Exit(1)


def parse_profile(text: str) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """``MIN:OPT:MAX`` LR sizes, each WIDTHxHEIGHT or N -> three (height, width)."""
    parts = text.split(":")
    if len(parts) != 3:
        raise DeltaDiffError(f"--profile {text!r}: give MIN:OPT:MAX LR sizes, e.g. 64:128:256")
    lo, opt, hi = (parse_size(p, "--profile") for p in parts)
    if not (lo[0] <= opt[0] <= hi[0] and lo[1] <= opt[1] <= hi[1]):
        raise DeltaDiffError(f"--profile {text!r}: needs MIN <= OPT <= MAX on both axes")
    return lo, opt, hi


@app.command("measure-memory")
def measure_memory(
    model: Annotated[Path, typer.Option(help="Model directory made by dd-export onnx --dynamic.")],
    sizes: Annotated[
        str,
        typer.Option(
            help="LR sizes to run at, each WIDTHxHEIGHT or N (comma list, >= 2; the fit uses "
            "the three largest: a + b*px + c*px^2, a line with two)."
        ),
    ] = "64,128,192",
    precision: Annotated[
        str, typer.Option(help="fp32 | fp16 | int8 (calibrate records int8 by itself)")
    ] = "fp32",
    mode: Annotated[str, typer.Option(help="staged | unrolled")] = "staged",
    threads: Annotated[int, typer.Option(help="onnxruntime threads (0: all).")] = 0,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Measure peak RSS per HR megapixel on ONNX Runtime CPU (one real run per size, each in a
    fresh process) and record it in the manifest; the runtime sizes whole images with it."""
    setup_logging(verbose)
    try:
        from dataclasses import replace

        from deltadiff.manifest import update_manifest
        from deltadiff.runtime.memory_budget import measure, memory_text, record_key

        rec = measure(
            model,
            [parse_size(x, "--sizes") for x in sizes.split(",") if x.strip()],
            precision=precision,
            mode=mode,
            threads=threads,
        )
        key = record_key("onnxruntime", precision, mode)
        update_manifest(model, lambda m: replace(m, memory={**m.memory, key: rec}))
        for p in rec["points"]:
            typer.echo(f"LR {format_size(p['lr'])}: peak RSS {p['peak_bytes'] / (1 << 20):.0f} MiB")
        typer.echo(f"{key}: {memory_text(rec)} (recorded in {model / 'manifest.json'})")
    except DeltaDiffError as exc:
        fail(exc)


@app.command("build-engine")
def build_engine(
    model: Annotated[Path, typer.Option(help="Model directory made by dd-export onnx.")],
    precision: Annotated[
        str,
        typer.Option(
            help="fp16 | fp32 | int8 (fp16 graphs are made if missing; int8 needs calibrate --target tensorrt)"
        ),
    ] = "fp16",
    flavour: Annotated[
        str | None,
        typer.Option(help="tensorrt | tensorrt_rtx (default: whichever is installed, full first)"),
    ] = None,
    graphs: Annotated[
        str, typer.Option(help="Comma list of graphs to build.")
    ] = "encoder,step,decoder,unrolled",
    batch: Annotated[str, typer.Option(help="Optimization profile: OPT or OPT,MAX batch.")] = "1",
    profile: Annotated[
        list[str] | None,
        typer.Option(
            help="Dynamic models: LR MIN:OPT:MAX sizes (WIDTHxHEIGHT or N each), e.g. "
            "64x48:128x96:256x192; "
            "repeatable (one profile each; the first must hold the manifest tile). "
            "Default: the manifest's range and tile."
        ),
    ] = None,
    timing_cache: Annotated[
        Path | None, typer.Option(help="Timing cache file (default: in the model dir).")
    ] = None,
    opt_level: Annotated[int, typer.Option(help="Builder optimization level 0..5.")] = 3,
    workspace: Annotated[float, typer.Option(help="Workspace limit in GiB.")] = 4.0,
    target: Annotated[
        list[str] | None,
        typer.Option(help="TensorRT-RTX compute capability, e.g. sm86 (repeatable)."),
    ] = None,
    tf32: Annotated[bool, typer.Option(help="Allow TF32 in FP32 engines.")] = False,
    force: Annotated[
        bool, typer.Option(help="Rebuild even if the cache key is unchanged.")
    ] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Build strongly typed TensorRT engines; rebuild only when the cache key changes."""
    setup_logging(verbose)
    try:
        from deltadiff.export.engine import EngineOptions, build_engines
        from deltadiff.manifest import load_manifest

        precision = parse(Precision, precision, "--precision")
        if precision is Precision.INT8 and graphs == "encoder,step,decoder,unrolled":
            graphs = "encoder,step,decoder"  # INT8 graphs are per row and staged only
        try:
            parts = [int(b) for b in batch.split(",")]
        except ValueError:
            raise DeltaDiffError(f"--batch {batch!r}: give OPT or OPT,MAX as integers") from None
        if precision is Precision.FP16 and "step.fp16" not in load_manifest(model).graphs:
            from deltadiff.export.onnx_export import add_fp16

            add_fp16(model)
        opts = EngineOptions(
            precision=precision,
            flavour=flavour,
            graphs=tuple(g.strip() for g in graphs.split(",") if g.strip()),
            batch_opt=parts[0],
            batch_max=parts[1] if len(parts) > 1 else None,
            opt_level=opt_level,
            workspace_gb=workspace,
            timing_cache=timing_cache,
            targets=tuple(target or ()),
            tf32=tf32,
            force=force,
            profiles=tuple(parse_profile(p) for p in profile or ()),
        )
        _m, built = build_engines(model, opts)
        for e in built:
            state = "reused" if e.get("reused") else f"built in {e['build_seconds']} s"
            typer.echo(
                f"{e['graph']:<9} {model / e['file']}  {e['bytes'] / 1e6:.1f} MB  {e['flavour']} {e['version']} "
                f"targets {','.join(e['targets']) or e['gpu']}  {state}"
            )
    except DeltaDiffError as exc:
        fail(exc)


@app.command()
def triton(
    model: Annotated[Path, typer.Option(help="Model directory made by dd-export onnx.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Repository folder to write.")],
    engine: Annotated[
        str, typer.Option(help="tensorrt (engine cache) | onnxruntime | python (lean runtime)")
    ] = "onnxruntime",
    precision: Annotated[str, typer.Option(help="fp32 | fp16")] = "fp32",
    mode: Annotated[
        str, typer.Option(help="staged (encoder/step/decoder) | unrolled (one graph)")
    ] = "staged",
    flavour: Annotated[
        str | None, typer.Option(help="tensorrt: engines of tensorrt | tensorrt_rtx (default: any)")
    ] = None,
    instances: Annotated[int, typer.Option(help="Instances per stage model.")] = 1,
    kind: Annotated[
        str | None, typer.Option(help="gpu | cpu (default: gpu, cpu for python)")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Requests per dynamic batch of deltadiff.")] = 8,
    queue_delay_us: Annotated[int, typer.Option(help="Dynamic batcher delay (us).")] = 5000,
    threads: Annotated[int, typer.Option(help="python stages: onnxruntime threads.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty repository.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Write a Triton model repository (stage models + the 'deltadiff' BLS model) and check it."""
    setup_logging(verbose)
    try:
        from deltadiff.runtime.serving.triton_repo import (
            TritonRepoOptions,
            check_repository,
            write_repository,
        )

        repo = write_repository(
            model,
            out,
            TritonRepoOptions(
                engine=engine,
                precision=precision,
                mode=mode,
                flavour=flavour,
                instances=instances,
                kind=kind,
                max_batch=max_batch,
                queue_delay_us=queue_delay_us,
                threads=threads,
                overwrite=overwrite,
            ),
        )
        rep = check_repository(repo)
    except DeltaDiffError as exc:
        fail(exc)
    for line in rep.lines():
        typer.echo(line)
    typer.echo(f"repository {repo} ({engine}, {precision}, {mode}); see {repo / 'README.md'}")
    if not rep.ok:
        raise typer.Exit(1)


@app.command("triton-check")
def triton_check(
    repo: Annotated[Path, typer.Argument(help="Repository written by dd-export triton.")],
) -> None:
    """Check a Triton repository: every model's inputs/outputs/dims agree with the manifest."""
    setup_logging(False)
    try:
        from deltadiff.runtime.serving.triton_repo import check_repository

        rep = check_repository(repo)
    except DeltaDiffError as exc:
        fail(exc)
    for line in rep.lines():
        typer.echo(line)
    if not rep.ok:
        raise typer.Exit(1)


@app.command()
def train(
    data: Annotated[
        list[Path], typer.Option(help="Folder of HR training images (repeat for several).")
    ],
    out: Annotated[
        Path, typer.Option("-o", "--out", help="Run directory (checkpoints, log, config).")
    ],
    preset: Annotated[str, typer.Option(help="deltadiff-pixel preset to train.")] = "demo-pixel",
    iters: Annotated[int, typer.Option()] = 5000,
    batch: Annotated[int, typer.Option()] = 8,
    crop: Annotated[int, typer.Option(help="HR crop side (multiple of 16).")] = 96,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 2.5e-4,
    lr_min: Annotated[float, typer.Option(help="Learning rate at the end of the cosine.")] = 2e-5,
    warmup: Annotated[int, typer.Option(help="Linear warm-up iterations.")] = 200,
    seed: Annotated[int, typer.Option()] = 123456,
    val: Annotated[
        Path | None, typer.Option(help="gt/ + lq/ folder, PSNR-Y logged (never trained on).")
    ] = None,
    save_every: Annotated[int, typer.Option()] = 500,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: default).")] = 0,
    rollout: Annotated[
        float,
        typer.Option(help="Probability of training rows t<3 on the model's own chain states."),
    ] = 0.0,
    rollout_rule: Annotated[str, typer.Option(help="Step rule of that chain.")] = "posterior",
    stop_at: Annotated[
        int | None, typer.Option(help="Stop at this iteration (the schedule spans --iters).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from OUT/train_state.pth if present.")
    ] = True,
    init: Annotated[
        Path | None,
        typer.Option(help="Start from these weights (.pth / .safetensors), e.g. to fine-tune."),
    ] = None,
    qat: Annotated[
        bool,
        typer.Option(
            help="Quantization-aware: INT8 fake quantization (U8 activations, 7-bit per-channel "
            "weights, as calibrate writes for onnxruntime) in every Conv/Linear; use with --init."
        ),
    ] = False,
    lpips_weight: Annotated[
        float,
        typer.Option(help="Add this weight x LPIPS(x0, gt) to the MSE (the official recipe: 1.0)."),
    ] = 0.0,
    lpips_weights: Annotated[
        Path | None,
        typer.Option(
            help="LPIPS AlexNet weights (lpips_alex_v0.1.npz); default: DD_LPIPS_WEIGHTS."
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Train a deltadiff-pixel model with the DeltaDiff recipe (MSE [+ LPIPS] on x0, EMA, resumable)."""
    setup_logging(verbose)
    try:
        from deltadiff.model.train import TrainOptions
        from deltadiff.model.train import train as run_train

        opts = TrainOptions(
            data=tuple(data),
            out=out,
            preset=preset,
            iters=iters,
            batch=batch,
            crop=crop,
            lr=lr,
            lr_min=lr_min,
            warmup=warmup,
            seed=seed,
            val=val,
            save_every=save_every,
            threads=threads,
            rollout=rollout,
            rollout_rule=rollout_rule,
            stop_at=stop_at,
            init=init,
            qat=qat,
            lpips_weight=lpips_weight,
            lpips_weights=lpips_weights,
        )
        final = run_train(opts, resume=resume, progress=True)
        typer.echo(f"EMA weights: {final}")
    except DeltaDiffError as exc:
        fail(exc)


@app.command()
def calibrate(
    model: Annotated[Path, typer.Option(help="Model directory with FP32 graphs (dd-export onnx).")],
    data: Annotated[
        Path,
        typer.Option(help="Folder of LR images, or an x4 set with gt/ + lq/ (adds PSNR-Y vs HR)."),
    ],
    target: Annotated[
        str,
        typer.Option(help="onnxruntime (U8/S8 QDQ for its CPU kernels) | tensorrt (S8 symmetric)."),
    ] = "onnxruntime",
    method: Annotated[
        str,
        typer.Option(
            help="auto (measure all, keep the best) | minmax | percentile | entropy | mse"
        ),
    ] = "auto",
    samples: Annotated[
        int, typer.Option(help="Calibration images; the rest of --data is held out for the gate.")
    ] = 4,
    cache: Annotated[
        Path | None, typer.Option(help="Ranges cache (JSON): reused if present, written if not.")
    ] = None,
    search: Annotated[
        bool, typer.Option(help="Sensitivity search (keeps the fewest blocks FP32 for the gate).")
    ] = True,
    search_images: Annotated[int, typer.Option(help="Held-out images the search checks.")] = 4,
    coarse: Annotated[
        bool,
        typer.Option(help="Search whole graphs (rows, VQ encoder / decoder), not UNet blocks."),
    ] = False,
    search_from: Annotated[
        Path | None,
        typer.Option(
            help="Reuse another target's search (DIR/int8-report.onnxruntime.json): its method "
            "and cost order; only the gate (and a bisection if it fails) runs."
        ),
    ] = None,
    rank: Annotated[
        str,
        typer.Option(
            help="Search order: per-mac (quality cost per MAC moved to INT8: most compute in "
            "INT8 for the gate) | cost (quality cost alone: fewest units kept FP32)."
        ),
    ] = "per-mac",
    units: Annotated[
        str,
        typer.Option(
            help="Search unit inside a row: block (a UNet block) | layer (one Conv / MatMul "
            "layer: finer, ~2.5x the sensitivity runs on the demo). --search-from takes the "
            "other report's units."
        ),
    ] = "block",
    threads: Annotated[int, typer.Option(help="onnxruntime CPU threads (0: all).")] = 0,
    gate_data: Annotated[
        Path | None,
        typer.Option(
            help="x4 pairs (gt/ + lq/) for the runtime gate: once the graphs are written, each "
            "LR image runs whole through the runtime at FP32 and INT8 (dd-export gate); its "
            "verdict decides whether the graphs are usable. Must not hold calibration images."
        ),
    ] = None,
    gate_cache: Annotated[
        Path | None, typer.Option(help="FP32 output cache of the runtime gate.")
    ] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """INT8 Q/DQ graphs (step per row; the latent families' VQ encoder / decoder) from real images; gate: >= 35 dB vs FP32 (and PSNR-Y vs HR
    within 0.10 dB); exit 1 when the gate fails (graphs are then recorded as not usable)."""
    setup_logging(verbose)
    try:
        from deltadiff.calibration.calibrate import CalibrateOptions
        from deltadiff.calibration.calibrate import calibrate as run_calibrate

        opts = CalibrateOptions(
            model=model,
            data=data,
            target=target,
            method=method,
            samples=samples,
            cache=cache,
            threads=threads,
            search=search,
            search_images=search_images,
            coarse=coarse,
            search_from=search_from,
            rank=rank,
            units=units,
            gate_data=gate_data,
            gate_cache=gate_cache,
        )
        res = run_calibrate(opts, progress=typer.echo)
        for k, g in res.records.items():
            if k.startswith("step") or g.quant.get("int8_nodes"):
                q = g.quant
                typer.echo(
                    f"{k:<28} {g.file:<44} int8 nodes {q.get('int8_nodes', 0):>3}"
                    + (
                        f"  kept FP32: {', '.join(x['block'] for x in q.get('kept_fp32', []) if isinstance(x, dict) and 'block' in x)}"
                        if isinstance(q.get("kept_fp32"), list)
                        else ""
                    )
                )
        typer.echo(f"report: {res.report_path} (+ .md)")
        typer.echo(
            ("PASS" if res.passed else "FAIL")
            + f": INT8 ({res.target}, {res.method}) {res.score.line()}"
            + (f"; runtime gate {'pass' if res.gate.passed else 'FAIL'}" if res.gate else "")
            + ("" if res.passed else "; the graphs are recorded as not usable")
        )
    except DeltaDiffError as exc:
        fail(exc)
    if not res.passed:
        raise typer.Exit(1)


@app.command()
def gate(
    model: Annotated[
        Path, typer.Option(help="Model directory (dd-export onnx + calibrate / fp16).")
    ],
    data: Annotated[Path, typer.Option(help="x4 pairs: a folder with gt/ (HR) and lq/ (LR).")],
    precision: Annotated[
        str, typer.Option(help="The precision to gate against FP32: int8 | fp16.")
    ] = "int8",
    target: Annotated[str, typer.Option(help="INT8 graphs' target (onnxruntime).")] = "onnxruntime",
    out: Annotated[
        Path | None, typer.Option(help="Report folder (default: the model directory).")
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(help="FP32 output cache (default: ~/.cache/deltadiff/gate-fp32)."),
    ] = None,
    threads: Annotated[int, typer.Option(help="onnxruntime CPU threads (0: all).")] = 0,
    limit: Annotated[int | None, typer.Option(help="Gate the first N pairs only.")] = None,
    sources: Annotated[
        Path | None, typer.Option(help="Corpus manifest naming each image's source.")
    ] = None,
    record: Annotated[
        bool,
        typer.Option(
            help="Write the verdict into the manifest's INT8 records (usable + runtime_gate)."
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Runtime gate: every LR image whole through the runtime at FP32 and --precision, PSNR-Y vs HR.
    Passes if the mean loss <= 0.10 dB, the worst image loses <= 0.30 dB and no 8 px border strip
    loses 0.30 dB more than the interior. Report (JSON + Markdown + worst-five strip) in --out;
    exit 1 on failure."""
    setup_logging(verbose)
    try:
        from deltadiff.calibration.gate import GateOptions, record_gate, run_gate

        opts = GateOptions(
            model=model,
            data=data,
            precision=precision,
            target=target,
            out=out,
            cache=cache,
            threads=threads,
            limit=limit,
            sources=sources,
        )
        res = run_gate(opts, progress=logging.getLogger("deltadiff.gate").info)
        if record:
            record_gate(model, res)
    except DeltaDiffError as exc:
        fail(exc)
    typer.echo(res.line() + (" (recorded in the manifest)" if record else ""))
    if not res.passed:
        raise typer.Exit(1)


@app.command()
def golden(
    folder: Annotated[
        Path | None,
        typer.Argument(
            help="Folder laid out like tests/golden (default: the repository's tests/golden).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Check the reference against a golden folder (same as python -m deltadiff.model.golden)."""
    from deltadiff.model.golden import main as golden_main

    raise typer.Exit(golden_main([str(folder)] if folder else []))


def main() -> None:
    from deltadiff.cli.run import run_app

    run_app(app)


if __name__ == "__main__":
    main()
