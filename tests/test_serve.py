"""dd-run serve: the lean runtime behind Triton (KServe v2), tested with tritonclient on loopback.

One ``dd-run serve`` process per test session (module fixture), on the small exported pixel
model (16x16 LR tiles, random weights) so that every request is a few tiles; the last test stops
it with SIGINT and checks that it and its Triton server are gone.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deltadiff.errors import MissingDependencyError
from deltadiff.runtime.serve import TileBatcher, encode_request, free_port, upscale_remote
from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler

from .checks import upscale_cli_bytes

MAX_PIXELS = 48 * 48


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _images(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    sizes = [(20, 24), (17, 30), (32, 16), (24, 24)]
    return [
        _png(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8)) for i in range(n)
    ]


@pytest.fixture(scope="module")
def model(exported) -> Path:
    return exported("deltadiff-pixel")


@pytest.fixture(scope="module")
def served(model: Path, tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("pytriton", reason="needs the [serve] extra")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [
        sys.executable,
        "-m",
        "deltadiff.runtime.cli",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--grpc-port",
        str(free_port()),
        "--threads",
        "1",
        "--max-pixels",
        str(MAX_PIXELS),
        "--queue-delay-us",
        "50000",
    ]
    fh = log.open("wb")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 180:
        if proc.poll() is not None:
            pytest.fail(f"dd-run serve exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"dd-run serve not ready after 180 s: {log.read_text()[-2000:]}")
    yield {"url": url, "proc": proc, "log": log}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    fh.close()


@pytest.fixture
def client(served):
    http = pytest.importorskip("tritonclient.http")
    c = http.InferenceServerClient(served["url"], concurrency=8, network_timeout=300)
    yield c
    c.close()


def test_tile_batcher_merges_tiles_and_keeps_results(model: Path) -> None:
    """Tiles of images upscaled together share backend calls; results equal one-at-a-time."""
    rng = np.random.default_rng(1)
    imgs = [rng.random((20, 24, 3), dtype=np.float32), rng.random((17, 30, 3), dtype=np.float32)]
    with Upscaler(model, UpscaleOptions(threads=1)) as up:
        alone = [up.upscale(x) for x in imgs]  # 4 and 6 tiles of 16x16, one call each
        tb = TileBatcher(up.executor, max_batch=up.m.batch[1])
        up.executor = tb
        together = tb.map(up.upscale, imgs)
    for a, b in zip(alone, together, strict=True):
        assert not isinstance(b, Exception), b
        assert np.array_equal(a, b)
    # one round per tile of the larger image; both images' tiles share the first four calls
    assert tb.calls == [2, 2, 2, 2, 1, 1], tb.calls


def test_health_endpoints(served) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/deltadiff/ready"):
        with urllib.request.urlopen(f"http://{served['url']}{path}", timeout=5) as r:
            assert r.status == 200


def test_result_equals_dd_run_upscale_bit_for_bit(client, model: Path, tmp_path: Path) -> None:
    for data in _images(2, seed=3):
        assert upscale_remote(client, data) == upscale_cli_bytes(model, data, tmp_path)


def test_bad_requests_get_400_naming_the_problem_and_server_keeps_serving(
    client, served, model: Path, tmp_path: Path
) -> None:
    from tritonclient.utils import InferenceServerException

    cases = {
        "not an image": (b"this is not an image file", "not a supported image"),
        "too large": (_png(np.zeros((64, 64, 3), np.uint8)), "too large: 64x64 = 4096 pixels"),
        "truncated": (_images(1)[0][:60], "image"),
    }
    for what, (data, needle) in cases.items():
        with pytest.raises(InferenceServerException) as ei:
            upscale_remote(client, data)
        assert ei.value.status() == "400", (what, ei.value)
        assert needle in ei.value.message(), (what, ei.value.message())
        assert "Traceback" not in ei.value.message()
    # wrong shape and wrong type: refused by Triton itself, naming the expected input
    body = {"inputs": [{"name": "image", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}]}
    for b, needle in (
        (body, "unexpected shape for input 'image'"),
        (
            {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]},
            "expects 'BYTES'",
        ),
    ):
        req = urllib.request.Request(
            f"http://{served['url']}/v2/models/deltadiff/infer", data=json.dumps(b).encode()
        )
        with pytest.raises(urllib.error.HTTPError) as he:
            urllib.request.urlopen(req, timeout=30)
        assert he.value.code == 400
        assert needle in he.value.read().decode()
    assert client.is_server_ready()
    data = _images(1, seed=9)[0]
    assert upscale_remote(client, data) == upscale_cli_bytes(model, data, tmp_path)


def test_eight_concurrent_clients_are_batched(client, served, model: Path, tmp_path: Path) -> None:
    http = pytest.importorskip("tritonclient.http")
    datas = _images(8, seed=5)
    refs = [upscale_cli_bytes(model, d, tmp_path) for d in datas]
    before = _batch_counts(client)
    results: list[bytes | Exception] = [b""] * len(datas)

    def one(i: int) -> None:
        c = http.InferenceServerClient(served["url"], network_timeout=300)
        try:
            results[i] = upscale_remote(c, datas[i])
        except Exception as exc:  # reported below
            results[i] = exc
        finally:
            c.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(datas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i, (got, ref) in enumerate(zip(results, refs, strict=True)):
        assert got == ref, f"client {i}: {got if isinstance(got, Exception) else 'differs'}"
    after = _batch_counts(client)
    new = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert sum(k * v for k, v in new.items()) == 8, new
    assert any(k > 1 and v > 0 for k, v in new.items()), f"no request batching: {new}"


def _batch_counts(client) -> dict[int, int]:
    st = client.get_inference_statistics("deltadiff")["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in st["batch_stats"]}


def test_grpc_endpoint_answers(served, model: Path, tmp_path: Path) -> None:
    grpc = pytest.importorskip("tritonclient.grpc")
    args = served["proc"].args
    gport = args[args.index("--grpc-port") + 1]
    data = _images(1, seed=11)[0]
    with grpc.InferenceServerClient(f"127.0.0.1:{gport}") as c:
        i = grpc.InferInput("image", [1, 1], "BYTES")
        i.set_data_from_numpy(np.array([[data]], dtype=object))
        out = c.infer("deltadiff", [i]).as_numpy("upscaled")
    assert bytes(out.reshape(-1)[0]) == upscale_cli_bytes(model, data, tmp_path)


def test_load_script_reports_percentiles(served, tmp_path: Path) -> None:
    from deltadiff.benchmarks import load_serve

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, data in enumerate(_images(2, seed=21)):
        (imgs / f"{i}.png").write_bytes(data)
    argv = ["--url", served["url"], "--clients", "1,2", "--requests", "3", "--warmup", "0"]
    assert load_serve.main([*argv, "--images", str(imgs), "--out", str(tmp_path / "o")]) == 0
    rep = json.loads((tmp_path / "o" / "load-serve.json").read_text())
    assert [r["clients"] for r in rep["levels"]] == [1, 2]
    for r in rep["levels"]:
        assert r["requests"] == 3 and r["errors"] == 0
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert "| 2 | 3 |" in (tmp_path / "o" / "load-serve.md").read_text()
    with pytest.raises(SystemExit, match="loopback"):
        load_serve.main(["--url", "10.1.2.3:8000"])


def test_serve_bad_model_is_one_line_before_starting(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from deltadiff.runtime.cli import app

    r = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "nope"), "--port", "0"])
    assert r.exit_code == 1
    assert "does not exist" in r.output and "Traceback" not in r.output


def test_missing_extra_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from deltadiff.runtime.serve import TritonServer

    monkeypatch.setitem(sys.modules, "pytriton", None)
    srv = TritonServer(tmp_path)
    with pytest.raises(MissingDependencyError, match=r"deltadiff-trt\[serve\]"):
        srv.start()
    srv.cleanup()
    assert encode_request  # the client helper imports tritonclient lazily too


def test_sigint_stops_server_and_triton_cleanly(served) -> None:
    """Last test of the module: SIGINT -> exit 0, 'server stopped', no tritonserver left."""
    proc = served["proc"]
    children = _children(proc.pid)
    assert children, "no tritonserver child found"
    children += [g for c in children for g in _children(c)]  # the Python-backend stubs
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    assert "server stopped" in served["log"].read_text()
    time.sleep(0.5)
    alive = [p for p in children if Path(f"/proc/{p}").exists() and not _zombie(p)]
    assert not alive, f"left running: {alive}"


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out.append(int(d.name))
    return out


def _zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
