"""What ``pip install deltadiff-trt`` installs: the wheel holds the package and the bundled model,
and nothing of the lab (``tools/``, tests, one-off scripts, sources of native probes).

The wheel is built once per session, offline, from a copy of the checkout's files that git tracks
or would track (``git ls-files --cached --others --exclude-standard``), so a stale ``build/``
folder or ignored junk in the checkout cannot leak into it:
``python -m pip wheel COPY --no-deps --no-build-isolation --no-index -w TMP``.

``docs/wheel-files.txt`` is the wheel's file list (sorted by name, uncompressed bytes); the test
checks that its names are the built wheel's names. Regenerate it after a packaging change with
``python tests/test_wheel.py > docs/wheel-files.txt``.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[1]
LIST_FILE = REPO / "docs" / "wheel-files.txt"
HEADER = (
    "# The files of the deltadiff-trt wheel: uncompressed bytes, name (sorted). Regenerate with\n"
    "# python tests/test_wheel.py > docs/wheel-files.txt (tests/test_wheel.py checks the names).\n"
)
# package -> source folder, as pyproject.toml's package-dir maps them (tests/test_layers.py too)
FOLDERS = {
    "deltadiff": "deltadiff",
    "deltadiff/model": "model",
    "deltadiff/export": "export",
    "deltadiff/runtime": "runtime",
    "deltadiff/calibration": "calibration",
    "deltadiff/benchmarks": "benchmarks",
}
MUST_HOLD = (
    "deltadiff/cli/run.py",
    "deltadiff/cli/export.py",
    "deltadiff/metrics.py",
    "deltadiff/runtime/serving/serve.py",
    "deltadiff/runtime/serving/triton_models/deltadiff.py",
    "deltadiff/runtime/models/demo-pixel/manifest.json",
)
# package modules whose names look like lab scripts but are the product (dd-run bench-cli)
ALLOWED_BENCH = {"deltadiff/benchmarks/bench_upscale_cli.py"}
# names of lab tooling that must never be installed
LAB_PATTERNS = ("*isa_mask*", "*isa_patch*", "*gpu_check*", "*.c", "conftest.py", "test_*.py")
# ignored anyway, but skipped if the checkout is not a git clone
_NOT_SOURCE = (
    ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
    ".ruff_cache", "corpus", "runs", "out", ".devcheck", "device-out",
)  # fmt: skip


def _source_copy(dest: Path) -> Path:
    """The checkout's source files (what a clean clone plus untracked, non-ignored files holds)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
        return dest
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file():  # deleted in the work tree but still in the index: left out
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def build_wheel(work: Path) -> tuple[Path, float]:
    """Build the wheel under ``work``; (wheel path, seconds the build took)."""
    src = _source_copy(work / "src")
    out = work / "wheel"
    cmd = [
        sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
        "--no-index", "--disable-pip-version-check", "-q", "-w", str(out),
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"wheel build failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    (wheel,) = out.glob("deltadiff_trt-*.whl")
    return wheel, seconds


def wheel_files(wheel: Path) -> dict[str, int]:
    """name -> uncompressed size of every file in the wheel."""
    with zipfile.ZipFile(wheel) as z:
        return {i.filename: i.file_size for i in z.infolist() if not i.is_dir()}


def render(files: dict[str, int]) -> str:
    return HEADER + "".join(f"{files[name]:>10}  {name}\n" for name in sorted(files))


def listed_names(text: str) -> list[str]:
    return [
        line.split(maxsplit=1)[1]
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    ]


def lab_problems(names: list[str]) -> list[str]:
    """Why each name is lab tooling that the wheel must not hold."""
    tools = {p.name for p in (REPO / "tools").rglob("*") if p.is_file()}
    bad = []
    for name in names:
        path = PurePosixPath(name)
        parts = set(path.parts[:-1])
        if parts & {"tools", "tests"}:
            bad.append(f"{name}: from tools/ or tests/")
        elif any(fnmatch.fnmatch(path.name, pat) for pat in LAB_PATTERNS):
            bad.append(f"{name}: lab tooling")
        elif fnmatch.fnmatch(path.name, "bench_*.py") and name not in ALLOWED_BENCH:
            bad.append(f"{name}: a bench_*.py one-off script")
        elif path.name in tools and path.suffix != ".json":
            bad.append(f"{name}: a file of tools/")
        elif "results" in parts:
            bad.append(f"{name}: committed measurement results")
    return bad


def source_modules() -> set[str]:
    """Every module of the package folders, by the name it has in the wheel."""
    out = set()
    for pkg, folder in FOLDERS.items():
        for f in (REPO / folder).rglob("*.py"):
            rel = f.relative_to(REPO / folder)
            if "__pycache__" in rel.parts:
                continue
            if pkg == "deltadiff" and rel.parts[0] in {"model", "export", "runtime"}:
                continue  # not a package folder of deltadiff/ (tests/test_layers.py skips them too)
            out.add(f"{pkg}/{rel.as_posix()}")
    return out


@pytest.fixture(scope="session")
def built() -> dict[str, int]:
    """The wheel's files (name -> bytes), built once per session."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools (the build backend) is not installed")
    with tempfile.TemporaryDirectory(prefix="dd-wheel-") as tmp:
        wheel, seconds = build_wheel(Path(tmp))
        print(f"{wheel.name}: built in {seconds:.1f} s")
        return wheel_files(wheel)


def test_wheel_holds_the_package_and_the_bundled_model(built: dict[str, int]) -> None:
    files = built
    missing = [name for name in MUST_HOLD if name not in files]
    assert not missing, f"the wheel lacks {missing}"
    modules = source_modules()
    assert len(modules) > 80, "the walk found no package folders"
    missing = sorted(modules - set(files))
    assert not missing, f"package modules left out of the wheel: {missing}"


def test_wheel_holds_no_lab_tooling(built: dict[str, int]) -> None:
    files = built
    bad = lab_problems(sorted(files))
    assert not bad, "lab files in the wheel:\n" + "\n".join(bad)


def test_committed_file_list_matches_the_wheel(built: dict[str, int]) -> None:
    files = built
    listed = listed_names(LIST_FILE.read_text(encoding="utf-8"))
    assert listed == sorted(listed), f"{LIST_FILE.name} is not sorted"
    added, gone = sorted(set(files) - set(listed)), sorted(set(listed) - set(files))
    assert not added and not gone, (
        f"{LIST_FILE.relative_to(REPO)} is stale (regenerate: python tests/test_wheel.py > "
        f"docs/wheel-files.txt); in the wheel only: {added}; listed only: {gone}"
    )


def test_lab_checker_flags_lab_files() -> None:
    names = [
        "deltadiff/cli/run.py",
        "deltadiff/benchmarks/bench_upscale_cli.py",
        "deltadiff/benchmarks/bench_schema.json",
        "deltadiff/runtime/models/demo-pixel/manifest.json",
        "tools/bundle_demo.py",
        "deltadiff/tests/test_x.py",
        "deltadiff/benchmarks/bench_ray.py",
        "deltadiff/cpu/isa_mask.c",
        "deltadiff/isa_patch.py",
        "deltadiff/gpu_check.py",
        "deltadiff/benchmarks/results/quality/x.json",
    ]
    assert [b.split(":")[0] for b in lab_problems(names)] == names[4:]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="dd-wheel-") as tmp:
        whl, secs = build_wheel(Path(tmp))
        listing = wheel_files(whl)
    sys.stdout.write(render(listing))
    sys.stderr.write(f"{whl.name}: {len(listing)} files, built in {secs:.1f} s\n")
