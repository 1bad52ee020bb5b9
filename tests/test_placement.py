"""Unit tests of placement alone: pure bookkeeping, no torch data, no asyncio.

Pages are created and moved through the same calls :mod:`kvstore.manager` makes (see ``Engine``), every
plan is "executed" by ``run_plan`` which settles moves in an order the transfer executor could use, and
``Placement.check_invariants`` runs after every step.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvstore.errors import CapacityError
from kvstore.placement import MoveState, Page, PageMove, Placement, Plan, PrefixIndex, SlotAllocator
from kvstore.placement.placement import _Draft
from kvstore.types import CacheLevel
from .conftest import loose_page

D, H, K = CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK
SETTLED = (MoveState.DONE, MoveState.ABORTED)


# ---------------------------------------------------------------------------------------------- helpers
def make(device: int = 4, host: Optional[int] = 4, disk: Optional[int] = None) -> Placement:
    """A placement with a device level and optional host / disk levels (None leaves a level out)."""
    levels, slots = [D], [device]
    if host is not None:
        levels.append(H)
        slots.append(host)
    if disk is not None:
        levels.append(K)
        slots.append(disk)
    pl = Placement(levels, slots)
    pl.check_invariants()
    return pl


def complete(pl: Placement, m: PageMove) -> None:
    """The transfer of one page move succeeded."""
    pl.complete(m.move, [m.i])


def abort(pl: Placement, m: PageMove) -> None:
    """The transfer of one page move did not happen."""
    pl.abort(m.move, m.i)


def stage(pl: Placement, m: PageMove) -> None:
    pl.stage(m.move, m.i)


def _step(pl: Placement, m: PageMove, failing: bool) -> bool:
    """Settle or advance ``m`` if its dependencies allow it; True if something happened."""
    if m.swap:
        if m.state is MoveState.PENDING:
            if failing:
                abort(pl, m)  # reading the victim into staging failed
            else:
                stage(pl, m)  # bytes now in staging: the promotion may overwrite the source slot
            return True
        if m.after.state in SETTLED:
            if m.after.state is MoveState.DONE:
                complete(pl, m)
            else:
                abort(pl, m)  # the promotion did not happen: the victim goes back to its source slot
            return True
        return False
    if m.after is None or m.after.state in (MoveState.DONE, MoveState.STAGED):
        if failing:
            abort(pl, m)
        else:
            complete(pl, m)
        return True
    if m.after.state is MoveState.ABORTED:
        abort(pl, m)  # the slot it needed was never vacated
        return True
    return False


def run_plan(pl: Placement, plan: Plan, fail: Iterable[PageMove] = ()) -> None:
    """Execute ``plan``: settle moves in dependency order (plan order among the ready ones), aborting the
    moves in ``fail`` (and, through ``after``, whatever depended on them). Checks invariants every step."""
    fail = set(fail)
    pending = plan.page_moves()
    while pending:
        for m in pending:
            if _step(pl, m, m in fail):
                break
        else:
            raise AssertionError(f"plan cannot make progress: {[(m.page.pid, m.state) for m in pending]}")
        pl.check_invariants()
        pending = [m for m in pending if m.state not in SETTLED]


class Engine:
    """The manager's sequences of placement calls, on a bare :class:`Placement`."""

    def __init__(self, pl: Placement) -> None:
        self.pl = pl

    def new_active(self, n: int, priority: int = 0) -> list[Page]:
        """create_cache + resume (empty) + resize(n pages): n new pages locked on the device level,
        held while placed and locked once placed, as ``KVCacheManager._grow`` does."""
        pages, plan = self.pl.plan_new_pages(n, D, priority)
        for p in pages:
            p.owners = 1
            p.holds = 1
        self.pl.check_invariants()
        run_plan(self.pl, plan)
        self.pl.holds_to_locks(pages)
        self.pl.check_invariants()
        return pages

    def new_suspended(self, n: int, priority: int = 0) -> list[Page]:
        pages = self.new_active(n, priority)
        self.suspend(pages)
        return pages

    def suspend(self, pages: Sequence[Page]) -> None:
        self.pl.unlock_all(pages)
        self.pl.check_invariants()

    def resume(self, pages: Sequence[Page], fail: Iterable[PageMove] = ()) -> Plan:
        pl = self.pl
        pl.hold_all(pages)
        locked = False
        try:
            pl.check_promotion(pages, D)
            plan = pl.plan_promotion(pages, D, require_all=True)
            pl.check_invariants()
            run_plan(pl, plan, fail)
            if all(p.level == D for p in pages):
                pl.holds_to_locks(pages)
                locked = True
            return plan
        finally:
            if not locked:
                pl.release_all(pages)
            pl.check_invariants()

    def prefetch(self, pages: Sequence[Page], target: CacheLevel, fail: Iterable[PageMove] = ()) -> Plan:
        pl = self.pl
        pl.level_index(target)
        held = []
        pl.hold_all(pages)  # as KVCacheManager._prefetch: hold every page while planning
        try:
            plan = pl.plan_promotion(pages, target, require_all=False)
        finally:
            held = [p for p in pages if p.move is not None]
            pl.release_all([p for p in pages if p.move is None])
        try:
            pl.check_invariants()
            run_plan(pl, plan, fail)
            return plan
        finally:
            pl.release_all(held)
            pl.check_invariants()

    def close(self, pages: Sequence[Page], active: bool = False) -> None:
        if active:
            self.pl.unlock_all(pages)
        for p in pages:
            self.pl.remove_owner(p)
        self.pl.check_invariants()

    def commit(self, pages: Sequence[Page], tag: str = "k") -> list[bool]:
        out = [self.pl.set_key(p, f"{tag}{i}".encode()) for i, p in enumerate(pages)]
        self.pl.check_invariants()
        return out


def queue(pl: Placement, level: CacheLevel) -> list[int]:
    """Pids queued at ``level``, in eviction order."""
    return [p.pid for p in pl.queues[level].candidates()]


def where(pages: Sequence[Page]) -> list[tuple[Optional[CacheLevel], int]]:
    return [(p.level, p.slot) for p in pages]


def snapshot(pl: Placement) -> dict:
    """Everything a plan could change."""
    return {
        "pages": {
            pid: (p.level, p.slot, p.move, p.holds, p.locks, p.owners, p.key, p.indexed, p.priority, p.freed)
            for pid, p in pl.pages.items()
        },
        "queues": {lvl: queue(pl, lvl) for lvl in pl.levels},
        "alloc": {
            lvl: (a.total, a.limit, a.free_count, a.used_count, a.free_ranges()) for lvl, a in pl.alloc.items()
        },
        "index": sorted(p.pid for p in pl.index.pages()),
        "counters": dict(pl.counters),
    }


# ---------------------------------------------------------------------------------------------- new pages
def test_new_pages_take_the_lowest_free_device_slots():
    eng = Engine(make(device=4))
    pages = eng.new_active(3)
    assert where(pages) == [(D, 0), (D, 1), (D, 2)]
    assert eng.pl.alloc[D].free_count == 1


def test_new_pages_that_do_not_fit_raise_capacity_error_and_change_nothing():
    eng = Engine(make(device=2, host=None))
    eng.new_active(2)
    before = snapshot(eng.pl)
    with pytest.raises(CapacityError):
        eng.pl.plan_new_pages(1, D, 0)
    assert snapshot(eng.pl) == before


def test_aborted_new_page_releases_its_slot_and_is_freed_when_its_owner_lets_go():
    pl = make(device=2)
    pages, plan = pl.plan_new_pages(1, D, 0)
    pages[0].owners = 1  # the operation that asked for it owns it
    run_plan(pl, plan, fail=plan.page_moves())
    assert pl.alloc[D].free_count == 2
    assert not pages[0].freed and pages[0].level is None  # unplaced: its row stays the owner's until it ends
    pl.check_invariants()
    pl.remove_owners(pages)
    assert pages[0].freed and pages[0].pid not in pl.pages


