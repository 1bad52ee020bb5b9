"""Latency histograms the manager keeps for monitoring: cheap, dependency-free, exported by kvstore.metrics.

Each manager has one :class:`Timings` (``mgr.timings``). Observations are a ``bisect`` and three adds on
the loop thread, once per operation (a resume, a prefetch, a wait for room, a disk I/O request), never per
page. Names (seconds):

- ``resume`` — ``cache.resume()`` calls that returned (joining a prefetch in flight included);
- ``prefetch`` — prefetches that ended with a result (``PrefetchResult.seconds``), cancelled ones included;
- ``fetch_prefix`` — ``mgr.fetch_prefix()`` of a remote tier (observed by the manager around the fetch);
- ``room_wait`` — time a resume or resize waited for room held by operations in flight (only calls that waited);
- ``io_read`` / ``io_write`` — one disk I/O request of a transfer batch, from submission to completion
  (the checksums included), as the executor waits for it.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

__all__ = ["BUCKETS", "HISTOGRAMS", "Histogram", "Timings", "instrument_io"]

#: Upper bounds (seconds) of the histogram buckets: 50 us to 30 s, about 2.5x apart (+Inf is implied).
BUCKETS: tuple[float, ...] = (
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
HISTOGRAMS: tuple[str, ...] = ("resume", "prefetch", "fetch_prefix", "room_wait", "io_read", "io_write")


@dataclass
class Histogram:
    """Counts per bucket (the last one is +Inf), their sum and how many."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, cumulative count), ..., ("+Inf", count)]`` as Prometheus wants them."""
        out, acc = [], 0
        for bound, n in zip((*map(repr, BUCKETS), "+Inf"), self.counts):
            acc += n
            out.append((bound, acc))
        return out


class Timings:
    """One manager's latency histograms (see the module docstring for the names)."""

    def __init__(self) -> None:
        self.histograms: dict[str, Histogram] = {name: Histogram() for name in HISTOGRAMS}

    def observe(self, name: str, seconds: float) -> None:
        hist = self.histograms.get(name)
        if hist is None:
            hist = self.histograms[name] = Histogram()
        hist.observe(seconds)

    def since(self, name: str, start: Optional[float]) -> None:
        """Observe ``now - start`` (a ``time.perf_counter()`` value); nothing when ``start`` is None."""
        if start is not None:
            self.observe(name, time.perf_counter() - start)

    def prefetch_done(self, task: "asyncio.Future[Any]") -> None:
        """Done callback of a prefetch's task: observe the ``seconds`` of its result."""
        if not task.cancelled() and task.exception() is None:
            self.observe("prefetch", task.result().seconds)

    def snapshot(self) -> dict[str, Histogram]:
        """Copies, safe to read on another thread."""
        return {k: Histogram(list(h.counts), h.total, h.count) for k, h in self.histograms.items()}


def instrument_io(backend: Any, timings: Timings) -> None:
    """Time every ``read`` / ``write`` request of a disk I/O backend (instance attributes wrap its methods;
    the backend object, its ``fault_hook`` and the rest are unchanged)."""

    def timed(fn: Callable[..., Awaitable[Any]], name: str) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                timings.since(name, start)

        return call

    backend.read = timed(backend.read, "io_read")
    backend.write = timed(backend.write, "io_write")
