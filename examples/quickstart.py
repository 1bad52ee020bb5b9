"""kvstore quickstart: three tiers in a temp directory, several requests suspended, demoted, prefetched, resumed.

Runs in seconds on a CPU (the device tier is then a CPU tensor) and uses CUDA when present.
    python examples/quickstart.py
"""

from __future__ import annotations

import asyncio
import logging
import tempfile

import torch

from kvstore import CacheLevel, DeviceTier, DiskTier, HostTier, KVCacheManager, PageLayout, StoreConfig

LAYOUT = PageLayout(num_layers=8, num_kv_heads=4, head_dim=64, tokens_per_page=64, dtype=torch.float16)  # 512 KiB
REQUESTS = 6
TOKENS = 1000  # per request: 16 pages


def where(cache) -> str:
    lv = cache.page_levels()
    return " ".join(f"{l.label}={n}" for l, n in lv.items())


async def main() -> None:
    page = LAYOUT.page_bytes
    with tempfile.TemporaryDirectory(prefix="kvstore-quickstart-") as tmp:
        config = StoreConfig(
            LAYOUT,
            [DeviceTier(32 * page), HostTier(32 * page), DiskTier(256 * page, tmp)],
            namespace="quickstart-model",
        )
        async with KVCacheManager(config) as mgr:
            print(f"device tier on {mgr.device_pool.device}, page = {page // 1024} KiB, disk I/O: {mgr.io_backend}")
            caches, expected = [], []
            for r in range(REQUESTS):
                tokens = [r * 100_000 + t for t in range(TOKENS)]
                cache = mgr.create_cache(tokens)
                await cache.resume()
                await cache.resize(TOKENS)
                data = torch.randn(cache.num_pages, *LAYOUT.page_shape).to(LAYOUT.dtype)
                mgr.device_pool[cache.page_indices().to(mgr.device_pool.device)] = data.to(mgr.device_pool.device)
                cache.commit(tokens)  # full pages become reusable prefix pages
                cache.suspend()  # nothing moves now; pages become evictable
                caches.append(cache)
                expected.append(data)
                print(f"request {r}: wrote and committed {cache.num_pages} pages, suspended")

            print("\nafter writing all requests (device and host hold 32 pages each):")
            for r, cache in enumerate(caches):
                print(f"  request {r}: [{where(cache)}]")

            # pressure: shrink device and host so the oldest requests end up on disk
            await mgr.set_quota(CacheLevel.DEVICE, 16 * page)
            await mgr.set_quota(CacheLevel.HOST, 16 * page)
            print("\nafter shrinking device and host quotas to 16 pages each:")
            for r, cache in enumerate(caches):
                print(f"  request {r}: [{where(cache)}]")

            # the scheduler knows request 0 runs next: prefetch it from disk while others run
            task = caches[0].prefetch(CacheLevel.HOST)
            result = await task
            print(f"\nprefetch(HOST) of request 0: moved {result.pages_moved} pages "
                  f"({result.bytes_moved / 2**20:.1f} MiB) in {result.seconds * 1e3:.1f} ms [{where(caches[0])}]")

            for r, cache in enumerate(caches):
                await cache.resume()
                got = mgr.device_pool[cache.page_indices().to(mgr.device_pool.device)].cpu()
                ok = torch.equal(got.view(torch.uint8), expected[r].view(torch.uint8))
                print(f"resume request {r}: data {'exact' if ok else 'WRONG'} [{where(cache)}]")
                if not ok:
                    raise SystemExit("data mismatch")
                cache.suspend()

            match = mgr.lookup([t for t in range(TOKENS)])  # request 0's tokens
            print(f"\nprefix lookup of request 0's prompt: {match.num_tokens} tokens reusable")
            stats = mgr.stats()
            print("moved:", ", ".join(f"{k[6:]}={v}" for k, v in stats.items() if k.startswith("pages_") and v))
            mgr.check_invariants()
            print("invariants hold; done.")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
