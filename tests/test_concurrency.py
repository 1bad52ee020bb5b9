"""Regression tests for the defects a concurrent stress run found: each race is made deterministic by
holding disk I/O (or the planning lock, or a worker thread) at a gate, and invariants are checked at
every await point by a watcher task while the operations run."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import numpy as np
import pytest
import torch

from kvstore import (
    CacheLevel, CacheStatus, CapacityError, DeviceTier, DiskTier, HostTier, InvalidStateError, KVCacheManager,
    StoreConfig,
)
from kvstore import manager as manager_mod

from .conftest import (
    LAYOUT, PAGE, assert_data, gated_io, io_hook, levels, until, new_cache_on_disk, new_filled_cache, read_pages,
    write_pages,
)

D, H, K = CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK
TPP = LAYOUT.tokens_per_page


@contextlib.asynccontextmanager
async def watched(mgr: KVCacheManager):
    """Check ``mgr``'s invariants at every loop iteration while the block runs (fails the test on the
    first violation, naming it)."""
    failure: list[AssertionError] = []

    async def watch() -> None:
        while True:
            try:
                mgr.check_invariants()
            except AssertionError as exc:
                failure.append(exc)
                return
            await asyncio.sleep(0)

    task = asyncio.ensure_future(watch())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if failure:
        raise failure[0]


def where_all(mgr: KVCacheManager) -> dict[int, tuple]:
    return {p.pid: (p.level, p.slot) for p in mgr._placement.pages.values()}


# ---------------------------------------------------------------------------------------------- defect 1
async def test_resume_racing_a_resize_that_demotes_its_pages(make_store):
    """b.resize() picks a's device pages as victims in the same loop iteration as a.resume() starts:
    the resume waits for that demotion and brings the pages back (never RuntimeError)."""
    async with make_store(device=6, host=8, disk=32) as mgr:
        a, da = await new_filled_cache(mgr, 2, seed=1)  # least recently used: the victims
        c, dc = await new_filled_cache(mgr, 2, seed=2)
        b, _ = await new_filled_cache(mgr, 2, seed=3)
        await b.resume()
        assert levels(a) == {D: 2}
        async with watched(mgr):
            await asyncio.gather(b.resize(4 * TPP), a.resume())
        assert a.status is CacheStatus.ACTIVE and levels(a) == {D: 2}
        assert torch.equal(read_pages(mgr, a).view(torch.uint8), da.view(torch.uint8))
        assert b.num_pages == 4 and levels(b) == {D: 4}
        a.suspend()
        b.suspend()
        await assert_data(mgr, c, dc)


# ---------------------------------------------------------------------------------------------- defects 2, 3
async def test_close_stops_every_prefetch_of_the_cache(make_store):
    """An older prefetch chained behind a newer one is stopped by close() too (was KeyError(None))."""
    async with make_store(device=8, host=8, disk=64, batch_bytes=PAGE) as mgr:
        cache, _ = await new_cache_on_disk(mgr, 4, seed=9)
        async with watched(mgr):
            with gated_io(mgr) as gate:
                first = cache.prefetch(H)
                await until(lambda: any(p.move is not None for p in cache._pages), "the first prefetch reads")
                second = cache.prefetch(D)  # waits for the first
                cache.close()
                gate.set()
                r1, r2 = await first, await second
        assert r1.cancelled and r2.cancelled and first.cancelled() and second.cancelled()
        assert sum(mgr.usage(lvl).used_pages for lvl in mgr.config.levels) == 0, "uncommitted pages freed"


async def test_resume_joins_an_older_prefetch_after_the_newest_was_cancelled(make_store):
    """The newest prefetch is cancelled while an older one waits for the planning lock: resume() must join
    the older one too, and after resume, shrink and close no hold is left (was: leaked holds, a slot lost)."""
    async with make_store(device=8, host=8, disk=64, batch_bytes=PAGE) as mgr:
        cache, data = await new_cache_on_disk(mgr, 4, seed=4)
        async with watched(mgr):
            async with mgr._plan_lock:  # every planning step waits
                older = cache.prefetch(H)
                newer = cache.prefetch(D)
                await asyncio.sleep(0.01)
                newer.cancel()
                assert (await newer).cancelled
                resuming = asyncio.ensure_future(cache.resume())
                await asyncio.sleep(0.01)
                assert not resuming.done(), "resume() returned while an older prefetch was in flight"
            await resuming
            assert older.done() and not (await older).cancelled
            assert torch.equal(read_pages(mgr, cache).view(torch.uint8), data.view(torch.uint8))
            await cache.resize(1 * TPP)
            cache.suspend()
            cache.close()
        for lvl in mgr.config.levels:
            u = mgr.usage(lvl)
            assert u.used_pages == 0 and u.free_pages == u.total_pages, f"slot leaked on {lvl.name}"


async def test_check_invariants_counts_holds(make_store):
    async with make_store() as mgr:
        cache, _ = await new_filled_cache(mgr, 2, seed=1)
        page = cache._pages[0]
        page.holds += 1  # a hold no operation owns
        mgr._placement.sync(page)
        with pytest.raises(AssertionError, match="holds"):
            mgr.check_invariants()
        page.holds -= 1
        mgr._placement.sync(page)


# ---------------------------------------------------------------------------------------------- defect 4
@pytest.mark.parametrize("interleave_at", [0, 1, 2, 3])
async def test_resume_raises_capacity_error_only_before_moving(make_store, monkeypatch, interleave_at):
    """The room a resume counts on (here: droppable committed pages) cannot be taken by a create_cache()
    between its planning steps: it succeeds, or raises CapacityError with nothing moved."""
    monkeypatch.setattr(manager_mod, "PLAN_CHUNK", 1)
    monkeypatch.setattr(manager_mod, "PLAN_CHUNK_MAX", 1)
    async with make_store(device=2, host=2, disk=2) as mgr:
        x, dx = await new_cache_on_disk(mgr, 2, seed=5)  # fills the disk level
        prompts = []
        for s in range(2):  # two committed one-page prefixes, closed: droppable, on the host
            toks = np.arange(s * 100, s * 100 + TPP)
            q = mgr.create_cache()
            await q.resume()
            await q.resize(TPP)
            write_pages(mgr, q, seed=50 + s)
            q.commit(toks)
            q.suspend()
            q.close()
            prompts.append(toks)
        await new_filled_cache(mgr, 2, seed=6)  # a suspended cache on the device: its pages go to the host
        assert levels(x) == {K: 2} and mgr.usage(H).used_pages == 2
        before = where_all(mgr)
        task = asyncio.ensure_future(x.resume())
        for _ in range(interleave_at):
            await asyncio.sleep(0)
        taken = [mgr.create_cache(t) for t in prompts]  # owns whatever committed page is still there
        try:
            await task
        except CapacityError:
            assert where_all(mgr) == {pid: w for pid, w in before.items() if pid in where_all(mgr)}, (
                "CapacityError after pages moved"
            )
        else:
            assert levels(x) == {D: 2}
            assert torch.equal(read_pages(mgr, x).view(torch.uint8), dx.view(torch.uint8))
            x.suspend()
        for t in taken:
            t.close()
        mgr.check_invariants()


# ---------------------------------------------------------------------------------------------- defect 5
@contextlib.contextmanager
def held_thread(obj, name: str):
    """Make method ``name`` of ``obj``'s class wait (on its worker thread) until the yielded event is set;
    the second yielded event is set when the method was entered."""
    go, entered = threading.Event(), threading.Event()
    cls = type(obj)
    original = getattr(cls, name)

    def slow(self, *args, **kw):
        entered.set()
        go.wait(10)
        return original(self, *args, **kw)

    setattr(cls, name, slow)
    try:
        yield go, entered
    finally:
        go.set()
        setattr(cls, name, original)


async def test_cancelled_device_grow_changes_nothing(make_store):
    async with make_store(device=2) as mgr:
        cache, data = await new_filled_cache(mgr, 2, seed=1)
        pool = mgr.device_pool
        with held_thread(mgr._device, "resized") as (go, entered):
            task = asyncio.ensure_future(mgr.set_quota(D, 6 * PAGE))
            await until(entered.is_set, "the bigger pool is being built")
            task.cancel()
            await asyncio.sleep(0.01)
            go.set()
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.sleep(0.05)  # the worker thread finished: nothing may be swapped in later
        assert mgr.device_pool is pool and mgr.quota(D) == 2 * PAGE and mgr.device_pool.shape[0] == 2
        mgr.check_invariants()
        await assert_data(mgr, cache, data)
        await mgr.set_quota(D, 6 * PAGE)  # and a later grow works
        assert mgr.device_pool.shape[0] == 6
        await assert_data(mgr, cache, data)


async def test_cancelled_host_shrink_before_the_change_keeps_the_quota(make_store):
    async with make_store(device=2, host=8, disk=32, batch_bytes=PAGE) as mgr:
        caches = [await new_filled_cache(mgr, 2, seed=s) for s in range(4)]  # 6 pages on the host
        with gated_io(mgr) as gate:  # the evictions to disk wait
            task = asyncio.ensure_future(mgr.set_quota(H, 2 * PAGE))
            await until(lambda: any(p.move is not None for c, _ in caches for p in c._pages), "evictions start")
            task.cancel()
            gate.set()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert mgr.quota(H) == 8 * PAGE and mgr.usage(H).total_pages == 8
        mgr.check_invariants()
        for cache, data in caches:
            await assert_data(mgr, cache, data)


async def test_host_shrink_cancelled_after_the_change_completes(make_store):
    """A cancellation that arrives once the quota changed (memory being given back) lets it finish: the
    call returns normally and the quota is the new one (was: CancelledError with the quota changed)."""
    async with make_store(device=2, host=8, disk=32) as mgr:
        cache, data = await new_filled_cache(mgr, 2, seed=1)
        with held_thread(mgr._host, "free") as (go, entered):
            task = asyncio.ensure_future(mgr.set_quota(H, 4 * PAGE))
            await until(entered.is_set, "the host memory is being given back")
            task.cancel()
            await asyncio.sleep(0.01)
            go.set()
            await task  # no CancelledError
        assert mgr.quota(H) == 4 * PAGE and mgr._host.slots == 4
        mgr.check_invariants()
        await assert_data(mgr, cache, data)


# ---------------------------------------------------------------------------------------------- defects 6, 7
async def test_every_call_during_or_after_aclose_gets_invalid_state(make_store):
    async with make_store(device=4, host=4, disk=32) as mgr:
        cache = mgr.create_cache()
        await cache.resume()
        other, _ = await new_filled_cache(mgr, 1, seed=1)
        with gated_io(mgr) as gate:
            closing = asyncio.ensure_future(mgr.aclose())
            await asyncio.sleep(0)
            with pytest.raises(InvalidStateError):
                await cache.resize(8)  # was AttributeError
            with pytest.raises(InvalidStateError):
                await other.resume()
            with pytest.raises(InvalidStateError):
                await mgr.set_quota(H, 8 * PAGE)
            with pytest.raises(InvalidStateError):
                mgr.create_cache()
            gate.set()
            await closing
        with pytest.raises(InvalidStateError):
            await cache.resize(8)
        with pytest.raises(InvalidStateError):
            await other.resume()


async def test_resize_queued_behind_set_quota_stops_at_aclose_and_recovery_is_exact(tmp_path):
    """A resize waiting behind a set_quota when aclose() starts must not plan after the journal closed:
    the persistent tier then recovers exactly the committed pages that were on disk at close."""
    d = tmp_path / "disk"
    cfg = StoreConfig(LAYOUT, [DeviceTier(4 * PAGE), HostTier(4 * PAGE), DiskTier(64 * PAGE, d, persistent=True)],
                      batch_bytes=PAGE)
    on_disk_at_close: list[int] = []
    async with KVCacheManager(cfg) as mgr:
        for s in range(6):  # committed pages, most of them demoted to disk
            c = mgr.create_cache()
            await c.resume()
            await c.resize(2 * TPP)
            write_pages(mgr, c, seed=s)
            c.commit(np.arange(s * 1000, s * 1000 + 2 * TPP))
            c.suspend()
            c.close()
        active = mgr.create_cache()
        await active.resume()
        original_close = mgr._catalog.close

        async def close_and_count() -> None:
            pl = mgr._placement
            on_disk_at_close.append(sum(1 for p in pl.pages.values() if p.level == K and p.indexed))
            await original_close()

        mgr._catalog.close = close_and_count
        with gated_io(mgr) as gate:
            quota = asyncio.ensure_future(mgr.set_quota(H, 1 * PAGE))  # evicts host pages to disk: held
            await asyncio.sleep(0.01)
            resize = asyncio.ensure_future(active.resize(4 * TPP))  # waits behind the quota change
            await asyncio.sleep(0)
            closing = asyncio.ensure_future(mgr.aclose())
            await asyncio.sleep(0.01)
            gate.set()
            await quota
            with pytest.raises(InvalidStateError):
                await resize
            await closing
    async with KVCacheManager(cfg) as mgr:
        recovered = sum(1 for p in mgr._placement.pages.values() if p.level == K and p.indexed)
        assert recovered == on_disk_at_close[0]
        mgr.check_invariants()


# ---------------------------------------------------------------------------------------------- defect 8
async def test_invariants_hold_at_every_await_of_a_resize(make_store):
    async with make_store(device=4, host=4, disk=64, batch_bytes=PAGE) as mgr:
        for s in range(3):
            await new_filled_cache(mgr, 2, seed=s)
        cache = mgr.create_cache()
        await cache.resume()
        async with watched(mgr):
            with gated_io(mgr) as gate:
                task = asyncio.ensure_future(cache.resize(4 * TPP))
                await asyncio.sleep(0.02)
                gate.set()
                await task
        assert cache.num_pages == 4


async def test_failed_victim_write_aborts_the_moves_that_wait_for_it(make_store):
    """A demotion to disk fails: every move waiting for the slots it would vacate is rolled back in the
    same step (never two moves reserving one slot, nor a reserved slot the allocator calls free), also
    when the victim's cache is closed meanwhile."""
    async with make_store(device=2, host=2, disk=64, batch_bytes=PAGE) as mgr:
        victims = [await new_filled_cache(mgr, 1, seed=s) for s in range(4)]  # device 2, host 2
        cache = mgr.create_cache()
        await cache.resume()
        go = threading.Event()

        def hook(op, off, n):
            go.wait(5)
            if op == "write":
                raise OSError(5, "injected write error")

        async with watched(mgr):
            with io_hook(mgr, hook):
                task = asyncio.ensure_future(cache.resize(2 * TPP))  # host pages -> disk, device -> host
                await until(lambda: any(p.move is not None for v, _ in victims for p in v._pages), "moves planned")
                for v, _ in victims[:2]:
                    v.close()  # orphans while their moves are in flight
                await asyncio.sleep(0.01)
                go.set()
                with pytest.raises(Exception) as info:
                    await task
        assert "injected" in str(info.value) or isinstance(info.value, OSError)
        assert cache.num_pages == 0
        for v, data in victims[2:]:
            await assert_data(mgr, v, data)


