"""KVCache (one request's page list and lifecycle) and PrefetchTask (an awaitable, cancellable prefetch)."""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Generator, Optional, Sequence

import numpy as np
import torch

from ._args import describe, integral
from .errors import InvalidArgumentError, InvalidStateError
from .placement import PageList
from .placement.prefix import as_token_array
from .types import CacheLevel, CacheStatus, PrefetchResult, TransferEstimate

if TYPE_CHECKING:
    from .manager import KVCacheManager


class PrefetchTask:
    """Handle of a running prefetch: ``await task`` gives a :class:`PrefetchResult`.

    Stopped by :meth:`cancel`, ``cache.close()`` or ``mgr.aclose()``, it still gives a result, with
    ``cancelled=True``. Cancelling a coroutine that awaits the task cancels only that coroutine.
    """

    def __init__(self, cache: "KVCache", target: CacheLevel, previous: Sequence["PrefetchTask"]) -> None:
        self.target = target
        self._cache = cache
        self._previous = list(previous)  # older prefetches of the cache, in flight: this one runs after them
        self._stop_requested = False
        self._unstarted: Optional[PrefetchResult] = None  # the result of a prefetch stopped before it ran
        self._task: "asyncio.Task[PrefetchResult]" = asyncio.ensure_future(cache._mgr._prefetch(cache, target, self))
        self._task.add_done_callback(_retrieve)

    def __await__(self) -> Generator[object, None, PrefetchResult]:
        return self._wait().__await__()

    async def _wait(self) -> PrefetchResult:
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            if not self._task.done():
                raise  # the awaiting coroutine was cancelled, not the prefetch
        return self.result()

    def done(self) -> bool:
        return self._task.done()

    def cancel(self) -> bool:
        """Stop moving pages; each page ends at its old level or its new one. False if already done."""
        if self._task.done():
            return False
        self._stop_requested = True
        return self._task.cancel()

    def cancelled(self) -> bool:
        """Whether it was stopped by :meth:`cancel`, ``close()`` or ``aclose()`` before it finished."""
        return self._stop_requested and (self._task.cancelled() or self._task.result().cancelled)

    def result(self) -> PrefetchResult:
        """The result of a finished prefetch (raises its error)."""
        if not self._task.done():
            raise InvalidStateError("the prefetch is still running; await it or check done() first")
        if self._task.cancelled():  # stopped before its first step: nothing moved
            if self._unstarted is None:
                self._unstarted = self._cache._mgr._prefetch_result(self._cache._pages, self.target, cancelled=True)
            return self._unstarted
        return self._task.result()


def _retrieve(task: asyncio.Task[PrefetchResult]) -> None:
    if not task.cancelled():
        task.exception()  # mark retrieved: a failed prefetch nobody awaits is not an asyncio warning


