"""Scattered host<->device copies as batched driver calls (``cuMemcpyBatchAsync``), no Python per page.

One request's rows are coalesced into runs with numpy, the runs become three arrays (destination
addresses, source addresses, sizes), and the CUDA driver queues the whole batch with one call per
:data:`CHUNK` runs on the issuing stream. The call goes through ``ctypes``, which releases the GIL while the
driver works, so neither the event loop nor other issue threads wait on it. No kernel runs: the copies are DMA
transfers in stream order, completed through the caller's event. The issuing thread keeps at most
:data:`QUEUED_COPIES` copies queued per stream (it waits for its oldest call, GIL released), so a driver call never blocks
on a full command queue, where it would stall every other thread's CUDA calls too.

Needs a driver with the batched API (CUDA 12.8+; the 13.x ``_v2`` entry point is preferred).
:func:`load` returns None when it is missing, and the copier then keeps its per-run copies.

The default wherever the driver has the call (``KVSTORE_BATCH_COPIES=0`` turns it off: the copier then
uses its gather kernel and per-run copies). On the H200 (``benchmarks/bench_copies.py``) it moved scattered
64 KiB / 128 KiB / 512 KiB / 2 MiB pages at 0.72 / 0.89 / 0.93 / 0.94 (h2d) of one raw copy, against
0.54 / 0.66 / 0.81 / 0.84 for the kernel and per-run copies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections import deque
from typing import Callable, Optional, Sequence

import numpy as np

log = logging.getLogger("kvstore")

#: Runs per driver call: one call for tens of thousands of small copies queues slower than chunks of this.
CHUNK = 256

#: Copies a stream may have queued on the GPU before the issuing thread waits for the oldest of its calls.
#: Without a bound the driver's command queue fills, and the issuing call then blocks inside the driver for
#: as long as the GPU takes to drain it while other threads' CUDA calls wait on the driver too: the event
#: loop's event records stalled 20-2000 ms on the H200 (``benchmarks/bench_driver_queue.py``). A bound in
#: copies, not calls, keeps small requests (a batch of a few pages is one short call) queued deep enough that
#: the copy engines never wait for the issuing thread to wake. ``KVSTORE_QUEUED_COPIES`` overrides it
#: (0: unbounded).
QUEUED_COPIES = int(os.environ.get("KVSTORE_QUEUED_COPIES", "2048"))

_EVENT_FLAGS = 0x1 | 0x2  # CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING: a waiting issue thread sleeps

_ORDER_STREAM = 1  # CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
_LOC_DEVICE, _LOC_HOST = 1, 2  # CU_MEM_LOCATION_TYPE_DEVICE / _HOST


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _Attributes(ctypes.Structure):
    _fields_ = [
        ("srcAccessOrder", ctypes.c_int),
        ("srcLocHint", _Location),
        ("dstLocHint", _Location),
        ("flags", ctypes.c_uint),
    ]


def runs(dst_rows: "Sequence[int] | np.ndarray", src_rows: "Sequence[int] | np.ndarray") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coalesce row pairs into runs contiguous on both sides: (dst starts, src starts, lengths), int64,
    ordered by source row. Vectorized: no Python per row."""
    d = np.asarray(dst_rows, dtype=np.int64)
    s = np.asarray(src_rows, dtype=np.int64)
    if d.shape != s.shape or d.ndim != 1:
        raise ValueError(f"row lists must be 1-D and equally long, got {d.shape} and {s.shape}")
    if d.size == 0:
        return d, s, d.copy()
    order = np.argsort(s, kind="stable")
    d, s = d[order], s[order]
    brk = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
    starts = np.concatenate(([0], brk))
    lengths = np.diff(np.concatenate((starts, [d.size])))
    return d[starts], s[starts], lengths


