"""Image-level upscaling: pad, tile, batch tiles, run the executor, blend; and the file batch job.

Only manifest numbers drive padding and tiling (tile shape or dynamic range, LR multiple, batch
range, measured memory, TensorRT optimization profiles); the family is never special-cased. A
dynamic model runs an image whole when it fits the range and the memory budget (ONNX Runtime) or
one of the engines' optimization profiles (TensorRT), else in the largest tiles that fit
(``tiling.plan_tiles``); a static model runs its exported tile. Tiles overlap and are blended
with complementary raised-cosine ramps in HR space. ``resshift-v3`` noise is drawn once per
image at the full padded state size and cropped per tile, so all tiles see one continuous field.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np

from deltadiff.errors import BackendError, DeltaDiffError, ImageError
from deltadiff.manifest import Manifest, load_manifest, verify_graph
from deltadiff.noise import noise_field
from deltadiff.options import DEFAULT_MODE, Backend, Mode, Precision, parse
from deltadiff.runtime.backends import open_backend
from deltadiff.runtime.executor import Executor
from deltadiff.runtime.faults import allocation_failure, one_line, unexpected_failure
from deltadiff.runtime.imageio import (
    find_images,
    output_path,
    read_image,
    upscale_alpha,
    write_image,
)
from deltadiff.runtime.memory_budget import default_budget, max_hr_pixels, record_key
from deltadiff.runtime.precision import PrecisionChoice, choose_precision
from deltadiff.tiling import (
    Blender,
    TilePlan,
    axis_weights,
    plan_tiles,
    reflect_pad,
    tile_starts,
)

log = logging.getLogger(__name__)

BUNDLED_MODEL = "demo-pixel"
TileProgress = Callable[[int, int], None]  # (tiles done, tiles in the image)


def default_model_dir() -> Path:
    """The demo model bundled inside the package (graphs + manifest)."""
    p = Path(str(resources.files("deltadiff.runtime") / "models" / BUNDLED_MODEL))
    if not (p / "manifest.json").exists():
        raise DeltaDiffError(
            f"the bundled model is missing from {p}; reinstall deltadiff-trt or pass --model DIR"
        )
    return p


@dataclass(frozen=True)
class UpscaleOptions:
    backend: Backend = Backend.ONNXRUNTIME
    precision: Precision | None = None  # None: the model's default here (default_precision)
    mode: Mode = DEFAULT_MODE
    threads: int = 0
    tile: int | None = None  # LR tile side; dynamic models: a choice, static: the export's
    overlap: int | None = None  # LR pixels; default tile // 8 (at least 4)
    batch: int = 1
    blend: str = "cosine"  # or "crop" (naive, for comparison)
    seed: int = 0  # noise seed (resshift-v3 only)
    device: int = 0
    max_memory: float | None = None  # GiB of peak RSS for a CPU run (default: half of MemAvailable)

    def memory_key(self) -> str:
        return record_key(self.backend, self.precision, self.mode)

    def __post_init__(self) -> None:
        """Accept text for the typed options (CLI, callers): one line if a value is unknown."""
        object.__setattr__(self, "backend", parse(Backend, self.backend, "--backend"))
        if self.precision is not None:
            object.__setattr__(self, "precision", parse(Precision, self.precision, "--precision"))
        object.__setattr__(self, "mode", parse(Mode, self.mode, "--mode"))


LrBox = tuple[tuple[int, int], tuple[int, int]]  # (min, max) LR (h, w)


def default_precision(m: Manifest, opts: UpscaleOptions) -> Precision:
    """The precision ``opts`` runs ``m`` at here (``runtime/precision.py``: asked for, else INT8
    only where its graphs passed the gate and this CPU runs them faster, else FP32)."""
    return choose_precision(m, opts.backend, opts.mode, opts.precision).precision


def fixed_tile(m: Manifest, opts: UpscaleOptions) -> bool:
    """Static exports run their tile; dynamic ones any size their graphs (ONNX Runtime) or
    their engines' optimization profiles (TensorRT) accept."""
    return not m.dynamic


