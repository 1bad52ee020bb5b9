"""Radix prefix index: insert, full and partial match, tree links, detaching, ghost, hashing, namespaces."""

import numpy as np
import pytest

from kvstore import CacheLevel, DeviceTier, KVCacheManager, StoreConfig
from kvstore.placement import Page, PrefixHasher, PrefixIndex

from .conftest import LAYOUT, loose_page

TPP = 4


def _page(pid: int, key: bytes) -> Page:
    return loose_page(pid, CacheLevel.DEVICE, pid, key)


def _chain(index: PrefixIndex, keys, first_pid: int = 0, parent=None) -> list[Page]:
    pages = []
    for i, k in enumerate(keys):
        page = _page(first_pid + i, k)
        assert index.add(page, parent)
        pages.append(page)
        parent = k
    return pages


def test_match_finds_the_whole_inserted_chain():
    index = PrefixIndex()
    pages = _chain(index, [b"a", b"b", b"c"])
    assert index.match([b"a", b"b", b"c"]) == pages


def test_match_stops_at_the_first_missing_key():
    index = PrefixIndex()
    pages = _chain(index, [b"a", b"b", b"c"])
    assert index.match([b"a", b"b", b"x", b"c"]) == pages[:2]


def test_taken_key_is_not_replaced():
    index = PrefixIndex()
    first = _chain(index, [b"a"])[0]
    other = _page(9, b"a")
    assert not index.add(other, None)
    assert index.get(b"a") is first and not other.indexed


def test_children_are_the_pages_extending_a_prefix_by_one_page():
    index = PrefixIndex()
    a, b = _chain(index, [b"a", b"b"])
    (c,) = _chain(index, [b"c"], first_pid=7, parent=b"a")
    assert set(p.pid for p in index.children_of(a)) == {b.pid, c.pid}
    assert list(index.children_of(b)) == []


def test_removed_parent_detaches_children_and_a_new_parent_adopts_them():
    index = PrefixIndex()
    a, b = _chain(index, [b"a", b"b"])
    index.remove(a)
    index.check()
    assert list(index.children_of(a)) == []
    a2 = _page(5, b"a")
    index.add(a2, None)
    index.check()
    assert list(index.children_of(a2)) == [b]


def test_removed_key_in_the_ghost_starts_with_a_hit_when_added_again():
    index = PrefixIndex(ghost_capacity=4)
    (a,) = _chain(index, [b"a"])
    index.remove(a)
    again = _page(3, b"a")
    index.add(again, None)
    assert index.node(again).hits == 1


def test_ghost_forgets_beyond_its_capacity():
    index = PrefixIndex(ghost_capacity=1)
    a, b = _chain(index, [b"a"])[0], _chain(index, [b"b"], first_pid=1)[0]
    index.remove(a)
    index.remove(b)
    again = _page(3, b"a")
    index.add(again, None)
    assert index.node(again).hits == 0


def test_keys_chain_so_equal_pages_after_different_prefixes_differ():
    h = PrefixHasher("ns", "layout", TPP)
    x = np.array([1, 2, 3, 4, 9, 9, 9, 9])
    y = np.array([5, 6, 7, 8, 9, 9, 9, 9])
    assert h.keys(x, 0, 2, None)[1] != h.keys(y, 0, 2, None)[1]


def test_key_of_a_page_does_not_depend_on_later_pages():
    h = PrefixHasher("ns", "layout", TPP)
    small = np.array([1, 2, 3, 4, 5, 6, 7, 8])
    big = np.array([1, 2, 3, 4, 2**40, 6, 7, 8])  # second page needs int64
    assert h.keys(small, 0, 2, None)[0] == h.keys(big, 0, 2, None)[0]
    assert h.keys(small, 0, 2, None)[1] != h.keys(big, 0, 2, None)[1]


def test_int32_and_int64_encodings_never_collide():
    h = PrefixHasher("ns", "layout", 2)
    a = np.array([1, 2], dtype=np.int64)  # int32 bytes 01000000 02000000
    b = np.array([1 + (2 << 32), 0], dtype=np.int64)
    assert h.keys(a, 0, 1, None) != h.keys(b, 0, 1, None)


def test_incremental_keys_equal_keys_in_one_go():
    h = PrefixHasher("ns", "layout", TPP)
    t = np.arange(12)
    k = h.keys(t, 0, 3, None)
    assert h.keys(t, 1, 3, k[0]) == k[1:]


def test_match_tokens_returns_the_reused_pages_and_last_key():
    h = PrefixHasher("ns", "layout", TPP)
    t = np.arange(5 * TPP)
    keys = h.keys(t, 0, 5, None)
    index = PrefixIndex()
    pages = _chain(index, keys[:3])
    got, last = index.match_tokens(h, np.concatenate([t[: 3 * TPP], [99] * (2 * TPP)]))
    assert got == pages and last == keys[2]


def test_namespaces_seed_different_chains():
    t = np.arange(TPP)
    assert PrefixHasher("model-a", "l", TPP).keys(t, 0, 1, None) != PrefixHasher("model-b", "l", TPP).keys(t, 0, 1, None)


@pytest.mark.parametrize("policy", ["lru", "slru"])
async def test_manager_index_keeps_tree_links_through_commits(tmp_path, policy):
    cfg = StoreConfig(LAYOUT, [DeviceTier(8 * LAYOUT.page_bytes)], namespace="m", eviction_policy=policy)
    async with KVCacheManager(cfg) as mgr:
        for tokens in (list(range(3 * 4)), list(range(4)) + [7] * 8):
            cache = mgr.create_cache(tokens)
            await cache.resume()
            await cache.resize(len(tokens))
            cache.commit(tokens)
            cache.close()
        root = mgr._placement.index.get(mgr._hasher.keys(np.arange(4), 0, 1, None)[0])
        assert len(list(mgr._placement.index.children_of(root))) == 2
        mgr.check_invariants()
