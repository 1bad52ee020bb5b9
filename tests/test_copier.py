"""The copier alone (CPU path): run coalescing, concurrent requests spread over the issue threads."""

from __future__ import annotations

import asyncio
import threading

import torch

from kvstore.transfer import copier as copier_module
from kvstore.transfer.copier import Copier, Segment, coalesce


def test_coalesce_merges_rows_contiguous_on_both_sides_only():
    # (dst, src) pairs: 0<-10, 1<-11 contiguous; 5<-12 breaks on dst; 6<-20 breaks on src
    assert coalesce([0, 1, 5, 6], [10, 11, 12, 20]) == [(0, 10, 2), (5, 12, 1), (6, 20, 1)]


async def test_concurrent_requests_land_exactly_and_use_every_issue_thread(monkeypatch):
    seen: set[str] = set()
    real = copier_module._copy_runs

    def spy(segments, non_blocking):
        seen.add(threading.current_thread().name)
        real(segments, non_blocking)

    monkeypatch.setattr(copier_module, "_copy_runs", spy)
    row = copier_module.INLINE_BYTES + 64  # one row per request: too big to run inline
    src = torch.randint(0, 256, (16, row), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    cp = Copier(torch.device("cpu"))
    try:
        await asyncio.gather(*(cp.copy([Segment(dst, [15 - i], src, [i])], "up") for i in range(16)))
    finally:
        cp.close()
    assert torch.equal(dst, src.flip(0))
    assert len(seen) == copier_module.ISSUERS  # requests were spread over all of the lane's threads
