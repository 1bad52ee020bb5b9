"""KVCacheManager: joins placement (what goes where) and transfer (moving the bytes) behind the public API.

Every operation plans synchronously in :class:`~kvstore.placement.Placement`, runs the plan on the
:class:`~kvstore.transfer.executor.TransferExecutor`, and settles each move when its batch ends.
Operations that move pages hold the manager's gate shared; ``set_quota`` and ``aclose`` hold it
exclusively, so a quota change never races a transfer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import resources
from ._aio import Gate
from ._args import describe, integral
from .cache import KVCache, PrefetchTask
from .config import DiskTier, HostTier, StoreConfig
from .errors import CapacityError, ConfigError, InvalidArgumentError, InvalidStateError, StorageIOError
from .persistence import DiskCatalog, Record
from .placement import Page, Placement, Plan
from .placement.prefix import PrefixHasher, as_token_array
from .transfer.arenas import DeviceArena, HostArena, StagingPool
from .transfer.copier import Copier
from .transfer.diskfile import DiskSlotFile, slot_stride
from .transfer.executor import RunResult, TransferExecutor
from .transfer.io_backends import IOBackend, KvikioBackend, PosixBackend, choose_backend
from .transfer.scheduler import BACKGROUND, PREFETCH, RESUME
from .types import CacheLevel, CacheStatus, PrefetchResult, PrefixMatch, TierUsage

log = logging.getLogger("kvstore")

_NEW, _RUNNING, _CLOSING, _CLOSED = "new", "running", "closing", "closed"

#: Pages planned per synchronous step of a resume or prefetch (bounds event-loop stalls; the next chunk
#: is planned while the previous one's transfers run).
PLAN_CHUNK = 128


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
        self._caches: set[KVCache] = set()
        self._gate = Gate()
        self._plan_lock = asyncio.Lock()
        self._state = _NEW
        self._device: Optional[DeviceArena] = None
        self._host: Optional[HostArena] = None
        self._disk: Optional[DiskSlotFile] = None
        self._io: Optional[IOBackend] = None
        self._copier: Optional[Copier] = None
        self._executor: Optional[TransferExecutor] = None
        self.io_backend: Optional[str] = None  # "kvikio" or "posix" once started with a disk tier
        self._catalog: Optional[DiskCatalog] = None  # a persistent disk tier's lock, fingerprint and journal

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
        device = cfg.tiers[0].resolved_device()
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
            staging = StagingPool(self._page_bytes, staging_rows, cfg.staging_buffers, pinned)
            self._executor = TransferExecutor(
                self._placement, self._device, self._host, self._disk, self._io, self._copier, staging,
                cfg.batch_bytes, self._stats,
            )
            if self._catalog is not None:
                # nothing else can touch placement before start() returns: rebuild it off the loop thread
                await asyncio.to_thread(self._restore, recovered)
                await self._catalog.start(self._disk.fd)
        except BaseException:
            if self._catalog is not None:
                self._catalog.release()
            await asyncio.to_thread(self._release)
            self._state = _CLOSED
            raise
        self._state = _RUNNING
        log.info(
            "kvstore started: device=%s (%d pages), host=%s, disk=%s, page=%d bytes",
            device, self._slots[CacheLevel.DEVICE], self._slots.get(CacheLevel.HOST, 0),
            self._slots.get(CacheLevel.DISK, 0), self._page_bytes,
        )

    def _check_machine(self) -> None:
        """ConfigError when a quota exceeds what this machine has at all (memory, GPU memory, disk size)."""
        cfg, pb = self.config, self._page_bytes
        device = cfg.tiers[0].resolved_device()
        dev_bytes = self._slots[CacheLevel.DEVICE] * pb
        host_bytes = self._slots.get(CacheLevel.HOST, 0) * pb
        resources.check_device_total(device, dev_bytes)
        if device.type == "cpu":
            host_bytes += dev_bytes
        if CacheLevel.HOST in self._slots or device.type == "cpu":
            what = "the host tier" if device.type == "cuda" else f"the device tier on {device} and the host tier"
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
        pb = self._page_bytes
        dev_bytes = self._slots[CacheLevel.DEVICE] * pb
        host_bytes = self._slots.get(CacheLevel.HOST, 0) * pb
        if device.type == "cuda":
            resources.check_device(device, dev_bytes)
        else:
            host_bytes += dev_bytes
        if host_bytes:
            what = "the host tier" if device.type == "cuda" else f"the device tier on {device} and the host tier"
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
            })
            recovered = self._catalog.open(self._slots[CacheLevel.DISK])
        self._disk = DiskSlotFile(directory, self._page_bytes, persistent)
        self._disk.open(self._slots[CacheLevel.DISK])
        name, why = choose_backend(directory)
        if name == "kvikio":
            self._io = KvikioBackend(self._disk.path, self.config.resolved_io_threads())
        else:
            self._io = PosixBackend(self._disk.fd, self.config.resolved_io_threads())
        self.io_backend = name
        log.info("kvstore disk tier %s: I/O backend %s (%s)", self._disk.path, name, why)
        return recovered

    def _restore(self, records: dict[int, Record]) -> None:
        """Index the committed pages a persistent disk tier recovered, then journal every later change."""
        pl = self._placement
        for slot in sorted(records):
            rec = records[slot]
            try:
                page = pl.restore_page(CacheLevel.DISK, slot, rec.key, rec.parent)
            except RuntimeError:
                continue  # a key recorded twice: keep the first
            self._executor.sums[slot] = (page.pid, rec.checksum)
        pl.disk_listener = self._journal
        self._executor.before_disk_write = self._catalog.before_overwrite
        if records:
            log.info("kvstore disk tier: recovered %d committed pages", len(records))

    def _journal(self, op: str, page: Page, slot: int) -> None:
        if op == "del":
            self._catalog.delete(slot)
            return
        record = self._executor.sums.get(slot)
        if record is None or record[0] != page.pid:
            return  # no checksum for these bytes: not journaled, a miss after a restart
        node = self._placement.index.node(page)
        self._catalog.put(slot, page.key, node.parent_key if node is not None else None, record[1])

    def _release(self) -> None:
        """Free memory, threads and files (blocking; run on a worker thread)."""
        for closer in (self._copier, self._io, self._disk):
            if closer is not None:
                closer.close()
        self._copier = self._io = self._disk = None
        self._device = self._host = None
        self._executor = None

    async def aclose(self) -> None:
        """Cancel prefetches, let transfers settle, close every cache, release memory and files. Idempotent."""
        if self._state in (_CLOSED, _CLOSING):
            while self._state == _CLOSING:
                await asyncio.sleep(0.001)
            return
        if self._state == _NEW:
            self._state = _CLOSED
            return
        self._state = _CLOSING
        tasks = []
        for cache in list(self._caches):
            pf = cache._prefetch
            if pf is not None and not pf.done():
                pf.cancel()
                tasks.append(pf._task)
        if tasks:
            await asyncio.wait(tasks)
        await self._gate.acquire_exclusive()
        try:
            for cache in list(self._caches):
                cache.close()
            if self._catalog is not None:
                await self._catalog.close()
            await asyncio.to_thread(self._release)
        finally:
            self._gate.release_exclusive()
            self._state = _CLOSED

    def _check_running(self) -> None:
        if self._state == _RUNNING:
            return
        if self._state == _NEW:
            raise InvalidStateError("the manager is not started; use 'async with KVCacheManager(cfg)' or await start()")
        raise InvalidStateError("the manager is closed; create a new KVCacheManager")

    def _level_arg(self, level: object, what: str) -> CacheLevel:
        if (index := integral(level)) is None:
            raise InvalidArgumentError(f"{what} must be a CacheLevel, got {describe(level)}")
        try:
            level = CacheLevel(index)
        except ValueError:
            raise InvalidArgumentError(f"{what} must be a CacheLevel (DEVICE, HOST, DISK), got {level!r}") from None
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
        return self._device.pool

    def quota(self, level: CacheLevel) -> int:
        level = self._level_arg(level, "quota(level)")
        return self._placement.alloc[level].total * self._page_bytes

    def usage(self, level: CacheLevel) -> TierUsage:
        level = self._level_arg(level, "usage(level)")
        return self._placement.usage(level)

    def stats(self) -> dict[str, int | float]:
        """Monotonic counters (bytes/pages per level pair, evictions, drops, prefetches, hits, I/O errors)."""
        out: dict[str, int | float] = {}
        levels = self.config.levels
        for a in levels:
            out[f"evictions_{a.label}"] = 0
            for b in levels:
                if a != b:
                    out[f"bytes_{a.label}_to_{b.label}"] = 0
                    out[f"pages_{a.label}_to_{b.label}"] = 0
        for key in ("drops", "prefetches", "prefix_hit_tokens", "io_errors", "corrupt_pages"):
            out[key] = 0
        out.update(self._stats)
        out.update(self._placement.counters)
        return out

    def check_invariants(self) -> None:
        """Raise AssertionError naming the first broken invariant (slow; for tests and debugging)."""
        self._placement.check_invariants()
        owners: Counter[int] = Counter()
        locks: Counter[int] = Counter()
        for cache in self._caches:
            for page in cache._pages:
                owners[page.pid] += 1
                if cache.status is CacheStatus.ACTIVE:
                    locks[page.pid] += 1
                    if page.level != CacheLevel.DEVICE:
                        raise AssertionError(f"ACTIVE cache holds page {page.pid} off the device level")
                if page.freed:
                    raise AssertionError(f"a cache holds freed page {page.pid}")
        for page in self._placement.pages.values():
            if page.owners != owners[page.pid]:
                raise AssertionError(f"page {page.pid} counts {page.owners} owners, caches hold it {owners[page.pid]} times")
            if page.locks != locks[page.pid]:
                raise AssertionError(f"page {page.pid} counts {page.locks} locks, ACTIVE caches hold {locks[page.pid]}")

    # ------------------------------------------------------------------ prefix reuse
    def _match(self, tokens: np.ndarray) -> tuple[list[Page], Optional[bytes]]:
        """Pages of the longest committed prefix of ``tokens`` (any level) and the key of the last one."""
        return self._placement.index.match_tokens(self._hasher, tokens)

    def lookup(self, tokens: Sequence[int]) -> PrefixMatch:
        """How much of ``tokens`` is reusable and where those pages are now; holds nothing."""
        self._check_running()
        pages, _ = self._match(as_token_array(tokens))
        per_level = {lvl: 0 for lvl in self.config.levels}
        for p in pages:
            per_level[p.level] += 1
        return PrefixMatch(len(pages) * self.layout.tokens_per_page, per_level)

    def create_cache(self, tokens: Optional[Sequence[int]] = None, *, priority: int = 0) -> KVCache:
        """A new SUSPENDED cache; with ``tokens`` it holds the longest committed prefix (whole pages)."""
        self._check_running()
        if (prio := integral(priority)) is None:
            raise InvalidArgumentError(f"create_cache() priority must be an int, got {describe(priority)}")
        priority = prio
        arr = as_token_array(tokens) if tokens is not None else np.zeros(0, dtype=np.int64)
        pages, last_key = self._match(arr)
        for page in pages:
            self._placement.add_owner(page, priority)
        for page in reversed(pages):  # deepest first: a parent is never less recently reused than its child
            self._placement.record_hit(page)
        reused = len(pages) * self.layout.tokens_per_page
        self._stats["prefix_hit_tokens"] += reused
        cache = KVCache(self, list(pages), priority, arr[:reused].copy(), last_key)
        self._caches.add(cache)
        return cache

    def _commit_pages(
        self, pages: Sequence[Page], tokens: np.ndarray, first: int, stop: int, prev: Optional[bytes]
    ) -> list[bytes]:
        keys = self._hasher.keys(tokens, first, stop, prev)
        for page, key in zip(pages, keys, strict=False):
            if page.key is None:
                self._placement.set_key(page, key, prev)
            elif page.key != key:
                raise InvalidArgumentError(
                    "commit() tokens disagree with a page already committed under other tokens; "
                    "a cache's history cannot be rewritten"
                )
            prev = key
        return keys

    # ------------------------------------------------------------------ cache operations
    async def _wait_moving(self, pages: Sequence[Page]) -> None:
        """Wait until none of ``pages`` is in flight (moved by another operation)."""
        while True:
            pending = {p.move.settled for p in pages if p.move is not None and p.move.settled is not None}
            if not pending:
                return
            await asyncio.wait(pending)

    async def _run(self, plan, priority: int = BACKGROUND) -> RunResult:
        result = await self._executor.run(plan, priority)
        if result.error is not None:
            raise result.error
        return result

    async def _plan_in_chunks(
        self, n: int, check: Callable[[], None], plan_chunk: Callable[[int, int], Plan], priority: int
    ) -> list[asyncio.Future]:
        """Run ``check()`` (all-or-nothing feasibility: raises before anything changes), then plan items
        ``i..i+k`` with ``plan_chunk(i, k)`` in chunks of ``PLAN_CHUNK`` and start each chunk's transfers as
        soon as it is planned; returns the running plans.

        Chunks keep each synchronous step short (the event loop keeps running) and overlap planning with
        copying. The planning lock keeps other operations from taking the room between chunks.
        """
        runs: list[asyncio.Future] = []
        async with self._plan_lock:
            try:
                check()
                for i in range(0, n, PLAN_CHUNK):
                    plan = plan_chunk(i, min(PLAN_CHUNK, n - i))
                    if plan.moves:
                        runs.append(asyncio.ensure_future(self._executor.run(plan, priority)))
                    if i + PLAN_CHUNK < n:
                        await asyncio.sleep(0)
            except BaseException:
                await self._abandon(runs)
                raise
        return runs

    async def _start_promotion(
        self, pages: Sequence[Page], target: CacheLevel, *, require_all: bool, priority: int
    ) -> list[asyncio.Future]:
        """Start moving ``pages`` (held by the caller) up to ``target``, planned in chunks. With
        ``require_all`` the whole promotion is checked first (CapacityError, nothing moved)."""
        pl = self._placement
        return await self._plan_in_chunks(
            len(pages),
            (lambda: pl.check_promotion(pages, target)) if require_all else (lambda: None),
            lambda i, k: pl.plan_promotion(pages[i : i + k], target, require_all=require_all),
            priority,
        )

    @staticmethod
    async def _abandon(runs: list[asyncio.Future]) -> None:
        """Cancel the runs (batches not started are dropped) and wait until every one has settled."""
        for r in runs:
            r.cancel()
        while not all(r.done() for r in runs):
            try:
                await asyncio.wait(runs)
            except asyncio.CancelledError:
                continue

    async def _finish(self, runs: list[asyncio.Future]) -> None:
        """Wait for every run to settle (if we are cancelled meanwhile, cancel them and still wait); raise
        the first transfer error."""
        if not runs:
            return
        try:
            await asyncio.wait(runs)
        except asyncio.CancelledError:
            await self._abandon(runs)
            raise
        for r in runs:
            if not r.cancelled() and r.exception() is None and r.result().error is not None:
                raise r.result().error
        for r in runs:
            if not r.cancelled() and r.exception() is not None:
                raise r.exception()

    async def _resume(self, cache: KVCache) -> None:
        await self._gate.acquire_shared()
        pl = self._placement
        pages = cache._pages
        pl.hold_all(pages)
        locked = False
        try:
            for _ in range(8):  # another operation may be moving a shared page: wait for it and go again
                await self._wait_moving(pages)
                self._check_running()
                runs = await self._start_promotion(pages, CacheLevel.DEVICE, require_all=True, priority=RESUME)
                await self._finish(runs)
                if cache.status is not CacheStatus.SUSPENDED:
                    raise InvalidStateError(f"the cache was {cache.status.name.lower()} while resume() ran")
                if all(p.level == CacheLevel.DEVICE for p in pages):
                    break
            else:
                raise CapacityError("resume() could not bring every page to the device level; retry")
            pl.holds_to_locks(pages)
            locked = True
            cache._status = CacheStatus.ACTIVE
        finally:
            if not locked:
                pl.release_all(pages)
            self._gate.release_shared()

    async def _grow(self, cache: KVCache, n: int) -> None:
        """Add ``n`` device pages to an ACTIVE cache: checked whole first, then planned and run in chunks."""
        await self._gate.acquire_shared()
        pl = self._placement
        new: list[Page] = []
        runs: list[asyncio.Future] = []

        def plan_chunk(i: int, k: int) -> Plan:
            chunk, plan = pl.plan_new_pages(k, CacheLevel.DEVICE, cache.priority)
            for p in chunk:
                p.owners = 1
                p.holds = 1  # not evictable once placed; locked when the whole resize succeeded
            new.extend(chunk)
            return plan

        try:
            try:
                runs = await self._plan_in_chunks(
                    n, lambda: pl.check_new_pages(n, CacheLevel.DEVICE), plan_chunk, RESUME
                )
                await self._finish(runs)
                if cache.status is not CacheStatus.ACTIVE:
                    raise InvalidStateError(f"the cache was {cache.status.name.lower()} while resize() ran")
            except BaseException:
                await self._abandon(runs)
                placed = [p for p in new if not p.freed]
                pl.release_all(placed)
                for p in placed:
                    pl.remove_owner(p)
                raise
            pl.holds_to_locks(new)
            cache._pages.extend(new)
        finally:
            self._gate.release_shared()

    def _shrink(self, cache: KVCache, keep: int) -> None:
        pl = self._placement
        dropped = cache._pages[keep:]
        pl.unlock_all(dropped)
        for p in dropped:
            pl.remove_owner(p)
        del cache._pages[keep:]

    def _suspend(self, cache: KVCache) -> None:
        self._placement.unlock_all(cache._pages)

    def _close_cache(self, cache: KVCache) -> None:
        pl = self._placement
        if cache.status is CacheStatus.ACTIVE:
            pl.unlock_all(cache._pages)
        for p in cache._pages:
            pl.remove_owner(p)
        cache._pages = []
        self._caches.discard(cache)

    async def _prefetch(
        self, cache: KVCache, target: CacheLevel, previous: Optional[PrefetchTask]
    ) -> PrefetchResult:
        t0 = time.perf_counter()
        self._stats["prefetches"] += 1
        if previous is not None and not previous.done():
            await asyncio.wait({previous._task})
        await self._gate.acquire_shared()
        pl = self._placement
        held: list[Page] = []
        try:
            pages = cache._pages
            await self._wait_moving(pages)
            ti = pl.level_index(target)
            colder = [p for p in pages if pl.level_index(p.level) > ti]
            if cache.status is CacheStatus.SUSPENDED:
                pl.hold_all(pages)  # while planning none of this cache's pages is a victim
                runs: list[asyncio.Future] = []
                try:
                    runs = await self._start_promotion(pages, target, require_all=False, priority=PREFETCH)
                finally:
                    held = [p for p in pages if p.move is not None]  # moving: held until the prefetch ends
                    # the rest (already hot, now most recently used, or not moved) are evictable again
                    pl.release_all([p for p in pages if p.move is None])
                await self._finish(runs)
            complete = all(pl.level_index(p.level) <= ti for p in cache._pages)
            n = sum(1 for p in colder if not p.freed and pl.level_index(p.level) <= ti)
            return PrefetchResult(complete, n, n * self._page_bytes, time.perf_counter() - t0)
        finally:
            pl.release_all(held)
            self._gate.release_shared()

    # ------------------------------------------------------------------ quotas
    async def set_quota(self, level: CacheLevel, quota_bytes: int) -> None:
        """Grow or shrink a tier. Shrinking evicts to colder levels and gives memory/disk back.

        CapacityError (quota unchanged) if it cannot be done without losing data; InvalidStateError for
        a device shrink while any cache is ACTIVE.
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
        await self._gate.acquire_exclusive()
        try:
            self._check_running()
            alloc = self._placement.alloc[level]
            old = alloc.total
            if new > old:
                await asyncio.to_thread(self._resize_store, level, new)
                alloc.grow(new)
            elif new < old:
                if level == CacheLevel.DEVICE and any(c.status is CacheStatus.ACTIVE for c in self._caches):
                    raise InvalidStateError(
                        "cannot shrink the device level while a cache is ACTIVE (its pages are locked); suspend first"
                    )
                plan = self._placement.plan_shrink(level, new)
                try:
                    await self._run(plan)
                except BaseException:
                    alloc.limit = alloc.total
                    raise
                alloc.shrink(new)
                await asyncio.to_thread(self._resize_store, level, new)
            self._slots[level] = new
        finally:
            self._gate.release_exclusive()

    def _resize_store(self, level: CacheLevel, slots: int) -> None:
        """Resize the backing store of ``level`` (blocking: runs on a worker thread).

        A grow checks what is available first and is all or nothing: CapacityError / StorageIOError leave
        the store as it was. A shrink (its slots are already given up) that cannot complete keeps the larger
        store, which still serves the smaller quota, and logs a warning."""
        pb = self._page_bytes
        if level == CacheLevel.DEVICE:
            if slots > self._device.slots:
                # the new pool is made while the old one still exists
                resources.check_device(self._device.device, slots * pb, "set_quota(DEVICE) quota_bytes")
            try:
                pool = self._device.resized(slots)
            except CapacityError:
                if slots > self._device.slots:
                    raise
                log.warning("kvstore: no memory to copy the device pool down to %d slots; keeping %d",
                            slots, self._device.slots)
                return
            if pool.is_cuda:
                torch.cuda.synchronize(pool.device)
            self._device.pool = pool
        elif level == CacheLevel.HOST:
            if slots > self._host.slots:
                resources.check_memory(
                    f"growing the host tier by {slots - self._host.slots} pages", (slots - self._host.slots) * pb,
                    "set_quota(HOST) quota_bytes",
                )
                self._host.allocate(slots)
            else:
                try:
                    self._host.release_to(slots)
                except CapacityError as exc:
                    log.warning("kvstore: host tier shrink kept a larger last chunk: %s", exc)
            self._copier.forget_host_memory()
        elif slots > self._disk.slots:
            self._disk.resize(slots)
        else:
            try:
                self._disk.resize(slots)
            except StorageIOError as exc:
                log.warning("kvstore: the disk tier's file could not be truncated (%s); it keeps its size", exc)
