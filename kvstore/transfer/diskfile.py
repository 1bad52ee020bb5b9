"""The disk tier's slot file: one preallocated file of fixed slots, each aligned to 4 KiB.

Created with mode 0600 in a directory created with mode 0700. All methods block: call them from a
worker thread, never from the event loop.
"""

from __future__ import annotations

import logging
import os
import stat
import uuid
from pathlib import Path

log = logging.getLogger("kvstore")

ALIGN = 4096


def slot_stride(page_bytes: int) -> int:
    return (page_bytes + ALIGN - 1) // ALIGN * ALIGN


class DiskSlotFile:
    """``slots`` slots of ``page_bytes`` bytes at offsets ``slot * stride`` in one file under ``directory``."""

    def __init__(self, directory: Path, page_bytes: int) -> None:
        self.directory = Path(directory)
        self.page_bytes = page_bytes
        self.stride = slot_stride(page_bytes)
        self.path = self.directory / f"kvstore-{os.getpid()}-{uuid.uuid4().hex[:12]}.pages"
        self.fd = -1
        self.slots = 0

    def offset(self, slot: int) -> int:
        return slot * self.stride

    def open(self, slots: int) -> None:
        """Create the directory (0700) and the file (0600), and reserve ``slots`` slots of space."""
        if not self.directory.exists():
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        elif stat.S_IMODE(self.directory.stat().st_mode) & 0o077:
            log.warning("disk tier directory %s is readable by other users; pages stay 0600", self.directory)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            self.resize(slots)
        except BaseException:
            self.close()
            raise

    def resize(self, slots: int) -> None:
        """Grow (reserving space with posix_fallocate) or shrink (truncating) to ``slots`` slots."""
        size = slots * self.stride
        if slots > self.slots:
            os.posix_fallocate(self.fd, 0, size)
        else:
            os.ftruncate(self.fd, size)
        self.slots = slots

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
