"""Shared fixtures: paths to the shared data, seeding, and small exported models (built once)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DD_SHARED", REPO.parent / "shared")).resolve()
GOLDEN = SHARED / "golden"
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


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """family -> model dir with the small config exported (ONNX fp32), built lazily once."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            from deltadiff.export.graphs import TileShape
            from deltadiff.export.onnx_export import ExportOptions, export_onnx, preset_source
            from deltadiff.model.pipeline import Pipeline

            preset, tile = SMALL[family]
            out = tmp_path_factory.mktemp(f"model-{family}")
            pipe = Pipeline.from_preset(preset, seed=0)
            export_onnx(
                pipe,
                out,
                ExportOptions(TileShape(tile, tile), max_batch=4),
                source=preset_source(preset, 0),
            )
            cache[family] = out
        return cache[family]

    return get


# dynamic exports (dd-export onnx --dynamic): the largest LR each small model accepts
MAX_LR = {"deltadiff-pixel": (128, 128), "deltadiff-latent": (192, 192), "resshift-v3": (192, 192)}


@pytest.fixture(scope="session")
def dynamic_exported(tmp_path_factory: pytest.TempPathFactory):
    """family -> model dir with the small config exported with dynamic H/W, built once."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            from deltadiff.export.graphs import TileShape
            from deltadiff.export.onnx_export import ExportOptions, export_onnx, preset_source
            from deltadiff.model.pipeline import Pipeline

            preset, tile = SMALL[family]
            out = tmp_path_factory.mktemp(f"dyn-{family}")
            pipe = Pipeline.from_preset(preset, seed=0)
            opts = ExportOptions(
                TileShape(tile, tile), max_batch=4, dynamic=True, max_lr=MAX_LR[family]
            )
            export_onnx(pipe, out, opts, source=preset_source(preset, 0))
            cache[family] = out
        return cache[family]

    return get
