"""``dd-run batch``: the upscale job on a Ray cluster (Ray Data), one ``Upscaler`` per actor.

The driver lists the images (``find_images``, as ``dd-run upscale`` does), drops the ones whose
output already exists (resume), and hands the rest to ``ray.data.read_binary_files``: files are
read as bytes and decoded inside the actors, never by ``read_images`` (one corrupt file aborts a
``read_images`` job and outputs lose their names). Each actor builds the runtime once, and per
file decodes, upscales and writes the output atomically under its own name, returning a status
row; a failing file is a ``failed`` row, never an aborted job. The rows are the job manifest
(JSONL, one row per file): each row is appended and fsynced as the driver receives it (a killed
driver loses no finished record), and the whole file is rewritten atomically in input order at
the end. The output folder is not read as input when it lies inside an input folder.

GPU actors ask for ``num_gpus`` *and* ``num_cpus`` (``num_gpus`` alone also takes a CPU and can
starve the read tasks). Asking for GPUs on a cluster without them fails at once, instead of
waiting for Ray Data's no-progress timeout. Local mode starts a cluster bound to 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deltadiff.atomic import write_text_atomic
from deltadiff.errors import DeltaDiffError
from deltadiff.runtime.faults import unexpected_failure
from deltadiff.runtime.serving.ray_cluster import import_ray, start_local_cluster

log = logging.getLogger(__name__)

JOB_MANIFEST = "dd-job.jsonl"


@dataclass(frozen=True)
class RayJobOptions:
    address: str | None = None  # None: start a local cluster on 127.0.0.1
    actors: int = 1
    num_cpus: float = 1.0  # per actor (also the actor's onnxruntime threads)
    num_gpus: float = 0.0  # per actor
    batch_size: int = 1  # files per actor call
    local_cpus: int | None = None  # CPUs of a local cluster (default: Ray's count)
    local_gpus: int | None = None  # GPUs a local cluster declares (CI: a fake GPU)
    manifest: Path | None = None  # default: OUT/dd-job.jsonl
    overwrite: bool = False
    suffix: str | None = None
    recursive: bool = True


@dataclass
class RayJobResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    manifest: Path | None = None
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0


def connect(opts: RayJobOptions) -> bool:
    """Connect to (or start) the cluster; True if this call started it (caller shuts it down)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if opts.address:
        ray.init(address=opts.address, **kw)
    else:
        start_local_cluster(ray, num_cpus=opts.local_cpus, num_gpus=opts.local_gpus, **kw)
    return True


def check_resources(opts: RayJobOptions) -> None:
    """Fail at once when the cluster cannot place one actor (Ray would wait ~30 min)."""
    ray = import_ray()
    res = ray.cluster_resources()
    if opts.num_gpus > 0 and res.get("GPU", 0) < opts.num_gpus:
        raise DeltaDiffError(
            f"--gpus-per-actor {opts.num_gpus}: the Ray cluster has {res.get('GPU', 0):g} GPUs "
            f"({', '.join(f'{k} {v:g}' for k, v in sorted(res.items()) if '/' not in k and ':' not in k)}); "
            "run on a cluster with GPUs or drop --gpus-per-actor"
        )
    for what, per, have in (
        ("cpu", opts.num_cpus, res.get("CPU", 0)),
        ("gpu", opts.num_gpus, res.get("GPU", 0)),
    ):
        if per * opts.actors > have:
            raise DeltaDiffError(
                f"--actors {opts.actors} x --{what}s-per-actor {per:g} needs {per * opts.actors:g} "
                f"{what.upper()}s; the Ray cluster has {have:g}: use fewer actors or less per actor"
            )


class UpscaleActor:
    """One Upscaler per actor for the whole job; per file a status row, never an exception."""

    def __init__(self, model_dir: str | None, upscale_opts: dict, outputs: dict[str, str]) -> None:
        from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler

        self.outputs = outputs
        self.up = Upscaler(model_dir, UpscaleOptions(**upscale_opts))
        self.tmp = Path(tempfile.mkdtemp(prefix="dd-ray-"))
        self.actor = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from deltadiff.runtime.serving.serve import upscale_bytes

        out: dict[str, list] = {
            k: [] for k in ("path", "output", "status", "message", "seconds", "actor", "gpus")
        }
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        for data, path in zip(batch["bytes"], batch["path"], strict=True):
            t0 = time.perf_counter()
            dst = self.outputs.get(path) or self.outputs.get(_norm(path), "")
            status, message = "done", ""
            try:
                if not dst:
                    raise DeltaDiffError(f"{path}: no output planned for this file")
                Path(dst).parent.mkdir(parents=True, exist_ok=True)
                upscale_bytes(self.up, bytes(data), Path(dst), name=path, workdir=self.tmp)
            except DeltaDiffError as exc:
                status, message = "failed", str(exc)
            except OSError as exc:
                status, message = "failed", f"{path}: {exc.strerror or exc}"
            except Exception as exc:  # noqa: BLE001 - a file never aborts the job
                status, message = "failed", unexpected_failure(path, exc)
            out["path"].append(path)
            out["output"].append(dst)
            out["status"].append(status)
            out["message"].append(message)
            out["seconds"].append(round(time.perf_counter() - t0, 4))
            out["actor"].append(self.actor)
            out["gpus"].append(gpus)
        return out


