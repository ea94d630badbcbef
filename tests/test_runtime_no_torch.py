"""The lean runtime never imports torch: every runtime module and ``dd-run upscale`` run in a
process where ``import torch`` fails."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

import deltadiff.runtime

BLOCK = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None
    sys.meta_path.insert(0, _Block())
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=600
    )


def test_every_runtime_module_imports_without_torch():
    mods = [
        "deltadiff",
        "deltadiff.errors",
        "deltadiff.runtime",
        "deltadiff.benchmarks.quality",
        "deltadiff.lpips",
    ]
    mods += [
        m.name for m in pkgutil.walk_packages(deltadiff.runtime.__path__, "deltadiff.runtime.")
    ]
    r = _run(
        "import importlib\n"
        + "".join(f"importlib.import_module({m!r})\n" for m in mods)
        + "print('ok')"
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    assert len(mods) >= 10


def test_dd_run_upscale_works_without_torch(exported, tmp_path):
    model = exported("deltadiff-pixel")
    img = (np.random.default_rng(0).random((20, 28, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "in.png")
    code = (
        "import sys\nfrom deltadiff.cli.run import app\n"
        f"sys.argv=['dd-run','upscale',{str(tmp_path / 'in.png')!r},'-o',{str(tmp_path / 'out.png')!r},"
        f"'--model',{str(model)!r},'-q']\n"
        "try:\n    app()\nexcept SystemExit as e:\n    sys.exit(e.code)\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr[-3000:]
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == (80, 112, 3)
