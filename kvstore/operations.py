"""Operations in flight: what each one holds, owns and runs, and waiting for the room they will give back.

Every manager call that moves pages (resume, resize, prefetch, set_quota) is an :class:`Operation`
registered in the :class:`Ledger` while it runs. Its holds (pages kept out of eviction), its new pages
(owned by no cache yet) and its plan runs are recorded here, in one place, so that

* ending an operation gives back exactly what it took, whatever the cache did meanwhile (no alias of a
  cache's live page list is kept across an await);
* ``check_invariants()`` can tell every hold and owner count from the operation or cache it belongs to;
* a resume or resize that finds no room can wait for the operations that hold it, and ask prefetches to
  stop their transfers that have not started.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np

from .placement import Page, PageList, Placement
from .placement.table import PageTable

if TYPE_CHECKING:
    from .cache import KVCache
    from .transfer.executor import Run


class Operation:
    """One call in flight. ``kind``: "resume", "resize", "prefetch" or "quota"."""

    def __init__(self, kind: str, cache: Optional["KVCache"], table: PageTable) -> None:
        self.kind = kind
        self.cache = cache
        self.held = PageList(table)  # one hold each (a page may appear once); a held page is never freed
        self.owned = PageList(table)  # new pages this operation owns until it hands them to its cache
        self.runs: list["Run"] = []
        self.stopping = False  # a prefetch asked to stop planning and starting transfers
        self.ended = False

    @property
    def holds_room(self) -> bool:
        """Whether ending it may give room back (it holds pages, owns new ones or runs transfers)."""
        return bool(self.held or self.owned or any(not r.done() for r in self.runs))

    def stop(self) -> None:
        """Stop planning and starting transfers (those running finish): a prefetch giving way."""
        self.stopping = True
        for run in self.runs:
            run.stop()


class Ledger:
    """The operations in flight of one manager."""

    def __init__(self, placement: Placement) -> None:
        self._pl = placement
        self.ops: set[Operation] = set()
        self._changed: Optional[asyncio.Future[None]] = None

    def begin(self, kind: str, cache: Optional["KVCache"] = None) -> Operation:
        op = Operation(kind, cache, self._pl.table)
        self.ops.add(op)
        return op

    def end(self, op: Operation) -> None:
        """Release what ``op`` still holds and forget it (synchronous: safe in a ``finally``)."""
        self.release(op)
        op.ended = True
        self.ops.discard(op)
        self.notify()

    # ------------------------------------------------------------------ holds
    def hold(self, op: Operation, pages: Iterable[Page]) -> None:
        """Hold each of ``pages`` for ``op`` (freed pages are skipped)."""
        new = self._pl.live_pages(pages)
        self._pl.hold_all(new)
        op.held.extend(new)

    def release(self, op: Operation, keep: Optional[np.ndarray] = None) -> None:
        """Release ``op``'s holds, except on pages whose pid is in ``keep``."""
        if keep is not None and keep.size:
            kept = np.isin(op.held.pids, keep)
            going, op.held = op.held.select(~kept), op.held.select(kept)
        else:
            going, op.held = op.held, PageList(self._pl.table)
        if going:
            self._pl.release_all(going)
            self.notify()

    def holds_to_locks(self, op: Operation) -> None:
        """Turn every hold of ``op`` into a lock (its cache became ACTIVE)."""
        self._pl.holds_to_locks(op.held)
        op.held = PageList(self._pl.table)

    # ------------------------------------------------------------------ room
    def notify(self) -> None:
        """Room may have come back (an operation ended, pages were released, suspended or freed)."""
        fut, self._changed = self._changed, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def room_holders(self, op: Operation) -> set[Operation]:
        """The other operations in flight whose end may give room back."""
        return {o for o in self.ops if o is not op and o.holds_room}

    async def changed(self) -> None:
        """Wait for the next :meth:`notify`."""
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._changed)

    # ------------------------------------------------------------------ invariants
    def counts(self) -> tuple[Counter[int], Counter[int]]:
        """(holds, owners) per page id that the operations in flight account for."""
        holds: Counter[int] = Counter()
        owners: Counter[int] = Counter()
        for op in self.ops:
            holds.update(op.held.pids.tolist())
            owners.update(op.owned.pids.tolist())
        return holds, owners
