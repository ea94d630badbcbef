"""Untrusted model folders: every file a manifest names (graphs, their ONNX external data,
engines) must resolve inside the folder, symlinks included, and match its recorded sha256 before
it is opened or copied; ``dd-export triton`` checks engines before copying one as ``model.plan``;
manifest writers hold a file lock so concurrent runs keep each other's records.

Model folders are small copies of the bundled demo (fp32 encoder / step / decoder only)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from deltadiff.errors import ManifestError
from deltadiff.manifest import (
    load_manifest,
    update_manifest,
    verify_file,
    verify_graph,
)
from deltadiff.onnx_refs import OnnxParseError, external_locations

DEMO = Path(__file__).resolve().parents[1] / "runtime" / "models" / "demo-pixel"
STAGED = ("encoder", "step", "decoder")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _model(root: Path) -> Path:
    """A model folder: the demo's fp32 staged graphs and a manifest naming only them."""
    d = root / "model"
    d.mkdir(parents=True)
    data = json.loads((DEMO / "manifest.json").read_text())
    data["graphs"] = {g: data["graphs"][g] for g in STAGED}
    data["memory"] = {k: v for k, v in data["memory"].items() if k.startswith("onnxruntime/fp32")}
    for g in STAGED:
        shutil.copyfile(DEMO / f"{g}.onnx", d / f"{g}.onnx")
    (d / "manifest.json").write_text(json.dumps(data))
    return d


def _edit(d: Path, fn) -> None:  # noqa: ANN001 (a dict -> None function)
    data = json.loads((d / "manifest.json").read_text())
    fn(data)
    (d / "manifest.json").write_text(json.dumps(data))


def _set_graph(d: Path, g: str, file: str, real: Path | None = None) -> None:
    """Point graph ``g`` at ``file``, with the sha256 / size of ``real`` (default: the file)."""
    real = real or d / file
    digest, size = _sha(real), real.stat().st_size

    def fn(data: dict) -> None:
        data["graphs"][g].update(file=file, sha256=digest, bytes=size)

    _edit(d, fn)


def _one_line_error(r, match: str) -> None:  # noqa: ANN001 (a click Result)
    out = r.output  # stdout and stderr
    assert r.exit_code == 1, out
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in out, out
    # one line "error: ...": the Upscaler checks every graph it will open before any image
    lines = [x for x in out.splitlines() if match in x]
    assert len(lines) == 1 and lines[0].startswith("error"), out


