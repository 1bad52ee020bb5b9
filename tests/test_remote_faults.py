"""The remote tier when the server misbehaves: paused (SIGSTOP), killed, restarted empty, out of memory.

Every call returns within its deadline, local work goes on unaffected, no wrong data is handed out and
the manager's invariants hold; the circuit breaker opens after repeated failures and closes once the
server answers again.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import torch

from kvstore import CacheLevel, PageLayout

from .conftest import until
from .test_remote import TPP, commit_prompt, fresh_namespace, node, resume_bytes, same_bytes, tokens_of

DEADLINE = 0.3
SLACK = 0.7  # a shared 2-core CI machine: scheduling noise on top of the deadline


async def timed(aw):
    t0 = time.perf_counter()
    result = await aw
    return result, time.perf_counter() - t0


async def local_work_goes_on(mgr, seed: int) -> None:
    """A prompt computed, committed and reused locally, byte-exact, whatever the remote does."""
    toks = tokens_of(3, seed=seed)
    data = await commit_prompt(mgr, toks, seed=seed)
    reused, got = await resume_bytes(mgr, toks)
    assert reused == 3 * TPP and same_bytes(got, data)
    mgr.check_invariants()


async def test_a_paused_server_costs_each_call_its_deadline_then_the_breaker_opens_and_closes(tmp_path, own_redis):
    server = own_redis()
    ns = fresh_namespace()
    toks = tokens_of(6, seed=1)
    async with node(tmp_path, server.url, ns, timeout_s=DEADLINE) as a, \
            node(tmp_path, server.url, ns, timeout_s=DEADLINE) as b:
        data = await commit_prompt(a, toks)
        await a.flush(5)
        server.pause()
        try:
            match, dt = await timed(b.lookup_remote(toks))
            assert match.pages_per_level[CacheLevel.REMOTE] == 0 and dt < DEADLINE + SLACK
            res, dt = await timed(b.fetch_prefix(toks))
            assert not res.complete and res.pages_moved == 0 and dt < DEADLINE + SLACK
            res, dt = await timed(b.fetch_prefix(toks, timeout_s=0.05))
            assert not res.complete and dt < 0.05 + SLACK
            await local_work_goes_on(b, seed=2)  # queues writes the paused server cannot take
            _, dt = await timed(b.flush(timeout_s=0.2))
            assert dt < 0.2 + SLACK
            await until(lambda: b.stats()["remote_breaker_opened"] >= 1, "the breaker opened", limit=10)
            res, dt = await timed(b.fetch_prefix(toks))  # open: refused at once
            assert not res.complete and dt < 0.1
            assert b.stats()["remote_errors"] >= 3
            b.check_invariants()
        finally:
            server.resume()
        await until(lambda: b._remote.client.breaker.allow(), "the breaker closed after a ping", limit=10)
        res = await b.fetch_prefix(toks)
        assert res.complete and res.pages_moved == 6
        reused, got = await resume_bytes(b, toks)
        assert reused == 6 * TPP and same_bytes(got, data)


async def test_a_killed_then_restarted_empty_server(tmp_path, own_redis):
    server = own_redis()
    ns = fresh_namespace()
    toks = tokens_of(5, seed=3)
    async with node(tmp_path, server.url, ns, timeout_s=DEADLINE) as a, \
            node(tmp_path, server.url, ns, timeout_s=DEADLINE) as b:
        await commit_prompt(a, toks)
        await a.flush(5)
        server.kill()
        for _ in range(4):
            (match, dt) = await timed(b.lookup_remote(toks))
            assert match.num_tokens == 0 and dt < DEADLINE + SLACK
            res, dt = await timed(b.fetch_prefix(toks))
            assert res.pages_moved == 0 and not res.complete and dt < DEADLINE + SLACK
        await local_work_goes_on(a, seed=4)
        await a.flush(5)
        assert a.stats()["remote_write_dropped"] >= 3  # the 3 pages committed while it was down
        assert b.stats()["remote_errors"] >= 3 and b.stats()["remote_breaker_opened"] >= 1
        server.start()  # empty, same port
        await until(lambda: b._remote.client.breaker.allow(), "b's breaker closed", limit=10)
        await until(lambda: a._remote.client.breaker.allow(), "a's breaker closed", limit=10)
        res = await b.fetch_prefix(toks)  # nothing there: the (empty) remote prefix arrived whole
        assert res.complete and res.pages_moved == 0
        assert b.lookup(toks).num_tokens == 0
        toks2 = tokens_of(4, seed=5)
        data2 = await commit_prompt(a, toks2, seed=5)
        await a.flush(5)
        res = await b.fetch_prefix(toks2)
        assert res.complete and res.pages_moved == 4
        reused, got = await resume_bytes(b, toks2)
        assert reused == 4 * TPP and same_bytes(got, data2)


BIG = PageLayout(num_layers=4, num_kv_heads=4, head_dim=64, tokens_per_page=TPP, dtype=torch.float16)  # 16 KiB


async def test_a_server_evicting_mid_prefix_ends_the_fetch_at_the_hole(tmp_path, own_redis):
    """allkeys-lru with a tiny maxmemory: the prefix's first pages were read again (recently used), then a
    second prompt pushed the server over its limit, so the pages evicted are the older ones after them."""
    server = own_redis("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru", "--maxmemory-samples", "10")
    ns = fresh_namespace()
    n = 60  # ~1.2 MB on the server (16 KiB values in 20 KiB allocations): fits
    toks, other = tokens_of(n, seed=6), tokens_of(120, seed=8)  # together they do not
    kw = dict(layout=BIG, device=160, host=16, disk=0, timeout_s=2.0)
    async with node(tmp_path, server.url, ns, **kw) as a, node(tmp_path, server.url, ns, **kw) as b:
        data = await commit_prompt(a, toks)
        await a.flush(20)
        keys = a._remote.keys.keys(a._hasher.keys(np.asarray(toks), 0, n, None))
        r = server.client()
        await asyncio.sleep(1.2)  # Redis' LRU clock ticks once a second
        assert all(r.get(k) is not None for k in keys[:30])  # the first 30 are now the most recently used
        await commit_prompt(a, other, seed=9)
        await a.flush(20)
        assert int(r.info("stats")["evicted_keys"]) > 0
        lead = next((i for i, k in enumerate(keys) if not r.exists(k)), n)
        assert lead < n, "the server should have evicted pages of the older prefix"
        res, dt = await timed(b.fetch_prefix(toks, CacheLevel.DEVICE))
        assert dt < 2.0 * 8 + SLACK
        # the GETs' replies count against maxmemory too: the server may evict more while answering them
        assert res.pages_moved <= lead and res.complete  # the prefix the remote held, whole
        reused, got = await resume_bytes(b, toks)
        assert reused == res.pages_moved * TPP and same_bytes(got, data[: res.pages_moved])
        await local_work_goes_on(b, seed=7)


async def test_a_server_refusing_writes_when_full_costs_nothing_locally(tmp_path, own_redis):
    server = own_redis("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
    ns = fresh_namespace()
    n = 200  # 3.2 MiB of pages: more than the server takes
    toks = tokens_of(n, seed=6)
    kw = dict(layout=BIG, device=n + 8, host=16, disk=0, timeout_s=2.0)
    async with node(tmp_path, server.url, ns, **kw) as a, node(tmp_path, server.url, ns, **kw) as b:
        data = await commit_prompt(a, toks)
        await a.flush(20)
        written = a.stats()["pages_device_to_remote"]
        assert 0 < written < n
        assert a.stats()["remote_errors"] >= 1 and a.stats()["remote_write_dropped"] == n - written
        res = await b.fetch_prefix(toks, CacheLevel.DEVICE)
        assert res.pages_moved <= written
        reused, got = await resume_bytes(b, toks)
        assert reused == res.pages_moved * TPP and same_bytes(got, data[: res.pages_moved])
        b.check_invariants()
        await local_work_goes_on(a, seed=7)


async def test_closing_while_writes_hang_on_a_paused_server_is_bounded(tmp_path, own_redis):
    """aclose() cancels the writer in the middle of a call the paused server never answers; it returns within
    about one deadline, counts the pages given up, and leaves no operation behind."""
    server = own_redis()
    ns = fresh_namespace()
    mgr_cm = node(tmp_path, server.url, ns, timeout_s=DEADLINE)
    a = await mgr_cm.__aenter__()
    try:
        await commit_prompt(a, tokens_of(2, seed=11))
        await a.flush(5)
        server.pause()
        await commit_prompt(a, tokens_of(4, seed=12), seed=12)  # queued; the writer's EXISTS now hangs
        await asyncio.sleep(DEADLINE / 3)
        a.check_invariants()
        t0 = time.perf_counter()
        await mgr_cm.__aexit__(None, None, None)
        assert time.perf_counter() - t0 < DEADLINE + SLACK
        assert a.stats()["remote_write_dropped"] >= 4 and not a._ledger.ops
    finally:
        server.resume()
