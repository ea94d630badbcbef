"""The manifest: the contract between export and runtime (docs/design.md, "The manifest").

``model_dir/manifest.json`` is plain JSON with a ``schema_version``. It names the family, the step
table, the tile shape and batch range, every graph file with its I/O specs, precision and sha256,
the exporter versions, engine records and the verification record. The runtime trusts nothing the
manifest does not vouch for: a missing or edited file, an unknown schema or a malformed field is a
``ManifestError`` naming the field and the fix. numpy / stdlib only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from deltadiff.atomic import file_lock, write_text_atomic
from deltadiff.errors import ManifestError
from deltadiff.onnx_refs import OnnxParseError, graph_external_locations
from deltadiff.options import Int8Target, Precision
from deltadiff.steps import StepTable

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LOCK = MANIFEST + ".lock"  # flock'ed by every manifest writer (manifest_lock)
GRAPH_NAMES = ("encoder", "step", "decoder", "unrolled")
REBUILD_HINT = "re-export it with dd-export onnx"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # str = symbolic (e.g. "batch")
    dtype: str  # numpy dtype name: float32, float16, int64

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


# the Q/DQ layout of an INT8 record that names no target (records from before the TensorRT one)
DEFAULT_INT8_TARGET = Int8Target.ONNXRUNTIME


def graph_key(name: str, precision: str = "fp32", target: str | None = None) -> str:
    """Manifest key of a graph: ``step`` (fp32), ``step.fp16``, ``step.int8.onnxruntime``;
    a per-row graph is named ``step@3`` (row t = 3) -> ``step@3.int8.onnxruntime``."""
    if precision == "fp32":
        return name
    if precision == "int8":
        return f"{name}.int8.{target or DEFAULT_INT8_TARGET}"
    return f"{name}.{precision}"


@dataclass(frozen=True)
class GraphRecord:
    file: str
    sha256: str
    bytes: int
    precision: str  # fp32 | fp16 | int8
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    fp32_islands: tuple[str, ...] = ()
    # int8 only: the Q/DQ layout's target and the calibration record (method, images,
    # excluded nodes and why, fidelity, ``usable`` = passed the gate)
    target: str = ""
    quant: dict[str, Any] = field(default_factory=dict)
    # tensors stored outside the graph file (ONNX external data): location -> sha256. Our
    # exporters embed every tensor, so this is empty; a graph naming a location not listed here
    # is refused (verify_graph).
    external_data: dict[str, str] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return bool(self.quant.get("usable", True))

    def to_dict(self) -> dict[str, Any]:
        d = {
            "file": self.file,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "precision": self.precision,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "fp32_islands": list(self.fp32_islands),
        }
        if self.target:
            d["target"] = self.target
        if self.quant:
            d["quant"] = self.quant
        if self.external_data:
            d["external_data"] = dict(self.external_data)
        return d


@dataclass(frozen=True)
class Manifest:
    name: str
    family: str
    scale: int
    tile: tuple[int, int]  # LR tile (h, w) the graphs were exported for
    batch: tuple[int, int]  # (min, max) batch; equal when static
    lr_multiple: int
    step_table: StepTable
    graphs: dict[str, GraphRecord]  # key: "<graph>" (fp32) or "<graph>.fp16"
    exporter: dict[str, Any]
    source: dict[str, Any]
    model_config: dict[str, Any]
    engines: list[dict[str, Any]] = field(default_factory=list)
    verification: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION
    # Dynamic spatial shapes (dd-export onnx --dynamic): LR height/width may be any multiple of
    # lr_multiple (the pad multiple) in [lr_min, lr_max]; ``tile`` is then the optimum size.
    dynamic: bool = False
    lr_min: tuple[int, int] | None = None
    lr_max: tuple[int, int] | None = None
    # Peak-RSS model of a real run, per "<backend>/<precision>/<mode>" (dd-export measure-memory):
    # {"base_bytes", "bytes_per_hr_px", "bytes_per_hr_px2", "points", ...}: a + b*px + c*px^2 per
    # image (runtime.memory_budget.fit); the runtime sizes whole images / tiles with it.
    memory: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived
    @property
    def latent(self) -> bool:
        return self.family != "deltadiff-pixel"

    @property
    def noise_names(self) -> list[str]:
        return self.step_table.noise_names()

    def state_hw(self, lr_hw: tuple[int, int] | None = None) -> tuple[int, int]:
        h, w = lr_hw or self.tile
        return (h, w) if self.latent else (4 * h, 4 * w)

    def lr_range(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(min, max) LR (h, w) the graphs accept; a static export accepts its tile only."""
        if self.dynamic and self.lr_min and self.lr_max:
            return self.lr_min, self.lr_max
        return self.tile, self.tile

    def lr_range_text(self) -> str:
        """What ``accepts`` allows, for error messages: "LR 4x4..128x128 in multiples of 4"."""
        (h0, w0), (h1, w1) = self.lr_range()
        if not self.dynamic:
            return f"LR {h0}x{w0} only (static export)"
        return f"LR {h0}x{w0}..{h1}x{w1} in multiples of {self.lr_multiple}"

    def accepts(self, h: int, w: int) -> bool:
        """True if an LR input of exactly (h, w) is valid for the graphs."""
        (h0, w0), (h1, w1) = self.lr_range()
        m = self.lr_multiple if self.dynamic else 1
        return h0 <= h <= h1 and w0 <= w <= w1 and h % m == 0 and w % m == 0

    def graph(
        self, name: str, precision: Precision | str = Precision.FP32, target: str | None = None
    ) -> GraphRecord:
        """The record of graph ``name`` (``step@3``: row t = 3's own graph if the precision has
        per-row graphs, else the shared ``step``)."""
        rec = self.graphs.get(graph_key(name, precision, target))
        if rec is None and "@" in name:
            rec = self.graphs.get(graph_key(name.split("@")[0], precision, target))
        if rec is None:
            have = ", ".join(sorted(self.graphs)) or "none"
            hint = {Precision.FP32: "dd-export onnx", Precision.FP16: "dd-export fp16"}.get(
                Precision(precision), "dd-export calibrate"
            )
            raise ManifestError(
                f"the model has no {precision} {name} graph (has: {have}); create it with {hint}"
            )
        return rec

    def resolve(self, name: str, precision: str = "fp32", target: str | None = None) -> str:
        """``step@3`` if row 3 has its own graph at this precision, else ``step``."""
        if "@" in name and graph_key(name, precision, target) not in self.graphs:
            return name.split("@")[0]
        return name

    def precisions(self) -> list[str]:
        """Precisions with graphs to run (INT8 only once its calibration passed the gate)."""
        return sorted({g.precision for g in self.graphs.values() if g.usable})

    def int8_status(self, target: str | None = None) -> str | None:
        """None if usable INT8 graphs exist for ``target``; else why not, with the fix."""
        recs = [
            g
            for g in self.graphs.values()
            if g.precision == "int8" and g.target == (target or DEFAULT_INT8_TARGET)
        ]
        if not recs:
            return "this model has no INT8 graphs; make them with dd-export calibrate"
        rt = next((g.quant["runtime_gate"] for g in recs if g.quant.get("runtime_gate")), None)
        if isinstance(rt, dict) and rt.get("passed") is False:
            where = f", report {rt['report']}" if rt.get("report") else ""
            return (
                f"this model's INT8 graphs failed the runtime gate (whole images vs FP32{where}); "
                "re-run dd-export calibrate --gate-data PAIRS or use --precision fp32"
            )
        if not all(g.usable for g in recs):
            return (
                "this model's INT8 graphs failed the calibration gate; re-run dd-export "
                "calibrate (more images, another --method) or use --precision fp32"
            )
        return None

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["graphs"] = {k: g.to_dict() for k, g in self.graphs.items()}
        d["step_table"] = self.step_table.to_dict()
        d["tile"] = list(self.tile)
        d["batch"] = list(self.batch)
        for k in ("lr_min", "lr_max"):
            d[k] = list(d[k]) if d[k] is not None else None
        return d

    @staticmethod
    def from_dict(d: Any, where: str = MANIFEST) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: top level is not a JSON object; {REBUILD_HINT}")
        ver = _field(d, "schema_version", int, where)
        if ver != SCHEMA_VERSION:
            raise ManifestError(
                f"{where}: schema_version {ver} is not supported by this runtime (expects "
                f"{SCHEMA_VERSION}); {REBUILD_HINT} or upgrade deltadiff-trt"
            )
        graphs_raw = _field(d, "graphs", dict, where)
        graphs = {}
        for k, g in graphs_raw.items():
            w = f"{where}: graphs.{k}"
            if not isinstance(g, dict):
                raise ManifestError(f"{w} is not an object; {REBUILD_HINT}")
            graphs[k] = GraphRecord(
                file=_field(g, "file", str, w),
                sha256=_field(g, "sha256", str, w),
                bytes=_field(g, "bytes", int, w),
                precision=_field(g, "precision", str, w),
                inputs=tuple(_spec(s, f"{w}.inputs") for s in _field(g, "inputs", list, w)),
                outputs=tuple(_spec(s, f"{w}.outputs") for s in _field(g, "outputs", list, w)),
                fp32_islands=tuple(g.get("fp32_islands", [])),
                target=str(g.get("target", "")),
                quant=dict(g.get("quant", {})) if isinstance(g.get("quant", {}), dict) else {},
                external_data=_external(g.get("external_data", {}), w),
            )
        st = _field(d, "step_table", dict, where)
        rows = _field(st, "rows", list, f"{where}: step_table")
        if len(rows) == 0:
            raise ManifestError(f"{where}: step_table.rows is empty; {REBUILD_HINT}")
        for i, r in enumerate(rows):
            for k in ("t", "in_scale", "a", "b", "c", "s"):
                if not isinstance(r, dict) or not isinstance(r.get(k), int | float):
                    raise ManifestError(
                        f"{where}: step_table.rows[{i}].{k} is missing or not a number; {REBUILD_HINT}"
                    )
        _field(st, "s_prior", (int, float), f"{where}: step_table")
        _field(st, "rule", str, f"{where}: step_table")
        table = StepTable.from_dict(st)
        engines = d.get("engines", [])
        if not isinstance(engines, list) or not all(
            isinstance(e, dict)
            and isinstance(e.get("graph"), str)
            and isinstance(e.get("file"), str)
            for e in engines
        ):
            raise ManifestError(
                f"{where}: 'engines' must be a list of engine records; rebuild with dd-export build-engine"
            )
        if not isinstance(d.get("verification", {}), dict):
            raise ManifestError(
                f"{where}: 'verification' must be an object; re-run dd-export verify"
            )
        tile = _pair(_field(d, "tile", list, where), "tile", where)
        batch = _pair(_field(d, "batch", list, where), "batch", where)
        dynamic = d.get("dynamic", False)
        if not isinstance(dynamic, bool):
            raise ManifestError(f"{where}: 'dynamic' must be true or false; {REBUILD_HINT}")
        lr_min = d.get("lr_min")
        lr_max = d.get("lr_max")
        if dynamic:
            lr_min = _pair(_field(d, "lr_min", list, where), "lr_min", where)
            lr_max = _pair(_field(d, "lr_max", list, where), "lr_max", where)
            if not (lr_min[0] <= tile[0] <= lr_max[0] and lr_min[1] <= tile[1] <= lr_max[1]):
                raise ManifestError(
                    f"{where}: tile {list(tile)} is outside [lr_min, lr_max]; {REBUILD_HINT}"
                )
        else:
            lr_min = lr_max = None
        memory = d.get("memory", {})
        if not isinstance(memory, dict) or not all(
            isinstance(v, dict)
            and isinstance(v.get("base_bytes"), int | float)
            and isinstance(v.get("bytes_per_hr_px"), int | float)
            for v in memory.values()
        ):
            raise ManifestError(
                f"{where}: 'memory' must map names to {{base_bytes, bytes_per_hr_px}}; "
                "re-run dd-export measure-memory"
            )
        fam = _field(d, "family", str, where)
        if fam not in ("deltadiff-latent", "deltadiff-pixel", "resshift-v3"):
            raise ManifestError(f"{where}: family {fam!r} is unknown; {REBUILD_HINT}")
        return Manifest(
            name=_field(d, "name", str, where),
            family=fam,
            scale=_field(d, "scale", int, where),
            tile=tile,
            batch=batch,
            lr_multiple=_field(d, "lr_multiple", int, where),
            step_table=table,
            graphs=graphs,
            exporter=_field(d, "exporter", dict, where),
            source=_field(d, "source", dict, where),
            model_config=_field(d, "model_config", dict, where),
            engines=list(engines),
            verification=dict(d.get("verification", {})),
            created=str(d.get("created", "")),
            schema_version=ver,
            dynamic=dynamic,
            lr_min=lr_min,
            lr_max=lr_max,
            memory=dict(memory),
        )


