"""One step graph, FP32 against the model's INT8 row graphs, in ONNX Runtime and (if installed)
OpenVINO: how much of INT8's compute saving each CPU runtime turns into speed.

    python tools/bench_int8_runtimes.py --model runtime/models/demo-pixel --lr 128 \\
        --runtime onnxruntime --runtime openvino --runs 5 --out benchmarks/results/int8-runtimes

Every (runtime, graph) pair runs once per round, rounds interleave, the medians and the speed
against ONNX Runtime FP32 are reported. Each INT8 row graph is fed its own row's ``t`` and
``coef``; the FP32 graph is timed at the first INT8 row's inputs (the FP32 cost does not depend on
the row). ``--graph NAME=FILE`` adds any other step graph (e.g. one with every Conv INT8). The
fidelity column is the output's PSNR against ONNX Runtime FP32 on the same inputs (one step,
random smooth input: a sanity check, not the calibration gate). OpenVINO is not a dependency of
this project; ``pip install openvino`` to include it (measured here to decide on a backend).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deltadiff.atomic import write_text_atomic
from deltadiff.benchmarks.harness import BenchOptions, environment
from deltadiff.manifest import load_manifest, write_json_atomic

RUNTIMES = ("onnxruntime", "openvino")


def _inputs(inputs: list[Any], hw: tuple[int, int], rng: np.random.Generator) -> dict[str, Any]:
    """Smooth random float inputs (x, y, cond, noise) of the state size ``hw``."""
    out: dict[str, Any] = {}
    for spec in inputs:
        if spec.name in ("t", "coef"):
            continue
        coarse = rng.uniform(-1, 1, (1, spec.shape[1], 4, 4)).astype(np.float32)
        up = np.kron(coarse, np.ones((-(-hw[0] // 4), -(-hw[1] // 4)), np.float32))
        out[spec.name] = np.ascontiguousarray(up[..., : hw[0], : hw[1]])
    return out


def _runner(runtime: str, path: Path, threads: int) -> Callable[[dict[str, Any]], np.ndarray]:
    if runtime == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.enable_mem_pattern = False  # as the runtime's CPU sessions
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return lambda f: s.run(None, f)[0]
    import openvino as ov

    core = ov.Core()
    cfg = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    req = core.compile_model(core.read_model(str(path)), "CPU", cfg).create_infer_request()
    return lambda f: np.asarray(next(iter(req.infer(f).values())))


def measure(
    model: Path, lr: int, runtimes: list[str], runs: int, threads: int, extra: dict[str, Path]
) -> dict[str, Any]:
    m = load_manifest(model)
    if not m.accepts(lr, lr):
        raise SystemExit(f"error: --lr {lr}: {m.name} accepts {m.lr_range_text()}")
    rows = {r.t: r for r in m.step_table.rows}
    step = m.graph("step")
    graphs: dict[str, tuple[Path, Any]] = {}
    for t, row in rows.items():
        g = m.graph(f"step@{t}", "int8", "onnxruntime")
        if g.file != step.file:
            graphs[f"int8 t={t}"] = (model / g.file, row)
    if not graphs:
        raise SystemExit(f"{model}: no INT8 step graphs; run dd-export calibrate first")
    first_row = next(iter(graphs.values()))[1]
    graphs = {"fp32": (model / step.file, first_row), **graphs}
    graphs.update({k: (p, first_row) for k, p in extra.items()})
    base_in = _inputs(step.inputs, m.state_hw((lr, lr)), np.random.default_rng(0))
    feeds = {
        k: {**base_in, "t": row.t_input(1), "coef": row.coef()} for k, (_, row) in graphs.items()
    }
    run = {(rt, k): _runner(rt, p, threads) for rt in runtimes for k, (p, _) in graphs.items()}
    ref = {k: run[("onnxruntime", "fp32")](feeds[k]) for k in graphs}  # FP32 at each row's inputs
    psnr = {}
    for key, fn in run.items():
        out = fn(feeds[key[1]])  # also the warm-up
        mse = float(np.mean((out - ref[key[1]]) ** 2))
        psnr[key] = None if mse == 0 else round(10 * np.log10(4.0 / mse), 1)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in run}
    for _ in range(runs):
        for key, fn in run.items():
            t0 = time.perf_counter()
            fn(feeds[key[1]])
            times[key].append(time.perf_counter() - t0)
    base = statistics.median(times[("onnxruntime", "fp32")])
    cells = [
        {
            "runtime": rt,
            "graph": k,
            "file": graphs[k][0].name,
            "median_ms": 1e3 * statistics.median(v),
            "runs_ms": [1e3 * x for x in v],
            "speed_vs_ort_fp32": base / statistics.median(v),
            "psnr_vs_ort_fp32_db": psnr[(rt, k)],
        }
        for (rt, k), v in times.items()
    ]
    return {"model": m.name, "lr": lr, "threads": threads, "runs": runs, "cells": cells}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--lr", type=int, default=128, help="LR side; the step runs at its scale")
    ap.add_argument("--runtime", choices=RUNTIMES, action="append", default=[])
    ap.add_argument("--graph", action="append", default=[], help="NAME=FILE: another step graph")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--label", default="local")
    a = ap.parse_args(argv)
    runtimes = list(dict.fromkeys(["onnxruntime", *a.runtime]))
    if "openvino" in runtimes and importlib.util.find_spec("openvino") is None:
        raise SystemExit(
            "error: --runtime openvino: OpenVINO is not installed (pip install openvino)"
        )
    extra = {}
    for g in a.graph:
        name, sep, file = g.partition("=")
        if not sep or not Path(file).is_file():
            raise SystemExit(f"error: --graph {g!r}: write NAME=FILE with an existing ONNX file")
        extra[name] = Path(file)
    res = measure(a.model, a.lr, runtimes, a.runs, a.threads, extra)
    res["environment"] = environment(BenchOptions(models=(), label=a.label, threads=a.threads))
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"int8-runtimes-{a.label}"
    write_json_atomic(stem.with_suffix(".json"), res)
    cpu = res["environment"]["cpu"]
    md = (
        f"# One step graph per runtime: {res['model']}, LR {a.lr}² (state at its scale), "
        f"{a.threads} threads, median of {a.runs}, interleaved\n\n"
        f"CPU: {cpu['model']}.\n\n"
        "| runtime | graph | median | vs ORT FP32 | PSNR vs ORT FP32 (one step) |\n"
        "|---|---|---:|---:|---:|\n"
        + "".join(
            f"| {c['runtime']} | {c['graph']} | {c['median_ms']:.0f} ms | "
            f"{c['speed_vs_ort_fp32']:.2f}x | {c['psnr_vs_ort_fp32_db'] or 'equal'} dB |\n"
            for c in res["cells"]
        )
    )
    write_text_atomic(stem.with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    main()
