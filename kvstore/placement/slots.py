"""Slot allocator of one level: fixed slots, lowest free slot first (keeps a cache's pages contiguous).

The free slots are kept as sorted, disjoint, non-adjacent half-open ranges ``[starts[i], ends[i])`` in two
int64 numpy arrays, so memory and the cost of building, growing and shrinking depend on how fragmented the
free space is, never on how many slots there are: a fresh allocator of 2**25 slots is one range.

Bulk calls are numpy passes with no Python per slot or per range: :meth:`SlotAllocator.allocate_array`
reads only the first ``n`` ranges, :meth:`SlotAllocator.release_many` merges its slots into the ranges in
O(ranges + slots). Single-slot calls (drafts, recovery) find their range with a binary search; taking the
lowest slot or releasing next to a free one changes one entry in place, splitting or adding a range
copies the arrays once (a C memcpy).
"""

from __future__ import annotations

from typing import Iterable, Union

import numpy as np

_NONE = np.zeros(0, dtype=np.int64)
_FEW_TAKES = 8  # up to this many slots, allocate_array takes them one at a time (cheaper than a numpy pass)
_FEW_RELEASES = 64  # below this many slots, release_many releases them one at a time


def _insert(a: np.ndarray, i: int, v: int) -> np.ndarray:
    """``a`` with ``v`` inserted before index ``i`` (np.insert costs ~10x more for one value)."""
    out = np.empty(a.size + 1, dtype=np.int64)
    out[:i] = a[:i]
    out[i] = v
    out[i + 1 :] = a[i:]
    return out


def _delete(a: np.ndarray, i: int) -> np.ndarray:
    """``a`` without index ``i``: a view when ``i`` is an end."""
    if i == 0:
        return a[1:]
    if i == a.size - 1:
        return a[:-1]
    return np.concatenate((a[:i], a[i + 1 :]))