def _field(d: dict, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ManifestError(f"{where}: required field {key!r} is missing; {REBUILD_HINT}")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise ManifestError(
            f"{where}: field {key!r} should be {name}, got {type(v).__name__}; {REBUILD_HINT}"
        )
    return v


def _pair(v: list, key: str, where: str) -> tuple[int, int]:
    if len(v) != 2 or not all(isinstance(x, int) and x > 0 for x in v):
        raise ManifestError(
            f"{where}: {key} should be two positive integers, got {v}; {REBUILD_HINT}"
        )
    return int(v[0]), int(v[1])


def _external(v: Any, where: str) -> dict[str, str]:
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and isinstance(h, str) for k, h in v.items()
    ):
        raise ManifestError(
            f"{where}.external_data must map file names to sha256 strings; {REBUILD_HINT}"
        )
    return dict(v)


def _spec(s: Any, where: str) -> TensorSpec:
    if not isinstance(s, dict):
        raise ManifestError(f"{where}: tensor spec is not an object; {REBUILD_HINT}")
    shape = _field(s, "shape", list, where)
    if not all(isinstance(x, int | str) for x in shape):
        raise ManifestError(f"{where}: shape {shape} must hold ints or names; {REBUILD_HINT}")
    return TensorSpec(_field(s, "name", str, where), tuple(shape), _field(s, "dtype", str, where))


