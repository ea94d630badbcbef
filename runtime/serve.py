"""Serving the lean runtime behind Triton (``dd-run serve``) and the pieces its Python models share.

``dd-run serve`` runs the Triton server that ships inside ``nvidia-pytriton`` (its binary, its
Python backend and the stub for this interpreter) on a one-model repository: the ``deltadiff``
Python-backend model (``runtime/triton_models/deltadiff.py``), which builds one ``Upscaler`` per
instance and answers KServe v2 requests over HTTP and gRPC. The same model source is the
``deltadiff`` model of the repositories ``dd-export triton`` writes, where it calls the stage
models (BLS) instead of a local backend.

Why not ``pytriton.Triton.bind``: PyTriton turns any exception of a bound function into HTTP 500
with a Python traceback and fails every request of the dynamic batch; a Python-backend model can
answer each request on its own, with ``INVALID_ARG`` (HTTP 400) and one line naming the problem.

What a request is: input ``image`` (BYTES, one encoded image file: PNG, JPEG, WebP, TIFF, BMP,
GIF), optional ``seed`` (INT64, the ``resshift-v3`` noise seed, default 0); output ``upscaled``
(BYTES, a PNG exactly as ``dd-run upscale`` writes it: 8 or 16-bit, alpha and ICC kept).
Triton's dynamic batcher hands the model several requests at once; their images are upscaled in
threads and every round of tile calls is merged into batched backend calls (``TileBatcher``),
so tiles of concurrent requests share one backend call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from deltadiff._deps import require
from deltadiff.errors import DeltaDiffError, ImageError
from deltadiff.runtime.executor import Executor
from deltadiff.runtime.manifest import Manifest

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 32 << 20  # encoded request image
DEFAULT_MAX_PIXELS = 4 << 20  # LR pixels (2048 x 2048); the output has 16x as many
INPUT, SEED, OUTPUT = "image", "seed", "upscaled"


class RequestError(DeltaDiffError):
    """A request the server refuses (HTTP 400): not an image, too large, wrong shape."""


# --------------------------------------------------------------------------- tile batching


class TileBatcher:
    """An executor stand-in that merges the tile calls of images upscaled concurrently.

    ``map(fn, items)`` runs ``fn`` (which calls ``Upscaler.upscale``) on each item in its own
    thread. Whenever every running thread waits in ``run`` (one tile batch each), their tiles
    are concatenated and run through the real executor in chunks of at most ``max_batch``; each
    thread gets its own rows back. Per-tile results do not depend on the batch they ran in
    (ONNX Runtime CPU: verified bit for bit by the tests), so results equal one-image runs.
    """

    def __init__(self, inner: Executor, max_batch: int) -> None:
        self.inner = inner
        self.m = inner.m
        self.max_batch = max(1, max_batch)
        self._cv = threading.Condition()
        self._pending: list[dict[str, Any]] = []
        self._active = 0
        self._map_lock = threading.Lock()
        self.calls: list[int] = []  # tiles per backend call (for tests and stats)

    def run(self, lr: np.ndarray, noise: dict[str, np.ndarray] | None = None) -> np.ndarray:
        if self._active == 0:  # not inside map(): plain call
            return self._run_merged([{"lr": lr, "noise": noise}])[0]
        slot: dict[str, Any] = {"lr": lr, "noise": noise, "done": False}
        with self._cv:
            self._pending.append(slot)
            self._cv.notify_all()
            self._cv.wait_for(lambda: slot["done"])
        if "error" in slot:
            raise slot["error"]
        return slot["out"]

    def _run_merged(self, slots: list[dict[str, Any]]) -> list[np.ndarray]:
        lr = np.concatenate([s["lr"] for s in slots])
        names = [k for k in (slots[0]["noise"] or {})]
        noise = {k: np.concatenate([s["noise"][k] for s in slots]) for k in names}
        lo = self.m.batch[0]
        outs = []
        for b0 in range(0, len(lr), self.max_batch):
            chunk = lr[b0 : b0 + self.max_batch]
            n = len(chunk)
            feeds = {k: v[b0 : b0 + n] for k, v in noise.items()}
            if n < lo:  # static-batch models: pad with copies, drop them after
                chunk = np.concatenate([chunk] + [chunk[-1:]] * (lo - n))
                feeds = {k: np.concatenate([v] + [v[-1:]] * (lo - n)) for k, v in feeds.items()}
            self.calls.append(n)
            outs.append(self.inner.run(chunk, feeds or None)[:n])
        out = np.concatenate(outs)
        res, i = [], 0
        for s in slots:
            k = len(s["lr"])
            res.append(out[i : i + k])
            i += k
        return res

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[fn(item) or the exception it raised]`` with tile calls merged across items."""
        with self._map_lock:
            results: list[Any] = [None] * len(items)

            def work(i: int) -> None:
                try:
                    results[i] = fn(items[i])
                except Exception as exc:  # returned to the caller, per item
                    results[i] = exc
                finally:
                    with self._cv:
                        self._active -= 1
                        self._cv.notify_all()

            with self._cv:
                self._active = len(items)
            threads = [
                threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(items))
            ]
            for t in threads:
                t.start()
            while True:
                with self._cv:
                    self._cv.wait_for(
                        lambda: self._active == 0 or len(self._pending) == self._active
                    )
                    if self._active == 0 and not self._pending:
                        break
                    slots, self._pending = self._pending, []
                try:
                    outs = self._run_merged(slots)
                    for s, o in zip(slots, outs, strict=True):
                        s["out"] = o
                except Exception as exc:
                    for s in slots:
                        s["error"] = exc
                with self._cv:
                    for s in slots:
                        s["done"] = True
                    self._cv.notify_all()
            for t in threads:
                t.join()
            return results


