#!/usr/bin/env python3
"""bench_remote: the shared remote tier — hit rates of N serving nodes, and the remote path against raw redis.

(a) **Hit rate.** N managers in one process (N = 1, 2, 4, 8), each a "node" with small local tiers
(``--local-pages`` pages of 512 tokens, a fifth of them on the device level and the rest on the host, no
disk; tiny page bytes so it runs on a CPU), replay a Mooncake trace, each request sent to a random node
(seeded). Per request: local only — ``create_cache(tokens)``, ``resume()``, ``resize()``, ``commit()``,
``close()``; with the remote tier — first ``await fetch_prefix(tokens)``, then the same. The token hit
rate is the reused prompt tokens over all prompt tokens. Writes are the engine's asynchronous
write-through (no flush between requests), all nodes sharing one ``redis-server``.

(b) **Throughput and latency.** Pages of ``--page-kib`` KiB in units of 32 (one pipeline): *put* through
the engine is ``commit()`` of a 32-page prompt until ``flush()`` returns (EXISTS, reading and packing the
pages off the loop, SET NX with the TTL); *get* is ``fetch_prefix()`` of that prompt on another node (GETs,
checksum and header checks off the loop, landing in host slots). The raw baseline is a ``redis.asyncio``
pipeline of 32 SETs / GETs of values of the same size, in the same run, on the same server (one pipeline,
one connection: the engine uses several smaller ones). A 1 ms ticker measures the event loop's lag while
each runs; the process's minor page faults per call show when the raw put packed into fresh memory (its
slow mode, which comes and goes with the allocator's state).

    python benchmarks/bench_remote.py                              # both parts, both traces if found
    python benchmarks/bench_remote.py --part throughput --page-kib 1024
    python benchmarks/bench_remote.py --part hitrate --nodes 1,4 --limit 2000

Needs the ``redis-server`` binary (``apt-get install -y redis-server``) and ``pip install -e '.[remote]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(_ROOT))

from kvstore import DeviceTier, HostTier, KVCacheManager, PageLayout, RemoteTier, StoreConfig  # noqa: E402

UNIT = 32  # pages per pipeline / per prompt in part (b)


# ---------------------------------------------------------------------------------------------- server
class Server:
    """A throwaway redis-server on a free loopback port (persistence off), killed on exit."""

    def __init__(self, directory: str) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("bench_remote needs redis-server: apt-get install -y redis-server")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", directory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit("redis-server did not start")
                time.sleep(0.02)
        self.url = f"redis://127.0.0.1:{self.port}"

    def flushall(self) -> None:
        import redis

        redis.Redis(port=self.port).flushall()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


# ---------------------------------------------------------------------------------------------- (a) hit rate
def load_replay():
    sys.path.insert(0, str(_ROOT / "benchmarks"))
    from bench_trace import find_trace, load_replay_module  # noqa: E402

    return find_trace, load_replay_module()


async def replay_nodes(requests, n: int, local_pages: int, url: Optional[str], seed: int, block: int) -> tuple[float, float]:
    """(token hit rate, share of prompt tokens that came from the remote) of ``requests`` over ``n`` nodes."""
    _, mod = load_replay()
    layout = PageLayout(num_layers=1, num_kv_heads=1, head_dim=1, tokens_per_page=block, dtype=torch.float16)
    pb = layout.page_bytes
    need = max(-(-(r.input_length + r.output_length) // block) for r in requests)
    dev = max(need, local_pages // 5)
    host = max(1, local_pages - dev)
    mgrs = []
    for i in range(n):
        tiers = [DeviceTier(dev * pb, device="cpu"), HostTier(host * pb, pinned=False)]
        if url:
            tiers.append(RemoteTier(url, timeout_s=2.0, max_pending_pages=1 << 16))
        mgrs.append(KVCacheManager(StoreConfig(layout, tiers, namespace="bench-remote")))
    for m in mgrs:
        await m.start()
    rng = random.Random(seed)
    hit = remote = total = 0
    try:
        for req in requests:
            mgr = mgrs[rng.randrange(n)]
            tokens = mod.prompt_tokens(req, block)
            if url:
                res = await mgr.fetch_prefix(tokens)
                remote += res.pages_moved * block
            cache = mgr.create_cache(tokens)
            hit += cache.num_reused_tokens
            total += req.input_length
            await cache.resume()
            await cache.resize(req.input_length + req.output_length)
            cache.commit(tokens)
            cache.close()
    finally:
        for m in mgrs:
            await m.aclose()
    return hit / max(1, total), remote / max(1, total)


def part_hitrate(args, server: Server) -> list[str]:
    find_trace, mod = load_replay()
    traces = []
    synthetic = mod.resolve(args.synthetic)
    if synthetic.is_file():
        traces.append(("synthetic", synthetic))
    else:
        print(f"synthetic trace skipped: {synthetic} not found (--synthetic PATH)", file=sys.stderr)
    try:
        traces.append(("conversation", find_trace(args.trace, False)))
    except SystemExit as exc:
        print(f"conversation trace skipped: {str(exc).splitlines()[0]}", file=sys.stderr)
    nodes = [int(x) for x in args.nodes.split(",")]
    lines = ["", f"(a) token hit rate, {args.local_pages} local pages of {args.block} tokens per node, random routing "
             f"(seed {args.seed}), one redis-server", "",
             "| trace | nodes | local only | with remote | of which fetched from the remote |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, path in traces:
        requests = mod.load_trace(path, args.limit)
        for n in nodes:
            t0 = time.perf_counter()
            local, _ = asyncio.run(replay_nodes(requests, n, args.local_pages, None, args.seed, args.block))
            server.flushall()
            shared, fetched = asyncio.run(replay_nodes(requests, n, args.local_pages, server.url, args.seed, args.block))
            server.flushall()
            print(f"{name} N={n}: {local:.1%} -> {shared:.1%} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            lines.append(f"| {name} ({len(requests)} req) | {n} | {local:.1%} | {shared:.1%} | {fetched:.1%} |")
    return lines


# ---------------------------------------------------------------------------------------------- (b) throughput
class Ticker:
    """A 1 ms ticker: the largest gap between ticks beyond 1 ms is the event loop's lag."""

    def __init__(self) -> None:
        self.max_lag = 0.0
        self._task: Optional[asyncio.Task] = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(0.001)
            now = loop.time()
            self.max_lag = max(self.max_lag, now - last - 0.001)
            last = now

    def __enter__(self) -> "Ticker":  # may be entered again: the max spans every period
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc) -> None:
        self._task.cancel()


