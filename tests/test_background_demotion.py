"""Room made ahead of demand: with ``StoreConfig.free_target`` a background task keeps that fraction of
every level but the last free, demoting eviction candidates one level down (never dropping), at background
priority, as an operation that resumes and resizes wait for instead of failing."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kvstore import CacheLevel, ConfigError, DeviceTier, HostTier, KVCacheManager, StoreConfig

from .conftest import LAYOUT, assert_data, gated_io, levels, new_filled_cache, read_pages, until

D, H, K = CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK
TPP = LAYOUT.tokens_per_page


def demoting(mgr: KVCacheManager) -> bool:
    return any(op.kind == "demote" for op in mgr._ledger.ops)


async def test_suspended_pages_are_demoted_until_the_target_is_free(make_store):
    async with make_store(device=8, host=8, disk=0, free_target=0.5) as mgr:
        a, da = await new_filled_cache(mgr, 6, seed=1)  # 2 free on the device: 2 more must go
        await until(lambda: mgr.usage(D).free_pages >= 4 and not demoting(mgr), "4 device pages are free")
        assert levels(a) == {D: 4, H: 2}
        assert mgr.stats()["background_demotions"] == 2
        assert mgr.stats()["pages_device_to_host"] == 2
        mgr.check_invariants()
        await assert_data(mgr, a, da)  # resumed back: the bytes went down and up exactly


async def test_the_least_recently_used_pages_go_first_and_nothing_active_moves(make_store):
    async with make_store(device=8, host=8, disk=0, free_target=0.25) as mgr:
        old, _ = await new_filled_cache(mgr, 2, seed=1)
        new, _ = await new_filled_cache(mgr, 2, seed=2)
        active = mgr.create_cache()
        await active.resume()
        await active.resize(3 * TPP)  # 1 slot free: the target (2) needs one demotion
        await until(lambda: mgr.usage(D).free_pages >= 2 and not demoting(mgr), "2 device pages are free")
        assert levels(old) == {D: 1, H: 1} and levels(new) == {D: 2} and levels(active) == {D: 3}


async def test_a_resize_admitted_after_the_demotion_plans_no_victim(make_store):
    async with make_store(device=8, host=8, disk=0, free_target=0.5) as mgr:
        await new_filled_cache(mgr, 8, seed=1)  # the device is full when it is suspended
        await until(lambda: mgr.usage(D).free_pages >= 4 and not demoting(mgr), "4 device pages are free")
        before = mgr.stats()
        c = mgr.create_cache()
        await c.resume()
        await c.resize(4 * TPP)
        await until(lambda: not demoting(mgr), "the next background demotion ended")
        after = mgr.stats()
        moved = after["pages_device_to_host"] - before["pages_device_to_host"]
        # the room was made ahead of demand: every demotion since was a background one (refilling the target)
        assert moved == after["background_demotions"] - before["background_demotions"] == 4
        c.suspend()


async def test_it_never_drops_committed_pages_nor_cascades(make_store):
    async with make_store(device=4, host=2, disk=0, free_target=0.75) as mgr:
        a, _ = await new_filled_cache(mgr, 4, seed=1)
        a.commit(list(range(4 * TPP)))
        await until(lambda: mgr.usage(H).free_pages == 0 and not demoting(mgr), "the host level is full")
        await asyncio.sleep(0.01)
        assert levels(a) == {D: 2, H: 2}  # the host is full: the other two stay
        assert mgr.stats()["drops"] == 0


async def test_a_resume_waits_for_the_demotion_in_flight_instead_of_failing(make_store):
    """The device is full of a's pages, which the demoter is moving to disk-backed host room; b's resume
    needs that room: it waits for the background operation and succeeds."""
    async with make_store(device=4, host=4, disk=8, free_target=0.5) as mgr:
        b, db = await new_filled_cache(mgr, 4, seed=2)
        with gated_io(mgr) as gate:  # the host -> disk demotions hold at the gate
            a, da = await new_filled_cache(mgr, 4, seed=1)  # b -> host, the device full of a
            await until(lambda: demoting(mgr), "a background demotion of b's host pages to disk is in flight")
            resume = asyncio.ensure_future(b.resume())
            await asyncio.sleep(0.05)
            assert not resume.done()
            gate.set()
            await asyncio.wait_for(resume, 10)
        assert torch.equal(read_pages(mgr, b), db)
        b.suspend()
        await assert_data(mgr, a, da)


async def test_aclose_stops_a_demotion_in_flight_and_loses_nothing(make_store):
    async with make_store(device=4, host=4, disk=8, free_target=0.5) as mgr:
        await new_filled_cache(mgr, 4, seed=1)
        with gated_io(mgr) as gate:
            await new_filled_cache(mgr, 4, seed=2)
            await until(lambda: demoting(mgr), "a background demotion to disk is in flight")
            closing = asyncio.ensure_future(mgr.aclose())
            await asyncio.sleep(0.02)
            assert not closing.done()  # its transfers settle first
            mgr.check_invariants()
            gate.set()
            await asyncio.wait_for(closing, 10)
        assert mgr._demoter.done()


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, "0.5", True])
def test_free_target_must_be_a_fraction(bad):
    with pytest.raises(ConfigError, match="free_target"):
        StoreConfig(LAYOUT, [DeviceTier(4 * LAYOUT.page_bytes, device="cpu"), HostTier(4 * LAYOUT.page_bytes)],
                    free_target=bad)


async def test_without_a_target_nothing_runs_in_the_background(make_store):
    async with make_store(device=4, host=4, disk=0) as mgr:
        await new_filled_cache(mgr, 4, seed=1)
        await asyncio.sleep(0.01)
        assert mgr._demoter is None and mgr.usage(D).free_pages == 0
