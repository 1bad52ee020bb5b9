"""Disk file and I/O backends: layout on disk, permissions, short I/O, backend selection, fault surfacing."""

import errno
import os
import stat
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import xxhash

from kvstore import CacheLevel, CacheStatus, ConfigError, StorageIOError
from kvstore.transfer.arenas import HostArena
from kvstore.transfer.diskfile import DiskSlotFile, slot_stride
from kvstore.transfer.executor import TransferExecutor
from kvstore.transfer.io_backends import (
    Extent, PosixBackend, _full_io, _gather_sums, _verify_after_read, choose_backend, split_extents,
)

from .conftest import assert_data, levels, new_cache_on_disk, new_filled_cache


def test_slots_are_aligned_to_4k():
    assert slot_stride(4096) == 4096
    assert slot_stride(5000) == 8192
    assert slot_stride(1) == 4096


def test_disk_file_is_private_and_preallocated(tmp_path):
    f = DiskSlotFile(tmp_path / "tier", 5000)
    f.open(3)
    try:
        assert stat.S_IMODE(os.stat(f.path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "tier").st_mode) == 0o700
        assert os.path.getsize(f.path) == 3 * 8192
        assert f.offset(2) == 2 * 8192
    finally:
        f.close()
    assert not f.path.exists(), "closing removes the file of a non-persistent tier"


def test_full_io_continues_short_transfers():
    out = bytearray(10)
    src = bytes(range(10))
    calls = []

    def short_read(fd, views, offset):
        n = min(3, len(views[0]))
        views[0][:n] = src[offset : offset + n]
        calls.append(offset)
        return n

    _full_io(short_read, -1, [np.frombuffer(out, dtype=np.uint8)[:4], np.frombuffer(out, dtype=np.uint8)[4:]], 0, "read")
    assert bytes(out) == src and len(calls) >= 4


def test_full_io_reports_end_of_file_as_eio():
    with pytest.raises(OSError) as err:
        _full_io(lambda fd, v, o: 0, -1, [np.zeros(8, dtype=np.uint8)], 0, "read")
    assert err.value.errno == errno.EIO


def test_split_extents_respects_task_size_and_keeps_offsets():
    bufs = [np.zeros(100, dtype=np.uint8) for _ in range(5)]
    parts = split_extents([Extent(1000, bufs)], task_bytes=250)
    assert [p.offset for p in parts] == [1000, 1200, 1400]
    assert sum(p.nbytes for p in parts) == 500


def test_backend_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("KVSTORE_IO_BACKEND", "posix")
    assert choose_backend(tmp_path)[0] == "posix"
    monkeypatch.setenv("KVSTORE_IO_BACKEND", "fast")
    with pytest.raises(ConfigError, match="KVSTORE_IO_BACKEND"):
        choose_backend(tmp_path)


def test_auto_falls_back_to_posix_when_kvikio_cannot_work(monkeypatch, tmp_path):
    monkeypatch.setenv("KVSTORE_IO_BACKEND", "auto")
    name, reason = choose_backend(tmp_path)
    try:
        import kvikio  # noqa: F401
    except ImportError:
        assert name == "posix" and "kvikio" in reason
    else:
        assert name in ("kvikio", "posix") and reason
    assert not list(tmp_path.iterdir()), "the probe leaves no file behind"


def test_forcing_kvikio_without_it_is_a_config_error(monkeypatch, tmp_path):
    try:
        import kvikio  # noqa: F401

        pytest.skip("kvikio is importable here")
    except ImportError:
        pass
    monkeypatch.setenv("KVSTORE_IO_BACKEND", "kvikio")
    with pytest.raises(ConfigError, match="kvikio"):
        choose_backend(tmp_path)


async def test_manager_reports_its_backend(make_store):
    async with make_store() as mgr:
        assert mgr.io_backend in ("posix", "kvikio")


def _fail(op_name, err=errno.EIO):
    def hook(op, offset, nbytes):
        if op == op_name:
            raise OSError(err, os.strerror(err))

    return hook


async def test_read_error_fails_resume_with_nothing_moved(make_store):
    async with make_store(device=4, host=4, disk=32) as mgr:
        cache, data = await new_cache_on_disk(mgr, 3, seed=4)
        mgr._io.fault_hook = _fail("read")
        with pytest.raises(StorageIOError) as err:
            await cache.resume()
        assert err.value.errno == errno.EIO
        assert cache.status is CacheStatus.SUSPENDED
        assert levels(cache) == {CacheLevel.DISK: 3}
        assert mgr.stats()["io_errors"] >= 1
        mgr.check_invariants()
        mgr._io.fault_hook = None
        await assert_data(mgr, cache, data)


async def test_write_error_during_demotion_keeps_pages_and_surfaces(make_store):
    async with make_store(device=2, host=2, disk=32) as mgr:
        a, da = await new_filled_cache(mgr, 2, seed=1)
        b, db = await new_filled_cache(mgr, 2, seed=2)  # a -> host
        mgr._io.fault_hook = _fail("write", errno.ENOSPC)
        fresh = mgr.create_cache()
        await fresh.resume()
        with pytest.raises(StorageIOError) as err:
            await fresh.resize(8)  # needs host -> disk demotion of a
        assert err.value.errno == errno.ENOSPC
        assert fresh.num_pages == 0
        mgr.check_invariants()
        mgr._io.fault_hook = None
        await fresh.resize(8)
        fresh.close()
        await assert_data(mgr, a, da)
        await assert_data(mgr, b, db)


async def test_prefetch_read_error_surfaces_from_the_task(make_store):
    async with make_store(device=4, host=4, disk=32) as mgr:
        cache, data = await new_cache_on_disk(mgr, 3, seed=4)
        mgr._io.fault_hook = _fail("read")
        task = cache.prefetch(CacheLevel.HOST)
        with pytest.raises(StorageIOError):
            await task
        assert levels(cache) == {CacheLevel.DISK: 3}
        mgr.check_invariants()
        mgr._io.fault_hook = None
        assert (await cache.prefetch(CacheLevel.HOST)).complete
        await assert_data(mgr, cache, data)


def test_pack_tasks_groups_small_extents_and_keeps_every_byte():
    from kvstore.transfer.io_backends import pack_tasks

    small = [Extent(i * 8192, [np.zeros(4096, dtype=np.uint8)]) for i in range(10)]
    tasks = pack_tasks(split_extents(small, 16384), task_bytes=16384)
    assert [len(t) for t in tasks] == [4, 4, 2]
    assert [e.offset for t in tasks for e in t] == [e.offset for e in small]
    big = pack_tasks(split_extents([Extent(0, [np.zeros(100, dtype=np.uint8) for _ in range(5)])], 250), 250)
    assert sum(e.nbytes for t in big for e in t) == 500 and len(big) == 3


@pytest.mark.parametrize(
    "env,compat,expected",
    [("auto", True, "posix"), ("auto", False, "kvikio"), ("kvikio", True, "kvikio")],
)
def test_kvikio_is_chosen_only_with_gds_unless_forced(monkeypatch, tmp_path, env, compat, expected):
    import kvstore.transfer.io_backends as iob

    monkeypatch.setenv("KVSTORE_IO_BACKEND", env)
    monkeypatch.setattr(iob, "probe_kvikio", lambda d: None)
    monkeypatch.setattr(iob, "_kvikio_compat_mode", lambda: compat)
    name, reason = iob.choose_backend(tmp_path)
    assert name == expected and reason


async def test_write_error_during_a_quota_shrink_keeps_the_quota_and_the_data(make_store):
    async with make_store(device=2, host=6, disk=32) as mgr:
        caches = [await new_filled_cache(mgr, 2, seed=s) for s in range(4)]  # host holds 6 pages
        mgr._io.fault_hook = _fail("write", errno.EIO)
        with pytest.raises(StorageIOError):
            await mgr.set_quota(CacheLevel.HOST, 2 * mgr.layout.page_bytes)
        assert mgr.quota(CacheLevel.HOST) == 6 * mgr.layout.page_bytes
        mgr.check_invariants()
        mgr._io.fault_hook = None
        await mgr.set_quota(CacheLevel.HOST, 2 * mgr.layout.page_bytes)
        for cache, data in caches:
            await assert_data(mgr, cache, data)


# ------------------------------------------------------------------ multi-page buffers (runs of pages)
P = 64  # page bytes of the hand-built executor below


def _executor(stride: int = P) -> TransferExecutor:
    """A TransferExecutor over a host arena of two 4-page chunks and a stand-in disk (``stride`` per slot)."""
    host = HostArena(P, pinned=False)
    host.commit(8, [torch.arange(4 * P, dtype=torch.uint8).view(4, P), torch.zeros((4, P), dtype=torch.uint8)])
    ex = TransferExecutor.__new__(TransferExecutor)
    ex.host = host
    ex.disk = SimpleNamespace(stride=stride, offset=lambda slot: slot * stride)
    ex.page_bytes = P
    ex.sums = {}
    return ex


