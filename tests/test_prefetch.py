"""prefetch(): awaitable, cancellable, never demotes its own pages, joined by resume()."""

import asyncio

import pytest
import torch

from kvstore import CacheLevel, CacheStatus, InvalidStateError, PrefetchResult

from .conftest import PAGE, assert_data, gated_io, levels, new_cache_on_disk, new_filled_cache, read_pages, slow_io

D, H, K = CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK


@pytest.mark.parametrize("target", [D, H])
async def test_prefetch_moves_every_colder_page_to_the_target(make_store, target):
    async with make_store(device=4, host=4, disk=32) as mgr:
        cache, data = await new_cache_on_disk(mgr, 3, seed=7)
        result = await cache.prefetch(target)
        assert isinstance(result, PrefetchResult)
        assert result.complete and result.pages_moved == 3 and result.bytes_moved == 3 * PAGE
        assert levels(cache) == {target: 3}
        assert cache.status is CacheStatus.SUSPENDED
        mgr.check_invariants()
        await assert_data(mgr, cache, data)


async def test_prefetch_to_disk_moves_nothing(make_store):
    async with make_store() as mgr:
        cache, _ = await new_filled_cache(mgr, 2, seed=1)
        result = await cache.prefetch(K)
        assert result.complete and result.pages_moved == 0
        assert levels(cache) == {D: 2}, "prefetch never demotes"


async def test_prefetched_pages_stay_evictable(make_store):
    async with make_store(device=4, host=4, disk=32) as mgr:
        cache, _ = await new_cache_on_disk(mgr, 3, seed=7)
        await cache.prefetch(H)
        assert mgr.usage(H).evictable_pages == mgr.usage(H).used_pages


async def test_prefetch_touches_pages_already_hot(make_store):
    async with make_store(device=4, host=4, disk=32) as mgr:
        old, _ = await new_filled_cache(mgr, 2, seed=1)
        new, _ = await new_filled_cache(mgr, 2, seed=2)
        await old.prefetch(D)  # old becomes most recently used on the device
        await new_filled_cache(mgr, 2, seed=3)  # needs 2 device slots: evicts `new`, not `old`
        assert levels(old) == {D: 2} and levels(new) == {H: 2}


async def test_prefetch_that_cannot_fit_is_incomplete_but_valid(make_store):
    async with make_store(device=4, host=4, disk=32) as mgr:
        cache, data = await new_cache_on_disk(mgr, 3, seed=7)
        await mgr.set_quota(H, 2 * PAGE)
        result = await cache.prefetch(H)
        assert not result.complete and result.pages_moved == 2
        assert levels(cache) == {H: 2, K: 1}
        mgr.check_invariants()
        await cache.prefetch(K)
        assert cache.status is CacheStatus.SUSPENDED


async def test_result_before_done_raises_and_done_reports(make_store):
    async with make_store() as mgr:
        cache, _ = await new_cache_on_disk(mgr, 3, seed=7)
        task = cache.prefetch(D)
        assert not task.done()
        with pytest.raises(InvalidStateError, match="still running"):
            task.result()
        res = await task
        assert task.done() and task.result() == res


async def test_cancelled_prefetch_leaves_each_page_at_old_or_new_level(make_store):
    async with make_store(device=16, host=16, disk=64, batch_bytes=PAGE) as mgr:
        cache, data = await new_cache_on_disk(mgr, 12, seed=5)
        with slow_io(mgr, 0.005):
            task = cache.prefetch(H)
            while mgr.stats()["pages_disk_to_host"] < 3 and not task.done():
                await asyncio.sleep(0.001)
            task.cancel()
            res = await task  # a stopped prefetch gives a result, never CancelledError into this coroutine
        assert task.cancelled() and res.cancelled and not res.complete
        where = cache.page_levels()
        assert where[H] + where[K] == 12 and 3 <= where[H] < 12, where
        assert res.pages_moved == where[H] and res.bytes_moved == where[H] * PAGE
        mgr.check_invariants()
        await assert_data(mgr, cache, data)


async def test_resume_joins_in_flight_prefetch_reading_disk_once(make_store):
    async with make_store(device=8, host=8, disk=64, batch_bytes=PAGE) as mgr:
        cache, data = await new_cache_on_disk(mgr, 6, seed=9)
        before = mgr.stats()
        with gated_io(mgr) as gate:
            task = cache.prefetch(H)
            while not any(p.move is not None for p in cache._pages):  # the prefetch has planned its reads
                await asyncio.sleep(0)
            resuming = asyncio.ensure_future(cache.resume())
            await asyncio.sleep(0.01)
            assert not task.done() and not resuming.done(), "the resume must start while the prefetch reads"
            gate.set()
            await resuming
        after = mgr.stats()
        read_from_disk = sum(after[f"pages_disk_to_{l}"] - before[f"pages_disk_to_{l}"] for l in ("host", "device"))
        assert read_from_disk == 6, "every page read from disk exactly once"
        assert (await task).complete
        assert torch.equal(read_pages(mgr, cache).view(torch.uint8), data.view(torch.uint8))


async def test_close_cancels_prefetch(make_store):
    async with make_store(device=8, host=8, disk=64, batch_bytes=PAGE) as mgr:
        cache, _ = await new_cache_on_disk(mgr, 6, seed=9)
        with gated_io(mgr) as gate:
            task = cache.prefetch(H)
            await asyncio.sleep(0.002)
            cache.close()  # while its reads are held up
            gate.set()
            res = await task
        assert res.cancelled and task.cancelled()
        mgr.check_invariants()
        assert sum(mgr.usage(l).used_pages for l in mgr.config.levels) == 0, "uncommitted pages freed"


async def test_prefetch_never_demotes_its_own_pages(make_store):
    async with make_store(device=3, host=3, disk=32) as mgr:
        cache, data = await new_filled_cache(mgr, 3, seed=1)
        await new_filled_cache(mgr, 3, seed=2)
        await new_filled_cache(mgr, 3, seed=3)
        assert levels(cache) == {K: 3}
        await mgr.set_quota(D, PAGE)  # device too small for the whole cache
        result = await cache.prefetch(D)
        assert not result.complete and result.pages_moved == 1
        assert cache.page_levels()[D] == 1 and cache.page_levels()[K] == 2, "no page of the cache demoted"
        mgr.check_invariants()


async def test_aclose_cancels_prefetches(make_store, tmp_path):
    async with make_store(device=8, host=8, disk=64, batch_bytes=PAGE) as mgr:
        cache, _ = await new_cache_on_disk(mgr, 6, seed=9)
        with gated_io(mgr) as gate:
            task = cache.prefetch(H)
            await asyncio.sleep(0.002)
            closing = asyncio.ensure_future(mgr.aclose())  # cancels the prefetch while its reads are held up
            await asyncio.sleep(0.002)
            gate.set()
            await closing
        assert task.cancelled() and (await task).cancelled
        assert cache.status is CacheStatus.CLOSED


async def test_prefetches_counter(make_store):
    async with make_store() as mgr:
        cache, _ = await new_filled_cache(mgr, 1, seed=1)
        await cache.prefetch(D)
        await cache.prefetch(H)
        assert mgr.stats()["prefetches"] == 2