# --------------------------------------------------------------------------- stage models (BLS)

InferFn = Callable[[str, dict[str, np.ndarray], list[str]], dict[str, np.ndarray]]


class StageModels:
    """A runtime backend whose graphs are Triton models, called through ``infer`` (BLS).

    The runtime's ``Executor`` drives it: the step table, the row constants and the noise come
    from the manifest exactly as for a local backend.
    """

    name = "triton-bls"

    def __init__(
        self, m: Manifest, precision: str, infer: InferFn, models: dict[str, str] | None = None
    ) -> None:
        self.m, self.precision, self.infer = m, precision, infer
        self.models = models or {}

    def input_names(self, graph: str) -> list[str]:
        return [s.name for s in self.m.graph(graph, self.precision).inputs]

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rec = self.m.graph(graph, self.precision)
        ins = {s.name: feeds[s.name] for s in rec.inputs if s.name in feeds}
        return self.infer(self.models.get(graph, graph), ins, [s.name for s in rec.outputs])

    def close(self) -> None:
        pass

    def __enter__(self) -> StageModels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- the image service


@dataclass(frozen=True)
class Limits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


class ImageService:
    """Encoded image bytes in, PNG bytes out; a bad request is a ``RequestError`` (HTTP 400)."""

    def __init__(self, up: Any, limits: Limits | None = None, max_batch: int | None = None) -> None:
        self.up = up
        self.limits = limits or Limits()
        self.batcher = TileBatcher(up.executor, max_batch or up.m.batch[1])
        up.executor = self.batcher  # Upscaler.upscale now sends its tiles through the batcher
        self._tmp = Path(tempfile.mkdtemp(prefix="dd-serve-"))

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
        self.up.close()

    def handle(self, items: Sequence[tuple[Any, int]]) -> list[bytes | Exception]:
        """``items``: (encoded image, seed) per image; returns PNG bytes or the error, per item."""
        return self.batcher.map(self._one, items)

    def _one(self, item: tuple[Any, int]) -> bytes:
        data, seed = item
        if isinstance(data, np.ndarray):
            data = data.item() if data.size == 1 else None
        if isinstance(data, str):
            data = data.encode("latin-1")
        if not isinstance(data, bytes):
            raise RequestError(
                f"input {INPUT!r} must hold one encoded image file (BYTES, shape [1]) per request"
            )
        if len(data) > self.limits.max_bytes:
            raise RequestError(
                f"image is too large: {len(data)} bytes, the server's limit is "
                f"{self.limits.max_bytes} (dd-run serve --max-bytes)"
            )
        dst = Path(tempfile.mkdtemp(dir=self._tmp)) / "upscaled.png"
        up = self.up if seed == self.up.opts.seed else _SeededView(self.up, seed)
        try:
            upscale_bytes(
                up, data, dst, name="image", workdir=self._tmp, max_pixels=self.limits.max_pixels
            )
            return dst.read_bytes()
        except ImageError as exc:
            raise RequestError(str(exc)) from None
        finally:
            shutil.rmtree(dst.parent, ignore_errors=True)


