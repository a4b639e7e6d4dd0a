"""The frame format between the daemon and its inference worker (over the worker's stdin/stdout).

    u32 little-endian header length | header (JSON) | buffers, back to back

The header lists each buffer's name, dtype, shape and byte length; buffers are
raw little-endian tensor bytes. No pickling: the worker wraps them in numpy
arrays without copying, and large tensors cost one pipe copy each way.
"""

from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO, Literal

_LEN = struct.Struct("<I")
MAX_HEADER = 1 << 20
# The most one tensor may hold: the wire's limit (agent.wire.tensors.MAX_TENSOR_BYTES, kept
# equal by a test; not imported, so that the worker does not load pydantic). A worker's
# reply announcing more is refused before anything is read into the daemon.
MAX_BUFFER_BYTES = 64 * 1024 * 1024


def encode(
    header: dict[str, Any], buffers: list[bytes] | list[bytes | memoryview]
) -> list[bytes | memoryview]:
    """The pieces of one frame, ready for writelines (no concatenation copy)."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return [_LEN.pack(len(head)), head, *buffers]


def header_length(prefix: bytes) -> int:
    (n,) = _LEN.unpack(prefix)
    if n > MAX_HEADER:
        raise ValueError(f"frame header of {n} bytes exceeds {MAX_HEADER}")
    return int(n)


def parse_header(raw: bytes) -> dict[str, Any]:
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("frame header is not an object")  # noqa: TRY004 - callers catch ValueError
    return header


def buffer_sizes(specs: list[dict[str, Any]]) -> list[int]:
    """The buffers' byte lengths; ValueError for one over MAX_BUFFER_BYTES (or negative)."""
    sizes = [int(s["nbytes"]) for s in specs]
    for n in sizes:
        if not 0 <= n <= MAX_BUFFER_BYTES:
            raise ValueError(f"a buffer of {n} bytes (the most is {MAX_BUFFER_BYTES})")
    return sizes


Frame = tuple[dict[str, Any], list[bytes]]


def read_exact(stream: BinaryIO, n: int) -> bytes | None:
    """n bytes, or None if the stream ends first (the other side has gone)."""
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_frame(stream: BinaryIO, buffers: Literal["inputs", "outputs"]) -> Frame | None:
    """One frame: its header and the buffers its `buffers` list announces (a request's
    inputs, a reply's outputs); None if the stream ends, even mid-frame. ValueError for a
    frame that is not one, before any oversized part of it is read."""
    prefix = read_exact(stream, 4)
    raw = None if prefix is None else read_exact(stream, header_length(prefix))
    if raw is None:
        return None
    header = parse_header(raw)
    out = []
    for n in buffer_sizes(header.get(buffers, [])):
        buf = read_exact(stream, n) if n else b""
        if buf is None:
            return None
        out.append(buf)
    return header, out
