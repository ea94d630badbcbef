"""The ISA mask without CPUID faulting: a patched copy of the Python packages whose native
libraries pick their kernels by CPUID (onnxruntime's MLAS, numpy and its OpenBLAS, Pillow's codecs).

Every CPUID instruction (``0F A2``) in the executable segments of their ELF libraries is found by
disassembly (capstone, a linear sweep that steps over data) and replaced with ``INT3; NOP``
(``CC 90``). Under ``isa_mask.c`` in patch mode (``DD_ISA_PATCHED`` names the copy), the INT3
traps, the shim answers with the masked CPUID and steps over the NOP. The copy goes first on
``PYTHONPATH``, so ``import onnxruntime`` in a masked child loads it; the installed packages are
never touched. Built once per package set into the user cache (about 150 MB, ~15 s).

This covers what the lean runtime runs (numpy + onnxruntime + Pillow). PyTorch is too big to copy
and sweep; isa.py masks it with its own switches instead. A CPUID in any other library (the
interpreter, glibc: masked by GLIBC_TUNABLES) is not seen.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.metadata
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

from deltadiff.errors import DeltaDiffError

# top-level import name -> distribution (its auditwheel folder of bundled libraries: <dist>.libs)
PACKAGES = {"onnxruntime": "onnxruntime", "numpy": "numpy", "PIL": "pillow"}
CPUID = b"\x0f\xa2"
TRAP = b"\xcc\x90"  # INT3; NOP: same length, so nothing else moves
_WINDOW = 1 << 20  # bytes of code disassembled at a time
_FORMAT = 1  # bump when the patching changes: the cache key includes it
_MARK = "isa-patch.json"  # written last: a folder without it is incomplete


class IsaPatchError(DeltaDiffError):
    """The patched copy cannot be built."""


def _code_ranges(data: bytes) -> list[tuple[int, int]]:
    """(file offset, size) of the code of an x86-64 ELF64 file, else []: its executable sections
    (SHF_EXECINSTR: .text, .plt, .init ...), or, without section headers, its executable PT_LOAD
    segments. Sections, not segments, where there are any: a segment can also hold read-only data,
    whose bytes must not be patched."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    if struct.unpack_from("<H", data, 0x12)[0] != 62:  # EM_X86_64
        return []
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    out = []
    for i in range(shnum if shoff else 0):
        _name, sh_type, sh_flags, _addr, sh_offset, sh_size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize
        )
        if sh_flags & 0x4 and sh_type != 8 and sh_size:  # SHF_EXECINSTR, not SHT_NOBITS
            out.append((sh_offset, sh_size))
    if out:
        return out
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, p_flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type == 1 and p_flags & 1:  # PT_LOAD, PF_X
            out.append((p_offset, p_filesz))
    return out


def cpuid_sites(data: bytes) -> list[int]:
    """File offsets of the CPUID opcodes (``0F A2``) of an ELF library (none for other files)."""
    ranges = _code_ranges(data)
    if not ranges:
        return []
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.skipdata = True  # data between functions: step over it instead of stopping
    sites = []
    for off, size in ranges:
        end = off + size
        if data.find(CPUID, off, end) < 0:
            continue
        # windows: capstone decodes a whole buffer into memory at once (~240 bytes an
        # instruction, 1.5 GB for onnxruntime); each window resumes after its last instruction
        # that ends clear of the cut, so none is split
        pos = off
        while pos < end:
            stop = min(pos + _WINDOW, end)
            last = stop if stop == end else stop - 16  # x86 instructions are at most 15 bytes
            nxt = pos
            for addr, n, mnemonic, _ops in md.disasm_lite(data[pos:stop], pos):
                if addr + n > last:
                    break
                if mnemonic == "cpuid":
                    site = addr + n - 2  # the opcode: after any prefix bytes
                    if data[site : site + 2] != CPUID:
                        raise IsaPatchError(f"a cpuid at offset {addr:#x} is not 0F A2")
                    sites.append(site)
                nxt = addr + n
            if nxt == pos:
                raise IsaPatchError(f"no instruction decoded at offset {pos:#x}")
            pos = nxt
    return sites


def patch_file(path: Path) -> int:
    """Replace every CPUID of the ELF library ``path`` in place; the number of sites."""
    data = path.read_bytes()
    sites = cpuid_sites(data)
    if sites:
        buf = bytearray(data)
        for s in sites:
            buf[s : s + 2] = TRAP
        path.chmod(path.stat().st_mode | 0o200)
        path.write_bytes(bytes(buf))
    return len(sites)


def _sources(skip: Path | None) -> list[tuple[str, Path, str]]:
    """(name, folder, version) of each package and <dist>.libs folder to copy, found on sys.path
    without the patched copies themselves (a masked parent has one on its path)."""
    skip = skip.resolve() if skip else None
    path = [p for p in sys.path if not (skip and Path(p or ".").resolve().is_relative_to(skip))]
    out = []
    for name, dist in PACKAGES.items():
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not spec.submodule_search_locations:
            raise IsaPatchError(f"package {name} is not installed; pip install {dist}")
        pkg = Path(next(iter(spec.submodule_search_locations)))
        version = importlib.metadata.version(dist)
        out.append((name, pkg, version))
        # auditwheel's folder of bundled libraries: pillow.libs, or Pillow.libs (Pillow 10)
        for libs in pkg.parent.iterdir():
            if libs.name.lower() == f"{dist}.libs" and libs.is_dir():
                out.append((libs.name, libs, version))
    return out


@functools.cache
def build_patched_site(cache: Path) -> Path:
    """The patched copy of PACKAGES under ``cache`` (built on first use, then reused)."""
    try:
        import capstone  # noqa: F401
    except ImportError:
        raise IsaPatchError(
            "the ISA mask without CPUID faulting needs the capstone disassembler; "
            "pip install capstone (in the [bench] extra)"
        ) from None
    sources = _sources(cache)
    key = hashlib.sha256(
        json.dumps([_FORMAT, [(n, str(p), v) for n, p, v in sources]]).encode()
    ).hexdigest()[:16]
    dest = cache / f"isa-site-{key}"
    if (dest / _MARK).is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".isa-site-{key}-", dir=cache))
    try:
        sites = {}
        for name, src, _version in sources:
            shutil.copytree(src, tmp / name, symlinks=True)
            for f in sorted((tmp / name).rglob("*.so*")):
                if f.is_file() and not f.is_symlink() and (n := patch_file(f)):
                    sites[str(f.relative_to(tmp))] = n
        if not any(k.startswith("onnxruntime/") for k in sites):
            raise IsaPatchError("no CPUID instruction found in onnxruntime's libraries")
        (tmp / _MARK).write_text(json.dumps({"packages": sources, "sites": sites}, default=str))
        try:
            tmp.rename(dest)
        except OSError:  # another process finished first
            if not (dest / _MARK).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
