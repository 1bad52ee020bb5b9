"""Reading prefixes from the remote tier: ``lookup_remote`` and ``fetch_prefix``.

Both start where the local prefix ends and walk the remote in prefix order, a pipeline of ``batch``
keys at a time, stopping at the first page the remote lacks. ``fetch_prefix`` verifies each value
(:mod:`.codec`) on a worker thread, then lands the leading valid pages as one operation: it reserves
new pages at the target like a prefetch (evicting there as needed), writes the bytes into their slots
off the loop, and indexes them as committed pages no cache holds (reusable, droppable). Cancelled or
failed at any await, every page it reserved is either landed and indexed or freed again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import torch

from .._aio import settle
from ..errors import CapacityError, InvalidArgumentError, KVStoreError
from ..operations import Operation
from ..placement import Page, PageList, Placement, RoomCheck
from ..placement.prefix import as_token_array
from ..transfer.copier import Segment
from ..transfer.scheduler import PREFETCH
from ..types import CacheLevel, PrefetchResult, PrefixMatch
from . import codec
from .client import RemoteClient, reraise_cancellation
from .keys import KeySpace

if TYPE_CHECKING:
    from ..manager import KVCacheManager

log = logging.getLogger("kvstore.remote")

__all__ = ["RemoteReader"]

_Checked = tuple[list[Optional[bytes]], list[Optional[memoryview]]]  # a chunk's values and their checked bodies


class RemoteReader:
    def __init__(self, mgr: "KVCacheManager", client: RemoteClient, keys: KeySpace, batch: int) -> None:
        self.mgr = mgr
        self.client = client
        self.keys = keys
        self.batch = batch
        self.stats = mgr._stats
        self._deletes: set["asyncio.Task[None]"] = set()

    # ------------------------------------------------------------------ the part of the prefix to ask for
    def _rest(self, tokens: Sequence[int]) -> tuple[list[Page], list[bytes], Optional[bytes]]:
        """(local prefix pages, page keys of the full pages after them, key of the last local page)."""
        mgr = self.mgr
        arr = as_token_array(tokens)
        pages, last = mgr._match(arr)
        full = len(arr) // mgr.layout.tokens_per_page
        rest = mgr._hasher.keys(arr, len(pages), full, last) if full > len(pages) else []
        return pages, rest, last

    async def lookup(self, tokens: Sequence[int]) -> PrefixMatch:
        mgr = self.mgr
        pages, rest, _ = self._rest(tokens)
        found = 0
        for i in range(0, len(rest), self.batch):
            chunk = rest[i : i + self.batch]
            have = await self.client.exists(self.keys.keys(chunk))
            if have is None:
                break
            lead = next((j for j, h in enumerate(have) if not h), len(have))
            found += lead
            self.stats["remote_hits"] += lead
            if lead < len(chunk):
                self.stats["remote_misses"] += 1
                break
        per_level = {lvl: 0 for lvl in mgr.config.levels}
        for p in pages:
            if p.level is not None:
                per_level[p.level] += 1
        per_level[CacheLevel.REMOTE] = found
        return PrefixMatch((len(pages) + found) * mgr.layout.tokens_per_page, per_level)

    # ------------------------------------------------------------------ fetch
    async def fetch(self, tokens: Sequence[int], target: CacheLevel, timeout_s: Optional[float]) -> PrefetchResult:
        t0 = time.perf_counter()
        if target not in (CacheLevel.HOST, CacheLevel.DEVICE):
            raise InvalidArgumentError(f"fetch_prefix() target must be HOST or DEVICE, got {target.name}")
        _, rest, prev = self._rest(tokens)
        moved = 0
        complete = False
        # the pages landed so far stay owned by this call until it ends: later ones never drop earlier ones
        keeper = self.mgr._ledger.begin("fetch-keep")
        try:
            async with asyncio.timeout(timeout_s):
                moved, complete = await self._fetch_keys(rest, prev, target, keeper)
        except TimeoutError:
            reraise_cancellation()
            self.stats["remote_timeouts"] += 1
        finally:
            kept, keeper.owned = keeper.owned, PageList(self.mgr._placement.table)
            self.mgr._ledger.end(keeper)
            self.mgr._placement.remove_owners(kept)  # committed pages no cache holds: reusable, droppable
        pb = self.mgr._page_bytes
        return PrefetchResult(complete, moved, moved * pb, time.perf_counter() - t0)

    async def _fetch_keys(
        self, rest: list[bytes], prev: Optional[bytes], target: CacheLevel, keeper: Operation
    ) -> tuple[int, bool]:
        """(pages landed, whether the remote prefix arrived whole) for page keys ``rest`` after ``prev``."""
        pb = self.mgr._page_bytes
        lay, scope = self.keys.layout_digest, self.keys.scope
        chunks = [rest[i : i + self.batch] for i in range(0, len(rest), self.batch)]
        gets: list["asyncio.Task[Optional[_Checked]]"] = []  # of the chunks not yet landed, in order
        started = 0  # chunks whose GETs were started

        async def get_checked(chunk: list[bytes]) -> Optional[_Checked]:
            values = await self._timed_get(self.keys.keys(chunk))
            if values is None:
                return None
            if all(v is not None for v in values):
                get_next()  # the next chunk's GETs go out while this one is checked
            return values, await asyncio.to_thread(_verify, values, chunk, lay, scope, pb)

        def get_next() -> None:  # the next chunk fetched, then checked while the one before it is landed
            nonlocal started
            if started < len(chunks):
                gets.append(asyncio.ensure_future(get_checked(chunks[started])))
                started += 1

        get_next()
        try:
            return await self._walk(chunks, gets, prev, target, keeper)
        finally:
            while gets:  # stopped early: GETs no longer needed (a cancelled one starts no other)
                stopping, gets[:] = list(gets), []
                for t in stopping:
                    t.cancel()
                await asyncio.gather(*stopping, return_exceptions=True)

    async def _timed_get(self, rkeys: list[bytes]) -> Optional[list[Optional[bytes]]]:
        """``client.get`` of one chunk, recorded in the remote -> host bandwidth estimate (the one place remote
        reads are measured): the values found count as bytes moved; a failed or cancelled GET records nothing."""
        bandwidth, pb = self.mgr._bandwidth, self.mgr._page_bytes
        ticket = bandwidth.begin(CacheLevel.REMOTE, CacheLevel.HOST)
        values: Optional[list[Optional[bytes]]] = None
        try:
            values = await self.client.get(rkeys, pb)
            return values
        finally:
            found = 0 if values is None else len(values) - values.count(None)
            bandwidth.end(ticket, found * pb, ok=values is not None)

    async def _walk(
        self, chunks: list[list[bytes]], gets: list["asyncio.Task[Optional[_Checked]]"],
        prev: Optional[bytes], target: CacheLevel, keeper: Operation,
    ) -> tuple[int, bool]:
        moved = 0
        for i, chunk in enumerate(chunks):
            rkeys = self.keys.keys(chunk)
            checked = await gets.pop(0)
            if checked is None:
                return moved, False
            values, bodies = checked
            lead = next((j for j, b in enumerate(bodies) if b is None), len(bodies))
            self.stats["remote_hits"] += lead
            corrupt = lead < len(chunk) and values[lead] is not None
            if lead < len(chunk):
                self.stats["remote_misses"] += 1
            if corrupt:
                self.stats["remote_corrupt"] += 1
                self._delete(rkeys[lead])
            good = [b for b in bodies[:lead] if b is not None]  # all of them: the leading valid values
            done = 0
            while done < lead:  # a full target takes the pages in parts (each part's pages make room for the next)
                local, landed = await self._land(
                    chunk[done:lead], good[done:lead], chunk[done - 1] if done else prev, target, keeper
                )
                moved += landed
                if local == 0:
                    return moved, False
                done += local
            if lead:
                prev = chunk[lead - 1]
            if lead < len(chunk):
                return moved, not corrupt
        return moved, True

    def _delete(self, rkey: bytes) -> None:
        task = asyncio.ensure_future(self.client.delete([rkey]))
        self._deletes.add(task)
        task.add_done_callback(self._deletes.discard)

    async def _land(
        self, keys: list[bytes], bodies: list[memoryview], prev: Optional[bytes], target: CacheLevel, keeper: Operation
    ) -> tuple[int, int]:
        """Land pages ``keys`` (bytes ``bodies``, chained after ``prev``) at ``target``: (how many leading ones
        are local now, landed here or indexed meanwhile by someone else; how many this call landed). Landed
        pages pass to ``keeper``'s ownership; the others reserved are freed, also when cancelled."""
        mgr, pl = self.mgr, self.mgr._placement
        async with mgr._operation("fetch", None, None, "fetch_prefix()") as op:
            want: list[int] = []

            def attempt() -> bool:  # under the planning lock; CapacityError changes nothing
                nonlocal want
                want = [j for j, k in enumerate(keys) if pl.index.get(k) is None]
                if not want:
                    return True
                n, room = _most_that_fit(pl, len(want), target)
                if n == 0:
                    raise CapacityError(f"no room on the {target.label} level for pages fetched from the remote")
                want = want[:n]
                chunk, plan = pl.plan_new_pages(n, target, 0, check=room)
                pl.set_owners(chunk, 1)  # owned by this operation until indexed
                op.owned.extend(chunk)
                mgr._ledger.hold(op, chunk)
                if plan.moves:
                    op.runs.append(mgr._started_executor.submit(plan, PREFETCH))
                return True

            try:
                if not await self._with_room(op, keeper, attempt):
                    return next((j for j, k in enumerate(keys) if pl.index.get(k) is None), len(keys)), 0
                if not want:
                    return len(keys), 0
                try:
                    await mgr._finish(op)
                except KVStoreError as exc:  # a victim's write-back failed: its slot's new page was not placed
                    log.warning("kvstore remote: making room for fetched pages failed (%s)", exc)
                placed = [(p, j) for p, j in zip(op.owned, want) if not p.freed and p.level == target and p.move is None]
                if placed:
                    await self._write(target, [p.slot for p, _ in placed], [bodies[j] for _, j in placed])
                landed = 0
                done = set()
                for p, j in placed:
                    parent = keys[j - 1] if j > 0 else prev
                    if pl.set_key(p, keys[j], parent):
                        landed += 1
                        done.add(j)
                self.stats[f"pages_remote_to_{target.label}"] += landed
                self.stats[f"bytes_remote_to_{target.label}"] += landed * mgr._page_bytes
                # local now: the leading keys landed here or already indexed
                local = next((j for j in range(len(keys)) if j not in done and pl.index.get(keys[j]) is None), len(keys))
                return local, landed
            finally:
                owned, op.owned = pl.live_pages(op.owned), PageList(pl.table)
                mgr._ledger.release(op)
                indexed = pl.table.indexed[owned.pids]
                keeper.owned.extend(owned.select(indexed))  # owners stays 1: kept until the fetch ends
                pl.remove_owners(owned.select(~indexed))  # reserved but not landed: freed

    async def _with_room(self, op: Operation, keeper: Operation, attempt: Callable[[], bool]) -> bool:
        """``attempt()`` under the planning lock until it fits (True), waiting while other operations in flight
        hold room that may come back; False once none does (this fetch's own pages never count)."""
        mgr = self.mgr
        while True:
            async with mgr._plan_lock:
                mgr._check_running()
                try:
                    return attempt()
                except CapacityError:
                    others = [o for o in mgr._ledger.room_holders(op) if o is not keeper and o.kind != "fetch-keep"]
                    if not others:
                        return False
            await mgr._ledger.changed()

    async def _write(self, target: CacheLevel, slots: list[int], bodies: list[memoryview]) -> None:
        """Copy ``bodies`` into ``slots`` of ``target`` off the loop (finishes even if cancelled)."""
        mgr = self.mgr
        if target == CacheLevel.HOST:
            host = mgr._host_arena
            rows = [host.chunks[c][r] for c, r in map(host.locate, slots)]
            await settle(asyncio.to_thread(_fill, rows, bodies))
            return
        if not mgr._started_copier.cuda:
            await settle(asyncio.to_thread(_fill, [mgr._device_arena.rows[s] for s in slots], bodies))
            return
        staging = mgr._started_executor.staging
        for start in range(0, len(slots), staging.rows):
            part = slots[start : start + staging.rows]
            buf = await staging.acquire()
            try:
                brows = list(range(len(part)))
                await settle(asyncio.to_thread(_fill, [buf[r] for r in brows], bodies[start : start + len(part)]))
                copier = mgr._started_copier
                await copier.copy([Segment(mgr._device_arena.rows, part, buf, brows)], "up", copier.after_current_stream())
            finally:
                staging.give_back(buf)

    async def close(self) -> None:
        if self._deletes:
            await asyncio.gather(*self._deletes, return_exceptions=True)


