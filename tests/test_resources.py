"""Resources: typed errors for memory and file system failures, quotas checked against the machine before
anything is allocated, nothing left half-done, pre-faulted host chunks, stale slot files reclaimed, and
integral arguments of any integer type."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import kvstore.resources as resources
from kvstore import (
    CacheLevel,
    CapacityError,
    ConfigError,
    DeviceTier,
    DiskTier,
    HostTier,
    InvalidArgumentError,
    KVCacheManager,
    PageLayout,
    StorageIOError,
    StoreConfig,
)
from kvstore.transfer import arenas
from kvstore.transfer.arenas import HostArena

from .conftest import LAYOUT, PAGE, assert_data, new_filled_cache

D, H, K = CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK
PiB = 1 << 50


def config(disk_dir, device=4, host=4, disk=16, persistent=False, layout=LAYOUT) -> StoreConfig:
    pb = layout.page_bytes
    tiers = [DeviceTier(device * pb, device="cpu")]
    if host:
        tiers.append(HostTier(host * pb))
    if disk:
        tiers.append(DiskTier(disk * pb, disk_dir, persistent=persistent))
    return StoreConfig(layout, tiers)


def slot_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("kvstore-*.pages")) if directory.is_dir() else []


def assert_released(mgr: KVCacheManager) -> None:
    """A failed start() left nothing allocated or open, and the manager is closed."""
    assert mgr._device is None and mgr._host is None and mgr._disk is None and mgr._io is None
    assert mgr._state == "closed"


# ------------------------------------------------------------------------------------------- disk path
@pytest.mark.parametrize("persistent", [False, True])
async def test_disk_path_under_a_file_is_a_storage_io_error(tmp_path, persistent):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    mgr = KVCacheManager(config(blocker / "disk", persistent=persistent))
    with pytest.raises(StorageIOError) as info:
        await mgr.start()
    err = info.value
    assert isinstance(err, OSError) and err.errno == errno.ENOTDIR
    assert str(blocker) in str(err) and "DiskTier.path" in str(err)
    assert_released(mgr)


async def test_disk_path_that_became_a_file_after_config_is_a_storage_io_error(tmp_path):
    path = tmp_path / "disk"
    mgr = KVCacheManager(config(path))
    path.write_bytes(b"not a directory")
    with pytest.raises(StorageIOError) as info:
        await mgr.start()
    assert info.value.errno in (errno.ENOTDIR, errno.EEXIST) and str(path) in str(info.value)
    assert_released(mgr)


async def test_read_only_disk_directory_is_a_storage_io_error(tmp_path, monkeypatch):
    path = tmp_path / "disk"
    path.mkdir(mode=0o700)
    if os.geteuid() == 0:  # chmod does not stop root: the file system says EROFS instead
        real_open = os.open

        def read_only_open(p, flags, *a, **kw):
            if str(p).startswith(str(path)) and flags & os.O_CREAT:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(p))
            return real_open(p, flags, *a, **kw)

        monkeypatch.setattr(os, "open", read_only_open)
        expected = errno.EROFS
    else:
        path.chmod(0o500)
        expected = errno.EACCES
    mgr = KVCacheManager(config(path))
    with pytest.raises(StorageIOError) as info:
        await mgr.start()
    assert info.value.errno == expected and str(path) in str(info.value)
    assert_released(mgr)


def _enospc(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


async def test_full_disk_at_start_is_storage_io_error_and_releases_everything(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", _enospc)
    mgr = KVCacheManager(config(tmp_path / "disk"))
    with pytest.raises(StorageIOError) as info:
        await mgr.start()
    assert info.value.errno == errno.ENOSPC
    assert "16 slots" in str(info.value) and "free disk space" in str(info.value)
    assert slot_files(tmp_path / "disk") == []
    assert_released(mgr)


async def test_full_disk_at_set_quota_leaves_quota_file_and_data(tmp_path, monkeypatch):
    async with KVCacheManager(config(tmp_path / "disk", device=2, host=2, disk=8)) as mgr:
        caches = [await new_filled_cache(mgr, 2, seed=s) for s in range(4)]  # some pages on disk
        size = os.path.getsize(mgr._disk.path)
        monkeypatch.setattr(os, "posix_fallocate", _enospc)
        with pytest.raises(StorageIOError) as info:
            await mgr.set_quota(K, 64 * PAGE)
        assert info.value.errno == errno.ENOSPC
        monkeypatch.undo()
        assert mgr.quota(K) == 8 * PAGE and mgr.usage(K).total_pages == 8
        assert os.path.getsize(mgr._disk.path) == size
        mgr.check_invariants()
        for cache, data in caches:
            await assert_data(mgr, cache, data)


async def test_disk_quota_over_free_space_is_refused_before_reserving(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "posix_fallocate", lambda *a: calls.append(a))
    monkeypatch.setattr(resources, "disk_free", lambda fd: 4096)
    mgr = KVCacheManager(config(tmp_path / "disk"))
    with pytest.raises(CapacityError, match="free disk space") as info:
        await mgr.start()
    assert str(tmp_path / "disk") in str(info.value) and "4096 bytes" in str(info.value)
    assert calls == [], "nothing reserved"
    assert slot_files(tmp_path / "disk") == []
    assert_released(mgr)


async def test_disk_grow_over_free_space_keeps_the_quota(tmp_path, monkeypatch):
    async with KVCacheManager(config(tmp_path / "disk", disk=8)) as mgr:
        size = os.path.getsize(mgr._disk.path)
        stride = mgr._disk.stride
        monkeypatch.setattr(resources, "disk_free", lambda fd: 4 * stride)
        with pytest.raises(CapacityError, match="DiskTier.quota_bytes"):
            await mgr.set_quota(K, 16 * PAGE)  # 8 more slots of `stride` bytes: more than 4 free
        assert mgr.quota(K) == 8 * PAGE and os.path.getsize(mgr._disk.path) == size
        await mgr.set_quota(K, 12 * PAGE)  # 4 more slots: fits exactly
        assert os.path.getsize(mgr._disk.path) == 12 * stride


# ------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize(
    "tiers",
    [
        lambda d: [DeviceTier(PAGE, device="cpu"), HostTier(PiB)],
        lambda d: [DeviceTier(PAGE, device="cpu"), DiskTier(PiB, d)],
        lambda d: [DeviceTier(PiB, device="cpu")],
    ],
    ids=["host", "disk", "cpu-device"],
)
def test_petabyte_tiers_are_refused_in_milliseconds(tmp_path, tiers):
    cfg = StoreConfig(LAYOUT, tiers(tmp_path / "disk"))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"\d\.0 PiB") as info:
        KVCacheManager(cfg)
    assert time.perf_counter() - t0 < 0.5
    assert "lower" in str(info.value)
    assert not (tmp_path / "disk").exists()


async def test_set_quota_over_available_memory_is_refused_fast_and_changes_nothing(make_store):
    async with make_store(device=2, host=4, disk=16, device_name="cpu") as mgr:
        cache, data = await new_filled_cache(mgr, 2, seed=3)
        chunks = list(mgr._host.chunks)
        pool = mgr.device_pool
        for level, what in ((H, "host tier"), (D, "device tier")):
            t0 = time.perf_counter()
            with pytest.raises(CapacityError, match=what) as info:
                await mgr.set_quota(level, PiB)
            assert time.perf_counter() - t0 < 0.5
            assert ("TiB" in str(info.value) or "PiB" in str(info.value)) and "quota_bytes" in str(info.value)
        assert mgr.quota(H) == 4 * PAGE and mgr.quota(D) == 2 * PAGE
        assert mgr._host.chunks == chunks and mgr._host.slots == 4
        assert mgr.device_pool is pool
        mgr.check_invariants()
        await assert_data(mgr, cache, data)


async def test_start_over_available_memory_is_capacity_error_and_releases_everything(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "memory_available", lambda: 2 * PAGE)
    mgr = KVCacheManager(config(tmp_path / "disk", device=2, host=4))
    with pytest.raises(CapacityError, match="host tier") as info:
        await mgr.start()
    assert "6.0 KiB (6144 bytes)" in str(info.value)  # 2 CPU device pages + 4 host pages
    assert_released(mgr)
    assert slot_files(tmp_path / "disk") == []


async def test_allocation_error_at_start_is_capacity_error_and_releases_everything(tmp_path, monkeypatch):
    def no_memory(self, rows):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(HostArena, "_new_chunk", no_memory)
    mgr = KVCacheManager(config(tmp_path / "disk"))
    with pytest.raises(CapacityError, match="host tier") as info:
        await mgr.start()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert_released(mgr)
    assert slot_files(tmp_path / "disk") == []


async def test_failed_host_grow_gives_back_what_it_allocated(make_store, monkeypatch):
    async with make_store(device=4, host=4, disk=16) as mgr:
        cache, data = await new_filled_cache(mgr, 4, seed=5)
        chunks, starts = list(mgr._host.chunks), list(mgr._host._starts)
        real = HostArena._new_chunk
        made = []

        def second_fails(self, rows):
            if made:
                raise RuntimeError("CUDA error: out of memory")
            made.append(real(self, rows))
            return made[-1]

        monkeypatch.setattr(HostArena, "_new_chunk", second_fails)
        with pytest.raises(CapacityError, match="host tier"):
            await mgr.set_quota(H, 7 * PAGE)  # 3 more pages: a 2-page chunk, then a 1-page one that fails
        assert len(made) == 1, "the first new chunk was allocated before the failure"
        assert mgr._host.chunks == chunks and mgr._host._starts == starts and mgr._host.slots == 4
        assert mgr.quota(H) == 4 * PAGE and mgr.usage(H).total_pages == 4
        monkeypatch.undo()
        mgr.check_invariants()
        await assert_data(mgr, cache, data)
        await mgr.set_quota(H, 7 * PAGE)
        assert mgr._host.slots == 7


# ------------------------------------------------------------------------------------------- pre-fault
def _resident(t: torch.Tensor) -> tuple[int, int]:
    """(resident, total) OS pages of tensor ``t``, from /proc/self/pagemap."""
    start, n = t.data_ptr(), t.numel() * t.element_size()
    first, last = start // 4096, (start + n - 1) // 4096
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        raw = f.read((last - first + 1) * 8)
    entries = struct.unpack(f"{len(raw) // 8}Q", raw)
    return sum(1 for e in entries if e >> 63 & 1), len(entries)


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="needs Linux /proc/self/pagemap")
def test_host_chunks_are_resident_once_allocated():
    arena = HostArena(page_bytes=4096, pinned=False)
    arena.allocate(40 * 256)  # 40 MiB: above glibc's mmap threshold, so fresh pages the kernel maps lazily
    for chunk in arena.chunks:
        resident, total = _resident(chunk)
        assert resident == total, f"{total - resident} of {total} pages not faulted in"


async def test_prefault_runs_on_the_allocation_worker_thread(make_store, monkeypatch):
    seen = []
    real = arenas.prefault

    def spy(t):
        seen.append((threading.current_thread() is threading.main_thread(), t.shape[0]))
        real(t)

    monkeypatch.setattr(arenas, "prefault", spy)
    async with make_store(device=2, host=4, disk=0) as mgr:
        assert sum(rows for _, rows in seen) == 4
        await mgr.set_quota(H, 7 * PAGE)
        assert sum(rows for _, rows in seen) == 7
        assert not any(on_main for on_main, _ in seen), "pre-faulting ran on the event-loop thread"


# ------------------------------------------------------------------------------------------- stale slot files
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _stale_file(directory: Path, pid: int) -> Path:
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / f"kvstore-{pid}-{'ab12' * 3}.pages"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 8192)
    os.close(fd)
    return path


async def test_slot_file_of_a_dead_process_is_reclaimed_and_a_live_ones_kept(tmp_path):
    disk = tmp_path / "disk"
    dead = _stale_file(disk, _dead_pid())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _stale_file(disk, sleeper.pid)
        other = disk / "notes.pages"
        other.write_bytes(b"not ours")
        async with KVCacheManager(config(disk)) as mgr:
            assert not dead.exists(), "the dead process's slot file is removed"
            assert live.exists(), "a live process's slot file is kept"
            assert other.exists()
            assert sorted(slot_files(disk)) == sorted([live.name, mgr._disk.path.name])
    finally:
        sleeper.kill()
        sleeper.wait()


async def test_a_locked_slot_file_is_kept_even_if_its_pid_looks_dead(tmp_path):
    disk = tmp_path / "disk"
    path = _stale_file(disk, _dead_pid())  # e.g. a process of another pid namespace, still running
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        async with KVCacheManager(config(disk)):
            assert path.exists()
    finally:
        os.close(fd)


async def test_two_managers_in_one_directory_keep_their_files(tmp_path):
    disk = tmp_path / "disk"
    async with KVCacheManager(config(disk)) as a, KVCacheManager(config(disk)) as b:
        assert a._disk.path.exists() and b._disk.path.exists() and a._disk.path != b._disk.path
        cache, data = await new_filled_cache(a, 2, seed=9)
        await assert_data(a, cache, data)
    assert slot_files(disk) == []


# ------------------------------------------------------------------------------------------- integer arguments
INTS = [np.int64(4), np.int32(4), np.uint16(4), torch.tensor(4), torch.tensor(4, dtype=torch.int32)]
NOT_INTS = [True, np.bool_(True), torch.tensor(True), torch.tensor([4]), torch.tensor(4.0), 4.0, "4"]


@pytest.mark.parametrize("four", INTS, ids=lambda v: type(v).__name__ + str(getattr(v, "dtype", "")))
async def test_integral_scalars_are_accepted_everywhere(tmp_path, four):
    layout = PageLayout(num_layers=four, num_kv_heads=2, head_dim=four * 4, tokens_per_page=four)
    assert layout == PageLayout(4, 2, 16, 4) and type(layout.num_layers) is int
    pb = layout.page_bytes
    cfg = StoreConfig(
        layout,
        [DeviceTier(four * pb, device="cpu"), HostTier(four * pb), DiskTier(four * 4 * pb, tmp_path / "d")],
        batch_bytes=four * pb, staging_buffers=four, io_threads=four,
    )
    assert type(cfg.tiers[0].quota_bytes) is int and cfg.tiers[0].quota_bytes == 4 * pb
    assert type(cfg.batch_bytes) is int and cfg.io_threads == 4
    async with KVCacheManager(cfg) as mgr:
        cache = mgr.create_cache(priority=four)
        assert cache.priority == 4 and type(cache.priority) is int
        await cache.resume()
        await cache.resize(four * 2)
        assert cache.num_tokens == 8 and type(cache.num_tokens) is int and cache.num_pages == 2
        cache.suspend()
        await mgr.set_quota(type(four)(1) if not isinstance(four, torch.Tensor) else torch.tensor(1), 8 * pb)
        assert mgr.quota(H) == 8 * pb
        big = np.int64(6 * pb) if not isinstance(four, torch.Tensor) else torch.tensor(6 * pb)
        await mgr.set_quota(H, big)
        assert mgr.quota(H) == 6 * pb and mgr.usage(np.int64(1)).total_pages == 6


@pytest.mark.parametrize("bad", NOT_INTS, ids=repr)
async def test_bools_and_non_integers_are_refused_everywhere(make_store, bad):
    with pytest.raises(ConfigError, match="num_layers must be an int"):
        PageLayout(num_layers=bad, num_kv_heads=2, head_dim=16, tokens_per_page=4)
    with pytest.raises(ConfigError, match="HostTier.quota_bytes must be an int"):
        HostTier(bad)
    with pytest.raises(ConfigError, match="StoreConfig.batch_bytes must be an int"):
        StoreConfig(LAYOUT, [DeviceTier(PAGE)], batch_bytes=bad)
    async with make_store(device=2, host=2, disk=0) as mgr:
        with pytest.raises(InvalidArgumentError, match=r"create_cache\(\) priority must be an int"):
            mgr.create_cache(priority=bad)
        with pytest.raises(InvalidArgumentError, match="quota_bytes must be an int"):
            await mgr.set_quota(H, bad)
        with pytest.raises(InvalidArgumentError, match="must be a CacheLevel"):
            mgr.usage(bad)
        cache = mgr.create_cache()
        await cache.resume()
        with pytest.raises(InvalidArgumentError, match="resize\\(\\) takes an int number of tokens"):
            await cache.resize(bad)
        assert mgr.quota(H) == 2 * PAGE and cache.num_tokens == 0
