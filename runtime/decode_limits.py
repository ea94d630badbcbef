"""Decompression-bomb checks: the decoded size of an image's compressed data, bounded while inflating.

A PNG's IDAT stream and a TIFF's zlib / LZMA / PackBits segments are inflated here *before* any
decoder sees them, in blocks of at most ``BLOCK`` bytes that are counted and thrown away, against
the size the header implies (PNG: ``rows * (1 + row bytes)``, summed over the Adam7 passes when
interlaced; TIFF: each strip's or tile's ``rows * row bytes``). Data that inflates past that size
fails at once with one ImageError line, so a 2 MB file that inflates to gigabytes costs
milliseconds and about ``BLOCK`` bytes of memory. Afterwards the real decoders (Pillow, pypng,
tifffile) only ever inflate data already known to fit the header.

Why here and not in the decoders: pypng's ``read`` inflates each IDAT chunk with no output limit
and yields every row the data holds, whatever the header says; tifffile without ``imagecodecs``
decodes zlib / LZMA segments with ``zlib.decompress`` / ``lzma.decompress`` (no limit) and
PackBits in pure Python. Pillow's own decoders (PNG zip, GIF LZW, JPEG, WebP, libtiff) write
into a buffer of the header's size and stop when it is full, so they are bounded already; the
PNG and TIFF checks still run before them so that such a file *fails* rather than decoding its
first rows and ignoring the rest.

Only over-long data is refused here. Short or broken streams are left to the decoders, which
report them as truncated or corrupt, as before. Written for this project (the stdlib ``zlib`` /
``lzma`` decompressors with ``max_length`` do the inflating).
"""

from __future__ import annotations

import lzma
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from deltadiff.errors import ImageError

BLOCK = 1 << 20  # bytes inflated (and discarded) per step
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)
# TIFF compression tag values checked here (the codecs the stdlib or a short loop can bound).
TIFF_ZLIB = frozenset({8, 32946, 50013})
TIFF_LZMA = 34925
TIFF_PACKBITS = 32773


class _TooLargeError(Exception):
    """Raised inside the counters when the output passes the limit."""


class _Counter(Protocol):
    def feed(self, data: bytes) -> None: ...


class _ZlibCounter:
    """Inflate a zlib stream in BLOCK-sized steps, counting the output; stop at its end."""

    def __init__(self, limit: int) -> None:
        self.limit, self.n, self.broken = limit, 0, False
        self._d = zlib.decompressobj()

    def feed(self, data: bytes) -> None:
        try:
            while data and not self._d.eof and not self.broken:
                self.n += len(self._d.decompress(data, BLOCK))
                if self.n > self.limit:
                    raise _TooLargeError
                data = self._d.unconsumed_tail
        except zlib.error:
            self.broken = True  # the decoder reports a broken stream; nothing more to count


class _LzmaCounter:
    def __init__(self, limit: int) -> None:
        self.limit, self.n, self.broken = limit, 0, False
        self._d = lzma.LZMADecompressor()

    def feed(self, data: bytes) -> None:
        try:
            while not self._d.eof and not self.broken:
                self.n += len(self._d.decompress(data, BLOCK))
                if self.n > self.limit:
                    raise _TooLargeError
                if self._d.needs_input:
                    return
                data = b""
        except lzma.LZMAError:
            self.broken = True


class _PackBitsCounter:
    """Count PackBits output run by run (header byte n: n+1 literal bytes, 257-n repeats)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.n = limit, 0
        self._skip = 0  # literal bytes (or the repeated byte) still to pass over

    def feed(self, data: bytes) -> None:
        i, size = self._skip, len(data)
        while i < size:
            h = data[i]
            if h < 128:
                self.n += h + 1
                i += h + 2
            elif h > 128:
                self.n += 257 - h
                i += 2
            else:
                i += 1
            if self.n > self.limit:
                raise _TooLargeError
        self._skip = i - size


def _counter(kind: str, limit: int) -> _Counter:
    return {"zlib": _ZlibCounter, "lzma": _LzmaCounter, "packbits": _PackBitsCounter}[kind](limit)


def _read_span(f: BinaryIO, length: int) -> Iterator[bytes]:
    """``length`` bytes from ``f``'s position in pieces of at most BLOCK (fewer at end of file)."""
    while length > 0:
        piece = f.read(min(length, BLOCK))
        if not piece:
            return
        length -= len(piece)
        yield piece


def _bomb(path: Path, fmt: str, size: tuple[int, int], what: str, limit: int) -> ImageError:
    return ImageError(
        f"{path}: {fmt} data inflates past the {size[0]}x{size[1]} its header declares "
        f"(more than {limit:,} bytes in {what}); the file is corrupt or a decompression bomb, "
        "re-export it from the original"
    )


def _count(kind: str, limit: int, pieces: Iterable[bytes]) -> bool:
    """False when the pieces inflate to more than ``limit`` bytes."""
    counter = _counter(kind, limit)
    try:
        for piece in pieces:
            counter.feed(piece)
    except _TooLargeError:
        return False
    return True


