"""Public value types: levels, cache states, and the small frozen records calls return."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["CacheLevel", "CacheStatus", "PrefetchResult", "TierUsage", "PrefixMatch"]


class CacheLevel(enum.IntEnum):
    """Storage levels, hot to cold."""

    DEVICE = 0
    HOST = 1
    DISK = 2
    REMOTE = 3  # a shared Redis/Valkey tier holding copies of committed pages (never a page's placement level)

    @property
    def label(self) -> str:
        """Lower-case name used in stats keys (``device``, ``host``, ``disk``, ``remote``)."""
        return self.name.lower()


class CacheStatus(enum.Enum):
    """Lifecycle state of a KVCache."""

    ACTIVE = "active"
    SUSPENDED = "suspended"
    CLOSED = "closed"


@dataclass(frozen=True)
class PrefetchResult:
    """What a finished prefetch did."""

    complete: bool  # every page of the cache is now at the target level or hotter
    pages_moved: int
    bytes_moved: int
    seconds: float
    cancelled: bool = False  # stopped by task.cancel(), cache.close() or mgr.aclose() before it finished


@dataclass(frozen=True)
class TierUsage:
    """Occupancy of one level, in pages."""

    level: CacheLevel
    total_pages: int
    used_pages: int
    evictable_pages: int
    free_pages: int


@dataclass(frozen=True)
class PrefixMatch:
    """Reusable prefix of a token sequence and where its pages are now."""

    num_tokens: int
    pages_per_level: dict[CacheLevel, int] = field(default_factory=dict)
