"""The page table: every page's state as numpy columns indexed by page id, and the page handles.

A page id (pid) is a row. Whole-cache operations (hold, release, lock, unlock, owners) are array
operations over the pids of the pages involved; :class:`~kvstore.placement.page.Page` is a thin handle
whose attributes read and write its row, for code that works page by page.

Columns: ``level`` (a :class:`CacheLevel` value, -1 while not placed), ``slot`` (-1 while not placed),
``priority``, ``owners``, ``locks``, ``holds``, ``move`` (serial of the :class:`Move` in flight, -1 none;
the move objects are in :attr:`moves`), ``indexed``, ``live``, ``stamp`` (the eviction queues'
recency stamp, -1 while not queued) and ``handled``; ``gen`` counts the times each row was freed, so
(pid, gen) names one page for ever (:class:`PageList` entries, :class:`Move` pages).

A page's handle is made the first time it is asked for (:meth:`PageTable.page`, :meth:`PageTable.pages`)
and kept while the page lives (``handled``), so code that works page by page always sees the same handle;
whole-cache code never needs one. A freed page's handle is dead (``freed``) and stays so. Its row is
reused, with a new handle, once the rows never used are all taken (so a row is not reused soon after it
is freed); the table doubles when no row is left, so it holds at most twice the most pages ever live.
"""

from __future__ import annotations

from operator import attrgetter
from typing import TYPE_CHECKING, Any, Iterable, Optional

import numpy as np

from ..types import CacheLevel
from .pagelist import PageList

if TYPE_CHECKING:
    from .page import Move, Page

#: level code -> CacheLevel; code -1 (not placed) reads as None
LEVEL_OF: tuple[Optional[CacheLevel], ...] = (*CacheLevel, None)
NO_LEVEL = -1
_pid_of = attrgetter("pid")
_COLUMNS: tuple[tuple[str, Any, int], ...] = (
    ("level", np.int8, NO_LEVEL),
    ("slot", np.int64, -1),
    ("priority", np.int64, 0),
    ("owners", np.int32, 0),
    ("locks", np.int32, 0),
    ("holds", np.int32, 0),
    ("move", np.int64, -1),
    ("indexed", np.bool_, False),
    ("live", np.bool_, False),
    ("stamp", np.int64, -1),
    ("handled", np.bool_, False),
)


def every(mask: np.ndarray) -> bool:
    """``mask.all()`` for a 1-D boolean array, without ndarray.all()'s Python-level wrapper (hot paths)."""
    return int(np.count_nonzero(mask)) == mask.size


def some(mask: np.ndarray) -> bool:
    """``mask.any()`` for a 1-D boolean array (as :func:`every`)."""
    return int(np.count_nonzero(mask)) > 0


def pids_of(pages: Iterable["Page"], n: int = -1) -> np.ndarray:
    """The pids of ``pages`` as an int64 array (``n``: their number when known); a PageList's own pids
    (read-only) with no Python per page."""
    if type(pages) is PageList:
        return pages.pids
    return np.fromiter(map(_pid_of, pages), dtype=np.int64, count=n)


