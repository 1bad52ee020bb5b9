"""bench_driver_queue: why the batched copier bounds the copies it keeps queued (needs CUDA).

Copy threads queue scattered host<->device copies through :class:`kvstore.transfer.batchcopy.BatchCopier`
(``--mib`` per pass, 4 GiB by default, pages in random order) while the main thread, standing in for the event loop, records a CUDA
event every 0.5 ms and times the call. With the queue unbounded (``--bounds`` 0), the driver's command queue
fills, the copy thread's driver call blocks until the GPU drains it, and the main thread's event record waits
with it. With the copier's bound (``batchcopy.QUEUED_COPIES`` copies per stream) it does not. Both directions
at once show whether the two copy engines overlap.

    python benchmarks/bench_driver_queue.py [--pages 64,2048] [--bounds 0,2048] [--seconds 2]

Prints per configuration: GB/s per direction, the ratio to one raw copy of that size measured in the same run, and
the max / p99 latency of the main thread's event record.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import torch

from kvstore.transfer import batchcopy

def _addresses(page: int, total: int, dev_base: int, host_base: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = total // page
    perm = np.random.default_rng(seed).permutation(n).astype(np.uint64)
    dev = np.uint64(dev_base) + perm * np.uint64(page)
    host = np.uint64(host_base) + np.arange(n, dtype=np.uint64) * np.uint64(page)
    return dev, host, np.full(n, page, dtype=np.uint64)


def _copy_thread(copier: batchcopy.BatchCopier, direction: str, page: int, seconds: float, out: dict,
                 dev: torch.Tensor, host: torch.Tensor, seed: int) -> None:
    torch.cuda.set_device(dev.device)
    stream = torch.cuda.Stream(dev.device)
    d, h, sizes = _addresses(page, dev.numel(), dev.data_ptr(), host.data_ptr(), seed)
    moved, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        if direction == "h2d":
            copier.copy(d, h, sizes, "h2d", stream.cuda_stream)
        else:
            copier.copy(h, d, sizes, "d2h", stream.cuda_stream)
        moved += dev.numel()
    stream.synchronize()
    out["gbps"] = moved / (time.perf_counter() - t0) / 1e9


def _probe(threads: list[threading.Thread], seconds: float, side: torch.cuda.Stream) -> list[float]:
    lat = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds and (not threads or any(t.is_alive() for t in threads)):
        a = time.perf_counter()
        torch.cuda.Event().record(side)
        lat.append(time.perf_counter() - a)
        time.sleep(0.0005)
    return lat


def main(argv: "list[str] | None" = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=4096, help="bytes per pass and direction, MiB")
    p.add_argument("--pages", default="64,2048", help="page sizes in KiB")
    p.add_argument("--bounds", default=f"0,{batchcopy.QUEUED_COPIES}", help="queued copies per stream; 0 = unbounded")
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args(argv)
    total = args.mib << 20
    if not torch.cuda.is_available():
        raise SystemExit("bench_driver_queue needs a CUDA device")
    copier = batchcopy.load(torch.cuda.current_device())
    if copier is None:
        raise SystemExit("this driver has no batched copies (cuMemcpyBatchAsync, CUDA 12.8+)")
    dev = [torch.empty(total, dtype=torch.uint8, device="cuda") for _ in range(2)]
    host = [torch.empty(total, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    side = torch.cuda.Stream()
    raws = []
    for _ in range(4):  # the first is a warm-up; the median of the other three counts
        t = time.perf_counter()
        dev[0].copy_(host[0], non_blocking=True)
        torch.cuda.synchronize()
        raws.append(total / (time.perf_counter() - t) / 1e9)
    raw = float(np.median(raws[1:]))
    print(f"bench_driver_queue: {torch.cuda.get_device_name()}, raw {args.mib} MiB h2d copy {raw:.1f} GB/s, "
          f"CHUNK {batchcopy.CHUNK} runs per call, {args.seconds:g} s per row")
    idle = _probe([], 1.0, side)
    print(f"idle: event record max {1e3 * max(idle):.2f} ms, p99 {1e3 * np.percentile(idle, 99):.2f} ms\n")
    print("| page | directions | queued copies | GB/s | ratio to raw | event record max / p99 ms |")
    print("| ---: | --- | ---: | --- | --- | --- |")
    default_bound = batchcopy.QUEUED_COPIES
    try:
        _rows(args, copier, dev, host, side, raw)
    finally:
        batchcopy.QUEUED_COPIES = default_bound


def _rows(args: argparse.Namespace, copier: batchcopy.BatchCopier, dev: list[torch.Tensor], host: list[torch.Tensor],
          side: torch.cuda.Stream, raw: float) -> None:
    for kib in (int(x) for x in args.pages.split(",")):
        for bound in (int(x) for x in args.bounds.split(",")):
            batchcopy.QUEUED_COPIES = bound
            for dirs in (("h2d",), ("h2d", "d2h")):
                outs: list[dict] = [{} for _ in dirs]
                threads = [threading.Thread(target=_copy_thread, args=(copier, d, kib << 10, args.seconds, o,
                                                                         dev[i], host[i], i))
                           for i, (d, o) in enumerate(zip(dirs, outs))]
                for th in threads:
                    th.start()
                lat = _probe(threads, args.seconds + 1.0, side)
                for th in threads:
                    th.join()
                gbps = " + ".join(f"{o['gbps']:.1f}" for o in outs)
                ratio = " + ".join(f"{o['gbps'] / raw:.2f}" for o in outs)
                print(f"| {kib} KiB | {' + '.join(dirs)} | {bound or 'unbounded'} | {gbps} | {ratio} | "
                      f"{1e3 * max(lat):.2f} / {1e3 * np.percentile(lat, 99):.2f} |", flush=True)


if __name__ == "__main__":
    main()
