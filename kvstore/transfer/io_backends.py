"""Disk I/O behind one interface, with two backends picked at start-up.

- :class:`PosixBackend` — a thread pool of ``os.preadv``/``os.pwritev`` (works everywhere).
- :class:`KvikioBackend` — kvikio ``CuFile.pread``/``pwrite``; needs a CUDA driver, so it is probed
  with a tiny real write/read before use. ``auto`` takes it only with GPUDirect Storage, where it reads
  disk -> device straight into device memory. Without GDS kvikio's compat mode reads host memory with
  one plain ``pread`` per call on its own thread pool (kvikio 26.10 ``posix_host_io``; no bounce buffer
  for host memory), so at best it equals our ``preadv`` pool, and it costs a Python call and a
  thread-pool hand-off per contiguous run (~25 us measured) where ``preadv`` takes 1024 buffers a call.

``KVSTORE_IO_BACKEND=auto|kvikio|posix`` overrides the choice. An I/O request is a list of
:class:`Extent` — a file offset and the buffers (numpy views of host memory; CUDA tensors too, for a
backend with ``device_reads``) that lie back to back in the file from there. A 2-D buffer holds one page
per row (pages contiguous in memory as well as in the file), any other buffer one page; every page has
its own checksum. Short reads and writes are continued; end of file is an error.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import xxhash

from .._aio import thread_pool
from ..errors import ConfigError

log = logging.getLogger("kvstore")

_IOV_MAX = 1024

#: Test hook: called as ``hook(op, offset, nbytes)`` before every I/O call. It may raise OSError (the
#: call fails), or return an int: the first system call then moves at most that many bytes (a short
#: read or write, which the backend must continue).
FaultHook = Callable[[str, int, int], Optional[int]]
#: A kvikio call started: (its IOFuture, bytes, file offset).
_Started = tuple[Any, int, int]
#: A run of buffers back to back in file and memory: (index of the first buffer, bytes, buffers).
_Run = tuple[int, int, list[Any]]


def checksum(buf: np.ndarray) -> int:
    """The page checksum (xxh3-64 of its bytes; releases the GIL)."""
    return xxhash.xxh3_64_intdigest(buf)  # type: ignore[arg-type]  # numpy's stubs say ndarray is a buffer only on 3.12+


def _page_count(buf: Any) -> int:
    """Pages in an I/O buffer: the rows of a 2-D buffer, else one."""
    return int(buf.shape[0]) if buf.ndim == 2 else 1


def _pages(buf: Any) -> Any:
    """The pages of ``buf`` to iterate: its rows if it is 2-D, else ``buf`` alone."""
    return buf if buf.ndim == 2 else (buf,)


class Extent:
    """Pages back to back in the file from ``offset``, held by ``buffers``: a 2-D buffer holds
    ``shape[0]`` pages (row j is page j), any other buffer one page.

    ``sums`` holds one checksum per page, in file order: for a write the backend fills it with the
    checksum of the bytes it wrote; for a read it holds the checksum each page must have (None: not checked).
    """

    __slots__ = ("offset", "buffers", "sums")

    def __init__(
        self, offset: int, buffers: Optional[list[np.ndarray]] = None, sums: Optional[list[Optional[int]]] = None
    ) -> None:
        self.offset = offset
        self.buffers: list[np.ndarray] = [] if buffers is None else buffers
        pages = sum(map(_page_count, self.buffers))
        self.sums: list[Optional[int]] = sums if sums is not None and len(sums) == pages else [None] * pages

    def __repr__(self) -> str:
        return f"Extent(offset={self.offset}, buffers={len(self.buffers)}, pages={len(self.sums)})"

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def add(self, buf: np.ndarray, expected: Optional[int] = None) -> None:
        """Append one page."""
        self.buffers.append(buf)
        self.sums.append(expected)

    def add_pages(self, buf: np.ndarray, expected: Optional[Sequence[Optional[int]]] = None) -> None:
        """Append the pages of the 2-D buffer ``buf`` (one per row), with their expected checksums."""
        self.buffers.append(buf)
        self.sums.extend([None] * _page_count(buf) if expected is None else expected)


def split_extents(extents: Sequence[Extent], task_bytes: int) -> list[Extent]:
    """Cut extents into pieces of at most ``task_bytes`` (whole pages: a 2-D buffer is cut into row slices,
    views) and IOV_MAX buffers, for parallel I/O. An extent that already fits is its own piece (the same
    object: checksums filled on it are its own)."""
    out = []
    for ext in extents:
        if len(ext.buffers) <= _IOV_MAX and (len(ext.sums) == 1 or ext.nbytes <= task_bytes):
            out.append(ext)  # fits one piece as it is (a scattered page is an extent of one buffer)
            continue
        off = ext.offset
        cur = Extent(off)
        size = 0  # bytes of ``cur`` (kept, not summed again per buffer)
        first = 0  # index in ``ext.sums`` of the next page
        for buf in ext.buffers:
            k = _page_count(buf)
            page = buf.nbytes // k
            j = 0  # pages of ``buf`` placed
            while j < k:
                if cur.buffers and (size + page > task_bytes or len(cur.buffers) >= _IOV_MAX):
                    out.append(cur)
                    cur = Extent(off)
                    size = 0
                take = min(k - j, max(1, (task_bytes - size) // page))
                if buf.ndim == 2:
                    cur.add_pages(buf if take == k else buf[j : j + take], ext.sums[first : first + take])
                else:
                    cur.add(buf, ext.sums[first])
                j += take
                first += take
                size += take * page
                off += take * page
        if cur.buffers:
            out.append(cur)
    return out


def pack_tasks(pieces: Sequence[Extent], task_bytes: int) -> list[list[Extent]]:
    """Pieces (from :func:`split_extents`) packed into tasks of about ``task_bytes`` each, so a transfer of
    many small scattered pages costs a few thread hand-offs, not one per page."""
    tasks: list[list[Extent]] = []
    size = 0
    for ext in pieces:
        n = ext.nbytes
        if not tasks or size + n > task_bytes:
            tasks.append([])
            size = 0
        tasks[-1].append(ext)
        size += n
    return tasks


def _full_io(fn: Callable[[int, list[memoryview], int], int], fd: int, buffers: list[np.ndarray], offset: int, op: str, first: Optional[int] = None) -> None:
    """Run preadv/pwritev until every byte moved; raise OSError(EIO) on end of file or no progress.

    ``first`` caps the bytes of the first call (fault injection of a short transfer)."""
    views = [memoryview(b).cast("B") for b in buffers]  # type: ignore[arg-type]  # ndarray: see checksum()
    while views:
        if first is not None:
            n = fn(fd, [views[0][: max(1, min(first, len(views[0])))]], offset)
            first = None
        else:
            n = fn(fd, views, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"short {op} at offset {offset}: {'end of file' if n == 0 else n}")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def _gather_sums(extents: Sequence[Extent], pieces: Sequence[Extent]) -> None:
    """Copy the checksums computed on the split ``pieces`` back onto the original ``extents``."""
    sums = [x for piece in pieces for x in piece.sums]  # one per page, in file order
    i = 0
    for ext in extents:
        n = len(ext.sums)
        ext.sums = sums[i : i + n]
        i += n


def _same(buf: Any) -> Any:
    return buf


def _sum_before_write(ext: Extent, view: Callable[[Any], np.ndarray] = _same) -> None:
    """Fill ``ext.sums`` with the checksum of every page; ``view`` gives a buffer's host bytes."""
    ext.sums = [checksum(page) for buf in ext.buffers for page in _pages(view(buf))]


