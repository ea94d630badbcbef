"""``dd-run bench-cli``: end-to-end wall time of the ``dd-run upscale`` command, as a user runs it.

Each run is a fresh process (interpreter start, imports, model load, image read, tiling, four steps,
write), so the number includes everything a user waits for. Runs are sequential; the first round is
a warm-up (file cache) and is reported separately as "first (cold)".

    dd-run bench-cli examples/astronaut_lr.png --runs 5 --label cpu-2core \\
        --variant "fp32:--precision fp32" --variant "int8:--precision int8"

``--variant NAME:OPTIONS`` (repeatable) times several option sets in one run, interleaved round by
round so machine drift hits them alike, and reports each median and its speed relative to the first
variant. Leading ``KEY=VALUE`` words of OPTIONS are environment variables for that variant's
processes (e.g. ``"per-session-arena:DELTADIFF_ORT_ARENA=session --precision int8"``). Options after
``--`` go to every variant. Each run's peak RSS is the child's own (from ``wait4``).

Writes ``upscale-cli-LABEL.json`` and ``.md`` into the output folder.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deltadiff.errors import DeltaDiffError

_ENV_WORD = re.compile(r"[A-Z_][A-Z0-9_]*=")


@dataclass(frozen=True)
class Variant:
    """One option set to time: its name, extra environment and ``dd-run upscale`` options."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    options: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``NAME:OPTIONS``; leading ``KEY=VALUE`` words of OPTIONS are environment variables."""
        name, _, opts = text.partition(":")
        if not name.strip():
            raise DeltaDiffError(
                f"--variant {text!r}: write NAME:OPTIONS, e.g. 'int8:--precision int8'"
            )
        try:
            words = shlex.split(opts)
        except ValueError as exc:
            raise DeltaDiffError(f"--variant {text!r}: cannot split the options ({exc})") from None
        env: dict[str, str] = {}
        while words and _ENV_WORD.match(words[0]):
            k, _, v = words.pop(0).partition("=")
            env[k] = v
        return cls(name.strip(), env, tuple(words))

    def command(self, image: Path) -> str:
        """The command as a user would type it (for the report)."""
        words = [f"{k}={v}" for k, v in self.env.items()]
        return shlex.join([*words, "dd-run", "upscale", image.name, "-o", "out.png", *self.options])


@dataclass(frozen=True)
class VariantTiming:
    """Seconds per run of one variant (the cold first run apart) and its median peak RSS."""

    command: str
    peak_rss_mib: float
    first_s: float
    runs_s: list[float]
    median_s: float
    min_s: float
    max_s: float


@dataclass
class CliBenchReport:
    """What ``dd-run bench-cli`` writes: sizes (WIDTHxHEIGHT), one timing per variant, machine."""

    input_size: list[int]
    output_size: list[int]
    variants: dict[str, VariantTiming]
    environment: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self, label: str) -> str:
        """A short table: median / min / max, the cold run, speed vs the first variant, peak RSS."""
        first = next(iter(self.variants.values())).median_s
        cpu = self.environment.get("cpu") or {}
        rows = "".join(
            f"| {k} | `{v.command}` | {len(v.runs_s)} | {v.median_s:.2f} s | {v.min_s:.2f} s | "
            f"{v.max_s:.2f} s | {v.first_s:.2f} s | {first / v.median_s:.2f}x | "
            f"{v.peak_rss_mib:.0f} MiB |\n"
            for k, v in self.variants.items()
        )
        (w, h), (ow, oh) = self.input_size, self.output_size
        return (
            f"# `dd-run upscale` end to end ({label})\n\n"
            f"{w}x{h} -> {ow}x{oh}, fresh process per run, variants interleaved. "
            f"CPU: {cpu.get('model')} ({cpu.get('logical_cores')} logical cores); "
            f"date {self.environment.get('date')}; command `{self.environment.get('command')}`.\n\n"
            "| variant | command | runs | median | min | max | first (cold) | speed vs first "
            "| peak RSS (median) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
            f"{rows}"
        )


