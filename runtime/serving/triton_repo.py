"""``dd-export triton``: a Triton model repository for a model directory, and its config check.

Layout (``--mode staged``; ``--mode unrolled`` has one ``deltadiff_unrolled`` stage instead)::

    REPO/README.md                       how to start NVIDIA's server on it; engine versions
    REPO/deltadiff/config.pbtxt          the model clients call (Python backend, BLS)
    REPO/deltadiff/1/model.py            runtime/serving/triton_models/deltadiff.py
    REPO/deltadiff/1/manifest.json       the step table, tile, noise names, I/O specs
    REPO/deltadiff_encoder/...           stage models: onnxruntime_onnx (model.onnx),
    REPO/deltadiff_step/...              tensorrt_plan (model.plan from the engine cache) or
    REPO/deltadiff_decoder/...           Python-backend models running the lean runtime

``deltadiff`` owns what the graphs do not: the step table (the runtime's ``Executor`` feeds
every row's constants to the one step model), the seeded ``resshift-v3`` noise, and whole-image
padding, tiling and blending (the runtime's ``Upscaler``). It batches requests dynamically and
sends the tiles of a batch to the stage models together. Stage models keep the manifest's full
shapes (``max_batch_size: 0``; the step graph's ``t`` and ``coef`` have no batch axis).

``check_repository`` parses every ``config.pbtxt`` with Triton's own protobuf schema and checks
that each model's inputs, outputs, dtypes and dims agree with the manifest, that model files are
the ones the manifest vouches for (sha256; a plan must be the engine built from that graph), and
that ``deltadiff`` names stage models that exist.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deltadiff._deps import require
from deltadiff.atomic import atomic_path, write_text_atomic
from deltadiff.errors import DeltaDiffError, ManifestError
from deltadiff.manifest import (
    MANIFEST,
    GraphRecord,
    Manifest,
    TensorSpec,
    confined_path,
    external_files,
    load_manifest,
    sha256_file,
    verify_file,
    verify_graph,
)
from deltadiff.options import TritonEngine, parse
from deltadiff.runtime.serving.serve import INPUT, OUTPUT, SEED, model_config, model_source

PLATFORM = {TritonEngine.TENSORRT: "tensorrt_plan", TritonEngine.ONNXRUNTIME: "onnxruntime_onnx"}
MODEL_FILE = {
    TritonEngine.TENSORRT: "model.plan",
    TritonEngine.ONNXRUNTIME: "model.onnx",
    TritonEngine.PYTHON: "model.py",
}
DTYPE = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
}
STAGES = {"staged": ("encoder", "step", "decoder"), "unrolled": ("unrolled",)}
PREFIX = "deltadiff_"


@dataclass(frozen=True)
class TritonRepoOptions:
    engine: TritonEngine | str = TritonEngine.ONNXRUNTIME  # parsed by write_repository
    precision: str = "fp32"
    mode: str = "staged"
    flavour: str | None = None  # tensorrt: which engines (tensorrt | tensorrt_rtx); default: any
    instances: int = 1  # per stage model (and for deltadiff)
    kind: str | None = None  # gpu | cpu; default gpu for tensorrt/onnxruntime, cpu for python
    max_batch: int = 8  # requests per dynamic batch of deltadiff
    queue_delay_us: int = 5000
    threads: int = 0  # python stages: onnxruntime threads
    overwrite: bool = False


@dataclass
class CheckReport:
    repo: Path
    models: dict[str, list[str]] = field(default_factory=dict)  # model -> problems

    @property
    def ok(self) -> bool:
        return not any(self.models.values())

    def lines(self) -> list[str]:
        return [
            f"{'ok    ' if not probs else 'FAILED'} {name}"
            + (f": {'; '.join(probs)}" if probs else "")
            for name, probs in sorted(self.models.items())
        ]


def _dims(spec: TensorSpec) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in spec.shape]


def _tensor(spec: TensorSpec) -> str:
    if spec.dtype not in DTYPE:
        raise DeltaDiffError(f"tensor {spec.name}: dtype {spec.dtype} has no Triton type here")
    dims = ", ".join(str(d) for d in _dims(spec))
    return f'  {{ name: "{spec.name}" data_type: {DTYPE[spec.dtype]} dims: [ {dims} ] }}'


def stage_config(name: str, m: Manifest, graph: str, opts: TritonRepoOptions, kind: str) -> str:
    rec = m.graph(graph, opts.precision)
    head = f'name: "{name}"\n'
    if opts.engine == TritonEngine.PYTHON:
        head += 'backend: "python"\n'
    else:
        head += f'platform: "{PLATFORM[opts.engine]}"\n'
        head += f'default_model_filename: "{MODEL_FILE[opts.engine]}"\n'
    body = (
        "max_batch_size: 0\n"
        + "input [\n"
        + ",\n".join(_tensor(s) for s in rec.inputs)
        + "\n]\noutput [\n"
        + ",\n".join(_tensor(s) for s in rec.outputs)
        + "\n]\n"
        + f"instance_group [ {{ count: {opts.instances} kind: {kind} }} ]\n"
    )
    if opts.engine == TritonEngine.PYTHON:
        params = {"graph": graph, "precision": opts.precision, "threads": opts.threads}
        body += (
            "parameters [\n"
            + ",\n".join(
                f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()
            )
            + "\n]\n"
        )
    return head + body


def _engine_record(
    m: Manifest, graph: str, opts: TritonRepoOptions, model_dir: Path
) -> tuple[dict, Path]:
    """The engine record for ``graph`` and the real path of its checked plan file."""
    found = [
        e
        for e in m.engines
        if e.get("graph") == graph
        and e.get("precision") == opts.precision
        and (opts.flavour is None or e.get("flavour") == opts.flavour)
    ]
    if not found:
        raise DeltaDiffError(
            f"{model_dir}: no {opts.precision} {opts.flavour or 'TensorRT'} engine for the {graph} "
            f"graph; build it with dd-export build-engine --model {model_dir} "
            f"--precision {opts.precision} --graphs {graph}"
        )
    e = found[-1]
    fix = f"rebuild it with dd-export build-engine --model {model_dir} --precision {opts.precision}"
    if e.get("graph_sha256") != m.graph(graph, opts.precision).sha256:
        raise DeltaDiffError(f"engine {e['file']} was built from another {graph} graph; {fix}")
    # the file is copied as model.plan: it must be the engine the manifest vouches for
    real = verify_file(
        model_dir, e["file"], str(e.get("sha256", "")), what=f"engine {graph}", hint=fix
    )
    return e, real


def _copy_checked(src: Path, dst: Path, sha256: str, what: str) -> None:
    """Copy a checked file to a temp file beside ``dst``, check the copy's sha256 too (the source
    may change between the check and the copy), then move it onto ``dst``; a bad copy never
    lands."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
        if sha256_file(tmp) != sha256:
            raise DeltaDiffError(
                f"{what}: {src} changed while it was copied; run dd-export triton again"
            )


