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


def _batch_or_fail():
    from kvstore.transfer import batchcopy

    bc = batchcopy.load(torch.cuda.current_device())
    assert bc is not None, "the GPU machine's driver (13.x) has cuMemcpyBatchAsync: the batched copier must load"
    return bc


@pytest.mark.parametrize("word", [1, 8], ids=["u8", "i64"])
async def test_cuda_batched_copies_move_scattered_rows_exactly(monkeypatch, word):
    """Scattered rows host -> device, device -> host and device -> device through the batched driver call,
    with chunks smaller than the request so several driver calls make one copy."""
    from kvstore.transfer import batchcopy
    from kvstore.transfer.copier import Copier, Segment

    _batch_or_fail()
    monkeypatch.setenv("KVSTORE_BATCH_COPIES", "1")
    monkeypatch.setattr(batchcopy, "CHUNK", 3)
    dev = torch.device("cuda", torch.cuda.current_device())
    cp = Copier(dev)
    calls = []
    real = cp._batch.copy
    monkeypatch.setattr(cp._batch, "copy", lambda *a: (calls.append(a[3]), real(*a)))
    g = torch.Generator().manual_seed(7)
    width = 4096 // word
    dtype = torch.uint8 if word == 1 else torch.int64
    host = torch.randint(0, 100, (64, width), generator=g).to(dtype).pin_memory()
    device = torch.zeros((64, width), dtype=dtype, device=dev)
    src_rows = [5, 6, 7, 40, 2, 3, 60, 61, 33, 9, 10]  # runs and singles, unsorted
    dst_rows = [50, 51, 52, 1, 20, 21, 0, 8, 9, 30, 31]
    try:
        await cp.copy([Segment(device, dst_rows, host, src_rows)], "up")
        assert torch.equal(device[dst_rows].cpu(), host[src_rows])
        back = torch.zeros_like(host).pin_memory()
        await cp.copy([Segment(back, src_rows, device, dst_rows)], "down")
        assert torch.equal(back[src_rows], host[src_rows])
        other = torch.zeros_like(device)
        await cp.copy([Segment(other, src_rows, device, dst_rows)], "down")
        assert torch.equal(other[src_rows].cpu(), host[src_rows])
        untouched = [r for r in range(64) if r not in dst_rows]
        assert not device[untouched].any()
    finally:
        cp.close()
    assert calls == ["h2d", "d2h", "d2d"]


def test_bench_driver_queue_runs_both_queue_modes(capsys):
    """benchmarks/bench_driver_queue.py end to end on a small size (figures are not checked)."""
    import importlib.util
    from pathlib import Path

    from kvstore.transfer import batchcopy

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_driver_queue.py"
    spec = importlib.util.spec_from_file_location("bench_driver_queue", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    bound = batchcopy.QUEUED_COPIES
    mod.main(["--mib", "64", "--pages", "64", "--seconds", "0.2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 64 KiB")]
    assert len(rows) == 4 and sum("unbounded" in r for r in rows) == 2
    assert batchcopy.QUEUED_COPIES == bound  # restored
