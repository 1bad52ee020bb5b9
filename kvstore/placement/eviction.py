"""Eviction queue of one level: evictable pages, LRU within priority, lower priority evicted first.

:class:`EvictionPolicy` is the interface every per-level queue implements (see
:mod:`kvstore.placement.policies` for the others); :class:`EvictionQueue` is the LRU baseline, held in the
page table's columns: a queued page has a recency ``stamp`` (unique, increasing), and each priority of a
level keeps an append-only log of (pid, stamp) in queueing order. An entry whose stamp is no longer its
page's is stale (the page left the queue or was queued again later) and is skipped; logs are compacted
when stale entries outnumber live ones. Queueing, removing and taking victims are array operations.
"""

from __future__ import annotations

from itertools import islice
from typing import Iterator, Protocol, Sequence

import numpy as np

from .page import Page
from .table import PageTable, every, pids_of


class EvictionPolicy(Protocol):
    """The evictable pages of one level, in eviction order.

    ``candidates()`` yields pages in the order they should leave, lazily and without changing any state
    (a planning draft stops early and may discard the iterator); the queue must not change while it runs.
    ``first(k)`` is the pids of its first ``k`` pages. The ``_pids`` methods take distinct pids of pages
    at this level.
    """

    def __len__(self) -> int: ...

    def __contains__(self, page: Page) -> bool: ...

    def push(self, page: Page) -> None:
        """Queue ``page`` (it became evictable at this level) as most recently used."""

    def remove(self, page: Page) -> None:
        """Take a queued ``page`` out (KeyError if it is not queued)."""

    def discard(self, page: Page) -> None:
        """Take ``page`` out if it is queued."""

    def push_pids(self, pids: np.ndarray) -> None:
        """:meth:`push` of every page of ``pids``, in order (a page queued already becomes most recent)."""

    def discard_pids(self, pids: np.ndarray) -> None:
        """:meth:`discard` of every page of ``pids``."""

    def touch(self, page: Page) -> None:
        """``page`` was used: most recently used (re-ordered if its priority changed); no-op if not queued."""

    def hit(self, page: Page) -> None:
        """``page`` was reused as a committed prefix page (queued or not)."""

    def touch_pids(self, pids: np.ndarray) -> None:
        """:meth:`touch` of every page of ``pids``, in order."""

    def hit_pids(self, pids: np.ndarray) -> None:
        """:meth:`hit` of every page of ``pids``, in order."""

    def candidates(self) -> Iterator[Page]:
        """Pages in eviction order."""

    def first(self, k: int) -> np.ndarray:
        """The pids of the first ``k`` candidates (fewer if the queue is shorter)."""


class PagesPolicy:
    """The ``_pids`` and :meth:`first` methods for a policy that keeps page handles (``push_many`` and
    ``discard_many`` of pages)."""

    table: PageTable

    def push_many(self, pages: Sequence[Page]) -> None:
        raise NotImplementedError

    def discard_many(self, pages: Sequence[Page]) -> None:
        raise NotImplementedError

    def candidates(self) -> Iterator[Page]:
        raise NotImplementedError

    def push_pids(self, pids: np.ndarray) -> None:
        if pids.size:
            self.push_many(self.table.pages(pids))

    def discard_pids(self, pids: np.ndarray) -> None:
        if pids.size:
            self.discard_many(self.table.pages(pids))

    def first(self, k: int) -> np.ndarray:
        return pids_of(islice(self.candidates(), max(k, 0)))

    def touch(self, page: Page) -> None:
        raise NotImplementedError

    def hit(self, page: Page) -> None:
        raise NotImplementedError

    def touch_pids(self, pids: np.ndarray) -> None:
        for page in self.table.pages(pids):
            self.touch(page)

    def hit_pids(self, pids: np.ndarray) -> None:
        for page in self.table.pages(pids):
            self.hit(page)


class _Log:
    """Queue entries of one priority, oldest first: ``pids[head:n]`` with the stamps they were queued with."""

    __slots__ = ("pids", "stamps", "head", "n")

    def __init__(self) -> None:
        self.pids = np.zeros(64, dtype=np.int64)
        self.stamps = np.zeros(64, dtype=np.int64)
        self.head = 0
        self.n = 0

    def append(self, pids: np.ndarray, stamps: np.ndarray) -> None:
        k = pids.size
        if self.n + k > self.pids.size:
            live = self.n - self.head
            size = max(64, 2 * (live + k))
            new_p = np.zeros(size, dtype=np.int64)
            new_s = np.zeros(size, dtype=np.int64)
            new_p[:live] = self.pids[self.head:self.n]
            new_s[:live] = self.stamps[self.head:self.n]
            self.pids, self.stamps, self.head, self.n = new_p, new_s, 0, live
        self.pids[self.n:self.n + k] = pids
        self.stamps[self.n:self.n + k] = stamps
        self.n += k

    def append1(self, pid: int, stamp: int) -> None:
        if self.n == self.pids.size:
            self.append(np.array([pid], dtype=np.int64), np.array([stamp], dtype=np.int64))
            return
        self.pids[self.n] = pid
        self.stamps[self.n] = stamp
        self.n += 1

    def compact(self, stamp: np.ndarray) -> int:
        """Drop stale entries; the live ones left."""
        p, s = self.pids[self.head:self.n], self.stamps[self.head:self.n]
        keep = stamp[p] == s
        live = int(np.count_nonzero(keep))
        self.pids[:live] = p[keep]
        self.stamps[:live] = s[keep]
        self.head, self.n = 0, live
        return live


