"""GPU check, in steps that each fit one device call (``tools/device_check.sh`` runs them).

Runs from a bare checkout (no ``pip install``: the package-dir mapping of ``pyproject.toml`` is
applied by hand) with whatever TensorRT the machine has; it never installs anything::

    python tools/gpu_check.py probe  --out OUT            # can TensorRT(-RTX) run here at all?
    python tools/gpu_check.py export --preset deltadiff-latent --work W
    python tools/gpu_check.py model  --model DIR --out OUT [--no-trt] [--modes staged,unrolled]

``probe``: a tiny Conv+ReLU network, built with the TensorRT-RTX target ``current`` (the GPU of
this machine: SM90 is not in TensorRT-RTX's ahead-of-time list), run through cuda-python and
compared with ONNX Runtime on the CPU; writes ``probe.json``; exit 3 if TensorRT cannot run here.

``export``: a preset with random weights (seed 0) at a 64x64 LR tile, batch 1..4, plus the FP16
graphs (FP32 islands).

``model``: FP16 engines (``--target current``) -> ``verify`` (TensorRT FP16 vs the FP32 PyTorch
reference, end-to-end PSNR >= 40 dB) -> one benchmark run, side by side in one process: torch
eager FP32 (TF32 off), torch autocast FP16, TensorRT FP16 and ONNX Runtime CUDA where it exists,
per stage and end to end, batch 1 and 4. ``--no-trt`` (or a failed probe) measures the others
and says so. Writes the harness's JSON + Markdown and ``summary-<name>.json`` / ``.md``.

The headline TensorRT figure is the device-resident chain (``e2e_device_chain``: the whole
encode -> 4 steps -> decode replayed as one CUDA graph, only the LR up and the image down); the
harness's ``e2e`` for TensorRT is the per-stage path (host copies and a sync per stage) and is
reported beside it, not used for the speed-up.

``--dry-run``: every step that needs no GPU runs (imports, model directories, the case plan);
the GPU work is printed, not done.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("gpu_check")
PROBE_FAILED = 3


def import_from_checkout() -> str:
    """Make ``deltadiff.*`` importable without installing: apply pyproject's package-dir map."""
    try:
        import deltadiff.export  # noqa: F401

        return "installed"
    except ImportError:
        pass
    import importlib.util
    import tomllib

    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    # register every package first, then run their __init__s: a package may import a sibling
    # that sorts after it (model -> runtime)
    mods = []
    for name in sorted(mapping, key=lambda n: (n.count("."), n)):
        folder = REPO / mapping[name]
        spec = importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, mod)
        mods.append((spec, mod))
    for spec, mod in mods:
        spec.loader.exec_module(mod)
    return "checkout"


# ----------------------------------------------------------------------------- probe


