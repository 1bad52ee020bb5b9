"""A resize queued behind set_quota() when aclose() starts gets InvalidStateError: it never plans after the
manager closed (found while making the journal refuse records after close)."""

from __future__ import annotations

import asyncio
import time

from kvstore import CacheLevel, InvalidStateError, KVCacheManager

from .conftest import PAGE, new_filled_cache
from .test_persistence import TPP, _commit_to_disk, persistent


async def test_a_resize_queued_behind_set_quota_does_not_run_after_aclose(tmp_path):
    mgr = KVCacheManager(persistent(tmp_path, disk=6))
    await mgr.start()
    for i in range(3):
        c, _ = await _commit_to_disk(mgr, [100 * i + j for j in range(2 * TPP)], seed=i)
        c.close()
    for i in range(4):
        await new_filled_cache(mgr, 2, seed=50 + i)
    active = mgr.create_cache()
    await active.resume()
    build_store = mgr._build_store
    mgr._build_store = lambda level, n: (time.sleep(0.3), build_store(level, n))[1]  # set_quota holds the gate
    quota = asyncio.ensure_future(mgr.set_quota(CacheLevel.DISK, 7 * PAGE))
    await asyncio.sleep(0.01)
    resize = asyncio.ensure_future(active.resize(4 * TPP))  # waits for the gate
    await asyncio.sleep(0.01)
    close = asyncio.ensure_future(mgr.aclose())  # queued behind set_quota, ahead of the resize
    results = await asyncio.gather(quota, resize, close, return_exceptions=True)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], InvalidStateError), f"resize after aclose(): {results[1]!r}"