def upscale_bytes(
    up: Any,
    data: bytes,
    dst: Path,
    *,
    name: str,
    workdir: Path | None = None,
    max_pixels: int | None = None,
) -> None:
    """Upscale an encoded image file held in memory and write ``dst`` atomically, exactly as
    ``dd-run upscale`` does for a file (same decoder, checks and writer). Errors name ``name``."""
    from PIL import Image

    from deltadiff.runtime.upscaler import upscale_file

    work = Path(tempfile.mkdtemp(prefix="dd-in-", dir=workdir))
    src = work / "input"
    try:
        src.write_bytes(data)
        if max_pixels:
            w = h = 0
            with contextlib.suppress(Exception), Image.open(src) as im:  # header only
                w, h = im.size
            if w * h > max_pixels:
                raise RequestError(
                    f"image is too large: {w}x{h} = {w * h} pixels, the server's limit is "
                    f"{max_pixels} (dd-run serve --max-pixels)"
                )
        try:
            upscale_file(up, src, dst)
        except ImageError as exc:
            raise ImageError(str(exc).replace(str(src), name)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _SeededView:
    """The service's Upscaler with another noise seed for one request (``resshift-v3``)."""

    def __init__(self, up: Any, seed: int) -> None:
        self._up, self._seed, self.m = up, seed, up.m

    def upscale(self, rgb: np.ndarray, **kw: Any) -> np.ndarray:
        return self._up.upscale(rgb, seed=self._seed, **kw)


def build_service(params: dict[str, str], version_dir: Path, infer: InferFn | None) -> ImageService:
    """The ``deltadiff`` Triton model's service, from its config parameters.

    ``stages=local``: the lean runtime in this process on ``model_dir`` (``dd-run serve``).
    ``stages=bls``: the stage models of the repository, called through ``infer``; the manifest
    beside the model file supplies the step table, tile and noise names.
    """
    from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler

    stages = params.get("stages", "local")
    limits = Limits(
        int(params.get("max_bytes", DEFAULT_MAX_BYTES)),
        int(params.get("max_pixels", DEFAULT_MAX_PIXELS)),
    )
    opts = UpscaleOptions(
        backend=params.get("backend", "onnxruntime") if stages == "local" else "onnxruntime",
        precision=params.get("precision", "fp32"),
        mode=params.get("mode", "staged"),
        threads=int(params.get("threads", 0)),
        overlap=int(params["overlap"]) if params.get("overlap") else None,
    )
    if stages == "local":
        up = Upscaler(params.get("model_dir") or None, opts)
    elif stages == "bls":
        if infer is None:
            raise DeltaDiffError("stages=bls needs a Triton BLS infer function")
        up = Upscaler(version_dir, opts)  # lazy backend: no graph is loaded here
        models = {
            g: params.get(f"model_{g}", g) for g in ("encoder", "step", "decoder", "unrolled")
        }
        up.executor = Executor(
            up.m, StageModels(up.m, opts.precision, infer, models), mode=opts.mode
        )
    else:
        raise DeltaDiffError(f"parameter stages={stages!r}: choose local or bls")
    max_batch = int(params["max_tile_batch"]) if params.get("max_tile_batch") else None
    return ImageService(up, limits, max_batch)


# --------------------------------------------------------------------------- Triton server


def model_source(name: str) -> str:
    """Text of a Triton Python-backend model shipped in ``runtime/triton_models``."""
    return (resources.files("deltadiff.runtime") / "triton_models" / f"{name}.py").read_text(
        encoding="utf-8"
    )


def _die_with_parent() -> None:
    """In the server's child process: SIGTERM it when the process that started it dies."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class TritonServer:
    """The Triton server bundled in ``nvidia-pytriton`` (Python backend only) on a repository.

    Listens on ``host`` (127.0.0.1 by default) for HTTP and gRPC; metrics are off. ``stop()``
    sends SIGTERM and waits (Triton drains in-flight requests up to ``exit_timeout`` seconds),
    then kills what is left. Logs go to ``log_path``.
    """

    def __init__(
        self,
        repo: Path,
        *,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        exit_timeout: int = 5,
        log_verbose: int = 0,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.repo = Path(repo)
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.exit_timeout = exit_timeout
        self.log_verbose = log_verbose
        self._work = Path(tempfile.mkdtemp(prefix="dd-triton-"))
        self.log_path = log_path or self._work / "tritonserver.log"
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def _backends(self) -> tuple[Path, Path, Path]:
        """(server binary, backend directory holding the stub for this Python, libs dir)."""
        require("pytriton", "serve")
        from pytriton.utils.distribution import get_libs_path, get_root_module_path, get_stub_path

        dist = Path(get_root_module_path()) / "tritonserver"
        backends = self._work / "backends" / "python"
        backends.mkdir(parents=True)
        for f in (dist / "backends" / "python").iterdir():
            if f.is_file():
                (backends / f.name).symlink_to(f)
        stub = Path(get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"))
        if not stub.exists():
            raise DeltaDiffError(
                f"nvidia-pytriton has no Python-backend stub for Python "
                f"{sys.version_info[0]}.{sys.version_info[1]} ({stub}); use Python 3.10-3.13"
            )
        shutil.copy(stub, backends / "triton_python_backend_stub")
        return dist / "bin" / "tritonserver", backends.parent, Path(get_libs_path())

    def env(self, libs: Path) -> dict[str, str]:
        env = dict(os.environ)
        # The stub links libpython: on a non-system interpreter (pyenv) it must find *this*
        # interpreter's library, else it mixes libpython and stdlib versions.
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        paths = [p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH", "")) if p]
        env["LD_LIBRARY_PATH"] = ":".join(paths)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 120.0) -> TritonServer:
        binary, backends, libs = self._backends()
        cmd = [
            str(binary),
            f"--model-repository={self.repo}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=false",
            f"--exit-timeout-secs={self.exit_timeout}",
            f"--log-verbose={self.log_verbose}",
            "--strict-readiness=true",
        ]
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env(libs),
            start_new_session=True,  # Ctrl-C goes to us; we stop the server in order
            preexec_fn=_die_with_parent,
        )
        try:
            self.wait_ready(timeout)
        except BaseException:  # Ctrl-C while starting: no server left behind
            self.stop()
            raise
        return self

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.url}{path}", timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return 0

    def ready(self) -> bool:
        return self._get("/v2/health/ready") == 200

    def wait_ready(self, timeout: float) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc is None or self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise DeltaDiffError(f"the Triton server exited while starting: {tail}")
            if self.ready():
                return
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise DeltaDiffError(f"the Triton server was not ready after {timeout:.0f} s: {tail}")

    def log_tail(self, n: int = 3) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        errs = [ln for ln in lines if ln.startswith("E") or "error" in ln.lower()]
        return " | ".join((errs or lines)[-n:]) + f" (log: {self.log_path})"

    def stop(self) -> int | None:
        """SIGTERM, wait for the drain, then SIGKILL the process group. Returns the exit code."""
        p, self.proc = self.proc, None
        code = None
        if p is not None:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    code = p.wait(self.exit_timeout + 15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    code = p.wait(10)
            else:
                code = p.returncode
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)  # stubs left behind, if any
        if getattr(self, "_log", None):
            self._log.close()
        return code

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# --------------------------------------------------------------------------- dd-run serve


@dataclass(frozen=True)
class ServeOptions:
    model: Path | None = None
    backend: str = "onnxruntime"
    precision: str = "fp32"
    mode: str = "staged"
    threads: int = 0
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int | None = None  # default port + 1
    instances: int = 1
    max_batch: int = 8  # requests per dynamic batch
    queue_delay_us: int = 5000
    max_tile_batch: int | None = None  # tiles per backend call (default: the model's max)
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


def model_config(
    name: str,
    *,
    params: dict[str, Any],
    max_batch: int,
    queue_delay_us: int,
    instances: int,
    kind: str = "KIND_CPU",
) -> str:
    """``config.pbtxt`` of the ``deltadiff`` Python model (serve and repositories)."""
    ps = "\n".join(
        f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }},'
        for k, v in params.items()
        if v is not None
    ).rstrip(",")
    return f"""name: "{name}"
backend: "python"
max_batch_size: {max_batch}
input [
  {{ name: "{INPUT}" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "{SEED}" data_type: TYPE_INT64 dims: [ 1 ] optional: true }}
]
output [
  {{ name: "{OUTPUT}" data_type: TYPE_STRING dims: [ 1 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}
instance_group [ {{ count: {instances} kind: {kind} }} ]
parameters [
{ps}
]
"""


def write_serve_repo(repo: Path, opts: ServeOptions) -> Path:
    """A one-model repository: ``deltadiff`` running the lean runtime in-process."""
    from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler, default_model_dir

    model_dir = Path(opts.model or default_model_dir()).resolve()
    # Fail here, in the CLI, on a bad model / option rather than inside the server.
    Upscaler(
        model_dir,
        UpscaleOptions(backend="onnxruntime", precision=opts.precision, mode=opts.mode),
    ).close()
    d = repo / "deltadiff"
    (d / "1").mkdir(parents=True, exist_ok=True)
    (d / "1" / "model.py").write_text(model_source("deltadiff"), encoding="utf-8")
    params = {
        "stages": "local",
        "model_dir": str(model_dir),
        "backend": opts.backend,
        "precision": opts.precision,
        "mode": opts.mode,
        "threads": opts.threads,
        "max_bytes": opts.max_bytes,
        "max_pixels": opts.max_pixels,
        "max_tile_batch": opts.max_tile_batch,
    }
    (d / "config.pbtxt").write_text(
        model_config(
            "deltadiff",
            params=params,
            max_batch=opts.max_batch,
            queue_delay_us=opts.queue_delay_us,
            instances=opts.instances,
        ),
        encoding="utf-8",
    )
    return repo


@contextlib.contextmanager
def serving(opts: ServeOptions, *, log_path: Path | None = None) -> Iterator[TritonServer]:
    """Start ``dd-run serve``'s server, yield it ready, stop it on exit."""
    repo = Path(tempfile.mkdtemp(prefix="dd-serve-repo-"))
    try:
        write_serve_repo(repo, opts)
        srv = TritonServer(
            repo,
            host=opts.host,
            http_port=opts.port,
            grpc_port=opts.grpc_port or (opts.port + 1 if opts.port else 0),
            log_path=log_path,
        )
        with srv:
            yield srv
    finally:
        shutil.rmtree(repo, ignore_errors=True)


def serve_forever(opts: ServeOptions, on_ready: Callable[[TritonServer], None]) -> int:
    """Run until SIGINT / SIGTERM, then stop the server cleanly. Returns the exit code."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with serving(opts) as srv:
            on_ready(srv)
            while not stop.wait(0.5):
                if srv.proc is None or srv.proc.poll() is not None:
                    raise DeltaDiffError(f"the Triton server stopped: {srv.log_tail()}")
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- client helpers


def encode_request(data: bytes, seed: int | None = None) -> list[Any]:
    """tritonclient HTTP inputs for one image file."""
    http = require("tritonclient.http", "serve")
    i = http.InferInput(INPUT, [1, 1], "BYTES")
    i.set_data_from_numpy(np.array([[data]], dtype=object))
    ins = [i]
    if seed is not None:
        s = http.InferInput(SEED, [1, 1], "INT64")
        s.set_data_from_numpy(np.array([[seed]], dtype=np.int64))
        ins.append(s)
    return ins


def upscale_remote(client: Any, data: bytes, *, model: str = "deltadiff") -> bytes:
    """Send one image file to a server, return the upscaled PNG bytes."""
    res = client.infer(model, encode_request(data))
    out = res.as_numpy(OUTPUT)
    return bytes(out.reshape(-1)[0])
