"""Every page read back from disk is verified (xxh3-64 per page and slot identity); nothing wrong is handed out."""

import os

import pytest

from kvstore import CacheLevel, CacheStatus, CorruptPageError

from .conftest import LAYOUT, PAGE, assert_data, levels, new_cache_on_disk, new_filled_cache, sink_to_disk, write_pages

D, H, K = CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK
TPP = LAYOUT.tokens_per_page


def scribble(mgr, page, at: int = 100) -> None:
    """Flip bytes of ``page`` in the disk file behind the engine's back (bit rot, a stray write)."""
    assert page.level == K
    os.pwrite(mgr._disk.fd, b"\xa5" * 16, mgr._disk.offset(page.slot) + at)


async def test_corrupt_page_of_a_suspended_cache_fails_resume_and_hands_out_nothing(make_store):
    async with make_store(device=4, host=4, disk=32) as mgr:
        cache, data = await new_cache_on_disk(mgr, 3, seed=1)
        scribble(mgr, cache._pages[1])
        with pytest.raises(CorruptPageError, match="checksum"):
            await cache.resume()
        assert cache.status is CacheStatus.SUSPENDED
        assert mgr.stats()["corrupt_pages"] == 1
        assert cache.page_levels()[K] >= 1
        mgr.check_invariants()
        with pytest.raises(CorruptPageError):  # still corrupt: never served
            await cache.resume()


async def test_pages_swapped_on_disk_are_detected(make_store):
    async with make_store(device=4, host=4, disk=32) as mgr:
        cache, _ = await new_cache_on_disk(mgr, 2, seed=2)
        a, b = cache._pages
        fd, off_a, off_b = mgr._disk.fd, mgr._disk.offset(a.slot), mgr._disk.offset(b.slot)
        bytes_a, bytes_b = os.pread(fd, PAGE, off_a), os.pread(fd, PAGE, off_b)
        os.pwrite(fd, bytes_b, off_a)
        os.pwrite(fd, bytes_a, off_b)
        with pytest.raises(CorruptPageError):
            await cache.resume()
        assert mgr.stats()["corrupt_pages"] == 2


async def test_corrupt_prefetch_moves_the_good_pages_and_fails(make_store):
    async with make_store(device=4, host=8, disk=32) as mgr:
        cache, _ = await new_cache_on_disk(mgr, 4, seed=3)
        scribble(mgr, cache._pages[2])
        with pytest.raises(CorruptPageError):
            await cache.prefetch(H)
        assert levels(cache)[K] == 1 and cache.page_levels()[H] >= 1
        mgr.check_invariants()


async def test_corrupt_reused_prefix_page_leaves_the_index(make_store):
    async with make_store(device=4, host=4, disk=32) as mgr:
        tokens = list(range(3 * TPP))
        first = mgr.create_cache()
        await first.resume()
        await first.resize(len(tokens))
        write_pages(mgr, first, seed=4)
        first.commit(tokens)
        first.suspend()
        await sink_to_disk(mgr, first)
        scribble(mgr, first._pages[1])
        first.close()
        reuse = mgr.create_cache(tokens)
        assert reuse.num_reused_tokens == 3 * TPP
        with pytest.raises(CorruptPageError):
            await reuse.resume()
        assert mgr.lookup(tokens).num_tokens == TPP, "the corrupt page and what follows it are no longer reusable"
        reuse.close()
        mgr.check_invariants()


async def test_corrupt_droppable_page_is_dropped_as_a_miss_when_relocated(make_store):
    async with make_store(device=3, host=2, disk=8) as mgr:
        tokens = list(range(2 * TPP))
        filler, _ = await new_filled_cache(mgr, 3, seed=5)  # takes the low disk slots first
        await sink_to_disk(mgr, filler)
        cache = mgr.create_cache()
        await cache.resume()
        await cache.resize(len(tokens))
        cache.commit(tokens)
        cache.suspend()
        await sink_to_disk(mgr, cache)
        pages = list(cache._pages)
        cache.close()  # committed pages stay as droppable cache on disk
        filler.close()  # frees the low slots
        high = max(pages, key=lambda p: p.slot)
        limit = high.slot
        assert limit >= 2, "setup: the committed pages sit above free slots"
        scribble(mgr, high)
        before = mgr.stats()
        await mgr.set_quota(K, limit * PAGE)  # the high page must be relocated: read, fails, dropped
        after = mgr.stats()
        assert after["corrupt_pages"] == before["corrupt_pages"] + 1
        assert after["drops"] == before["drops"] + 1
        assert mgr.quota(K) == limit * PAGE and high.freed
        assert mgr.lookup(tokens).num_tokens < 2 * TPP
        mgr.check_invariants()


@pytest.mark.parametrize("op", ["read", "write"])
async def test_short_transfers_are_continued(make_store, op):
    async with make_store(device=2, host=2, disk=32) as mgr:
        calls = []

        def short(kind, offset, nbytes):
            if kind == op:
                calls.append(offset)
                return 100  # the first system call of every task moves 100 bytes only
            return None

        mgr._io.fault_hook = short
        caches = [await new_filled_cache(mgr, 2, seed=s) for s in range(4)]
        for cache, data in caches:
            await assert_data(mgr, cache, data)
        assert calls, "the fault hook was exercised"
        assert mgr.stats()["io_errors"] == 0 and mgr.stats()["corrupt_pages"] == 0


async def test_verification_covers_disk_to_device_reads_without_a_host_tier(make_store):
    async with make_store(device=3, host=0, disk=16) as mgr:
        cache, _ = await new_filled_cache(mgr, 2, seed=7)
        await new_filled_cache(mgr, 3, seed=8)  # pushes `cache` to disk
        assert levels(cache) == {K: 2}
        scribble(mgr, cache._pages[0], at=0)
        with pytest.raises(CorruptPageError):
            await cache.resume()
        mgr.check_invariants()


async def test_staged_disk_paths_verify_and_round_trip(make_store):
    """The disk <-> device path through pinned staging (used with CUDA), forced on here."""
    async with make_store(device=3, host=0, disk=16, batch_bytes=2 * PAGE) as mgr:
        ex = mgr._executor
        plain = ex._needs_staging
        ex._needs_staging = lambda src, dst, swap=False: plain(src, dst, swap) or {src, dst} == {D, K}
        caches = [await new_filled_cache(mgr, 2, seed=s) for s in range(4)]
        assert mgr.stats()["pages_device_to_disk"] > 0
        for cache, data in caches[1:]:
            await assert_data(mgr, cache, data)
        victim = caches[0][0]
        await sink_to_disk(mgr, victim)
        scribble(mgr, victim._pages[1])
        with pytest.raises(CorruptPageError):
            await victim.resume()
        mgr.check_invariants()