class KVCache:
    """The pages of one request, in token order. Create with :meth:`KVCacheManager.create_cache`."""

    def __init__(
        self,
        mgr: "KVCacheManager",
        pages: PageList,
        priority: int,
        tokens: np.ndarray,
        last_key: Optional[bytes],
    ) -> None:
        self._mgr = mgr
        self._pages = pages
        self._priority = priority
        self._status = CacheStatus.SUSPENDED
        self._tpp = mgr.layout.tokens_per_page
        self._num_tokens = len(pages) * self._tpp
        self._num_reused_tokens = self._num_tokens
        self._committed_tokens = tokens  # tokens of the committed full pages
        self._last_key = last_key
        self._prefetches: list[PrefetchTask] = []  # in flight, oldest first
        self._busy: Optional[str] = None  # "resume" or "resize" while one runs

    # ------------------------------------------------------------------ properties
    @property
    def status(self) -> CacheStatus:
        return self._status

    @property
    def num_tokens(self) -> int:
        """Capacity in tokens: the last ``resize`` argument (initially the reused prefix length)."""
        return self._num_tokens

    @property
    def num_pages(self) -> int:
        return len(self._pages)

    @property
    def num_reused_tokens(self) -> int:
        return self._num_reused_tokens

    @property
    def priority(self) -> int:
        return self._priority

    @property
    def num_committed_tokens(self) -> int:
        return len(self._committed_tokens)

    def __repr__(self) -> str:
        return f"<KVCache {self._status.name} pages={len(self._pages)} tokens={self._num_tokens}>"

    # ------------------------------------------------------------------ checks
    def _require(self, *allowed: CacheStatus, what: str) -> None:
        self._mgr._check_running()
        if self._status not in allowed:
            names = " or ".join(s.name for s in allowed)
            raise InvalidStateError(f"{what} needs a {names} cache; this cache is {self._status.name}")

    def _require_idle(self, what: str) -> None:
        if self._busy is not None:
            raise InvalidStateError(f"{what} while a {self._busy} of this cache is in progress; await it first")

    # ------------------------------------------------------------------ lifecycle
    async def resume(self) -> None:
        """SUSPENDED -> ACTIVE: bring every page to the device level and lock it there.

        Joins a prefetch of this cache that is in flight. Raises CapacityError before moving anything
        when the pages cannot all fit on the device level; the cache then stays SUSPENDED.
        """
        self._require(CacheStatus.SUSPENDED, what="resume()")
        self._require_idle("resume()")
        self._busy = "resume"
        start = time.perf_counter()
        try:
            await self._join_prefetch()
            await self._mgr._resume(self)
        finally:
            self._busy = None
        self._mgr.timings.since("resume", start)  # kvstore.metrics: resume latency

    async def _join_prefetch(self) -> None:
        """Wait for every prefetch of this cache in flight (none can start while a resume runs)."""
        while any(not t.done() for t in self._prefetches):
            await asyncio.wait([t._task for t in self._prefetches if not t.done()])
        if self._status is not CacheStatus.SUSPENDED:
            raise InvalidStateError(f"the cache became {self._status.name} while resume() waited for its prefetch")

    async def resize(self, num_tokens: int) -> None:
        """ACTIVE only: grow or shrink to ``ceil(num_tokens / tokens_per_page)`` pages; on error nothing changes."""
        if (n := integral(num_tokens)) is None:
            raise InvalidArgumentError(f"resize() takes an int number of tokens, got {describe(num_tokens)}")
        num_tokens = n
        if num_tokens < 0:
            raise InvalidArgumentError(f"resize() needs num_tokens >= 0, got {num_tokens}")
        self._require(CacheStatus.ACTIVE, what="resize()")
        self._require_idle("resize()")
        want = math.ceil(num_tokens / self._tpp)
        if want > len(self._pages):
            self._busy = "resize"
            try:
                await self._mgr._grow(self, want - len(self._pages))
            finally:
                self._busy = None
        elif want < len(self._pages):
            self._mgr._shrink(self, want)
            committed_pages = min(len(self._committed_tokens) // self._tpp, want)
            if committed_pages * self._tpp < len(self._committed_tokens):
                self._committed_tokens = self._committed_tokens[: committed_pages * self._tpp]
                self._last_key = self._pages[committed_pages - 1].key if committed_pages else None
        self._num_tokens = num_tokens

    def suspend(self) -> None:
        """ACTIVE -> SUSPENDED. Nothing moves now; every page becomes evictable."""
        self._require(CacheStatus.ACTIVE, what="suspend()")
        self._require_idle("suspend()")
        self._mgr._suspend(self)
        self._status = CacheStatus.SUSPENDED

    def prefetch(self, target: CacheLevel) -> PrefetchTask:
        """SUSPENDED only: start moving every page colder than ``target`` up to ``target``."""
        target = self._mgr._level_arg(target, "prefetch(target)")
        self._require(CacheStatus.SUSPENDED, what="prefetch()")
        self._require_idle("prefetch()")
        task = PrefetchTask(self, target, self._prefetches)
        self._prefetches.append(task)
        task._task.add_done_callback(lambda _: self._prefetches.remove(task))
        task._task.add_done_callback(self._mgr.timings.prefetch_done)  # kvstore.metrics: prefetch latency
        self._mgr._stats["prefetches"] += 1
        return task

    def close(self) -> None:
        """CLOSED. Cancels a prefetch in flight; uncommitted pages are freed, committed ones stay reusable."""
        if self._status is CacheStatus.CLOSED:
            return
        for task in list(self._prefetches):
            task.cancel()
        self._mgr._close_cache(self)
        self._status = CacheStatus.CLOSED

    # ------------------------------------------------------------------ queries
    def page_indices(self, device: "torch.device | str | None" = None) -> torch.Tensor:
        """ACTIVE only: int64 slot indices into ``mgr.device_pool``, one per page, in token order.

        A CPU tensor by default; ``device`` (e.g. ``mgr.device_pool.device``) builds it there instead, for
        indexing the pool or handing it to an attention kernel without a ``.to()`` of your own."""
        self._require(CacheStatus.ACTIVE, what="page_indices()")
        return torch.from_numpy(self._mgr._placement.slots_of(self._pages)).to(device=device)

    def page_levels(self) -> dict[CacheLevel, int]:
        """Pages of this cache per level (a moving page counts at the level it is leaving)."""
        return self._mgr._placement.per_level(self._pages)

    def transfer_estimate(self, target: CacheLevel) -> TransferEstimate:
        """``mgr.transfer_estimate()`` of this cache's pages to ``target`` (any status): the pages not at ``target``
        and not moving, plus the bytes queued on their paths, which include this cache's pages in flight (a
        prefetch running now): the estimate of what is left."""
        mgr = self._mgr
        target = mgr._level_arg(target, "transfer_estimate(target)")
        return mgr._estimate(mgr._placement.per_level(self._pages, settled=True), target, self._pages)

    # ------------------------------------------------------------------ prefix reuse
    def commit(self, tokens: Sequence[int]) -> None:
        """Record that the KV of ``tokens`` (the whole history, from token 0) is written.

        Full pages become immutable, reusable prefix pages. ``tokens`` must extend what was committed before.
        """
        if self._status is CacheStatus.CLOSED:
            raise InvalidStateError("commit() on a CLOSED cache; commit before close()")
        self._mgr._check_running()
        arr = as_token_array(tokens)
        done = len(self._committed_tokens)
        if len(arr) < done or not np.array_equal(arr[:done], self._committed_tokens):
            raise InvalidArgumentError(
                f"commit() tokens must start with the {done} tokens committed (or reused) before; "
                "pass the cache's whole token history from token 0"
            )
        full = min(len(arr) // self._tpp, len(self._pages))
        first = done // self._tpp
        if full <= first:
            return
        keys = self._mgr._commit_pages(self._pages[first:full], arr, first, full, self._last_key)
        self._committed_tokens = arr[: full * self._tpp].copy()
        self._last_key = keys[-1]