class SlotAllocator:
    """Tracks which of ``total`` slots are free. ``limit`` < total hides the top slots while a shrink runs."""

    def __init__(self, total: int) -> None:
        if total < 0:
            raise ValueError(f"a slot allocator needs total >= 0, got {total}")
        self.total = total
        self._s = np.array([0] if total else [], dtype=np.int64)  # free range i: [_s[i], _e[i]), ascending
        self._e = np.array([total] if total else [], dtype=np.int64)
        self._nfree = total
        self._limit = total
        self._above = 0  # free slots >= limit (kept up to date so that free_count is O(1))

    # ------------------------------------------------------------------ counters
    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, limit: int) -> None:
        """Hide the slots >= ``limit`` from :meth:`allocate` and :attr:`free_count`: O(free ranges above it)."""
        self._limit = limit
        self._above = self._free_from(limit)

    @property
    def free_count(self) -> int:
        """Free slots below ``limit``."""
        return self._nfree - self._above

    @property
    def used_count(self) -> int:
        return self.total - self._nfree

    def _free_from(self, slot: int) -> int:
        """Free slots >= ``slot`` (O(free ranges above ``slot``), in numpy)."""
        j = int(np.searchsorted(self._e, slot, side="right"))  # the ranges from j on end above slot
        if j == self._e.size:
            return 0
        s, e = self._s[j:], self._e[j:]
        return int(e.sum() - s.sum()) - max(0, slot - int(s[0]))

    def free_ranges(self) -> list[tuple[int, int]]:
        """The free slots as ascending, disjoint, non-adjacent ``(start, end)`` half-open ranges."""
        return list(zip(self._s.tolist(), self._e.tolist()))

    # ------------------------------------------------------------------ queries
    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.total:
            raise IndexError(f"slot {slot} is outside the allocator's {self.total} slots")

    def _range_of(self, slot: int) -> int:
        """Index of the last range starting at or below ``slot`` (-1: none)."""
        return int(np.searchsorted(self._s, slot, side="right")) - 1

    def is_free(self, slot: int) -> bool:
        self._check(slot)
        i = self._range_of(slot)
        return i >= 0 and slot < self._e.item(i)

    # ------------------------------------------------------------------ allocate / take / release
    def allocate(self) -> int:
        """Take the lowest free slot below ``limit``; raise LookupError if none. O(1)."""
        s, e = self._s, self._e
        if not s.size or s.item(0) >= self._limit:
            raise LookupError("no free slot")
        slot = s.item(0)
        if slot + 1 == e.item(0):
            self._s, self._e = s[1:], e[1:]
        else:
            s[0] = slot + 1
        self._nfree -= 1
        return slot

    def allocate_array(self, n: int) -> np.ndarray:
        """Take the ``n`` lowest free slots below ``limit``, ascending, as an int64 array: one numpy pass over
        the first ``n`` ranges at most, however fragmented the level. All or nothing: LookupError and no
        change if fewer than ``n`` are free below the limit."""
        if n < 0:
            raise ValueError(f"allocate_array() needs n >= 0, got {n}")
        if n > self.free_count:
            raise LookupError(f"no {n} free slots (only {self.free_count} below the limit)")
        if n <= _FEW_TAKES:
            return np.array([self.allocate() for _ in range(n)], dtype=np.int64)
        m = min(self._s.size, n)  # every range holds a slot at least: the n lowest slots lie in the first m
        lo, hi = self._s[:m], self._e[:m]
        lens = hi - lo
        ends = np.cumsum(lens)
        k = int(np.searchsorted(ends, n))  # the range holding the n-th slot
        take = lens[: k + 1].copy()
        take[k] = n - (int(ends[k - 1]) if k else 0)
        first = np.cumsum(take) - take  # index in the result of each range's first slot
        slots = np.repeat(lo[: k + 1] - first, take) + np.arange(n, dtype=np.int64)
        if take[k] == lens[k]:  # range k is used up too
            self._s, self._e = self._s[k + 1 :], self._e[k + 1 :]
        else:  # range k keeps its top slots
            self._s, self._e = self._s[k:], self._e[k:]
            self._s[0] = int(lo[k]) + int(take[k])
        self._nfree -= n
        return slots

    def take(self, slot: int) -> None:
        """Mark a given free slot used (recovery of a persistent tier)."""
        self._check(slot)
        i = self._range_of(slot)
        if i < 0 or slot >= self._e.item(i):
            raise RuntimeError(f"slot {slot} is already used")
        lo, hi = self._s.item(i), self._e.item(i)
        if hi - lo == 1:
            self._s, self._e = _delete(self._s, i), _delete(self._e, i)
        elif slot == lo:
            self._s[i] = slot + 1
        elif slot == hi - 1:
            self._e[i] = slot
        else:  # split [lo, hi) into [lo, slot) and [slot + 1, hi)
            self._s = _insert(self._s, i + 1, slot + 1)
            self._e = _insert(self._e, i, slot)
        self._nfree -= 1
        if slot >= self._limit:
            self._above -= 1

    def release(self, slot: int) -> None:
        self._check(slot)
        s, e = self._s, self._e
        i = self._range_of(slot)  # the last range starting at or below slot
        if i >= 0 and slot < e.item(i):
            raise RuntimeError(f"slot {slot} released twice")
        joins_left = i >= 0 and e.item(i) == slot
        joins_right = i + 1 < s.size and s.item(i + 1) == slot + 1
        if joins_left and joins_right:
            self._s, self._e = _delete(s, i + 1), _delete(e, i)
        elif joins_left:
            e[i] = slot + 1
        elif joins_right:
            s[i + 1] = slot
        else:
            self._s, self._e = _insert(s, i + 1, slot), _insert(e, i + 1, slot + 1)
        self._nfree += 1
        if slot >= self._limit:
            self._above += 1

    def release_many(self, slots: Union[np.ndarray, Iterable[int]]) -> None:
        """Release every slot of ``slots`` at once (a cache closing, a shrink): one merge of the sorted slots
        with the free ranges, in numpy, O(ranges + slots). All or nothing: RuntimeError and no change if a
        slot is free already (or given twice)."""
        new = np.sort(slots if isinstance(slots, np.ndarray) else np.fromiter(slots, dtype=np.int64))
        if new.size == 0:
            return
        if new[0] < 0 or new[-1] >= self.total:
            bad = int(new[0]) if new[0] < 0 else int(new[-1])
            raise IndexError(f"slot {bad} is outside the allocator's {self.total} slots")
        if new.size < _FEW_RELEASES:  # a few: one update each, taken back if one of them is refused
            done: list[int] = []
            try:
                for slot in new.tolist():
                    self.release(slot)
                    done.append(slot)
            except RuntimeError:
                for slot in done:
                    self.take(slot)
                raise RuntimeError("release_many() was given a slot that is free already (or twice)") from None
            return
        brk = np.flatnonzero(new[1:] != new[:-1] + 1) + 1  # runs of consecutive slots
        run_s = new[np.concatenate(([0], brk))]
        run_e = new[np.concatenate((brk - 1, [new.size - 1]))] + 1
        at = np.searchsorted(self._s, run_s)  # both sorted: inserting keeps the starts sorted
        starts = np.insert(self._s, at, run_s)
        ends = np.insert(self._e, at, run_e)
        if (starts[1:] < ends[:-1]).any() or (new[1:] == new[:-1]).any():
            raise RuntimeError("release_many() was given a slot that is free already (or twice)")
        first = np.concatenate(([True], starts[1:] != ends[:-1]))  # a range that does not touch the previous
        last = np.concatenate((first[1:], [True]))
        self._s, self._e = starts[first], ends[last]
        self._nfree += int(new.size)
        self._above += int(np.count_nonzero(new >= self._limit))

    # ------------------------------------------------------------------ resize
    def grow(self, total: int) -> None:
        """Add the free slots ``[total before, total)``; the limit becomes the new total.
        O(1) when the top slot was free, else O(free ranges)."""
        old = self.total
        if total < old:
            raise ValueError(f"grow() to {total} slots from {old}: use shrink()")
        if total > old:
            if self._e.size and self._e.item(-1) == old:  # the top free range reaches the old total: extend it
                self._e[-1] = total
            else:
                self._s = np.append(self._s, old)
                self._e = np.append(self._e, total)
            self._nfree += total - old
        self.total = self._limit = total
        self._above = 0

    def shrink(self, total: int) -> None:
        """Drop slots >= total; they must all be free. The limit becomes the new total.
        RuntimeError and no change if any is used. O(1), or O(free ranges) if the top range goes."""
        old = self.total
        if not 0 <= total <= old:
            raise ValueError(f"shrink() to {total} slots from {old}: use grow()")
        if total < old:
            s, e = self._s, self._e
            if not (e.size and e.item(-1) == old and s.item(-1) <= total):  # [total, old) is not one free range
                raise RuntimeError("shrinking a slot allocator over used slots")
            if s.item(-1) == total:
                self._s, self._e = s[:-1], e[:-1]
            else:
                e[-1] = total
            self._nfree -= old - total
        self.total = self._limit = total
        self._above = 0