def test_aborted_new_page_that_nobody_owns_is_freed_at_once():
    pl = make(device=2)
    pages, plan = pl.plan_new_pages(1, D, 0)
    run_plan(pl, plan, fail=plan.page_moves())
    assert pages[0].freed and pl.alloc[D].free_count == 2


def test_a_held_page_is_freed_when_released_not_when_its_last_owner_leaves():
    """A prefetch holds a cache's pages; the cache closes: the pages (and their rows) stay until the hold ends."""
    pl = make(device=2)
    pages, plan = pl.plan_new_pages(2, D, 0)
    pl.set_owners(pages, 1)
    run_plan(pl, plan)
    pl.hold_all(pages)
    pl.remove_owners(pages)
    assert not any(p.freed for p in pages) and pl.alloc[D].free_count == 0
    pl.check_invariants()
    pl.release_all(pages)
    assert all(p.freed for p in pages) and pl.alloc[D].free_count == 2
    pl.check_invariants()


def test_active_pages_are_locked_and_not_evictable():
    eng = Engine(make(device=2))
    pages = eng.new_active(2)
    assert all(p.locks == 1 for p in pages)
    assert queue(eng.pl, D) == []


def test_suspended_pages_are_queued_in_token_order():
    eng = Engine(make(device=4))
    pages = eng.new_suspended(3)
    assert queue(eng.pl, D) == [p.pid for p in pages]


def test_lock_refuses_a_page_off_the_device_level_and_changes_nothing():
    eng = Engine(make(device=2, host=2))
    a = eng.new_suspended(2)
    eng.new_active(1)
    assert [p.level for p in a] == [H, D]
    eng.pl.hold_all(a)
    before = snapshot(eng.pl)
    with pytest.raises(RuntimeError):
        eng.pl.holds_to_locks(a)
    assert snapshot(eng.pl) == before  # checked before anything changed


# ---------------------------------------------------------------------------------------------- eviction order
def test_eviction_is_lru_within_a_level():
    eng = Engine(make(device=4, host=8))
    old = eng.new_suspended(2)
    recent = eng.new_suspended(2)
    eng.new_active(2)
    assert [p.level for p in old] == [H, H]
    assert [p.level for p in recent] == [D, D]


def test_least_recently_suspended_page_is_the_first_victim():
    eng = Engine(make(device=4, host=8))
    pages = eng.new_suspended(4)
    eng.new_active(1)
    assert [p.level for p in pages] == [H, D, D, D]


def test_lower_priority_is_evicted_first_even_when_more_recently_used():
    eng = Engine(make(device=4, host=8))
    high = eng.new_suspended(2, priority=5)
    low = eng.new_suspended(2, priority=0)
    eng.new_active(2)
    assert [p.level for p in low] == [H, H]
    assert [p.level for p in high] == [D, D]


def test_queue_orders_by_priority_then_recency():
    eng = Engine(make(device=6, host=8))
    a = eng.new_suspended(2, priority=1)
    b = eng.new_suspended(2, priority=0)
    c = eng.new_suspended(2, priority=1)
    assert queue(eng.pl, D) == [p.pid for p in b + a + c]


def test_touch_makes_a_page_most_recently_used():
    eng = Engine(make(device=4, host=8))
    pages = eng.new_suspended(4)
    eng.pl.touch(pages[0])
    assert queue(eng.pl, D)[-1] == pages[0].pid
    eng.new_active(1)
    assert pages[0].level == D
    assert pages[1].level == H


def test_release_after_hold_makes_a_page_most_recently_used():
    eng = Engine(make(device=4, host=8))
    pages = eng.new_suspended(3)
    eng.pl.hold_all([pages[0]])
    eng.pl.release_all([pages[0]])
    assert queue(eng.pl, D) == [pages[1].pid, pages[2].pid, pages[0].pid]


def test_add_owner_with_higher_priority_moves_page_out_of_first_eviction():
    eng = Engine(make(device=4, host=8))
    pages = eng.new_suspended(2, priority=0)
    eng.pl.add_owner(pages[0], priority=3)  # a second cache reuses it with a higher priority
    eng.pl.check_invariants()
    assert queue(eng.pl, D) == [pages[1].pid, pages[0].pid]
    assert pages[0].priority == 3


# ---------------------------------------------------------------------------------------------- cascade / skip / drop
def test_cascade_demotes_device_to_host_and_host_to_disk_when_host_is_full():
    eng = Engine(make(device=2, host=2, disk=8))
    a = eng.new_suspended(2)
    b = eng.new_suspended(2)  # pushes a to host
    assert [p.level for p in a] == [H, H]
    pages, plan = eng.pl.plan_new_pages(2, D, 0)
    kinds = [(m.page.pid, m.src, m.dst) for m in plan.page_moves()]
    assert (a[0].pid, H, K) in kinds and (b[0].pid, D, H) in kinds
    b0 = next(m for m in plan.page_moves() if m.page is b[0])
    assert b0.after is not None and b0.after.page is a[0]  # b[0] takes the host slot a[0] vacates
    for p in pages:
        p.owners = 1
    run_plan(eng.pl, plan)
    assert [p.level for p in a] == [K, K]
    assert [p.level for p in b] == [H, H]
    assert [p.level for p in pages] == [D, D]


def test_cascade_uses_free_colder_slots_before_evicting_colder_pages():
    eng = Engine(make(device=2, host=3, disk=8))
    a = eng.new_suspended(2)
    b = eng.new_suspended(2)  # a -> host slots 0, 1; host slot 2 free
    eng.new_active(2)
    assert where(b) == [(H, 2), (H, 0)]  # b[0] takes the free slot, b[1] the slot a[0] vacates
    assert [p.level for p in a] == [K, H]


def test_cascade_counts_evictions_per_source_level():
    eng = Engine(make(device=2, host=2, disk=8))
    eng.new_suspended(2)
    eng.new_suspended(2)
    eng.new_active(2)
    assert eng.pl.counters["evictions_device"] == 4
    assert eng.pl.counters["evictions_host"] == 2


def test_device_victim_skips_a_host_level_that_cannot_take_it():
    eng = Engine(make(device=2, host=2, disk=8))
    a = eng.new_suspended(2)
    b = eng.new_suspended(2)
    eng.pl.hold_all(a) # a prefetch holds a's host pages: host has neither free slots nor victims
    pages, plan = eng.pl.plan_new_pages(1, D, 0)
    assert [(m.page.pid, m.src, m.dst) for m in plan.page_moves() if m.src is not None] == [(b[0].pid, D, K)]
    pages[0].owners = 1
    run_plan(eng.pl, plan)
    assert b[0].level == K and [p.level for p in a] == [H, H]


def test_last_level_drops_committed_pages_no_cache_holds():
    eng = Engine(make(device=2, host=2))
    a = eng.new_suspended(2)
    eng.commit(a)
    eng.close(a)  # committed: stays as reusable cache
    assert [p.freed for p in a] == [False, False]
    b = eng.new_suspended(2)  # a -> host
    assert [p.level for p in a] == [H, H]
    pages, plan = eng.pl.plan_new_pages(2, D, 0)  # b -> host, a must go
    assert plan.dropped == 2
    assert all(p.freed for p in a)
    assert eng.pl.index.get(b"k0") is None and eng.pl.index.get(b"k1") is None
    for p in pages:
        p.owners = 1
    run_plan(eng.pl, plan)
    assert [p.level for p in b] == [H, H]


