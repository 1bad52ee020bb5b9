"""``kvstore.Stats`` names every key ``mgr.stats()`` returns, and every value is an int."""

from __future__ import annotations

from kvstore import Stats

from .conftest import new_cache_on_disk


async def test_every_stats_key_is_declared_in_the_stats_typeddict(make_store):
    declared = set(Stats.__annotations__)
    async with make_store(device=4, host=4, disk=32) as mgr:
        cache, _ = await new_cache_on_disk(mgr, 3, seed=1)
        await cache.resume()
        stats = mgr.stats()
    assert set(stats) - declared == set()
    assert all(type(v) is int for v in stats.values()), {k: type(v) for k, v in stats.items() if type(v) is not int}


async def test_stats_of_a_device_only_store_are_declared_too(make_store):
    async with make_store(device=4, host=0, disk=0) as mgr:
        assert set(mgr.stats()) <= set(Stats.__annotations__)
