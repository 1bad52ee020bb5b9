"""The disk tier's slot file: one preallocated file of fixed slots, each aligned to 4 KiB.

Created with mode 0600 in a directory created with mode 0700. A non-persistent tier's file has a
unique name (``kvstore-<pid>-<random>.pages``), is locked (flock) while open and removed on close; one left
by a process that died is removed when a tier next opens in that directory. A persistent tier's
(``kvstore.pages``) is kept and reopened. The file takes ``slots * slot_stride(page_bytes)`` bytes: each
slot is rounded up to 4 KiB. Space is checked against the file system's free space before it is
reserved; file system failures raise :class:`~kvstore.errors.StorageIOError` (errno kept) and a too
small disk :class:`~kvstore.errors.CapacityError`. All methods block: call them from a worker thread,
never from the event loop.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import uuid
from pathlib import Path

from .. import resources
from ..errors import CapacityError

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
        self._created = False  # this object made the file (a non-persistent one is removed on close)

    def offset(self, slot: int) -> int:
        return slot * self.stride

    def open(self, slots: int) -> None:
        """Create the directory (0700) and the file (0600), and reserve ``slots`` slots of space.

        Slot files of dead processes in the directory are removed first. StorageIOError when the
        directory or the file cannot be made; CapacityError when the disk lacks the space."""
        try:
            if not self.directory.exists():
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
            elif stat.S_IMODE(self.directory.stat().st_mode) & 0o077:
                log.warning("disk tier directory %s is readable by other users; pages stay 0600", self.directory)
            for stale in resources.reclaim_stale_slot_files(self.directory):
                log.warning("kvstore disk tier: removed %s, left by a process that is gone", stale)
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | (0 if self.persistent else os.O_EXCL)
            self.fd = os.open(self.path, flags, 0o600)
            self._created = True
        except OSError as exc:
            raise resources.storage_error("opening the disk tier's slot file", self.path, exc) from exc
        try:
            if not self.persistent:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # in use: not reclaimed by others
            self.slots = os.fstat(self.fd).st_size // self.stride
            self.resize(slots)
        except BaseException:
            self.close()
            raise

    def resize(self, slots: int) -> None:
        """Grow (reserving space with posix_fallocate) or shrink (truncating) to ``slots`` slots.

        A grow checks the free space first (CapacityError) and, if reserving fails (StorageIOError, e.g.
        ENOSPC), truncates the file back: the file is as it was."""
        size = slots * self.stride
        try:
            st = os.fstat(self.fd)
            if slots > self.slots:
                need = size - min(size, st.st_blocks * 512)  # blocks the file holds already count
                free = resources.disk_free(self.fd)
                if need > free:
                    raise CapacityError(
                        f"the disk tier at {str(self.path)!r} needs {resources.fmt_bytes(size)} "
                        f"({slots} slots of {self.stride} bytes), {resources.fmt_bytes(need)} more than the file "
                        f"holds, but the file system has {resources.fmt_bytes(free)} free; "
                        "lower DiskTier.quota_bytes or free disk space"
                    )
                try:
                    os.posix_fallocate(self.fd, 0, size)
                except OSError:
                    try:
                        os.ftruncate(self.fd, st.st_size)  # give back what was reserved before it failed
                    except OSError:
                        pass
                    raise
            else:
                os.ftruncate(self.fd, size)
        except OSError as exc:
            what = f"reserving {resources.fmt_bytes(size)} ({slots} slots) for the disk tier"
            raise resources.storage_error(what, self.path, exc) from exc
        self.slots = slots

    def close(self) -> None:
        """Close the file; a non-persistent tier's file is removed."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.persistent and self._created:
            self._created = False
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
