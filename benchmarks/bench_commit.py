"""bench_commit: what one ``cache.commit(tokens)`` costs on the loop thread, tokens as a Python list or numpy.

A decode loop commits the whole history every step; only new full pages are hashed, but the tokens are
converted and compared each call. Median of ``--reps`` calls with nothing new to hash (the steady state):

    python benchmarks/bench_commit.py --tokens 32768 --reps 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(_ROOT))

from kvstore import DeviceTier, KVCacheManager, PageLayout, StoreConfig  # noqa: E402


async def measure(tokens: int, reps: int, tokens_per_page: int) -> dict[str, float]:
    layout = PageLayout(1, 1, 8, tokens_per_page, torch.float16)
    pages = -(-tokens // tokens_per_page)
    cfg = StoreConfig(layout, [DeviceTier(2 * pages * layout.page_bytes, "cpu")])
    out: dict[str, float] = {}
    async with KVCacheManager(cfg) as mgr:
        for kind in ("list", "numpy"):
            history = np.arange(tokens, dtype=np.int64) + (0 if kind == "list" else 10**9)
            seq = history.tolist() if kind == "list" else history
            cache = mgr.create_cache()
            await cache.resume()
            await cache.resize(tokens)
            cache.commit(seq)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                cache.commit(seq)
                times.append(time.perf_counter() - t0)
            out[f"{kind}_us"] = statistics.median(times) * 1e6
            cache.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--tokens-per-page", type=int, default=16)
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)
    res = asyncio.run(measure(args.tokens, args.reps, args.tokens_per_page))
    print(f"commit() of {args.tokens} tokens, nothing new to hash, median of {args.reps}: "
          f"list {res['list_us']:.0f} us, numpy {res['numpy_us']:.0f} us")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"tokens": args.tokens, **res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
