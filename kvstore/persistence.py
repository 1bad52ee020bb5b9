"""Persistent disk tier: committed pages and their prefix index survive a restart.

Files in the tier directory (all 0600):

- ``kvstore.lock`` — held with ``flock`` while a manager has the tier open: two processes never share it.
- ``kvstore.meta`` — the layout fingerprint (format, page bytes, slot stride, prefix-hash seed, which
  covers the namespace and the page layout). A directory made for another layout is refused.
- ``kvstore.info`` — informational, never checked: the namespace and layout in plain words, for
  ``kvstore inspect`` (the fingerprint in ``kvstore.meta`` only holds the namespace's hash).
- ``kvstore.pages`` — the slot file (see :mod:`kvstore.transfer.diskfile`).
- ``kvstore.journal`` — fixed-size records ``PUT(slot, key, parent key, page checksum)`` and ``DEL(slot)``
  for the committed pages on the disk level, each record protected by its own checksum.

Write order: page bytes are written, then (for a group of records) the slot file is ``fdatasync``-ed,
then the records are appended (``os.write``, continued when short) and the journal is ``fsync``-ed — on a
worker thread. A slot that a durable PUT names is not overwritten before its DEL is durable
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
from typing import Callable, Optional, Sequence

import xxhash

from ._aio import settle
from .errors import ConfigError, InvalidStateError, StorageIOError

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


@dataclass(frozen=True)
class JournalScan:
    """What a journal holds: the live PUT per slot, how many records were read, the torn tail ignored."""

    live: dict[int, Record]
    records: int
    puts: int
    dels: int
    torn_bytes: int


def scan_journal(data: bytes) -> JournalScan:
    """Replay journal bytes: the last record per slot wins; a record that fails its checksum or magic ends
    the journal (a torn tail). Pure; used by recovery and by ``kvstore inspect`` / ``verify``."""
    live: dict[int, Record] = {}
    puts = dels = 0
    torn = 0
    off = 0
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
            puts += 1
            live[slot] = Record(slot, key, None if parent == _NO_PARENT else parent, csum)
        else:
            dels += 1
            live.pop(slot, None)
    return JournalScan(live, puts + dels, puts, dels, torn or len(data) % _RECORD)


def _pack(op: int, slot: int, key: bytes = _NO_PARENT, parent: Optional[bytes] = None, checksum: int = 0) -> bytes:
    body = _BODY.pack(_MAGIC, op, slot, key, parent or _NO_PARENT, checksum)
    return body + xxhash.xxh3_64_digest(body)


#: Test hook, like the I/O backend's: called as ``hook(op, offset, nbytes)`` before every write, sync and
#: rename of the catalog. ``op`` is ``journal.write``, ``journal.fsync``, ``data.fdatasync``, or for a durable
#: replace (meta, compaction, journal rewrite) ``replace.write``, ``replace.fsync``, ``replace.rename``,
#: ``replace.dirfsync``. It may raise OSError (the call fails), or return an int: that write call then
#: moves at most that many bytes (a short write, which must be continued).
CatalogFaultHook = Callable[[str, int, int], Optional[int]]


def _write_all(fd: int, data: bytes, op: str, offset: int, hook: Optional[CatalogFaultHook]) -> None:
    """``os.write`` until all of ``data`` is written (os.write may stop short)."""
    view = memoryview(data)
    while view:
        cap = hook(op, offset, len(view)) if hook is not None else None
        n = os.write(fd, view[: max(1, cap)] if cap is not None else view)
        if n <= 0:
            raise OSError(errno.EIO, f"short {op} at offset {offset}")
        view, offset = view[n:], offset + n


def _sync(fn: Callable[[int], None], fd: int, op: str, hook: Optional[CatalogFaultHook]) -> None:
    if hook is not None:
        hook(op, 0, 0)
    fn(fd)


def _replace_durably(path: Path, data: bytes, hook: Optional[CatalogFaultHook] = None) -> None:
    """Write ``path`` as a whole: a 0600 temporary file, fsync, rename over ``path``, fsync the directory.
    A crash at any point leaves the old file or the new one, never a mix (the tmp file is ignored)."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        _write_all(fd, data, "replace.write", 0, hook)
        _sync(os.fsync, fd, "replace.fsync", hook)
    finally:
        os.close(fd)
    if hook is not None:
        hook("replace.rename", 0, 0)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        _sync(os.fsync, fd, "replace.dirfsync", hook)
    finally:
        os.close(fd)


def _io_error(exc: OSError, what: str) -> StorageIOError:
    err = StorageIOError(f"kvstore journal: {what} failed ({exc})", exc.errno)
    err.__cause__ = exc
    return err