# ---------------------------------------------------------------------------------------------


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


# --------------------------------------------------------------------------------- writing
# Every write of manifest.json holds ``manifest.json.lock`` (flock): a whole new manifest
# (save_manifest, a fresh export) or a read-modify-write of the one on disk (update_manifest),
# so concurrent dd-export build-engine / calibrate / measure-memory runs keep each other's records.


@contextlib.contextmanager
def manifest_lock(model_dir: str | Path) -> Iterator[None]:
    """Hold the model directory's manifest lock (``manifest.json.lock``) for the block."""
    lock = Path(model_dir) / LOCK
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(lock))
        except OSError as exc:  # only taking the lock: errors of the block pass through
            raise ManifestError(
                f"cannot lock {lock} ({exc.strerror or exc}); make {model_dir} writable, or "
                f"remove {lock.name} if it is a symlink"
            ) from None
        yield


def save_manifest(model_dir: str | Path, m: Manifest) -> Path:
    """Write ``m`` as the whole manifest (a fresh export), under the manifest lock. To change
    records of an existing manifest use ``update_manifest``, which reads the current one."""
    with manifest_lock(model_dir):
        return _write_manifest(model_dir, m)


def update_manifest(model_dir: str | Path, fn: Callable[[Manifest], Manifest]) -> Manifest:
    """Read-modify-write under the manifest lock: ``fn`` gets the manifest as it is on disk now
    (not as this process read it earlier) and returns the one to write; returns that."""
    with manifest_lock(model_dir):
        new = fn(load_manifest(model_dir, check_hashes=False))
        _write_manifest(model_dir, new)
    return new


