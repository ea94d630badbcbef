"""ONNX export (small configs, every family) and ONNX Runtime vs the PyTorch reference."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from deltadiff.errors import ManifestError
from deltadiff.export.verify import verify
from deltadiff.manifest import GRAPH_NAMES, load_manifest, sha256_file
from deltadiff.model.config import preset
from deltadiff.model.schedule import step_table
from deltadiff.runtime.backends.ort import OrtBackend
from deltadiff.runtime.executor import Executor

from .checks import CODE_FLIP_E2E_MIN_PSNR, ORT_BATCH_ATOL, STAGE_MIN_PSNR
from .conftest import SMALL

FAMILIES = sorted(SMALL)


@pytest.mark.parametrize("family", FAMILIES)
def test_ort_fp32_matches_reference_per_stage_and_end_to_end(exported, family):
    # latent families decode through a VQ argmin: a flipped near-tie code is legitimate
    floor = CODE_FLIP_E2E_MIN_PSNR if family != "deltadiff-pixel" else None
    rep = verify(exported(family), batch=2, seed=3, min_psnr=floor)
    lines = [r.line() for r in rep.stages + rep.end_to_end]
    assert rep.passed, lines
    assert all(r.psnr >= STAGE_MIN_PSNR for r in rep.stages), lines
    assert {r.name for r in rep.end_to_end} == {"end-to-end staged", "end-to-end unrolled"}
    names = [r.name for r in rep.stages]
    assert names[:3] == ["encoder.x", "encoder.y", "encoder.cond"] and names[-1] == "decoder.image"
    assert [n for n in names if n.startswith("step")] == [
        "step t=3",
        "step t=2",
        "step t=1",
        "step t=0",
    ]
    rec = load_manifest(exported(family)).verification
    assert rec["passed"] and rec["by_backend"]["onnxruntime/fp32"]["psnr_db"] >= (floor or 60)


@pytest.mark.parametrize("family", FAMILIES)
def test_manifest_records_table_io_hashes_and_versions(exported, family):
    d = exported(family)
    m = load_manifest(d)
    assert m.family == family
    assert m.step_table == step_table(preset(SMALL[family][0]))
    assert set(m.graphs) == set(GRAPH_NAMES)
    for g in m.graphs.values():
        assert g.sha256 == sha256_file(d / g.file) and g.precision == "fp32"
        model = onnx.load(str(d / g.file))
        onnx.checker.check_model(model, full_check=True)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= 21
        assert g.inputs[0].shape[0] == "batch"  # dynamic batch
    assert m.exporter["opset"] == 21 and "torch" in m.exporter and "onnx" in m.exporter
    un = m.graphs["unrolled"].inputs
    assert [s.name for s in un] == ["lr"] + m.noise_names
    assert json.loads((d / "manifest.json").read_text())["schema_version"] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_unrolled_graph_shares_weights(exported, family):
    m = load_manifest(exported(family))
    staged = sum(m.graphs[k].bytes for k in ("encoder", "step", "decoder"))
    assert m.graphs["unrolled"].bytes < 1.1 * staged  # 4 rows, one copy of each weight


def test_dynamic_batch_runs_and_matches_batch_one(exported):
    d = exported("deltadiff-pixel")
    m = load_manifest(d)
    rng = np.random.default_rng(0)
    lr = rng.random((3, 3, *m.tile), dtype=np.float32)
    with OrtBackend(d, m) as be:
        ex = Executor(m, be)
        big = ex.run(lr)
        one = ex.run(lr[1:2])
    np.testing.assert_allclose(big[1:2], one, rtol=0, atol=ORT_BATCH_ATOL)


def test_edited_graph_is_refused_by_hash(exported, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(exported("deltadiff-pixel"), d)
    with (d / "step.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ManifestError, match="modified after export"):
        load_manifest(d)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda p: p.unlink(), "manifest.json is missing"),
        (lambda p: p.write_text("{not json"), "not valid JSON"),
        (lambda p: p.write_text(json.dumps({"schema_version": 99})), "schema_version 99"),
        (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "tile": "64"})), "tile"),
        (
            lambda p: p.write_text(
                json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "graphs"})
            ),
            "'graphs' is missing",
        ),
    ],
)
def test_broken_manifest_gives_named_error(exported, tmp_path, edit, match):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(exported("deltadiff-pixel"), d)
    edit(d / "manifest.json")
    with pytest.raises(ManifestError, match=match) as e:
        load_manifest(d)
    assert "\n" not in str(e.value)


def test_cpu_sessions_skip_the_memory_pattern(exported):
    """The memory pattern doubled the peak RSS of a demo step at 512x512 for no speed (see
    runtime/backends/ort.py); a dynamic model would also keep one plan per image size."""
    d = exported("deltadiff-pixel")
    with OrtBackend(d, load_manifest(d), threads=1) as be:
        assert be.session("step").get_session_options().enable_mem_pattern is False
