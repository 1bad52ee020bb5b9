"""Faults in the persistent tier's own writes and syncs (the journal appends, its fsync, the slot file's
fdatasync, the durable replace of meta/journal at compaction): a fault surfaces as StorageIOError (errno
kept) where durability is needed, and a crash at any point (simulated by copying the directory at that
instant) recovers only pages whose records were durable, each byte-exact. Records after close() are refused."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from kvstore import InvalidStateError, KVCacheManager, StorageIOError
from kvstore.persistence import DiskCatalog

from .conftest import read_pages
from .test_persistence import TPP, _commit_to_disk, persistent

SLOT = 64  # bytes of a slot of the toy data file
META = {"page_bytes": SLOT}


def page(slot: int, gen: int) -> bytes:
    return hashlib.sha256(f"{slot}/{gen}".encode()).digest() * (SLOT // 32)


def key_of(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()  # a page's key says what its bytes are


class Tier:
    """A DiskCatalog over a toy slot file: ``write`` puts bytes in a slot (after before_overwrite), ``commit``
    journals it. ``crash_copy`` copies the directory as a crash at this instant would leave it."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.cat = DiskCatalog(directory, META)
        self.recovered = self.cat.open(64)
        self.data_fd = os.open(directory / "kvstore.pages", os.O_RDWR | os.O_CREAT, 0o600)
        self.gen = 0

    async def start(self) -> "Tier":
        await self.cat.start(self.data_fd)
        return self

    async def write(self, slot: int) -> bytes:
        await self.cat.before_overwrite([slot])
        self.gen += 1
        data = page(slot, self.gen)
        os.pwrite(self.data_fd, data, slot * SLOT)
        return data

    async def commit(self, slot: int) -> bytes:
        data = await self.write(slot)
        self.cat.put(slot, key_of(data), None, 0)
        return data

    async def close(self) -> None:
        await self.cat.close()
        os.close(self.data_fd)


def crash_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def recover(directory: Path) -> dict[int, bytes]:
    """Reopen ``directory`` (after a crash); assert every recovered page is byte-exact; slot -> key."""
    cat = DiskCatalog(directory, META)
    records = cat.open(64)
    try:
        with open(directory / "kvstore.pages", "rb") as f:
            for slot, rec in records.items():
                f.seek(slot * SLOT)
                assert key_of(f.read(SLOT)) == rec.key, f"slot {slot} is recovered but holds other bytes"
    finally:
        cat.release()
    return {s: r.key for s, r in records.items()}


class Faults:
    """A catalog fault hook: ``fail[op] = [errno, times]`` raises that many times; ``short[op] = n`` caps
    writes; ``at[op] = callback`` runs first (e.g. a crash copy); ``calls`` lists every op."""

    def __init__(self) -> None:
        self.fail: dict[str, list[int]] = {}
        self.short: dict[str, int] = {}
        self.at: dict[str, object] = {}
        self.calls: list[str] = []

    def __call__(self, op: str, offset: int, n: int):
        self.calls.append(op)
        if op in self.at:
            self.at[op]()
        f = self.fail.get(op)
        if f and f[1] > 0:
            f[1] -= 1
            raise OSError(f[0], os.strerror(f[0]))
        return self.short.get(op)


@pytest.mark.parametrize("op", ["journal.write", "journal.fsync", "data.fdatasync"])
@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
async def test_a_failing_journal_write_or_sync_raises_storage_io_error_and_recovery_stays_exact(tmp_path, op, err):
    t = await Tier(tmp_path / "d").start()
    keys = {s: key_of(await t.commit(s)) for s in range(4)}
    await t.cat.flush()
    hook = t.cat.fault_hook = Faults()
    hook.fail[op] = [err, 10**9]  # until cleared (the background writer meets it too)
    keys[4] = key_of(await t.commit(4))
    t.cat.delete(0)
    with pytest.raises(StorageIOError) as e:
        await t.cat.flush()
    assert e.value.errno == err and t.cat.error is e.value
    # a crash now: the durable records, each page byte-exact; slot 0's DEL was not durable, so its page
    # (never overwritten) may come back; slot 4's PUT may or may not have reached the file
    got = recover(crash_copy(t.dir, tmp_path / "crash1"))
    assert {1, 2, 3} <= set(got) <= {0, 1, 2, 3, 4}
    assert all(got[s] == keys[s] for s in got)
    # overwriting slot 0 needs its DEL durable: refused while the fault lasts
    with pytest.raises(StorageIOError) as e:
        await t.write(0)
    assert e.value.errno == err
    hook.fail.clear()
    # the fault clears: the write goes through, and the journal says exactly what is on disk
    keys[0] = key_of(await t.commit(0))
    await t.cat.flush()
    got = recover(crash_copy(t.dir, tmp_path / "crash2"))
    if op == "data.fdatasync":  # pages written before a failed data sync are not trusted: no PUT since
        assert got == {s: keys[s] for s in (1, 2, 3)}
    else:
        assert got == keys
    await t.close()
    assert recover(t.dir) == got


