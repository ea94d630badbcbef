"""The files an ONNX graph names: the ``location`` of every tensor stored as external data.

The lean runtime has no ``onnx`` package, so this walks the protobuf wire format itself (written
here, about 60 lines): it descends only into the messages that can hold tensors (graphs, nodes,
attributes, sparse tensors, functions, training info) and skips every other field by its length,
so tensor data is never copied and a graph file of any size is read through one ``mmap``.
The field numbers are those of ``onnx.proto`` (ONNX IR 10); ``tests/test_model_dir_safety.py``
checks the result against ``onnx.external_data_helper`` on graphs written by ``onnx``.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

# message -> {field number: child message} for the fields that lead to a TensorProto
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
    "entry": {},
}
_MAX_DEPTH = 100  # nested subgraphs (If / Loop bodies) deeper than this are refused


class OnnxParseError(ValueError):
    """The bytes are not a well-formed ONNX protobuf."""


def _varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= end or shift > 63:
            raise OnnxParseError("truncated or overlong varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview, start: int, end: int):  # noqa: ANN202 (a generator of tuples)
    """(field number, start, end) of every length-delimited field in buf[start:end]."""
    i = start
    while i < end:
        tag, i = _varint(buf, i, end)
        wire = tag & 7
        if wire == 0:
            _, i = _varint(buf, i, end)
            continue
        if wire in (1, 5):
            i += 8 if wire == 1 else 4
        elif wire == 2:
            n, i = _varint(buf, i, end)
            if i + n > end:
                raise OnnxParseError("a field runs past the end of its message")
            yield tag >> 3, i, i + n
            i += n
        else:
            raise OnnxParseError(f"unsupported wire type {wire}")
        if i > end:
            raise OnnxParseError("a fixed-size field runs past the end of its message")


def _walk(buf: memoryview, kind: str, start: int, end: int, depth: int, out: list[str]) -> None:
    if depth > _MAX_DEPTH:
        raise OnnxParseError(f"subgraphs nested deeper than {_MAX_DEPTH}")
    if kind == "entry":  # StringStringEntryProto: key = 1, value = 2
        kv = {f: bytes(buf[s:e]) for f, s, e in _fields(buf, start, end) if f in (1, 2)}
        if kv.get(1) == b"location":
            try:
                out.append(kv.get(2, b"").decode("utf-8"))
            except UnicodeDecodeError:
                raise OnnxParseError("an external-data location is not UTF-8") from None
        return
    children = _CHILDREN[kind]
    for f, s, e in _fields(buf, start, end):
        child = children.get(f)
        if child is not None:
            _walk(buf, child, s, e, depth + 1, out)


def external_locations(data: bytes | memoryview) -> list[str]:
    """Every external-data ``location`` named in a serialized ModelProto (in file order, with
    repeats). Raises ``OnnxParseError`` on malformed bytes."""
    out: list[str] = []
    with memoryview(data) as buf:
        _walk(buf, "model", 0, len(buf), 0, out)
    return out


def graph_external_locations(path: str | Path) -> list[str]:
    """``external_locations`` of a graph file, read through mmap (tensor data is never copied)."""
    with Path(path).open("rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return []
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            # the key of an external-data entry is the literal UTF-8 bytes "location": a file
            # without them names no external data (a C-speed scan; the walk is pure Python)
            if mm.find(b"location") < 0:
                return []
            with memoryview(mm) as view:
                return external_locations(view)
