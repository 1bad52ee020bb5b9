"""The kvikio backend: how extents become kvikio calls, the kvikio settings it changes, GDS routing.

The tests that do real kvikio I/O skip unless kvikio is importable; without a GPU driver they run it in
compat mode on the stand-in driver of ``benchmarks/kvikio_cpu.py`` (needs ``cc``)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kvstore.transfer.executor import TransferExecutor
from kvstore.transfer.io_backends import Extent, checksum, kvikio_settings, memory_runs
from kvstore.types import CacheLevel

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
D, H, K = CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK


def test_memory_runs_merge_only_buffers_back_to_back_in_memory():
    arena = np.zeros(8 * 4096, dtype=np.uint8)
    page = lambda s: arena[s * 4096 : (s + 1) * 4096]  # noqa: E731
    runs = memory_runs([page(0), page(1), page(2), page(5), page(4), page(6)])
    assert [(first, size) for first, size, _ in runs] == [(0, 3 * 4096), (3, 4096), (4, 4096), (5, 4096)]
    assert [len(bufs) for _, _, bufs in runs] == [3, 1, 1, 1]
    assert memory_runs([]) == []


class _Defaults:
    def __init__(self, **values):
        self.values = values

    def get(self, name):
        return self.values[name]


def test_settings_turn_off_direct_io_writes_and_raise_the_thread_count():
    got = kvikio_settings(_Defaults(num_threads=1, auto_direct_io_write=True), 8, environ={})
    assert got == {"num_threads": 8, "auto_direct_io_write": False}


def test_settings_leave_an_explicit_direct_io_choice_and_enough_threads_alone():
    env = {"KVIKIO_AUTO_DIRECT_IO_WRITE": "1"}
    assert kvikio_settings(_Defaults(num_threads=16, auto_direct_io_write=True), 8, environ=env) == {}


def test_settings_work_with_a_kvikio_without_the_direct_io_setting():
    class Old(_Defaults):
        def get(self, name):
            if name == "auto_direct_io_write":
                raise KeyError(name)
            return super().get(name)

    assert kvikio_settings(Old(num_threads=1), 4, environ={}) == {"num_threads": 4}


@pytest.mark.parametrize("device_reads,expected", [(False, True), (True, False)])
def test_disk_to_device_skips_host_staging_only_with_device_reads(device_reads, expected):
    ex = TransferExecutor.__new__(TransferExecutor)
    ex.io = SimpleNamespace(device_reads=device_reads)
    ex.copier = SimpleNamespace(cuda=True)
    assert ex._needs_staging(K, D) is expected
    assert ex._needs_staging(D, K) is True, "device -> disk writes stay staged (checksums need host bytes)"
    assert ex._needs_staging(K, H) is False


# ---------------------------------------------------------------------------------------- real kvikio I/O
@pytest.fixture(scope="module")
def kvikio_mod():
    import importlib.util

    if importlib.util.find_spec("kvikio") is None:
        pytest.skip("kvikio is not installed")
    # an earlier failed ``import kvikio`` (the engine's probe, without libcuda) leaves kvikio modules behind
    # with a cached failure: start from a clean import
    for name in [m for m in sys.modules if m == "kvikio" or m.startswith("kvikio.")]:
        del sys.modules[name]
    sys.path.insert(0, str(BENCH))
    try:
        from kvikio_cpu import has_real_driver, load_kvikio

        if not has_real_driver() and shutil.which("cc") is None:
            pytest.skip("no CUDA driver and no cc to build the stand-in driver")
        kvikio, _ = load_kvikio()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"kvikio cannot run here ({type(exc).__name__}: {exc})")
    finally:
        sys.path.remove(str(BENCH))
    return kvikio


@pytest.fixture
def backend(kvikio_mod, tmp_path):
    from kvstore.transfer.io_backends import KvikioBackend

    path = tmp_path / "tier.bin"
    with open(path, "wb") as f:
        f.truncate(16 * 4096)
    be = KvikioBackend(path, threads=2, task_bytes=3 * 4096)  # small tasks: several per request
    yield be, path
    be.close()


def _pages(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 4096), dtype=np.uint8)


def test_kvikio_backend_round_trips_contiguous_and_scattered_pages(backend):
    be, _ = backend
    src = _pages(1, 8)
    order = [0, 1, 2, 6, 5, 7, 3, 4]  # slots of file pages 0..7: runs and singles
    ext = Extent(0, [src[s] for s in order])
    asyncio.run(be.write([ext]))
    assert ext.sums == [checksum(src[s]) for s in order]
    dst = np.zeros_like(src)
    back = Extent(0)
    for s, expected in zip(order, ext.sums):
        back.add(dst[s], expected)
    assert asyncio.run(be.read([back])) == []
    assert np.array_equal(dst, src)


def test_kvikio_backend_reports_the_offset_of_a_page_that_fails_its_checksum(backend):
    be, _ = backend
    src = _pages(2, 4)
    asyncio.run(be.write([Extent(4096, list(src))]))
    dst = np.zeros_like(src)
    sums = [checksum(p) for p in src]
    sums[2] ^= 1
    assert asyncio.run(be.read([Extent(4096, list(dst), sums)])) == [4096 + 2 * 4096]


def test_kvikio_backend_surfaces_a_raising_fault_after_waiting_for_started_reads(backend):
    be, _ = backend
    asyncio.run(be.write([Extent(0, list(_pages(3, 4)))]))

    def hook(op, offset, nbytes):
        if op == "read" and offset >= 3 * 4096:
            raise OSError(5, "injected")

    be.fault_hook = hook
    dst = np.zeros((4, 4096), dtype=np.uint8)
    with pytest.raises(OSError, match="injected"):
        asyncio.run(be.read([Extent(0, list(dst[:3])), Extent(3 * 4096, [dst[3]])]))


def test_kvikio_backend_writes_leave_the_pages_in_the_page_cache(backend):
    """kvikio's default (O_DIRECT host writes) left nothing cached, so 'warm' reads ran at disk speed."""
    be, path = backend
    sys.path.insert(0, str(BENCH))
    try:
        from bench_kvikio import cached_fraction
    finally:
        sys.path.remove(str(BENCH))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        asyncio.run(be.write([Extent(0, list(_pages(4, 16)))]))
        assert cached_fraction(fd, 16 * 4096) > 0.99
    finally:
        os.close(fd)
