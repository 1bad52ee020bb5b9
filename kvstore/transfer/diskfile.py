"""The disk tier's slot file: one preallocated file of fixed slots, each aligned to 4 KiB.

Created with mode 0600 in a directory created with mode 0700. A non-persistent tier's file has a
unique name and is removed on close; a persistent tier's (``kvstore.pages``) is kept and reopened. All methods block: call them from a
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

    def __init__(self, directory: Path, page_bytes: int, persistent: bool = False) -> None:
        self.directory = Path(directory)
        self.page_bytes = page_bytes
        self.stride = slot_stride(page_bytes)
        self.persistent = persistent
        name = "kvstore.pages" if persistent else f"kvstore-{os.getpid()}-{uuid.uuid4().hex[:12]}.pages"
        self.path = self.directory / name
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
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | (0 if self.persistent else os.O_EXCL)
        self.fd = os.open(self.path, flags, 0o600)
        try:
            self.slots = os.fstat(self.fd).st_size // self.stride
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
        """Close the file; a non-persistent tier's file is removed."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.persistent:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
