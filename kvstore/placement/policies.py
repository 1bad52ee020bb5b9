"""Eviction policies for the per-level queues, chosen by ``StoreConfig.eviction_policy``.

- ``"lru"`` — :class:`~kvstore.placement.eviction.EvictionQueue`: LRU within priority (the baseline).
- ``"lru-leaf"`` — :class:`LeafFirstLRU`: the same order, made leaf-first.
- ``"slru"`` — :class:`SegmentedLRU`: frequency-aware, leaf-first. Pages reused at least once (a
  prefix hit, or committed again soon after being dropped: the index's ghost) are *protected*; the
  others are on *probation*. Within a priority, probation pages leave first (LRU), then protected ones
  (LRU). Protected pages, counted over all levels, are at most ``PROTECTED_FRACTION`` of all slots;
  beyond that the least recently reused one goes back to the most recent end of probation. One-off
  long prompts thus pass through without flushing the prefixes that are reused.

Leaf-first rule (``lru-leaf`` and ``slru``): within one level, a page is never offered as a victim
before any of its indexed children (pages that extend its prefix by one page) queued at that same
level. A parent deferred for that reason is offered right after the last of those children, so the
policy's order is otherwise kept. Children at other levels do not defer a parent; a child that the
draft skips (it can be neither demoted nor dropped) counts as gone.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator, Optional, Sequence

from ..errors import ConfigError
from ..types import CacheLevel
from .eviction import EvictionPolicy, EvictionQueue, PagesPolicy
from .page import Page
from .prefix import PrefixIndex, _Node
from .table import PageTable


def leaf_first(order: Iterator[Page], queue: EvictionPolicy, index: PrefixIndex) -> Iterator[Page]:
    """``order`` with each page moved after its indexed children queued in ``queue`` (read-only, lazy)."""
    pending: dict[int, int] = {}  # deferred page pid -> its queued children not yet yielded
    yielded: set[int] = set()
    for page in order:
        node = index.node(page)
        if node is not None and node.children:
            n = 0
            for child in node.children.values():
                cp = child.page
                if cp.pid not in yielded and cp in queue:
                    n += 1
            if n:
                pending[page.pid] = n
                continue
        while True:  # yield it, then every deferred ancestor it was the last child of
            yield page
            yielded.add(page.pid)
            parent = node.parent if node is not None else None
            if parent is None:
                break
            left = pending.get(parent.page.pid)
            if left is None:
                break
            if left > 1:
                pending[parent.page.pid] = left - 1
                break
            del pending[parent.page.pid]
            page, node = parent.page, parent


class _Order:
    """Pages oldest first in a doubly linked list: append, insert before a given page, remove, all O(1)."""

    __slots__ = ("_head", "_links")

    def __init__(self) -> None:
        self._head: list[Any] = [None, None, None]  # sentinel link: [prev, next, page]
        self._head[0] = self._head[1] = self._head
        self._links: dict[int, list[Any]] = {}

    def __len__(self) -> int:
        return len(self._links)

    def __contains__(self, pid: int) -> bool:
        return pid in self._links

    def add(self, page: Page, before: Optional[int] = None) -> None:
        """Insert ``page`` as the newest, or just before the page ``before`` when it is in this list."""
        nxt = self._links.get(before, self._head) if before is not None else self._head
        prev = nxt[0]
        link = [prev, nxt, page]
        prev[1] = nxt[0] = link
        self._links[page.pid] = link

    def remove(self, pid: int) -> None:
        prev, nxt, _ = self._links.pop(pid)
        prev[1] = nxt
        nxt[0] = prev

    def __iter__(self) -> Iterator[Page]:
        head = self._head
        link = head[1]
        while link is not head:
            yield link[2]
            link = link[1]


class _PrefixAwareQueue(PagesPolicy):
    """Recency lists per priority and segment; a page enters just before its parent when both share a list.

    So a prefix used in token order (parent first) is ordered children first, the order leaf-first
    wants; :func:`leaf_first` covers what this placement misses.
    """

    segments = 1

    def __init__(self, table: PageTable, index: PrefixIndex) -> None:
        self.table = table
        self._index = index
        self._buckets: dict[int, list[_Order]] = {}
        self._where: dict[int, tuple[int, int]] = {}  # pid -> (priority, segment)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, page: Page) -> bool:
        return page.pid in self._where

    def _segment_of(self, page: Page) -> int:
        return 0

    def _place(self, page: Page) -> None:
        prio, seg = page.priority, self._segment_of(page)
        bucket = self._buckets.get(prio)
        if bucket is None:
            bucket = self._buckets[prio] = [_Order() for _ in range(self.segments)]
        order = bucket[seg]
        before = None
        node = self._index.node(page)
        if node is not None and node.parent is not None and node.parent.page.pid in order:
            before = node.parent.page.pid
        order.add(page, before)
        self._where[page.pid] = (prio, seg)

    def _unplace(self, pid: int) -> None:
        prio, seg = self._where.pop(pid)
        bucket = self._buckets[prio]
        bucket[seg].remove(pid)
        if not any(bucket):
            del self._buckets[prio]

    def push(self, page: Page) -> None:
        if page.pid in self._where:
            self._unplace(page.pid)
        self._place(page)

    def remove(self, page: Page) -> None:
        self._unplace(page.pid)

    def discard(self, page: Page) -> None:
        if page.pid in self._where:
            self._unplace(page.pid)

    def push_many(self, pages: Sequence[Page]) -> None:
        for page in pages:
            self.push(page)

    def discard_many(self, pages: Sequence[Page]) -> None:
        for page in pages:
            self.discard(page)

    def touch(self, page: Page) -> None:
        if page.pid in self._where:
            self._unplace(page.pid)
            self._place(page)

    def hit(self, page: Page) -> None:
        self.touch(page)

    def _order(self) -> Iterator[Page]:
        for prio in sorted(self._buckets):
            for order in self._buckets[prio]:
                yield from order

    def candidates(self) -> Iterator[Page]:
        return leaf_first(self._order(), self, self._index)


class LeafFirstLRU(_PrefixAwareQueue):
    """LRU within priority, leaf-first."""


class HotSet:
    """The protected pages of every level together: at most ``capacity``, least recently reused cooled first."""

    def __init__(self, index: PrefixIndex, capacity: int) -> None:
        self.capacity = max(0, capacity)
        self.queues: dict[CacheLevel, "SegmentedLRU"] = {}
        self._lru: OrderedDict[bytes, _Node] = OrderedDict()
        index.on_remove = self._forget

    def __len__(self) -> int:
        return len(self._lru)

    def heat(self, node: _Node) -> None:
        """``node`` was reused: protected and most recently reused; cool the oldest beyond capacity."""
        node.hot = True
        self._lru[node.key] = node
        self._lru.move_to_end(node.key)
        while len(self._lru) > self.capacity:
            _, old = self._lru.popitem(last=False)
            old.hot = False
            page = old.page
            queue = self.queues.get(page.level) if page.level is not None else None
            if queue is not None:
                queue.touch(page)  # re-placed in probation, as its most recent page

    def _forget(self, node: _Node) -> None:
        self._lru.pop(node.key, None)
        node.hot = False


class SegmentedLRU(_PrefixAwareQueue):
    """Frequency-aware segmented LRU (probation, then protected) within priority, leaf-first.

    The protected segment spans the levels (a :class:`HotSet` shared by the queues of one placement), so
    a page keeps its status when it is demoted and the last level drops probation pages first.
    """

    segments = 2  # 0: probation, 1: protected

    def __init__(self, table: PageTable, index: PrefixIndex, hot: HotSet) -> None:
        super().__init__(table, index)
        self._hot_set = hot

    def _segment_of(self, page: Page) -> int:
        node = self._index.node(page)
        return 1 if node is not None and node.hot else 0

    def hit(self, page: Page) -> None:
        """A reused page becomes protected (now if queued, else when it is queued again)."""
        node = self._index.node(page)
        if node is not None:
            self._hot_set.heat(node)
        self.touch(page)

    def segment(self, page: Page) -> str:
        """``"protected"``, ``"probation"`` or ``""`` (not queued): for tests and debugging."""
        where = self._where.get(page.pid)
        if where is None:
            return ""
        return "protected" if where[1] == 1 else "probation"


POLICIES = ("lru", "lru-leaf", "slru")
PROTECTED_FRACTION = 0.6  # of all slots, for "slru" (swept 0.4-0.9 on the shared trace: 0.6 best)


def make_queues(
    policy: str, table: PageTable, index: PrefixIndex, levels: Sequence[CacheLevel], total_slots: int
) -> dict[CacheLevel, EvictionPolicy]:
    """One queue of ``policy`` (one of :data:`POLICIES`) per level, sharing what the policy shares."""
    if policy == "lru":
        return {lvl: EvictionQueue(table, int(lvl)) for lvl in levels}
    if policy == "lru-leaf":
        return {lvl: LeafFirstLRU(table, index) for lvl in levels}
    if policy == "slru":
        hot = HotSet(index, int(PROTECTED_FRACTION * total_slots))
        hot.queues = {lvl: SegmentedLRU(table, index, hot) for lvl in levels}
        return dict(hot.queues)
    raise ConfigError(f"eviction_policy must be one of {list(POLICIES)}, got {policy!r}")
