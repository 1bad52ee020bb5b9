"""The array LRU queue (stamp logs over the page table) keeps exactly the order of the reference queue over
page objects, whatever the sequence of pushes, removals, touches and priority changes."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.placement.eviction import EvictionQueue
from kvstore.placement.table import PageTable
from kvstore.types import CacheLevel

from .reference_eviction import ReferenceQueue

D = CacheLevel.DEVICE
N = 24

_OP = st.one_of(
    st.tuples(st.just("push"), st.integers(0, N - 1)),
    st.tuples(st.just("discard"), st.integers(0, N - 1)),
    st.tuples(st.just("touch"), st.integers(0, N - 1)),
    st.tuples(st.just("priority"), st.integers(0, N - 1), st.integers(0, 2)),
    st.tuples(st.just("push_many"), st.lists(st.integers(0, N - 1), unique=True, max_size=12)),
    st.tuples(st.just("discard_many"), st.lists(st.integers(0, N - 1), unique=True, max_size=12)),
    st.tuples(st.just("first"), st.integers(0, N + 2)),
)


def _pages(n: int):
    table = PageTable(8)  # grows while the pages are made
    pids = table.new_pages(n, 0)
    table.level[pids] = int(D)
    table.slot[pids] = pids
    return table, table.pages(pids)


@settings(max_examples=300, deadline=None)
@given(st.lists(_OP, max_size=60), st.integers(0, 3))
def test_the_array_queue_orders_pages_as_the_reference_queue(ops, window):
    table, pages = _pages(N)
    queue, ref = EvictionQueue(table, int(D)), ReferenceQueue()
    queue._WINDOW = (1, 3, 256, 4096)[window]  # windows smaller than the logs cross log entries
    for op in ops:
        kind = op[0]
        if kind == "push":
            queue.push(pages[op[1]])
            ref.push(pages[op[1]])
        elif kind == "discard":
            queue.discard(pages[op[1]])
            ref.discard(pages[op[1]])
        elif kind == "touch":
            queue.touch(pages[op[1]])
            ref.touch(pages[op[1]])
        elif kind == "priority":  # what Placement.add_owner does: a raised priority, then a touch
            pages[op[1]].priority = op[2]
            queue.touch(pages[op[1]])
            ref.touch(pages[op[1]])
        elif kind == "push_many":
            chosen = [pages[i] for i in op[1]]
            queue.push_pids(np.asarray(op[1], dtype=np.int64))
            ref.push_many(chosen)
        elif kind == "discard_many":
            queue.discard_pids(np.asarray(op[1], dtype=np.int64))
            ref.discard_many([pages[i] for i in op[1]])
        else:
            want = [p.pid for p in ref.candidates()][: op[1]]
            assert queue.first(op[1]).tolist() == want
        assert len(queue) == len(ref)
        assert [p.pid for p in queue.candidates()] == [p.pid for p in ref.candidates()]
        assert all((p in queue) == (p in ref) for p in pages)


def test_stale_entries_are_compacted_away():
    """Re-queueing the same pages over and over leaves the logs bounded (stale entries are dropped)."""
    table, pages = _pages(64)
    queue = EvictionQueue(table, int(D))
    pids = np.arange(64, dtype=np.int64)
    for _ in range(500):
        queue.push_pids(pids)
    assert len(queue) == 64
    assert queue._entries <= 2 * 64 + 4096 and sum(log.n - log.head for log in queue._logs.values()) <= 2 * 64 + 4096
    assert queue.first(64).tolist() == list(range(64))


def test_a_freed_page_leaves_no_entry_that_a_reused_row_could_inherit():
    """A row freed while queued and reused by a new page is not queued until the new page is."""
    table = PageTable(4)
    pids = table.new_pages(4, 0)
    pages = table.pages(pids)
    table.level[pids] = int(D)
    queue = EvictionQueue(table, int(D))
    queue.push_pids(pids)
    queue.discard_pids(pids[:2])
    table.free_pages(pids[:2])
    new_pids = table.new_pages(4, 0)  # takes the never-used rows first, then the freed ones
    table.level[new_pids] = int(D)
    assert set(pids[:2].tolist()) <= set(new_pids.tolist())
    assert [p.pid for p in queue.candidates()] == pids[2:].tolist()
    assert pages[0].freed and not table.page(int(new_pids[0])).freed
