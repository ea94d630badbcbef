"""``dd-export calibrate``: FP32 model directory -> per-row INT8 step graphs that pass the gate.

1. Data: real LR images run through the FP32 graphs; the step graph's inputs are captured at
   all four rows (timestep-aware), and for the latent families the VQ-f4 encoder's (LR tiles)
   and decoder's (the final FP32 latent) inputs too. Two passes collect per-row min/max and |x| histograms of
   every Conv / MatMul activation; a ranges cache (JSON, keyed on the step graph's sha256)
   lets a re-run with another method / target / search skip this data pass.
2. Ranges: one set per row (the rows differ: t = 3 carries the largest residual), by the
   chosen method; ``auto`` measures all four methods (teacher-forced step PSNR of the fully
   quantized row graphs on held-out images) and keeps the best.
3. Sensitivity search (``search.py``): cost of each (row, block) alone, then the fewest
   most-costly units kept in FP32 until the gate holds on the search images.
4. Gate on all held-out images (never calibration images): INT8 vs FP32 end to end >= 35 dB on
   the worst image and, for paired data, PSNR-Y vs HR within 0.10 dB of FP32.
5. Write: one graph per row (``step@3`` ...; a row with nothing quantized points at the FP32
   file), the encoder / decoder records (latent families: INT8 VQ-f4 graphs with the VQ distance
   + argmin kept as an FP32 island, searched and gated with the rows; the pixel family's
   encoder / decoder have no Conv worth quantizing and point at the FP32 files), manifest records
   with precision ``int8``, the target and the calibration record; a report (JSON + Markdown).
   Graph files carry a content hash in their name and are written before the manifest is
   swapped atomically, so an interrupted run leaves the model directory as it was; files the
   new manifest no longer references are removed afterwards.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from deltadiff.atomic import write_bytes_atomic, write_text_atomic
from deltadiff.calibration import ranges as R
from deltadiff.calibration.data import (
    CalibrationDataError,
    ImageSet,
    fp32_trajectory,
    load_images,
    tiles,
)
from deltadiff.calibration.evaluate import MAX_HR_DROP_DB, MIN_E2E_DB, Evaluator, Score
from deltadiff.calibration.gate import GateOptions, GateResult, load_pairs, record_gate, run_gate
from deltadiff.calibration.qdq import quantizable_nodes, quantized_nodes, stage_candidates
from deltadiff.calibration.search import (
    Key,
    PlanBuilder,
    Stage,
    Unit,
    greedy,
    node_blocks,
    sensitivity,
)
from deltadiff.calibration.trt_check import culprits, rtx_available, rtx_builds
from deltadiff.errors import DeltaDiffError, ManifestError
from deltadiff.manifest import (
    DEFAULT_INT8_TARGET,
    GraphRecord,
    Manifest,
    graph_key,
    load_manifest,
    update_manifest,
    verify_graph,
)
from deltadiff.options import Int8Target, RangeMethod, SearchRank, SearchUnit, parse
from deltadiff.runtime.memory_budget import measure as measure_memory
from deltadiff.runtime.memory_budget import memory_text, record_key

log = logging.getLogger(__name__)

STAGED = ("encoder", "step", "decoder")
# --method: a range method, or auto (measure each on held-out images and keep the best)
MethodChoice = StrEnum(
    "MethodChoice", [("AUTO", "auto"), *((m.name, m.value) for m in RangeMethod)]
)


@dataclass(frozen=True)
class CalibrateOptions:
    model: Path
    data: Path
    target: str = Int8Target.ONNXRUNTIME
    method: str = MethodChoice.AUTO  # or a RangeMethod
    samples: int = 4
    cache: Path | None = None
    threads: int = 0
    search: bool = True
    coarse: bool = False  # search units are whole graphs (rows, encoder, decoder), not blocks
    rank: str = (
        SearchRank.PER_MAC
    )  # search order: cost per MAC moved to INT8, or cost alone ("cost")
    units: str = SearchUnit.BLOCK  # search unit inside a row: a UNet block, or one layer ("layer")
    # reuse another target's search (its report): its method, cost order and kept units are the
    # starting point; only the gate (and, if it fails, a bisection over more kept units) runs
    search_from: Path | None = None
    sens_images: int = 2  # images for the per-unit step costs
    search_images: int = 4  # held-out images the greedy search checks (the gate uses all)
    margin_db: float = 0.02  # the search aims this much inside the PSNR-Y gate
    min_e2e_db: float = MIN_E2E_DB
    max_drop_db: float = MAX_HR_DROP_DB
    tensorrt_fp32: tuple[str, ...] = ()  # node names kept FP32 for the TensorRT target
    rtx_check: bool = True  # TensorRT target: TensorRT-RTX must build each row graph (if installed)
    # the runtime gate (gate.py): x4 pairs (gt/ + lq/) run whole through the runtime at FP32 and
    # INT8 once the graphs are written; it decides ``passed`` (the tile score above stays the
    # search's internal check). None: the tile gate decides, as before.
    gate_data: Path | None = None
    gate_cache: Path | None = None  # FP32 output cache of the runtime gate (default: gate.py's)


@dataclass
class CalibrationResult:
    passed: bool
    score: Score
    method: str
    target: str
    records: dict[str, GraphRecord]
    report: dict[str, Any]
    report_path: Path | None = None
    data_pass: bool = True  # False when the ranges came from the cache
    seconds: dict[str, float] = field(default_factory=dict)
    gate: GateResult | None = None  # the runtime gate, when --gate-data ran it


def _check_fp32(model_dir: Path) -> Manifest:
    m = load_manifest(model_dir)
    missing = [g for g in STAGED if g not in m.graphs or m.graphs[g].precision != "fp32"]
    if missing:
        raise ManifestError(
            f"{model_dir} has no FP32 {', '.join(missing)} graph(s) to calibrate; export them "
            "first with dd-export onnx"
        )
    return m


def _feeds(
    model_dir: Path,
    m: Manifest,
    images: ImageSet,
    threads: int,
    names: list[str],
    stage_inputs: dict[str, list[str]],
) -> tuple[dict[int, list], dict[str, list]]:
    """Step inputs per row, and the inputs of the stage graphs being calibrated."""
    lr = tiles(m, images.calib)
    bmax = max(1, m.batch[1])
    feeds: dict[int, list] = {r.t: [] for r in m.step_table.rows}
    stage: dict[str, list] = {g: [] for g in stage_inputs}
    last = m.step_table.rows[-1].t
    for i in range(0, lr.shape[0], bmax):
        tr = fp32_trajectory(model_dir, m, lr[i : i + bmax], threads=threads)
        for r in m.step_table.rows:
            f = tr.feeds(m, r, names)
            for j in range(tr.lr.shape[0]):  # batch 1 per run: bounded memory
                feeds[r.t].append({k: (v[j : j + 1] if v.ndim == 4 else v) for k, v in f.items()})
        have = {"lr": tr.lr, "x": tr.x_out[last], **tr.noise}
        for g, ins in stage_inputs.items():
            for j in range(tr.lr.shape[0]):
                stage[g].append({k: have[k][j : j + 1] for k in ins})
    return feeds, stage


def _prior_search(path: Path, m: Manifest) -> dict[str, Any]:
    """The search of another calibrate run (its int8-report.<target>.json) for this model."""
    try:
        rep = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeltaDiffError(
            f"--search-from {path} is unreadable ({type(exc).__name__}); pass the "
            "int8-report.<target>.json of a calibrate run on this model"
        ) from None
    if not isinstance(rep, dict) or rep.get("kind") != "deltadiff-int8-calibration":
        raise DeltaDiffError(
            f"--search-from {path} is not a calibration report; pass DIR/int8-report.<target>.json"
        )
    if (
        rep.get("model") != m.name
        or rep.get("step_sha256", m.graph("step").sha256) != m.graph("step").sha256
        or not rep.get("sensitivity")
    ):
        raise DeltaDiffError(
            f"--search-from {path} is not a searched calibration of {m.name}; run calibrate "
            "with the search on that model first"
        )
    return rep


def compare_methods(
    ev: Evaluator, builder: Callable[[str], PlanBuilder], keys: list[Key], images: int
) -> list[dict[str, Any]]:
    """Teacher-forced PSNR of each method's fully quantized graphs (step rows, VQ stages)."""
    out = []
    for meth in RangeMethod:
        pb = builder(meth)
        per = {}
        for t in keys:
            blob = pb.graph(t, pb.nodes(t, set()))
            if blob is None:
                continue
            mse = ev.stage_mse(t, blob, images)
            per[t] = 10 * math.log10(1 / mse) if mse > 0 else math.inf
        out.append(
            {
                "method": meth,
                "step_db": {str(t): round(v, 2) for t, v in per.items()},
                "mean_db": round(float(np.mean(list(per.values()))), 2),
                "min_db": round(min(per.values()), 2),
            }
        )
        log.info("range method %-10s PSNR per graph %s", meth, out[-1]["step_db"])
    return out


