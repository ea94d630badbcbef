"""Measure how much the suite's compared quantities move across kernels, threads and batch sizes.

Every tolerance in ``tests/tolerances.py`` is grounded in a number this script prints. Run it once
as is and once with the other ISA forced, then compare the two saved outputs::

    python tools/measure_spread.py --save /tmp/spread-native.npz
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python tools/measure_spread.py --save /tmp/spread-avx2.npz --against /tmp/spread-native.npz

What it measures (max-abs on outputs in [0, 1] unless stated):

- the PyTorch reference, small presets: batch of two vs batch of one; 1 vs 2 intra-op threads;
- ONNX Runtime, the small pixel preset exported here: batch of three vs one; 1 vs 2 threads;
  and ORT vs the reference end to end (PSNR);
- ``--against``: the same reference / ORT outputs on this run vs the saved run (another ISA).

ONNX Runtime's MLAS kernels pick their ISA from CPUID and offer no switch, so the ORT numbers
change with the machine only; the torch numbers change with the forced ISA.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from deltadiff.compare import psnr
from deltadiff.model.pipeline import Pipeline

SMALL = ("deltadiff-pixel-small", "deltadiff-latent-small", "resshift-v3-small")


def _maxabs(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def reference(outputs: dict[str, np.ndarray]) -> dict[str, float]:
    res: dict[str, float] = {}
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(2, 3, 16, 24, generator=g)
    for name in SMALL:
        p = Pipeline.from_preset(name, seed=3)
        both = p.upscale(lr, seed=5)
        hw = (lr.shape[2], lr.shape[3])
        mult = p.pad_multiple
        hp, wp = (-(-hw[0] // mult) * mult, -(-hw[1] // mult) * mult)
        state = (hp, wp) if p.cfg.latent else (4 * hp, 4 * wp)
        noise = {k: v[1:] for k, v in p.make_noise((2, 3, *state), 5).items()}
        one = p.upscale(lr[1:], noise=noise)
        res[f"torch {name}: batch 2 vs 1"] = _maxabs(both[1:], one)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        single_thread = p.upscale(lr, seed=5)
        torch.set_num_threads(threads)
        res[f"torch {name}: 1 vs {threads} threads"] = _maxabs(both, single_thread)
        res[f"torch {name}: same call twice (must be 0)"] = _maxabs(both, p.upscale(lr, seed=5))
        outputs[f"torch/{name}"] = both.numpy()
    return res


def onnxruntime(outputs: dict[str, np.ndarray]) -> dict[str, float]:
    from deltadiff.export.graphs import TileShape
    from deltadiff.export.onnx_export import ExportOptions, export_onnx, preset_source
    from deltadiff.manifest import load_manifest
    from deltadiff.runtime.backends.ort import OrtBackend
    from deltadiff.runtime.executor import Executor

    res: dict[str, float] = {}
    name = "deltadiff-pixel-small"
    with tempfile.TemporaryDirectory() as tmp:
        pipe = Pipeline.from_preset(name, seed=0)
        export_onnx(
            pipe,
            Path(tmp),
            ExportOptions(TileShape(16, 16), max_batch=4),
            source=preset_source(name, 0),
        )
        m = load_manifest(tmp)
        lr = np.random.default_rng(0).random((3, 3, 16, 16), dtype=np.float32)
        runs = {}
        for threads in (1, 2):
            with OrtBackend(tmp, m, threads=threads) as be:
                ex = Executor(m, be)
                runs[threads] = (ex.run(lr), ex.run(lr[1:2]), ex.run(lr))
        big, one, again = runs[2]
        res[f"ORT {name}: batch 3 vs 1"] = _maxabs(big[1:2], one)
        res[f"ORT {name}: 1 vs 2 threads"] = _maxabs(runs[1][0], big)
        res[f"ORT {name}: same call twice (must be 0)"] = _maxabs(big, again)
        with torch.no_grad():
            ref = pipe(torch.from_numpy(lr)).numpy()
        res[f"ORT vs torch {name}: PSNR dB (end to end)"] = psnr(ref, big, data_range=1.0)
        res[f"ORT vs torch {name}: max-abs"] = _maxabs(ref, big)
        outputs[f"ort/{name}"] = big
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save", type=Path, help="write the outputs here (.npz) for --against")
    ap.add_argument("--against", type=Path, help="outputs saved by a run with another ISA")
    ap.add_argument("--skip-ort", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    env = {
        k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ
    }
    outputs: dict[str, np.ndarray] = {}
    res = reference(outputs)
    if not args.skip_ort:
        res.update(onnxruntime(outputs))
    if args.against:
        other = np.load(args.against)
        for k in sorted(set(other.files) & set(outputs)):
            res[f"{k}: this run vs {args.against.name}"] = _maxabs(outputs[k], other[k])
    if args.save:
        np.savez(args.save, **outputs)
    print(
        json.dumps(
            {"env": env, "torch_cpu": torch.backends.cpu.get_cpu_capability(), **res}, indent=1
        )
    )


if __name__ == "__main__":
    main()