class PageTable:
    """Columns of page state, rows reused after a page is freed. Column arrays are replaced when the table
    grows (:meth:`new_pages`): never keep one across a call that may create pages."""

    level: np.ndarray
    slot: np.ndarray
    priority: np.ndarray
    owners: np.ndarray
    locks: np.ndarray
    holds: np.ndarray
    move: np.ndarray
    indexed: np.ndarray
    live: np.ndarray
    stamp: np.ndarray
    handled: np.ndarray

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = 0
        for name, dtype, _ in _COLUMNS:
            setattr(self, name, np.zeros(0, dtype=dtype))
        self.handles = np.zeros(0, dtype=object)  # pid -> its live Page handle (None when free or not made yet)
        self.gen = np.zeros(0, dtype=np.int64)  # times each row was freed: (pid, gen) names one page for ever
        self._free = np.zeros(0, dtype=np.int64)  # rows never used, the next ones taken from the end
        self._recycled: list[np.ndarray] = []  # rows of freed pages, taken once ``_free`` runs out
        self.moves: dict[int, "Move"] = {}  # serial -> move in flight
        self._next_serial = 0
        self.clock = 0  # next recency stamp
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        for name, dtype, fill in _COLUMNS:
            col = np.full(capacity, fill, dtype=dtype)
            col[:old] = getattr(self, name)
            setattr(self, name, col)
        handles = np.empty(capacity, dtype=object)
        handles[:old] = self.handles
        self.handles = handles
        gen = np.zeros(capacity, dtype=np.int64)
        gen[:old] = self.gen
        self.gen = gen
        self._free = np.concatenate((np.arange(capacity - 1, old - 1, -1, dtype=np.int64), self._free))
        self.capacity = capacity

    def new_pages(self, n: int, priority: int) -> np.ndarray:
        """``n`` new live pages, not placed yet: their pids (no handle is made)."""
        if n > self._free.size and self._recycled:
            reuse = np.concatenate(self._recycled)[::-1]  # taken from the end: the first freed first
            self._free = np.concatenate((reuse, self._free))
            self._recycled = []
        if n > self._free.size:
            self._grow(max(2 * self.capacity, self.capacity + n - self._free.size))
        free = self._free
        pids = free[free.size - n:][::-1].copy()  # the lowest free rows first
        self._free = free[: free.size - n]
        for name, _, fill in _COLUMNS:
            getattr(self, name)[pids] = fill
        self.priority[pids] = priority
        self.live[pids] = True
        return pids

    def free_pages(self, pids: np.ndarray) -> None:
        """Rows ``pids`` (live, distinct) become free; their handles are dead from now on."""
        made = pids[self.handled[pids]]
        if made.size:
            for page in self.handles[made].tolist():
                page._live = False
            self.handles[made] = None
        self.live[pids] = False
        self.level[pids] = NO_LEVEL
        self.slot[pids] = -1
        self.stamp[pids] = -1
        self.handled[pids] = False
        self.gen[pids] += 1
        self._recycled.append(pids.copy())

    def page(self, pid: int) -> "Page":
        """The handle of live page ``pid`` (made now if it has none yet)."""
        if self.handled.item(pid):
            return self.handles.item(pid)  # type: ignore[no-any-return]
        return self.pages(np.array([pid], dtype=np.int64))[0]

    def pages(self, pids: np.ndarray) -> list["Page"]:
        """The handles of live pages ``pids`` (those without one get theirs now)."""
        missing = pids[~self.handled[pids]]
        if missing.size:
            from .page import Page

            if not every(self.live[missing]):
                raise RuntimeError("asked for the handle of a freed page")
            # a pid listed twice gets two handles, the last one kept: every caller reads them back from the array
            self.handles[missing] = [Page(self, pid) for pid in missing.tolist()]
            self.handled[missing] = True
        return self.handles[pids].tolist()  # type: ignore[no-any-return]

    def pages_at(self, pids: np.ndarray, gens: np.ndarray) -> list["Page"]:
        """The handles of pages (``pids``, ``gens``): a page freed since reads as a dead handle (``freed``)."""
        alive = self.gen[pids] == gens
        if every(alive):
            return self.pages(pids)
        from .page import Page

        out: list[Page] = [Page(self, pid, live=False) for pid in pids.tolist()]
        where = np.flatnonzero(alive)
        for j, page in zip(where.tolist(), self.pages(pids[where])):
            out[j] = page
        return out

    def live_pids(self) -> np.ndarray:
        return np.flatnonzero(self.live)

    # ----------------------------------------------------------------- moves
    def start_move(self, move: "Move", pids: np.ndarray) -> int:
        """Register ``move`` as moving ``pids``: its serial."""
        serial = self._next_serial
        self._next_serial += 1
        self.moves[serial] = move
        self.move[pids] = serial
        return serial

    def end_moves(self, pids: np.ndarray) -> None:
        """``pids`` are settled (their moves done or aborted); moves left with no page are forgotten."""
        serials = self.move[pids]
        self.move[pids] = -1
        first = serials.item(0) if serials.size else -1
        if first >= 0 and (serials.size == 1 or every(serials == first)):  # one move (settling a move's pages)
            groups = [(first, serials.size)]
        else:
            found, counts = np.unique(serials[serials >= 0], return_counts=True)
            groups = list(zip(found.tolist(), counts.tolist()))
        for serial, n in groups:
            mv = self.moves[serial]
            mv.left -= n
            if mv.left <= 0:
                del self.moves[serial]

    def move_of(self, pid: int) -> Optional["Move"]:
        s = self.move.item(pid)
        return None if s < 0 else self.moves[s]

    # ----------------------------------------------------------------- queries
    def evictable(self, pids: np.ndarray) -> np.ndarray:
        """Mask of ``pids`` that no cache locks, no operation holds and no move carries (and are live)."""
        mask: np.ndarray = (self.locks[pids] == 0) & (self.holds[pids] == 0) & (self.move[pids] < 0) & self.live[pids]
        return mask
