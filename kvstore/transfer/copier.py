"""Batched row copies between memory stores (device arena, host arena chunks, staging buffers).

A copy request is a list of :class:`Segment` — a source and a destination 2-D ``uint8`` tensor and
the rows to copy. Rows are coalesced into runs that are contiguous on both sides, so pages that sit in
neighbouring slots move with one copy. On CUDA the copies are issued from worker threads, each with
its own stream (``ISSUERS`` per direction, taken in turn; H2D and D2H overlap), after the caller's
compute stream, with one ``_foreach_copy_`` call per request, and
every host<->device request moves as batched driver copies (:mod:`.batchcopy`; where the driver lacks
them, scattered small pages move with one gather/scatter kernel over mapped pinned memory); completion
is a CUDA event waited for on another worker thread and bridged to asyncio. Without CUDA
host-memory copies run on worker threads, except tiny ones (``INLINE_BYTES``) done inline. The event
loop thread never issues or waits for a CUDA copy and never copies more than ``INLINE_BYTES``.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .._aio import settle_thread, thread_pool
from . import batchcopy


#: Row indices: a sequence of ints or an int64 array.
Rows = Union[Sequence[int], np.ndarray]


@dataclass
class Segment:
    dst: torch.Tensor
    dst_rows: "Rows"
    src: torch.Tensor
    src_rows: "Rows"


def coalesce(dst_rows: "Rows", src_rows: "Rows") -> list[tuple[int, int, int]]:
    """Runs (dst_start, src_start, count) covering the row pairs, contiguous on both sides."""
    d0, s0, n = batchcopy.runs(dst_rows, src_rows)
    return list(zip(d0.tolist(), s0.tolist(), n.tolist()))


#: A same-device segment of more runs than this, averaging under ``GATHER_BELOW`` bytes a run, moves with
#: one gather (``index_select``) and one scatter (``index_copy_``) instead of a copy per run: two passes
#: over the bytes, but no Python per run.
GATHER_RUNS = 32
GATHER_BELOW = 1 << 20


def _copy_runs(segments: Sequence[Segment], non_blocking: bool) -> None:
    """One ``copy_`` per run, all issued by a single ``_foreach_copy_`` call: the calling thread gives the
    GIL up once for the whole request, not once per run (each re-acquire can wait on a busy event loop).
    Many small runs between tensors of one device move by index instead (:data:`GATHER_RUNS`)."""
    dst: list[torch.Tensor] = []
    src: list[torch.Tensor] = []
    for seg in segments:
        d0, s0, n = batchcopy.runs(seg.dst_rows, seg.src_rows)
        row_bytes = seg.dst.shape[1] * seg.dst.element_size()
        if n.size > GATHER_RUNS and seg.dst.device == seg.src.device and n.sum() * row_bytes < GATHER_BELOW * n.size:
            didx = torch.from_numpy(np.asarray(seg.dst_rows, dtype=np.int64)).to(seg.dst.device)
            sidx = torch.from_numpy(np.asarray(seg.src_rows, dtype=np.int64)).to(seg.src.device)
            seg.dst.index_copy_(0, didx, seg.src.index_select(0, sidx))
            continue
        for a, b, k in zip(d0.tolist(), s0.tolist(), n.tolist()):
            dst.append(seg.dst[a : a + k])
            src.append(seg.src[b : b + k])
    if dst:
        torch._foreach_copy_(dst, src, non_blocking=non_blocking)


#: Host-memory copies up to this size run inline on the caller's thread (about 10 us of memcpy, less
#: than handing the copy to a worker thread and waking the event loop again).
INLINE_BYTES = 128 << 10

#: Below this average run size a CUDA copy uses one gather/scatter kernel over mapped pinned memory
#: instead of one DMA copy per run (per-copy launch cost dominates small runs; measured on an H200:
#: 64 KiB pages scattered, 5.3 GB/s per-page copy_ vs 49.5 GB/s gather kernel, raw copy 55 GB/s).
ZERO_COPY_BELOW = 1 << 20


#: Issue threads, each with its own CUDA stream, per direction; requests take them in turn. Queuing one
#: 2 MiB copy costs ~25 us of CPU on the H200 machine (about 2/3 of its transfer time), so one thread
#: alone barely keeps a direction's copy engine busy; two leave headroom.
ISSUERS = 2


class _MappedHost:
    """A pinned host tensor seen as a CUDA tensor (unified addressing: the host pointer is valid on the GPU)."""

    def __init__(self, host: torch.Tensor, device: torch.device) -> None:
        rows, width = host.shape
        word, typestr = (8, "<i8") if width % 8 == 0 else (1, "|u1")
        self.__cuda_array_interface__ = {
            "shape": (rows, width // word),
            "typestr": typestr,
            "data": (host.data_ptr(), False),
            "version": 3,
            "strides": None,
        }
        self.tensor = torch.as_tensor(self, device=device)
        self.word = word
        self.host = host  # keeps the memory alive


class _ZeroCopy:
    """Gather/scatter kernels between scattered device rows and scattered pinned host rows."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._views: dict[int, _MappedHost] = {}

    def mapped(self, host: torch.Tensor) -> _MappedHost:
        key = host.data_ptr()
        view = self._views.get(key)
        if view is None or view.host.shape != host.shape:
            view = self._views[key] = _MappedHost(host, self.device)
        return view

    def forget(self) -> None:
        self._views.clear()

    def usable(self, seg: Segment) -> bool:
        d, s = seg.dst, seg.src
        if d.is_cuda == s.is_cuda:
            return False
        host = s if d.is_cuda else d
        if not host.is_pinned():
            return False
        n = len(seg.dst_rows)
        return n > 0 and n * host.shape[1] / batchcopy.runs(seg.dst_rows, seg.src_rows)[2].size < ZERO_COPY_BELOW

    def copy(self, seg: Segment) -> None:
        rows = np.stack([np.asarray(seg.dst_rows, dtype=np.int64), np.asarray(seg.src_rows, dtype=np.int64)])
        didx, sidx = torch.from_numpy(rows).to(self.device)
        if seg.dst.is_cuda:  # host -> device: gather over PCIe, scatter in HBM
            host = self.mapped(seg.src)
            dev = seg.dst.view(torch.int64) if host.word == 8 else seg.dst
            dev.index_copy_(0, didx, host.tensor.index_select(0, sidx))
        else:  # device -> host: gather in HBM, scatter over PCIe
            host = self.mapped(seg.dst)
            dev = seg.src.view(torch.int64) if host.word == 8 else seg.src
            host.tensor.index_copy_(0, didx, dev.index_select(0, sidx))


