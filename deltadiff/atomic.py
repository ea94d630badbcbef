"""Atomic file writes: everything the toolkit writes (images, manifests, graphs, engines,
checkpoints, reports) goes to a temp file beside the target and is moved onto it only when
complete, so a failure never leaves a partial file or destroys an existing one."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def default_file_mode() -> int:
    """0o666 less the process umask (read from /proc where possible, without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path`` (keeping an existing
    file's permissions, else umask defaults); on any exception it is removed."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = default_file_mode()
        tmp.chmod(mode)
        tmp.replace(path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (a sidecar file, created if missing and never
    followed if it is a symlink) for the ``with`` block; other processes taking the same lock wait.
    The lock goes with the file descriptor, so a killed holder never leaves it taken.
    Raises OSError when the file cannot be opened (read-only folder, symlink)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks; writes stay atomic, not serialized
        log.warning("no fcntl here: %s is not locked", path)
        yield
        return
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, default_file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s (another process holds it)", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
