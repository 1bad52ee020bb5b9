"""HostArena.group: slots grouped by chunk, one chunk or many (pure numpy; no page moves)."""

import numpy as np
import pytest

from kvstore.transfer import arenas
from kvstore.transfer.arenas import HostArena


@pytest.fixture
def arena(monkeypatch):
    monkeypatch.setattr(arenas, "_MAX_CHUNK", 4 * 64)  # chunks of 4 pages of 64 bytes
    a = HostArena(page_bytes=64, pinned=False)
    a.allocate(18)  # chunks start at 0, 4, 8, 12, 16
    assert len(a.chunks) == 5
    return a


def _expand(groups, arena):
    return {int(pos): int(arena._starts[c] + row) for c, (p, r) in groups.items() for pos, row in zip(p, r)}


@pytest.mark.parametrize("seed", range(10))
def test_group_maps_every_slot_to_its_chunk_and_row(arena, seed):
    rng = np.random.default_rng(seed)
    slots = rng.choice(18, size=int(rng.integers(1, 18)), replace=False)
    groups = arena.group(slots)
    assert _expand(groups, arena) == dict(enumerate(slots.tolist()))
    for c, (_, rows) in groups.items():
        assert ((rows >= 0) & (rows < arena.chunks[c].shape[0])).all()


def test_slots_of_one_chunk_make_one_group(arena):
    groups = arena.group([13, 12, 15])
    assert list(groups) == [3]
    assert groups[3][0].tolist() == [0, 1, 2] and groups[3][1].tolist() == [1, 0, 3]
    assert arena.group([]) == {}


def test_staging_pool_prepare_makes_every_buffer_so_serving_allocates_none(monkeypatch):
    import asyncio

    pool = arenas.StagingPool(page_bytes=64, rows=3, count=2, pinned=False, swap_count=3)
    pool.prepare()
    io, swap = pool._kinds["io"], pool._kinds["swap"]
    assert (len(io.free), len(swap.free)) == (2, 3)
    assert all(b.shape == (3, 64) for b in io.free + swap.free)
    made = []
    real_make = pool._make
    monkeypatch.setattr(pool, "_make", lambda: made.append(1) or real_make())

    async def scenario():
        out = [await pool.acquire() for _ in range(2)] + [await pool.acquire("swap") for _ in range(3)]
        assert made == [], "prepared buffers are handed out, none made"
        extra = await pool.acquire("swap", wait=False)  # every swap buffer is out: a temporary one is made
        assert made == [1]
        for b in out + [extra]:
            pool.give_back(b)
        assert (len(io.free), len(swap.free)) == (2, 3), "the temporary one is not kept"
        again = [await pool.acquire() for _ in range(2)] + [await pool.acquire("swap", wait=False) for _ in range(3)]
        assert made == [1] and {id(b) for b in again} == {id(b) for b in out}
        for b in again:
            pool.give_back(b)

    asyncio.run(scenario())
    pool.prepare()  # everything is made already
    assert made == [1]
    default = arenas.StagingPool(page_bytes=64, rows=1, count=2, pinned=False)
    default.prepare()  # as many swap buffers as I/O ones
    assert (len(default._kinds["io"].free), len(default._kinds["swap"].free)) == (2, 2)


def test_staging_pool_kinds_wait_for_their_own_buffers_only():
    import asyncio

    pool = arenas.StagingPool(page_bytes=64, rows=1, count=1, pinned=False, swap_count=1)

    async def scenario():
        a = await pool.acquire()  # made on demand (not prepared), kept
        s = await pool.acquire("swap")
        waiting_io = asyncio.ensure_future(pool.acquire())
        waiting_swap = asyncio.ensure_future(pool.acquire("swap"))
        await asyncio.sleep(0)
        assert not waiting_io.done() and not waiting_swap.done()
        pool.give_back(s)  # a swap buffer back: only the waiting swap gets it
        assert await waiting_swap is s
        assert not waiting_io.done()
        pool.give_back(a)
        assert await waiting_io is a
        assert pool._kinds["io"].made == 1 and pool._kinds["swap"].made == 1

    asyncio.run(scenario())
