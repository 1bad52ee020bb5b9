"""Eviction policies: leaf-first order, segmented LRU (probation before protected), config, engine behaviour."""

import pytest
import torch

from kvstore import CacheLevel, ConfigError, DeviceTier, HostTier, KVCacheManager, StoreConfig
from kvstore.placement import Placement

from .conftest import LAYOUT, PAGE, new_filled_cache, read_pages, write_pages

D, H = CacheLevel.DEVICE, CacheLevel.HOST
TPP = LAYOUT.tokens_per_page


def _committed(pl: Placement, keys_parents):
    """New device pages committed under (key, parent key) pairs, queued in this order (oldest first)."""
    pages, plan = pl.plan_new_pages(len(keys_parents), D, 0)
    for p in pages:
        p.owners = 1
    for m in plan.moves:
        pl.complete(m)
    for p, (k, parent) in zip(pages, keys_parents, strict=True):
        pl.set_key(p, k, parent)
        pl.remove_owner(p)
    return pages


def _order(pl: Placement, level=D):
    return [p.key for p in pl.queues[level].candidates()]


def test_lru_evicts_a_parent_before_its_children():
    pl = Placement([D], [8], policy="lru")
    _committed(pl, [(b"a", None), (b"b", b"a"), (b"c", b"b")])
    assert _order(pl) == [b"a", b"b", b"c"]


@pytest.mark.parametrize("policy", ["lru-leaf", "slru"])
def test_leaf_first_evicts_children_before_their_parent(policy):
    pl = Placement([D], [8], policy=policy)
    _committed(pl, [(b"a", None), (b"b", b"a"), (b"c", b"b")])
    assert _order(pl) == [b"c", b"b", b"a"]


def test_leaf_first_keeps_lru_order_between_unrelated_pages():
    pl = Placement([D], [8], policy="lru-leaf")
    _committed(pl, [(b"a", None), (b"x", None), (b"b", b"a")])
    assert _order(pl) == [b"x", b"b", b"a"]


def test_leaf_first_waits_for_every_queued_child():
    pl = Placement([D], [8], policy="lru-leaf")
    _committed(pl, [(b"a", None), (b"b", b"a"), (b"x", None), (b"c", b"a")])
    assert _order(pl) == [b"b", b"x", b"c", b"a"]


def test_child_that_is_not_evictable_does_not_defer_its_parent():
    pl = Placement([D], [8], policy="lru-leaf")
    a, b = _committed(pl, [(b"a", None), (b"b", b"a")])
    pl.hold_all([b])  # e.g. being resumed: out of the queue
    assert _order(pl) == [b"a"]


def test_child_on_another_level_does_not_defer_its_parent():
    pl = Placement([D, H], [2, 4], policy="lru-leaf")
    a, b = _committed(pl, [(b"a", None), (b"b", b"a")])
    for m in pl.plan_new_pages(1, D, 0)[1].moves:  # one new page pushes the LRU-first leaf (b) to host
        pl.complete(m)
    assert b.level == H and a.level == D
    assert _order(pl, D) == [b"a"]


def test_leaf_first_candidates_do_not_change_the_queue():
    pl = Placement([D], [8], policy="lru-leaf")
    _committed(pl, [(b"a", None), (b"b", b"a")])
    first = _order(pl)
    assert _order(pl) == first and len(pl.queues[D]) == 2


def test_slru_evicts_probation_before_a_reused_page():
    pl = Placement([D], [8], policy="slru")
    a, x, y = _committed(pl, [(b"a", None), (b"x", None), (b"y", None)])
    pl.record_hit(a)
    assert _order(pl) == [b"x", b"y", b"a"]


def test_lru_evicts_a_reused_page_by_recency_only():
    pl = Placement([D], [8], policy="lru")
    a, x, y = _committed(pl, [(b"a", None), (b"x", None), (b"y", None)])
    pl.record_hit(a)
    assert _order(pl) == [b"x", b"y", b"a"]
    pl.touch(x)
    pl.touch(y)
    assert _order(pl) == [b"a", b"x", b"y"]


def test_slru_reused_page_stays_protected_when_touched_later_pages_arrive():
    pl = Placement([D], [8], policy="slru")
    a, x, y = _committed(pl, [(b"a", None), (b"x", None), (b"y", None)])
    pl.record_hit(a)
    pl.touch(x)
    pl.touch(y)
    assert _order(pl) == [b"x", b"y", b"a"]


def test_slru_cools_the_least_recently_reused_page_beyond_the_protected_share():
    pl = Placement([D], [3], policy="slru")  # protected share: int(0.6 * 3) = 1 page
    a, b, c = _committed(pl, [(b"a", None), (b"b", None), (b"c", None)])
    pl.record_hit(a)
    pl.record_hit(b)  # a cools: back to the most recent end of probation
    assert pl.queues[D].segment(a) == "probation" and pl.queues[D].segment(b) == "protected"
    assert _order(pl) == [b"c", b"a", b"b"]