def test_dropped_pages_are_counted_in_drops_and_evictions():
    eng = Engine(make(device=2, host=2))
    a = eng.new_suspended(2)
    eng.commit(a)
    eng.close(a)
    eng.new_suspended(2)
    eng.new_active(1)
    assert eng.pl.counters["drops"] == 1
    assert eng.pl.counters["evictions_host"] == 1


def test_last_level_never_drops_a_suspended_cache_page():
    eng = Engine(make(device=2, host=2))
    a = eng.new_suspended(2)
    eng.commit(a)  # committed but still owned by a suspended cache
    eng.new_suspended(2)
    before = snapshot(eng.pl)
    with pytest.raises(CapacityError):
        eng.pl.plan_new_pages(1, D, 0)
    assert snapshot(eng.pl) == before
    assert [p.level for p in a] == [H, H] and eng.pl.counters["drops"] == 0


def test_last_level_never_drops_uncommitted_pages():
    eng = Engine(make(device=2, host=2))
    eng.new_suspended(2)
    eng.new_suspended(2)
    with pytest.raises(CapacityError):
        eng.pl.plan_new_pages(1, D, 0)


def test_only_droppable_pages_are_dropped_when_mixed_with_suspended_ones():
    eng = Engine(make(device=2, host=2))
    kept = eng.new_suspended(1)
    eng.commit(kept, "kept")
    gone = eng.new_suspended(1)
    eng.commit(gone, "gone")
    eng.close(gone)
    eng.new_suspended(2)  # kept and gone -> host
    assert where(kept + gone) == [(H, 0), (H, 1)]
    eng.new_active(1)
    assert gone[0].freed and not kept[0].freed
    assert kept[0].level == H


def test_closing_an_uncommitted_page_frees_it_and_its_slot():
    eng = Engine(make(device=2))
    a = eng.new_active(2)
    eng.close(a, active=True)
    assert all(p.freed for p in a)
    assert eng.pl.pages == {} and eng.pl.alloc[D].free_count == 2


# ---------------------------------------------------------------------------------------------- never victims
def test_held_pages_are_never_victims():
    eng = Engine(make(device=2, host=None))
    a = eng.new_suspended(2)
    eng.commit(a)
    eng.close(a)  # droppable, so only the hold protects them
    eng.pl.hold_all([a[0]])
    eng.pl.hold_all([a[1]])
    with pytest.raises(CapacityError):
        eng.pl.plan_new_pages(1, D, 0)
    eng.pl.release_all([a[0]])
    pages, plan = eng.pl.plan_new_pages(1, D, 0)
    assert a[0].freed and not a[1].freed


def test_locked_pages_are_never_victims():
    eng = Engine(make(device=2, host=4))
    eng.new_active(2)
    with pytest.raises(CapacityError):
        eng.pl.plan_new_pages(1, D, 0)


def test_moving_pages_are_never_victims():
    eng = Engine(make(device=2, host=4))
    b = eng.new_suspended(2)
    pl = eng.pl
    first, plan1 = pl.plan_new_pages(1, D, 0)  # b[0] is being demoted: in flight
    first[0].owners = 1
    assert b[0].move is not None and b[0] not in pl.queues[D]
    second, plan2 = pl.plan_new_pages(1, D, 0)
    second[0].owners = 1
    assert [m.page for m in plan2.page_moves() if m.src is not None] == [b[1]]
    with pytest.raises(CapacityError):  # the only device pages left are in flight
        pl.plan_new_pages(1, D, 0)
    run_plan(pl, plan1)
    run_plan(pl, plan2)
    assert [p.level for p in b] == [H, H]


# ---------------------------------------------------------------------------------------------- resume / promotion
def test_resume_brings_every_page_to_the_device_level_and_locks_it():
    eng = Engine(make(device=2, host=4))
    a = eng.new_suspended(2)
    b = eng.new_suspended(2)
    eng.resume(a)
    assert [p.level for p in a] == [D, D] and all(p.locks == 1 for p in a)
    assert [p.level for p in b] == [H, H]
    assert queue(eng.pl, D) == [] and set(queue(eng.pl, H)) == {p.pid for p in b}


def test_promotion_victims_move_before_the_promotions_that_take_their_slots():
    eng = Engine(make(device=2, host=4))
    a = eng.new_suspended(2)
    b = eng.new_suspended(2)
    eng.pl.hold_all(a)
    plan = eng.pl.plan_promotion(a, D, require_all=True)
    by_page = {m.page.pid: m for m in plan.page_moves()}
    for p in a:
        mv = by_page[p.pid]
        assert mv.after is not None and mv.after.page in b
        assert mv.dst_slot == mv.after.src_slot
        assert plan.page_moves().index(mv.after) < plan.page_moves().index(mv)
    run_plan(eng.pl, plan)


def test_resume_that_cannot_fit_raises_and_leaves_placement_exactly_as_it_was():
    eng = Engine(make(device=3, host=4))
    a = eng.new_suspended(2)
    c = eng.new_active(3)  # a -> host
    eng.close(c[:1], active=True)
    d = eng.new_suspended(1)  # device: 2 locked pages + 1 evictable: only 1 slot can be freed for 2 pages
    pl = eng.pl
    pl.hold_all(a)
    before = snapshot(pl)
    with pytest.raises(CapacityError):
        pl.plan_promotion(a, D, require_all=True)
    assert snapshot(pl) == before
    assert queue(pl, D) == [d[0].pid]
    pl.check_invariants()


def test_capacity_error_from_resume_helper_keeps_pages_where_they_were():
    eng = Engine(make(device=2, host=4))
    a = eng.new_suspended(2)
    eng.new_active(2)
    before = where(a)
    with pytest.raises(CapacityError):
        eng.resume(a)
    assert where(a) == before and all(p.holds == 0 and p.locks == 0 for p in a)
    assert set(queue(eng.pl, H)) == {p.pid for p in a}


def test_partial_promotion_promotes_the_first_pages_in_order():
    eng = Engine(make(device=3, host=4))
    a = eng.new_suspended(3)
    c = eng.new_active(3)  # a -> host, device full of locked pages
    eng.close(c[:1], active=True)  # one device slot free
    plan = eng.prefetch(a, D)
    assert [m.page.pid for m in plan.page_moves()] == [a[0].pid]
    assert [p.level for p in a] == [D, H, H]


def test_partial_promotion_with_no_room_plans_nothing():
    eng = Engine(make(device=2, host=4))
    a = eng.new_suspended(2)
    eng.new_active(2)
    before = where(a)
    plan = eng.prefetch(a, D)
    assert len(plan) == 0 and where(a) == before


def test_prefetched_pages_stay_evictable_and_are_queued_at_their_new_level():
    eng = Engine(make(device=2, host=2, disk=8))
    a = eng.new_suspended(2)
    eng.new_suspended(2)
    eng.new_suspended(2)  # a -> disk
    assert [p.level for p in a] == [K, K]
    eng.prefetch(a, H)
    assert [p.level for p in a] == [H, H]
    assert queue(eng.pl, H) == [a[0].pid, a[1].pid]
    assert all(p.holds == 0 and p.move is None for p in a)


def test_prefetch_only_touches_pages_already_at_the_target_level():
    eng = Engine(make(device=4, host=4))
    a = eng.new_suspended(2)
    b = eng.new_suspended(2)
    plan = eng.prefetch(a, D)
    assert len(plan) == 0
    assert queue(eng.pl, D) == [b[0].pid, b[1].pid, a[0].pid, a[1].pid]


