"""Checkpoint loading for every upstream layout (docs/design.md "Checkpoints"), in four stages:

1. **read**: ``torch.load(..., weights_only=True)`` or safetensors; never executes pickled code;
2. **canonicalize**: unwrap trainer dicts (``state_dict``), pick EMA when asked, strip
   ``module.`` / ``_orig_mod.`` prefixes per key;
3. **detect**: name the network from key shapes (DeltaDiff UNet, ResShift UNet, VQ-f4);
4. **strict load**: every parameter present with the right shape; ``attn_mask`` buffers ignored;
   ``relative_position_index`` checked against the formula. Mismatches are reported by name.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltadiff.atomic import atomic_path
from deltadiff.errors import CheckpointError
from deltadiff.model.swin_unet import IGNORED_BUFFER_SUFFIXES

log = logging.getLogger(__name__)

PREFIXES = ("module.", "_orig_mod.")
WRAPPER_KEYS = ("state_dict", "model", "params")
EMA_KEYS = ("ema", "ema_state_dict", "params_ema", "ema_model")
_SHOW = 5  # names shown per category in error messages


def read_weights(path: str | Path) -> Any:
    """Read a weight file without executing code. Returns the raw object (dict of tensors, ...)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass the .pth/.safetensors file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); re-download or re-save it")
    with path.open("rb") as fh:
        head = fh.read(16)
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        return _read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} contains pickled objects other than tensors and plain "
                "containers; refusing to execute them (weights_only). Re-save it as a state dict "
                "or safetensors"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is not a readable PyTorch file ({first})"
        ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, IndexError, ... on bad files
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if (
            not zipfile.is_zipfile(path)
            and not head.startswith(b"\x80")
            and not head.startswith(b"PK")
        ):
            raise CheckpointError(
                f"{path} is not a PyTorch checkpoint or safetensors file; pass a .pth/.safetensors "
                "weight file"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({msg}); the file may be truncated or corrupt, "
            "re-download it"
        ) from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from deltadiff._deps import require

    st = require("safetensors.torch", "export")
    try:
        return st.load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"safetensors file {path} cannot be read ({msg}); it may be truncated, re-download it"
        ) from None


def strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if key.startswith(p):
                key = key[len(p) :]
                changed = True
    return key


def canonicalize(
    obj: Any, *, ema: bool = False, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Unwrap a trainer dict and strip key prefixes. Returns a flat ``name -> tensor`` dict."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source} holds a {type(obj).__name__}, not a state dict; pass a weight file"
        )
    if ema:
        for k in EMA_KEYS:
            if isinstance(obj.get(k), Mapping):
                obj = obj[k]
                break
        else:
            log.warning(
                "%s has no EMA entry (%s); using its weights as they are",
                source,
                "/".join(EMA_KEYS),
            )
    for k in WRAPPER_KEYS:
        inner = obj.get(k)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    sd: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue  # trainer bookkeeping (iters_start, amp_scaler, ...)
        sd[strip_prefixes(str(k))] = v
    if not sd:
        raise CheckpointError(
            f"{source} contains no tensors (top-level keys: {', '.join(map(str, list(obj)[:8]))})"
        )
    return sd


def detect(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Name the network a canonical state dict belongs to, from key shapes."""
    w = sd.get("input_blocks.0.0.weight")
    if w is not None and w.ndim == 4 and w.shape[1] == 6:
        if (
            "middle_block.1.blocks.0.attn.qkv.weight" in sd
            and sd["middle_block.1.blocks.0.attn.qkv.weight"].shape[1] == 96
            and "input_blocks.4.0.in_layers.0.weight" not in sd
        ):
            return "deltadiff-unet"
        return "resshift-unet"
    if "encoder.conv_in.weight" in sd and "quantize.embedding.weight" in sd:
        return "vq-f4"
    return None


def describe(sd: Mapping[str, torch.Tensor]) -> str:
    kind = detect(sd)
    if kind is None:
        return "an unrecognised network"
    key = "input_blocks.0.0.weight" if kind.endswith("unet") else "encoder.conv_in.weight"
    shape = "x".join(map(str, sd[key].shape))
    return f"a {kind} ({key} {shape})"


def _ignored(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in IGNORED_BUFFER_SUFFIXES


def load_state(
    module: nn.Module, sd: Mapping[str, torch.Tensor], *, what: str, config_desc: str, source: str
) -> None:
    """Strictly copy ``sd`` into ``module``; one clear error listing every kind of mismatch."""
    own = module.state_dict()
    want = {k: v for k, v in own.items() if not _ignored(k)}
    have = {k: v for k, v in sd.items() if not _ignored(k)}
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    misshaped = [
        f"{k} {tuple(have[k].shape)} vs {tuple(want[k].shape)}"
        for k in want
        if k in have and tuple(have[k].shape) != tuple(want[k].shape)
    ]
    # relative_position_index: optional in files, but must equal the formula if present
    bad_index = [
        k
        for k in want
        if k.endswith("relative_position_index")
        and k in have
        and tuple(have[k].shape) == tuple(want[k].shape)
        and not torch.equal(have[k].long(), want[k])
    ]
    missing = [k for k in missing if not k.endswith("relative_position_index")]
    if missing or unexpected or misshaped or bad_index:
        parts = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped (file vs model)", misshaped),
            ("relative_position_index differs from the Swin formula", bad_index),
        ):
            if items:
                shown = ", ".join(items[:_SHOW]) + (", ..." if len(items) > _SHOW else "")
                parts.append(f"{len(items)} {label}: {shown}")
        raise CheckpointError(
            f"{source} does not fit the {what} of config {config_desc} (the file looks like "
            f"{describe(sd)}): " + "; ".join(parts) + ". Pass the matching --config / preset"
        )
    with torch.no_grad():
        for k, v in want.items():
            if k in have:
                if v.dtype.is_floating_point and not have[k].dtype.is_floating_point:
                    raise CheckpointError(
                        f"{source}: {k} has dtype {have[k].dtype}, expected {v.dtype}"
                    )
                v.copy_(have[k].to(v.dtype))
    n_ign = sum(1 for k in sd if _ignored(k))
    log.debug(
        "loaded %d tensors into %s from %s (%d ignored buffers)", len(want), what, source, n_ign
    )


def load_weights_into(
    module: nn.Module, path: str | Path, *, what: str, config_desc: str, ema: bool = False
) -> None:
    sd = canonicalize(read_weights(path), ema=ema, source=str(path))
    load_state(module, sd, what=what, config_desc=config_desc, source=str(path))


def save_trainer_checkpoint(
    path: str | Path, state_dict: Mapping[str, torch.Tensor], iters: int
) -> None:
    """Write the DeltaDiff/ResShift trainer layout: ``state_dict``, ``_orig_mod.``-prefixed."""
    obj = {
        "iters_start": int(iters),
        "log_step": {"train": 0, "val": 0},
        "log_step_img": {"train": 0, "val": 0},
        "state_dict": {
            "_orig_mod." + k: v.detach().cpu().contiguous() for k, v in state_dict.items()
        },
    }
    _atomic_torch_save(obj, Path(path))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_safetensors(path: str | Path, state_dict: Mapping[str, torch.Tensor]) -> None:
    from deltadiff._deps import require

    st = require("safetensors.torch", "export")
    with atomic_path(path) as tmp:
        st.save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp))
