"""Byte-exact round trips of random page data through device -> host -> disk -> device."""

import asyncio

import pytest
import torch

from kvstore import CacheLevel, PageLayout

from .conftest import assert_data, levels, new_filled_cache, read_pages, until


@pytest.mark.parametrize(
    "layout",
    [
        PageLayout(2, 2, 16, 4, torch.float16),
        PageLayout(3, 1, 24, 5, torch.bfloat16),  # page not a multiple of 4 KiB on disk
        PageLayout(1, 4, 64, 16, torch.float32),  # 32 KiB pages
    ],
    ids=["fp16", "bf16-odd", "fp32-32k"],
)
async def test_pages_survive_demotion_to_disk_and_back(make_store, layout):
    async with make_store(device=4, host=4, disk=32, layout=layout) as mgr:
        caches = [await new_filled_cache(mgr, 3, seed=s) for s in range(6)]
        assert levels(caches[0][0]) == {CacheLevel.DISK: 3}, "the oldest cache was demoted all the way"
        for cache, data in caches:
            await assert_data(mgr, cache, data)
        s = mgr.stats()
        assert s["pages_host_to_disk"] > 0 and s["pages_disk_to_device"] > 0 and s["pages_device_to_host"] > 0


async def test_round_trip_without_host_tier(make_store):
    async with make_store(device=3, host=0, disk=16) as mgr:
        caches = [await new_filled_cache(mgr, 2, seed=s) for s in range(4)]
        assert mgr.stats()["pages_device_to_disk"] > 0
        for cache, data in caches:
            await assert_data(mgr, cache, data)


async def test_round_trip_without_disk_tier(make_store):
    async with make_store(device=3, host=6, disk=0) as mgr:
        caches = [await new_filled_cache(mgr, 3, seed=s) for s in range(3)]
        for cache, data in caches:
            await assert_data(mgr, cache, data)
        assert "bytes_host_to_disk" not in mgr.stats()


async def test_swap_between_full_device_and_full_host_keeps_data(make_store):
    # device and host both full: resuming a host-resident cache swaps it with device victims
    async with make_store(device=3, host=3, disk=0) as mgr:
        a, da = await new_filled_cache(mgr, 3, seed=1)
        b, db = await new_filled_cache(mgr, 3, seed=2)
        assert levels(a) == {CacheLevel.HOST: 3} and levels(b) == {CacheLevel.DEVICE: 3}
        for _ in range(3):
            await assert_data(mgr, a, da)
            mgr.check_invariants()
            await assert_data(mgr, b, db)
            mgr.check_invariants()


async def test_scattered_device_slots_round_trip(make_store):
    async with make_store(device=8, host=8, disk=32) as mgr:
        caches = [await new_filled_cache(mgr, 1, seed=s) for s in range(8)]
        for cache, _ in caches[::2]:  # free every other slot
            cache.close()
        big, data = await new_filled_cache(mgr, 4, seed=99)
        await big.resume()
        slots = sorted(big.page_indices().tolist())
        assert slots != list(range(slots[0], slots[0] + 4)), "the pages sit in scattered slots"
        assert torch.equal(read_pages(mgr, big).view(torch.uint8), data.view(torch.uint8))
        big.suspend()
        for cache, d in caches[1::2]:
            await assert_data(mgr, cache, d)


def _plans(mgr) -> list:
    """The promotion plans ``mgr`` makes from now on (appended as made)."""
    made = []
    pl = mgr._placement
    real = pl.plan_promotion
    pl.plan_promotion = lambda *a, **k: made.append(real(*a, **k)) or made[-1]
    return made


async def _cancel_resume_at_its_first_copy(mgr, cache) -> None:
    """Resume ``cache``, hold the plan's first copy (a swap batch staging its victims) at a gate, cancel the
    resume there, then open the gate; the resume raises CancelledError."""
    copier = mgr._executor.copier
    real = copier.copy
    gate, entered = asyncio.Event(), asyncio.Event()

    async def gated(segments, lane, after=None):
        if not entered.is_set():
            entered.set()
            await gate.wait()
        return await real(segments, lane, after)

    copier.copy = gated
    try:
        task = asyncio.ensure_future(cache.resume())
        await until(entered.is_set, "the first swap batch is staging")
        task.cancel()
        await asyncio.sleep(0)
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        copier.copy = real


async def test_resume_swaps_many_pages_at_once_and_keeps_data(make_store):
    # device and host both full: resuming the host-resident cache swaps 8 pages, planned as multi-page moves
    async with make_store(device=8, host=8, disk=0) as mgr:
        a, da = await new_filled_cache(mgr, 8, seed=1)
        b, db = await new_filled_cache(mgr, 8, seed=2)
        assert levels(a) == {CacheLevel.HOST: 8} and levels(b) == {CacheLevel.DEVICE: 8}
        plans = _plans(mgr)
        for _ in range(2):
            await assert_data(mgr, a, da)
            mgr.check_invariants()
            await assert_data(mgr, b, db)
            mgr.check_invariants()
        swaps = [m for plan in plans for m in plan.moves if m.swap]
        assert len(swaps) == 4 and all(len(m.pages) == 8 for m in swaps)  # one 8-page swap move per resume
        assert mgr.stats()["pages_device_to_host"] >= 4 * 8


