"""Load test for ``dd-run serve``: N concurrent clients, mixed sizes, bad requests and a bomb.

    python tools/load_serve.py --clients 1,4,8 --seconds 120 --out results/serve

Loopback only, bounded: each level runs ``--seconds`` or ``--max-requests`` requests, whichever
comes first (a request in flight then gets ``--client-timeout`` at most). Without ``--url`` it
starts ``dd-run serve --port 0`` itself (``--model``, ``--precision``, ``--threads``) and stops it
with SIGTERM at the end (its exit code is reported). With ``--url``, pass ``--server-pid`` for the
RSS figures and the server's ``--model`` / ``--precision`` for the reference outputs.

Each client is a thread sending ``POST /v1/upscale`` (urllib), round-robin over the good images
(``--images DIR`` or generated PNGs of ``--sizes``); every ``--bad-every``-th request is a bad one
(not an image, a negative seed, an unknown parameter, a body over the server's limit), and
client 0 of each level opens with one decompression bomb (a 16-bit PNG whose IDAT inflates to
``--bomb-mib`` MiB). Every good answer is compared byte for byte with what ``dd-run upscale``
writes for the same file (one CLI run before the levels). Reported per level: throughput of good
answers, p50 / p99 latency, rejects by status and by the server's reason counters
(``/v1/stats``), the bomb's status and time, and the peak RSS of the server's process tree
(sampled every 0.2 s). Writes ``load-serve.json`` and ``load-serve.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deltadiff.atomic import write_text_atomic
from deltadiff.runtime.memory_budget import cpu_name
from deltadiff.runtime.serving.serve import get_json, is_loopback, upscale_http

BAD_KINDS = ("not_an_image", "negative_seed", "unknown_parameter", "too_large")


# --------------------------------------------------------------------------- inputs


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def generated_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[tuple[str, bytes]]:
    """Random RGB PNGs of the given (h, w) sizes."""
    rng = np.random.default_rng(seed)
    return [
        (f"gen-{h}x{w}-{i}.png", png_bytes(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        for i, (h, w) in enumerate(sizes)
    ]


def folder_images(folder: Path, n: int) -> list[tuple[str, bytes]]:
    from deltadiff.runtime.imageio import find_images

    files = [p for p, _ in find_images([folder])][:n]
    if not files:
        raise SystemExit(f"--images {folder}: no images there")
    return [(p.name, p.read_bytes()) for p in files]


def zeros_zlib(mib: int) -> bytes:
    """A zlib stream of ``mib`` MiB of zeros, built from one full-flushed 1 MiB segment."""
    block = bytes(1 << 20)
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    seg = co.compress(block) + co.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(mib):
        adler = zlib.adler32(block, adler)
    return b"\x78\xda" + seg * mib + b"\x03\x00" + adler.to_bytes(4, "big")


def png_bomb(mib: int, w: int = 64, h: int = 64) -> bytes:
    """A 16-bit RGB PNG whose header says w x h and whose IDAT inflates to ``mib`` MiB."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zeros_zlib(mib))
        + chunk(b"IEND", b"")
    )


def references(
    images: list[tuple[str, bytes]], model: Path | None, precision: str, threads: int
) -> dict[str, bytes]:
    """What ``dd-run upscale`` writes for each good image (one CLI run over a folder)."""
    with tempfile.TemporaryDirectory(prefix="dd-load-ref-") as d:
        src, out = Path(d) / "in", Path(d) / "out"
        src.mkdir()
        for name, data in images:
            (src / name).write_bytes(data)
        cmd = [sys.executable, "-m", "deltadiff.cli.run", "upscale", str(src), "-o", str(out)]
        cmd += ["--precision", precision, "--threads", str(threads), "--quiet"]
        if model:
            cmd += ["--model", str(model)]
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise SystemExit(f"dd-run upscale failed: {p.stderr.strip()[-500:]}")
        return {name: (out / f"{Path(name).stem}.png").read_bytes() for name, _ in images}


# --------------------------------------------------------------------------- server


