"""The runtime gate: does a precision keep the quality users see? (``dd-export gate``)

Every LR image of a ``gt/`` + ``lq/`` folder is read as ``dd-run upscale`` reads it
(``read_image``), run **whole through the runtime** (``Upscaler``, onnxruntime, staged, the
tiling ``dd-run upscale`` would choose) once at FP32 and once at the candidate precision, and
quantised to 8 bits as ``write_image`` saves it. Both outputs are scored against HR with the
project's PSNR-Y (``deltadiff/metrics.py``: BT.601 Y, 4 px shaved per side).

Criteria (``delta`` = candidate PSNR-Y - FP32 PSNR-Y, dB):

* mean:   the mean of the per-image deltas >= -0.10 dB;
* worst:  the smallest per-image delta >= -0.30 dB;
* border: for each edge (top, bottom, left, right) separately, the outermost 8 HR pixels of
  every image (no shave; corners count in both strips) are pooled over the images (squared Y
  errors summed, divided by the pixel count) and so is the interior (HR pixels 8 px or more from
  every edge). ``border[edge] = delta(strip) - delta(interior)`` must be >= -0.30 dB: the
  candidate may not lose more on an edge than it loses inside. The worst single image-edge
  (the same difference per image) is reported, not gated (one 8 px strip is too few pixels).

FP32 outputs are cached as 8-bit PNGs under ``--cache`` per (FP32 graphs + how the runtime runs
the image, LR file sha256), so a re-gate runs only the candidate. The report (JSON + Markdown)
lists every image; ``gate-strip.*.png`` shows the worst five (FP32 | candidate | HR crops around
the window where the candidate adds the most error). ``record_gate`` writes the verdict into
the INT8 manifest records (``usable`` + ``runtime_gate``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from deltadiff.atomic import atomic_path, write_text_atomic
from deltadiff.errors import DeltaDiffError, ManifestError
from deltadiff.manifest import (
    Manifest,
    load_manifest,
    sha256_file,
    update_manifest,
)
from deltadiff.options import Backend, Int8Target, Mode, Precision, parse

log = logging.getLogger(__name__)

MAX_MEAN_DROP_DB = 0.10
MAX_WORST_DROP_DB = 0.30
MAX_BORDER_DROP_DB = 0.30
STRIP_PX = 8  # HR pixels per edge strip
SHAVE_PX = 4  # the whole-image PSNR-Y shave (deltadiff/metrics.py's convention for x4)
EDGES = ("top", "bottom", "left", "right")
REGIONS = (*EDGES, "interior")
STRIP_IMAGES = 5
CROP_PX = 96  # HR side of a strip crop (smaller images: the whole image)
STAGED_GRAPHS = ("encoder", "step", "decoder")

Say = Callable[[str], None]


@dataclass(frozen=True)
class GateOptions:
    model: Path
    data: Path  # a folder with gt/ + lq/ (paired by file stem)
    precision: str = "int8"
    target: str = Int8Target.ONNXRUNTIME  # INT8 graphs' target; the gate runs them on onnxruntime
    out: Path | None = None  # report folder (default: the model directory)
    cache: Path | None = None  # FP32 output cache (default: <deltadiff cache>/gate-fp32)
    threads: int = 0
    limit: int | None = None  # first N pairs (by name)
    sources: Path | None = None  # corpus manifest (image -> source); default: looked up
    max_mean_drop_db: float = MAX_MEAN_DROP_DB
    max_worst_drop_db: float = MAX_WORST_DROP_DB
    max_border_drop_db: float = MAX_BORDER_DROP_DB


@dataclass
class ImageResult:
    name: str
    source: str
    lr_size: tuple[int, int]  # (w, h)
    fp32_db: float
    cand_db: float
    border_db: dict[str, float]  # per edge: delta(strip) - delta(interior), this image
    fp32_cached: bool
    crop: tuple[int, int, int]  # (x, y, side) HR window where the candidate adds most error
    ran: str = "whole"  # how the runtime ran the candidate: "whole" or "tiles HxW"
    # summed squared Y error and pixel count per region: (fp32, candidate, n)
    sse: dict[str, tuple[float, float, int]] = field(default_factory=dict, repr=False)

    @property
    def delta_db(self) -> float:
        return 0.0 if self.cand_db == self.fp32_db else self.cand_db - self.fp32_db

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "lr_size": list(self.lr_size),
            "fp32_psnr_y_db": _r(self.fp32_db),
            "candidate_psnr_y_db": _r(self.cand_db),
            "delta_db": _r(self.delta_db),
            "border_delta_db": {e: _r(v) for e, v in self.border_db.items()},
            "fp32_cached": self.fp32_cached,
            "worst_crop_xy_side": list(self.crop),
            "ran": self.ran,
        }


@dataclass(frozen=True)
class Criterion:
    name: str
    value: float  # dB; higher is better
    limit: float  # pass if value >= limit
    where: str  # the image / edge that sets the value

    @property
    def passed(self) -> bool:
        return self.value >= self.limit

    def text(self) -> str:
        ok = "pass" if self.passed else "FAIL"
        return f"{self.name} {self.value:+.3f} dB ({self.where}; limit {self.limit:+.2f}) {ok}"


@dataclass
class GateResult:
    precision: str
    target: str
    model: str
    data: str
    images: list[ImageResult]
    criteria: list[Criterion]
    border_pooled_db: dict[str, float]
    worst_image_edge: tuple[str, str, float]  # (image, edge, dB)
    sources: dict[str, dict[str, Any]]
    seconds: float = 0.0
    report_path: Path | None = None
    strip_path: Path | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.criteria)

    @property
    def fp32_cache_hits(self) -> int:
        return sum(im.fp32_cached for im in self.images)

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        crit = "; ".join(c.text() for c in self.criteria)
        where = f"; report {self.report_path}" if self.report_path else ""
        whole = sum(im.ran == "whole" for im in self.images)
        return (
            f"{verdict}: {self.precision} vs fp32, {len(self.images)} images through the "
            f"runtime ({whole} whole): {crit}{where}"
        )

    def summary(self) -> dict[str, Any]:
        """What the manifest records (``runtime_gate``)."""
        return {
            "passed": self.passed,
            "images": len(self.images),
            "data": self.data,
            **{f"{c.name}_db": _r(c.value) for c in self.criteria},
            "limits_db": {c.name: c.limit for c in self.criteria},
            "report": self.report_path.name if self.report_path else None,
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }


def _r(v: float | None, nd: int = 4) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), nd)


# ------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class GatePair:
    name: str
    lr_path: Path
    hr: np.ndarray  # (H, W, 3) uint8


def load_pairs(data: Path, limit: int | None = None) -> list[GatePair]:
    """The ``gt/`` + ``lq/`` pairs of ``data`` (deltadiff/metrics.py's loader checks the
    pairing and the x4 sizes), with each LR image's file for the runtime's reader."""
    from deltadiff.metrics import IMAGE_EXTS, load_dataset

    data = Path(data)
    if not ((data / "gt").is_dir() and (data / "lq").is_dir()):
        raise DeltaDiffError(
            f"--data {data} has no gt/ and lq/ subfolders; pass an x4 pair folder "
            "(HR in gt/, LR in lq/, same file names)"
        )
    pairs = load_dataset(data, degrade=False)
    if limit is not None:
        if limit < 1:
            raise DeltaDiffError(f"--limit {limit}: give a positive number of images")
        pairs = pairs[:limit]
    small = [p for p in pairs if min(p.hr.shape[:2]) < 4 * STRIP_PX]
    if small:
        h, w = small[0].hr.shape[:2]
        raise DeltaDiffError(
            f"{small[0].name}: HR {w}x{h} is too small for the {STRIP_PX} px border strips; use "
            f"LR images of at least {STRIP_PX}x{STRIP_PX} ({len(small)} too small)"
        )
    lq = {p.stem: p for p in (data / "lq").iterdir() if p.suffix.lower() in IMAGE_EXTS}
    return [GatePair(p.name, lq[p.name], np.asarray(p.hr)) for p in pairs]


def find_sources(data: Path, explicit: Path | None = None) -> dict[str, str]:
    """Image stem -> source from a corpus manifest: ``explicit``, else the first of
    ``DATA/manifest.json``, ``DATA/../manifest.json`` and the repository's
    ``tools/corpus/manifest.json`` that exists. Any JSON object in it with a ``source`` and a
    ``name`` / ``stem`` / ``file`` / ``path`` / ``gt`` / ``lq`` names an image by that file's
    stem. No manifest: {} (sources are then reported as "-")."""
    repo_manifest = Path(__file__).resolve().parents[1] / "tools" / "corpus" / "manifest.json"
    paths = [explicit] if explicit else [data / "manifest.json", data.parent / "manifest.json"]
    paths += [] if explicit else [repo_manifest]
    for p in paths:
        if p is None or not p.is_file():
            if explicit:
                raise DeltaDiffError(
                    f"--sources {explicit} is not a file; pass the corpus manifest"
                )
            continue
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DeltaDiffError(
                f"corpus manifest {p} is unreadable ({type(exc).__name__}); fix or remove it"
            ) from None
        out: dict[str, str] = {}
        _collect_sources(doc, out)
        log.info("sources of %d images from %s", len(out), p)
        return out
    return {}


def _collect_sources(node: Any, out: dict[str, str]) -> None:
    if isinstance(node, dict):
        src = node.get("source")
        if isinstance(src, dict):
            src = src.get("name") or src.get("id") or src.get("package")
        if isinstance(src, str):
            for k in ("name", "stem", "file", "path", "gt", "lq"):
                if isinstance(node.get(k), str):
                    out.setdefault(Path(node[k]).stem, src)
        for v in node.values():
            _collect_sources(v, out)
    elif isinstance(node, list):
        for v in node:
            _collect_sources(v, out)


# ------------------------------------------------------------------------------- the runtime


def gate_manifest(m: Manifest, precision: str, target: str) -> Manifest:
    """``m`` with the candidate's records marked usable in memory only: the gate judges INT8
    graphs whatever an earlier gate recorded (the file on disk is not touched)."""

    def judged(q: dict[str, Any]) -> dict[str, Any]:
        return {**{k: v for k, v in q.items() if k != "runtime_gate"}, "usable": True}

    graphs = {
        k: replace(g, quant=judged(g.quant))
        if g.precision == precision and (precision != "int8" or g.target == target)
        else g
        for k, g in m.graphs.items()
    }
    return replace(m, graphs=graphs)


def upscale_options(precision: str, threads: int) -> Any:
    from deltadiff.runtime.upscaler import UpscaleOptions

    return UpscaleOptions(
        backend=Backend.ONNXRUNTIME, precision=precision, mode=Mode.STAGED, threads=threads
    )


@contextmanager
def open_upscaler(model_dir: Path, m: Manifest, precision: str, threads: int) -> Iterator[Any]:
    """An ``Upscaler`` as ``dd-run upscale --precision P --threads N`` opens it."""
    from deltadiff.runtime.upscaler import Upscaler

    up = Upscaler(model_dir, upscale_options(precision, threads), manifest=m)
    try:
        yield up
    finally:
        up.close()


def upscale_8bit(up: Any, lr: np.ndarray) -> np.ndarray:
    """One LR image through the runtime, quantised as ``dd-run upscale`` saves it (8 bits)."""
    from deltadiff.runtime.imageio import _quantize

    return _quantize(up.upscale(lr), 8)


def fp32_cache_key(m: Manifest, h: int, w: int, threads: int) -> str:
    """What an FP32 output depends on: the staged FP32 graphs, the tile plan the runtime picks
    for an h x w image (whole or tiled), the blend / overlap / seed, and onnxruntime's version."""
    import onnxruntime

    from deltadiff.runtime.upscaler import max_lr_pixels, plan_image

    opts = upscale_options("fp32", threads)
    plan = plan_image(m, opts, h, w, max_lr_pixels(m, opts))
    doc = {
        "graphs": [m.graph(g).sha256 for g in STAGED_GRAPHS],
        "tile": list(plan.tile),
        "whole": plan.whole,
        "overlap": opts.overlap,
        "blend": opts.blend,
        "seed": opts.seed,
        "onnxruntime": onnxruntime.__version__,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def default_cache() -> Path:
    from deltadiff.runtime.precision import cache_dir

    return cache_dir() / "gate-fp32"


def _read_png(path: Path) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError):
        return None  # a damaged cache entry is recomputed


