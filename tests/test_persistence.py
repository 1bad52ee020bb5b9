"""Persistent disk tier: committed pages and their index survive a restart; foreign or busy
directories are refused; a SIGKILLed writer never leaves a page that is served with wrong bytes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kvstore import (
    CacheLevel,
    ConfigError,
    CorruptPageError,
    DeviceTier,
    DiskTier,
    HostTier,
    KVCacheManager,
    PageLayout,
    StoreConfig,
)

from kvstore.transfer.diskfile import slot_stride

from .conftest import LAYOUT, PAGE, read_pages, sink_to_disk, write_pages
from . import crash_writer

TPP = LAYOUT.tokens_per_page
K = CacheLevel.DISK


def persistent(path, layout=LAYOUT, namespace="m", disk=32) -> StoreConfig:
    pb = layout.page_bytes
    return StoreConfig(
        layout, [DeviceTier(4 * pb), HostTier(4 * pb), DiskTier(disk * pb, path, persistent=True)], namespace=namespace
    )


async def _commit_to_disk(mgr, tokens, seed):
    cache = mgr.create_cache()
    await cache.resume()
    await cache.resize(len(tokens))
    data = write_pages(mgr, cache, seed)
    cache.commit(tokens)
    cache.suspend()
    await sink_to_disk(mgr, cache)
    return cache, data


async def test_committed_pages_on_disk_are_reused_after_a_restart(tmp_path):
    tokens = list(range(3 * TPP + 2))
    async with KVCacheManager(persistent(tmp_path)) as mgr:
        cache, data = await _commit_to_disk(mgr, tokens, seed=1)
        cache.close()
    async with KVCacheManager(persistent(tmp_path)) as mgr:
        match = mgr.lookup(tokens)
        assert match.num_tokens == 3 * TPP and match.pages_per_level[K] == 3
        again = mgr.create_cache(tokens)
        await again.resume()
        assert torch.equal(read_pages(mgr, again).view(torch.uint8), data[:3].view(torch.uint8))
        mgr.check_invariants()


async def test_uncommitted_pages_do_not_survive_and_their_slots_are_free(tmp_path):
    async with KVCacheManager(persistent(tmp_path)) as mgr:
        kept, _ = await _commit_to_disk(mgr, list(range(2 * TPP)), seed=1)
        loose = mgr.create_cache()
        await loose.resume()
        await loose.resize(3 * TPP)
        loose.suspend()
        await sink_to_disk(mgr, loose)
        assert mgr.usage(K).used_pages == 5
    async with KVCacheManager(persistent(tmp_path)) as mgr:
        assert mgr.usage(K).used_pages == 2
        assert mgr.lookup(list(range(2 * TPP))).num_tokens == 2 * TPP


async def test_a_directory_of_another_layout_or_namespace_is_refused(tmp_path):
    async with KVCacheManager(persistent(tmp_path)):
        pass
    other = PageLayout(2, 2, 16, 8, torch.float16)
    with pytest.raises(ConfigError, match="another layout"):
        async with KVCacheManager(persistent(tmp_path, layout=other)):
            pass
    with pytest.raises(ConfigError, match="another layout"):
        async with KVCacheManager(persistent(tmp_path, namespace="other-model")):
            pass


async def test_two_managers_never_open_the_same_tier(tmp_path):
    async with KVCacheManager(persistent(tmp_path)):
        with pytest.raises(ConfigError, match="another process"):
            async with KVCacheManager(persistent(tmp_path)):
                pass
    async with KVCacheManager(persistent(tmp_path)):  # released on close
        pass


async def test_a_corrupt_fingerprint_is_refused(tmp_path):
    async with KVCacheManager(persistent(tmp_path)):
        pass
    (tmp_path / "kvstore.meta").write_text("{not json")
    with pytest.raises(ConfigError, match="not trusted"):
        async with KVCacheManager(persistent(tmp_path)):
            pass


async def test_a_torn_journal_tail_is_ignored(tmp_path):
    tokens = list(range(2 * TPP))
    async with KVCacheManager(persistent(tmp_path)) as mgr:
        cache, data = await _commit_to_disk(mgr, tokens, seed=2)
        cache.close()
    with open(tmp_path / "kvstore.journal", "ab") as f:
        f.write(os.urandom(50))
    async with KVCacheManager(persistent(tmp_path)) as mgr:
        again = mgr.create_cache(tokens)
        assert again.num_reused_tokens == 2 * TPP
        await again.resume()
        assert torch.equal(read_pages(mgr, again).view(torch.uint8), data.view(torch.uint8))


async def test_page_bytes_damaged_while_stopped_are_never_served(tmp_path):
    tokens = list(range(2 * TPP))
    async with KVCacheManager(persistent(tmp_path)) as mgr:
        cache, _ = await _commit_to_disk(mgr, tokens, seed=3)
        slot = cache._pages[1].slot
        cache.close()
    fd = os.open(tmp_path / "kvstore.pages", os.O_RDWR)
    os.pwrite(fd, b"\x5a" * 64, slot * slot_stride(PAGE) + 10)
    os.close(fd)
    async with KVCacheManager(persistent(tmp_path)) as mgr:
        again = mgr.create_cache(tokens)
        with pytest.raises(CorruptPageError):
            await again.resume()
        again.close()
        assert mgr.lookup(tokens).num_tokens == TPP
        mgr.check_invariants()


def _verify_after_crash(directory: Path) -> tuple[int, int, int]:
    """Open the tier a killed writer left; every page served must hold its expected bytes.
    Returns (pages served byte-exact, resumes refused as corrupt, pages served wrong)."""
    import asyncio

    async def check() -> tuple[int, int, int]:
        served = refused = wrong = 0
        tpp = crash_writer.LAYOUT.tokens_per_page
        async with KVCacheManager(crash_writer.config(str(directory))) as mgr:
            mgr.check_invariants()
            for c in range(crash_writer.CONVERSATIONS):
                conv = crash_writer.conversation(c)
                tokens = conv[: crash_writer.MAX_PAGES * tpp]
                if mgr.lookup(tokens).num_tokens == 0:
                    continue
                cache = mgr.create_cache(tokens)
                try:
                    await cache.resume()
                except CorruptPageError:
                    refused += 1
                    cache.close()
                    continue
                got = mgr.device_pool[cache.page_indices()].cpu()
                for j in range(cache.num_pages):
                    want = crash_writer.expected_page(tokens[: (j + 1) * tpp])
                    if torch.equal(got[j].view(torch.uint8), want.view(torch.uint8)):
                        served += 1
                    else:
                        wrong += 1
                cache.close()
            mgr.check_invariants()
        return served, refused, wrong

    return asyncio.run(check())


def crash_trial(directory: Path, trial: int, rng: random.Random, kill_after=(0.05, 0.6)) -> tuple[int, int, int]:
    """One trial: start a writer on ``directory``, SIGKILL it ``kill_after`` seconds (uniform) after it
    reports ready, then verify what it left. Returns :func:`_verify_after_crash`'s counts."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("crash_writer.py")), str(directory), str(trial)],
        stdout=subprocess.PIPE, env=env,
    )
    try:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(*kill_after))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    return _verify_after_crash(directory)


def _crash_trials(tmp_path: Path, trials: int, seed: int = 1234) -> tuple[int, int, int]:
    rng = random.Random(seed)
    served = refused = wrong = 0
    for trial in range(trials):
        s, r, w = crash_trial(tmp_path, trial, rng)
        served += s
        refused += r
        wrong += w
    return served, refused, wrong


def test_sigkilled_writer_never_leaves_a_wrongly_served_page(tmp_path):
    served, refused, wrong = _crash_trials(tmp_path, int(os.environ.get("KVSTORE_CRASH_TRIALS", 4)))
    assert wrong == 0, f"{wrong} pages were served with wrong bytes"
    assert served > 0, "the restarts found committed pages to serve"


@pytest.mark.slow
def test_many_sigkilled_writers_never_leave_a_wrongly_served_page(tmp_path):
    """The longer run (``-m slow``); the full 1000-trial run is ``python -m tests.crash_trials``."""
    served, refused, wrong = _crash_trials(tmp_path, 50, seed=99)
    assert wrong == 0, f"{wrong} pages were served with wrong bytes"
    assert served > 0
