"""``dd-run``: upscale images and benchmark backends, without torch.

Thin typer commands: parse options into a dataclass, call one library function, render the
result. ``DeltaDiffError`` becomes ``error: ...`` on stderr and exit code 1, with no traceback.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from deltadiff.errors import DeltaDiffError
from deltadiff.options import DEFAULT_MODE, Backend, Precision, format_size, parse_size

app = typer.Typer(
    name="dd-run",
    help="Run DeltaDiff x4 super-resolution models (ONNX Runtime / TensorRT), no PyTorch needed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

QUIET_LOGGERS = ("onnxruntime", "PIL", "matplotlib")


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(show_time=False, show_path=verbose, markup=False, console=_stderr())],
        force=True,
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _stderr():  # noqa: ANN202 - rich Console
    from rich.console import Console

    return Console(stderr=True)


def fail(exc: BaseException) -> None:
    from rich.markup import escape

    _stderr().print(
        f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True
    )
    raise typer.Exit(1)


@app.command()
def upscale(
    inputs: Annotated[
        list[Path], typer.Argument(help="Image files and/or folders.", show_default=False)
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Output file (one input) or folder.")
    ],
    model: Annotated[
        Path | None, typer.Option(help="Model directory (default: the bundled demo model).")
    ] = None,
    backend: Annotated[
        str, typer.Option(help="onnxruntime | onnxruntime-cuda | tensorrt")
    ] = Backend.ONNXRUNTIME,
    precision: Annotated[
        str | None,
        typer.Option(
            help="fp32 | fp16 | int8 (graphs/engines of that precision). Default: int8 on "
            "onnxruntime (CPU, staged) when the model has INT8 graphs that passed the "
            "calibration gate, else fp32.",
            show_default=False,
        ),
    ] = None,
    mode: Annotated[str, typer.Option(help="staged | unrolled graph execution")] = DEFAULT_MODE,
    tile: Annotated[
        int | None,
        typer.Option(
            help="LR tile side. Dynamic models: any multiple in range (default: whole image "
            "when it fits, else the largest tile that fits); static models: the export's."
        ),
    ] = None,
    max_memory: Annotated[
        float | None,
        typer.Option(help="GiB of peak memory for a CPU run (default: half of what is free)."),
    ] = None,
    overlap: Annotated[int | None, typer.Option(help="Tile overlap in LR pixels.")] = None,
    batch: Annotated[int, typer.Option(help="Tiles per backend call.")] = 1,
    threads: Annotated[int, typer.Option(help="CPU threads for onnxruntime (0: all).")] = 0,
    seed: Annotated[int, typer.Option(help="Noise seed (resshift-v3 only).")] = 0,
    suffix: Annotated[
        str | None, typer.Option(help="Output format suffix, e.g. .png (default: keep).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    recursive: Annotated[bool, typer.Option(help="Walk folders recursively.")] = True,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bars.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Debug logging.")] = False,
) -> None:
    """Upscale images x4. A failing file is reported and the rest go on; exit 1 if any failed."""
    setup_logging(verbose)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler, plan_outputs, run_job

    err = _stderr()
    try:
        opts = UpscaleOptions(
            backend=backend,
            precision=precision,
            mode=mode,
            threads=threads,
            tile=tile,
            overlap=overlap,
            batch=batch,
            seed=seed,
            max_memory=max_memory,
        )
        if suffix is not None and not suffix.startswith("."):
            suffix = "." + suffix
        pairs = plan_outputs(inputs, output, recursive=recursive, suffix=suffix)
        if not pairs:
            raise DeltaDiffError(f"no images found in {', '.join(map(str, inputs))}")
        up = Upscaler(model, opts)
    except DeltaDiffError as exc:
        fail(exc)
    if not quiet:
        err.print(up.choice.line(), highlight=False, markup=False)
    with (
        up,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[name]}"),
            TimeRemainingColumn(),
            console=err,
            disable=quiet,
            transient=True,
        ) as bar,
    ):
        task = bar.add_task("files", total=len(pairs), name="")
        tiles = bar.add_task("tiles", total=1, name="", visible=False)

        def on_file(src: Path, status: str) -> None:
            bar.update(task, advance=1, name=src.name)
            bar.update(tiles, visible=False)

        def on_tile(src: Path, done: int, total: int) -> None:
            if done == 0 and total > 1:  # a big image: say up front what it will run
                tile = format_size(up.last_plan.tile)
                if not quiet:
                    bar.console.print(f"{src.name}: {total} tiles of {tile} LR", highlight=False)
                bar.reset(tiles, total=total, name=f"tiles of {src.name}", visible=True)
            elif total > 1:
                bar.update(tiles, completed=done)

        summary = run_job(up, pairs, overwrite=overwrite, on_file=on_file, on_tile=on_tile)
    from rich.markup import escape

    out = Console(stderr=True, highlight=False, soft_wrap=True)
    for src, why in summary.failed:
        msg = why if str(src) in why else f"{src}: {why}"
        out.print(f"[red]failed[/]  {escape(msg)}")
    for _src, why in summary.skipped:
        out.print(f"[yellow]skipped[/] {escape(why)}")
    out.print(
        f"{len(summary.done)} upscaled, {len(summary.skipped)} skipped, {len(summary.failed)} failed "
        f"in {summary.seconds:.1f} s (model {up.m.name}, {backend}/{up.opts.precision}, {mode})"
    )
    if not summary.ok:
        raise typer.Exit(1)


@app.command()
def info(
    model: Annotated[
        Path | None, typer.Option(help="Model directory (default: bundled demo).")
    ] = None,
    backend: Annotated[str, typer.Option(help="Backend the fit is for.")] = "onnxruntime",
    precision: Annotated[
        str | None,
        typer.Option(help="fp32 | fp16 | int8 (default: as dd-run upscale chooses)"),
    ] = None,
    mode: Annotated[str, typer.Option(help="staged | unrolled")] = "staged",
    max_memory: Annotated[
        float | None, typer.Option(help="GiB of peak memory (default: half of what is free).")
    ] = None,
    size: Annotated[
        list[str] | None,
        typer.Option(
            help="LR image size WIDTHxHEIGHT or N to show the plan for (repeatable), e.g. 640x480."
        ),
    ] = None,
) -> None:
    """Show a model directory's manifest summary (family, tile/range, graphs, engines,
    verification) and what fits: which image sizes run whole and which tile larger ones use."""
    setup_logging(False)
    from deltadiff.cpu import cpu_info
    from deltadiff.manifest import load_manifest
    from deltadiff.runtime.memory_budget import memory_text
    from deltadiff.runtime.precision import choose_precision
    from deltadiff.runtime.upscaler import UpscaleOptions, default_model_dir

    try:
        d = model or default_model_dir()
        m = load_manifest(d)
        opts = UpscaleOptions(
            backend=backend, precision=precision, mode=mode, max_memory=max_memory
        )
        choice = choose_precision(m, opts.backend, opts.mode, opts.precision)
        opts = replace(opts, precision=choice.precision)
        sizes = [parse_size(x, "--size") for x in size or []]
    except DeltaDiffError as exc:
        fail(exc)
    typer.echo(f"model       {m.name} ({m.family}) at {d}")
    typer.echo(f"cpu         {cpu_info().model} ({cpu_info().isa})")
    typer.echo(
        f"precision   {choice.precision} ({'asked for' if choice.explicit else 'default'}: {choice.reason})"
    )
    if m.dynamic:
        lo, hi = m.lr_range()
        typer.echo(
            f"shapes      dynamic: LR {format_size(lo)}..{format_size(hi)} (WxH), pad multiple "
            f"{m.lr_multiple}; optimum {format_size(m.tile)}; batch {m.batch[0]}..{m.batch[1]}"
        )
    else:
        typer.echo(
            f"tile        {format_size(m.tile)} LR -> {4 * m.tile[1]}x{4 * m.tile[0]} (WxH), "
            f"batch {m.batch[0]}..{m.batch[1]} (static shapes; pad multiple {m.lr_multiple})"
        )
    typer.echo(
        f"step rule   {m.step_table.rule}; rows "
        + ", ".join(
            f"t={r.t}: in {r.in_scale:.4f} a {r.a:.4f} b {r.b:.4f} c {r.c:.4f} s {r.s:.4f}"
            for r in m.step_table.rows
        )
    )
    for k, g in m.graphs.items():
        typer.echo(f"graph       {k:<14} {g.file:<24} {g.bytes / 1e6:8.1f} MB  {g.precision}")
    for e in m.engines:
        prof = "; profiles " + " ".join(
            ":".join(format_size(hw) for hw in p) for p in e.get("profiles", [])
        )
        typer.echo(
            f"engine      {e.get('graph')} {e.get('file')} {e.get('flavour')} {e.get('precision')}"
            + (prof if e.get("profiles") else "")
        )
    for k, r in m.memory.items():
        typer.echo(
            f"memory      {k}: {memory_text(r)} (peak RSS, measured {r.get('date', '?')[:10]})"
        )
    v = m.verification
    if v:
        typer.echo(
            f"verified    {v.get('backend')} {v.get('precision')}: end-to-end PSNR {v.get('psnr_db')} dB, passed={v.get('passed')}"
        )
    for line in fit_lines(m, opts, sizes):
        typer.echo(line)


def fit_lines(m, opts, sizes: list[tuple[int, int]]) -> list[str]:  # noqa: ANN001
    """What fits: the whole-image limit for these options and the plan for given sizes."""
    from deltadiff.runtime.memory_budget import default_budget
    from deltadiff.runtime.upscaler import engine_boxes, fixed_tile, max_lr_pixels, plan_image

    where = f"{opts.backend}/{opts.precision}/{opts.mode}"
    out = []
    max_px = max_lr_pixels(m, opts)
    boxes = engine_boxes(m, opts)
    if fixed_tile(m, opts):
        th, tw = m.tile
        out.append(
            f"fits        {where}: whole up to {tw}x{th} LR (WxH); larger images run in "
            f"{tw}x{th} tiles (static export)"
        )
    elif boxes is not None:
        built = any(e.get("precision") == opts.precision and e.get("profiles") for e in m.engines)
        held = ", ".join(f"{lo[1]}x{lo[0]}..{hi[1]}x{hi[0]}" for lo, hi in boxes)
        w1, h1 = max(hi[1] for _, hi in boxes), max(hi[0] for _, hi in boxes)
        note = (
            "the engines' optimization profiles"
            if built
            else f"no {opts.precision} engines built yet: the model's range; dd-export "
            "build-engine --profile MIN:OPT:MAX sets the profiles"
        )
        out.append(
            f"fits        {where}: whole images inside one of {held} LR (WxH; {note}); "
            f"larger ones in the largest tiles a profile holds (up to {w1}x{h1}); GPU memory "
            "for a profile's maximum is reserved when the engines load"
        )
    else:
        (h0, w0), (h1, w1) = m.lr_range()
        if max_px is None:
            limit = "no memory limit applied (GPU)"
        elif opts.memory_key() not in m.memory:
            limit = (
                f"no memory measurement for {where}: whole images up to the optimum's area "
                f"({max_px / 1e6:.3f} LR MP); record one with dd-export measure-memory"
            )
        else:
            budget = opts.max_memory * (1 << 30) if opts.max_memory else default_budget()
            side = int(max_px**0.5) // m.lr_multiple * m.lr_multiple
            limit = (
                f"budget {budget / (1 << 30):.1f} GiB -> whole images up to {max_px / 1e6:.3f} "
                f"LR MP (about {side}x{side})"
            )
        out.append(
            f"fits        {where}: whole images up to {w1}x{h1} LR (WxH) within the range; " + limit
        )
    for h, w in sizes:
        p = plan_image(m, opts, h, w, max_px)
        what = "whole" if p.whole else f"tiles of {p.tile[1]}x{p.tile[0]}"
        out.append(f"plan        {w}x{h} LR -> {4 * w}x{4 * h}: {what} ({p.reason})")
    return out


@app.command()
def probe(
    model: Annotated[
        Path | None, typer.Option(help="Model directory (default: bundled demo).")
    ] = None,
    lr: Annotated[int, typer.Option(help="LR side of the timed square image.")] = 64,
    runs: Annotated[int, typer.Option(help="Timed runs per precision (medians).")] = 3,
    threads: Annotated[int, typer.Option(help="CPU threads for onnxruntime (0: all).")] = 0,
) -> None:
    """Measure FP32 vs INT8 on this CPU (interleaved, after a warm-up) and cache the result:
    the default precision then follows the measurement instead of the CPU's ISA."""
    setup_logging(False)
    from deltadiff.manifest import load_manifest
    from deltadiff.runtime.precision import MIN_SPEEDUP, save_probe
    from deltadiff.runtime.probe import run_probe
    from deltadiff.runtime.upscaler import default_model_dir

    try:
        d = model or default_model_dir()
        why = load_manifest(d).int8_status("onnxruntime")
        if why:
            raise DeltaDiffError(f"nothing to probe: {why}")
        rec = run_probe(d, lr=lr, runs=runs, threads=threads)
        path = save_probe(rec)
    except DeltaDiffError as exc:
        fail(exc)
    pick = "int8" if rec.speedup >= MIN_SPEEDUP else "fp32"
    typer.echo(
        f"{rec.cpu} ({rec.isa}), {rec.threads} threads, {lr}x{lr} LR, median of {runs}: "
        f"FP32 {rec.fp32_s:.2f} s, INT8 {rec.int8_s:.2f} s ({rec.speedup:.2f}x) -> default {pick} "
        f"(saved in {path})"
    )


