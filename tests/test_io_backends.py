"""Disk file and I/O backends: layout on disk, permissions, short I/O, backend selection, fault surfacing."""

import errno
import os
import stat

import numpy as np
import pytest

from kvstore import CacheLevel, CacheStatus, ConfigError, StorageIOError
from kvstore.transfer.diskfile import DiskSlotFile, slot_stride
from kvstore.transfer.io_backends import Extent, _full_io, choose_backend, split_extents

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