def _tiny_onnx(path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 32, 32])],
        [w, b],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def probe(work: Path, flavour: str | None = None, *, dry_run: bool = False) -> dict[str, Any]:
    """Build + run a tiny network with the current GPU as target; compare with ONNX Runtime."""
    import numpy as np

    from deltadiff.runtime.trt_compat import current_device, import_trt

    work.mkdir(parents=True, exist_ok=True)
    onnx_path = work / "probe.onnx"
    _tiny_onnx(onnx_path)
    res: dict[str, Any] = {"ok": False, "step": "import"}
    if dry_run:
        res.update(step="dry-run", plan=f"build {onnx_path.name} for target current, run B=2")
        return res
    t0 = time.perf_counter()
    try:
        trt, flav = import_trt(flavour)
        res.update(flavour=flav, version=str(trt.__version__), step="device")
        dev = current_device()
        if dev is None:
            res["error"] = "no CUDA GPU visible to cuda-python"
            return res
        res["gpu"] = dev.label()
        from deltadiff.export.engine import EngineOptions, build_engine
        from deltadiff.manifest import TensorSpec

        res["step"] = "build"
        plan, _ = build_engine(
            onnx_path,
            inputs=(TensorSpec("x", ("batch", 3, 32, 32), "float32"),),
            opts=EngineOptions(
                precision="fp32", targets=("current",) if flav != "tensorrt" else ()
            ),
            batch=(1, 2, 2),
            flavour=flav,
        )
        res["build_s"] = round(time.perf_counter() - t0, 2)
        res["step"] = "run"
        x = np.random.default_rng(1).random((2, 3, 32, 32), np.float32)
        out = _run_plan(trt, flav, plan, x, work)
        import onnxruntime as ort

        ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
            None, {"x": x}
        )[0]
        err = float(np.abs(out - ref).max())
        res.update(max_abs_vs_onnxruntime=err, ok=bool(err < 1e-3), step="compare")
        if not res["ok"]:
            res["error"] = f"result differs from ONNX Runtime by {err:.3g}"
    except Exception as exc:  # noqa: BLE001 - the probe reports any failure as data
        res["error"] = (
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        )
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _run_plan(trt: Any, flavour: str, plan: bytes, x: Any, work: Path) -> Any:
    """Deserialize and run one engine through the runtime's own TensorRT backend pieces."""
    import numpy as np

    from deltadiff.runtime.backends.trt import _check, _Engine, _Memory
    from deltadiff.runtime.trt_compat import cudart, trt_logger

    rt = cudart()
    runtime = trt.Runtime(trt_logger(flavour))
    p = work / "probe.engine"
    p.write_bytes(plan)
    eng = _Engine(trt, runtime, p)
    mem = _Memory()
    stream = _check(rt.cudaStreamCreate(), "cudaStreamCreate")
    try:
        ctx = eng.context()
        outs = eng.set_shapes(ctx, {"x": x.shape})
        hx, ax = mem.pinned(x.shape, eng.dtypes["x"])
        hy, ay = mem.pinned(outs["y"], eng.dtypes["y"])
        dx, dy = mem.dev(ax.nbytes), mem.dev(ay.nbytes)
        ax[...] = x
        h2d, d2h = (
            rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
            rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
        )
        _check(rt.cudaMemcpyAsync(dx, hx, ax.nbytes, h2d, stream), "cudaMemcpyAsync")
        eng.enqueue(ctx, {"x": dx, "y": dy}, int(stream))
        _check(rt.cudaMemcpyAsync(hy, dy, ay.nbytes, d2h, stream), "cudaMemcpyAsync")
        _check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return np.array(ay, dtype=np.float32)
    finally:
        mem.free()
        rt.cudaStreamDestroy(stream)


# ----------------------------------------------------------------------------- summary


def summarize(report: dict[str, Any], model: str) -> dict[str, Any]:
    """Headline numbers per batch: torch eager FP32, autocast FP16, TensorRT FP16 (the CUDA-graph
    chain; the per-stage path beside it), ONNX Runtime CUDA; speed-ups on the chain figure."""
    ok = [c for c in report["cases"] if c["status"] == "ok"]
    out: dict[str, Any] = {"model": model, "batches": {}, "skipped": {}}
    for c in report["cases"]:
        if c["status"] != "ok":
            out["skipped"][c["id"]] = c["reason"]

    def med(c: dict[str, Any], key: str = "e2e") -> float | None:
        s = c.get(key)
        return None if not s else s["median"]

    for b in sorted({c["batch"] for c in ok}):
        row: dict[str, Any] = {}
        for c in (c for c in ok if c["batch"] == b):
            name = f"{c['backend']}/{c['precision']}/{c['mode']}"
            row[name] = {
                "e2e_ms": med(c) * 1e3 if med(c) else None,
                "chain_ms": med(c, "e2e_device_chain") * 1e3
                if med(c, "e2e_device_chain")
                else None,
                "stages_ms": {s: v["median"] * 1e3 for s, v in c.get("stages", {}).items()},
                "psnr_db": (c.get("fidelity") or {}).get("psnr_db"),
            }
        eager = row.get("torch/fp32/eager", {}).get("e2e_ms")
        amp = row.get("torch-autocast/fp16/eager", {}).get("e2e_ms")
        trt = {
            k: v["chain_ms"] for k, v in row.items() if k.startswith("tensorrt/") and v["chain_ms"]
        }
        head: dict[str, Any] = {"torch_fp32_ms": eager, "torch_amp_ms": amp}
        if trt:
            best = min(trt, key=trt.__getitem__)
            head.update(
                trt_case=best,
                trt_chain_ms=trt[best],
                trt_per_stage_path_ms=row[best]["e2e_ms"],
                speedup_vs_fp32=eager / trt[best] if eager else None,
                speedup_vs_amp=amp / trt[best] if amp else None,
            )
        out["batches"][b] = {"headline": head, "cases": row}
    return out


