"""Reading committed pages' bytes out of the local tiers for the remote writer, off the event loop.

Each page is held (the placement's hold: not evictable, so never demoted, dropped or overwritten) while
its bytes are read: host pages in place, device pages in place on a CPU device tier or through a pinned
staging buffer and the copier on CUDA, disk pages by a checksummed read into a staging buffer at
background I/O priority. A held page may still be promoted by its cache's resume; it cannot come back
to the slot it left while held, so a page found at the same (level, slot) after the read was read
intact, and one that moved is given back to the writer to try again.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from .._aio import settle
from ..placement import Page
from ..transfer.copier import Segment
from ..transfer.scheduler import BACKGROUND
from ..types import CacheLevel
from . import codec

if TYPE_CHECKING:
    from ..manager import KVCacheManager

__all__ = ["gather_values"]

Encoder = Callable[[bytes, object], bytes]  # (page key, page bytes buffer) -> value


async def gather_values(
    mgr: "KVCacheManager", pages: Sequence[tuple[Page, bytes]], encode: Encoder
) -> tuple[list[tuple[int, bytes, CacheLevel]], list[int]]:
    """Encoded values of ``pages`` ((page, page key) pairs): ([(index, value, level read from)], [indices to
    try again: moving or moved meanwhile]). Pages freed or re-keyed are left out of both (given up)."""
    out: list[tuple[int, bytes, CacheLevel]] = []
    again: list[int] = []
    async with mgr._operation("remote-write", None, None, "remote write-through") as op:
        await mgr._wait_moving([p for p, _ in pages if not p.freed])
        async with mgr._plan_lock:
            mgr._check_running()
            ready: list[tuple[int, Page, CacheLevel, int]] = []
            for i, (page, key) in enumerate(pages):
                if page.freed or page.key != key or page.level is None:
                    continue
                if page.move is not None:
                    again.append(i)
                    continue
                ready.append((i, page, page.level, page.slot))
            mgr._ledger.hold(op, [p for _, p, _, _ in ready])
        for level in (CacheLevel.HOST, CacheLevel.DEVICE, CacheLevel.DISK):
            group = [r for r in ready if r[2] == level]
            if group:
                values = await _read_level(mgr, level, group, pages, encode)
                for (i, page, lvl, slot), value in zip(group, values, strict=True):
                    if page.level != lvl or page.slot != slot or page.freed:
                        again.append(i)  # it left that slot during the read: the bytes may be stale
                    elif value is not None:
                        out.append((i, value, lvl))
    return out, again


async def _read_level(
    mgr: "KVCacheManager", level: CacheLevel, group: list[tuple[int, Page, CacheLevel, int]],
    pages: Sequence[tuple[Page, bytes]], encode: Encoder,
) -> list[Optional[bytes]]:
    keys = [pages[i][1] for i, _, _, _ in group]
    slots = [slot for _, _, _, slot in group]
    if level == CacheLevel.HOST:
        host = mgr._host_arena
        rows = [host.chunks[c][r] for c, r in map(host.locate, slots)]
        return await settle(asyncio.to_thread(_encode_rows, encode, keys, rows))
    if level == CacheLevel.DEVICE and not mgr._started_copier.cuda:
        dev = mgr._device_arena.rows
        return await settle(asyncio.to_thread(_encode_rows, encode, keys, [dev[s] for s in slots]))
    executor = mgr._started_executor
    staging = executor.staging
    out: list[Optional[bytes]] = []
    for start in range(0, len(group), staging.rows):
        part = slice(start, start + staging.rows)
        out.extend(await _read_staged(mgr, level, slots[part], [p for _, p, _, _ in group[part]], keys[part], encode))
    return out


async def _read_staged(
    mgr: "KVCacheManager", level: CacheLevel, slots: list[int], pages: list[Page], keys: list[bytes], encode: Encoder
) -> list[Optional[bytes]]:
    """Device (CUDA) or disk pages through one staging buffer; a disk page failing its checksum is None."""
    executor = mgr._started_executor
    buf = await executor.staging.acquire()
    try:
        rows = list(range(len(slots)))
        bad: set[int] = set()
        if level == CacheLevel.DEVICE:
            after = mgr._started_copier.after_current_stream()
            await mgr._started_copier.copy([Segment(buf, rows, mgr._device_arena.rows, slots)], "down", after)
        else:
            nbytes = len(slots) * mgr._page_bytes
            await executor.io_sched.acquire(nbytes, (BACKGROUND, 0))
            try:
                extents, _ = executor._extents(slots, [buf] * len(slots), rows, [p.pid for p in pages])
                bad_offsets = await settle(executor._io.read(extents))
            finally:
                executor.io_sched.release(nbytes)
            bad = executor.bad_slot_indices(bad_offsets, slots)
        values = await settle(asyncio.to_thread(_encode_rows, encode, keys, [buf[r] for r in rows]))
        return [None if i in bad else v for i, v in enumerate(values)]
    finally:
        executor.staging.give_back(buf)


def _encode_rows(encode: Encoder, keys: list[bytes], rows: list[torch.Tensor]) -> list[Optional[bytes]]:
    """Worker thread: one value per (key, uint8 row tensor)."""
    return [encode(key, row.numpy()) for key, row in zip(keys, rows, strict=True)]


def make_encoder(layout_digest: bytes, scope: bytes) -> Encoder:
    return lambda key, buf: codec.encode(layout_digest, scope, key, buf)
