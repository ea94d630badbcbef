"""End-to-end fidelity of a per-row plan of step graphs against the FP32 chain (the gate).

A *plan* maps each row t of the step table to a step graph (a serialized ONNX model) or to None
(the FP32 graph), and, for the latent families, ``"encoder"`` / ``"decoder"`` to their INT8
graphs. The FP32 trajectories of the held-out images are computed once; a plan is run from the
first stage it changes (the rows before it are the cached FP32 states), then decoded. For a VQ
decoder the score also counts the VQ codes that flip against FP32 (one flipped code can cost
end-to-end PSNR: the argmin is discontinuous).

Gate (every calibrate run):
    end to end vs FP32   >= 35 dB, on the worst held-out image (PSNR on [0, 1] RGB)
    PSNR-Y vs HR         within 0.10 dB of FP32 (mean over the held-out pairs), when paired
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deltadiff.calibration.data import Image, Trajectory, fp32_trajectory, tiles
from deltadiff.manifest import Manifest, verify_graph

log = logging.getLogger(__name__)

MIN_E2E_DB = 35.0
MAX_HR_DROP_DB = 0.10
MAX_SESSIONS = 6  # a plan uses at most one per row; each holds its own buffers


@dataclass
class Score:
    e2e_min_db: float  # worst image, INT8 vs FP32 output
    e2e_mean_db: float
    hr_db: float | None = None  # mean PSNR-Y vs HR of this plan
    hr_fp32_db: float | None = None  # ... and of FP32 on the same images
    per_image_db: list[float] = field(default_factory=list)
    codes_flipped: float | None = None  # VQ families: fraction of latent codes != FP32's

    @property
    def hr_delta(self) -> float | None:
        if self.hr_db is None or self.hr_fp32_db is None:
            return None
        return self.hr_db - self.hr_fp32_db

    def passes(self, min_e2e: float = MIN_E2E_DB, max_drop: float = MAX_HR_DROP_DB) -> bool:
        ok = self.e2e_min_db >= min_e2e
        if self.hr_delta is not None:
            ok = ok and self.hr_delta >= -max_drop
        return ok

    def line(self) -> str:
        s = f"e2e vs FP32 min {self.e2e_min_db:.2f} dB (mean {self.e2e_mean_db:.2f})"
        if self.hr_delta is not None:
            s += f", PSNR-Y vs HR {self.hr_db:.3f} dB ({self.hr_delta:+.3f} vs FP32)"
        if self.codes_flipped is not None:
            s += f", VQ codes flipped {100 * self.codes_flipped:.3f} %"
        return s

    def to_dict(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else round(v, 4)

        return {
            "e2e_vs_fp32_min_db": r(self.e2e_min_db),
            "e2e_vs_fp32_mean_db": r(self.e2e_mean_db),
            "psnr_y_hr_db": r(self.hr_db),
            "psnr_y_hr_fp32_db": r(self.hr_fp32_db),
            "psnr_y_hr_delta_db": r(self.hr_delta),
            "images": len(self.per_image_db),
            **(
                {"vq_codes_flipped": round(self.codes_flipped, 6)}
                if self.codes_flipped is not None
                else {}
            ),
        }


def vq_codebook(decoder: Any) -> np.ndarray | None:
    """The (K, C) codebook of a VQ decoder graph: the initializer of the MatMul inside the
    ``vq-distance-argmin`` island (z . e^T), or None for a decoder without a quantiser."""
    from onnx import numpy_helper

    from deltadiff.export.fp16 import load_rules, select_islands

    rules = [r for r in load_rules() if r.name == "vq-distance-argmin"]
    island = set(select_islands(decoder, "decoder", rules).get("vq-distance-argmin", []))
    inits = {i.name: i for i in decoder.graph.initializer}
    for n in decoder.graph.node:
        if n.name in island and n.op_type == "MatMul":
            w = next((inits[i] for i in n.input if i in inits and len(inits[i].dims) == 2), None)
            if w is not None:
                a = numpy_helper.to_array(w).astype(np.float64)
                return a.T if a.shape[0] < a.shape[1] else a
    return None


def vq_codes(z: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Nearest code of every latent pixel (the decoder's argmin, in float64)."""
    v = z.astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, z.shape[1])
    d = (v**2).sum(1, keepdims=True) + (codebook**2).sum(1)[None] - 2 * v @ codebook.T
    return d.argmin(1)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