def _dd_run() -> list[str]:
    """The ``dd-run`` of this Python (beside the interpreter), else on PATH, else ``-m``."""
    beside = Path(sys.executable).with_name("dd-run")
    if beside.is_file():
        return [str(beside)]
    exe = shutil.which("dd-run")
    return [exe] if exe else [sys.executable, "-m", "deltadiff.cli.run"]


def _run_once(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and the child's peak RSS (bytes); the child is waited with ``wait4`` so the
    peak is its own, not the maximum over every child so far. A failed run raises its last
    stderr line."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        pid = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env).pid
        _, status, usage = os.wait4(pid, 0)
        dt = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-1:]
    if code != 0:
        raise DeltaDiffError(tail[0] if tail else f"exit status {code}")
    return dt, usage.ru_maxrss * 1024


def _timing(variant: Variant, image: Path, times: list[float], peaks: list[int]) -> VariantTiming:
    warm = times[1:]
    return VariantTiming(
        command=variant.command(image),
        peak_rss_mib=statistics.median(peaks[1:]) / 2**20,
        first_s=times[0],
        runs_s=warm,
        median_s=statistics.median(warm),
        min_s=min(warm),
        max_s=max(warm),
    )


def _check(image: Path, runs: int, variants: list[Variant]) -> None:
    if not image.is_file():
        raise DeltaDiffError(f"image {image} does not exist; pass an image file to upscale")
    if runs < 1:
        raise DeltaDiffError(f"--runs {runs}: time at least 1 run (after the cold one)")
    names = [v.name for v in variants]
    if not names or len(set(names)) != len(names):
        raise DeltaDiffError(f"--variant names must be unique and non-empty, got {names}")


def time_upscale(image: Path, runs: int, variants: list[Variant]) -> CliBenchReport:
    """Time ``dd-run upscale`` once per variant per round, for ``runs + 1`` rounds (rounds
    interleave the variants); the first round is the cold run."""
    from PIL import Image

    _check(image, runs, variants)
    head = _dd_run()
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    peaks: dict[str, list[int]] = {v.name: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.png"
        for _ in range(runs + 1):
            for v in variants:
                cmd = [*head, "upscale", str(image), "-o", str(out), "--overwrite", *v.options]
                try:
                    dt, peak = _run_once(cmd, {**os.environ, **v.env})
                except DeltaDiffError as exc:
                    raise DeltaDiffError(f"dd-run upscale ({v.name}) failed: {exc}") from None
                times[v.name].append(dt)
                peaks[v.name].append(peak)
        with Image.open(image) as a, Image.open(out) as b:
            sizes = (list(a.size), list(b.size))  # PIL: (width, height)
    timings = {v.name: _timing(v, image, times[v.name], peaks[v.name]) for v in variants}
    return CliBenchReport(input_size=sizes[0], output_size=sizes[1], variants=timings)


def run_cli_bench(
    image: Path,
    *,
    runs: int = 5,
    variants: list[Variant] | None = None,
    extra: tuple[str, ...] = (),
    out: Path = Path("bench-results"),
    label: str = "local",
) -> tuple[CliBenchReport, dict[str, Path]]:
    """Time the variants (default: one, ``dd-run upscale``'s defaults), each with ``extra``
    options appended; write ``upscale-cli-LABEL.json`` / ``.md`` into ``out`` atomically."""
    from deltadiff.atomic import write_text_atomic
    from deltadiff.benchmarks.harness import BenchOptions, environment
    from deltadiff.manifest import write_json_atomic

    if not label or Path(label).name != label:
        raise DeltaDiffError(f"--label {label!r}: a plain name (it becomes the file name)")
    chosen = variants or [Variant("default")]
    chosen = [Variant(v.name, v.env, (*v.options, *extra)) for v in chosen]
    report = time_upscale(image, runs, chosen)
    report.environment = environment(BenchOptions(models=(), label=label))
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"upscale-cli-{label}"
    paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md")}
    write_json_atomic(paths["json"], report.to_dict())
    write_text_atomic(paths["md"], report.to_markdown(label))
    return report, paths
