"""Public value types: levels, cache states, and the small frozen records calls return."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TypedDict

__all__ = [
    "CacheLevel", "CacheStatus", "PrefetchResult", "TierUsage", "PrefixMatch", "Stats", "PathEstimate", "PathCost",
    "TransferEstimate",
]


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
    """Reusable prefix of a token sequence and where its pages are now; ``estimate``: the time to bring those
    pages to the ``target`` that ``mgr.lookup(tokens, target)`` named (None when it named none)."""

    num_tokens: int
    pages_per_level: dict[CacheLevel, int] = field(default_factory=dict)
    estimate: TransferEstimate | None = None


@dataclass(frozen=True)
class PathEstimate:
    """What moving pages from ``src`` to ``dst`` costs: ``latency_s + nbytes / bytes_per_s`` per transfer.

    ``measured`` is False while the numbers are the built-in priors (no batch on this path settled yet).
    ``samples``: batches that updated the estimate; ``bandwidth_samples``: those of them large enough (byte
    time at least the fixed latency) to move ``bytes_per_s``; the others, small ones, moved ``latency_s``."""

    src: CacheLevel
    dst: CacheLevel
    bytes_per_s: float
    latency_s: float
    samples: int = 0
    bandwidth_samples: int = 0

    @property
    def measured(self) -> bool:
        return self.samples > 0

    def seconds(self, nbytes: int) -> float:
        """Predicted seconds to move ``nbytes`` on this path alone."""
        return self.latency_s + nbytes / self.bytes_per_s


@dataclass(frozen=True)
class PathCost:
    """One hop of a :class:`TransferEstimate`: the pages and bytes it moves, the bytes already queued on it
    (in-flight batches, moved first), and its predicted seconds (``latency_s + (bytes + queued_bytes) / bw``)."""

    src: CacheLevel
    dst: CacheLevel
    pages: int
    bytes: int
    queued_bytes: int
    seconds: float
    estimate: PathEstimate


@dataclass(frozen=True)
class TransferEstimate:
    """Predicted time to bring pages to ``target``: ``seconds`` (0 when nothing has to move), the ``pages`` and
    ``bytes`` that move (each page once, whatever its hops), and the per-hop breakdown ``paths`` keyed by
    (src, dst)."""

    target: CacheLevel
    seconds: float
    pages: int
    bytes: int
    paths: dict[tuple[CacheLevel, CacheLevel], PathCost] = field(default_factory=dict)


class Stats(TypedDict, total=False):
    """The counters of ``mgr.stats()``, all ints and monotonic. Keys exist for the configured levels only
    (``bytes_<src>_to_<dst>`` / ``pages_<src>_to_<dst>`` for every pair, ``evictions_<level>``), the rest
    always (the ``remote_*`` ones with a remote tier). ``total=False``: which level pairs exist depends on
    the config, so read a pair's key with ``.get(key, 0)`` when the config may not have it."""

    bytes_device_to_host: int
    pages_device_to_host: int
    bytes_device_to_disk: int
    pages_device_to_disk: int
    bytes_device_to_remote: int
    pages_device_to_remote: int
    bytes_host_to_device: int
    pages_host_to_device: int
    bytes_host_to_disk: int
    pages_host_to_disk: int
    bytes_host_to_remote: int
    pages_host_to_remote: int
    bytes_disk_to_device: int
    pages_disk_to_device: int
    bytes_disk_to_host: int
    pages_disk_to_host: int
    bytes_disk_to_remote: int
    pages_disk_to_remote: int
    bytes_remote_to_device: int
    pages_remote_to_device: int
    bytes_remote_to_host: int
    pages_remote_to_host: int
    bytes_remote_to_disk: int
    pages_remote_to_disk: int
    evictions_device: int
    evictions_host: int
    evictions_disk: int
    relocations_device: int
    relocations_host: int
    relocations_disk: int
    drops: int
    prefetches: int
    prefix_hit_tokens: int
    io_errors: int
    corrupt_pages: int
    room_waits: int
    background_demotions: int
    remote_hits: int
    remote_misses: int
    remote_errors: int
    remote_corrupt: int
    remote_write_dropped: int
    remote_write_skipped: int
    remote_timeouts: int
    remote_breaker_opened: int