@pytest.fixture
def image(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    p = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(p)
    return p


def _upscale(model: Path, image: Path, out: Path):  # noqa: ANN202 (a click Result)
    from deltadiff.cli.run import app

    args = ["upscale", str(image), "-o", str(out), "--model", str(model), "-q", "--overwrite"]
    return CliRunner().invoke(app, args)


# ----------------------------------------------------------------------------- paths


def test_an_intact_copy_runs_and_an_inside_symlink_is_allowed(tmp_path, image):
    d = _model(tmp_path)
    r = _upscale(d, image, tmp_path / "a.png")
    assert r.exit_code == 0, r.output
    (d / "sub").mkdir()
    (d / "encoder.onnx").rename(d / "sub" / "enc.onnx")
    (d / "encoder.onnx").symlink_to(Path("sub") / "enc.onnx")  # stays inside the folder
    r = _upscale(d, image, tmp_path / "b.png")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_parent_path_in_manifest_is_refused(tmp_path, image):
    d = _model(tmp_path)
    shutil.copyfile(d / "encoder.onnx", tmp_path / "x.onnx")  # the right bytes, outside
    _set_graph(d, "encoder", "../x.onnx", tmp_path / "x.onnx")
    _one_line_error(_upscale(d, image, tmp_path / "o.png"), "'../x.onnx' is not a plain file name")
    assert not (tmp_path / "o.png").exists()


def test_absolute_path_in_manifest_is_refused(tmp_path, image):
    d = _model(tmp_path)
    outside = tmp_path / "elsewhere" / "encoder.onnx"
    outside.parent.mkdir()
    shutil.copyfile(d / "encoder.onnx", outside)
    _set_graph(d, "encoder", str(outside))
    _one_line_error(_upscale(d, image, tmp_path / "o.png"), "absolute path or '..'")


def test_symlink_escaping_the_folder_is_refused(tmp_path, image):
    d = _model(tmp_path)
    outside = tmp_path / "outside.onnx"
    (d / "encoder.onnx").rename(outside)  # identical bytes: only the location is wrong
    (d / "encoder.onnx").symlink_to(outside)
    _one_line_error(_upscale(d, image, tmp_path / "o.png"), "outside the model directory")
    # a symlinked folder component is resolved too
    (d / "encoder.onnx").unlink()
    (tmp_path / "ext").mkdir()
    outside.rename(tmp_path / "ext" / "encoder.onnx")
    (d / "sub").symlink_to(tmp_path / "ext")
    _set_graph(d, "encoder", "sub/encoder.onnx")
    _one_line_error(_upscale(d, image, tmp_path / "o.png"), "outside the model directory")


def test_manifest_symlinked_outside_is_refused(tmp_path, image):
    d = _model(tmp_path)
    (d / "manifest.json").rename(tmp_path / "m.json")
    (d / "manifest.json").symlink_to(tmp_path / "m.json")
    _one_line_error(_upscale(d, image, tmp_path / "o.png"), "outside the model directory")


def test_hash_mismatch_is_refused(tmp_path, image):
    d = _model(tmp_path)
    with (d / "step.onnx").open("ab") as fh:
        fh.write(b"\0")
    _one_line_error(_upscale(d, image, tmp_path / "o.png"), "step.onnx was modified after export")
    # a folder of images: the model's fault is said once, before any image runs
    shutil.copyfile(image, tmp_path / "in2.png")
    out = tmp_path / "outs"
    from deltadiff.cli.run import app

    args = ["upscale", str(image), str(tmp_path / "in2.png"), "-o", str(out), "--model", str(d)]
    r = CliRunner().invoke(app, [*args, "-q"])
    _one_line_error(r, "step.onnx was modified after export")
    assert not out.exists() or not any(out.iterdir())


def test_a_fifo_is_refused_without_reading_it(tmp_path):
    d = _model(tmp_path)
    os.mkfifo(d / "fifo.onnx")  # reading it would block forever
    _edit(d, lambda data: data["graphs"]["encoder"].update(file="fifo.onnx"))
    m = load_manifest(d, check_hashes=False)
    with pytest.raises(ManifestError, match="is not a regular file"):
        verify_graph(d, m.graph("encoder"), what="graph encoder")


def test_hash_cache_sees_a_rewrite_that_keeps_size_and_mtime(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    f = d / "a.bin"
    f.write_bytes(b"a" * 64)
    good = _sha(f)
    verify_file(d, "a.bin", good, what="engine")  # hashed and cached
    st = f.stat()
    f.write_bytes(b"b" * 64)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: ctime moves
    with pytest.raises(ManifestError, match="modified after export"):
        verify_file(d, "a.bin", good, what="engine")


# ----------------------------------------------------------------------------- external data


def _externalize(d: Path, location: str = "step.bin") -> None:
    """Re-save step.onnx with its weights (tensors of 1 KiB and more) in ``d/step.bin``; the
    manifest records the new graph (not yet the data file)."""
    onnx = pytest.importorskip("onnx")
    from onnx.external_data_helper import convert_model_to_external_data

    m = onnx.load(str(d / "step.onnx"))
    convert_model_to_external_data(m, location="step.bin", size_threshold=1024)
    onnx.save(m, str(d / "step.onnx"))
    if location != "step.bin":  # rewrite the entries without touching the data
        m = onnx.load(str(d / "step.onnx"), load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        (d / "step.onnx").write_bytes(m.SerializeToString())
    _set_graph(d, "step", "step.onnx")


def _vouch(d: Path, location: str, file: Path) -> None:
    digest = _sha(file)
    _edit(d, lambda data: data["graphs"]["step"].update(external_data={location: digest}))


def test_vouched_external_data_inside_the_folder_runs(tmp_path, image):
    d = _model(tmp_path)
    r = _upscale(d, image, tmp_path / "embedded.png")
    assert r.exit_code == 0, r.output
    _externalize(d)
    assert (d / "step.bin").exists()
    _vouch(d, "step.bin", d / "step.bin")
    r = _upscale(d, image, tmp_path / "external.png")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "embedded.png").read_bytes() == (tmp_path / "external.png").read_bytes()
    # the record survives a manifest round trip, and its data is hash-checked
    assert load_manifest(d).graph("step").external_data == {"step.bin": _sha(d / "step.bin")}
    with (d / "step.bin").open("r+b") as fh:
        fh.write(b"\x7f")
    _one_line_error(
        _upscale(d, image, tmp_path / "o.png"),
        "external data 'step.bin' of step.onnx was modified",
    )


def test_external_data_outside_the_folder_is_refused(tmp_path, image):
    # a location with '..' (vouched, with the true sha256, and still refused)
    d = _model(tmp_path / "a")
    _externalize(d, location="../outside.bin")
    shutil.copyfile(d / "step.bin", tmp_path / "a" / "outside.bin")
    _vouch(d, "../outside.bin", tmp_path / "a" / "outside.bin")
    _one_line_error(
        _upscale(d, image, tmp_path / "o.png"),
        "(external data): '../outside.bin' is not a plain file name",
    )
    # a location that is a symlink leaving the folder
    d = _model(tmp_path / "b")
    _externalize(d)
    (d / "step.bin").rename(tmp_path / "outside.bin")
    (d / "step.bin").symlink_to(tmp_path / "outside.bin")
    _vouch(d, "step.bin", tmp_path / "outside.bin")
    _one_line_error(_upscale(d, image, tmp_path / "o.png"), "outside the model directory")
    assert not (tmp_path / "o.png").exists()


def test_unvouched_external_data_is_refused(tmp_path, image):
    d = _model(tmp_path)
    _externalize(d)  # inside the folder, but the manifest has no sha256 for step.bin
    _one_line_error(
        _upscale(d, image, tmp_path / "o.png"), "no sha256 in the manifest's external_data"
    )


def test_location_scanner_agrees_with_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    from onnx.external_data_helper import set_external_data

    def ext(name: str, loc: str) -> TensorProto:
        t = helper.make_tensor(name, TensorProto.FLOAT, [2], np.ones(2, np.float32).tobytes(), True)
        set_external_data(t, location=loc, offset=0, length=8)
        t.data_location = TensorProto.EXTERNAL
        t.ClearField("raw_data")
        return t

    then = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=ext("c", "sub/then.bin"))],
        "then",
        [],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])],
        initializer=[ext("w_then", "deep.bin")],
    )
    main = helper.make_graph(
        [
            helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=then),
            helper.make_node("Identity", ["w"], ["location"], name="location"),  # a decoy name
        ],
        "main",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        initializer=[ext("w", "main.bin")],
        sparse_initializer=[
            helper.make_sparse_tensor(ext("sv", "sparse.bin"), ext("si", "idx.bin"), [4])
        ],
    )
    blob = helper.make_model(main).SerializeToString()
    got = set(external_locations(blob))
    assert got == {"sub/then.bin", "deep.bin", "main.bin", "sparse.bin", "idx.bin"}
    # onnx's own walk over the same model (sparse tensors aside, which it does not visit)
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    theirs = {
        ExternalDataInfo(t).location
        for t in _get_all_tensors(onnx.load_from_string(blob))
        if t.data_location == TensorProto.EXTERNAL
    }
    assert theirs == got - {"sparse.bin", "idx.bin"}
    assert external_locations((DEMO / "step.onnx").read_bytes()) == []
    with pytest.raises(OnnxParseError):
        external_locations(blob[: len(blob) // 2])


# ----------------------------------------------------------------------------- dd-export triton


def _forge_engines(d: Path, file: str, sha256: str) -> None:
    m = load_manifest(d)

    def fn(data: dict) -> None:
        data["engines"] = [
            {
                "graph": g,
                "graph_sha256": m.graph(g).sha256,
                "precision": "fp32",
                "flavour": "tensorrt",
                "version": "10.0",
                "batch": [1, 1, 4],
                "targets": [],
                "gpu": None,
                "file": file.format(g=g),
                "sha256": sha256,
            }
            for g in STAGED
        ]

    _edit(d, fn)


def _triton(d: Path, repo: Path):  # noqa: ANN202 (a click Result)
    from deltadiff.cli.export import app

    return CliRunner().invoke(
        app, ["triton", "--model", str(d), "-o", str(repo), "--engine", "tensorrt"]
    )


def test_triton_refuses_a_forged_engine_record(tmp_path):
    d = _model(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not an engine\n")
    repo = tmp_path / "repo"
    # a path leaving the folder, with the file's true sha256
    _forge_engines(d, "../secret.txt", _sha(secret))
    _one_line_error(_triton(d, repo), "'../secret.txt' is not a plain file name")
    # a symlink inside the folder pointing out of it
    (d / "encoder.fp32.tensorrt.engine").symlink_to(secret)
    _forge_engines(d, "encoder.fp32.tensorrt.engine", _sha(secret))
    _one_line_error(_triton(d, repo), "outside the model directory")
    # a file inside the folder that is not the engine the record vouches for
    (d / "encoder.fp32.tensorrt.engine").unlink()
    (d / "encoder.fp32.tensorrt.engine").write_bytes(b"plan")
    _forge_engines(d, "{g}.fp32.tensorrt.engine", "0" * 64)
    _one_line_error(_triton(d, repo), "was modified after export")
    assert not repo.exists() or not list(repo.rglob("model.plan"))


def test_triton_copies_an_engine_the_manifest_vouches_for(tmp_path):
    from deltadiff.runtime.serving.triton_repo import TritonRepoOptions, write_repository

    d = _model(tmp_path)
    plan = b"engine bytes"
    for g in STAGED:
        (d / f"{g}.fp32.tensorrt.engine").write_bytes(plan)
    _forge_engines(d, "{g}.fp32.tensorrt.engine", hashlib.sha256(plan).hexdigest())
    repo = write_repository(d, tmp_path / "repo", TritonRepoOptions(engine="tensorrt"))
    assert (repo / "deltadiff_step" / "1" / "model.plan").read_bytes() == plan


def test_triton_check_refuses_a_graph_symlinked_out_of_the_repository(tmp_path):
    pytest.importorskip("tritonclient", reason="needs the [serve] extra (config check)")
    from deltadiff.runtime.serving.triton_repo import (
        TritonRepoOptions,
        check_repository,
        write_repository,
    )

    repo = write_repository(_model(tmp_path), tmp_path / "repo", TritonRepoOptions())
    assert check_repository(repo).ok
    f = repo / "deltadiff_step" / "1" / "model.onnx"
    f.rename(tmp_path / "step-outside.onnx")  # the right bytes, outside the repository
    f.symlink_to(tmp_path / "step-outside.onnx")
    rep = check_repository(repo)
    assert not rep.ok
    assert "outside the model directory" in " ".join(rep.models["deltadiff_step"])


# ----------------------------------------------------------------------------- manifest lock

_WRITER = textwrap.dedent(
    """
    import sys, time
    from dataclasses import replace
    from functools import partial
    from pathlib import Path
    from deltadiff.export.engine import _record_engine
    from deltadiff.manifest import _write_manifest, load_manifest, update_manifest

    d, who, n, locked = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    while not (d / "go").exists():
        time.sleep(0.005)

    def slow(fn, m):  # widen the read-modify-write window
        time.sleep(0.02)
        return fn(m)

    for i in range(n):
        if who == "engine":  # what dd-export build-engine does after each engine
            rec = {"graph": f"g{i}", "precision": "fp16", "flavour": "tensorrt_rtx",
                   "file": f"g{i}.engine", "sha256": "x"}
            fn = partial(_record_engine, path=d / f"g{i}.engine", plan=b"p", new=rec)
        else:  # what measure-memory / calibrate do
            rec = {"base_bytes": 1, "bytes_per_hr_px": 2.0}
            fn = lambda m, i=i: replace(m, memory={**m.memory, f"{who}/{i}": rec})
        if locked:
            update_manifest(d, partial(slow, fn))
        else:  # the old way: read, modify, write without the lock
            _write_manifest(d, slow(fn, load_manifest(d, check_hashes=False)))
    """
)


def _race(d: Path, locked: bool, n: int = 12) -> tuple[set[str], set[str]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(d), who, str(n), "1" if locked else "0"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for who in ("engine", "memory")
    ]
    (d / "go").touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    m = load_manifest(d, check_hashes=False)
    engines = {e["graph"] for e in m.engines}
    memory = {k for k in m.memory if k.startswith("memory/")}
    return engines, memory


def test_concurrent_manifest_writers_keep_every_record(tmp_path):
    d = _model(tmp_path)
    engines, memory = _race(d, locked=True)
    assert engines == {f"g{i}" for i in range(12)}
    assert memory == {f"memory/{i}" for i in range(12)}
    assert (d / "manifest.json.lock").exists()


def test_without_the_lock_the_same_race_loses_records(tmp_path):
    """The control for the test above: the race it guards against is real here."""
    d = _model(tmp_path)
    engines, memory = _race(d, locked=False)
    assert len(engines) + len(memory) < 24


def test_a_symlinked_lock_file_is_refused(tmp_path):
    d = _model(tmp_path)
    (d / "manifest.json.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ManifestError, match="cannot lock"):
        update_manifest(d, lambda m: m)
    assert not (tmp_path / "elsewhere").exists()
