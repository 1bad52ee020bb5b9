"""Placement: the synchronous bookkeeping half of kvstore (no I/O, no torch).

Primitives:

- :class:`Page` — one page of KV data and where it lives (level, slot), who holds it, whether it moves.
- :class:`SlotAllocator` — the fixed slots of one level (lowest free slot first).
- :class:`EvictionQueue` — the evictable pages of one level, LRU within priority (lower priority first).
- :class:`PrefixIndex` — committed pages keyed by a chained hash of their token prefix.
- :class:`Placement` — the levels together: makes room (demote, cascade, drop), plans moves as
  :class:`Plan` objects, and commits or rolls back each :class:`Move` when its transfer ends.
"""

from .eviction import EvictionQueue
from .page import Move, MoveState, Page, PageMove, Plan
from .placement import Placement, RoomCheck
from .prefix import PrefixIndex, PrefixHasher
from .slots import SlotAllocator

__all__ = [
    "EvictionQueue",
    "Move",
    "MoveState",
    "PageMove",
    "Page",
    "Placement",
    "Plan",
    "RoomCheck",
    "PrefixHasher",
    "PrefixIndex",
    "SlotAllocator",
]