def engine_boxes(m: Manifest, opts: UpscaleOptions) -> list[LrBox] | None:
    """TensorRT on a dynamic model: the LR (min, max) of each optimization profile the engines
    were built with (the manifest's engine records; the backend checks the engines themselves
    and picks the profile per call). None for other backends and static models; the model's
    range when no engine is recorded yet (the backend then says how to build one)."""
    if opts.backend is not Backend.TENSORRT or not m.dynamic:
        return None
    first = "unrolled" if opts.mode is Mode.UNROLLED else "encoder"
    recs = [
        e
        for e in m.engines
        if e.get("graph") == first and e.get("precision") == opts.precision and e.get("profiles")
    ]
    if not recs:
        return [m.lr_range()]
    rec = recs[-1]
    if opts.batch > rec.get("batch", [1, 1, m.batch[1]])[-1]:
        raise DeltaDiffError(
            f"--batch {opts.batch}: the TensorRT engines were built for batches up to "
            f"{rec['batch'][-1]}; rebuild with dd-export build-engine --batch-max {opts.batch}"
        )
    return [(tuple(p[0]), tuple(p[2])) for p in rec["profiles"]]  # type: ignore[misc]


def max_lr_pixels(m: Manifest, opts: UpscaleOptions) -> int | None:
    """LR pixels per backend call within the memory budget (CPU onnxruntime), or None.

    From the manifest's measured peak RSS model (``dd-export measure-memory``); without a
    measurement for this precision/mode a CPU run stays within the exported tile's area.
    TensorRT: None; the engines' profile maximum is the limit (a context reserves the device
    memory for it when it is created, the chain's buffers are sized for it).
    """
    if fixed_tile(m, opts) or opts.backend is not Backend.ONNXRUNTIME:
        return None
    rec = m.memory.get(opts.memory_key())
    if rec is None:
        return m.tile[0] * m.tile[1]
    budget = int(opts.max_memory * (1 << 30)) if opts.max_memory else default_budget()
    return max_hr_pixels(rec, budget, max(1, opts.batch)) // (m.scale * m.scale)


def plan_image(m: Manifest, opts: UpscaleOptions, h: int, w: int, max_px: int | None) -> TilePlan:
    """The tile an (h, w) LR image runs with (whole image when it fits). TensorRT: whole when
    one optimization profile holds the padded image, else the largest tiles one profile holds."""
    if fixed_tile(m, opts):
        th, tw = m.tile
        return TilePlan((th, tw), h <= th and w <= tw, "static tile")
    boxes = engine_boxes(m, opts)
    plans = []
    for i, (lo, hi) in enumerate(boxes or [m.lr_range()]):
        p = plan_tiles(
            h, w, multiple=m.lr_multiple, lr_min=lo, lr_max=hi, max_lr_px=max_px, tile=opts.tile
        )
        if all(a <= t <= b for a, t, b in zip(lo, p.tile, hi, strict=True)):
            if boxes is not None:
                box = f"{lo[0]}x{lo[1]}..{hi[0]}x{hi[1]}"
                p = TilePlan(p.tile, p.whole, f"{p.reason}; TensorRT profile {i} ({box})")
            plans.append(p)
    if not plans:  # only a --tile outside every profile gets here (checked at start-up)
        raise DeltaDiffError(f"--tile {opts.tile}: no TensorRT optimization profile holds it")
    whole = [p for p in plans if p.whole]
    return whole[0] if whole else max(plans, key=lambda p: p.tile[0] * p.tile[1])


