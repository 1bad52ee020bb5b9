"""Concurrent randomized stress test over the PUBLIC API, the way a serving loop uses it.

Several managers (small tiers, the tiny conftest page layout) run at once on one event loop; on each,
many asyncio tasks run random operations concurrently: create_cache (token prefixes drawn from a few
shared "conversations", sometimes branching off them, so committed prefixes get reused), resume, resize
(grow and shrink), writes into an ACTIVE cache's pages through ``mgr.device_pool[cache.page_indices()]``,
commit, suspend, prefetch (HOST or DEVICE) that is awaited, cancelled, raced by close() or left running
in the background (joined by resume, cancelled by close, awaited later), close, set_quota (grow/shrink
host and disk; device shrinks only when nothing is ACTIVE), lookup, and whole serving "requests"
(create -> resume -> resize -> write -> commit -> suspend/close). Operation tasks are themselves
cancelled at random moments, and disk I/O sleeps a tiny random time on its worker threads so awaits
interleave.

The model keeps the expected bytes of every page of every open cache. The bytes of a token page (a full
page of the cache's token history) are a deterministic function of the token prefix it ends, so a page
reused through a committed prefix must hold exactly those bytes whoever committed it; scratch pages past
the history get random bytes. Every page is checked after every successful resume (and after a restart
of a persistent disk tier, every recovered reusable prefix page). A watchdog calls
``mgr.check_invariants()`` at arbitrary await points. At every quiescent point (all operations done,
every cache closed) no slot and no hold may be leaked: every used page is evictable, used pages are
committed pages with distinct keys (exactly the reachable prefix pages when nothing was dropped), and a
fresh cache can take the whole device level.

Legitimate outcomes of an operation: success, CapacityError, InvalidStateError (state races), and
CancelledError of a task the test cancelled itself. Anything else is a failure, recorded with the seed,
the manager, the operation and the traceback; the test reports all of them (deduplicated by category)
at the end.

Variants: ``lru``, ``slru`` (StoreConfig eviction_policy), ``background`` (StoreConfig free_target=0.3: a
background demoter runs alongside; quiescent checks wait for it to settle), ``persistent`` (DiskTier persistent=True with
restarts: aclose racing live operations, reopen the same directory, check every recovered prefix page),
``chunk2`` (kvstore.manager.PLAN_CHUNK = PLAN_CHUNK_MAX = 2). Every run ends with an aclose() racing live operations.

CI: a few seeds per variant, about two seconds each. A long run (marked ``slow``)::

    KVSTORE_STRESS_SEEDS=0-199 KVSTORE_STRESS_SECONDS=3 python -m pytest tests/test_stress.py -m slow -q

``KVSTORE_STRESS_PROGRESS=path`` appends one line per finished seed (variant, seed, wall seconds, failures), and
every thread's stack for a seed still running ``SLOW_SEED_S`` after its random phase.
``KVSTORE_STRESS_SEEDS``: ``N`` (seeds 0..N-1), ``A-B`` (inclusive) or a comma list; ``KVSTORE_STRESS_SECONDS``:
seconds of random operations per seed; ``KVSTORE_STRESS_REPORT=path.json`` also writes every failure there;
``KVSTORE_STRESS_DEVICE=cuda`` puts the device tier on the GPU.
Runs are seeded but not bit-for-bit reproducible: worker-thread timing changes the interleavings; a failing
seed usually fails again within a few runs.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import random
import re
import sys
import threading
import time
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pytest
import torch

import kvstore.manager
from kvstore import (
    CacheLevel,
    CacheStatus,
    CapacityError,
    DeviceTier,
    DiskTier,
    HostTier,
    InvalidStateError,
    KVCacheManager,
    PrefetchResult,
    StoreConfig,
)

from .conftest import LAYOUT, io_hook

# ----------------------------------------------------------------------------------------------------
# NEW CONTRACT switch (API.md, "Cancellation results and waiting for room"): ``await prefetch_task`` of a
# prefetch stopped by task.cancel(), cache.close() or mgr.aclose() RETURNS a PrefetchResult with
# cancelled=True; a CancelledError raised into a coroutine the test did not cancel is a FAILURE.
# Set to False to accept the old behaviour (CancelledError from such an await).
NEW_CONTRACT_PREFETCH_CANCEL_RESULT = True
# ----------------------------------------------------------------------------------------------------

TPP = LAYOUT.tokens_per_page
PB = LAYOUT.page_bytes
D, H, K = CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK
ACTIVE, SUSPENDED, CLOSED = CacheStatus.ACTIVE, CacheStatus.SUSPENDED, CacheStatus.CLOSED

MAX_PAGES = 6  # pages of one cache's history (the device tier has at least 6 pages at start)
NUM_CONVERSATIONS = 4
MAX_LIVE = 10  # open caches per manager
DRAIN_TIMEOUT_S = 8.0  # operations must settle this fast once no new ones start (else: a stall or deadlock)
STALL_GRACE_S = 30.0  # how much longer a drain waits to tell a stall (it ends) from a deadlock (it does not)
LEGIT = (CapacityError, InvalidStateError)
STRESS_DEVICE = os.environ.get("KVSTORE_STRESS_DEVICE", "cpu")  # "cuda" on the GPU machine

VARIANTS = {
    "lru": dict(policy="lru", persistent=False, plan_chunk=None),
    "slru": dict(policy="slru", persistent=False, plan_chunk=None),
    "persistent": dict(policy="lru", persistent=True, plan_chunk=None),
    "chunk2": dict(policy="lru", persistent=False, plan_chunk=2),
    "background": dict(policy="lru", persistent=False, plan_chunk=None, free_target=0.3),
}


# ------------------------------------------------------------------ failures
@dataclass
class Failure:
    seed: int
    variant: str
    lane: int
    op: str
    kind: str
    message: str
    tb: str = ""

    repeats: int = 0  # later occurrences of the same category on the same lane (not recorded one by one)

    @property
    def category(self) -> tuple[str, str]:
        msg = re.sub(r"0x[0-9a-f]+", "0x?", self.message)
        msg = re.sub(r"\d+", "N", msg)[:160]
        return (self.kind, msg)


def report(failures: list[Failure], limit_tb: int = 1) -> str:
    cats: dict[tuple, list[Failure]] = {}
    for f in failures:
        cats.setdefault(f.category, []).append(f)
    out = io.StringIO()
    out.write(f"{len(failures)} failures in {len(cats)} categories\n")
    for (kind, msg), fs in sorted(cats.items(), key=lambda kv: -sum(1 + f.repeats for f in kv[1])):
        seeds = sorted({(f.variant, f.seed) for f in fs})
        ops = sorted({f.op for f in fs})
        n = sum(1 + f.repeats for f in fs)
        out.write(f"\n=== [{n}x] {kind}: {msg}\n    ops: {ops[:12]}\n    seeds (variant, seed): {seeds[:16]}\n")
        for f in fs[:limit_tb]:
            out.write(f"    first: seed={f.seed} variant={f.variant} lane={f.lane} op={f.op}\n    message: {f.message}\n")
            if f.tb:
                out.write("    " + f.tb.strip().replace("\n", "\n    ") + "\n")
    return out.getvalue()


class LaneBroken(Exception):
    """Too many failures on one manager: stop driving it (its state is no longer trustworthy)."""


# ------------------------------------------------------------------ page data
_DET: dict[tuple[int, ...], torch.Tensor] = {}


def det_page(key: tuple[int, ...]) -> torch.Tensor:
    """Bytes (uint8, flat) of the page that ends the token prefix ``key``: the same for every committer."""
    t = _DET.get(key)
    if t is None:
        seed = zlib.crc32(np.asarray(key, dtype=np.int64).tobytes()) ^ (len(key) << 20)
        gen = torch.Generator().manual_seed(seed)
        t = torch.randn(LAYOUT.page_shape, generator=gen).to(LAYOUT.dtype).contiguous().view(torch.uint8).reshape(-1)
        _DET[key] = t
    return t


def random_page(rng: random.Random) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rng.getrandbits(48))
    return torch.randn(LAYOUT.page_shape, generator=gen).to(LAYOUT.dtype).contiguous().view(torch.uint8).reshape(-1)


def as_pages(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(rows).view(LAYOUT.dtype).reshape(len(rows), *LAYOUT.page_shape)


# ------------------------------------------------------------------ model
class CM:
    """Model of one open cache."""

    _next = 0

    def __init__(self, cache, history: list[int], reused_pages: int) -> None:
        CM._next += 1
        self.uid = CM._next
        self.cache = cache
        self.history = list(history)
        self.pages: list[Optional[torch.Tensor]] = [det_page(self.key(i)) for i in range(reused_pages)]
        self.det: list[bool] = [True] * reused_pages  # page holds det_page(key(i)) (so it may be committed)
        self.committed = reused_pages  # pages committed (or reused)
        self.reused = reused_pages
        self.tainted = False  # the model lost track (after a reported failure): bytes not checked

    def key(self, i: int) -> tuple[int, ...]:
        return tuple(self.history[: (i + 1) * TPP])

    def token_page(self, i: int) -> bool:
        return (i + 1) * TPP <= len(self.history)

    def __repr__(self) -> str:
        return (
            f"<cache#{self.uid} {self.cache.status.name} pages={len(self.pages)} committed={self.committed} "
            f"reused={self.reused} hist={len(self.history)}>"
        )


@dataclass
class Stash:
    task: object
    cm: CM
    target: CacheLevel


@dataclass
class Lane:
    """One manager and the model of everything on it."""

    idx: int
    rng: random.Random
    cfg: StoreConfig
    path: str
    mgr: Optional[KVCacheManager] = None
    caches: list[CM] = field(default_factory=list)
    stash: list[Stash] = field(default_factory=list)
    tasks: set = field(default_factory=set)
    committed_keys: set = field(default_factory=set)  # every token prefix ever committed (a page key)
    histories: set = field(default_factory=set)  # committed token histories (for recovery checks)
    last_stats: dict = field(default_factory=dict)
    failures: int = 0
    broken: bool = False
    closing: bool = False  # an aclose() is (or was) racing the operations
    private_token: int = 10_000
    outcomes: dict = field(default_factory=dict)
    restarts: int = 0
    seen: dict = field(default_factory=dict)
    quiesced: int = 0  # quiescent leak checks done

    def live(self, status: Optional[CacheStatus] = None) -> list[CM]:
        return [cm for cm in self.caches if status is None or cm.cache.status is status]


# ------------------------------------------------------------------ the stress run
class Stress:
    def __init__(self, seed: int, variant: str, seconds: float, tmp: str, lanes: int = 3) -> None:
        self.seed = seed
        self.variant = variant
        self.v = VARIANTS[variant]
        self.seconds = seconds
        self.tmp = tmp
        self.rng = random.Random(seed)
        self.failures: list[Failure] = []
        conv_rng = random.Random(seed ^ 0xC0FFEE)
        self.conversations = [
            [conv_rng.randrange(1, 500) for _ in range(MAX_PAGES * TPP + TPP)] for _ in range(NUM_CONVERSATIONS)
        ]
        self.lanes = [self._make_lane(i) for i in range(lanes)]

    # ---------------------------------------------------------------- setup
    def _make_lane(self, i: int) -> Lane:
        rng = random.Random(self.seed * 7919 + i)
        path = os.path.join(self.tmp, f"lane{i}")
        return Lane(i, rng, self._config(rng.randint(6, 12), rng.randint(8, 16), rng.randint(24, 64), path), path)

    def _config(self, dev: int, host: int, disk: int, path: str) -> StoreConfig:
        tiers = [DeviceTier(dev * PB, device=STRESS_DEVICE), HostTier(host * PB), DiskTier(disk * PB, path, persistent=self.v["persistent"])]
        return StoreConfig(LAYOUT, tiers, eviction_policy=self.v["policy"], batch_bytes=2 * PB, io_threads=2,
                           free_target=self.v.get("free_target", 0.0))

    # ---------------------------------------------------------------- failure recording
    def fail(self, lane: Lane, op: str, kind: str, message: str, tb: str = "") -> None:
        f = Failure(self.seed, self.variant, lane.idx, op, kind, message, tb)
        first = lane.seen.get((f.category, op))
        if first is not None:  # the same failure again on this lane: count it, do not flood the report
            first.repeats += 1
            return
        lane.seen[(f.category, op)] = f
        self.failures.append(f)
        lane.failures += 1
        if lane.failures >= 40:
            lane.broken = True

    def fail_exc(self, lane: Lane, op: str, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.fail(lane, op, type(exc).__name__, str(exc) or repr(exc), tb)

    def outcome(self, lane: Lane, op: str, what: str) -> None:
        lane.outcomes[(op, what)] = lane.outcomes.get((op, what), 0) + 1

    # ---------------------------------------------------------------- checks
    def verify(self, lane: Lane, cm: CM, op: str) -> None:
        """cm is ACTIVE: every page's bytes in device_pool must be the model's."""
        if cm.tainted:
            return
        cache = cm.cache
        if cache.num_pages != len(cm.pages):
            self.fail(lane, op, "ModelMismatch", f"{cm}: engine has {cache.num_pages} pages, model {len(cm.pages)}")
            cm.tainted = True
            return
        if not cm.pages:
            return
        pool = lane.mgr.device_pool
        got = pool[cache.page_indices().to(pool.device)].cpu().contiguous().view(torch.uint8).reshape(len(cm.pages), -1)
        bad = [i for i, exp in enumerate(cm.pages) if exp is not None and not torch.equal(got[i], exp)]
        if bad:
            kinds = ["reused" if i < cm.reused else ("committed" if i < cm.committed else "uncommitted") for i in bad]
            self.fail(lane, op, "WrongBytes", f"{cm}: pages {bad} ({kinds}) hold other bytes than written",
                      self.whose_bytes(lane, cm, bad, got))
            cm.tainted = True

    def whose_bytes(self, lane: Lane, cm: CM, bad: list[int], got: torch.Tensor) -> str:
        """For a WrongBytes report: which committed prefix (if any) the wrong bytes belong to, and where the
        pages are (a slot mix-up shows as another key's bytes; a lost write as stale or random bytes)."""
        out = []
        keys = {tuple(k): det_page(tuple(k)) for k in lane.committed_keys}
        for i in bad:
            page = cm.cache._pages[i]
            match = [len(k) // TPP for k, b in keys.items() if torch.equal(got[i], b)]
            node = lane.mgr._placement.index.node(page)
            out.append(f"page {i} pid={page.pid} at {page.level}/{page.slot} owners={page.owners} indexed={page.indexed} "
                       f"node_key={'yes' if node is not None else 'no'} expected key len={len(cm.key(i))} "
                       f"bytes match committed keys of lengths (pages) {match[:8]} "
                       f"self-key match={torch.equal(got[i], det_page(cm.key(i)))}\n{trace_of(lane.mgr._placement, page.pid)}")
        return "\n".join(out)

    def check_model(self, lane: Lane, op: str) -> None:
        for cm in lane.caches:
            if cm.tainted:
                continue
            st = cm.cache.status
            if st is CLOSED and not lane.closing:
                self.fail(lane, op, "ModelMismatch", f"{cm} is CLOSED but the test never closed it")
                cm.tainted = True
            elif st is not CLOSED and cm.cache.num_pages != len(cm.pages):
                self.fail(lane, op, "ModelMismatch", f"{cm}: engine has {cm.cache.num_pages} pages, model {len(cm.pages)}")
                cm.tainted = True

    def check_stats(self, lane: Lane, op: str) -> None:
        stats = lane.mgr.stats()
        for k, v in lane.last_stats.items():
            if stats.get(k, 0) < v:
                self.fail(lane, op, "StatsDecreased", f"stats[{k!r}] went from {v} to {stats.get(k)}")
        lane.last_stats = dict(stats)

    def check_invariants(self, lane: Lane, op: str) -> None:
        try:
            lane.mgr.check_invariants()
        except AssertionError as e:
            self.fail_exc(lane, op, e)

    def check_prefix(self, lane: Lane, tokens: list[int], n_tokens: int, op: str) -> None:
        """A reused/looked-up prefix of n_tokens must be whole pages that were all committed."""
        if n_tokens % TPP or n_tokens > len(tokens):
            self.fail(lane, op, "BadPrefix", f"reusable prefix of {n_tokens} tokens of {len(tokens)} (tpp={TPP})")
            return
        for i in range(n_tokens // TPP):
            if tuple(tokens[: (i + 1) * TPP]) not in lane.committed_keys:
                self.fail(lane, op, "BadPrefix", f"page {i} of a {n_tokens}-token reusable prefix was never committed")
                return

    # ---------------------------------------------------------------- model-level operations (no awaits except the engine's)
    def pick(self, lane: Lane, status: Optional[CacheStatus] = None) -> Optional[CM]:
        pool = lane.live(status)
        return lane.rng.choice(pool) if pool else None

    def new_tokens(self, lane: Lane) -> list[int]:
        rng = lane.rng
        conv = rng.choice(self.conversations)
        n = rng.randint(1, MAX_PAGES * TPP + TPP - 1)
        tokens = conv[:n]
        if rng.random() < 0.3:  # branch off the conversation
            b = rng.randint(0, n)
            tail = []
            for _ in range(n - b):
                lane.private_token += 1
                tail.append(lane.private_token)
            tokens = tokens[:b] + tail
        return tokens

    def do_create(self, lane: Lane, op: str) -> CM:
        tokens = self.new_tokens(lane)
        cache = lane.mgr.create_cache(tokens, priority=lane.rng.randint(0, 2))
        r = cache.num_reused_tokens
        self.check_prefix(lane, tokens, r, op)
        if cache.num_pages * TPP != r:
            self.fail(lane, op, "ModelMismatch", f"create_cache: {cache.num_pages} pages for {r} reused tokens")
        cm = CM(cache, tokens, r // TPP)
        lane.caches.append(cm)
        return cm

    async def do_resume(self, lane: Lane, cm: CM, op: str) -> None:
        levels_before = dict(cm.cache.page_levels())
        try:
            await cm.cache.resume()
        except CapacityError:
            if cm.cache.status is ACTIVE:
                self.fail(lane, op, "ModelMismatch", f"resume() raised CapacityError but left {cm} ACTIVE")
            del levels_before  # pages may move meanwhile through other operations: not checked
            raise
        except asyncio.CancelledError:
            if cm.cache.status is ACTIVE:
                self.fail(lane, op, "ModelMismatch", f"a cancelled resume() left {cm} ACTIVE")
            raise
        if cm.cache.status is not ACTIVE:
            self.fail(lane, op, "ModelMismatch", f"resume() returned but {cm} is not ACTIVE")
            return
        self.verify(lane, cm, op)

    async def do_resize(self, lane: Lane, cm: CM, num_tokens: int, op: str) -> None:
        cache = cm.cache
        old = cache.num_pages
        try:
            await cache.resize(num_tokens)
        except (CapacityError, asyncio.CancelledError) as e:
            if cache.status is not CLOSED and cache.num_pages != old and not cm.tainted:
                self.fail(lane, op, "ModelMismatch", f"resize({num_tokens}) raised {type(e).__name__} but pages went {old} -> {cache.num_pages}")
                cm.tainted = True
            raise
        n = cache.num_pages
        want = math.ceil(num_tokens / TPP)
        if n != want and not cm.tainted:
            self.fail(lane, op, "ModelMismatch", f"resize({num_tokens}) returned with {n} pages, wanted {want}")
            cm.tainted = True
            return
        if cache.status is not ACTIVE:
            self.fail(lane, op, "ModelMismatch", f"resize() returned but {cm} is {cache.status.name}")
            cm.tainted = True
            return
        if n > len(cm.pages):  # learn what the new pages hold (unspecified, but must then stay)
            pool = lane.mgr.device_pool
            idx = cache.page_indices()[len(cm.pages):].to(pool.device)
            rows = pool[idx].cpu().contiguous().view(torch.uint8).reshape(len(idx), -1).clone()
            cm.pages.extend(rows[i] for i in range(len(idx)))
            cm.det.extend([False] * len(idx))
        elif n < len(cm.pages):
            del cm.pages[n:]
            del cm.det[n:]
            cm.committed = min(cm.committed, n)
            cm.reused = min(cm.reused, n)

    def do_write(self, lane: Lane, cm: CM, op: str) -> None:
        """Write every (or a random subset of the) uncommitted page(s) of an ACTIVE cache."""
        cache = cm.cache
        n = len(cm.pages)
        if cache.num_pages != n:
            return  # check_model reports it
        todo = [i for i in range(cm.committed, n) if lane.rng.random() < 0.8]
        if not todo:
            return
        rows = []
        for i in todo:
            rows.append(det_page(cm.key(i)) if cm.token_page(i) else random_page(lane.rng))
        pool = lane.mgr.device_pool
        idx = cache.page_indices()[todo].to(pool.device)
        pool[idx] = as_pages(rows).to(pool.device)
        for i, row in zip(todo, rows, strict=True):
            cm.pages[i] = row
            cm.det[i] = cm.token_page(i)

    def do_commit(self, lane: Lane, cm: CM, op: str) -> None:
        ready = cm.committed
        while ready < len(cm.pages) and cm.det[ready] and cm.token_page(ready):
            ready += 1
        full = lane.rng.randint(cm.committed, ready)
        t = full * TPP + lane.rng.randint(0, TPP - 1)
        t = min(t, len(cm.history))
        cm.cache.commit(cm.history[:t])
        got = min(t // TPP, len(cm.pages))
        for i in range(cm.committed, got):
            lane.committed_keys.add(cm.key(i))
        if got > cm.committed:
            lane.histories.add(tuple(cm.history[: got * TPP]))
        cm.committed = max(cm.committed, got)

    def do_close(self, lane: Lane, cm: CM) -> None:
        cm.cache.close()
        if cm in lane.caches:
            lane.caches.remove(cm)

    async def await_prefetch(self, lane: Lane, task, cm: CM, op: str, we_cancelled: bool) -> None:
        """Await a prefetch task and judge the outcome (the NEW CONTRACT check lives here)."""
        me = asyncio.current_task()
        try:
            res = await task
        except asyncio.CancelledError as e:
            if me.cancelling():
                # this coroutine was cancelled by the test: legitimate. The prefetch itself goes on (an
                # awaiter's cancellation never stops it): stash it so quiescent checks wait for it.
                if not task.done():
                    lane.stash.append(Stash(task, cm, task.target))
                raise
            # ---- NEW CONTRACT check: a prefetch stopped by cancel()/close()/aclose() must RETURN
            # ---- PrefetchResult(cancelled=True), not raise CancelledError into its awaiter.
            if NEW_CONTRACT_PREFETCH_CANCEL_RESULT:
                why = "task.cancel()" if we_cancelled else (
                    f"close()/aclose() (cache {cm.cache.status.name}{', manager closing' if lane.closing else ''})")
                self.fail(
                    lane, op, "NewContract:CancelledError",
                    f"await prefetch_task raised CancelledError (stopped by {why}) instead of PrefetchResult(cancelled=True)",
                    "".join(traceback.format_exception(type(e), e, e.__traceback__)),
                )
            return
        if not isinstance(res, PrefetchResult):
            self.fail(lane, op, "BadResult", f"await prefetch returned {res!r}")
            return
        self.outcome(lane, op, "cancelled" if getattr(res, "cancelled", False) else ("complete" if res.complete else "partial"))

    # ---------------------------------------------------------------- operations
    async def op_create(self, lane: Lane, op: str) -> None:
        if len(lane.caches) >= MAX_LIVE:
            cm = self.pick(lane)
            self.do_close(lane, cm)
            return
        self.do_create(lane, op)

    async def op_resume(self, lane: Lane, op: str) -> None:
        cm = self.pick(lane, SUSPENDED)
        if cm is not None:
            await self.do_resume(lane, cm, op)

    async def op_resize(self, lane: Lane, op: str) -> None:
        cm = self.pick(lane, ACTIVE)
        if cm is not None:
            pages = lane.rng.randint(0, MAX_PAGES)
            await self.do_resize(lane, cm, max(0, pages * TPP - lane.rng.randint(0, TPP - 1)), op)

    async def op_write(self, lane: Lane, op: str) -> None:
        cm = self.pick(lane, ACTIVE)
        if cm is not None:
            self.do_write(lane, cm, op)
            if lane.rng.random() < 0.5:
                self.do_commit(lane, cm, op)

    async def op_commit(self, lane: Lane, op: str) -> None:
        pool = [cm for cm in lane.caches if cm.cache.status is not CLOSED]
        if pool:
            self.do_commit(lane, lane.rng.choice(pool), op)

    async def op_suspend(self, lane: Lane, op: str) -> None:
        cm = self.pick(lane, ACTIVE)
        if cm is not None:
            cm.cache.suspend()

    async def op_close(self, lane: Lane, op: str) -> None:
        cm = self.pick(lane)
        if cm is not None:
            self.do_close(lane, cm)

    async def op_prefetch(self, lane: Lane, op: str) -> None:
        cm = self.pick(lane, SUSPENDED)
        if cm is None:
            return
        rng = lane.rng
        target = rng.choice([H, D])
        task = cm.cache.prefetch(target)
        mode = rng.choice(["await", "cancel", "stash", "stash", "close"])
        op = f"{op}:{mode}:{target.name}"
        if mode == "stash":
            lane.stash.append(Stash(task, cm, target))
            return
        if mode in ("cancel", "close"):
            await self.jitter(rng)
            if mode == "cancel":
                task.cancel()
            else:
                self.do_close(lane, cm)
        await self.await_prefetch(lane, task, cm, op, we_cancelled=(mode == "cancel"))

    async def op_await_stash(self, lane: Lane, op: str) -> None:
        if not lane.stash:
            return
        s = lane.stash.pop(lane.rng.randrange(len(lane.stash)))
        await self.await_prefetch(lane, s.task, s.cm, f"{op}:{s.target.name}", we_cancelled=False)

    async def op_set_quota(self, lane: Lane, op: str) -> None:
        rng = lane.rng
        level = rng.choice([D, H, H, K, K])
        mgr = lane.mgr
        cur = mgr.usage(level).total_pages
        lo, hi = {D: (4, 14), H: (2, 20), K: (8, 70)}[level]
        new = rng.randint(lo, hi)
        if level is D and new < cur and lane.live(ACTIVE):
            new = cur + rng.randint(0, 2)  # device shrinks only while nothing is ACTIVE
        op = f"{op}:{level.name}:{cur}->{new}"
        await mgr.set_quota(level, new * PB)
        if mgr.quota(level) != new * PB or mgr.usage(level).total_pages != new:
            self.fail(lane, op, "QuotaMismatch", f"set_quota returned but quota={mgr.quota(level) // PB} pages, usage={mgr.usage(level)}")

    async def op_lookup(self, lane: Lane, op: str) -> None:
        tokens = self.new_tokens(lane)
        m = lane.mgr.lookup(tokens)
        self.check_prefix(lane, tokens, m.num_tokens, op)
        if sum(m.pages_per_level.values()) * TPP != m.num_tokens:
            self.fail(lane, op, "BadPrefix", f"lookup: {m}")

    async def op_request(self, lane: Lane, op: str) -> None:
        """One serving request: create, resume, resize to the history (+ scratch), write, commit, then
        suspend (kept for a later turn) or close."""
        if len(lane.caches) >= MAX_LIVE:
            self.do_close(lane, self.pick(lane))
        rng = lane.rng
        cm = self.do_create(lane, op)
        if rng.random() < 0.3:
            await self.await_prefetch(lane, cm.cache.prefetch(rng.choice([H, D])), cm, op + ":prefetch", False)
        await self.do_resume(lane, cm, op + ":resume")
        want = min(MAX_PAGES * TPP, len(cm.history) + rng.randint(0, TPP))
        await self.do_resize(lane, cm, want, op + ":resize")
        self.do_write(lane, cm, op + ":write")
        self.do_commit(lane, cm, op + ":commit")
        await self.jitter(rng)
        if cm.cache.status is not ACTIVE:
            return
        if rng.random() < 0.5:
            cm.cache.suspend()
        else:
            self.do_close(lane, cm)

    OPS: list[tuple[str, int]] = [
        ("create", 6), ("request", 8), ("resume", 10), ("resize", 8), ("write", 8), ("commit", 4),
        ("suspend", 6), ("close", 3), ("prefetch", 8), ("await_stash", 3), ("set_quota", 3), ("lookup", 2),
    ]

    # ---------------------------------------------------------------- task plumbing
    @staticmethod
    async def jitter(rng: random.Random) -> None:
        for _ in range(rng.randint(0, 4)):
            await asyncio.sleep(0)
        if rng.random() < 0.3:
            await asyncio.sleep(rng.random() * 0.002)

    async def run_op(self, lane: Lane, name: str) -> None:
        fn: Callable = getattr(self, f"op_{name}")
        try:
            await fn(lane, name)
            self.outcome(lane, name, "ok")
        except LEGIT as e:
            self.outcome(lane, name, type(e).__name__)
        except asyncio.CancelledError as e:
            if asyncio.current_task().cancelling():
                self.outcome(lane, name, "cancelled")  # we cancelled this task: legitimate
            else:
                self.fail(lane, name, "CancelledError", "CancelledError raised into an operation nobody cancelled",
                          "".join(traceback.format_exception(type(e), e, e.__traceback__)))
        except Exception as e:  # noqa: BLE001 - everything else is a failure
            self.fail_exc(lane, name, e)

    def spawn(self, lane: Lane) -> None:
        names, weights = zip(*self.OPS, strict=True)
        name = lane.rng.choices(names, weights)[0]
        task = asyncio.ensure_future(self.run_op(lane, name))
        lane.tasks.add(task)
        task.add_done_callback(lane.tasks.discard)
        if lane.rng.random() < 0.15:  # cancel the operation at a random moment
            killer = asyncio.ensure_future(self.kill_later(lane.rng, task))
            lane.tasks.add(killer)
            killer.add_done_callback(lane.tasks.discard)

    async def kill_later(self, rng: random.Random, task: asyncio.Task) -> None:
        await self.jitter(rng)
        task.cancel()

    async def watchdog(self, lane: Lane, stop: asyncio.Event) -> None:
        rng = random.Random(lane.rng.random())
        while not stop.is_set():
            for _ in range(rng.randint(1, 6)):
                await asyncio.sleep(0)
            if rng.random() < 0.1:
                await asyncio.sleep(0.001)
            if lane.mgr is None or lane.closing:
                continue
            self.check_invariants(lane, "watchdog:check_invariants")
            self.check_model(lane, "watchdog:model")
            self.check_stats(lane, "watchdog:stats")

    async def drive(self, lane: Lane, seconds: float) -> None:
        """Random operations on ``lane`` for ``seconds`` with a random concurrency."""
        rng = lane.rng
        conc = rng.randint(4, 12)
        until = time.monotonic() + seconds
        while time.monotonic() < until and not lane.broken:
            while len(lane.tasks) < conc:
                self.spawn(lane)
            await asyncio.sleep(0) if rng.random() < 0.8 else await asyncio.sleep(rng.random() * 0.002)

    async def drain(self, lane: Lane, what: str) -> bool:
        """Wait for every operation task. A task still pending after DRAIN_TIMEOUT_S fails the run: a ``Stall``
        when everything finished within STALL_GRACE_S more (the report says how long it took), else a
        ``Deadlock``; both with the stuck tasks' await chains and the worker threads' stacks."""
        if lane.tasks:
            t0 = time.perf_counter()
            _, pending = await asyncio.wait(set(lane.tasks), timeout=DRAIN_TIMEOUT_S)
            if pending:
                stacks = [await_chain(t) for t in list(pending)[:4]]
                stacks += [engine_state(lane.mgr), thread_stacks()]
                for t in asyncio.all_tasks():  # the engine's own tasks (quota changes, runs, batches)
                    chain = await_chain(t)
                    if any(k in chain for k in ("set_quota", "_run_batch", "_run_swap", "aclose")):
                        stacks.append(chain)
                n = len(pending)
                _, pending = await asyncio.wait(pending, timeout=STALL_GRACE_S)
                waited = time.perf_counter() - t0
                if not pending:
                    self.fail(lane, what, "Stall", f"{n} operations took {waited:.0f}s to settle after the last "
                              f"started (limit {DRAIN_TIMEOUT_S}s)", "\n".join(stacks))
                    return True
                stacks.append(f"{waited:.0f} s later:\n" + engine_state(lane.mgr) + "\n" + thread_stacks())
                self.fail(lane, what, "Deadlock", f"{n} operations still pending {waited:.0f}s after the last started",
                          "\n".join(stacks))
                lane.broken = True
                for t in pending:
                    t.cancel()
                await asyncio.wait(pending, timeout=2)
                return False
        return True

    async def settle_stash(self, lane: Lane, what: str) -> None:
        stash, lane.stash = lane.stash, []
        for s in stash:
            try:
                await asyncio.wait_for(self.await_prefetch(lane, s.task, s.cm, what, we_cancelled=False), DRAIN_TIMEOUT_S)
            except asyncio.TimeoutError:
                self.fail(lane, what, "Deadlock", f"a background prefetch of {s.cm} did not finish in {DRAIN_TIMEOUT_S}s")
                lane.broken = True
            except Exception as e:  # noqa: BLE001
                if not isinstance(e, LEGIT):
                    self.fail_exc(lane, what, e)

    # ---------------------------------------------------------------- quiescent checks
    async def quiesce(self, lane: Lane, what: str) -> None:
        """No operation running: settle background prefetches, close every cache, check for leaks."""
        if not await self.drain(lane, what):
            return
        await self.settle_stash(lane, what + ":stash")
        # nothing else runs now: every open cache resumes in turn (bytes checked) or, on CapacityError,
        # has every page where it was
        for cm in list(lane.caches):
            try:
                if cm.cache.status is ACTIVE:
                    self.verify(lane, cm, what + ":sweep")
                    cm.cache.suspend()
            except Exception as e:  # noqa: BLE001
                self.fail_exc(lane, what + ":sweep-suspend", e)
        for cm in list(lane.caches):
            await self.background_idle(lane, what + ":sweep")
            before = dict(cm.cache.page_levels())
            demoted = lane.mgr.stats()["background_demotions"]
            try:
                await self.do_resume(lane, cm, what + ":sweep-resume")
                cm.cache.suspend()
            except CapacityError:
                after = dict(cm.cache.page_levels())
                if after != before and lane.mgr.stats()["background_demotions"] == demoted:
                    self.fail(lane, what + ":sweep-resume", "CapacityErrorMovedPages",
                              f"resume() of {cm} raised CapacityError (nothing else running) but its pages went {before} -> {after}")
            except Exception as e:  # noqa: BLE001
                self.fail_exc(lane, what + ":sweep-resume", e)
        for cm in list(lane.caches):
            try:
                self.do_close(lane, cm)
            except Exception as e:  # noqa: BLE001
                self.fail_exc(lane, what + ":close", e)
        lane.caches.clear()
        lane.quiesced += 1
        mgr = lane.mgr
        await self.background_idle(lane, what + ":leaks")
        self.check_invariants(lane, what + ":check_invariants")
        self.check_stats(lane, what + ":stats")
        used = {}
        for lvl in (D, H, K):
            u = mgr.usage(lvl)
            used[lvl] = u.used_pages
            if u.evictable_pages != u.used_pages:
                self.fail(lane, what + ":leaks", "LeakedHold", f"all caches closed, {lvl.name}: {u}")
        # every used slot is a committed page with its own key; exactly the reachable ones when nothing was dropped
        reach = {D: 0, H: 0, K: 0}
        for key in lane.committed_keys:
            m = mgr.lookup(list(key))
            if m.num_tokens != len(key):
                continue
            parent = mgr.lookup(list(key[:-TPP])).pages_per_level if len(key) > TPP else {}
            for lvl in (D, H, K):
                if m.pages_per_level.get(lvl, 0) - parent.get(lvl, 0) == 1:
                    reach[lvl] += 1
        if sum(used.values()) > len(lane.committed_keys):
            self.fail(lane, what + ":leaks", "LeakedSlot",
                      f"all caches closed: {sum(used.values())} used slots {used} but only {len(lane.committed_keys)} keys were ever committed")
        for lvl in (D, H, K):
            if reach[lvl] > used[lvl]:
                self.fail(lane, what + ":leaks", "UsageMismatch", f"{reach[lvl]} reachable prefix pages at {lvl.name}, usage says {used[lvl]} used")
        exact = not self.v["persistent"] and mgr.stats().get("drops", 0) == 0 and mgr.stats().get("corrupt_pages", 0) == 0
        if exact and reach != used:
            self.fail(lane, what + ":leaks", "LeakedSlot", f"all caches closed, nothing dropped: used {used} != reachable committed pages {reach}")
        # a fresh cache can take the whole device level (nothing is held or leaked)
        total = mgr.usage(D).total_pages
        cache = mgr.create_cache()
        try:
            await cache.resume()
            await cache.resize(total * TPP)
        except Exception as e:  # noqa: BLE001
            self.fail_exc(lane, what + f":fill-device({total})", e)
        finally:
            cache.close()
        self.check_invariants(lane, what + ":check_invariants-after-fill")

    async def background_idle(self, lane: Lane, what: str) -> None:
        """Wait until the background demoter (variant ``background``) has nothing left to do."""
        mgr, target = lane.mgr, self.v.get("free_target", 0.0)
        if not target:
            return
        loop = asyncio.get_running_loop()
        end = loop.time() + DRAIN_TIMEOUT_S
        while any(op.kind == "demote" for op in mgr._ledger.ops) or mgr._placement.background_room(target):
            if loop.time() > end:
                self.fail(lane, what, "Stall", f"the background demoter did not settle in {DRAIN_TIMEOUT_S}s: "
                          f"{mgr._placement.background_room(target)} {engine_state(mgr)}")
                return
            await asyncio.sleep(0.001)

    async def racing_aclose(self, lane: Lane, what: str) -> None:
        """A burst of operations with aclose() called in the middle of it."""
        conc = lane.rng.randint(4, 10)
        for _ in range(conc):
            self.spawn(lane)
        await self.jitter(lane.rng)
        await asyncio.sleep(lane.rng.random() * 0.01)
        lane.closing = True
        try:
            await asyncio.wait_for(lane.mgr.aclose(), DRAIN_TIMEOUT_S)
        except asyncio.TimeoutError:
            self.fail(lane, what, "Deadlock", f"aclose() did not return in {DRAIN_TIMEOUT_S}s")
            lane.broken = True
        except Exception as e:  # noqa: BLE001
            self.fail_exc(lane, what + ":aclose", e)
        await self.drain(lane, what + ":drain")
        for cm in lane.caches:
            if cm.cache.status is not CLOSED:
                self.fail(lane, what, "NotClosed", f"{cm} is still open after aclose()")
        await self.settle_stash(lane, what + ":stash")
        lane.caches.clear()

    async def reopen(self, lane: Lane, what: str) -> None:
        """Open a new manager on the same (persistent) directory; check every recovered prefix page."""
        old = lane.mgr
        dev, host, disk = (old.quota(l) // PB for l in (D, H, K))
        lane.cfg = self._config(max(dev, MAX_PAGES), host, disk, lane.path)
        lane.mgr = KVCacheManager(lane.cfg)
        await lane.mgr.start()
        lane.closing = False
        lane.last_stats = {}
        lane.restarts += 1
        mgr = lane.mgr
        self.check_invariants(lane, what + ":check_invariants")
        dev = mgr.usage(D).total_pages
        for hist in sorted(lane.histories):
            n = mgr.lookup(list(hist)).num_tokens
            self.check_prefix(lane, list(hist), n, what + ":lookup")
            for start in range(0, n, dev * TPP):  # device-sized pieces (each piece reuses the prefix before it too)
                stop = min(n, start + dev * TPP)
                tokens = list(hist[:stop])
                cache = mgr.create_cache(tokens)
                cm = CM(cache, tokens, cache.num_reused_tokens // TPP)
                try:
                    if cache.num_reused_tokens != stop:
                        self.fail(lane, what, "RecoveryMismatch", f"lookup found {n} tokens, create_cache reused {cache.num_reused_tokens} of {stop}")
                    if cache.num_pages > dev:
                        break
                    await cache.resume()
                    self.verify(lane, cm, what + ":verify-recovered")
                except Exception as e:  # noqa: BLE001
                    self.fail_exc(lane, what + ":recovered-resume", e)
                finally:
                    cache.close()
                if cache.num_pages > dev:
                    break
        self.check_invariants(lane, what + ":check_invariants-after-verify")

    # ---------------------------------------------------------------- one lane, start to end
    async def run_lane(self, lane: Lane) -> None:
        lane.mgr = KVCacheManager(lane.cfg)
        await lane.mgr.start()
        stop = asyncio.Event()
        hook_rng = random.Random(self.seed * 31 + lane.idx)

        def hook(op, off, n):
            if hook_rng.random() < 0.5:
                time.sleep(hook_rng.random() * 0.0008)

        watch = asyncio.ensure_future(self.watchdog(lane, stop))
        try:
            epochs = 3
            for e in range(epochs):
                if lane.broken:
                    break
                with io_hook(lane.mgr, hook):
                    await self.drive(lane, self.seconds / epochs)
                    last = e == epochs - 1
                    if self.v["persistent"] and not last and lane.rng.random() < 0.7:
                        await self.racing_aclose(lane, f"epoch{e}:restart")
                        restart = True
                    else:
                        await self.quiesce(lane, f"epoch{e}:quiesce")
                        restart = False
                if restart and not lane.broken:
                    await self.reopen(lane, f"epoch{e}:reopen")
            if not lane.broken:
                with io_hook(lane.mgr, hook):
                    await self.racing_aclose(lane, "final")
        finally:
            stop.set()
            await watch
            if lane.mgr is not None:
                try:
                    await asyncio.wait_for(lane.mgr.aclose(), DRAIN_TIMEOUT_S)
                except Exception as e:  # noqa: BLE001
                    self.fail_exc(lane, "teardown:aclose", e)

    async def run(self) -> None:
        results = await asyncio.gather(*(self.run_lane(l) for l in self.lanes), return_exceptions=True)
        for lane, r in zip(self.lanes, results, strict=True):
            if isinstance(r, BaseException):
                self.fail_exc(lane, "lane", r)

    def summary(self) -> str:
        lines = []
        for lane in self.lanes:
            ok = sum(v for (op, w), v in lane.outcomes.items() if w == "ok")
            lines.append(
                f"lane{lane.idx}: ok={ok} cancelled={sum(v for (o, w), v in lane.outcomes.items() if w == 'cancelled')} "
                f"capacity={sum(v for (o, w), v in lane.outcomes.items() if w == 'CapacityError')} "
                f"invalid_state={sum(v for (o, w), v in lane.outcomes.items() if w == 'InvalidStateError')} "
                f"committed_keys={len(lane.committed_keys)} restarts={lane.restarts} quiesced={lane.quiesced} broken={lane.broken}"
            )
        return "\n".join(lines)


async def run_stress(seed: int, variant: str, seconds: float, tmp: str) -> Stress:
    """Run one seed under a hard wall-clock bound: a hang FAILS (with the stacks of the stuck tasks)."""
    if os.environ.get("KVSTORE_STRESS_TRACE") == "1":
        _install_trace()
        TRACE.clear()
    s = Stress(seed, variant, seconds, tmp)
    main = asyncio.ensure_future(s.run())
    bound = seconds + 6 * DRAIN_TIMEOUT_S + 2 * STALL_GRACE_S + 20
    done, _ = await asyncio.wait({main}, timeout=bound)
    if not done:
        stacks = []
        for t in asyncio.all_tasks():
            if t is not asyncio.current_task():
                buf = io.StringIO()
                buf.write(await_chain(t))
                stacks.append(buf.getvalue())
        stacks.insert(0, thread_stacks())
        main.cancel()
        await asyncio.wait({main}, timeout=5)
        s.failures.append(Failure(seed, variant, -1, "run", "Hang", f"the stress run did not finish in {bound:.0f}s", "\n".join(stacks[:8])))
    elif main.exception() is not None:
        e = main.exception()
        s.failures.append(Failure(seed, variant, -1, "run", type(e).__name__, str(e), "".join(traceback.format_exception(e))))
    return s


@pytest.fixture
def variant_env(request, monkeypatch):
    variant = request.param
    if VARIANTS[variant]["plan_chunk"] is not None:
        monkeypatch.setattr(kvstore.manager, "PLAN_CHUNK", VARIANTS[variant]["plan_chunk"])
        monkeypatch.setattr(kvstore.manager, "PLAN_CHUNK_MAX", VARIANTS[variant]["plan_chunk"])
    return variant


CI_SEEDS = [0, 1]
CI_SECONDS = 1.5


@pytest.mark.parametrize("variant_env", list(VARIANTS), indirect=True)
@pytest.mark.parametrize("seed", CI_SEEDS)
async def test_stress(variant_env, seed, tmp_path):
    s = await run_stress(seed, variant_env, CI_SECONDS, str(tmp_path))
    assert not s.failures, f"seed={seed} variant={variant_env}\n{s.summary()}\n" + report(s.failures)


def await_chain(task: "asyncio.Task") -> str:
    """Where a pending task waits: every coroutine frame down its await chain."""
    out, coro = [repr(task)[:160]], task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            out.append(f"  {frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return "\n".join(out)


# ------------------------------------------------------------------ page-event trace (KVSTORE_STRESS_TRACE=1)
TRACE: Optional[list] = None  # (placement id, event, pid, src, src_slot, dst, dst_slot, ...) while tracing


def _install_trace() -> None:
    """Record every move's completion and abort and every page freed (for WrongBytes reports)."""
    global TRACE
    if TRACE is not None:
        return
    TRACE = []
    from kvstore.placement.placement import Placement

    def wrap(name: str, describe: Callable) -> None:
        real = getattr(Placement, name)

        def traced(self, x, *a, **k):
            TRACE.append((id(self), name, *describe(x)))
            return real(self, x, *a, **k)

        setattr(Placement, name, traced)

    wrap("complete", lambda m: (m.page.pid, m.src, m.src_slot, m.dst, m.dst_slot, m.swap, m.handoff))
    wrap("abort", lambda m: (m.page.pid, m.src, m.src_slot, m.dst, m.dst_slot, m.swap, m.handoff))
    wrap("stage", lambda m: (m.page.pid, m.src, m.src_slot, m.dst, m.dst_slot, m.swap, m.handoff))
    wrap("_free", lambda p: (p.pid, p.level, p.slot))


def trace_of(placement: object, pid: int, per_slot: int = 14) -> str:
    """The traced events of ``pid``, then per slot it used lately (where it is now and where its last
    moves came from) the last events that touched that slot."""
    if TRACE is None:
        return "(set KVSTORE_STRESS_TRACE=1 for the page-event trace)"
    events = [(i, e) for i, e in enumerate(TRACE) if e[0] == id(placement)]
    mine = [(i, e) for i, e in events if e[2] == pid]
    slots: list[tuple] = []
    for _, e in reversed(mine[-4:]):
        for slot in ((e[5], e[6]), (e[3], e[4])) if len(e) > 6 else ((e[3], e[4]),):
            if slot[0] is not None and slot not in slots:
                slots.append(slot)
    out = ["events of the page:"] + [f"  #{i} {e[1:]}" for i, e in mine[-10:]]
    for slot in slots:
        touching = [(i, e) for i, e in events if (e[3], e[4]) == slot or (len(e) > 6 and (e[5], e[6]) == slot)]
        out.append(f"slot {slot}:")
        out += [f"  #{i} {e[1:]}" for i, e in touching[-per_slot:]]
    return "\n".join(out)


def thread_stacks() -> str:
    """Where every worker thread of the process is (a thread stuck in a native call shows its caller)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        name = names.get(ident, "?")
        if name == "MainThread":
            continue
        stack = traceback.extract_stack(frame)
        if stack and stack[-1].name in ("_worker", "wait") and len(stack) <= 6:
            continue  # an idle pool thread
        out.append(f"thread {name}:\n" + "".join(traceback.format_list(stack[-6:])))
    return "\n".join(out) or "(no busy worker thread)"


def engine_state(mgr: KVCacheManager) -> str:
    """The manager's concurrency state, for a deadlock report."""
    gate = mgr._gate
    ops = [f"{o.kind} held={len(o.held)} owned={len(o.owned)} runs={[r.done() for r in o.runs]} stopping={o.stopping}"
           for o in mgr._ledger.ops]
    copier = getattr(mgr, "_copier", None)
    streams = ""
    if copier is not None and copier.cuda:
        streams = " streams_idle=" + str({lane: [s.query() for s in ss] for lane, ss in copier._streams.items()})
        streams += f" waiters_queued={copier._wait._work_queue.qsize()}"
    return (f"state={mgr._state} gate shared={gate._shared} exclusive={gate._exclusive} "
            f"writers_waiting={gate._writers_waiting} plan_lock={mgr._plan_lock.locked()} ops={ops}{streams}")


def _seeds() -> list[int]:
    spec = os.environ.get("KVSTORE_STRESS_SEEDS", "20")
    if "-" in spec:
        a, b = spec.split("-")
        return list(range(int(a), int(b) + 1))
    if "," in spec:
        return [int(x) for x in spec.split(",")]
    return list(range(int(spec)))


#: With KVSTORE_STRESS_PROGRESS, a seed still running this long after its random phase gets every thread's
#: stack appended to the progress file (from a timer thread: it works while the event loop is blocked too).
SLOW_SEED_S = 25.0


def _slow_seed_watch(path: str, variant: str, seed: int, after_s: float) -> threading.Timer:
    def dump() -> None:
        with open(path, "a") as fh:
            fh.write(f"{variant} seed={seed} STILL RUNNING after {after_s:.0f}s; thread stacks:\n{thread_stacks()}\n")

    timer = threading.Timer(after_s, dump)
    timer.daemon = True
    timer.start()
    return timer


@pytest.mark.slow
@pytest.mark.parametrize("variant_env", list(VARIANTS), indirect=True)
async def test_stress_long(variant_env, tmp_path):
    seconds = float(os.environ.get("KVSTORE_STRESS_SECONDS", "3"))
    failures: list[Failure] = []
    progress = os.environ.get("KVSTORE_STRESS_PROGRESS")  # a file: one line per seed as it ends (wall seconds)
    for seed in _seeds():
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        t0 = time.perf_counter()
        watch = _slow_seed_watch(progress, variant_env, seed, seconds + SLOW_SEED_S) if progress else None
        try:
            s = await run_stress(seed, variant_env, seconds, str(d))
        finally:
            if watch is not None:
                watch.cancel()
        failures.extend(s.failures)
        if progress:
            with open(progress, "a") as fh:  # survives a run killed from outside
                fh.write(f"{variant_env} seed={seed} wall_s={time.perf_counter() - t0:.1f} failures={len(s.failures)}\n")
    path = os.environ.get("KVSTORE_STRESS_REPORT")
    if path:
        rows = [f.__dict__ for f in failures]
        p = f"{path}.{variant_env}.json" if not path.endswith(".json") else path.replace(".json", f".{variant_env}.json")
        with open(p, "w") as fh:
            json.dump(rows, fh, indent=1)
    assert not failures, f"variant={variant_env}\n" + report(failures)
