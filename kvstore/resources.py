"""What the machine can hold: memory and disk space checked before allocating, allocation failures typed.

Two kinds of check, both cheap (no allocation, a few small reads of /proc and statvfs):

* ``KVCacheManager(config)`` refuses (``ConfigError``) a quota larger than what this machine has at all:
  its memory (the cgroup limit when lower), the disk tier's file system size, the GPU's memory.
* ``start()`` and ``set_quota()`` refuse (``CapacityError``) a quota larger than what is available now:
  ``MemAvailable`` less a small headroom, the file system's free space, the GPU's free memory.

Allocation errors (torch ``RuntimeError``/``OutOfMemoryError``, ``MemoryError``) that still happen become
``CapacityError`` naming the tier and the size (:func:`allocating`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
from pathlib import Path
from typing import Iterator, Optional

import torch

from .errors import CapacityError, ConfigError, StorageIOError

_GiB = 1 << 30


def fmt_bytes(n: int) -> str:
    """``1.5 GiB (1610612736 bytes)``."""
    for unit, shift in (("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


# ---------------------------------------------------------------------------------------------- memory
def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    except (OSError, ValueError):
        pass
    return out


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None  # "max": no limit
    return int(text)


def _cgroup_memory() -> tuple[Optional[int], Optional[int]]:
    """(limit, available under the limit) of this process's memory cgroup, or (None, None) without one."""
    for limit_f, usage_f in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit = _read_int(limit_f)
        if limit is None or limit >= 1 << 60:
            continue
        usage = _read_int(usage_f) or 0
        return limit, max(0, limit - usage)
    return None, None


def memory_total() -> Optional[int]:
    """Memory this process may ever use: MemTotal, or the cgroup limit when lower. None if unknown."""
    total = _meminfo().get("MemTotal")
    if total is None:
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            total = None
    limit, _ = _cgroup_memory()
    if limit is not None:
        total = limit if total is None else min(total, limit)
    return total


def memory_available() -> Optional[int]:
    """Memory that can be allocated now without swapping or an OOM kill, less a headroom (the smaller of
    1 GiB and 1/16 of the total) for the rest of the process. None if unknown."""
    info = _meminfo()
    avail = info.get("MemAvailable")
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    _, cg_avail = _cgroup_memory()
    if cg_avail is not None:
        avail = min(avail, cg_avail)
    total = memory_total() or avail
    return max(0, avail - min(_GiB, total // 16))


def check_memory_total(what: str, nbytes: int, field: str) -> None:
    """ConfigError when ``nbytes`` of host memory exceed what this machine has at all."""
    total = memory_total()
    if total is not None and nbytes > total:
        raise ConfigError(
            f"{what} needs {fmt_bytes(nbytes)} of host memory but this machine has {fmt_bytes(total)} in all; "
            f"lower {field}"
        )


def check_memory(what: str, nbytes: int, field: str) -> None:
    """CapacityError when ``nbytes`` of host memory are not available now."""
    avail = memory_available()
    if avail is not None and nbytes > avail:
        raise CapacityError(
            f"{what} needs {fmt_bytes(nbytes)} of host memory but only {fmt_bytes(avail)} is available "
            f"(MemAvailable less headroom); lower {field} or free memory first"
        )


def cuda_free(device: torch.device) -> int:
    """Bytes a new tensor can take on ``device``: the driver's free memory plus torch's cached free blocks."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def check_device_total(device: torch.device, nbytes: int) -> None:
    """ConfigError when ``nbytes`` exceed the device tier's memory (host memory for a CPU device)."""
    if device.type != "cuda":
        check_memory_total(f"DeviceTier on {device}", nbytes, "DeviceTier.quota_bytes")
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if nbytes > total:
        raise ConfigError(
            f"DeviceTier on {device} needs {fmt_bytes(nbytes)} but the GPU has {fmt_bytes(total)}; "
            "lower DeviceTier.quota_bytes"
        )


def check_device(device: torch.device, nbytes: int, field: str = "DeviceTier.quota_bytes") -> None:
    """CapacityError when ``nbytes`` cannot be allocated on ``device`` now."""
    if device.type != "cuda":
        check_memory(f"the device tier on {device}", nbytes, field)
        return
    free = cuda_free(device)
    if nbytes > free:
        raise CapacityError(
            f"the device tier on {device} needs {fmt_bytes(nbytes)} but only {fmt_bytes(free)} is free on the GPU; "
            f"lower {field} or free GPU memory first"
        )


@contextlib.contextmanager
def allocating(what: str, nbytes: int) -> Iterator[None]:
    """Turn an allocation failure (torch RuntimeError / OutOfMemoryError, MemoryError) into CapacityError."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        raise CapacityError(
            f"could not allocate {fmt_bytes(nbytes)} for {what} ({type(exc).__name__}: {exc}); "
            "lower its quota or free memory"
        ) from exc


# ---------------------------------------------------------------------------------------------- disk
def _existing_ancestor(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def disk_total(path: Path) -> Optional[int]:
    """Size of the file system that holds (or will hold) ``path``; None if unknown."""
    try:
        st = os.statvfs(_existing_ancestor(path))
    except OSError:
        return None
    return st.f_blocks * st.f_frsize


def disk_free(fd: int) -> int:
    """Bytes an unprivileged process may still allocate on the file system of ``fd``."""
    st = os.fstatvfs(fd)
    return st.f_bavail * st.f_frsize


def storage_error(what: str, path: object, exc: OSError) -> StorageIOError:
    """A StorageIOError (errno kept) for a failed file system call on the disk tier."""
    code = exc.errno if exc.errno is not None else errno.EIO
    hint = {
        errno.ENOSPC: "free disk space or lower DiskTier.quota_bytes",
        errno.EROFS: "the file system is read-only; choose a writable DiskTier.path",
        errno.EACCES: "no permission; choose a DiskTier.path this user can write",
        errno.EPERM: "no permission; choose a DiskTier.path this user can write",
        errno.ENOTDIR: "a part of the path is a file, not a directory; choose another DiskTier.path",
        errno.EEXIST: "a file is in the way; choose another DiskTier.path",
    }.get(code, "check the DiskTier.path directory and the disk")
    err = StorageIOError(f"{what} at {str(path)!r} failed: {os.strerror(code)}; {hint}", code)
    err.filename = str(path)
    return err


_SLOT_FILE = re.compile(r"kvstore-(\d+)-[0-9a-f]{12}\.pages")


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (or cannot be told: then True, so its files are kept)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OSError:
        return True  # cannot tell: keep the file
    return True


def slot_file_pid(name: str) -> Optional[int]:
    """The pid in a non-persistent slot file's name (``kvstore-<pid>-<random>.pages``), else None."""
    m = _SLOT_FILE.fullmatch(name)
    return int(m.group(1)) if m is not None else None


def reclaim_stale_slot_files(directory: Path, dry_run: bool = False) -> list[Path]:
    """Remove the non-persistent slot files in ``directory`` that a dead process left behind: named with a
    pid that no longer runs, owned by this user, and not locked (a live owner keeps its file locked).
    Returns the files removed (with ``dry_run``: the files that would be, none removed)."""
    removed: list[Path] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        pid = slot_file_pid(name)
        if pid is None or pid_alive(pid):
            continue
        path = Path(directory) / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # in use (a process in another pid namespace?)
            if not dry_run:
                os.unlink(path)
            removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed
