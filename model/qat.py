"""Quantization-aware fine-tuning: INT8 fake quantization in the trainer's forward pass.

Post-training INT8 of a small SR network is limited by how much the network amplifies the
rounding noise of its activations (the demo model at t = 3 turns a 0.003 perturbation of its
input into a 25 dB x0 error; docs/precision.md "INT8"). A short fine-tune with the rounding in
the loop teaches the weights to tolerate it, so the calibration search can leave more of the graph
in INT8 at the same gate.

The noise imitates the ONNX Runtime target that ``dd-export calibrate`` writes: every Conv2d and
Linear reads its input through per-tensor asymmetric U8 quantization (range: the batch's min/max,
widened to include 0) and its weight through per-output-channel symmetric quantization with the
target's levels (-64..64: ``deltadiff.options.ORT_WEIGHT_QMAX``). The bundled demo weights were
fine-tuned with -127..127, before the target moved to 7-bit weights.
Gradients pass straight through the rounding (the straight-through estimator). The module's
parameters and state-dict keys are untouched: the forward methods are replaced on the instances
and ``FakeQuant.remove`` puts them back.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deltadiff.options import ORT_WEIGHT_QMAX


def fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    """U8 asymmetric, one scale per tensor from its min/max (0 always representable)."""
    with torch.no_grad():
        lo = torch.clamp(x.min(), max=0.0)
        hi = torch.clamp(x.max(), min=0.0)
        scale = torch.clamp((hi - lo) / 255.0, min=1e-8)
        zero = torch.round(-lo / scale)
        q = (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale
    return x + (q - x).detach()


def fake_quant_weight(w: torch.Tensor, qmax: int = ORT_WEIGHT_QMAX) -> torch.Tensor:
    """Symmetric per output channel (axis 0), levels -qmax..qmax (the ONNX Runtime target's)."""
    with torch.no_grad():
        amax = w.abs().flatten(1).amax(1).clamp(min=1e-12)
        scale = (amax / qmax).view(-1, *([1] * (w.ndim - 1)))
        q = torch.clamp(torch.round(w / scale), -qmax, qmax) * scale
    return w + (q - w).detach()


def _conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return self._conv_forward(fake_quant_activation(x), fake_quant_weight(self.weight), self.bias)


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(fake_quant_activation(x), fake_quant_weight(self.weight), self.bias)


class FakeQuant:
    """Fake INT8 on every Conv2d / Linear of ``net`` until ``remove()`` (or the with-block ends)."""

    def __init__(self, net: nn.Module) -> None:
        self.modules: list[nn.Module] = []
        for mod in net.modules():
            fwd: Callable | None = None
            if isinstance(mod, nn.Conv2d):
                fwd = _conv_forward
            elif isinstance(mod, nn.Linear):
                fwd = _linear_forward
            if fwd is not None:
                mod.forward = types.MethodType(fwd, mod)  # type: ignore[method-assign]
                self.modules.append(mod)

    def remove(self) -> None:
        for mod in self.modules:
            del mod.forward  # the class's forward again
        self.modules = []

    def __enter__(self) -> FakeQuant:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
