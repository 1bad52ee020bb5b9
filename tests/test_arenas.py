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


def test_staging_pool_prepare_makes_every_buffer_before_first_use(monkeypatch):
    import asyncio

    pool = arenas.StagingPool(page_bytes=64, rows=3, count=4, pinned=False)
    pool.prepare()
    assert len(pool._free) == 4 and all(b.shape == (3, 64) for b in pool._free)
    made = []
    monkeypatch.setattr(pool, "_make", lambda: made.append(1))  # acquiring must not make any now

    async def take_all():
        return [await pool.acquire() for _ in range(4)]

    bufs = asyncio.run(take_all())
    assert made == [] and len({id(b) for b in bufs}) == 4
    pool.prepare()  # the buffers out are still the pool's: nothing more is made
    assert made == [] and pool._free == []
