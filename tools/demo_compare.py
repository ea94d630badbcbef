"""Compare two bundles of the demo model (v1 vs v2) as a user meets them: quality on evaluation sets
through the runtime, a contact sheet, and `dd-run upscale` wall time.

    python tools/demo_compare.py quality --v1 V1_DIR --v2 V2_DIR --dataset VAL_PAIRS \
        --precision fp32 --out OUT --stem val-fp32
    python tools/demo_compare.py sheet --v1 V1_DIR --v2 V2_DIR --dataset REPORT_PAIRS --out docs/img
    python tools/demo_compare.py timing --v1 V1_DIR --v2 V2_DIR --lr 128 --runs 5 --out OUT

``quality`` scores bicubic, v1 and v2 on every pair (PSNR-Y / SSIM-Y on 8-bit Y, 4 px border;
LPIPS AlexNet) and writes the evaluator's JSON + Markdown report plus a summary: how many images
v2 has a lower LPIPS than v1 on. ``--precision default`` runs each bundle at the precision
`dd-run upscale` would choose on this machine. ``sheet`` writes bicubic | v1 | v2 | HR crops of
one 128x128 HR window (2x nearest zoom) per chosen image. ``timing`` runs `dd-run upscale` on a
128x128 (``--lr``) photo crop, v1 and v2 interleaved, ``--runs`` each after a warm-up, and reports
the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from deltadiff.benchmarks.quality import evaluate, write_report
from deltadiff.cpu import cpu_info
from deltadiff.lpips import LPIPS, default_lpips_weights
from deltadiff.metrics import bicubic_upscaler, degrade_x4, load_dataset, to_uint8
from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler


def _upscalers(args: argparse.Namespace) -> dict[str, Upscaler]:
    prec = None if args.precision == "default" else args.precision
    ups = {}
    for name, d in (("v1", args.v1), ("v2", args.v2)):
        ups[name] = Upscaler(d, UpscaleOptions(precision=prec, threads=args.threads))
        print(f"{name}: {d} -> {ups[name].choice.line()}")
    return ups


def quality(args: argparse.Namespace) -> None:
    pairs = load_dataset(args.dataset)
    lp = LPIPS(args.lpips_weights or default_lpips_weights())
    ups = _upscalers(args)
    try:
        rep = evaluate(
            pairs, {k: u.upscale for k, u in ups.items()}, lpips=lp, dataset=args.dataset.name
        )
    finally:
        for u in ups.values():
            u.close()
    js, md = write_report(rep, args.out, args.stem)
    d = rep.to_dict()
    rows = {(r["upscaler"], r["name"]): r for r in d["images"]}
    names = sorted({r["name"] for r in d["images"]})
    better = [n for n in names if rows[("v2", n)]["lpips"] < rows[("v1", n)]["lpips"]]
    summary = {
        "dataset": args.dataset.name,
        "precision": args.precision,
        "images": len(names),
        "v2_lower_lpips_than_v1": len(better),
        "share": round(len(better) / len(names), 4),
        "means": {
            s["upscaler"]: {
                k: s[k] for k in ("psnr_y", "ssim_y", "lpips", "delta_psnr_y_vs_bicubic")
            }
            for s in d["upscalers"]
        },
        "cpu": cpu_info().model,
        "isa": cpu_info().isa,
        "date": time.strftime("%Y-%m-%d"),
    }
    out = args.out / f"{args.stem}-summary.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {js}, {md}, {out}")


def _window(hr: np.ndarray, size: int = 128) -> tuple[int, int]:
    """The size x size HR window with the most detail (mean absolute gradient)."""
    gray = hr.astype(np.float32).mean(-1)
    g = np.abs(np.diff(gray, axis=1))[:-1] + np.abs(np.diff(gray, axis=0))[:, :-1]
    best, where = -1.0, (0, 0)
    for y in range(0, hr.shape[0] - size + 1, size // 4):
        for x in range(0, hr.shape[1] - size + 1, size // 4):
            v = float(g[y : y + size - 1, x : x + size - 1].mean())
            if v > best:
                best, where = v, (y, x)
    return where


def sheet(args: argparse.Namespace) -> None:
    pairs = {p.name: p for p in load_dataset(args.dataset)}
    chosen = args.images.split(",") if args.images else sorted(pairs)[:6]
    ups = _upscalers(args)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for name in chosen:
            p = pairs[name]
            lr = p.lr.astype(np.float32) / 255.0
            outs = [to_uint8(bicubic_upscaler(lr))]
            outs += [to_uint8(ups[k].upscale(lr)) for k in ("v1", "v2")]
            outs.append(p.hr)
            y, x = _window(p.hr)
            tiles = [o[y : y + 128, x : x + 128].repeat(2, 0).repeat(2, 1) for o in outs]
            gap = np.full((256, 4, 3), 255, np.uint8)
            rows.append(
                np.concatenate(
                    [t for pair in zip(tiles, [gap] * 4, strict=True) for t in pair][:-1], 1
                )
            )
    finally:
        for u in ups.values():
            u.close()
    sep = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    img = np.concatenate(
        [r for pair in zip(rows, [sep] * len(rows), strict=True) for r in pair][:-1], 0
    )
    path = args.out / args.name
    Image.fromarray(img).save(path, optimize=True)
    print(f"wrote {path}: columns bicubic | v1 | v2 | HR; rows {', '.join(chosen)}")


def timing(args: argparse.Namespace) -> None:
    from skimage import data as skdata

    hr = skdata.astronaut()[: args.lr * 4, 64 : 64 + args.lr * 4]
    lr = degrade_x4(hr)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "lr.png"
        Image.fromarray(lr).save(src)
        times: dict[str, list[float]] = {"v1": [], "v2": []}
        for i in range(args.runs + 1):
            for name, d in (("v1", args.v1), ("v2", args.v2)):
                cmd = [
                    sys.executable,
                    "-m",
                    "deltadiff.cli.run",
                    "upscale",
                    str(src),
                    "-o",
                    str(Path(tmp) / f"{name}.png"),
                    "--model",
                    str(d),
                    "--overwrite",
                ]
                if args.precision != "default":
                    cmd += ["--precision", args.precision]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True)
                if i:  # the first round warms the page cache
                    times[name].append(time.perf_counter() - t0)
    cpu = cpu_info()
    res = {
        "what": f"dd-run upscale {args.lr}x{args.lr} -> {args.lr * 4}x{args.lr * 4}, wall s",
        "precision": args.precision,
        "runs": args.runs,
        "median_s": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "all_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "cpu": cpu.model,
        "isa": cpu.isa,
        "date": time.strftime("%Y-%m-%d"),
    }
    res["v2_over_v1"] = round(res["median_s"]["v2"] / res["median_s"]["v1"], 3)
    (args.out / "timing.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("quality", "sheet", "timing"))
    ap.add_argument("--v1", type=Path, required=True)
    ap.add_argument("--v2", type=Path, required=True)
    ap.add_argument("--dataset", type=Path)
    ap.add_argument("--precision", default="fp32", help="fp32 | fp16 | int8 | default")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--lpips-weights", type=Path)
    ap.add_argument("--out", type=Path, default=Path("demo-compare"))
    ap.add_argument("--stem", default="compare")
    ap.add_argument("--images", help="sheet: comma-separated image names (default: first 6)")
    ap.add_argument("--name", default="demo-v1-v2.png", help="sheet: output file name")
    ap.add_argument("--lr", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    {"quality": quality, "sheet": sheet, "timing": timing}[args.what](args)


if __name__ == "__main__":
    main()
