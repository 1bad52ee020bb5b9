"""Remote value codec: a fixed header, then the page bytes.

Header (little-endian, 80 bytes): magic ``KVSP``, format version (u16), header length (u16), layout
digest (16 bytes), scope digest (16 bytes, namespace + layout), the page key (32 bytes), payload length
(u32), xxh3-64 of the payload (u64). :func:`decode` checks every field against what the reader expects;
any mismatch (another layout, namespace or key, a truncated or altered value) is ``None``: a miss,
never data.

:func:`pack_sets` builds the values of a group of pages already framed as the RESP ``SET key value NX
[PX ttl]`` commands of one pipeline, back to back in one buffer: on a worker thread it is the only copy
of the page bytes on the way to the socket (numpy copies and xxh3 release the GIL; ``bytes.join`` does
not), and the event loop hands the buffer to the transport as it is.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import xxhash

Buffer = Any  # bytes, memoryview or a numpy uint8 array (anything memoryview() takes)

__all__ = ["MAGIC", "VERSION", "HEADER", "encode_header", "encode", "decode", "Packed", "pack_sets"]

MAGIC = b"KVSP"
VERSION = 1
_FMT = struct.Struct("<4sHH16s16s32sIQ")
HEADER = _FMT.size


def encode_header(layout_digest: bytes, scope: bytes, page_key: bytes, payload: "Buffer") -> bytes:
    """The header of a value carrying ``payload`` (a buffer of page bytes) for ``page_key``."""
    mv = memoryview(payload).cast("B")
    return _FMT.pack(MAGIC, VERSION, HEADER, layout_digest, scope, page_key, mv.nbytes, xxhash.xxh3_64_intdigest(mv))


def encode(layout_digest: bytes, scope: bytes, page_key: bytes, payload: "Buffer") -> bytes:
    """Header + payload as one bytes object (one copy of the page bytes)."""
    return b"".join((encode_header(layout_digest, scope, page_key, payload), memoryview(payload).cast("B")))


def decode(value: Optional[bytes], layout_digest: bytes, scope: bytes, page_key: bytes, page_bytes: int) -> Optional[memoryview]:
    """The page bytes of ``value`` if every header field and the checksum match, else None."""
    if value is None or len(value) != HEADER + page_bytes:
        return None
    magic, version, hlen, lay, sc, key, n, csum = _FMT.unpack_from(value)
    if magic != MAGIC or version != VERSION or hlen != HEADER or lay != layout_digest or sc != scope:
        return None
    if key != page_key or n != page_bytes:
        return None
    body = memoryview(value)[HEADER:]
    if xxhash.xxh3_64_intdigest(body) != csum:
        return None
    return body


class Span(NamedTuple):
    """One page's SET command in a :class:`Packed` buffer: ``buf[start:end]``; its value ``buf[value:end - tail]``."""

    start: int
    value: int
    value_end: int
    end: int


class Packed:
    """The SET commands of a group of pages, back to back in one uint8 buffer (one span per page)."""

    __slots__ = ("buf", "keys", "spans", "px", "base")

    def __init__(
        self, buf: np.ndarray, keys: list[bytes], spans: list[Span], px: Optional[int], base: Optional[np.ndarray] = None
    ) -> None:
        self.buf = buf
        self.keys = keys  # remote keys, one per span
        self.spans = spans
        self.px = px  # the commands' PX (None: no expiry)
        self.base = buf if base is None else base  # the whole buffer ``buf`` starts (reusable once sent)

    def command(self, j: int) -> memoryview:
        s = self.spans[j]
        return self.buf.data[s.start : s.end]

    def value(self, j: int) -> memoryview:
        """The value (header + page bytes) of page ``j``, without a copy."""
        s = self.spans[j]
        return self.buf.data[s.value : s.value_end]


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def pack_sets(
    items: Sequence[tuple[bytes, bytes, "Buffer"]], layout_digest: bytes, scope: bytes, px: Optional[int],
    out: Optional[np.ndarray] = None,
) -> Packed:
    """``SET rkey value NX [PX px]`` for each (remote key, page key, page bytes) item, packed into one buffer:
    the front of ``out`` (a uint8 array) when it is large enough, else a new one.

    Runs on a worker thread: the page bytes are copied once, by numpy, and hashed by xxh3, both without
    the GIL; the Python work per page is a few small byte strings. Reusing ``out`` (memory already touched)
    spares the page faults of a fresh buffer, which the kernel serves with the GIL-free copy stalled."""
    tail = _bulk(b"NX") + (_bulk(b"PX") + _bulk(b"%d" % px) if px is not None else b"")
    star = b"*6\r\n" if px is not None else b"*4\r\n"
    pieces: list[tuple[bytes, np.ndarray, int]] = []
    total = 0
    for rkey, page_key, payload in items:
        body = np.frombuffer(memoryview(payload).cast("B"), dtype=np.uint8)
        head = b"".join((star, _bulk(b"SET"), _bulk(rkey), b"$%d\r\n" % (HEADER + body.nbytes),
                         encode_header(layout_digest, scope, page_key, body)))
        pieces.append((head, body, total))
        total += len(head) + body.nbytes + 2 + len(tail)
    base = out if out is not None and out.nbytes >= total else np.empty(total, dtype=np.uint8)
    buf = base[:total]
    spans: list[Span] = []
    tail_arr = np.frombuffer(b"\r\n" + tail, dtype=np.uint8)
    for head, body, start in pieces:
        at = start + len(head)
        buf[start:at] = np.frombuffer(head, dtype=np.uint8)
        buf[at : at + body.nbytes] = body
        end = at + body.nbytes + len(tail_arr)
        buf[at + body.nbytes : end] = tail_arr
        spans.append(Span(start, at - HEADER, at + body.nbytes, end))
    return Packed(buf, [rkey for rkey, _, _ in items], spans, px, base)
