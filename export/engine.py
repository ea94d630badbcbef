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


def build_engines(
    model_dir: str | Path, opts: EngineOptions
) -> tuple[Manifest, list[dict[str, Any]]]:
    """Build (or reuse) engines for the requested graphs; records go into the manifest.

    An engine is rebuilt only when its cache key changes: graph sha256, shapes/profile,
    precision, flavour + version, GPU (or RTX targets) and build options.
    """
    model_dir = Path(model_dir)
    m = load_manifest(model_dir)
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
    targets = list(build_targets)  # as recorded: "current" becomes this GPU's sm
    if "current" in [t.lower() for t in targets]:
        if dev is None:
            raise EngineError(
                "--target current needs a visible CUDA GPU; name targets like sm86 to build without one"
            )
        targets = [dev.sm if t.lower() == "current" else t for t in targets]
    hi = opts.batch_max or m.batch[1]
    if not 1 <= opts.batch_opt <= hi <= m.batch[1]:
        raise EngineError(
            f"--batch {opts.batch_opt}..{hi} outside the graphs' range 1..{m.batch[1]}; re-export with --max-batch"
        )
    tc_path = (
        Path(opts.timing_cache) if opts.timing_cache else model_dir / f"timing.{flavour}.cache"
    )
    if flavour == "tensorrt_rtx" and opts.timing_cache:
        log.warning(
            "TensorRT-RTX has no timing cache (it compiles kernels on the device); --timing-cache ignored"
        )
    tc = tc_path.read_bytes() if tc_path.exists() else None
    profiles = engine_profiles(m, opts)
    engines = [e for e in m.engines]
    built: list[dict[str, Any]] = []
    target = "tensorrt" if opts.precision == "int8" else None  # the TensorRT-style Q/DQ graphs
    if target:
        msg = m.int8_status(target)
        if msg:
            raise EngineError(
                msg.replace("dd-export calibrate", "dd-export calibrate --target tensorrt")
            )
    graphs: list[str] = []
    for g in opts.graphs:
        rows = [f"{g}@{r.t}" for r in m.step_table.rows] if g == "step" else [g]
        for name in rows:  # per-row graphs (INT8) get an engine each; others resolve to one
            name = m.resolve(name, opts.precision, target)
            if name not in graphs:
                graphs.append(name)
    for g in graphs:
        rec = m.graph(g, opts.precision, target)
        info = {
            "graph": g,
            "graph_sha256": rec.sha256,
            "precision": opts.precision,
            "flavour": flavour,
            "version": version,
            "batch": [1, opts.batch_opt, hi],
            "inputs": [s.to_dict() for s in rec.inputs],
            "gpu": {"name": dev.name, "sm": dev.sm} if (dev and flavour == "tensorrt") else None,
            "targets": targets,
            "options": {
                "opt_level": opts.opt_level,
                "workspace_gb": opts.workspace_gb,
                "tf32": opts.tf32,
            },
        }
        if profiles:  # dynamic models only, so static engines keep their cache keys
            info["profiles"] = [[list(x) for x in p] for p in profiles]  # LR min/opt/max
        key = cache_key(info)
        file = f"{g}.{opts.precision}.{flavour}.engine"
        old = next(
            (
                e
                for e in engines
                if e.get("graph") == g
                and e.get("precision") == opts.precision
                and e.get("flavour") == flavour
            ),
            None,
        )
        path = model_dir / file
        if not opts.force and old and old.get("cache_key") == key and _intact(model_dir, old):
            log.info("%s is up to date (cache key %s…)", file, key[:12])
            built.append({**old, "reused": True})
            continue
        log.info("building %s from %s (%s %s)", file, rec.file, flavour, version)
        t0 = _dt.datetime.now()
        plan, tc_new = build_engine(
            verify_graph(model_dir, rec, what=f"graph {g}"),  # inside the folder, sha256
            inputs=rec.inputs,
            opts=replace(opts, targets=tuple(build_targets)),
            batch=(1, opts.batch_opt, hi),
            flavour=flavour,
            timing_cache=tc,
            profiles=profiles,
            multiple=m.lr_multiple,
        )
        seconds = (_dt.datetime.now() - t0).total_seconds()
        if tc_new:
            tc = tc_new
            write_bytes_atomic(tc_path, tc_new)
        new = {
            **info,
            "file": file,
            "sha256": hashlib.sha256(plan).hexdigest(),
            "bytes": len(plan),
            "cache_key": key,
            "build_seconds": round(seconds, 1),
            "built": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        # after each engine: the manifest always vouches for the files. The engine file and its
        # record change together under the manifest lock, so a concurrent build-engine (or any
        # other manifest writer) neither loses this record nor records another run's file.
        m = update_manifest(model_dir, partial(_record_engine, path=path, plan=plan, new=new))
        built.append(new)
    return m, built


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
