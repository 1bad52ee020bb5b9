"""Disk I/O admission: a bound on bytes in flight, granted in priority order.

Priorities (lower first): a resume's I/O before a prefetch's, a prefetch's before background
write-back; within one operation, reads before writes. Waiters of equal priority are served in
arrival order. A request larger than the bound is admitted alone.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

RESUME, PREFETCH, BACKGROUND = 0, 1, 2


class IOScheduler:
    """Admits I/O batches of ``nbytes`` while at most ``max_bytes`` are in flight."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.in_flight = 0
        self._waiters: list[tuple[tuple[int, int], int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def _fits(self, nbytes: int) -> bool:
        return self.in_flight == 0 or self.in_flight + nbytes <= self.max_bytes

    async def acquire(self, nbytes: int, priority: tuple[int, int]) -> None:
        if not self._waiters and self._fits(nbytes):
            self.in_flight += nbytes
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._seq), nbytes, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(nbytes)  # granted just as we were cancelled
            else:
                self._waiters = [w for w in self._waiters if w[3] is not fut]
                heapq.heapify(self._waiters)
            raise

    def release(self, nbytes: int) -> None:
        self.in_flight -= nbytes
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            _, _, nbytes, fut = self._waiters[0]
            if fut.done():
                heapq.heappop(self._waiters)
                continue
            if not self._fits(nbytes):
                return
            heapq.heappop(self._waiters)
            self.in_flight += nbytes
            fut.set_result(None)
