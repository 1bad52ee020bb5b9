"""Write-through of committed pages to the remote tier: a bounded queue and one background writer.

``enqueue`` (called by ``commit()``) never blocks and never awaits: beyond ``max_pending_pages`` a page is
not queued (counted ``remote_write_dropped``). The writer takes batches in commit order, asks the server
which keys it lacks (pipelined EXISTS; the first group is read meanwhile), reads only those pages' bytes
in groups (:mod:`.gather`: held, read and packed as ready ``SET NX PX ttl`` commands in one worker-thread hop
per group) and writes each group as one pipeline while the next is read, as many on the wire at once as
:func:`writer_shape` allows for the free cores. A failure drops the group's pages
(counted), never retries past the call's deadline. ``flush()`` waits until every page queued before it was
written or given up.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..errors import InvalidStateError, KVStoreError
from ..placement import Page
from ..types import CacheLevel
from . import codec
from .client import RemoteClient, px_of
from .gather import gather_values, make_packer
from .keys import KeySpace

if TYPE_CHECKING:
    from ..manager import KVCacheManager

log = logging.getLogger("kvstore.remote")

__all__ = ["RemoteWriter"]

_ATTEMPTS = 3  # a page found moving this many times is given up
#: (bytes of pages read, packed and written per step, pipelines on the wire while the next group is read and
#: packed), by the CPUs this process may use. With two (the CPU machine, docs/benchmarks.md) 1 MiB x 1 moves
#: about as many bytes as 2 MiB x 2 with half the event-loop lag: the packing thread, the sends and the server
#: share the cores with the loop. With more cores to spare, more pipelines stream at once, as a raw client's
#: one big pipeline does.
FEW_CPUS_SHAPE = (1 << 20, 1)
MANY_CPUS_SHAPE = (2 << 20, 3)


def writer_shape(cpus: Optional[int] = None) -> tuple[int, int]:
    """(group bytes, pipelines in flight) for a process that may run on ``cpus`` CPUs (default: its affinity)."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return FEW_CPUS_SHAPE if cpus <= 4 else MANY_CPUS_SHAPE