@app.command()
def bench(
    model: Annotated[
        list[Path] | None,
        typer.Option(
            "--model",
            help="Model directory; repeat for several (e.g. several tiles). Default: the bundled demo model.",
        ),
    ] = None,
    backend: Annotated[
        list[str] | None,
        typer.Option(
            "--backend",
            help="onnxruntime | onnxruntime-cuda | tensorrt | torch | torch-autocast; repeatable.",
        ),
    ] = None,
    precision: Annotated[
        list[str] | None,
        typer.Option(
            "--precision",
            help="fp32 | fp16 | int8; repeatable (torch fp16 = CUDA autocast; torch has no int8).",
        ),
    ] = None,
    mode: Annotated[
        list[str] | None,
        typer.Option("--mode", help="staged | unrolled; repeatable (torch always runs eager)."),
    ] = None,
    batch: Annotated[
        list[int] | None, typer.Option("--batch", help="Tiles per call; repeatable.")
    ] = None,
    threads: Annotated[
        int, typer.Option(help="CPU threads for onnxruntime / torch (0: their default).")
    ] = 0,
    warmup: Annotated[
        int, typer.Option(help="Runs discarded after the first (time-to-first-result) run.")
    ] = 2,
    min_runs: Annotated[int, typer.Option(help="Measure at least this many runs ...")] = 10,
    min_seconds: Annotated[
        float, typer.Option(help="... and for at least this long (both must be reached).")
    ] = 3.0,
    seed: Annotated[int, typer.Option(help="Seed of the random LR tiles (noise: seed + 1).")] = 0,
    cov_warn: Annotated[
        float, typer.Option(help="Flag cells whose CoV (stdev/mean) exceeds this fraction.")
    ] = 0.10,
    dataset: Annotated[
        Path | None,
        typer.Option(help="Image folder for PSNR-Y / SSIM-Y / LPIPS per backend x precision."),
    ] = None,
    out: Annotated[
        Path,
        typer.Option("-o", "--out", help="Output folder for bench.json, bench.md and the plots."),
    ] = Path("bench-results"),
    compare: Annotated[
        Path | None,
        typer.Option(help="An earlier bench.json: print and report new/old ratios per cell."),
    ] = None,
    fail_on_regression: Annotated[
        bool, typer.Option(help="Exit 1 when --compare flags a regression.")
    ] = False,
    label: Annotated[
        str | None, typer.Option(help="Machine name used in the file names (bench-LABEL.json).")
    ] = None,
    reference: Annotated[
        bool, typer.Option(help="PSNR / max-abs vs the FP32 PyTorch reference (needs torch).")
    ] = True,
    peak: Annotated[
        bool, typer.Option(help="Measure the conv peak for the achieved/peak column.")
    ] = True,
    plots: Annotated[bool, typer.Option(help="Write PNG plots (needs matplotlib).")] = True,
    lr: Annotated[
        str | None,
        typer.Option(
            help="LR size per call, WIDTHxHEIGHT or N (dynamic models; 128 = a 128x128 image "
            "run whole); default: each model's tile."
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Debug logging.")] = False,
) -> None:
    """Latency + fidelity report per model x backend x precision x mode x batch (JSON, Markdown, PNG).

    Per stage and end to end: min/mean/median/p90/p95/p99/max, CoV, img/s, MP/s, peak RSS, GPU memory, time to first result, GMACs and achieved/peak, PSNR vs the PyTorch reference. A backend that cannot run here is skipped with its reason; the report is still written.
    """
    setup_logging(verbose)
    from deltadiff.benchmarks.harness import BenchOptions
    from deltadiff.cli.bench import bench_main
    from deltadiff.runtime.upscaler import default_model_dir

    try:
        models = tuple(model) if model else (default_model_dir(),)
        opts = BenchOptions(
            models=models,
            backends=tuple(backend or [Backend.ONNXRUNTIME]),
            precisions=tuple(precision or [Precision.FP32]),
            modes=tuple(mode or [DEFAULT_MODE]),
            batches=tuple(batch or [1]),
            threads=threads,
            warmup=warmup,
            min_runs=min_runs,
            min_seconds=min_seconds,
            seed=seed,
            cov_warn=cov_warn,
            dataset=dataset,
            out=out,
            label=label,
            compare=compare,
            fail_on_regression=fail_on_regression,
            reference=reference,
            peak=peak,
            plots=plots,
            lr=parse_size(lr, "--lr") if lr else None,
        )
        code = bench_main(opts)
    except DeltaDiffError as exc:
        fail(exc)
    if code:
        raise typer.Exit(code)


@app.command("bench-compare")
def bench_compare(
    new: Annotated[Path, typer.Argument(help="The newer bench JSON.")],
    old: Annotated[Path, typer.Argument(help="The older bench JSON.")],
    fail_on_regression: Annotated[
        bool, typer.Option(help="Exit 1 when a cell is flagged as a regression.")
    ] = False,
) -> None:
    """Compare two existing bench reports cell by cell (new/old median ratios), without running."""
    from deltadiff.benchmarks.report import compare_reports, comparison_lines, load_report

    try:
        cmp = compare_reports(load_report(new), load_report(old)).to_dict()
    except DeltaDiffError as exc:
        fail(exc)
    for line in comparison_lines({**cmp, "old_path": str(old)}):
        typer.echo(line)
    if fail_on_regression and cmp["n_regressions"]:
        raise typer.Exit(1)


@app.command("bench-cli")
def bench_cli(
    image: Annotated[Path, typer.Argument(help="The image each run upscales.")],
    extra: Annotated[
        list[str] | None,
        typer.Argument(
            help="dd-run upscale options for every variant (after --).", show_default=False
        ),
    ] = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            "--variant",
            help='NAME:OPTIONS, repeatable, e.g. "int8:--precision int8"; leading KEY=VALUE '
            "words set environment variables. Variants run interleaved. Default: one, "
            "dd-run upscale's defaults.",
        ),
    ] = None,
    runs: Annotated[int, typer.Option(help="Timed runs per variant, after one cold run.")] = 5,
    out: Annotated[
        Path, typer.Option("-o", "--out", help="Output folder for upscale-cli-LABEL.json / .md.")
    ] = Path("bench-results"),
    label: Annotated[str, typer.Option(help="Machine name used in the file names.")] = "local",
) -> None:
    """Time `dd-run upscale IMAGE` end to end as a user runs it: a fresh process per run
    (start-up, model load, image read and write included), median of --runs, peak RSS."""
    from deltadiff.benchmarks.bench_upscale_cli import Variant, run_cli_bench

    try:
        variants = [Variant.parse(v) for v in variant or []]
        report, paths = run_cli_bench(
            image, runs=runs, variants=variants, extra=tuple(extra or ()), out=out, label=label
        )
    except DeltaDiffError as exc:
        fail(exc)
    typer.echo(report.to_markdown(label))
    typer.echo(f"wrote {paths['json']}, {paths['md']}")


