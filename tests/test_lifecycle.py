"""Cache lifecycle: state transitions, capacity checks, resize, suspend, close, manager start/close."""

import pytest
import torch

from kvstore import (
    CacheLevel,
    CacheStatus,
    CapacityError,
    DeviceTier,
    InvalidArgumentError,
    InvalidStateError,
    KVCacheManager,
    StoreConfig,
)

from .conftest import LAYOUT, PAGE, levels, new_filled_cache

TPP = LAYOUT.tokens_per_page


async def test_new_cache_is_suspended_and_empty(make_store):
    async with make_store() as mgr:
        cache = mgr.create_cache()
        assert cache.status is CacheStatus.SUSPENDED
        assert cache.num_pages == 0 and cache.num_tokens == 0 and cache.num_reused_tokens == 0


async def test_resume_activates_and_resize_adds_device_pages(make_store):
    async with make_store(device=4) as mgr:
        cache = mgr.create_cache()
        await cache.resume()
        assert cache.status is CacheStatus.ACTIVE
        await cache.resize(3 * TPP - 1)
        assert cache.num_pages == 3 and cache.num_tokens == 3 * TPP - 1
        idx = cache.page_indices()
        assert idx.dtype == torch.int64 and len(set(idx.tolist())) == 3
        assert all(0 <= i < mgr.device_pool.shape[0] for i in idx.tolist())
        assert levels(cache) == {CacheLevel.DEVICE: 3}


async def test_device_pool_has_the_layout_shape(make_store):
    async with make_store(device=5) as mgr:
        assert tuple(mgr.device_pool.shape) == (5, *LAYOUT.page_shape)
        assert mgr.device_pool.dtype == LAYOUT.dtype


async def test_resize_shrink_frees_pages(make_store):
    async with make_store(device=4) as mgr:
        cache = mgr.create_cache()
        await cache.resume()
        await cache.resize(4 * TPP)
        await cache.resize(TPP)
        assert cache.num_pages == 1
        assert mgr.usage(CacheLevel.DEVICE).used_pages == 1


async def test_suspend_moves_nothing(make_store):
    async with make_store(device=4) as mgr:
        cache = mgr.create_cache()
        await cache.resume()
        await cache.resize(2 * TPP)
        before, stats = cache.page_levels(), mgr.stats()
        cache.suspend()
        assert cache.status is CacheStatus.SUSPENDED
        assert cache.page_levels() == before and mgr.stats() == stats
        assert mgr.usage(CacheLevel.DEVICE).evictable_pages == 2


async def test_active_pages_are_never_evicted(make_store):
    async with make_store(device=4, host=4) as mgr:
        a = mgr.create_cache()
        await a.resume()
        await a.resize(3 * TPP)
        b = mgr.create_cache()
        await b.resume()
        with pytest.raises(CapacityError):
            await b.resize(2 * TPP)
        assert levels(a) == {CacheLevel.DEVICE: 3}
        assert b.num_pages == 0, "a failed resize changes nothing"


async def test_resume_too_big_raises_capacity_error_and_moves_nothing(make_store):
    async with make_store(device=4, host=4, disk=16) as mgr:
        big, _ = await new_filled_cache(mgr, 3, seed=1)
        other = mgr.create_cache()
        await other.resume()
        await other.resize(2 * TPP)  # locks 2 device pages: big cannot fit any more
        where, stats = big.page_levels(), mgr.stats()
        with pytest.raises(CapacityError, match="device"):
            await big.resume()
        assert big.status is CacheStatus.SUSPENDED
        assert big.page_levels() == where and mgr.stats() == stats


async def test_cache_larger_than_device_cannot_resume(make_store):
    async with make_store(device=2, host=8) as mgr:
        cache = mgr.create_cache()
        await cache.resume()
        with pytest.raises(CapacityError):
            await cache.resize(3 * TPP)


async def test_close_is_idempotent_and_frees_uncommitted_pages(make_store):
    async with make_store() as mgr:
        cache, _ = await new_filled_cache(mgr, 2, seed=2)
        cache.close()
        cache.close()
        assert cache.status is CacheStatus.CLOSED
        assert sum(mgr.usage(l).used_pages for l in mgr.config.levels) == 0


async def test_close_of_active_cache_frees_its_pages(make_store):
    async with make_store() as mgr:
        cache = mgr.create_cache()
        await cache.resume()
        await cache.resize(2 * TPP)
        cache.close()
        assert mgr.usage(CacheLevel.DEVICE).used_pages == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.page_indices(),
        lambda c: c.suspend(),
    ],
    ids=["page_indices", "suspend"],
)
async def test_active_only_calls_on_suspended_cache_raise(make_store, call):
    async with make_store() as mgr:
        cache = mgr.create_cache()
        with pytest.raises(InvalidStateError, match="ACTIVE"):
            call(cache)


