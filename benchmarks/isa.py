"""Run a command as if on an AVX2-only CPU: the ``isa_mask.c`` LD_PRELOAD shim hides AVX-512,
VNNI and AMX from CPUID, so onnxruntime, oneDNN, PyTorch and numpy take their AVX2 kernels on an
AVX-512 machine. An emulation of the ISA only: caches, memory bandwidth and clocks stay those of
this machine.

Two methods (``mask_method()``): "fault" where the CPU offers Linux CPUID faulting (every CPUID of
the process is masked); otherwise "patch": onnxruntime, numpy and Pillow run from a copy whose
CPUID instructions trap into the shim (``isa_patch.py``), PyTorch through its own ISA switches.

    python -m deltadiff.benchmarks.isa avx2 -- dd-run bench --label xeon-avx2-mask
    python -m deltadiff.benchmarks.bench_upscale_cli IMG --isa native --isa avx2

The mask must be in place before any library reads CPUID, i.e. from process start, so it always
applies to a new process: ``isa_env`` gives a child's environment, the runner above execs any
command under it. ``active_isa()`` says whether this process runs masked (reports record it).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from deltadiff.benchmarks.isa_patch import build_patched_site
from deltadiff.errors import DeltaDiffError
from deltadiff.runtime.atomic import atomic_path

ISAS = ("native", "avx2")
SHIM_SOURCE = Path(__file__).with_name("isa_mask.c")
# glibc picks its string functions (and glibc-hwcaps library folders) before the shim loads.
_GLIBC_TUNABLES = {"avx2": "glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD"}
# patch method: PyTorch's own switches (ATen kernels, oneDNN, MKL), as it is not in the copy
_TORCH_SWITCHES = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    }
}
_PROBE = (
    "import ctypes, json, numpy, onnxruntime, PIL.Image; f = ctypes.CDLL(None).dd_isa_mask; "
    "f.restype = ctypes.c_char_p; "
    "print(json.dumps([(f() or b'native').decode(), numpy.__file__, onnxruntime.__file__]))"
)


class IsaMaskError(DeltaDiffError):
    """The ISA mask cannot be built or does not work on this machine."""


def check_isa(isa: str) -> str:
    if isa not in ISAS:
        raise IsaMaskError(f"ISA {isa!r} is not known; use one of {', '.join(ISAS)}")
    return isa


METHODS = ("fault", "patch")
# how each method reaches the libraries, for reports
METHOD_NOTES = {
    "fault": "CPUID faulting: every CPUID masked",
    "patch": "CPUIDs patched in onnxruntime / numpy / Pillow, PyTorch by its ISA switches",
}


def mask_method() -> str:
    """How the mask catches CPUIDs here: "fault" (CPUID faulting) where the CPU offers it, else
    "patch" (patched copies). ``DD_ISA_METHOD=patch`` forces the patch method (to compare the
    two on one machine); ``DD_ISA_METHOD=fault`` insists on faulting."""
    want = os.environ.get("DD_ISA_METHOD", "")
    if want and want not in METHODS:
        raise IsaMaskError(f"DD_ISA_METHOD={want} is not known; use one of {', '.join(METHODS)}")
    return want or ("fault" if "cpuid_fault" in _cpu_flags() else "patch")


def unavailable_reason() -> str | None:
    """Why the shim cannot work here (not Linux x86-64; neither CPUID faulting nor capstone for
    the patch method; no C compiler)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the ISA mask needs Linux on x86-64, this is {sys.platform} {platform.machine()}"
    method = mask_method()
    if method == "fault" and "cpuid_fault" not in _cpu_flags():
        return (
            "DD_ISA_METHOD=fault: this CPU / hypervisor offers no CPUID faulting (flag cpuid_fault "
            "in /proc/cpuinfo); unset DD_ISA_METHOD to patch the libraries instead"
        )
    if method == "patch" and importlib.util.find_spec("capstone") is None:
        return (
            "the ISA mask needs CPUID faulting (flag cpuid_fault in /proc/cpuinfo), which this "
            "CPU / hypervisor does not offer, or the capstone disassembler to patch the libraries' "
            "CPUIDs instead: pip install capstone (in the [bench] extra)"
        )
    if _compiler() is None:
        return "the ISA mask needs a C compiler (cc or gcc); install one, e.g. apt-get install gcc"
    return None


def _cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in (
            Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
        ):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def host_has_avx512() -> bool:
    return "avx512f" in _cpu_flags()


def _compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deltadiff"


def patched_site(method: str) -> Path | None:
    """The patched copy of onnxruntime / numpy / Pillow (patch method, built on first use), or
    None with CPUID faulting."""
    if method == "fault":
        return None
    try:
        return build_patched_site(_cache_dir().resolve())  # the shim wants an absolute path
    except Exception as exc:  # OSError, IsaPatchError, capstone's own: one line, not a traceback
        raise IsaMaskError(
            f"building the patched libraries for the ISA mask failed: {type(exc).__name__}: {exc}"
        ) from None


def compile_shim(out: Path) -> None:
    """Compile ``isa_mask.c`` into the shared library ``out``."""
    cmd = [_compiler(), "-O2", "-shared", "-fPIC", str(SHIM_SOURCE), "-o", str(out), "-ldl"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["no message"])[0]
        raise IsaMaskError(f"compiling the ISA mask failed ({' '.join(cmd)}): {err}")