def test_prefetch_never_demotes_a_page_of_the_prefetching_cache():
    eng = Engine(make(device=2, host=1, disk=4))
    cache = eng.new_suspended(2)
    eng.new_active(2)  # cache[0] -> host, cache[1] -> disk (host full)
    assert [p.level for p in cache] == [H, K]
    eng.prefetch(cache, H)  # holds cache[1] only; the room it needs on host is cache[0]'s slot
    assert cache[0].level == H


def test_disk_pages_promote_straight_to_the_device_level():
    eng = Engine(make(device=2, host=2, disk=8))
    a = eng.new_suspended(2)
    eng.new_suspended(2)
    b = eng.new_suspended(2)  # a -> disk
    plan = eng.resume(a)
    assert {(m.src, m.dst) for m in plan.page_moves() if m.page in a} == {(K, D)}
    assert [p.level for p in a] == [D, D] and [p.level for p in b] == [H, H]


# ---------------------------------------------------------------------------------------------- swap
def test_swap_plans_device_victim_into_the_host_slot_the_promotion_vacates():
    eng = Engine(make(device=1, host=1))
    a = eng.new_suspended(1)
    b = eng.new_suspended(1)  # a -> host; both levels full
    pl = eng.pl
    pl.hold_all([a[0]])
    plan = pl.plan_promotion(a, D, require_all=True)
    victim = next(m for m in plan.page_moves() if m.page is b[0])
    promo = next(m for m in plan.page_moves() if m.page is a[0])
    assert victim.swap and not promo.swap
    assert (victim.dst, victim.dst_slot) == (H, a[0].slot)
    assert (promo.dst, promo.dst_slot) == (D, b[0].slot)
    assert victim.after == promo and promo.after == victim and promo.handoff
    pl.check_invariants()
    run_plan(pl, plan)
    pl.release_all([a[0]])
    assert where(a + b) == [(D, 0), (H, 0)]
    assert pl.alloc[D].free_count == 0 and pl.alloc[H].free_count == 0


def test_swap_of_several_pages_completes_with_every_page_in_one_slot():
    eng = Engine(make(device=2, host=2))
    a = eng.new_suspended(2)
    b = eng.new_suspended(2)
    host_slots = {p.slot for p in a}
    eng.resume(a)
    assert [p.level for p in a] == [D, D] and all(p.locks == 1 for p in a)
    assert [p.level for p in b] == [H, H] and {p.slot for p in b} == host_slots
    assert eng.pl.counters["evictions_device"] == 4  # 2 when b pushed a out, 2 for the swap


def test_aborted_swap_promotion_puts_both_pages_back():
    eng = Engine(make(device=1, host=1))
    a = eng.new_suspended(1)
    b = eng.new_suspended(1)
    before = where(a + b)
    pl = eng.pl
    pl.hold_all([a[0]])
    plan = pl.plan_promotion(a, D, require_all=True)
    promo = next(m for m in plan.page_moves() if m.page is a[0])
    run_plan(pl, plan, fail=[promo])
    pl.release_all([a[0]])
    pl.check_invariants()
    assert where(a + b) == before
    assert pl.alloc[D].free_count == 0 and pl.alloc[H].free_count == 0


def test_check_invariants_accepts_a_staged_victim_whose_promotion_aborted():
    eng = Engine(make(device=1, host=1))
    a = eng.new_suspended(1)
    eng.new_suspended(1)
    pl = eng.pl
    pl.hold_all([a[0]])
    plan = pl.plan_promotion(a, D, require_all=True)
    victim = next(m for m in plan.page_moves() if m.swap)
    promo = next(m for m in plan.page_moves() if not m.swap)
    stage(pl, victim)
    pl.check_invariants()
    abort(pl, promo)  # the promotion's batch failed; the swap batch has not restored the victim yet
    pl.check_invariants()


def test_each_swap_promotion_waits_for_the_staged_victim_in_its_device_slot():
    eng = Engine(make(device=2, host=2))
    a = eng.new_suspended(2)
    eng.new_suspended(2)
    pl = eng.pl
    pl.hold_all(a)
    plan = pl.plan_promotion(a, D, require_all=True)
    swaps = [m for m in plan.page_moves() if m.swap]
    assert len(swaps) == 2
    # a promotion always waits for the victim in its destination slot
    for m in plan.page_moves():
        if m.page in a:
            assert m.after.swap and m.after.src_slot == m.dst_slot
    run_plan(pl, plan)
    pl.release_all(a)


def test_failed_promotion_in_a_multi_page_swap_leaves_every_page_in_one_slot():
    eng = Engine(make(device=2, host=2))
    a = eng.new_suspended(2)
    eng.new_suspended(2)
    pl = eng.pl
    pl.hold_all(a)
    plan = pl.plan_promotion(a, D, require_all=True)
    swaps = [m for m in plan.page_moves() if m.swap]
    promos = {m.page.pid: m for m in plan.page_moves() if not m.swap}
    for m in swaps:  # the executor stages every swap batch first
        stage(pl, m)
    complete(pl, promos[a[1].pid])  # one promotion lands (its batch ran first) ...
    abort(pl, promos[a[0].pid])  # ... the other fails / is cancelled
    for m in swaps:  # swap victims settle according to the promotion they wait for
        assert _step(pl, m, failing=False)
    pl.check_invariants()
    victim_of = {m.after.page.pid: m.page for m in swaps}
    assert a[1].level == D and victim_of[a[1].pid].level == H  # the swap that happened
    assert a[0].level == H and victim_of[a[0].pid].level == D  # the one that did not: both back


def _swap_scenario(max_group: int) -> tuple[Engine, list[Page], list[Page]]:
    """Device 7 (one slot free), host 8 (one free): promoting a (6 pages on the host) takes the free device
    slot, then 5 device victims (b's): 1 into the free host slot, 4 swapped with a's last pages."""
    eng = Engine(make(device=7, host=8))
    eng.pl.max_group = max_group
    a = eng.new_suspended(6)
    b = eng.new_suspended(7)  # a -> host
    c = eng.new_active(1)
    eng.close(c, active=True)  # one device slot free (b[0] went to the host for c)
    assert [p.level for p in a] == [H] * 6 and pl_free(eng.pl) == (1, 1)
    return eng, a, b


def pl_free(pl: Placement) -> tuple[int, int]:
    return pl.alloc[D].free_count, pl.alloc[H].free_count


@pytest.mark.parametrize("max_group", [1 << 30, 2])
def test_swap_promotion_plans_multi_page_moves_equal_to_the_draft(max_group):
    eng, a, b = _swap_scenario(max_group)
    pl = eng.pl
    drafts = []
    real = pl._draft_promotion
    pl._draft_promotion = lambda *args: drafts.append(1) or real(*args)
    pl.hold_all(a)
    room = pl.check_promotion(a, D)
    assert not room.chunked and room.cascade  # planned in one step, without a draft
    plan = pl.plan_promotion(a, D, require_all=True, check=room)
    assert drafts == []
    swaps = [m for m in plan.moves if m.swap]
    assert sum(len(m.pages) for m in swaps) == 4 and all(len(m.pages) <= max_group for m in plan.moves)
    if max_group > 4:
        assert len(swaps) == 1 and len(plan.moves) == 5  # fresh, demoted victims, their promotions, swap pair
    for m in swaps:
        assert m.after.after is m and m.successor is m.after and m.after.successor is m and m.after.handoff
        assert len(m.after.pages) == len(m.pages)
        assert list(m.dst_slots) == list(m.after.src_slots) and list(m.src_slots) == list(m.after.dst_slots)
    pl.check_invariants()

    drafted, da, _ = _swap_scenario(max_group)
    drafted.pl._swap_counts = lambda ti, colder: None
    drafted.pl.hold_all(da)
    d_plan = drafted.pl.plan_promotion(da, D, require_all=True)
    assert _page_moves(plan) == _page_moves(d_plan) and _comparable(pl) == _comparable(drafted.pl)

    swapped_slots = sorted(s for m in swaps for s in m.dst_slots.tolist())
    assert swapped_slots == sorted(p.slot for p in a[2:])  # the last 4 promotions vacate the swap slots
    run_plan(pl, plan)
    pl.release_all(a)
    pl.check_invariants()
    assert all(p.level is D for p in a)
    assert swapped_slots == sorted(v.slot for m in swaps for v in m.pages) and all(v.level is H for m in swaps
                                                                                  for v in m.pages)
    assert pl_free(pl) == (0, 2)