def _write_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


# ------------------------------------------------------------------------------- scoring


def region_slices(h: int, w: int) -> dict[str, tuple[slice, slice]]:
    """The four 8 px edge strips (corners in two of them) and the interior of an h x w image."""
    s = STRIP_PX
    return {
        "top": (slice(0, s), slice(0, w)),
        "bottom": (slice(h - s, h), slice(0, w)),
        "left": (slice(0, h), slice(0, s)),
        "right": (slice(0, h), slice(w - s, w)),
        "interior": (slice(s, h - s), slice(s, w - s)),
    }


def psnr_from_sse(sse: float, n: int) -> float:
    """PSNR (peak 255) of a summed squared error over n pixels; inf when exact."""
    return math.inf if sse == 0 else 10.0 * math.log10(255.0**2 * n / sse)


def delta_db(fp32_sse: float, cand_sse: float, n: int) -> float:
    """candidate PSNR - FP32 PSNR on one region (0 when the errors are equal, also both 0)."""
    if fp32_sse == cand_sse:
        return 0.0
    return psnr_from_sse(cand_sse, n) - psnr_from_sse(fp32_sse, n)


def border_deltas(sse: dict[str, tuple[float, float, int]]) -> dict[str, float]:
    """Per edge: delta on the strip minus delta on the interior."""
    inner = delta_db(*sse["interior"])
    return {e: delta_db(*sse[e]) - inner for e in EDGES}


