"""Prefix reuse: commit, lookup, create_cache(tokens), sharing, dropping, namespaces."""

import pytest
import torch

from kvstore import CacheLevel, InvalidArgumentError

from .conftest import LAYOUT, new_filled_cache, read_pages, write_pages

TPP = LAYOUT.tokens_per_page
D, H, K = CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK


async def _committed(mgr, tokens, seed=1):
    cache = mgr.create_cache(tokens)
    await cache.resume()
    await cache.resize(len(tokens))
    data = write_pages(mgr, cache, seed)
    cache.commit(tokens)
    cache.suspend()
    return cache, data


async def test_committed_full_pages_are_reused_by_a_new_cache(make_store):
    async with make_store() as mgr:
        tokens = list(range(3 * TPP + 1))
        first, data = await _committed(mgr, tokens)
        second = mgr.create_cache(tokens[: 2 * TPP + 3] + [999])
        assert second.num_reused_tokens == 2 * TPP
        assert second.num_pages == 2 and second.num_tokens == 2 * TPP
        await second.resume()
        assert torch.equal(read_pages(mgr, second).view(torch.uint8), data[:2].view(torch.uint8))
        assert mgr.stats()["prefix_hit_tokens"] == 2 * TPP


async def test_lookup_reports_reusable_length_and_levels_without_holding(make_store):
    async with make_store() as mgr:
        tokens = list(range(2 * TPP))
        cache, _ = await _committed(mgr, tokens)
        match = mgr.lookup(tokens + [5, 6])
        assert match.num_tokens == 2 * TPP and match.pages_per_level[D] == 2
        assert mgr.lookup([9] * (2 * TPP)).num_tokens == 0
        cache.close()
        assert mgr.usage(D).evictable_pages == 2, "lookup holds nothing; closed committed pages stay cached"


async def test_partial_page_is_not_committed(make_store):
    async with make_store() as mgr:
        tokens = list(range(TPP + 2))
        await _committed(mgr, tokens)
        assert mgr.lookup(tokens).num_tokens == TPP


async def test_shared_page_is_held_until_every_cache_closes(make_store):
    async with make_store() as mgr:
        tokens = list(range(2 * TPP))
        a, _ = await _committed(mgr, tokens)
        b = mgr.create_cache(tokens)
        a.close()
        assert b.page_levels()[D] == 2
        mgr.check_invariants()
        b.close()
        assert mgr.lookup(tokens).num_tokens == 2 * TPP, "committed pages outlive their caches"


async def test_closed_committed_pages_are_dropped_under_pressure(make_store):
    async with make_store(device=2, host=0, disk=0) as mgr:
        tokens = list(range(2 * TPP))
        cache, _ = await _committed(mgr, tokens)
        cache.close()
        await new_filled_cache(mgr, 2, seed=5)
        assert mgr.stats()["drops"] == 2
        assert mgr.lookup(tokens).num_tokens == 0


async def test_commit_must_extend_the_committed_history(make_store):
    async with make_store() as mgr:
        tokens = list(range(2 * TPP))
        cache, _ = await _committed(mgr, tokens)
        with pytest.raises(InvalidArgumentError, match="committed"):
            cache.commit([7] * (2 * TPP))
        with pytest.raises(InvalidArgumentError):
            cache.commit(tokens[:TPP])


async def test_commit_is_incremental(make_store):
    async with make_store() as mgr:
        cache = mgr.create_cache()
        await cache.resume()
        await cache.resize(3 * TPP)
        tokens = list(range(3 * TPP))
        cache.commit(tokens[:TPP])
        assert mgr.lookup(tokens).num_tokens == TPP
        cache.commit(tokens)
        assert mgr.lookup(tokens).num_tokens == 3 * TPP


async def test_resize_below_committed_pages_keeps_reuse_consistent(make_store):
    async with make_store() as mgr:
        tokens = list(range(3 * TPP))
        cache = mgr.create_cache()
        await cache.resume()
        await cache.resize(3 * TPP)
        cache.commit(tokens)
        await cache.resize(TPP)
        cache.commit(tokens[:TPP] + [42] * TPP)  # history diverges after the kept page
        await cache.resize(2 * TPP)
        cache.commit(tokens[:TPP] + [42] * TPP)
        assert mgr.lookup(tokens[:TPP] + [42] * TPP).num_tokens == 2 * TPP


async def test_tokens_may_be_a_tensor_or_numpy_array(make_store):
    import numpy as np

    async with make_store() as mgr:
        tokens = list(range(2 * TPP))
        await _committed(mgr, tokens)
        assert mgr.lookup(torch.tensor(tokens)).num_tokens == 2 * TPP
        assert mgr.lookup(np.array(tokens, dtype=np.int32)).num_tokens == 2 * TPP
