"""Bench report writers (JSON, Markdown, PNG plots) and the regression comparison.

Everything here reads the report *dict* (``BenchReport.to_dict()`` or a loaded ``bench.json``),
so a report can be re-rendered or compared without re-running anything.

Regression rule (``compare_reports``), per cell = (case, stage median) and the end-to-end median:

    ratio      = new median / old median
    combined   = sqrt(cov_old**2 + cov_new**2)          (cov = stdev / mean of each run)
    threshold  = 1 + max(floor, k * combined)           (defaults: floor 0.10, k 3)
    regression = ratio > threshold and |new - old| > share * old end-to-end median
    faster     = ratio < 1 / threshold and |new - old| > share * old end-to-end median

CoV measures how much one run's samples spread; two runs on a noisy machine differ by about the
combined spread (load and clocks drift between runs, so it is deliberately not divided by
sqrt(n)); k = 3 is a three-sigma band. The floor keeps a very quiet machine from flagging
shifts under 10 %. ``share`` (default 0.02) ignores stages too small to matter: a 1 ms encode
that takes 4 ms in the next run is scheduler jitter when the pipeline takes 2 s.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from deltadiff._deps import require
from deltadiff.atomic import atomic_path, write_text_atomic
from deltadiff.errors import DeltaDiffError

log = logging.getLogger(__name__)

SCHEMA_FILE = "bench_schema.json"
SUPPORTED_SCHEMA = 1
E2E = "e2e"
NA = "n/a"
SKIP = "skipped"


# ---------------------------------------------------------------------------------------------
# loading / validating


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a bench JSON written by ``dd-run bench`` (any supported schema version)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeltaDiffError(
            f"--compare {path}: file not found; pass a bench.json from an earlier run"
        ) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeltaDiffError(
            f"--compare {path}: cannot read it as JSON ({exc}); pass a bench.json"
        ) from None
    ver = d.get("schema_version") if isinstance(d, dict) else None
    if not isinstance(ver, int) or not isinstance(d.get("cases"), list):
        raise DeltaDiffError(
            f"--compare {path}: not a dd-run bench report (no schema_version / cases)"
        )
    if ver > SUPPORTED_SCHEMA:
        raise DeltaDiffError(
            f"--compare {path}: schema_version {ver} is newer than this tool ({SUPPORTED_SCHEMA}); upgrade deltadiff-trt"
        )
    return d


def report_schema() -> dict[str, Any]:
    """The JSON Schema of bench reports (``benchmarks/bench_schema.json``)."""
    text = resources.files("deltadiff.benchmarks").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def validate_report(d: dict[str, Any]) -> None:
    """Validate a report dict against the schema (needs ``jsonschema``); raises on mismatch."""
    jsonschema = require("jsonschema", "test")
    jsonschema.validate(d, report_schema())


# ---------------------------------------------------------------------------------------------
# comparison


@dataclass(frozen=True)
class CellComparison:
    case: str  # case id: model@tile/backend/precision/mode/bN
    stage: str  # a stage name or "e2e"
    old_median: float
    new_median: float
    ratio: float
    combined_cov: float
    threshold: float
    regression: bool
    faster: bool

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Comparison:
    cells: tuple[CellComparison, ...]
    floor: float
    k: float
    only_new: tuple[str, ...] = ()
    only_old: tuple[str, ...] = ()
    old_date: str | None = None
    old_label: str | None = None
    old_host: str | None = None
    share: float = 0.02
    rule: str = field(
        default="ratio > 1 + max(floor, k * sqrt(cov_old^2 + cov_new^2)) and |new - old| > share * e2e"
    )

    @property
    def regressions(self) -> list[CellComparison]:
        return [c for c in self.cells if c.regression]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "floor": self.floor,
            "k": self.k,
            "share": self.share,
            "old_date": self.old_date,
            "old_label": self.old_label,
            "old_host": self.old_host,
            "n_cells": len(self.cells),
            "n_regressions": len(self.regressions),
            "cells": [c.to_dict() for c in self.cells],
            "only_new": list(self.only_new),
            "only_old": list(self.only_old),
        }


def _cells(d: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for c in d.get("cases", []):
        if c.get("status") != "ok":
            continue
        for stage, st in (c.get("stages") or {}).items():
            out[(c["id"], stage)] = st
        if c.get("e2e"):
            out[(c["id"], E2E)] = c["e2e"]
    return out


def compare_reports(
    new: dict[str, Any],
    old: dict[str, Any],
    *,
    floor: float = 0.10,
    k: float = 3.0,
    share: float = 0.02,
) -> Comparison:
    """Per-cell ratio new/old of the medians, flagged by the rule in the module docstring."""
    a, b = _cells(old), _cells(new)
    cells = []
    for key in b:
        if key not in a:
            continue
        o, n = a[key], b[key]
        if not o["median"] > 0:
            continue
        ratio = n["median"] / o["median"]
        comb = math.sqrt(o["cov"] ** 2 + n["cov"] ** 2)
        thr = 1.0 + max(floor, k * comb)
        e2e_old = a.get((key[0], E2E), o)["median"]
        material = abs(n["median"] - o["median"]) > share * e2e_old
        cells.append(
            CellComparison(
                key[0],
                key[1],
                o["median"],
                n["median"],
                ratio,
                comb,
                thr,
                ratio > thr and material,
                ratio < 1.0 / thr and material,
            )
        )
    env = old.get("environment") or {}
    return Comparison(
        cells=tuple(cells),
        floor=floor,
        k=k,
        share=share,
        only_new=tuple(sorted({c for c, _ in b} - {c for c, _ in a})),
        only_old=tuple(sorted({c for c, _ in a} - {c for c, _ in b})),
        old_date=env.get("date"),
        old_label=env.get("label"),
        old_host=env.get("hostname"),
    )


def comparison_lines(cmp: dict[str, Any]) -> list[str]:
    """Plain-text lines of a comparison dict (what the CLI prints)."""
    lines = [
        f"compare vs {cmp.get('old_path') or 'old report'} ({cmp.get('old_label') or cmp.get('old_host') or '?'},"
        f" {cmp.get('old_date') or '?'}): {cmp['n_cells']} cells, {cmp['n_regressions']} regression(s);"
        f" rule {cmp['rule']} (floor {cmp['floor']:.0%}, k {cmp['k']:g}, share {cmp.get('share', 0):.0%})"
    ]
    for c in cmp["cells"]:
        flag = "REGRESSION" if c["regression"] else ("faster" if c["faster"] else "ok")
        lines.append(
            f"  {flag:<10} {c['case']:<52} {c['stage']:<9} {c['old_median'] * 1e3:10.3f} -> "
            f"{c['new_median'] * 1e3:10.3f} ms  x{c['ratio']:.3f} (limit x{c['threshold']:.3f})"
        )
    for c in cmp.get("only_new", []):
        lines.append(f"  new only   {c}")
    for c in cmp.get("only_old", []):
        lines.append(f"  old only   {c}")
    return lines


# ---------------------------------------------------------------------------------------------
# Markdown


def _ms(v: float | None) -> str:
    if v is None:
        return "—"
    ms = v * 1e3
    if ms >= 100:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _num(v: float | None, spec: str) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def stage_columns(model: dict[str, Any], cases: list[dict[str, Any]]) -> list[str]:
    """encode, step_<t>..., decode, then unrolled: every stage any case of the model can have."""
    cols = list(model.get("stages") or [])
    for c in cases:
        for s in c.get("stage_order") or []:
            if s not in cols:
                cols.append(s)
    if "unrolled" not in cols:
        cols.append("unrolled")
    return cols


def _psnr_cell(fid: dict[str, Any] | None) -> str:
    if not fid:
        return "—"
    if fid.get("psnr_inf"):
        return "inf"
    return _num(fid.get("psnr_db"), ".1f")


def _case_row(c: dict[str, Any], cols: list[str]) -> str:
    head = [c["backend"], c["precision"], c["mode"], str(c["batch"])]
    if c["status"] != "ok":
        cells = [SKIP if c["status"] == "skipped" else "failed"] * len(cols) + ["—"] * 15
        return "| " + " | ".join(head + cells) + " |"
    stages = c.get("stages") or {}
    order = c.get("stage_order") or []
    cells = [(_ms(stages[s]["median"]) if s in stages else "—") if s in order else NA for s in cols]
    e2e = c["e2e"]
    cov = f"{e2e['cov']:.1%}" + (" ⚠" if c.get("cov_warning") else "")
    thr = c.get("throughput") or {}
    mem = c.get("memory") or {}
    ttfr = c.get("ttfr") or {}
    fl = c.get("flops") or {}
    fid = c.get("fidelity") or {}
    ratio = fl.get("achieved_over_peak")
    cells += [
        _ms(e2e["median"]),
        _ms(e2e["p90"]),
        _ms(e2e["p99"]),
        cov,
        str(e2e["n"]),
        _num(thr.get("images_per_s"), ".2f"),
        _num(thr.get("megapixels_per_s"), ".3f"),
        _num(mem.get("rss_peak_mb"), ".0f"),
        _num(mem.get("rss_peak_delta_mb"), "+.0f"),
        _num(mem.get("gpu_used_peak_mb"), ".0f"),
        _num(ttfr.get("total_s"), ".2f"),
        _num(fl.get("gmacs"), ".2f"),
        "—" if ratio is None else f"{ratio:.1%}",
        _psnr_cell(fid),
        _num(fid.get("max_abs"), ".2e"),
    ]
    return "| " + " | ".join(head + cells) + " |"


METRIC_HEADERS = [
    "e2e median",
    "e2e p90",
    "e2e p99",
    "CoV",
    "runs",
    "img/s",
    "MP/s",
    "peak RSS (MB)",
    "ΔRSS (MB)",
    "GPU mem (MB)",
    "TTFR (s)",
    "GMACs",
    "achieved/peak",
    "PSNR vs ref (dB)",
    "max abs vs ref",
]


def _env_section(d: dict[str, Any]) -> list[str]:
    env = d.get("environment") or {}
    cpu = env.get("cpu") or {}
    gpu = env.get("gpu") or {}
    vers = env.get("versions") or {}
    th = env.get("threads") or {}
    gpu_s = f"{gpu.get('name')} (driver {gpu.get('driver')})" if gpu else "none (NVML: no GPU)"
    ver_s = ", ".join(f"{k} {v}" for k, v in vers.items() if v)
    return [
        "| | |",
        "|---|---|",
        f"| date | {env.get('date')} |",
        f"| machine | {env.get('label') or '—'} ({env.get('hostname')}) |",
        f"| CPU | {cpu.get('model')}; {cpu.get('logical_cores')} logical / {cpu.get('physical_cores')} physical cores, "
        f"{cpu.get('affinity_cores')} usable |",
        f"| memory | {_num(env.get('memory_total_mb'), '.0f')} MB |",
        f"| GPU | {gpu_s} |",
        f"| versions | {ver_s} |",
        f"| threads | --threads {th.get('requested')} (0 = backend default); OMP_NUM_THREADS={th.get('OMP_NUM_THREADS')} |",
        f"| load average | start {env.get('load_average_start')}, end {env.get('load_average_end')} |",
        f"| command | `{env.get('command')}` |",
    ]


@dataclass(frozen=True)
class ModelCases:
    """One model's section of the report: the model entry, its cases and the stage columns."""

    model: dict[str, Any]
    cases: list[dict[str, Any]]
    cols: list[str]

    @classmethod
    def of(cls, model: dict[str, Any], all_cases: list[dict[str, Any]]) -> ModelCases:
        mine = [c for c in all_cases if c["model"] == model["key"]]
        return cls(model, mine, stage_columns(model, mine))


