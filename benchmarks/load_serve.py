"""Load test for ``dd-run serve`` (perf_analyzer-style): N concurrent clients, throughput and
latency percentiles per concurrency level. Loopback only; every level is bounded by a request
count and a time limit.

    python -m deltadiff.benchmarks.load_serve --clients 1,4,8 --requests 16 \\
        --images ../shared/data/val-bicubic-x4/lq --out benchmarks/results/serve

Without ``--url`` it starts ``dd-run serve`` itself (``--model``, default the bundled demo model)
on free 127.0.0.1 ports and stops it at the end. Each client is a thread with its own
``tritonclient.http`` connection sending one encoded image per request, round-robin over the
images; a level runs until ``--requests`` requests are answered or ``--max-seconds`` pass.
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from deltadiff.runtime.memory import cpu_name

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def percentiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64) * 1000.0
    if a.size == 0:
        return {k: float("nan") for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "max_ms")}
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "max_ms": float(a.max()),
    }


def load_images(folder: Path | None, n: int, size: int) -> list[tuple[str, bytes]]:
    from PIL import Image

    if folder:
        from deltadiff.runtime.imageio import find_images

        files = [p for p, _ in find_images([folder])][:n]
        if not files:
            raise SystemExit(f"no images in {folder}")
        return [(p.name, p.read_bytes()) for p in files]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append((f"random-{i}.png", buf.getvalue()))
    return out


def run_level(
    url: str, images: list[tuple[str, bytes]], clients: int, requests: int, max_seconds: float
) -> dict[str, Any]:
    import tritonclient.http as th

    from deltadiff.runtime.serve import upscale_remote

    lock = threading.Lock()
    issued = [0]
    lat: list[float] = []
    errors: list[str] = []
    pixels = [0]
    t_end = time.monotonic() + max_seconds

    def client() -> None:
        c = th.InferenceServerClient(url, network_timeout=600)
        try:
            while True:
                with lock:
                    if issued[0] >= requests or time.monotonic() > t_end:
                        return
                    k = issued[0]
                    issued[0] += 1
                _name, data = images[k % len(images)]
                t0 = time.perf_counter()
                try:
                    upscale_remote(c, data)
                    dt = time.perf_counter() - t0
                    with lock:
                        lat.append(dt)
                        pixels[0] += _pixels(data)
                except Exception as exc:  # counted and reported
                    with lock:
                        errors.append(str(exc)[:200])
        finally:
            c.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": len(errors),
        "error_examples": errors[:3],
        "seconds": wall,
        "throughput_rps": len(lat) / wall if wall else 0.0,
        "lr_mpix_per_s": pixels[0] / 1e6 / wall if wall else 0.0,
        **percentiles(lat),
    }


def _pixels(data: bytes) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size[0] * im.size[1]


def batch_stats(url: str) -> dict[int, int]:
    import tritonclient.http as th

    c = th.InferenceServerClient(url)
    try:
        st = c.get_inference_statistics("deltadiff")["model_stats"][0]["batch_stats"]
    finally:
        c.close()
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in st}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="host:port of a running server (loopback only)")
    ap.add_argument("--model", type=Path, help="model directory for a server started here")
    ap.add_argument("--threads", type=int, default=0, help="server's onnxruntime threads")
    ap.add_argument("--clients", default="1,4,8", help="comma list of concurrency levels")
    ap.add_argument("--requests", type=int, default=16, help="requests per level")
    ap.add_argument("--warmup", type=int, default=2, help="requests before the first level")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="time limit per level")
    ap.add_argument("--images", type=Path, help="folder of request images (default: random)")
    ap.add_argument("--size", type=int, default=64, help="random image side")
    ap.add_argument("--n-images", type=int, default=8)
    ap.add_argument("--out", type=Path, help="folder for load-serve.json / .md")
    a = ap.parse_args(argv)

    from contextlib import nullcontext

    from deltadiff.runtime.serve import ServeOptions, serving

    if a.url and a.url.rsplit(":", 1)[0] not in LOOPBACK:
        raise SystemExit(f"--url {a.url}: this load test talks to loopback servers only")
    images = load_images(a.images, a.n_images, a.size)
    levels = [int(x) for x in a.clients.split(",") if x.strip()]
    ctx = (
        nullcontext(None)
        if a.url
        else serving(ServeOptions(model=a.model, port=0, threads=a.threads, max_batch=max(levels)))
    )
    t_start = time.perf_counter()
    with ctx as srv:
        url = a.url or srv.url
        startup = time.perf_counter() - t_start
        if a.warmup:
            run_level(url, images, 1, a.warmup, a.max_seconds)
        rows = []
        for c in levels:
            before = batch_stats(url)
            r = run_level(url, images, c, a.requests, a.max_seconds)
            after = batch_stats(url)
            r["batches"] = {
                k: after.get(k, 0) - before.get(k, 0)
                for k in after
                if after.get(k, 0) - before.get(k, 0)
            }
            rows.append(r)
            print(
                f"clients {c:>2}: {r['requests']} requests in {r['seconds']:.1f} s, "
                f"{r['throughput_rps']:.3f} req/s, p50 {r['p50_ms']:.0f} ms, p90 {r['p90_ms']:.0f} ms, "
                f"p99 {r['p99_ms']:.0f} ms, errors {r['errors']}, request batches {r['batches']}"
            )
    report = {
        "cpu": cpu_name(),
        "model": str(a.model or "bundled demo-pixel"),
        "images": [n for n, _ in images],
        "server_startup_s": startup if not a.url else None,
        "requests_per_level": a.requests,
        "levels": rows,
    }
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "load-serve.json").write_text(json.dumps(report, indent=1) + "\n")
        md = [
            f"# dd-run serve load test ({report['cpu']})",
            "",
            f"model {report['model']}; {len(images)} request images; {a.requests} requests per level",
            "",
            "| clients | requests | req/s | LR MP/s | p50 ms | p90 ms | p99 ms | errors | request batches (size: count) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            md.append(
                f"| {r['clients']} | {r['requests']} | {r['throughput_rps']:.3f} | {r['lr_mpix_per_s']:.4f} "
                f"| {r['p50_ms']:.0f} | {r['p90_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | {r['batches']} |"
            )
        (a.out / "load-serve.md").write_text("\n".join(md) + "\n")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
