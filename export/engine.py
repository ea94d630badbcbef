"""ONNX -> TensorRT engines (strongly typed), an engine cache keyed on everything that matters,
and engine records in the manifest.

TensorRT 11 and TensorRT-RTX build strongly typed networks only: precision comes from the ONNX
tensor types (FP16 graphs from ``dd-export fp16``), not from builder flags. TensorRT 10 gets the
STRONGLY_TYPED creation flag. TensorRT-RTX builds ahead-of-time without a GPU for a list of
compute-capability targets; full TensorRT builds for the GPU it runs on.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import re
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from deltadiff.atomic import write_bytes_atomic
from deltadiff.errors import EngineError, ManifestError
from deltadiff.manifest import (
    Manifest,
    load_manifest,
    update_manifest,
    verify_file,
    verify_graph,
)
from deltadiff.runtime.trt_compat import (
    RTX_DEFAULT_TARGETS,
    current_device,
    import_trt,
    strongly_typed_flags,
    trt_logger,
)

log = logging.getLogger(__name__)
STAGED = ("encoder", "step", "decoder")


@dataclass(frozen=True)
class EngineOptions:
    precision: str = "fp16"
    flavour: str | None = None  # None: full TensorRT if importable, else TensorRT-RTX
    graphs: tuple[str, ...] = ("encoder", "step", "decoder", "unrolled")
    batch_opt: int = 1
    batch_max: int | None = None  # default: the manifest's max batch
    opt_level: int = 3
    workspace_gb: float = 4.0
    timing_cache: Path | None = None
    targets: tuple[str, ...] = ()  # TensorRT-RTX compute capabilities, e.g. ("sm86", "sm89")
    tf32: bool = False  # FP32 engines compute in FP32 unless asked (TRT defaults TF32 on)
    force: bool = False
    # dynamic models: optimization profiles as LR (min, opt, max) sizes; () = the manifest's
    # (lr_min, tile, lr_max). The first profile must hold the manifest tile (the runtime's size).
    profiles: tuple[tuple[tuple[int, int], tuple[int, int], tuple[int, int]], ...] = ()


Profile = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
_SPATIAL = re.compile(r"^(?:(\d+)\*)?([hw])$")  # dim labels of dynamic exports: "h", "16*w"


def _dim(d: int | str, b: int, lr: tuple[int, int] | None, mult: int) -> int:
    if isinstance(d, int):
        return d
    sp = _SPATIAL.match(d)
    if sp is None or lr is None:
        return b  # the batch axis
    k = int(sp.group(1) or 1)
    return k * (lr[0] if sp.group(2) == "h" else lr[1]) // mult


def _profile_shapes(
    spec: Any, lo: int, opt: int, hi: int, lr: Profile | None = None, mult: int = 1
) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) shapes of one input: batch from (lo, opt, hi), spatial axes from the LR
    profile ``lr`` (labels like ``16*h`` scale the LR size divided by the multiple)."""

    def dims(b: int, size: tuple[int, int] | None) -> tuple[int, ...]:
        return tuple(_dim(d, b, size, mult) for d in spec.shape)

    if lr is None:
        return dims(lo, None), dims(opt, None), dims(hi, None)
    return dims(lo, lr[0]), dims(opt, lr[1]), dims(hi, lr[2])


def engine_profiles(m: Manifest, opts: EngineOptions) -> list[Profile]:
    """The LR optimization profiles for a model (none for a static export)."""
    if not m.dynamic:
        if opts.profiles:
            raise EngineError(
                "--profile needs a dynamic model; re-export with dd-export onnx --dynamic"
            )
        return []
    profiles = list(opts.profiles) or [(m.lr_range()[0], m.tile, m.lr_range()[1])]
    for lo, opt, hi in profiles:
        for hw in (lo, opt, hi):
            if not m.accepts(*hw):
                raise EngineError(
                    f"--profile size {hw[0]}x{hw[1]}: the graphs accept {m.lr_range_text()}"
                )
    lo, _, hi = profiles[0]
    th, tw = m.tile
    if not (lo[0] <= th <= hi[0] and lo[1] <= tw <= hi[1]):
        raise EngineError(
            f"the first --profile must hold the manifest tile {th}x{tw} (the size the TensorRT "
            "runtime runs); reorder the profiles or re-export with another --tile"
        )
    return profiles


