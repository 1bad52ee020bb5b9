"""The shared remote tier against a real redis-server: two managers as two nodes, write-through, fetch, checks."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import AsyncIterator

import numpy as np
import pytest
import torch

from kvstore import CacheLevel, InvalidArgumentError, DeviceTier, DiskTier, HostTier, KVCacheManager, PageLayout, RemoteTier, StoreConfig
from kvstore.remote.gather import gather_values, make_packer
from kvstore.remote import codec

from .conftest import LAYOUT, sink_to_disk, until

TPP = LAYOUT.tokens_per_page
_ns = itertools.count()


def fresh_namespace() -> str:
    """Tests share one server: a namespace of their own keeps their keys apart."""
    return f"test-{next(_ns)}-{np.random.randint(1 << 30)}"


@contextlib.asynccontextmanager
async def node(tmp_path, url: str, namespace: str, *, device: int = 16, host: int = 8, disk: int = 32,
               layout: PageLayout = LAYOUT, **remote) -> AsyncIterator[KVCacheManager]:
    """One serving node: a manager with small local tiers and the remote tier at ``url``."""
    pb = layout.page_bytes
    remote.setdefault("timeout_s", 1.0)
    tiers = [DeviceTier(device * pb), HostTier(host * pb)]
    if disk:
        tiers.append(DiskTier(disk * pb, tmp_path / f"disk-{namespace}"))
    cfg = StoreConfig(layout, [*tiers, RemoteTier(url, **remote)], namespace=namespace)
    async with KVCacheManager(cfg) as mgr:
        yield mgr
        mgr.check_invariants()


def tokens_of(n_pages: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(0, 50_000, n_pages * TPP)]


async def commit_prompt(mgr: KVCacheManager, tokens: list[int], seed: int = 1) -> torch.Tensor:
    """A cache holding ``tokens`` with random KV, committed and closed; returns the pages' data (CPU)."""
    cache = mgr.create_cache(tokens)
    await cache.resume()
    await cache.resize(len(tokens))
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn((cache.num_pages, *mgr.layout.page_shape), generator=gen).to(mgr.layout.dtype)
    idx = cache.page_indices()
    reused = cache.num_reused_tokens // TPP
    pool = mgr.device_pool
    pool[idx[reused:]] = data[reused:].to(pool.device)
    data[:reused] = pool[idx[:reused]].cpu()
    cache.commit(tokens)
    cache.suspend()
    cache.close()
    return data


async def resume_bytes(mgr: KVCacheManager, tokens: list[int]) -> tuple[int, torch.Tensor]:
    """(reused tokens, their page bytes) of a new cache over ``tokens`` resumed on the device."""
    cache = mgr.create_cache(tokens)
    try:
        await cache.resume()
        got = mgr.device_pool[cache.page_indices()].cpu()
        cache.suspend()
        return cache.num_reused_tokens, got
    finally:
        cache.close()


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


async def test_node_b_reuses_a_prefix_node_a_committed(tmp_path, redis_server):
    ns = fresh_namespace()
    toks = tokens_of(10)
    async with node(tmp_path, redis_server.url, ns) as a, node(tmp_path, redis_server.url, ns) as b:
        data = await commit_prompt(a, toks)
        await a.flush(timeout_s=5)
        assert a.stats()["pages_device_to_remote"] == 10
        assert a.stats()["bytes_device_to_remote"] == 10 * LAYOUT.page_bytes
        match = await b.lookup_remote(toks + [1, 2])
        assert match.num_tokens == 10 * TPP and match.pages_per_level[CacheLevel.REMOTE] == 10
        assert b.lookup(toks).num_tokens == 0
        res = await b.fetch_prefix(toks)
        assert res.complete and res.pages_moved == 10 and res.bytes_moved == 10 * LAYOUT.page_bytes
        assert b.stats()["pages_remote_to_host"] == 10
        b.check_invariants()
        reused, got = await resume_bytes(b, toks)
        assert reused == 10 * TPP and same_bytes(got, data)
        # nothing is fetched twice, and B's own commits of those pages are not written again
        again = await b.fetch_prefix(toks)
        assert again.complete and again.pages_moved == 0
        assert b.timings.histograms["fetch_prefix"].count == 2  # kvstore.metrics: one observation per call