def test_failed_pages_of_a_multi_page_swap_put_both_pages_of_each_pair_back():
    eng, a, b = _swap_scenario(1 << 30)
    pl = eng.pl
    before = dict(zip([p.pid for p in a + b], where(a + b)))
    pl.hold_all(a)
    plan = pl.plan_promotion(a, D, require_all=True)
    swap = next(m for m in plan.moves if m.swap)
    promo = swap.after
    failing = [PageMove(promo, 1)]  # page 1 of the promotion fails: its victim goes back from staging
    run_plan(pl, plan, fail=failing)
    pl.release_all(a)
    pl.check_invariants()
    assert promo.state[1] is MoveState.ABORTED and swap.state[1] is MoveState.ABORTED
    assert [st for k, st in enumerate(swap.state) if k != 1] == [MoveState.DONE] * 3
    for p in (promo.pages[1], swap.pages[1]):
        assert (p.level, p.slot) == before[p.pid]
    assert all(p.level is D for p in a if p is not promo.pages[1])


# ---------------------------------------------------------------------------------------------- abort
def test_aborted_promotion_leaves_page_at_source_and_releases_the_reserved_slot():
    eng = Engine(make(device=2, host=4))
    a = eng.new_suspended(1)
    b = eng.new_active(2)  # a -> host
    eng.close(b, active=True)  # device empty again
    src = where(a)
    pl = eng.pl
    pl.hold_all([a[0]])
    plan = pl.plan_promotion(a, D, require_all=True)
    assert pl.alloc[D].free_count == 1  # the destination is reserved while in flight
    run_plan(pl, plan, fail=plan.page_moves())
    pl.release_all([a[0]])
    assert where(a) == src
    assert pl.alloc[D].free_count == 2
    assert queue(pl, H) == [a[0].pid]


def test_aborted_victim_aborts_the_promotion_that_needed_its_slot():
    eng = Engine(make(device=2, host=4))
    a = eng.new_suspended(2)
    b = eng.new_suspended(2)  # a -> host; host still has 2 free slots: no swap
    a_src, b_src = where(a), where(b)
    pl = eng.pl
    pl.hold_all(a)
    plan = pl.plan_promotion(a, D, require_all=True)
    assert not any(m.swap for m in plan.page_moves())
    victim0 = next(m for m in plan.page_moves() if m.page is b[0])
    dependent = next(m for m in plan.page_moves() if m.after == victim0)
    run_plan(pl, plan, fail=[victim0])
    pl.release_all(a)
    pl.check_invariants()
    assert victim0.state is MoveState.ABORTED and dependent.state is MoveState.ABORTED
    assert where([dependent.page]) == [a_src[a.index(dependent.page)]]
    assert where([b[0]]) == [b_src[0]]
    other = next(p for p in a if p is not dependent.page)
    assert other.level == D and b[1].level == H
    assert pl.alloc[D].free_count == 0 and pl.alloc[H].free_count == 2


def test_aborted_cascade_victim_aborts_the_chain_above_it():
    eng = Engine(make(device=2, host=2, disk=8))
    a = eng.new_suspended(2)
    b = eng.new_suspended(2)
    pages, plan = eng.pl.plan_new_pages(1, D, 0)
    pages[0].owners = 1
    host_victim = next(m for m in plan.page_moves() if m.src == H)
    run_plan(eng.pl, plan, fail=[host_victim])
    assert all(m.state is MoveState.ABORTED for m in plan.page_moves())
    assert pages[0].level is None and not pages[0].freed  # unplaced, its owner's until it lets go
    eng.pl.remove_owners(pages)
    assert pages[0].freed
    assert [p.level for p in a] == [H, H] and [p.level for p in b] == [D, D]
    assert eng.pl.alloc[K].free_count == 8


# ---------------------------------------------------------------------------------------------- orphans
def test_orphan_page_is_freed_when_its_move_completes():
    eng = Engine(make(device=2, host=4))
    a = eng.new_suspended(1)
    b = eng.new_active(2)
    eng.close(b, active=True)
    pl = eng.pl
    pl.hold_all([a[0]])
    plan = pl.plan_promotion(a, D, require_all=True)
    eng.close(a)  # the cache closes while its page is in flight
    assert not a[0].freed
    run_plan(pl, plan)
    pl.release_all([a[0]])
    pl.check_invariants()
    assert a[0].freed and pl.pages == {}
    assert pl.alloc[D].free_count == 2 and pl.alloc[H].free_count == 4


def test_orphan_page_is_freed_when_its_move_aborts():
    eng = Engine(make(device=2, host=4))
    a = eng.new_suspended(1)
    b = eng.new_active(2)
    eng.close(b, active=True)
    pl = eng.pl
    pl.hold_all([a[0]])
    plan = pl.plan_promotion(a, D, require_all=True)
    eng.close(a)
    run_plan(pl, plan, fail=plan.page_moves())
    pl.release_all([a[0]])
    pl.check_invariants()
    assert a[0].freed and pl.pages == {}
    assert pl.alloc[D].free_count == 2 and pl.alloc[H].free_count == 4


# ---------------------------------------------------------------------------------------------- shrink / grow
def test_plan_shrink_evicts_lru_pages_and_relocates_pages_above_the_limit():
    eng = Engine(make(device=4, host=8))
    pages = eng.new_suspended(4)  # slots 0..3, pages[0] least recently used
    pl = eng.pl
    plan = pl.plan_shrink(D, 2)
    pl.check_invariants()
    demoted = {m.page.pid for m in plan.page_moves() if m.dst == H}
    relocated = {m.page.pid for m in plan.page_moves() if m.src == D and m.dst == D}
    assert demoted == {pages[0].pid, pages[1].pid}
    assert relocated == {pages[2].pid, pages[3].pid}
    run_plan(pl, plan)
    pl.alloc[D].shrink(2)
    pl.check_invariants()
    assert pl.alloc[D].total == 2 and pl.alloc[D].free_count == 0
    assert sorted(p.slot for p in pages[2:]) == [0, 1] and all(p.level == D for p in pages[2:])
    assert [p.level for p in pages[:2]] == [H, H]


def test_plan_shrink_relocates_into_free_low_slots_without_eviction():
    eng = Engine(make(device=4, host=4))
    pages = eng.new_active(4)
    eng.close(pages[:2], active=True)  # slots 0, 1 free
    eng.suspend(pages[2:])
    pl = eng.pl
    plan = pl.plan_shrink(D, 2)
    assert all(m.src == D and m.dst == D for m in plan.page_moves()) and len(plan) == 2
    run_plan(pl, plan)
    pl.alloc[D].shrink(2)
    pl.check_invariants()
    assert sorted(p.slot for p in pages[2:]) == [0, 1]
    assert pl.counters["evictions_device"] == 0


