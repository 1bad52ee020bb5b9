"""Runs a placement plan: moves grouped into batches, batches run as a dependency-ordered pipeline.

Moves of one kind (source level -> destination level) are cut into batches of at most
``batch_bytes``. A batch starts as soon as the batches that vacate its destination slots are done,
so victims' demotions, disk reads and device copies of different batches overlap (disk -> host reads
of batch i+1 run while batch i crosses PCIe). Each move is settled in placement when its batch ends:
``complete`` after its bytes landed, ``abort`` if its batch failed, was cancelled before starting, or
depended on an aborted move. A batch never stops half-way through its transfer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Sequence, cast

import numpy as np
import torch

from .._aio import settle
from ..errors import CorruptPageError, InvalidStateError, StorageIOError
from ..placement import Move, MoveState, Placement, Plan
from ..types import CacheLevel
from .arenas import DeviceArena, HostArena, StagingPool
from .bandwidth import Bandwidth, Ticket
from .copier import Copier, Segment
from .diskfile import DiskSlotFile
from .io_backends import Extent, IOBackend
from ..logs import log_plan
from .scheduler import BACKGROUND, IOScheduler

log = logging.getLogger("kvstore")

D, H, K = CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK
_NO_SUM = -1  # an expected checksum no page has (xxh3-64 digests are unsigned)

#: Bytes one batch of memory moves (device <-> host) may hold when that is more than ``batch_bytes``: those
#: batches need no I/O admission or staging, and each batch costs the event loop a task, its futures and a
#: copy request, so for 2 MiB pages 32 MiB batches were 128 loop wake-ups per 4 GiB each way.
MEMORY_BATCH_BYTES = 256 << 20

#: Pages one batch may hold whatever their size: a batch settles in one synchronous step of the event loop
#: (~5 us a page today), so 32 MiB of tiny pages (262 144 of 128 bytes) made steps of ~100 ms.
MAX_BATCH_PAGES = 1024


@dataclass(eq=False)
class _Batch:
    src: Optional[CacheLevel]
    dst: CacheLevel
    swap: bool = False
    #: promotions into swap victims' slots: batched like their swap batches, one promotion batch per swap batch
    linked: bool = False
    #: swap batches: whose only dependent waits on nothing else, so it may wait for a staging buffer
    may_wait: bool = False
    moves: list[Move] = field(default_factory=list)
    rows: int = 0  # pages of ``moves``
    deps: set["_Batch"] = field(default_factory=set)  # batches that must be done first
    read_deps: set["_Batch"] = field(default_factory=set)  # swap batches whose sources must be staged first
    done: Optional[asyncio.Future[None]] = None  # set by submit()
    read_done: Optional[asyncio.Future[None]] = None  # swap batches: sources copied to staging

    def waits(self) -> list[asyncio.Future[None]]:
        # submit() gave every batch its ``done`` and every swap batch (the read_deps) its ``read_done``
        return cast("list[asyncio.Future[None]]", [d.done for d in self.deps] + [d.read_done for d in self.read_deps])


@dataclass
class RunResult:
    """What a plan run moved (pages whose data crossed levels; new-page placements not counted)."""

    pages_moved: int = 0
    bytes_moved: int = 0
    error: Optional[BaseException] = None
    seconds: float = 0.0


def _promoted(m: Move, i: int) -> bool:
    """Whether the promotion page ``i`` of swap victim ``m`` waited for (page ``i`` of its ``after``) took the
    victim's slot."""
    return m.after is not None and m.after.state[i] is MoveState.DONE


_NONE = np.zeros(0, dtype=np.int64)

#: what a batch moves: (move, indices of its pages; None for all of them)
Part = tuple[Move, Optional[list[int]]]


