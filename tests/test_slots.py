"""SlotAllocator (free slots held as ranges) against a trivial reference model: a set of free slots."""

from __future__ import annotations

import random
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.placement import SlotAllocator


class RefAllocator:
    """The specification, one Python int per free slot."""

    def __init__(self, total: int) -> None:
        self.total = self.limit = total
        self.free = set(range(total))

    @property
    def free_count(self) -> int:
        return sum(1 for s in self.free if s < self.limit)

    @property
    def used_count(self) -> int:
        return self.total - len(self.free)

    def allocate(self) -> int:
        below = [s for s in self.free if s < self.limit]
        if not below:
            raise LookupError("no free slot")
        s = min(below)
        self.free.remove(s)
        return s

    def allocate_many(self, n: int) -> list[int]:
        below = sorted(s for s in self.free if s < self.limit)
        if n > len(below):
            raise LookupError
        self.free -= set(below[:n])
        return below[:n]

    def take(self, slot: int) -> None:
        if slot not in self.free:
            raise RuntimeError
        self.free.remove(slot)

    def release(self, slot: int) -> None:
        if slot in self.free:
            raise RuntimeError
        self.free.add(slot)

    def grow(self, total: int) -> None:
        self.free |= set(range(self.total, total))
        self.total = self.limit = total

    def shrink(self, total: int) -> None:
        if any(s not in self.free for s in range(total, self.total)):
            raise RuntimeError
        self.free -= set(range(total, self.total))
        self.total = self.limit = total


def ranges_of(free: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s in sorted(free):
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out


def assert_same(a: SlotAllocator, ref: RefAllocator) -> None:
    assert (a.total, a.limit, a.free_count, a.used_count) == (ref.total, ref.limit, ref.free_count, ref.used_count)
    assert a.free_ranges() == ranges_of(ref.free)


def outcome(fn, *args):
    """(result, exception type) of a call: both sides must agree on both."""
    try:
        return fn(*args), None
    except (LookupError, RuntimeError) as e:
        return None, type(e)


OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["allocate", "allocate_array", "take", "take_free", "release", "release_used"]
            + ["grow", "shrink", "shrink_near_used", "limit", "is_free"]
        ),
        st.integers(0, 40),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(total=st.integers(0, 24), ops=OPS)
def test_slot_allocator_matches_a_set_of_free_slots(total, ops):
    a, ref = SlotAllocator(total), RefAllocator(total)
    assert_same(a, ref)
    for op, x in ops:
        if op == "allocate":
            assert outcome(a.allocate) == outcome(ref.allocate)
        elif op == "allocate_array":
            n = x % 10
            got, err = outcome(a.allocate_array, n)
            want, ref_err = outcome(ref.allocate_many, n)
            assert err is ref_err
            if got is not None:
                assert got.tolist() == want
        elif ref.total == 0 and op in ("take", "take_free", "release", "release_used", "is_free"):
            with pytest.raises(IndexError):
                getattr(a, {"take_free": "take", "release_used": "release"}.get(op, op))(x)
            continue
        elif op in ("take", "take_free"):
            free = sorted(ref.free)
            slot = free[x % len(free)] if op == "take_free" and free else x % ref.total
            assert outcome(a.take, slot) == outcome(ref.take, slot)
        elif op in ("release", "release_used"):
            used = sorted(set(range(ref.total)) - ref.free)
            slot = used[x % len(used)] if op == "release_used" and used else x % ref.total
            assert outcome(a.release, slot) == outcome(ref.release, slot)
        elif op == "is_free":
            slot = x % ref.total
            assert a.is_free(slot) == (slot in ref.free)
        elif op == "grow":
            a.grow(ref.total + x % 9)
            ref.grow(ref.total + x % 9)
        elif op in ("shrink", "shrink_near_used"):
            t = x % (ref.total + 1)
            if op == "shrink_near_used":  # just at, above or below the highest used slot
                top = max(set(range(ref.total)) - ref.free, default=0)
                t = min(max(top + x % 3 - 1, 0), ref.total)
            assert outcome(a.shrink, t) == outcome(ref.shrink, t)
        elif op == "limit":
            a.limit = ref.limit = x % (ref.total + 1)
        assert_same(a, ref)


# ---------------------------------------------------------------------------------------------- behaviour
def test_allocate_gives_the_lowest_free_slot_below_the_limit():
    a = SlotAllocator(8)
    assert [a.allocate() for _ in range(3)] == [0, 1, 2]
    a.release(1)
    a.take(6)
    a.limit = 2
    assert a.free_count == 1
    assert a.allocate() == 1
    with pytest.raises(LookupError, match="no free slot"):
        a.allocate()
    a.release(6)  # hidden above the limit
    assert a.free_count == 0 and a.used_count == 3
    a.limit = a.total
    assert a.free_count == 5 and a.allocate() == 3


def test_take_and_release_split_and_merge_ranges():
    a = SlotAllocator(10)
    a.take(4)
    a.take(7)
    assert a.free_ranges() == [(0, 4), (5, 7), (8, 10)]
    assert not a.is_free(4) and a.is_free(5)
    a.release(7)
    a.release(4)
    assert a.free_ranges() == [(0, 10)]


def test_allocate_array_is_all_or_nothing():
    a = SlotAllocator(10)
    a.take(2)
    a.take(5)
    a.limit = 8
    with pytest.raises(LookupError):
        a.allocate_array(7)  # 6 free below the limit
    assert a.free_ranges() == [(0, 2), (3, 5), (6, 10)] and a.free_count == 6
    assert a.allocate_array(4).tolist() == [0, 1, 3, 4]
    assert a.allocate_array(0).tolist() == []
    assert a.free_ranges() == [(6, 10)] and a.free_count == 2


