"""Placement: the synchronous bookkeeping half of kvstore (no I/O, no torch).

Primitives:

- :class:`PageTable` — every page's state (level, slot, owners, locks, holds, move, recency...) as numpy
  columns indexed by page id; whole-cache operations are array operations over page ids.
- :class:`Page` — a handle of one page's row, for code that works page by page (made on demand).
- :class:`PageList` — pages in order as a pid array (a cache's pages, an operation's holds).
- :class:`SlotAllocator` — the fixed slots of one level (lowest free slot first).
- :class:`EvictionQueue` — the evictable pages of one level, LRU within priority (lower priority first),
  kept as recency stamps in the table.
- :class:`PrefixIndex` — committed pages keyed by a chained hash of their token prefix.
- :class:`Placement` — the levels together: makes room (demote, cascade, drop), plans moves as
  :class:`Plan` objects, and commits or rolls back each :class:`Move` when its transfer ends.
"""

from .eviction import EvictionQueue
from .page import Move, MoveState, Page, PageMove, Plan
from .pagelist import PageList
from .placement import Placement, RoomCheck
from .prefix import PrefixIndex, PrefixHasher
from .slots import SlotAllocator
from .table import PageTable

__all__ = [
    "EvictionQueue",
    "Move",
    "MoveState",
    "PageMove",
    "Page",
    "PageList",
    "PageTable",
    "Placement",
    "Plan",
    "RoomCheck",
    "PrefixHasher",
    "PrefixIndex",
    "SlotAllocator",
]
