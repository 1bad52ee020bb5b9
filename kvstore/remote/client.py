"""Remote client: pipelined EXISTS / GET / SET NX / DEL against a Redis or Valkey server or cluster.

Owns the connections (``redis.asyncio``; a cluster through ``redis.asyncio.cluster.RedisCluster``): one
pool for reads and one for writes, so a large write never delays a read queued behind it on the same
connection. Every call runs under a deadline (``asyncio.timeout(timeout_s)``) that also bounds redis-py's
one immediate retry (a pooled connection found dead after a server restart is replaced within the call;
nothing is retried past the deadline). A failure or a timeout is a ``None`` result, never an
exception: the caller treats it as a miss (read) or a dropped write. Failures feed a
:class:`~.breaker.Breaker`; while it is open calls are refused at once and a background task PINGs the
server until it answers, which closes the breaker. Credentials never appear in a message.

On a standalone server (not a cluster) the bulk commands — GET and the writer's packed SETs — skip
redis-py's pipeline objects: they are written as ready RESP bytes on a pooled connection and their replies
read straight from its stream (:func:`_read_reply`). redis-py packs a pipeline on the loop thread (hiredis
copies every value, then the stream joins them: two copies of the page bytes holding the GIL) and parses
every reply through two more buffers; here a SET's page bytes are copied once, off the loop
(:func:`.codec.pack_sets`), and a GET's value is one bytes object taken from the stream. Connecting, AUTH,
SELECT, TLS and the pool stay redis-py's; a connection interrupted mid-exchange is closed, never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import Any, Awaitable, Callable, Optional, Sequence, TypeVar

from ..errors import ConfigError
from .breaker import Breaker
from .codec import HEADER, Packed
from .url import RemoteURL

log = logging.getLogger("kvstore.remote")

__all__ = ["RemoteClient"]

try:  # the optional dependency (pip extra "remote")
    import redis.asyncio as _redis
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import InvalidResponse, RedisError, ResponseError
except ImportError:  # pragma: no cover - exercised only without the extra
    _redis = None  # type: ignore[assignment]
    RedisError = RedisConnectionError = InvalidResponse = ResponseError = OSError  # type: ignore[assignment,misc]

T = TypeVar("T")
_CRLF = b"\r\n"


def _failure_types() -> tuple[type[BaseException], ...]:
    return (RedisError, OSError, TimeoutError, ConnectionError, EOFError)


def _cmd(name: str, *args: Any, **kw: Any) -> Callable[[Any], Any]:
    """A command to queue on a pipeline: ``_cmd("get", key)(pipe)`` calls ``pipe.get(key)``."""
    return lambda pipe: getattr(pipe, name)(*args, **kw)


async def _read_reply(reader: asyncio.StreamReader) -> Any:
    """One RESP2 reply from ``reader``: bytes or None (bulk string), bytes (status), int, or a ResponseError
    instance (an error reply: returned, not raised, like ``execute(raise_on_error=False)``)."""
    line = await reader.readuntil(_CRLF)
    kind, rest = line[:1], line[1:-2]
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = await reader.readexactly(n)
        if await reader.readexactly(2) != _CRLF:
            raise InvalidResponse("malformed bulk reply")
        return data
    if kind == b"+":
        return rest
    if kind == b":":
        return int(rest)
    if kind == b"-":
        return ResponseError(rest.decode("utf-8", "replace"))
    if kind == b"_":  # RESP3 null, should a server answer so
        return None
    raise InvalidResponse(f"unexpected reply type {kind!r}")


_SLICE = 256 << 10  # bytes handed to the socket per loop step


async def _write(writer: asyncio.StreamWriter, data: Any) -> None:
    """Write ``data`` in slices of ``_SLICE``, yielding to the loop between them: a send into a loopback or
    fast socket copies the whole slice in the one call (and a transport buffers what it could not send
    with one more copy), so a 2 MiB pipeline in one write would stall the loop for that long."""
    view = memoryview(data).cast("B")
    for at in range(0, view.nbytes, _SLICE):
        writer.write(view[at : at + _SLICE])
        await writer.drain()
        if at + _SLICE < view.nbytes:
            await asyncio.sleep(0)


def _command(name: bytes, key: bytes) -> bytes:
    """RESP for ``NAME key``."""
    return b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(name), name, len(key), key)


def _runs(packed: Packed, which: Sequence[int]) -> list[memoryview]:
    """The commands of spans ``which`` as few buffers as possible: adjacent spans are one memoryview."""
    out: list[memoryview] = []
    spans, mv = packed.spans, packed.buf.data
    start = end = -1
    for j in which:
        s = spans[j]
        if s.start != end:
            if end >= 0:
                out.append(mv[start:end])
            start = s.start
        end = s.end
    if end >= 0:
        out.append(mv[start:end])
    return out


def reraise_cancellation() -> None:
    """Raise CancelledError if the current task has a cancellation pending. On Python 3.11 an
    ``asyncio.timeout`` that expires as the task is cancelled from outside turns that cancellation into a
    TimeoutError (fixed in 3.12); without this check a cancelled caller would go on as after a timeout."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "cancelling") and task.cancelling():
        raise asyncio.CancelledError()


