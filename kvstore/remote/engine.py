"""The remote tier of one manager: its client, key space, write-through writer and prefix reader.

Built by ``KVCacheManager.start()`` when ``StoreConfig.remote`` is set, closed by ``aclose()``. Starting
does no network I/O: an unreachable server never keeps a manager from starting (its calls are misses).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional, Sequence

from ..config import RemoteTier
from ..placement import Page
from ..types import CacheLevel, PrefetchResult, PrefixMatch
from .client import RemoteClient
from .fetch import RemoteReader
from .keys import KeySpace
from .url import parse_url
from .writer import RemoteWriter

if TYPE_CHECKING:
    from ..manager import KVCacheManager

log = logging.getLogger("kvstore.remote")

__all__ = ["RemoteEngine", "STATS"]

#: Counters the remote tier adds to ``stats()`` (besides pages/bytes per level pair).
STATS = ("remote_hits", "remote_misses", "remote_errors", "remote_corrupt", "remote_write_dropped",
         "remote_write_skipped", "remote_timeouts", "remote_breaker_opened")

#: Pages per write batch (one EXISTS pipeline) and per fetch step (GETs of step k+1 overlap step k's
#: checks and landing); bounded further by ``StoreConfig.batch_bytes``.
WRITE_BATCH_PAGES = 32
FETCH_STEP_PAGES = 16


class RemoteEngine:
    def __init__(self, mgr: "KVCacheManager", tier: RemoteTier) -> None:
        self.tier = tier
        self.url = parse_url(tier.url)
        fit = max(1, mgr.config.batch_bytes // mgr._page_bytes)
        self.keys = KeySpace(mgr.config.namespace, mgr.layout.fingerprint())
        self.client = RemoteClient(self.url, tier.timeout_s, mgr._stats)
        self.writer = RemoteWriter(
            mgr, self.client, self.keys, tier.ttl_s, tier.max_pending_pages, min(WRITE_BATCH_PAGES, fit, mgr._started_executor.staging.rows),
        )
        self.reader = RemoteReader(mgr, self.client, self.keys, min(FETCH_STEP_PAGES, fit))

    def start(self) -> None:
        self.writer.start()
        log.info("kvstore remote tier %s (ttl %s s, deadline %s s)", self.url.redacted, self.tier.ttl_s,
                 self.tier.timeout_s)

    def stats_keys(self, levels: Sequence[CacheLevel]) -> dict[str, int]:
        out = {k: 0 for k in STATS}
        for lvl in levels:
            for a, b in ((lvl.label, "remote"), ("remote", lvl.label)):
                out[f"pages_{a}_to_{b}"] = 0
                out[f"bytes_{a}_to_{b}"] = 0
        return out

    def committed(self, page: Page, key: bytes) -> None:
        self.writer.enqueue(page, key)

    async def flush(self, timeout_s: Optional[float]) -> None:
        await self.writer.flush(timeout_s)

    async def lookup(self, tokens: Sequence[int]) -> PrefixMatch:
        return await self.reader.lookup(tokens)

    async def fetch(self, tokens: Sequence[int], target: CacheLevel, timeout_s: Optional[float]) -> PrefetchResult:
        return await self.reader.fetch(tokens, target, timeout_s)

    async def close(self) -> None:
        await self.writer.close()
        await self.reader.close()
        await self.client.close()