def build_shim() -> Path:
    """The shim for this machine's mask method (see ``_build_shim``)."""
    return _build_shim(mask_method())


@functools.cache
def _build_shim(method: str) -> Path:
    """Compile ``isa_mask.c`` once per source version into the user cache (and, without CPUID
    faulting, the patched libraries), check that a child process runs masked with it (and loads
    the patched onnxruntime / numpy), and return the ``.so`` path."""
    reason = unavailable_reason()
    if reason:
        raise IsaMaskError(reason)
    src = SHIM_SOURCE.read_bytes()
    so = _cache_dir() / f"isa_mask-{hashlib.sha256(src).hexdigest()[:16]}.so"
    if not so.is_file():
        so.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(so) as tmp:
            compile_shim(tmp)
    site = patched_site(method)
    env = _masked_env(os.environ, "avx2", so, site)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    try:
        seen, *files = json.loads(proc.stdout)
    except ValueError:
        seen, files = None, []
    if proc.returncode != 0 or seen != "avx2":
        err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise IsaMaskError(f"the ISA mask {so} does not take effect in a child process: {err}")
    if site and not all(Path(f).is_relative_to(site) for f in files):
        raise IsaMaskError(
            f"a masked child imported {files} instead of the patched copies in {site}; "
            "is PYTHONPATH overridden, or a .pth file placing these packages first?"
        )
    return so


def _masked_env(
    base: Mapping[str, str], isa: str, so: Path, site: Path | None = None
) -> dict[str, str]:
    env = _native_env(base)
    env["LD_PRELOAD"] = ":".join(p for p in (env.get("LD_PRELOAD"), str(so)) if p)
    env["GLIBC_TUNABLES"] = ":".join(
        p for p in (env.get("GLIBC_TUNABLES"), _GLIBC_TUNABLES[isa]) if p
    )
    env["DD_ISA"] = isa
    if site is not None:
        env["DD_ISA_PATCHED"] = str(site)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
        # PyTorch's switches, unless the user set them: DD_ISA_SET names ours, to undo exactly
        ours = [k for k in _TORCH_SWITCHES[isa] if k not in env]
        env.update({k: _TORCH_SWITCHES[isa][k] for k in ours})
        env["DD_ISA_SET"] = ",".join(ours)
    return env


def _native_env(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` without a mask inherited from a masked parent."""
    env = dict(base)
    isa = env.pop("DD_ISA", None)
    pre = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    pre = [p for p in pre if not Path(p).name.startswith("isa_mask-")]
    if pre:
        env["LD_PRELOAD"] = ":".join(pre)
    else:
        env.pop("LD_PRELOAD", None)
    site = env.pop("DD_ISA_PATCHED", None)
    if site:
        path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p != site]
        env["PYTHONPATH"] = os.pathsep.join(path)
        if not path:
            env.pop("PYTHONPATH")
    for k in filter(None, env.pop("DD_ISA_SET", "").split(",")):
        env.pop(k, None)
    if isa in _GLIBC_TUNABLES:
        tun = [
            t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t != _GLIBC_TUNABLES[isa]
        ]
        env["GLIBC_TUNABLES"] = ":".join(tun)
        if not tun:
            env.pop("GLIBC_TUNABLES")
    return env


def isa_env(isa: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process that runs with ``isa``: "native" (no mask; one
    inherited from a masked parent is removed) or "avx2" (builds the shim on first use)."""
    check_isa(isa)
    base = os.environ if base is None else base
    if isa == "native":
        return _native_env(base)
    return _masked_env(base, isa, build_shim(), patched_site(mask_method()))


def active_isa() -> str:
    """The ISA this process is masked to ("avx2"), or "native" when it runs unmasked."""
    try:
        fn = ctypes.CDLL(None).dd_isa_mask
    except (AttributeError, OSError):
        return "native"
    fn.restype = ctypes.c_char_p
    name = fn()
    return name.decode() if name else "native"


def active_method() -> str | None:
    """How this process is masked: "fault", "patch", or None when it runs unmasked."""
    try:
        fn = ctypes.CDLL(None).dd_isa_method
    except (AttributeError, OSError):
        return None
    fn.restype = ctypes.c_char_p
    name = fn()
    return name.decode() if name else None


def main(argv: list[str] | None = None) -> None:
    """``python -m deltadiff.benchmarks.isa ISA -- COMMAND ...``: exec COMMAND under the mask."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" in args:
        i = args.index("--")
        args = args[:i] + args[i + 1 :]
    if len(args) < 2 or args[0] in ("-h", "--help"):
        print(
            f"usage: python -m deltadiff.benchmarks.isa {{{','.join(ISAS)}}} -- COMMAND [ARGS...]"
        )
        raise SystemExit(0 if args[:1] in (["-h"], ["--help"]) else 2)
    try:
        env = isa_env(args[0])
    except DeltaDiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        os.execvpe(args[1], args[1:], env)
    except OSError as exc:
        print(f"error: cannot run {args[1]!r}: {exc.strerror}", file=sys.stderr)
        raise SystemExit(127) from None


if __name__ == "__main__":
    main()
