"""set_quota: grow and shrink tiers with data intact; refusals leave the quota unchanged."""

import asyncio
import os

import pytest

from kvstore import CacheLevel, CapacityError, InvalidArgumentError, InvalidStateError

from .conftest import PAGE, assert_data, levels, new_filled_cache

D, H, K = CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK


async def test_shrinking_host_demotes_to_disk_and_keeps_data(make_store):
    async with make_store(device=2, host=8, disk=32) as mgr:
        caches = [await new_filled_cache(mgr, 2, seed=s) for s in range(5)]
        assert mgr.usage(H).used_pages == 8
        await mgr.set_quota(H, 3 * PAGE)
        assert mgr.quota(H) == 3 * PAGE and mgr.usage(H).total_pages == 3
        assert mgr.usage(H).used_pages <= 3
        assert mgr._host.slots == 3, "host memory given back"
        mgr.check_invariants()
        for cache, data in caches:
            await assert_data(mgr, cache, data)


async def test_shrinking_device_returns_a_new_pool_with_data_intact(make_store):
    async with make_store(device=8, host=8, disk=32) as mgr:
        caches = [await new_filled_cache(mgr, 2, seed=s) for s in range(4)]
        old_pool = mgr.device_pool
        await mgr.set_quota(D, 3 * PAGE)
        assert mgr.device_pool.shape[0] == 3 and mgr.device_pool is not old_pool
        mgr.check_invariants()
        for cache, data in caches:
            await assert_data(mgr, cache, data)


async def test_growing_every_tier_adds_free_slots(make_store):
    async with make_store(device=2, host=2, disk=4) as mgr:
        cache, data = await new_filled_cache(mgr, 2, seed=1)
        for level, pages in ((D, 5), (H, 6), (K, 9)):
            await mgr.set_quota(level, pages * PAGE)
            assert mgr.usage(level).total_pages == pages
        assert mgr.device_pool.shape[0] == 5
        assert os.path.getsize(mgr._disk.path) == 9 * mgr._disk.stride
        await assert_data(mgr, cache, data)


async def test_shrinking_disk_truncates_the_file(make_store):
    async with make_store(device=2, host=2, disk=16) as mgr:
        caches = [await new_filled_cache(mgr, 2, seed=s) for s in range(4)]
        await mgr.set_quota(K, 8 * PAGE)
        assert os.path.getsize(mgr._disk.path) == 8 * mgr._disk.stride
        mgr.check_invariants()
        for cache, data in caches:
            await assert_data(mgr, cache, data)


async def test_shrink_that_would_lose_data_raises_and_keeps_quota(make_store):
    async with make_store(device=2, host=2, disk=4) as mgr:
        caches = [await new_filled_cache(mgr, 2, seed=s) for s in range(4)]
        where = [c.page_levels() for c, _ in caches]
        with pytest.raises(CapacityError, match="shrinking the host level"):
            await mgr.set_quota(H, PAGE)
        assert mgr.quota(H) == 2 * PAGE
        assert [c.page_levels() for c, _ in caches] == where
        mgr.check_invariants()
        await mgr.set_quota(K, 8 * PAGE)  # headroom: a disk slot is reused only once it is free
        for cache, data in caches:
            await assert_data(mgr, cache, data)


async def test_device_shrink_with_an_active_cache_is_refused(make_store):
    async with make_store(device=4) as mgr:
        cache = mgr.create_cache()
        await cache.resume()
        await cache.resize(4)
        with pytest.raises(InvalidStateError, match="ACTIVE"):
            await mgr.set_quota(D, 2 * PAGE)
        assert mgr.quota(D) == 4 * PAGE


async def test_device_grow_with_an_active_cache_is_refused_and_changes_nothing(make_store):
    # a model may be writing into the ACTIVE cache's pages: replacing the pool would lose those writes
    async with make_store(device=2) as mgr:
        cache = mgr.create_cache()
        await cache.resume()
        await cache.resize(8)
        pool = mgr.device_pool
        with pytest.raises(InvalidStateError, match="suspend"):
            await mgr.set_quota(D, 6 * PAGE)
        assert mgr.quota(D) == 2 * PAGE and mgr.device_pool is pool


async def test_device_grow_keeps_suspended_pages(make_store):
    async with make_store(device=2) as mgr:
        cache, data = await new_filled_cache(mgr, 2, seed=3)
        await mgr.set_quota(D, 6 * PAGE)
        assert mgr.device_pool.shape[0] == 6 and levels(cache) == {D: 2}
        await assert_data(mgr, cache, data)


@pytest.mark.parametrize("bad", [0, PAGE - 1, -5, 1.5, "1"])
async def test_bad_quota_is_rejected(make_store, bad):
    async with make_store() as mgr:
        with pytest.raises(InvalidArgumentError):
            await mgr.set_quota(H, bad)
        assert mgr.quota(H) == 4 * PAGE


async def test_relocated_pages_on_shrink_keep_their_data(make_store):
    # fill the host, close the caches in low slots, then shrink: high-slot pages must move down
    async with make_store(device=1, host=6, disk=0) as mgr:
        caches = [await new_filled_cache(mgr, 1, seed=s) for s in range(7)]
        for cache, _ in caches[:3]:
            cache.close()
        await mgr.set_quota(H, 3 * PAGE)
        assert mgr.stats().get("relocations_host", 0) > 0
        for cache, data in caches[3:]:
            await assert_data(mgr, cache, data)


async def test_waiting_for_space_releases_skips_finished_ones(make_store):
    """A release task that is done but still listed (its done callback not run, or lost) is not awaited again:
    set_quota() and aclose() return at once instead of spinning on finished work (a CUDA stress run spun in
    this wait for minutes before the fix)."""
    async with make_store(device=2, host=2, disk=4) as mgr:
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        mgr._store_tasks.add(done)  # finished, and no callback will take it out
        await asyncio.wait_for(mgr.set_quota(H, 3 * PAGE), 5)
        assert mgr.usage(H).total_pages == 3
        assert done not in mgr._store_tasks
        mgr._store_tasks.add(done)
        await asyncio.wait_for(mgr.aclose(), 5)
        assert not mgr._store_tasks
