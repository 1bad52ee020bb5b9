"""kvikio against the POSIX ``preadv`` path, same extents, same run: warm disk -> host (and -> device).

Every row reads the same file of ``--size-mib`` into a page-aligned host arena (pinned with ``--pinned``)
as ``Extent``s of ``--page-kib`` pages, with the engine's per-page checksums verified, and is timed
against a raw pool of ``os.preadv`` threads (8 MiB calls into one buffer) measured in the same
repetition; each figure is the median over ``--reps`` of (raw seconds / row seconds).

Rows (per page size and host layout; ``contiguous``: file page i -> arena slot i, ``scattered``: a
random permutation of slots, so no two pages of the file are neighbours in memory):

- ``posix``: :class:`PosixBackend` (the default backend).
- ``kvikio``: :class:`KvikioBackend` as it is now.
- ``kvikio-v0``: the backend before issue #11 (one kvikio future per page, waited for and checksummed
  on one thread, kvikio's default ``auto_direct_io_write``), kept here to measure the change.
- ``kvikio-1call``: one ``CuFile.pread`` of the whole file into one buffer (kvikio's best case; no checksums).
- ``*-after-write`` (``--after-write``): the backend first writes the pages (after evicting the file from
  the page cache), then reads them back: the engine's demote-then-prefetch pattern, which is what the
  H200 benchmark's "warm" kvikio row measured.
- ``device`` rows (``--device cuda``): kvikio ``pread`` into one CUDA tensor vs preadv -> pinned + one copy.

Without a GPU driver kvikio runs on a stand-in driver (``kvikio_cpu.py``), compat mode, host memory only.

    python benchmarks/bench_kvikio.py                       # CPU machine: 256 MiB, 64 KiB / 512 KiB / 2 MiB
    python benchmarks/bench_kvikio.py --size-mib 4096 --pinned --device cuda --threads 8   # GPU machine
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from kvikio_cpu import load_kvikio  # noqa: E402

from kvstore.transfer import io_backends as iob  # noqa: E402
from kvstore.transfer.io_backends import Extent, KvikioBackend, PosixBackend, checksum  # noqa: E402

MiB = 1 << 20


def aligned(nbytes: int, pinned: bool) -> np.ndarray:
    if pinned:
        import torch

        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
    raw = np.empty(nbytes + 4096, dtype=np.uint8)
    off = (-raw.ctypes.data) % 4096
    out = raw[off : off + nbytes]
    out[::4096] = 0  # first touch off the clock
    return out


class RawPreadv:
    """A pool of ``os.preadv`` threads reading the whole file in 8 MiB calls into one buffer."""

    def __init__(self, fd: int, nbytes: int, threads: int, pinned: bool) -> None:
        self.fd, self.nbytes = fd, nbytes
        self.buf = aligned(nbytes, pinned)
        self.pool = ThreadPoolExecutor(threads)

    def _one(self, off: int, n: int) -> None:
        view = memoryview(self.buf[off : off + n])
        while n:
            got = os.preadv(self.fd, [view], off)
            if got <= 0:
                raise OSError("short read")
            view, off, n = view[got:], off + got, n - got

    def read(self) -> float:
        step = 8 * MiB
        t = time.perf_counter()
        list(self.pool.map(lambda o: self._one(o, min(step, self.nbytes - o)), range(0, self.nbytes, step)))
        return time.perf_counter() - t


class KvikioV0:
    """The kvikio backend before issue #11: a future per page, one waiter thread, serial checksums."""

    def __init__(self, kvikio, path: Path, threads: int) -> None:
        self.file = kvikio.CuFile(str(path), "r+")
        self.waiter = ThreadPoolExecutor(1)

    def _run(self, op: str, extents) -> list:
        futs = []
        if op == "write":
            for ext in extents:
                ext.sums = [checksum(b) for b in ext.buffers]
        for ext in extents:
            off = ext.offset
            for buf in ext.buffers:
                fn = self.file.pread if op == "read" else self.file.pwrite
                futs.append(fn(buf, buf.nbytes, off))
                off += buf.nbytes
        for f in futs:
            f.get()
        if op == "read":
            return [o for ext in extents for o in iob._verify_after_read(ext)]
        return []

    async def read(self, extents):
        return await asyncio.get_running_loop().run_in_executor(self.waiter, self._run, "read", extents)

    async def write(self, extents):
        return await asyncio.get_running_loop().run_in_executor(self.waiter, self._run, "write", extents)

    def close(self) -> None:
        self.waiter.shutdown()
        self.file.close()


