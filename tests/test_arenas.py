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

    pool = arenas.StagingPool(page_bytes=64, rows=3, count=2, pinned=False, spares=2)
    pool.prepare()
    assert len(pool._free) == 2 and len(pool._spare_free) == 2
    assert all(b.shape == (3, 64) for b in pool._free + pool._spare_free)
    made = []
    real_make = pool._make
    monkeypatch.setattr(pool, "_make", lambda: made.append(1) or real_make())

    async def scenario():
        pooled = [await pool.acquire() for _ in range(2)]
        spares = [await pool.acquire(wait=False) for _ in range(2)]  # every pooled one is out: the spares
        assert made == [], "prepared buffers are handed out, none made"
        extra = await pool.acquire(wait=False)  # beyond count + spares: a temporary one is made
        assert made == [1]
        for b in pooled + spares + [extra]:
            pool.give_back(b)
        assert len(pool._free) == 2 and len(pool._spare_free) == 2, "the temporary one is not kept"
        again = [await pool.acquire() for _ in range(2)] + [await pool.acquire(wait=False) for _ in range(2)]
        assert made == [1] and {id(b) for b in again} == {id(b) for b in pooled + spares}
        for b in again:
            pool.give_back(b)

    asyncio.run(scenario())
    pool.prepare()  # everything is made already
    assert made == [1]
    default = arenas.StagingPool(page_bytes=64, rows=1, count=2, pinned=False)
    default.prepare()  # the pooled ones and count spares; up to 4 * count spares are kept once made
    assert (len(default._free), len(default._spare_free), default.spares) == (2, 2, 8)


def test_staging_pool_keeps_the_spares_it_makes_on_demand():
    import asyncio

    pool = arenas.StagingPool(page_bytes=64, rows=1, count=1, pinned=False, spares=1)

    async def scenario():
        a = await pool.acquire()
        b = await pool.acquire(wait=False)  # made on demand: a spare, kept
        pool.give_back(b)
        c = await pool.acquire(wait=False)
        assert c is b
        waiting = asyncio.ensure_future(pool.acquire())  # a waiting acquire waits for the pooled one only
        await asyncio.sleep(0)
        assert not waiting.done()
        pool.give_back(c)
        await asyncio.sleep(0)
        assert not waiting.done()
        pool.give_back(a)
        assert await waiting is a

    asyncio.run(scenario())