def cache_key(info: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()


def _parse(trt: Any, network: Any, path: Path, logger: Any) -> None:
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(path))
    if not ok:
        errs = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            node = e.node_name() if hasattr(e, "node_name") else str(e.node())
            errs.append(
                f"node {node!r} ({e.node_operator() if hasattr(e, 'node_operator') else '?'}): {e.desc()}"
            )
        raise EngineError(
            f"TensorRT cannot parse {path.name}: " + " | ".join(errs or ["unknown parser error"])
        )


def _set_targets(trt: Any, config: Any, targets: tuple[str, ...]) -> None:
    """TensorRT-RTX compute-capability targets; each one must be accepted (the setter's bool)."""
    known = sorted(
        (n.lower() for n in dir(trt.ComputeCapability) if n.startswith("SM")),
        key=lambda n: int(n[2:]) if n[2:].isdigit() else 0,
    )
    if any(t.lower() == "current" for t in targets) and len(targets) > 1:
        raise EngineError(
            f"--target current builds for this machine's GPU only; it cannot be combined with "
            f"{', '.join(t for t in targets if t.lower() != 'current')} (TensorRT-RTX rule)"
        )
    config.num_compute_capabilities = len(targets)
    for i, t in enumerate(targets):
        # "current": compile for the GPU of this machine (e.g. sm90, which is not an AOT target)
        name = "CURRENT" if t.lower() == "current" else t.upper()
        cc = getattr(trt.ComputeCapability, name, None)
        if cc is None:
            raise EngineError(
                f"--target {t}: TensorRT-RTX {trt.__version__} knows {', '.join(known)} and current"
            )
        if not config.set_compute_capability(cc, i):
            raise EngineError(
                f"--target {t}: TensorRT-RTX {trt.__version__} rejected this compute capability "
                f"(it builds for {', '.join(known)} and current, the GPU of this machine)"
            )


