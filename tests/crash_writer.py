"""Writer process for the crash test: commits pages with deterministic contents to a persistent disk
tier forever, until it is killed. ``python tests/crash_writer.py DIR SEED``.

A page's bytes are a function of the token prefix that ends with it (:func:`expected_page`), so a
verifier in another process knows what every reusable page must hold."""

from __future__ import annotations

import asyncio
import hashlib
import random
import sys

import numpy as np
import torch

from kvstore import DeviceTier, DiskTier, HostTier, KVCacheManager, PageLayout, StoreConfig

LAYOUT = PageLayout(num_layers=1, num_kv_heads=2, head_dim=32, tokens_per_page=8, dtype=torch.float16)  # 2 KiB
CONVERSATIONS = 6
MAX_PAGES = 12


def config(directory: str) -> StoreConfig:
    pb = LAYOUT.page_bytes
    return StoreConfig(
        LAYOUT,
        [DeviceTier(16 * pb), HostTier(8 * pb), DiskTier(48 * pb, directory, persistent=True)],
        namespace="crash-test",
        batch_bytes=4 * pb,
    )


def conversation(c: int) -> list[int]:
    rng = random.Random(c)
    return [rng.randrange(50_000) for _ in range(MAX_PAGES * LAYOUT.tokens_per_page)]


def expected_page(prefix: list[int]) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(np.asarray(prefix, dtype=np.int64).tobytes()).digest()[:8], "little")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.page_shape, generator=gen).to(LAYOUT.dtype)


async def write_forever(directory: str, seed: int) -> None:
    rng = random.Random(seed)
    tpp = LAYOUT.tokens_per_page
    async with KVCacheManager(config(directory)) as mgr:
        print("ready", flush=True)
        while True:
            tokens = conversation(rng.randrange(CONVERSATIONS))[: rng.randint(1, MAX_PAGES) * tpp]
            cache = mgr.create_cache(tokens)
            await cache.resume()
            await cache.resize(len(tokens))
            idx = cache.page_indices()
            for j in range(cache.num_reused_tokens // tpp, cache.num_pages):
                mgr.device_pool[idx[j]] = expected_page(tokens[: (j + 1) * tpp])
            cache.commit(tokens)
            cache.suspend()
            cache.close()


if __name__ == "__main__":
    asyncio.run(write_forever(sys.argv[1], int(sys.argv[2])))