def _verify_after_read(ext: Extent, view: Callable[[Any], np.ndarray] = _same) -> list[int]:
    """File offsets of the pages of ``ext`` whose bytes do not have their expected checksum; ``view`` gives a
    buffer's host bytes (made only for a buffer with a page to check)."""
    bad: list[int] = []
    off, first = ext.offset, 0
    for buf in ext.buffers:
        k = _page_count(buf)
        want = ext.sums[first : first + k]
        if any(x is not None for x in want):
            page = buf.nbytes // k
            bad += [off + j * page for j, (row, x) in enumerate(zip(_pages(view(buf)), want))
                    if x is not None and checksum(row) != x]
        off += buf.nbytes
        first += k
    return bad


class IOBackend:
    """Reads and writes extents of one file; every call completes through an awaitable."""

    name = "abstract"

    @property
    def device_reads(self) -> bool:
        """Whether :meth:`read` takes device (CUDA) buffers, so disk -> device needs no staging in host memory."""
        return False

    def __init__(self) -> None:
        self.fault_hook: Optional[FaultHook] = None

    def _fault(self, op: str, extent: Extent) -> Optional[int]:
        if self.fault_hook is not None:
            return self.fault_hook(op, extent.offset, extent.nbytes)
        return None

    async def read(self, extents: Sequence[Extent]) -> list[int]:
        """Read every extent and verify each page's checksum; returns the file offsets of pages that failed."""
        raise NotImplementedError

    async def write(self, extents: Sequence[Extent]) -> None:
        """Write every extent; fills each extent's ``sums`` with the checksums of the pages written."""
        raise NotImplementedError

    def close(self) -> None:
        pass


