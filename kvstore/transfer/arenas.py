"""Memory that holds pages: the device arena, the host arena and pinned staging buffers.

Every store exposes its slots as rows of 2-D ``uint8`` tensors (``rows x page_bytes``), so one copy
routine and one I/O routine serve all of them. The host arena is allocated in chunks (each a power of
two bytes, the unit of torch's pinned allocator), so a large pinned tier starts chunk by chunk on a
worker thread instead of stalling start-up, and shrinking gives whole chunks back. New host chunks are
pre-faulted on that worker thread (:func:`prefault`), so the first transfer into them runs at full speed
instead of paying a page fault per 4 KiB. Allocation failures raise :class:`~kvstore.errors.CapacityError`
naming the tier and the size, and leave the arena as it was.
"""

from __future__ import annotations

import asyncio
import bisect
import ctypes
import logging
import math
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch

from ..resources import allocating

log = logging.getLogger("kvstore")

_MAX_CHUNK = 1 << 30
#: Pinned chunks are smaller: CUDA pins (and unpins) a chunk while holding a driver lock that every other
#: CUDA call of the process waits for, so a 1 GiB chunk stalled transfers of other caches for up to a second.
_MAX_PINNED_CHUNK = 256 << 20
_OS_PAGE = 4096
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14


def _madvise() -> "Optional[Callable[..., int]]":
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise_fn = _madvise()


