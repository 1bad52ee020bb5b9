"""Remote value codec: a fixed header, then the page bytes.

Header (little-endian, 80 bytes): magic ``KVSP``, format version (u16), header length (u16), layout
digest (16 bytes), scope digest (16 bytes, namespace + layout), the page key (32 bytes), payload length
(u32), xxh3-64 of the payload (u64). :func:`decode` checks every field against what the reader expects;
any mismatch (another layout, namespace or key, a truncated or altered value) is ``None``: a miss,
never data.
"""

from __future__ import annotations

import struct
from typing import Any, Optional

Buffer = Any  # bytes, memoryview or a numpy uint8 array (anything memoryview() takes)

import xxhash

__all__ = ["MAGIC", "VERSION", "HEADER", "encode_header", "decode"]

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
