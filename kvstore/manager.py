"""KVCacheManager: joins placement (what goes where) and transfer (moving the bytes) behind the public API.

Every operation plans synchronously in :class:`~kvstore.placement.Placement`, runs the plan on the
:class:`~kvstore.transfer.executor.TransferExecutor`, and settles each move when its batch ends.
Operations that move pages hold the manager's gate shared; ``set_quota`` and ``aclose`` hold it
exclusively, so a quota change never races a transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable, Mapping, Optional, Sequence, Union, cast

import numpy as np
import torch

from . import resources
from ._aio import Gate, settle, wait_through
from ._args import describe, integral, seconds
from .cache import KVCache, PrefetchTask
from .config import DeviceTier, DiskTier, HostTier, StoreConfig
from .errors import (
    CapacityError, ConfigError, InvalidArgumentError, InvalidStateError, KVStoreError, StorageIOError,
)
from .operations import Ledger, Operation
from .persistence import DiskCatalog, Record
from .telemetry import Timings, instrument_io
from .placement import Page, PageList, Placement, Plan, RoomCheck
from .placement.pagelist import as_page_list
from .placement.prefix import PrefixHasher, as_token_array
from .transfer.arenas import DeviceArena, HostArena, StagingPool
from .transfer.bandwidth import LOCAL_PATHS, REMOTE_PATH, Bandwidth, estimate_moves
from .transfer.copier import Copier
from .transfer.diskfile import DiskSlotFile, slot_stride
from .transfer.executor import RunResult, TransferExecutor
from .transfer.io_backends import IOBackend, KvikioBackend, PosixBackend, choose_backend
from .transfer.residency import Residency
from .transfer.scheduler import BACKGROUND, PREFETCH, RESUME
from .types import (
    CacheLevel, CacheStatus, PathEstimate, PrefetchResult, PrefixMatch, Stats, TierUsage, TransferEstimate,
)

if TYPE_CHECKING:
    from .remote.engine import RemoteEngine

log = logging.getLogger("kvstore")

_NEW, _RUNNING, _CLOSING, _CLOSED = "new", "running", "closing", "closed"

#: What :meth:`KVCacheManager._build_store` makes for a level: a device pool, host chunks (see
#: ``HostArena.prepare``), or nothing (the disk file is resized in place).
_Prepared = Union[torch.Tensor, list[torch.Tensor], None]

#: Pages planned per synchronous step of a resume or prefetch (bounds event-loop stalls; the next chunk
#: is planned while the previous one's transfers run): the first step plans PLAN_CHUNK pages, each next
#: one as many as fit in PLAN_STEP_S at the pace the last step measured, between PLAN_CHUNK and
#: PLAN_CHUNK_MAX. Every step costs a fixed amount of loop CPU (a plan, its batches and futures), so small
#: pages, which plan fast, go in bigger steps.
PLAN_CHUNK = 512
PLAN_CHUNK_MAX = 8192
PLAN_STEP_S = 0.0005


def _uncancel(times: int) -> None:
    """Withdraw ``times`` cancellation requests of the current task that were handled (Python >= 3.11)."""
    task = asyncio.current_task()
    for _ in range(times):
        if task is None or not hasattr(task, "uncancel"):
            return
        task.uncancel()


class KVCacheManager:
    """Owns the tiers and every cache. ``async with KVCacheManager(config) as mgr: ...``"""

    def __init__(self, config: StoreConfig) -> None:
        if not isinstance(config, StoreConfig):
            raise ConfigError(f"KVCacheManager needs a StoreConfig, got {type(config).__name__}")
        self.config = config
        self.layout = config.layout
        self._page_bytes = config.layout.page_bytes
        self._slots = {lvl: config.slots(lvl) for lvl in config.levels}
        self._check_machine()  # before the slot allocators: a quota this machine can never hold fails fast
        self._placement = Placement(
            config.levels, [self._slots[l] for l in config.levels], policy=config.eviction_policy
        )
        self._hasher = PrefixHasher(config.namespace, config.layout.fingerprint(), config.layout.tokens_per_page)
        self._stats: Counter[str] = Counter()
        #: measured speed per path (transfer batches and remote GETs record into it; kept across start/close)
        self._bandwidth = Bandwidth(cast(DeviceTier, config.tiers[0]).resolved_device().type == "cuda")
        self.timings = Timings()  # latency histograms for kvstore.metrics (one observation per operation)
        self._caches: set[KVCache] = set()
        self._gate = Gate()
        self._plan_lock = asyncio.Lock()
        self._ledger = Ledger(self._placement)
        self._store_tasks: set[asyncio.Future[object]] = set()  # memory and disk space being given back after a shrink
        self._state = _NEW
        self._closed = asyncio.Event()
        self._device: Optional[DeviceArena] = None
        self._host: Optional[HostArena] = None
        self._disk: Optional[DiskSlotFile] = None
        self._io: Optional[IOBackend] = None
        self._copier: Optional[Copier] = None
        self._executor: Optional[TransferExecutor] = None
        self.io_backend: Optional[str] = None  # "kvikio" or "posix" once started with a disk tier
        self._catalog: Optional[DiskCatalog] = None  # a persistent disk tier's lock, fingerprint and journal
        self._demoter: Optional[asyncio.Task[None]] = None  # keeps StoreConfig.free_target free (when > 0)
        self._remote: Optional["RemoteEngine"] = None  # the shared remote tier when configured

    # ------------------------------------------------------------------ start / close
    async def __aenter__(self) -> "KVCacheManager":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Allocate the arenas and the disk file and pick the disk I/O backend (off the event loop)."""
        if self._state == _RUNNING:
            return
        if self._state != _NEW:
            raise InvalidStateError("this manager was closed; create a new KVCacheManager")
        cfg = self.config
        device = cast(DeviceTier, cfg.tiers[0]).resolved_device()  # StoreConfig checks tiers[0] is a DeviceTier
        pinned = False
        host_cfg = next((t for t in cfg.tiers if isinstance(t, HostTier)), None)
        disk_cfg = next((t for t in cfg.tiers if isinstance(t, DiskTier)), None)
        if host_cfg is not None:
            pinned = host_cfg.resolved_pinned()
        else:
            pinned = device.type == "cuda"
        try:
            self._check_available(device)
            self._device = await asyncio.to_thread(
                DeviceArena, self._slots[CacheLevel.DEVICE], self.layout.page_shape, self.layout.dtype, device
            )
            if host_cfg is not None:
                self._host = HostArena(self._page_bytes, pinned)
                await asyncio.to_thread(self._host.allocate, self._slots[CacheLevel.HOST])
            recovered: dict[int, Record] = {}
            if disk_cfg is not None:
                recovered = await asyncio.to_thread(self._open_disk, Path(disk_cfg.path), disk_cfg.persistent)
            self._copier = await asyncio.to_thread(Copier, device)
            staging_rows = max(1, cfg.batch_bytes // self._page_bytes)
            staging = StagingPool(self._page_bytes, staging_rows, cfg.staging_buffers, pinned, cfg.swap_buffers)
            if pinned:  # pinned buffers made mid-serving would stall every CUDA call (StagingPool.prepare)
                await asyncio.to_thread(staging.prepare)
            self._executor = TransferExecutor(
                self._placement, self._device, self._host, self._disk, self._io, self._copier, staging,
                cfg.batch_bytes, self._stats, self._bandwidth,
            )
            self._placement.max_group = self._executor.batch_rows  # a move never spans batches
            if self._catalog is not None:
                # nothing else can touch placement before start() returns: rebuild it off the loop thread
                await asyncio.to_thread(self._restore, recovered)
                await self._catalog.start(self._disk_file.fd)
            if cfg.remote is not None:
                from .remote.engine import RemoteEngine

                self._remote = RemoteEngine(self, cfg.remote)
        except BaseException:
            if self._catalog is not None:
                self._catalog.release()
            await asyncio.to_thread(self._release)
            self._state = _CLOSED
            raise
        self._state = _RUNNING
        if self._remote is not None:
            self._remote.start()
        if cfg.free_target > 0 and len(cfg.levels) > 1:
            self._demoter = asyncio.ensure_future(self._demote_in_background())
        log.info(
            "kvstore started: device=%s (%d pages), host=%s, disk=%s, page=%d bytes",
            device, self._slots[CacheLevel.DEVICE], self._slots.get(CacheLevel.HOST, 0),
            self._slots.get(CacheLevel.DISK, 0), self._page_bytes,
        )

    def _memory_quotas(self, device: torch.device) -> tuple[int, int, str]:
        """(device tier bytes, host memory bytes, what holds them): a CPU device tier is host memory too."""
        pb = self._page_bytes
        dev_bytes = self._slots[CacheLevel.DEVICE] * pb
        host_bytes = self._slots.get(CacheLevel.HOST, 0) * pb
        if device.type == "cuda":
            return dev_bytes, host_bytes, "the host tier"
        return dev_bytes, host_bytes + dev_bytes, f"the device tier on {device} and the host tier"

    def _check_machine(self) -> None:
        """ConfigError when a quota exceeds what this machine has at all (memory, GPU memory, disk size)."""
        cfg, pb = self.config, self._page_bytes
        device = cast(DeviceTier, cfg.tiers[0]).resolved_device()  # StoreConfig checks tiers[0] is a DeviceTier
        dev_bytes, host_bytes, what = self._memory_quotas(device)
        resources.check_device_total(device, dev_bytes)
        if CacheLevel.HOST in self._slots or device.type == "cpu":
            resources.check_memory_total(what, host_bytes, "HostTier.quota_bytes / DeviceTier.quota_bytes")
        disk_cfg = next((t for t in cfg.tiers if isinstance(t, DiskTier)), None)
        if disk_cfg is not None:
            size = self._slots[CacheLevel.DISK] * slot_stride(pb)
            total = resources.disk_total(Path(disk_cfg.path))
            if total is not None and size > total:
                raise ConfigError(
                    f"DiskTier.quota_bytes={disk_cfg.quota_bytes} needs a slot file of {resources.fmt_bytes(size)} but "
                    f"the file system of {str(disk_cfg.path)!r} holds {resources.fmt_bytes(total)} in all; "
                    "lower DiskTier.quota_bytes or choose another DiskTier.path"
                )

    def _check_available(self, device: torch.device) -> None:
        """CapacityError when the device and host tiers do not fit in the memory available now (the disk
        tier's space is checked when its file is made)."""
        dev_bytes, host_bytes, what = self._memory_quotas(device)
        if device.type == "cuda":
            resources.check_device(device, dev_bytes)
        if host_bytes:
            resources.check_memory(what, host_bytes, "HostTier.quota_bytes / DeviceTier.quota_bytes")

    def _open_disk(self, directory: Path, persistent: bool) -> dict[int, Record]:
        """Open the slot file (and, when persistent, lock the directory and recover its journal). Blocking.

        A file system failure is a StorageIOError (errno kept) naming the path and the size."""
        try:
            return self._open_disk_files(directory, persistent)
        except StorageIOError:
            raise
        except OSError as exc:
            size = self._slots[CacheLevel.DISK] * slot_stride(self._page_bytes)
            raise resources.storage_error(
                f"opening the disk tier ({resources.fmt_bytes(size)})", exc.filename or directory, exc
            ) from exc

    def _open_disk_files(self, directory: Path, persistent: bool) -> dict[int, Record]:
        recovered: dict[int, Record] = {}
        if persistent:
            self._catalog = DiskCatalog(directory, {
                "page_bytes": self._page_bytes,
                "slot_stride": slot_stride(self._page_bytes),
                "layout": self.layout.fingerprint(),
                "hash_seed": self._hasher.seed.hex(),
            }, info=self._disk_info())
            recovered = self._catalog.open(self._slots[CacheLevel.DISK])
        self._disk = DiskSlotFile(directory, self._page_bytes, persistent)
        self._disk.open(self._slots[CacheLevel.DISK])
        probe = Residency(self._disk.fd, self._disk.stride, self._page_bytes)
        self._bandwidth.residency = probe.fraction if probe.available else None
        name, why = choose_backend(directory)
        if name == "kvikio":
            self._io = KvikioBackend(self._disk.path, self.config.resolved_io_threads())
        else:
            self._io = PosixBackend(self._disk.fd, self.config.resolved_io_threads())
        self.io_backend = name
        instrument_io(self._io, self.timings)
        log.info("kvstore disk tier %s: I/O backend %s (%s)", self._disk.path, name, why)
        return recovered

    def _disk_info(self) -> dict[str, object]:
        """What ``kvstore inspect`` shows about a persistent tier (kvstore.info; never read back)."""
        from . import __version__

        lay = self.layout
        return {"namespace": self.config.namespace, "num_layers": lay.num_layers, "num_kv_heads": lay.num_kv_heads,
                "head_dim": lay.head_dim, "tokens_per_page": lay.tokens_per_page, "dtype": str(lay.dtype),
                "eviction_policy": self.config.eviction_policy, "kvstore_version": __version__}

    def _restore(self, records: dict[int, Record]) -> None:
        """Index the committed pages a persistent disk tier recovered, then journal every later change."""
        pl = self._placement
        for slot in sorted(records):
            rec = records[slot]
            try:
                page = pl.restore_page(CacheLevel.DISK, slot, rec.key, rec.parent)
            except RuntimeError:
                continue  # a key recorded twice: keep the first
            self._started_executor.sums[slot] = (page.pid, rec.checksum)
        pl.disk_listener = self._journal
        self._started_executor.before_disk_write = self._disk_catalog.before_overwrite
        if records:
            log.info("kvstore disk tier: recovered %d committed pages", len(records))

    def _journal(self, op: str, page: Page, slot: int) -> None:
        if op == "del":
            self._disk_catalog.delete(slot)
            return
        record = self._started_executor.sums.get(slot)
        if record is None or record[0] != page.pid or page.key is None:  # (an indexed page has its key)
            return  # no checksum for these bytes: not journaled, a miss after a restart
        node = self._placement.index.node(page)
        self._disk_catalog.put(slot, page.key, node.parent_key if node is not None else None, record[1])

    def _release(self) -> None:
        """Free memory, threads and files (blocking; run on a worker thread)."""
        self._bandwidth.residency = None  # the slot file closes: never probe its number once reused
        for closer in (self._copier, self._io, self._disk):
            if closer is not None:
                closer.close()
        self._copier = self._io = self._disk = None
        self._device = self._host = None
        self._executor = None

    async def aclose(self) -> None:
        """Stop prefetches, let transfers settle, close every cache, release memory and files. Idempotent.

        From the moment it starts, every other call gets InvalidStateError; operations in flight stop at
        their next step (their transfers that started settle first)."""
        if self._state in (_CLOSED, _CLOSING):
            await self._closed.wait()
            return
        if self._state == _NEW:
            self._state = _CLOSED
            self._closed.set()
            return
        self._state = _CLOSING
        self._ledger.notify()  # operations waiting for room see the manager closing
        if self._demoter is not None:
            self._demoter.cancel()  # a demotion in flight settles its transfers first
            await asyncio.wait([self._demoter])
        if self._remote is not None:
            await self._remote.close()  # the writer gives its pages back; reads in flight become misses
        prefetches = [t for cache in list(self._caches) for t in list(cache._prefetches)]
        for task in prefetches:
            task.cancel()
        if prefetches:
            await asyncio.wait([t._task for t in prefetches])
        await self._gate.acquire_exclusive()
        try:
            for cache in list(self._caches):
                cache.close()
            await self._settle_store_tasks()
            if self._catalog is not None:
                await self._catalog.close()
            await asyncio.to_thread(self._release)
        finally:
            self._gate.release_exclusive()
            self._state = _CLOSED
            self._closed.set()

    def _check_running(self) -> None:
        if self._state == _RUNNING:
            return
        if self._state == _NEW:
            raise InvalidStateError("the manager is not started; use 'async with KVCacheManager(cfg)' or await start()")
        raise InvalidStateError(f"the manager is {self._state}; create a new KVCacheManager")

    def _missing(self, what: str) -> InvalidStateError:
        """The error for a part of the store that start() makes and aclose() releases, found missing: the
        manager's state error when it is not running (raised here), else ``what`` is not configured."""
        self._check_running()
        return InvalidStateError(f"this store has no {what}")

    @property
    def _device_arena(self) -> DeviceArena:
        if self._device is None:
            raise self._missing("device arena")
        return self._device

    @property
    def _host_arena(self) -> HostArena:
        if self._host is None:
            raise self._missing("host level")
        return self._host

    @property
    def _disk_file(self) -> DiskSlotFile:
        if self._disk is None:
            raise self._missing("disk level")
        return self._disk

    @property
    def _disk_catalog(self) -> DiskCatalog:
        if self._catalog is None:
            raise self._missing("persistent disk level")
        return self._catalog

    @property
    def _started_copier(self) -> Copier:
        if self._copier is None:
            raise self._missing("copier")
        return self._copier

    @property
    def _started_executor(self) -> TransferExecutor:
        if self._executor is None:
            raise self._missing("transfer executor")
        return self._executor

    @staticmethod
    def _timeout_arg(timeout_s: object, what: str) -> None:
        """InvalidArgumentError unless ``timeout_s`` is None or a number of seconds >= 0."""
        if timeout_s is not None and ((t := seconds(timeout_s)) is None or t < 0):
            raise InvalidArgumentError(f"{what} timeout_s must be a number of seconds >= 0 or None, got {timeout_s!r}")

    def _check_live(self, cache: Optional[KVCache], status: Optional[CacheStatus], what: str) -> None:
        """InvalidStateError unless the manager runs and ``cache`` (if any) is in ``status``."""
        if cache is None or status is None:  # a store-wide operation (no cache, no status)
            self._check_running()
        else:
            cache._require(status, what=what)

    @contextlib.asynccontextmanager
    async def _operation(
        self, kind: str, cache: Optional[KVCache], status: Optional[CacheStatus], what: str, exclusive: bool = False
    ) -> AsyncIterator[Operation]:
        """Run an operation: the gate held (shared, or exclusive for a quota change), the manager and the
        cache checked once it is held, the operation registered in the ledger until it ends."""
        if exclusive:
            await self._gate.acquire_exclusive()
        else:
            await self._gate.acquire_shared()
        op: Optional[Operation] = None
        try:
            self._check_live(cache, status, what)
            op = self._ledger.begin(kind, cache)
            yield op
        finally:
            if op is not None:
                self._ledger.end(op)
            if exclusive:
                self._gate.release_exclusive()
            else:
                self._gate.release_shared()

    def _level_arg(self, level: object, what: str) -> CacheLevel:
        if (index := integral(level)) is None:
            raise InvalidArgumentError(f"{what} must be a CacheLevel, got {describe(level)}")
        try:
            level = CacheLevel(index)
        except ValueError:
            raise InvalidArgumentError(f"{what} must be a CacheLevel (DEVICE, HOST, DISK), got {level!r}") from None
        if level == CacheLevel.REMOTE:
            raise InvalidArgumentError(
                f"{what}: the REMOTE level holds copies of committed pages, never a page's bytes; it is not a level "
                "to place, move or size pages at (use lookup_remote() and fetch_prefix())"
            )
        if level not in self.config.levels:
            raise InvalidArgumentError(
                f"{what}: level {level.name} is not configured; configured levels are "
                f"{[l.name for l in self.config.levels]}"
            )
        return level

    # ------------------------------------------------------------------ public queries
    @property
    def device_pool(self) -> torch.Tensor:
        """``(num_device_slots, *page_shape)``; read again after ``set_quota``."""
        self._check_running()
        return self._device_arena.pool

    def quota(self, level: CacheLevel) -> int:
        level = self._level_arg(level, "quota(level)")
        return self._placement.alloc[level].total * self._page_bytes

    def usage(self, level: CacheLevel) -> TierUsage:
        level = self._level_arg(level, "usage(level)")
        return self._placement.usage(level)

    @property
    def bandwidth_estimates(self) -> Mapping[tuple[CacheLevel, CacheLevel], PathEstimate]:
        """Read-only snapshot of the moving estimate of every path between configured levels, keyed by
        ``(src, dst)`` (``(REMOTE, HOST)`` too with a remote tier): ``latency_s + nbytes / bytes_per_s`` per
        transfer batch, measured from every batch that settled (``measured`` False: still the prior)."""
        levels = set(self.config.levels)
        paths = [p for p in LOCAL_PATHS if p[0] in levels and p[1] in levels]
        if self.config.remote is not None:
            paths.append(REMOTE_PATH)
        return MappingProxyType({p: self._bandwidth.estimate(p) for p in paths})

    @property
    def page_cache_read_estimates(self) -> Mapping[tuple[CacheLevel, CacheLevel], PathEstimate]:
        """Read-only snapshot of the estimates of disk reads that the OS page cache serves, keyed by ``(DISK,
        dst)`` (a disk tier only; empty without one). :attr:`bandwidth_estimates` has the cold reads: every
        disk-read batch is filed under one of the two by probing its pages (``mincore``) before the read."""
        levels = set(self.config.levels)
        paths = [p for p in self._bandwidth.cached_meters if p[0] in levels and p[1] in levels]
        return MappingProxyType({p: self._bandwidth.estimate(p, cached=True) for p in paths})

    def transfer_estimate(self, pages_per_level: Mapping[CacheLevel, int], target: CacheLevel) -> TransferEstimate:
        """Predicted seconds to bring ``pages_per_level`` (pages per level, as ``cache.page_levels()`` or a
        ``PrefixMatch`` gives them) to ``target``, from the measured path estimates; holds and moves nothing.

        Pages at ``target`` or hotter cost 0. A page takes the path a plan moves it along (local pages straight
        to ``target``, disk -> device included; REMOTE pages through host memory); bytes already queued on a
        path (batches in flight) go first. The hops of a route are pipelined and the routes of different
        levels run concurrently, so the estimate is the slowest route's fixed latencies plus the byte time of
        its slowest hop (:func:`kvstore.transfer.bandwidth.estimate_moves`). Bytes queued on paths this move
        does not use (a write-back contending for the same disk) are not counted. Counts do not say which disk
        pages the OS page cache holds, so DISK pages are priced as cold reads here;
        :meth:`prefix_transfer_estimate` and ``cache.transfer_estimate()`` know the pages and probe them.
        """
        target = self._level_arg(target, "transfer_estimate(target)")
        counts = self._counts_arg(pages_per_level, target, "transfer_estimate(pages_per_level)")
        return self._estimate(counts, target)

    def prefix_transfer_estimate(self, tokens: Sequence[int], target: CacheLevel) -> TransferEstimate:
        """:meth:`transfer_estimate` of the local reusable prefix of ``tokens`` (:meth:`lookup`), with its disk
        pages probed: those the OS page cache holds are priced at the cached-read rate."""
        target = self._level_arg(target, "prefix_transfer_estimate(target)")
        return cast(TransferEstimate, self.lookup(tokens, target).estimate)

    def _estimate(self, counts: Mapping[CacheLevel, int], target: CacheLevel,
                  pages: Optional[Sequence[Page]] = None) -> TransferEstimate:
        """``estimate_moves`` of ``counts``; with the ``pages`` counted, the share of their disk pages in the page
        cache (a probe of at most a few of them) is priced as cached reads."""
        queued = self._executor.queued if self._executor is not None else None
        cached = 0
        if pages is not None and counts.get(CacheLevel.DISK, 0) and target < CacheLevel.DISK:
            share = self._bandwidth.cached_share(self._placement.slots_at(pages, CacheLevel.DISK, settled=True))
            cached = round(share * counts[CacheLevel.DISK]) if share is not None else 0
        return estimate_moves(counts, target, self._page_bytes, self._bandwidth, queued, cached)

    def _counts_arg(self, counts: object, target: CacheLevel, what: str) -> dict[CacheLevel, int]:
        """``counts`` checked as {level: pages >= 0}: an unconfigured level (REMOTE without a remote tier) may only
        hold 0 pages, and REMOTE pages only reach HOST or DEVICE."""
        if not isinstance(counts, Mapping):
            raise InvalidArgumentError(f"{what} must be a mapping {{CacheLevel: pages}}, got {describe(counts)}")
        out: dict[CacheLevel, int] = {}
        for key, value in counts.items():
            index = integral(key)
            if index is None or index not in CacheLevel._value2member_map_:
                raise InvalidArgumentError(
                    f"{what} keys must be CacheLevel (DEVICE, HOST, DISK, REMOTE), got {describe(key)}"
                )
            level = CacheLevel(index)
            n = integral(value)
            if n is None or n < 0:
                raise InvalidArgumentError(f"{what}[{level.name}] must be a page count >= 0, got {describe(value)}")
            if n == 0:
                continue
            configured = self.config.remote is not None if level == CacheLevel.REMOTE else level in self.config.levels
            if not configured:
                raise InvalidArgumentError(
                    f"{what} has {n} pages at {level.name}, which is not configured here; configured levels are "
                    f"{[l.name for l in self.config.levels]}{' and REMOTE' if self.config.remote else ''}"
                )
            if level == CacheLevel.REMOTE and target == CacheLevel.DISK:
                raise InvalidArgumentError(
                    f"{what}: remote pages arrive at HOST or DEVICE (fetch_prefix), never DISK; estimate them for "
                    "target HOST"
                )
            out[level] = out.get(level, 0) + n
        return out

    def stats(self) -> Stats:
        """Monotonic counters (bytes/pages per level pair, evictions, drops, prefetches, hits, I/O errors)."""
        out: dict[str, int] = {}
        levels = self.config.levels
        for a in levels:
            out[f"evictions_{a.label}"] = 0
            for b in levels:
                if a != b:
                    out[f"bytes_{a.label}_to_{b.label}"] = 0
                    out[f"pages_{a.label}_to_{b.label}"] = 0
        for key in ("drops", "prefetches", "prefix_hit_tokens", "io_errors", "corrupt_pages", "room_waits",
                    "background_demotions"):
            out[key] = 0
        if self._remote is not None:
            out.update(self._remote.stats_keys(levels))
        out.update(self._stats)
        out.update(self._placement.counters)
        return cast(Stats, out)  # keys made per configured level; each one is declared in Stats

    def check_invariants(self) -> None:
        """Raise AssertionError naming the first broken invariant (slow; for tests and debugging).

        Holds at every await point: every owner count is a cache's page list or an operation's new pages,
        every lock an ACTIVE cache's, every hold an operation's in flight."""
        self._placement.check_invariants()
        holds, owners = self._ledger.counts()
        locks: Counter[int] = Counter()
        for cache in self._caches:
            for page in cache._pages:
                owners[page.pid] += 1
                if cache.status is CacheStatus.ACTIVE:
                    locks[page.pid] += 1
                    if page.level != CacheLevel.DEVICE:
                        raise AssertionError(f"ACTIVE cache holds page {page.pid} off the device level")
                if page.freed or page.level is None:
                    raise AssertionError(f"a cache holds {'freed' if page.freed else 'unplaced'} page {page.pid}")
        for page in self._placement.pages.values():
            if page.owners != owners[page.pid]:
                raise AssertionError(
                    f"page {page.pid} counts {page.owners} owners; caches and operations hold it {owners[page.pid]} times"
                )
            if page.locks != locks[page.pid]:
                raise AssertionError(f"page {page.pid} counts {page.locks} locks, ACTIVE caches hold {locks[page.pid]}")
            if page.holds != holds[page.pid]:
                raise AssertionError(
                    f"page {page.pid} counts {page.holds} holds, operations in flight hold it {holds[page.pid]} times"
                )

    # ------------------------------------------------------------------ prefix reuse
    def _match(self, tokens: np.ndarray) -> tuple[list[Page], Optional[bytes]]:
        """Pages of the longest committed prefix of ``tokens`` (any level) and the key of the last one."""
        return self._placement.index.match_tokens(self._hasher, tokens)

    def lookup(self, tokens: Sequence[int], target: Optional[CacheLevel] = None) -> PrefixMatch:
        """How much of ``tokens`` is reusable and where those pages are now; holds nothing. With ``target``,
        ``match.estimate`` is :meth:`prefix_transfer_estimate`'s, from the same one pass over the tokens."""
        if target is not None:
            target = self._level_arg(target, "lookup(target)")
        self._check_running()
        pages, _ = self._match(as_token_array(tokens))
        per_level = self._placement.per_level(pages)  # an indexed page is placed
        estimate = self._estimate(per_level, target, pages) if target is not None else None
        return PrefixMatch(len(pages) * self.layout.tokens_per_page, per_level, estimate)

    # ------------------------------------------------------------------ the shared remote tier
    async def flush(self, timeout_s: Optional[float] = None) -> None:
        """Wait until every page queued for the remote tier so far was written or given up (returns after
        ``timeout_s`` at most; the writer goes on). Nothing to wait for without a remote tier."""
        self._check_running()
        self._timeout_arg(timeout_s, "flush()")
        if self._remote is not None:
            await self._remote.flush(timeout_s)

    async def lookup_remote(self, tokens: Sequence[int]) -> PrefixMatch:
        """Like :meth:`lookup`, extended past the local prefix with the pages the remote holds
        (``pages_per_level[CacheLevel.REMOTE]``; 0 without a remote tier or when it fails). Holds nothing."""
        self._check_running()
        if self._remote is None:
            match = self.lookup(tokens)
            return PrefixMatch(match.num_tokens, {**match.pages_per_level, CacheLevel.REMOTE: 0})
        return await self._remote.lookup(tokens)

    async def fetch_prefix(
        self, tokens: Sequence[int], target: CacheLevel = CacheLevel.HOST, *, timeout_s: Optional[float] = None
    ) -> PrefetchResult:
        """Bring the pages of ``tokens``' committed prefix that the remote holds and this manager lacks into
        ``target`` (HOST or DEVICE) as reusable committed pages, in prefix order; stops at the first page
        the remote lacks and at ``timeout_s``. Remote failures are misses (``complete=False``)."""
        target = self._level_arg(target, "fetch_prefix(target)")
        self._check_running()
        self._timeout_arg(timeout_s, "fetch_prefix()")
        if self._remote is None:
            as_token_array(tokens)  # the same argument checks
            return PrefetchResult(True, 0, 0, 0.0)
        start = time.perf_counter()
        try:
            return await self._remote.fetch(tokens, target, timeout_s)
        finally:
            self.timings.since("fetch_prefix", start)  # kvstore.metrics: fetch_prefix latency

    def create_cache(self, tokens: Optional[Sequence[int]] = None, *, priority: int = 0) -> KVCache:
        """A new SUSPENDED cache; with ``tokens`` it holds the longest committed prefix (whole pages)."""
        self._check_running()
        if (prio := integral(priority)) is None:
            raise InvalidArgumentError(f"create_cache() priority must be an int, got {describe(priority)}")
        priority = prio
        arr = as_token_array(tokens) if tokens is not None else np.zeros(0, dtype=np.int64)
        pages, last_key = self._match(arr)
        self._placement.add_owners(pages, priority)
        self._placement.record_hits(pages[::-1])  # deepest first: a parent is never less recently reused than its child
        reused = len(pages) * self.layout.tokens_per_page
        self._stats["prefix_hit_tokens"] += reused
        listed = as_page_list(self._placement.table, pages).copy()
        cache = KVCache(self, listed, priority, arr[:reused].copy(), last_key)
        self._caches.add(cache)
        return cache

    def _commit_pages(
        self, pages: Sequence[Page], tokens: np.ndarray, first: int, stop: int, prev: Optional[bytes]
    ) -> list[bytes]:
        keys = self._hasher.keys(tokens, first, stop, prev)
        for page, key in zip(pages, keys, strict=False):
            if page.key is None:
                if self._placement.set_key(page, key, prev) and self._remote is not None:
                    self._remote.committed(page, key)  # write-through, queued (never waits)
            elif page.key != key:
                raise InvalidArgumentError(
                    "commit() tokens disagree with a page already committed under other tokens; "
                    "a cache's history cannot be rewritten"
                )
            prev = key
        return keys

    # ------------------------------------------------------------------ cache operations
    def _moving(self, pages: Sequence[Page]) -> set[asyncio.Future[None]]:
        """The ``settled`` awaitables of the pages of ``pages`` in flight. A batch settles each of its moves
        before it is done: a done one with its move still pending is a bug, raised (never spun on)."""
        out: set[asyncio.Future[None]] = set()
        for move in self._placement.moves_of(pages):
            if move.settled is None or move.settled.done():
                raise RuntimeError(f"pages {move.pids[:4].tolist()}... are moving but their transfer batch ended "
                                   "without settling them")
            out.add(move.settled)
        return out

    async def _wait_moving(self, pages: Sequence[Page]) -> None:
        """Wait until none of ``pages`` is in flight (moved by another operation)."""
        while pending := self._moving(pages):
            await asyncio.wait(pending)

    async def _run(self, plan: Plan, priority: int = BACKGROUND) -> RunResult:
        result = await self._started_executor.run(plan, priority)
        if result.error is not None:
            raise result.error
        return result

    async def _with_room(self, op: Operation, status: CacheStatus, what: str, attempt: Callable[[], Awaitable[bool]]) -> None:
        """Call ``attempt()`` under the planning lock until it returns True (False: wait for the pages it
        holds to stop moving, then try again).

        ``attempt`` raises CapacityError before it changes anything. Then the operations in flight that
        hold room (pages held, new pages, transfers) are waited for: prefetches are asked to stop their
        transfers that have not started, this operation releases its own holds (so two waiters never wait
        for each other) and tries again whenever room may have come back. CapacityError propagates only
        when none of the operations in flight at the first failure is left holding room."""
        waiting_on: Optional[set[Operation]] = None
        waited: Optional[float] = None  # when the first wait began (kvstore.metrics: room_wait)
        while True:
            async with self._plan_lock:
                self._check_live(op.cache, status, what)
                try:
                    if await attempt():
                        self.timings.since("room_wait", waited)
                        return
                except CapacityError:
                    if op.runs:
                        raise  # room vanished after transfers started: no quiet retry over moved pages
                    if waiting_on is None:
                        waiting_on = self._ledger.room_holders(op)
                    waiting_on = {o for o in waiting_on if not o.ended and o.holds_room}
                    if not waiting_on:
                        self.timings.since("room_wait", waited)
                        raise
                    waited = waited or time.perf_counter()
                    self._ledger.release(op)
                    for other in waiting_on:
                        if other.kind == "prefetch":
                            other.stop()
                    self._stats["room_waits"] += 1
                    moving: set[asyncio.Future[None]] = set()
                else:
                    moving = self._moving(op.held)
            if moving:
                await asyncio.wait(moving)
            else:
                await self._ledger.changed()

    async def _plan_chunks(
        self, op: Operation, n: int, plan_chunk: Callable[[int, int], Plan], chunked: bool, priority: int,
        status: CacheStatus, what: str,
    ) -> None:
        """Plan items ``0..n`` with ``plan_chunk(i, k)`` (under the planning lock), submitting each plan as
        soon as it is made: in chunks (``PLAN_CHUNK`` pages, then sized to ``PLAN_STEP_S``) with a yield between
        them when ``chunked`` (the event loop keeps running and planning overlaps copying), else in one step. A
        prefetch asked to stop plans no more chunks."""
        step = PLAN_CHUNK if chunked else max(n, 1)
        i = 0
        while i < n:
            k = min(step, n - i)
            t0 = time.perf_counter()
            plan = plan_chunk(i, k)
            if plan.moves:
                op.runs.append(self._started_executor.submit(plan, priority))
            i += k
            if i < n:
                spent = time.perf_counter() - t0
                step = min(PLAN_CHUNK_MAX, max(PLAN_CHUNK, int(k * PLAN_STEP_S / max(spent, 1e-6))))
                await asyncio.sleep(0)
                self._check_live(op.cache, status, what)
                if op.stopping:
                    return

    @staticmethod
    async def _abandon(op: Operation) -> None:
        """Stop ``op``'s runs (batches not started are dropped) and wait until every one has settled."""
        op.stop()
        await wait_through([r.task for r in op.runs])  # the caller raises what stopped it

    async def _finish(self, op: Operation) -> None:
        """Wait for every run of ``op`` to settle (if cancelled meanwhile, stop them and still wait); raise
        the first transfer error."""
        tasks = [r.task for r in op.runs]
        if not tasks:
            return
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            await self._abandon(op)
            raise
        for t in tasks:
            exc = t.exception()
            if exc is not None:
                raise exc
            error = t.result().error
            if error is not None:
                raise error

    async def _resume(self, cache: KVCache) -> None:
        pl = self._placement
        async with self._operation("resume", cache, CacheStatus.SUSPENDED, "resume()") as op:

            async def attempt() -> bool:
                if not op.held:
                    self._ledger.hold(op, cache._pages)
                if pl.moves_of(op.held):
                    return False  # another operation moves a page of this cache: wait for it
                pages = op.held
                room = pl.check_promotion(pages, CacheLevel.DEVICE)
                await self._plan_chunks(
                    op, len(pages),
                    lambda i, k: pl.plan_promotion(pages[i : i + k], CacheLevel.DEVICE, require_all=True, check=room),
                    room.chunked, RESUME, CacheStatus.SUSPENDED, "resume()",
                )
                return True

            try:
                for _ in range(8):  # a page shared with another cache may be moved meanwhile: go again
                    await self._with_room(op, CacheStatus.SUSPENDED, "resume()", attempt)
                    await self._finish(op)
                    op.runs = []
                    self._check_live(cache, CacheStatus.SUSPENDED, "resume()")
                    if pl.at_level(op.held, (CacheLevel.DEVICE,), settled=True).all():
                        break
                else:
                    raise CapacityError("resume() could not bring every page to the device level; retry")
            except BaseException:
                await self._abandon(op)
                raise
            self._ledger.holds_to_locks(op)
            cache._status = CacheStatus.ACTIVE

    async def _grow(self, cache: KVCache, n: int) -> None:
        """Add ``n`` device pages to an ACTIVE cache: checked whole first, then planned and run in chunks."""
        pl = self._placement

        room: Optional[RoomCheck] = None

        def plan_chunk(i: int, k: int) -> Plan:
            chunk, plan = pl.plan_new_pages(k, CacheLevel.DEVICE, cache.priority, check=room)
            pl.set_owners(chunk, 1)  # owned by this operation until the whole resize succeeded
            op.owned.extend(chunk)
            self._ledger.hold(op, chunk)  # not evictable once placed; locked at the end
            return plan

        async def attempt() -> bool:
            nonlocal room
            room = pl.check_new_pages(n, CacheLevel.DEVICE)
            await self._plan_chunks(op, n, plan_chunk, room.chunked, RESUME, CacheStatus.ACTIVE, "resize()")
            return True

        async with self._operation("resize", cache, CacheStatus.ACTIVE, "resize()") as op:
            try:
                await self._with_room(op, CacheStatus.ACTIVE, "resize()", attempt)
                await self._finish(op)
                self._check_live(cache, CacheStatus.ACTIVE, "resize()")
            except BaseException:
                await self._abandon(op)
                placed = pl.live_pages(op.owned)
                self._ledger.release(op)
                op.owned = PageList(pl.table)
                pl.remove_owners(placed)
                raise
            self._ledger.holds_to_locks(op)
            cache._pages.extend(op.owned)
            op.owned = PageList(pl.table)

    def _shrink(self, cache: KVCache, keep: int) -> None:
        pl = self._placement
        dropped = cache._pages[keep:]
        pl.unlock_all(dropped)
        pl.remove_owners(dropped)
        del cache._pages[keep:]
        self._ledger.notify()

    def _suspend(self, cache: KVCache) -> None:
        self._placement.unlock_all(cache._pages)
        self._ledger.notify()

    def _close_cache(self, cache: KVCache) -> None:
        pl = self._placement
        if cache.status is CacheStatus.ACTIVE:
            pl.unlock_all(cache._pages)
        pl.remove_owners(cache._pages)
        cache._pages = PageList(pl.table)
        self._caches.discard(cache)
        self._ledger.notify()

    async def _prefetch(self, cache: KVCache, target: CacheLevel, task: PrefetchTask) -> PrefetchResult:
        """Body of a prefetch task: after the older prefetches of the cache, hold its pages, plan their
        promotion in chunks (what fits), and keep the moving ones held until they settle."""
        t0 = time.perf_counter()
        pl = self._placement
        ti = pl.level_index(target)
        pages = colder = PageList(pl.table)
        try:
            if task._previous:
                await asyncio.wait([t._task for t in task._previous])
            async with self._operation("prefetch", cache, CacheStatus.SUSPENDED, "prefetch()") as op:
                try:
                    await self._wait_moving(cache._pages.copy())
                    async with self._plan_lock:
                        self._check_live(cache, CacheStatus.SUSPENDED, "prefetch()")
                        self._ledger.hold(op, cache._pages)
                        pages = op.held.copy()
                        colder = pl._colder(pages, ti)
                        try:
                            await self._plan_chunks(
                                op, len(pages),
                                lambda i, k: pl.plan_promotion(pages[i : i + k], target, require_all=False),
                                True, PREFETCH, CacheStatus.SUSPENDED, "prefetch()",
                            )
                        finally:
                            # pages not moving (already hot, now most recently used, or not moved) are evictable
                            # again; moving ones stay held until the prefetch ends
                            self._ledger.release(op, keep=pl.moving_pids(pages))
                    await self._finish(op)
                except BaseException:
                    await self._abandon(op)  # no transfer outlives the operation (nor its gate)
                    raise
            return self._prefetch_result(pages, target, False, colder, t0)
        except asyncio.CancelledError:
            if not task._stop_requested:
                raise
            _uncancel(1)
            return self._prefetch_result(pages, target, True, colder, t0)

    def _prefetch_result(
        self, pages: Sequence[Page], target: CacheLevel, cancelled: bool,
        colder: Sequence[Page] = (), t0: Optional[float] = None,
    ) -> PrefetchResult:
        """What a prefetch to ``target`` achieved: whether ``pages`` are all there (or hotter) now, and how
        many of ``colder`` (the pages it set out to move) arrived; ``t0``: when it started (None: now)."""
        pl = self._placement
        there = set(pl.levels[: pl.level_index(target) + 1])  # the target level and hotter ones
        complete = bool(pl.at_level(pages, there).all())
        n = int(np.count_nonzero(pl.at_level(colder, there)))
        seconds = 0.0 if t0 is None else time.perf_counter() - t0
        return PrefetchResult(complete, n, n * self._page_bytes, seconds, cancelled=cancelled)

    # ------------------------------------------------------------------ room made ahead of demand
    async def _demote_in_background(self) -> None:
        """Keep ``StoreConfig.free_target`` of every level but the last free: whenever room may have changed,
        demote each level's first eviction candidates into free slots one level colder, at background I/O
        priority, as an operation like any other (shared gate, planning lock, ledger): a resume or resize
        that finds the room in flight waits for it. Runs until aclose() cancels it."""
        target = self.config.free_target
        while self._state == _RUNNING:
            work = self._placement.background_room(target)
            if not work:
                await self._ledger.changed()
                continue
            try:
                async with self._operation("demote", None, None, "background demotion") as op:
                    async with self._plan_lock:
                        for level, n in self._placement.background_room(target):
                            plan = self._placement.plan_demotion(level, n)
                            if plan.moves:
                                op.runs.append(self._started_executor.submit(plan, BACKGROUND))
                    await self._finish(op)
                    self._stats["background_demotions"] += sum(r.task.result().pages_moved for r in op.runs)
            except InvalidStateError:
                return  # the manager is closing
            except KVStoreError as exc:  # a failed write leaves its pages where they were
                log.warning("kvstore: background demotion failed (%s); retrying when room changes", exc)
                await self._ledger.changed()

    # ------------------------------------------------------------------ quotas
    async def set_quota(self, level: CacheLevel, quota_bytes: int) -> None:
        """Grow or shrink a tier, all or nothing (also when cancelled). Shrinking evicts to colder levels and
        gives memory/disk back.

        CapacityError (quota unchanged) if it cannot be done without losing data; InvalidStateError for a
        device grow or shrink while any cache is ACTIVE (a model may be writing to the device pool, which
        a resize replaces).
        """
        level = self._level_arg(level, "set_quota(level)")
        if (quota := integral(quota_bytes)) is None:
            raise InvalidArgumentError(f"set_quota() quota_bytes must be an int, got {describe(quota_bytes)}")
        quota_bytes = quota
        self._check_running()
        new = quota_bytes // self._page_bytes
        if new < 1:
            raise InvalidArgumentError(
                f"set_quota({level.name}, {quota_bytes}) leaves no page of {self._page_bytes} bytes; keep at least one"
            )
        async with self._operation("quota", None, None, "set_quota()", exclusive=True):
            await self._settle_store_tasks()
            alloc = self._placement.alloc[level]
            old = alloc.total
            if new == old:
                return
            if level == CacheLevel.DEVICE and any(c.status is CacheStatus.ACTIVE for c in self._caches):
                raise InvalidStateError(
                    "cannot resize the device level while a cache is ACTIVE (its pages are locked and a model may "
                    "be writing to the device pool); suspend every cache first"
                )
            if new > old:
                prepared = await self._prepare_store(level, new)
                release = self._commit_store(level, new, prepared)  # the commit point: synchronous
                alloc.grow(new)
            else:
                plan = self._placement.plan_shrink(level, new)
                try:
                    await self._run(plan)
                    prepared = await self._prepare_store(level, new)
                except BaseException:
                    alloc.limit = alloc.total
                    raise
                alloc.shrink(new)
                release = self._commit_store(level, new, prepared)
            self._slots[level] = new
            self._ledger.notify()
            await self._after_commit(release)

    async def _after_commit(self, release: Optional[asyncio.Future[object]]) -> None:
        """Wait while the memory or disk space given up is released. The change is made: a cancellation
        arriving now lets the release finish and set_quota return normally (all or nothing)."""
        if release is not None:
            _uncancel(await wait_through([release]))

    async def _prepare_store(self, level: CacheLevel, slots: int) -> _Prepared:
        """Build what the backing store of ``level`` needs for ``slots`` slots, off to the side on a worker
        thread (nothing in use changes). If the caller is cancelled meanwhile, the thread still finishes,
        its result is thrown away and the cancellation goes on."""
        fut = asyncio.ensure_future(asyncio.to_thread(self._build_store, level, slots))
        try:
            return await settle(fut)
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._background(self._discard_store, level, fut.result())
            raise

    def _build_store(self, level: CacheLevel, slots: int) -> _Prepared:
        """Blocking (worker thread): a resized device pool; host chunks to add or the chunk that replaces the
        one straddling the new end; disk space reserved for a grow. Checks what the machine has first:
        CapacityError / StorageIOError leave everything as it was."""
        pb = self._page_bytes
        if level == CacheLevel.DEVICE:
            device = self._device_arena
            if slots > device.slots:  # the new pool is made while the old one still exists
                resources.check_device(device.device, slots * pb, "set_quota(DEVICE) quota_bytes")
            pool = device.resized(slots)
            if pool.is_cuda:
                torch.cuda.synchronize(pool.device)
            return pool
        if level == CacheLevel.HOST:
            host = self._host_arena
            if slots > host.slots:
                resources.check_memory(
                    f"growing the host tier by {slots - host.slots} pages", (slots - host.slots) * pb,
                    "set_quota(HOST) quota_bytes",
                )
            return host.prepare(slots)
        disk = self._disk_file
        if slots > disk.slots:
            disk.resize(slots)
        return None

    def _commit_store(self, level: CacheLevel, slots: int, prepared: _Prepared) -> Optional[asyncio.Future[object]]:
        """Swap in what :meth:`_build_store` made (synchronous); the memory or space given back is freed on
        a worker thread."""
        if level == CacheLevel.DEVICE:
            device = self._device_arena
            old = [device.pool]
            device.pool = cast(torch.Tensor, prepared)  # _build_store(DEVICE) made a pool
            return self._background(old.clear)
        if level == CacheLevel.HOST:
            host, copier = self._host_arena, self._started_copier
            dropped = host.commit(slots, prepared)
            copier.forget_host_memory()
            return self._background(host.free, dropped)
        if slots < self._disk_file.slots:
            return self._background(self._truncate_disk, slots)
        return None

    def _truncate_disk(self, slots: int) -> None:
        try:
            self._disk_file.resize(slots)
        except StorageIOError as exc:  # the quota changed; only the file keeps its size
            log.warning("kvstore: the disk tier's file could not be truncated (%s); it keeps its size", exc)

    def _discard_store(self, level: CacheLevel, prepared: _Prepared) -> None:
        if level == CacheLevel.HOST and isinstance(prepared, list):
            self._host_arena.free(prepared)

    def _background(self, fn: Callable[..., object], *args: object) -> asyncio.Future[object]:
        """Run blocking ``fn(*args)`` on a worker thread; the next quota change and aclose() wait for it."""
        task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._store_tasks.add(task)
        task.add_done_callback(self._store_tasks.discard)
        return task

    async def _settle_store_tasks(self) -> None:
        """Wait for every space release in flight (those started meanwhile too). Only tasks not done are
        awaited: a done task is dropped here even if its done callback has not run yet, so this never
        turns into a busy loop over finished work."""
        while True:
            pending = [t for t in self._store_tasks if not t.done()]
            for t in self._store_tasks.difference(pending):
                if not t.cancelled():
                    t.exception()  # retrieved (a failed release is logged where it runs)
            self._store_tasks.intersection_update(pending)
            if not pending:
                return
            await settle(asyncio.gather(*pending, return_exceptions=True))
