"""Shared fixtures: small layouts, a manager factory on a temp disk directory, page-data helpers."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import AsyncIterator, Callable

import pytest
import torch

from kvstore import CacheLevel, DeviceTier, DiskTier, HostTier, KVCache, KVCacheManager, PageLayout, StoreConfig

LAYOUT = PageLayout(num_layers=2, num_kv_heads=2, head_dim=16, tokens_per_page=4, dtype=torch.float16)
PAGE = LAYOUT.page_bytes


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def make_store(tmp_path) -> Callable:
    """``async with make_store(device_pages, host_pages, disk_pages) as mgr`` (0 leaves a tier out)."""

    @contextlib.asynccontextmanager
    async def factory(
        device: int = 4, host: int = 4, disk: int = 32, layout: PageLayout = LAYOUT, device_name=None, **kw
    ) -> AsyncIterator[KVCacheManager]:
        pb = layout.page_bytes
        tiers = [DeviceTier(device * pb, device=device_name)]
        if host:
            tiers.append(HostTier(host * pb))
        if disk:
            tiers.append(DiskTier(disk * pb, tmp_path / "disk"))
        mgr = KVCacheManager(StoreConfig(layout, tiers, **kw))
        async with mgr:
            yield mgr
            mgr.check_invariants()

    return factory


def write_pages(mgr: KVCacheManager, cache: KVCache, seed: int) -> torch.Tensor:
    """Fill an ACTIVE cache's pages with random data; returns a CPU copy of what was written."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn((cache.num_pages, *mgr.layout.page_shape), generator=gen).to(mgr.layout.dtype)
    mgr.device_pool[cache.page_indices().to(mgr.device_pool.device)] = data.to(mgr.device_pool.device)
    return data


def read_pages(mgr: KVCacheManager, cache: KVCache) -> torch.Tensor:
    return mgr.device_pool[cache.page_indices().to(mgr.device_pool.device)].cpu()


async def new_filled_cache(mgr: KVCacheManager, pages: int, seed: int, priority: int = 0) -> tuple[KVCache, torch.Tensor]:
    """A SUSPENDED cache of ``pages`` pages holding random data (returned)."""
    cache = mgr.create_cache(priority=priority)
    await cache.resume()
    await cache.resize(pages * mgr.layout.tokens_per_page)
    data = write_pages(mgr, cache, seed)
    cache.suspend()
    return cache, data


async def assert_data(mgr: KVCacheManager, cache: KVCache, data: torch.Tensor) -> None:
    """Resume ``cache``, compare its bytes with ``data``, suspend it again."""
    await cache.resume()
    try:
        got = read_pages(mgr, cache)
        assert torch.equal(got.view(torch.uint8), data.view(torch.uint8)), "page data differs"
    finally:
        cache.suspend()


def levels(cache: KVCache) -> dict[CacheLevel, int]:
    return {k: v for k, v in cache.page_levels().items() if v}


async def sink_to_disk(mgr: KVCacheManager, cache: KVCache) -> None:
    """Push every page of a SUSPENDED cache to the disk level by creating (then closing) newer 1-page caches."""
    fillers = []
    while levels(cache) != {CacheLevel.DISK: cache.num_pages}:
        fillers.append((await new_filled_cache(mgr, 1, seed=10_000 + len(fillers)))[0])
    for f in fillers:
        f.close()


async def new_cache_on_disk(mgr: KVCacheManager, pages: int, seed: int) -> tuple[KVCache, torch.Tensor]:
    """A SUSPENDED cache of ``pages`` pages of random data (returned), every page on the disk level."""
    cache, data = await new_filled_cache(mgr, pages, seed=seed)
    await sink_to_disk(mgr, cache)
    return cache, data


@contextlib.contextmanager
def io_hook(mgr: KVCacheManager, hook):
    """Install ``hook`` as the disk backend's fault hook for the ``with`` block."""
    mgr._io.fault_hook = hook
    try:
        yield
    finally:
        if mgr._io is not None:  # gone once the manager closed
            mgr._io.fault_hook = None


def slow_io(mgr: KVCacheManager, seconds: float):
    """Every disk I/O call of ``mgr`` first sleeps ``seconds`` (on its worker thread) in the ``with`` block."""
    return io_hook(mgr, lambda op, off, n: time.sleep(seconds))


@contextlib.contextmanager
def gated_io(mgr: KVCacheManager):
    """Disk I/O of ``mgr`` waits (on its worker threads) until the yielded event is set; set on exit."""
    gate = threading.Event()

    def hook(op, off, n):
        gate.wait()  # returns None: no short transfer

    with io_hook(mgr, hook):
        try:
            yield gate
        finally:
            gate.set()


async def until(cond, what: str, limit: float = 5.0) -> None:
    """Yield to the loop until ``cond()``; fail (not hang) after ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.001)


from .redis_fixtures import own_redis, redis_cluster, redis_server  # noqa: E402,F401  (remote-tier tests)


def loose_page(pid: int, level, slot: int, key=None):
    """A live page handle in a table of its own (for index and policy tests that need no placement)."""
    from kvstore.placement.page import Page
    from kvstore.placement.table import PageTable

    table = PageTable(pid + 1)
    page = Page(table, pid, key)
    table.live[pid] = True
    table.level[pid] = int(level)
    table.slot[pid] = slot
    table.handles[pid] = page
    table.handled[pid] = True
    return page