def build_engine(
    onnx_path: Path,
    *,
    inputs: tuple[Any, ...],
    opts: EngineOptions,
    batch: tuple[int, int, int],
    flavour: str,
    timing_cache: bytes | None = None,
    profiles: list[Profile] | None = None,
    multiple: int = 1,
) -> tuple[bytes, bytes | None]:
    """Parse + build one engine. Returns (serialized engine, serialized timing cache or None)."""
    trt, _ = import_trt(flavour)
    logger = trt_logger(flavour)
    builder = trt.Builder(logger)
    network = builder.create_network(strongly_typed_flags(trt))
    config = builder.create_builder_config()
    if network is None or config is None:
        raise EngineError(
            f"TensorRT could not start a build of {onnx_path.name} (see its errors above)"
        )
    _parse(trt, network, onnx_path, logger)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gb * (1 << 30)))
    config.builder_optimization_level = int(opts.opt_level)
    if not opts.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if flavour == "tensorrt_rtx" and hasattr(trt.BuilderFlag, "REQUIRE_USER_ALLOCATION"):
        config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)  # needed for CUDA stream capture
    if flavour == "tensorrt_rtx" and opts.targets:
        _set_targets(trt, config, opts.targets)
    cache = None
    if flavour != "tensorrt_rtx" and hasattr(config, "create_timing_cache"):  # no-ops in TRT-RTX
        cache = config.create_timing_cache(timing_cache or b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("timing cache rejected (other GPU/TensorRT?); starting a new one")
            cache = config.create_timing_cache(b"")
            if not config.set_timing_cache(cache, ignore_mismatch=True):
                log.warning("TensorRT rejected a new timing cache too; building without one")
                cache = None
    lo, opt, hi = batch
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    for i, lr in enumerate(profiles or [None]):
        profile = builder.create_optimization_profile()
        for spec in inputs:
            if spec.name not in names:
                continue
            mn, op, mx = _profile_shapes(spec, lo, opt, hi, lr, multiple)
            profile.set_shape(spec.name, mn, op, mx)  # returns None; checked when added
        if config.add_optimization_profile(profile) < 0:
            raise EngineError(
                f"{onnx_path.name}: TensorRT rejected optimization profile {i} ({lr or batch})"
            )
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(
            f"TensorRT failed to build {onnx_path.name} (see the TensorRT errors above)"
        )
    cache_bytes = bytes(cache.serialize()) if cache is not None else None
    return bytes(plan), cache_bytes


@dataclass
class _BuildRun:
    """What every engine of one ``build_engines`` call shares, checked before any build."""

    model_dir: Path
    flavour: str
    version: str
    dev: Any  # current_device(): None without a visible CUDA GPU
    build_targets: list[str]  # as handed to TensorRT-RTX ("current" kept)
    targets: list[str]  # as recorded: "current" becomes this GPU's sm
    batch_max: int
    timing_cache_path: Path
    timing_cache: bytes | None  # updated after each build that returns one
    profiles: list[Profile]
    int8_target: str | None  # "tensorrt" for INT8 (the TensorRT-style Q/DQ graphs), else None
    engines: list[dict[str, Any]]  # the manifest's engine records when the call started


@dataclass(frozen=True)
class _EngineJob:
    """One engine to build or reuse: its graph, what its cache key hashes, its file."""

    graph: str
    rec: Any  # the manifest's record of the graph
    info: dict[str, Any]  # the cache key's contents, and the start of the engine record
    key: str
    file: str
    old: dict[str, Any] | None  # the manifest's engine record of this (graph, precision, flavour)


@dataclass(frozen=True)
class _BuiltEngine:
    plan: bytes
    record: dict[str, Any]  # the engine record for the manifest


def build_engines(
    model_dir: str | Path, opts: EngineOptions
) -> tuple[Manifest, list[dict[str, Any]]]:
    """Build (or reuse) engines for the requested graphs; records go into the manifest.

    An engine is rebuilt only when its cache key changes: graph sha256, shapes/profile,
    precision, flavour + version, GPU (or RTX targets) and build options.
    """
    model_dir = Path(model_dir)
    m = load_manifest(model_dir)
    run = _start_build(model_dir, m, opts)
    built: list[dict[str, Any]] = []
    for g in _graph_names(m, opts, run.int8_target):
        job = _engine_job(m, opts, run, g)
        old = job.old
        if not opts.force and old and old.get("cache_key") == job.key and _intact(model_dir, old):
            log.info("%s is up to date (cache key %s…)", job.file, job.key[:12])
            built.append({**old, "reused": True})
            continue
        new = _build_job(m, opts, run, job)
        # after each engine: the manifest always vouches for the files. The engine file and its
        # record change together under the manifest lock, so a concurrent build-engine (or any
        # other manifest writer) neither loses this record nor records another run's file.
        path = model_dir / job.file
        m = update_manifest(
            model_dir, partial(_record_engine, path=path, plan=new.plan, new=new.record)
        )
        built.append(new.record)
    return m, built


def _start_build(model_dir: Path, m: Manifest, opts: EngineOptions) -> _BuildRun:
    """Toolchain, GPU, targets, batch range, timing cache, profiles and INT8 graphs: everything
    checked (and refused) before the first engine is built."""
    trt, flavour = import_trt(opts.flavour)
    version = str(trt.__version__)
    dev = current_device()
    if flavour == "tensorrt" and dev is None:
        raise EngineError(
            "full TensorRT builds engines on the GPU it targets and no CUDA GPU is visible; "
            "use --flavour tensorrt_rtx to build ahead of time without a GPU"
        )
    build_targets = list(opts.targets) or (
        list(RTX_DEFAULT_TARGETS) if flavour == "tensorrt_rtx" else []
    )
    targets = _recorded_targets(build_targets, dev)
    hi = opts.batch_max or m.batch[1]
    if not 1 <= opts.batch_opt <= hi <= m.batch[1]:
        raise EngineError(
            f"--batch {opts.batch_opt}..{hi} outside the graphs' range 1..{m.batch[1]}; re-export with --max-batch"
        )
    tc_path = _timing_cache_path(model_dir, opts, flavour)
    tc = tc_path.read_bytes() if tc_path.exists() else None
    profiles = engine_profiles(m, opts)
    engines = [e for e in m.engines]
    return _BuildRun(
        model_dir=model_dir,
        flavour=flavour,
        version=version,
        dev=dev,
        build_targets=build_targets,
        targets=targets,
        batch_max=hi,
        timing_cache_path=tc_path,
        timing_cache=tc,
        profiles=profiles,
        int8_target=_int8_target(m, opts),
        engines=engines,
    )


def _recorded_targets(build_targets: list[str], dev: Any) -> list[str]:
    """The targets as recorded: "current" becomes this GPU's sm."""
    targets = list(build_targets)
    if "current" in [t.lower() for t in targets]:
        if dev is None:
            raise EngineError(
                "--target current needs a visible CUDA GPU; name targets like sm86 to build without one"
            )
        targets = [dev.sm if t.lower() == "current" else t for t in targets]
    return targets


def _timing_cache_path(model_dir: Path, opts: EngineOptions, flavour: str) -> Path:
    tc_path = (
        Path(opts.timing_cache) if opts.timing_cache else model_dir / f"timing.{flavour}.cache"
    )
    if flavour == "tensorrt_rtx" and opts.timing_cache:
        log.warning(
            "TensorRT-RTX has no timing cache (it compiles kernels on the device); --timing-cache ignored"
        )
    return tc_path


def _int8_target(m: Manifest, opts: EngineOptions) -> str | None:
    """INT8 engines build from the TensorRT-style Q/DQ graphs, which must be calibrated."""
    target = "tensorrt" if opts.precision == "int8" else None
    if target:
        msg = m.int8_status(target)
        if msg:
            raise EngineError(
                msg.replace("dd-export calibrate", "dd-export calibrate --target tensorrt")
            )
    return target


def _graph_names(m: Manifest, opts: EngineOptions, target: str | None) -> list[str]:
    """The manifest graphs to build, in order, each once."""
    graphs: list[str] = []
    for g in opts.graphs:
        rows = [f"{g}@{r.t}" for r in m.step_table.rows] if g == "step" else [g]
        for name in rows:  # per-row graphs (INT8) get an engine each; others resolve to one
            name = m.resolve(name, opts.precision, target)
            if name not in graphs:
                graphs.append(name)
    return graphs


def _engine_job(m: Manifest, opts: EngineOptions, run: _BuildRun, g: str) -> _EngineJob:
    """The cache key of graph ``g``'s engine and the existing record of its slot."""
    rec = m.graph(g, opts.precision, run.int8_target)
    dev, flavour = run.dev, run.flavour
    info = {
        "graph": g,
        "graph_sha256": rec.sha256,
        "precision": opts.precision,
        "flavour": flavour,
        "version": run.version,
        "batch": [1, opts.batch_opt, run.batch_max],
        "inputs": [s.to_dict() for s in rec.inputs],
        "gpu": {"name": dev.name, "sm": dev.sm} if (dev and flavour == "tensorrt") else None,
        "targets": run.targets,
        "options": {
            "opt_level": opts.opt_level,
            "workspace_gb": opts.workspace_gb,
            "tf32": opts.tf32,
        },
    }
    if run.profiles:  # dynamic models only, so static engines keep their cache keys
        info["profiles"] = [[list(x) for x in p] for p in run.profiles]  # LR min/opt/max
    old = next(
        (
            e
            for e in run.engines
            if e.get("graph") == g
            and e.get("precision") == opts.precision
            and e.get("flavour") == flavour
        ),
        None,
    )
    file = f"{g}.{opts.precision}.{flavour}.engine"
    return _EngineJob(graph=g, rec=rec, info=info, key=cache_key(info), file=file, old=old)


def _build_job(m: Manifest, opts: EngineOptions, run: _BuildRun, job: _EngineJob) -> _BuiltEngine:
    """Build one engine; keep (and save) the timing cache TensorRT hands back."""
    log.info("building %s from %s (%s %s)", job.file, job.rec.file, run.flavour, run.version)
    t0 = _dt.datetime.now()
    plan, tc_new = build_engine(
        verify_graph(run.model_dir, job.rec, what=f"graph {job.graph}"),  # inside, sha256
        inputs=job.rec.inputs,
        opts=replace(opts, targets=tuple(run.build_targets)),
        batch=(1, opts.batch_opt, run.batch_max),
        flavour=run.flavour,
        timing_cache=run.timing_cache,
        profiles=run.profiles,
        multiple=m.lr_multiple,
    )
    seconds = (_dt.datetime.now() - t0).total_seconds()
    if tc_new:
        run.timing_cache = tc_new
        write_bytes_atomic(run.timing_cache_path, tc_new)
    record = {
        **job.info,
        "file": job.file,
        "sha256": hashlib.sha256(plan).hexdigest(),
        "bytes": len(plan),
        "cache_key": job.key,
        "build_seconds": round(seconds, 1),
        "built": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    return _BuiltEngine(plan=plan, record=record)


def _record_engine(cur: Manifest, path: Path, plan: bytes, new: dict[str, Any]) -> Manifest:
    """Under the manifest lock: write the engine file, and replace the record of its (graph,
    precision, flavour) in the manifest as it is on disk now."""
    write_bytes_atomic(path, plan)
    slot = ("graph", "precision", "flavour")
    keep = [e for e in cur.engines if any(e.get(k) != new[k] for k in slot)]
    return replace(cur, engines=[*keep, new])


def _intact(model_dir: Path, rec: dict[str, Any]) -> bool:
    """The recorded engine file is inside the model directory and matches its sha256."""
    try:
        verify_file(model_dir, str(rec["file"]), str(rec.get("sha256", "")), what="engine")
    except ManifestError:
        return False
    return True