def prefault(t: torch.Tensor) -> None:
    """Make every page of the CPU tensor ``t`` resident now (blocking: call from a worker thread).

    ``madvise(MADV_POPULATE_WRITE)`` faults the range in one call where the kernel has it; otherwise every
    byte is written (the contents of a new chunk are undefined anyway)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return
    if _madvise_fn is not None:
        start = t.data_ptr() & ~(_OS_PAGE - 1)
        end = (t.data_ptr() + n + _OS_PAGE - 1) & ~(_OS_PAGE - 1)
        if _madvise_fn(start, end - start, _MADV_POPULATE_WRITE) == 0:
            return
    t.zero_()


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


class DeviceArena:
    """One tensor ``(slots, *page_shape)`` on the device tier's device."""

    def __init__(self, slots: int, page_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.page_shape = page_shape
        self.dtype = dtype
        self.device = device
        self.page_bytes = math.prod(page_shape) * torch.empty((), dtype=dtype).element_size()
        with allocating(f"the device tier on {device} ({slots} pages)", slots * self.page_bytes):
            self.pool = torch.zeros((slots, *page_shape), dtype=dtype, device=device)
        self._rows: tuple[Optional[torch.Tensor], torch.Tensor] = (None, self.pool)

    @property
    def slots(self) -> int:
        return self.pool.shape[0]

    @property
    def rows(self) -> torch.Tensor:
        """The pool as ``(slots, page_bytes)`` uint8 (one view per pool: making a view of a device tensor is a
        call into torch the event loop need not repeat per batch)."""
        if self._rows[0] is not self.pool:  # the pool was replaced (the device tier resized)
            self._rows = (self.pool, self.pool.view(self.pool.shape[0], -1).view(torch.uint8))
        return self._rows[1]

    def resized(self, slots: int) -> torch.Tensor:
        """A new pool of ``slots`` slots holding the first ``min(old, new)`` slots of the old one."""
        with allocating(f"the device tier on {self.device} ({slots} pages)", slots * self.page_bytes):
            new = torch.zeros((slots, *self.page_shape), dtype=self.dtype, device=self.device)
        keep = min(slots, self.slots)
        new[:keep].copy_(self.pool[:keep])
        return new


class HostArena:
    """Host memory for ``slots`` pages in chunks; pinned when ``pinned``. Build with :meth:`allocate`."""

    def __init__(self, page_bytes: int, pinned: bool) -> None:
        self.page_bytes = page_bytes
        self.pinned = pinned
        self.chunks: list[torch.Tensor] = []  # each (rows, page_bytes) uint8
        self._starts: list[int] = []  # first slot of each chunk
        self.slots = 0

    def _chunk_rows(self, remaining: int) -> int:
        want = min(remaining * self.page_bytes, _MAX_PINNED_CHUNK if self.pinned else _MAX_CHUNK)
        size = _pow2_floor(want) if want >= self.page_bytes else self.page_bytes
        rows = max(1, size // self.page_bytes)
        # the largest power-of-two chunk may leave a tail smaller than a page: take the rows that fit
        return min(rows, remaining)

    def _new_chunk(self, rows: int) -> torch.Tensor:
        chunk = torch.empty((rows, self.page_bytes), dtype=torch.uint8, pin_memory=self.pinned)
        prefault(chunk)
        return chunk

    def allocate(self, slots: int) -> None:
        """Grow to ``slots`` slots (blocking: call from a worker thread)."""
        self.commit(slots, self.prepare(slots))

    def prepare(self, slots: int) -> "list[torch.Tensor] | torch.Tensor | None":
        """What :meth:`commit` needs to make the arena ``slots`` slots, built without changing it (blocking):
        the chunks to add for a grow; for a shrink, the smaller copy of the chunk that straddles the new end
        (None when the end falls between chunks)."""
        if slots > self.slots:
            return self._new_chunks(slots - self.slots)
        c = bisect.bisect_left(self._starts, slots)  # chunks from c on are dropped whole
        if c == 0 or self._starts[c - 1] + self.chunks[c - 1].shape[0] <= slots:
            return None
        keep = slots - self._starts[c - 1]
        with allocating(f"the host tier (a {keep}-page chunk while shrinking)", keep * self.page_bytes):
            smaller = torch.empty((keep, self.page_bytes), dtype=torch.uint8, pin_memory=self.pinned)
        smaller.copy_(self.chunks[c - 1][:keep])
        return smaller

    def _new_chunks(self, rows_needed: int) -> list[torch.Tensor]:
        """Chunks for ``rows_needed`` more slots, every page of them touched (pre-faulted, so the first
        transfers into them run at memory speed). If one allocation fails, the ones made are freed."""
        made: list[torch.Tensor] = []
        what = f"the host tier ({rows_needed} more pages{', pinned' if self.pinned else ''})"
        try:
            with allocating(what, rows_needed * self.page_bytes):
                while rows_needed > 0:
                    rows = self._chunk_rows(rows_needed)
                    made.append(self._new_chunk(rows))
                    rows_needed -= rows
        except BaseException:
            self.free(made)
            raise
        return made

    def commit(self, slots: int, prepared: "list[torch.Tensor] | torch.Tensor | None") -> list[torch.Tensor]:
        """Become ``slots`` slots with what :meth:`prepare` built (fast: call on any thread while nothing
        copies to or from the arena); returns the chunks given up, for :meth:`free`."""
        if isinstance(prepared, list):
            for chunk in prepared:
                self._starts.append(self.slots)
                self.chunks.append(chunk)
                self.slots += chunk.shape[0]
            return []
        dropped: list[torch.Tensor] = []
        while self.chunks and self._starts[-1] >= slots:
            dropped.append(self.chunks.pop())
            self.slots = self._starts.pop()
        if prepared is not None:
            dropped.append(self.chunks[-1])
            self.chunks[-1] = prepared
            self.slots = slots
        return dropped

    def free(self, chunks: list[torch.Tensor]) -> None:
        """Give ``chunks`` back to the system (blocking: call from a worker thread)."""
        chunks.clear()
        if self.pinned and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()

    def locate(self, slot: int) -> tuple[int, int]:
        """(chunk index, row in chunk) of ``slot``."""
        c = bisect.bisect_right(self._starts, slot) - 1
        return c, slot - self._starts[c]

    def group(self, slots: "Sequence[int] | np.ndarray") -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Positions of ``slots`` grouped by chunk: {chunk: (positions in ``slots``, rows in the chunk)}, as
        int64 arrays (no Python per slot). Slots of one chunk (the common case) cost two reductions."""
        s = np.asarray(slots, dtype=np.int64)
        if s.size == 0:
            return {}
        c = bisect.bisect_right(self._starts, int(s.min())) - 1
        first = self._starts[c]
        if int(s.max()) < first + self.chunks[c].shape[0]:
            return {c: (np.arange(s.size), s - first)}
        chunk = np.searchsorted(np.asarray(self._starts, dtype=np.int64), s, side="right") - 1
        order = np.argsort(chunk, kind="stable")
        cuts = np.flatnonzero(np.diff(chunk[order])) + 1
        out = {}
        for part in np.split(order, cuts):
            c = int(chunk[part[0]])
            out[c] = (part, s[part] - self._starts[c])
        return out


class _Buffers:
    """One kind of staging buffer: up to ``count`` kept, a FIFO semaphore over them, made lazily or by prepare."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.free: list[torch.Tensor] = []  # made and not out
        self.made = 0
        self.sem: asyncio.Semaphore | None = None  # made on first use, on the loop that uses it

    def semaphore(self) -> asyncio.Semaphore:
        if self.sem is None:
            self.sem = asyncio.Semaphore(self.count)
        return self.sem


class StagingPool:
    """Pinned bounce buffers of ``rows`` pages each, of two kinds that never wait for each other: ``count``
    for disk <-> device and disk <-> disk moves, and ``swap_count`` (default ``count``) for swap batches,
    which stage device victims while the host pages promoted into their slots cross. An acquire waits (FIFO)
    while every buffer of its kind is out; :meth:`prepare` makes them all before serving, so a store with
    pinned memory never pins a buffer mid-serving. ``acquire(kind, wait=False)`` never waits: with every
    buffer of the kind out it makes a temporary one, dropped when given back (for a swap batch whose
    promotions also wait on other swap batches, where waiting could deadlock)."""

    def __init__(self, page_bytes: int, rows: int, count: int, pinned: bool, swap_count: Optional[int] = None) -> None:
        self.page_bytes = page_bytes
        self.rows = rows
        self.pinned = pinned
        self._kinds = {"io": _Buffers(count), "swap": _Buffers(count if swap_count is None else swap_count)}
        self._out: dict[int, str] = {}  # id of each buffer out -> its kind, or "temporary"

    @property
    def count(self) -> int:
        return self._kinds["io"].count

    @property
    def swap_count(self) -> int:
        return self._kinds["swap"].count

    async def acquire(self, kind: Literal["io", "swap"] = "io", wait: bool = True) -> torch.Tensor:
        """A buffer of ``kind`` (``"io"`` or ``"swap"``); see the class docstring for ``wait=False``."""
        k = self._kinds[kind]
        sem = k.semaphore()
        if not wait and sem.locked():
            buf = await asyncio.to_thread(self._make)
            self._out[id(buf)] = "temporary"
            return buf
        await sem.acquire()
        try:
            if k.free:
                buf = k.free.pop()
            else:
                buf = await asyncio.to_thread(self._make)
                k.made += 1
        except BaseException:
            sem.release()
            raise
        self._out[id(buf)] = kind
        return buf

    def prepare(self) -> None:
        """Make every buffer of both kinds now (blocking: call from a worker thread before serving). Pinning
        holds a driver lock that every CUDA call of the process waits for, so a buffer made mid-serving
        stalls the model's steps and the event loop's CUDA calls."""
        need = {name: k.count - k.made for name, k in self._kinds.items()}
        total = sum(need.values())
        with allocating(
            f"{total} staging buffers of {self.rows} pages (StoreConfig.staging_buffers, swap_buffers, batch_bytes)",
            total * self.rows * self.page_bytes,
        ):
            made = {name: [self._make() for _ in range(n)] for name, n in need.items()}
        for name, bufs in made.items():
            k = self._kinds[name]
            k.free += bufs
            k.made += len(bufs)

    def _make(self) -> torch.Tensor:
        return torch.empty((self.rows, self.page_bytes), dtype=torch.uint8, pin_memory=self.pinned)

    def give_back(self, buf: torch.Tensor) -> None:
        kind = self._out.pop(id(buf))
        if kind == "temporary":
            return
        k = self._kinds[kind]
        k.free.append(buf)
        k.semaphore().release()