def test_plan_shrink_hides_slots_above_the_limit_from_new_allocations():
    eng = Engine(make(device=4, host=8))
    eng.new_suspended(1)
    pl = eng.pl
    plan = pl.plan_shrink(D, 2)
    run_plan(pl, plan)
    assert pl.alloc[D].free_count == 1
    pages, plan2 = pl.plan_new_pages(1, D, 0)
    assert plan2.page_moves()[0].dst_slot < 2


def test_plan_shrink_drops_droppable_pages_when_colder_levels_are_full():
    eng = Engine(make(device=2, host=None))
    a = eng.new_suspended(2)
    eng.commit(a)
    eng.close(a)
    pl = eng.pl
    plan = pl.plan_shrink(D, 1)
    run_plan(pl, plan)
    pl.alloc[D].shrink(1)
    pl.check_invariants()
    assert pl.counters["drops"] == 1 and len(pl.pages) == 1


def test_plan_shrink_raises_and_changes_nothing_when_colder_levels_cannot_take_the_excess():
    eng = Engine(make(device=4, host=1))
    eng.new_suspended(1)
    eng.new_suspended(4)  # host full of a suspended (undroppable) page, device full
    pl = eng.pl
    before = snapshot(pl)
    with pytest.raises(CapacityError):
        pl.plan_shrink(D, 2)
    assert snapshot(pl) == before
    pl.check_invariants()


def test_plan_shrink_refuses_a_level_with_locked_pages():
    eng = Engine(make(device=4, host=8))
    eng.new_active(1)
    with pytest.raises(RuntimeError):
        eng.pl.plan_shrink(D, 2)
    assert eng.pl.alloc[D].limit == 4


def test_grow_adds_free_slots_usable_by_new_pages():
    eng = Engine(make(device=2, host=None))
    eng.new_active(2)
    pl = eng.pl
    pl.alloc[D].grow(4)
    pl.check_invariants()
    assert pl.alloc[D].free_count == 2 and pl.usage(D).total_pages == 4
    pages = eng.new_active(2)
    assert [p.slot for p in pages] == [2, 3]


def test_usage_reports_used_evictable_and_free_pages():
    eng = Engine(make(device=4, host=4))
    eng.new_active(1)
    eng.new_suspended(2)
    u = eng.pl.usage(D)
    assert (u.total_pages, u.used_pages, u.evictable_pages, u.free_pages) == (4, 3, 2, 1)


# ---------------------------------------------------------------------------------------------- slot allocator
def test_slot_allocator_hands_out_the_lowest_free_slot():
    a = SlotAllocator(4)
    assert [a.allocate() for _ in range(3)] == [0, 1, 2]
    a.release(1)
    assert a.allocate() == 1


def test_slot_allocator_rejects_double_release():
    a = SlotAllocator(2)
    s = a.allocate()
    a.release(s)
    with pytest.raises(RuntimeError):
        a.release(s)


def test_slot_allocator_shrink_over_used_slots_raises():
    a = SlotAllocator(4)
    for _ in range(4):
        a.allocate()
    a.release(0)
    with pytest.raises(RuntimeError):
        a.shrink(2)


def test_slot_allocator_raises_lookup_error_when_full():
    a = SlotAllocator(1)
    a.allocate()
    with pytest.raises(LookupError):
        a.allocate()


# ---------------------------------------------------------------------------------------------- prefix index
def _keyed(pid: int, key: Optional[bytes]) -> Page:
    return loose_page(pid, D, pid, key)


def test_prefix_index_add_then_get_returns_the_page():
    idx = PrefixIndex()
    p = _keyed(0, b"a")
    assert idx.add(p) and p.indexed
    assert idx.get(b"a") is p and len(idx) == 1


def test_prefix_index_refuses_a_taken_key_or_no_key():
    idx = PrefixIndex()
    first, dup, nokey = _keyed(0, b"a"), _keyed(1, b"a"), _keyed(2, None)
    idx.add(first)
    assert not idx.add(dup) and not dup.indexed
    assert not idx.add(nokey) and not nokey.indexed
    assert idx.get(b"a") is first and len(idx) == 1


def test_prefix_index_match_returns_the_longest_indexed_prefix():
    idx = PrefixIndex()
    pages = [_keyed(i, k) for i, k in enumerate([b"a", b"b", b"d"])]
    for p in pages:
        idx.add(p)
    assert idx.match([b"a", b"b", b"c", b"d"]) == pages[:2]
    assert idx.match([b"x", b"a"]) == []


def test_prefix_index_remove_unindexes_the_page():
    idx = PrefixIndex()
    p = _keyed(0, b"a")
    idx.add(p)
    idx.remove(p)
    assert idx.get(b"a") is None and not p.indexed and len(idx) == 0
    idx.remove(p)  # removing an unindexed page is a no-op
    assert len(idx) == 0


def test_set_key_on_a_duplicate_key_leaves_the_page_unindexed():
    eng = Engine(make(device=4))
    a = eng.new_active(1)
    b = eng.new_active(1)
    assert eng.commit(a) == [True]
    assert eng.commit(b) == [False]
    assert b[0].key == b"k0" and not b[0].indexed
    assert eng.pl.index.get(b"k0") is a[0]


def test_closed_page_with_a_duplicate_key_is_freed():
    eng = Engine(make(device=4))
    a = eng.new_suspended(1)
    b = eng.new_suspended(1)
    eng.commit(a)
    eng.commit(b)
    eng.close(a + b)
    assert not a[0].freed and b[0].freed
    assert eng.pl.alloc[D].free_count == 3


def test_freed_indexed_page_leaves_the_index():
    eng = Engine(make(device=1, host=None))
    a = eng.new_suspended(1)
    eng.commit(a)
    eng.close(a)
    eng.new_active(1)  # drops a
    assert a[0].freed and eng.pl.index.get(b"k0") is None and len(eng.pl.index) == 0


# ---------------------------------------------------------------------------------------------- check_invariants
def test_check_invariants_detects_an_evictable_page_missing_from_its_queue():
    eng = Engine(make(device=2))
    a = eng.new_suspended(1)
    eng.pl.queues[D].remove(a[0])
    with pytest.raises(AssertionError, match="queued"):
        eng.pl.check_invariants()


def test_check_invariants_detects_two_pages_in_one_slot():
    eng = Engine(make(device=2))
    a = eng.new_suspended(2)
    a[1].slot = a[0].slot
    with pytest.raises(AssertionError, match="holds pages"):
        eng.pl.check_invariants()


def test_check_invariants_detects_a_locked_page_off_the_device_level():
    eng = Engine(make(device=1, host=2))
    a = eng.new_suspended(1)
    eng.new_active(1)
    a[0].locks = 1
    eng.pl.queues[H].discard(a[0])
    with pytest.raises(AssertionError, match="locked"):
        eng.pl.check_invariants()


def test_check_invariants_detects_a_leaked_slot():
    eng = Engine(make(device=2))
    eng.new_active(1)
    eng.pl.alloc[D].allocate()
    with pytest.raises(AssertionError, match="allocator counts"):
        eng.pl.check_invariants()


def test_check_invariants_accepts_new_pages_held_the_way_the_manager_grows_a_cache():
    pl = make(device=2)
    pages, plan = pl.plan_new_pages(2, D, 0)
    for p in pages:  # exactly as KVCacheManager._grow does, before running the plan
        p.owners = 1
        p.holds = 1
    pl.check_invariants()
    for m in plan.page_moves():
        complete(pl, m)
    pl.holds_to_locks(pages)
    pl.check_invariants()
    assert all(p.level == D and p.locks == 1 and not p.evictable for p in pages)