class EvictionQueue:
    """Pages of one level in eviction order: ascending priority, then least recently used first."""

    _WINDOW = 256  # entries checked at a time when taking candidates

    def __init__(self, table: PageTable, level: int) -> None:
        self.table = table
        self.code = level  # the level's CacheLevel value
        self._logs: dict[int, _Log] = {}
        self._len = 0
        self._entries = 0  # entries in the logs, stale ones included

    def __len__(self) -> int:
        return self._len

    def __contains__(self, page: Page) -> bool:
        t = self.table
        return page._live and t.stamp.item(page.pid) >= 0 and t.level.item(page.pid) == self.code

    def _mine(self, pids: np.ndarray) -> np.ndarray:
        """The pids of ``pids`` (pages of this level) queued here."""
        mine: np.ndarray = pids[self.table.stamp[pids] >= 0]
        return mine

    def push_pids(self, pids: np.ndarray) -> None:
        """Queue ``pids`` (distinct pages of this level) as the most recently used, in order."""
        k = pids.size
        if k == 0:
            return
        t = self.table
        self._len += k - int(np.count_nonzero(t.stamp[pids] >= 0))
        stamps = np.arange(t.clock, t.clock + k, dtype=np.int64)
        t.clock += k
        t.stamp[pids] = stamps
        prio = t.priority[pids]
        p0 = prio[0]
        if k == 1 or every(prio == p0):
            self._log(int(p0)).append(pids, stamps)
        else:
            for p in np.unique(prio).tolist():
                sel = prio == p
                self._log(p).append(pids[sel], stamps[sel])
        self._appended(k)

    def _appended(self, k: int) -> None:
        """``k`` entries were logged: compact once stale entries outnumber live ones."""
        self._entries += k
        if self._entries > 2 * self._len + 4096:
            self._compact()

    def _log(self, priority: int) -> _Log:
        log = self._logs.get(priority)
        if log is None:
            log = self._logs[priority] = _Log()
        return log

    def _compact(self) -> None:
        stamp = self.table.stamp
        self._entries = 0
        for prio in list(self._logs):
            live = self._logs[prio].compact(stamp)
            if live == 0:
                del self._logs[prio]
            self._entries += live

    def discard_pids(self, pids: np.ndarray) -> None:
        """Take the pages of ``pids`` queued here out."""
        mine = self._mine(pids)
        if mine.size:
            self.table.stamp[mine] = -1
            self._len -= mine.size

    def push(self, page: Page) -> None:
        t, pid = self.table, page.pid
        if not (t.stamp.item(pid) >= 0 and t.level.item(pid) == self.code):
            self._len += 1
        stamp = t.clock
        t.clock += 1
        t.stamp[pid] = stamp
        self._log(t.priority.item(pid)).append1(pid, stamp)
        self._appended(1)

    def remove(self, page: Page) -> None:
        if page not in self:
            raise KeyError(page.pid)
        self.table.stamp[page.pid] = -1
        self._len -= 1

    def discard(self, page: Page) -> None:
        if page in self:
            self.table.stamp[page.pid] = -1
            self._len -= 1

    def touch(self, page: Page) -> None:
        """Mark ``page`` most recently used (re-ordered if its priority changed); no-op if not queued."""
        if page in self:
            self.push(page)

    def hit(self, page: Page) -> None:
        """A prefix hit is a use like any other for LRU."""
        self.touch(page)

    def touch_pids(self, pids: np.ndarray) -> None:
        self.push_pids(self._mine(pids))

    def hit_pids(self, pids: np.ndarray) -> None:
        self.touch_pids(pids)

    def _runs(self, window: int = _WINDOW) -> Iterator[np.ndarray]:
        """Queued pids in eviction order, ``window`` entries checked at a time (a log's leading stale
        entries are skipped for good)."""
        stamp = self.table.stamp
        for prio in sorted(self._logs):
            log = self._logs[prio]
            lo = log.head
            while lo < log.n:
                hi = min(lo + window, log.n)
                p = log.pids[lo:hi]
                live = p[stamp[p] == log.stamps[lo:hi]]
                if live.size:
                    yield live
                elif lo == log.head:
                    log.head = hi
                lo = hi

    def candidates(self) -> Iterator[Page]:
        """Pages in eviction order. The queue must not change while the iterator is in use."""
        pages = self.table.pages
        for run in self._runs():
            yield from pages(run)

    def first(self, k: int) -> np.ndarray:
        """The pids of the first ``k`` pages in eviction order."""
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        got: list[np.ndarray] = []
        n = 0
        for run in self._runs(max(self._WINDOW, k)):
            got.append(run)
            n += run.size
            if n >= k:
                break
        if not got:
            return np.zeros(0, dtype=np.int64)
        out = got[0] if len(got) == 1 else np.concatenate(got)
        return out[:k]