def _layout(extents):
    """Per extent: (offset, [(pages, first byte address) per buffer])."""
    return [(e.offset, [(b.shape[0] if b.ndim == 2 else 1, b.ctypes.data) for b in e.buffers]) for e in extents]


def test_pages_contiguous_on_disk_and_in_memory_are_one_buffer():
    ex = _executor()
    c0, c1 = (c.numpy() for c in ex.host.chunks)
    # disk 0..5 contiguous; memory: slots 0,1,2 (chunk 0 rows 0-2), 3 (row 3), 4,5 (chunk 1 rows 0-1)
    extents, order = ex._mem_extents(CacheLevel.HOST, [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5])
    assert order == [0, 1, 2, 3, 4, 5]
    assert _layout(extents) == [(0, [(4, c0.ctypes.data), (2, c1.ctypes.data)])], "a chunk boundary cuts the buffer"
    assert extents[0].buffers[0].shape == (4, P) and np.shares_memory(extents[0].buffers[0], c0)
    assert len(extents[0].sums) == 6
    # memory not contiguous (row 2 skipped): separate buffers in one extent; disk gap: a new extent
    extents, order = ex._mem_extents(CacheLevel.HOST, [0, 1, 3, 5, 6], [10, 11, 12, 20, 21])
    assert _layout(extents) == [
        (10 * P, [(2, c0.ctypes.data), (1, c0[3].ctypes.data)]),
        (20 * P, [(2, c1[1].ctypes.data)]),
    ]
    assert extents[0].buffers[1].ndim == 1, "a page alone is a 1-D buffer"
    # row 1 of chunk 0 then row 2 of chunk 1: rows look consecutive, tensors differ
    extents, _ = ex._mem_extents(CacheLevel.HOST, [1, 6], [0, 1])
    assert _layout(extents) == [(0, [(1, c0[1].ctypes.data), (1, c1[2].ctypes.data)])]
    # disk order decides: pages given out of order are sorted by slot, order maps back
    extents, order = ex._mem_extents(CacheLevel.HOST, [2, 0, 1], [7, 5, 6])
    assert order == [1, 2, 0] and _layout(extents) == [(5 * P, [(3, c0.ctypes.data)])]
    # rows in reverse memory order are contiguous on disk only: one extent, a buffer per page
    extents, _ = ex._mem_extents(CacheLevel.HOST, [2, 1, 0], [5, 6, 7])
    assert _layout(extents) == [(5 * P, [(1, c0[2].ctypes.data), (1, c0[1].ctypes.data), (1, c0.ctypes.data)])]


def test_slots_wider_than_a_page_never_merge():
    ex = _executor(stride=2 * P)
    extents, _ = ex._mem_extents(CacheLevel.HOST, [0, 1, 2], [3, 4, 5])
    assert [(e.offset, len(e.buffers), len(e.sums)) for e in extents] == [(6 * P, 1, 1), (8 * P, 1, 1), (10 * P, 1, 1)]


def test_read_extents_carry_the_recorded_checksum_of_each_page():
    ex = _executor()
    ex.sums = {5: (100, 11), 6: (101, 12), 7: (999, 13)}  # slot 7 holds another page's record; 8 has none
    extents, order = ex._mem_extents(CacheLevel.HOST, [0, 1, 2, 3], [8, 7, 6, 5], pids=[103, 102, 101, 100])
    assert order == [3, 2, 1, 0] and len(extents) == 1 and len(extents[0].buffers) == 4
    no = -1  # executor._NO_SUM: can never verify
    assert extents[0].sums == [11, 12, no, no]


def test_record_sums_after_a_write_of_multi_page_buffers():
    ex = _executor()
    extents, order = ex._mem_extents(CacheLevel.HOST, [2, 0, 1], [7, 5, 6])
    for e in extents:
        e.sums = [xxhash.xxh3_64_intdigest(row) for b in e.buffers for row in (b if b.ndim == 2 else [b])]
    ex._record_sums(extents, order, [7, 5, 6], [30, 10, 20])
    c0 = ex.host.chunks[0].numpy()
    assert ex.sums == {s: (pid, xxhash.xxh3_64_intdigest(c0[r])) for s, pid, r in [(7, 30, 2), (5, 10, 0), (6, 20, 1)]}