async def _gather_all(futs: "list[asyncio.Future[list[int]]]") -> list[list[int]]:
    """Wait for every future (buffers stay in use until all finish), then raise the first error."""
    results = await asyncio.gather(*futs, return_exceptions=True)
    out: list[list[int]] = []
    for r in results:
        if isinstance(r, BaseException):
            raise r
        out.append(r)
    return out


class PosixBackend(IOBackend):
    """``os.preadv``/``os.pwritev`` on a pool of worker threads."""

    name = "posix"

    def __init__(self, fd: int, threads: int, task_bytes: int = 8 << 20) -> None:
        super().__init__()
        self.fd = fd
        self.task_bytes = task_bytes
        self.pool = thread_pool(threads, "kvstore-io")

    def _run(self, op: str, task: list[Extent]) -> list[int]:
        """One task on a worker thread: the I/O, then (reads) the checksums while the bytes are hot."""
        bad: list[int] = []
        for ext in task:
            first = self._fault(op, ext)
            if op == "read":
                _full_io(os.preadv, self.fd, ext.buffers, ext.offset, op, first)
                bad.extend(_verify_after_read(ext))
            else:
                _sum_before_write(ext)
                _full_io(os.pwritev, self.fd, ext.buffers, ext.offset, op, first)
        return bad

    async def _submit(self, op: str, extents: Sequence[Extent]) -> list[int]:
        loop = asyncio.get_running_loop()
        pieces = split_extents(extents, self.task_bytes)  # sums are filled on these pieces
        futs = [loop.run_in_executor(self.pool, self._run, op, t) for t in pack_tasks(pieces, self.task_bytes)]
        results = await asyncio.shield(_gather_all(futs))
        if op == "write":
            _gather_sums(extents, pieces)
        return [off for bad in results for off in bad]

    async def read(self, extents: Sequence[Extent]) -> list[int]:
        return await self._submit("read", extents)

    async def write(self, extents: Sequence[Extent]) -> None:
        await self._submit("write", extents)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class _Span:
    """``nbytes`` of memory at ``ptr`` as an array interface (host) or CUDA array interface (device), so
    buffers that lie back to back in memory become one kvikio call. ``keep`` holds the buffers alive."""

    def __init__(self, ptr: int, nbytes: int, cuda: bool, keep: list[Any]) -> None:
        iface: dict[str, Any] = {"data": (ptr, False), "shape": (nbytes,), "typestr": "|u1", "version": 3, "strides": None}
        if cuda:
            iface["stream"] = None  # kvikio does not read it; the bytes are ready when the read completes
            self.__cuda_array_interface__ = iface
        else:
            self.__array_interface__ = iface
        self.keep = keep


