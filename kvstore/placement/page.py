"""Page handles, moves and plans: the records placement hands to transfer."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..types import CacheLevel
from .table import LEVEL_OF, NO_LEVEL, PageTable


class MoveState(enum.Enum):
    PENDING = "pending"
    STAGED = "staged"  # a swap move whose bytes left the source slot for a staging buffer
    DONE = "done"
    ABORTED = "aborted"


class _IntColumn:
    """A page attribute kept as an int in the page's row of the table column of the same name."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, page: "Page", owner: Optional[type] = None) -> int:
        return getattr(page._t, self.name).item(page.pid)  # type: ignore[no-any-return]

    def __set__(self, page: "Page", value: int) -> None:
        getattr(page._t, self.name)[page.pid] = value


class Page:
    """Handle of one page: its attributes read and write its row of the :class:`PageTable`.

    ``level``/``slot`` is where its bytes are now (None/-1 for a page not yet placed, or freed). A page is
    evictable when no ACTIVE cache locks it, no operation holds it and it is not moving; exactly the
    evictable pages sit in their level's eviction queue. A freed page's handle is dead: ``freed``, no
    level, no move (its row may belong to another page by now).
    """

    __slots__ = ("pid", "key", "_t", "_live")

    def __init__(self, table: PageTable, pid: int, key: Optional[bytes] = None, live: bool = True) -> None:
        self._t = table
        self.pid = pid
        self.key = key  # chained prefix hash once committed
        self._live = live

    def __repr__(self) -> str:
        return f"<Page {self.pid} {'freed' if not self._live else self.level}>"

    @property
    def freed(self) -> bool:
        return not self._live

    @property
    def level(self) -> Optional[CacheLevel]:
        return LEVEL_OF[self._t.level.item(self.pid)] if self._live else None

    @level.setter
    def level(self, level: Optional[CacheLevel]) -> None:
        self._t.level[self.pid] = NO_LEVEL if level is None else level

    @property
    def slot(self) -> int:
        return self._t.slot.item(self.pid) if self._live else -1

    @slot.setter
    def slot(self, slot: int) -> None:
        self._t.slot[self.pid] = slot

    @property
    def move(self) -> Optional["Move"]:
        return self._t.move_of(self.pid) if self._live else None

    priority = _IntColumn()
    owners = _IntColumn()  # caches whose page list contains this page (and operations that own new pages)
    locks = _IntColumn()  # ACTIVE caches holding it (device level only)
    holds = _IntColumn()  # operations (resume, prefetch) keeping it out of eviction

    @property
    def indexed(self) -> bool:
        """Registered in the prefix index (reusable)."""
        return self._live and self._t.indexed.item(self.pid)

    @indexed.setter
    def indexed(self, indexed: bool) -> None:
        if self._live:
            self._t.indexed[self.pid] = indexed

    @property
    def evictable(self) -> bool:
        t, pid = self._t, self.pid
        return self._live and t.locks.item(pid) == 0 and t.holds.item(pid) == 0 and t.move.item(pid) < 0

    @property
    def droppable(self) -> bool:
        """A committed page no cache holds: it may be dropped from the last level."""
        return self.indexed and self._t.owners.item(self.pid) == 0