async def test_a_longer_prompt_extends_a_remote_prefix_and_skips_what_the_remote_has(tmp_path, redis_server):
    ns = fresh_namespace()
    toks = tokens_of(12, seed=3)
    async with node(tmp_path, redis_server.url, ns) as a, node(tmp_path, redis_server.url, ns) as b:
        await commit_prompt(a, toks[: 6 * TPP])
        await a.flush(5)
        res = await b.fetch_prefix(toks)  # the remote has the first 6 pages
        assert res.complete and res.pages_moved == 6
        data = await commit_prompt(b, toks, seed=5)  # reuses 6, computes 6 more
        await b.flush(5)
        assert b.stats()["remote_write_skipped"] >= 6 or b.stats()["pages_device_to_remote"] == 6
        assert b.stats()["pages_device_to_remote"] + b.stats()["pages_host_to_remote"] == 6
        async with node(tmp_path, redis_server.url, ns) as c:
            res = await c.fetch_prefix(toks, CacheLevel.DEVICE)
            assert res.complete and res.pages_moved == 12
            assert c.stats()["pages_remote_to_device"] == 12
            reused, got = await resume_bytes(c, toks)
            assert reused == 12 * TPP and same_bytes(got, data)


async def test_cluster_mode_two_nodes(tmp_path, redis_cluster):
    ns = fresh_namespace()
    toks = tokens_of(9, seed=7)
    async with node(tmp_path, redis_cluster.url, ns) as a, node(tmp_path, redis_cluster.url, ns) as b:
        data = await commit_prompt(a, toks)
        await a.flush(5)
        assert a.stats()["pages_device_to_remote"] == 9 and a.stats()["remote_errors"] == 0
        assert (await b.lookup_remote(toks)).pages_per_level[CacheLevel.REMOTE] == 9
        res = await b.fetch_prefix(toks)
        assert res.complete and res.pages_moved == 9
        reused, got = await resume_bytes(b, toks)
        assert reused == 9 * TPP and same_bytes(got, data)
    spread = [int(n.cli("DBSIZE")) for n in redis_cluster.nodes]
    assert sum(1 for s in spread if s) >= 2, f"keys should spread over the cluster's nodes: {spread}"


async def test_fetch_lands_where_the_target_is_full_by_evicting(tmp_path, redis_server):
    ns = fresh_namespace()
    toks = tokens_of(20, seed=11)
    async with node(tmp_path, redis_server.url, ns, device=24) as a, node(tmp_path, redis_server.url, ns, device=24, host=4) as b:
        data = await commit_prompt(a, toks)
        await a.flush(5)
        res = await b.fetch_prefix(toks)  # 20 pages through a host tier of 4: earlier ones go on to disk
        assert res.complete and res.pages_moved == 20
        assert sum(b.lookup(toks).pages_per_level.values()) == 20
        reused, got = await resume_bytes(b, toks)
        assert reused == 20 * TPP and same_bytes(got, data)


async def test_ttl_is_set_on_every_key(tmp_path, redis_server):
    ns = fresh_namespace()
    async with node(tmp_path, redis_server.url, ns, ttl_s=30.0) as a:
        await commit_prompt(a, tokens_of(2, seed=13))
        await a.flush(5)
        key = a._remote.keys.key(a._placement.index.pages().__iter__().__next__().key)
        pttl = redis_server.client().pttl(key)
        assert 0 < pttl <= 30_000


async def test_pages_are_read_from_every_level_byte_exact(tmp_path, redis_server):
    """The writer's gather path: host pages in place, device pages, disk pages by a checksummed read."""
    ns = fresh_namespace()
    async with node(tmp_path, redis_server.url, ns, device=4, host=4, disk=32) as mgr:
        toks = tokens_of(3, seed=17)
        data = await commit_prompt(mgr, toks)
        pages, _ = mgr._match(np.asarray(toks))
        ks = mgr._remote.keys
        pack = make_packer(ks.layout_digest, ks.scope, [(ks.key(p.key), p.key) for p in pages], 30_000)
        for level in (CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK):
            if level == CacheLevel.DISK:
                holder = mgr.create_cache(toks)
                await sink_to_disk(mgr, holder)
                holder.close()
            elif level == CacheLevel.HOST:
                for i in range(1):  # a newer 4-page prompt pushes these to the host level
                    await commit_prompt(mgr, tokens_of(4, seed=100 + i), seed=100 + i)
            at = {p.level for p in pages}
            assert at == {level}, (level, at)
            values, again = await gather_values(mgr, [(p, p.key) for p in pages], pack)
            assert not again and [lvl for *_, lvl in values] == [level] * 3
            for (i, packed, span, _), page in zip(values, pages):
                assert packed.keys[span] == ks.key(page.key)
                body = codec.decode(bytes(packed.value(span)), ks.layout_digest, ks.scope, page.key, LAYOUT.page_bytes)
                assert body is not None and bytes(body) == data[i].contiguous().view(torch.uint8).numpy().tobytes()
            mgr.check_invariants()