def _wait_event(event: torch.cuda.Event, done: "Future[None]") -> None:
    try:
        event.synchronize()
    except BaseException as exc:
        done.set_exception(exc)
    else:
        done.set_result(None)


class _PinnedCache:
    """Whether host tensors are pinned, asked of CUDA once per storage. ``Tensor.is_pinned()`` is a driver
    query, and driver queries wait while another thread pins or unpins memory (seconds for a big host
    tier): copies issued between two quota changes must not pay one per request. Entries keep their storage
    alive, so an address cannot be reused under a stale answer; :meth:`clear` drops them."""

    def __init__(self) -> None:
        self._known: dict[tuple[int, int], tuple[torch.UntypedStorage, bool]] = {}

    def __call__(self, t: torch.Tensor) -> bool:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        hit = self._known.get(key)
        if hit is None:
            hit = self._known[key] = (storage, t.is_pinned())
        return hit[1]

    def clear(self) -> None:
        self._known.clear()


def _batchable(seg: Segment, pinned: _PinnedCache) -> Optional[str]:
    """The direction of a segment the batched driver copies can move (rows contiguous in memory; host
    side pinned), else None."""
    d, s = seg.dst, seg.src
    if not (d.is_contiguous() and s.is_contiguous()) or d.shape[1:] != s.shape[1:] or d.dtype != s.dtype:
        return None
    if d.is_cuda and s.is_cuda:
        return "d2d" if d.device == s.device else None
    if d.is_cuda:
        return "h2d" if pinned(s) else None
    if s.is_cuda:
        return "d2h" if pinned(d) else None
    return None