def test_allocate_array_takes_the_lowest_slots_of_a_fragmented_level():
    """Every other slot used (the scattered benchmark layout): one call takes hundreds of one-slot ranges and
    cuts the range it ends in."""
    a = SlotAllocator(2000)
    for s in range(0, 1000, 2):
        a.take(s)
    got = a.allocate_array(600)
    assert got.dtype == np.int64 and got.tolist() == list(range(1, 1000, 2)) + list(range(1000, 1100))
    assert a.free_ranges() == [(1100, 2000)] and a.free_count == 900


def test_errors():
    a = SlotAllocator(4)
    s = a.allocate()
    a.release(s)
    with pytest.raises(RuntimeError, match="released twice"):
        a.release(s)
    a.take(3)
    with pytest.raises(RuntimeError, match="already used"):
        a.take(3)
    with pytest.raises(RuntimeError, match="used slots"):
        a.shrink(2)
    assert a.total == 4 and a.limit == 4 and a.free_ranges() == [(0, 3)]  # a refused shrink changes nothing
    for bad in (-1, 4):
        for op in (a.take, a.release, a.is_free):
            with pytest.raises(IndexError):
                op(bad)
    with pytest.raises(ValueError):
        a.grow(3)
    with pytest.raises(ValueError):
        a.shrink(5)
    with pytest.raises(ValueError):
        a.allocate_array(-1)
    with pytest.raises(ValueError):
        SlotAllocator(-1)


def test_shrink_to_a_free_tail_and_grow_back_merge():
    a = SlotAllocator(6)
    assert [a.allocate() for _ in range(2)] == [0, 1]
    a.limit = 3
    assert a.free_count == 1
    a.shrink(3)
    assert (a.total, a.limit, a.free_count, a.used_count) == (3, 3, 1, 2)
    a.grow(5)
    assert a.free_ranges() == [(2, 5)] and a.limit == 5
    a.shrink(2)
    assert a.free_ranges() == [] and a.free_count == 0
    a.grow(3)
    assert a.free_ranges() == [(2, 3)]


# ---------------------------------------------------------------------------------------------- scale
def test_a_huge_allocator_costs_memory_per_free_range_not_per_slot():
    """2**25 slots (a 1 TiB disk tier of 32 KiB pages): building, growing, hiding the top and shrinking
    touch a handful of ranges. Checked by memory and range counts, not by wall time."""
    tracemalloc.start()
    try:
        a = SlotAllocator(2**25)
        assert a.free_ranges() == [(0, 2**25)]
        a.grow(2**26)
        assert a.free_ranges() == [(0, 2**26)] and a.free_count == 2**26
        assert [a.allocate() for _ in range(3)] == [0, 1, 2]
        a.take(2**25 + 7)  # a used slot in the top half
        a.limit = 2**24
        assert a.free_count == 2**24 - 3
        with pytest.raises(RuntimeError):
            a.shrink(2**24)
        a.release(2**25 + 7)
        assert a.free_count == 2**24 - 3  # released above the limit: still hidden
        a.shrink(2**24)
        assert a.free_ranges() == [(3, 2**24)] and a.used_count == 3 and a.free_count == 2**24 - 3
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # the old allocator held an int per slot: over 1 GB here


@pytest.mark.parametrize("seed", range(40))
def test_release_many_is_the_same_as_releasing_one_by_one(seed):
    rng = random.Random(seed)
    n = rng.randrange(1, 400)
    one, many = SlotAllocator(n), SlotAllocator(n)
    used = [one.allocate() for _ in range(rng.randrange(0, n + 1))]
    for _ in used:
        many.allocate()
    if seed % 3 == 0 and n > 4:
        one.limit = many.limit = n - 3
    going = rng.sample(used, rng.randrange(0, len(used) + 1))
    for s in going:
        one.release(s)
    many.release_many(going)
    assert many.free_ranges() == one.free_ranges()
    assert (many.free_count, many.used_count) == (one.free_count, one.used_count)


def test_release_many_refuses_a_free_or_repeated_slot_and_changes_nothing():
    a = SlotAllocator(8)
    for _ in range(6):
        a.allocate()
    before = a.free_ranges()
    with pytest.raises(RuntimeError, match="free already"):
        a.release_many([1, 6])  # 6 is free
    with pytest.raises(RuntimeError, match="free already"):
        a.release_many([2, 2])
    with pytest.raises(IndexError):
        a.release_many([9])
    assert a.free_ranges() == before and a.free_count == 2


def test_release_many_refuses_a_free_slot_among_many_and_changes_nothing():
    """The same refusal on the numpy merge path (64 slots or more; fewer are checked one by one)."""
    a = SlotAllocator(300)
    a.allocate_array(200)
    before = a.free_ranges()
    with pytest.raises(RuntimeError, match="free already"):
        a.release_many(list(range(100)) + [250])  # 250 is free
    with pytest.raises(RuntimeError, match="free already"):
        a.release_many(list(range(100)) + [5])  # 5 twice
    assert a.free_ranges() == before and a.free_count == 100


def test_release_many_of_64k_scattered_slots():
    """(One by one, 64k scattered releases cost ~4 s of list inserts; at once ~0.02 s: see release_many.)"""
    n = 1 << 17
    a = SlotAllocator(n)
    a.allocate_array(n)
    a.release_many(range(1, n, 2))
    assert a.free_count == n // 2 and a.free_ranges()[:2] == [(1, 2), (3, 4)] and a.free_ranges()[-1] == (n - 1, n)
    a.release_many(range(0, n, 2))
    assert a.free_ranges() == [(0, n)]