def summary_markdown(s: dict[str, Any], extra: list[str]) -> str:
    def f(v: Any, unit: str = "") -> str:
        return "–" if v is None else (f"{v:.2f}{unit}" if isinstance(v, float) else str(v))

    lines = [f"# GPU check: {s['model']}", "", *extra, ""]
    lines += [
        "| batch | torch FP32 | torch autocast FP16 | TensorRT FP16 chain (CUDA graph) | "
        "TensorRT per-stage path | vs FP32 | vs autocast |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b, r in s["batches"].items():
        h = r["headline"]
        lines.append(
            f"| {b} | {f(h.get('torch_fp32_ms'), ' ms')} | {f(h.get('torch_amp_ms'), ' ms')} | "
            f"{f(h.get('trt_chain_ms'), ' ms')} | {f(h.get('trt_per_stage_path_ms'), ' ms')} | "
            f"{f(h.get('speedup_vs_fp32'), '×')} | {f(h.get('speedup_vs_amp'), '×')} |"
        )
    lines += ["", "Per stage (median ms):", ""]
    for b, r in s["batches"].items():
        for name, c in r["cases"].items():
            st = ", ".join(f"{k} {v:.2f}" for k, v in c["stages_ms"].items())
            lines.append(
                f"- b{b} {name}: e2e {f(c['e2e_ms'])}, chain {f(c['chain_ms'])}; {st}; "
                f"PSNR vs FP32 reference {f(c['psnr_db'])} dB"
            )
    if s["skipped"]:
        lines += ["", "Not measured:", ""]
        lines += [f"- {k}: {v}" for k, v in s["skipped"].items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- steps


def cmd_probe(args: argparse.Namespace) -> int:
    res = probe(args.work / "probe", args.flavour, dry_run=args.dry_run)
    _write(args.out, "probe.json", json.dumps(res, indent=1))
    print(json.dumps(res))
    if args.dry_run:
        return 0
    if not res["ok"]:
        print(f"PROBE FAILED at {res['step']}: {res.get('error')}")
        return PROBE_FAILED
    print(f"PROBE OK: {res['flavour']} {res['version']} runs on {res['gpu']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from deltadiff.export.graphs import TileShape
    from deltadiff.export.onnx_export import ExportOptions, add_fp16, export_onnx, preset_source
    from deltadiff.model.pipeline import Pipeline

    model = args.work / f"{args.preset}-tile{args.tile}"
    if args.dry_run:
        Pipeline.from_preset(args.preset, seed=0)  # the config and networks build here
        print(f"would export {args.preset} (tile {args.tile}, batch 1..4) + FP16 to {model}")
        return 0
    if not (model / "manifest.json").exists():
        t0 = time.perf_counter()
        pipe = Pipeline.from_preset(args.preset, seed=0)
        export_onnx(
            pipe,
            model,
            ExportOptions(TileShape(args.tile, args.tile), max_batch=4),
            source=preset_source(args.preset, 0),
        )
        log.info("exported %s in %.0f s", model, time.perf_counter() - t0)
    if "step.fp16" not in json.loads((model / "manifest.json").read_text())["graphs"]:
        add_fp16(model)
    print(f"EXPORTED {model}")
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from deltadiff.benchmarks.harness import BenchOptions, plan_cases, run_bench
    from deltadiff.manifest import load_manifest

    model = args.model
    m = load_manifest(model)
    name = args.name or model.name
    modes = tuple(args.modes.split(","))
    batches = tuple(int(b) for b in args.batches.split(","))
    graphs = tuple(
        g
        for md in modes
        for g in (("unrolled",) if md == "unrolled" else ("encoder", "step", "decoder"))
    )
    notes: list[str] = []
    use_trt = not args.no_trt
    backends = ["torch", "torch-autocast", "onnxruntime-cuda"] + (["tensorrt"] if use_trt else [])
    opts = BenchOptions(
        models=(model,),
        backends=tuple(backends),
        precisions=("fp32", "fp16"),
        modes=modes,
        batches=batches,
        warmup=3,
        min_runs=args.min_runs,
        min_seconds=args.min_seconds,
        out=args.out,
        label=f"gpu-{name}",
        plots=False,
    )
    if args.dry_run:
        print(
            f"model {name}: {m.family}, tile {m.tile}, batch {m.batch}, graphs {sorted(m.graphs)}"
        )
        if use_trt:
            print(
                f"would build FP16 engines {graphs} (TensorRT-RTX --target current, batch 1..{max(batches)})"
            )
            print(f"would verify TensorRT FP16 vs the FP32 PyTorch reference, modes {modes}")
        print("would bench: " + ", ".join(s.name for s in plan_cases(opts)))
        return 0
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # FP32 means FP32 for the reference timing
    torch.backends.cudnn.allow_tf32 = False
    if not torch.cuda.is_available():
        notes.append("torch sees no CUDA device: torch cases run on the CPU")
    if use_trt:
        from deltadiff.export.engine import EngineOptions, build_engines
        from deltadiff.export.verify import verify
        from deltadiff.runtime.trt_compat import import_trt

        trt, flavour = import_trt(args.flavour)
        t0 = time.perf_counter()
        _, built = build_engines(
            model,
            EngineOptions(
                precision="fp16",
                flavour=flavour,
                graphs=graphs,
                batch_opt=1,
                batch_max=max(batches),
                targets=("current",) if flavour == "tensorrt_rtx" else (),
            ),
        )
        notes.append(
            f"{flavour} {trt.__version__}: built {len(built)} FP16 engines in "
            f"{time.perf_counter() - t0:.0f} s (target current)"
        )
        rep = verify(
            model, backend="tensorrt", precision="fp16", seed=0, min_psnr=40.0, modes=modes
        )
        for line in (r.line() for r in rep.end_to_end):
            notes.append(f"verify: {line}")
        notes.append(f"verify TensorRT FP16 vs FP32 reference: {'PASS' if rep.passed else 'FAIL'}")
        # what is done so far survives a timeout in the benchmark
        _write(args.out, f"summary-{name}.json", json.dumps({"model": name, "notes": notes}))
    else:
        notes.append("TensorRT not measured (--no-trt: it did not pass the probe on this GPU)")
    report = run_bench(opts).to_dict()
    s = summarize(report, name)
    s["notes"] = notes
    s["environment"] = {
        k: report["environment"].get(k)
        for k in ("gpu", "versions", "cpu")
        if k in report["environment"]
    }
    _write(args.out, f"summary-{name}.json", json.dumps(s, indent=1, default=str))
    md = summary_markdown(s, notes)
    _write(args.out, f"summary-{name}.md", md)
    print(md)
    return 0


def _write(out: Path, name: str, text: str) -> None:
    from deltadiff.atomic import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / name, text)


def main(argv: list[str] | None = None) -> int:
    how = import_from_checkout()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="run what needs no GPU; print the rest")
    ap.add_argument("--out", type=Path, default=Path("gpu-report"))
    ap.add_argument("--work", type=Path, default=Path("gpu-work"))
    ap.add_argument("--flavour", choices=("tensorrt", "tensorrt_rtx"), default=None)
    sub = ap.add_subparsers(dest="step", required=True)
    sub.add_parser("probe")
    e = sub.add_parser("export")
    e.add_argument("--preset", default="deltadiff-latent")
    e.add_argument("--tile", type=int, default=64)
    md = sub.add_parser("model")
    md.add_argument("--model", type=Path, required=True)
    md.add_argument("--name", default=None)
    md.add_argument("--no-trt", action="store_true")
    md.add_argument("--modes", default="staged,unrolled")
    md.add_argument("--batches", default="1,4")
    md.add_argument("--min-runs", type=int, default=20)
    md.add_argument("--min-seconds", type=float, default=2.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    log.info("deltadiff imported from the %s", how)
    from deltadiff.errors import DeltaDiffError

    try:
        return {"probe": cmd_probe, "export": cmd_export, "model": cmd_model}[args.step](args)
    except DeltaDiffError as exc:
        print(f"error: {exc}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