def _batch_copy(batch: batchcopy.BatchCopier, seg: Segment, direction: str, stream: torch.cuda.Stream) -> None:
    """The segment's rows as one batched driver call per chunk of runs (addresses built with numpy)."""
    d0, s0, n = batchcopy.runs(seg.dst_rows, seg.src_rows)
    if n.size == 0:
        return
    width = seg.dst.shape[1] * seg.dst.element_size()
    dst = np.uint64(seg.dst.data_ptr()) + (d0 * seg.dst.stride(0) * seg.dst.element_size()).astype(np.uint64)
    src = np.uint64(seg.src.data_ptr()) + (s0 * seg.src.stride(0) * seg.src.element_size()).astype(np.uint64)
    batch.copy(dst, src, (n * width).astype(np.uint64), direction, stream.cuda_stream)


class Copier:
    """Runs copy requests without blocking the event loop. ``lane`` is ``"up"`` (to the device) or ``"down"``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        lanes = ("up", "down")
        self._issue = {lane: [thread_pool(1, f"kvstore-copy-{lane}{i}") for i in range(ISSUERS)] for lane in lanes}
        self._turn = {lane: 0 for lane in lanes}
        if self.cuda:
            self._streams = {lane: [torch.cuda.Stream(device) for _ in range(ISSUERS)]  # type: ignore[no-untyped-call]
                             for lane in lanes}
            self._zero_copy = _ZeroCopy(device)
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._batch = batchcopy.load(index) if batchcopy.enabled() else None
            self._pinned = _PinnedCache()
            self._wait = thread_pool(4, "kvstore-cuda-wait")

    def _next_issuer(self, lane: str) -> int:
        i = self._turn[lane]
        self._turn[lane] = (i + 1) % ISSUERS
        return i

    def after_current_stream(self) -> Optional[torch.cuda.Event]:
        """An event on the caller's current stream, so copies start after the compute queued so far."""
        if not self.cuda:
            return None
        event: torch.cuda.Event = torch.cuda.current_stream(self.device).record_event()
        return event

    def _issue_cuda(self, segments: Sequence[Segment], stream: torch.cuda.Stream,
                    after: Optional[torch.cuda.Event]) -> torch.cuda.Event:
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)
            dma = []
            for seg in segments:
                if self._batch is not None and (direction := _batchable(seg, self._pinned)) is not None:
                    _batch_copy(self._batch, seg, direction, stream)
                elif self._zero_copy.usable(seg):
                    self._zero_copy.copy(seg)
                else:
                    dma.append(seg)
            _copy_runs(dma, non_blocking=True)
            event: torch.cuda.Event = stream.record_event()
            return event

    def forget_host_memory(self) -> None:
        """Drop cached device views of host memory (after the host arena was reallocated)."""
        if self.cuda:
            self._zero_copy.forget()
            self._pinned.clear()

    async def copy(self, segments: Sequence[Segment], lane: str, after: Optional[torch.cuda.Event] = None) -> None:
        """Copy every segment's rows; returns once the bytes are in place."""
        if not self.cuda:
            if sum(len(seg.dst_rows) * seg.dst.shape[1] for seg in segments) <= INLINE_BYTES:
                _copy_runs(segments, False)  # a few KiB of memcpy: cheaper than a thread hand-off
                return
            i = self._next_issuer(lane)
            await settle_thread(self._issue[lane][i].submit(_copy_runs, segments, False))
            return
        i = self._next_issuer(lane)
        done: "Future[None]" = Future()
        self._issue[lane][i].submit(self._issue_then_wait, segments, self._streams[lane][i], after, done)
        await settle_thread(done)

    def _issue_then_wait(self, segments: Sequence[Segment], stream: torch.cuda.Stream,
                         after: Optional[torch.cuda.Event], done: "Future[None]") -> None:
        """Issue thread: queue the copies, then hand their completion to a waiter thread (this thread goes
        on issuing the next request while the copies run)."""
        try:
            event = self._issue_cuda(segments, stream, after)
        except BaseException as exc:
            done.set_exception(exc)
            return
        self._wait.submit(_wait_event, event, done)

    def close(self) -> None:
        for pools in self._issue.values():
            for pool in pools:
                pool.shutdown(wait=True)
        if self.cuda:
            self._wait.shutdown(wait=True)