def _write_manifest(model_dir: str | Path, m: Manifest) -> Path:
    path = Path(model_dir) / MANIFEST
    write_json_atomic(path, m.to_dict())
    return path


# --------------------------------------------------------------------------------- reading


def load_manifest(
    model_dir: str | Path, *, check_hashes: bool = True, graphs: list[str] | None = None
) -> Manifest:
    """Read and validate ``model_dir/manifest.json``; with ``check_hashes`` verify every graph
    file (or only ``graphs``) with ``verify_graph``: inside the folder, sha256, external data."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ManifestError(
            f"model directory {model_dir} does not exist; pass --model DIR made by dd-export onnx"
        )
    if not model_dir.is_dir():
        raise ManifestError(
            f"--model {model_dir} is not a directory; pass the folder dd-export onnx wrote"
        )
    path = model_dir / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise ManifestError(
            f"{path} is missing; {model_dir} is not a model directory ({REBUILD_HINT})"
        )
    real = confined_path(model_dir, MANIFEST, what="manifest")
    try:
        data = json.loads(real.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); {REBUILD_HINT}") from None
    m = Manifest.from_dict(data, str(path))
    if check_hashes:
        for key, g in m.graphs.items():
            if graphs is not None and key not in graphs:
                continue
            verify_graph(model_dir, g, what=f"graph {key}")
    return m


# --------------------------------------------------------------------------------- checking
# One checker for every file a manifest names (graphs, their external data, engines): it must
# resolve, symlinks followed, to a regular file inside the model directory and match the sha256
# the manifest records, before anything opens or copies it. Callers open the real path returned.
# Digests are cached per process by (real path, device, inode, size, mtime_ns, ctime_ns): a
# file changed in any way (ctime cannot be set back) is hashed again.

_DIGESTS: dict[tuple[Any, ...], str] = {}
_LOCATIONS: dict[tuple[Any, ...], tuple[str, ...]] = {}


def _stat_key(real: Path) -> tuple[Any, ...]:
    st = real.stat()
    return (str(real), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def confined_path(
    model_dir: str | Path, file: str, *, what: str, hint: str = REBUILD_HINT, base: str = ""
) -> Path:
    """The real path of ``file`` (relative to ``model_dir/base``), refused unless it is a
    regular file inside ``model_dir`` once every symlink is resolved."""
    try:
        root = Path(model_dir).resolve(strict=True)
    except OSError:
        raise ManifestError(f"model directory {model_dir} does not exist; {hint}") from None
    rel = PurePosixPath(file)
    if (
        not file
        or "\x00" in file
        or rel.is_absolute()
        or ".." in rel.parts
        or Path(file).is_absolute()
    ):
        raise ManifestError(
            f"{what}: {file!r} is not a plain file name inside the model directory (absolute "
            f"path or '..'); {hint}"
        )
    lexical = root / base / file
    real = Path(os.path.realpath(lexical))
    if not real.is_relative_to(root) or real == root:
        raise ManifestError(
            f"{what}: {file!r} resolves to {real}, outside the model directory {root} (a symlink "
            f"leaving it); {hint}"
        )
    try:
        st = real.stat()
    except OSError:
        raise ManifestError(f"{what}: file {lexical} is missing; {hint}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ManifestError(f"{what}: {lexical} is not a regular file; {hint}")
    return real


def verify_file(
    model_dir: str | Path, file: str, sha256: str, *, what: str, hint: str = REBUILD_HINT
) -> Path:
    """``confined_path`` plus the recorded sha256; returns the real path to open."""
    real = confined_path(model_dir, file, what=what, hint=hint)
    got = _digest(real)
    if got != sha256:
        raise ManifestError(
            f"{what}: {file} was modified after export (sha256 {got[:12]}… != manifest "
            f"{str(sha256)[:12]}…); {hint}"
        )
    return real


def verify_graph(model_dir: str | Path, rec: GraphRecord, *, what: str) -> Path:
    """``verify_file`` for a graph, and every external-data file the graph names: inside the
    model directory and vouched for by ``rec.external_data`` (sha256). Returns the real path."""
    real = verify_file(model_dir, rec.file, rec.sha256, what=what)
    key = _stat_key(real)
    locs = _LOCATIONS.get(key)
    if locs is None:
        try:
            locs = tuple(dict.fromkeys(graph_external_locations(real)))
        except OnnxParseError as exc:
            raise ManifestError(
                f"{what}: {rec.file} is not a valid ONNX graph ({exc}); {REBUILD_HINT}"
            ) from None
        _LOCATIONS[key] = locs
    for loc, path in external_files(model_dir, rec, real, locs, what=what).items():
        got = _digest(path)
        if got != rec.external_data[loc]:
            raise ManifestError(
                f"{what}: external data {loc!r} of {rec.file} was modified after export (sha256 "
                f"{got[:12]}… != manifest {rec.external_data[loc][:12]}…); {REBUILD_HINT}"
            )
    return real


def external_files(
    model_dir: str | Path,
    rec: GraphRecord,
    real: Path,
    locs: tuple[str, ...] | None = None,
    *,
    what: str = "graph",
) -> dict[str, Path]:
    """location -> real path of the external-data files of graph ``rec`` (real path ``real``):
    each inside the model directory and listed in ``rec.external_data``. Locations are relative
    to the graph file's own folder, as ONNX Runtime and onnx read them."""
    root = Path(model_dir).resolve()
    base = real.parent.relative_to(root).as_posix()
    out = {}
    for loc in rec.external_data if locs is None else locs:
        where = f"{what} (external data)"
        out[loc] = confined_path(model_dir, loc, what=where, base=base)
        if loc not in rec.external_data:
            raise ManifestError(
                f"{where}: {loc!r} has no sha256 in the manifest's external_data; {REBUILD_HINT} "
                "(it embeds every tensor)"
            )
    return out


def _digest(real: Path) -> str:
    key = _stat_key(real)
    got = _DIGESTS.get(key)
    if got is None:
        got = sha256_file(real)
        if _stat_key(real) == key:  # unchanged while it was read
            _DIGESTS[key] = got
    return got
