#!/usr/bin/env python3
"""bench_bookkeeping: the engine's per-page cost on the event-loop thread, with the data copies stubbed out.

The scattered-slot rows of ``bench_tiers.py`` are bound by this cost for small pages. Two caches are
interleaved page by page on the device level (as in ``bench_tiers.py``'s scatter rows); per repetition a
third cache grows by N pages, demoting every page of the first one to the host (planning victims and new
pages, batching, settling), then the first one is resumed (promotion back) and suspended. The copier is
replaced by a no-op, so what is timed is placement, batching and settling alone. Prints microseconds per
page (medians).

    python benchmarks/bench_bookkeeping.py --pages 8192 --reps 5
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from kvstore import DeviceTier, HostTier, KVCacheManager, PageLayout, StoreConfig  # noqa: E402
from kvstore.transfer import copier  # noqa: E402


async def _no_copy(self, segments, lane, after=None) -> None:
    return None


async def run(pages: int, reps: int, gc_freeze: bool) -> dict[str, float]:
    layout = PageLayout(num_layers=1, num_kv_heads=1, head_dim=8, tokens_per_page=4, dtype=torch.float16)
    pb = layout.page_bytes
    cfg = StoreConfig(layout, [DeviceTier(2 * pages * pb, device="cpu"), HostTier(pages * pb, pinned=False)])
    tokens = pages * layout.tokens_per_page
    times: dict[str, list[float]] = {"demoting resize": [], "resume": [], "suspend": []}
    async with KVCacheManager(cfg) as mgr:
        a, b = mgr.create_cache(), mgr.create_cache()
        await a.resume()
        await b.resume()
        for i in range(1, pages + 1):  # interleave: a on even slots, b on odd ones
            await a.resize(i * layout.tokens_per_page)
            await b.resize(i * layout.tokens_per_page)
        a.suspend()
        if gc_freeze:  # as a serving process does after start-up (see docs/architecture.md)
            gc.collect()
            gc.freeze()
        for _ in range(reps + 1):  # the first repetition warms up
            c = mgr.create_cache()
            await c.resume()
            t0 = time.perf_counter()
            await c.resize(tokens)
            t1 = time.perf_counter()
            c.close()
            t2 = time.perf_counter()
            await a.resume()
            t3 = time.perf_counter()
            a.suspend()
            t4 = time.perf_counter()
            for key, dt in (("demoting resize", t1 - t0), ("resume", t3 - t2), ("suspend", t4 - t3)):
                times[key].append(dt / pages * 1e6)
        mgr.check_invariants()
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=8192, help="pages per cache (default 8192)")
    p.add_argument("--reps", type=int, default=5, help="measured repetitions (medians; one warm-up extra)")
    p.add_argument("--no-gc-freeze", action="store_true", help="do not freeze the objects alive after set-up")
    args = p.parse_args()
    if args.pages < 1 or args.reps < 1:
        p.error("--pages and --reps must be >= 1")
    copier.Copier.copy = _no_copy  # what is left is the bookkeeping
    res = asyncio.run(run(args.pages, args.reps, not args.no_gc_freeze))
    print(f"kvstore bookkeeping, copies stubbed out, {args.pages} pages, median of {args.reps}, "
          f"gc {'unfrozen' if args.no_gc_freeze else 'frozen after set-up'}:")
    for k, v in res.items():
        print(f"  {k:16s} {v:6.2f} us/page")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