def _most_that_fit(pl: Placement, n: int, target: CacheLevel) -> tuple[int, Optional[RoomCheck]]:
    """(the most of ``n`` new pages that fit at ``target`` now, its room check); (0, None) if none does."""
    try:
        return n, pl.check_new_pages(n, target)
    except CapacityError:
        pass
    lo, hi = 0, n - 1  # binary search: a draft per probe
    best: tuple[int, Optional[RoomCheck]] = (0, None)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            pl.check_new_pages(mid, target)
            lo = mid
        except CapacityError:
            hi = mid - 1
    if lo > 0:
        best = (lo, pl.check_new_pages(lo, target))
    return best


def _verify(
    values: list[Optional[bytes]], keys: list[bytes], lay: bytes, scope: bytes, page_bytes: int
) -> list[Optional[memoryview]]:
    """Worker thread: each value's page bytes if it checks out, else None."""
    return [codec.decode(v, lay, scope, k, page_bytes) for v, k in zip(values, keys, strict=True)]


def _fill(rows: list[torch.Tensor], bodies: list[memoryview]) -> None:
    """Worker thread: copy each body into its uint8 row tensor."""
    for row, body in zip(rows, bodies, strict=True):
        row.numpy()[:] = np.frombuffer(body, dtype=np.uint8)
