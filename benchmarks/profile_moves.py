#!/usr/bin/env python3
"""profile_moves: where the loop thread's time goes when pages move (copies stubbed out, cProfile).

A cache of N pages is demoted to the host level by another cache's resize(), then resumed (which demotes
the other cache's pages): 4N page moves of bookkeeping only, profiled, top functions by own time.

    python benchmarks/profile_moves.py --pages 8192 --top 25
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for p in (_HERE, _HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import bench_bookkeeping as bb  # noqa: E402

from kvstore import KVCacheManager  # noqa: E402


async def profile(pages: int) -> cProfile.Profile:
    prof = cProfile.Profile()
    with bb.stubbed_copies(), tempfile.TemporaryDirectory(prefix="kvprofile-") as tmp:
        cfg, _ = bb.configs(pages, tmp)
        async with KVCacheManager(cfg) as mgr:
            a = await bb.active(mgr, pages)
            a.suspend()
            await bb.active(mgr, pages)  # fills the device level
            c = await bb.active(mgr)
            prof.enable()
            await c.resize(pages * bb.LAYOUT.tokens_per_page)  # demotes a's pages to the host level
            c.suspend()
            await a.resume()  # a's pages come back; c's leave
            prof.disable()
            mgr.check_invariants()
    return prof


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=8192)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    prof = asyncio.run(profile(args.pages))
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
