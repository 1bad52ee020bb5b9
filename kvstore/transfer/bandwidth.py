"""Measured transfer speed per path (src level -> dst level) and the time a set of moves should take.

Owns the moving estimates behind ``mgr.bandwidth_estimates`` and ``mgr.transfer_estimate()``. The executor
calls :meth:`Bandwidth.begin` / :meth:`Bandwidth.end` once per transfer batch (never per page); the remote
reader does the same per chunk of GETs. Everything here is synchronous bookkeeping on the loop thread.

The model of one path is ``seconds = latency_s + nbytes / bytes_per_s``, fitted robustly: each settled batch
informs the one parameter its time is sensitive to, judged by the estimates so far.

- A *latency-bound* batch (byte time below ``latency_s``: a few small pages) that ran alone on its path
  (nothing else started or in flight meanwhile) moves ``latency_s``: an EWMA of ``elapsed - nbytes /
  bytes_per_s``, clamped to ``[0, elapsed]``. Overlapped small batches record nothing.
- A *bandwidth-bound* batch moves ``bytes_per_s``: the ratio of exponentially decayed sums of bytes and of
  the *busy time* attributed to each batch, which is the time since the previous completion on the path (or
  since the path became busy), less ``latency_s`` once per busy period. Batches overlap (several are in
  flight on one path), so a batch's own elapsed time would under-count the path's throughput by the
  overlap; busy time does not.

A batch that fails or never starts (stopped, cancelled before it began) records nothing. Before any sample
the priors below hold (DESIGN.md's measured hardware limits, rounded down).

Disk reads have two meters per path: reads the OS page cache serves (a memory copy) and cold ones (the device).
:meth:`Bandwidth.begin` files a disk-read batch under one of them by probing its source slots
(:class:`~kvstore.transfer.residency.Residency`, set by the manager as :attr:`Bandwidth.residency`), and
:func:`estimate_moves` prices the cached share of a set of disk pages (``disk_cached``) on the cached meter.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Mapping, NamedTuple, Optional

import numpy as np

from ..types import CacheLevel, PathCost, PathEstimate, TransferEstimate

D, H, K, R = CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK, CacheLevel.REMOTE

Path = tuple[CacheLevel, CacheLevel]

#: pinned host <-> HBM over PCIe Gen5 x16 (55.4 GB/s measured one way; DESIGN.md)
CUDA_COPY_BYTES_PER_S = 50e9
CUDA_COPY_LATENCY_S = 50e-6
#: a CPU "device" tier: memcpy between two host arenas (a few GB/s on the 2-core CI machine)
CPU_COPY_BYTES_PER_S = 4e9
CPU_COPY_LATENCY_S = 50e-6
#: disk reads, cold (1.5-1.8 GB/s preadv on the GPU machine, 0.7-2.7 on the CI machine) and writes (1.2-1.9)
DISK_READ_BYTES_PER_S = 1.5e9
DISK_WRITE_BYTES_PER_S = 1.2e9
DISK_LATENCY_S = 200e-6
#: disk reads the page cache serves: a kernel copy into the staging buffers. The H200 runs' warm reads took
#: 9-16 GB/s over the host row's time (docs/serving_benchmarks.md, 1b and 8b at 32k tokens)
PAGE_CACHE_READ_BYTES_PER_S = 8e9
PAGE_CACHE_LATENCY_S = 50e-6
#: share of a batch's probed OS pages in the page cache from which its read counts as a cached one
CACHED_FROM = 0.5
#: remote GETs (warm loopback Redis pipelines 0.3-1.05 GB/s) and their round trip
REMOTE_BYTES_PER_S = 0.3e9
REMOTE_LATENCY_S = 1e-3

#: weight of the newest latency sample; decay of the older bandwidth sums per sample
LATENCY_ALPHA = 0.2
BANDWIDTH_DECAY = 0.8

#: the local paths a plan can move pages along (every ordered pair of levels) and the remote fetch path
LOCAL_PATHS: tuple[Path, ...] = tuple((a, b) for a in (D, H, K) for b in (D, H, K) if a != b)
REMOTE_PATH: Path = (R, H)


def _chain(parts: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """(bytes/s, latency) of hops run as a pipeline: the slowest hop's rate, every hop's latency once."""
    rates, lats = zip(*parts)
    return min(rates), sum(lats)


def cached_read_priors(cuda: bool) -> dict[Path, tuple[float, float]]:
    """(bytes/s, latency) of disk reads the page cache serves, per read path, before anything was measured."""
    mem = (CUDA_COPY_BYTES_PER_S, CUDA_COPY_LATENCY_S) if cuda else (CPU_COPY_BYTES_PER_S, CPU_COPY_LATENCY_S)
    cached = (PAGE_CACHE_READ_BYTES_PER_S, PAGE_CACHE_LATENCY_S)
    return {(K, H): cached, (K, D): _chain([cached, mem]) if cuda else cached}


def priors(cuda: bool) -> dict[Path, tuple[float, float]]:
    """(bytes/s, latency) per path before anything was measured. Disk <-> device on CUDA crosses pinned
    staging (a disk hop and a PCIe hop, pipelined); on a CPU device it is one disk read or write."""
    mem = (CUDA_COPY_BYTES_PER_S, CUDA_COPY_LATENCY_S) if cuda else (CPU_COPY_BYTES_PER_S, CPU_COPY_LATENCY_S)
    read, write = (DISK_READ_BYTES_PER_S, DISK_LATENCY_S), (DISK_WRITE_BYTES_PER_S, DISK_LATENCY_S)
    return {
        (D, H): mem, (H, D): mem, (K, H): read, (H, K): write,
        (K, D): _chain([read, mem]) if cuda else read,
        (D, K): _chain([mem, write]) if cuda else write,
        REMOTE_PATH: (REMOTE_BYTES_PER_S, REMOTE_LATENCY_S),
    }


class Ticket(NamedTuple):
    """A batch in flight on a path: when it started and what the path looked like then."""

    path: Path
    started: float
    starts: int  # the path's start count before this batch
    idle: bool  # nothing else was in flight on the path when it started
    cached: bool = False  # a disk read the page cache served (its own meter)


class PathMeter:
    """The moving estimate of one path (see the module docstring)."""

    def __init__(self, path: Path, bytes_per_s: float, latency_s: float) -> None:
        self.path = path
        self.bytes_per_s = bytes_per_s
        self.latency_s = latency_s
        self.samples = 0
        self.bandwidth_samples = 0
        self.active = 0  # batches in flight on this path
        self._starts = 0
        self._mark = 0.0  # end of the busy time already attributed to a batch
        self._fresh = False  # no batch completed yet in the current busy period
        self._sum_bytes = 0.0
        self._sum_s = 0.0

    def begin(self, now: float) -> Ticket:
        ticket = Ticket(self.path, now, self._starts, self.active == 0)
        if self.active == 0:
            self._mark, self._fresh = now, True
        self.active += 1
        self._starts += 1
        return ticket

    def end(self, ticket: Ticket, nbytes: int, now: float, ok: bool) -> None:
        """Settle a batch begun with ``ticket``: ``ok`` with ``nbytes`` moved, else it records nothing (its busy
        time is given to no batch)."""
        self.active -= 1
        share = now - self._mark
        self._mark = now
        if not ok or nbytes <= 0:
            return
        first, self._fresh = self._fresh, False
        elapsed = now - ticket.started
        byte_time = nbytes / self.bytes_per_s
        if byte_time < self.latency_s:  # latency-bound: says how long the fixed part takes, not the bandwidth
            if not (ticket.idle and self.active == 0 and self._starts == ticket.starts + 1) or elapsed <= 0:
                return  # overlapped: its elapsed time is not its own
            lat = min(max(elapsed - byte_time, 0.0), elapsed)
            first_lat = self.samples == self.bandwidth_samples  # no latency sample yet: the prior goes
            self.latency_s = lat if first_lat else self.latency_s + LATENCY_ALPHA * (lat - self.latency_s)
        else:
            busy = share - (self.latency_s if first else 0.0)
            if busy <= 0:
                return
            self._sum_bytes = BANDWIDTH_DECAY * self._sum_bytes + nbytes
            self._sum_s = BANDWIDTH_DECAY * self._sum_s + busy
            self.bytes_per_s = self._sum_bytes / self._sum_s
            self.bandwidth_samples += 1
        self.samples += 1

    def estimate(self) -> PathEstimate:
        src, dst = self.path
        return PathEstimate(src, dst, self.bytes_per_s, self.latency_s, self.samples, self.bandwidth_samples)


class Bandwidth:
    """The meters of every path of one manager (all local pairs and the remote fetch path, configured or not:
    an unconfigured path is never recorded and keeps its prior)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.meters = {p: PathMeter(p, bw, lat) for p, (bw, lat) in priors(cuda).items()}
        self.cached_meters = {p: PathMeter(p, bw, lat) for p, (bw, lat) in cached_read_priors(cuda).items()}
        #: fraction of the page cache holding the given disk slots (None: unknown); None without a disk tier
        self.residency: Optional[Callable[[np.ndarray], Optional[float]]] = None

    def cached_share(self, disk_slots: np.ndarray) -> Optional[float]:
        """The share of ``disk_slots``' bytes in the page cache (probed), or None when it cannot be told."""
        return self.residency(disk_slots) if self.residency is not None and len(disk_slots) else None

    def begin(self, src: CacheLevel, dst: CacheLevel, src_slots: Optional[np.ndarray] = None) -> Ticket:
        """Start timing a batch; a disk read with its ``src_slots`` is filed as cached or cold by a probe."""
        now = time.perf_counter()
        if src == K and (src, dst) in self.cached_meters and src_slots is not None:
            share = self.cached_share(src_slots)
            if share is not None and share >= CACHED_FROM:
                return self.cached_meters[(src, dst)].begin(now)._replace(cached=True)
        return self.meters[(src, dst)].begin(now)

    def end(self, ticket: Ticket, nbytes: int, ok: bool = True) -> None:
        meters = self.cached_meters if ticket.cached else self.meters
        meters[ticket.path].end(ticket, nbytes, time.perf_counter(), ok)

    def estimate(self, path: Path, cached: bool = False) -> PathEstimate:
        """The estimate of ``path`` (``cached``: of its reads the page cache serves, for a disk read path);
        disk <-> device on CUDA, while unmeasured itself, is the pipeline of its two hops (disk <-> host and
        host <-> device) as measured so far."""
        meters = self.cached_meters if cached else self.meters
        meter = meters[path]
        if meter.samples == 0 and self.cuda and path in ((K, D), (D, K)):
            if path == (K, D):  # a cached read's first hop is the cached disk -> host read
                hops = [meters[(K, H)], self.meters[(H, D)]]
            else:
                hops = [self.meters[(D, H)], self.meters[(H, K)]]
            bw, lat = _chain((m.bytes_per_s, m.latency_s) for m in hops)
            return PathEstimate(path[0], path[1], bw, lat)
        return meter.estimate()


