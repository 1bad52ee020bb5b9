"""Persistent disk tier: committed pages and their prefix index survive a restart.

Files in the tier directory (all 0600):

- ``kvstore.lock`` — held with ``flock`` while a manager has the tier open: two processes never share it.
- ``kvstore.meta`` — the layout fingerprint (format, page bytes, slot stride, prefix-hash seed, which
  covers the namespace and the page layout). A directory made for another layout is refused.
- ``kvstore.pages`` — the slot file (see :mod:`kvstore.transfer.diskfile`).
- ``kvstore.journal`` — fixed-size records ``PUT(slot, key, parent key, page checksum)`` and ``DEL(slot)``
  for the committed pages on the disk level, each record protected by its own checksum.

Write order: page bytes are written, then (for a group of records) the slot file is ``fdatasync``-ed,
then the records are appended and the journal is ``fsync``-ed — asynchronously, through aiofiles and
worker threads. A slot that a durable PUT names is not overwritten before its DEL is durable
(:meth:`DiskCatalog.before_overwrite`), so after a crash every record names the bytes it describes.
Beyond that, every page is verified against its checksum when read: damage is a mismatch, never data.

Recovery reads the journal once (a torn tail ends it), keeps the last record per slot, and rewrites the
journal compacted (tmp file, fsync, rename, directory fsync): linear in the journal, about a second per
million records. Uncommitted pages of suspended caches are not journaled: their slots are free again.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import aiofiles
import xxhash

from ._aio import settle
from .errors import ConfigError

log = logging.getLogger("kvstore")

FORMAT = 1
_MAGIC = 0x4B565331  # "KVS1"
_PUT, _DEL = 1, 2
_BODY = struct.Struct("<IB3xQ32s32sQ")  # magic, op, slot, key, parent key (zeros: none), page checksum
_RECORD = _BODY.size + 8  # + xxh3-64 of the body
_NO_PARENT = b"\0" * 32


@dataclass(frozen=True)
class Record:
    """A committed page on the disk level, as recovered from the journal."""

    slot: int
    key: bytes
    parent: Optional[bytes]
    checksum: int


def _pack(op: int, slot: int, key: bytes = _NO_PARENT, parent: Optional[bytes] = None, checksum: int = 0) -> bytes:
    body = _BODY.pack(_MAGIC, op, slot, key, parent or _NO_PARENT, checksum)
    return body + xxhash.xxh3_64_digest(body)


def _replace_durably(path: Path, data: bytes) -> None:
    """Write ``path`` as a whole: a 0600 temporary file, fsync, rename over ``path``, fsync the directory."""
    tmp = path.with_suffix(".tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(data)  # a file object writes all of it (os.write may stop short)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskCatalog:
    """The lock, the layout fingerprint and the journal of one persistent disk tier."""

    def __init__(self, directory: Path, meta: dict) -> None:
        self.directory = Path(directory)
        self.meta = {"format": FORMAT, **meta}
        self.journal_path = self.directory / "kvstore.journal"
        self._lock_fd = -1
        self._pending: list[tuple[bytes, Optional[int]]] = []  # (record, slot it deletes)
        self._claimed: set[int] = set()  # slots a PUT names (pending or durable)
        self._unsafe: set[int] = set()  # slots whose DEL is not durable yet: not to be overwritten
        self._lock = asyncio.Lock()
        self._wake: Optional[asyncio.Event] = None
        self._writer: Optional[asyncio.Task] = None
        self._file = None
        self._data_fd = -1
        self._closing = False
        self.error: Optional[BaseException] = None

    # ------------------------------------------------------------------ open / recover (blocking)
    def open(self, slots: int) -> dict[int, Record]:
        """Lock the directory, check or write the fingerprint, recover and compact the journal.
        Returns the committed pages recovered, by slot (slots >= ``slots`` are dropped). Blocking."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_dir()
        try:
            self._check_meta()
            records = self._recover(slots)
            self._compact(records)
            self._claimed = set(records)
            return records
        except BaseException:
            self._unlock()
            raise

    def _lock_dir(self) -> None:
        fd = os.open(self.directory / "kvstore.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(
                    f"DiskTier.path {str(self.directory)!r} is open in another process (its lock is held); "
                    "use another directory, or close the other manager first"
                ) from None
            raise
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = -1

    def _check_meta(self) -> None:
        path = self.directory / "kvstore.meta"
        if path.exists():
            try:
                found = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"DiskTier.path {str(self.directory)!r} has an unreadable kvstore.meta ({exc}); it is not "
                    "trusted: use another directory or delete this one"
                ) from None
            if found != self.meta:
                diff = sorted(k for k in set(found) | set(self.meta) if found.get(k) != self.meta.get(k))
                raise ConfigError(
                    f"DiskTier.path {str(self.directory)!r} was made for another layout (differs in {diff}: "
                    f"found {[found.get(k) for k in diff]}, this store has {[self.meta.get(k) for k in diff]}); "
                    "use another directory, or the same layout and namespace"
                )
            return
        _replace_durably(path, json.dumps(self.meta, sort_keys=True).encode())

    def _recover(self, slots: int) -> dict[int, Record]:
        try:
            data = self.journal_path.read_bytes()
        except FileNotFoundError:
            return {}
        live: dict[int, Record] = {}
        torn = 0
        for off in range(0, len(data) - _RECORD + 1, _RECORD):
            body, digest = data[off : off + _BODY.size], data[off + _BODY.size : off + _RECORD]
            if xxhash.xxh3_64_digest(body) != digest:
                torn = len(data) - off
                break
            magic, op, slot, key, parent, csum = _BODY.unpack(body)
            if magic != _MAGIC:
                torn = len(data) - off
                break
            if op == _PUT:
                live[slot] = Record(slot, key, None if parent == _NO_PARENT else parent, csum)
            else:
                live.pop(slot, None)
        if torn or len(data) % _RECORD:
            log.warning("kvstore journal %s: ignored a torn tail of %d bytes", self.journal_path, torn or len(data) % _RECORD)
        return {s: r for s, r in live.items() if s < slots}

    def _compact(self, records: dict[int, Record]) -> None:
        _replace_durably(
            self.journal_path, b"".join(_pack(_PUT, r.slot, r.key, r.parent, r.checksum) for r in records.values())
        )

    # ------------------------------------------------------------------ logging (loop thread)
    async def start(self, data_fd: int) -> None:
        """Open the journal for appending and start the writer task."""
        self._data_fd = data_fd
        self._file = await aiofiles.open(self.journal_path, "ab")
        self._wake = asyncio.Event()
        self._writer = asyncio.ensure_future(self._write_loop())

    def put(self, slot: int, key: bytes, parent: Optional[bytes], checksum: int) -> None:
        self._claimed.add(slot)
        self._unsafe.discard(slot)
        self._append(_pack(_PUT, slot, key, parent, checksum), None)

    def delete(self, slot: int) -> None:
        if slot in self._claimed:
            self._claimed.discard(slot)
            self._unsafe.add(slot)  # the journal still names this slot until the DEL is durable
        self._append(_pack(_DEL, slot), slot)

    def _append(self, record: bytes, deleted: Optional[int]) -> None:
        self._pending.append((record, deleted))
        if self._wake is not None:
            self._wake.set()

    async def before_overwrite(self, slots: Sequence[int]) -> None:
        """Wait until no durable record still names one of ``slots`` (called before writing into them), so
        that after a crash the journal never points at bytes of another page."""
        if self._unsafe and not self._unsafe.isdisjoint(slots):
            await self.flush()

    async def _write_loop(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Make every record appended so far durable."""
        async with self._lock:
            if not self._pending or self._file is None:
                return
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(os.fdatasync, self._data_fd)  # the pages before the records naming them
                await self._file.write(b"".join(record for record, _ in batch))
                await self._file.flush()
                await asyncio.to_thread(os.fsync, self._file.fileno())
            except OSError as exc:  # a lost record only costs a miss after a restart
                self.error = exc
                log.error("kvstore journal write failed (%s): pages written since may be misses after a restart", exc)
                return
            for _, deleted in batch:
                if deleted is not None:
                    self._unsafe.discard(deleted)

    async def close(self) -> None:
        """Write what is pending, stop the writer, close the journal and release the lock."""
        if self._writer is not None:  # let it finish the flush it may be in (a cancel would lose that batch)
            self._closing = True
            self._wake.set()
            await settle(self._writer)
            self._writer = None
        await self.flush()
        if self._file is not None:
            await self._file.close()
            self._file = None
        self._unlock()

    def release(self) -> None:
        """Release the lock without writing (a failed start)."""
        self._unlock()
