"""``dd-run serve``: the lean runtime behind an HTTP API, on Ray Serve.

API (docs/serving.md): ``POST /v1/upscale[?seed=N&timeout=S]`` with an encoded image file as the
body answers ``image/png``, byte for byte what ``dd-run upscale`` writes for that file; a refusal
is a one-line ``text/plain`` reason with 400 (bad request), 413 (body too large), 503 (queue full,
queue wait over, draining) or 504 (computation over ``--request-timeout``). ``GET
/v1/health/live``, ``/v1/health/ready``, ``/v1/stats``.

How it runs:

* **Front** (this process): an ASGI app (Starlette on uvicorn) that listens on ``--host:--port``.
  It refuses work before holding it: a full server (``--max-queue`` plus the replicas' compute
  slots already admitted) gets 503 before the body is read; ``Content-Length`` over
  ``--max-bytes`` gets 413 at once; a chunked body is counted while it streams in and refused
  as soon as it passes the limit (uvicorn stops reading the socket past 64 KiB buffered, so an
  unread body stays in the kernel). Ray Serve's own HTTP proxy is not started: in Ray 2.60 it
  reads every request body into an unbounded queue before any replica code runs
  (``ray/serve/_private/proxy.py``: ``proxy_asgi_receive`` / ``http_util.MessageQueue``).
* **Replicas** (``UpscaleReplica``, Ray Serve deployment ``upscaler``): each holds
  ``--max-concurrent`` Upscalers; ``max_ongoing_requests`` is that number, so a request reaches
  a replica only when one is free, and waits otherwise in Ray Serve's queue, whose length is
  bounded by ``max_queued_requests`` (``--max-queue``; more: ``BackPressureError`` -> 503).
* **Queue wait**: every request carries a deadline (``--queue-timeout`` or a shorter
  ``?timeout=``). The replica yields "started" before computing and refuses to start after the
  deadline; the front waits for "started" only until the deadline, then cancels the request
  (Ray Serve drops a request not yet assigned to a replica) and answers 503. A request that
  waited past its deadline is never computed.
* **Memory**: each replica's budget (``--max-memory`` GiB, default half of MemAvailable) is
  split between its compute slots: each Upscaler sizes whole images and tiles for its share,
  so all images in flight together stay within the budget. Requests are never merged into one
  backend call here: each image runs alone, in its own tile calls.
* **Stop**: SIGTERM / SIGINT stop accepting connections, let the requests in flight finish for
  up to ``--drain-seconds``, then stop Ray Serve and the local Ray cluster; exit code 0.

The Triton pieces that lived here (the ``deltadiff`` Python model of ``dd-export triton``
repositories, ``TileBatcher``, the PyTriton test harness) are in ``runtime/serving/triton_service.py`` and
re-exported below for the modules that import them from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import queue
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltadiff._deps import require
from deltadiff.errors import DeltaDiffError
from deltadiff.runtime.serving.image_request import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    RequestError,
    upscale_bytes,
    upscale_request,
)
from deltadiff.runtime.serving.ray_cluster import import_ray, start_local_cluster
from deltadiff.runtime.serving.triton_service import (
    INPUT,
    OUTPUT,
    SEED,
    ImageService,
    Limits,
    StageModels,
    TileBatcher,
    TritonServer,
    build_service,
    encode_request,
    free_port,
    model_config,
    model_source,
    upscale_remote,
)

__all__ = [  # the Triton names are re-exported for runtime/serving/triton_repo.py, triton_models, ray_job.py
    "INPUT",
    "OUTPUT",
    "SEED",
    "ImageService",
    "Limits",
    "RequestError",
    "StageModels",
    "TileBatcher",
    "TritonServer",
    "build_service",
    "encode_request",
    "free_port",
    "model_config",
    "model_source",
    "upscale_bytes",
    "upscale_remote",
    "ServeOptions",
    "serve_forever",
    "upscale_http",
]

log = logging.getLogger(__name__)

APP = "deltadiff"
NAMESPACE = "deltadiff-serve"
MAX_SEED = (1 << 63) - 1


@dataclass(frozen=True)
class ServeOptions:
    model: Path | None = None
    backend: str = "onnxruntime"
    precision: str | None = "fp32"
    mode: str = "staged"
    threads: int = 0  # onnxruntime threads per Upscaler (0: all)
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    replicas: int = 1
    max_concurrent: int = 1  # images computed at once per replica (its compute slots)
    max_queue: int = 16  # requests waiting for a slot, beyond those computing
    queue_timeout: float = 60.0  # longest wait before computing starts (s)
    request_timeout: float = 600.0  # longest computation once started (s)
    drain_seconds: float = 30.0
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_memory: float | None = None  # GiB per replica (default: half of MemAvailable)
    address: str | None = None  # Ray cluster; None: start a local one on 127.0.0.1
    cpus_per_replica: float = 1.0
    local_cpus: int | None = None  # CPUs of a local cluster (default: the machine's)

    @property
    def capacity(self) -> int:
        """Requests admitted at once: those computing plus those queued."""
        return self.replicas * self.max_concurrent + self.max_queue


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_options(opts: ServeOptions) -> None:
    """Fail in the CLI, before Ray starts, on a bad option or model (one line)."""
    from deltadiff.runtime.upscaler import Upscaler

    for name, value, low in (
        ("--replicas", opts.replicas, 1),
        ("--max-concurrent", opts.max_concurrent, 1),
        ("--max-queue", opts.max_queue, 0),
        ("--max-bytes", opts.max_bytes, 1),
        ("--max-pixels", opts.max_pixels, 1),
    ):
        if value < low:
            raise DeltaDiffError(f"{name} {value}: must be at least {low}")
    for name, sec in (
        ("--queue-timeout", opts.queue_timeout),
        ("--request-timeout", opts.request_timeout),
    ):
        if sec <= 0:
            raise DeltaDiffError(f"{name} {sec:g}: must be above 0 seconds")
    if opts.drain_seconds < 0:
        raise DeltaDiffError(f"--drain-seconds {opts.drain_seconds:g}: must be 0 or more")
    Upscaler(opts.model, _upscale_options(opts, opts.max_memory)).close()


def _upscale_options(opts: ServeOptions, max_memory: float | None) -> Any:
    from deltadiff.runtime.upscaler import UpscaleOptions

    return UpscaleOptions(
        backend=opts.backend,
        precision=opts.precision,
        mode=opts.mode,
        threads=opts.threads,
        max_memory=max_memory,
    )


# --------------------------------------------------------------------------- replicas


class Counters:
    """A Ray actor holding the replicas' counters (reached, expired, started, ok, bad, failed)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, key: str) -> None:
        self.counts[key] += 1

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


