"""dd-export triton: repositories for onnxruntime, TensorRT(-RTX) and python stages, the config
check, and the python variant answering under the Triton server bundled in nvidia-pytriton
(one server start for the module, 127.0.0.1 only, stopped by the fixture)."""

from __future__ import annotations

import importlib.util
import io
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deltadiff.errors import DeltaDiffError
from deltadiff.runtime.serving.triton_repo import (
    TritonRepoOptions,
    check_repository,
    write_repository,
)

from .checks import upscale_cli_bytes

pytest.importorskip("tritonclient", reason="needs the [serve] extra (config check)")

HAVE_RTX = importlib.util.find_spec("tensorrt_rtx") is not None


def _png(seed: int, h: int, w: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    ch = {"RGB": 3, "RGBA": 4}[mode]
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, ch), dtype=np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model(exported) -> Path:
    return exported("deltadiff-pixel")


def test_onnxruntime_repository_passes_the_check(model: Path, tmp_path: Path) -> None:
    repo = write_repository(model, tmp_path / "repo", TritonRepoOptions(engine="onnxruntime"))
    rep = check_repository(repo)
    assert rep.ok, rep.lines()
    assert set(rep.models) == {
        "deltadiff",
        "deltadiff_encoder",
        "deltadiff_step",
        "deltadiff_decoder",
    }
    cfg = (repo / "deltadiff_step" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in cfg and "kind: KIND_GPU" in cfg
    top = (repo / "deltadiff" / "config.pbtxt").read_text()
    assert "dynamic_batching" in top and 'string_value: "bls"' in top
    assert "docker run --gpus all" in (repo / "README.md").read_text()


def test_unrolled_repository_has_one_stage(model: Path, tmp_path: Path) -> None:
    repo = write_repository(
        model, tmp_path / "repo", TritonRepoOptions(engine="onnxruntime", mode="unrolled")
    )
    rep = check_repository(repo)
    assert rep.ok and set(rep.models) == {"deltadiff", "deltadiff_unrolled"}, rep.lines()


def test_check_catches_dims_dtype_file_and_wiring_errors(model: Path, tmp_path: Path) -> None:
    repo = write_repository(model, tmp_path / "repo", TritonRepoOptions(engine="onnxruntime"))
    step = repo / "deltadiff_step" / "config.pbtxt"
    text = step.read_text()
    step.write_text(text.replace("dims: [ 5 ]", "dims: [ 6 ]").replace("TYPE_INT64", "TYPE_INT32"))
    dec = repo / "deltadiff_decoder" / "1" / "model.onnx"
    shutil.copyfile(repo / "deltadiff_encoder" / "1" / "model.onnx", dec)
    rep = check_repository(repo)
    assert not rep.ok
    probs = " ".join(rep.models["deltadiff_step"])
    assert "input 'coef' is TYPE_FP32 [6], manifest says TYPE_FP32 [5]" in probs
    assert "input 't' is TYPE_INT32 [1]" in probs
    assert "model.onnx is missing or is not the manifest's decoder.onnx" in " ".join(
        rep.models["deltadiff_decoder"]
    )
    shutil.rmtree(repo / "deltadiff_encoder")
    assert "stage model for encoder" in " ".join(check_repository(repo).models["deltadiff"])
    step.write_text("name: 'x' bogus_field: 1")
    with pytest.raises(DeltaDiffError, match="not a valid Triton model config"):
        check_repository(repo)


def test_tensorrt_repository_needs_engines(model: Path, tmp_path: Path) -> None:
    with pytest.raises(DeltaDiffError, match="dd-export build-engine"):
        write_repository(model, tmp_path / "r", TritonRepoOptions(engine="tensorrt"))


def test_engine_is_parsed_and_files_land_atomically(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deltadiff.runtime.serving import triton_repo

    with pytest.raises(DeltaDiffError, match=r"^unknown --engine 'onnx'; choose one of ") as exc:
        write_repository(model, tmp_path / "bad", TritonRepoOptions(engine="onnx"))
    assert "\n" not in str(exc.value) and not (tmp_path / "bad").exists()
    repo = write_repository(model, tmp_path / "repo", TritonRepoOptions(engine=" Python "))
    assert check_repository(repo).ok
    assert not [p for p in repo.rglob("*") if p.name.endswith(".tmp")]  # no temp left behind
    # a copy whose sha256 differs (the source changed meanwhile) never lands, nor does its temp
    monkeypatch.setattr(triton_repo, "sha256_file", lambda _p: "0" * 64)
    with pytest.raises(DeltaDiffError, match="changed while it was copied"):
        write_repository(model, tmp_path / "r2", TritonRepoOptions(engine="onnxruntime"))
    assert not [p for p in (tmp_path / "r2").rglob("*") if p.is_file()]


@pytest.mark.trt
@pytest.mark.skipif(not HAVE_RTX, reason="tensorrt_rtx is not installed ([trt] extra)")
def test_tensorrt_rtx_repository_passes_the_check(model: Path, tmp_path: Path) -> None:
    from deltadiff.export.engine import EngineOptions, build_engines

    d = tmp_path / "model"
    shutil.copytree(model, d)
    build_engines(
        d,
        EngineOptions(
            precision="fp32",
            flavour="tensorrt_rtx",
            graphs=("encoder", "step", "decoder"),
            batch_opt=1,
            batch_max=4,
        ),
    )
    repo = write_repository(d, tmp_path / "repo", TritonRepoOptions(engine="tensorrt"))
    rep = check_repository(repo)
    assert rep.ok, rep.lines()
    assert (repo / "deltadiff_step" / "1" / "model.plan").stat().st_size > 0
    assert 'platform: "tensorrt_plan"' in (repo / "deltadiff_step" / "config.pbtxt").read_text()
    readme = (repo / "README.md").read_text()
    assert "tensorrt_rtx 1." in readme and "TensorRT-RTX plans" in readme
    # a plan from another graph is caught
    shutil.copyfile(
        repo / "deltadiff_encoder" / "1" / "model.plan",
        repo / "deltadiff_step" / "1" / "model.plan",
    )
    assert "was built from encoder" in " ".join(check_repository(repo).models["deltadiff_step"])


# --------------------------------------------------------------------------- python variant


@pytest.fixture(scope="module")
def python_repo(model: Path, tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("pytriton", reason="needs the [serve] extra")
    from deltadiff.runtime.serving.serve import TritonServer

    repo = write_repository(
        model,
        tmp_path_factory.mktemp("pyrepo") / "repo",
        TritonRepoOptions(engine="python", threads=1, queue_delay_us=50000),
    )
    assert check_repository(repo).ok
    srv = TritonServer(repo)
    srv.start()
    yield srv
    srv.cleanup()
    assert srv.proc is None


def test_python_variant_loads_and_answers_bit_for_bit(python_repo, model: Path, tmp_path: Path):
    import tritonclient.http as th

    from deltadiff.runtime.serving.serve import upscale_remote

    c = th.InferenceServerClient(python_repo.url, network_timeout=300)
    try:
        for name in ("deltadiff", "deltadiff_encoder", "deltadiff_step", "deltadiff_decoder"):
            assert c.is_model_ready(name), name
        for data in (_png(0, 20, 24), _png(1, 17, 18, "RGBA")):
            assert upscale_remote(c, data) == upscale_cli_bytes(model, data, tmp_path)
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException) as ei:
            upscale_remote(c, b"definitely not an image")
        assert ei.value.status() == "400" and "not a supported image" in ei.value.message()
    finally:
        c.close()


def test_python_variant_batches_concurrent_requests_exactly(
    python_repo, model: Path, tmp_path: Path
) -> None:
    import tritonclient.http as th

    from deltadiff.runtime.serving.serve import upscale_remote

    datas = [_png(10 + i, 16 + 3 * i, 20) for i in range(4)]
    refs = [upscale_cli_bytes(model, d, tmp_path) for d in datas]
    got: list = [None] * 4

    def one(i: int) -> None:
        c = th.InferenceServerClient(python_repo.url, network_timeout=300)
        try:
            got[i] = upscale_remote(c, datas[i])
        except Exception as exc:
            got[i] = exc
        finally:
            c.close()

    ts = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    assert got == refs
    c = th.InferenceServerClient(python_repo.url)
    st = c.get_inference_statistics("deltadiff")["model_stats"][0]["batch_stats"]
    c.close()
    assert any(int(b["batch_size"]) > 1 for b in st), st
