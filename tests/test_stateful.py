"""Stateful property test: a hypothesis ``RuleBasedStateMachine`` drives the PUBLIC API of one
``KVCacheManager`` (tiny pages, small random quotas, a temp directory for the disk tier) and checks,
after every step, ``mgr.check_invariants()``, the public counters and states, and that every byte a
cache holds is the byte the model expects.

Rules: create a cache (fresh tokens, or tokens sharing a prefix with an earlier cache's history, with a
priority), resume, resize (grow/shrink), write random data into the uncommitted pages of an ACTIVE cache,
suspend, prefetch (every configured level) and await it, start a prefetch and cancel it after a random
number of loop iterations, start a prefetch in the background (left running across later steps, joined
by resume, cancelled by close), set_quota (grow/shrink each tier; a device shrink with an ACTIVE cache
or grow with an ACTIVE cache must raise InvalidStateError; CapacityError must change nothing), commit (the cache's token history),
close, restart (a persistent disk tier only: close the manager and open a new one on the same directory;
every cache is gone, and committed pages that were on disk must be reused with their exact bytes), and calls
in the wrong state (InvalidStateError, nothing changed).

The model keeps the expected bytes of every page. A page's bytes are learned when it is born (read from
``mgr.device_pool`` right after the ``resize`` that created it) and whenever it is written; committed pages
are immutable and shared, so a page reused through a committed prefix must hold the bytes of one of the
pages committed under that token prefix (several are possible when the same tokens were committed by
several caches; the first data check tells which). The model also bounds ``num_reused_tokens``: never more
than what was ever committed, never less than the prefix whose indexed pages are provably alive (held by an
open cache). After every step ACTIVE caches are checked directly in ``device_pool`` and one random SUSPENDED
cache is checked by resuming it (CapacityError is allowed and must leave ``page_levels()`` as they were);
at teardown the device quota is grown so that every open cache must resume, and each is checked.
Capacity is checked both ways: CapacityError must change nothing, and is wrong when the target level has
enough free slots (resume, resize, a prefetch that must then complete, a shrink to at least the used pages).
At rest (no background prefetch) every page not locked by an ACTIVE cache is evictable, close() frees
exactly the uncommitted pages (plus, at most, committed duplicates that lost the index), counters never
go down, and a prefetch moves exactly the pages colder than its target, to the target, never demoting.

Sizes: ``KVSTORE_STATEFUL_EXAMPLES`` examples (default 25) of up to ``KVSTORE_STATEFUL_STEPS`` steps
(default 30), a few seconds in CI. A long run by hand::

    KVSTORE_STATEFUL_EXAMPLES=500 KVSTORE_STATEFUL_STEPS=80 python -m pytest tests/test_stateful.py -q

``KVSTORE_STATEFUL_DEVICE=cuda`` puts the device tier on the GPU (default ``cpu``: the CI path).
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from kvstore import (
    CacheLevel,
    CacheStatus,
    CapacityError,
    DeviceTier,
    DiskTier,
    HostTier,
    InvalidArgumentError,
    InvalidStateError,
    KVCacheManager,
    PageLayout,
    PrefetchResult,
    StoreConfig,
)

LAYOUT = PageLayout(1, 1, 8, 4, torch.float16)
TPP = LAYOUT.tokens_per_page
PB = LAYOUT.page_bytes
D, H, K = CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK
ACTIVE, SUSPENDED, CLOSED = (
    CacheStatus.ACTIVE,
    CacheStatus.SUSPENDED,
    CacheStatus.CLOSED,
)
MAX_CACHES = 8
MAX_PENDING = 3
VOCAB = 50

EXAMPLES = int(os.environ.get("KVSTORE_STATEFUL_EXAMPLES", "25"))
STEPS = int(os.environ.get("KVSTORE_STATEFUL_STEPS", "30"))
# "cuda" runs the device tier on the GPU
DEVICE = os.environ.get("KVSTORE_STATEFUL_DEVICE", "cpu")


class MPage:
    """A page of the model: its expected bytes and, once committed, its key (the token prefix it ends)."""

    __slots__ = ("data", "key", "uid")
    _next = 0

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data
        self.key: tuple[int, ...] | None = None
        MPage._next += 1
        self.uid = MPage._next

    def __repr__(self) -> str:
        return f"MPage#{self.uid}"


class Ambig:
    """A reused committed page known only to be one of ``candidates`` (same tokens, committed by several)."""

    __slots__ = ("candidates",)

    def __init__(self, candidates: list[MPage]) -> None:
        self.candidates = list(candidates)


Entry = MPage | Ambig
UNKNOWN = object()  # the index entry of a key may be any of its committed pages (one may have been dropped)


class CModel:
    def __init__(
        self,
        cache,
        tokens: list[int],
        reused: int,
        pages: list[Entry],
        priority: int,
        name: str,
    ) -> None:
        self.cache = cache
        self.history = list(
            tokens
        )  # token ids of the cache, from token 0 (at least the committed ones)
        self.committed = reused  # tokens committed (a multiple of TPP)
        self.num_tokens = reused
        self.pages = pages
        self.priority = priority
        self.status = SUSPENDED
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name} {self.status.name} pages={len(self.pages)} committed={self.committed}>"


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(t.shape[0], -1).clone()


def _step(fn):
    """Marks the machine failed when a rule raises, so that teardown skips its final checks."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except BaseException:
            self.failed = True
            raise

    return wrapper


class KVStoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mgr: KVCacheManager | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tmp: str | None = None
        self.failed = False
        self.live: list[CModel] = []
        self.closed: list[CModel] = []
        self.commits: dict[tuple[int, ...], list[MPage]] = {}
        self.index: dict[tuple[int, ...], object] = {}
        self.histories: list[tuple[int, ...]] = []
        self.pending: list[tuple[object, CModel]] = []
        self.quota: dict[CacheLevel, int] = {}
        self.levels: tuple[CacheLevel, ...] = ()
        self.counter = 0
        self.names = 0
        self.last_stats: dict[str, float] = {}
        self.persistent = False
        self.restarts = 0

    # ------------------------------------------------------------------ setup / teardown
    @initialize(
        device=st.integers(3, 8),
        host=st.sampled_from([0, 1, 2, 3, 4, 6, 8]),
        disk=st.sampled_from([0, 2, 4, 6, 8, 12, 16]),
        policy=st.sampled_from(["lru", "lru-leaf", "slru"]),
        batch_pages=st.sampled_from([1, 2, 64]),
        seed=st.integers(0, 2**32 - 1),
        persistent=st.booleans(),
    )
    def start(self, device, host, disk, policy, batch_pages, seed, persistent):
        self.rng = random.Random(seed)
        self.tmp = tempfile.mkdtemp(prefix="kvstore-stateful-")
        tiers = [DeviceTier(device * PB, device=DEVICE)]
        if host:
            tiers.append(HostTier(host * PB))
        if disk:
            tiers.append(DiskTier(disk * PB, os.path.join(self.tmp, "disk"), persistent=persistent))
        self.persistent = bool(disk) and persistent
        cfg = StoreConfig(
            LAYOUT,
            tiers,
            eviction_policy=policy,
            batch_bytes=batch_pages * PB,
            io_threads=2,
        )
        self.cfg = cfg
        self.levels = cfg.levels
        self.quota = {lvl: cfg.slots(lvl) for lvl in self.levels}
        self.loop = asyncio.new_event_loop()
        self.mgr = KVCacheManager(cfg)
        self.run(self.mgr.start())

    def teardown(self) -> None:
        try:
            if self.mgr is not None and not self.failed:
                self.final_check()
        finally:
            try:
                if self.mgr is not None and self.loop is not None:
                    self.run(self.mgr.aclose())
                    if not self.failed:
                        for cm in self.live:
                            assert cm.cache.status is CLOSED, (
                                f"{cm} not closed by aclose()"
                            )
                        for task, _ in self.pending:
                            assert task.done(), "aclose() left a prefetch running"
            finally:
                if self.loop is not None:
                    self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                    self.loop.close()
                if self.tmp is not None:
                    shutil.rmtree(self.tmp, ignore_errors=True)

    def final_check(self) -> None:
        """Every open cache must resume once the device has room for all of it; check all bytes."""
        self.settle_pending()
        self.consistent()
        for cm in self.live:
            if cm.status is ACTIVE:
                self.verify_active(cm)
                cm.cache.suspend()
                cm.status = SUSPENDED
        total = sum(len(cm.pages) for cm in self.live)
        want = self.mgr.usage(D).used_pages + total + 1
        if want > self.quota[D]:
            self.run(self.mgr.set_quota(D, want * PB))
            self.quota[D] = want
        for cm in self.live:
            self.run(cm.cache.resume())
            cm.status = ACTIVE
            self.verify_active(cm)
            cm.cache.suspend()
            cm.status = SUSPENDED
        self.mgr.check_invariants()

    # ------------------------------------------------------------------ helpers
    def run(self, aw):
        async def _go():
            return await aw

        return self.loop.run_until_complete(_go())

    def pick(self, i: int, status: CacheStatus | None = None) -> CModel | None:
        pool = [cm for cm in self.live if status is None or cm.status is status]
        return pool[i % len(pool)] if pool else None

    def pick_for_prefetch(self, i: int, target: CacheLevel) -> CModel:
        """A SUSPENDED cache, preferably one with pages colder than ``target``."""
        pool = [cm for cm in self.live if cm.status is SUSPENDED]
        cold = [
            cm
            for cm in pool
            if any(n for l, n in self.levels_of(cm).items() if l > target)
        ]
        pool = cold or pool
        return pool[i % len(pool)]

    def has(self, status: CacheStatus) -> bool:
        return any(cm.status is status for cm in self.live)

    def prune_pending(self) -> None:
        keep = []
        for task, cm in self.pending:
            if not task.done():
                keep.append((task, cm))
                continue
            if task.cancelled():
                assert cm.cache.status is CLOSED, (
                    f"background prefetch of open cache {cm} was cancelled"
                )
            else:
                assert isinstance(
                    task.result(), PrefetchResult
                )  # raises the prefetch's error, if any
        self.pending = keep

    def quiet(self) -> bool:
        """No background prefetch is running (so page levels only change through the current call)."""
        self.prune_pending()
        return not self.pending

    def settle_pending(self) -> None:
        for task, _ in list(self.pending):
            try:
                self.run(asyncio.wait({task._task}))
            except asyncio.CancelledError:
                pass
        self.prune_pending()

    def held(self) -> set[int]:
        """uids of model pages held by open caches (such a page was never dropped)."""
        return {p.uid for cm in self.live for p in cm.pages if isinstance(p, MPage)}

    def levels_of(self, cm: CModel) -> dict[CacheLevel, int]:
        return dict(cm.cache.page_levels())

    def snapshot(self) -> dict[int, dict[CacheLevel, int]]:
        return {id(cm): self.levels_of(cm) for cm in self.live}

    def read_rows(self, cm: CModel) -> torch.Tensor:
        pool = self.mgr.device_pool
        idx = cm.cache.page_indices().to(pool.device)
        return (
            _rows(pool[idx].cpu())
            if len(idx)
            else torch.zeros((0, PB), dtype=torch.uint8)
        )

    def check_entry(self, entry: Entry, got: torch.Tensor, where: str) -> Entry:
        if isinstance(entry, MPage):
            assert torch.equal(entry.data, got), (
                f"{where}: page bytes differ from the last written ({entry})"
            )
            return entry
        matches = [c for c in entry.candidates if torch.equal(c.data, got)]
        assert matches, (
            f"{where}: reused page holds none of the {len(entry.candidates)} pages committed under its tokens"
        )
        if len(matches) == 1:
            page = matches[0]
            if self.index.get(page.key) is UNKNOWN:
                self.index[page.key] = (
                    page  # it was the indexed page at create time and is alive now
                )
            return page
        return entry

    def verify_active(self, cm: CModel) -> None:
        assert cm.cache.status is ACTIVE
        rows = self.read_rows(cm)
        assert rows.shape[0] == len(cm.pages)
        for j in range(len(cm.pages)):
            cm.pages[j] = self.check_entry(cm.pages[j], rows[j], f"{cm.name} page {j}")

    def try_verify_suspended(self, cm: CModel) -> None:
        """Resume, compare, suspend; CapacityError must leave the page levels as they were."""
        quiet = self.quiet()
        before = self.levels_of(cm)
        try:
            self.run(cm.cache.resume())
        except CapacityError:
            assert cm.cache.status is SUSPENDED
            if quiet:
                assert self.levels_of(cm) == before, (
                    "resume() raised CapacityError but moved pages"
                )
            return
        cm.status = ACTIVE
        assert self.levels_of(cm) == {**{l: 0 for l in self.levels}, D: len(cm.pages)}
        self.verify_active(cm)
        cm.cache.suspend()
        cm.status = SUSPENDED

    def new_pages_data(self, n: int) -> torch.Tensor:
        self.counter += 1
        gen = torch.Generator().manual_seed(self.counter)
        return torch.randn((n, *LAYOUT.page_shape), generator=gen).to(LAYOUT.dtype)

    def key(self, tokens, j: int) -> tuple[int, ...]:
        return tuple(tokens[: (j + 1) * TPP])

    def reuse_bounds(self, tokens) -> tuple[int, int]:
        """(lo, hi) pages of ``tokens`` that must / may be reusable now."""
        held = self.held()
        lo, hi, lo_open = 0, 0, True
        for j in range(len(tokens) // TPP):
            k = self.key(tokens, j)
            if k not in self.commits:
                break
            hi = j + 1
            e = self.index.get(k)
            if lo_open and isinstance(e, MPage) and e.uid in held:
                lo = j + 1
            else:
                lo_open = False
        return lo, hi

    # ------------------------------------------------------------------ invariant
    @invariant()
    def consistent(self) -> None:
        if self.mgr is None:
            return
        try:
            self._consistent()
        except BaseException:
            self.failed = True
            raise

    def _consistent(self) -> None:
        self.prune_pending()
        self.mgr.check_invariants()
        stats = self.mgr.stats()
        for name, old in self.last_stats.items():
            if name in stats:
                assert stats[name] >= old, (
                    f"counter {name} went down: {old} -> {stats[name]}"
                )
        self.last_stats = stats
        for lvl in self.levels:
            u = self.mgr.usage(lvl)
            assert self.mgr.quota(lvl) == self.quota[lvl] * PB
            assert u.total_pages == self.quota[lvl], (lvl, u)
            assert (
                0 <= u.used_pages <= u.total_pages
                and u.free_pages == u.total_pages - u.used_pages
            ), u
            assert 0 <= u.evictable_pages <= u.used_pages, u
        slots: dict[int, Entry] = {}
        for cm in self.live:
            c = cm.cache
            assert c.status is cm.status, (cm, c.status)
            assert c.num_pages == len(cm.pages) and c.num_tokens == cm.num_tokens, (
                cm,
                c,
            )
            lv = self.levels_of(cm)
            assert sum(lv.values()) == len(cm.pages), (cm, lv)
            if cm.status is ACTIVE:
                assert lv[D] == len(cm.pages), (cm, lv)
                self.verify_active(cm)
                for s, e in zip(c.page_indices().tolist(), cm.pages):
                    other = slots.setdefault(s, e)
                    if other is not e:  # two distinct pages in one device slot?
                        a = other.candidates if isinstance(other, Ambig) else [other]
                        b = e.candidates if isinstance(e, Ambig) else [e]
                        assert {p.uid for p in a} & {p.uid for p in b}, (
                            f"device slot {s} holds two different pages"
                        )
        if (
            not self.pending
        ):  # at rest, every page not locked by an ACTIVE cache is evictable
            for lvl in self.levels:
                u = self.mgr.usage(lvl)
                locked = len(slots) if lvl == D else 0
                assert u.evictable_pages == u.used_pages - locked, (
                    f"{lvl.name}: {u}, {locked} pages locked"
                )
        suspended = [cm for cm in self.live if cm.status is SUSPENDED]
        if suspended:
            self.try_verify_suspended(self.rng.choice(suspended))

    # ------------------------------------------------------------------ rules
    @precondition(lambda self: self.mgr is not None and len(self.live) < MAX_CACHES)
    @rule(
        mode=st.sampled_from(["none", "fresh", "share", "share"]),
        src=st.integers(0, 1000),
        cut=st.integers(0, 40),
        extra=st.lists(st.integers(0, VOCAB), max_size=10),
        priority=st.integers(0, 2),
    )
    @_step
    def create(self, mode, src, cut, extra, priority):
        if mode == "share" and self.histories:
            tokens = list(self.histories[src % len(self.histories)][:cut]) + extra
        elif mode == "none":
            tokens = None
        else:
            tokens = list(extra)
        lo, hi = self.reuse_bounds(tokens or [])
        looked = self.mgr.lookup(tokens).num_tokens if tokens is not None else 0
        cache = self.mgr.create_cache(tokens, priority=priority)
        r = cache.num_reused_tokens
        assert r == looked, f"create_cache reused {r} tokens, lookup() said {looked}"
        assert r % TPP == 0 and lo * TPP <= r <= hi * TPP, (
            f"reused {r} tokens; the model allows {lo * TPP}..{hi * TPP}"
        )
        assert (
            cache.status is SUSPENDED
            and cache.num_pages == r // TPP
            and cache.num_tokens == r
        )
        pages: list[Entry] = []
        for j in range(r // TPP):
            cands = self.commits[self.key(tokens, j)]
            if len(cands) == 1:
                pages.append(cands[0])
                self.index[cands[0].key] = cands[0]
            else:
                pages.append(Ambig(cands))
        self.names += 1
        cm = CModel(cache, tokens or [], r, pages, priority, f"c{self.names}")
        self.live.append(cm)
        if tokens:
            self.histories.append(tuple(tokens))

    @precondition(lambda self: self.mgr is not None and len(self.live) < MAX_CACHES)
    @rule(
        mode=st.sampled_from(["fresh", "share"]),
        src=st.integers(0, 1000),
        cut=st.integers(0, 40),
        extra=st.lists(st.integers(0, VOCAB), max_size=10),
        pages=st.integers(1, 6),
        commit=st.booleans(),
        suspend=st.booleans(),
    )
    @_step
    def create_filled(self, mode, src, cut, extra, pages, commit, suspend):
        """create, resume, resize to ``pages`` more pages, write them all, maybe commit, maybe suspend."""
        self.create(mode, src, cut, extra, 0)
        cm = self.live[-1]
        self.resume(len([c for c in self.live if c.status is SUSPENDED]) - 1)
        if cm.status is not ACTIVE:
            return
        self.resize(self.live_index(cm, ACTIVE), (len(cm.pages) + pages) * TPP)
        if len(cm.pages) * TPP > cm.committed:
            self.write(
                self.live_index(cm, ACTIVE, writable=True), list(range(len(cm.pages)))
            )
        if commit:
            self.commit(self.live.index(cm), len(cm.history) - cm.committed)
        if suspend:
            self.suspend(self.live_index(cm, ACTIVE))

    def live_index(
        self, cm: CModel, status: CacheStatus, writable: bool = False
    ) -> int:
        pool = [
            c
            for c in self.live
            if c.status is status and (not writable or len(c.pages) * TPP > c.committed)
        ]
        return pool.index(cm)

    @precondition(lambda self: self.mgr is not None)
    @rule(
        src=st.integers(0, 1000),
        cut=st.integers(0, 40),
        extra=st.lists(st.integers(0, VOCAB), max_size=6),
    )
    @_step
    def lookup(self, src, cut, extra):
        tokens = (
            list(self.histories[src % len(self.histories)][:cut])
            if self.histories
            else []
        ) + extra
        lo, hi = self.reuse_bounds(tokens)
        m = self.mgr.lookup(tokens)
        assert m.num_tokens % TPP == 0 and lo * TPP <= m.num_tokens <= hi * TPP, (
            m,
            lo,
            hi,
        )
        assert (
            set(m.pages_per_level) == set(self.levels)
            and sum(m.pages_per_level.values()) == m.num_tokens // TPP
        ), m

    @precondition(lambda self: self.has(SUSPENDED))
    @rule(i=st.integers(0, 100))
    @_step
    def resume(self, i):
        cm = self.pick(i, SUSPENDED)
        quiet = self.quiet()
        before = self.levels_of(cm)
        room = self.mgr.usage(D).free_pages >= len(cm.pages) - before[D]
        try:
            self.run(cm.cache.resume())
        except CapacityError:
            assert cm.cache.status is SUSPENDED
            if quiet:
                assert self.levels_of(cm) == before, (
                    "resume() raised CapacityError but moved pages"
                )
                assert not room, (
                    f"resume() raised CapacityError with {self.mgr.usage(D).free_pages} free device slots"
                )
            return
        cm.status = ACTIVE
        assert cm.cache.status is ACTIVE
        self.verify_active(cm)

    @precondition(lambda self: self.has(ACTIVE))
    @rule(i=st.integers(0, 100), n=st.integers(0, 12 * TPP))
    @_step
    def resize(self, i, n):
        cm = self.pick(i, ACTIVE)
        c = cm.cache
        old_idx = c.page_indices().tolist()
        quiet = self.quiet()
        before = self.levels_of(cm)
        want = -(-n // TPP)
        room = self.mgr.usage(D).free_pages >= want - len(cm.pages)
        try:
            self.run(c.resize(n))
        except CapacityError:
            assert want > len(cm.pages), "CapacityError from a shrink"
            assert not (quiet and room), (
                "resize() raised CapacityError with enough free device slots"
            )
            assert (
                c.num_pages == len(cm.pages)
                and c.num_tokens == cm.num_tokens
                and c.status is ACTIVE
            )
            assert c.page_indices().tolist() == old_idx
            if quiet:
                assert self.levels_of(cm) == before
            return
        assert c.num_pages == want and c.num_tokens == n
        assert c.page_indices().tolist()[: min(want, len(old_idx))] == old_idx[:want], (
            "kept pages moved"
        )
        if want > len(cm.pages):
            rows = self.read_rows(cm)
            cm.pages.extend(
                MPage(rows[j]) for j in range(len(cm.pages), want)
            )  # born with whatever the slot holds
            while len(cm.history) < n:
                cm.history.append(self.rng.randrange(VOCAB))
        else:
            del cm.pages[want:]
            cm.committed = min(cm.committed, want * TPP)
        cm.num_tokens = n

    @precondition(
        lambda self: any(
            cm.status is ACTIVE and len(cm.pages) * TPP > cm.committed
            for cm in self.live
        )
    )
    @rule(
        i=st.integers(0, 100),
        which=st.lists(st.integers(0, 100), min_size=1, max_size=4, unique=True),
    )
    @_step
    def write(self, i, which):
        pool = [
            cm
            for cm in self.live
            if cm.status is ACTIVE and len(cm.pages) * TPP > cm.committed
        ]
        cm = pool[i % len(pool)]
        first = cm.committed // TPP
        free = list(range(first, len(cm.pages)))
        sel = sorted({free[w % len(free)] for w in which})
        data = self.new_pages_data(len(sel))
        dev = self.mgr.device_pool
        idx = cm.cache.page_indices()[sel].to(dev.device)
        dev[idx] = data.to(dev.device)
        rows = _rows(data)
        for r, j in enumerate(sel):
            p = cm.pages[j]
            assert isinstance(p, MPage) and p.key is None
            p.data = rows[r]

    @precondition(lambda self: self.has(ACTIVE))
    @rule(i=st.integers(0, 100))
    @_step
    def suspend(self, i):
        cm = self.pick(i, ACTIVE)
        cm.cache.suspend()
        cm.status = SUSPENDED
        assert cm.cache.status is SUSPENDED
        assert self.levels_of(cm)[D] == len(cm.pages), "suspend() moved pages"

    def check_prefetch(
        self,
        cm,
        target,
        before,
        after,
        res: PrefetchResult | None,
        quiet: bool,
        free_before: int,
    ) -> None:
        n = len(cm.pages)
        assert sum(after.values()) == n, (
            f"prefetch left pages at no level or two: {after}"
        )
        if not quiet:
            return
        for lvl in self.levels:
            if lvl < target:
                assert after[lvl] == before[lvl], (
                    f"prefetch({target.name}) moved pages hotter than its target"
                )
            elif lvl > target:
                assert after[lvl] <= before[lvl], (
                    f"prefetch({target.name}) demoted a page: {before} -> {after}"
                )
        moved = after[target] - before[target]
        colder = sum(before[l] for l in self.levels if l > target)
        if res is not None and free_before >= colder:
            assert res.complete, (
                f"prefetch({target.name}) incomplete with {free_before} free slots for {colder} pages"
            )
        if res is not None:
            assert res.pages_moved == moved and res.bytes_moved == moved * PB, (
                res,
                before,
                after,
            )
            assert res.complete == all(
                after[l] == 0 for l in self.levels if l > target
            ), (res, after)
            if target == self.levels[-1]:
                assert res.complete and res.pages_moved == 0

    @precondition(lambda self: self.has(SUSPENDED))
    @rule(i=st.integers(0, 100), t=st.integers(0, 2))
    @_step
    def prefetch(self, i, t):
        target = self.levels[t % len(self.levels)]
        cm = self.pick_for_prefetch(i, target)
        quiet = self.quiet()
        before = self.levels_of(cm)
        free = self.mgr.usage(target).free_pages

        async def go():
            return await cm.cache.prefetch(target)

        res = self.run(go())
        assert isinstance(res, PrefetchResult) and cm.cache.status is SUSPENDED
        self.check_prefetch(cm, target, before, self.levels_of(cm), res, quiet, free)

    @precondition(lambda self: self.has(SUSPENDED))
    @rule(
        i=st.integers(0, 100),
        t=st.integers(0, 2),
        spins=st.integers(0, 30),
        nap=st.booleans(),
    )
    @_step
    def prefetch_cancel(self, i, t, spins, nap):
        target = self.levels[t % len(self.levels)]
        cm = self.pick_for_prefetch(i, target)
        quiet = self.quiet()
        before = self.levels_of(cm)
        free = self.mgr.usage(target).free_pages

        async def go():
            task = cm.cache.prefetch(target)
            for _ in range(spins):
                await asyncio.sleep(0.0002 if nap else 0)
            was_done = task.done()
            cancelled = task.cancel()
            assert cancelled != was_done
            res = await task  # a stopped prefetch gives a result (cancelled=True), never CancelledError
            assert task.result() is res
            assert res.cancelled == task.cancelled()
            assert not res.cancelled or cancelled, "a prefetch that finished reports cancelled"
            return None if res.cancelled else res

        res = self.run(go())
        assert cm.cache.status is SUSPENDED
        self.check_prefetch(cm, target, before, self.levels_of(cm), res, quiet, free)

    @precondition(lambda self: self.has(SUSPENDED) and len(self.pending) < MAX_PENDING)
    @rule(i=st.integers(0, 100), t=st.integers(0, 2))
    @_step
    def prefetch_background(self, i, t):
        target = self.levels[t % len(self.levels)]
        cm = self.pick_for_prefetch(i, target)

        async def go():
            return cm.cache.prefetch(target)

        self.pending.append((self.run(go()), cm))

    @precondition(lambda self: bool(self.live))
    @rule(t=st.integers(0, 2), pages=st.integers(0, 20))
    @_step
    def set_quota(self, t, pages):
        level = self.levels[t % len(self.levels)]
        old = self.quota[level]
        quiet = self.quiet()
        snap = self.snapshot()
        used = self.mgr.usage(level).used_pages
        # a device grow or shrink with an ACTIVE cache is refused (a model may be writing to the pool)
        shrink_active = level == D and pages >= 1 and pages != old and self.has(ACTIVE)
        try:
            self.run(self.mgr.set_quota(level, pages * PB))
        except InvalidArgumentError:
            assert pages == 0
        except InvalidStateError:
            assert shrink_active, (
                "InvalidStateError from set_quota() without an ACTIVE cache to protect"
            )
        except CapacityError:
            assert pages < old and not shrink_active, "CapacityError from a grow"
            if quiet:
                assert pages < used, (
                    f"set_quota({level.name}, {pages} pages) refused with only {used} pages used"
                )
                assert self.snapshot() == snap, (
                    "set_quota() raised CapacityError but moved pages"
                )
        else:
            assert pages >= 1 and not shrink_active
            self.quota[level] = pages
            if quiet and level == D and pages >= old:
                assert self.snapshot() == snap
        assert self.mgr.quota(level) == self.quota[level] * PB
        assert self.mgr.device_pool.shape[0] == self.quota[D]

    @precondition(lambda self: any(cm.status is not CLOSED for cm in self.live))
    @rule(i=st.integers(0, 100), upto=st.integers(0, 100))
    @_step
    def commit(self, i, upto):
        cm = self.pick(i)
        span = len(cm.history) - cm.committed
        k = cm.committed + (upto % (span + 1))
        tokens = cm.history[:k]
        cm.cache.commit(tokens)
        full = min(k // TPP, len(cm.pages))
        first = cm.committed // TPP
        if full > first:
            held = self.held()
            for j in range(first, full):
                p = cm.pages[j]
                assert isinstance(p, MPage) and p.key is None, (cm, j, p)
                key = self.key(cm.history, j)
                p.key = key
                e = self.index.get(key)
                if e is None:
                    self.index[key] = (
                        p  # the first page ever committed under these tokens is indexed
                    )
                elif e is not UNKNOWN and e.uid not in held:
                    self.index[key] = (
                        UNKNOWN  # e may have been dropped, and then p took its place
                    )
                self.commits.setdefault(key, []).append(p)
            cm.committed = full * TPP
        self.histories.append(tuple(cm.history))

    @precondition(lambda self: bool(self.live))
    @rule(i=st.integers(0, 100), twice=st.booleans())
    @_step
    def close(self, i, twice):
        cm = self.pick(i)
        quiet = self.quiet()
        used = sum(self.mgr.usage(l).used_pages for l in self.levels)
        # uncommitted pages are freed; a committed page another cache holds, or the indexed page of its key
        # (reusable), stays; a committed page that lost the index to an equal one may be freed too
        others = {
            p.uid
            for c in self.live
            if c is not cm
            for p in c.pages
            if isinstance(p, MPage)
        }
        uncommitted = len(cm.pages) - cm.committed // TPP
        maybe = sum(
            1
            for p in cm.pages[: cm.committed // TPP]
            if isinstance(p, MPage)
            and p.uid not in others
            and self.index.get(p.key) is not p
        )
        cm.cache.close()
        if quiet:
            freed = used - sum(self.mgr.usage(l).used_pages for l in self.levels)
            assert uncommitted <= freed <= uncommitted + maybe, (
                f"close() freed {freed} pages of {cm}"
            )
        if twice:
            cm.cache.close()
        assert cm.cache.status is CLOSED and cm.cache.num_pages == 0
        cm.status = CLOSED
        self.live.remove(cm)
        self.closed = (self.closed + [cm])[-3:]

    @precondition(lambda self: self.persistent)
    @rule()
    @_step
    def restart(self):
        """Close the manager and open a new one on the same persistent disk tier: every cache is gone,
        committed pages that were on disk stay reusable (checked by the reuse rules against the model)."""
        self.settle_pending()
        self.run(self.mgr.aclose())
        for cm in self.live:
            assert cm.cache.status is CLOSED
            cm.status = CLOSED
        self.live, self.closed, self.pending = [], [], []
        self.index = {k: UNKNOWN for k in self.index}  # which copy of a key survived is not known
        self.last_stats = {}  # a new manager counts from zero
        self.quota = {lvl: self.cfg.slots(lvl) for lvl in self.levels}
        self.mgr = KVCacheManager(self.cfg)
        self.run(self.mgr.start())
        self.restarts += 1

    @precondition(lambda self: bool(self.live or self.closed))
    @rule(
        i=st.integers(0, 100),
        op=st.sampled_from(
            ["resume", "resize", "suspend", "prefetch", "commit", "page_indices"]
        ),
    )
    @_step
    def wrong_state(self, i, op):
        pool = self.live + self.closed
        cm = pool[i % len(pool)]
        c = cm.cache
        allowed = {
            "resume": (SUSPENDED,),
            "resize": (ACTIVE,),
            "suspend": (ACTIVE,),
            "prefetch": (SUSPENDED,),
            "commit": (SUSPENDED, ACTIVE),
            "page_indices": (ACTIVE,),
        }[op]
        if c.status in allowed:
            return
        before = (c.status, c.num_pages, c.num_tokens, dict(c.page_levels()))

        async def go():
            if op == "resume":
                await c.resume()
            elif op == "resize":
                await c.resize(c.num_tokens + TPP)
            elif op == "suspend":
                c.suspend()
            elif op == "prefetch":
                c.prefetch(D)
            elif op == "commit":
                c.commit(cm.history)
            else:
                c.page_indices()

        with pytest.raises(InvalidStateError):
            self.run(go())
        assert (c.status, c.num_pages, c.num_tokens, dict(c.page_levels())) == before


KVStoreMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestKVStoreStateful = KVStoreMachine.TestCase