def tree_rss(pid: int) -> int:
    """RSS bytes of ``pid`` and all its descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            pages = int((d / "statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        rss[int(d.name)] = pages * page
    tree, todo = {pid}, [pid]
    while todo:
        p = todo.pop()
        for c, pp in parents.items():
            if pp == p and c not in tree:
                tree.add(c)
                todo.append(c)
    return sum(rss.get(p, 0) for p in tree)


class RssSampler:
    """Peak ``tree_rss(pid)`` while running, sampled every ``period`` seconds."""

    def __init__(self, pid: int | None, period: float = 0.2) -> None:
        self.pid, self.period, self.peak = pid, period, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid) if self.pid else 0)
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


@dataclass
class Server:
    url: str
    pid: int | None
    proc: subprocess.Popen | None = None
    log: Path | None = None


def start_server(args: argparse.Namespace, log: Path) -> Server:
    cmd = [sys.executable, "-m", "deltadiff.cli.run", "serve", "--port", "0"]
    cmd += ["--precision", args.precision, "--threads", str(args.threads)]
    cmd += ["--max-bytes", str(args.max_bytes)]
    if args.model:
        cmd += ["--model", str(args.model)]
    fh = log.open("wb")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.start_timeout:
        m = re.search(r"serving on (http://\S+)/v1/upscale", log.read_text(errors="replace"))
        if m:
            return Server(m.group(1), proc.pid, proc, log)
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"dd-run serve did not start: {log.read_text(errors='replace')[-800:]}")


def stop_server(srv: Server, timeout: float = 120.0) -> int | None:
    if srv.proc is None:
        return None
    srv.proc.send_signal(signal.SIGTERM)
    try:
        return srv.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        return srv.proc.wait()


# --------------------------------------------------------------------------- one level


@dataclass
class Result:
    kind: str  # good / bad:<which> / bomb
    status: int
    seconds: float
    match: bool | None = None  # good answers: byte-equal to dd-run upscale


@dataclass
class Level:
    clients: int
    seconds: float = 0.0
    requests: int = 0
    good_ok: int = 0
    good_mismatch: int = 0
    throughput_rps: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    rejects_by_status: dict[str, int] = field(default_factory=dict)
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    bad_not_4xx: int = 0
    bomb_status: int | None = None
    bomb_ms: float | None = None
    peak_rss_mib: float | None = None


def post_raw(url: str, query: str, length: int, body: bytes, timeout: float) -> int:
    """POST with a declared ``Content-Length`` and (part of) a body; the status, 0 if the
    server closed the connection before answering."""
    import http.client

    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.putrequest("POST", "/v1/upscale" + query)
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        conn.send(body)
        return int(conn.getresponse().status)
    except OSError:
        return 0
    finally:
        conn.close()


def send_bad(url: str, kind: str, image: bytes, max_bytes: int, timeout: float) -> Result:
    """One bad request of ``kind`` (``bad:<one of BAD_KINDS>``)."""
    t0 = time.perf_counter()
    if kind == "bad:not_an_image":
        status = upscale_http(url, b"this is not an image file", client_timeout=timeout).status
    elif kind == "bad:negative_seed":
        status = upscale_http(url, image, seed=-1, client_timeout=timeout).status
    elif kind == "bad:unknown_parameter":
        status = post_raw(url, "?size=2", len(image), image, timeout)
    else:  # too large: the declared length is over the limit, 64 KiB of it sent
        status = post_raw(url, "", max_bytes + 1, bytes(64 << 10), timeout)
    return Result(kind, status, time.perf_counter() - t0)


def run_level(
    args: argparse.Namespace,
    srv: Server,
    clients: int,
    images: list[tuple[str, bytes]],
    refs: dict[str, bytes],
    bomb: bytes,
) -> Level:
    lock = threading.Lock()
    issued = [0]
    results: list[Result] = []
    t_end = time.monotonic() + args.seconds
    before = get_json(srv.url, "/v1/stats")["front"]

    def next_kind() -> str | None:
        with lock:
            if issued[0] >= args.max_requests or time.monotonic() > t_end:
                return None
            k = issued[0]
            issued[0] += 1
        if args.bad_every and k % args.bad_every == args.bad_every - 1:
            return "bad:" + BAD_KINDS[(k // args.bad_every) % len(BAD_KINDS)]
        return f"good:{k}"

    def client(i: int) -> None:
        if i == 0 and bomb:
            t0 = time.perf_counter()
            r = upscale_http(srv.url, bomb, client_timeout=args.client_timeout)
            with lock:
                results.append(Result("bomb", r.status, time.perf_counter() - t0))
        while (kind := next_kind()) is not None:
            if kind.startswith("good:"):
                name, data = images[int(kind[5:]) % len(images)]
                r = upscale_http(srv.url, data, client_timeout=args.client_timeout)
                match = r.body == refs[name] if r.status == 200 else None
                res = Result("good", r.status, r.seconds, match)
            else:
                image = images[0][1]
                res = send_bad(srv.url, kind, image, args.max_bytes, args.client_timeout)
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    with RssSampler(srv.pid) as rss:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - t0
    after = get_json(srv.url, "/v1/stats")["front"]
    return summarize(clients, results, wall, before, after, rss.peak if srv.pid else None)


def summarize(
    clients: int,
    results: list[Result],
    wall: float,
    before: dict[str, int],
    after: dict[str, int],
    peak_rss: int | None,
) -> Level:
    good = [r for r in results if r.kind == "good" and r.status == 200]
    lat = np.asarray([r.seconds for r in good], dtype=np.float64) * 1000.0
    lv = Level(clients=clients, seconds=round(wall, 2), requests=len(results))
    lv.good_ok = sum(bool(r.match) for r in good)
    lv.good_mismatch = sum(r.match is False for r in good)
    lv.throughput_rps = round(len(good) / wall, 3) if wall else 0.0
    if lat.size:
        lv.p50_ms = round(float(np.percentile(lat, 50)), 1)
        lv.p99_ms = round(float(np.percentile(lat, 99)), 1)
    lv.rejects_by_status = dict(Counter(str(r.status) for r in results if r.status != 200))
    skip = {"ok", "health", "in_flight", "capacity"}
    lv.rejects_by_reason = {
        k: after.get(k, 0) - before.get(k, 0)
        for k in sorted(set(after) - skip)
        if after.get(k, 0) - before.get(k, 0)
    }
    lv.bad_not_4xx = sum(r.kind.startswith("bad:") and not 400 <= r.status < 500 for r in results)
    bomb = [r for r in results if r.kind == "bomb"]
    if bomb:
        lv.bomb_status, lv.bomb_ms = bomb[0].status, round(bomb[0].seconds * 1000.0, 1)
    if peak_rss is not None:
        lv.peak_rss_mib = round(peak_rss / (1 << 20), 1)
    return lv


# --------------------------------------------------------------------------- report


def markdown(rep: dict[str, Any]) -> str:
    s = rep["server"]
    lines = [
        f"# dd-run serve load test ({rep['cpu']})",
        "",
        f"Server: {s.get('engine')} (Ray {s.get('ray')}, Python {s.get('python')}), "
        f"{rep['precision']}; images: {rep['images']}; {rep['seconds_per_level']} s or "
        f"{rep['max_requests']} requests per level; a bad request every {rep['bad_every']}; "
        f"one {rep['bomb_mib']} MiB PNG bomb per level.",
        "",
        "| clients | requests | good, byte-equal | mismatches | good/s | p50 ms | p99 ms "
        "| rejects (status) | rejects (reason) | bomb | peak RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for lv in rep["levels"]:
        st = ", ".join(f"{k}: {v}" for k, v in sorted(lv["rejects_by_status"].items())) or "-"
        why = ", ".join(f"{k}: {v}" for k, v in lv["rejects_by_reason"].items()) or "-"
        bomb = f"{lv['bomb_status']} in {lv['bomb_ms']} ms" if lv["bomb_status"] else "-"
        lines.append(
            f"| {lv['clients']} | {lv['requests']} | {lv['good_ok']} | {lv['good_mismatch']} "
            f"| {lv['throughput_rps']} | {lv['p50_ms']} | {lv['p99_ms']} | {st} | {why} "
            f"| {bomb} | {lv['peak_rss_mib']} |"
        )
    if rep.get("server_exit_code") is not None:
        lines += ["", f"Server stopped with SIGTERM: exit code {rep['server_exit_code']}."]
    return "\n".join(lines) + "\n"


def verdict(levels: list[Level], bomb: bool) -> list[str]:
    """What makes the run fail: wrong answers, bad requests not refused with 4xx, a bomb
    not refused with 4xx, server errors."""
    probs = []
    for lv in levels:
        if lv.good_mismatch:
            probs.append(f"{lv.clients} clients: {lv.good_mismatch} answers differ")
        if lv.bad_not_4xx:
            probs.append(f"{lv.clients} clients: {lv.bad_not_4xx} bad requests not refused 4xx")
        if bomb and not (lv.bomb_status and 400 <= lv.bomb_status < 500):
            probs.append(f"{lv.clients} clients: bomb answered {lv.bomb_status}")
        errors = {k: v for k, v in lv.rejects_by_status.items() if k.startswith("5") and k != "503"}
        if errors:
            probs.append(f"{lv.clients} clients: server errors {errors}")
    return probs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="http://host:port of a running server (loopback only)")
    ap.add_argument("--server-pid", type=int, help="its process id (for the RSS figures)")
    ap.add_argument("--model", type=Path, help="model directory (server and references)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (server, refs)")
    ap.add_argument("--clients", default="1,4,8", help="concurrency levels, e.g. 1,4,8")
    ap.add_argument("--seconds", type=float, default=120.0, help="per level (bounded)")
    ap.add_argument("--max-requests", type=int, default=1000, help="per level (bounded)")
    ap.add_argument("--sizes", default="32x24,24x40,48x32,40x40,16x56,56x16,64x48,20x20")
    ap.add_argument("--images", type=Path, help="good images from this folder instead")
    ap.add_argument("--bad-every", type=int, default=10, help="every k-th request is bad (0: no)")
    ap.add_argument("--bomb-mib", type=int, default=1024, help="bomb's inflated size (0: none)")
    ap.add_argument("--max-bytes", type=int, default=32 << 20, help="the server's --max-bytes")
    ap.add_argument("--client-timeout", type=float, default=300.0)
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--out", type=Path, help="folder for load-serve.json / .md")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url and not is_loopback(urllib.parse.urlsplit(args.url).hostname or ""):
        raise SystemExit(f"--url {args.url}: this load test talks to loopback servers only")
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    images = folder_images(args.images, 64) if args.images else generated_images(sizes)  # type: ignore[arg-type]
    refs = references(images, args.model, args.precision, args.threads)
    bomb = png_bomb(args.bomb_mib) if args.bomb_mib else b""
    work = Path(tempfile.mkdtemp(prefix="dd-load-"))
    srv = Server(args.url, args.server_pid) if args.url else start_server(args, work / "serve.log")
    levels, code = [], None
    try:
        server = get_json(srv.url, "/v1/stats").get("server", {})
        for n in (int(c) for c in args.clients.split(",")):
            levels.append(run_level(args, srv, n, images, refs, bomb))
    finally:
        code = stop_server(srv)
    rep = {
        "cpu": cpu_name(),
        "machine": platform.node(),
        "server": {**server, "python": platform.python_version()},
        "precision": args.precision,
        "images": f"{len(images)} ({'folder' if args.images else args.sizes})",
        "seconds_per_level": args.seconds,
        "max_requests": args.max_requests,
        "bad_every": args.bad_every,
        "bomb_mib": args.bomb_mib,
        "levels": [asdict(lv) for lv in levels],
        "server_exit_code": code,
    }
    probs = verdict(levels, bool(bomb))
    if code not in (None, 0):
        probs.append(f"the server exited {code} after SIGTERM")
    rep["problems"] = probs
    text = markdown(rep)
    print(text, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out / "load-serve.json", json.dumps(rep, indent=1) + "\n")
        write_text_atomic(args.out / "load-serve.md", text)
    for p in probs:
        print(f"problem: {p}", file=sys.stderr)
    return 1 if probs else 0


if __name__ == "__main__":
    raise SystemExit(main())