class BatchCopier:
    """Queues batched copies on a CUDA stream through the driver API (see the module docstring)."""

    def __init__(self, lib: ctypes.CDLL, fn: "Callable[..., int]", has_fail_index: bool, device_index: int) -> None:
        self._lib = lib
        self._fn = fn
        self._fail_index = has_fail_index
        self._device = device_index
        self._ready = threading.local()  # per issue thread: context bound, queued events per stream
        self._attrs = {  # one attribute set per direction, applied to every copy of a call
            "h2d": self._attributes(_LOC_HOST, 0, _LOC_DEVICE, device_index),
            "d2h": self._attributes(_LOC_DEVICE, device_index, _LOC_HOST, 0),
            "d2d": self._attributes(_LOC_DEVICE, device_index, _LOC_DEVICE, device_index),
        }
        self._zero = ctypes.c_size_t(0)

    @staticmethod
    def _attributes(src_type: int, src_id: int, dst_type: int, dst_id: int) -> _Attributes:
        return _Attributes(_ORDER_STREAM, _Location(src_type, src_id), _Location(dst_type, dst_id), 0)

    def _bind_context(self) -> None:
        """Make the device's primary context current on this thread (the runtime normally did already)."""
        if getattr(self._ready, "ok", False):
            return
        ctx = ctypes.c_void_p()
        _check(self._lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:
            dev = ctypes.c_int()
            _check(self._lib.cuDeviceGet(ctypes.byref(dev), self._device), "cuDeviceGet")
            _check(self._lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
            _check(self._lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        self._ready.ok = True
        self._ready.queued = {}  # stream -> (event, copies) of its calls not waited for, oldest first
        self._ready.copies = {}  # stream -> copies of those calls
        self._ready.spare = []

    def _throttle(self, stream: int, copies: int) -> None:
        """Mark the end of one driver call of ``copies`` copies on ``stream``; while more than
        :data:`QUEUED_COPIES` copies of this thread's stream are still queued on the GPU, wait (GIL released) for
        its oldest call. The newest call is never waited for here."""
        queued: "deque[tuple[ctypes.c_void_p, int]]" = self._ready.queued.setdefault(stream, deque())
        spare: list[ctypes.c_void_p] = self._ready.spare
        if spare:
            event = spare.pop()
        else:
            event = ctypes.c_void_p()
            _check(self._lib.cuEventCreate(ctypes.byref(event), _EVENT_FLAGS), "cuEventCreate")
        _check(self._lib.cuEventRecord(event, stream), "cuEventRecord")
        queued.append((event, copies))
        total = self._ready.copies.get(stream, 0) + copies
        while QUEUED_COPIES > 0 and total > QUEUED_COPIES and len(queued) > 1:
            oldest, n = queued.popleft()
            code = self._lib.cuEventSynchronize(oldest)
            spare.append(oldest)
            total -= n
            _check(code, "cuEventSynchronize")
        self._ready.copies[stream] = total

    def copy(self, dst: np.ndarray, src: np.ndarray, sizes: np.ndarray, direction: str, stream: int) -> None:
        """Queue ``sizes[i]`` bytes from address ``src[i]`` to ``dst[i]`` for every i (uint64 arrays) on
        the CUDA stream handle ``stream``. Copies must not overlap one another."""
        self._bind_context()
        attrs = ctypes.addressof(self._attrs[direction])
        zero = ctypes.addressof(self._zero)
        n = int(dst.size)
        for a in range(0, n, CHUNK):
            b = min(a + CHUNK, n)
            d = np.ascontiguousarray(dst[a:b], dtype=np.uint64)
            s = np.ascontiguousarray(src[a:b], dtype=np.uint64)
            z = np.ascontiguousarray(sizes[a:b], dtype=np.uint64)
            args = [d.ctypes.data, s.ctypes.data, z.ctypes.data, b - a, attrs, zero, 1]
            if self._fail_index:
                fail = ctypes.c_size_t(0)
                args.append(ctypes.addressof(fail))
            args.append(stream)
            _check(self._fn(*args), "cuMemcpyBatchAsync")
            self._throttle(stream, b - a)


class DriverError(RuntimeError):
    """A CUDA driver call of the batched copier failed."""


def _check(code: int, what: str) -> None:
    if code != 0:
        raise DriverError(f"{what} failed with CUDA driver error {code}")


def enabled() -> bool:
    """Whether the copier should use batched driver copies (default; ``KVSTORE_BATCH_COPIES=0`` disables)."""
    return os.environ.get("KVSTORE_BATCH_COPIES", "1") != "0"


def load(device_index: int) -> Optional[BatchCopier]:
    """The batched copier for device ``device_index``, or None without a driver that has the batched API."""
    name = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        log.debug("kvstore: no CUDA driver library for batched copies (%s)", exc)
        return None
    for symbol, has_fail in (("cuMemcpyBatchAsync_v2", False), ("cuMemcpyBatchAsync", True)):
        fn = getattr(lib, symbol, None)
        if fn is None:
            continue
        fn.restype = ctypes.c_int
        # every pointer and size declared: an undeclared Python int would be passed as a 32-bit C int
        head = [ctypes.c_void_p] * 3 + [ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        fn.argtypes = head + ([ctypes.c_void_p] if has_fail else []) + [ctypes.c_void_p]
        for f in ("cuCtxGetCurrent", "cuDeviceGet", "cuDevicePrimaryCtxRetain", "cuCtxSetCurrent", "cuEventCreate",
                  "cuEventRecord", "cuEventSynchronize"):
            getattr(lib, f).restype = ctypes.c_int
        lib.cuEventCreate.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.cuEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cuEventSynchronize.argtypes = [ctypes.c_void_p]
        version = ctypes.c_int()
        lib.cuDriverGetVersion.restype = ctypes.c_int
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value < 12080:
            log.debug("kvstore: CUDA driver %d has no usable batched copies", version.value)
            return None
        return BatchCopier(lib, fn, has_fail, device_index)
    return None
