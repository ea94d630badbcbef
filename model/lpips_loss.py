"""LPIPS v0.1 (AlexNet) as a differentiable torch loss, for training (``dd-export train
--lpips-weight``). The official DeltaDiff pixel trainer adds LPIPS on the x̂₀ prediction to the MSE.

Same network, weights and formula as the numpy metric ``deltadiff.lpips`` (which loads and checks
the npz for both): inputs in [-1, 1], scaling layer, AlexNet ``features`` taps after each ReLU,
channel unit-normalisation, squared difference, non-negative 1x1 "lin" weights, spatial mean, sum
over the five taps. The trunk is frozen (no gradients to it); the loss is per-sample (B,).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deltadiff.lpips import _CONVS, _EPS, MIN_SIDE, load_weights


class LPIPSLoss(nn.Module):
    """``LPIPSLoss(weights)(a, b)``: per-sample LPIPS of NCHW RGB tensors in [-1, 1]."""

    def __init__(self, weights: str | Path) -> None:
        super().__init__()
        arrays = load_weights(Path(weights))
        self.convs = nn.ModuleList()
        for prefix, c_out, c_in, k, s, p, _ in _CONVS:
            conv = nn.Conv2d(c_in, c_out, k, stride=s, padding=p)
            conv.weight.data = torch.from_numpy(arrays[f"{prefix}.weight"].astype("float32"))
            conv.bias.data = torch.from_numpy(arrays[f"{prefix}.bias"].astype("float32"))
            self.convs.append(conv)
        self.pools = [pool for *_, pool in _CONVS]
        lins = [torch.from_numpy(arrays[f"lin{i}.weight"].astype("float32")) for i in range(5)]
        for i, w in enumerate(lins):
            self.register_buffer(f"lin{i}", w)
        self.register_buffer("shift", torch.from_numpy(arrays["scaling.shift"].astype("float32")))
        self.register_buffer("scale", torch.from_numpy(arrays["scaling.scale"].astype("float32")))
        self.requires_grad_(False)
        self.eval()

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for conv, pool in zip(self.convs, self.pools, strict=True):
            x = F.relu(conv(x))
            out.append(x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + _EPS))
            if pool:
                x = F.max_pool2d(x, 3, 2)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.ndim != 4 or min(a.shape[-2:]) < MIN_SIDE:
            raise ValueError(f"LPIPS needs two equal NCHW tensors, sides >= {MIN_SIDE}: {a.shape}")
        total = a.new_zeros(a.shape[0])
        for i, (ta, tb) in enumerate(zip(self.taps(a), self.taps(b), strict=True)):
            d = (ta - tb) ** 2
            total = total + torch.sum(d * getattr(self, f"lin{i}"), dim=1).mean(dim=(1, 2))
        return total