async def _two_nodes_with_prefix(tmp_path, url, ns, n_pages=8, seed=21):
    toks = tokens_of(n_pages, seed=seed)
    return toks


@pytest.mark.parametrize("damage", ["flip", "truncate"])
async def test_a_damaged_value_is_a_counted_miss_and_deleted(tmp_path, redis_server, damage):
    ns = fresh_namespace()
    toks = tokens_of(8, seed=23)
    async with node(tmp_path, redis_server.url, ns) as a, node(tmp_path, redis_server.url, ns) as b:
        data = await commit_prompt(a, toks)
        await a.flush(5)
        keys = a._hasher.keys(np.asarray(toks), 0, 8, None)
        bad = a._remote.keys.key(keys[5])
        r = redis_server.client()
        if damage == "flip":
            old = r.getrange(bad, 500, 500)
            r.setrange(bad, 500, bytes([old[0] ^ 0x40]))
        else:
            r.set(bad, r.get(bad)[:-7])
        res = await b.fetch_prefix(toks)
        assert not res.complete and res.pages_moved == 5
        assert b.stats()["remote_corrupt"] == 1
        await b._remote.reader.close()  # the best-effort delete has run
        assert r.exists(bad) == 0
        reused, got = await resume_bytes(b, toks)
        assert reused == 5 * TPP and same_bytes(got, data[:5])


async def test_another_layout_or_namespace_never_sees_the_pages(tmp_path, redis_server):
    ns = fresh_namespace()
    toks = tokens_of(4, seed=29)
    other_layout = PageLayout(num_layers=2, num_kv_heads=2, head_dim=16, tokens_per_page=TPP, dtype=torch.bfloat16)
    async with node(tmp_path, redis_server.url, ns) as a:
        await commit_prompt(a, toks)
        await a.flush(5)
        for name, kw in {"namespace": dict(namespace=ns + "-other"), "layout": dict(layout=other_layout)}.items():
            async with node(tmp_path, redis_server.url, kw.get("namespace", ns), layout=kw.get("layout", LAYOUT)) as b:
                match = await b.lookup_remote(toks)
                assert match.pages_per_level[CacheLevel.REMOTE] == 0, name
                res = await b.fetch_prefix(toks)
                assert res.pages_moved == 0 and b.stats()["remote_misses"] == 2, name
                # even a value copied under this node's key (a key collision) fails the header check
                r = redis_server.client()
                a_key = a._remote.keys.key(a._hasher.keys(np.asarray(toks), 0, 1, None)[0])
                b_key = b._remote.keys.key(b._hasher.keys(np.asarray(toks), 0, 1, None)[0])
                r.set(b_key, r.get(a_key))
                res = await b.fetch_prefix(toks)
                assert res.pages_moved == 0 and b.stats()["remote_corrupt"] == 1, name


async def test_the_write_queue_is_bounded_and_drops_counted(tmp_path, redis_server):
    ns = fresh_namespace()
    async with node(tmp_path, redis_server.url, ns, max_pending_pages=3) as a:
        await commit_prompt(a, tokens_of(10, seed=31))  # one commit() queues 10 pages at once
        assert a.stats()["remote_write_dropped"] == 7
        await a.flush(5)
        assert a.stats()["pages_device_to_remote"] == 3
        async with node(tmp_path, redis_server.url, ns) as b:
            assert (await b.lookup_remote(tokens_of(10, seed=31))).pages_per_level[CacheLevel.REMOTE] == 3


async def test_flush_waits_for_every_queued_page(tmp_path, redis_server):
    ns = fresh_namespace()
    async with node(tmp_path, redis_server.url, ns) as a:
        await a.flush()  # nothing queued: returns at once
        for i in range(4):
            await commit_prompt(a, tokens_of(3, seed=40 + i), seed=40 + i)
        await a.flush()
        assert a._remote.writer.pending == 0
        assert a.stats()["pages_device_to_remote"] + a.stats()["pages_host_to_remote"] == 12