class Evaluator:
    """Held-out images, their FP32 trajectories, and plan scoring (sessions cached by hash)."""

    def __init__(
        self, model_dir: Path, m: Manifest, images: list[Image], *, threads: int = 0
    ) -> None:
        import onnxruntime as ort

        self.ort = ort
        self.model_dir, self.m, self.images, self.threads = model_dir, m, images, threads
        self.rows = m.step_table.rows
        bmax = max(1, m.batch[1])
        lr = tiles(m, images)
        self.batches: list[tuple[slice, Trajectory]] = []
        for i in range(0, len(images), bmax):
            sl = slice(i, min(len(images), i + bmax))
            self.batches.append((sl, fp32_trajectory(model_dir, m, lr[sl], threads=threads)))
        import onnx

        self._sessions: dict[str, Any] = {}
        files = {
            g: verify_graph(model_dir, m.graph(g), what=f"graph {g}") for g in ("step", "decoder")
        }
        self.codebook = vq_codebook(onnx.load(str(files["decoder"])))
        self._fp32 = {g: self._session(f.read_bytes()) for g, f in files.items()}
        self._sessions.clear()  # the FP32 sessions are held in _fp32, outside the LRU
        self.step_inputs = [i.name for i in self._fp32["step"].get_inputs()]
        self.final = np.concatenate([t.x_out[self.rows[-1].t] for _, t in self.batches])
        self.fp32_images = np.concatenate([t.image for _, t in self.batches])
        self.hr_fp32 = self._hr_scores(self.fp32_images)
        self.runs = 0

    def _session(self, blob: bytes) -> Any:
        key = hashlib.sha256(blob).hexdigest()
        s = self._sessions.get(key)
        if s is None:
            so = self.ort.SessionOptions()
            so.log_severity_level = 3
            so.enable_cpu_mem_arena = False  # many sessions live here: give memory back
            if self.threads:
                so.intra_op_num_threads = self.threads
                so.inter_op_num_threads = 1
            s = self.ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
            while len(self._sessions) >= MAX_SESSIONS:  # oldest first (dicts keep order)
                self._sessions.pop(next(iter(self._sessions)))
            self._sessions[key] = s
        return s

    def _crop(self, img: np.ndarray, im: Image) -> np.ndarray:
        """The output region of the image itself (the tile may be reflect-padded)."""
        h, w = im.lr.shape[1:]
        th, tw = self.m.tile
        s = self.m.scale
        if h <= th and w <= tw:
            return img[:, : s * h, : s * w]
        return img

    def _hr_scores(self, outs: np.ndarray, images: list[Image] | None = None) -> list[float] | None:
        from deltadiff.metrics import psnr_y

        images = self.images if images is None else images
        if any(im.hr is None for im in images):
            return None
        th, tw = self.m.tile
        out = []
        for im, img in zip(images, outs, strict=True):
            h, w = im.lr.shape[1:]
            if h > th or w > tw:
                return None  # centre-cropped tiles have no HR counterpart here
            out.append(psnr_y(self._crop(img, im).transpose(1, 2, 0), im.hr))
        return out

    def _encode(self, blob: bytes, tr: Trajectory, k: int) -> dict[str, np.ndarray]:
        sess = self._session(blob)
        have = {"lr": tr.lr[:k], **{a: v[:k] for a, v in tr.noise.items()}}
        feeds = {i.name: have[i.name] for i in sess.get_inputs()}
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds), strict=True))

    def run(
        self,
        plan: dict[Any, bytes | None],
        limit: int | None = None,
        states: list[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Outputs (N, 3, H, W) of the chain with ``plan``'s graph at each row / stage
        (``limit``: only the first ``limit`` images, for the search; ``states``: collects the
        final latent states, fed to the decoder)."""
        n = len(self.images) if limit is None else min(limit, len(self.images))
        enc, dec = plan.get("encoder"), plan.get("decoder")
        changed = [i for i, r in enumerate(self.rows) if plan.get(r.t) is not None]
        if enc is None and dec is None and not changed:
            if states is not None:
                states.append(self.final[:n])
            return self.fp32_images[:n]
        first = 0 if enc is not None else (changed[0] if changed else len(self.rows))
        outs = []
        for sl, tr in self.batches:
            if sl.start >= n:
                break
            k = min(sl.stop, n) - sl.start
            over: dict[str, np.ndarray] = {}
            if enc is not None:
                over = self._encode(enc, tr, k)
                x = over["x"]
            elif first < len(self.rows):
                x = tr.x[self.rows[first].t][:k]
            else:
                x = tr.x_out[self.rows[-1].t][:k]
            for r in self.rows[first:]:
                blob = plan.get(r.t)
                sess = self._fp32["step"] if blob is None else self._session(blob)
                feeds = {
                    a: over[a]
                    if a in ("y", "cond") and a in over
                    else (v[:k] if v.ndim == 4 else v)
                    for a, v in tr.feeds(self.m, r, self.step_inputs).items()
                }
                feeds["x"] = x
                x = sess.run(["x_next"], feeds)[0]
            if states is not None:
                states.append(x)
            dsess = self._fp32["decoder"] if dec is None else self._session(dec)
            outs.append(dsess.run(["image"], {"x": x})[0])
        self.runs += 1
        return np.concatenate(outs)

    def stage_mse(self, t: Any, blob: bytes, limit: int) -> float:
        """Teacher-forced cost of one graph on the FP32 inputs, MSE vs the FP32 output: a step
        row (the next state), the encoder (its latent outputs) or the decoder (the image)."""
        if t == "encoder":
            _sl, tr = self.batches[0]
            out = self._encode(blob, tr, limit)
            ref = {"x": tr.x[self.rows[0].t], "y": tr.y, "cond": tr.cond}
            errs = [
                np.mean((out[a].astype(np.float64) - ref[a][:limit]) ** 2) for a in ref if a in out
            ]
            self.runs += 1
            return float(np.mean(errs))
        if t == "decoder":
            out = self._session(blob).run(["image"], {"x": self.final[:limit]})[0]
            self.runs += 1
            return float(np.mean((out.astype(np.float64) - self.fp32_images[:limit]) ** 2))
        return self.step_mse(t, blob, limit)

    def step_mse(self, t: int, blob: bytes, limit: int) -> float:
        """Teacher-forced: one row's step graph on the FP32 state, MSE vs the FP32 step output."""
        _sl, tr = self.batches[0]
        row = next(r for r in self.rows if r.t == t)
        feeds = {
            a: (v[:limit] if v.ndim == 4 else v)
            for a, v in tr.feeds(self.m, row, self.step_inputs).items()
        }
        out = self._session(blob).run(["x_next"], feeds)[0]
        self.runs += 1
        return float(np.mean((out.astype(np.float64) - tr.x_out[t][:limit]) ** 2))

    def score(self, plan: dict[Any, bytes | None], limit: int | None = None) -> Score:
        states: list[np.ndarray] = []
        out = self.run(plan, limit, states)
        images = self.images[: len(out)]
        per = [
            _psnr(self._crop(a, im), self._crop(b, im))
            for im, a, b in zip(images, out, self.fp32_images, strict=False)
        ]
        hr = self._hr_scores(out, images)
        hr32 = None if self.hr_fp32 is None else self.hr_fp32[: len(out)]
        return Score(
            e2e_min_db=min(per),
            e2e_mean_db=float(np.mean([min(p, 200.0) for p in per])),
            hr_db=None if hr is None else float(np.mean(hr)),
            hr_fp32_db=None if hr32 is None else float(np.mean(hr32)),
            per_image_db=per,
            codes_flipped=None if self.codebook is None else self.flips(np.concatenate(states)),
        )

    def flips(self, final: np.ndarray) -> float:
        """Fraction of VQ codes of ``final`` (latent states) that differ from FP32's."""
        assert self.codebook is not None
        a = vq_codes(final, self.codebook)
        b = vq_codes(self.final[: len(final)], self.codebook)
        return float(np.mean(a != b))
