"""Pages, moves and plans: the records placement hands to transfer."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

from ..types import CacheLevel


class MoveState(enum.Enum):
    PENDING = "pending"
    STAGED = "staged"  # a swap move whose bytes left the source slot for a staging buffer
    DONE = "done"
    ABORTED = "aborted"


@dataclass(eq=False, slots=True)
class Page:
    """One page. ``level``/``slot`` is where its bytes are now (None/-1 for a page not yet placed).

    A page is evictable when no ACTIVE cache locks it, no operation holds it and it is not moving;
    exactly the evictable pages sit in their level's eviction queue.
    """

    pid: int
    level: Optional[CacheLevel]
    slot: int
    priority: int = 0
    owners: int = 0  # caches whose page list contains this page
    locks: int = 0  # ACTIVE caches holding it (device level only)
    holds: int = 0  # operations (resume, prefetch) keeping it out of eviction
    move: Optional["Move"] = None
    key: Optional[bytes] = None  # chained prefix hash once committed
    indexed: bool = False  # registered in the prefix index (reusable)
    freed: bool = False

    @property
    def evictable(self) -> bool:
        return self.locks == 0 and self.holds == 0 and self.move is None and not self.freed

    @property
    def droppable(self) -> bool:
        """A committed page no cache holds: it may be dropped from the last level."""
        return self.owners == 0 and self.indexed


class Move:
    """Pages ``pages[i]`` moving from (src, ``src_slots[i]``) to (dst, ``dst_slots[i]``): one kind of move for
    many pages at once, so planning, batching and settling them is a few list operations, not an object
    per page. Moves planned one page at a time (drafts with cascades, swaps, shrinks) hold one page.

    ``src is None`` marks new pages being placed (no data moves). ``after`` is the move whose page ``i``
    must vacate ``dst_slots[i]`` first (same length; ``successor`` is the reverse link). ``handoff``: a
    later move of the same plan takes the source slots, so completing this one must not free them. ``swap``
    marks a victim whose destination is vacated by a promotion of the same plan that in turn may need this
    move's source slot: its bytes go through a staging buffer (read first, written once ``after`` is done).
    Each page has its own ``state``; ``settled`` (set by the transfer layer when the plan is submitted) is
    done once every page of the move is settled.
    """

    __slots__ = ("pages", "src", "src_slots", "dst", "dst_slots", "after", "handoff", "swap", "state", "settled",
                 "successor")

    def __init__(
        self,
        pages: list[Page],
        src: Optional[CacheLevel],
        src_slots: list[int],
        dst: CacheLevel,
        dst_slots: list[int],
        after: Optional["Move"] = None,
        handoff: bool = False,
        swap: bool = False,
    ) -> None:
        self.pages = pages
        self.src = src
        self.src_slots = src_slots
        self.dst = dst
        self.dst_slots = dst_slots
        self.after = after
        self.handoff = handoff
        self.swap = swap
        self.state = [MoveState.PENDING] * len(pages)
        self.settled: Any = None
        self.successor: Optional[Move] = None
        if after is not None:
            after.successor = self
        for page in pages:
            page.move = self

    def __repr__(self) -> str:
        src = self.src.label if self.src is not None else "new"
        return f"<Move {len(self.pages)} pages {src}->{self.dst.label}>"

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
        return sum(len(m.pages) for m in self.moves)

    def page_moves(self) -> list[PageMove]:
        """Every page move, in plan order (for tests and debugging)."""
        return [PageMove(m, i) for m in self.moves for i in range(len(m.pages))]
