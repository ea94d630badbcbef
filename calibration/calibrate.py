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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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
from deltadiff.calibration.qdq import TARGETS, quantizable_nodes, quantized_nodes, stage_candidates
from deltadiff.calibration.search import (
    RANKS,
    UNITS,
    Key,
    PlanBuilder,
    Stage,
    greedy,
    node_blocks,
    sensitivity,
)
from deltadiff.calibration.trt_check import culprits, rtx_available, rtx_builds
from deltadiff.errors import DeltaDiffError, ManifestError
from deltadiff.manifest import (
    INT8_TARGETS,
    GraphRecord,
    Manifest,
    graph_key,
    load_manifest,
    update_manifest,
    verify_graph,
)
from deltadiff.runtime.memory_budget import measure as measure_memory
from deltadiff.runtime.memory_budget import memory_text, record_key

log = logging.getLogger(__name__)

STAGED = ("encoder", "step", "decoder")
METHOD_CHOICES = ("auto", *R.METHODS)


@dataclass(frozen=True)
class CalibrateOptions:
    model: Path
    data: Path
    target: str = "onnxruntime"
    method: str = "auto"
    samples: int = 4
    cache: Path | None = None
    threads: int = 0
    search: bool = True
    coarse: bool = False  # search units are whole graphs (rows, encoder, decoder), not blocks
    rank: str = "per-mac"  # search order: cost per MAC moved to INT8, or cost alone ("cost")
    units: str = "block"  # search unit inside a row: a UNet block, or one layer ("layer")
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
    for meth in R.METHODS:
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
    import onnx

    say = progress or log.info
    if opts.target not in TARGETS:
        raise DeltaDiffError(f"--target {opts.target!r}: choose one of {', '.join(TARGETS)}")
    if opts.rank not in RANKS:
        raise DeltaDiffError(f"--rank {opts.rank!r}: choose one of {', '.join(RANKS)}")
    if opts.units not in UNITS:
        raise DeltaDiffError(f"--units {opts.units!r}: choose one of {', '.join(UNITS)}")
    if opts.method not in METHOD_CHOICES:
        raise DeltaDiffError(f"--method {opts.method!r}: choose one of {', '.join(METHOD_CHOICES)}")
    if opts.gate_data is not None and opts.target != "onnxruntime":
        raise DeltaDiffError(
            f"--gate-data runs the INT8 graphs through onnxruntime; use it with --target "
            f"onnxruntime (got --target {opts.target})"
        )
    model_dir = Path(opts.model)
    m = _check_fp32(model_dir)
    step_rec = m.graph("step")
    model = onnx.load(str(verify_graph(model_dir, step_rec, what="graph step")))
    names = [i.name for i in model.graph.input]
    rows = [r.t for r in m.step_table.rows]
    times: dict[str, float] = {}
    # the VQ-f4 encoder / decoder of the latent families (the pixel family has no candidates)
    smodels: dict[str, Any] = {}
    scand: dict[str, tuple[list[str], list[dict[str, Any]]]] = {}
    for g in ("encoder", "decoder"):
        sm = onnx.load(str(verify_graph(model_dir, m.graph(g), what=f"graph {g}")))
        nodes, kept = stage_candidates(sm, g)
        if nodes:
            smodels[g], scand[g] = sm, (nodes, kept)
    prior = _prior_search(Path(opts.search_from), m) if opts.search_from is not None else None
    # another target's search is reused unit for unit: its unit names are its granularity's
    units = prior.get("units", "block") if prior is not None else opts.units
    sblocks = {g: node_blocks(smodels[g], set(scand[g][0]), units) for g in smodels}
    keys: list[Key] = [*(["encoder"] if "encoder" in smodels else []), *rows]
    keys += ["decoder"] if "decoder" in smodels else []

    # ---- data: cache or a pass over the calibration images
    t0 = time.perf_counter()
    images = load_images(opts.data, opts.samples)
    calib_hashes = sorted(im.sha256 for im in images.calib)
    data_pass = True
    if opts.cache is not None and Path(opts.cache).exists():
        stats, meta = R.load_cache(Path(opts.cache), step_rec.sha256)
        sstats = {g: R.stage_stats(Path(opts.cache), meta, g, m.graph(g).sha256) for g in smodels}
        data_pass = False
        calib_hashes = list(meta.get("calibration_images", []))
        # the gate must never see a calibration image: hold out what the cache did not use
        every = images.calib + images.held_out
        held = [im for im in every if im.sha256 not in set(calib_hashes)]
        if len(held) < 2:
            raise CalibrationDataError(
                f"--data {opts.data} has fewer than 2 images the cached calibration did not use; "
                "add held-out images or delete the cache"
            )
        images = ImageSet(images.folder, [], held, images.paired)
        say(
            f"ranges from cache {opts.cache} (no data pass; {len(calib_hashes)} calibration images)"
        )
    else:
        say(f"data pass: {len(images.calib)} images x {len(rows)} rows through the FP32 graphs")
        ins = {g: [i.name for i in smodels[g].graph.input] for g in smodels}
        feeds, sfeeds = _feeds(model_dir, m, images, opts.threads, names, ins)
        stats = R.collect(model, feeds, threads=opts.threads, on_feed=on_feed)
        sstats = {
            g: R.collect(smodels[g], {0: sfeeds[g]}, threads=opts.threads, on_feed=on_feed)
            for g in smodels
        }
        del feeds, sfeeds
        if opts.cache is not None:
            R.save_cache(
                Path(opts.cache),
                step_rec.sha256,
                stats,
                stages={g: (m.graph(g).sha256, sstats[g]) for g in smodels},
                model=m.name,
                calibration_images=calib_hashes,
                created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            )
    times["data"] = time.perf_counter() - t0
    if opts.gate_data is not None:
        _check_gate_data(Path(opts.gate_data), set(calib_hashes))
    images_sha = hashlib.sha256("".join(calib_hashes).encode()).hexdigest()

    # ---- held-out FP32 trajectories
    t0 = time.perf_counter()
    ev = Evaluator(model_dir, m, images.held_out, threads=opts.threads)
    times["fp32_reference"] = time.perf_counter() - t0
    blocks = node_blocks(model, units=units)
    sens_n = max(1, min(opts.sens_images, len(images.held_out), m.batch[1]))
    search_n = max(1, min(opts.search_images, len(images.held_out)))

    # ---- range method
    t0 = time.perf_counter()

    def builder(meth: str, fixed: set[str] | None = None) -> PlanBuilder:
        return PlanBuilder(
            opts.target,
            model,
            {t: R.row_ranges(stats, meth, t) for t in rows},
            blocks,
            fixed_exclude=fixed,
            stages={
                g: Stage(smodels[g], R.row_ranges(sstats[g], meth, 0), sblocks[g]) for g in smodels
            },
            lr_units=(m.tile[0] // m.lr_multiple, m.tile[1] // m.lr_multiple),
        )

    methods_table: list[dict[str, Any]] = []
    method = opts.method
    if prior is not None and method == "auto":
        method = prior["method"]
        say(f"range method: {method} (from {opts.search_from})")
    if method == "auto":
        methods_table = compare_methods(ev, builder, keys, sens_n)
        method = max(methods_table, key=lambda r: r["mean_db"])["method"]
        say(f"range method: {method} (best mean PSNR over the graphs of {', '.join(R.METHODS)})")
    times["methods"] = time.perf_counter() - t0
    fixed = set(opts.tensorrt_fp32) if opts.target == "tensorrt" else set()
    pb = builder(method, fixed)

    # ---- sensitivity search
    t0 = time.perf_counter()
    table, row_table, trail = [], [], []
    order: list[tuple[int, str]] = []
    keep = 0

    def ok_search(s: Score) -> bool:
        return s.passes(opts.min_e2e_db, opts.max_drop_db - opts.margin_db)

    def ok_gate(s: Score) -> bool:
        return s.passes(opts.min_e2e_db, opts.max_drop_db)

    if prior is not None:
        # another target's cost order: start from its kept count, bisect upwards if needed
        table, row_table = prior["sensitivity"], prior["rows"]
        order = [(r["row"], r["block"]) for r in table]
        k0 = min(len(prior["kept_fp32"]), len(order))
        say(f"search from {opts.search_from}: {len(order)} units, {k0} kept FP32 there")
        k, _ = greedy(
            ev, pb, keys, order[k0:], ok_search, limit=search_n, trail=trail, fixed=order[:k0]
        )
        keep = k0 + k
    elif opts.search:
        # ranked by cost alone, a row that alone keeps the gate with 4x margin stays one unit;
        # ranked per MAC every row is split, so a cheap-to-quantize row is not all or nothing
        # (--coarse: no row / stage is split)
        table, row_table = sensitivity(
            ev,
            pb,
            keys,
            images=sens_n,
            refine=lambda sc: (
                not opts.coarse
                and (opts.rank == "per-mac" or not sc.passes(opts.min_e2e_db, opts.max_drop_db / 4))
            ),
            rank=opts.rank,
        )
        for r in table:
            say(
                f"  cost  t={r['row']}  {r['block']:<16} est. end to end {r['est_e2e_db']:7.2f} dB"
                f"  ({100 * r['mac_share']:5.1f} % of the graph's MACs)"
            )
        order = [(r["row"], r["block"]) for r in table]
        keep, _ = greedy(ev, pb, keys, order, ok_search, limit=search_n, trail=trail)
    times["search"] = time.perf_counter() - t0

    # ---- the gate, on every held-out image
    t0 = time.perf_counter()
    while True:
        plan = pb.plan(keys, set(order[:keep]))
        score = ev.score(plan)
        trail.append(
            {"keep_fp32": keep, "images": len(score.per_image_db), "gate": True, **score.to_dict()}
        )
        say(f"gate ({len(score.per_image_db)} held-out images, {keep} units FP32): {score.line()}")
        if ok_gate(score) or keep >= len(order):
            break
        keep += 1
    times["gate"] = time.perf_counter() - t0
    passed = ok_gate(score)
    excluded = order[:keep]
    rtx: dict[str, Any] = {}
    if opts.target == "tensorrt" and opts.rtx_check and passed and rtx_available():
        t0 = time.perf_counter()
        bad: set[str] = set()
        for t, blob in plan.items():
            if blob is None:
                continue
            ins = m.graph(t).inputs if isinstance(t, str) else step_rec.inputs
            if rtx_builds(blob, ins, m):
                rtx[str(t)] = "builds"
                continue
            nodes = pb.nodes(t, set(excluded))
            found = culprits(
                nodes, lambda ns, t=t, ins=ins: rtx_builds(pb.graph(t, ns) or b"", ins, m)
            )
            rtx[str(t)] = {"kept_fp32": found}
            bad |= {f"{t}:{n}" if isinstance(t, str) else n for n in found}
        if bad:  # keep them FP32 for this target and gate again
            fixed |= bad
            pb = builder(method, fixed)
            plan = pb.plan(keys, set(excluded))
            score = ev.score(plan)
            passed = ok_gate(score)
            say(f"gate after keeping {len(bad)} TensorRT-rejected nodes FP32: {score.line()}")
        say(f"TensorRT-RTX build check of the row graphs: {rtx}")
        times["rtx_check"] = time.perf_counter() - t0

    # ---- how much of each graph's compute the plan runs in INT8 (MACs at the tile size)
    int8_share = {
        str(t): round(pb.mac_share(t, pb.nodes(t, set(excluded))), 4)
        for t in keys
        if any(pb.node_macs(t).values())
    }
    say(
        "INT8 share of each graph's MACs: "
        + ", ".join(f"{k} {100 * v:.1f} %" for k, v in int8_share.items())
    )

    # ---- per-graph fidelity of the final plan (teacher-forced on FP32 inputs, held-out images)
    fidelity: dict[str, Any] = {}
    n0 = len(images.held_out) if not ev.batches else ev.batches[0][0].stop
    for t, blob in plan.items():
        if blob is not None:
            mse = ev.stage_mse(t, blob, n0)
            fidelity[str(t)] = round(10 * math.log10(1 / mse), 2) if mse > 0 else None
    if fidelity:
        say(f"per-graph PSNR vs FP32 (teacher-forced, dB): {fidelity}")

    # ---- write graphs + manifest (atomically) and the report
    rel = _write(
        model_dir,
        m,
        opts,
        plan=plan,
        method=method,
        excluded=excluded,
        table=table,
        score=score,
        passed=passed,
        images=(len(calib_hashes), images_sha, len(images.held_out)),
        blocks=blocks,
        fixed=fixed,
        stage_kept={g: scand[g][1] for g in scand},
        fidelity=fidelity,
    )
    report = {
        "kind": "deltadiff-int8-calibration",
        "model": m.name,
        "step_sha256": step_rec.sha256,
        "target": opts.target,
        "passed": passed,
        "tile_gate_passed": passed,  # the search's check; "passed" is the runtime gate's if run
        "gate": {
            "min_e2e_db": opts.min_e2e_db,
            "max_psnr_y_drop_db": opts.max_drop_db,
            "held_out_images": len(images.held_out),
            **score.to_dict(),
        },
        "method": method,
        "methods": methods_table,
        "calibration_images": {
            "count": len(calib_hashes),
            "sha256": images_sha,
            "files": calib_hashes,
        },
        "data_pass": data_pass,
        "rows": row_table,
        "sensitivity": table,
        "kept_fp32": [
            {"row": t, "block": b, "nodes": pb.blocks_of(t).get(b, "all")} for t, b in excluded
        ],
        "stage_fp32_islands": {g: scand[g][1] for g in scand},
        "graph_psnr_db": fidelity,
        "rank": opts.rank if opts.search and prior is None else None,
        "units": units,
        "int8_mac_share": int8_share,
        "tensorrt_fp32_nodes": sorted(fixed),
        "tensorrt_rtx_check": rtx or None,
        "search_trail": trail,
        "spread": R.spread_table(stats),
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "graphs": {k: g.file for k, g in rel.items()},
    }
    if passed and opts.target == "onnxruntime":
        t0 = time.perf_counter()
        mem = record_int8_memory(model_dir, say)
        if mem is not None:
            times["memory"] = time.perf_counter() - t0
            report["memory"] = {MEMORY_KEY: memory_text(mem)}
    gate = None
    if opts.gate_data is not None:
        t0 = time.perf_counter()
        passed, report["runtime_gate"], gate = _runtime_gate(opts, model_dir, passed, say)
        report["passed"] = passed
        times["runtime_gate"] = time.perf_counter() - t0
    rpath = model_dir / f"int8-report.{opts.target}.json"
    write_text_atomic(rpath, json.dumps(report, indent=1) + "\n")
    write_text_atomic(rpath.with_suffix(".md"), report_markdown(report))
    return CalibrationResult(
        passed, score, method, opts.target, rel, report, rpath, data_pass, times, gate
    )


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
    model_dir: Path,
    m: Manifest,
    opts: CalibrateOptions,
    *,
    plan: dict[Key, bytes | None],
    method: str,
    excluded: list[tuple[int, str]],
    table: list[dict[str, Any]],
    score: Score,
    passed: bool,
    images: tuple[int, str, int],
    blocks: dict[str, list[str]],
    fixed: set[str],
    stage_kept: dict[str, list[dict[str, Any]]],
    fidelity: dict[str, Any],
) -> dict[str, GraphRecord]:
    import onnx

    target = opts.target
    n_img, sha_img, n_held = images
    common = {
        "method": method,
        "calibration_images": {"count": n_img, "sha256": sha_img},
        "held_out_images": n_held,
        "usable": passed,
        "gate": score.to_dict() | {"passed": passed},
        "report": f"int8-report.{target}.json",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    new: dict[str, GraphRecord] = {}
    written: list[str] = []
    for g in ("encoder", "decoder"):
        src = m.graph(g)
        blob = plan.get(g)
        if g not in stage_kept:
            q = {**common, "int8_nodes": 0, "why": "no Conv/MatMul worth quantizing: FP32"}
            new[graph_key(g, "int8", target)] = replace(
                src, precision="int8", target=target, quant=q
            )
            continue
        kept = [
            {"block": b, "why": f"sensitivity: costs most when the {g} alone is INT8"}
            for (r, b) in excluded
            if r == g
        ] + stage_kept[g]
        tfixed = sorted(n.split(":", 1)[1] for n in fixed if n.startswith(f"{g}:"))
        if tfixed:
            kept.append({"nodes": tfixed, "why": "TensorRT-RTX Myelin rejects these Q/DQ patterns"})
        if blob is None:
            q = {
                **common,
                "int8_nodes": 0,
                "kept_fp32": kept,
                "why": f"{g} kept FP32 by the search",
            }
            new[graph_key(g, "int8", target)] = replace(
                src, precision="int8", target=target, quant=q
            )
            continue
        digest = hashlib.sha256(blob).hexdigest()
        file = f"{g}.int8.{target}.{digest[:10]}.onnx"
        if not (model_dir / file).exists():
            write_bytes_atomic(model_dir / file, blob)
        q = {
            **common,
            "int8_nodes": len(quantized_nodes(onnx.load_from_string(blob))),
            "candidates": len(
                stage_candidates(onnx.load(str(verify_graph(model_dir, src, what=g))), g)[0]
            ),
            "kept_fp32": kept,
            "psnr_vs_fp32_db": fidelity.get(g),
        }
        new[graph_key(g, "int8", target)] = replace(
            src, file=file, sha256=digest, bytes=len(blob), precision="int8", target=target, quant=q
        )
    step = m.graph("step")
    cand = quantizable_nodes(onnx.load(str(verify_graph(model_dir, step, what="graph step"))))
    for t, blob in plan.items():
        if isinstance(t, str):
            continue
        key = graph_key(f"step@{t}", "int8", target)
        kept = [
            {"block": b, "why": f"sensitivity: costs most when quantized at t={t}"}
            for (r, b) in excluded
            if r == t
        ]
        sfixed = sorted(n for n in fixed if ":" not in n)
        if sfixed:
            kept.append({"nodes": sfixed, "why": "TensorRT-RTX Myelin rejects these Q/DQ patterns"})
        if blob is None:
            new[key] = replace(
                step,
                precision="int8",
                target=target,
                quant={
                    **common,
                    "row": t,
                    "int8_nodes": 0,
                    "kept_fp32": kept or "all",
                    "why": "row kept FP32 by the search",
                },
            )
            continue
        digest = hashlib.sha256(blob).hexdigest()
        file = f"step@{t}.int8.{target}.{digest[:10]}.onnx"
        if not (model_dir / file).exists():
            write_bytes_atomic(model_dir / file, blob)
        written.append(file)
        n_int8 = len(quantized_nodes(onnx.load_from_string(blob)))
        new[key] = replace(
            step,
            file=file,
            sha256=digest,
            bytes=len(blob),
            precision="int8",
            target=target,
            quant={
                **common,
                "row": t,
                "int8_nodes": n_int8,
                "candidates": len(cand),
                "kept_fp32": kept,
                "psnr_vs_fp32_db": fidelity.get(str(t)),
            },
        )
    # the swap: from here on the new graphs are the model's (read-modify-write under the lock)
    m2 = update_manifest(model_dir, lambda cur: _swap_int8(cur, new, target))
    referenced = {g.file for g in m2.graphs.values()}
    for pat in ("step@*", "encoder", "decoder"):
        for p in model_dir.glob(f"{pat}.int8.{target}.*.onnx"):
            if p.name not in referenced:
                p.unlink(missing_ok=True)
    return new


def _swap_int8(m: Manifest, new: dict[str, GraphRecord], target: str) -> Manifest:
    """``m`` with ``target``'s INT8 graphs replaced by ``new``, less the records they outdate."""
    graphs = {
        k: g
        for k, g in m.graphs.items()
        if not (g.precision == "int8" and (g.target or INT8_TARGETS[0]) == target)
    }
    graphs.update(new)
    stale_engines = [
        e
        for e in m.engines
        if not (e.get("precision") == "int8" and e.get("flavour") and target == "tensorrt")
    ]
    # an INT8 memory record measured the graphs this run replaces
    memory = {
        k: v for k, v in m.memory.items() if not (target == "onnxruntime" and k == MEMORY_KEY)
    }
    return replace(m, graphs=graphs, engines=stale_engines, memory=memory)


def report_markdown(rep: dict[str, Any]) -> str:
    g = rep["gate"]
    rt = rep.get("runtime_gate")
    lines = [
        f"# INT8 calibration: {rep['model']} ({rep['target']})",
        "",
    ]
    if rt:
        lines += [
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
    lines += [
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
    if rep["methods"]:
        lines += [
            f"| method | PSNR per graph ({', '.join(rep['methods'][0]['step_db'])}), dB | worst | mean |",
            "|---|---|---:|---:|",
        ]
        for r in rep["methods"]:
            lines.append(
                f"| {r['method']} | {' / '.join(str(v) for v in r['step_db'].values())} | {r['min_db']} | {r['mean_db']} |"
            )
        lines.append("")
    if rep.get("graph_psnr_db"):
        lines += [
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
    if rep["rows"]:
        lines += [
            "| row quantized alone | step PSNR | end to end vs FP32 | PSNR-Y delta |",
            "|---|---:|---:|---:|",
        ]
        for r in rep["rows"]:
            lines.append(
                f"| t={r['row']} | {r['step_db']} dB | {r['e2e_db']} dB | {r.get('psnr_y_hr_delta_db', '')} |"
            )
        lines.append("")
    if rep.get("int8_mac_share"):
        lines += [
            "INT8 share of each graph's MACs: "
            + ", ".join(f"{k} {100 * v:.1f} %" for k, v in rep["int8_mac_share"].items())
            + (
                f" (search order: {rep['rank']}, units: {rep.get('units', 'block')})"
                if rep.get("rank")
                else ""
            ),
            "",
        ]
    if rep["sensitivity"]:
        kept = {(k["row"], k["block"]) for k in rep["kept_fp32"]}
        lines += [
            "| row | block | nodes | MAC share | est. end to end when alone INT8 | kept FP32 |",
            "|---|---|---:|---:|---:|---|",
        ]
        for r in rep["sensitivity"]:
            blk = "whole row" if r["block"] == "*" else r["block"]
            share = f"{100 * r['mac_share']:.1f} %" if "mac_share" in r else ""
            lines.append(
                f"| t={r['row']} | {blk} | {r['nodes']} | {share} | {r['est_e2e_db']} dB | {'yes' if (r['row'], r['block']) in kept else ''} |"
            )
        lines.append("")
    if rep["search_trail"]:
        lines += [
            "| units kept FP32 | images | e2e worst | PSNR-Y delta |",
            "|---:|---:|---:|---:|",
        ]
        for r in rep["search_trail"]:
            lines.append(
                f"| {r['keep_fp32']} | {r['images']} | {r['e2e_vs_fp32_min_db']} | {r.get('psnr_y_hr_delta_db')} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"