def pct(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def throughput(args, server: Server) -> list[str]:
    import redis.asyncio as aredis

    kib = args.page_kib
    # 8 layers x K,V x 16 tokens x H heads x 128 dims x 2 bytes = H * 64 KiB
    heads = max(1, kib // 64)
    layout = PageLayout(num_layers=8, num_kv_heads=heads, head_dim=128, tokens_per_page=16, dtype=torch.float16)
    pb = layout.page_bytes
    prompts = args.prompts
    dev_pages = UNIT * prompts + UNIT
    host_pages = UNIT * prompts * 2

    def node() -> KVCacheManager:
        tiers = [DeviceTier(dev_pages * pb, device="cpu"), HostTier(host_pages * pb, pinned=False),
                 RemoteTier(server.url, timeout_s=10.0, max_pending_pages=1 << 16)]
        return KVCacheManager(StoreConfig(layout, tiers, namespace="bench-remote-tp"))

    raw = aredis.Redis(host="127.0.0.1", port=server.port)
    rng = np.random.default_rng(0)
    payload = [rng.integers(0, 255, pb + 80, dtype=np.uint8).tobytes() for _ in range(UNIT)]
    tok = iter(range(1 << 40))
    results: dict[str, list[float]] = {k: [] for k in ("eng_put", "eng_get", "raw_put", "raw_get")}
    faults: dict[str, list[int]] = {k: [] for k in results}  # minor page faults of the process per call
    lags: dict[str, list[float]] = {"eng_put": [], "eng_get": [], "raw (baseline)": []}

    def minflt() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    async def timed(key: str, aw, measure: bool, ticker: Optional[Ticker] = None):
        f0, t0 = minflt(), time.perf_counter()
        if ticker is None:
            out = await aw
        else:
            with ticker:
                out = await aw
        if measure:
            results[key].append(time.perf_counter() - t0)
            faults[key].append(minflt() - f0)
        return out

    async def eng_put(a: KVCacheManager, toks: list[int]) -> None:
        cache = a.create_cache()
        await cache.resume()
        await cache.resize(len(toks))
        cache.suspend()
        f0, t0 = minflt(), time.perf_counter()
        cache.commit(toks)
        await a.flush()
        cache.close()
        return time.perf_counter() - t0, minflt() - f0

    async def raw_put(keys: list[bytes]) -> None:
        pipe = raw.pipeline(transaction=False)
        for k, v in zip(keys, payload):
            pipe.set(k, v, nx=True, px=86_400_000)
        await pipe.execute()

    async def raw_get(keys: list[bytes]) -> None:
        pipe = raw.pipeline(transaction=False)
        for k in keys:
            pipe.get(k)
        if any(v is None for v in await pipe.execute()):
            raise SystemExit("raw GET missed")

    async def one_pass(a: KVCacheManager, b: KVCacheManager, measure: bool) -> None:
        """Units alternate engine / raw, so the machine's noise hits both alike; the tickers run during the
        calls they measure only."""
        units = [([next(tok) for _ in range(UNIT * 16)], [f"raw:{next(tok)}".encode() for _ in range(UNIT)])
                 for _ in range(prompts)]
        put_lag, get_lag, raw_lag = Ticker(), Ticker(), Ticker()
        for toks, keys in units:
            with put_lag:
                dt, nf = await eng_put(a, toks)  # timed from commit() to flush() returning
            if measure:
                results["eng_put"].append(dt)
                faults["eng_put"].append(nf)
            await timed("raw_put", raw_put(keys), measure, raw_lag)
        for toks, keys in units:
            res = await timed("eng_get", b.fetch_prefix(toks), measure, get_lag)
            if not res.complete or res.pages_moved != UNIT:
                raise SystemExit(f"fetch_prefix brought {res} instead of {UNIT} pages")
            await timed("raw_get", raw_get(keys), measure, raw_lag)
        if measure:
            lags["eng_put"].append(put_lag.max_lag)
            lags["eng_get"].append(get_lag.max_lag)
            lags["raw (baseline)"].append(raw_lag.max_lag)

    async with node() as a, node() as b:
        await one_pass(a, b, False)  # warm-up: connections, first-touch memory, server allocations
        for _ in range(args.passes):
            await one_pass(a, b, True)
            server.flushall()
    await raw.aclose()
    unit_mib = UNIT * pb / (1 << 20)
    rate = {k: unit_mib * len(v) / sum(v) for k, v in results.items()}
    lines = ["", f"(b) {UNIT}-page units of {pb // 1024} KiB pages ({unit_mib:.0f} MiB), {prompts} units x {args.passes} "
             "passes after a warm-up pass, loopback redis-server", "",
             "| path | engine MiB/s | raw MiB/s | engine / raw | engine p50 / p99 ms | raw p50 / p99 ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for op in ("put", "get"):
        e, r = results[f"eng_{op}"], results[f"raw_{op}"]
        lines.append(
            f"| {op} | {rate[f'eng_{op}']:.0f} | {rate[f'raw_{op}']:.0f} | {rate[f'eng_{op}'] / rate[f'raw_{op}']:.2f} | "
            f"{1e3 * pct(e, .5):.1f} / {1e3 * pct(e, .99):.1f} | {1e3 * pct(r, .5):.1f} / {1e3 * pct(r, .99):.1f} |"
        )
    lines.append("")
    lines.append("minor page faults per call (median): " + ", ".join(
        f"{k.replace('_', ' ')} {statistics.median(v):.0f}" for k, v in faults.items())
        + f" (a raw put near {2 * UNIT * pb // 4096} packed into fresh memory — the allocator's state, not the "
        "server — and runs ~1.5x slower)")
    for what, xs in lags.items():
        lines.append(f"event-loop lag, {what.replace('_', ' ')} (1 ms ticker): max {1e3 * max(xs):.2f} ms, median of passes "
                     f"{1e3 * statistics.median(xs):.2f} ms (target < 3 ms)")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("all", "hitrate", "throughput"), default="all")
    p.add_argument("--trace", default=None, help="the Mooncake conversation trace (see benchmarks/bench_trace.py)")
    p.add_argument("--synthetic", default="../shared/traces/mooncake_synthetic_trace.jsonl",
                   help="the synthetic Mooncake-format trace (relative paths: from the repository root)")
    p.add_argument("--nodes", default="1,2,4,8")
    p.add_argument("--local-pages", type=int, default=2000, help="local pages per node (device + host)")
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests of each trace")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--page-kib", type=int, default=256, help="page size of part (b), a multiple of 64 KiB")
    p.add_argument("--prompts", type=int, default=8, help="32-page units per pass in part (b)")
    p.add_argument("--passes", type=int, default=5)
    args = p.parse_args(argv)
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-remote-") as tmp:
        server = Server(tmp)
        try:
            if args.part in ("all", "throughput"):
                lines += asyncio.run(throughput(args, server))
            if args.part in ("all", "hitrate"):
                lines += part_hitrate(args, server)
        finally:
            server.close()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