def test_slru_protection_survives_demotion():
    pl = Placement([D, H], [1, 4], policy="slru")
    (a,) = _committed(pl, [(b"a", None)])
    pl.record_hit(a)
    for m in pl.plan_new_pages(1, D, 0)[1].moves:
        pl.complete(m)
    assert a.level == H and pl.queues[H].segment(a) == "protected"


def test_unknown_policy_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match="eviction_policy"):
        StoreConfig(LAYOUT, [DeviceTier(4 * PAGE)], eviction_policy="mru")
    with pytest.raises(ConfigError, match="eviction_policy"):
        StoreConfig(LAYOUT, [DeviceTier(4 * PAGE)], eviction_policy=None)


async def _serve(mgr, tokens):
    cache = mgr.create_cache(tokens)
    reused = cache.num_reused_tokens
    await cache.resume()
    await cache.resize(len(tokens))
    cache.commit(tokens)
    cache.close()
    return reused


async def _scan_workload(policy):
    """A reused system prompt, then one-off prompts that together exceed the device; then the prompt again."""
    cfg = StoreConfig(LAYOUT, [DeviceTier(4 * PAGE)], eviction_policy=policy)
    async with KVCacheManager(cfg) as mgr:
        prompt = list(range(TPP))
        await _serve(mgr, prompt)
        await _serve(mgr, prompt)  # a hit
        for i in range(3):
            await _serve(mgr, [1000 * (i + 1) + t for t in range(2 * TPP)])
        mgr.check_invariants()
        return await _serve(mgr, prompt)


async def test_lru_loses_a_reused_prompt_to_a_scan_of_one_off_prompts():
    assert await _scan_workload("lru") == 0


async def test_slru_keeps_a_reused_prompt_through_a_scan_of_one_off_prompts():
    assert await _scan_workload("slru") == TPP


async def test_leaf_first_keeps_the_shared_prefix_reusable_under_pressure():
    """A chain p0 <- p1 <- p2 loses one page: leaf-first drops p2 (p0, p1 stay reusable), LRU drops p0 (nothing is)."""
    results = {}
    for policy in ("lru", "lru-leaf"):
        cfg = StoreConfig(LAYOUT, [DeviceTier(4 * PAGE)], eviction_policy=policy)
        async with KVCacheManager(cfg) as mgr:
            base = list(range(TPP))
            await _serve(mgr, base + [50] * TPP + [51] * TPP)  # 3 pages: p0 <- p1 <- p2
            await _serve(mgr, [900] * TPP)  # fills the fourth slot
            await _serve(mgr, [901] * TPP)  # one of the chain must go
            mgr.check_invariants()
            results[policy] = mgr.lookup(base + [50] * TPP).num_tokens
    assert results["lru"] == 0 and results["lru-leaf"] == 2 * TPP


async def test_reused_page_demoted_to_host_keeps_exact_data_under_slru():
    cfg = StoreConfig(LAYOUT, [DeviceTier(2 * PAGE), HostTier(4 * PAGE, pinned=False)], eviction_policy="slru")
    async with KVCacheManager(cfg) as mgr:
        tokens = list(range(2 * TPP))
        cache = mgr.create_cache(tokens)
        await cache.resume()
        await cache.resize(len(tokens))
        data = write_pages(mgr, cache, seed=7)
        cache.commit(tokens)
        cache.close()
        await _serve(mgr, [77] * (2 * TPP))
        assert mgr.lookup(tokens).pages_per_level[H] == 2
        again = mgr.create_cache(tokens)
        await again.resume()
        assert torch.equal(read_pages(mgr, again).view(torch.uint8), data.view(torch.uint8))
        mgr.check_invariants()


@pytest.mark.parametrize("policy", ["lru-leaf", "slru"])
def test_pages_touched_in_token_order_are_queued_children_first(policy):
    pl = Placement([D], [8], policy=policy)
    a, b, c = _committed(pl, [(b"a", None), (b"b", b"a"), (b"c", b"b")])
    for p in (a, b, c):  # a prefix used parent first, as resume() releases it
        pl.touch(p)
    assert [p.key for p in pl.queues[D]._order()] == [b"c", b"b", b"a"]


@pytest.mark.parametrize("policy", ["lru", "lru-leaf", "slru"])
async def test_prefix_demoted_to_disk_is_reused_with_exact_data(make_store, policy):
    async with make_store(device=2, host=2, disk=16, eviction_policy=policy) as mgr:
        tokens = list(range(2 * TPP))
        cache = mgr.create_cache(tokens)
        await cache.resume()
        await cache.resize(len(tokens))
        data = write_pages(mgr, cache, seed=3)
        cache.commit(tokens)
        cache.close()
        for s in range(3):
            await new_filled_cache(mgr, 2, seed=10 + s)
        assert mgr.lookup(tokens).pages_per_level[CacheLevel.DISK] == 2
        again = mgr.create_cache(tokens)
        assert again.num_reused_tokens == 2 * TPP
        await again.resume()
        assert torch.equal(read_pages(mgr, again).view(torch.uint8), data.view(torch.uint8))
