"""Bundle the trained demo model: weights in the upstream trainer layout + safetensors under
weights/demo-pixel/, exported graphs + manifest under runtime/models/demo-pixel/ (package data).

    python scripts/bundle_demo.py --run runs/demo --iters 3500 --rule posterior --tile 68
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import yaml

from deltadiff.export.graphs import TileShape
from deltadiff.export.onnx_export import ExportOptions, add_fp16, export_onnx
from deltadiff.export.verify import verify
from deltadiff.model.checkpoint import (
    canonicalize,
    read_weights,
    save_safetensors,
    save_trainer_checkpoint,
)
from deltadiff.model.config import from_upstream_yaml, to_upstream_yaml_dict
from deltadiff.model.pipeline import Pipeline
from deltadiff.runtime.manifest import sha256_file

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="trainer run directory")
    ap.add_argument("--iters", type=int, required=True, help="which EMA checkpoint")
    ap.add_argument(
        "--rule",
        default="x0",
        help="step rule baked into the bundle (posterior | x0 | pixel-renoise)",
    )
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=4)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    wdir = REPO / "weights" / "demo-pixel"
    mdir = REPO / "runtime" / "models" / "demo-pixel"
    wdir.mkdir(parents=True, exist_ok=True)
    ema = canonicalize(read_weights(args.run / "ema_ckpts" / f"ema_model_{args.iters}.pth"))
    cfg = from_upstream_yaml(args.run / "config.yaml").replace(
        step_rule=args.rule, name="demo-pixel"
    )
    save_trainer_checkpoint(wdir / "demo-pixel.pth", ema, args.iters)  # EMA weights, trainer layout
    save_safetensors(wdir / "demo-pixel.safetensors", ema)
    (wdir / "config.yaml").write_text(
        yaml.safe_dump(to_upstream_yaml_dict(cfg, "demo-pixel.pth"), sort_keys=False)
    )
    for f in ("log.jsonl", "options.json"):
        shutil.copy(args.run / f, wdir / f)

    pipe = Pipeline.from_yaml(wdir / "config.yaml")
    pipe = Pipeline(cfg, pipe.unet)
    if mdir.exists():
        shutil.rmtree(mdir)
    mdir.mkdir(parents=True)
    # the reference weights travel with the graphs (package data), so dd-export verify works on
    # an installed package too, not only in a checkout
    ref = mdir / "reference.safetensors"
    shutil.copy(wdir / "demo-pixel.safetensors", ref)
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
        ExportOptions(TileShape(args.tile, args.tile), max_batch=args.max_batch),
        source=source,
    )
    add_fp16(mdir)
    for prec in ("fp32", "fp16"):
        rep = verify(mdir, precision=prec, seed=0)
        print(
            prec,
            "end-to-end PSNR vs reference:",
            round(rep.psnr, 1),
            "dB",
            "PASS" if rep.passed else "FAIL",
        )
    print(json.dumps({p.name: p.stat().st_size for p in sorted(mdir.iterdir())}, indent=1))


if __name__ == "__main__":
    main()