class RemoteWriter:
    def __init__(
        self, mgr: "KVCacheManager", client: RemoteClient, keys: KeySpace, ttl_s: Optional[float],
        max_pending: int, batch_pages: int,
    ) -> None:
        self.mgr = mgr
        self.client = client
        self.keys = keys
        self.px = px_of(ttl_s)
        self.max_pending = max_pending
        self.batch_pages = batch_pages
        group_bytes, self.in_flight = writer_shape()
        self.group_pages = max(1, min(group_bytes, client.pipeline_bytes) // mgr._page_bytes)  # per step
        self.stats = mgr._stats
        self._queue: deque[tuple[Page, bytes, int]] = deque()  # (page, page key, attempts)
        self._wake = asyncio.Event()
        self._queued = 0  # pages ever queued (sequence numbers)
        self._settled = 0  # of those, written or given up
        self._waiters: list[tuple[int, "asyncio.Future[None]"]] = []
        self._task: Optional["asyncio.Task[None]"] = None
        self._closing = False
        self._spare: list[np.ndarray] = []  # pack buffers whose pipelines were sent: reused (no page faults)

    @property
    def pending(self) -> int:
        return self._queued - self._settled

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def enqueue(self, page: Page, key: bytes) -> None:
        """Queue a newly committed page (synchronous, O(1)); dropped and counted when the queue is full."""
        if self._closing or self._task is None or self._task.done() or self.pending >= self.max_pending:
            self.stats["remote_write_dropped"] += 1
            return
        self._queue.append((page, key, 0))
        self._queued += 1
        self._wake.set()

    async def flush(self, timeout_s: Optional[float] = None) -> None:
        """Wait until every page queued so far was written or given up (at most ``timeout_s``)."""
        target = self._queued
        if self._settled >= target:
            return
        fut = asyncio.get_running_loop().create_future()
        entry = (target, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait([fut], timeout=timeout_s)
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _settle(self, n: int) -> None:
        self._settled += n
        keep = []
        for target, fut in self._waiters:
            if self._settled >= target:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((target, fut))
        self._waiters = keep

    async def close(self) -> None:
        """Stop the writer; pages still queued are given up (counted dropped)."""
        self._closing = True  # the loop stops at its next step even if a cancellation were lost
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        n = len(self._queue)
        self._queue.clear()
        self.stats["remote_write_dropped"] += n
        self._settle(self.pending)

    async def _run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            while self._queue and not self._closing:
                batch = [self._queue.popleft() for _ in range(min(self.batch_pages, len(self._queue)))]
                settled = len(batch)
                try:
                    settled -= await self._write(batch)
                except InvalidStateError:
                    self.stats["remote_write_dropped"] += len(batch)
                    self._settle(len(batch))
                    return  # the manager is closing
                except asyncio.CancelledError:
                    self.stats["remote_write_dropped"] += len(batch)
                    self._settle(len(batch))
                    raise
                except KVStoreError as exc:  # a local read failed: those pages are not written
                    log.warning("kvstore remote: reading %d pages for the remote failed (%s)", len(batch), exc)
                    self.stats["remote_write_dropped"] += len(batch)
                self._settle(settled)

    async def _write(self, batch: list[tuple[Page, bytes, int]]) -> int:
        """Write one batch; returns how many of its pages went back to the queue (to try again)."""
        live = [(p, k, a) for p, k, a in batch if not p.freed and p.key == k]
        if not live:
            return 0
        if not self.client.breaker.allow():
            self.stats["remote_write_dropped"] += len(live)
            return 0
        rkeys = self.keys.keys([k for _, k, _ in live])
        # the first group is read while EXISTS is on the wire (new pages are the usual case); what the server
        # has is then neither sent nor read any further
        head = list(enumerate(live[: self.group_pages]))
        asking = asyncio.ensure_future(self.client.exists(rkeys))
        try:
            early = await self._read(head, rkeys)
            have = await asking
        finally:
            if not asking.done():
                asking.cancel()
                await asyncio.gather(asking, return_exceptions=True)
        if have is None:
            self.stats["remote_write_dropped"] += len(live)
            return 0
        todo = [(i, e) for i, (e, h) in enumerate(zip(live, have)) if not h]
        self.stats["remote_write_skipped"] += len(live) - len(todo)
        if not todo:
            return 0
        rest = [t for t in todo if t[0] >= len(head)]
        retried = 0
        sending: deque["asyncio.Task[None]"] = deque()
        try:
            # pack group k+1 (off the loop) while group k is on the wire
            for n, start in enumerate(range(-len(head), len(rest), self.group_pages)):
                group = head if n == 0 else rest[start : start + self.group_pages]
                values, again = early if n == 0 else await self._read(group, rkeys)
                for j in again:
                    page, key, attempts = group[j][1]
                    if have[group[j][0]]:
                        continue  # the server has it
                    if attempts + 1 < _ATTEMPTS:
                        self._queue.append((page, key, attempts + 1))
                        retried += 1
                    else:
                        self.stats["remote_write_dropped"] += 1
                wanted = [v for v in values if not have[group[v[0]][0]]]
                for packed, spans, levels in _by_buffer(wanted):
                    while len(sending) >= self.in_flight:
                        await sending.popleft()
                    sending.append(asyncio.ensure_future(self._send(packed, spans, levels)))
            while sending:
                await sending.popleft()
        finally:
            for task in sending:  # cancelled: the writes in flight are given up
                task.cancel()
            if sending:
                await asyncio.gather(*sending, return_exceptions=True)
        if retried:
            self._wake.set()
        return retried

    async def _read(
        self, group: list[tuple[int, tuple[Page, bytes, int]]], rkeys: list[bytes]
    ) -> tuple[list[tuple[int, codec.Packed, int, CacheLevel]], list[int]]:
        """The group's pages held, read and packed (one worker hop): :func:`.gather.gather_values` of them."""
        if not group:
            return [], []
        names = [(rkeys[i], k) for i, (_, k, _) in group]
        pack = make_packer(self.keys.layout_digest, self.keys.scope, names, self.px, self._spare.pop() if self._spare else None)
        return await gather_values(self.mgr, [(p, k) for _, (p, k, _) in group], pack)

    async def _send(self, packed: codec.Packed, spans: list[int], levels: list[CacheLevel]) -> None:
        try:
            written = await self.client.set_packed(packed, spans)
        finally:  # every write() made has returned: the transport sent or copied those bytes
            if len(self._spare) <= self.in_flight and all(b is not packed.base for b in self._spare):
                self._spare.append(packed.base)
        if written is None:
            self.stats["remote_write_dropped"] += len(spans)
            return
        pb = self.mgr._page_bytes
        for level, ok in zip(levels, written):
            if ok:
                self.stats[f"pages_{level.label}_to_remote"] += 1
                self.stats[f"bytes_{level.label}_to_remote"] += pb
            elif ok is None:
                self.stats["remote_write_dropped"] += 1  # refused by the server (counted in remote_errors)
            else:
                self.stats["remote_write_skipped"] += 1  # written by another node meanwhile


def _by_buffer(
    values: list[tuple[int, codec.Packed, int, CacheLevel]]
) -> list[tuple[codec.Packed, list[int], list[CacheLevel]]]:
    """Gathered values grouped by the packed buffer holding them (one per level read), spans in order."""
    out: dict[int, tuple[codec.Packed, list[int], list[CacheLevel]]] = {}
    for _, packed, span, level in values:
        entry = out.setdefault(id(packed), (packed, [], []))
        entry[1].append(span)
        entry[2].append(level)
    return list(out.values())