# ------------------------------------------------------------------------------------------ PNG


def png_data_limit(width: int, height: int, depth: int, color_type: int, interlace: int) -> int:
    """Bytes the IDAT stream of such a PNG inflates to: filter byte + packed row, per row (pass)."""
    channels = _PNG_CHANNELS.get(color_type)
    if channels is None or depth not in (1, 2, 4, 8, 16):
        raise ValueError(f"colour type {color_type} / bit depth {depth}")
    bits = channels * depth

    def rows(w: int, h: int) -> int:
        return 0 if w <= 0 or h <= 0 else h * (1 + (w * bits + 7) // 8)

    if not interlace:
        return rows(width, height)
    return sum(rows(-(-(width - x0) // dx), -(-(height - y0) // dy)) for x0, y0, dx, dy in _ADAM7)


def check_png(path: Path) -> None:
    """Refuse a PNG whose IDAT data inflates past what its IHDR implies (before decoding).

    Walks the chunks, inflating every IDAT in BLOCK steps; other chunks are skipped unread
    (Pillow bounds its own text / ICC chunk inflation). A file that ends early, or lacks an IHDR,
    is left for the decoder to report.
    """
    with path.open("rb") as f:
        if f.read(8) != _PNG_SIGNATURE:
            return
        counter: _Counter | None = None
        limit, size = 0, (0, 0)
        while True:
            head = f.read(8)
            if len(head) < 8:
                return
            length, ctype = struct.unpack(">I4s", head)
            if ctype == b"IHDR" and counter is None:
                if length != 13:
                    return
                ihdr = f.read(13)
                if len(ihdr) < 13:
                    return
                w, h, depth, color, _cm, _fm, interlace = struct.unpack(">IIBBBBB", ihdr)
                try:
                    limit = png_data_limit(w, h, depth, color, interlace)
                except ValueError:
                    return  # an invalid IHDR: the decoder says so
                counter, size = _ZlibCounter(limit), (w, h)
            elif ctype == b"IDAT" and counter is not None:
                try:
                    for piece in _read_span(f, length):
                        counter.feed(piece)
                except _TooLargeError:
                    raise _bomb(path, "PNG image", size, "the IDAT stream", limit) from None
            elif ctype == b"IEND":
                return
            else:
                f.seek(length, 1)
            f.seek(4, 1)  # CRC


# ----------------------------------------------------------------------------------------- TIFF


@dataclass(frozen=True)
class TiffSegments:
    """Where a TIFF page's compressed strips / tiles lie, and the most each may decode to."""

    compression: int
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    limit: int  # decoded bytes per segment
    what: str  # "strip" or "tile"


def _tuple(value: object) -> tuple[int, ...]:
    if isinstance(value, tuple | list):
        return tuple(int(v) for v in value)
    return (int(value),)  # type: ignore[call-overload]


def tiff_segments(tags: Mapping[int, object], width: int, height: int) -> TiffSegments | None:
    """The segment layout from a TIFF page's tags (Pillow's ``tag_v2``), or None when missing."""
    try:
        compression = _tuple(tags.get(259, 1))[0]
        spp = _tuple(tags.get(277, 1))[0]
        bps = _tuple(tags.get(258, 1))
        planar = _tuple(tags.get(284, 1))[0]
        bits = (sum(bps) if len(bps) >= spp else bps[0] * spp) if planar == 1 else max(bps)
        if 324 in tags and 325 in tags:
            seg_w, seg_h = _tuple(tags[322])[0], _tuple(tags[323])[0]
            offsets, counts, what = _tuple(tags[324]), _tuple(tags[325]), "one tile"
        elif 273 in tags and 279 in tags:
            seg_w, seg_h = width, min(_tuple(tags.get(278, height))[0], height)
            offsets, counts, what = _tuple(tags[273]), _tuple(tags[279]), "one strip"
        else:
            return None
    except (TypeError, ValueError, IndexError):
        return None
    limit = max(seg_h, 0) * ((max(seg_w, 0) * bits + 7) // 8)
    return TiffSegments(compression, offsets, counts, limit, what)


def tiff_checkable(compression: int, *, packbits: bool = True) -> str | None:
    """The counter that bounds this TIFF compression here, or None."""
    if compression in TIFF_ZLIB:
        return "zlib"
    if compression == TIFF_LZMA:
        return "lzma"
    if compression == TIFF_PACKBITS and packbits:
        return "packbits"
    return None


def check_tiff(
    path: Path, segs: TiffSegments, size: tuple[int, int], *, packbits: bool = True
) -> bool:
    """Refuse a TIFF page with a segment that decodes past its size; False when the compression
    is not one checked here (the caller then uses a decoder that bounds it: libtiff)."""
    kind = tiff_checkable(segs.compression, packbits=packbits)
    if kind is None:
        return False
    with path.open("rb") as f:
        for offset, count in zip(segs.offsets, segs.counts, strict=False):
            f.seek(offset)
            if not _count(kind, segs.limit, _read_span(f, count)):
                raise _bomb(path, "TIFF image", size, segs.what, segs.limit)
    return True
