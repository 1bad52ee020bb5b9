"""Batched row copies between memory stores (device arena, host arena chunks, staging buffers).

A copy request is a list of :class:`Segment` — a source and a destination 2-D ``uint8`` tensor and
the rows to copy. Rows are coalesced into runs that are contiguous on both sides, so pages that sit in
neighbouring slots move with one copy. On CUDA the copies are issued from a worker thread on a
dedicated stream per direction (so H2D and D2H overlap), after the caller's compute stream, and
completion is a CUDA event waited for on another worker thread and bridged to asyncio. Without CUDA
the copies run on worker threads. The event loop thread never issues or waits for a copy.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .._aio import settle, thread_pool


@dataclass
class Segment:
    dst: torch.Tensor
    dst_rows: Sequence[int]
    src: torch.Tensor
    src_rows: Sequence[int]


def coalesce(dst_rows: Sequence[int], src_rows: Sequence[int]) -> list[tuple[int, int, int]]:
    """Runs (dst_start, src_start, count) covering the row pairs, contiguous on both sides."""
    pairs = sorted(zip(src_rows, dst_rows))
    runs: list[tuple[int, int, int]] = []
    for s, d in pairs:
        if runs:
            d0, s0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (d0, s0, n + 1)
                continue
        runs.append((d, s, 1))
    return runs


def _copy_runs(segments: Sequence[Segment], non_blocking: bool) -> None:
    for seg in segments:
        for d0, s0, n in coalesce(seg.dst_rows, seg.src_rows):
            seg.dst[d0 : d0 + n].copy_(seg.src[s0 : s0 + n], non_blocking=non_blocking)


class Copier:
    """Runs copy requests without blocking the event loop. ``lane`` is ``"up"`` (to the device) or ``"down"``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._issue = {lane: thread_pool(1, f"kvstore-copy-{lane}") for lane in ("up", "down")}
        if self.cuda:
            self._streams = {lane: torch.cuda.Stream(device) for lane in ("up", "down")}
            self._wait = thread_pool(4, "kvstore-cuda-wait")

    def after_current_stream(self) -> Optional[torch.cuda.Event]:
        """An event on the caller's current stream, so copies start after the compute queued so far."""
        if not self.cuda:
            return None
        return torch.cuda.current_stream(self.device).record_event()

    def _issue_cuda(self, segments: Sequence[Segment], lane: str, after: Optional[torch.cuda.Event]):
        stream = self._streams[lane]
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)
            _copy_runs(segments, non_blocking=True)
            return stream.record_event()

    async def copy(self, segments: Sequence[Segment], lane: str, after: Optional[torch.cuda.Event] = None) -> None:
        """Copy every segment's rows; returns once the bytes are in place."""
        loop = asyncio.get_running_loop()
        if not self.cuda:
            await settle(loop.run_in_executor(self._issue[lane], _copy_runs, segments, False))
            return
        event = await settle(loop.run_in_executor(self._issue[lane], self._issue_cuda, segments, lane, after))
        await settle(loop.run_in_executor(self._wait, event.synchronize))

    def close(self) -> None:
        for pool in self._issue.values():
            pool.shutdown(wait=True)
        if self.cuda:
            self._wait.shutdown(wait=True)