async def test_concurrent_fetches_of_one_prefix_land_each_page_once(tmp_path, redis_server):
    ns = fresh_namespace()
    toks = tokens_of(12, seed=43)
    async with node(tmp_path, redis_server.url, ns, device=16) as a, node(tmp_path, redis_server.url, ns) as b:
        data = await commit_prompt(a, toks)
        await a.flush(5)
        results = await asyncio.gather(*(b.fetch_prefix(toks) for _ in range(3)))
        assert all(r.complete for r in results)
        assert b.stats()["pages_remote_to_host"] == 12 and sum(r.pages_moved for r in results) == 12
        b.check_invariants()
        reused, got = await resume_bytes(b, toks)
        assert reused == 12 * TPP and same_bytes(got, data)


async def test_fetch_prefix_cancelled_at_every_await_leaves_nothing_half_done(tmp_path, redis_server):
    ns = fresh_namespace()
    toks = tokens_of(40, seed=47)  # > one pipeline of 32 pages, through a host tier of 8
    async with node(tmp_path, redis_server.url, ns, device=48) as a:
        data = await commit_prompt(a, toks)
        await a.flush(5)
        seen = set()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 60
        steps = 0
        while True:  # cancel after 0, 3, 6, ... loop steps, until a fetch finishes first
            async with node(tmp_path, redis_server.url, ns, device=48) as b:
                task = asyncio.ensure_future(b.fetch_prefix(toks))
                for _ in range(steps):
                    await asyncio.sleep(0)
                finished = task.done()
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                b.check_invariants()
                assert not b._ledger.ops, "an operation outlived its call"
                n = sum(b.lookup(toks).pages_per_level.values())
                seen.add(n)
                reused, got = await resume_bytes(b, toks)
                assert reused == n * TPP and same_bytes(got, data[:n])
                if finished:
                    assert n == 40
                    assert any(0 < k < 40 for k in seen), f"no cancellation landed part of the prefix: {seen}"
                    break
            assert loop.time() < give_up, f"fetch_prefix did not finish within {steps} loop steps"
            steps += 3


async def test_without_a_remote_tier_the_calls_are_local(make_store):
    async with make_store(device=8, host=4, disk=0) as mgr:
        await mgr.flush()
        match = await mgr.lookup_remote([1, 2, 3, 4])
        assert match.num_tokens == 0 and match.pages_per_level[CacheLevel.REMOTE] == 0
        res = await mgr.fetch_prefix([1, 2, 3, 4])
        assert res.complete and res.pages_moved == 0
        for bad in (-1, "1", float("nan"), True):  # misuse is refused with or without a remote tier
            with pytest.raises(InvalidArgumentError, match="timeout_s"):
                await mgr.flush(timeout_s=bad)
            with pytest.raises(InvalidArgumentError, match="timeout_s"):
                await mgr.fetch_prefix([1, 2, 3, 4], timeout_s=bad)
        await mgr.flush(timeout_s=0.5)


async def test_fetch_prefix_refuses_misuse(tmp_path, redis_server):
    from kvstore import InvalidArgumentError, InvalidStateError

    async with node(tmp_path, redis_server.url, fresh_namespace()) as mgr:
        for bad in (dict(target=CacheLevel.DISK), dict(target=CacheLevel.REMOTE), dict(timeout_s=-1),
                    dict(timeout_s="1")):
            with pytest.raises(InvalidArgumentError):
                await mgr.fetch_prefix(tokens_of(1), **bad)
        with pytest.raises(InvalidArgumentError):
            await mgr.lookup_remote("not tokens")
    with pytest.raises(InvalidStateError):
        await mgr.fetch_prefix(tokens_of(1))
    with pytest.raises(InvalidStateError):
        await mgr.flush()


