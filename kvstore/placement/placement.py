"""The levels together: page lifecycle, room-making (demote, cascade, drop) and move plans.

Planning is two-phase so a failed plan changes nothing: a :class:`_Draft` first simulates which free
slots and which victims would be used (read-only), and only a feasible draft is applied. Applying
reserves destination slots and marks moving pages; :meth:`Placement.complete` and
:meth:`Placement.abort` settle each move once its transfer ends.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union, cast

import numpy as np

from ..errors import CapacityError
from ..types import CacheLevel, TierUsage
from .eviction import EvictionQueue
from .policies import make_queues
from .page import Move, MoveState, Page, Plan
from .pagelist import PageList, as_page_list
from .prefix import PrefixIndex
from .slots import SlotAllocator
from .table import LEVEL_OF, PageTable, every, pids_of, some

_FREE, _DEMOTE, _DROP, _SWAP = 0, 1, 2, 3
_EVICTIONS = {lvl: f"evictions_{lvl.label}" for lvl in CacheLevel}


@dataclass(slots=True)
class _Grant:
    """One slot a draft would obtain: a free slot, the slot of a victim that is demoted or dropped, or
    (``_SWAP``) the slot of a page that this plan promotes out of the level (``victim`` is that page)."""

    kind: int
    victim: Optional[Page] = None
    via: Optional["_Grant"] = None  # for _DEMOTE: the grant at a colder level the victim moves into
    via_index: int = -1  # level index of ``via``


@dataclass(slots=True)
class RoomCheck:
    """What a room check found. ``chunked``: the room surely exists (free slots and evictable pages demoted
    into free slots), so the plan may be made in chunks with yields between them. Otherwise ``drafted``
    holds the draft the check made, for the plan made right after it (no await between) to apply instead of
    drafting again; it is used once. ``cascade``: the room is a simple cascade that drops pages of the last
    level (:meth:`Placement._cascade`), or host pages swapped with device victims (:meth:`Placement._swap_counts`),
    planned without a draft but in one step (a drop's page could be reused between chunks; a swap is planned
    in one step like its draft)."""

    drafted: Optional[list[Any]] = None  # (page, grant) pairs of a promotion, or the grants of new pages
    cascade: bool = False

    @property
    def chunked(self) -> bool:
        return self.drafted is None and not self.cascade

    def take(self) -> Optional[list[Any]]:
        drafted, self.drafted = self.drafted, None
        return drafted


def _by_level(table: PageTable, pids: np.ndarray) -> list[tuple[Optional[CacheLevel], Optional[np.ndarray]]]:
    """(level, indices into ``pids``) per level of ``pids`` in order of first appearance (None: not placed);
    indices None: all of them (one move per source level)."""
    if pids.size == 0:
        return []
    lv = table.level[pids]
    if every(lv == lv[0]):
        return [(LEVEL_OF[int(lv[0])], None)]
    codes, first = np.unique(lv, return_index=True)
    return [(LEVEL_OF[int(codes[k])], np.flatnonzero(lv == codes[k])) for k in np.argsort(first).tolist()]


class _Draft:
    """Read-only simulation of room-making across the levels."""

    def __init__(self, pl: "Placement") -> None:
        self.pl = pl
        self.free_left = {lvl: pl.alloc[lvl].free_count for lvl in pl.levels}
        self.iters: dict[CacheLevel, Iterator[Page]] = {}
        self.blocked: set[CacheLevel] = set()

    def acquire(self, i: int, n: int, use_free: bool = True, swap_with: Optional[Page] = None) -> list[_Grant]:
        """Up to ``n`` slots at level index ``i``. ``swap_with``: a host page being promoted into the slot
        obtained (n == 1); a device victim may then take that page's host slot (a pairwise swap)."""
        lvl = self.pl.levels[i]
        grants: list[_Grant] = []
        if use_free and n > 0:
            k = min(n, self.free_left[lvl])
            self.free_left[lvl] -= k
            grants.extend(_Grant(_FREE) for _ in range(k))
        while len(grants) < n:
            victim = self._next_victim(lvl)
            if victim is None:
                break
            nxt = self.pl.levels[i + 1] if i + 1 < len(self.pl.levels) else None
            if swap_with is not None and nxt is not None and nxt == swap_with.level and self.free_left[nxt] == 0:
                # the next level is full: the victim takes the slot the promoted page leaves
                grants.append(_Grant(_DEMOTE, victim, _Grant(_SWAP, swap_with), i + 1))
                continue
            grant = self._evict(i, victim)
            if grant is not None:
                grants.append(grant)
        return grants

    def _next_victim(self, lvl: CacheLevel) -> Optional[Page]:
        it = self.iters.get(lvl)
        if it is None:
            it = self.iters[lvl] = self.pl.queues[lvl].candidates()
        return next(it, None)

    def _evict(self, i: int, victim: Page) -> Optional[_Grant]:
        """Demote ``victim`` to the next level with room (skipping a full one), else drop it if droppable."""
        levels = self.pl.levels
        for j in range(i + 1, len(levels)):
            if levels[j] in self.blocked:
                continue
            sub = self.acquire(j, 1)
            if sub:
                return _Grant(_DEMOTE, victim, sub[0], j)
            self.blocked.add(levels[j])
        if victim.droppable:
            return _Grant(_DROP, victim)
        return None


