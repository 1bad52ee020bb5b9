"""Whether disk-tier pages are in the OS page cache, without reading them: ``mincore`` over a read-only ``mmap``.

A read of a page the kernel has cached is a memory copy (~10 GB/s and more); a cold one waits for the device
(~1.5 GB/s on the H200 machine's disk). One moving estimate over both is wrong for both, so the bandwidth meters
keep the two apart and the estimates split a set of disk pages by this probe (docs/api.md, "Transfer estimates").

:meth:`Residency.fraction` maps the head (:data:`PROBE_BYTES`) of at most :data:`SAMPLE` slots, evenly spread over
the ones asked, one at a time:
three system calls each (``mmap``, ``mincore``, ``munmap``), none of which reads the file or waits for the disk, so
it is fit for the event loop's thread. Linux and the other systems whose libc has ``mincore``; elsewhere, or when
a call fails, the answer is None (unknown) and callers treat the pages as cold.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
from typing import Optional

import numpy as np

log = logging.getLogger("kvstore")

#: slots probed per question at most (evenly spread): enough to tell cached from cold, cheap on the loop
SAMPLE = 8

#: bytes probed at the head of each sampled slot
PROBE_BYTES = 64 << 10

_PAGE = mmap.PAGESIZE
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> Optional[ctypes.CDLL]:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    if not all(hasattr(lib, f) for f in ("mmap", "munmap", "mincore")):
        return None
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    lib.munmap.restype = ctypes.c_int
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.mincore.restype = ctypes.c_int
    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return lib


_LIBC = _libc()


class Residency:
    """Page-cache residency of the slots of one slot file (``fd``; slot ``s`` at ``s * stride``, ``page_bytes``
    long)."""

    def __init__(self, fd: int, stride: int, page_bytes: int) -> None:
        self.fd = fd
        self.stride = stride
        self.page_bytes = page_bytes
        # bytes mapped per slot: its head (whole OS pages); a page is written and read whole, so its head tells
        self._span = min(-(-page_bytes // _PAGE) * _PAGE, PROBE_BYTES)
        self._per = self._span // _PAGE  # OS pages probed per slot
        self._vec = np.zeros(SAMPLE * self._per, dtype=np.uint8)  # mincore's answers, one byte per OS page
        self.available = _LIBC is not None and stride % _PAGE == 0

    def fraction(self, slots: np.ndarray) -> Optional[float]:
        """The fraction of the OS pages of (a sample of) ``slots`` that are in the page cache; None if unknown."""
        if not self.available or len(slots) == 0:
            return None
        lib = _LIBC
        if lib is None:  # pragma: no cover - available implies a libc
            return None
        picks = np.asarray(slots, dtype=np.int64)
        if picks.size > SAMPLE:
            picks = picks[np.linspace(0, picks.size - 1, SAMPLE).astype(np.int64)]
        vec, span, per = self._vec, self._span, self._per
        base = vec.ctypes.data
        for i, slot in enumerate(picks.tolist()):  # at most SAMPLE
            addr = lib.mmap(None, span, mmap.PROT_READ, mmap.MAP_SHARED, self.fd, slot * self.stride)
            if addr is None or addr == _MAP_FAILED:
                log.debug("kvstore: mmap for a page-cache probe failed (errno %d)", ctypes.get_errno())
                return None
            try:
                if lib.mincore(addr, span, base + i * per) != 0:
                    return None
            finally:
                lib.munmap(addr, span)
        got = vec[: picks.size * per]
        resident, total = int(np.count_nonzero(got & 1)), got.size
        return resident / total if total else None