async def test_the_writer_reads_and_packs_each_pipeline_in_one_worker_hop(tmp_path, redis_server, monkeypatch):
    """Pages go out in groups of ``writer_shape()[0]`` page bytes, each group held, read and packed as ready SET
    commands in one worker-thread call — not one call per page — and all arrive intact."""
    from kvstore.remote import gather
    from kvstore.remote.writer import writer_shape

    calls: list[int] = []
    real = gather._pack_rows
    monkeypatch.setattr(gather, "_pack_rows", lambda pack, idx, rows: (calls.append(len(rows)), real(pack, idx, rows))[1])
    ns = fresh_namespace()
    async with node(tmp_path, redis_server.url, ns) as a, node(tmp_path, redis_server.url, ns) as b:
        writer = a._remote.writer
        assert writer.group_pages == max(1, min(writer_shape()[0], a._remote.client.pipeline_bytes) // LAYOUT.page_bytes)
        toks = tokens_of(8, seed=41)
        await commit_prompt(a, toks[: 4 * TPP])
        await a.flush(5)
        assert calls == [4]
        writer.group_pages = 3
        data = await commit_prompt(a, toks, seed=42)  # reuses 4 pages, commits 4 more: groups of 3 + 1
        await a.flush(5)
        assert calls == [4, 3, 1]
        assert a.stats()["pages_device_to_remote"] == 8 and a.stats()["remote_write_dropped"] == 0
        res = await b.fetch_prefix(toks)
        assert res.complete and res.pages_moved == 8
        reused, got = await resume_bytes(b, toks)
        assert reused == 8 * TPP and same_bytes(got, data)


def test_the_writer_streams_more_pipelines_at_once_where_cores_are_free():
    from kvstore.remote.writer import FEW_CPUS_SHAPE, MANY_CPUS_SHAPE, writer_shape

    assert writer_shape(2) == FEW_CPUS_SHAPE and writer_shape(16) == MANY_CPUS_SHAPE
    assert FEW_CPUS_SHAPE[1] == 1 and MANY_CPUS_SHAPE[1] > 1 and MANY_CPUS_SHAPE[0] >= FEW_CPUS_SHAPE[0]


async def test_several_write_pipelines_in_flight_arrive_intact_and_in_full(tmp_path, redis_server, monkeypatch):
    """With pipelines of one page and three on the wire at once, every page arrives byte-exact."""
    from kvstore.remote.client import RemoteClient

    in_flight, most = 0, 0
    real_set = RemoteClient.set_packed

    async def set_packed(self, packed, spans):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.01)  # the pipeline is slow to answer: the next ones go out meanwhile
            return await real_set(self, packed, spans)
        finally:
            in_flight -= 1

    monkeypatch.setattr(RemoteClient, "set_packed", set_packed)
    ns = fresh_namespace()
    async with node(tmp_path, redis_server.url, ns) as a, node(tmp_path, redis_server.url, ns) as b:
        a._remote.writer.group_pages, a._remote.writer.in_flight = 1, 3
        toks = tokens_of(9, seed=43)
        data = await commit_prompt(a, toks, seed=44)
        await a.flush(5)
        assert most == 3
        assert a.stats()["remote_write_dropped"] == 0
        res = await b.fetch_prefix(toks)
        assert res.complete and res.pages_moved == 9
        reused, got = await resume_bytes(b, toks)
        assert reused == 9 * TPP and same_bytes(got, data)


async def test_the_writer_reuses_a_pack_buffer_only_once_its_pipeline_was_sent(tmp_path, redis_server, monkeypatch):
    from kvstore.remote import codec as rcodec
    from kvstore.remote.client import RemoteClient

    sending: set[int] = set()
    given: list = []  # the ``out`` buffer each pack call got (None: a new one)
    real_pack, real_set = rcodec.pack_sets, RemoteClient.set_packed

    def pack_sets(items, lay, scope, px, out=None):
        assert out is None or id(out) not in sending, "a buffer still on the wire was packed into"
        given.append(out)
        return real_pack(items, lay, scope, px, out)

    async def set_packed(self, packed, which):
        sending.add(id(packed.base))
        try:
            await asyncio.sleep(0.005)  # keep it on the wire while the next group is read
            return await real_set(self, packed, which)
        finally:
            sending.discard(id(packed.base))

    monkeypatch.setattr(rcodec, "pack_sets", pack_sets)
    monkeypatch.setattr(RemoteClient, "set_packed", set_packed)
    ns = fresh_namespace()
    async with node(tmp_path, redis_server.url, ns) as a, node(tmp_path, redis_server.url, ns) as b:
        a._remote.writer.group_pages = 1  # one pipeline per page: one on the wire while the next is packed
        toks = tokens_of(6, seed=51)
        data = await commit_prompt(a, toks)
        await a.flush(5)
        assert len(given) == 6 and given[0] is None and any(g is not None for g in given)
        assert a.stats()["pages_device_to_remote"] == 6
        res = await b.fetch_prefix(toks)  # every value intact: no buffer was overwritten while sent
        assert res.complete and res.pages_moved == 6
        reused, got = await resume_bytes(b, toks)
        assert reused == 6 * TPP and same_bytes(got, data)


