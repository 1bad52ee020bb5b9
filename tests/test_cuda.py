"""The same round trips with a CUDA device tier and a pinned host tier (run on the GPU machine)."""

import asyncio

import pytest
import torch

from kvstore import CacheLevel, PageLayout

from .conftest import assert_data, levels, new_cache_on_disk, new_filled_cache, read_pages

pytestmark = pytest.mark.cuda
D, H, K = CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK
MIB = PageLayout(num_layers=4, num_kv_heads=4, head_dim=64, tokens_per_page=128, dtype=torch.float16)


async def test_cuda_tier_uses_the_gpu_and_pinned_host(make_store):
    async with make_store(device_name="cuda") as mgr:
        assert mgr.device_pool.is_cuda
        assert mgr._host.chunks[0].is_pinned()


@pytest.mark.parametrize("layout", [None, MIB], ids=["small", "1MiB"])
async def test_cuda_round_trip_through_host_and_disk(make_store, layout):
    kw = {"layout": layout} if layout is not None else {}
    async with make_store(device=4, host=4, disk=32, device_name="cuda", **kw) as mgr:
        caches = [await new_filled_cache(mgr, 3, seed=s) for s in range(6)]
        assert levels(caches[0][0]) == {K: 3}
        for cache, data in caches:
            await assert_data(mgr, cache, data)
        s = mgr.stats()
        assert s["pages_disk_to_device"] > 0 and s["pages_device_to_host"] > 0


async def test_cuda_swap_between_full_device_and_full_host(make_store):
    async with make_store(device=3, host=3, disk=0, device_name="cuda") as mgr:
        a, da = await new_filled_cache(mgr, 3, seed=1)
        b, db = await new_filled_cache(mgr, 3, seed=2)
        for _ in range(2):
            await assert_data(mgr, a, da)
            await assert_data(mgr, b, db)
        mgr.check_invariants()


@pytest.mark.parametrize("target", [D, H])
async def test_cuda_prefetch_from_disk(make_store, target):
    async with make_store(device=8, host=8, disk=64, device_name="cuda", layout=MIB) as mgr:
        cache, data = await new_cache_on_disk(mgr, 6, seed=3)
        result = await cache.prefetch(target)
        assert result.complete and levels(cache) == {target: 6}
        await cache.resume()
        assert torch.equal(read_pages(mgr, cache).view(torch.uint8), data.view(torch.uint8))


async def test_cuda_demotion_waits_for_compute_queued_before_it(make_store):
    async with make_store(device=2, host=4, disk=0, device_name="cuda", layout=MIB) as mgr:
        cache = mgr.create_cache()
        await cache.resume()
        await cache.resize(2 * MIB.tokens_per_page)
        idx = cache.page_indices().cuda()
        x = torch.randn(4096, 4096, device="cuda")
        for _ in range(20):  # keep the compute stream busy, then write the pages at its end
            x = x @ x / 4096
        mgr.device_pool[idx] = 7.0
        cache.suspend()
        other = mgr.create_cache()
        await other.resume()
        await other.resize(2 * MIB.tokens_per_page)  # demotes `cache` while the compute may still run
        other.close()
        await cache.resume()
        assert bool((mgr.device_pool[cache.page_indices().cuda()] == 7.0).all())


async def test_cuda_cancelled_prefetch_keeps_data_exact(make_store):
    async with make_store(device=16, host=16, disk=64, device_name="cuda", layout=MIB, batch_bytes=1 << 20) as mgr:
        cache, data = await new_cache_on_disk(mgr, 12, seed=5)
        task = cache.prefetch(D)
        await asyncio.sleep(0)
        task.cancel()
        res = await task
        assert res.cancelled or res.complete  # a cancel may land after the last copy
        mgr.check_invariants()
        await assert_data(mgr, cache, data)
