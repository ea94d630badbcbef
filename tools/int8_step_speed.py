"""FP32 vs INT8 step-graph speed on this CPU: the FP32 step, one bundled INT8 row and an upper bound
with every Conv / MatMul in INT8 (onnxruntime ``quantize_static``, QDQ, per-channel 7-bit weights).

    python tools/int8_step_speed.py [--model runtime/models/demo-pixel] [--lr 128] [--runs 5]

Interleaved runs after one warm-up each, 2 threads, medians. A lab tool (not packaged); its output
for 2026-12-07 is benchmarks/results/2026-12-07-epyc-avx2/step-graphs-128.txt.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from deltadiff.manifest import load_manifest


class _Feeds(CalibrationDataReader):
    def __init__(self, side: int) -> None:
        rng = np.random.default_rng(0)
        self._it = iter([_feeds(rng, side, t) for t in (3, 2)])

    def get_next(self) -> dict | None:
        return next(self._it, None)


def _feeds(rng: np.random.Generator, side: int, t: int) -> dict[str, np.ndarray]:
    img = {k: rng.random((1, 3, side, side), np.float32) for k in ("x", "y", "cond")}
    return {**img, "t": np.array([t], np.int64), "coef": np.array([1, 0, 1, 0, 0], np.float32)}


def _session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.enable_mem_pattern, so.log_severity_level = False, 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("runtime/models/demo-pixel"))
    ap.add_argument("--lr", type=int, default=128, help="LR side (the state is 4x)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    m = load_manifest(a.model, check_hashes=False)
    step = a.model / m.graph("step").file
    with tempfile.TemporaryDirectory() as tmp:
        all_int8 = Path(tmp) / "all-int8.onnx"
        quantize_static(
            str(step), str(all_int8), _Feeds(64), quant_format=QuantFormat.QDQ,
            per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "MatMul"],
        )  # fmt: skip
        graphs = {
            "fp32": step,
            "int8 row t=2 (bundled)": a.model / m.graph("step@2", "int8").file,
            "int8 every Conv/MatMul": all_int8,
        }
        sess = {k: _session(p, a.threads) for k, p in graphs.items()}
        feeds = _feeds(np.random.default_rng(0), 4 * a.lr, 2)
        for s in sess.values():
            s.run(None, feeds)
        times: dict[str, list[float]] = {k: [] for k in sess}
        for _ in range(a.runs):
            for k, s in sess.items():
                t0 = time.perf_counter()
                s.run(None, feeds)
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:24s} median {v * 1000:7.0f} ms  vs fp32 {med['fp32'] / v:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
