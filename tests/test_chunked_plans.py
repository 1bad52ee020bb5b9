"""Resume, prefetch and resize plan in chunks (short event-loop steps); all-or-nothing semantics hold."""

import asyncio

import torch

import pytest

import kvstore.manager as manager_module
from kvstore import CacheLevel, CacheStatus, CapacityError

from .conftest import PAGE, assert_data, levels, new_cache_on_disk, new_filled_cache, read_pages, sink_to_disk, slow_io

D, H, K = CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK


@pytest.fixture
def tiny_chunks(monkeypatch):
    monkeypatch.setattr(manager_module, "PLAN_CHUNK", 2)
    monkeypatch.setattr(manager_module, "PLAN_CHUNK_MAX", 2)


async def test_chunked_resume_from_disk_is_exact(make_store, tiny_chunks):
    async with make_store(device=12, host=12, disk=64) as mgr:
        cache, data = await new_cache_on_disk(mgr, 9, seed=1)
        await assert_data(mgr, cache, data)
        assert mgr.stats()["pages_disk_to_device"] >= 9


async def test_chunked_resume_that_cannot_fit_moves_nothing(make_store, tiny_chunks):
    async with make_store(device=6, host=8, disk=64) as mgr:
        cache, _ = await new_cache_on_disk(mgr, 5, seed=1)
        blocker = mgr.create_cache()
        await blocker.resume()
        await blocker.resize(2 * mgr.layout.tokens_per_page)  # 2 locked: 4 device slots left for 5 pages
        where, stats = cache.page_levels(), mgr.stats()
        with pytest.raises(CapacityError):
            await cache.resume()
        assert cache.page_levels() == where and mgr.stats() == stats


async def test_chunked_prefetch_moves_every_page(make_store, tiny_chunks):
    async with make_store(device=12, host=12, disk=64) as mgr:
        cache, data = await new_cache_on_disk(mgr, 7, seed=2)
        result = await cache.prefetch(H)
        assert result.complete and result.pages_moved == 7 and levels(cache) == {H: 7}
        await assert_data(mgr, cache, data)


async def test_chunked_resize_grows_and_keeps_others_data(make_store, tiny_chunks):
    async with make_store(device=8, host=8, disk=64) as mgr:
        other, data = await new_filled_cache(mgr, 6, seed=3)
        cache = mgr.create_cache()
        await cache.resume()
        await cache.resize(7 * mgr.layout.tokens_per_page)
        assert cache.num_pages == 7 and len(set(cache.page_indices().tolist())) == 7
        cache.close()
        await assert_data(mgr, other, data)


async def test_cancelled_resume_leaves_the_cache_suspended_and_consistent(make_store, tiny_chunks):
    async with make_store(device=12, host=12, disk=64, batch_bytes=PAGE) as mgr:
        cache, data = await new_cache_on_disk(mgr, 10, seed=4)
        with slow_io(mgr, 0.003):
            task = asyncio.ensure_future(cache.resume())
            while mgr.stats()["pages_disk_to_device"] < 2 and not task.done():
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert cache.status is CacheStatus.SUSPENDED
        where = cache.page_levels()
        assert where[D] + where[K] == 10 and where[K] > 0, where
        mgr.check_invariants()
        await assert_data(mgr, cache, data)


async def test_cancelled_resize_changes_nothing(make_store, tiny_chunks):
    async with make_store(device=8, host=8, disk=64, batch_bytes=PAGE) as mgr:
        other, data = await new_filled_cache(mgr, 8, seed=5)
        await mgr.set_quota(H, 2 * PAGE)  # host mostly full: growing forces writes to disk
        cache = mgr.create_cache()
        await cache.resume()
        with slow_io(mgr, 0.003):
            task = asyncio.ensure_future(cache.resize(8 * mgr.layout.tokens_per_page))
            # cancel once the first page reached disk (directly or through the host; timing decides which)
            while mgr.stats()["pages_host_to_disk"] + mgr.stats()["pages_device_to_disk"] < 1 and not task.done():
                await asyncio.sleep(0.001)
            assert not task.done(), "the resize ended before any disk write: the test no longer cancels mid-flight"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert cache.num_pages == 0 and cache.status is CacheStatus.ACTIVE
        mgr.check_invariants()
        cache.close()
        await assert_data(mgr, other, data)