def _span(bufs: list[Any], nbytes: int) -> Any:
    """One buffer over ``bufs`` (back to back in memory): an ndarray for host memory (kvikio takes host
    buffers through the buffer protocol), a CUDA array interface object for device memory."""
    span = _Span(_address(bufs[0]), nbytes, _is_cuda(bufs[0]), bufs)
    return span if _is_cuda(bufs[0]) else np.asarray(span)


def _is_cuda(buf: Any) -> bool:
    return bool(getattr(buf, "is_cuda", False))


def _address(buf: Any) -> int:
    return int(buf.data_ptr() if _is_cuda(buf) else buf.ctypes.data)


def memory_runs(buffers: Sequence[Any]) -> list[_Run]:
    """Buffers (back to back in the file) grouped where they are also back to back in memory:
    ``(index of the first buffer, bytes, buffers)`` per run, one kvikio call each (kvikio has no
    vectored I/O, so scattered memory costs one call per buffer)."""
    runs: list[_Run] = []
    end = None
    for i, buf in enumerate(buffers):
        cuda, addr = _is_cuda(buf), _address(buf)
        if end is not None and end == (addr, cuda):
            first, n, bufs = runs[-1]
            bufs.append(buf)
            runs[-1] = (first, n + buf.nbytes, bufs)
        else:
            runs.append((i, buf.nbytes, [buf]))
        end = (addr + buf.nbytes, cuda)
    return runs


def _host_view(buf: Any) -> np.ndarray:
    """Host bytes of ``buf`` for its checksums: a device tensor is copied to host memory first (whole: one
    copy for all the pages of a 2-D buffer)."""
    out: np.ndarray = buf.cpu().numpy() if _is_cuda(buf) else buf
    return out


def kvikio_settings(kvikio_defaults: Any, threads: int, environ: "os._Environ[str] | dict[str, str]" = os.environ) -> dict[str, Any]:
    """The kvikio defaults the backend changes (applied by the caller; process-wide in kvikio).

    - ``num_threads`` at least ``threads`` (kvikio's default is 1: one call at a time).
    - ``auto_direct_io_write`` off, unless ``KVIKIO_AUTO_DIRECT_IO_WRITE`` is set: kvikio 26.x writes host
      memory with O_DIRECT by default in compat mode (reads are buffered), so pages just written to disk
      are not in the page cache and reading them back runs at cold-disk speed; the POSIX backend's
      writes go through the page cache, and so do ours now."""
    out: dict[str, Any] = {}
    if kvikio_defaults.get("num_threads") < threads:
        out["num_threads"] = threads
    if "KVIKIO_AUTO_DIRECT_IO_WRITE" not in environ:
        try:
            if kvikio_defaults.get("auto_direct_io_write"):
                out["auto_direct_io_write"] = False
        except (KeyError, AttributeError, ValueError):  # an older kvikio without the setting
            pass
    return out