@dataclass(frozen=True)
class ReplicaConfig:
    opts: ServeOptions
    counters: str  # name of the Counters actor in NAMESPACE


class UpscaleReplica:
    """A Ray Serve replica: ``max_concurrent`` Upscalers sharing the replica's memory budget."""

    def __init__(self, cfg: ReplicaConfig) -> None:
        import ray

        from deltadiff.runtime.memory_budget import default_budget
        from deltadiff.runtime.upscaler import Upscaler

        o = cfg.opts
        budget = o.max_memory * (1 << 30) if o.max_memory else default_budget()
        share = budget / o.max_concurrent / (1 << 30)  # GiB per compute slot
        self.pool: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(o.max_concurrent):
            self.pool.put(Upscaler(o.model, _upscale_options(o, share)))
        self.max_pixels = o.max_pixels
        self.tmp = Path(tempfile.mkdtemp(prefix="dd-serve-"))
        self.counters = ray.get_actor(cfg.counters, namespace=NAMESPACE)

    def _count(self, key: str) -> None:
        self.counters.add.remote(key)

    async def upscale(
        self, data: bytes, seed: int, deadline: float
    ) -> AsyncIterator[tuple[str, Any]]:
        """Yields ("expired", reason) and stops, or ("started", "") then (status, PNG / reason)."""
        self._count("reached")
        late = time.time() - deadline
        if late > 0:
            self._count("expired")
            yield ("expired", f"the queue wait ran out {late:.1f} s before a slot was free")
            return
        yield ("started", "")
        yield await asyncio.to_thread(self._compute, data, seed)

    def _compute(self, data: bytes, seed: int) -> tuple[str, Any]:
        up = self.pool.get()
        self._count("started")
        try:
            png = upscale_request(up, data, seed, workdir=self.tmp, max_pixels=self.max_pixels)
            self._count("ok")
            return ("ok", png)
        except RequestError as exc:
            self._count("bad")
            return ("bad", str(exc))
        except DeltaDiffError as exc:
            self._count("failed")
            return ("failed", str(exc))
        except MemoryError:
            self._count("failed")
            return ("failed", "out of memory while upscaling; lower --max-pixels or --max-memory")
        except Exception as exc:  # a backend failure: one line to the client, the trace in the log
            log.exception("upscale failed")
            self._count("failed")
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            return ("failed", f"the backend failed: {type(exc).__name__}: {first}")
        finally:
            self.pool.put(up)

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "tmp", ""), ignore_errors=True)