def _header_section(d: dict[str, Any]) -> list[str]:
    """Title, how to read the tables, the machine table and the measuring method."""
    opts = d.get("options") or {}
    env = d.get("environment") or {}
    lines = [
        f"# dd-run bench: {env.get('label') or env.get('hostname')}, {env.get('date')}",
        "",
        f"Report schema {d['schema_version']}. Times in ms (medians unless named); stage cells are per call "
        f"of the whole batch; `n/a` = the stage is not part of that mode, `skipped`/`failed` = the case did not run "
        f"(reasons below each table).",
        "",
        *_env_section(d),
        "",
        "## Method",
        "",
        f"- warm-up: the first run (time to first result, TTFR = load + first run) and {opts.get('warmup')} more "
        f"runs are discarded; then runs until both {opts.get('min_runs')} runs and {opts.get('min_seconds')} s.",
        f"- CoV = sample stdev / mean of the end-to-end times; ⚠ when above {opts.get('cov_warn', 0.1):.0%}.",
    ]
    for k, v in (d.get("method") or {}).items():
        if k not in ("warmup", "stop_rule"):  # said above with the numbers
            lines.append(f"- {k}: {v}")
    return lines


def _peaks_section(d: dict[str, Any]) -> list[str]:
    """The measured peak FLOP/s table (what achieved/peak divides by)."""
    peaks = d.get("peaks") or {}
    lines = ["", "## Measured peak", ""]
    if not peaks:
        return [*lines, "not measured"]
    lines += [
        "| key | TFLOP/s (best) | TFLOP/s (median) | threads | probe |",
        "|---|---:|---:|---:|---|",
    ]
    for p in peaks.values():
        lines.append(
            f"| {p['key']} | {p['tflops']:.4f} | {p['median_tflops']:.4f} | {p['threads']} | {p['what']} |"
        )
    return lines


