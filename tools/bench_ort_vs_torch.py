"""ONNX Runtime vs PyTorch eager on the FULL presets (the ONNX-export issue's benchmark).

Exports ``deltadiff-latent`` and ``deltadiff-pixel`` (random weights, seed 0) at a 64 x 64 LR
tile (256 x 256 output) into a cache folder, reusing an export that is already there, then runs
the harness in one process: torch eager FP32, onnxruntime staged and onnxruntime unrolled (FP32,
batch 1, 2 threads, >= 5 runs after warm-up). Writes the usual bench report and prints per-stage
and end-to-end medians with the ORT / torch speed-up.

Needs a quiet machine and a while (the full latent model is ~710 GMACs per image)::

    python tools/bench_ort_vs_torch.py --cache ~/.cache/deltadiff/bench --out bench-ort-vs-torch

``--small`` runs the same on the ``-small`` presets (pixel tile 16, latent tile 64) in seconds.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from deltadiff.benchmarks.harness import BenchOptions, run_bench
from deltadiff.errors import DeltaDiffError, ManifestError
from deltadiff.manifest import load_manifest

log = logging.getLogger(__name__)

PRESETS = ("deltadiff-latent", "deltadiff-pixel")
FULL_TILE = 64
SMALL_TILE = {"deltadiff-latent": 64, "deltadiff-pixel": 16, "resshift-v3": 64}
SEED = 0


def model_dir(cache: Path, preset: str, tile: int) -> Path:
    return cache / f"{preset}-tile{tile}-seed{SEED}"


def ensure_export(cache: Path, preset: str, tile: int) -> Path:
    """The cached export of ``preset`` at ``tile`` (random weights, seed 0); exported if missing."""
    out = model_dir(cache, preset, tile)
    try:
        m = load_manifest(out)
        src = m.source
        if (
            src.get("preset") == preset
            and int(src.get("seed", -1)) == SEED
            and m.tile == (tile, tile)
        ):
            log.info("reusing %s", out)
            return out
        log.info(
            "%s holds another export (%s, tile %s); re-exporting", out, src.get("preset"), m.tile
        )
    except ManifestError:
        pass
    from deltadiff.export.graphs import TileShape
    from deltadiff.export.onnx_export import ExportOptions, export_onnx, preset_source
    from deltadiff.model.pipeline import Pipeline

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = Pipeline.from_preset(preset, seed=SEED)
    export_onnx(
        pipe,
        tmp,
        ExportOptions(TileShape(tile, tile), max_batch=1),
        source=preset_source(preset, SEED),
    )
    del pipe
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def speedup_table(report: dict[str, Any]) -> list[str]:
    """Per model: torch eager / ORT staged / ORT unrolled, stage medians, e2e and ORT/torch speed-up."""
    lines: list[str] = []
    for model in report["models"]:
        cases = [c for c in report["cases"] if c["model"] == model["key"]]
        stages = [*model["stages"], "unrolled"]
        torch_case = next(
            (c for c in cases if c["backend"] == "torch" and c["status"] == "ok"), None
        )
        base = torch_case["e2e"]["median"] if torch_case else None
        lines.append("")
        lines.append(
            f"{model['key']} ({model['family']}), output {model['output_hw'][0]}x{model['output_hw'][1]}"
        )
        head = (
            f"{'case':<26}" + "".join(f"{s:>10}" for s in stages) + f"{'e2e':>11}{'speed-up':>10}"
        )
        lines.append(head + "    (ms, medians)")
        for c in cases:
            name = f"{c['backend']} {c['mode']}"
            if c["status"] != "ok":
                lines.append(f"{name:<26}{c['status']}: {c['reason']}")
                continue
            cells = "".join(
                f"{c['stages'][s]['median'] * 1e3:10.1f}" if s in c["stages"] else f"{'-':>10}"
                for s in stages
            )
            e2e = c["e2e"]["median"]
            sp = f"{base / e2e:9.2f}x" if base else f"{'n/a':>10}"
            lines.append(f"{name:<26}{cells}{e2e * 1e3:11.1f}{sp}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "deltadiff" / "bench-models",
        help="folder for the exported models (reused when present)",
    )
    ap.add_argument("--out", type=Path, default=Path("bench-ort-vs-torch"), help="report folder")
    ap.add_argument(
        "--small",
        action="store_true",
        help="use the -small presets (fast; for checking the script)",
    )
    ap.add_argument(
        "--presets",
        nargs="+",
        default=list(PRESETS),
        choices=[*PRESETS, "resshift-v3"],
        help="families to run (default: %(default)s)",
    )
    ap.add_argument(
        "--tile",
        type=int,
        default=None,
        help="LR tile (default 64; with --small: the family's smallest)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-runs", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=0.0)
    ap.add_argument("--label", default=None, help="machine name for the report file names")
    ap.add_argument("--no-peak", action="store_true", help="skip the conv peak probe")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    try:
        dirs = []
        for fam in args.presets:
            preset = f"{fam}-small" if args.small else fam
            tile = args.tile or (SMALL_TILE[fam] if args.small else FULL_TILE)
            print(
                f"model {preset} at LR tile {tile}: {model_dir(args.cache, preset, tile)}",
                file=sys.stderr,
            )
            dirs.append(ensure_export(args.cache, preset, tile))
        opts = BenchOptions(
            models=tuple(dirs),
            backends=("torch", "onnxruntime"),
            precisions=("fp32",),
            modes=("staged", "unrolled"),
            batches=(1,),
            threads=args.threads,
            warmup=args.warmup,
            min_runs=args.min_runs,
            min_seconds=args.min_seconds,
            out=args.out,
            label=args.label,
            peak=not args.no_peak,
            command="python tools/bench_ort_vs_torch.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
        )
        report = run_bench(opts, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except DeltaDiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in speedup_table(report.to_dict()):
        print(line)
    print("\nwrote " + ", ".join(report.files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