class Upscaler:
    """Upscale float RGB arrays with a model directory on a backend."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        opts: UpscaleOptions | None = None,
        *,
        manifest: Manifest | None = None,
        check_graphs: bool = True,
    ) -> None:
        """``manifest``: the model directory's manifest, already loaded (the runtime gate passes
        one whose INT8 records it is judging; everything else reads ``model_dir``).
        ``check_graphs=False``: the graphs run elsewhere (a Triton BLS model whose stages are
        other Triton models), so the folder holds only the manifest."""
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.m: Manifest = manifest or load_manifest(self.model_dir, check_hashes=False)
        opts = opts or UpscaleOptions()
        self.choice: PrecisionChoice = choose_precision(
            self.m, opts.backend, opts.mode, opts.precision
        )
        self.opts = opts = replace(opts, precision=self.choice.precision)
        log.info("%s", self.choice.line())
        if opts.precision == "int8":
            why = self.m.int8_status("tensorrt" if opts.backend == "tensorrt" else "onnxruntime")
            if why:
                raise DeltaDiffError(f"--precision int8: {why}")
        elif opts.precision not in self.m.precisions():
            raise DeltaDiffError(
                f"--precision {opts.precision}: this model has {', '.join(self.m.precisions())} graphs"
                + {
                    Precision.FP16: "; add FP16 graphs with dd-export fp16",
                    Precision.INT8: "; add INT8 graphs with dd-export calibrate",
                }.get(opts.precision, "")
            )
        th, tw = self.m.tile
        self.fixed_tile = fixed_tile(self.m, opts)
        if opts.tile is not None and self.fixed_tile and (opts.tile, opts.tile) != (th, tw):
            raise DeltaDiffError(
                f"--tile {opts.tile}: this model runs {th}x{tw} LR tiles (static shapes); "
                f"use --tile {th} or re-export with dd-export onnx --dynamic"
            )
        boxes = engine_boxes(self.m, opts)
        if opts.tile is not None and not self.fixed_tile:
            (h0, w0), (h1, w1) = self.m.lr_range()
            mult = self.m.lr_multiple
            if opts.tile % mult or not max(h0, w0) <= opts.tile <= min(h1, w1):
                raise DeltaDiffError(
                    f"--tile {opts.tile}: choose a multiple of {mult} in "
                    f"[{max(h0, w0)}, {min(h1, w1)}] for this model (or leave --tile out)"
                )
            if boxes and not any(max(lo) <= opts.tile <= min(hi) for lo, hi in boxes):
                held = ", ".join(f"{max(lo)}..{min(hi)}" for lo, hi in boxes)
                raise DeltaDiffError(
                    f"--tile {opts.tile}: the TensorRT engines' profiles hold square tiles of "
                    f"{held}; choose one of those or rebuild with dd-export build-engine --profile"
                )
        self.max_lr_px = max_lr_pixels(self.m, opts)
        lo, hi = self.m.batch
        if not lo <= opts.batch <= hi:
            raise DeltaDiffError(
                f"--batch {opts.batch} is outside the model's batch range [{lo}, {hi}]"
            )
        self.overlap = opts.overlap if opts.overlap is not None else max(4, min(th, tw) // 8)
        if self.fixed_tile and not 0 <= self.overlap < min(th, tw):
            raise DeltaDiffError(
                f"--overlap {self.overlap} must be in [0, {min(th, tw)}) for {th}x{tw} tiles"
            )
        if opts.blend not in ("cosine", "crop"):
            raise DeltaDiffError(f"--blend {opts.blend!r}: choose cosine or crop")
        if check_graphs and opts.backend is not Backend.TENSORRT:
            self._check_graphs()  # a bad model folder fails here once, not once per image
        self.backend = open_backend(
            opts.backend,
            self.model_dir,
            self.m,
            precision=opts.precision,
            threads=opts.threads,
            device=opts.device,
        )
        self.executor = Executor(self.m, self.backend, mode=opts.mode)

    def _check_graphs(self) -> None:
        """Every graph this run will open: inside the model folder and matching its sha256
        (``verify_graph``; hashes are cached per process, so the backend's own check is free)."""
        prec, mode = self.opts.precision, self.opts.mode
        names = ["unrolled"] if mode is Mode.UNROLLED else ["encoder", "decoder"]
        if mode is not Mode.UNROLLED:
            names += [f"step@{r.t}" for r in self.m.step_table.rows]
        for name in names:
            rec = self.m.graph(name, prec)  # the executor's lookup on onnxruntime
            verify_graph(self.model_dir, rec, what=f"graph {rec.file}")

    def plan(self, h: int, w: int, max_px: int | None = None) -> TilePlan:
        """The tile an (h, w) LR image runs with (whole image when it fits). ``max_px`` caps the
        LR pixels per tile below the memory budget and overrides ``--tile`` (the out-of-memory
        retry of ``upscale_retrying``)."""
        if max_px is None:
            return plan_image(self.m, self.opts, h, w, self.max_lr_px)
        cap = max_px if self.max_lr_px is None else min(max_px, self.max_lr_px)
        return plan_image(self.m, replace(self.opts, tile=None), h, w, cap)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Upscaler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _layout(
        self, h: int, w: int, max_px: int | None = None
    ) -> tuple[TilePlan, list[int], list[int]]:
        """The tile plan for an h x w LR image and its tile start offsets (rows, columns)."""
        plan = self.plan(h, w, max_px)
        th, tw = plan.tile
        overlap = self.overlap
        if self.opts.overlap is None and not self.fixed_tile:
            overlap = max(4, min(th, tw) // 8)
        if not plan.whole and overlap >= min(th, tw):
            raise DeltaDiffError(
                f"--overlap {overlap} must be below the {th}x{tw} tile; choose a smaller --overlap"
            )
        H, W = max(h, th), max(w, tw)  # small images are reflect-padded up to the tile
        return plan, tile_starts(H, th, overlap), tile_starts(W, tw, overlap)

    def tile_count(self, h: int, w: int) -> int:
        """How many tiles an h x w LR image runs as (1: whole)."""
        _plan, ys, xs = self._layout(h, w)
        return len(ys) * len(xs)

    def upscale(
        self,
        rgb: np.ndarray,
        *,
        seed: int | None = None,
        progress: TileProgress | None = None,
        max_tile_px: int | None = None,
        batch: int | None = None,
    ) -> np.ndarray:
        """(h, w, 3) float32 in [0, 1] -> (4h, 4w, 3) float32 in [0, 1].

        ``progress(done, total)`` is called with 0 before the first tile and after every batch.
        ``max_tile_px`` / ``batch``: a smaller tile / batch than planned (out-of-memory retry).
        """
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise DeltaDiffError(f"expected an (h, w, 3) RGB array, got shape {rgb.shape}")
        h, w = rgb.shape[:2]
        plan, ys, xs = self._layout(h, w, max_tile_px)
        self.last_plan = plan
        th, tw = plan.tile
        log.debug(
            "%dx%d LR: %s tile %dx%d (%s)",
            h,
            w,
            "whole" if plan.whole else "tiled",
            th,
            tw,
            plan.reason,
        )
        s = self.m.scale
        lr = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)  # (3, h, w)
        lr = reflect_pad(lr, max(0, th - h), max(0, tw - w))
        H, W = lr.shape[1:]
        wys = axis_weights(ys, th, s, self.opts.blend)
        wxs = axis_weights(xs, tw, s, self.opts.blend)
        noise = None
        if self.m.noise_names:
            sh, sw = self.m.state_hw((H, W))
            noise = noise_field(
                self.m.noise_names, (1, 3, sh, sw), self.opts.seed if seed is None else seed
            )
        ratio = self.m.state_hw((1, 1))[0]  # state pixels per LR pixel (1 latent, 4 pixel)
        jobs = [(iy, ix) for iy in range(len(ys)) for ix in range(len(xs))]
        out = Blender(3, s * H, s * W)
        if progress:
            progress(0, len(jobs))
        per_call = batch or self.opts.batch
        for b0 in range(0, len(jobs), per_call):
            chunk = jobs[b0 : b0 + per_call]
            batch = np.stack(
                [lr[:, ys[iy] : ys[iy] + th, xs[ix] : xs[ix] + tw] for iy, ix in chunk]
            )
            feeds = None
            if noise is not None:
                feeds = {
                    k: np.concatenate(
                        [
                            v[
                                :,
                                :,
                                ratio * ys[iy] : ratio * (ys[iy] + th),
                                ratio * xs[ix] : ratio * (xs[ix] + tw),
                            ]
                            for iy, ix in chunk
                        ]
                    )
                    for k, v in noise.items()
                }
            sr = self.executor.run(batch, feeds)
            for (iy, ix), tile in zip(chunk, sr, strict=True):
                out.add(tile, s * ys[iy], s * xs[ix], wys[iy], wxs[ix])
            if progress:
                progress(b0 + len(chunk), len(jobs))
        res = out.result()[:, : s * h, : s * w]
        return np.ascontiguousarray(res.transpose(1, 2, 0))


# ----------------------------------------------------------------------------- file batch job


@dataclass
class JobSummary:
    done: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def plan_outputs(
    inputs: Sequence[str | Path], out: Path, *, recursive: bool = True, suffix: str | None = None
) -> list[tuple[Path, Path]]:
    """(source, destination) pairs for a job; one input file may map to an output file name.
    An output folder inside an input folder is not walked (its files are this job's outputs)."""
    single = len(inputs) == 1 and Path(inputs[0]).is_file()
    found = find_images(inputs, recursive=recursive, exclude=() if single else (out,))
    return [(src, output_path(src, rel, out, suffix=suffix, single=single)) for src, rel in found]


def _smaller_tiles(
    up: Upscaler, h: int, w: int, tile: tuple[int, int], batch: int
) -> tuple[int, int] | None:
    """(LR pixel cap, batch) for the next try after running out of memory with ``tile`` x
    ``batch``: a quarter of the pixels (half each side; a whole image becomes tiles), one tile
    per call; the same tile one per call when it cannot shrink (static export, minimum tile)
    but ran batched; None when nothing smaller is possible."""
    area = tile[0] * tile[1]
    try:
        plan = up._layout(h, w, max(1, area // 4))[0]
    except DeltaDiffError:  # e.g. a user --overlap that no smaller tile holds
        plan = None
    if plan is not None and plan.tile[0] * plan.tile[1] < area:
        return max(1, area // 4), 1
    return (area, 1) if batch > 1 else None


def upscale_retrying(
    up: Upscaler, rgb: np.ndarray, *, name: str | Path, progress: TileProgress | None = None
) -> np.ndarray:
    """``up.upscale(rgb)``; when it runs out of memory (``faults.allocation_failure``: numpy's
    MemoryError, onnxruntime's "bad allocation" / "Failed to allocate", CUDA out of memory) it
    is retried with smaller tiles (``_smaller_tiles``, logged) until the smallest fails too,
    which raises a one-line BackendError naming ``name``. Other errors pass through."""
    h, w = rgb.shape[:2]
    cap: int | None = None
    batch: int | None = None
    while True:
        try:
            if cap is None:
                return up.upscale(rgb, progress=progress)
            return up.upscale(rgb, progress=progress, max_tile_px=cap, batch=batch)
        except Exception as exc:
            if not allocation_failure(exc):
                raise
            last = getattr(up, "last_plan", None)
            if last is None or not hasattr(up, "_layout"):  # a view without the tiling state
                raise BackendError(
                    f"{name}: out of memory ({one_line(exc)}); free memory or upscale a "
                    "smaller image"
                ) from exc
            tile = last.tile
            used = batch or up.opts.batch
            nxt = _smaller_tiles(up, h, w, tile, used)
            if nxt is None:
                raise BackendError(
                    f"{name}: out of memory with {tile[0]}x{tile[1]} LR tiles, {used} per call, "
                    f"the smallest this model runs ({one_line(exc)}); free memory or upscale a "
                    "smaller image"
                ) from exc
            log.warning(
                "%s: out of memory with %dx%d LR tiles, %d per call (%s); retrying with tiles of "
                "at most %d LR pixels, 1 per call",
                name,
                *tile,
                used,
                one_line(exc),
                nxt[0],
            )
            cap, batch = nxt


def upscale_file(up: Upscaler, src: Path, dst: Path, progress: TileProgress | None = None) -> None:
    """Read ``src``, upscale it (retrying in smaller tiles when out of memory), write ``dst``."""
    img = read_image(src)
    sr = upscale_retrying(up, img.rgb, name=src, progress=progress)
    alpha = upscale_alpha(img.alpha, up.m.scale) if img.alpha is not None else None
    write_image(
        dst,
        sr,
        alpha=alpha,
        bit_depth=img.bit_depth,
        grayscale=img.grayscale,
        icc_profile=img.icc_profile,
        exif=img.exif,
    )


def run_job(
    up: Upscaler,
    pairs: list[tuple[Path, Path]],
    *,
    overwrite: bool = False,
    on_file: Callable[[Path, str], None] | None = None,
    on_tile: Callable[[Path, int, int], None] | None = None,
) -> JobSummary:
    """Upscale every (src, dst) pair; a failing file is recorded and the job goes on.

    ``on_file(src, status)`` follows each file; ``on_tile(src, done, total)`` each batch of tiles.
    """
    summary = JobSummary()
    t0 = time.perf_counter()
    seen: dict[Path, Path] = {}
    for src, dst in pairs:
        status = "done"
        try:
            if dst.resolve() == src.resolve():
                raise ImageError(f"{dst}: output would replace its input; choose another -o folder")
            if dst in seen:
                raise ImageError(f"{dst}: also the output of {seen[dst]}; rename one of the inputs")
            seen[dst] = src
            if dst.exists() and not overwrite:
                summary.skipped.append((src, f"{dst} exists (pass --overwrite to replace it)"))
                status = "skipped"
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                tick = None if on_tile is None else (lambda d, n, _s=src: on_tile(_s, d, n))
                upscale_file(up, src, dst, tick)
                summary.done.append(dst)
        except DeltaDiffError as exc:
            summary.failed.append((src, str(exc)))
            status = "failed"
            log.debug("failed: %s", exc)
        except OSError as exc:
            summary.failed.append((src, f"{src}: {exc.strerror or exc}"))
            status = "failed"
        except Exception as exc:  # noqa: BLE001 - one file's fault never ends the folder job
            summary.failed.append((src, unexpected_failure(src, exc)))
            status = "failed"
        if on_file:
            on_file(src, status)
    summary.seconds = time.perf_counter() - t0
    return summary
