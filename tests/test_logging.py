"""The ``kvstore`` logger: one DEBUG line per plan with counts; nothing per page at INFO."""

from __future__ import annotations

import logging
import re

from kvstore import CacheLevel

from .conftest import new_cache_on_disk, new_filled_cache


async def test_debug_logs_one_line_per_plan_with_counts_and_evictions(make_store, caplog):
    async with make_store(device=4, host=4, disk=32) as mgr:
        a, _ = await new_filled_cache(mgr, 4, seed=1)
        with caplog.at_level(logging.DEBUG, logger="kvstore"):
            b, _ = await new_filled_cache(mgr, 4, seed=2)  # evicts a's 4 pages device -> host
        plans = [r.getMessage() for r in caplog.records if "plan (" in r.getMessage()]
        assert plans and all(r.levelno == logging.DEBUG for r in caplog.records if "plan (" in r.getMessage())
        assert any(re.search(r"evicted 4 \[device->host 4\]", p) for p in plans), plans
        assert any("4 new pages" in p for p in plans), plans


async def test_nothing_is_logged_per_page_at_info(make_store, caplog):
    async def workload(mgr, pages: int) -> int:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="kvstore"):
            cache, _ = await new_cache_on_disk(mgr, pages, seed=pages)
            await cache.prefetch(CacheLevel.HOST)
            await cache.resume()
            cache.suspend()
            cache.close()
        return len(caplog.records)

    async with make_store(device=4, host=4, disk=64) as mgr:
        small = await workload(mgr, 1)
        large = await workload(mgr, 4)
    assert small == large == 0
