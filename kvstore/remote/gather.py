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

import numpy as np
import torch

from .._aio import settle
from ..placement import Page
from ..transfer.scheduler import BACKGROUND
from ..types import CacheLevel
from . import codec

if TYPE_CHECKING:
    from ..manager import KVCacheManager

__all__ = ["gather_values"]

#: (indices into the pages gathered, their bytes as uint8 numpy rows) -> their packed SET commands; runs
#: on a worker thread, once per level read (one thread hop per group, not per page).
Packer = Callable[[list[int], list[np.ndarray]], codec.Packed]


async def gather_values(
    mgr: "KVCacheManager", pages: Sequence[tuple[Page, bytes]], pack: Packer
) -> tuple[list[tuple[int, codec.Packed, int, CacheLevel]], list[int]]:
    """Packed values of ``pages`` ((page, page key) pairs): ([(index, packed, its span in packed, level read
    from)], [indices to try again: moving or moved meanwhile]). Pages freed or re-keyed are left out of both
    (given up)."""
    out: list[tuple[int, codec.Packed, int, CacheLevel]] = []
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
                packed, bad = await _read_level(mgr, level, group, pack)
                for j, (i, page, lvl, slot) in enumerate(group):
                    if page.level != lvl or page.slot != slot or page.freed:
                        again.append(i)  # it left that slot during the read: the bytes may be stale
                    elif j not in bad:
                        out.append((i, packed, j, lvl))
    return out, again


async def _read_level(
    mgr: "KVCacheManager", level: CacheLevel, group: list[tuple[int, Page, CacheLevel, int]], pack: Packer
) -> tuple[codec.Packed, set[int]]:
    """The group's pages packed (one worker-thread hop), and the positions in it of pages that failed their
    local read (a disk checksum): those are in the buffer but must not be sent."""
    idx = [i for i, _, _, _ in group]
    slots = [slot for _, _, _, slot in group]
    if level == CacheLevel.HOST:
        host = mgr._host_arena
        rows = [host.chunks[c][r] for c, r in map(host.locate, slots)]
        return await settle(asyncio.to_thread(_pack_rows, pack, idx, rows)), set()
    if level == CacheLevel.DEVICE and not mgr._started_copier.cuda:
        dev = mgr._device_arena.rows
        return await settle(asyncio.to_thread(_pack_rows, pack, idx, [dev[s] for s in slots])), set()
    executor = mgr._started_executor
    staging = executor.staging
    if len(group) > staging.rows:  # the writer's groups fit one staging buffer; a caller's larger one is split
        parts = [await _read_level(mgr, level, group[s : s + staging.rows], pack) for s in range(0, len(group), staging.rows)]
        return _join(parts)
    return await _read_staged(mgr, level, slots, [p for _, p, _, _ in group], idx, pack)


def _join(parts: list[tuple[codec.Packed, set[int]]]) -> tuple[codec.Packed, set[int]]:
    """Several packed parts as one (rare: a group larger than a staging buffer)."""
    bufs: list[np.ndarray] = []
    keys: list[bytes] = []
    spans: list[codec.Span] = []
    bad: set[int] = set()
    base = n = 0
    for packed, b in parts:
        bufs.append(packed.buf)
        keys.extend(packed.keys)
        spans.extend(codec.Span(*(x + base for x in s)) for s in packed.spans)
        bad.update(j + n for j in b)
        base += packed.buf.nbytes
        n += len(packed.spans)
    return codec.Packed(np.concatenate(bufs), keys, spans, parts[0][0].px), bad


async def _read_staged(
    mgr: "KVCacheManager", level: CacheLevel, slots: list[int], pages: list[Page], idx: list[int], pack: Packer
) -> tuple[codec.Packed, set[int]]:
    """Device (CUDA) or disk pages through one staging buffer; a disk page failing its checksum is bad."""
    executor = mgr._started_executor
    buf = await executor.staging.acquire()
    try:
        bad = await executor.read_staged(buf, level, slots, [p.pid for p in pages], BACKGROUND)
        return await settle(asyncio.to_thread(_pack_rows, pack, idx, [buf[r] for r in range(len(slots))])), bad
    finally:
        executor.staging.give_back(buf)


def _pack_rows(pack: Packer, idx: list[int], rows: list[torch.Tensor]) -> codec.Packed:
    """Worker thread: the packed SET commands of (index, uint8 row tensor) pairs."""
    return pack(idx, [row.numpy() for row in rows])


def make_packer(
    layout_digest: bytes, scope: bytes, names: Sequence[tuple[bytes, bytes]], px: Optional[int],
    out: Optional[np.ndarray] = None,
) -> Packer:
    """A packer for the pages whose (remote key, page key) is ``names[i]`` (``i``: index into the pages gathered),
    written with ``PX px`` (None: no expiry). Its first call packs into ``out`` if given (a buffer no longer in
    use); a later one (a group read from two levels) into a new buffer."""
    spare = [out] if out is not None else []

    def pack(idx: list[int], rows: list[np.ndarray]) -> codec.Packed:
        items = [(*names[i], row) for i, row in zip(idx, rows, strict=True)]
        return codec.pack_sets(items, layout_digest, scope, px, spare.pop() if spare else None)
    return pack