def test_split_extents_cuts_multi_page_buffers_at_page_boundaries():
    arr = np.arange(10 * P, dtype=np.uint32).astype(np.uint8).reshape(10, P)
    ext = Extent(640, [arr[0:6]], list(range(6)))
    ext.add(arr[6], 6)
    ext.add_pages(arr[7:10], [7, 8, 9])
    assert len(ext.sums) == 10 and ext.nbytes == 10 * P
    parts = split_extents([ext], task_bytes=4 * P)
    assert [p.offset for p in parts] == [640, 640 + 4 * P, 640 + 8 * P]
    assert [p.sums for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [[b.shape for b in p.buffers] for p in parts] == [[(4, P)], [(2, P), (P,), (1, P)], [(2, P)]]
    assert all(b.base is not None and np.shares_memory(b, arr) for p in parts for b in p.buffers), "views, no copies"
    assert b"".join(b.tobytes() for p in parts for b in p.buffers) == arr.tobytes()
    for p in parts:  # a backend fills the pieces' sums; they go back to the extent page by page
        p.sums = [100 + x for x in p.sums]
    _gather_sums([ext], parts)
    assert ext.sums == [100 + i for i in range(10)]
    big = Extent(0, [np.zeros((2000, P), dtype=np.uint8)])
    assert split_extents([big], task_bytes=1 << 30) == [big], "a 2-D buffer is one iovec: an extent that fits stays"
    one = Extent(0)
    one.add(np.zeros(P, dtype=np.uint8))
    assert split_extents([one], task_bytes=P // 2) == [one], "a single page is never cut"


def _posix(tmp_path, pages: int, task_bytes: int) -> tuple[PosixBackend, int]:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, pages * P)
    return PosixBackend(fd, threads=2, task_bytes=task_bytes), fd


@pytest.mark.parametrize("task_bytes", [2 * P, 1 << 20])
async def test_write_checksums_are_per_page_and_a_bad_page_is_reported_at_its_offset(tmp_path, task_bytes):
    be, fd = _posix(tmp_path, 16, task_bytes)
    try:
        src = np.random.default_rng(3).integers(0, 256, (8, P), dtype=np.uint8)
        ext = Extent(2 * P, [src[0:5]])
        ext.add(src[5])
        ext.add_pages(src[6:8])
        await be.write([ext])
        assert ext.sums == [xxhash.xxh3_64_intdigest(row) for row in src]
        os.pwrite(fd, b"\xa5" * 8, 2 * P + 3 * P + 10)  # corrupt page 3 (row 3 of the first buffer)
        dst = np.zeros((8, P), dtype=np.uint8)
        back = Extent(2 * P, [dst[0:5], dst[5], dst[6:8]], list(ext.sums))
        assert await be.read([back]) == [2 * P + 3 * P], "only the corrupted page, at its own file offset"
        assert np.array_equal(np.delete(dst, 3, axis=0), np.delete(src, 3, axis=0))
    finally:
        be.close()
        os.close(fd)


async def test_short_first_transfer_of_a_multi_page_buffer_is_continued(tmp_path):
    be, fd = _posix(tmp_path, 8, 1 << 20)
    try:
        src = np.random.default_rng(4).integers(0, 256, (4, P), dtype=np.uint8)
        be.fault_hook = lambda op, off, n: 7  # the first call of every extent moves 7 bytes
        ext = Extent(0, [src])
        await be.write([ext])
        dst = np.zeros_like(src)
        assert await be.read([Extent(0, [dst], ext.sums)]) == []
        assert np.array_equal(dst, src)
    finally:
        be.close()
        os.close(fd)


def test_verification_makes_host_bytes_once_per_buffer_and_only_to_check():
    arr = np.random.default_rng(5).integers(0, 256, (3, P), dtype=np.uint8)
    seen = []

    def view(buf):  # stands in for _host_view's device -> host copy
        seen.append(buf.shape)
        return buf.copy()

    sums = [xxhash.xxh3_64_intdigest(r) for r in arr]
    ext = Extent(P, [arr, arr[0]], sums + [None])
    ext.sums[1] ^= 1  # page 1 must fail
    assert _verify_after_read(ext, view) == [2 * P]
    assert seen == [(3, P)], "one copy of the 2-D buffer; none for a buffer with nothing to check"
