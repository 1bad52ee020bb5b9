"""The ``kvstore`` logger: what is logged at which level (``docs/logging.md``), and the plan summaries.

Every module logs to ``logging.getLogger("kvstore")``. Nothing is logged per page at INFO or above except
a page that fails its checksum (ERROR, one line per damaged page: each is a real fault). DEBUG adds one
line per transfer plan with counts (moves per ``src->dst``, demotions = evictions, drops, swaps), never a
line per page; building it costs nothing unless DEBUG is enabled for the logger.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .placement.page import Plan

log = logging.getLogger("kvstore")

__all__ = ["log", "log_plan", "describe_plan"]

_PRIORITY = {0: "resume", 1: "prefetch", 2: "background"}


def _counts(c: "Counter[str]") -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items()))


def describe_plan(plan: "Plan", priority: int) -> str:
    """``plan (resume priority): 12 moves [disk->host 8, host->device 4]; evicted 4 [device->host 4]; dropped 0``."""
    moves: Counter[str] = Counter()
    evicted: Counter[str] = Counter()
    new = swaps = 0
    for m in plan.moves:
        n = len(m.pids)
        if m.src is None:
            new += n
            continue
        pair = f"{m.src.label}->{m.dst.label}"
        moves[pair] += n
        if m.dst > m.src:
            evicted[pair] += n
        swaps += n if m.swap else 0
    return (f"plan ({_PRIORITY.get(priority, priority)} priority): {len(plan) - new} moves [{_counts(moves)}], "
            f"{new} new pages; evicted {sum(evicted.values())} [{_counts(evicted)}]; dropped {plan.dropped}; swaps {swaps}")


def log_plan(plan: "Plan", priority: int) -> None:
    """One DEBUG line for a plan that is about to run (nothing is computed unless DEBUG is on)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("kvstore %s", describe_plan(plan, priority))