@app.command()
def batch(
    inputs: Annotated[
        list[Path], typer.Argument(help="Image files and/or folders.", show_default=False)
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")],
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster address (ray://... or host:port); default: a local cluster on 127.0.0.1."
        ),
    ] = None,
    actors: Annotated[int, typer.Option(help="Actors (one Upscaler each).")] = 1,
    cpus_per_actor: Annotated[
        float, typer.Option(help="CPUs per actor (= its ORT threads).")
    ] = 1.0,
    gpus_per_actor: Annotated[float, typer.Option(help="GPUs per actor (0: CPU actors).")] = 0.0,
    files_per_call: Annotated[int, typer.Option(help="Files per actor call.")] = 1,
    manifest: Annotated[
        Path | None, typer.Option(help="Job manifest (JSONL; default OUTPUT/dd-job.jsonl).")
    ] = None,
    model: Annotated[
        Path | None, typer.Option(help="Model directory (default: the bundled demo model).")
    ] = None,
    backend: Annotated[
        str, typer.Option(help="onnxruntime | onnxruntime-cuda | tensorrt")
    ] = Backend.ONNXRUNTIME,
    precision: Annotated[
        str | None,
        typer.Option(help="fp32 | fp16 | int8 (default: as dd-run upscale chooses)"),
    ] = None,
    mode: Annotated[str, typer.Option(help="staged | unrolled")] = DEFAULT_MODE,
    seed: Annotated[int, typer.Option(help="Noise seed (resshift-v3 only).")] = 0,
    suffix: Annotated[str | None, typer.Option(help="Output format suffix, e.g. .png.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Redo files whose output exists.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Debug logging.")] = False,
) -> None:
    """Upscale a folder on a Ray cluster (pip install 'deltadiff-trt[ray]').

    Outputs keep their names and are written atomically; a re-run skips finished outputs; a
    failing file is a 'failed' row in the JSONL job manifest and the job goes on (exit 1).
    """
    setup_logging(verbose)
    from rich.markup import escape

    from deltadiff.runtime.serving.ray_job import RayJobOptions, run_ray_job
    from deltadiff.runtime.upscaler import UpscaleOptions

    if suffix is not None and not suffix.startswith("."):
        suffix = "." + suffix
    err = _stderr()
    try:
        res = run_ray_job(
            inputs,
            output,
            model=model,
            upscale_opts=UpscaleOptions(backend=backend, precision=precision, mode=mode, seed=seed),
            opts=RayJobOptions(
                address=address,
                actors=actors,
                num_cpus=cpus_per_actor,
                num_gpus=gpus_per_actor,
                batch_size=files_per_call,
                manifest=manifest,
                overwrite=overwrite,
                suffix=suffix,
            ),
        )
    except DeltaDiffError as exc:
        fail(exc)
    for r in res.rows:
        if r["status"] == "failed":
            err.print(f"[red]failed[/]  {escape(r['message'])}", highlight=False, soft_wrap=True)
    err.print(
        f"{res.count('done')} upscaled, {res.count('skipped')} skipped, {res.count('failed')} "
        f"failed in {res.seconds:.1f} s on {actors} actor(s); manifest {res.manifest}",
        highlight=False,
        soft_wrap=True,
    )
    if not res.ok:
        raise typer.Exit(1)


