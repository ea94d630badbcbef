"""Where INT8 clips: each Q/DQ range of a model's INT8 step graphs against the activations that
whole real images produce along the FP32 trajectory, per row and layer, border vs interior.

    python tools/int8_clipping.py --model runtime/models/demo-pixel --data corpus/report/lq \
        [--limit 12] [--border 2] [--out clipping.json]

For every QuantizeLinear of ``step@t.int8.onnxruntime`` the representable range is
[(0 - zp) * s, (qmax - zp) * s]; the FP32 step graph (same tensor names) is run with those
tensors as extra outputs. Reported per (row, tensor): the clipping error energy relative to the range's own 8-bit rounding noise (step²/12): overall,
in the border band (``--border`` pixels of the tensor's own grid, each edge) and inside; and the
fraction of values above the range.
A lab tool (not packaged); numbers feed docs/results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from PIL import Image

from deltadiff.manifest import load_manifest


def q_ranges(path: Path) -> dict[str, tuple[float, float]]:
    """tensor name -> representable [lo, hi] of every QuantizeLinear's input."""
    g = onnx.load(str(path)).graph
    init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consts = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in g.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].t is not None
    }
    vals = {**consts, **init}
    out = {}
    for n in g.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in init:
            continue
        s = float(np.asarray(vals[n.input[1]]).reshape(-1)[0])
        zp_arr = np.asarray(vals[n.input[2]]) if len(n.input) > 2 else np.uint8(0)
        zp = float(zp_arr.reshape(-1)[0])
        lo_q, hi_q = (0, 255) if zp_arr.dtype == np.uint8 else (-128, 127)
        out[n.input[0]] = ((lo_q - zp) * s, (hi_q - zp) * s)
    return out


def session(path: Path, extra: list[str]) -> ort.InferenceSession:
    model = onnx.load(str(path))
    have = {o.name for o in model.graph.output}
    for name in extra:
        if name not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def band_mask(shape: tuple[int, ...], border: int) -> np.ndarray | None:
    """True in the ``border``-pixel band of an (N, C, H, W) tensor's grid; None if not 4-D."""
    if len(shape) != 4 or min(shape[2:]) <= 2 * border:
        return None
    m = np.zeros(shape[2:], bool)
    m[:border], m[-border:], m[:, :border], m[:, -border:] = True, True, True, True
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="folder of LR images")
    ap.add_argument("--limit", type=int, default=12)
    ap.add_argument("--border", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    m = load_manifest(a.model, check_hashes=False)
    enc = session(a.model / m.graph("encoder").file, [])
    files = sorted(p for p in a.data.iterdir() if p.suffix.lower() in (".png", ".jpg"))[: a.limit]
    acc: dict[tuple[int, str], np.ndarray] = {}  # out, n, out_band, n_band, amax
    for f in files:
        lr = np.asarray(Image.open(f).convert("RGB"), np.float32)[None].transpose(0, 3, 1, 2) / 255
        x, y, cond = enc.run(["x", "y", "cond"], {"lr": lr})
        for r in m.step_table.rows:
            rng = q_ranges(a.model / m.graph(f"step@{r.t}", "int8", "onnxruntime").file)
            names = sorted(rng)
            sess = session(a.model / m.graph("step").file, names)
            feeds = {"x": x, "y": y, "cond": cond, "t": r.t_input(), "coef": r.coef()}
            outs = sess.run(["x_next", *names], feeds)
            for name, v in zip(names, outs[1:], strict=True):
                lo, hi = rng[name]
                err2 = (v - np.clip(v, lo, hi)) ** 2  # clipping error energy
                q2 = ((hi - lo) / 255) ** 2 / 12  # rounding noise of one 8-bit step
                band = band_mask(v.shape, a.border)
                row = acc.setdefault((r.t, name), np.zeros(6))
                row[0] += err2.sum() / q2
                row[1] += err2.size
                if band is not None:
                    row[2] += err2[..., band].sum() / q2
                    row[3] += err2[..., band].size
                row[4] = max(row[4], float(np.abs(v).max()) / max(abs(lo), abs(hi)))
                row[5] += (v > hi).sum()
            x = outs[0]
    rows = [
        {
            "row": t,
            "tensor": name,
            "clip_over_rounding": v[0] / v[1],
            "clip_over_rounding_border": v[2] / v[3] if v[3] else None,
            "clip_over_rounding_interior": (v[0] - v[2]) / (v[1] - v[3]) if v[1] > v[3] else None,
            "above_range": v[5] / v[1],
            "amax_over_range": round(v[4], 3),
        }
        for (t, name), v in sorted(acc.items(), key=lambda kv: -kv[1][0] / kv[1][1])
    ]
    print(f"{len(files)} images from {a.data}; clipping error energy / 8-bit rounding noise:")
    for r in rows[:15]:
        cb, ci = r["clip_over_rounding_border"], r["clip_over_rounding_interior"]
        print(
            f"  t={r['row']} {r['tensor']:<22} {r['clip_over_rounding']:8.4f}"
            f"  border {cb or 0:8.4f}  interior {ci or 0:8.4f}"
            f"  above {100 * r['above_range']:.4f} %  max|x|/range {r['amax_over_range']:.2f}"
        )
    if a.out:
        a.out.write_text(json.dumps({"images": [f.name for f in files], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