def px_of(ttl_s: Optional[float]) -> Optional[int]:
    """The PX (milliseconds) of a TTL in seconds; None: no expiry."""
    return None if ttl_s is None else max(1, int(ttl_s * 1000))


class RemoteClient:
    """Deadline-bounded, breaker-guarded remote calls. Create inside a running event loop."""

    def __init__(
        self, url: RemoteURL, timeout_s: float, stats: "Counter[str]", *, breaker_threshold: int = 3,
        probe_interval_s: Optional[float] = None, max_connections: int = 32, pipeline_bytes: int = 2048 << 10,
        read_depth: int = 8, write_depth: int = 8,
    ) -> None:
        if _redis is None:
            raise ConfigError(
                "RemoteTier needs the redis client library: pip install 'kvstore-llm[remote]' (redis>=5, hiredis)"
            )
        self.url = url
        self.timeout_s = float(timeout_s)
        self.stats = stats
        self.breaker = Breaker(breaker_threshold)
        self.pipeline_bytes = pipeline_bytes
        self.depth = {"GET": read_depth, "SET": write_depth}
        self.probe_interval_s = probe_interval_s if probe_interval_s is not None else min(1.0, self.timeout_s)
        self._read = self._connect(max_connections)
        self._write = self._connect(max_connections)
        self.wire = not url.cluster  # bulk commands as raw RESP on pooled connections (see the module doc)
        self._probe: Optional["asyncio.Task[None]"] = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<RemoteClient {self.url.redacted} breaker={'open' if self.breaker.open else 'closed'}>"

    def _connect(self, max_connections: int) -> Any:
        u, t = self.url, self.timeout_s
        common: dict[str, Any] = dict(
            username=u.username, password=u.password, socket_timeout=t, socket_connect_timeout=t,
            decode_responses=False, max_connections=max_connections, **dict(u.tls_options),
        )
        if u.cluster:
            return RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in u.nodes], ssl=u.tls, retry=Retry(NoBackoff(), 1),
                require_full_coverage=False, **common,
            )
        host, port = u.nodes[0]
        # RESP2: the replies _read_reply parses, and no pushed messages between them
        return _redis.Redis(host=host, port=port, db=u.db, ssl=u.tls, retry=Retry(NoBackoff(), 1), protocol=2, **common)

    # ------------------------------------------------------------------ the guarded call
    async def _call(self, client: Any, fn: Callable[[Any], Awaitable[Any]], what: str) -> Any:
        """``await fn(client)`` within the deadline; None on failure, timeout or an open breaker."""
        if self._closed or not self.breaker.allow():
            return None
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await fn(client)
        except _failure_types() as exc:
            reraise_cancellation()
            self._failed(what, exc)
            return None
        self.breaker.success()
        return result

    def _failed(self, what: str, exc: BaseException) -> None:
        self.stats["remote_errors"] += 1
        if self.breaker.failure():
            self.stats["remote_breaker_opened"] += 1
            log.warning(
                "kvstore remote %s: %s failed (%s); circuit open: reads are misses and writes are dropped until "
                "the server answers a ping", self.url.redacted, what, type(exc).__name__,
            )
            if self._probe is None or self._probe.done():
                self._probe = asyncio.ensure_future(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        while self.breaker.open and not self._closed:
            await asyncio.sleep(self.probe_interval_s)
            if await self._ping():
                self.breaker.success()
                log.warning("kvstore remote %s: answering again; circuit closed", self.url.redacted)
                return

    async def _ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._read.ping()
            return True
        except _failure_types():
            return False

    @staticmethod
    async def _pipeline(client: Any, commands: Sequence[Callable[[Any], Any]]) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for cmd in commands:
            cmd(pipe)
        return list(await pipe.execute(raise_on_error=False))

    async def _pipelines(self, client: Any, commands: Sequence[Callable[[Any], Any]], item_bytes: int, depth: int) -> list[Any]:
        """``commands`` as redis-py pipelines of at most ``pipeline_bytes`` of values each, ``depth`` in flight."""
        per = max(1, self.pipeline_bytes // max(1, item_bytes))
        parts = [commands[i : i + per] for i in range(0, len(commands), per)]
        return await self._lanes(parts, lambda part: self._pipeline(client, part), depth)

    @staticmethod
    async def _lanes(parts: Sequence[T], run: Callable[[T], Awaitable[list[Any]]], depth: int) -> list[Any]:
        """``run(part)`` for each part, ``depth`` at a time (each on its own pooled connection); the answers
        concatenated in order. Sending or parsing a pipeline is one step of the event loop, and every step
        ready runs before a timer: pipelines of bounded size, a few at a time, keep the serving loop's stalls
        short."""
        if len(parts) == 1:
            return await run(parts[0])
        out: list[list[Any]] = [[] for _ in parts]
        it = iter(enumerate(parts))

        async def lane() -> None:
            for i, part in it:
                out[i] = await run(part)

        await asyncio.gather(*(lane() for _ in range(min(depth, len(parts)))))
        return [r for part in out for r in part]

    async def _exchange(self, client: Any, chunks: Sequence[Any], replies: int) -> list[Any]:
        """Write ``chunks`` (ready RESP commands) on one pooled connection of ``client`` and read ``replies``
        replies. A connection that fails is replaced and the exchange tried once more (redis-py's one
        immediate retry: the commands here are EXISTS, GET and SET NX, safe to repeat)."""
        pool = client.connection_pool
        try:
            return await self._exchange_once(pool, chunks, replies)
        except (RedisConnectionError, OSError, EOFError):
            pass
        try:
            return await self._exchange_once(pool, chunks, replies)
        except (OSError, EOFError) as exc:
            raise RedisConnectionError(f"{type(exc).__name__} on the connection") from exc

    async def _exchange_once(self, pool: Any, chunks: Sequence[Any], replies: int) -> list[Any]:
        """One attempt of :meth:`_exchange`. A connection interrupted (an error, the deadline, a cancellation)
        is closed before it goes back to the pool: its unread replies are never taken for another call's."""
        conn = await pool.get_connection()
        try:
            reader, writer = getattr(conn, "_reader", None), getattr(conn, "_writer", None)
            if reader is None or writer is None:
                # a redis-py whose connected connections do not keep these streams (they are not its
                # public API): this call fails (a miss, a dropped write) and later ones use its pipelines
                self.wire = False
                log.warning("kvstore: redis-py connections have no stream to write RESP on; using its pipelines")
                raise RedisConnectionError("connection has no stream")
            for chunk in chunks:
                await _write(writer, chunk)
            return [await _read_reply(reader) for _ in range(replies)]
        except BaseException:
            await self._discard(conn)
            raise
        finally:
            await pool.release(conn)

    @staticmethod
    async def _discard(conn: Any) -> None:
        """Close ``conn`` now (the transport at once, then redis-py's state)."""
        writer = getattr(conn, "_writer", None)
        if writer is not None:
            writer.transport.abort()
        with contextlib.suppress(Exception):
            await conn.disconnect(nowait=True)

    # ------------------------------------------------------------------ commands
    async def exists(self, keys: Sequence[bytes]) -> Optional[list[bool]]:
        """Whether each key is on the server (pipelined EXISTS); None on failure."""
        if not keys:
            return []
        if self.wire:
            cmd = b"".join(_command(b"EXISTS", k) for k in keys)
            res = await self._call(self._read, lambda c: self._exchange(c, [cmd], len(keys)), "EXISTS")
        else:
            cmds: list[Callable[[Any], Any]] = [_cmd("exists", k) for k in keys]
            res = await self._call(self._read, lambda c: self._pipeline(c, cmds), "EXISTS")
        if res is None:
            return None
        if any(isinstance(r, BaseException) for r in res):
            self._failed("EXISTS", next(r for r in res if isinstance(r, BaseException)))
        return [not isinstance(r, BaseException) and bool(r) for r in res]

    async def get(self, keys: Sequence[bytes], value_bytes: int = 0) -> Optional[list[Optional[bytes]]]:
        """The value of each key (None where missing or failed), pipelined GETs (``value_bytes``: the page
        bytes expected per value, to keep each pipeline to ``pipeline_bytes`` of them); None on failure."""
        if not keys:
            return []
        if self.wire:
            per = max(1, self.pipeline_bytes // max(1, value_bytes))
            parts = [keys[i : i + per] for i in range(0, len(keys), per)]

            def run(part: Sequence[bytes]) -> Awaitable[list[Any]]:
                return self._exchange(self._read, [b"".join(_command(b"GET", k) for k in part)], len(part))

            res = await self._call(self._read, lambda c: self._lanes(parts, run, self.depth["GET"]), "GET")
        else:
            cmds = [lambda p, k=k: p.get(k) for k in keys]
            res = await self._call(self._read, lambda c: self._pipelines(c, cmds, value_bytes, self.depth["GET"]), "GET")
        if res is None:
            return None
        return [r if isinstance(r, bytes) else None for r in res]

    async def set_nx(self, items: Sequence[tuple[bytes, bytes]], ttl_s: Optional[float]) -> Optional[list[Optional[bool]]]:
        """SET key value NX [PX ttl] for each item, pipelined: True where written, False where the key was
        there already, None where the server refused it (e.g. out of memory). None on failure."""
        return await self._set_items(items, px_of(ttl_s))

    async def _set_items(self, items: Sequence[tuple[bytes, Any]], px: Optional[int]) -> Optional[list[Optional[bool]]]:
        if not items:
            return []
        cmds = [lambda p, kv=kv: p.set(kv[0], kv[1], nx=True, px=px) for kv in items]
        size = max(memoryview(v).nbytes for _, v in items)
        res = await self._call(self._write, lambda c: self._pipelines(c, cmds, size, self.depth["SET"]), "SET")
        return self._set_results(res)

    def _set_results(self, res: Optional[list[Any]]) -> Optional[list[Optional[bool]]]:
        if res is None:
            return None
        errors = [r for r in res if isinstance(r, BaseException)]
        if errors:
            self._failed("SET", errors[0])
        return [None if isinstance(r, BaseException) else bool(r) for r in res]

    async def set_packed(self, packed: Packed, which: Sequence[int]) -> Optional[list[Optional[bool]]]:
        """The SET NX commands of spans ``which`` of ``packed`` (:func:`.codec.pack_sets`), pipelined: one
        result per span as :meth:`set_nx`. On a standalone server the packed bytes go to the socket as they
        are; on a cluster the values go through redis-py's cluster pipeline (keys on several nodes)."""
        if not which:
            return []
        if not self.wire:
            return await self._set_items([(packed.keys[j], packed.value(j)) for j in which], packed.px)
        size = max(packed.spans[j].value_end - packed.spans[j].value for j in which) - HEADER
        per = max(1, self.pipeline_bytes // size)
        parts = [which[i : i + per] for i in range(0, len(which), per)]

        def run(part: Sequence[int]) -> Awaitable[list[Any]]:
            return self._exchange(self._write, _runs(packed, part), len(part))

        res = await self._call(self._write, lambda c: self._lanes(parts, run, self.depth["SET"]), "SET")
        return self._set_results(res)

    async def delete(self, keys: Sequence[bytes]) -> None:
        """Best-effort DEL of ``keys`` (one per command: cluster keys live on different nodes)."""
        if keys:
            cmds: list[Callable[[Any], Any]] = [_cmd("delete", k) for k in keys]
            await self._call(self._write, lambda c: self._pipeline(c, cmds), "DEL")

    async def ping(self) -> bool:
        """Whether the server answers within the deadline (does not touch the breaker)."""
        return await self._ping()

    async def close(self) -> None:
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        for client in (self._read, self._write):
            try:
                async with asyncio.timeout(self.timeout_s):
                    await client.aclose()
            except Exception:  # closing a dead connection: nothing left to do
                pass
