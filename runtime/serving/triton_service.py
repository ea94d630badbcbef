"""The Triton side: the Python-backend model of ``dd-export triton`` repositories, and a test harness.

``runtime/serving/triton_models/deltadiff.py`` (written into repositories as ``deltadiff/1/model.py``)
builds an ``ImageService`` with ``build_service``: one ``Upscaler`` per model instance whose
executor calls the repository's stage models through BLS (``stages=bls``) or a local backend
(``stages=local``). Triton's dynamic batcher hands the model several requests at once; their
images are upscaled in threads and each round of tile calls goes through ``TileBatcher``, which
merges only tiles of one shape into a backend call, no more of them than the memory budget
holds.

``TritonServer`` runs the Triton server bundled in ``nvidia-pytriton`` on a repository. It is a
test harness for the python variant of ``dd-export triton`` (tests/test_triton_repo.py; CI
installs ``nvidia-pytriton`` for it), not the product server: ``dd-run serve`` runs on Ray Serve
(``runtime/serving/serve.py``, docs/serving.md).

What a request is: input ``image`` (BYTES, one encoded image file), optional ``seed`` (INT64);
output ``upscaled`` (BYTES, a PNG exactly as ``dd-run upscale`` writes it).
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from deltadiff._deps import require
from deltadiff.errors import DeltaDiffError, MissingDependencyError
from deltadiff.manifest import Manifest
from deltadiff.runtime.executor import Executor
from deltadiff.runtime.memory_budget import default_budget, peak_bytes
from deltadiff.runtime.serving.image_request import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    RequestError,
    upscale_request,
)

INPUT, SEED, OUTPUT = "image", "seed", "upscaled"


# --------------------------------------------------------------------------- tile batching


class TileBatcher:
    """An executor stand-in that merges the tile calls of images upscaled concurrently.

    ``map(fn, items)`` runs ``fn`` (which calls ``Upscaler.upscale``) on each item in its own
    thread. Whenever every running thread waits in ``run`` (one tile batch each), the waiting
    tile batches are grouped by shape (tile size, noise shapes, dtype): only tiles of one shape
    share a backend call, so images of different sizes that a dynamic model runs whole each run
    alone. A group runs through the real executor in calls of at most ``tiles_per_call(shape)``
    tiles (``max_batch``, lowered by the caller to what the memory budget holds for that tile
    size); each thread gets its own rows back. Per-tile results do not depend on the batch they
    ran in (ONNX Runtime CPU: verified bit for bit by the tests), so results equal one-image runs.
    """

    def __init__(
        self,
        inner: Executor,
        max_batch: int,
        tiles_per_call: Callable[[tuple[int, int]], int] | None = None,
    ) -> None:
        self.inner = inner
        self.m = inner.m
        self.max_batch = max(1, max_batch)
        self.tiles_per_call = tiles_per_call
        self._cv = threading.Condition()
        self._pending: list[dict[str, Any]] = []
        self._active = 0
        self._map_lock = threading.Lock()
        self.calls: list[int] = []  # tiles per backend call (for tests and stats)
        self.call_shapes: list[tuple[int, ...]] = []  # (h, w) of each call's tiles

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
        """Each slot's rows; slots of one shape share calls, other shapes run separately."""
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(slots):
            groups.setdefault(_shape_key(s), []).append(i)
        res: list[np.ndarray] = [np.empty(0)] * len(slots)
        for idx in groups.values():
            for i, out in zip(idx, self._run_group([slots[i] for i in idx]), strict=True):
                res[i] = out
        return res

    def _run_group(self, slots: list[dict[str, Any]]) -> list[np.ndarray]:
        lr = np.concatenate([s["lr"] for s in slots])
        names = [k for k in (slots[0]["noise"] or {})]
        noise = {k: np.concatenate([s["noise"][k] for s in slots]) for k in names}
        hw = (int(lr.shape[2]), int(lr.shape[3]))
        per = self.max_batch
        if self.tiles_per_call is not None:
            per = max(1, min(per, self.tiles_per_call(hw)))
        lo = self.m.batch[0]
        outs = []
        for b0 in range(0, len(lr), per):
            chunk = lr[b0 : b0 + per]
            n = len(chunk)
            feeds = {k: v[b0 : b0 + n] for k, v in noise.items()}
            if n < lo:  # static-batch models: pad with copies, drop them after
                chunk = np.concatenate([chunk] + [chunk[-1:]] * (lo - n))
                feeds = {k: np.concatenate([v] + [v[-1:]] * (lo - n)) for k, v in feeds.items()}
            self.calls.append(n)
            self.call_shapes.append(hw)
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


def _shape_key(slot: dict[str, Any]) -> tuple:
    """What must be equal for two tile batches to share one backend call."""
    lr = slot["lr"]
    noise = slot["noise"] or {}
    return (
        tuple(lr.shape[1:]),
        lr.dtype.str,
        tuple(sorted((k, tuple(v.shape[1:]), v.dtype.str) for k, v in noise.items())),
    )


def budget_tiles(up: Any, max_batch: int) -> Callable[[tuple[int, int]], int] | None:
    """Tiles of an LR size that one backend call may hold within the memory budget.

    From the manifest's measured peak-RSS record for the Upscaler's backend / precision / mode
    (the record ``Upscaler`` sizes one image's tile with); None where there is none (TensorRT:
    the engines' profiles bound the batch; static models: their exported batch range). The
    budget is the Upscaler's (``--max-memory``, default half of MemAvailable), so a merged call
    of several images' tiles costs no more than one image's call is allowed to.
    """
    rec = up.m.memory.get(up.opts.memory_key()) if up.max_lr_px is not None else None
    if rec is None:
        return None
    budget = int(up.opts.max_memory * (1 << 30)) if up.opts.max_memory else default_budget()
    s2 = up.m.scale * up.m.scale

    def per_call(hw: tuple[int, int]) -> int:
        n = 1
        while n < max_batch and peak_bytes(rec, hw[0] * hw[1] * s2, n + 1) <= budget:
            n += 1
        return n

    return per_call


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
        mb = max_batch or up.m.batch[1]
        self.batcher = TileBatcher(up.executor, mb, budget_tiles(up, mb))
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
                f"{self.limits.max_bytes} (parameter max_bytes)"
            )
        return upscale_request(
            self.up, data, seed, workdir=self._tmp, max_pixels=self.limits.max_pixels
        )


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
        # the stages are other Triton models: this folder holds the manifest, no graph
        up = Upscaler(version_dir, opts, check_graphs=False)
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
    """Text of a Triton Python-backend model shipped in ``runtime/serving/triton_models``."""
    return (
        resources.files("deltadiff.runtime.serving") / "triton_models" / f"{name}.py"
    ).read_text(encoding="utf-8")


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
        try:
            require("pytriton")
        except MissingDependencyError:
            raise MissingDependencyError(
                "nvidia-pytriton is not installed; install it with: pip install "
                "nvidia-pytriton==0.7.0 (a test harness for dd-export triton repositories; "
                "dd-run serve does not use it)"
            ) from None
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
