"""Slot allocator of one level: fixed slots, lowest free slot first (keeps a cache's pages contiguous)."""

from __future__ import annotations

import heapq


class SlotAllocator:
    """Tracks which of ``total`` slots are free. ``limit`` < total hides the top slots while a shrink runs."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.limit = total
        self._free: list[int] = list(range(total))
        self._is_free = bytearray(b"\x01") * total
        self._nfree = total

    @property
    def free_count(self) -> int:
        """Free slots below ``limit``."""
        if self.limit == self.total:
            return self._nfree
        return sum(self._is_free[: self.limit])

    @property
    def used_count(self) -> int:
        return self.total - self._nfree

    def is_free(self, slot: int) -> bool:
        return bool(self._is_free[slot])

    def allocate(self) -> int:
        """Take the lowest free slot below ``limit``; raise LookupError if none."""
        free, is_free = self._free, self._is_free
        skipped = []  # free slots hidden above the limit: back into the heap afterwards
        slot = -1
        while free:
            s = heapq.heappop(free)
            if not is_free[s]:
                continue  # stale entry
            if s >= self.limit:
                skipped.append(s)
                continue
            slot = s
            break
        for s in skipped:
            heapq.heappush(free, s)
        if slot < 0:
            raise LookupError("no free slot")
        is_free[slot] = 0
        self._nfree -= 1
        return slot

    def take(self, slot: int) -> None:
        """Mark a given free slot used (recovery of a persistent tier)."""
        if not self._is_free[slot]:
            raise RuntimeError(f"slot {slot} is already used")
        self._is_free[slot] = 0
        self._nfree -= 1  # its heap entry is now stale and skipped by allocate()

    def release(self, slot: int) -> None:
        if self._is_free[slot]:
            raise RuntimeError(f"slot {slot} released twice")
        self._is_free[slot] = 1
        self._nfree += 1
        heapq.heappush(self._free, slot)

    def grow(self, total: int) -> None:
        for s in range(self.total, total):
            heapq.heappush(self._free, s)
        self._is_free.extend(b"\x01" * (total - self.total))
        self._nfree += total - self.total
        self.total = self.limit = total

    def shrink(self, total: int) -> None:
        """Drop slots >= total; they must all be free."""
        if any(not f for f in self._is_free[total:]):
            raise RuntimeError("shrinking a slot allocator over used slots")
        self._nfree -= self.total - total
        del self._is_free[total:]
        self._free = [s for s in self._free if s < total and self._is_free[s]]
        self._free = sorted(set(self._free))
        self.total = self.limit = total
