"""Eviction queue of one level: evictable pages, LRU within priority, lower priority evicted first."""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

from .page import Page


class EvictionQueue:
    """Pages in eviction order: ascending priority, then least recently used first."""

    def __init__(self) -> None:
        self._buckets: dict[int, OrderedDict[int, Page]] = {}
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
            bucket = self._buckets[page.priority] = OrderedDict()
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

    def touch(self, page: Page) -> None:
        """Mark ``page`` most recently used (re-bucketed if its priority changed)."""
        prio = self._where.get(page.pid)
        if prio is None:
            return
        if prio != page.priority:
            self.push(page)
        else:
            self._buckets[prio].move_to_end(page.pid)

    def candidates(self) -> Iterator[Page]:
        """Pages in eviction order. The queue must not change while the iterator is in use."""
        for prio in sorted(self._buckets):
            yield from self._buckets[prio].values()