def _copy_graph(model_dir: Path, rec: GraphRecord, dst: Path, *, what: str) -> None:
    """Copy a checked graph (inside the model directory, sha256) and its external data, which
    keeps its location relative to the graph."""
    real = verify_graph(model_dir, rec, what=what)
    _copy_checked(real, dst, rec.sha256, what)
    for loc, src in external_files(model_dir, rec, real).items():
        _copy_checked(src, dst.parent / loc, rec.external_data[loc], f"{what} external data")


def write_repository(model_dir: Path, repo: Path, opts: TritonRepoOptions) -> Path:
    """Write the repository (refuses a non-empty ``repo`` unless ``overwrite``); returns it."""
    model_dir, repo = Path(model_dir), Path(repo)
    opts = replace(opts, engine=parse(TritonEngine, opts.engine, "--engine"))
    if opts.mode not in STAGES:
        raise DeltaDiffError(f"--mode {opts.mode!r}: choose staged or unrolled")
    m = load_manifest(model_dir)  # checks every graph's sha256
    kind = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}[
        opts.kind or ("cpu" if opts.engine == TritonEngine.PYTHON else "gpu")
    ]
    graphs = STAGES[opts.mode]
    for g in graphs:
        m.graph(g, opts.precision)  # a clear error when the graph is missing
    checked = (
        {g: _engine_record(m, g, opts, model_dir) for g in graphs}
        if opts.engine == TritonEngine.TENSORRT
        else {}
    )
    engines = {g: e for g, (e, _) in checked.items()}
    if repo.exists() and any(repo.iterdir()):
        if not opts.overwrite:
            raise DeltaDiffError(f"{repo} is not empty; pass --overwrite or choose another -o")
        shutil.rmtree(repo)
    manifest_text = (model_dir / MANIFEST).read_text(encoding="utf-8")
    max_tile = min([m.batch[1]] + [int(e["batch"][2]) for e in engines.values() if e.get("batch")])
    for g in graphs:
        name = PREFIX + g
        v = repo / name / "1"
        v.mkdir(parents=True)
        rec = m.graph(g, opts.precision)
        if opts.engine == TritonEngine.ONNXRUNTIME:
            _copy_graph(model_dir, rec, v / "model.onnx", what=f"graph {g}")
        elif opts.engine == TritonEngine.TENSORRT:
            e, real = checked[g]
            _copy_checked(real, v / "model.plan", e["sha256"], f"engine {g}")
        else:
            _copy_graph(model_dir, rec, v / rec.file, what=f"graph {g}")
            write_text_atomic(v / MANIFEST, manifest_text)
            write_text_atomic(v / "model.py", model_source("stage"))
        write_text_atomic(repo / name / "config.pbtxt", stage_config(name, m, g, opts, kind))
    d = repo / "deltadiff"
    (d / "1").mkdir(parents=True)
    write_text_atomic(d / "1" / "model.py", model_source("deltadiff"))
    write_text_atomic(d / "1" / MANIFEST, manifest_text)
    params: dict[str, Any] = {
        "stages": "bls",
        "precision": opts.precision,
        "mode": opts.mode,
        "max_tile_batch": max_tile,
        **{f"model_{g}": PREFIX + g for g in graphs},
    }
    write_text_atomic(
        d / "config.pbtxt",
        model_config(
            "deltadiff",
            params=params,
            max_batch=opts.max_batch,
            queue_delay_us=opts.queue_delay_us,
            instances=1,
            kind="KIND_CPU",
        ),
    )
    write_text_atomic(repo / "README.md", _readme(m, model_dir, opts, engines, graphs, max_tile))
    return repo