def _norm(path: str) -> str:
    return str(Path(path.removeprefix("local://")).resolve())


def run_ray_job(
    inputs: Sequence[str | Path],
    out: Path,
    *,
    model: Path | None = None,
    upscale_opts: Any = None,
    opts: RayJobOptions | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> RayJobResult:
    """Upscale every image under ``inputs`` into ``out`` on Ray; returns the manifest rows."""
    from deltadiff.runtime.upscaler import UpscaleOptions, Upscaler, plan_outputs

    opts = opts or RayJobOptions()
    uo = upscale_opts or UpscaleOptions()
    if opts.actors < 1:
        raise DeltaDiffError(f"--actors {opts.actors}: need at least 1")
    if not uo.threads:
        uo = UpscaleOptions(**{**asdict(uo), "threads": max(1, int(opts.num_cpus))})
    model_dir = str(Path(model).resolve()) if model else None
    Upscaler(model_dir, UpscaleOptions(**{**asdict(uo), "backend": "onnxruntime"})).close()
    out = Path(out)
    manifest = Path(opts.manifest) if opts.manifest else out / JOB_MANIFEST
    t0 = time.perf_counter()
    pairs = plan_outputs(inputs, out, recursive=opts.recursive, suffix=opts.suffix)
    if not pairs:
        raise DeltaDiffError(f"no images found in {', '.join(map(str, inputs))}")
    early: list[dict[str, Any]] = []
    todo: dict[str, str] = {}
    seen: dict[Path, Path] = {}
    for src, dst in pairs:
        row = {"path": _norm(str(src)), "output": str(dst), "message": "", "seconds": 0.0}
        if dst.resolve() == src.resolve():
            row |= {"status": "failed", "message": f"{dst}: output would replace its input"}
        elif dst in seen:
            row |= {"status": "failed", "message": f"{dst}: also the output of {seen[dst]}"}
        elif dst.exists() and not opts.overwrite:
            row |= {"status": "skipped", "message": "output exists (resume)"}
        elif not os.access(src, os.R_OK):
            row |= {"status": "failed", "message": f"{src}: permission denied"}
        else:
            todo[_norm(str(src))] = str(dst)
            seen[dst] = src
            continue
        seen.setdefault(dst, src)
        early.append(row)
    started = connect(opts) if todo else False
    try:
        if todo:
            check_resources(opts)
        out.mkdir(parents=True, exist_ok=True)
        with _RowLog(manifest, on_row) as rowlog:
            for row in early:
                rowlog.add(row)
            if todo:
                _run(todo, model_dir, asdict(uo), opts, rowlog.add)
    finally:
        if started:
            import_ray().shutdown()
    rows = rowlog.rows
    order = {_norm(str(s)): i for i, (s, _) in enumerate(pairs)}
    rows.sort(key=lambda r: order.get(r["path"], len(order)))
    write_text_atomic(manifest, "".join(json.dumps(r) + "\n" for r in rows))  # in input order
    return RayJobResult(rows, manifest, time.perf_counter() - t0)


class _RowLog:
    """The job manifest as it grows: each row is appended, flushed and fsynced as the driver
    receives it, so a killed driver keeps the record of every file finished before; at the end
    the caller rewrites it atomically in input order."""

    def __init__(self, path: Path, on_row: Callable[[dict[str, Any]], None] | None) -> None:
        self.path, self.on_row = path, on_row
        self.rows: list[dict[str, Any]] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("w", encoding="utf-8")

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        if self.on_row:
            self.on_row(row)

    def __enter__(self) -> _RowLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _run(
    todo: dict[str, str],
    model_dir: str | None,
    upscale_opts: dict,
    opts: RayJobOptions,
    on_row: Callable[[dict[str, Any]], None],
) -> None:
    """Run the actors over ``todo``; ``on_row`` gets each file's row as the driver receives it."""
    import_ray()
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Reading bytes takes no CPU slot: actors may hold every CPU of the cluster without
    # starving the read tasks (which would hang the job).
    ds = ray.data.read_binary_files(list(todo), include_paths=True, num_cpus=0)
    ds = ds.map_batches(
        UpscaleActor,
        fn_constructor_args=(model_dir, upscale_opts, todo),
        compute=ray.data.ActorPoolStrategy(size=opts.actors),
        batch_size=opts.batch_size,
        num_cpus=opts.num_cpus,
        num_gpus=opts.num_gpus or None,
    )
    for r in ds.iter_rows():
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
        row["path"] = _norm(row["path"])
        on_row(row)