async def test_the_first_group_is_read_while_exists_is_asked_and_pages_the_server_has_are_not_sent(
    tmp_path, redis_server, monkeypatch
):
    from kvstore.remote import gather
    from kvstore.remote.client import RemoteClient

    events: list = []
    real_pack, real_exists = gather._pack_rows, RemoteClient.exists

    def pack_rows(pack, idx, rows):
        events.append(("pack", len(rows)))
        return real_pack(pack, idx, rows)

    async def exists(self, keys):
        events.append("exists?")
        await asyncio.sleep(0.05)  # a slow answer: the first group is read meanwhile
        try:
            return await real_exists(self, keys)
        finally:
            events.append("exists!")

    monkeypatch.setattr(gather, "_pack_rows", pack_rows)
    monkeypatch.setattr(RemoteClient, "exists", exists)
    ns = fresh_namespace()
    toks = tokens_of(10, seed=61)
    async with node(tmp_path, redis_server.url, ns) as a, node(tmp_path, redis_server.url, ns) as b:
        a_data = await commit_prompt(a, toks[: 8 * TPP])
        await a.flush(5)
        assert a.stats()["pages_device_to_remote"] == 8
        events.clear()
        b._remote.writer.group_pages = 3
        data = await commit_prompt(b, toks, seed=62)  # the same 8 pages (other bytes: never sent) + 2 new ones
        await b.flush(5)
        assert events == ["exists?", ("pack", 3), "exists!", ("pack", 2)]  # 5 pages read of 10, not 10
        assert b.stats()["remote_write_skipped"] == 8 and b.stats()["pages_device_to_remote"] == 2
        assert b.stats()["remote_write_dropped"] == 0
    async with node(tmp_path, redis_server.url, ns) as c:
        res = await c.fetch_prefix(toks)
        assert res.complete and res.pages_moved == 10
        reused, got = await resume_bytes(c, toks)
        assert reused == 10 * TPP and same_bytes(got[8:], data[8:]) and same_bytes(got[:8], a_data)  # a's 8 first


async def test_a_fetch_checks_the_next_chunk_while_the_one_before_it_lands(tmp_path, redis_server, monkeypatch):
    """Chunk k+1's GETs and checksum checks run while chunk k is written into its slots, and the prefix
    still lands whole, byte-exact and in order."""
    from kvstore.remote import fetch

    ns = fresh_namespace()
    async with node(tmp_path, redis_server.url, ns) as a, node(tmp_path, redis_server.url, ns) as b:
        toks = tokens_of(6, seed=45)
        data = await commit_prompt(a, toks, seed=46)
        await a.flush(5)
        reader = b._remote.reader
        reader.batch = 2
        checked: list[int] = []  # chunks checked, by first key
        real_verify, real_write = fetch._verify, fetch.RemoteReader._write
        gate, writing = asyncio.Event(), asyncio.Event()

        def verify(values, keys, *args):
            checked.append(len(checked))
            return real_verify(values, keys, *args)

        async def write(self, target, slots, bodies):
            if not writing.is_set():  # the first chunk's landing waits until the next chunk was checked
                writing.set()
                await gate.wait()
            return await real_write(self, target, slots, bodies)

        monkeypatch.setattr(fetch, "_verify", verify)
        monkeypatch.setattr(fetch.RemoteReader, "_write", write)
        task = asyncio.ensure_future(b.fetch_prefix(toks))
        try:
            await until(writing.is_set, "the first chunk is being written")
            await until(lambda: len(checked) >= 2, "the second chunk checked while the first one lands", limit=2.0)
        finally:
            gate.set()  # never leave the fetch stuck, also when the check above fails
        res = await task
        assert checked == [0, 1, 2]
        assert res.complete and res.pages_moved == 6
        reused, got = await resume_bytes(b, toks)
        assert reused == 6 * TPP and same_bytes(got, data)
