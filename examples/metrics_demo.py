"""Prometheus metrics of a small workload: requests written, demoted to disk, prefetched and resumed.

Prints the scraped exposition text (the sample in docs/metrics.md); ``--serve PORT`` also serves it over
HTTP (``prometheus_client.start_http_server``) for ``--seconds`` while the workload repeats, to point a
Prometheus and the Grafana dashboard (docs/grafana/kvstore-dashboard.json) at. Needs the ``metrics`` extra:

    pip install -e '.[metrics]' && python examples/metrics_demo.py
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

import numpy as np
import torch
from prometheus_client import CollectorRegistry, generate_latest, start_http_server

import kvstore.metrics
from kvstore import CacheLevel, DeviceTier, DiskTier, HostTier, KVCacheManager, PageLayout, StoreConfig

LAYOUT = PageLayout(num_layers=8, num_kv_heads=4, head_dim=64, tokens_per_page=64, dtype=torch.float16)  # 512 KiB


async def workload(mgr: KVCacheManager, rounds: int, requests: int = 6, tokens: int = 1000) -> None:
    for rnd in range(rounds):
        caches = []
        for r in range(requests):
            prompt = np.arange(r * 100_000, r * 100_000 + tokens)  # numpy arrays: commit() hashes them cheaply
            cache = mgr.create_cache(prompt)  # round 2 on: reuses the committed prefix
            await cache.resume()
            await cache.resize(tokens)
            fresh = cache.num_reused_tokens // LAYOUT.tokens_per_page
            slots = cache.page_indices()[fresh:].to(mgr.device_pool.device)
            mgr.device_pool[slots] = torch.randn(len(slots), *LAYOUT.page_shape).to(LAYOUT.dtype).to(slots.device)
            cache.commit(prompt)
            cache.suspend()
            caches.append(cache)
        for cache in caches:  # the oldest were demoted to disk by the newer ones: prefetch, then resume
            await cache.prefetch(CacheLevel.HOST)
            await cache.resume()
            cache.suspend()
            cache.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", type=int, metavar="PORT", help="also serve /metrics on PORT")
    ap.add_argument("--seconds", type=float, default=60.0, help="with --serve: how long to keep the workload running")
    args = ap.parse_args()
    page = LAYOUT.page_bytes
    registry = CollectorRegistry()
    with tempfile.TemporaryDirectory(prefix="kvstore-metrics-") as tmp:
        config = StoreConfig(LAYOUT, [DeviceTier(24 * page), HostTier(24 * page), DiskTier(256 * page, tmp)],
                             namespace="demo-model/tp0")
        async with KVCacheManager(config) as mgr:
            kvstore.metrics.register(mgr, registry)
            if args.serve:
                start_http_server(args.serve, registry=registry)
                print(f"serving http://localhost:{args.serve}/metrics for {args.seconds:.0f} s")
                end = time.monotonic() + args.seconds
                while time.monotonic() < end:
                    await workload(mgr, 1)
            else:
                await workload(mgr, 2)
            print(generate_latest(registry).decode(), end="")


if __name__ == "__main__":
    asyncio.run(main())