# ---------------------------------------------------------------------------------------------- defect 9
async def test_cancelling_the_awaiter_does_not_cancel_the_prefetch(make_store):
    async with make_store(device=8, host=8, disk=64, batch_bytes=PAGE) as mgr:
        cache, data = await new_cache_on_disk(mgr, 3, seed=3)
        with gated_io(mgr) as gate:
            task = cache.prefetch(H)
            waiter = asyncio.ensure_future(asyncio.wait_for(task, 0.01))
            with pytest.raises(asyncio.TimeoutError):
                await waiter
            assert not task.done(), "the awaiter's timeout stopped the prefetch"
            gate.set()
            res = await task
        assert res.complete and not res.cancelled and not task.cancelled()
        await assert_data(mgr, cache, data)


async def test_prefetch_cancelled_before_it_started(make_store):
    async with make_store() as mgr:
        cache, _ = await new_filled_cache(mgr, 2, seed=1)
        task = cache.prefetch(H)
        assert task.cancel()
        res = await task
        assert res.cancelled and res.pages_moved == 0 and res.complete  # both pages are on the device
        assert task.cancelled() and task.result() == res
        mgr.check_invariants()


# ---------------------------------------------------------------------------------------------- defect 10
async def test_resume_waits_for_room_a_prefetch_only_holds(make_store):
    """Another cache's prefetch holds every device slot while its reads are in flight: resume() waits for
    that room (stopping the prefetch's transfers that have not started) instead of CapacityError."""
    async with make_store(device=4, host=4, disk=64, batch_bytes=PAGE) as mgr:
        a, da = await new_cache_on_disk(mgr, 4, seed=1)
        b, db = await new_cache_on_disk(mgr, 4, seed=2)
        with gated_io(mgr) as gate:
            pf = a.prefetch(D)
            await until(lambda: any(p.move is not None for p in a._pages), "the prefetch planned its reads")
            resuming = asyncio.ensure_future(b.resume())
            await asyncio.sleep(0.01)
            assert not resuming.done(), "resume() gave up while room was only held"
            gate.set()
            await resuming
        res = await pf
        assert not res.cancelled
        assert b.status is CacheStatus.ACTIVE and levels(b) == {D: 4}
        assert torch.equal(read_pages(mgr, b).view(torch.uint8), db.view(torch.uint8))
        assert mgr.stats()["room_waits"] >= 1
        b.suspend()
        await assert_data(mgr, a, da)


