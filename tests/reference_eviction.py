"""Reference model of the LRU eviction queue: the dict-per-priority queue over page objects that the
engine used before the page table (kvstore.placement.eviction keeps the same order in array columns)."""

from __future__ import annotations

from typing import Iterator, Sequence

from kvstore.placement.page import Page


class ReferenceQueue:
    """Pages in eviction order: ascending priority, then least recently used first."""

    def __init__(self) -> None:
        self._buckets: dict[int, dict[int, Page]] = {}  # priority -> pages by pid, oldest first (insertion order)
        self._where: dict[int, int] = {}  # pid -> priority bucket

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, page: Page) -> bool:
        return page.pid in self._where

    def push(self, page: Page) -> None:
        """Queue ``page`` as most recently used."""
        if page.pid in self._where:
            self.remove(page)
        bucket = self._buckets.get(page.priority)
        if bucket is None:
            bucket = self._buckets[page.priority] = {}
        bucket[page.pid] = page
        self._where[page.pid] = page.priority

    def remove(self, page: Page) -> None:
        prio = self._where.pop(page.pid)
        bucket = self._buckets[prio]
        del bucket[page.pid]
        if not bucket:
            del self._buckets[prio]

    def discard(self, page: Page) -> None:
        if page.pid in self._where:
            self.remove(page)

    def push_many(self, pages: Sequence[Page]) -> None:
        """:meth:`push` of every page, in order: for pages of one priority none of which is queued (a whole
        cache becoming evictable), two dict updates instead of a call per page."""
        if not pages:
            return
        where = self._where
        prio = pages[0].priority
        if any(p.pid in where or p.priority != prio for p in pages):
            for p in pages:
                self.push(p)
            return
        bucket = self._buckets.get(prio)
        if bucket is None:
            bucket = self._buckets[prio] = {}
        pids = [p.pid for p in pages]
        bucket.update(zip(pids, pages))
        where.update(dict.fromkeys(pids, prio))

    def discard_many(self, pages: Sequence[Page]) -> None:
        where, buckets = self._where, self._buckets
        touched = set()
        for p in pages:
            prio = where.pop(p.pid, None)
            if prio is not None:
                del buckets[prio][p.pid]
                touched.add(prio)
        for prio in touched:
            if not buckets[prio]:
                del buckets[prio]

    def touch(self, page: Page) -> None:
        """Mark ``page`` most recently used (re-bucketed if its priority changed)."""
        prio = self._where.get(page.pid)
        if prio is None:
            return
        if prio != page.priority:
            self.push(page)
        else:
            bucket = self._buckets[prio]
            bucket[page.pid] = bucket.pop(page.pid)  # re-inserted: most recent

    def hit(self, page: Page) -> None:
        """A prefix hit is a use like any other for LRU."""
        self.touch(page)

    def candidates(self) -> Iterator[Page]:
        """Pages in eviction order. The queue must not change while the iterator is in use."""
        for prio in sorted(self._buckets):
            yield from self._buckets[prio].values()