async def test_two_resumes_competing_for_the_device_both_stay_exact(make_store, tiny_chunks):
    async with make_store(device=8, host=8, disk=64) as mgr:
        a, da = await new_filled_cache(mgr, 4, seed=6)
        b, db = await new_filled_cache(mgr, 4, seed=7)
        await sink_to_disk(mgr, a)
        await sink_to_disk(mgr, b)
        await asyncio.gather(a.resume(), b.resume())
        assert read_pages(mgr, a).view(-1).equal(da.view(-1)) and read_pages(mgr, b).view(-1).equal(db.view(-1))
        mgr.check_invariants()


async def test_a_batch_holds_at_most_max_batch_pages_whatever_their_size(make_store, monkeypatch):
    """Tiny pages: batch_bytes alone would put every page of a plan in one batch, settled in one long
    synchronous step; batches stop at MAX_BATCH_PAGES pages (memory and disk moves alike), and the data is
    exact."""
    from kvstore.transfer import executor as executor_module

    monkeypatch.setattr(executor_module, "MAX_BATCH_PAGES", 3)
    sizes = []
    real = executor_module.TransferExecutor._batches

    def spy(self, plan, loop):
        out = real(self, plan, loop)
        sizes.extend((b.src, b.dst, b.rows) for b in out)
        return out

    monkeypatch.setattr(executor_module.TransferExecutor, "_batches", spy)
    async with make_store(device=10, host=10, disk=64) as mgr:
        cache, data = await new_cache_on_disk(mgr, 10, seed=3)  # demoted device -> host -> disk
        await assert_data(mgr, cache, data)  # and back
        moved = [(s, d, n) for s, d, n in sizes if s is not None]
        assert {(s, d) for s, d, _ in moved} >= {(D, H), (H, K)}
        assert max(n for _, _, n in sizes) == 3  # full batches of 3, none larger


def _planned_sizes(mgr, monkeypatch) -> list[int]:
    """Pages of each plan the executor is handed from now on."""
    sizes: list[int] = []
    executor = mgr._started_executor
    submit = executor.submit

    def spy(plan, priority):
        sizes.append(len(plan))
        return submit(plan, priority)

    monkeypatch.setattr(executor, "submit", spy)
    return sizes


@pytest.mark.parametrize("budget, expected", [(10.0, [2, 16, 16, 6]), (1e-12, [2] * 20)])
async def test_plan_steps_grow_to_the_time_budget_within_their_bounds(make_store, monkeypatch, budget, expected):
    """After the first PLAN_CHUNK pages, each step plans as many pages as fit in PLAN_STEP_S at the measured
    pace, never fewer than PLAN_CHUNK nor more than PLAN_CHUNK_MAX; the data arrives exact either way."""
    monkeypatch.setattr(manager_module, "PLAN_CHUNK", 2)
    monkeypatch.setattr(manager_module, "PLAN_CHUNK_MAX", 16)
    monkeypatch.setattr(manager_module, "PLAN_STEP_S", budget)
    async with make_store(device=40, host=40) as mgr:
        cache, data = await new_filled_cache(mgr, 40, seed=3)
        filler, _ = await new_filled_cache(mgr, 40, seed=4)  # pushes the cache to the host
        filler.close()
        assert levels(cache) == {CacheLevel.HOST: 40}
        sizes = _planned_sizes(mgr, monkeypatch)
        await cache.resume()
        assert sizes == expected
        assert torch.equal(read_pages(mgr, cache), data)
