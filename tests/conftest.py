"""Shared fixtures: paths to the shared data, seeding, and small exported models (built once)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DD_SHARED", REPO.parent / "shared")).resolve()
# committed with the repository (data only; tests/golden/README.md): runs on a fresh clone
GOLDEN = REPO / "tests" / "golden"
SPEC = SHARED / "spec"
DATA = SHARED / "data"

# one small config per family, with the smallest valid LR tile
SMALL = {
    "deltadiff-pixel": ("deltadiff-pixel-small", 16),
    "deltadiff-latent": ("deltadiff-latent-small", 64),
    "resshift-v3": ("resshift-v3-small", 64),
}


def need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data missing: {path} (set DD_SHARED to the shared folder)")
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(0)


def _lazy_exports(tmp_path_factory: pytest.TempPathFactory, prefix: str, **opts: Any):
    """family -> model dir with the family's small config exported once with ``opts``."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            from deltadiff.export.graphs import TileShape
            from deltadiff.export.onnx_export import ExportOptions, export_onnx, preset_source
            from deltadiff.model.pipeline import Pipeline

            preset, tile = SMALL[family]
            out = tmp_path_factory.mktemp(f"{prefix}-{family}")
            kw = {k: v[family] if isinstance(v, dict) else v for k, v in opts.items()}
            export_onnx(
                Pipeline.from_preset(preset, seed=0),
                out,
                ExportOptions(TileShape(tile, tile), max_batch=4, **kw),
                source=preset_source(preset, 0),
            )
            cache[family] = out
        return cache[family]

    return get


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """family -> model dir with the small config exported (ONNX fp32), built lazily once."""
    return _lazy_exports(tmp_path_factory, "model")


# dynamic exports (dd-export onnx --dynamic): the largest LR each small model accepts
MAX_LR = {"deltadiff-pixel": (128, 128), "deltadiff-latent": (192, 192), "resshift-v3": (192, 192)}


@pytest.fixture(scope="session")
def dynamic_exported(tmp_path_factory: pytest.TempPathFactory):
    """family -> model dir with the small config exported with dynamic H/W, built once."""
    return _lazy_exports(tmp_path_factory, "dyn", dynamic=True, max_lr=MAX_LR)