class KvikioBackend(IOBackend):
    """kvikio ``CuFile`` reads/writes on a pool of worker threads.

    Extents are split and packed into tasks as in :class:`PosixBackend`, one kvikio call per run of buffers
    that lie back to back in memory as well as in the file (kvikio has no vectored I/O). A read starts
    every call of the request at once from one issue thread, so kvikio's pool always has work queued;
    workers then wait for one task each and checksum its pages while they are hot (in parallel, not on
    one waiter). A write checksums, writes and waits per task on the workers. With GPUDirect
    Storage (``gds``), buffers may be CUDA tensors: kvikio reads the file straight into device memory."""

    name = "kvikio"

    def __init__(self, path: Path, threads: int, task_bytes: int = 8 << 20) -> None:
        super().__init__()
        import kvikio  # import error -> the caller falls back to POSIX
        import kvikio.defaults

        self.settings = kvikio_settings(kvikio.defaults, threads)
        if self.settings:
            kvikio.defaults.set(self.settings)  # before the open: no O_DIRECT descriptor is needed then
        self.gds = not _kvikio_compat_mode()
        self.task_bytes = task_bytes
        self.file = kvikio.CuFile(str(path), "r+")
        self.pool = thread_pool(threads, "kvstore-kvikio")  # waits for tasks and checksums their pages
        self.issuer = thread_pool(1, "kvstore-kvikio-issue")  # starts every read of a request up front

    @property
    def device_reads(self) -> bool:
        """Whether reads may target device memory directly (GPUDirect Storage, not compat mode)."""
        return self.gds

    def _issue(self, op: str, task: list[Extent]) -> list[_Started]:
        """Start one kvikio call per memory run of ``task``; ``(future, bytes, offset)`` each. If starting one
        fails, waits for those started (their buffers are in use), then raises."""
        futs: list[_Started] = []
        fn = self.file.pread if op == "read" else self.file.pwrite
        try:
            for ext in task:
                self._fault(op, ext)  # kvikio cannot be made to transfer short: only raising faults apply
                off = ext.offset
                for _, size, bufs in memory_runs(ext.buffers):
                    buf = bufs[0] if len(bufs) == 1 else _span(bufs, size)
                    # task_size = size: a run is at most task_bytes, so kvikio need not split it (and
                    # passing it spares kvikio's Python wrapper a defaults lookup per call)
                    futs.append((fn(buf, size, off, size), size, off))
                    off += size
        except BaseException:
            self._wait(op, futs, raise_errors=False)
            raise
        return futs

    @staticmethod
    def _wait(op: str, futs: list[_Started], raise_errors: bool = True) -> None:
        """Wait for every started call (all of them, even after one failed), then raise the first error."""
        errors = []
        for fut, size, off in futs:
            try:
                n = fut.get()
            except Exception as exc:  # keep waiting for the rest: their buffers are in use
                errors.append(exc)
                continue
            if n != size:
                errors.append(OSError(errno.EIO, f"short {op} at offset {off}: {n} of {size} bytes"))
        if errors and raise_errors:
            err = errors[0]
            raise err if isinstance(err, OSError) else OSError(errno.EIO, f"kvikio {op} failed: {err}")

    def _issue_reads(self, tasks: list[list[Extent]]) -> list[list[_Started]]:
        """On the issue thread: start the reads of every task, in order (kvikio's pool runs them)."""
        started: list[list[_Started]] = []
        try:
            for task in tasks:
                started.append(self._issue("read", task))
        except BaseException:
            for futs in started:
                self._wait("read", futs, raise_errors=False)
            raise
        return started

    def _finish_read(self, task: list[Extent], futs: list[_Started]) -> list[int]:
        """On a worker: wait for one task's reads, then checksum its pages while they are hot."""
        self._wait("read", futs)
        return [off for ext in task for off in _verify_after_read(ext, _host_view)]

    def _write_task(self, task: list[Extent]) -> list[int]:
        """On a worker: checksum the pages of one task, write them, wait."""
        for ext in task:
            _sum_before_write(ext, _host_view)
        self._wait("write", self._issue("write", task))
        return []

    async def _read_all(self, extents: Sequence[Extent]) -> list[int]:
        loop = asyncio.get_running_loop()
        tasks = pack_tasks(split_extents(extents, self.task_bytes), self.task_bytes)
        started = await loop.run_in_executor(self.issuer, self._issue_reads, tasks)
        futs = [loop.run_in_executor(self.pool, self._finish_read, t, f) for t, f in zip(tasks, started)]
        results = await _gather_all(futs)
        return [off for bad in results for off in bad]

    async def _write_all(self, extents: Sequence[Extent]) -> None:
        loop = asyncio.get_running_loop()
        pieces = split_extents(extents, self.task_bytes)  # sums are filled on these pieces
        futs = [loop.run_in_executor(self.pool, self._write_task, t) for t in pack_tasks(pieces, self.task_bytes)]
        await _gather_all(futs)
        _gather_sums(extents, pieces)

    async def read(self, extents: Sequence[Extent]) -> list[int]:
        # shielded whole: a cancelled caller must not leave started reads without a waiter
        return await asyncio.shield(asyncio.ensure_future(self._read_all(extents)))

    async def write(self, extents: Sequence[Extent]) -> None:
        await asyncio.shield(asyncio.ensure_future(self._write_all(extents)))

    def close(self) -> None:
        self.issuer.shutdown(wait=True)
        self.pool.shutdown(wait=True)
        self.file.close()


