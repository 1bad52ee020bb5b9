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


@dataclass(eq=False, slots=True)
class Move:
    """Move ``page`` from (src, src_slot) to (dst, dst_slot).

    ``src is None`` marks a new page being placed (no data moves). ``after`` is the move that must
    vacate ``dst_slot`` first (``successor`` is the reverse link). ``handoff`` is set when a later move of the same plan will take this
    move's source slot, so completing this move must not free it. ``swap`` marks a victim whose
    destination is vacated by a promotion of the same plan that in turn may need this move's source
    slot: its bytes go through a staging buffer (read first, written once ``after`` is done).
    """

    page: Page
    src: Optional[CacheLevel]
    src_slot: int
    dst: CacheLevel
    dst_slot: int
    after: Optional["Move"] = None
    handoff: bool = False
    swap: bool = False
    state: MoveState = MoveState.PENDING
    settled: Any = None  # set by the transfer layer when the plan is submitted: done once the move is settled
    successor: Optional["Move"] = None  # the move whose ``after`` is this one (it takes this move's source slot)

    def __post_init__(self) -> None:
        if self.after is not None:
            self.after.successor = self

    @property
    def pending(self) -> bool:
        """Not settled yet (PENDING or STAGED)."""
        return self.state is MoveState.PENDING or self.state is MoveState.STAGED


@dataclass(eq=False)
class Plan:
    """Moves that must run (victims first in dependency order) and pages dropped while planning."""

    moves: list[Move] = field(default_factory=list)
    dropped: int = 0
    swaps: list[tuple[Move, Page]] = field(default_factory=list)  # used while planning only

    def __len__(self) -> int:
        return len(self.moves)