def evict(fd: int) -> None:
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def cached_fraction(fd: int, nbytes: int) -> float:
    """Share of the file's pages in the page cache (``mincore`` over a read-only mapping)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    addr = libc.mmap(None, nbytes, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
    if addr in (None, ctypes.c_void_p(-1).value):
        return float("nan")
    try:
        vec = np.zeros((nbytes + 4095) // 4096, dtype=np.uint8)
        if libc.mincore(addr, nbytes, vec.ctypes.data) != 0:
            return float("nan")
        return float((vec & 1).mean())
    finally:
        libc.munmap(addr, nbytes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--page-kib", default="64,512,2048")
    p.add_argument("--layouts", default="contiguous,scattered")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--dir", default=None, help="directory of the test file (default: a temp dir)")
    p.add_argument("--pinned", action="store_true", help="pinned host memory (torch, needs CUDA)")
    p.add_argument("--device", default="cpu", help="cuda: add the disk -> device rows")
    p.add_argument("--no-v0", action="store_true", help="skip the pre-#11 backend rows")
    p.add_argument("--after-write", action="store_true", help="add the write-then-read rows")
    p.add_argument("--fake-libcuda", choices=["auto", "no"], default="auto")
    p.add_argument("--no-sums", action="store_true", help="reads without page checksums (the I/O alone)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    kvikio, driver = load_kvikio(args.fake_libcuda)
    import kvikio.defaults as kd

    nbytes = args.size_mib * MiB
    d = Path(args.dir or tempfile.mkdtemp(prefix="bench-kvikio-"))
    path = d / "bench_kvikio.bin"
    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(memoryview(data))
    fd = os.open(path, os.O_RDWR)
    raw = RawPreadv(fd, nbytes, args.threads, args.pinned)
    raw.read()
    arena = aligned(nbytes, args.pinned)
    settings0 = {k: kd.get(k) for k in ("compat_mode", "num_threads", "task_size", "bounce_buffer_size",
                                         "gds_threshold", "auto_direct_io_read", "auto_direct_io_write")}
    print(f"# bench_kvikio {time.strftime('%Y-%m-%d %H:%M')} host={platform.node()} cpus={os.cpu_count()} "
          f"kvikio={kvikio.__version__} driver={driver} file={path} size={args.size_mib} MiB "
          f"threads={args.threads} pinned={args.pinned} reps={args.reps}")
    print(f"# kvikio defaults at start: {settings0}")

    posix = PosixBackend(fd, args.threads)
    # the pre-#11 rows run first, with kvikio's defaults as they were (only num_threads raised)
    v0 = None
    if not args.no_v0:
        kd.set("num_threads", max(args.threads, kd.get("num_threads")))
        v0 = KvikioV0(kvikio, path, args.threads)
    kv = KvikioBackend(path, args.threads)
    print(f"# KvikioBackend changed kvikio defaults: {kv.settings}; gds={kv.gds}")
    whole = kvikio.CuFile(str(path), "r")

    results: dict[str, list[float]] = {}
    extra: dict[str, list[float]] = {}
    vs_posix: dict[str, list[float]] = {}  # posix seconds / kvikio seconds, same repetition

    def note(name: str, ratio: float) -> None:
        results.setdefault(name, []).append(ratio)

    loop = asyncio.new_event_loop()
    for page_kib in [int(x) for x in args.page_kib.split(",")]:
        page = page_kib * 1024
        n = nbytes // page
        sums = [checksum(data[i * page : (i + 1) * page]) for i in range(n)]
        for layout in args.layouts.split(","):
            slots = np.arange(n) if layout == "contiguous" else np.random.default_rng(1).permutation(n)

            def extents(with_sums: bool = True) -> list[Extent]:
                e = Extent(0)
                for i in range(n):
                    s = int(slots[i])
                    e.add(arena[s * page : (s + 1) * page], sums[i] if with_sums else None)
                return [e]

            def check() -> None:
                for i in (0, n // 2, n - 1):
                    s = int(slots[i])
                    if not np.array_equal(arena[s * page : (s + 1) * page], data[i * page : (i + 1) * page]):
                        raise SystemExit(f"data mismatch at page {i}")

            def timed(backend, op: str = "read") -> float:
                if op == "read":
                    arena[::4096] = 0  # stale bytes must not pass the check
                ext = extents(op == "read" and not args.no_sums)
                # the pre-#11 backend ran with kvikio's own default: host writes with O_DIRECT
                ctx = kd.set("auto_direct_io_write", True) if backend is v0 else contextlib.nullcontext()
                with ctx:
                    t = time.perf_counter()
                    bad = loop.run_until_complete(backend.read(ext) if op == "read" else backend.write(ext))
                    dt = time.perf_counter() - t
                if op == "read":
                    if bad:
                        raise SystemExit(f"{type(backend).__name__}: {len(bad)} pages failed their checksums")
                    check()
                return dt

            rows: dict[str, Callable[[], float]] = {"posix": lambda: timed(posix), "kvikio": lambda: timed(kv)}
            if v0 is not None:
                rows["kvikio-v0"] = lambda: timed(v0)
            if layout == "contiguous":
                rows["kvikio-1call"] = lambda: _one_call(whole, arena, nbytes)
            for rep in range(-1, args.reps):
                times = {}
                for name, fn in rows.items():
                    raw.read()
                    r = raw.read()
                    times[name] = t = fn()
                    if rep >= 0:
                        note(f"{page_kib} KiB {layout} {name}", r / t)
                for name in ("kvikio", "kvikio-v0"):
                    if rep >= 0 and name in times:
                        vs_posix.setdefault(f"{page_kib} KiB {layout} {name}", []).append(times["posix"] / times[name])
                if args.after_write:
                    for name, backend in [("posix", posix), ("kvikio", kv)] + ([("kvikio-v0", v0)] if v0 else []):
                        evict(fd)
                        arena[:] = 0
                        for i in range(n):  # the bytes to write: page i into slot slots[i]
                            s = int(slots[i])
                            arena[s * page : (s + 1) * page] = data[i * page : (i + 1) * page]
                        timed(backend, "write")
                        os.fsync(fd)
                        cached = cached_fraction(fd, nbytes)
                        raw.read()
                        r = raw.read() if cached > 0.99 else None  # raw warm needs the file cached; measured after
                        t = timed(backend)
                        if r is None:
                            raw.read()
                            r = raw.read()
                        if rep >= 0:
                            note(f"{page_kib} KiB {layout} {name}-after-write", r / t)
                            extra.setdefault(f"{page_kib} KiB {layout} {name}-after-write cached", []).append(cached)
    if args.device == "cuda":
        import torch

        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        pinned = raw.buf
        for rep in range(-1, args.reps):
            r = raw.read()
            t = time.perf_counter()
            dev.copy_(torch.from_numpy(pinned), non_blocking=True)
            torch.cuda.synchronize()
            r_end = r + time.perf_counter() - t
            t = time.perf_counter()
            whole.pread(dev, nbytes, 0).get()
            torch.cuda.synchronize()
            t = time.perf_counter() - t
            if rep >= 0:
                note("device kvikio-1call vs preadv->pinned+copy", r_end / t)
    loop.close()

    print(f"{'row':<44} {'median':>7}  (raw preadv seconds / row seconds, per repetition)")
    for name, vals in results.items():
        print(f"{name:<44} {statistics.median(vals):7.3f}  {' '.join(f'{v:.2f}' for v in vals)}")
    print(f"{'row':<44} {'median':>7}  (PosixBackend seconds / row seconds, same repetition)")
    for name, vals in vs_posix.items():
        print(f"{name + ' vs posix':<44} {statistics.median(vals):7.3f}  {' '.join(f'{v:.2f}' for v in vals)}")
    for name, vals in extra.items():
        print(f"{name:<44} {statistics.median(vals):7.3f}  (share of the file in the page cache after the write)")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "vs_posix": vs_posix, "extra": extra, "settings": settings0,
                                               "changed": kv.settings, "driver": driver, "args": vars(args)}))
    for b in (posix, kv) + ((v0,) if v0 else ()):
        b.close()
    whole.close()
    os.close(fd)
    path.unlink()


def _one_call(f, arena: np.ndarray, nbytes: int) -> float:
    arena[::4096] = 0
    t = time.perf_counter()
    f.pread(arena, nbytes, 0).get()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
