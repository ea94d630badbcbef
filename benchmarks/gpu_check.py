"""All GPU checks in one offline run (the TensorRT issue's GPU check script).

On a GPU machine, from a checkout of this repository::

    python benchmarks/gpu_check.py --out gpu-report [--wheels DIR] [--flavour tensorrt|tensorrt_rtx]

1. Reports which TensorRT loads: full ``tensorrt`` is tried first (it may already be installed);
   otherwise TensorRT-RTX is installed offline from ``--wheels DIR`` (``pip install --no-index
   --find-links DIR tensorrt-rtx-cu13``; bring the wheels along, split files >64 MiB with
   ``split -b 60m`` and join them with ``cat`` on the machine).
2. Exports the FULL ``deltadiff-latent`` preset (random weights, seed 0) at a 64x64 LR tile with
   batch up to 4, adds the FP16 graphs (FP32 islands), builds strongly typed FP16 engines for the
   GPU (TensorRT-RTX: ``--target current``, since its AOT list has no SM90) with a batch-1..4
   profile.
3. Verifies TensorRT FP16 against the FP32 PyTorch reference (end-to-end PSNR >= 40 dB).
4. Times, side by side in one process, torch eager FP32 (TF32 off), torch autocast FP16, TensorRT
   FP16 (the whole chain replayed as one CUDA graph) and onnxruntime CUDA when its provider exists,
   at batch 1 and 4: median of >= 20 runs after warm-up, per stage and end to end. Writes the
   benchmark harness's JSON / Markdown / plots into ``--out`` and prints the speed-ups
   (targets: TensorRT FP16 >= 5x torch eager FP32 and >= 2x torch autocast FP16).

Status: written without access to a GPU; not yet run.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("gpu_check")


def trt_flavour(wheels: Path | None, want: str | None) -> tuple[str, str]:
    from deltadiff.runtime.trt_compat import import_trt

    try:
        trt, flavour = import_trt(want)
        return flavour, str(trt.__version__)
    except Exception as exc:  # noqa: BLE001 - report and try to install
        log.warning("no TensorRT importable (%s)", exc)
    if wheels is None:
        raise SystemExit("no TensorRT here and no --wheels DIR to install TensorRT-RTX from")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--find-links",
        str(wheels),
        "tensorrt-rtx-cu13",
    ]
    log.info("installing TensorRT-RTX offline: %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    trt, flavour = import_trt("tensorrt_rtx")
    return flavour, str(trt.__version__)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-report"))
    ap.add_argument("--work", type=Path, default=Path("gpu-work"), help="model directory cache")
    ap.add_argument("--wheels", type=Path, default=None)
    ap.add_argument("--flavour", default=None)
    ap.add_argument("--min-runs", type=int, default=20)
    ap.add_argument("--preset", default="deltadiff-latent")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    import torch

    from deltadiff.benchmarks.harness import BenchOptions, run_bench
    from deltadiff.export.engine import EngineOptions, build_engines
    from deltadiff.export.graphs import TileShape
    from deltadiff.export.onnx_export import ExportOptions, add_fp16, export_onnx, preset_source
    from deltadiff.export.verify import verify
    from deltadiff.model.pipeline import Pipeline
    from deltadiff.runtime.trt_compat import current_device

    summary: dict = {"gpu": None, "torch": torch.__version__, "cuda": torch.version.cuda}
    dev = current_device()
    summary["gpu"] = dev.label() if dev else None
    if dev is None or not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible (cuda-python / torch)")
    # FP32 means FP32 for the reference and its timing
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    flavour, version = trt_flavour(args.wheels, args.flavour)
    summary["tensorrt"] = f"{flavour} {version}"
    log.info("GPU %s, %s %s, torch %s", dev.label(), flavour, version, torch.__version__)

    model = args.work / f"{args.preset}-tile64"
    if not (model / "manifest.json").exists():
        pipe = Pipeline.from_preset(args.preset, seed=0)
        export_onnx(
            pipe,
            model,
            ExportOptions(TileShape(64, 64), max_batch=4),
            source=preset_source(args.preset, 0),
        )
        del pipe
    if "step.fp16" not in json.loads((model / "manifest.json").read_text())["graphs"]:
        add_fp16(model)
    targets = ("current",) if flavour == "tensorrt_rtx" else ()
    _, built = build_engines(
        model,
        EngineOptions(precision="fp16", flavour=flavour, batch_opt=1, batch_max=4, targets=targets),
    )
    summary["engines"] = [
        {k: e[k] for k in ("graph", "file", "bytes", "targets", "build_seconds") if k in e}
        for e in built
    ]
    rep = verify(
        model,
        backend="tensorrt",
        precision="fp16",
        seed=0,
        min_psnr=40.0,
        modes=("staged", "unrolled"),
    )
    summary["fidelity"] = {
        r.name: {"psnr_db": r.psnr, "max_abs": r.max_abs, "passed": r.passed}
        for r in rep.stages + rep.end_to_end
    }
    log.info(
        "TensorRT FP16 vs FP32 reference: %.1f dB (%s)", rep.psnr, "PASS" if rep.passed else "FAIL"
    )

    opts = BenchOptions(
        models=(model,),
        backends=("torch", "torch-autocast", "tensorrt", "onnxruntime-cuda"),
        precisions=("fp32", "fp16"),
        modes=("staged", "unrolled"),
        batches=(1, 4),
        warmup=3,
        min_runs=args.min_runs,
        min_seconds=2.0,
        out=args.out,
        label=dev.name.replace(" ", "-"),
    )
    report = run_bench(opts)
    d = report.to_dict()
    medians = {}
    for c in d["cases"]:
        if c["status"] == "ok":
            medians[(c["backend"], c["precision"], c["mode"], c["batch"])] = c["e2e"]["median"]
    for b in (1, 4):
        eager = medians.get(("torch", "fp32", "eager", b))
        amp = medians.get(("torch-autocast", "fp16", "eager", b))
        trt = min((v for k, v in medians.items() if k[0] == "tensorrt" and k[3] == b), default=None)
        if eager and amp and trt:
            summary[f"batch{b}"] = {
                "torch_fp32_ms": eager * 1e3,
                "torch_amp_ms": amp * 1e3,
                "trt_fp16_ms": trt * 1e3,
                "speedup_vs_fp32": eager / trt,
                "speedup_vs_amp": amp / trt,
            }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary, indent=1, default=str))
    return 0 if rep.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