async def test_failed_promotions_of_a_multi_page_swap_restore_their_victims(make_store):
    """Batches of 2 pages: the second promotion batch fails, so its swap batch writes its 2 victims back
    from staging while the other swaps land; every byte of both caches stays exact."""
    layout = PageLayout(2, 2, 16, 4, torch.float16)
    async with make_store(device=6, host=6, disk=0, layout=layout, batch_bytes=2 * layout.page_bytes) as mgr:
        ex = mgr._executor
        ex.memory_batch_rows = ex.batch_rows  # promotions in batches of 2 too, one per swap move
        a, da = await new_filled_cache(mgr, 6, seed=1)
        b, db = await new_filled_cache(mgr, 6, seed=2)
        assert levels(a) == {CacheLevel.HOST: 6} and levels(b) == {CacheLevel.DEVICE: 6}
        plans = _plans(mgr)
        real = ex._transfer
        calls = []

        async def failing(src, dst, *args):
            calls.append((src, dst))
            if (src, dst) == (CacheLevel.HOST, CacheLevel.DEVICE) and calls.count((src, dst)) == 2:
                raise RuntimeError("injected promotion failure")
            return await real(src, dst, *args)

        ex._transfer = failing
        with pytest.raises(RuntimeError, match="injected promotion failure"):
            await a.resume()
        ex._transfer = real
        swaps = [m for m in plans[0].moves if m.swap]
        assert [len(m.pages) for m in swaps] == [2, 2, 2]
        states = [st.value for m in swaps for st in m.state]
        assert states.count("aborted") >= 2 and states.count("done") >= 2  # restored from staging / swapped
        mgr.check_invariants()
        assert levels(a)[CacheLevel.HOST] >= 2 and levels(b)[CacheLevel.DEVICE] >= 2
        await assert_data(mgr, b, db)
        await assert_data(mgr, a, da)
        mgr.check_invariants()


async def test_resume_cancelled_while_its_swap_victims_are_staged_restores_them(make_store):
    """The resume is cancelled while its 8-page swap batch copies the victims to staging (held at a gate):
    the promotion batch, stopped, never runs, so every staged victim is written back to its device slot."""
    async with make_store(device=8, host=8, disk=0) as mgr:
        a, da = await new_filled_cache(mgr, 8, seed=1)
        b, db = await new_filled_cache(mgr, 8, seed=2)
        plans = _plans(mgr)
        await _cancel_resume_at_its_first_copy(mgr, a)
        (swap,) = [m for m in plans[0].moves if m.swap]
        assert len(swap.pages) == 8 and [st.value for st in swap.state] == ["aborted"] * 8
        assert levels(a) == {CacheLevel.HOST: 8} and levels(b) == {CacheLevel.DEVICE: 8}
        mgr.check_invariants()
        await assert_data(mgr, b, db)
        await assert_data(mgr, a, da)


async def test_swaps_beyond_the_swap_buffers_wait_for_one_and_keep_data(make_store, monkeypatch):
    """One swap buffer of 2 pages, an 8-page swap: each swap batch is paired with its own promotion batch and
    waits for the buffer, so the resume makes no temporary pinned buffer, and every byte stays exact."""
    layout = PageLayout(2, 2, 16, 4, torch.float16)
    async with make_store(device=8, host=8, disk=0, layout=layout, batch_bytes=2 * layout.page_bytes,
                          staging_buffers=1, swap_buffers=1) as mgr:
        ex = mgr._executor
        a, da = await new_filled_cache(mgr, 8, seed=1)
        b, db = await new_filled_cache(mgr, 8, seed=2)
        kinds = ex.staging._kinds
        made, real_make, kept = [], ex.staging._make, kinds["io"].made + kinds["swap"].made  # prepared if pinned
        monkeypatch.setattr(ex.staging, "_make", lambda: made.append(1) or real_make())
        real_batches, batches = ex._batches, []
        monkeypatch.setattr(ex, "_batches", lambda plan, loop: batches.extend(real_batches(plan, loop)) or
                            [x for x in batches if x.moves[0] in plan.moves])
        await assert_data(mgr, a, da)
        swaps = [x for x in batches if x.swap]
        assert len(swaps) == 4 and all(x.rows == 2 and x.may_wait for x in swaps)
        promos = [x for x in batches if x.linked]
        assert [x.read_deps for x in promos] == [{x} for x in swaps]  # one promotion batch per swap batch
        assert kinds["swap"].made == 1, "one swap buffer, made once"
        assert len(made) == kinds["io"].made + kinds["swap"].made - kept, "every buffer made is kept: no temporary"
        assert levels(a) == {CacheLevel.DEVICE: 8} and levels(b) == {CacheLevel.HOST: 8}
        await assert_data(mgr, b, db)
        mgr.check_invariants()


async def test_resume_cancelled_while_swaps_wait_for_the_swap_buffer_restores_everything(make_store):
    """The first of four paired swap batches holds the only swap buffer at a gate while the others wait for it;
    the resume is cancelled: the waiting batches abort on getting the buffer, the first restores its victims,
    and both caches keep every byte."""
    layout = PageLayout(2, 2, 16, 4, torch.float16)
    async with make_store(device=8, host=8, disk=0, layout=layout, batch_bytes=2 * layout.page_bytes,
                          staging_buffers=1, swap_buffers=1) as mgr:
        a, da = await new_filled_cache(mgr, 8, seed=1)
        b, db = await new_filled_cache(mgr, 8, seed=2)
        plans = _plans(mgr)
        await _cancel_resume_at_its_first_copy(mgr, a)
        swaps = [m for m in plans[0].moves if m.swap]
        assert len(swaps) == 4 and all(st.value == "aborted" for m in swaps for st in m.state)
        assert levels(a) == {CacheLevel.HOST: 8} and levels(b) == {CacheLevel.DEVICE: 8}
        mgr.check_invariants()
        await assert_data(mgr, b, db)
        await assert_data(mgr, a, da)
        mgr.check_invariants()
