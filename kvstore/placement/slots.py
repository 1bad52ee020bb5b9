"""Slot allocator of one level: fixed slots, lowest free slot first (keeps a cache's pages contiguous).

The free slots are kept as sorted, disjoint, non-adjacent ranges, so memory and the cost of building,
growing and shrinking depend on how fragmented the free space is, never on how many slots there are: a
fresh allocator of 2**25 slots is one range.

The ranges are stored mirrored, as half-open ranges ``[a, b)`` of ``y = -1 - slot`` in two ascending
lists, so that the LOWEST free slots sit at the END of the lists: allocate() (which always takes the
lowest free slot) and a release below every free slot pop or append there in O(1). Other lookups bisect
(O(log ranges)); splitting or merging a range elsewhere inserts into or deletes from the lists, a C
memmove of the entries of the lower ranges (nothing at all when taking the end of a range or releasing a
slot next to a free one). Slot range ``[s, e)`` is ``[-e, -s)`` mirrored.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Iterable

import numpy as np


class SlotAllocator:
    """Tracks which of ``total`` slots are free. ``limit`` < total hides the top slots while a shrink runs."""

    def __init__(self, total: int) -> None:
        if total < 0:
            raise ValueError(f"a slot allocator needs total >= 0, got {total}")
        self.total = total
        # mirrored free range i: slots y in [_a[i], _b[i]) with y = -1 - slot; ascending, so slot-descending
        self._a: list[int] = [-total] if total else []
        self._b: list[int] = [0] if total else []
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
        """Free slots >= ``slot``, i.e. mirrored y < -slot (O(free ranges above ``slot``))."""
        a, b, y = self._a, self._b, -slot
        j = bisect_left(a, y)  # ranges 0..j-1 start (mirrored) below y; only the last may reach past it
        if j == 0:
            return 0
        return sum(b[:j]) - sum(a[:j]) - max(0, b[j - 1] - y)  # sums in C: no Python loop per range

    def free_ranges(self) -> list[tuple[int, int]]:
        """The free slots as ascending, disjoint, non-adjacent ``(start, end)`` half-open ranges."""
        return [(-b, -a) for a, b in zip(reversed(self._a), reversed(self._b))]

    # ------------------------------------------------------------------ queries
    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.total:
            raise IndexError(f"slot {slot} is outside the allocator's {self.total} slots")

    def is_free(self, slot: int) -> bool:
        self._check(slot)
        y = -1 - slot
        i = bisect_right(self._a, y) - 1
        return i >= 0 and y < self._b[i]

    # ------------------------------------------------------------------ allocate / take / release
    def allocate(self) -> int:
        """Take the lowest free slot below ``limit``; raise LookupError if none. O(1)."""
        a, b = self._a, self._b
        if not b or -b[-1] >= self._limit:
            raise LookupError("no free slot")
        y = b[-1] - 1
        if y == a[-1]:
            a.pop()
            b.pop()
        else:
            b[-1] = y
        self._nfree -= 1
        return -1 - y

    def allocate_array(self, n: int) -> np.ndarray:
        """Take the ``n`` lowest free slots below ``limit``, ascending, as an int64 array: one numpy pass over
        the ranges taken however fragmented they are. All or nothing: LookupError and no change if fewer
        than ``n`` are free below the limit."""
        if n < 0:
            raise ValueError(f"allocate_array() needs n >= 0, got {n}")
        if n > self.free_count:
            raise LookupError(f"no {n} free slots (only {self.free_count} below the limit)")
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        a, b = self._a, self._b
        m = min(len(a), n)  # every range holds a slot at least: the n lowest slots lie in the last m ranges
        lo = np.asarray(a[len(a) - m:][::-1], dtype=np.int64)  # mirrored ranges [lo, hi), lowest slots first
        hi = np.asarray(b[len(b) - m:][::-1], dtype=np.int64)
        lens = hi - lo
        ends = np.cumsum(lens)
        k = int(np.searchsorted(ends, n))  # the range holding the n-th slot
        take = lens[: k + 1].copy()
        take[k] = n - (int(ends[k - 1]) if k else 0)
        first = np.cumsum(take) - take  # index in the result of each range's first slot
        slots = np.repeat(-hi[: k + 1] - first, take) + np.arange(n, dtype=np.int64)  # slot -hi is a range's lowest
        whole = k + 1 if take[k] == lens[k] else k
        if whole:
            del a[len(a) - whole:]
            del b[len(b) - whole:]
        if whole == k:  # the last range is cut: its lowest take[k] slots are gone
            b[-1] = int(hi[k]) - int(take[k])
        self._nfree -= n
        return slots

    def take(self, slot: int) -> None:
        """Mark a given free slot used (recovery of a persistent tier)."""
        self._check(slot)
        a, b, y = self._a, self._b, -1 - slot
        i = bisect_right(a, y) - 1
        if i < 0 or y >= b[i]:
            raise RuntimeError(f"slot {slot} is already used")
        lo, hi = a[i], b[i]
        if hi - lo == 1:
            del a[i], b[i]
        elif y == lo:
            a[i] = y + 1
        elif y == hi - 1:
            b[i] = y
        else:  # split [lo, hi) into [lo, y) and [y + 1, hi)
            b[i] = y
            a.insert(i + 1, y + 1)
            b.insert(i + 1, hi)
        self._nfree -= 1
        if slot >= self._limit:
            self._above -= 1

    def release(self, slot: int) -> None:
        self._check(slot)
        a, b, y = self._a, self._b, -1 - slot
        i = bisect_right(a, y) - 1  # the last range starting (mirrored) at or below y
        if i >= 0 and y < b[i]:
            raise RuntimeError(f"slot {slot} released twice")
        joins_left = i >= 0 and b[i] == y
        joins_right = i + 1 < len(a) and a[i + 1] == y + 1
        if joins_left and joins_right:
            b[i] = b[i + 1]
            del a[i + 1], b[i + 1]
        elif joins_left:
            b[i] = y + 1
        elif joins_right:
            a[i + 1] = y
        else:
            a.insert(i + 1, y)
            b.insert(i + 1, y + 1)
        self._nfree += 1
        if slot >= self._limit:
            self._above += 1

    def release_many(self, slots: Iterable[int]) -> None:
        """Release every slot of ``slots`` at once (a cache closing, a shrink): one merge of the sorted slots
        with the free ranges, in numpy, instead of one list insert per slot. All or nothing: RuntimeError
        and no change if a slot is free already (or given twice)."""
        new = np.sort(np.fromiter(slots, dtype=np.int64))
        if new.size == 0:
            return
        if new[0] < 0 or new[-1] >= self.total:
            bad = int(new[0]) if new[0] < 0 else int(new[-1])
            raise IndexError(f"slot {bad} is outside the allocator's {self.total} slots")
        brk = np.flatnonzero(np.diff(new) != 1) + 1  # runs of consecutive slots
        run_s = new[np.concatenate(([0], brk))]
        run_e = new[np.concatenate((brk - 1, [new.size - 1]))] + 1
        old_s = -np.asarray(self._b[::-1], dtype=np.int64)  # the free ranges, ascending
        old_e = -np.asarray(self._a[::-1], dtype=np.int64)
        starts = np.concatenate((old_s, run_s))
        ends = np.concatenate((old_e, run_e))
        order = np.argsort(starts, kind="stable")
        starts, ends = starts[order], ends[order]
        if (starts[1:] < ends[:-1]).any() or np.any(new[1:] == new[:-1]):
            raise RuntimeError("release_many() was given a slot that is free already (or twice)")
        first = np.concatenate(([True], starts[1:] != ends[:-1]))  # a range that does not touch the previous
        group = np.cumsum(first) - 1
        merged_s = starts[first]
        merged_e = np.zeros(merged_s.size, dtype=np.int64)
        np.maximum.at(merged_e, group, ends)
        self._a = (-merged_e[::-1]).tolist()
        self._b = (-merged_s[::-1]).tolist()
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
            if self._a and self._a[0] == -old:  # the top free range reaches the old total: extend it
                self._a[0] = -total
            else:
                self._a.insert(0, -total)
                self._b.insert(0, -old)
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
            a, b = self._a, self._b
            if not (a and a[0] == -old and b[0] >= -total):  # slots [total, old) are not one free range
                raise RuntimeError("shrinking a slot allocator over used slots")
            if b[0] == -total:
                del a[0], b[0]
            else:
                a[0] = -total
            self._nfree -= old - total
        self.total = self._limit = total
        self._above = 0