# ---------------------------------------------------------------------------------------------- bulk operations
def _three_caches(policy: str) -> tuple[Engine, list[list[Page]]]:
    """Caches spread over the levels: a (committed) and b suspended, c ACTIVE on the device."""
    eng = Engine(Placement([D, H, K], [6, 6, 32], policy=policy))
    a = eng.new_suspended(4)
    eng.commit(a, "a")
    b = eng.new_suspended(4)  # demotes some of a
    c = eng.new_active(3)  # demotes more
    return eng, [a, b, c]


@pytest.mark.parametrize("policy", ["lru", "lru-leaf", "slru"])
def test_hold_release_and_unlock_of_whole_caches_keep_the_queues_exact(policy):
    eng, (a, b, c) = _three_caches(policy)
    pl = eng.pl
    pl.hold_all(a + b)
    assert not any(p in pl.queues[p.level] for p in a + b)  # held: not victims
    pl.check_invariants()
    pl.release_all(b + a)
    assert all(p in pl.queues[p.level] for p in a + b)
    if policy == "lru":  # released pages are the most recently used, in the order released
        assert queue(pl, D) == [p.pid for p in b + a if p.level == D]
    pl.check_invariants()
    pl.unlock_all(c)
    assert all(p in pl.queues[D] for p in c)  # suspended: evictable again
    pl.check_invariants()


def test_holds_to_locks_turns_each_hold_into_a_lock():
    eng, (a, b, c) = _three_caches("lru")
    pl = eng.pl
    eng.suspend(c)
    pl.hold_all(c)
    pl.holds_to_locks(c)
    assert [(p.holds, p.locks) for p in c] == [(0, 1)] * 3 and all(p not in pl.queues[D] for p in c)
    pl.check_invariants()


def test_surely_obtainable_counts_victims_that_fit_one_level_colder():
    eng = Engine(make(device=4, host=3, disk=None))
    eng.new_suspended(4)  # device full of evictable pages, host empty
    pl = eng.pl
    assert pl.alloc[D].free_count == 0
    assert pl.surely_obtainable(0, 3)  # three victims, three free host slots
    assert not pl.surely_obtainable(0, 4)  # the fourth victim may have nowhere to go: run the full draft
    assert not pl.surely_obtainable(1, 4)  # host: 3 free, nothing evictable there


_CACHE = st.tuples(st.integers(1, 5), st.booleans(), st.sampled_from(["active", "suspended", "closed"]))
_POLICY = st.sampled_from(["lru", "lru-leaf", "slru"])


#: level configurations for the random states: roomy, and small enough that room cascades down and drops
_SHAPES = [((D, H, K), (6, 6, 12)), ((D, H, K), (3, 3, 4)), ((D, H), (3, 4)), ((D, H, K), (5, 4, 6)), ((D, H), (5, 5))]


def _random_state(caches, policy: str, shape: int = 0) -> tuple[Engine, list[list[Page]]]:
    """Caches made, committed, suspended and closed as drawn; those that did not fit are skipped."""
    levels, slots = _SHAPES[shape]
    eng = Engine(Placement(list(levels), list(slots), policy=policy))
    made = []
    for k, (size, commit, state) in enumerate(caches):
        try:
            pages = eng.new_active(size)
        except CapacityError:
            continue
        if commit:
            eng.commit(pages, f"c{k}-")
        if state != "active":
            eng.suspend(pages)
        if state == "closed":
            eng.close(pages)
        else:
            made.append(pages)
    return eng, made


@settings(max_examples=300, deadline=None)
@given(st.lists(_CACHE, min_size=1, max_size=8), _POLICY, st.integers(0, 2), st.integers(1, 24))
def test_surely_obtainable_never_promises_what_the_full_draft_cannot_get(caches, policy, level_i, n):
    eng, _ = _random_state(caches, policy)
    if eng.pl.surely_obtainable(level_i, n):
        assert len(_Draft(eng.pl).acquire(level_i, n)) == n


def _page_moves(plan: Plan) -> list[tuple]:
    """Everything each page move says, by page: slots, the pages of ``after`` and ``successor``, the flags."""
    return sorted(((m.page.pid, m.src, m.src_slot, m.dst, m.dst_slot, m.after.page.pid if m.after else None,
                    m.successor.page.pid if m.successor else None, m.handoff, m.swap) for m in plan.page_moves()),
                  key=lambda t: t[0])


@settings(max_examples=400, deadline=None)
@given(st.lists(_CACHE, min_size=1, max_size=8), _POLICY, st.integers(1, 8), st.integers(0, 7),
       st.sampled_from([D, H]), st.integers(0, len(_SHAPES) - 1), st.booleans())
def test_plans_without_a_draft_equal_the_drafted_plans(caches, policy, n, which, target, shape, settle):
    """The no-draft fast paths (free slots, victims into free slots one level colder; cascades down the
    levels that drop the last level's first candidates; host pages swapped with device victims) plan exactly
    what the full draft plans: same moves, same slots, same links, same drops, same state after. ``settle``:
    the new pages' plan runs before the promotion (full levels of settled pages: swaps)."""
    results = []
    for fast, eng, made in _both_paths(caches, policy, shape):
        pl = eng.pl
        try:
            _, plan = pl.plan_new_pages(n, D, 0)
            new = (_page_moves(plan), plan.dropped, dict(pl.counters))
            if settle:
                run_plan(pl, plan)
        except CapacityError:
            new = "capacity"
        suspended = [c for c in made if not c[0].locks]
        promoted = None
        if suspended:
            pages = suspended[which % len(suspended)]
            pl.hold_all(pages)
            try:
                promoted = _page_moves(pl.plan_promotion(pages, target, require_all=False))
            except CapacityError:
                promoted = "capacity"
        results.append((new, promoted, _comparable(pl)))
    assert results[0] == results[1]


def _both_paths(caches, policy, shape):
    """The same random state twice: (True, engine, caches) with the no-draft fast paths, then (False, ...)
    with every plan drafted."""
    for fast in (True, False):
        eng, made = _random_state(caches, policy, shape)
        if not fast:
            _force_the_draft(eng.pl)
        yield fast, eng, made


def _force_the_draft(pl: Placement) -> None:
    """Turn every no-draft fast path of ``pl`` off."""
    pl._room_is_simple = lambda i, n: False
    pl._cascade = lambda i, n: None
    pl._swap_counts = lambda ti, colder: None


def _comparable(pl: Placement) -> dict:
    """:func:`snapshot` with each page's move as what it says (destination level and slot), not an object."""
    shot = snapshot(pl)
    for pid, state in shot["pages"].items():
        mv = state[2]
        slot = mv.dst_slots[mv.pids.tolist().index(pid)] if mv else None
        shot["pages"][pid] = state[:2] + ((mv.dst, slot) if mv else None,) + state[3:]
    return shot


