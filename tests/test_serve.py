"""dd-run serve on Ray Serve, tested over HTTP on loopback with the bundled dynamic demo model.

One ``dd-run serve --precision fp32`` process for the module (Ray starts in ~10-20 s on 2 cores);
the last test stops it with SIGTERM while a request is in flight. References are what the real
``dd-run upscale`` CLI writes for the same files. ``TileBatcher`` (the Triton python model's
batching) is tested in process on the same model.
"""

from __future__ import annotations

import http.client
import importlib.util
import io
import re
import select
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
from deltadiff.runtime.serving.serve import ServeOptions, get_json, is_loopback, upscale_http

REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 4 << 20  # the bomb (~1 MiB) fits, the oversized bodies do not
MAX_PIXELS = 128 * 128
DRAIN_S = 60


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _rand_png(h: int, w: int, seed: int) -> bytes:
    return _png(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _load_tool():
    spec = importlib.util.spec_from_file_location("load_serve", REPO / "tools" / "load_serve.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["load_serve"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def cli_upscale(datas: dict[str, bytes], tmp: Path) -> dict[str, bytes]:
    """What the real ``dd-run upscale --precision fp32 --threads 1`` writes for each file."""
    src, out = tmp / "cli-in", tmp / "cli-out"
    src.mkdir()
    for name, data in datas.items():
        (src / f"{name}.png").write_bytes(data)
    cmd = [sys.executable, "-m", "deltadiff.cli.run", "upscale", str(src), "-o", str(out)]
    subprocess.run([*cmd, "--precision", "fp32", "--threads", "1", "-q"], check=True)
    return {name: (out / f"{name}.png").read_bytes() for name in datas}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("ray.serve", reason="needs the [serve] extra")
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "deltadiff.cli.run", "serve", "--precision", "fp32"]
    cmd += ["--port", "0", "--threads", "1", "--max-queue", "8", "--max-bytes", str(MAX_BYTES)]
    cmd += ["--max-pixels", str(MAX_PIXELS), "--drain-seconds", str(DRAIN_S)]
    fh = log.open("wb")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    t0, url = time.monotonic(), None
    while time.monotonic() - t0 < 180 and url is None:
        if proc.poll() is not None:
            pytest.fail(f"dd-run serve exited: {log.read_text()[-2000:]}")
        m = re.search(r"serving on (http://\S+)/v1/upscale", log.read_text(errors="replace"))
        url = m.group(1) if m else None
        time.sleep(0.3)
    if url is None:
        proc.kill()
        pytest.fail(f"dd-run serve not ready after 180 s: {log.read_text()[-2000:]}")
    yield {"url": url, "proc": proc, "log": log}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    fh.close()


def replica_counts(url: str) -> dict[str, int]:
    return get_json(url, "/v1/stats")["replicas"]


def front_counts(url: str) -> dict[str, int]:
    return get_json(url, "/v1/stats")["front"]


def settled_counts(url: str, key: str, want: int, wait: float = 5.0) -> dict[str, int]:
    """Replica counters once ``key`` reaches ``want`` (counters arrive asynchronously)."""
    t0 = time.monotonic()
    while True:
        c = replica_counts(url)
        if c.get(key, 0) >= want or time.monotonic() - t0 > wait:
            return c
        time.sleep(0.1)


def post_raw(url: str, head: dict[str, str], parts: list[bytes]) -> tuple[int, str]:
    """POST /v1/upscale with raw headers and body parts; stops sending once the server has
    answered or closed. Returns (status, body)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/upscale", skip_accept_encoding=True)
    for k, v in head.items():
        conn.putheader(k, v)
    conn.endheaders()
    for p in parts:
        if select.select([conn.sock], [], [], 0.01)[0]:
            break  # the server has answered (or closed): stop sending
        try:
            conn.send(p)
        except OSError:  # the server answered and closed: read its answer
            break
    r = conn.getresponse()
    body = r.read().decode()
    conn.close()
    return r.status, body


# --------------------------------------------------------------------------- in process


def test_tile_batcher_never_mixes_shapes_and_keeps_results(tmp_path: Path) -> None:
    """Issue 22: two sizes in one Triton batch failed with a concatenation error. Now same-shape
    tiles share calls, other shapes run alone, and each result is what dd-run upscale writes."""
    from deltadiff.runtime.serving.triton_service import ImageService
    from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler

    datas = {"a": _rand_png(12, 8, 1), "b": _rand_png(8, 16, 2), "c": _rand_png(12, 8, 3)}
    refs = cli_upscale(datas, tmp_path)
    svc = ImageService(Upscaler(None, UpscaleOptions(precision="fp32", threads=1)))
    try:
        got = svc.handle([(datas[k], 0) for k in "abc"])
    finally:
        svc.close()
    for k, g in zip("abc", got, strict=True):
        assert g == refs[k], f"{k}: {g if isinstance(g, Exception) else 'differs'}"
    calls = sorted(zip(svc.batcher.call_shapes, svc.batcher.calls, strict=True))
    assert calls == [((8, 16), 1), ((12, 8), 2)], calls


def test_tile_batcher_merges_no_more_than_the_memory_budget_holds(tmp_path: Path) -> None:
    """A budget for one 12x8 image's call (not two): the same-shape images run one per call."""
    from deltadiff.manifest import load_manifest
    from deltadiff.runtime.memory_budget import peak_bytes
    from deltadiff.runtime.serving.triton_service import ImageService
    from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler, default_model_dir

    rec = load_manifest(default_model_dir()).memory["onnxruntime/fp32/staged"]
    hr = 12 * 8 * 16
    budget = (peak_bytes(rec, hr, 1) + peak_bytes(rec, hr, 2)) / 2  # holds 1, not 2
    opts = UpscaleOptions(precision="fp32", threads=1, max_memory=budget / (1 << 30))
    datas = [_rand_png(12, 8, 1), _rand_png(12, 8, 3)]
    svc = ImageService(Upscaler(None, opts))
    try:
        got = svc.handle([(d, 0) for d in datas])
    finally:
        svc.close()
    refs = cli_upscale({"a": datas[0], "c": datas[1]}, tmp_path)
    assert got == [refs["a"], refs["c"]]
    assert svc.batcher.calls == [1, 1], svc.batcher.calls


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("::")


def test_non_loopback_host_warns_and_bad_model_is_one_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "deltadiff.cli.run", "serve", "--host", "0.0.0.0"]
    p = subprocess.run(
        [*cmd, "--model", str(tmp_path / "nope"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1
    warn = [ln for ln in p.stderr.splitlines() if ln.startswith("warning: --host 0.0.0.0")]
    assert len(warn) == 1, p.stderr
    assert "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_missing_extra_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from deltadiff.runtime.serving.serve import ray_cluster

    monkeypatch.setitem(sys.modules, "ray", None)
    with (
        pytest.raises(MissingDependencyError, match=r"deltadiff-trt\[serve\]"),
        ray_cluster(ServeOptions()),
    ):
        pass


# --------------------------------------------------------------------------- running server


def test_health_and_bad_requests_get_400_with_one_line(server, tmp_path: Path) -> None:
    url = server["url"]
    for path in ("/v1/health/live", "/v1/health/ready"):
        with urllib.request.urlopen(url + path, timeout=10) as r:
            assert r.status == 200
    good = _rand_png(8, 12, 7)
    cases = {
        "not an image": (b"this is not an image file", {}, "not a supported image"),
        "truncated": (good[:60], {}, "image"),
        "negative seed": (good, {"seed": -1}, "seed=-1: must be an integer"),
        "seed not a number": (good, {"seed": "x"}, "seed=x"),
        "bad timeout": (good, {"timeout": "-3"}, "timeout=-3"),
        "too many pixels": (_rand_png(130, 130, 1), {}, "too large: 130x130"),
        "empty": (b"", {}, "empty body"),
    }
    for what, (data, q, needle) in cases.items():
        r = upscale_http(url, data, **q)
        assert r.status == 400, (what, r.status, r.reason)
        assert needle in r.reason and "\n" not in r.reason, (what, r.reason)
        assert "Traceback" not in r.reason
    req = urllib.request.Request(url + "/v1/upscale?size=4", data=good, method="POST")
    with pytest.raises(urllib.error.HTTPError) as he:
        urllib.request.urlopen(req, timeout=30)
    assert he.value.code == 400 and "unknown parameter 'size'" in he.value.read().decode()
    with pytest.raises(urllib.error.HTTPError) as he:
        urllib.request.urlopen(url + "/v1/upscale", timeout=30)  # GET
    assert he.value.code == 405
    r = upscale_http(url, good)
    assert r.status == 200 and r.body == cli_upscale({"g": good}, tmp_path)["g"]


def test_eight_concurrent_requests_of_different_sizes_equal_dd_run_upscale(
    server, tmp_path: Path
) -> None:
    """Issue 22: 5 of 6 concurrent mixed-size requests failed with HTTP 500."""
    sizes = [(8, 12), (12, 8), (16, 12), (12, 20), (20, 8), (8, 24), (16, 16), (24, 12)]
    datas = {f"{h}x{w}": _rand_png(h, w, i) for i, (h, w) in enumerate(sizes)}
    refs = cli_upscale(datas, tmp_path)
    names = list(datas)
    got: dict[str, object] = {}

    def one(name: str) -> None:
        got[name] = upscale_http(server["url"], datas[name], client_timeout=300)

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for n in names:
        r = got[n]
        assert r.status == 200, (n, r.status, r.reason)
        assert r.body == refs[n], f"{n}: differs from dd-run upscale"


def test_oversized_body_is_refused_before_the_model_sees_it(server) -> None:
    url = server["url"]
    before = replica_counts(url)
    t0 = time.monotonic()
    # declared too large: answered from the header while only 64 KiB of the 5 MiB were sent
    status, body = post_raw(url, {"Content-Length": str(MAX_BYTES + (1 << 20))}, [bytes(64 << 10)])
    assert status == 413 and f"the server's limit is {MAX_BYTES}" in body, (status, body)
    # chunked (no length): counted while it streams, refused once past the limit
    chunk = bytes(256 << 10)
    part = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    status, body = post_raw(url, {"Transfer-Encoding": "chunked"}, [part] * 40)
    assert status == 413 and f"over {MAX_BYTES} bytes" in body, (status, body)
    assert time.monotonic() - t0 < 20
    time.sleep(0.5)
    assert replica_counts(url).get("reached", 0) == before.get("reached", 0)
    assert front_counts(url)["too_large"] >= 2


def _occupy(url: str) -> tuple[threading.Thread, dict]:
    """A request that holds the one compute slot for seconds: 96x96 takes 6.6 s on one Zen 4
    core (AVX-512), ~15 s on Zen 1; a 32x32 one (0.7 s on Zen 4) ended before a 1 s timeout."""
    out: dict = {}
    data = _rand_png(96, 96, 5)
    t = threading.Thread(target=lambda: out.setdefault("r", upscale_http(url, data)))
    t.start()
    return t, out


def _wait_started(url: str, want: int, wait: float = 30.0) -> None:
    t0 = time.monotonic()
    while replica_counts(url).get("started", 0) < want:
        assert time.monotonic() - t0 < wait, "the occupying request never started"
        time.sleep(0.05)


def test_request_past_its_queue_timeout_gets_503_and_is_never_computed(server) -> None:
    url = server["url"]
    base = replica_counts(url).get("started", 0)
    t, occ = _occupy(url)
    _wait_started(url, base + 1)
    r = upscale_http(url, _rand_png(8, 8, 9), timeout=1.0)
    assert r.status == 503 and "it was not computed" in r.reason, (r.status, r.reason)
    assert r.seconds < 10
    t.join(120)
    assert occ["r"].status == 200
    time.sleep(1.0)
    c = replica_counts(url)
    assert c.get("started", 0) == base + 1, c  # only the occupying request ran
    assert upscale_http(url, _rand_png(8, 8, 9)).status == 200  # and the server goes on


def test_full_queue_gets_503_with_a_reason(server) -> None:
    url = server["url"]
    base = replica_counts(url).get("started", 0)
    t, occ = _occupy(url)
    _wait_started(url, base + 1)
    small = _rand_png(8, 8, 4)
    res: list = [None] * 12

    def one(i: int) -> None:
        res[i] = upscale_http(url, small, timeout=3.0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    t.join(120)
    full = [r for r in res if r.status == 503 and "the server is full" in r.reason]
    # capacity 9 (1 slot + --max-queue 8): the occupier and 8 queued are admitted
    assert len(full) >= 3, [(r.status, r.reason) for r in res]
    assert all(r.status in (200, 503) for r in res), [(r.status, r.reason) for r in res]
    assert occ["r"].status == 200
    assert front_counts(url)["queue_full"] >= 3


def test_bomb_is_refused_fast_under_bounded_rss_then_next_request_served(server) -> None:
    tool = _load_tool()
    url, pid = server["url"], server["proc"].pid
    bomb = tool.png_bomb(1024)  # IHDR 64x64 16-bit, IDAT inflating to 1 GiB
    assert len(bomb) < MAX_BYTES
    base = tool.tree_rss(pid)
    with tool.RssSampler(pid, period=0.05) as rss:
        r = upscale_http(url, bomb, client_timeout=120)
    assert 400 <= r.status < 500, (r.status, r.reason)
    assert "decompression bomb" in r.reason or "inflates" in r.reason, r.reason
    assert r.seconds <= 2.0, r.seconds
    grown = (rss.peak - base) / (1 << 20)
    assert grown < 256, f"server tree RSS grew by {grown:.0f} MiB during the bomb"
    ok = upscale_http(url, _rand_png(8, 8, 11))
    assert ok.status == 200


def test_load_test_smoke(server, tmp_path: Path) -> None:
    tool = _load_tool()
    argv = ["--url", server["url"], "--server-pid", str(server["proc"].pid)]
    argv += ["--clients", "1,2", "--seconds", "20", "--max-requests", "4", "--threads", "1"]
    argv += ["--sizes", "8x8,12x8", "--bad-every", "2", "--bomb-mib", "64"]
    argv += ["--max-bytes", str(MAX_BYTES), "--out", str(tmp_path / "o")]
    assert tool.main(argv) == 0
    import json

    rep = json.loads((tmp_path / "o" / "load-serve.json").read_text())
    assert rep["server"]["engine"] == "Ray Serve" and rep["server"]["ray"]
    assert [lv["clients"] for lv in rep["levels"]] == [1, 2]
    for lv in rep["levels"]:
        assert lv["requests"] == 4 + 1 and lv["good_ok"] == 2 and lv["good_mismatch"] == 0
        assert lv["bomb_status"] == 400 and lv["bad_not_4xx"] == 0
        assert sum(lv["rejects_by_reason"].values()) == 2 + 1  # 2 bad + the bomb
        assert lv["p50_ms"] <= lv["p99_ms"] and lv["peak_rss_mib"] > 0
    assert "| 2 | 5 | 2 | 0 |" in (tmp_path / "o" / "load-serve.md").read_text()
    with pytest.raises(SystemExit, match="loopback"):
        tool.main(["--url", "http://10.1.2.3:8000"])


def test_sigterm_drains_the_request_in_flight_and_exits_0(server, tmp_path: Path) -> None:
    """Last test of the module: it stops the server."""
    url, proc = server["url"], server["proc"]
    data = _rand_png(24, 24, 13)
    ref = cli_upscale({"d": data}, tmp_path)["d"]
    base = replica_counts(url).get("started", 0)
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("r", upscale_http(url, data)))
    t.start()
    _wait_started(url, base + 1)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(OSError):  # no new connections while draining
        urllib.request.urlopen(url + "/v1/health/live", timeout=5)
    t.join(DRAIN_S)
    assert out["r"].status == 200 and out["r"].body == ref
    assert proc.wait(90) == 0
    assert "server stopped" in server["log"].read_text()