def worst_window(err_gain: np.ndarray, side: int) -> tuple[int, int]:
    """Top-left (x, y) of the side x side window with the largest summed ``err_gain``."""
    c = np.pad(err_gain.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    box = c[side:, side:] - c[:-side, side:] - c[side:, :-side] + c[:-side, :-side]
    y, x = np.unravel_index(int(np.argmax(box)), box.shape)
    return int(x), int(y)


def score_image(
    pair: GatePair, source: str, fp32: np.ndarray, cand: np.ndarray, cached: bool
) -> ImageResult:
    from deltadiff.metrics import psnr_y, rgb_to_y

    hr = pair.hr
    h, w = hr.shape[:2]
    yh, yf, yc = rgb_to_y(hr), rgb_to_y(fp32), rgb_to_y(cand)
    ef, ec = (yf - yh) ** 2, (yc - yh) ** 2
    sse = {
        k: (float(ef[sl].sum()), float(ec[sl].sum()), int(ef[sl].size))
        for k, sl in region_slices(h, w).items()
    }
    side = min(CROP_PX, h, w)
    x, y = worst_window(ec - ef, side)
    return ImageResult(
        name=pair.name,
        source=source,
        lr_size=(w // 4, h // 4),
        fp32_db=psnr_y(fp32, hr, SHAVE_PX),
        cand_db=psnr_y(cand, hr, SHAVE_PX),
        border_db=border_deltas(sse),
        fp32_cached=cached,
        crop=(x, y, side),
        sse=sse,
    )


def pooled_border(images: list[ImageResult]) -> dict[str, float]:
    """Per edge: delta(strip) - delta(interior), squared errors pooled over all images."""
    tot = {k: tuple(sum(im.sse[k][i] for im in images) for i in range(3)) for k in REGIONS}
    return border_deltas(tot)  # type: ignore[arg-type]


def judge(images: list[ImageResult], opts: GateOptions) -> tuple[list[Criterion], dict[str, float]]:
    deltas = [im.delta_db for im in images]
    worst = min(images, key=lambda im: im.delta_db)
    pooled = pooled_border(images)
    edge = min(pooled, key=lambda e: pooled[e])
    crit = [
        Criterion("mean", float(np.mean(deltas)), -opts.max_mean_drop_db, f"{len(images)} images"),
        Criterion("worst", worst.delta_db, -opts.max_worst_drop_db, worst.name),
        Criterion(
            "border", pooled[edge], -opts.max_border_drop_db, f"{edge} strip vs interior, pooled"
        ),
    ]
    return crit, pooled


def per_source(images: list[ImageResult]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for src in sorted({im.source for im in images}):
        mine = [im for im in images if im.source == src]
        worst = min(mine, key=lambda im: im.delta_db)
        out[src] = {
            "images": len(mine),
            "fp32_mean_db": _r(float(np.mean([im.fp32_db for im in mine]))),
            "candidate_mean_db": _r(float(np.mean([im.cand_db for im in mine]))),
            "mean_delta_db": _r(float(np.mean([im.delta_db for im in mine]))),
            "worst_delta_db": _r(worst.delta_db),
            "worst_image": worst.name,
        }
    return out


# ------------------------------------------------------------------------------- the run


def _check(opts: GateOptions) -> tuple[GateOptions, Manifest, str]:
    """``opts`` with its target parsed, the manifest, and the precision gated."""
    prec = str(parse(Precision, opts.precision, "--precision"))
    if prec == Precision.FP32:
        raise DeltaDiffError(
            "--precision fp32: the gate compares another precision with FP32; pass int8 or fp16"
        )
    opts = replace(opts, target=parse(Int8Target, opts.target, "--target"))
    if opts.target != Int8Target.ONNXRUNTIME:
        raise DeltaDiffError(
            f"--target {opts.target}: the gate runs graphs through onnxruntime, which runs the "
            "onnxruntime target's INT8 graphs only; gate --target onnxruntime"
        )
    m = load_manifest(opts.model)  # checks every graph's sha256 once
    have = [
        g
        for g in m.graphs.values()
        if g.precision == prec and (prec != "int8" or g.target == opts.target)
    ]
    if not have:
        hint = "dd-export calibrate" if prec == "int8" else "dd-export fp16"
        raise ManifestError(f"{opts.model} has no {prec} graphs to gate; make them with {hint}")
    return opts, m, prec


def run_gate(opts: GateOptions, *, progress: Say | None = None) -> GateResult:
    """Score FP32 and the candidate precision on every pair, decide, write the report."""
    from deltadiff.runtime.imageio import read_image

    say = progress or log.info
    t0 = time.perf_counter()
    opts, m, prec = _check(opts)
    model_dir = Path(opts.model)
    pairs = load_pairs(Path(opts.data), opts.limit)
    sources = find_sources(Path(opts.data), opts.sources)
    cache = Path(opts.cache) if opts.cache is not None else default_cache()
    view = gate_manifest(m, prec, opts.target)
    images: list[ImageResult] = []
    keep: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # outputs of the worst images so far
    with ExitStack() as stack:
        cand_up = stack.enter_context(open_upscaler(model_dir, view, prec, opts.threads))
        opened: list[Any] = []

        def fp32_up() -> Any:  # opened on first use: a fully cached re-gate never opens one
            if not opened:
                opened.append(
                    stack.enter_context(open_upscaler(model_dir, m, "fp32", opts.threads))
                )
            return opened[0]

        for i, pair in enumerate(pairs, 1):
            lr = read_image(pair.lr_path).rgb
            fp32, cached = _fp32_output(m, pair, lr, cache, fp32_up, opts.threads)
            cand = upscale_8bit(cand_up, lr)
            im = score_image(pair, sources.get(pair.name, "-"), fp32, cand, cached)
            plan = getattr(cand_up, "last_plan", None)
            if plan is not None and not plan.whole:
                im.ran = f"tiles {plan.tile[0]}x{plan.tile[1]}"
            images.append(im)
            keep[im.name] = (fp32, cand)
            _prune(keep, images)
            say(
                f"  [{i}/{len(pairs)}] {im.name}  LR {im.lr_size[0]}x{im.lr_size[1]}  fp32 "
                f"{im.fp32_db:.3f}  {prec} {im.cand_db:.3f}  {im.delta_db:+.3f} dB"
                + ("  (fp32 cached)" if cached else "")
            )
    crit, pooled = judge(images, opts)
    edges = [(im.name, e, v) for im in images for e, v in im.border_db.items()]
    res = GateResult(
        precision=prec,
        target=opts.target,
        model=m.name,
        data=str(opts.data),
        images=images,
        criteria=crit,
        border_pooled_db=pooled,
        worst_image_edge=min(edges, key=lambda t: t[2]),
        sources=per_source(images),
        seconds=time.perf_counter() - t0,
    )
    write_report(res, Path(opts.out) if opts.out else model_dir, pairs, keep)
    return res


def _fp32_output(
    m: Manifest,
    pair: GatePair,
    lr: np.ndarray,
    cache: Path,
    up: Callable[[], Any],
    threads: int,
) -> tuple[np.ndarray, bool]:
    """The FP32 output of one pair: from the cache, else run (and cached)."""
    h, w = lr.shape[:2]
    key = fp32_cache_key(m, h, w, threads)
    path = cache / key[:32] / f"{sha256_file(pair.lr_path)[:40]}.png"
    if path.is_file():
        out = _read_png(path)
        if out is not None and out.shape == pair.hr.shape:
            return out, True
    out = upscale_8bit(up(), lr)
    _write_png(path, out)
    return out, False


def _prune(keep: dict[str, tuple[np.ndarray, np.ndarray]], images: list[ImageResult]) -> None:
    worst = {im.name for im in sorted(images, key=lambda im: im.delta_db)[:STRIP_IMAGES]}
    for name in [n for n in keep if n not in worst]:
        del keep[name]


# ------------------------------------------------------------------------------- report


def report_names(precision: str, target: str) -> tuple[str, str, str]:
    stem = f"gate-report.{precision}" + (f".{target}" if precision == "int8" else "")
    return f"{stem}.json", f"{stem}.md", stem.replace("gate-report", "gate-strip") + ".png"


def report_dict(res: GateResult) -> dict[str, Any]:
    img, edge, v = res.worst_image_edge
    return {
        "kind": "deltadiff-runtime-gate",
        "model": res.model,
        "precision": res.precision,
        "target": res.target,
        "data": res.data,
        "passed": res.passed,
        "how": {
            "run": "each LR image through the runtime as dd-run upscale runs it (Upscaler, "
            "onnxruntime, staged; whole where the model allows, see each image's 'ran'), "
            "outputs quantised to 8 bits as dd-run upscale saves them",
            "psnr_y": f"BT.601 Y vs HR, {SHAVE_PX} px shaved per side (deltadiff/metrics.py)",
            "border": f"{STRIP_PX} px HR strip per edge (no shave) vs interior; squared errors "
            "pooled over images per edge; value = delta(strip) - delta(interior)",
        },
        "criteria": [
            {
                "name": c.name,
                "value_db": _r(c.value),
                "limit_db": c.limit,
                "where": c.where,
                "passed": c.passed,
            }
            for c in res.criteria
        ],
        "border_pooled_db": {e: _r(d) for e, d in res.border_pooled_db.items()},
        "worst_image_edge": {"image": img, "edge": edge, "db": _r(v)},
        "sources": res.sources,
        "images": [im.to_dict() for im in res.images],
        "fp32_cache_hits": res.fp32_cache_hits,
        "strip": res.strip_path.name if res.strip_path else None,
        "seconds": round(res.seconds, 1),
    }


def report_markdown(rep: dict[str, Any]) -> str:
    lines = [
        f"# Runtime gate: {rep['model']} {rep['precision']} vs FP32",
        "",
        f"**{'PASSED' if rep['passed'] else 'FAILED'}** on {len(rep['images'])} images of "
        f"`{Path(rep['data']).name}`, each run through the runtime as `dd-run upscale` runs it "
        "(whole where the model's range and memory records allow: column *run*); PSNR-Y vs HR ({rep['how']['psnr_y']}); border: {rep['how']['border']}.",
        "",
        "| criterion | value | limit | where | |",
        "|---|---:|---:|---|---|",
    ]
    for c in rep["criteria"]:
        lines.append(
            f"| {c['name']} | {c['value_db']:+.3f} dB | {c['limit_db']:+.2f} dB | {c['where']} | "
            f"{'pass' if c['passed'] else '**FAIL**'} |"
        )
    pooled = ", ".join(f"{e} {v:+.3f}" for e, v in rep["border_pooled_db"].items())
    w = rep["worst_image_edge"]
    lines += [
        "",
        f"Border, pooled per edge (dB): {pooled}. Worst single image-edge: {w['image']} "
        f"{w['edge']} {w['db']:+.3f} dB (reported, not gated).",
        "",
        "| source | images | FP32 mean | candidate mean | mean delta | worst delta | worst image |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for src, s in rep["sources"].items():
        lines.append(
            f"| {src} | {s['images']} | {s['fp32_mean_db']:.3f} | {s['candidate_mean_db']:.3f} | "
            f"{s['mean_delta_db']:+.3f} | {s['worst_delta_db']:+.3f} | {s['worst_image']} |"
        )
    lines += [
        "",
        "| image | source | LR | run | FP32 | candidate | delta | top | bottom | left | right |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for im in rep["images"]:
        b = im["border_delta_db"]
        lines.append(
            f"| {im['name']} | {im['source']} | {im['lr_size'][0]}x{im['lr_size'][1]} | {im['ran']} | "
            f"{_fmt(im['fp32_psnr_y_db'], '')} | {_fmt(im['candidate_psnr_y_db'], '')} | "
            f"{_fmt(im['delta_db'])} | " + " | ".join(_fmt(b[e]) for e in EDGES) + " |"
        )
    if rep.get("strip"):
        lines += [
            "",
            f"Worst {STRIP_IMAGES} images (FP32 | candidate | HR): ![strip]({rep['strip']})",
        ]
    return "\n".join(lines) + "\n"


def _fmt(v: float | None, sign: str = "+") -> str:
    return "inf" if v is None else f"{v:{sign}.3f}"


def write_report(
    res: GateResult,
    out: Path,
    pairs: list[GatePair],
    keep: dict[str, tuple[np.ndarray, np.ndarray]],
) -> None:
    """JSON + Markdown + the worst-five picture strip, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    jname, mname, sname = report_names(res.precision, res.target)
    hr = {p.name: p.hr for p in pairs}
    worst = sorted(res.images, key=lambda im: im.delta_db)[:STRIP_IMAGES]
    strip = picture_strip([(im, *keep[im.name], hr[im.name]) for im in worst], res.precision)
    with atomic_path(out / sname) as tmp:
        strip.save(tmp, format="PNG")
    res.strip_path = out / sname
    res.report_path = out / jname
    rep = report_dict(res)
    write_text_atomic(out / jname, json.dumps(rep, indent=1) + "\n")
    write_text_atomic(out / mname, report_markdown(rep))


def picture_strip(
    rows: list[tuple[ImageResult, np.ndarray, np.ndarray, np.ndarray]], precision: str
) -> Any:
    """One row per image: FP32 | candidate | HR crops of the same window, with labels."""
    from PIL import Image, ImageDraw

    zoom, pad, label = 2, 6, 28
    cell = CROP_PX * zoom
    sheet = Image.new("RGB", (3 * cell + 4 * pad, len(rows) * (cell + label + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (im, fp32, cand, hr) in enumerate(rows):
        x, y, side = im.crop
        top = pad + r * (cell + label + pad)
        draw.text(
            (pad, top),
            f"{im.name} ({im.source}) LR {im.lr_size[0]}x{im.lr_size[1]}: delta "
            f"{im.delta_db:+.3f} dB; crop at HR ({x}, {y})",
            fill="black",
        )
        heads = ("FP32", f"{precision}", "HR")
        for c, (head, arr) in enumerate(zip(heads, (fp32, cand, hr), strict=True)):
            crop = Image.fromarray(np.ascontiguousarray(arr[y : y + side, x : x + side]))
            crop = crop.resize((side * zoom, side * zoom), Image.Resampling.NEAREST)
            left = pad + c * (cell + pad)
            draw.text((left, top + 14), head, fill="black")
            sheet.paste(crop, (left, top + label))
    return sheet


# ------------------------------------------------------------------------------- manifest


def record_gate(model_dir: Path, res: GateResult) -> None:
    """Write the verdict into the candidate's INT8 records: ``usable`` = passed, and the
    ``runtime_gate`` summary (the tile gate's ``gate`` record is kept as it was)."""
    if res.precision != "int8":
        raise DeltaDiffError(
            f"--record: only INT8 graphs carry a gate record; gate --precision int8 "
            f"(got {res.precision})"
        )
    summ = res.summary()
    if res.report_path is not None:
        try:
            summ["report"] = str(res.report_path.resolve().relative_to(Path(model_dir).resolve()))
        except ValueError:
            summ["report"] = str(res.report_path.resolve())

    def mark(m: Manifest) -> Manifest:
        graphs = {
            k: replace(g, quant={**g.quant, "usable": res.passed, "runtime_gate": summ})
            if g.precision == "int8" and g.target == res.target
            else g
            for k, g in m.graphs.items()
        }
        return replace(m, graphs=graphs)

    update_manifest(model_dir, mark)