def _model_intro(model: dict[str, Any]) -> list[str]:
    """A model's heading: tile, folder, batch range, graphs, MACs and the reference."""
    h, w = model["tile"]
    oh, ow = model["output_hw"]
    lines = [
        "",
        f"## {model['key']}: {model['family']}, LR tile {h}×{w} → {oh}×{ow}",
        "",
        f"Model dir `{model['dir']}`; batch range {model['batch_range'][0]}..{model['batch_range'][1]}; "
        f"graphs {', '.join(model.get('precisions') or [])}.",
    ]
    macs = model.get("macs") or {}
    if macs.get("graphs"):
        parts = [f"{g['graph']} {g['gmacs']:.3f} (b{g['batch']})" for g in macs["graphs"]]
        lines.append(f"GMACs per call: {', '.join(parts)}.")
    elif macs.get("reason"):
        lines.append(f"MACs not counted: {macs['reason']}.")
    ref = model.get("reference") or {}
    if ref.get("status") == "ok":
        lines.append(
            f"Reference: FP32 PyTorch on the CPU, {ref.get('inputs')} ({ref.get('seconds', 0):.2f} s)."
        )
    else:
        lines.append(f"Reference: not computed ({ref.get('reason')}).")
    return lines


def _case_table(mc: ModelCases) -> list[str]:
    """One row per case: per-stage medians, then the metrics; reasons for skipped / noisy cases."""
    lines = [
        "",
        "| backend | precision | mode | batch | "
        + " | ".join(mc.cols)
        + " | "
        + " | ".join(METRIC_HEADERS)
        + " |",
        "|---|---|---|---:|" + "---:|" * (len(mc.cols) + len(METRIC_HEADERS)),
    ]
    lines += [_case_row(c, mc.cols) for c in mc.cases]
    bad = [c for c in mc.cases if c["status"] != "ok"]
    noisy = [c for c in mc.cases if c["status"] == "ok" and c.get("noisy_stages")]
    if bad or noisy:
        lines.append("")
    for c in bad:
        lines.append(
            f"- {c['backend']} / {c['precision']} / {c['mode']} / b{c['batch']}: {c['status']}: {c['reason']}"
        )
    for c in noisy:
        lines.append(
            f"- {c['backend']} / {c['precision']} / {c['mode']} / b{c['batch']}: CoV above "
            f"{c['cov_threshold']:.0%} in {', '.join(c['noisy_stages'])}"
        )
    return lines