@app.command()
def serve(
    model: Annotated[
        Path | None, typer.Option(help="Model directory (default: the bundled demo model).")
    ] = None,
    backend: Annotated[
        str, typer.Option(help="onnxruntime | onnxruntime-cuda | tensorrt")
    ] = Backend.ONNXRUNTIME,
    precision: Annotated[str, typer.Option(help="fp32 | fp16 | int8")] = Precision.FP32,
    mode: Annotated[str, typer.Option(help="staged | unrolled")] = DEFAULT_MODE,
    threads: Annotated[int, typer.Option(help="CPU threads per image computed (0: all).")] = 0,
    host: Annotated[
        str, typer.Option(help="Address to listen on (not loopback: warned, no auth).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port (0: any free port).")] = 8000,
    replicas: Annotated[int, typer.Option(help="Ray Serve replicas (model processes).")] = 1,
    max_concurrent: Annotated[
        int, typer.Option(help="Images computed at once per replica (splits its memory).")
    ] = 1,
    max_queue: Annotated[
        int, typer.Option(help="Requests waiting for a free slot; more get 503.")
    ] = 16,
    queue_timeout: Annotated[
        float, typer.Option(help="Longest wait for a slot (s); then 503, never computed.")
    ] = 60.0,
    request_timeout: Annotated[
        float, typer.Option(help="Longest computation of one image (s); then 504.")
    ] = 600.0,
    drain_seconds: Annotated[
        float, typer.Option(help="On SIGTERM / Ctrl-C: how long requests in flight may finish.")
    ] = 30.0,
    max_bytes: Annotated[int, typer.Option(help="Largest request body accepted (bytes).")] = (
        32 << 20
    ),
    max_pixels: Annotated[int, typer.Option(help="Largest input image accepted (pixels).")] = (
        4 << 20
    ),
    max_memory: Annotated[
        float | None,
        typer.Option(help="GiB per replica for all images in flight (default: half of free)."),
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster to join (default: start a local one).")
    ] = None,
    cpus_per_replica: Annotated[float, typer.Option(help="Ray CPUs each replica takes.")] = 1.0,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Debug logging.")] = False,
) -> None:
    """Serve the model over HTTP with Ray Serve (pip install 'deltadiff-trt\\[serve]').

    POST /v1/upscale?seed=N with an image file as the body answers the PNG that dd-run upscale
    writes for it. Health: /v1/health/live, /v1/health/ready; counters: /v1/stats. Refusals are
    one line: 400 bad request, 413 body too large, 503 full / waited too long, 504 too slow.
    SIGTERM or Ctrl-C drains requests in flight (--drain-seconds), then exits 0.
    """
    setup_logging(verbose)
    from deltadiff.runtime.serving.serve import ServeOptions, is_loopback, serve_forever

    opts = ServeOptions(
        model=model,
        backend=backend,
        precision=precision,
        mode=mode,
        threads=threads,
        host=host,
        port=port,
        replicas=replicas,
        max_concurrent=max_concurrent,
        max_queue=max_queue,
        queue_timeout=queue_timeout,
        request_timeout=request_timeout,
        drain_seconds=drain_seconds,
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        max_memory=max_memory,
        address=address,
        cpus_per_replica=cpus_per_replica,
    )
    if not is_loopback(host):
        typer.echo(
            f"warning: --host {host} is not a loopback address: anyone who can reach it can use "
            "the server (no authentication, no TLS); put an authenticating proxy in front",
            err=True,
        )

    def ready(url: str) -> None:
        typer.echo(f"serving on {url}/v1/upscale (Ctrl-C or SIGTERM stops)", err=True)

    try:
        code = serve_forever(opts, ready)
    except DeltaDiffError as exc:
        fail(exc)
    typer.echo("server stopped", err=True)
    raise typer.Exit(code)


def run_app(typer_app: typer.Typer) -> None:
    """Entry point of both CLIs: a DeltaDiffError that escapes a command is one line, exit 1."""
    try:
        typer_app()
    except DeltaDiffError as exc:  # pragma: no cover - commands catch their own
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(1)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