class DiskCatalog:
    """The lock, the layout fingerprint and the journal of one persistent disk tier.

    Faults of its own writes and syncs (see :data:`CatalogFaultHook`) never make the journal name bytes
    it does not describe:

    - the data file's ``fdatasync`` fails: its unsynced pages are not trusted, so no PUT is journaled for
      the rest of the session (those pages are misses after a restart); DELs still are;
    - a journal append or fsync fails: the file may end in a torn record, so nothing more is appended to
      it; the records are kept and the next flush first rewrites the journal durably from the records
      known durable, then appends them;
    - until a slot's DEL is durable the slot is not overwritten: :meth:`before_overwrite` raises
      :class:`StorageIOError` (errno kept) and the disk write fails, the page staying where it was.
    """

    def __init__(self, directory: Path, meta: dict[str, object], info: Optional[dict[str, object]] = None) -> None:
        self.directory = Path(directory)
        self.meta = {"format": FORMAT, **meta}
        self.info = info  # written to kvstore.info for inspection tools; never read back by the engine
        self.journal_path = self.directory / "kvstore.journal"
        self.fault_hook: Optional[CatalogFaultHook] = None
        self._lock_fd = -1
        self._pending: list[tuple[bytes, Optional[int]]] = []  # (record, slot it deletes)
        self._claimed: set[int] = set()  # slots a PUT names (pending or durable)
        self._unsafe: set[int] = set()  # slots whose DEL is not durable yet: not to be overwritten
        self._durable: dict[int, bytes] = {}  # slot -> its PUT record, durable in the journal file
        self._lock = asyncio.Lock()
        self._wake: Optional[asyncio.Event] = None
        self._writer: Optional[asyncio.Task[None]] = None
        self._fd = -1  # the journal, O_APPEND
        self._size = 0  # bytes of the journal known written
        self._data_fd = -1
        self._poisoned = False  # a journal append or fsync failed: rewrite it before appending again
        self._data_failed = False  # the data file's fdatasync failed: no more PUTs this session
        self._closing = False
        self._closed = False
        self.error: Optional[StorageIOError] = None  # the last journal fault

    # ------------------------------------------------------------------ open / recover (blocking)
    def open(self, slots: int) -> dict[int, Record]:
        """Lock the directory, check or write the fingerprint, recover and compact the journal.
        Returns the committed pages recovered, by slot (slots >= ``slots`` are dropped). Blocking."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_dir()
        try:
            self._check_meta()
            self._write_info()
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
        try:
            _replace_durably(path, json.dumps(self.meta, sort_keys=True).encode(), self.fault_hook)
        except OSError as exc:
            raise _io_error(exc, f"writing {path}") from exc

    def _write_info(self) -> None:
        """Refresh ``kvstore.info`` when it changed (written whole, as kvstore.meta is; informational only:
        a failure is logged, never raised, and no fault hook sees it)."""
        if self.info is None:
            return
        path = self.directory / "kvstore.info"
        text = json.dumps(self.info, sort_keys=True, indent=1)
        try:
            if path.exists() and path.read_text() == text:
                return
            _replace_durably(path, text.encode())
        except OSError as exc:
            log.debug("kvstore disk tier: could not write %s (%s); inspection shows less", path, exc)

    def _recover(self, slots: int) -> dict[int, Record]:
        try:
            data = self.journal_path.read_bytes()
        except FileNotFoundError:
            return {}
        scan = scan_journal(data)
        if scan.torn_bytes:
            log.warning("kvstore journal %s: ignored a torn tail of %d bytes", self.journal_path, scan.torn_bytes)
        return {s: r for s, r in scan.live.items() if s < slots}

    def _compact(self, records: dict[int, Record]) -> None:
        durable = {r.slot: _pack(_PUT, r.slot, r.key, r.parent, r.checksum) for r in records.values()}
        try:
            _replace_durably(self.journal_path, b"".join(durable.values()), self.fault_hook)
        except OSError as exc:
            raise _io_error(exc, f"compacting {self.journal_path}") from exc
        self._durable = durable

    # ------------------------------------------------------------------ logging (loop thread)
    async def start(self, data_fd: int) -> None:
        """Open the journal for appending and start the writer task."""
        self._data_fd = data_fd
        self._fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
        self._size = os.fstat(self._fd).st_size
        self._wake = asyncio.Event()
        self._writer = asyncio.ensure_future(self._write_loop())

    def _check_open(self, what: str) -> None:
        if self._closing or self._closed:
            raise InvalidStateError(
                f"kvstore journal: a {what} record after the persistent disk tier was closed; it would be "
                "lost and a restart would recover a stale page set (a bug in the caller: nothing may change "
                "the disk level after aclose())"
            )

    def put(self, slot: int, key: bytes, parent: Optional[bytes], checksum: int) -> None:
        self._check_open("PUT")
        if self._data_failed:
            return  # the slot file's sync failed: its page is not trusted after a restart (a miss)
        self._claimed.add(slot)
        self._unsafe.discard(slot)
        self._append(_pack(_PUT, slot, key, parent, checksum), None)

    def delete(self, slot: int) -> None:
        self._check_open("DEL")
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
        that after a crash the journal never points at bytes of another page. Raises StorageIOError when
        that cannot be made durable (the write must not happen)."""
        if self._unsafe and not self._unsafe.isdisjoint(slots):
            await self.flush()
            if not self._unsafe.isdisjoint(slots):
                raise StorageIOError(
                    "kvstore journal: a slot's DEL record is not durable (the journal is closed); not "
                    "overwriting it", errno.EIO)

    async def _write_loop(self) -> None:
        wake = self._wake
        if wake is None:  # pragma: no cover - start() creates the event before the task
            return
        while not self._closing:
            await wake.wait()
            wake.clear()
            try:
                await self.flush()
            except StorageIOError:
                pass  # logged; retried at the next record, and raised where durability is needed

    async def flush(self) -> None:
        """Make every record appended so far durable; StorageIOError (errno kept) if it cannot."""
        async with self._lock:
            if self._fd < 0 or (not self._pending and not self._poisoned):
                return
            batch, self._pending = self._pending, []
            stage = ["rewrite" if self._poisoned else "data.fdatasync"]
            try:
                await asyncio.to_thread(self._write_batch, batch, stage)
            except OSError as exc:
                raise self._failed(exc, stage[0], batch) from exc
            self._poisoned = False
            for record, deleted in batch:
                if deleted is not None:
                    self._unsafe.discard(deleted)
                    self._durable.pop(deleted, None)
                else:
                    self._durable[_BODY.unpack_from(record)[2]] = record

    def _write_batch(self, batch: list[tuple[bytes, Optional[int]]], stage: list[str]) -> None:
        """Blocking (a worker thread): [rewrite the journal,] fdatasync the pages, append, fsync the journal.
        ``stage`` tells the caller which step failed."""
        hook = self.fault_hook
        if stage[0] == "rewrite":
            data = b"".join(self._durable.values())
            _replace_durably(self.journal_path, data, hook)
            fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
            os.close(self._fd)
            self._fd, self._size = fd, len(data)
            stage[0] = "data.fdatasync"
        _sync(os.fdatasync, self._data_fd, "data.fdatasync", hook)  # the pages before the records naming them
        stage[0] = "journal.write"
        data = b"".join(record for record, _ in batch)
        _write_all(self._fd, data, "journal.write", self._size, hook)
        stage[0] = "journal.fsync"
        _sync(os.fsync, self._fd, "journal.fsync", hook)
        self._size += len(data)

    def _failed(self, exc: OSError, stage: str, batch: list[tuple[bytes, Optional[int]]]) -> StorageIOError:
        """Bookkeeping after a failed flush; returns the error to raise. No record is silently dropped
        except PUTs of pages whose bytes are not known durable (they become misses after a restart)."""
        if stage != "rewrite":
            self._poisoned = False  # the rewrite (if any) succeeded
        if stage == "data.fdatasync":
            self._data_failed = True
            keep: list[tuple[bytes, Optional[int]]] = [(r, d) for r, d in batch + self._pending if d is not None]  # DELs
            dropped = len(batch) + len(self._pending) - len(keep)
            self._pending = keep
            what = (f"fdatasync of the slot file (no page is journaled for the rest of this session: "
                    f"{dropped} PUT records dropped, those pages are misses after a restart)")
        else:
            self._poisoned = True
            self._pending = batch + self._pending
            what = {"rewrite": "rewriting the journal", "journal.write": "appending to the journal",
                    "journal.fsync": "fsync of the journal"}[stage]
            what += f" ({len(self._pending)} records kept; the journal is rewritten before the next append)"
        err = _io_error(exc, what)
        self.error = err
        log.error("%s", err)
        return err

    async def close(self) -> None:
        """Write what is pending, stop the writer, close the journal and release the lock. A final flush
        that fails is logged: a restart then recovers the pages committed at the last durable point."""
        self._closing = True  # put/delete from now on are bugs of the caller: refused loudly
        if self._writer is not None:  # let it finish the flush it may be in (a cancel would lose that batch)
            if self._wake is not None:
                self._wake.set()
            await settle(self._writer)
            self._writer = None
        try:
            await self.flush()
        except StorageIOError:
            log.error("kvstore journal: closed with %d records not durable", len(self._pending))
        self._closed = True
        self.release()

    def release(self) -> None:
        """Close the journal and release the lock without writing (a failed start)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._unlock()