async def test_short_journal_writes_are_continued(tmp_path):
    t = await Tier(tmp_path / "d").start()
    t.cat.fault_hook = hook = Faults()
    hook.short["journal.write"] = 7
    keys = {s: key_of(await t.commit(s)) for s in range(5)}
    await t.cat.flush()
    assert hook.calls.count("journal.write") > 1
    await t.close()
    assert recover(t.dir) == keys


async def test_a_torn_append_is_never_followed_by_records_recovery_cannot_reach(tmp_path):
    """A write that stops mid-record and then fails leaves a torn record; nothing is appended after it
    (recovery stops at it): the journal is rewritten first, so later DELs are never lost behind it."""
    t = await Tier(tmp_path / "d").start()
    keys = {s: key_of(await t.commit(s)) for s in range(3)}
    await t.cat.flush()
    writes = []
    full = [True]

    def torn(op, offset, n):
        if op == "journal.write":
            writes.append(n)
            if len(writes) == 1:
                return 10  # the first call stops mid-record, the next ones fail
        if op in ("journal.write", "replace.write") and len(writes) and full[0]:
            raise OSError(errno.EIO, "I/O error")

    t.cat.fault_hook = torn
    await t.commit(3)
    with pytest.raises(StorageIOError):
        await t.cat.flush()
    assert os.path.getsize(t.cat.journal_path) % 96 == 10  # a torn record at the end
    assert recover(crash_copy(t.dir, tmp_path / "torn")) == keys
    full[0] = False
    t.cat.delete(1)
    keys[0] = key_of(await t.commit(0))
    await t.write(1)  # needs the DEL durable: the journal is rewritten, then appended to
    await t.cat.flush()
    assert os.path.getsize(t.cat.journal_path) % 96 == 0
    got = recover(crash_copy(t.dir, tmp_path / "healed"))
    keys.pop(1)
    keys[3] = got[3]  # the page committed before the fault came through
    assert got == keys
    await t.close()


async def test_enospc_on_journal_append_is_raised_where_durability_is_needed_and_heals(tmp_path):
    t = await Tier(tmp_path / "d").start()
    keys = {s: key_of(await t.commit(s)) for s in range(4)}
    await t.cat.flush()
    hook = t.cat.fault_hook = Faults()
    for op in ("journal.write", "replace.write"):
        hook.fail[op] = [errno.ENOSPC, 10**9]  # the disk is full
    for s in range(4):
        t.cat.delete(s)
    for _ in range(3):  # the background writer keeps failing; nothing is dropped
        with pytest.raises(StorageIOError) as e:
            await t.write(2)
        assert e.value.errno == errno.ENOSPC
    keys[5] = key_of(await t.commit(5))  # a fresh slot: no durability needed, journaled later
    assert recover(crash_copy(t.dir, tmp_path / "full")) == {s: keys[s] for s in range(4)}
    hook.fail.clear()  # space is back
    keys[2] = key_of(await t.commit(2))
    await t.cat.flush()
    assert recover(crash_copy(t.dir, tmp_path / "after")) == {2: keys[2], 5: keys[5]}
    await t.close()


REPLACE_STEPS = ["replace.write", "replace.fsync", "replace.rename", "replace.dirfsync"]


async def _journal_with_history(directory: Path) -> dict[int, bytes]:
    """A closed tier whose journal holds PUTs, overwrites and DELs (compaction will shrink it)."""
    t = await Tier(directory).start()
    keys = {}
    for gen in range(3):
        for s in range(6):
            if gen == 2 and s % 2:
                t.cat.delete(s)
                keys.pop(s, None)
                await t.cat.flush()
                continue
            if s in keys:
                t.cat.delete(s)
            keys[s] = key_of(await t.commit(s))
        await t.cat.flush()
    await t.close()
    return keys


