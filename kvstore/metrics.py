"""Prometheus metrics of kvstore managers (needs the ``metrics`` extra: ``prometheus-client``).

::

    import kvstore.metrics, prometheus_client
    kvstore.metrics.register(mgr)             # prometheus_client's default registry
    prometheus_client.start_http_server(9400) # the usual way to serve it

One collector per registry serves every manager registered in it (each series carries the manager's
``namespace`` label). It reads ``mgr.stats()``, ``mgr.usage(level)`` and ``mgr.timings`` at scrape time:

- counters ``kvstore_bytes_moved_total{src,dst}``, ``kvstore_pages_moved_total{src,dst}``,
  ``kvstore_evictions_total{level}``, ``kvstore_relocations_total{level}`` and ``kvstore_<key>_total``
  for every other ``stats()`` key (``drops``, ``prefetches``, ``prefix_hit_tokens``, ``io_errors``,
  ``corrupt_pages``, ``room_waits``, ``background_demotions``, the remote tier's ``remote_*``, ...);
- gauges per tier ``kvstore_tier_{total,used,evictable,free}_pages{level}`` and
  ``kvstore_tier_{quota,used}_bytes{level}``;
- histograms (seconds) ``kvstore_resume_seconds``, ``kvstore_prefetch_seconds``,
  ``kvstore_fetch_prefix_seconds``, ``kvstore_room_wait_seconds`` and ``kvstore_io_seconds{op}``
  (:mod:`kvstore.telemetry`).

A scrape usually runs on prometheus-client's HTTP thread, while a manager's state belongs to its event
loop thread: the collector then reads it on the loop (``call_soon_threadsafe``), waiting at most
``timeout_s``; a loop that does not answer in time (stalled, or stopped) gets its last snapshot served
again. The loop never waits for a scrape.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "kvstore.metrics needs prometheus-client: pip install 'kvstore-llm[metrics]' "
        "(or pip install -e '.[metrics]' in a checkout)"
    ) from exc

from .errors import InvalidArgumentError
from .telemetry import Histogram
from .types import CacheLevel, TierUsage

if TYPE_CHECKING:
    from .manager import KVCacheManager

__all__ = ["KVStoreCollector", "register"]

_PAIR = re.compile(r"(bytes|pages)_([a-z]+)_to_([a-z]+)")
_PER_LEVEL = re.compile(r"(evictions|relocations)_([a-z]+)")
_HIST_DOC = {
    "resume": "Latency of cache.resume() calls that returned (joining a prefetch included)",
    "prefetch": "Duration of prefetches that ended with a result (PrefetchResult.seconds)",
    "fetch_prefix": "Latency of mgr.fetch_prefix() (remote tier)",
    "room_wait": "Time a resume or resize waited for room held by operations in flight",
}


@dataclass
class _Snapshot:
    namespace: str
    stats: dict[str, float]
    usage: list[TierUsage]
    page_bytes: int
    histograms: dict[str, Histogram] = field(default_factory=dict)


def _snapshot(mgr: "KVCacheManager") -> _Snapshot:
    """Everything a scrape reports, read at once (on the manager's loop thread)."""
    levels = list(mgr.config.levels)
    return _Snapshot(
        namespace=mgr.config.namespace,
        stats={k: float(v) for k, v in mgr.stats().items() if isinstance(v, int)},  # all of them (kvstore.Stats)
        usage=[mgr.usage(level) for level in levels],
        page_bytes=mgr.layout.page_bytes,
        histograms=mgr.timings.snapshot(),
    )


class _Watched:
    """A registered manager, the loop it runs on and its last snapshot."""

    def __init__(self, mgr: "KVCacheManager", loop: Optional[asyncio.AbstractEventLoop]) -> None:
        self.ref = weakref.ref(mgr)
        self.loop = loop
        self.thread: Optional[int] = threading.get_ident() if loop is not None else None
        self.last: Optional[_Snapshot] = None

    def read(self, timeout_s: float) -> Optional[_Snapshot]:
        mgr = self.ref()
        if mgr is None:
            return None
        loop = self.loop
        if loop is None or threading.get_ident() == self.thread or loop.is_closed() or not loop.is_running():
            self.last = _snapshot(mgr)  # the loop's own thread, or no loop left to race with
            return self.last
        fut: concurrent.futures.Future[_Snapshot] = concurrent.futures.Future()

        def take() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(_snapshot(mgr))
                except BaseException as exc:  # pragma: no cover - a bug in a query: surface it to the scrape
                    fut.set_exception(exc)

        try:
            loop.call_soon_threadsafe(take)
            self.last = fut.result(timeout_s)
        except (concurrent.futures.TimeoutError, RuntimeError):
            fut.cancel()  # a stalled or closing loop: serve the last snapshot
        return self.last


class KVStoreCollector(Collector):
    """Exports every registered manager's counters, tier gauges and latency histograms."""

    def __init__(self, timeout_s: float = 1.0) -> None:
        self.timeout_s = timeout_s
        self._watched: list[_Watched] = []
        self._lock = threading.Lock()

    def add(self, mgr: "KVCacheManager") -> None:
        """Also export ``mgr`` (call from its event loop thread, or before its loop runs)."""
        try:
            loop: Optional[asyncio.AbstractEventLoop] = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._watched = [w for w in self._watched if w.ref() is not None and w.ref() is not mgr]
            self._watched.append(_Watched(mgr, loop))

    def remove(self, mgr: "KVCacheManager") -> None:
        with self._lock:
            self._watched = [w for w in self._watched if w.ref() is not None and w.ref() is not mgr]

    def describe(self) -> Iterator[Metric]:
        return iter(())  # series vary with the managers registered: nothing to check up front

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            watched = list(self._watched)
        snaps = [s for s in (w.read(self.timeout_s) for w in watched) if s is not None]
        yield from _families(snaps)


def _families(snaps: list[_Snapshot]) -> Iterator[Metric]:
    ns = ["namespace"]
    moved = {
        "bytes": CounterMetricFamily("kvstore_bytes_moved", "Bytes moved between levels", labels=ns + ["src", "dst"]),
        "pages": CounterMetricFamily("kvstore_pages_moved", "Pages moved between levels", labels=ns + ["src", "dst"]),
    }
    per_level = {
        "evictions": CounterMetricFamily("kvstore_evictions", "Pages evicted from a level", labels=ns + ["level"]),
        "relocations": CounterMetricFamily("kvstore_relocations", "Pages moved within a level by a quota shrink",
                                           labels=ns + ["level"]),
    }
    other: dict[str, CounterMetricFamily] = {}
    gauges = {
        name: GaugeMetricFamily(f"kvstore_tier_{name}", doc, labels=ns + ["level"])
        for name, doc in (
            ("total_pages", "Quota of the level in pages"),
            ("used_pages", "Slots of the level holding a page (in-flight destinations included)"),
            ("evictable_pages", "Pages of the level that may be evicted now"),
            ("free_pages", "Free slots of the level"),
            ("quota_bytes", "Quota of the level in bytes"),
            ("used_bytes", "Bytes of the level's slots holding a page"),
        )
    }
    hists = {name: HistogramMetricFamily(f"kvstore_{name}_seconds", doc, labels=ns) for name, doc in _HIST_DOC.items()}
    io = HistogramMetricFamily("kvstore_io_seconds", "One disk I/O request, submission to completion (checksums included)",
                               labels=ns + ["op"])
    for s in snaps:
        for key, value in sorted(s.stats.items()):
            if m := _PAIR.fullmatch(key):
                moved[m[1]].add_metric([s.namespace, m[2], m[3]], value)
            elif m := _PER_LEVEL.fullmatch(key):
                per_level[m[1]].add_metric([s.namespace, m[2]], value)
            else:
                if key not in other:
                    other[key] = CounterMetricFamily(f"kvstore_{key}", f"kvstore stats()[{key!r}]", labels=ns)
                other[key].add_metric([s.namespace], value)
        for u in s.usage:
            lv = [s.namespace, CacheLevel(u.level).label]
            gauges["total_pages"].add_metric(lv, u.total_pages)
            gauges["used_pages"].add_metric(lv, u.used_pages)
            gauges["evictable_pages"].add_metric(lv, u.evictable_pages)
            gauges["free_pages"].add_metric(lv, u.free_pages)
            gauges["quota_bytes"].add_metric(lv, u.total_pages * s.page_bytes)
            gauges["used_bytes"].add_metric(lv, u.used_pages * s.page_bytes)
        for name, h in s.histograms.items():
            if name.startswith("io_"):
                io.add_metric([s.namespace, name[3:]], h.cumulative(), h.total)
            elif name in hists:
                hists[name].add_metric([s.namespace], h.cumulative(), h.total)
    yield from moved.values()
    yield from per_level.values()
    yield from (other[k] for k in sorted(other))
    yield from gauges.values()
    yield from hists.values()
    yield io


_COLLECTORS: "weakref.WeakKeyDictionary[Any, KVStoreCollector]" = weakref.WeakKeyDictionary()
_COLLECTORS_LOCK = threading.Lock()


def register(mgr: "KVCacheManager", registry: Optional[CollectorRegistry] = None) -> KVStoreCollector:
    """Export ``mgr``'s metrics through ``registry`` (prometheus-client's default ``REGISTRY`` when None) and
    return the collector. One collector serves all managers registered in the same registry (so two
    managers never clash on metric names); call it from the manager's event loop thread."""
    from .manager import KVCacheManager

    if not isinstance(mgr, KVCacheManager):
        raise InvalidArgumentError(f"kvstore.metrics.register() needs a KVCacheManager, got {type(mgr).__name__}")
    registry = REGISTRY if registry is None else registry
    with _COLLECTORS_LOCK:
        collector = _COLLECTORS.get(registry)
        if collector is None:
            collector = _COLLECTORS[registry] = KVStoreCollector()
            collector.add(mgr)
            registry.register(collector)
            return collector
    collector.add(mgr)
    return collector