def calibrate(
    opts: CalibrateOptions,
    *,
    on_feed: Callable[[], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> CalibrationResult:
    """The procedure of the module docstring, one named step each."""
    say = progress or log.info
    opts = _checked(opts)
    inp = _load_inputs(opts)
    times: dict[str, float] = {}
    with _timed(times, "data"):
        act = _collect_activations(opts, inp, say, on_feed)
    if opts.gate_data is not None:
        _check_gate_data(Path(opts.gate_data), set(act.calib_hashes))
    with _timed(times, "fp32_reference"):
        bench = _fp32_reference(opts, inp, act.images)
    factory = PlanFactory(opts.target, inp, act)
    with _timed(times, "methods"):
        pick = _choose_method(opts, inp, bench, factory, say)
    fixed = set(opts.tensorrt_fp32) if opts.target == Int8Target.TENSORRT else set()
    pb = factory(pick.method, fixed)
    with _timed(times, "search"):
        found = _search(opts, inp, bench, pb, say)
    with _timed(times, "gate"):
        plan = _gate(opts, inp, bench, pb, fixed, found, say)
    if opts.target == Int8Target.TENSORRT and opts.rtx_check and plan.passed and rtx_available():
        with _timed(times, "rtx_check"):
            _rtx_check(opts, inp, bench, factory, pick.method, plan, say)
    share = _int8_share(inp, plan, say)
    fidelity = _fidelity(bench, act.images, plan, say)
    records = _write(opts, inp, act, pick.method, plan, fidelity)
    report = _report(opts, inp, act, pick, found, plan, share, fidelity, records, times)
    passed, gate = _after_write(opts, inp.model_dir, plan.passed, report, times, say)
    rpath = _write_report(inp.model_dir, opts.target, report)
    return CalibrationResult(
        passed,
        plan.score,
        pick.method,
        opts.target,
        records,
        report,
        rpath,
        act.data_pass,
        times,
        gate,
    )


@contextmanager
def _timed(times: dict[str, float], key: str) -> Iterator[None]:
    """Record the seconds the block took as ``times[key]`` (the report's ``seconds``)."""
    t0 = time.perf_counter()
    yield
    times[key] = time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# 0. inputs


def _checked(opts: CalibrateOptions) -> CalibrateOptions:
    """``opts`` with its choices parsed (a bad one is one line), before any data pass."""
    opts = replace(
        opts,
        target=parse(Int8Target, opts.target, "--target"),
        rank=parse(SearchRank, opts.rank, "--rank"),
        units=parse(SearchUnit, opts.units, "--units"),
        method=parse(MethodChoice, opts.method, "--method"),
    )
    if opts.gate_data is not None and opts.target != Int8Target.ONNXRUNTIME:
        raise DeltaDiffError(
            f"--gate-data runs the INT8 graphs through onnxruntime; use it with --target "
            f"onnxruntime (got --target {opts.target})"
        )
    return opts


@dataclass
class Inputs:
    """What the run quantizes: the FP32 graphs, their search units, and a search to reuse."""

    model_dir: Path
    m: Manifest
    step: Any  # the FP32 step graph (onnx.ModelProto)
    rows: list[int]  # the step table's rows (t)
    keys: list[Key]  # every graph the plan writes: encoder, the rows, decoder
    units: str  # the search unit (SearchUnit; --search-from: the other report's)
    blocks: dict[str, list[str]]  # the step graph's search units -> their nodes
    stages: dict[str, Any]  # the VQ-f4 encoder / decoder with candidates (latent families)
    stage_blocks: dict[str, dict[str, list[str]]]
    stage_kept: dict[str, list[dict[str, Any]]]  # their nodes always kept FP32, with why
    prior: dict[str, Any] | None  # --search-from: the other target's report


def _load_inputs(opts: CalibrateOptions) -> Inputs:
    """The FP32 graphs the manifest vouches for, their candidates and search units."""
    import onnx

    model_dir = Path(opts.model)
    m = _check_fp32(model_dir)
    step = onnx.load(str(verify_graph(model_dir, m.graph("step"), what="graph step")))
    rows = [r.t for r in m.step_table.rows]
    # the VQ-f4 encoder / decoder of the latent families (the pixel family has no candidates)
    stages: dict[str, Any] = {}
    cand: dict[str, tuple[list[str], list[dict[str, Any]]]] = {}
    for g in ("encoder", "decoder"):
        sm = onnx.load(str(verify_graph(model_dir, m.graph(g), what=f"graph {g}")))
        nodes, kept = stage_candidates(sm, g)
        if nodes:
            stages[g], cand[g] = sm, (nodes, kept)
    prior = _prior_search(Path(opts.search_from), m) if opts.search_from is not None else None
    # another target's search is reused unit for unit: its unit names are its granularity's
    units = prior.get("units", SearchUnit.BLOCK) if prior is not None else opts.units
    keys: list[Key] = [*(["encoder"] if "encoder" in stages else []), *rows]
    keys += ["decoder"] if "decoder" in stages else []
    return Inputs(
        model_dir=model_dir,
        m=m,
        step=step,
        rows=rows,
        keys=keys,
        units=units,
        blocks=node_blocks(step, units=units),
        stages=stages,
        stage_blocks={g: node_blocks(stages[g], set(cand[g][0]), units) for g in stages},
        stage_kept={g: cand[g][1] for g in cand},
        prior=prior,
    )


# ---------------------------------------------------------------------------------------------
# 1. data: activation statistics per row, from the cache or a pass over the calibration images


@dataclass
class Activations:
    """The activation statistics the ranges are computed from, and the images behind them."""

    step: dict[str, dict[int, R.TensorStats]]  # step graph: tensor -> row t -> statistics
    stages: dict[str, dict[str, dict[int, R.TensorStats]]]  # encoder / decoder (row 0)
    images: ImageSet  # held_out: the images the search and the gate may use
    calib_hashes: list[str]  # sha256 of the calibration images
    data_pass: bool  # False when the statistics came from the cache

    @property
    def images_sha(self) -> str:
        return hashlib.sha256("".join(self.calib_hashes).encode()).hexdigest()


def _collect_activations(
    opts: CalibrateOptions,
    inp: Inputs,
    say: Callable[[str], None],
    on_feed: Callable[[], None] | None,
) -> Activations:
    """Per-row statistics: from the ranges cache if there is one, else a data pass."""
    images = load_images(opts.data, opts.samples)
    if opts.cache is not None and Path(opts.cache).exists():
        return _cached_activations(opts, inp, images, Path(opts.cache), say)
    return _data_pass(opts, inp, images, say, on_feed)


def _cached_activations(
    opts: CalibrateOptions,
    inp: Inputs,
    images: ImageSet,
    cache: Path,
    say: Callable[[str], None],
) -> Activations:
    """The statistics of the ranges cache; the held-out images are those it did not use."""
    stats, meta = R.load_cache(cache, inp.m.graph("step").sha256)
    sstats = {g: R.stage_stats(cache, meta, g, inp.m.graph(g).sha256) for g in inp.stages}
    calib_hashes = list(meta.get("calibration_images", []))
    # the gate must never see a calibration image: hold out what the cache did not use
    every = images.calib + images.held_out
    held = [im for im in every if im.sha256 not in set(calib_hashes)]
    if len(held) < 2:
        raise CalibrationDataError(
            f"--data {opts.data} has fewer than 2 images the cached calibration did not use; "
            "add held-out images or delete the cache"
        )
    say(f"ranges from cache {opts.cache} (no data pass; {len(calib_hashes)} calibration images)")
    held_out = ImageSet(images.folder, [], held, images.paired)
    return Activations(stats, sstats, held_out, calib_hashes, data_pass=False)


def _data_pass(
    opts: CalibrateOptions,
    inp: Inputs,
    images: ImageSet,
    say: Callable[[str], None],
    on_feed: Callable[[], None] | None,
) -> Activations:
    """The calibration images through the FP32 graphs; the statistics go to the cache."""
    calib_hashes = sorted(im.sha256 for im in images.calib)
    say(f"data pass: {len(images.calib)} images x {len(inp.rows)} rows through the FP32 graphs")
    names = [i.name for i in inp.step.graph.input]
    ins = {g: [i.name for i in inp.stages[g].graph.input] for g in inp.stages}
    feeds, sfeeds = _feeds(inp.model_dir, inp.m, images, opts.threads, names, ins)
    stats = R.collect(inp.step, feeds, threads=opts.threads, on_feed=on_feed)
    sstats = {
        g: R.collect(inp.stages[g], {0: sfeeds[g]}, threads=opts.threads, on_feed=on_feed)
        for g in inp.stages
    }
    del feeds, sfeeds
    if opts.cache is not None:
        R.save_cache(
            Path(opts.cache),
            inp.m.graph("step").sha256,
            stats,
            stages={g: (inp.m.graph(g).sha256, sstats[g]) for g in inp.stages},
            model=inp.m.name,
            calibration_images=calib_hashes,
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        )
    return Activations(stats, sstats, images, calib_hashes, data_pass=True)


# ---------------------------------------------------------------------------------------------
# 2. ranges: the held-out FP32 reference, and the range method


@dataclass
class Bench:
    """What the method choice, the search and the gate measure with."""

    ev: Evaluator  # the held-out images' FP32 trajectories
    sens_n: int  # images for the per-unit costs (and the method comparison)
    search_n: int  # images the greedy search checks (the gate uses all)


def _fp32_reference(opts: CalibrateOptions, inp: Inputs, images: ImageSet) -> Bench:
    """The held-out images run through the FP32 graphs once (every later score's reference)."""
    ev = Evaluator(inp.model_dir, inp.m, images.held_out, threads=opts.threads)
    return Bench(
        ev,
        sens_n=max(1, min(opts.sens_images, len(images.held_out), inp.m.batch[1])),
        search_n=max(1, min(opts.search_images, len(images.held_out))),
    )


@dataclass
class PlanFactory:
    """The ``PlanBuilder`` of a range method: per-row ranges for the step graph, one set for
    each stage graph, and the nodes kept FP32 for TensorRT (``fixed``)."""

    target: str
    inp: Inputs
    act: Activations

    def __call__(self, method: str, fixed: set[str] | None = None) -> PlanBuilder:
        inp, act = self.inp, self.act
        return PlanBuilder(
            self.target,
            inp.step,
            {t: R.row_ranges(act.step, method, t) for t in inp.rows},
            inp.blocks,
            fixed_exclude=fixed,
            stages={
                g: Stage(inp.stages[g], R.row_ranges(act.stages[g], method, 0), inp.stage_blocks[g])
                for g in inp.stages
            },
            lr_units=(inp.m.tile[0] // inp.m.lr_multiple, inp.m.tile[1] // inp.m.lr_multiple),
        )


@dataclass
class MethodPick:
    """The range method, and how the methods compared when it was chosen (``auto``)."""

    method: str  # the RangeMethod the graphs are written with
    table: list[dict[str, Any]]  # auto: each method's teacher-forced PSNR; else empty


def _choose_method(
    opts: CalibrateOptions,
    inp: Inputs,
    bench: Bench,
    factory: PlanFactory,
    say: Callable[[str], None],
) -> MethodPick:
    """--method as given; auto: the other report's method (--search-from), else the method
    whose fully quantized graphs score best on held-out images."""
    method = opts.method
    if inp.prior is not None and method == MethodChoice.AUTO:
        method = inp.prior["method"]
        say(f"range method: {method} (from {opts.search_from})")
    if method != MethodChoice.AUTO:
        return MethodPick(parse(RangeMethod, method, "--method"), [])
    table = compare_methods(bench.ev, factory, inp.keys, bench.sens_n)
    best = max(table, key=lambda r: r["mean_db"])["method"]
    say(f"range method: {best} (best mean PSNR over the graphs of {', '.join(RangeMethod)})")
    return MethodPick(best, table)


# ---------------------------------------------------------------------------------------------
# 3. sensitivity search


@dataclass
class SearchResult:
    """The search's cost order and how many of it it keeps FP32 (all empty: no search)."""

    table: list[dict[str, Any]] = field(default_factory=list)  # unit costs, in search order
    rows: list[dict[str, Any]] = field(default_factory=list)  # each row quantized alone
    order: list[Unit] = field(default_factory=list)  # the units, most costly first
    keep: int = 0  # the first ``keep`` of ``order`` stay FP32
    trail: list[dict[str, Any]] = field(default_factory=list)  # every score measured


def _search(
    opts: CalibrateOptions, inp: Inputs, bench: Bench, pb: PlanBuilder, say: Callable[[str], None]
) -> SearchResult:
    """The units to keep FP32: another target's search reused, a sensitivity search, or none."""

    def ok(s: Score) -> bool:  # the gate, with a margin
        return s.passes(opts.min_e2e_db, opts.max_drop_db - opts.margin_db)

    if inp.prior is not None:
        return _search_from_prior(opts, inp.prior, inp.keys, bench, pb, ok, say)
    if opts.search:
        return _search_by_sensitivity(opts, inp, bench, pb, ok, say)
    return SearchResult()


def _search_from_prior(
    opts: CalibrateOptions,
    prior: dict[str, Any],
    keys: list[Key],
    bench: Bench,
    pb: PlanBuilder,
    ok: Callable[[Score], bool],
    say: Callable[[str], None],
) -> SearchResult:
    """Another target's cost order: start from its kept count, bisect upwards if needed."""
    found = SearchResult(prior["sensitivity"], prior["rows"])
    found.order = [(r["row"], r["block"]) for r in found.table]
    k0 = min(len(prior["kept_fp32"]), len(found.order))
    say(f"search from {opts.search_from}: {len(found.order)} units, {k0} kept FP32 there")
    k, _ = greedy(
        bench.ev,
        pb,
        keys,
        found.order[k0:],
        ok,
        limit=bench.search_n,
        trail=found.trail,
        fixed=found.order[:k0],
    )
    found.keep = k0 + k
    return found


def _search_by_sensitivity(
    opts: CalibrateOptions,
    inp: Inputs,
    bench: Bench,
    pb: PlanBuilder,
    ok: Callable[[Score], bool],
    say: Callable[[str], None],
) -> SearchResult:
    """Each unit's cost when it alone is INT8, then the fewest most costly kept FP32."""
    # ranked by cost alone, a row that alone keeps the gate with 4x margin stays one unit;
    # ranked per MAC every row is split, so a cheap-to-quantize row is not all or nothing
    # (--coarse: no row / stage is split)
    table, rows = sensitivity(
        bench.ev,
        pb,
        inp.keys,
        images=bench.sens_n,
        refine=lambda sc: (
            not opts.coarse
            and (
                opts.rank == SearchRank.PER_MAC
                or not sc.passes(opts.min_e2e_db, opts.max_drop_db / 4)
            )
        ),
        rank=opts.rank,
    )
    for r in table:
        say(
            f"  cost  t={r['row']}  {r['block']:<16} est. end to end {r['est_e2e_db']:7.2f} dB"
            f"  ({100 * r['mac_share']:5.1f} % of the graph's MACs)"
        )
    found = SearchResult(table, rows, [(r["row"], r["block"]) for r in table])
    found.keep, _ = greedy(
        bench.ev, pb, inp.keys, found.order, ok, limit=bench.search_n, trail=found.trail
    )
    return found


# ---------------------------------------------------------------------------------------------
# 4. the gate, on every held-out image


@dataclass
class Plan:
    """The graphs to write: the units kept FP32, the graphs, and their gate score."""

    pb: PlanBuilder
    fixed: set[str]  # nodes kept FP32 for TensorRT ("stage:node" in the encoder / decoder)
    excluded: list[Unit]  # the units kept FP32
    graphs: dict[Key, bytes | None]  # None: the graph stays FP32
    score: Score
    passed: bool
    rtx: dict[str, Any] = field(default_factory=dict)  # TensorRT-RTX build check per graph


def _passes_gate(opts: CalibrateOptions, s: Score) -> bool:
    return s.passes(opts.min_e2e_db, opts.max_drop_db)


def _gate(
    opts: CalibrateOptions,
    inp: Inputs,
    bench: Bench,
    pb: PlanBuilder,
    fixed: set[str],
    found: SearchResult,
    say: Callable[[str], None],
) -> Plan:
    """The search's plan on all held-out images; one more unit FP32 until the gate holds."""
    keep = found.keep
    while True:
        graphs = pb.plan(inp.keys, set(found.order[:keep]))
        score = bench.ev.score(graphs)
        found.trail.append(
            {"keep_fp32": keep, "images": len(score.per_image_db), "gate": True, **score.to_dict()}
        )
        say(f"gate ({len(score.per_image_db)} held-out images, {keep} units FP32): {score.line()}")
        if _passes_gate(opts, score) or keep >= len(found.order):
            break
        keep += 1
    return Plan(pb, fixed, found.order[:keep], graphs, score, _passes_gate(opts, score))


def _rtx_check(
    opts: CalibrateOptions,
    inp: Inputs,
    bench: Bench,
    factory: PlanFactory,
    method: str,
    plan: Plan,
    say: Callable[[str], None],
) -> None:
    """TensorRT target: TensorRT-RTX builds each graph; the nodes it rejects (found by
    bisection) are kept FP32 and the gate runs again. Updates ``plan``."""
    m, pb = inp.m, plan.pb
    bad: set[str] = set()
    for t, blob in plan.graphs.items():
        if blob is None:
            continue
        ins = m.graph(t).inputs if isinstance(t, str) else m.graph("step").inputs
        if rtx_builds(blob, ins, m):
            plan.rtx[str(t)] = "builds"
            continue
        found = culprits(
            pb.nodes(t, set(plan.excluded)),
            lambda ns, t=t, ins=ins: rtx_builds(pb.graph(t, ns) or b"", ins, m),
        )
        plan.rtx[str(t)] = {"kept_fp32": found}
        bad |= {f"{t}:{n}" if isinstance(t, str) else n for n in found}
    if bad:  # keep them FP32 for this target and gate again
        plan.fixed |= bad
        plan.pb = factory(method, plan.fixed)
        plan.graphs = plan.pb.plan(inp.keys, set(plan.excluded))
        plan.score = bench.ev.score(plan.graphs)
        plan.passed = _passes_gate(opts, plan.score)
        say(f"gate after keeping {len(bad)} TensorRT-rejected nodes FP32: {plan.score.line()}")
    say(f"TensorRT-RTX build check of the row graphs: {plan.rtx}")


def _int8_share(inp: Inputs, plan: Plan, say: Callable[[str], None]) -> dict[str, float]:
    """How much of each graph's compute the plan runs in INT8 (MACs at the tile size)."""
    pb = plan.pb
    share = {
        str(t): round(pb.mac_share(t, pb.nodes(t, set(plan.excluded))), 4)
        for t in inp.keys
        if any(pb.node_macs(t).values())
    }
    say(
        "INT8 share of each graph's MACs: "
        + ", ".join(f"{k} {100 * v:.1f} %" for k, v in share.items())
    )
    return share


def _fidelity(
    bench: Bench, images: ImageSet, plan: Plan, say: Callable[[str], None]
) -> dict[str, float | None]:
    """Per-graph PSNR of the plan vs FP32 (teacher-forced on FP32 inputs, held-out images)."""
    ev = bench.ev
    fidelity: dict[str, float | None] = {}
    n0 = len(images.held_out) if not ev.batches else ev.batches[0][0].stop
    for t, blob in plan.graphs.items():
        if blob is not None:
            mse = ev.stage_mse(t, blob, n0)
            fidelity[str(t)] = round(10 * math.log10(1 / mse), 2) if mse > 0 else None
    if fidelity:
        say(f"per-graph PSNR vs FP32 (teacher-forced, dB): {fidelity}")
    return fidelity


# ---------------------------------------------------------------------------------------------
# 5. reports (the graphs and manifest records: _write below)


def _report(
    opts: CalibrateOptions,
    inp: Inputs,
    act: Activations,
    pick: MethodPick,
    found: SearchResult,
    plan: Plan,
    share: dict[str, float],
    fidelity: dict[str, float | None],
    records: dict[str, GraphRecord],
    times: dict[str, float],
) -> dict[str, Any]:
    """The calibration report (int8-report.<target>.json) as the tile gate left it."""
    return {
        "kind": "deltadiff-int8-calibration",
        "model": inp.m.name,
        "step_sha256": inp.m.graph("step").sha256,
        "target": opts.target,
        "passed": plan.passed,
        "tile_gate_passed": plan.passed,  # the search's check; "passed" is the runtime gate's if run
        "gate": {
            "min_e2e_db": opts.min_e2e_db,
            "max_psnr_y_drop_db": opts.max_drop_db,
            "held_out_images": len(act.images.held_out),
            **plan.score.to_dict(),
        },
        "method": pick.method,
        "methods": pick.table,
        "calibration_images": {
            "count": len(act.calib_hashes),
            "sha256": act.images_sha,
            "files": act.calib_hashes,
        },
        "data_pass": act.data_pass,
        "rows": found.rows,
        "sensitivity": found.table,
        "kept_fp32": [
            {"row": t, "block": b, "nodes": plan.pb.blocks_of(t).get(b, "all")}
            for t, b in plan.excluded
        ],
        "stage_fp32_islands": inp.stage_kept,
        "graph_psnr_db": fidelity,
        "rank": opts.rank if opts.search and inp.prior is None else None,
        "units": inp.units,
        "int8_mac_share": share,
        "tensorrt_fp32_nodes": sorted(plan.fixed),
        "tensorrt_rtx_check": plan.rtx or None,
        "search_trail": found.trail,
        "spread": R.spread_table(act.step),
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "graphs": {k: g.file for k, g in records.items()},
    }


def _after_write(
    opts: CalibrateOptions,
    model_dir: Path,
    passed: bool,
    report: dict[str, Any],
    times: dict[str, float],
    say: Callable[[str], None],
) -> tuple[bool, GateResult | None]:
    """Once the graphs are the model's: their INT8 memory record (onnxruntime) and the runtime
    gate (--gate-data), which then decides ``passed``. Both are added to ``report``."""
    if passed and opts.target == Int8Target.ONNXRUNTIME:
        t0 = time.perf_counter()
        mem = record_int8_memory(model_dir, say)
        if mem is not None:
            times["memory"] = time.perf_counter() - t0
            report["memory"] = {MEMORY_KEY: memory_text(mem)}
    if opts.gate_data is None:
        return passed, None
    with _timed(times, "runtime_gate"):
        passed, report["runtime_gate"], gate = _runtime_gate(opts, model_dir, passed, say)
        report["passed"] = passed
    return passed, gate


def _write_report(model_dir: Path, target: str, report: dict[str, Any]) -> Path:
    """int8-report.<target>.json and its Markdown beside it."""
    rpath = model_dir / f"int8-report.{target}.json"
    write_text_atomic(rpath, json.dumps(report, indent=1) + "\n")
    write_text_atomic(rpath.with_suffix(".md"), report_markdown(report))
    return rpath


def _check_gate_data(folder: Path, calib_hashes: set[str]) -> None:
    """The runtime gate's pairs load, and none of their LR images calibrated the ranges."""
    from deltadiff.manifest import sha256_file

    shared = [p.name for p in load_pairs(folder) if sha256_file(p.lr_path) in calib_hashes]
    if shared:
        raise DeltaDiffError(
            f"--gate-data {folder} holds {len(shared)} calibration image(s) (e.g. {shared[0]}); "
            "gate on pairs the calibration never saw (the corpus's gate split)"
        )


def _runtime_gate(
    opts: CalibrateOptions, model_dir: Path, tile_passed: bool, say: Callable[[str], None]
) -> tuple[bool, dict[str, Any], GateResult | None]:
    """Run the runtime gate on the written INT8 graphs and record its verdict in the manifest
    (``usable`` and ``runtime_gate`` of every INT8 record). Skipped when the tile gate failed:
    the graphs are already recorded as not usable."""
    if not tile_passed:
        return False, {"ran": False, "why": "the tile gate failed; graphs not usable"}, None
    say(f"runtime gate: the images of {opts.gate_data} through the runtime, FP32 vs INT8")
    res = run_gate(
        GateOptions(
            model=model_dir,
            data=Path(opts.gate_data),  # type: ignore[arg-type]
            precision="int8",
            target=opts.target,
            out=model_dir,
            cache=opts.gate_cache,
            threads=opts.threads,
        ),
        progress=say,
    )
    record_gate(model_dir, res)
    say(res.line())
    rec = {
        "ran": True,
        **res.summary(),
        "report": res.report_path.name if res.report_path else None,
        "criteria": [
            {"name": c.name, "value_db": round(c.value, 4), "limit_db": c.limit, "where": c.where}
            for c in res.criteria
        ],
    }
    return res.passed, rec, res


MEMORY_KEY = record_key("onnxruntime", "int8", "staged")


def record_int8_memory(model_dir: Path, say: Callable[[str], None]) -> dict[str, Any] | None:
    """Measure the INT8 graphs' peak RSS at the sizes of the model's FP32 record and record it.

    ``dd-run`` sizes whole-image CPU runs from these records; without one for INT8 it keeps INT8
    runs inside the exported tile (a 128x128 demo image ran as four overlapping 68x68 tiles,
    slower than FP32 run whole). Static models and models without an FP32 record: nothing to do.
    """
    m = load_manifest(model_dir)
    fp32 = m.memory.get(record_key("onnxruntime", "fp32", "staged"))
    if not m.dynamic or fp32 is None:
        return None
    sizes = [(int(p["lr"][0]), int(p["lr"][1])) for p in fp32["points"]]
    say(f"INT8 peak memory at LR {', '.join(f'{h}x{w}' for h, w in sizes)} (fresh process each)")
    try:
        rec = measure_memory(
            model_dir, sizes, precision="int8", threads=int(fp32.get("threads", 0))
        )
    except DeltaDiffError as exc:
        say(f"INT8 memory not recorded ({exc}); dd-run keeps INT8 CPU runs inside the tile")
        return None
    update_manifest(model_dir, lambda cur: replace(cur, memory={**cur.memory, MEMORY_KEY: rec}))
    say(f"{MEMORY_KEY}: {memory_text(rec)}")
    return rec


def _write(
    opts: CalibrateOptions,
    inp: Inputs,
    act: Activations,
    method: str,
    plan: Plan,
    fidelity: dict[str, float | None],
) -> dict[str, GraphRecord]:
    """The INT8 records of every graph: graph files first, then the manifest swap."""
    target = opts.target
    common = _quant_common(target, method, act, plan)
    new: dict[str, GraphRecord] = {}
    for g in ("encoder", "decoder"):
        new[graph_key(g, "int8", target)] = _stage_record(target, inp, g, plan, common, fidelity)
    new.update(_row_records(target, inp, plan, common, fidelity))
    _swap(inp.model_dir, new, target)
    return new


def _quant_common(target: str, method: str, act: Activations, plan: Plan) -> dict[str, Any]:
    """What every INT8 record's ``quant`` starts with."""
    return {
        "method": method,
        "calibration_images": {"count": len(act.calib_hashes), "sha256": act.images_sha},
        "held_out_images": len(act.images.held_out),
        "usable": plan.passed,
        "gate": plan.score.to_dict() | {"passed": plan.passed},
        "report": f"int8-report.{target}.json",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def _trt_kept(fixed: set[str], stage: str | None) -> list[dict[str, Any]]:
    """The ``kept_fp32`` entry of the nodes TensorRT-RTX rejected in a stage (None: the step)."""
    if stage is None:
        nodes = sorted(n for n in fixed if ":" not in n)
    else:
        nodes = sorted(n.split(":", 1)[1] for n in fixed if n.startswith(f"{stage}:"))
    why = "TensorRT-RTX Myelin rejects these Q/DQ patterns"
    return [{"nodes": nodes, "why": why}] if nodes else []


def _store(model_dir: Path, name: str, target: str, blob: bytes) -> tuple[str, str]:
    """Write a graph under its content-hashed name (once); (file, sha256)."""
    digest = hashlib.sha256(blob).hexdigest()
    file = f"{name}.int8.{target}.{digest[:10]}.onnx"
    if not (model_dir / file).exists():
        write_bytes_atomic(model_dir / file, blob)
    return file, digest


def _stage_record(
    target: str,
    inp: Inputs,
    g: str,
    plan: Plan,
    common: dict[str, Any],
    fidelity: dict[str, float | None],
) -> GraphRecord:
    """The INT8 record of the encoder or decoder (the FP32 file where nothing is quantized)."""
    import onnx

    src = inp.m.graph(g)
    if g not in inp.stage_kept:
        q = {**common, "int8_nodes": 0, "why": "no Conv/MatMul worth quantizing: FP32"}
        return replace(src, precision="int8", target=target, quant=q)
    kept = [
        {"block": b, "why": f"sensitivity: costs most when the {g} alone is INT8"}
        for (r, b) in plan.excluded
        if r == g
    ]
    kept += inp.stage_kept[g] + _trt_kept(plan.fixed, g)
    blob = plan.graphs.get(g)
    if blob is None:
        q = {**common, "int8_nodes": 0, "kept_fp32": kept, "why": f"{g} kept FP32 by the search"}
        return replace(src, precision="int8", target=target, quant=q)
    file, digest = _store(inp.model_dir, g, target, blob)
    fp32 = onnx.load(str(verify_graph(inp.model_dir, src, what=g)))
    q = {
        **common,
        "int8_nodes": len(quantized_nodes(onnx.load_from_string(blob))),
        "candidates": len(stage_candidates(fp32, g)[0]),
        "kept_fp32": kept,
        "psnr_vs_fp32_db": fidelity.get(g),
    }
    return replace(
        src, file=file, sha256=digest, bytes=len(blob), precision="int8", target=target, quant=q
    )


def _row_records(
    target: str,
    inp: Inputs,
    plan: Plan,
    common: dict[str, Any],
    fidelity: dict[str, float | None],
) -> dict[str, GraphRecord]:
    """The INT8 record of each row's step graph (the FP32 file for a row kept FP32)."""
    import onnx

    step = inp.m.graph("step")
    fp32 = onnx.load(str(verify_graph(inp.model_dir, step, what="graph step")))
    candidates = len(quantizable_nodes(fp32))
    out: dict[str, GraphRecord] = {}
    for t, blob in plan.graphs.items():
        if isinstance(t, str):
            continue
        kept = [
            {"block": b, "why": f"sensitivity: costs most when quantized at t={t}"}
            for (r, b) in plan.excluded
            if r == t
        ] + _trt_kept(plan.fixed, None)
        row = {**common, "row": t}
        key = graph_key(f"step@{t}", "int8", target)
        if blob is None:
            q = {
                **row,
                "int8_nodes": 0,
                "kept_fp32": kept or "all",
                "why": "row kept FP32 by the search",
            }
            out[key] = replace(step, precision="int8", target=target, quant=q)
            continue
        file, digest = _store(inp.model_dir, f"step@{t}", target, blob)
        q = {
            **row,
            "int8_nodes": len(quantized_nodes(onnx.load_from_string(blob))),
            "candidates": candidates,
            "kept_fp32": kept,
            "psnr_vs_fp32_db": fidelity.get(str(t)),
        }
        out[key] = replace(
            step,
            file=file,
            sha256=digest,
            bytes=len(blob),
            precision="int8",
            target=target,
            quant=q,
        )
    return out


def _swap(model_dir: Path, new: dict[str, GraphRecord], target: str) -> None:
    """From here on the new graphs are the model's (read-modify-write under the lock); the
    target's INT8 files no record references any more are removed."""
    m2 = update_manifest(model_dir, lambda cur: _swap_int8(cur, new, target))
    referenced = {g.file for g in m2.graphs.values()}
    for pat in ("step@*", "encoder", "decoder"):
        for p in model_dir.glob(f"{pat}.int8.{target}.*.onnx"):
            if p.name not in referenced:
                p.unlink(missing_ok=True)


def _swap_int8(m: Manifest, new: dict[str, GraphRecord], target: str) -> Manifest:
    """``m`` with ``target``'s INT8 graphs replaced by ``new``, less the records they outdate."""
    graphs = {
        k: g
        for k, g in m.graphs.items()
        if not (g.precision == "int8" and (g.target or DEFAULT_INT8_TARGET) == target)
    }
    graphs.update(new)
    stale_engines = [
        e
        for e in m.engines
        if not (e.get("precision") == "int8" and e.get("flavour") and target == Int8Target.TENSORRT)
    ]
    # an INT8 memory record measured the graphs this run replaces
    memory = {
        k: v
        for k, v in m.memory.items()
        if not (target == Int8Target.ONNXRUNTIME and k == MEMORY_KEY)
    }
    return replace(m, graphs=graphs, engines=stale_engines, memory=memory)


def report_markdown(rep: dict[str, Any]) -> str:
    lines = [
        f"# INT8 calibration: {rep['model']} ({rep['target']})",
        "",
    ]
    for section in (
        _md_runtime_gate,
        _md_gate,
        _md_methods,
        _md_fidelity,
        _md_rows,
        _md_mac_share,
        _md_sensitivity,
        _md_trail,
    ):
        lines += section(rep)
    return "\n".join(lines) + "\n"


def _md_runtime_gate(rep: dict[str, Any]) -> list[str]:
    rt = rep.get("runtime_gate")
    if not rt:
        return []
    return [
        f"**Runtime gate {'PASSED' if rt.get('passed') else 'FAILED'}**"
        + (
            f" on {rt['images']} images run through the runtime ({rt['data']}): "
            + ", ".join(
                f"{c['name']} {c['value_db']:+.3f} dB (limit {c['limit_db']:+.2f})"
                for c in rt["criteria"]
            )
            + f"; report {rt['report']}. It decides whether the graphs are usable."
            if rt.get("ran")
            else f": not run ({rt.get('why')})."
        ),
        "",
    ]


def _md_gate(rep: dict[str, Any]) -> list[str]:
    g = rep["gate"]
    rt = rep.get("runtime_gate")
    return [
        f"**{'Tile gate' if rt else 'Gate'} "
        f"{'PASSED' if rep.get('tile_gate_passed', rep['passed']) else 'FAILED'}** on {g['held_out_images']} held-out images "
        f"(never used for calibration): end to end vs FP32 worst {g['e2e_vs_fp32_min_db']} dB "
        f"(mean {g['e2e_vs_fp32_mean_db']}, min {g['min_e2e_db']})"
        + (
            f"; PSNR-Y vs HR {g['psnr_y_hr_db']} dB vs FP32 {g['psnr_y_hr_fp32_db']} dB "
            f"(delta {g['psnr_y_hr_delta_db']:+.4f}, limit -{g['max_psnr_y_drop_db']})"
            if g.get("psnr_y_hr_delta_db") is not None
            else "; no HR pairs (PSNR-Y gate not run)"
        ),
        "",
        f"Range method: **{rep['method']}**; calibration images: {rep['calibration_images']['count']} "
        f"(sha256 {rep['calibration_images']['sha256'][:12]}…); data pass: {rep['data_pass']}.",
        "",
    ]


def _md_methods(rep: dict[str, Any]) -> list[str]:
    if not rep["methods"]:
        return []
    lines = [
        f"| method | PSNR per graph ({', '.join(rep['methods'][0]['step_db'])}), dB | worst | mean |",
        "|---|---|---:|---:|",
    ]
    for r in rep["methods"]:
        lines.append(
            f"| {r['method']} | {' / '.join(str(v) for v in r['step_db'].values())} | {r['min_db']} | {r['mean_db']} |"
        )
    return [*lines, ""]


def _md_fidelity(rep: dict[str, Any]) -> list[str]:
    if not rep.get("graph_psnr_db"):
        return []
    g = rep["gate"]
    return [
        "Per-graph fidelity of the written graphs (teacher-forced on FP32 inputs, PSNR vs FP32 "
        "output): "
        + ", ".join(f"{k} {v} dB" for k, v in rep["graph_psnr_db"].items())
        + (
            f"; VQ codes flipped end to end: {100 * g['vq_codes_flipped']:.3f} %"
            if g.get("vq_codes_flipped") is not None
            else ""
        ),
        "",
    ]


def _md_rows(rep: dict[str, Any]) -> list[str]:
    if not rep["rows"]:
        return []
    lines = [
        "| row quantized alone | step PSNR | end to end vs FP32 | PSNR-Y delta |",
        "|---|---:|---:|---:|",
    ]
    for r in rep["rows"]:
        lines.append(
            f"| t={r['row']} | {r['step_db']} dB | {r['e2e_db']} dB | {r.get('psnr_y_hr_delta_db', '')} |"
        )
    return [*lines, ""]


def _md_mac_share(rep: dict[str, Any]) -> list[str]:
    if not rep.get("int8_mac_share"):
        return []
    return [
        "INT8 share of each graph's MACs: "
        + ", ".join(f"{k} {100 * v:.1f} %" for k, v in rep["int8_mac_share"].items())
        + (
            f" (search order: {rep['rank']}, units: {rep.get('units', 'block')})"
            if rep.get("rank")
            else ""
        ),
        "",
    ]


def _md_sensitivity(rep: dict[str, Any]) -> list[str]:
    if not rep["sensitivity"]:
        return []
    kept = {(k["row"], k["block"]) for k in rep["kept_fp32"]}
    lines = [
        "| row | block | nodes | MAC share | est. end to end when alone INT8 | kept FP32 |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rep["sensitivity"]:
        blk = "whole row" if r["block"] == "*" else r["block"]
        share = f"{100 * r['mac_share']:.1f} %" if "mac_share" in r else ""
        lines.append(
            f"| t={r['row']} | {blk} | {r['nodes']} | {share} | {r['est_e2e_db']} dB | {'yes' if (r['row'], r['block']) in kept else ''} |"
        )
    return [*lines, ""]


def _md_trail(rep: dict[str, Any]) -> list[str]:
    if not rep["search_trail"]:
        return []
    lines = [
        "| units kept FP32 | images | e2e worst | PSNR-Y delta |",
        "|---:|---:|---:|---:|",
    ]
    for r in rep["search_trail"]:
        lines.append(
            f"| {r['keep_fp32']} | {r['images']} | {r['e2e_vs_fp32_min_db']} | {r.get('psnr_y_hr_delta_db')} |"
        )
    return [*lines, ""]
