"""Bundle the trained demo model: weights in the upstream trainer layout under weights/demo-pixel/,
exported graphs + manifest + the FP32 reference (safetensors) under runtime/models/demo-pixel/
(package data), then the INT8 graphs (calibrated on 4 validation images, gated on the other 12).

    python tools/bundle_demo.py --run runs/demo --iters 3500 --rule posterior --tile 68
    python tools/bundle_demo.py --run runs/qat --iters 500 --rule posterior --tile 68 --dynamic \
        --memory-sizes 64,128,192,256 --int8-target both     # the INT8-aware fine-tune (README)
    python tools/bundle_demo.py --rule posterior --tile 68 --dynamic   # re-export the bundled weights

``--dynamic`` exports dynamic LR height/width (``--max-lr``, default 512) with ``--tile`` as the
optimum size, and records the peak memory per pixel of ONNX Runtime CPU in the manifest
(``dd-export measure-memory``), so ``dd-run upscale`` runs images that fit whole.
Without ``--run`` the weights already under weights/demo-pixel/ are re-exported. Every bundle run
ends with the INT8 calibration of the step graphs; only that step (after a re-export):

    python tools/bundle_demo.py --int8-only
    (= dd-export calibrate --model runtime/models/demo-pixel --data ../shared/data/val-bicubic-x4
       --samples 4 --threads 2 --cache runs/demo-int8-ranges.json --units layer)

``--int8-target tensorrt`` (or ``both``) adds the TensorRT-style graphs cheaply: no second data
pass (the ranges cache) and no second search (the onnxruntime report's cost order, only the gate
and, if it fails, a bisection over more FP32 units):

    python tools/bundle_demo.py --int8-only --int8-target tensorrt
    (= dd-export calibrate ... --target tensorrt --cache runs/demo-int8-ranges.json
       --search-from runtime/models/demo-pixel/int8-report.onnxruntime.json)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import yaml

from deltadiff.calibration.calibrate import CalibrateOptions, calibrate
from deltadiff.export.graphs import TileShape
from deltadiff.export.onnx_export import ExportOptions, add_fp16, export_onnx
from deltadiff.export.verify import verify
from deltadiff.manifest import sha256_file, update_manifest
from deltadiff.model.checkpoint import (
    canonicalize,
    read_weights,
    save_safetensors,
    save_trainer_checkpoint,
)
from deltadiff.model.config import from_upstream_yaml, to_upstream_yaml_dict
from deltadiff.model.pipeline import Pipeline
from deltadiff.options import SearchUnit
from deltadiff.runtime.memory_budget import measure, record_key

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--run", type=Path, help="trainer run directory (default: re-export the bundle)"
    )
    ap.add_argument("--iters", type=int, help="which EMA checkpoint (with --run)")
    ap.add_argument(
        "--int8-data",
        type=Path,
        default=REPO.parent / "shared" / "data" / "val-bicubic-x4",
        help="gt/ + lq/ set: 4 images calibrate, the rest gate the INT8 graphs",
    )
    ap.add_argument(
        "--gate-data",
        type=Path,
        help="gt/ + lq/ set for the runtime gate of the onnxruntime INT8 graphs (calibrate "
        "--gate-data), e.g. the corpus gate split",
    )
    ap.add_argument(
        "--log-name",
        default="finetune",
        help="a fine-tune run's log/options/data-sources are kept as log-NAME.jsonl, ...",
    )
    ap.add_argument(
        "--mix-from",
        type=Path,
        help="weights to interpolate with the run's EMA (network interpolation, e.g. the model "
        "the run fine-tuned); the bundle gets (1 - MIX) * these + MIX * the run's EMA",
    )
    ap.add_argument("--mix", type=float, default=1.0, help="the run's share with --mix-from")
    ap.add_argument("--int8-only", action="store_true", help="only (re)calibrate the INT8 graphs")
    ap.add_argument(
        "--int8-target",
        choices=("onnxruntime", "tensorrt", "both"),
        default="onnxruntime",
        help="INT8 Q/DQ layouts to bundle; tensorrt reuses the onnxruntime search and ranges",
    )
    ap.add_argument(
        "--int8-cache",
        type=Path,
        default=REPO / "runs" / "demo-int8-ranges.json",
        help="ranges cache shared by the two targets (written by the first data pass)",
    )
    ap.add_argument(
        "--int8-units",
        choices=[u.value for u in SearchUnit],
        default="layer",
        help="search unit inside a row (dd-export calibrate --units)",
    )
    ap.add_argument(
        "--model-dir",
        type=Path,
        default=REPO / "runtime" / "models" / "demo-pixel",
        help="bundle directory (a scratch copy to try the INT8 step without touching the bundle)",
    )
    ap.add_argument(
        "--rule",
        default="x0",
        help="step rule baked into the bundle (posterior | x0 | pixel-renoise)",
    )
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--dynamic", action="store_true", help="dynamic LR height/width")
    ap.add_argument("--max-lr", type=int, default=512, help="--dynamic: largest LR side")
    ap.add_argument(
        "--memory-sizes", default="64,128,192", help="--dynamic: LR sides of the memory runs"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    mdir = args.model_dir
    if not args.int8_only:
        if args.run is not None and args.iters is None:
            ap.error("--run needs --iters")
        bundle(args, mdir)
    args.int8_cache.parent.mkdir(parents=True, exist_ok=True)
    if not args.int8_only:
        args.int8_cache.unlink(missing_ok=True)  # a re-export changes the step graph
    targets = ("onnxruntime", "tensorrt") if args.int8_target == "both" else (args.int8_target,)
    failed = False
    for target in targets:
        prior = mdir / "int8-report.onnxruntime.json" if target == "tensorrt" else None
        opts = CalibrateOptions(
            model=mdir,
            data=args.int8_data,
            samples=4,
            threads=2,
            target=target,
            cache=args.int8_cache,
            search_from=prior if prior is not None and prior.exists() else None,
            units=args.int8_units,
            gate_data=args.gate_data if target == "onnxruntime" else None,
        )
        res = calibrate(opts, progress=print)
        print(f"int8 {target}", res.score.line(), "PASS" if res.passed else "FAIL", res.seconds)
        failed |= not res.passed
    print(json.dumps({p.name: p.stat().st_size for p in sorted(mdir.iterdir())}, indent=1))
    if failed:
        raise SystemExit(1)


def bundle(args: argparse.Namespace, mdir: Path) -> None:
    wdir = REPO / "weights" / "demo-pixel"
    wdir.mkdir(parents=True, exist_ok=True)
    if args.run is not None:
        ema = canonicalize(read_weights(args.run / "ema_ckpts" / f"ema_model_{args.iters}.pth"))
        if args.mix_from is not None:  # network interpolation: (1 - a) * base + a * fine-tuned
            base = canonicalize(read_weights(args.mix_from))
            a = args.mix
            ema = {
                k: (1 - a) * base[k] + a * v if v.is_floating_point() else v for k, v in ema.items()
            }
        cfg = from_upstream_yaml(args.run / "config.yaml").replace(
            step_rule=args.rule, name="demo-pixel"
        )
        save_trainer_checkpoint(wdir / "demo-pixel.pth", ema, args.iters)  # EMA, trainer layout
        (wdir / "config.yaml").write_text(
            yaml.safe_dump(to_upstream_yaml_dict(cfg, "demo-pixel.pth"), sort_keys=False)
        )
        # a fine-tune run (--init) keeps the base run's log beside its own
        fine = json.loads((args.run / "options.json").read_text()).get("init") is not None
        for f in ("log.jsonl", "options.json", "data-sources.json"):
            if (args.run / f).exists():
                dst = f.replace(".", f"-{args.log_name}.", 1) if fine else f
                shutil.copy(args.run / f, wdir / dst)
    else:
        cfg = from_upstream_yaml(wdir / "config.yaml").replace(
            step_rule=args.rule, name="demo-pixel"
        )

    pipe = Pipeline.from_yaml(wdir / "config.yaml")
    pipe = Pipeline(cfg, pipe.unet)
    if mdir.exists():
        shutil.rmtree(mdir)
    mdir.mkdir(parents=True)
    # the reference weights travel with the graphs (package data), so dd-export verify works on
    # an installed package too, not only in a checkout; the one safetensors copy of the weights
    # (the trainer checkpoint demo-pixel.pth holds the same EMA tensors)
    ref = mdir / "reference.safetensors"
    save_safetensors(ref, canonicalize(read_weights(wdir / "demo-pixel.pth")))
    source = {
        "kind": "yaml",
        "preset": None,
        "config": None,
        "unet_weights": {"path": ref.name, "sha256": sha256_file(ref)},
        "vq_weights": None,
        "seed": None,
        "ema": False,
        "step_rule": args.rule,
    }
    export_onnx(
        pipe,
        mdir,
        ExportOptions(
            TileShape(args.tile, args.tile),
            max_batch=args.max_batch,
            dynamic=args.dynamic,
            max_lr=(args.max_lr, args.max_lr) if args.dynamic else None,
        ),
        source=source,
    )
    add_fp16(mdir)
    if args.dynamic:
        rec = measure(mdir, [(int(n), int(n)) for n in args.memory_sizes.split(",")])
        key = record_key("onnxruntime", "fp32", "staged")
        update_manifest(mdir, lambda m: replace(m, memory={key: rec}))
        print(
            "peak RSS per HR megapixel (ORT CPU fp32 staged):", rec["mib_per_hr_megapixel"], "MiB"
        )
    for prec in ("fp32", "fp16"):
        rep = verify(mdir, precision=prec, seed=0)
        print(
            prec,
            "end-to-end PSNR vs reference:",
            round(rep.psnr, 1),
            "dB",
            "PASS" if rep.passed else "FAIL",
        )
    if args.dynamic:
        for hw in ((37, 53), (96, 96), (100, 75)):
            rep = verify(mdir, precision="fp32", seed=0, lr_hw=hw, record=False)
            print(f"fp32 at LR {hw[0]}x{hw[1]} (padded):", round(rep.psnr, 1), "dB", rep.passed)


if __name__ == "__main__":
    main()