@pytest.mark.parametrize("step", REPLACE_STEPS + ["torn tmp"])
def test_a_crash_inside_compaction_leaves_the_old_or_the_new_journal(tmp_path, step):
    import asyncio

    keys = asyncio.run(_journal_with_history(tmp_path / "d"))
    before = (tmp_path / "d" / "kvstore.journal").read_bytes()
    hook = Faults()
    copies = []
    crash = lambda: copies.append(crash_copy(tmp_path / "d", tmp_path / f"crash{len(copies)}"))
    if step == "torn tmp":  # the tmp file half written when the crash comes
        hook.short["replace.write"] = 96 * 2 + 5
        hook.at["replace.fsync"] = crash
    else:
        hook.at[step] = lambda: crash() if not copies else None
    cat = DiskCatalog(tmp_path / "d", META)
    cat.fault_hook = hook
    assert {s: r.key for s, r in cat.open(64).items()} == keys
    cat.release()
    after = (tmp_path / "d" / "kvstore.journal").read_bytes()
    assert len(after) < len(before)
    assert copies
    journal = (copies[0] / "kvstore.journal").read_bytes()
    assert journal in (before, after), "a torn mix of the old and the new journal"
    assert recover(copies[0]) == keys


@pytest.mark.parametrize("step", REPLACE_STEPS)
@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_a_failing_compaction_step_refuses_to_open_and_leaves_the_directory_recoverable(tmp_path, step, err):
    import asyncio

    keys = asyncio.run(_journal_with_history(tmp_path / "d"))
    hook = Faults()
    hook.fail[step] = [err, 1]
    cat = DiskCatalog(tmp_path / "d", META)
    cat.fault_hook = hook
    with pytest.raises(StorageIOError) as e:
        cat.open(64)
    assert e.value.errno == err
    assert recover(tmp_path / "d") == keys  # the lock was released, the journal is old or new


async def test_a_crash_inside_the_journal_rewrite_after_a_fault_leaves_old_or_new(tmp_path):
    t = await Tier(tmp_path / "d").start()
    keys = {s: key_of(await t.commit(s)) for s in range(4)}
    await t.cat.flush()
    hook = t.cat.fault_hook = Faults()
    hook.fail["journal.fsync"] = [errno.EIO, 10**9]
    t.cat.delete(0)
    with pytest.raises(StorageIOError):
        await t.cat.flush()
    hook.fail.clear()
    copies = []
    for step in REPLACE_STEPS:
        hook.at[step] = (lambda st: lambda: copies.append(crash_copy(t.dir, tmp_path / st)))(step)
    await t.write(0)  # heals: rewrite, then append the DEL
    await t.close()
    for c in copies:
        got = recover(c)
        assert got in ({s: keys[s] for s in (1, 2, 3)}, keys)  # slot 0 not yet overwritten in any copy


async def test_records_after_close_are_refused(tmp_path):
    t = await Tier(tmp_path / "d").start()
    await t.commit(0)
    await t.close()
    with pytest.raises(InvalidStateError):
        t.cat.put(1, b"k" * 32, None, 0)
    with pytest.raises(InvalidStateError):
        t.cat.delete(0)


async def test_manager_disk_writes_fail_typed_while_the_journal_is_full_and_recovery_is_exact(tmp_path):
    """Through the manager: with journal appends failing ENOSPC, every operation either works or raises
    StorageIOError(ENOSPC); after a restart every page served is the one committed under its tokens."""
    committed = {}
    async with KVCacheManager(persistent(tmp_path, disk=6)) as mgr:
        for i in range(4):
            toks = [1000 * i + j for j in range(2 * TPP)]
            c, data = await _commit_to_disk(mgr, toks, seed=i)
            committed[tuple(toks)] = data
            c.close()
        await mgr._catalog.flush()
        hook = mgr._catalog.fault_hook = Faults()
        for op in ("journal.write", "replace.write"):
            hook.fail[op] = [errno.ENOSPC, 10**9]
        failures = 0
        for i in range(4, 10):
            toks = [1000 * i + j for j in range(2 * TPP)]
            try:
                c, data = await _commit_to_disk(mgr, toks, seed=i)
            except StorageIOError as e:
                assert e.errno == errno.ENOSPC
                failures += 1
                continue
            committed[tuple(toks)] = data
            c.close()
        mgr.check_invariants()
        assert failures > 0, "reusing a disk slot needed a durable DEL"
        hook.fail.clear()
    async with KVCacheManager(persistent(tmp_path, disk=6)) as mgr:
        served = 0
        for toks, data in committed.items():
            n = mgr.lookup(list(toks)).num_tokens // TPP
            if not n:
                continue
            c = mgr.create_cache(list(toks))
            await c.resume()
            assert c.num_pages >= n
            got = read_pages(mgr, c)[:n]
            assert got.view(torch.uint8).equal(data[:n].view(torch.uint8))
            served += n
            c.close()
        assert served > 0
        mgr.check_invariants()

