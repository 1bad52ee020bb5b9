"""Byte-exact round trips of random page data through device -> host -> disk -> device."""

import pytest
import torch

from kvstore import CacheLevel, PageLayout

from .conftest import assert_data, levels, new_filled_cache, read_pages


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