def probe_kvikio(directory: Path) -> Optional[str]:
    """Try a tiny real kvikio write and read in ``directory``; None if it works, else the reason. Blocks."""
    try:
        import kvikio
    except Exception as exc:  # ImportError, or a broken install
        return f"kvikio is not importable ({type(exc).__name__}: {exc})"
    probe = Path(directory) / f".kvstore-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        data = np.frombuffer(secrets.token_bytes(4096), dtype=np.uint8).copy()
        back = np.zeros_like(data)
        with kvikio.CuFile(str(probe), "w") as f:
            if f.pwrite(data, data.nbytes, 0).get() != data.nbytes:
                return "kvikio probe write was short"
        with kvikio.CuFile(str(probe), "r") as f:
            if f.pread(back, back.nbytes, 0).get() != back.nbytes:
                return "kvikio probe read was short"
        if not np.array_equal(data, back):
            return "kvikio probe read back different bytes"
        return None
    except Exception as exc:
        return f"kvikio probe failed ({type(exc).__name__}: {exc})"
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def choose_backend(directory: Path) -> tuple[str, str]:
    """Pick ``kvikio`` or ``posix`` for a disk tier in ``directory``: (name, reason). Blocks (probe I/O)."""
    want = os.environ.get("KVSTORE_IO_BACKEND", "auto").strip().lower() or "auto"
    if want not in ("auto", "kvikio", "posix"):
        raise ConfigError(f"KVSTORE_IO_BACKEND must be auto, kvikio or posix, got {want!r}")
    if want == "posix":
        return "posix", "KVSTORE_IO_BACKEND=posix"
    why_not = probe_kvikio(directory)
    if why_not is None:
        if want == "kvikio":
            return "kvikio", "KVSTORE_IO_BACKEND=kvikio and its probe write/read succeeded"
        if not _kvikio_compat_mode():
            return "kvikio", "kvikio probe write/read succeeded with GPUDirect Storage"
        # compat mode reads host memory with plain pread on kvikio's pool: never faster than our preadv
        # pool, and one Python call + hand-off per contiguous run (no vectored I/O). The H200 figure of
        # 0.06 (1.2 vs 16 GB/s "warm") came from kvikio's O_DIRECT host writes leaving the pages
        # uncached, fixed in KvikioBackend (kvikio_settings); see docs/benchmarks.md "kvikio compat mode"
        return "posix", ("kvikio works only in compat mode (no GDS driver): its host reads are plain pread "
                         "calls, one per contiguous run, so the POSIX preadv pool (1024 pages a call) is at "
                         "least as fast")
    if want == "kvikio":
        raise ConfigError(f"KVSTORE_IO_BACKEND=kvikio but {why_not}; unset it to fall back to POSIX I/O")
    return "posix", why_not


def _kvikio_compat_mode() -> bool:
    """Whether kvikio would run in compat mode (no GDS). Blocks briefly (driver query)."""
    try:
        import kvikio.defaults

        return bool(kvikio.defaults.is_compat_mode_preferred())
    except Exception:
        return True