async def test_resize_on_suspended_cache_raises(make_store):
    async with make_store() as mgr:
        with pytest.raises(InvalidStateError, match="ACTIVE"):
            await mgr.create_cache().resize(4)


async def test_resume_on_active_cache_raises(make_store):
    async with make_store() as mgr:
        cache = mgr.create_cache()
        await cache.resume()
        with pytest.raises(InvalidStateError, match="SUSPENDED"):
            await cache.resume()


async def test_prefetch_on_active_cache_raises(make_store):
    async with make_store() as mgr:
        cache = mgr.create_cache()
        await cache.resume()
        with pytest.raises(InvalidStateError, match="SUSPENDED"):
            cache.prefetch(CacheLevel.DEVICE)


async def test_calls_on_closed_cache_raise(make_store):
    async with make_store() as mgr:
        cache = mgr.create_cache()
        cache.close()
        with pytest.raises(InvalidStateError):
            await cache.resume()
        with pytest.raises(InvalidStateError):
            cache.prefetch(CacheLevel.HOST)
        with pytest.raises(InvalidStateError):
            cache.commit([1, 2, 3, 4])
        assert cache.page_levels()[CacheLevel.DEVICE] == 0


@pytest.mark.parametrize("bad", [-1, 2.5, "8", None, True])
async def test_resize_rejects_bad_sizes(make_store, bad):
    async with make_store() as mgr:
        cache = mgr.create_cache()
        await cache.resume()
        with pytest.raises(InvalidArgumentError):
            await cache.resize(bad)


async def test_bad_priority_and_tokens_are_rejected(make_store):
    async with make_store() as mgr:
        with pytest.raises(InvalidArgumentError, match="priority"):
            mgr.create_cache(priority="high")
        with pytest.raises(InvalidArgumentError, match="tokens"):
            mgr.create_cache([[1, 2], [3, 4]])
        with pytest.raises(InvalidArgumentError, match="tokens"):
            mgr.create_cache("hello")


async def test_unknown_or_unconfigured_level_is_rejected(make_store):
    async with make_store(host=0) as mgr:
        cache = mgr.create_cache()
        with pytest.raises(InvalidArgumentError, match="HOST is not configured"):
            cache.prefetch(CacheLevel.HOST)
        with pytest.raises(InvalidArgumentError):
            cache.prefetch(7)
        with pytest.raises(InvalidArgumentError):
            mgr.usage("disk")


async def test_manager_must_be_started():
    mgr = KVCacheManager(StoreConfig(LAYOUT, [DeviceTier(4 * PAGE)]))
    with pytest.raises(InvalidStateError, match="not started"):
        mgr.create_cache()
    await mgr.aclose()


async def test_closed_manager_refuses_calls_and_aclose_is_idempotent():
    mgr = KVCacheManager(StoreConfig(LAYOUT, [DeviceTier(4 * PAGE)]))
    await mgr.start()
    cache = mgr.create_cache()
    await mgr.aclose()
    await mgr.aclose()
    assert cache.status is CacheStatus.CLOSED
    with pytest.raises(InvalidStateError, match="closed"):
        mgr.create_cache()
    with pytest.raises(InvalidStateError, match="closed"):
        await mgr.start()


async def test_usage_reports_quota_and_occupancy(make_store):
    async with make_store(device=4, host=4, disk=8) as mgr:
        await new_filled_cache(mgr, 3, seed=3)
        u = mgr.usage(CacheLevel.DEVICE)
        assert (u.total_pages, u.used_pages, u.evictable_pages, u.free_pages) == (4, 3, 3, 1)
        assert mgr.quota(CacheLevel.HOST) == 4 * PAGE


async def test_suspended_pages_are_never_dropped(make_store):
    async with make_store(device=2, host=2, disk=2) as mgr:
        caches = [await new_filled_cache(mgr, 2, seed=s) for s in range(3)]
        assert sum(mgr.usage(l).used_pages for l in mgr.config.levels) == 6
        fresh = mgr.create_cache()
        await fresh.resume()
        with pytest.raises(CapacityError):
            await fresh.resize(TPP)
        assert mgr.stats()["drops"] == 0
        assert all(c.num_pages == 2 for c, _ in caches)


async def test_page_indices_is_a_cpu_tensor_unless_a_device_is_asked_for(make_store):
    async with make_store() as mgr:
        cache = mgr.create_cache()
        await cache.resume()
        await cache.resize(2 * mgr.layout.tokens_per_page)
        cpu = cache.page_indices()
        assert cpu.device.type == "cpu" and cpu.dtype == torch.int64
        on_pool = cache.page_indices(device=mgr.device_pool.device)
        assert on_pool.device == mgr.device_pool.device and torch.equal(on_pool.cpu(), cpu)
        cache.close()
