#!/usr/bin/env python3
"""profile_moves: where the loop thread's time goes when pages move (copies stubbed out, cProfile).

A cache of N pages is demoted to the host level by another cache's resize(), then resumed (which demotes
the other cache's pages): 4N page moves of bookkeeping only, profiled, top functions by own time.

    python benchmarks/profile_moves.py --pages 8192 --top 25
    python benchmarks/profile_moves.py --pages 16384 --time 5   # no profiler: loop-thread CPU us per move
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for p in (_HERE, _HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import bench_bookkeeping as bb  # noqa: E402

from kvstore import KVCacheManager  # noqa: E402


async def profile(pages: int, prof: "cProfile.Profile | None" = None) -> float:
    """Run the moves once (profiled when ``prof``); loop-thread CPU seconds of the moves."""
    with bb.stubbed_copies(), tempfile.TemporaryDirectory(prefix="kvprofile-") as tmp:
        cfg, _ = bb.configs(pages, tmp)
        async with KVCacheManager(cfg) as mgr:
            a = await bb.active(mgr, pages)
            a.suspend()
            await bb.active(mgr, pages)  # fills the device level
            c = await bb.active(mgr)
            gc.collect()
            gc.freeze()  # as a serving process does after start-up (docs/architecture.md)
            t0 = time.thread_time()
            if prof is not None:
                prof.enable()
            await c.resize(pages * bb.LAYOUT.tokens_per_page)  # demotes a's pages to the host level
            c.suspend()
            await a.resume()  # a's pages come back; c's leave
            if prof is not None:
                prof.disable()
            cpu = time.thread_time() - t0
            gc.unfreeze()
            mgr.check_invariants()
    return cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=8192)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--time", type=int, default=0, metavar="REPS", help="no profiler: median of REPS runs")
    args = p.parse_args()
    if args.time:
        runs = [asyncio.run(profile(args.pages)) / (4 * args.pages) * 1e6 for _ in range(args.time)]
        print(f"{args.pages} pages, 4 moves each: loop-thread CPU {statistics.median(runs):.2f} us/move, min {min(runs):.2f} "
              f"(median of {args.time}; runs {', '.join(f'{r:.2f}' for r in runs)})")
        return 0
    prof = cProfile.Profile()
    asyncio.run(profile(args.pages, prof))
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