def _quality_section(model: dict[str, Any], opts: dict[str, Any]) -> list[str]:
    """PSNR-Y / SSIM-Y / LPIPS per upscaler on the dataset, and the upscalers not evaluated."""
    lines: list[str] = []
    q = model.get("quality")
    if q or model.get("quality_skipped"):
        lines += ["", f"### Quality on {q['dataset'] if q else opts.get('dataset')}", ""]
    if q:
        lines += [
            f"{q['n_images']} images, border {q['border']}, tiled through the runtime Upscaler ({q.get('mode')} "
            f"mode); LPIPS: {q.get('lpips_weights') or 'not computed'}.",
            "",
            "| upscaler | PSNR-Y (dB) | SSIM-Y | LPIPS | Δ PSNR-Y vs bicubic | s/image |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for s in q["upscalers"]:
            psnr = "inf" if s.get("psnr_y_inf") else _num(s.get("psnr_y"), ".3f")
            lines.append(
                f"| {s['upscaler']} | {psnr} | {_num(s.get('ssim_y'), '.4f')} | {_num(s.get('lpips'), '.4f')} | "
                f"{_num(s.get('delta_psnr_y_vs_bicubic'), '+.3f')} | {_num(s.get('seconds_per_image'), '.3f')} |"
            )
    for s in model.get("quality_skipped") or []:
        lines.append(f"- {s['upscaler']}: not evaluated: {s['reason']}")
    return lines


def _model_section(mc: ModelCases, opts: dict[str, Any]) -> list[str]:
    return [*_model_intro(mc.model), *_case_table(mc), *_quality_section(mc.model, opts)]


def _comparison_section(cmp: dict[str, Any] | None) -> list[str]:
    """The new/old ratio per cell against an earlier report (``compare_reports``), if any."""
    if not cmp:
        return []
    lines = [
        "",
        "## Comparison with an earlier report",
        "",
        f"Old: `{cmp.get('old_path')}` ({cmp.get('old_label') or cmp.get('old_host')}, {cmp.get('old_date')}). "
        f"Rule: regression when {cmp['rule']}, floor {cmp['floor']:.0%}, k {cmp['k']:g}. "
        f"**{cmp['n_regressions']} regression(s)** in {cmp['n_cells']} cells.",
        "",
        "| case | stage | old (ms) | new (ms) | new/old | limit | flag |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for c in cmp["cells"]:
        flag = "**REGRESSION**" if c["regression"] else ("faster" if c["faster"] else "ok")
        lines.append(
            f"| {c['case']} | {c['stage']} | {_ms(c['old_median'])} | {_ms(c['new_median'])} | "
            f"{c['ratio']:.3f} | {c['threshold']:.3f} | {flag} |"
        )
    for c in cmp.get("only_new") or []:
        lines.append(f"| {c} | — | — | — | — | — | only in the new report |")
    for c in cmp.get("only_old") or []:
        lines.append(f"| {c} | — | — | — | — | — | only in the old report |")
    return lines


def _plots_and_notes(plots: dict[str, str] | None, notes: list[str]) -> list[str]:
    lines: list[str] = []
    if plots:
        lines += ["", "## Plots", ""]
        for title, name in plots.items():
            lines += [f"![{title}]({name})", ""]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return lines


def to_markdown(d: dict[str, Any], *, plots: dict[str, str] | None = None) -> str:
    """The Markdown report: environment, method, peaks, one table per model, comparison, plots."""
    opts = d.get("options") or {}
    cases = d.get("cases") or []
    lines = [*_header_section(d), *_peaks_section(d)]
    for model in d.get("models") or []:
        lines += _model_section(ModelCases.of(model, cases), opts)
    lines += _comparison_section(d.get("comparison"))
    lines += _plots_and_notes(plots, d.get("notes") or [])
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# plots (matplotlib, Agg canvas, no pyplot state)


def _ok(d: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in d.get("cases") or [] if c.get("status") == "ok"]


def _stage_colors(stages: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    steps = [s for s in stages if s.startswith("step_")]
    blues = colormaps["Blues"]
    colors: dict[str, Any] = {"encode": "#8c8c8c", "decode": "#e6a03c", "unrolled": "#6a51a3"}
    for i, s in enumerate(steps):
        colors[s] = blues(0.45 + 0.5 * i / max(1, len(steps) - 1))
    return colors


def plot_stages(d: dict[str, Any], path: Path) -> bool:
    """Stacked per-stage median latency per case, one panel per model; e2e median as a tick."""
    from matplotlib.figure import Figure

    ok = _ok(d)
    models = [m for m in d.get("models") or [] if any(c["model"] == m["key"] for c in ok)]
    if not models:
        return False
    heights = [max(1.6, 0.45 * sum(c["model"] == m["key"] for c in ok) + 1.0) for m in models]
    fig = Figure(figsize=(10, sum(heights)), layout="constrained")
    axes = fig.subplots(len(models), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, model in zip(axes, models, strict=True):
        mine = [c for c in ok if c["model"] == model["key"]]
        cols = stage_columns(model, mine)
        colors = _stage_colors(cols)
        labels = [f"{c['backend']}/{c['precision']}/{c['mode']}/b{c['batch']}" for c in mine]
        used: set[str] = set()
        for y, c in enumerate(mine):
            left = 0.0
            for s in c["stage_order"]:
                v = c["stages"][s]["median"] * 1e3
                ax.barh(
                    y,
                    v,
                    left=left,
                    color=colors[s],
                    edgecolor="white",
                    linewidth=0.5,
                    label=s if s not in used else None,
                )
                used.add(s)
                left += v
            e2e = c["e2e"]["median"] * 1e3
            ax.plot(
                [e2e, e2e],
                [y - 0.4, y + 0.4],
                color="black",
                linewidth=1.5,
                label="e2e median" if "e2e" not in used else None,
            )
            used.add("e2e")
            ax.text(max(left, e2e), y, f"  {e2e:.1f} ms", va="center", fontsize=8)
        ax.set_yticks(range(len(mine)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("median latency per call (ms)")
        ax.set_title(f"{model['key']} ({model['family']}): per-stage median latency", fontsize=10)
        ax.set_xlim(0, ax.get_xlim()[1] * 1.15)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return True


def _case_style(cases: list[dict[str, Any]]) -> dict[str, tuple[Any, str]]:
    """Colour per backend/precision/mode, marker per model: {case id: (colour, marker)}."""
    from matplotlib import colormaps

    combos = sorted({(c["backend"], c["precision"], c["mode"]) for c in cases})
    models = list(dict.fromkeys(c["model"] for c in cases))
    cmap = colormaps["tab10" if len(combos) <= 10 else "tab20"]
    markers = "osD^vP*Xh"
    return {
        c["id"]: (
            cmap(combos.index((c["backend"], c["precision"], c["mode"])) % cmap.N),
            markers[models.index(c["model"]) % len(markers)],
        )
        for c in cases
    }


def plot_tiles(d: dict[str, Any], path: Path) -> bool:
    """End-to-end median per image vs output tile size, when a model (same name, i.e. the same
    weights exported at several tiles) ran at several tiles."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ok = _ok(d)
    by_key = {m["key"]: m for m in d.get("models") or []}
    series: dict[tuple[str, str], list[tuple[float, float, str]]] = {}
    for c in ok:
        m = by_key[c["model"]]
        oh, ow = m["output_hw"]
        name = f"{c['backend']}/{c['precision']}/{c['mode']}/b{c['batch']}"
        per_image_ms = c["e2e"]["median"] * 1e3 / c["batch"]
        series.setdefault((m.get("name") or m["family"], name), []).append(
            (oh * ow / 1e6, per_image_ms, f"{oh}×{ow}")
        )
    series = {k: sorted(set(v)) for k, v in series.items() if len({x for x, _, _ in v}) >= 2}
    if not series:
        return False
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.subplots()
    cmap_n = len(series)
    from matplotlib import colormaps

    cmap = colormaps["tab10" if cmap_n <= 10 else "tab20"]
    ticks: dict[float, str] = {}
    for i, ((model, name), pts) in enumerate(sorted(series.items())):
        style = "-" if "/b1" in name else "--"
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            linestyle=style,
            color=cmap(i % cmap.N),
            label=f"{model}: {name}",
        )
        ticks.update({p[0]: p[2] for p in pts})
    ax.set_xscale("log")
    ax.set_yscale("log")
    kept: list[float] = []
    for t in sorted(ticks):  # drop labels that would overlap (areas closer than 1.5x)
        if not kept or t / kept[-1] >= 1.5:
            kept.append(t)
    ax.set_xticks(kept, [ticks[t] for t in kept])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("output tile (pixels; log scale by area)")
    ax.set_ylabel("median end-to-end latency per image (ms, log)")
    ax.set_title("Latency vs tile size", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)
    return True


def plot_fidelity(d: dict[str, Any], path: Path) -> bool:
    """PSNR vs the PyTorch reference against throughput, one point per case."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    pts = []
    for c in _ok(d):
        fid, thr = c.get("fidelity") or {}, c.get("throughput") or {}
        if thr.get("images_per_s") is None or (
            fid.get("psnr_db") is None and not fid.get("psnr_inf")
        ):
            continue
        pts.append((c, thr["images_per_s"], fid.get("psnr_db"), bool(fid.get("psnr_inf"))))
    if not pts:
        return False
    finite = [p for _, _, p, inf in pts if not inf]
    cap = (max(finite) if finite else 100.0) + 10.0
    one_model = len({c["model"] for c, *_ in pts}) == 1
    style = _case_style([c for c, *_ in pts])
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.subplots()
    for c, ips, psnr, inf in pts:
        label = f"{c['backend']}/{c['precision']}/{c['mode']}/b{c['batch']}"
        if not one_model:
            label = f"{c['model']} {label}"
        color, marker = style[c["id"]]
        ax.scatter(
            [ips],
            [cap if inf else psnr],
            color=color,
            marker=marker,
            s=30 + 20 * min(c["batch"], 4),
            edgecolors="black",
            linewidths=0.5,
            label=label + (" (identical)" if inf else ""),
        )
    if any(inf for *_, inf in pts):
        ax.axhline(cap, color="gray", linestyle=":", linewidth=1)
        ax.annotate(
            "identical to the reference (PSNR = inf)",
            (0.01, cap),
            xycoords=("axes fraction", "data"),
            fontsize=7,
            va="bottom",
        )
    ips_all = [p[1] for p in pts]
    log_x = max(ips_all) / min(ips_all) > 10
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("throughput (images/s" + (", log)" if log_x else ")"))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if one_model:
        fig.suptitle(pts[0][0]["model"], fontsize=9)
    ax.set_ylabel("PSNR vs FP32 PyTorch reference (dB)")
    ax.set_title(
        "Fidelity vs speed: colour = backend/precision/mode, marker = model, size = batch",
        fontsize=10,
    )
    ax.grid(alpha=0.3, which="both")
    ax.margins(x=0.1, y=0.1)
    _save(fig, path)
    return True


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


# ---------------------------------------------------------------------------------------------
# writing


def file_stem(label: str | None) -> str:
    return f"bench-{label}" if label else "bench"


def write_report(
    d: dict[str, Any], out_dir: str | Path, *, label: str | None = None, plots: bool = True
) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and the PNG plots into ``out_dir`` (atomically).

    ``stem`` is ``bench`` or ``bench-<label>``. Returns {kind: path}. Plots that do not apply
    (e.g. latency vs tile with one tile) are not drawn, and a note says so."""
    out = Path(out_dir)
    stem = file_stem(label)
    paths: dict[str, Path] = {}
    plot_names: dict[str, str] = {}
    notes = list(d.get("notes") or [])
    try:
        out.mkdir(parents=True, exist_ok=True)
        if plots:
            try:
                require("matplotlib", "bench")
            except DeltaDiffError as exc:
                notes.append(f"no plots: {exc}")
            else:
                for kind, title, fn in (
                    ("stages", "per-stage latency", plot_stages),
                    ("tiles", "latency vs tile size", plot_tiles),
                    ("fidelity", "fidelity vs speed", plot_fidelity),
                ):
                    p = out / f"{stem}-{kind}.png"
                    if fn(d, p):
                        paths[kind] = p
                        plot_names[title] = p.name
                    elif kind == "tiles":
                        notes.append(
                            "latency vs tile size not plotted: every model ran at one tile size"
                        )
                    else:
                        notes.append(f"{title} not plotted: no case with the numbers it needs")
        d = {**d, "notes": notes}
        paths["json"] = out / f"{stem}.json"
        write_text_atomic(paths["json"], json.dumps(d, indent=1, allow_nan=False) + "\n")
        paths["md"] = out / f"{stem}.md"
        write_text_atomic(paths["md"], to_markdown(d, plots=plot_names))
    except OSError as exc:
        raise DeltaDiffError(
            f"cannot write the bench report to {out}: {exc.strerror or exc}; check the folder and its permissions"
        ) from None
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths
