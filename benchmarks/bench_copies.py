#!/usr/bin/env python3
"""bench_copies: the copier alone — scattered page copies host<->device against one raw copy, same run.

For each page size, ``--gib`` GiB of pages move between a pinned host tensor and a device tensor with
their rows in random order on both sides (as pages sit in the tiers), through ``Copier.copy`` exactly as
the executor calls it, and the same number of bytes moves as one contiguous ``copy_`` (the raw
hardware). Prints medians of ``--reps`` runs of GB/s and the ratio engine/raw per direction, both
directions at once against raw both-at-once, and the event loop's max lag (1 ms ticker) during the
engine copies. ``--mode`` picks the copy path: ``batch`` (cuMemcpyBatchAsync, opt-in in the engine
through ``KVSTORE_BATCH_COPIES=1``) or ``legacy`` (gather kernel over mapped memory below 1 MiB runs, DMA per run above).

    python benchmarks/bench_copies.py --gib 2 --reps 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from kvstore.transfer.copier import Copier, Segment  # noqa: E402

SIZES = {"64k": 64 << 10, "128k": 128 << 10, "512k": 512 << 10, "2m": 2 << 20}


async def _ticker(stop: asyncio.Event, lags: list[float]) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        lags.append(now - last - 0.001)
        last = now


async def _timed(cp: Copier, jobs: list[tuple[list[Segment], str]], lags: list[float]) -> float:
    stop = asyncio.Event()
    tick = asyncio.ensure_future(_ticker(stop, lags))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    await asyncio.gather(*(cp.copy(segs, lane) for segs, lane in jobs))
    dt = time.perf_counter() - t0
    stop.set()
    await tick
    return dt


def _raw(dst: list[torch.Tensor], src: list[torch.Tensor], streams: list[torch.cuda.Stream]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for d, s, st in zip(dst, src, streams):
        with torch.cuda.stream(st):
            d.copy_(s, non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


async def bench(page: int, total: int, reps: int, chunk_pages: int) -> dict[str, float]:
    dev = torch.device("cuda", torch.cuda.current_device())
    rows = total // page
    host = torch.empty((rows, page), dtype=torch.uint8).pin_memory()
    host2 = torch.empty((rows, page), dtype=torch.uint8).pin_memory()
    device = torch.empty((rows, page), dtype=torch.uint8, device=dev)
    device2 = torch.empty((rows, page), dtype=torch.uint8, device=dev)
    g = torch.Generator().manual_seed(page)
    perm_h, perm_d = torch.randperm(rows, generator=g).tolist(), torch.randperm(rows, generator=g).tolist()

    def requests(dst, dst_rows, src, src_rows, lane):  # as the executor issues them: chunks of pages
        return [([Segment(dst, dst_rows[i:i + chunk_pages], src, src_rows[i:i + chunk_pages])], lane)
                for i in range(0, rows, chunk_pages)]

    up = requests(device, perm_d, host, perm_h, "up")
    down = requests(host2, perm_h, device2, perm_d, "down")
    streams = [torch.cuda.Stream(dev), torch.cuda.Stream(dev)]
    cp = Copier(dev)
    out: dict[str, list[float]] = {k: [] for k in ("h2d", "d2h", "both", "raw_h2d", "raw_d2h", "raw_both", "lag")}
    try:
        for r in range(reps + 1):
            lags: list[float] = []
            res = {
                "h2d": total / await _timed(cp, up, lags),
                "d2h": total / await _timed(cp, down, lags),
                "both": 2 * total / await _timed(cp, up + down, lags),
                "raw_h2d": total / _raw([device], [host], streams[:1]),
                "raw_d2h": total / _raw([host2], [device2], streams[:1]),
                "raw_both": 2 * total / _raw([device, host2], [host, device2], streams),
                "lag": max(lags) * 1e3 if lags else 0.0,
            }
            if torch.equal(device[perm_d[:8]].cpu(), host[perm_h[:8]]) is False:
                raise SystemExit("copied rows differ from their source: the copy path is wrong")
            if r:  # the first run warms up
                for k, v in res.items():
                    out[k].append(v)
    finally:
        cp.close()
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=2.0, help="GiB moved per direction (default 2)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sizes", default=",".join(SIZES), help=f"page sizes among {','.join(SIZES)}")
    p.add_argument("--chunk-pages", type=int, default=256, help="pages per copy request (executor batch)")
    p.add_argument("--mode", choices=("batch", "legacy"), default="batch")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    os.environ["KVSTORE_BATCH_COPIES"] = "1" if args.mode == "batch" else "0"
    total = int(args.gib * (1 << 30))
    print(f"bench_copies mode={args.mode} {args.gib} GiB per direction, median of {args.reps}, "
          f"{args.chunk_pages} pages per request ({torch.cuda.get_device_name()})")
    print(f"{'page':>5} {'h2d GB/s':>9} {'ratio':>6} {'d2h GB/s':>9} {'ratio':>6} {'both GB/s':>9} {'ratio':>6} "
          f"{'raw h2d':>8} {'raw d2h':>8} {'raw both':>8} {'max lag ms':>10}")
    for name in args.sizes.split(","):
        m = asyncio.run(bench(SIZES[name], total, args.reps, args.chunk_pages))
        gb = {k: v / 1e9 for k, v in m.items() if k != "lag"}
        print(f"{name:>5} {gb['h2d']:9.1f} {m['h2d'] / m['raw_h2d']:6.2f} {gb['d2h']:9.1f} {m['d2h'] / m['raw_d2h']:6.2f} "
              f"{gb['both']:9.1f} {m['both'] / m['raw_both']:6.2f} {gb['raw_h2d']:8.1f} {gb['raw_d2h']:8.1f} "
              f"{gb['raw_both']:8.1f} {m['lag']:10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