class Placement:
    """Bookkeeping of every page on every configured level."""

    def __init__(self, levels: Sequence[CacheLevel], slots: Sequence[int], policy: str = "lru") -> None:
        self.levels: tuple[CacheLevel, ...] = tuple(levels)
        self._index_of = {lvl: i for i, lvl in enumerate(self.levels)}
        self._rank = np.full(len(LEVEL_OF), -1, dtype=np.int64)  # level code -> level index (-1: none)
        for i, lvl in enumerate(self.levels):
            self._rank[int(lvl)] = i
        self.alloc = {lvl: SlotAllocator(n) for lvl, n in zip(self.levels, slots, strict=True)}
        self.table = PageTable()
        self.index = PrefixIndex(ghost_capacity=sum(slots))
        self.queues = make_queues(policy, self.table, self.index, self.levels, sum(slots))
        self.counters: Counter[str] = Counter()
        #: most pages one :class:`Move` holds (the transfer layer's batch rows: a move never spans batches)
        self.max_group = 1 << 30
        #: Called as ``disk_listener("put" | "del", page, slot)`` when a committed page arrives on or leaves
        #: the disk level (a persistent tier journals it).
        self.disk_listener: Optional[Callable[[str, Page, int], None]] = None

    # ----------------------------------------------------------------- page lifecycle
    def level_index(self, level: CacheLevel) -> int:
        return self._index_of[level]

    @property
    def pages(self) -> dict[int, Page]:
        """Every live page by pid (built on each call: for checks, tests and recovery, not hot paths)."""
        t = self.table
        live = t.live_pids()
        return dict(zip(live.tolist(), t.pages(live)))

    def sync(self, page: Page) -> None:
        """Queue ``page`` (most recently used) iff it is evictable; otherwise take it out of its queue."""
        level = page.level
        if level is None:  # not placed yet, or freed
            return
        q = self.queues[level]
        if page.evictable:
            if page not in q:
                q.push(page)
        else:
            q.discard(page)

    def touch(self, page: Page) -> None:
        if page.level is not None and not page.freed:
            self.queues[page.level].touch(page)

    def _per_level(self, pids: np.ndarray) -> Iterator[tuple[CacheLevel, np.ndarray]]:
        """(level, pids) for each level holding some of ``pids`` (placed, live pages), each in order."""
        for level, idx in _by_level(self.table, pids):
            if level is not None:
                yield level, (pids if idx is None else pids[idx])

    def _per_queue(self, pids: np.ndarray) -> Iterator[tuple[Any, np.ndarray]]:
        """(queue, pids) for each level holding some of ``pids``, as :meth:`_per_level`."""
        for level, part in self._per_level(pids):
            yield self.queues[level], part

    def live_pages(self, pages: Union[PageList, Iterable[Page]]) -> PageList:
        """The pages of ``pages`` not freed, in order."""
        if not isinstance(pages, PageList):
            pages = [p for p in pages if p._live]
        listed = as_page_list(self.table, pages)
        alive = listed.alive()
        return listed if every(alive) else listed.select(alive)

    def hold_all(self, pages: Sequence[Page]) -> None:
        """Keep every page of ``pages`` (distinct, live) out of eviction while an operation (resume, prefetch)
        works on it: one bulk queue removal per level."""
        pids = pids_of(pages, len(pages))
        self.table.holds[pids] += 1
        for queue, held in self._per_queue(pids):
            queue.discard_pids(held)

    def release_all(self, pages: Sequence[Page]) -> None:
        """Undo one ``hold_all``: each page that became evictable is queued (or re-queued) most recently used,
        in order — one bulk queue insertion per level; a page no cache owns any more is freed."""
        pids = pids_of(pages, len(pages))
        self.table.holds[pids] -= 1
        self._free_orphans(pids)
        self._queue_evictable(pids)

    def holds_to_locks(self, pages: Sequence[Page]) -> None:
        """Turn one hold of every page into a lock (an ACTIVE cache's pages); every page must be settled on
        the device level (RuntimeError, nothing changed, otherwise). Neither state is evictable, so no
        queue changes."""
        t = self.table
        pids = pids_of(pages, len(pages))
        bad = (t.level[pids] != int(CacheLevel.DEVICE)) | (t.move[pids] >= 0) | ~t.live[pids]
        if some(bad):
            pid = int(pids[np.argmax(bad)])
            raise RuntimeError(f"locking page {pid} that is not settled on the device level")
        t.holds[pids] -= 1
        t.locks[pids] += 1

    def unlock_all(self, pages: Sequence[Page]) -> None:
        """Drop one lock of every page (distinct; a suspend, a shrink, a close): unlocked pages become
        evictable, queued in order."""
        pids = pids_of(pages, len(pages))
        self.table.locks[pids] -= 1
        self._queue_evictable(pids)

    def _queue_evictable(self, pids: np.ndarray) -> None:
        """Queue the pages of ``pids`` that are evictable now as most recently used, in order: one bulk
        insertion per level (a page queued already moves to the end)."""
        ev = self.table.evictable(pids)
        for queue, free in self._per_queue(pids if every(ev) else pids[ev]):
            queue.push_pids(free)

    def add_owner(self, page: Page, priority: int) -> None:
        self.add_owners([page], priority)

    def remove_owner(self, page: Page) -> None:
        """One cache lets go of ``page``; a page nobody holds and nobody can reuse is freed."""
        page.owners -= 1
        self._free_orphans(np.array([page.pid], dtype=np.int64))

    def _orphaned(self, pids: np.ndarray) -> np.ndarray:
        """Mask of ``pids`` no cache owns, no operation holds, nobody can reuse and that are not moving (to be
        freed)."""
        t = self.table
        mask: np.ndarray = (
            (t.owners[pids] == 0) & (t.holds[pids] == 0) & ~t.indexed[pids] & (t.move[pids] < 0) & t.live[pids]
        )
        return mask

    def _orphans(self, pids: np.ndarray) -> np.ndarray:
        """The pids of ``pids`` that :meth:`_orphaned` marks."""
        out: np.ndarray = pids[self._orphaned(pids)]
        return out

    def _free_orphans(self, pids: np.ndarray) -> None:
        """Free the pages of ``pids`` that :meth:`_orphaned` marks, their slots released."""
        self._free_pids(self._orphans(pids), release_slots=True)

    def remove_owners(self, pages: Sequence[Page]) -> None:
        """:meth:`remove_owner` for every page of ``pages`` (distinct; a cache closing or shrinking); the
        slots of the pages freed are released with one merge per level."""
        pids = pids_of(pages, len(pages))
        self.table.owners[pids] -= 1
        self._free_orphans(pids)

    def _disk_event(self, op: str, page: Page, slot: int) -> None:
        if self.disk_listener is not None and page.indexed:
            self.disk_listener(op, page, slot)

    def restore_page(self, level: CacheLevel, slot: int, key: bytes, parent_key: Optional[bytes]) -> Page:
        """A committed page found at ``slot`` of ``level`` by recovery: reusable, held by no cache."""
        self.alloc[level].take(slot)
        page = self._new_page(0)
        page.level, page.slot, page.key = level, slot, key
        if not self.index.add(page, parent_key):
            self._free(page, release_slot=True)
            raise RuntimeError(f"recovered key of slot {slot} is indexed twice")
        self.sync(page)
        return page

    def _free(self, page: Page, release_slot: bool) -> None:
        self._free_pids(np.array([page.pid], dtype=np.int64), release_slot)

    def _free_pids(self, pids: np.ndarray, release_slots: bool) -> None:
        """Forget ``pids`` (distinct, live): out of the journal and the prefix index if committed, out of
        their queues, their slots released (``release_slots``; else a grantee takes them over) — one queue
        removal and one slot release per level; their rows are free and their handles dead."""
        if pids.size == 0:
            return
        t = self.table
        committed = pids[t.indexed[pids]]
        for page in t.pages(committed):  # an uncommitted page has neither a journal record nor an index entry
            if page.level == CacheLevel.DISK:
                self._disk_event("del", page, page.slot)
            self.index.remove(page)
        for level, gone in self._per_level(pids):
            self.queues[level].discard_pids(gone)
            if release_slots:
                self.alloc[level].release_many(t.slot[gone])
        t.free_pages(pids)

    def forget_corrupt(self, page: Page) -> None:
        """``page``'s bytes are lost: it leaves the prefix index, and is dropped if no cache holds it."""
        if page.level == CacheLevel.DISK:
            self._disk_event("del", page, page.slot)
        self.index.remove(page)
        if page.owners == 0 and page.move is None and not page.freed:
            self.counters["drops"] += 1  # freed now, or when the operation holding it lets go
        self._free_orphans(np.array([page.pid], dtype=np.int64))

    def set_key(self, page: Page, key: bytes, parent_key: Optional[bytes] = None) -> bool:
        """Mark ``page`` committed under ``key`` (``parent_key``: the previous page's key, None for a first
        page); True if it became the reusable page for that key."""
        page.key = key
        added = self.index.add(page, parent_key)
        if added and page.level == CacheLevel.DISK and page.move is None:
            self._disk_event("put", page, page.slot)
        node = self.index.node(page) if added else None
        if node is not None and node.hits and page.level is not None:
            self.queues[page.level].hit(page)  # a recently dropped key committed again: a reuse
        return added

    def add_owners(self, pages: Sequence[Page], priority: int) -> None:
        """:meth:`add_owner` of every page of ``pages`` (distinct): the pages of lower priority are raised to
        ``priority`` and made most recently used, in order."""
        t = self.table
        pids = pids_of(pages, len(pages))
        t.owners[pids] += 1
        low = pids[t.priority[pids] < priority]
        if low.size:
            t.priority[low] = priority
            for queue, queued in self._per_queue(low):
                queue.touch_pids(queued)

    def set_owners(self, pages: Sequence[Page], n: int) -> None:
        """Every page of ``pages`` has ``n`` owners (new pages an operation owns until it ends)."""
        self.table.owners[pids_of(pages, len(pages))] = n

    def record_hits(self, pages: Sequence[Page]) -> None:
        """:meth:`record_hit` of every page of ``pages`` (distinct), in order."""
        counted = [page for page in pages if self.index.record_hit(page) is not None]  # indexed ones
        for queue, hit in self._per_queue(pids_of(counted, len(counted))):
            queue.hit_pids(hit)

    def record_hit(self, page: Page) -> None:
        """``page`` was reused as a committed prefix page: count it and tell its level's policy."""
        self.record_hits([page])

    # ----------------------------------------------------------------- planning
    def _colder_pids(self, pids: np.ndarray, ti: int) -> np.ndarray:
        """The pids of ``pids`` a promotion to level index ``ti`` moves: placed, settled and colder."""
        t = self.table
        keep = (self._rank[t.level[pids]] > ti) & (t.move[pids] < 0) & t.live[pids]
        return pids if every(keep) else pids[keep]

    def _colder(self, pages: Sequence[Page], ti: int) -> PageList:
        """The pages of ``pages`` a promotion to level index ``ti`` moves: placed, settled and colder."""
        return PageList(self.table, self._colder_pids(pids_of(pages, len(pages)), ti))

    def _draft_promotion(self, colder: Sequence[Page], ti: int, require_all: bool) -> list[tuple[Page, _Grant]]:
        target = self.levels[ti]
        draft = _Draft(self)
        planned: list[tuple[Page, _Grant]] = []
        can_swap = self._host_below(ti)
        for page in colder:
            got = draft.acquire(ti, 1, swap_with=page if can_swap and page.level == CacheLevel.HOST else None)
            if got:
                planned.append((page, got[0]))
            elif require_all:
                break
        if require_all and len(planned) < len(colder):
            raise CapacityError(
                f"{len(colder)} pages must move to the {target.label} level but only {len(planned)} slots can be "
                f"freed there ({self.alloc[target].total} slots in all); raise the {target.label} quota, "
                "suspend or close other caches, or use a smaller cache"
            )
        return planned

    def surely_obtainable(self, i: int, n: int) -> bool:
        """A sufficient condition, in O(levels), for a draft to obtain ``n`` slots at level index ``i``:
        free slots there, and for the rest as many evictable pages, which in turn surely find slots one
        level colder. False means "maybe not": run the full draft."""
        for lvl in self.levels[i:]:
            n -= self.alloc[lvl].free_count
            if n <= 0:
                return True
            if n > len(self.queues[lvl]):
                return False
        return False

    def check_promotion(self, pages: Sequence[Page], target: CacheLevel) -> RoomCheck:
        """Raise CapacityError if ``plan_promotion(pages, target, require_all=True)`` would; changes nothing.

        Chunked when the room comes from free slots and evictable pages demoted into free slots
        (:meth:`surely_obtainable`): nothing but a hold or a plan can take it, so the promotion may be planned
        in chunks. Otherwise (it also counts on drops) plan it in one step, from the returned draft."""
        ti = self.level_index(target)
        colder = self._colder_pids(pids_of(pages, len(pages)), ti)
        if self.surely_obtainable(ti, len(colder)):
            return RoomCheck()
        if self._promotion_cascade(ti, colder) is not None or self._swap_counts(ti, colder) is not None:
            return RoomCheck(cascade=True)
        return RoomCheck(self._draft_promotion(self.table.pages(colder), ti, True))

    def plan_promotion(
        self, pages: Sequence[Page], target: CacheLevel, *, require_all: bool, check: Optional[RoomCheck] = None
    ) -> Plan:
        """Plan moving every page of ``pages`` that is colder than ``target`` up to ``target``.

        The pages must be held by the caller (so none of them is a victim); pages already moving are
        skipped. Room is made by evicting other pages. With ``require_all`` a shortfall raises
        CapacityError and nothing changes; otherwise the pages that fit (token order first) are planned.
        ``check``: the :meth:`check_promotion` of the same pages made just before (nothing changed since),
        whose draft is applied instead of drafting again.
        """
        ti = self.level_index(target)
        plan = Plan()
        colder = self._colder_pids(pids_of(pages, len(pages)), ti)
        drafted = check.take() if check is not None else None
        if drafted is None and self._room_is_simple(ti, len(colder)):
            self._simple_room(ti, colder, plan)
            return plan
        counts = self._promotion_cascade(ti, colder) if drafted is None else None
        if counts is not None:
            self._cascade_room(ti, colder, counts, plan, LEVEL_OF[self.table.level.item(colder[0])])
            self._sync_moving(colder)
            return plan
        swaps = self._swap_counts(ti, colder) if drafted is None else None
        if swaps is not None:
            self._swap_room(ti, colder, swaps, plan)
            return plan
        if drafted is None:  # CapacityError here changes nothing
            drafted = self._draft_promotion(self.table.pages(colder), ti, require_all)
        for page, grant in drafted:
            slot, after = self._realize(grant, ti, plan)
            plan.moves.append(self._move1(page, page.level, page.slot, target, slot, after))
            self.sync(page)
        for victim_move, promoted in plan.swaps:
            if promoted.move is None:  # its promotion did not fit after all: the slot stays its own
                raise RuntimeError("swap planned against a page that is not promoted")
            victim_move.after = promoted.move
            promoted.move.successor = victim_move
            victim_move.swap = True
            promoted.move.handoff = True
        plan.swaps.clear()
        return plan

    def check_new_pages(self, n: int, level: CacheLevel) -> RoomCheck:
        """Raise CapacityError if ``plan_new_pages(n, level, ...)`` would; changes nothing. The result is
        as :meth:`check_promotion`'s."""
        li = self.level_index(level)
        if self.surely_obtainable(li, n):
            return RoomCheck()
        if self._cascade(li, n) is not None:
            return RoomCheck(cascade=True)
        return RoomCheck(self._draft_new_pages(n, level))

    def _draft_new_pages(self, n: int, level: CacheLevel) -> list[_Grant]:
        grants = _Draft(self).acquire(self.level_index(level), n)
        if len(grants) < n:
            raise CapacityError(
                f"{n} new pages do not fit on the {level.label} level (only {len(grants)} slots can be freed of "
                f"{self.alloc[level].total}); raise its quota or suspend/close other caches"
            )
        return grants

    def plan_new_pages(
        self, n: int, level: CacheLevel, priority: int, check: Optional[RoomCheck] = None
    ) -> tuple[PageList, Plan]:
        """Plan ``n`` new pages on ``level`` (room made by eviction); CapacityError and no change if impossible.
        ``check``: as :meth:`plan_promotion`'s (the :meth:`check_new_pages` of the same ``n`` just before)."""
        li = self.level_index(level)
        plan = Plan()
        drafted = check.take() if check is not None else None
        if drafted is None and self._room_is_simple(li, n):
            pids = self.table.new_pages(n, priority)
            self._simple_room(li, pids, plan)
            return PageList(self.table, pids), plan
        counts = self._cascade(li, n) if drafted is None else None
        if counts is not None:
            pids = self.table.new_pages(n, priority)
            self._cascade_room(li, pids, counts, plan)
            return PageList(self.table, pids), plan
        if drafted is None:
            drafted = self._draft_new_pages(n, level)  # CapacityError here changes nothing
        pages = PageList(self.table)
        for grant in drafted:
            slot, after = self._realize(grant, li, plan)
            page = self._new_page(priority)
            plan.moves.append(self._move1(page, None, -1, level, slot, after))
            pages.extend((page,))
        return pages, plan

    def _new_page(self, priority: int) -> Page:
        """One new live page, not placed yet, with its handle."""
        return self.table.page(int(self.table.new_pages(1, priority)[0]))

    def background_room(self, free_target: float) -> list[tuple[CacheLevel, int]]:
        """(level, pages) a background demotion would move to keep ``free_target`` of every level but the
        last free: bounded by the level's evictable pages and by the free slots one level colder."""
        out = []
        for i, level in enumerate(self.levels[:-1]):
            alloc, colder = self.alloc[level], self.alloc[self.levels[i + 1]]
            want = math.ceil(free_target * alloc.total) - alloc.free_count
            n = min(want, len(self.queues[level]), colder.free_count)
            if n > 0:
                out.append((level, n))
        return out

    def plan_demotion(self, level: CacheLevel, n: int) -> Plan:
        """Plan demoting up to ``n`` of ``level``'s first eviction candidates into free slots one level colder
        (never a drop or a cascade); their slots are free once the moves complete."""
        i = self.level_index(level)
        if i + 1 >= len(self.levels):
            raise ValueError(f"the {level.label} level is the last one: there is no colder level to demote to")
        colder = self.levels[i + 1]
        n = min(n, self.alloc[colder].free_count)
        plan = Plan()
        victims = self.queues[level].first(n)
        if victims.size:
            self.queues[level].discard_pids(victims)
            dst = self._allocate(colder, victims.size)
            self._emit(plan, victims, level, self._slots(victims), colder, dst)
        return plan

    def plan_shrink(self, level: CacheLevel, new_slots: int) -> Plan:
        """Plan emptying slots >= ``new_slots`` of ``level``: evict LRU victims until the pages fit, then
        relocate pages still above the limit into lower slots. Every page of the level must be evictable.
        CapacityError and no change if the pages cannot all leave or fit."""
        li = self.level_index(level)
        alloc = self.alloc[level]
        t = self.table
        here = np.flatnonzero(t.live & (t.level == int(level)))
        if not every(t.evictable(here)):
            raise RuntimeError("plan_shrink needs every page of the level to be evictable")
        excess = alloc.used_count - new_slots
        old_limit = alloc.limit
        alloc.limit = new_slots
        try:
            draft = _Draft(self)
            victims = draft.acquire(li, excess, use_free=False) if excess > 0 else []
            if len(victims) < excess:
                raise CapacityError(
                    f"shrinking the {level.label} level to {new_slots} pages needs {excess} pages to move colder, "
                    f"but only {len(victims)} can; free space on colder levels or close caches first"
                )
            plan = Plan()
            victim_pages = {g.victim.pid for g in victims if g.victim is not None}
            vacated: list[tuple[int, Optional[Move]]] = []
            for grant in victims:
                vacated.append(self._realize(grant, li, plan))
            high = [
                p for p in list(self.queues[level].candidates()) if p.slot >= new_slots and p.pid not in victim_pages
            ]
            reusable = [v for v in vacated if v[0] < new_slots]
            unused = [v for v in vacated if v[0] >= new_slots]
            for page in high:
                if reusable:
                    slot, after = reusable.pop()
                    if after is not None:
                        after.handoff = True
                else:
                    slot, after = alloc.allocate(), None
                self.queues[level].remove(page)
                plan.moves.append(self._move1(page, level, page.slot, level, slot, after))
            for slot, after in reusable + unused:
                if after is not None:
                    after.handoff = False  # nobody takes it: free it when the victim leaves
                else:
                    alloc.release(slot)  # a dropped victim's slot
            return plan
        except BaseException:
            alloc.limit = old_limit
            raise

    def _room_is_simple(self, i: int, n: int) -> bool:
        """Whether ``n`` slots at level index ``i`` come from its free slots and, for the rest, from its
        first eviction candidates demoted into free slots one level colder (no cascade, swap or drop):
        then :meth:`_simple_room` gets them without a draft."""
        level = self.levels[i]
        need = n - self.alloc[level].free_count
        if need <= 0:
            return True
        return i + 1 < len(self.levels) and need <= len(self.queues[level]) and (
            need <= self.alloc[self.levels[i + 1]].free_count
        )

    def _allocate(self, level: CacheLevel, n: int) -> np.ndarray:
        """The ``n`` lowest free slots of ``level`` (what ``n`` calls of ``allocate()`` would give)."""
        return self.alloc[level].allocate_array(n)

    def _move1(self, page: Page, src: Optional[CacheLevel], src_slot: int, dst: CacheLevel, dst_slot: int,
               after: Optional[Move], handoff: bool = False) -> Move:
        """A move of one page (drafts, shrinks)."""
        return Move(self.table, np.array([page.pid], dtype=np.int64), src, np.array([src_slot], dtype=np.int64), dst,
                    np.array([dst_slot], dtype=np.int64), after, handoff)

    def _slots(self, pids: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.table.slot[pids]
        return out

    def _emit(
        self, plan: Plan, pids: np.ndarray, src: Optional[CacheLevel], src_slots: np.ndarray, dst: CacheLevel,
        dst_slots: np.ndarray, after: Optional[list[Move]] = None, handoff: bool = False,
    ) -> list[Move]:
        """Add moves of ``pids`` to ``plan``, at most :attr:`max_group` pages each; ``after``: the moves that
        vacate the destination slots, cut the same way (one per move made). Returns the moves made."""
        step = self.max_group
        made = []
        for k, lo in enumerate(range(0, len(pids), step)):
            hi = lo + step
            mv = Move(self.table, pids[lo:hi], src, src_slots[lo:hi], dst, dst_slots[lo:hi],
                      after[k] if after is not None else None, handoff)
            plan.moves.append(mv)
            made.append(mv)
        return made

    def _src_slots(self, src: Optional[CacheLevel], pids: np.ndarray) -> np.ndarray:
        return np.full(len(pids), -1, dtype=np.int64) if src is None else self._slots(pids)

    def _simple_room(self, i: int, pids: np.ndarray, plan: Plan) -> None:
        """Place ``pids`` (new pages, or placed pages promoted) at level index ``i`` in the room of
        :meth:`_room_is_simple`: free slots first, then the slots of the first eviction candidates, demoted
        into free slots one level colder — slot for slot what realizing a draft would give, as a few moves
        per source level instead of a move per page."""
        level, alloc = self.levels[i], self.alloc[self.levels[i]]
        n = len(pids)
        free = min(n, alloc.free_count)
        queue = self.queues[level]
        victims = queue.first(n - free)
        slots = self._allocate(level, free)
        head = pids[:free]
        for by_src, idx in _by_level(self.table, head):
            moving = head if idx is None else head[idx]
            dst = slots if idx is None else slots[idx]
            self._emit(plan, moving, by_src, self._src_slots(by_src, moving), level, dst)
        if not victims.size:
            self._sync_moving(pids)
            return
        colder = self.levels[i + 1]
        queue.discard_pids(victims)
        cslots = self._allocate(colder, victims.size)
        promoted = pids[free:]
        for by_src, idx in _by_level(self.table, promoted):
            vs = victims if idx is None else victims[idx]
            vslots = self._slots(vs)
            made = self._emit(plan, vs, level, vslots, colder, cslots if idx is None else cslots[idx], handoff=True)
            moving = promoted if idx is None else promoted[idx]
            self._emit(plan, moving, by_src, self._src_slots(by_src, moving), level, vslots, after=made)
        self._sync_moving(pids)

    def _cascade(self, i: int, n: int) -> Optional[list[tuple[int, int]]]:
        """(free slots taken, victims moved) per level from index ``i`` on, when ``n`` slots at level ``i`` come
        from each level's free slots and then its first eviction candidates, moved one level colder, and the
        last level's victims are all droppable: exactly what a draft would obtain (no level is skipped, no
        victim is passed over), found in O(levels + drops). None: not that simple, draft it."""
        out = []
        m = n
        for lvl in self.levels[i:]:
            free = min(m, self.alloc[lvl].free_count)
            out.append((free, m - free))
            m -= free
            if m == 0:
                return out
            if m > len(self.queues[lvl]):
                return None
        vs = self.queues[self.levels[-1]].first(m)
        t = self.table
        if every((t.owners[vs] == 0) & t.indexed[vs]):  # Page.droppable
            return out
        return None

    def _promotion_cascade(self, ti: int, colder: np.ndarray) -> Optional[list[tuple[int, int]]]:
        """:meth:`_cascade` for promoting ``colder`` to level index ``ti``, when the draft would treat every page
        like a new one: all of them on one level, and not on the host level right below the target (there
        the draft may swap a victim into a promoted page's slot)."""
        if not colder.size:
            return None
        lv = self.table.level[colder]
        src = int(lv[0])
        if some(lv != src) or (src == int(CacheLevel.HOST) and self._host_below(ti)):
            return None
        return self._cascade(ti, len(colder))

    def _host_below(self, ti: int) -> bool:
        """The host level is right below level index ``ti`` (where a draft swaps host pages promoted to ``ti``)."""
        return ti + 1 < len(self.levels) and self.levels[ti + 1] == CacheLevel.HOST

    def _swap_counts(self, ti: int, colder: np.ndarray) -> Optional[tuple[int, int, int]]:
        """(free slots taken at level index ``ti``, victims demoted into free host slots, victims swapped) when
        promoting ``colder``, all on the host level right below ``ti``, where the draft would swap: free slots
        first, then one victim per remaining page from the target's eviction queue, each into a free host
        slot while the host has one, then into the slot of the page promoted in its place. None: not that
        case (or too few victims for every page), let the other paths decide."""
        if not colder.size or not self._host_below(ti) or some(self.table.level[colder] != int(CacheLevel.HOST)):
            return None
        free = min(len(colder), self.alloc[self.levels[ti]].free_count)
        need = len(colder) - free
        if need > len(self.queues[self.levels[ti]]):
            return None
        demoted = min(need, self.alloc[CacheLevel.HOST].free_count)
        return free, demoted, need - demoted

    def _swap_room(self, ti: int, pids: np.ndarray, counts: tuple[int, int, int], plan: Plan) -> None:
        """Promote host ``pages`` to level index ``ti`` in the room :meth:`_swap_counts` found, slot for slot
        what realizing its draft gives: the target's free slots (lowest first), then its victims' slots in
        eviction order; the first victims move into free host slots (lowest first), the others swap with the
        page promoted into their slot (victim into that page's host slot through a staging buffer, ``after``
        linking both ways). Moves are cut at :attr:`max_group`, each promotion's like its victims' move."""
        target, host = self.levels[ti], CacheLevel.HOST
        free, demoted, swapped = counts
        queue = self.queues[target]
        victims = queue.first(demoted + swapped)
        queue.discard_pids(victims)
        if free:
            fresh = pids[:free]
            self._emit(plan, fresh, host, self._slots(fresh), target, self._allocate(target, free))
        vslots = self._slots(victims)
        if demoted:
            made = self._emit(plan, victims[:demoted], target, vslots[:demoted], host, self._allocate(host, demoted),
                              handoff=True)
            moving = pids[free:free + demoted]
            self._emit(plan, moving, host, self._slots(moving), target, vslots[:demoted], after=made)
        if swapped:
            moving = pids[free + demoted:]
            hslots = self._slots(moving)
            made = self._emit(plan, victims[demoted:], target, vslots[demoted:], host, hslots, handoff=True)
            promos = self._emit(plan, moving, host, hslots, target, vslots[demoted:], after=made, handoff=True)
            for victim_move, promo in zip(made, promos):
                victim_move.after, victim_move.swap = promo, True
                promo.successor = victim_move
        self._sync_moving(pids)

    def _cascade_room(self, i: int, pids: np.ndarray, counts: list[tuple[int, int]], plan: Plan,
                      src: Optional[CacheLevel] = None) -> None:
        """Place ``pages`` (new ones; or placed pages of level ``src`` promoted) at level index ``i`` in the room
        :meth:`_cascade` found, slot for slot what realizing its draft gives: each level's free slots (lowest
        first), then its victims' slots in eviction order; victims move one level colder the same way, those
        of the last level are dropped. The moves are a few per level, each cut so that the move vacating its
        destination slots lines up index for index (``after``)."""
        levels = self.levels[i:i + len(counts)]
        victims = [self.queues[lvl].first(need) for lvl, (_, need) in zip(levels, counts)]
        for lvl, vs in zip(levels, victims):
            self.queues[lvl].discard_pids(vs)
        dst = [np.concatenate((self._allocate(lvl, free), self._slots(vs)))
               for lvl, (free, _), vs in zip(levels, counts, victims)]
        below: Optional[list[tuple[int, int, Move]]] = None  # moves of the next level's victims: (lo, hi, move)
        if victims[-1].size:  # the last level: dropped, the slots taken over by the pages arriving there
            last, gone = levels[-1], victims[-1].size
            self._free_pids(victims[-1], release_slots=False)
            self.counters["drops"] += gone
            self.counters[_EVICTIONS[last]] += gone
            plan.dropped += gone
        for k in range(len(levels) - 2, -1, -1):
            vs = victims[k]
            made = []
            for lo, hi, after in self._aligned(counts[k + 1][0], len(vs), below):
                mv = Move(self.table, vs[lo:hi], levels[k], self._slots(vs[lo:hi]), levels[k + 1], dst[k + 1][lo:hi],
                          after, handoff=True)
                plan.moves.append(mv)
                made.append((lo, hi, mv))
            below = made
        for lo, hi, after in self._aligned(counts[0][0], len(pids), below):
            part = pids[lo:hi]
            plan.moves.append(Move(self.table, part, src, self._src_slots(src, part), levels[0], dst[0][lo:hi], after))

    def _aligned(self, free: int, n: int, below: Optional[list[tuple[int, int, Move]]]
                 ) -> list[tuple[int, int, Optional[Move]]]:
        """Ranges of ``n`` pages arriving at a level, the first ``free`` into free slots (cut at
        :attr:`max_group`, nothing to wait for), the rest into the slots of the level's victims: one range per
        victims' move of ``below`` (None: the victims were dropped, or there are none)."""
        step = self.max_group
        out: list[tuple[int, int, Optional[Move]]] = [(lo, min(lo + step, free), None) for lo in range(0, free, step)]
        if below is None:
            out.extend((lo, min(lo + step, n), None) for lo in range(free, n, step))
        else:
            out.extend((free + lo, free + hi, mv) for lo, hi, mv in below)
        return out

    def _sync_moving(self, pids: np.ndarray) -> None:
        """Pages just given a move are not evictable: out of their queues (placed pages only)."""
        for queue, moving in self._per_queue(pids):
            queue.discard_pids(moving)

    def _realize(self, grant: _Grant, li: int, plan: Plan) -> tuple[int, Optional[Move]]:
        """Apply one drafted grant at level index ``li``: (slot obtained, move that must vacate it first)."""
        level = self.levels[li]
        if grant.kind == _FREE:
            return self.alloc[level].allocate(), None
        victim = grant.victim
        if victim is None:
            raise RuntimeError("a drafted demotion or drop names no victim")
        self.queues[level].remove(victim)
        slot = victim.slot
        if grant.kind == _DROP:
            self._free(victim, release_slot=False)  # the grantee takes the slot over
            self.counters["drops"] += 1
            self.counters[_EVICTIONS[level]] += 1
            plan.dropped += 1
            return slot, None
        via = grant.via  # a _DEMOTE grant: the grant its victim moves into
        if via is None:
            raise RuntimeError("a drafted demotion names no destination")
        after: Optional[Move]
        swapped = via.victim  # _SWAP: the page promoted out of that slot
        if via.kind == _SWAP:
            if swapped is None:
                raise RuntimeError("a drafted swap names no promoted page")
            dst_slot, after = swapped.slot, None
        else:
            dst_slot, after = self._realize(via, grant.via_index, plan)
        move = self._move1(victim, level, slot, self.levels[grant.via_index], dst_slot, after, handoff=True)
        plan.moves.append(move)
        if via.kind == _SWAP and swapped is not None:
            plan.swaps.append((move, swapped))
        return slot, move

    # ----------------------------------------------------------------- settling moves
    def stage(self, move: Move, i: int = 0) -> None:
        """Page ``i`` of a swap move has its bytes in a staging buffer: its source slot may now be overwritten."""
        move.state[i] = MoveState.STAGED

    def complete(self, move: Move, idx: Optional[Sequence[int]] = None) -> None:
        """The transfer of ``move`` (its pages ``idx``; None: all) succeeded: the pages are at their destination."""
        self.complete_many(((move, idx),))

    def complete_many(self, parts: Iterable[tuple[Move, Optional[Sequence[int]]]]) -> None:
        """:meth:`complete` for every (move, indices) of ``parts`` (one batch's transfers succeeded), in one
        pass: source slots are released per level at the end (``SlotAllocator.release_many``) and the eviction
        counters updated once."""
        t = self.table
        released: dict[CacheLevel, list[np.ndarray]] = {}
        evicted: Counter[CacheLevel] = Counter()
        orphans: list[np.ndarray] = []
        listener = self.disk_listener
        done = MoveState.DONE
        disk = CacheLevel.DISK
        for move, idx in parts:
            src, dst = move.src, move.dst
            if idx is None:
                pids, src_slots, dst_slots = move.pids, move.src_slots, move.dst_slots
                move.state = [done] * len(pids)
            else:
                sel = np.asarray(idx, dtype=np.int64)
                pids, src_slots, dst_slots = move.pids[sel], move.src_slots[sel], move.dst_slots[sel]
                state = move.state
                for i in idx:
                    state[i] = done
            if src is not None and not move.handoff:
                released.setdefault(src, []).append(src_slots)
            notify = listener is not None and (src is disk or dst is disk)
            committed = np.flatnonzero(t.indexed[pids]).tolist() if notify else ()
            if src is disk and listener is not None:
                for j in committed:
                    listener("del", t.page(int(pids[j])), src_slots[j])
            t.level[pids] = int(dst)
            t.slot[pids] = dst_slots
            if dst is disk and listener is not None:
                for j in committed:
                    listener("put", t.page(int(pids[j])), dst_slots[j])
            t.end_moves(pids)
            gone = self._orphaned(pids)
            if some(gone):
                orphans.append(pids[gone])
                pids = pids[~gone]
            self._queue_evictable(pids)  # moving pages were not queued
            if src is not None and src < dst:
                evicted[src] += len(move.pids) if idx is None else len(idx)
        for gone_pids in orphans:
            self._free_pids(gone_pids, release_slots=True)
        for level, parts_slots in released.items():
            self.alloc[level].release_many(parts_slots[0] if len(parts_slots) == 1 else np.concatenate(parts_slots))
        for level, k in evicted.items():
            self.counters[_EVICTIONS[level]] += k

    def abort(self, move: Move, i: int = 0) -> None:
        """The transfer of page ``i`` of ``move`` did not happen: the page stays at its source. A no-op for a
        settled page.

        The move waiting for this one's source slot (page ``i`` of its ``successor``) can no longer happen
        either: it is aborted in the same step, so no other operation ever sees a slot reserved for a move
        that cannot run — except a swap victim already STAGED, which its own batch restores from staging and
        then aborts (until then it keeps its source slot and is not evictable).
        """
        self.abort_many(move, (i,))

    def abort_many(self, move: Move, idx: Optional[Sequence[int]] = None) -> None:
        """:meth:`abort` for pages ``idx`` of ``move`` (None: all)."""
        rng: Iterable[int] = range(len(move.pids)) if idx is None else idx
        chain: list[tuple[Move, int]] = []
        for i in rng:
            mv: Optional[Move] = move
            first = True
            while mv is not None and mv.pending_at(i):
                if not first and mv.state[i] is MoveState.STAGED:
                    # a swap victim whose bytes are in a staging buffer: its batch writes them back to its
                    # source slot and settles it; aborting it here would let its slot be planned again first
                    break
                first = False
                after = mv.after
                if after is None or after.state[i] is MoveState.DONE:
                    self.alloc[mv.dst].release(mv.dst_slots[i])
                mv.state[i] = MoveState.ABORTED
                chain.append((mv, i))
                mv = mv.successor
        if not chain:
            return
        pids = np.fromiter((mv.pids[i] for mv, i in chain), dtype=np.int64, count=len(chain))
        new = np.fromiter((mv.src is None for mv, _ in chain), dtype=np.bool_, count=len(chain))
        self.table.end_moves(pids)
        # pages settle once every dependent move let go of its slot
        # new pages that were never placed: freed unless an operation still owns or holds them (it lets go
        # of them, unplaced, when it ends)
        self._free_pids(self._orphans(pids[new]), release_slots=False)
        placed = pids[~new]
        self._free_orphans(placed)
        self._queue_evictable(placed[self.table.live[placed]])

    # ----------------------------------------------------------------- queries
    def moves_of(self, pages: Sequence[Page]) -> list[Move]:
        """The moves in flight carrying some of ``pages``."""
        serials = self.table.move[pids_of(pages, len(pages))]
        moving = serials[serials >= 0]
        if not moving.size:
            return []
        return [self.table.moves[s] for s in np.unique(moving).tolist()]

    def moving_pids(self, pages: Sequence[Page]) -> np.ndarray:
        """The pids of the pages of ``pages`` in flight, in order."""
        pids = pids_of(pages, len(pages))
        out: np.ndarray = pids[self.table.move[pids] >= 0]
        return out

    def at_level(self, pages: Sequence[Page], levels: Iterable[CacheLevel], settled: bool = False) -> np.ndarray:
        """Mask of ``pages`` whose level is one of ``levels`` (``settled``: and not moving)."""
        t = self.table
        pids = pids_of(pages, len(pages))
        want = np.zeros(len(LEVEL_OF), dtype=np.bool_)
        for lvl in levels:
            want[int(lvl)] = True
        mask: np.ndarray = want[t.level[pids]] & t.live[pids]
        if settled:
            mask &= t.move[pids] < 0
        return mask

    def per_level(self, pages: Sequence[Page], settled: bool = False) -> dict[CacheLevel, int]:
        """Pages of ``pages`` per configured level (placed, live ones; ``settled``: and not moving)."""
        t = self.table
        pids = pids_of(pages, len(pages))
        keep = t.live[pids]
        if settled:
            keep &= t.move[pids] < 0
        counts = np.bincount(t.level[pids][keep] + 1, minlength=len(LEVEL_OF) + 1)
        return {lvl: int(counts[int(lvl) + 1]) for lvl in self.levels}

    def slots_at(self, pages: Sequence[Page], level: CacheLevel, settled: bool = False) -> np.ndarray:
        """The slots of the pages of ``pages`` placed at ``level`` (live; ``settled``: and not moving), in order."""
        return self._slots(pids_of(pages, len(pages))[self.at_level(pages, (level,), settled)])

    def slots_of(self, pages: Sequence[Page]) -> np.ndarray:
        """The slots of ``pages``, in order (int64)."""
        return self._slots(pids_of(pages, len(pages)))

    def usage(self, level: CacheLevel) -> TierUsage:
        alloc = self.alloc[level]
        return TierUsage(
            level=level,
            total_pages=alloc.total,
            used_pages=alloc.used_count,
            evictable_pages=len(self.queues[level]),
            free_pages=alloc.total - alloc.used_count,
        )

    def _check_table(self) -> None:
        """The table's own bookkeeping: free rows have no handle and no queue stamp, every handle made is its
        live row's, each move in flight is carried by exactly its unsettled pages, LRU queue lengths count
        their stamped rows."""
        t = self.table
        live = t.live
        free = ~live
        if t.handled[free].any() or any(h is not None for h in t.handles[free].tolist()) or (t.stamp[free] >= 0).any():
            raise AssertionError("a free row of the page table keeps a handle or a queue stamp")
        made = live & t.handled
        if any(h is not None for h in t.handles[live & ~t.handled].tolist()):
            raise AssertionError("a live row of the page table keeps a handle it does not count")
        if any(h is None or h.freed or t.handles[h.pid] is not h for h in t.handles[made].tolist()):
            raise AssertionError("a live row of the page table has a handle that is not its own")
        serials, counts = np.unique(t.move[live & (t.move >= 0)], return_counts=True)
        for serial, n in zip(serials.tolist(), counts.tolist()):
            mv = t.moves.get(serial)
            if mv is None or mv.left != n:
                raise AssertionError(f"move {serial} carries {n} pages but records {None if mv is None else mv.left}")
        if len(t.moves) != serials.size:
            raise AssertionError(f"{len(t.moves) - serials.size} settled moves are still registered")
        for lvl, queue in self.queues.items():
            if isinstance(queue, EvictionQueue):
                n = int(np.count_nonzero(live & (t.stamp >= 0) & (t.level == int(lvl))))
                if n != len(queue):
                    raise AssertionError(f"the {lvl.label} queue counts {len(queue)} pages, {n} rows are stamped")

    def check_invariants(self) -> None:
        """Raise AssertionError naming the first violated invariant."""

        def fail(msg: str) -> None:
            raise AssertionError(msg)

        occupant: dict[tuple[CacheLevel, int], Page] = {}
        incoming: dict[tuple[CacheLevel, int], tuple[Move, int]] = {}
        positions: dict[int, dict[int, int]] = {}  # id(move) -> {page id: index in the move}

        def index_in(mv: Move, page: Page) -> int:
            pos = positions.get(id(mv))
            if pos is None:
                pos = positions[id(mv)] = {p.pid: j for j, p in enumerate(mv.pages)}
            j = pos.get(page.pid)
            if j is None:
                fail(f"page {page.pid} carries a move that does not hold it")
            return cast(int, j)

        registry = self.pages
        for page in registry.values():
            if page.freed:
                fail(f"freed page {page.pid} is still registered")
            mv = page.move
            i = index_in(mv, page) if mv is not None else -1
            if page.level is None:
                # a new page whose placement was aborted stays unplaced until the operation owning it ends
                if (mv is None and page.owners == 0 and page.holds == 0) or (mv is not None and mv.src is not None):
                    fail(f"page {page.pid} has no level, is not being placed and no operation owns it")
            else:
                if not 0 <= page.slot < self.alloc[page.level].total:
                    fail(f"page {page.pid} sits in slot {page.slot} outside the {page.level.label} level")
                where = (page.level, page.slot)
                # a staged victim whose successor gave up (aborted) still occupies its source slot
                staged_here = mv is not None and mv.state[i] is MoveState.STAGED and (
                    mv.successor is None or mv.successor.state[i] is not MoveState.ABORTED
                )
                if staged_here and mv is not None:
                    # its bytes are in staging: the source slot belongs to its successor (reserved by that
                    # move, or occupied by its page, or freed with it when that page was an orphan)
                    if not mv.handoff or mv.successor is None:
                        fail(f"staged page {page.pid} hands its slot to no move")
                    where = (page.level, -1 - page.pid)
                if where in occupant:
                    fail(f"slot {page.slot} of {page.level.label} holds pages {occupant[where].pid} and {page.pid}")
                occupant[where] = page
                if not staged_here and self.alloc[page.level].is_free(page.slot):
                    fail(f"page {page.pid} sits in {page.level.label} slot {page.slot} that the allocator calls free")
                if (page in self.queues[page.level]) != page.evictable:
                    fail(
                        f"page {page.pid} at {page.level.label} evictable={page.evictable} but "
                        f"queued={page in self.queues[page.level]}"
                    )
                for lvl in self.levels:
                    if lvl != page.level and page in self.queues[lvl]:
                        fail(f"page {page.pid} at {page.level.label} is queued at {lvl.label}")
            if page.locks and page.level != CacheLevel.DEVICE:
                fail(f"locked page {page.pid} is outside the device level")
            if page.locks < 0 or page.holds < 0 or page.owners < 0:
                fail(f"page {page.pid} has a negative count")
            if page.indexed and (page.key is None or self.index.get(page.key) is not page):
                fail(f"page {page.pid} claims to be indexed but the index disagrees")
            if page.owners == 0 and page.holds == 0 and not page.indexed and mv is None:
                fail(f"page {page.pid} is held by no cache or operation and not reusable but was not freed")
            if mv is not None:
                if not mv.pending_at(i):
                    fail(f"page {page.pid} carries a settled move")
                if len(mv.src_slots) != len(mv.pids) or len(mv.dst_slots) != len(mv.pids) or (
                    mv.after is not None and len(mv.after.pages) != len(mv.pids)
                ):
                    fail(f"move of page {page.pid} has lists of different lengths")
                if mv.src is not None and (mv.src != page.level or mv.src_slots[i] != page.slot):
                    fail(f"move of page {page.pid} starts from a slot the page is not in")
                if mv.state[i] is MoveState.STAGED and mv.after is not None and mv.after.state[i] is MoveState.ABORTED:
                    continue  # a staged victim going back to its source: its destination is not reserved
                dst_slot = mv.dst_slots[i]
                dst = (mv.dst, dst_slot)
                if dst in incoming:
                    fail(f"two moves reserve {mv.dst.label} slot {dst_slot}")
                incoming[dst] = (mv, i)
                if self.alloc[mv.dst].is_free(dst_slot):
                    fail(f"move of page {page.pid} reserves {mv.dst.label} slot {dst_slot} the allocator calls free")
        for dst, (mv, i) in incoming.items():
            occ = occupant.get(dst)
            mover = mv.pages[i]
            if occ is not None and occ is not mover and (mv.after is None or mv.after.pages[i] is not occ):
                fail(f"move of page {mover.pid} into {dst[0].label} slot {dst[1]} that page {occ.pid} still holds")
        for lvl in self.levels:
            alloc = self.alloc[lvl]
            used = {s for (l, s) in occupant if l == lvl and s >= 0} | {s for (l, s) in incoming if l == lvl}
            if len(used) != alloc.used_count:
                fail(f"{lvl.label}: allocator counts {alloc.used_count} used slots, pages account for {len(used)}")
            if alloc.used_count > alloc.total:
                fail(f"{lvl.label}: {alloc.used_count} slots used of {alloc.total}")
            for page in self.queues[lvl].candidates():
                if page.pid not in registry or page.level != lvl:
                    fail(f"queue of {lvl.label} holds page {page.pid} that is not there")
        self._check_table()
        for page in self.index.pages():
            if page.pid not in registry:
                fail(f"prefix index holds freed page {page.pid}")
        self.index.check()