def _ready(m: Move) -> tuple[Optional[list[int]], list[int]]:
    """(pages of ``m`` to transfer now, pending pages whose destination slot was never vacated). The first is
    None when it is every page (the common case, found without a loop when nothing settled early)."""
    after, state = m.after, m.state
    if m.left == len(state) and MoveState.STAGED not in state:  # every page PENDING
        if after is None or (after.left == 0 and MoveState.ABORTED not in after.state):  # and every slot vacated
            return None, []
    pending = (MoveState.PENDING, MoveState.STAGED)
    if after is None:
        return [i for i, st in enumerate(state) if st in pending], []
    vacated = (MoveState.DONE, MoveState.STAGED)
    ok: list[int] = []
    stuck: list[int] = []
    for i, st in enumerate(state):
        if st in pending:
            (ok if after.state[i] in vacated else stuck).append(i)
    return (None if len(ok) == len(state) else ok), stuck


def _flat(parts: Sequence[Part]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pids, source slots and destination slots of ``parts``, in order (int64 arrays)."""
    if len(parts) == 1 and parts[0][1] is None:
        m = parts[0][0]
        return m.pids, m.src_slots, m.dst_slots
    pids, src, dst = [], [], []
    for m, idx in parts:
        sel = slice(None) if idx is None else np.asarray(idx, dtype=np.int64)
        pids.append(m.pids[sel])
        src.append(m.src_slots[sel])
        dst.append(m.dst_slots[sel])
    if not pids:
        return _NONE, _NONE, _NONE
    return np.concatenate(pids), np.concatenate(src), np.concatenate(dst)


def _locate(parts: Sequence[Part], flat: set[int]) -> dict[int, list[int]]:
    """Positions ``flat`` of :func:`_flat`'s lists as {part number: indices into that part's move}."""
    out: dict[int, list[int]] = {}
    base = 0
    for k, (m, idx) in enumerate(parts):
        n = len(m.pids) if idx is None else len(idx)
        for j in range(n):
            if base + j in flat:
                out.setdefault(k, []).append(j if idx is None else idx[j])
        base += n
    return out


def _per_move(pairs: Sequence[tuple[Move, int]], rows: Sequence[int]) -> list[tuple[Move, list[int]]]:
    """Rows ``rows`` of (move, page index) ``pairs`` as (move, its page indices), moves in order."""
    out: dict[int, tuple[Move, list[int]]] = {}
    for r in rows:
        m, i = pairs[r]
        part = out.get(id(m))
        if part is None:
            part = out[id(m)] = (m, [])
        part[1].append(i)
    return list(out.values())


class _RunState:
    def __init__(self) -> None:
        self.stop = False
        self.result = RunResult()


class Run:
    """A submitted plan in flight. Every move of the plan has its ``settled`` awaitable from the moment the
    plan is submitted, and every move is settled (completed or aborted) by the time ``task`` is done.

    ``stop()`` aborts the batches that have not started; the others finish. The task itself is never
    cancelled (a task cancelled before its first step would leave its moves unsettled): awaiting it
    through ``asyncio.shield`` or :func:`asyncio.wait` leaves it running when the awaiter is cancelled.
    """

    def __init__(self, task: "asyncio.Future[RunResult]", state: _RunState) -> None:
        self.task = task
        self._state = state

    def stop(self) -> None:
        self._state.stop = True

    def done(self) -> bool:
        return self.task.done()


class TransferExecutor:
    """Moves page data between the tier stores and settles each move in :class:`Placement`."""

    def __init__(
        self,
        placement: Placement,
        device: DeviceArena,
        host: Optional[HostArena],
        disk: Optional[DiskSlotFile],
        io: Optional[IOBackend],
        copier: Copier,
        staging: StagingPool,
        batch_bytes: int,
        stats: Counter[str],
        bandwidth: Optional[Bandwidth] = None,
    ) -> None:
        self.placement = placement
        self.device = device
        self.host = host
        self.disk = disk
        self.io = io
        self.copier = copier
        self.staging = staging
        self.page_bytes = device.page_bytes
        self.batch_rows = max(1, min(batch_bytes // self.page_bytes, MAX_BATCH_PAGES))
        self.memory_batch_rows = max(self.batch_rows, min(MEMORY_BATCH_BYTES // self.page_bytes, MAX_BATCH_PAGES))
        self.stats = stats
        self.bandwidth = bandwidth if bandwidth is not None else Bandwidth(copier.cuda)  # measured per batch
        #: bytes of the batches submitted and not done yet, per (src, dst): what a new move on the path waits behind
        self.queued: Counter[tuple[CacheLevel, CacheLevel]] = Counter()
        self.io_sched = IOScheduler(max(4 * batch_bytes, self.page_bytes))
        self.sums: dict[int, tuple[int, int]] = {}  # disk slot -> (page id, xxh3-64 of the bytes written there)
        #: awaited with the disk slots about to be written (a persistent tier makes stale records durable-deleted)
        self.before_disk_write: Optional[Callable[[Sequence[int]], Awaitable[None]]] = None

    # the stores of the levels a plan moves pages to or from: a plan names configured levels only
    @property
    def _host(self) -> HostArena:
        if self.host is None:
            raise InvalidStateError("this store has no host level")
        return self.host

    @property
    def _disk(self) -> DiskSlotFile:
        if self.disk is None:
            raise InvalidStateError("this store has no disk level")
        return self.disk

    @property
    def _io(self) -> IOBackend:
        if self.io is None:
            raise InvalidStateError("this store has no disk level (no disk I/O backend)")
        return self.io

    # ------------------------------------------------------------------ planning batches
    def _rows_limit(self, src: Optional[CacheLevel], dst: CacheLevel, swap: bool, linked: bool = False) -> int:
        if linked or self._needs_staging(src, dst, swap):
            return min(self.batch_rows, self.staging.rows)
        if K not in (src, dst):  # memory moves: no I/O admission or staging to bound them
            return self.memory_batch_rows
        return self.batch_rows

    def _needs_staging(self, src: Optional[CacheLevel], dst: CacheLevel, swap: bool = False) -> bool:
        if swap:
            return True
        if src == K and dst == K:
            return True
        if src == K and dst == D and self.io is not None and self.io.device_reads:
            return False  # GPUDirect Storage: the backend reads the file straight into device memory
        return {src, dst} == {D, K} and self.copier.cuda

    def _batches(self, plan: Plan, loop: asyncio.AbstractEventLoop) -> list[_Batch]:
        """The plan's moves in batches of one (src, dst, swap) kind, each with its futures; every move's
        ``settled`` is its batch's ``done``. A move is never split (placement cuts moves at the batch rows);
        a batch takes moves of its kind until it holds ``batch rows`` pages."""
        open_: dict[tuple[Optional[CacheLevel], CacheLevel, bool, bool], _Batch] = {}
        out: list[_Batch] = []
        for mv in plan.moves:
            linked = mv.after is not None and mv.after.swap
            k = (mv.src, mv.dst, mv.swap, linked)
            n = len(mv.pids)
            limit = self._rows_limit(mv.src, mv.dst, mv.swap, linked)
            if n > limit:
                raise RuntimeError(f"a move of {n} pages exceeds a batch of {limit} (Placement.max_group is too big)")
            b = open_.get(k)
            if b is None or b.rows + n > limit:
                b = open_[k] = _Batch(mv.src, mv.dst, mv.swap, linked)
                b.done = loop.create_future()
                b.read_done = loop.create_future() if mv.swap else None
                out.append(b)
            b.moves.append(mv)
            b.rows += n
            mv.settled = b.done
        of = {id(x.done): x for x in out}
        for b in out:  # dependencies, once every move has its batch (a swap's ``after`` comes later)
            for mv in b.moves:
                if mv.after is None:
                    continue
                dep = of.get(id(mv.after.settled))
                if dep is None:
                    continue
                if dep.swap:
                    b.read_deps.add(dep)
                elif dep is not b:
                    b.deps.add(dep)
        for b in out:
            if b.swap and len(b.deps) == 1 and not b.read_deps:
                (promo,) = b.deps
                b.may_wait = promo.read_deps == {b} and not promo.deps  # a pair waiting on nothing else
        for b in out:
            if b.src is not None and b.src != b.dst:
                self.queued[(b.src, b.dst)] += b.rows * self.page_bytes
        return out

    def _batch_done(self, b: _Batch) -> None:
        """The one end of every batch: its bytes leave the queue and its moves' ``settled`` is set."""
        if b.src is not None and b.src != b.dst:
            path = (b.src, b.dst)
            self.queued[path] -= b.rows * self.page_bytes
            if self.queued[path] <= 0:
                del self.queued[path]
        cast("asyncio.Future[None]", b.done).set_result(None)

    # ------------------------------------------------------------------ running
    async def run(self, plan: Plan, priority: int = BACKGROUND) -> RunResult:
        """Run every move of ``plan``; cancellation stops batches that have not started and waits for the rest.

        ``priority`` (scheduler.RESUME / PREFETCH / BACKGROUND) orders this plan's disk I/O against others'.
        """
        run = self.submit(plan, priority)
        try:
            return await asyncio.shield(run.task)
        except asyncio.CancelledError:
            run.stop()
            await settle(run.task)
            raise

    def submit(self, plan: Plan, priority: int = BACKGROUND) -> Run:
        """Start running ``plan`` (see :meth:`run`); each move's ``settled`` is set before this returns."""
        log_plan(plan, priority)  # DEBUG only: counts per src->dst, evictions, drops (kvstore.logs)
        state = _RunState()
        loop = asyncio.get_running_loop()
        batches = self._batches(plan, loop)
        return Run(asyncio.ensure_future(self._execute(batches, state, priority)), state)

    async def _execute(self, batches: list[_Batch], state: _RunState, priority: int) -> RunResult:
        t0 = time.perf_counter()
        if not batches:
            return state.result
        after = self.copier.after_current_stream()
        tasks = [
            asyncio.ensure_future(
                self._run_swap(b, state, after) if b.swap else self._run_batch(b, state, after, priority)
            )
            for b in batches
        ]
        everything = asyncio.gather(*tasks)
        try:
            await asyncio.shield(everything)
        except asyncio.CancelledError:
            state.stop = True
            await settle(everything)
            raise
        finally:
            state.result.seconds = time.perf_counter() - t0
        return state.result

    async def _run_swap(self, b: _Batch, state: _RunState, after: Optional[torch.cuda.Event]) -> None:
        """A swap batch: stage the sources, let the promotions take the slots, then write the destinations.

        Works page by page (one staging row each): a victim page whose promotion did not happen is restored
        to its source slot. Swaps only move between memory levels, where copies do not fail. A batch paired
        with its own promotion batch waits for a swap buffer (the holders finish on their own); any other
        never waits, taking a temporary buffer when every swap buffer is out.
        """
        src_l = cast(CacheLevel, b.src)  # a swap moves placed victims
        read_done = cast("asyncio.Future[None]", b.read_done)
        buf = await self.staging.acquire("swap", wait=b.may_wait)
        try:
            if state.stop:  # stopped while waiting for the buffer: the victims stay, their promotions abort
                for m in b.moves:
                    self.placement.abort_many(m)
                return
            pairs = [(m, i) for m in b.moves for i in range(len(m.pids))]  # staging row r holds pairs[r]
            src_slots = [m.src_slots[i] for m, i in pairs]
            try:
                await self.copier.copy(
                    self._segments_rows(buf, list(range(len(pairs))), src_l, src_slots, to_buf=True), "down", after
                )
            except Exception as exc:
                for m in b.moves:
                    self.placement.abort_many(m)
                state.stop = True
                state.result.error = state.result.error or self._wrap(exc, b)
                return
            for m, i in pairs:
                if m.pending_at(i):
                    self.placement.stage(m, i)
            read_done.set_result(None)
            await asyncio.wait(b.waits())
            # only pages still staged: one settled meanwhile no longer owns its slots (never write them);
            # page i of a swap move's ``after`` is the promotion that vacates its destination
            ok = [r for r, (m, i) in enumerate(pairs) if m.pending_at(i) and _promoted(m, i)]
            back = [r for r, (m, i) in enumerate(pairs) if m.pending_at(i) and not _promoted(m, i)]
            if ok:
                dst = [pairs[r][0].dst_slots[pairs[r][1]] for r in ok]
                await self.copier.copy(self._segments_rows(buf, ok, b.dst, dst, to_buf=False), "down", after)
            if back:
                src = [src_slots[r] for r in back]
                await self.copier.copy(self._segments_rows(buf, back, src_l, src, to_buf=False), "up", after)
            self.placement.complete_many(_per_move(pairs, ok))
            for m, idx in _per_move(pairs, back):
                self.placement.abort_many(m, idx)
            self._count(b, len(ok), state)
        finally:
            self.staging.give_back(buf)
            if not read_done.done():
                read_done.set_result(None)
            self._batch_done(b)

    def _segments_rows(
        self, buf: torch.Tensor, rows: list[int], level: CacheLevel, slots: list[int], to_buf: bool
    ) -> list[Segment]:
        """Segments copying memory-level ``slots`` into staging ``rows`` (or back, ``to_buf=False``)."""
        segs = []
        rows_a = np.asarray(rows, dtype=np.int64)
        for t, pos, trows in self._mem(level, np.asarray(slots, dtype=np.int64)):
            brows = rows_a[pos]
            segs.append(Segment(buf, brows, t, trows) if to_buf else Segment(t, trows, buf, brows))
        return segs

    def _count(self, b: _Batch, n: int, state: _RunState) -> None:
        if b.src is not None and b.src != b.dst:
            name = f"{b.src.label}_to_{b.dst.label}"
            self.stats[f"pages_{name}"] += n
            self.stats[f"bytes_{name}"] += n * self.page_bytes
            state.result.pages_moved += n
            state.result.bytes_moved += n * self.page_bytes
        elif b.src == b.dst:
            self.stats[f"relocations_{b.dst.label}"] += n

    async def _run_batch(self, b: _Batch, state: _RunState, after: Optional[torch.cuda.Event], priority: int) -> None:
        admitted = 0
        try:
            waits = b.waits()
            if waits:
                await asyncio.wait(waits)
            if K in (b.src, b.dst) and not state.stop:
                admitted = len(b.moves) * self.page_bytes
                await self.io_sched.acquire(admitted, (priority, int(b.dst == K)))
            ready: list[Part] = []
            for m in b.moves:
                ok, stuck = _ready(m)  # pages aborted with the move they depended on are skipped
                if stuck:
                    self.placement.abort_many(m, stuck)  # the slot they needed was never vacated
                if ok is None or ok:
                    ready.append((m, ok))
            if state.stop:
                for m, idx in ready:
                    self.placement.abort_many(m, idx)
                return
            bad: set[int] = set()
            pids, src_slots, dst_slots = _flat(ready)
            try:
                if pids.size and b.src is not None:
                    bad = await self._measured(b.src, b.dst, pids, src_slots, dst_slots, after)
            except Exception as exc:
                for m, idx in ready:
                    self.placement.abort_many(m, idx)
                state.stop = True
                if state.result.error is None:
                    state.result.error = self._wrap(exc, b)
                return
            if bad:
                for k, idx in _locate(ready, bad).items():
                    m = ready[k][0]
                    for i in idx:
                        self._corrupt(m, i, state)
                ready = [(m, [i for i in (range(len(m.pids)) if idx is None else idx) if m.pending_at(i)])
                         for m, idx in ready]
            self.placement.complete_many(ready)
            self._count(b, len(pids) - len(bad), state)
        finally:
            if admitted:
                self.io_sched.release(admitted)
            self._batch_done(b)

    async def _measured(
        self, src: CacheLevel, dst: CacheLevel, pid_a: np.ndarray, src_a: np.ndarray, dst_a: np.ndarray,
        after: Optional[torch.cuda.Event],
    ) -> set[int]:
        """:meth:`_transfer`, timed for the path's bandwidth estimate (the one place batches are measured; swap
        batches, which wait for promotions mid-way, and relocations within a level are not). A transfer that
        raises records nothing."""
        if src == dst:
            return await self._transfer(src, dst, pid_a, src_a, dst_a, after)
        ticket: Ticket = self.bandwidth.begin(src, dst, src_a)  # a disk read: cached or cold, by a probe
        ok = False
        try:
            bad = await self._transfer(src, dst, pid_a, src_a, dst_a, after)
            ok = True
            return bad
        finally:
            self.bandwidth.end(ticket, int(pid_a.size) * self.page_bytes, ok)

    def _corrupt(self, m: Move, i: int, state: _RunState) -> None:
        """A page read back from disk failed its checksum: never hand its bytes on.

        The move is rolled back (the page stays on disk) and the page leaves the prefix index, so no new
        cache reuses it. A page no cache holds is dropped (a miss); for a page a cache holds the operation
        fails with CorruptPageError.
        """
        page, src_slot = m.pages[i], m.src_slots[i]
        self.stats["corrupt_pages"] += 1
        self.placement.abort(m, i)
        owned = page.owners > 0
        self.placement.forget_corrupt(page)
        log.error("page %d failed its checksum reading disk slot %d (%s)", page.pid, src_slot,
                  "owned by a cache" if owned else "dropped")
        if owned and state.result.error is None:
            state.result.error = CorruptPageError(
                f"a page of this cache read back from disk slot {src_slot} failed its checksum; its data is "
                "lost (nothing wrong was handed out). Close the cache and create it again: the page left the "
                "prefix index, so the new cache recomputes it"
            )
            state.stop = True

    def _wrap(self, exc: BaseException, b: _Batch) -> BaseException:
        src = cast(CacheLevel, b.src)  # only batches that move bytes fail (placing new pages copies nothing)
        what = f"moving {b.rows} pages {src.label} -> {b.dst.label}"
        if isinstance(exc, OSError):
            self.stats["io_errors"] += 1
            err = StorageIOError(f"disk I/O failed {what}: {exc}; pages stayed where they were", exc.errno)
            err.__cause__ = exc
            return err
        log.exception("transfer failed %s", what, exc_info=exc)
        return exc

    # ------------------------------------------------------------------ data paths
    def _mem(self, level: CacheLevel, slots: np.ndarray) -> list[tuple[torch.Tensor, np.ndarray, np.ndarray]]:
        """Rows of ``slots`` (int64 array) on a memory level: [(2-D tensor, positions in ``slots``, rows), ...]."""
        if level == D or len(self._host.chunks) == 1:  # one tensor: a slot is its row
            rows = self.device.rows if level == D else self._host.chunks[0]
            return [(rows, np.arange(slots.size), slots)]
        host = self._host
        return [(host.chunks[c], pos, rows) for c, (pos, rows) in host.group(slots).items()]

    def _segments(
        self, dst_l: CacheLevel, dst_slots: "Sequence[int] | np.ndarray", src_l: CacheLevel,
        src_slots: "Sequence[int] | np.ndarray",
    ) -> list[Segment]:
        """The copy request moving rows ``src_slots`` of ``src_l`` to ``dst_slots`` of ``dst_l``: one segment
        per (destination tensor, source tensor) pair, rows as arrays (no Python per page)."""
        dst_a = np.asarray(dst_slots, dtype=np.int64)
        src_a = np.asarray(src_slots, dtype=np.int64)
        segs = []
        for dt, dpos, drows in self._mem(dst_l, dst_a):
            for st, spos, srows in self._mem(src_l, src_a[dpos]):
                segs.append(Segment(dt, drows[spos], st, srows))
        return segs

    def _extents(
        self, disk_slots: Sequence[int], mem: Sequence[tuple[torch.Tensor, np.ndarray, np.ndarray]],
        pids: Optional[Sequence[int]] = None,
    ) -> tuple[list[Extent], list[int]]:
        """Disk extents for page i at ``disk_slots[i]`` <-> its memory row, where ``mem`` is
        ``[(2-D tensor, positions in disk_slots, rows), ...]`` (as :meth:`_mem` gives); and the page
        indices in page order of the extents. An extent is a run of contiguous slots; in it, pages that
        are consecutive rows of one tensor are one 2-D buffer (``rows[r0:r1]``).

        With ``pids`` (a read) every page carries the checksum recorded when page ``pids[i]`` was written
        to that slot; a slot holding another page's record (or none) can never verify."""
        disk = self._disk
        n = len(disk_slots)
        slots = np.asarray(disk_slots, dtype=np.int64)
        which = np.empty(n, dtype=np.int64)  # per page: index of its tensor in ``arrays``
        row = np.empty(n, dtype=np.int64)
        # host rows as numpy views of their tensor's array, made once per tensor (a torch row and its
        # .numpy() per page cost microseconds); CUDA rows (GDS reads) stay tensors
        arrays: list[Any] = []
        for k, (t, pos, rows) in enumerate(mem):
            which[pos] = k
            row[pos] = rows
            arrays.append(t if t.is_cuda else t.numpy())
        order = np.argsort(slots, kind="stable")
        slots, which, row = slots[order], which[order], row[order]
        new_ext = np.ones(n, dtype=bool)  # page starts an extent
        if disk.stride == self.page_bytes:
            new_ext[1:] = slots[1:] != slots[:-1] + 1
        new_buf = new_ext.copy()  # page starts a buffer
        new_buf[1:] |= (which[1:] != which[:-1]) | (row[1:] != row[:-1] + 1)
        starts = np.flatnonzero(new_buf)
        ends = np.append(starts[1:], n).tolist()
        order_l = order.tolist()
        expected: Optional[list[Optional[int]]] = None
        if pids is not None:
            sums = self.sums
            expected = []
            for slot, i in zip(slots.tolist(), order_l):
                record = sums.get(slot)
                expected.append(record[1] if record is not None and record[0] == pids[i] else _NO_SUM)
        out: list[Extent] = []
        slot_l, which_l, row_l = slots.tolist(), which.tolist(), row.tolist()
        # CUDA rows: GDS reads only (a backend with ``device_reads`` takes tensors; Extent names the host case)
        for a, b, first in zip(starts.tolist(), ends, new_ext[starts].tolist()):
            if first:
                out.append(Extent(disk.offset(slot_l[a])))
            arr, r0 = arrays[which_l[a]], row_l[a]
            if b - a == 1:
                out[-1].add(arr[r0], None if expected is None else expected[a])
            else:
                out[-1].add_pages(arr[r0 : r0 + b - a], None if expected is None else expected[a:b])
        return out, order_l

    def _record_sums(self, extents: list[Extent], order: list[int], disk_slots: Sequence[int], pids: list[int]) -> None:
        """After a write: remember (page id, checksum) per disk slot, to verify the page when it is read back."""
        sums = cast("list[int]", [x for ext in extents for x in ext.sums])  # a write fills in every checksum
        for i, csum in zip(order, sums):
            self.sums[disk_slots[i]] = (pids[i], csum)

    def bad_slot_indices(self, bad_offsets: Sequence[int], disk_slots: Sequence[int]) -> set[int]:
        """Indices into ``disk_slots`` of the slots read from the file offsets that failed verification."""
        if not bad_offsets:
            return set()
        stride = self._disk.stride
        bad_slots = {off // stride for off in bad_offsets}
        return {i for i, s in enumerate(disk_slots) if s in bad_slots}

    def _mem_extents(
        self, level: CacheLevel, mem_slots: Sequence[int], disk_slots: Sequence[int],
        pids: Optional[Sequence[int]] = None,
    ) -> tuple[list[Extent], list[int]]:
        """:meth:`_extents` for pages at ``mem_slots`` of a memory level."""
        return self._extents(disk_slots, self._mem(level, np.asarray(mem_slots, dtype=np.int64)), pids)

    @staticmethod
    def _staged(buf: torch.Tensor, rows: Sequence[int]) -> list[tuple[torch.Tensor, np.ndarray, np.ndarray]]:
        """Rows ``rows`` of a staging buffer in :meth:`_extents`' form."""
        return [(buf, np.arange(len(rows)), np.asarray(rows, dtype=np.int64))]

    async def read_staged(
        self, buf: torch.Tensor, level: CacheLevel, slots: list[int], pids: list[int], priority: int = BACKGROUND
    ) -> set[int]:
        """Copy the pages at ``slots`` of the device or disk level into rows ``0..`` of staging buffer ``buf``
        (for a reader outside a plan, such as the remote writer: the caller holds the pages and the buffer);
        returns the indices of disk pages that failed their checksum (never to be handed on)."""
        rows = list(range(len(slots)))
        if level == D:
            after = self.copier.after_current_stream()
            await self.copier.copy([Segment(buf, rows, self.device.rows, slots)], "down", after)
            return set()
        nbytes = len(slots) * self.page_bytes
        await self.io_sched.acquire(nbytes, (priority, 0))
        try:
            extents, _ = self._extents(slots, self._staged(buf, rows), pids)
            bad_offsets = await settle(self._io.read(extents))
        finally:
            self.io_sched.release(nbytes)
        return self.bad_slot_indices(bad_offsets, slots)

    async def _before_write(self, disk_slots: Sequence[int]) -> None:
        if self.before_disk_write is not None:
            await settle(self.before_disk_write(disk_slots))

    async def _transfer(
        self, src: CacheLevel, dst: CacheLevel, pid_a: np.ndarray, src_a: np.ndarray, dst_a: np.ndarray,
        after: Optional[torch.cuda.Event],
    ) -> set[int]:
        """Move the bytes of pages ``pid_a`` from slots ``src_a`` to ``dst_a`` (int64 arrays); returns the indices
        of the pages that failed their checksum."""
        if src != K and dst != K:
            lane = "up" if dst.value < src.value else "down"
            await self.copier.copy(self._segments(dst, dst_a, src, src_a), lane, after)
            return set()
        # disk paths keep a checksum per page (a dict per slot): plain ints from here on
        pids, src_slots, dst_slots = pid_a.tolist(), src_a.tolist(), dst_a.tolist()
        if not self._needs_staging(src, dst):
            if src == K:
                extents, _ = self._mem_extents(dst, dst_slots, src_slots, pids)
                return self.bad_slot_indices(await settle(self._io.read(extents)), src_slots)
            extents, order = self._mem_extents(src, src_slots, dst_slots)
            await self._before_write(dst_slots)
            await settle(self._io.write(extents))
            self._record_sums(extents, order, dst_slots, pids)
            return set()
        buf = await self.staging.acquire()
        try:
            rows = list(range(len(pids)))
            bad: set[int] = set()
            if src == K:
                extents, _ = self._extents(src_slots, self._staged(buf, rows), pids)
                bad = self.bad_slot_indices(await settle(self._io.read(extents)), src_slots)
            else:
                await self.copier.copy([Segment(buf, rows, self.device.rows, src_slots)], "down", after)
            if dst == K:
                good = [i for i in rows if i not in bad]
                good_slots = [dst_slots[i] for i in good]
                extents, order = self._extents(good_slots, self._staged(buf, good))
                await self._before_write(good_slots)
                await settle(self._io.write(extents))
                self._record_sums(extents, order, good_slots, [pids[i] for i in good])
            else:
                await self.copier.copy([Segment(self.device.rows, dst_slots, buf, rows)], "up", after)
            return bad
        finally:
            self.staging.give_back(buf)