_SWAP_CACHE = st.tuples(st.integers(1, 5), st.booleans(), st.sampled_from(["suspended", "suspended", "closed"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_SWAP_CACHE, min_size=2, max_size=10), _POLICY, st.integers(0, 7), st.integers(1, len(_SHAPES) - 1),
       st.sets(st.integers(0, 15), max_size=3))
def test_swap_promotions_without_a_draft_equal_the_drafted_plans(caches, policy, which, shape, fail):
    """Promoting a cache wholly on the host to a full device, with the host full too (the draft swaps device
    victims into the promoted pages' host slots): the fast path plans exactly the draft's page moves, and its
    multi-page moves run (some pages failing) to a consistent state."""
    results = []
    for fast, eng, made in _both_paths(caches, policy, shape):
        pl = eng.pl
        assume(made)
        on_host = [c for c in made if all(p.level is H for p in c)] or made
        pages = on_host[which % len(on_host)]
        pl.hold_all(pages)
        plan = pl.plan_promotion(pages, D, require_all=False)
        results.append((_page_moves(plan), plan.dropped, _comparable(pl)))
        if fast:
            moves = plan.page_moves()
            run_plan(pl, plan, fail=[moves[k] for k in fail if k < len(moves)])
            pl.release_all(pages)
            pl.check_invariants()
    assert results[0] == results[1]


def _drop_scenario() -> "Engine":
    """Room for two device pages needs drops (a's committed pages leave the last level): no chunking."""
    eng = Engine(make(device=2, host=2))
    a = eng.new_suspended(2)
    eng.commit(a)
    eng.close(a)
    eng.new_suspended(2)  # a -> host
    return eng


def _skip_scenario() -> "Engine":
    """Room for two device pages needs drops, and the host's first eviction candidate cannot be dropped (a
    suspended cache's page): the draft passes it over, so only a draft plans this."""
    eng = Engine(make(device=2, host=3))
    eng.new_suspended(1)  # x: the host's oldest page once a arrives
    a = eng.new_suspended(2)  # x -> host
    eng.commit(a)
    eng.close(a)
    eng.new_suspended(2)  # a -> host, after x
    return eng


def _moves(plan: Plan) -> list[tuple]:
    """The plan's page moves by page (a draft plans page by page, the fast path a move per kind)."""
    return sorted(((m.page.pid, m.src, m.src_slot, m.dst, m.dst_slot, m.after is not None) for m in plan.page_moves()),
                  key=lambda t: t[0])


def test_a_plan_made_from_its_check_applies_that_draft_instead_of_drafting_again(monkeypatch):
    drafts = []
    real = Placement._draft_new_pages
    monkeypatch.setattr(Placement, "_draft_new_pages", lambda self, n, lvl: drafts.append(n) or real(self, n, lvl))
    fresh = _skip_scenario()
    fresh_pages, fresh_plan = fresh.pl.plan_new_pages(2, D, 0)  # drafts on its own
    assert drafts == [2]
    eng = _skip_scenario()
    room = eng.pl.check_new_pages(2, D)
    assert not room.chunked and not room.cascade  # counts on drops, past a page it cannot drop
    pages, plan = eng.pl.plan_new_pages(2, D, 0, check=room)
    assert drafts == [2, 2]  # the check's draft only: the plan did not draft again
    assert _moves(plan) == _moves(fresh_plan) and plan.dropped == fresh_plan.dropped == 2
    assert room.take() is None  # a draft is used once
    for p in pages:
        p.owners = 1
    run_plan(eng.pl, plan)


def test_a_cascade_that_drops_is_planned_without_a_draft_and_in_one_step(monkeypatch):
    """New pages whose room cascades device -> host with the host's first candidates droppable: the check
    drafts nothing and is not chunked (a drop's page could be reused between chunks); the plan drafts
    nothing either, and is what the draft would plan, slot for slot."""
    drafts = []
    real = Placement._draft_new_pages
    monkeypatch.setattr(Placement, "_draft_new_pages", lambda self, n, lvl: drafts.append(n) or real(self, n, lvl))
    eng = _drop_scenario()
    room = eng.pl.check_new_pages(2, D)
    assert room.cascade and not room.chunked and room.take() is None
    pages, plan = eng.pl.plan_new_pages(2, D, 0, check=room)
    assert drafts == [] and plan.dropped == 2 and eng.pl.counters["drops"] == 2
    drafted = _drop_scenario()
    drafted.pl._cascade = lambda i, n: None
    d_pages, d_plan = drafted.pl.plan_new_pages(2, D, 0)
    assert drafts == [2]
    assert _moves(plan) == _moves(d_plan) and d_plan.dropped == 2
    new = [m for m in plan.page_moves() if m.src is None]
    demoted = [m for m in plan.page_moves() if m.src == D]
    assert len(new) == len(demoted) == 2
    assert all(m.after is None and m.dst == H for m in demoted)  # into the dropped pages' slots: nothing to wait for
    assert [m.after.page for m in new] == [m.page for m in demoted]  # each new page waits for its slot's victim
    for p in pages:
        p.owners = 1
    run_plan(eng.pl, plan)
    eng.pl.check_invariants()


def test_a_promotion_from_disk_that_cascades_is_planned_without_a_draft(monkeypatch):
    """Promoting a disk cache to a full device whose victims cascade into a full host and on to the disk:
    planned as a few moves per level (no draft), exactly the drafted plan."""
    drafts = []
    real = Placement._draft_promotion
    monkeypatch.setattr(Placement, "_draft_promotion",
                        lambda self, colder, ti, req: drafts.append(len(colder)) or real(self, colder, ti, req))

    def scenario():
        eng = Engine(make(device=2, host=2, disk=4))
        a = eng.new_suspended(2)
        eng.new_suspended(2)  # a -> host
        eng.new_suspended(2)  # a -> disk, b -> host: device and host full
        assert {p.level for p in a} == {K}
        eng.pl.hold_all(a)
        return eng, a

    eng, a = scenario()
    plan = eng.pl.plan_promotion(a, D, require_all=True)
    assert drafts == []
    assert len(plan.moves) == 3  # host -> disk, device -> host, disk -> device: one move each
    drafted, da = scenario()
    drafted.pl._cascade = lambda i, n: None
    d_plan = drafted.pl.plan_promotion(da, D, require_all=True)
    assert drafts == [2] and _moves(plan) == _moves(d_plan)
    run_plan(eng.pl, plan)
    assert {p.level for p in a} == {D}
    eng.pl.check_invariants()


def test_a_promotion_planned_from_its_check_matches_a_fresh_plan():
    def scenario():
        eng = Engine(make(device=2, host=2, disk=2))
        a = eng.new_suspended(2)
        eng.commit(a)
        eng.close(a)
        b = eng.new_suspended(2)  # a -> host
        eng.new_suspended(2)  # b -> host, a -> disk: the device and host are full, the disk too
        return eng, b

    fresh, fb = scenario()
    fresh.pl.hold_all(fb)
    fresh_plan = fresh.pl.plan_promotion(fb, D, require_all=True)
    eng, b = scenario()
    eng.pl.hold_all(b)
    room = eng.pl.check_promotion(b, D)
    assert not room.chunked  # swaps between full levels: the draft decides
    plan = eng.pl.plan_promotion(b, D, require_all=True, check=room)
    assert _moves(plan) == _moves(fresh_plan) and plan.dropped == fresh_plan.dropped
    run_plan(eng.pl, plan)


def test_a_promotion_aborted_after_its_swap_victim_was_staged_leaves_the_victim_to_its_batch():
    """Regression (slru stress WrongBytes): aborting the promotion used to abort the staged victim too, so
    its slot could be planned again while its batch still meant to write the staged bytes back there."""
    eng = Engine(make(device=1, host=1))
    a = eng.new_suspended(1)
    b = eng.new_suspended(1)  # a -> host; both levels full
    before = where(a + b)
    pl = eng.pl
    pl.hold_all([a[0]])
    plan = pl.plan_promotion(a, D, require_all=True)
    victim = next(m for m in plan.page_moves() if m.page is b[0])
    promo = next(m for m in plan.page_moves() if m.page is a[0])
    stage(pl, victim)  # the victim's bytes are in staging
    pl.check_invariants()
    abort(pl, promo)  # e.g. its run was stopped before it copied
    assert victim.state is MoveState.STAGED and b[0].move is victim.move  # not cascaded: still its batch's
    assert b[0] not in pl.queues[D]  # not evictable: nothing can plan its slot yet
    pl.check_invariants()
    abort(pl, victim)  # its batch wrote the staged bytes back and settles it
    assert victim.state is MoveState.ABORTED and b[0].move is None
    pl.release_all([a[0]])
    assert where(a + b) == before
    pl.check_invariants()