def _readme(
    m: Manifest,
    model_dir: Path,
    opts: TritonRepoOptions,
    engines: dict,
    graphs: tuple,
    max_tile: int,
) -> str:
    th, tw = m.tile
    stage_list = ", ".join(f"`{PREFIX}{g}`" for g in graphs)
    if opts.engine == TritonEngine.TENSORRT:
        flav = sorted({(e["flavour"], e["version"]) for e in engines.values()})
        targets = sorted({t for e in engines.values() for t in e.get("targets") or []})
        gpus = sorted({e["gpu"]["name"] for e in engines.values() if e.get("gpu")})
        trt = "; ".join(f"{f} {v}" for f, v in flav)
        engine_text = (
            f"The plans were built by **{trt}**"
            + (f" for GPU {', '.join(gpus)}" if gpus else "")
            + (f" (TensorRT-RTX targets {', '.join(targets)})" if targets else "")
            + ". A plan loads only in the TensorRT it was built with: run a server container whose "
            "TensorRT version is exactly this one (NVIDIA's frameworks support matrix lists the "
            "TensorRT of each `tritonserver` release), on a GPU of a listed architecture."
        )
        if any(f == "tensorrt_rtx" for f, _ in flav):
            engine_text += (
                " **These are TensorRT-RTX plans**: Triton's `tensorrt_plan` backend runs plans "
                "of (full) TensorRT only. Rebuild with full TensorRT on the serving GPU "
                f"(`dd-export build-engine --model {model_dir} --flavour tensorrt --precision "
                f"{opts.precision}`, then `dd-export triton` again), or serve the TensorRT-RTX "
                "plans through `dd-run serve --backend tensorrt`."
            )
    elif opts.engine == TritonEngine.ONNXRUNTIME:
        engine_text = (
            "The stage models are ONNX graphs for Triton's `onnxruntime` backend (in every "
            "`tritonserver` container); `instance_group` asks for GPUs (`--kind cpu` for CPUs)."
        )
    else:
        engine_text = (
            "The stage models are Python-backend models that run the lean runtime (ONNX Runtime on "
            "CPU). This variant also runs under the Triton server bundled in `nvidia-pytriton` "
            "(`pip install 'deltadiff-trt[serve]'`), which has only the Python backend."
        )
    return f"""# Triton model repository: {m.name} ({m.family})

Written by `dd-export triton --model {model_dir} --engine {opts.engine} --precision {opts.precision}
--mode {opts.mode}`. Check it with `dd-export triton-check REPO`.

Models: `deltadiff` (what clients call) and the stage models {stage_list}.

- `deltadiff` (Python backend, BLS): input `{INPUT}` (BYTES, dims [1]: one encoded image file:
  PNG, JPEG, WebP, TIFF, BMP), optional `{SEED}` (INT64, the noise seed of `resshift-v3`; default
  0); output `{OUTPUT}` (BYTES: the x{m.scale} result as PNG, 8 or 16-bit like the input, alpha and
  ICC kept). It pads, cuts {th}x{tw} LR tiles, runs the step table ({len(m.step_table.rows)}
  rows, rule `{m.step_table.rule}`) over the stage models and blends; the requests of one
  dynamic batch are upscaled together and their tiles sent to the stages in batches of up to
  {max_tile} tiles. A bad request gets HTTP 400 naming the problem.
- Stage models: the manifest's graphs with full shapes (`max_batch_size: 0`, batch axis -1).

{engine_text}

## Start NVIDIA's server on it

The `deltadiff` model imports the lean runtime: install `deltadiff-trt` (no extras needed) into
the container's Python first.

```bash
docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -v "$PWD/REPO:/models" \\
    nvcr.io/nvidia/tritonserver:<release>-py3 \\
    bash -c "pip install deltadiff-trt && tritonserver --model-repository=/models"
```

Then, for example, with `pip install 'tritonclient[http]'`:

```python
import numpy as np, tritonclient.http as th
c = th.InferenceServerClient("localhost:8000")
i = th.InferInput("{INPUT}", [1, 1], "BYTES")
i.set_data_from_numpy(np.array([[open("photo.png", "rb").read()]], dtype=object))
open("photo_x4.png", "wb").write(c.infer("deltadiff", [i]).as_numpy("{OUTPUT}")[0, 0])
```
"""


