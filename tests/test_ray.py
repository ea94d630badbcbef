"""dd-run batch on Ray: one local cluster per test session (127.0.0.1, 2 CPUs, one declared fake
GPU), the small exported pixel model, a folder mixing good and broken images."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deltadiff.errors import DeltaDiffError, MissingDependencyError
from deltadiff.runtime.serving.ray_job import RayJobOptions, connect, import_ray, run_ray_job
from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler, upscale_file

GOOD = ["a.png", "b.jpg", "sub/c.png"]
BROKEN = ["truncated.png", "text.png", "empty.jpg"]


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray", reason="needs the [ray] extra")
    # Ray imported before import_ray() sets its loopback switch (as a notebook or a test
    # session that ran the serve tests first would): the local cluster must still be loopback.
    assert import_ray() is ray
    if ray.is_initialized():
        ray.shutdown()
    assert connect(RayJobOptions(local_cpus=2, local_gpus=1))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model(exported) -> Path:
    return exported("deltadiff-pixel")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(GOOD):
        Image.fromarray(rng.integers(0, 256, (18 + i, 22, 3), dtype=np.uint8)).save(src / name)
    (src / "truncated.png").write_bytes((src / "a.png").read_bytes()[:80])
    (src / "text.png").write_text("not an image")
    (src / "empty.jpg").write_bytes(b"")
    return src


def _rows(res) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in res.rows}


def test_cluster_is_loopback_only(cluster) -> None:
    nodes = cluster.nodes()
    assert nodes and all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes)
    assert cluster.cluster_resources().get("GPU") == 1  # the declared fake GPU


def test_local_workers_run_at_normal_priority(cluster) -> None:
    """Ray's default worker niceness (15) starves a local job on a busy machine."""
    import os

    @cluster.remote(num_cpus=1)
    def niceness() -> int:
        return os.nice(0)

    assert cluster.get(niceness.remote()) == 0


def test_job_on_mixed_folder_then_resume(cluster, model: Path, folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    opts = RayJobOptions(actors=1, num_cpus=1)
    res = run_ray_job([folder], out, model=model, opts=opts)
    rows = _rows(res)
    assert len(res.rows) == len(GOOD) + len(BROKEN)
    for name in GOOD:
        r = rows[Path(name).name]
        assert r["status"] == "done", r
        dst = out / name
        assert r["output"] == str(dst) and dst.exists()
        ref = tmp_path / "ref" / name  # what dd-run upscale writes (same library call)
        ref.parent.mkdir(parents=True, exist_ok=True)
        with Upscaler(model, UpscaleOptions(threads=1)) as up:
            upscale_file(up, folder / name, ref)
        assert dst.read_bytes() == ref.read_bytes(), name
    for name in BROKEN:
        r = rows[name]
        assert r["status"] == "failed", r
        assert str(folder / name) in r["message"]
        assert not (out / name).exists()
    assert not list(out.rglob(".*.tmp")), "temporary files left behind"
    manifest = [json.loads(ln) for ln in res.manifest.read_text().splitlines()]
    assert manifest == res.rows
    assert res.manifest == out / "dd-job.jsonl"

    # resume: finished outputs are skipped, not redone; a deleted output is redone
    mtimes = {n: (out / n).stat().st_mtime_ns for n in GOOD}
    (out / "a.png").unlink()
    res2 = run_ray_job([folder], out, model=model, opts=opts)
    rows2 = _rows(res2)
    assert rows2["a.png"]["status"] == "done"
    assert rows2["b.jpg"]["status"] == "skipped" and rows2["c.png"]["status"] == "skipped"
    assert all(rows2[n]["status"] == "failed" for n in BROKEN)
    for n in ("b.jpg", "sub/c.png"):
        assert (out / n).stat().st_mtime_ns == mtimes[n]
    assert len(res2.manifest.read_text().splitlines()) == len(GOOD) + len(BROKEN)


def test_gpu_actors_are_placed_on_the_declared_gpu(cluster, model: Path, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src / f"{i}.png")
    res = run_ray_job(
        [src],
        tmp_path / "out",
        model=model,
        opts=RayJobOptions(actors=2, num_gpus=0.5, num_cpus=0.5),
    )
    assert [r["status"] for r in res.rows] == ["done"] * 4
    assert {r["gpus"] for r in res.rows} == {"0"}  # Ray set CUDA_VISIBLE_DEVICES for the actor


def test_more_gpus_than_the_cluster_has_fails_at_once(cluster, model: Path, folder: Path, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(DeltaDiffError, match=r"--gpus-per-actor 2.*has 1 GPUs"):
        run_ray_job([folder], tmp_path / "out", model=model, opts=RayJobOptions(num_gpus=2))
    assert time.monotonic() - t0 < 30


def test_actor_holding_every_cpu_does_not_starve_the_reads(cluster, model: Path, tmp_path):
    """1 actor x 2 CPUs on the 2-CPU cluster: reads take no CPU slot, so the job finishes."""
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(src / "z.png")
    res = run_ray_job([src], tmp_path / "out", model=model, opts=RayJobOptions(num_cpus=2))
    assert [r["status"] for r in res.rows] == ["done"]
    with pytest.raises(DeltaDiffError, match=r"--actors 3 x --cpus-per-actor 1 needs 3 CPUs"):
        run_ray_job([src], tmp_path / "o2", model=model, opts=RayJobOptions(actors=3))


def test_cli_batch_reports_failures_and_exits_1(cluster, model: Path, folder: Path, tmp_path):
    from typer.testing import CliRunner

    from deltadiff.cli.run import app

    r = CliRunner().invoke(
        app, ["batch", str(folder), "-o", str(tmp_path / "o"), "--model", str(model)]
    )
    assert r.exit_code == 1, r.output
    assert "3 upscaled, 0 skipped, 3 failed" in r.output
    assert "text.png" in r.output and "Traceback" not in r.output


def test_missing_ray_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match=r"deltadiff-trt\[ray\]"):
        import_ray()


def test_manifest_row_is_on_disk_when_each_file_finishes(
    cluster, model: Path, folder: Path, tmp_path
):
    """Each row is appended (and fsynced) as the driver receives it: when ``on_row`` sees a row,
    the manifest already holds it and every row before it, so a killed driver loses none."""
    out = tmp_path / "out"
    (out / "a.png").parent.mkdir(parents=True)
    (out / "a.png").write_bytes(b"done before")  # a resumed file: a 'skipped' row first
    on_disk: list[list[dict]] = []

    def on_row(row: dict) -> None:
        text = (out / "dd-job.jsonl").read_text()
        on_disk.append([json.loads(ln) for ln in text.splitlines()])
        assert on_disk[-1][-1] == row

    res = run_ray_job([folder], out, model=model, opts=RayJobOptions(num_cpus=1), on_row=on_row)
    assert [len(rows) for rows in on_disk] == list(range(1, len(GOOD) + len(BROKEN) + 1))
    assert on_disk[0][0]["status"] == "skipped"
    assert sorted(r["path"] for r in on_disk[-1]) == sorted(r["path"] for r in res.rows)


def test_output_folder_inside_the_input_is_not_an_input(cluster, model: Path, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(src / "z.png")
    opts = RayJobOptions(num_cpus=1)
    assert [r["status"] for r in run_ray_job([src], src / "x4", model=model, opts=opts).rows] == [
        "done"
    ]
    res = run_ray_job([src], src / "x4", model=model, opts=opts)
    assert [(Path(r["path"]).name, r["status"]) for r in res.rows] == [("z.png", "skipped")]
    assert not (src / "x4" / "x4").exists()
