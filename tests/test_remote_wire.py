"""The remote client's own RESP path (standalone servers): packed SETs, raw GET replies, sliced writes, and
connections interrupted mid-exchange, against a real redis-server where it matters."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest

from kvstore.remote import client as rc
from kvstore.remote import codec
from kvstore.remote.client import RemoteClient, _read_reply, _runs, _write
from kvstore.remote.url import parse_url

LAY, SCOPE = b"L" * 16, b"S" * 16


def _items(n: int, size: int, seed: int = 0) -> list[tuple[bytes, bytes, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(b"kvs1:test:%d:%d" % (seed, i), bytes([i]) * 32, rng.integers(0, 256, size, dtype=np.uint8))
            for i in range(n)]


def test_packed_sets_are_valid_resp_set_commands_with_checked_values():
    """Each span of a packed buffer is exactly ``SET key value NX PX ttl``; the value decodes to the page."""
    items = _items(3, 1000)
    packed = codec.pack_sets(items, LAY, SCOPE, 30_000)
    assert packed.buf.nbytes == packed.spans[-1].end and packed.keys == [k for k, _, _ in items]

    async def parse() -> list:
        reader = asyncio.StreamReader()
        reader.feed_data(packed.buf.tobytes())
        reader.feed_eof()
        out = []
        for _ in items:
            head = await reader.readuntil(b"\r\n")
            assert head == b"*6\r\n"
            out.append([await _read_reply(reader) for _ in range(6)])
        assert reader.at_eof()
        return out

    for (rkey, page_key, row), args, j in zip(items, asyncio.run(parse()), range(3)):
        assert args[:2] == [b"SET", rkey] and args[3:] == [b"NX", b"PX", b"30000"]
        assert bytes(packed.value(j)) == args[2]
        body = codec.decode(args[2], LAY, SCOPE, page_key, row.nbytes)
        assert body is not None and bytes(body) == row.tobytes()
    no_ttl = codec.pack_sets(items[:1], LAY, SCOPE, None)
    assert no_ttl.buf.tobytes().startswith(b"*4\r\n") and no_ttl.buf.tobytes().endswith(b"$2\r\nNX\r\n")


def test_runs_join_adjacent_spans_and_leave_out_the_others():
    packed = codec.pack_sets(_items(4, 100), LAY, SCOPE, 1000)
    whole = packed.buf.tobytes()
    assert [bytes(r) for r in _runs(packed, [0, 1, 2, 3])] == [whole]
    cmd = [bytes(packed.command(j)) for j in range(4)]
    assert [bytes(r) for r in _runs(packed, [0, 1, 3])] == [cmd[0] + cmd[1], cmd[3]]
    assert [bytes(r) for r in _runs(packed, [2])] == [cmd[2]]
    assert _runs(packed, []) == []


def test_replies_parse_and_a_malformed_one_raises():
    async def replies(data: bytes, n: int) -> list:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return [await _read_reply(reader) for _ in range(n)]

    got = asyncio.run(replies(b"$3\r\nabc\r\n$-1\r\n+OK\r\n:7\r\n-OOM no room\r\n$0\r\n\r\n", 6))
    assert got[:4] == [b"abc", None, b"OK", 7] and got[5] == b""
    assert isinstance(got[4], rc.ResponseError) and "OOM" in str(got[4])
    for bad in (b"?x\r\n", b"$3\r\nabcXY"):
        with pytest.raises(rc.InvalidResponse):
            asyncio.run(replies(bad, 1))
    with pytest.raises(EOFError):  # a reply cut short: the connection is treated as broken
        asyncio.run(replies(b"$10\r\nabc", 1))


def test_a_large_write_goes_out_in_slices_with_loop_steps_between():
    class Writer:
        def __init__(self) -> None:
            self.sizes: list[int] = []
            self.ticks_at: list[int] = []

        def write(self, data: memoryview) -> None:
            self.sizes.append(data.nbytes)
            self.ticks_at.append(ticks)

        async def drain(self) -> None:
            pass

    ticks = 0

    async def main() -> Writer:
        nonlocal ticks
        w = Writer()
        task = asyncio.ensure_future(_write(w, np.zeros((2 << 20) + 5, dtype=np.uint8)))  # type: ignore[arg-type]
        while not task.done():
            ticks += 1
            await asyncio.sleep(0)
        return w

    w = asyncio.run(main())
    assert sum(w.sizes) == (2 << 20) + 5 and max(w.sizes) <= rc._SLICE and len(w.sizes) == 9
    assert len(set(w.ticks_at)) == len(w.ticks_at)  # another task ran between every two slices


async def test_packed_sets_and_gets_round_trip_through_a_server(redis_server):
    client = RemoteClient(parse_url(redis_server.url), 2.0, Counter(), pipeline_bytes=3000)
    try:
        assert client.wire
        items = _items(5, 1000, seed=11)
        packed = codec.pack_sets(items, LAY, SCOPE, 60_000)
        keys = [k for k, _, _ in items]
        assert await client.set_packed(packed, [0, 1, 3, 4]) == [True] * 4  # two pipelines of <= 2 pages
        assert await client.set_packed(packed, [1, 2]) == [False, True]  # NX: page 1 was there
        assert await client.exists([keys[0], b"kvs1:test:missing", keys[4]]) == [True, False, True]
        got = await client.get([*keys, b"kvs1:test:missing"], 1000)
        assert got is not None and got[-1] is None
        for (_, page_key, row), value in zip(items, got):
            body = codec.decode(value, LAY, SCOPE, page_key, row.nbytes)
            assert body is not None and bytes(body) == row.tobytes()
        assert 0 < redis_server.client().pttl(keys[0]) <= 60_000
        assert client.stats["remote_errors"] == 0
    finally:
        await client.close()


async def test_an_exchange_interrupted_midway_never_hands_its_replies_to_the_next_call(redis_server):
    """A GET cancelled or timed out after its commands went out leaves replies unread on its connection: the
    connection is closed, so the next call on the (one-connection) pool reads its own replies, not those."""
    big, small = b"kvs1:test:big", b"kvs1:test:small"
    r = redis_server.client()
    r.set(big, b"B" * (16 << 20))
    r.set(small, b"small value")
    for timeout_s in (5.0, 0.002):
        client = RemoteClient(parse_url(redis_server.url), 5.0, Counter(), max_connections=1, breaker_threshold=99,
                             pipeline_bytes=64 << 20)  # one pipeline: one connection
        try:
            assert await client.get([small], 16) == [b"small value"]  # the pool's one connection is open
            for _ in range(3):
                client.timeout_s = timeout_s  # the call's deadline (the connection's own timeouts stay 5 s)
                task = asyncio.ensure_future(client.get([big, big, small], 16 << 20))
                for _ in range(5):
                    await asyncio.sleep(0)  # the GETs are written; 32 MiB of replies are on the way
                if timeout_s > 1:
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                else:
                    assert await task is None  # past its deadline: a miss
                client.timeout_s = 5.0
                assert await client.get([small], 16) == [b"small value"]
            assert client.stats["remote_errors"] == (3 if timeout_s < 1 else 0)
        finally:
            await client.close()


async def test_a_server_restarted_under_a_pooled_connection_is_retried_once_within_the_call(own_redis):
    server = own_redis()
    client = RemoteClient(parse_url(server.url), 2.0, Counter())
    try:
        server.client().set(b"kvs1:test:k", b"v1")
        assert await client.get([b"kvs1:test:k"], 2) == [b"v1"]  # a pooled connection now exists
        server.restart()
        server.client().set(b"kvs1:test:k", b"v2")
        assert await client.get([b"kvs1:test:k"], 2) == [b"v2"]  # the dead connection was replaced
        assert client.stats["remote_errors"] == 0 and not client.breaker.open
    finally:
        await client.close()


async def test_a_redis_py_without_connection_streams_falls_back_to_its_pipelines(redis_server, monkeypatch):
    """The RESP path reads redis-py connections' streams, which are not its public API: where a connection has
    none, that call is a miss and the client goes on with redis-py's pipelines, with the right answers."""
    client = RemoteClient(parse_url(redis_server.url), 2.0, Counter())
    try:
        redis_server.client().set(b"kvs1:test:there", b"x")
        pool = client._read.connection_pool
        real = pool.get_connection

        async def streamless(*args, **kw):
            conn = await real(*args, **kw)
            conn._reader = None  # as if this redis-py kept no stream on the connection
            return conn

        monkeypatch.setattr(pool, "get_connection", streamless)
        assert await client.exists([b"kvs1:test:there"]) is None  # this call fails: a miss
        assert not client.wire
        monkeypatch.setattr(pool, "get_connection", real)
        assert await client.exists([b"kvs1:test:there", b"kvs1:test:missing"]) == [True, False]
    finally:
        await client.close()