# --------------------------------------------------------------------------- check


def _parse_config(path: Path) -> Any:
    require("tritonclient", "serve")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(path.read_text(encoding="utf-8"), cfg)
    except text_format.ParseError as exc:
        raise DeltaDiffError(f"{path}: not a valid Triton model config ({exc})") from None
    return cfg


def _io(cfg: Any, which: str) -> dict[str, tuple[str, list[int]]]:
    from tritonclient.grpc import model_config_pb2

    return {
        t.name: (model_config_pb2.DataType.Name(t.data_type), list(t.dims))
        for t in getattr(cfg, which)
    }


def _compare(got: dict, specs: tuple[TensorSpec, ...], which: str) -> list[str]:
    want = {s.name: (DTYPE.get(s.dtype, s.dtype), _dims(s)) for s in specs}
    probs = []
    for n in sorted(set(want) | set(got)):
        if n not in got:
            probs.append(f"{which} {n!r} missing (manifest: {want[n][0]} {want[n][1]})")
        elif n not in want:
            probs.append(f"{which} {n!r} is not in the manifest")
        elif got[n] != want[n]:
            probs.append(
                f"{which} {n!r} is {got[n][0]} {got[n][1]}, manifest says {want[n][0]} {want[n][1]}"
            )
    return probs


def check_repository(repo: Path) -> CheckReport:
    """Check every model of a repository written by ``write_repository`` against its manifest."""
    repo = Path(repo)
    rep = CheckReport(repo)
    top = repo / "deltadiff"
    if not (top / "config.pbtxt").exists():
        raise DeltaDiffError(f"{repo}: no deltadiff/config.pbtxt; write it with dd-export triton")
    try:
        m = load_manifest(top / "1", check_hashes=False)
    except ManifestError as exc:
        raise DeltaDiffError(f"{repo}: deltadiff/1/{MANIFEST}: {exc}") from None
    cfg = _parse_config(top / "config.pbtxt")
    probs: list[str] = []
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    if cfg.name != "deltadiff" or cfg.backend != "python":
        probs.append("deltadiff must be a python-backend model named deltadiff")
    if not (top / "1" / "model.py").exists():
        probs.append("1/model.py is missing")
    if cfg.max_batch_size < 1 or not cfg.HasField("dynamic_batching"):
        probs.append("needs max_batch_size >= 1 and dynamic_batching")
    if _io(cfg, "input").get(INPUT) != ("TYPE_STRING", [1]) or _io(cfg, "output").get(OUTPUT) != (
        "TYPE_STRING",
        [1],
    ):
        probs.append(f"needs input {INPUT!r} and output {OUTPUT!r} as TYPE_STRING [1]")
    precision, mode = params.get("precision", "fp32"), params.get("mode", "staged")
    if mode not in STAGES:
        probs.append(f"parameter mode={mode!r} is not staged/unrolled")
        mode = "staged"
    rep.models["deltadiff"] = probs
    for g in STAGES[mode]:
        name = params.get(f"model_{g}", "")
        if not name or not (repo / name / "config.pbtxt").exists():
            rep.models["deltadiff"].append(f"stage model for {g} ({name or 'unnamed'}) is missing")
            continue
        rep.models[name] = _check_stage(repo / name, m, g, precision)
    return rep