def route(src: CacheLevel, target: CacheLevel) -> tuple[Path, ...]:
    """The hops pages at ``src`` take to ``target``. A plan moves a local page in one move straight to its
    destination (disk -> device included: staged through pinned memory inside the batch on CUDA); remote
    pages arrive through host memory (``fetch_prefix``), then cross to the device."""
    if src != R:
        return ((src, target),)
    return (REMOTE_PATH,) if target == H else (REMOTE_PATH, (H, D))


def estimate_moves(
    counts: Mapping[CacheLevel, int], target: CacheLevel, page_bytes: int, bandwidth: Bandwidth,
    queued: Optional[Mapping[Path, int]] = None, disk_cached: int = 0,
) -> TransferEstimate:
    """Predicted time to bring ``counts`` pages (per source level, already checked) to ``target``.

    Pages at ``target`` or hotter cost nothing. Each source level's pages follow :func:`route`; pages sharing
    a hop share its bytes. A route's hops run as a pipeline (batch i+1 is read while batch i crosses the
    next hop), so a route takes every hop's fixed latency once plus the byte time of its slowest hop; routes
    from different levels run concurrently (separate batches of one plan), so the whole takes the slowest
    route: ``max over routes of (sum of hop latencies + max over hops of (bytes + queued) / bytes_per_s)``.
    ``queued``: bytes of batches in flight per path, which go first on the hops they share. ``disk_cached``: how
    many of the DISK pages the page cache holds; their bytes cross the disk hop at its cached-read rate (the
    hop's :class:`PathCost` then carries the blended rate of this move).
    """
    queued = queued or {}
    hops: dict[Path, int] = {}  # pages per hop
    routes: list[tuple[Path, ...]] = []
    moving = 0
    for level, n in counts.items():
        if n <= 0 or level <= target:
            continue
        moving += n
        r = route(level, target)
        routes.append(r)
        for p in r:
            hops[p] = hops.get(p, 0) + n
    paths: dict[Path, PathCost] = {}
    for p, pages in hops.items():
        est = bandwidth.estimate(p)
        nbytes, q = pages * page_bytes, int(queued.get(p, 0))
        hot = min(max(disk_cached, 0), pages) if p[0] == K and p in bandwidth.cached_meters else 0
        if hot:  # the cached pages at the cached rate, the rest (and the queue) at the cold one
            fast = bandwidth.estimate(p, cached=True)
            byte_s = (nbytes - hot * page_bytes + q) / est.bytes_per_s + hot * page_bytes / fast.bytes_per_s
            lat = est.latency_s if hot < pages else fast.latency_s
            est = PathEstimate(p[0], p[1], (nbytes + q) / byte_s, lat, est.samples + fast.samples,
                               est.bandwidth_samples + fast.bandwidth_samples)
        paths[p] = PathCost(p[0], p[1], pages, nbytes, q, est.seconds(nbytes + q), est)
    seconds = 0.0
    for r in routes:
        lat = sum(paths[p].estimate.latency_s for p in r)
        byte_time = max((paths[p].bytes + paths[p].queued_bytes) / paths[p].estimate.bytes_per_s for p in r)
        seconds = max(seconds, lat + byte_time)
    return TransferEstimate(target, seconds, moving, moving * page_bytes, paths)