# --------------------------------------------------------------------------- front


class RefusedError(Exception):
    """A request the front answers itself: HTTP status, counter name, one-line reason."""

    def __init__(self, status: int, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.kind, self.reason = status, kind, reason


def parse_query(params: Any, queue_timeout: float) -> tuple[int | None, float]:
    """(seed, queue timeout) from ``?seed=N&timeout=S``; anything else is a ``RefusedError`` 400."""
    unknown = sorted(set(params.keys()) - {"seed", "timeout"})
    if unknown:
        raise RefusedError(
            400, "bad_request", f"unknown parameter {unknown[0]!r}: use seed and timeout"
        )
    seed = None
    if "seed" in params:
        raw = params["seed"]
        if not raw.isdigit() or int(raw) > MAX_SEED:
            raise RefusedError(
                400, "bad_request", f"seed={raw}: must be an integer from 0 to {MAX_SEED}"
            )
        seed = int(raw)
    timeout = queue_timeout
    if "timeout" in params:
        raw = params["timeout"]
        try:
            t = float(raw)
        except ValueError:
            t = -1.0
        if not 0 < t < float("inf"):
            raise RefusedError(
                400, "bad_request", f"timeout={raw}: must be a number of seconds above 0"
            )
        timeout = min(t, queue_timeout)
    return seed, timeout


class Front:
    """The HTTP side: admission, body limit, queue deadline; the work goes to the replicas."""

    def __init__(self, opts: ServeOptions, handle: Any, counters: Any) -> None:
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.opts, self.handle, self.counters = opts, handle, counters
        self.counts: Counter[str] = Counter()
        self.in_flight = 0
        self.draining = False
        self._ready_at = 0.0
        self.app = Starlette(
            routes=[
                Route("/v1/upscale", self.upscale, methods=["POST"]),
                Route("/v1/health/live", self.live, methods=["GET"]),
                Route("/v1/health/ready", self.ready, methods=["GET"]),
                Route("/v1/stats", self.stats, methods=["GET"]),
            ]
        )

    def _text(self, status: int, kind: str, reason: str, **headers: str) -> Any:
        from starlette.responses import PlainTextResponse

        self.counts[kind] += 1
        return PlainTextResponse(reason + "\n", status_code=status, headers=headers)

    async def upscale(self, request: Any) -> Any:
        if self.draining:
            return self._text(503, "draining", "the server is stopping; retry on another one")
        try:
            seed, timeout = parse_query(request.query_params, self.opts.queue_timeout)
        except RefusedError as r:
            return self._text(r.status, r.kind, r.reason)
        if self.in_flight >= self.opts.capacity:
            reason = (
                f"the server is full: {self.in_flight} requests admitted, its limit is "
                f"{self.opts.capacity} (--max-queue plus the compute slots); retry later"
            )
            return self._text(503, "queue_full", reason, **{"Retry-After": "1"})
        self.in_flight += 1
        try:
            body = await self._read_body(request)
            status, payload = await self._compute(body, seed, timeout)
        except RefusedError as r:
            extra = {"Connection": "close"} if r.status == 413 else {}
            return self._text(r.status, r.kind, r.reason, **extra)
        finally:
            self.in_flight -= 1
        if status == "ok":
            from starlette.responses import Response

            self.counts["ok"] += 1
            return Response(payload, media_type="image/png")
        code, kind = (400, "bad_request") if status == "bad" else (500, "failed")
        return self._text(code, kind, payload)

    async def _read_body(self, request: Any) -> bytes:
        limit = self.opts.max_bytes
        hint = "dd-run serve --max-bytes"
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise RefusedError(400, "bad_request", f"Content-Length {length!r} is not a number")
            if int(length) > limit:
                reason = (
                    f"request body is {int(length)} bytes, the server's limit is {limit} ({hint})"
                )
                raise RefusedError(413, "too_large", reason)
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                reason = f"request body is over {limit} bytes, the server's limit ({hint})"
                raise RefusedError(413, "too_large", reason)
            chunks.append(chunk)
        if total == 0:
            raise RefusedError(
                400, "bad_request", "empty body: send the image file's bytes as the body"
            )
        return b"".join(chunks)

    async def _compute(self, body: bytes, seed: int | None, timeout: float) -> tuple[str, Any]:
        """(status, PNG or reason) from a replica; waits for a slot until the deadline only."""
        from ray.serve.exceptions import BackPressureError

        waited = (
            f"waited {timeout:g} s without a free compute slot (--queue-timeout or ?timeout=); "
            "it was not computed: retry later"
        )
        seed = 0 if seed is None else seed
        gen = self.handle.options(stream=True).upscale.remote(body, seed, time.time() + timeout)
        try:
            try:
                first = await asyncio.wait_for(gen.__anext__(), timeout)
            except TimeoutError:
                gen.cancel()  # not yet on a replica: Ray Serve drops it
                raise RefusedError(503, "queue_timeout", waited) from None
            if first[0] == "expired":
                raise RefusedError(503, "queue_timeout", waited)
            try:
                return await asyncio.wait_for(gen.__anext__(), self.opts.request_timeout)
            except TimeoutError:
                gen.cancel()
                t = self.opts.request_timeout
                reason = f"computing took over {t:g} s (--request-timeout)"
                raise RefusedError(504, "compute_timeout", reason) from None
        except BackPressureError:
            raise RefusedError(
                503, "queue_full", "the queue is full (--max-queue); retry later"
            ) from None
        except RefusedError:
            raise
        except Exception as exc:  # a replica died, Ray failed: one line, the trace in the log
            log.exception("request failed")
            line = (str(exc).strip().splitlines() or [""])[0][:300]
            raise RefusedError(
                500, "failed", f"the server failed: {type(exc).__name__}: {line}"
            ) from None

    async def live(self, request: Any) -> Any:
        return self._text(200, "health", "live")

    async def ready(self, request: Any) -> Any:
        if self.draining:
            return self._text(503, "health", "draining")
        if time.monotonic() - self._ready_at > 2.0:
            if not await asyncio.to_thread(_app_running):
                return self._text(
                    503, "health", f"the Ray Serve application {APP!r} is not running"
                )
            self._ready_at = time.monotonic()
        return self._text(200, "health", "ready")

    async def stats(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        replicas = await self.counters.snapshot.remote()
        front = {**self.counts, "in_flight": self.in_flight, "capacity": self.opts.capacity}
        return JSONResponse({"server": server_info(), "front": front, "replicas": replicas})


def server_info() -> dict[str, str]:
    """Which serving engine and version answer (for /v1/stats and the load test)."""
    import ray

    return {"engine": "Ray Serve", "ray": ray.__version__}


def _app_running() -> bool:
    from ray import serve

    try:
        return str(serve.status().applications[APP].status).endswith("RUNNING")
    except Exception:  # the controller is gone or busy: not ready
        return False


# --------------------------------------------------------------------------- process


@contextlib.contextmanager
def ray_cluster(opts: ServeOptions) -> Iterator[Any]:
    """Connect to ``--address`` or start a local Ray cluster on 127.0.0.1 (no dashboard, no
    usage reporting); shut down what this call started."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = import_ray("serve")
    require("ray.serve", "serve")
    kw: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
        "namespace": NAMESPACE,
    }
    if opts.address:
        ray.init(address=opts.address, **kw)
    else:
        start_local_cluster(ray, num_cpus=opts.local_cpus or os.cpu_count() or 1, **kw)
    try:
        have = ray.cluster_resources().get("CPU", 0)
        need = opts.replicas * opts.cpus_per_replica
        if need > have:
            raise DeltaDiffError(
                f"--replicas {opts.replicas} x --cpus-per-replica {opts.cpus_per_replica:g} "
                f"needs {need:g} CPUs; the Ray cluster has {have:g}: use fewer"
            )
        yield ray
    finally:
        with contextlib.suppress(Exception):
            from ray import serve

            serve.shutdown()
        ray.shutdown()


def deploy(opts: ServeOptions, ray: Any) -> tuple[Any, Any]:
    """Start the counters actor and the ``upscaler`` deployment; (handle, counters)."""
    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    name = f"deltadiff-counters-{uuid.uuid4().hex[:8]}"
    counters = ray.remote(num_cpus=0)(Counters).options(name=name, namespace=NAMESPACE).remote()
    serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
    dep = serve.deployment(UpscaleReplica, name="upscaler").options(
        num_replicas=opts.replicas,
        max_ongoing_requests=opts.max_concurrent,
        max_queued_requests=opts.max_queue,
        graceful_shutdown_timeout_s=opts.drain_seconds,
        health_check_period_s=10.0,
        ray_actor_options={"num_cpus": opts.cpus_per_replica},
        logging_config={"log_level": "WARNING", "enable_access_log": False},
    )
    handle = serve.run(dep.bind(ReplicaConfig(opts, name)), name=APP, route_prefix=None)
    return handle, counters


def _listen_socket(host: str, port: int) -> socket.socket:
    """The bound (not yet listening) socket; a port in use is one line here, before Ray starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DeltaDiffError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port/--host"
        ) from None
    return sock


def serve_forever(opts: ServeOptions, on_ready: Callable[[str], None]) -> int:
    """Run until SIGINT / SIGTERM, drain, stop. ``on_ready(url)`` once requests are served."""
    check_options(opts)  # a bad option or model is one line, with or without the extra
    uvicorn = require("uvicorn", "serve")
    require("starlette", "serve")
    sock = _listen_socket(opts.host, opts.port)
    host, port = sock.getsockname()[:2]
    stop = threading.Event()
    server: Any = None
    front: Front | None = None

    def on_signal(signum: int, frame: object) -> None:
        stop.set()
        if front is not None:
            front.draining = True
        if server is not None:
            server.force_exit = server.should_exit and signum == signal.SIGINT
            server.should_exit = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ray_cluster(opts) as ray:
            for s in old:  # ray.init installs its own SIGTERM handler (a stack dump): ours again
                signal.signal(s, on_signal)
            if stop.is_set():
                return 0
            handle, counters = deploy(opts, ray)
            front = Front(opts, handle, counters)
            config = uvicorn.Config(
                front.app,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=opts.drain_seconds,  # type: ignore[arg-type]
            )
            server = uvicorn.Server(config)
            t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
            t.start()
            while not server.started and t.is_alive():
                time.sleep(0.05)
            if not server.started:
                raise DeltaDiffError(f"the HTTP server did not start on {host}:{port}")
            if stop.is_set():
                server.should_exit = True
            else:
                on_ready(f"http://{host if ':' not in host else f'[{host}]'}:{port}")
            while t.is_alive():
                t.join(0.5)
        return 0
    finally:
        sock.close()
        for s, h in old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class Reply:
    """One answer of ``POST /v1/upscale``: the HTTP status and the body (PNG or a reason)."""

    status: int
    body: bytes
    seconds: float

    @property
    def reason(self) -> str:
        return "" if self.status == 200 else self.body.decode("utf-8", "replace").strip()


def upscale_http(
    url: str,
    data: bytes,
    *,
    seed: int | None = None,
    timeout: float | None = None,
    client_timeout: float = 900.0,
) -> Reply:
    """Send one image file to ``dd-run serve`` at ``url`` (``http://host:port``)."""
    q = {k: v for k, v in (("seed", seed), ("timeout", timeout)) if v is not None}
    target = f"{url.rstrip('/')}/v1/upscale" + (f"?{urllib.parse.urlencode(q)}" if q else "")
    req = urllib.request.Request(
        target, data=data, method="POST", headers={"Content-Type": "application/octet-stream"}
    )
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=client_timeout) as r:
            return Reply(int(r.status), r.read(), time.perf_counter() - t0)
    except urllib.error.HTTPError as e:
        return Reply(int(e.code), e.read(), time.perf_counter() - t0)


def get_json(url: str, path: str, timeout: float = 10.0) -> Any:
    """``GET url+path`` as JSON (``/v1/stats``)."""
    with urllib.request.urlopen(f"{url.rstrip('/')}{path}", timeout=timeout) as r:
        return json.loads(r.read())