def _check_stage(d: Path, m: Manifest, graph: str, precision: str) -> list[str]:
    cfg = _parse_config(d / "config.pbtxt")
    probs: list[str] = []
    if cfg.name != d.name:
        probs.append(f"config name {cfg.name!r} differs from its folder")
    if cfg.max_batch_size != 0:
        probs.append("max_batch_size must be 0 (shapes carry their batch axis)")
    try:
        rec = m.graph(graph, precision)
    except ManifestError as exc:
        return [str(exc)]
    probs += _compare(_io(cfg, "input"), rec.inputs, "input")
    probs += _compare(_io(cfg, "output"), rec.outputs, "output")
    if not cfg.instance_group:
        probs.append("no instance_group")
    v = d / "1"
    if cfg.backend == "python":
        params = {k: v_.string_value for k, v_ in cfg.parameters.items()}
        if params.get("graph") != graph or params.get("precision", "fp32") != precision:
            probs.append(f"parameters graph/precision should be {graph}/{precision}")
        if not (v / "model.py").exists():
            probs.append("1/model.py is missing")
        try:  # inside 1/, sha256, external data: as the stage model will load it
            verify_graph(v, rec, what=f"1/{rec.file}")
        except ManifestError as exc:
            probs.append(f"1/{rec.file} is missing or differs from the manifest ({exc})")
        try:
            if load_manifest(v, check_hashes=False).to_dict() != m.to_dict():
                probs.append(f"1/{MANIFEST} differs from deltadiff's")
        except ManifestError as exc:
            probs.append(str(exc))
    elif cfg.platform == "onnxruntime_onnx":
        name = cfg.default_model_filename or "model.onnx"
        try:  # the graph under the name Triton loads, checked as the manifest's own file
            f = verify_graph(v, replace(rec, file=name), what=f"1/{name}")
        except ManifestError as exc:
            probs.append(f"{name} is missing or is not the manifest's {rec.file} ({exc})")
        else:
            probs += _check_onnx_file(f, rec)
    elif cfg.platform == "tensorrt_plan":
        name = cfg.default_model_filename or "model.plan"
        try:
            f = confined_path(v, name, what=f"1/{name}")
            digest = sha256_file(f)
        except ManifestError:
            f, digest = v / name, None
        e = next((e for e in m.engines if e.get("sha256") == digest), None)
        if e is None:
            probs.append(f"{f.name} is missing or is not an engine recorded in the manifest")
        elif e.get("graph") != graph or e.get("graph_sha256") != rec.sha256:
            probs.append(
                f"{f.name} was built from {e.get('graph')} {e.get('graph_sha256', '')[:12]}, not this graph"
            )
        elif [
            TensorSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in e.get("inputs", [])
        ] != list(rec.inputs):
            probs.append(f"{f.name}: the engine's recorded inputs differ from the manifest")
    else:
        probs.append(f"unknown platform/backend {cfg.platform or cfg.backend!r}")
    return probs


def _check_onnx_file(f: Path, rec: Any) -> list[str]:
    """The graph file's own I/O (as ONNX Runtime reads it) against the manifest."""
    ort = require("onnxruntime", "ort")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"])
    types = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}
    probs = []
    for which, got, specs in (
        ("input", s.get_inputs(), rec.inputs),
        ("output", s.get_outputs(), rec.outputs),
    ):
        have = {
            a.name: (types.get(a.type, a.type), [d if isinstance(d, int) else -1 for d in a.shape])
            for a in got
        }
        want = {sp.name: (sp.dtype, _dims(sp)) for sp in specs}
        if have != want:
            probs.append(f"{f.name}: graph {which}s {have} differ from the manifest {want}")
    return probs
