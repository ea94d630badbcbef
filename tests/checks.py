"""Helpers shared by tests: TSV key tables, synthetic checkpoints in every upstream layout."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from deltadiff.model.swin_unet import relative_position_index, shift_mask

LAYOUTS = ("raw", "trainer", "orig_mod", "module_orig_mod", "ema", "safetensors")


def read_tsv(path: Path) -> OrderedDict[str, tuple[tuple[int, ...], str, str]]:
    out: OrderedDict[str, tuple[tuple[int, ...], str, str]] = OrderedDict()
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, dtype, kind = line.split("\t")
        out[key] = (tuple(int(s) for s in shape.split("x")) if shape else (), dtype, kind)
    return out


def state_from_tsv(path: Path, seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """Random tensors with the TSV's names/shapes; buffers as upstream builds them."""
    g = torch.Generator().manual_seed(seed)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, (shape, dtype, _kind) in read_tsv(path).items():
        if key.endswith("relative_position_index"):
            sd[key] = relative_position_index(int(round(shape[0] ** 0.5)))
        elif key.endswith("attn_mask"):
            n = int(round(shape[0] ** 0.5)) * 8
            sd[key] = shift_mask(n, n, 8, 4)
        else:
            sd[key] = torch.randn(shape, generator=g, dtype=getattr(torch, dtype)) * 0.05
    return sd


def write_layout(sd: dict[str, torch.Tensor], layout: str, path: Path) -> Path:
    """Save ``sd`` the way an upstream file of ``layout`` holds it (MODEL.md §5.5)."""
    if layout == "raw":
        torch.save(OrderedDict(sd), path)
    elif layout == "trainer":
        torch.save(
            {
                "iters_start": 2000,
                "log_step": {"train": 20, "val": 1},
                "log_step_img": {"train": 1, "val": 1},
                "state_dict": OrderedDict(("_orig_mod." + k, v) for k, v in sd.items()),
                "amp_scaler": {
                    "scale": 65536.0,
                    "growth_factor": 2.0,
                    "backoff_factor": 0.5,
                    "growth_interval": 2000,
                    "_growth_tracker": 0,
                },
            },
            path,
        )
    elif layout == "orig_mod":
        torch.save(OrderedDict(("_orig_mod." + k, v) for k, v in sd.items()), path)
    elif layout == "module_orig_mod":
        torch.save(OrderedDict(("module._orig_mod." + k, v) for k, v in sd.items()), path)
    elif layout == "ema":  # raw EMA OrderedDict, prefixed as the compiled DDP model's keys
        torch.save(OrderedDict(("module._orig_mod." + k, v.clone()) for k, v in sd.items()), path)
    elif layout == "safetensors":
        from safetensors.torch import save_file

        path = path.with_suffix(".safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        raise ValueError(layout)
    return path
