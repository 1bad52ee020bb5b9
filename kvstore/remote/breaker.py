"""Circuit breaker of the remote tier: after repeated failures, stop calling the server for a while.

Closed: calls go through; ``threshold`` failures in a row open it. Open: every call is refused at once
(reads are misses, writes are dropped) until a probe (a PING run by the client's background task)
succeeds, which closes it again. Pure state, no I/O.
"""

from __future__ import annotations

__all__ = ["Breaker"]


class Breaker:
    def __init__(self, threshold: int = 3) -> None:
        self.threshold = threshold
        self.failures = 0  # consecutive
        self.open = False
        self.opened = 0  # times it opened (monotonic)

    def allow(self) -> bool:
        return not self.open

    def success(self) -> None:
        self.failures = 0
        self.open = False

    def failure(self) -> bool:
        """Count one failure; True if this one opened the breaker."""
        self.failures += 1
        if not self.open and self.failures >= self.threshold:
            self.open = True
            self.opened += 1
            return True
        return False