class Move:
    """Pages ``pids[i]`` moving from (src, ``src_slots[i]``) to (dst, ``dst_slots[i]``): one kind of move for
    many pages at once, so planning, batching and settling them is a few array operations, not an object
    per page. Moves planned one page at a time (drafts with cascades, swaps, shrinks) hold one page.

    ``src is None`` marks new pages being placed (no data moves). ``after`` is the move whose page ``i``
    must vacate ``dst_slots[i]`` first (same length; ``successor`` is the reverse link). ``handoff``: a
    later move of the same plan takes the source slots, so completing this one must not free them. ``swap``
    marks a victim whose destination is vacated by a promotion of the same plan that in turn may need this
    move's source slot: its bytes go through a staging buffer (read first, written once ``after`` is done).
    Each page has its own ``state``; ``settled`` (set by the transfer layer when the plan is submitted) is
    done once every page of the move is settled. ``left``: pages not settled yet (the table forgets the
    move at 0).
    """

    __slots__ = ("pids", "src", "src_slots", "dst", "dst_slots", "after", "handoff", "swap", "state", "settled",
                 "successor", "table", "serial", "left", "gens", "_pages")

    def __init__(
        self,
        table: PageTable,
        pids: np.ndarray,
        src: Optional[CacheLevel],
        src_slots: np.ndarray,
        dst: CacheLevel,
        dst_slots: np.ndarray,
        after: Optional["Move"] = None,
        handoff: bool = False,
        swap: bool = False,
    ) -> None:
        self.table = table
        self.pids = pids
        self.src = src
        self.src_slots = src_slots
        self.dst = dst
        self.dst_slots = dst_slots
        self.after = after
        self.handoff = handoff
        self.swap = swap
        self.state = [MoveState.PENDING] * len(pids)
        self.settled: Any = None
        self.successor: Optional[Move] = None
        self.left = len(pids)
        self.gens = table.gen[pids]  # which pages the rows held when planned (a row may be reused later)
        self._pages: Optional[list[Page]] = None
        if after is not None:
            after.successor = self
        self.serial = table.start_move(self, pids)

    @property
    def pages(self) -> list[Page]:
        """The handles of the pages of the move (made once; a page freed by then reads ``freed``)."""
        if self._pages is None:
            self._pages = self.table.pages_at(self.pids, self.gens)
        return self._pages

    def __len__(self) -> int:
        return len(self.pids)

    def __repr__(self) -> str:
        src = self.src.label if self.src is not None else "new"
        return f"<Move {len(self.pids)} pages {src}->{self.dst.label}>"

    def pending_at(self, i: int) -> bool:
        """Page ``i`` is not settled yet (PENDING or STAGED)."""
        st = self.state[i]
        return st is MoveState.PENDING or st is MoveState.STAGED


class PageMove:
    """Read-only view of page ``i`` of a :class:`Move` (for tests and debugging; the engine uses moves whole)."""

    __slots__ = ("move", "i")

    def __init__(self, move: Move, i: int) -> None:
        self.move, self.i = move, i

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PageMove) and other.move is self.move and other.i == self.i

    def __hash__(self) -> int:
        return hash((id(self.move), self.i))

    page = property(lambda self: self.move.pages[self.i])
    src = property(lambda self: self.move.src)
    dst = property(lambda self: self.move.dst)
    src_slot = property(lambda self: self.move.src_slots[self.i])
    dst_slot = property(lambda self: self.move.dst_slots[self.i])
    swap = property(lambda self: self.move.swap)
    handoff = property(lambda self: self.move.handoff)
    state = property(lambda self: self.move.state[self.i])
    settled = property(lambda self: self.move.settled)

    @property
    def after(self) -> Optional["PageMove"]:
        a = self.move.after
        return None if a is None else PageMove(a, self.i)

    @property
    def successor(self) -> Optional["PageMove"]:
        s = self.move.successor
        return None if s is None else PageMove(s, self.i)

    @property
    def pending(self) -> bool:
        return self.move.pending_at(self.i)


@dataclass(eq=False)
class Plan:
    """Moves that must run (victims first in dependency order) and pages dropped while planning."""

    moves: list[Move] = field(default_factory=list)
    dropped: int = 0
    swaps: list[tuple[Move, Page]] = field(default_factory=list)  # used while planning only

    def __len__(self) -> int:
        """Page moves in the plan."""
        return sum(len(m.pids) for m in self.moves)

    def page_moves(self) -> list[PageMove]:
        """Every page move, in plan order (for tests and debugging)."""
        return [PageMove(m, i) for m in self.moves for i in range(len(m.pids))]