async def test_resume_that_can_never_fit_still_raises(make_store):
    async with make_store(device=4, host=4, disk=64) as mgr:
        cache, _ = await new_cache_on_disk(mgr, 2, seed=3)
        holder = mgr.create_cache()
        await holder.resume()
        await holder.resize(3 * TPP)  # 3 device pages locked
        before = where_all(mgr)
        with pytest.raises(CapacityError):
            await asyncio.wait_for(cache.resume(), 5)
        assert where_all(mgr) == before and cache.status is CacheStatus.SUSPENDED


async def test_two_resumes_waiting_for_each_others_room_do_not_deadlock(make_store):
    async with make_store(device=4, host=8, disk=64, batch_bytes=PAGE) as mgr:
        a, da = await new_cache_on_disk(mgr, 3, seed=1)
        b, db = await new_cache_on_disk(mgr, 3, seed=2)
        results = await asyncio.wait_for(asyncio.gather(a.resume(), b.resume(), return_exceptions=True), 10)
        ok = [r is None for r in results]
        assert ok.count(True) == 1 and isinstance(results[ok.index(False)], CapacityError), results
        winner, data = (a, da) if ok[0] else (b, db)
        assert torch.equal(read_pages(mgr, winner).view(torch.uint8), data.view(torch.uint8))
        winner.suspend()
        mgr.check_invariants()


async def test_rows_of_a_closed_cache_are_not_reused_while_its_prefetch_still_holds_them(make_store):
    """close() under a running prefetch: the cache's pages stay (held) until the prefetch lets go, so a new
    page never takes a row the prefetch will release, even with no never-used row left; once it lets go they
    are freed, and nothing else changed."""
    async with make_store(device=8, host=8, disk=64, batch_bytes=PAGE) as mgr:
        cache, _ = await new_cache_on_disk(mgr, 4, seed=11)
        table = mgr._placement.table
        rows = cache._pages.pids.copy()
        with gated_io(mgr) as gate:
            task = cache.prefetch(H)
            await until(lambda: any(p.move is not None for p in cache._pages), "the prefetch reads")
            cache.close()
            assert table.live[rows].all(), "held pages outlive their last owner"
            table._free = table._free[:0]  # the next pages take freed rows first, if there are any
            other, data = await new_filled_cache(mgr, 4, seed=12)
            assert not np.isin(other._pages.pids, rows).any()
            mgr.check_invariants()
            gate.set()
            assert (await task).cancelled
        mgr.check_invariants()
        assert not table.live[rows].any(), "freed once the prefetch let go"
        await assert_data(mgr, other, data)
