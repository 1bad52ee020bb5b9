"""Serve many multi-turn chat sessions, more than fit in HBM, with kvstore offloading between turns.

Every session shares one system prompt, then alternates a user turn and a reply; between turns a session
"thinks" (a seeded exponential pause). Its KV pages are committed and its request closed after each reply, so
between turns the pages are reusable prefix pages that the manager demotes to host memory and disk under
pressure. Shortly before a session's next turn is due, the loop prefetches its pages back to the device, just in
time by the manager's measured bandwidths (:func:`kvstore.policy.prefetch_start_time`). When a turn arrives
the loop admits it into the running batch (:class:`~kvstore.integrations.hf_batch.BatchedGenerator`,
continuous batching) once its pages are on the device, or recomputes its history when that is predicted to be
faster than waiting for them (:func:`kvstore.policy.decide_reuse`, :func:`kvstore.policy.wait_or_recompute`):
a late prefetch never delays a request.

``--no-offload`` runs the same workload on an engine without host and disk tiers: evicted sessions are dropped
and recomputed. The report gives throughput, time to first token (p50/p99), where each turn's history was
when it arrived, how many were recomputed, and the event loop's lag.

Run (``pip install -e '.[hf]'`` in a checkout)::

    python examples/serve_chat.py                              # tiny model, CPU (or CUDA when present)
    python examples/serve_chat.py --shape 1b --sessions 64 --hbm-sessions 16 --device cuda
    python examples/serve_chat.py --no-offload                 # the drop-and-recompute baseline
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from kvstore import (
    CacheLevel, DeviceTier, DiskTier, HostTier, KVCache, KVCacheManager, PrefetchTask, PrefixMatch, StoreConfig,
)
from kvstore.integrations.hf import layout_for_model
from kvstore.integrations.hf_batch import BatchedGenerator, BatchRequest
from kvstore.integrations.models import build_model
from kvstore.policy import (
    PrefillModel, ReuseChoice, decide_reuse, prefetch_start_time, reuse_forward_model, wait_or_recompute,
)

LEVELS = ("device", "host", "disk", "recomputed")


@dataclass
class ChatConfig:
    """The workload and the engine's sizes (HBM holds ``hbm_sessions`` whole sessions, the shared system prompt
    counted once)."""

    sessions: int = 12
    hbm_sessions: int = 4
    turns: int = 4
    system_tokens: int = 64
    user_tokens: int = 64
    reply_tokens: int = 16
    think_s: float = 0.05  # mean pause between a reply and the next turn
    tokens_per_page: int = 16
    max_batch: int = 8
    offload: bool = True  # False: device tier only; evicted sessions are recomputed
    prefetch: bool = True  # prefetch a session's pages before its turn is due
    margin_s: float = 0.002  # prefetches start this much earlier than the estimate says
    seed: int = 0
    cuda_graphs: Optional[bool] = None  # decode through captured CUDA graphs (None: on a GPU)
    stall_ms: Optional[float] = None  # take the loop thread's stack in every event-loop stall longer than this

    @property
    def session_tokens(self) -> int:
        return self.system_tokens + self.turns * (self.user_tokens + self.reply_tokens)


@dataclass
class Session:
    sid: int
    history: list[int]
    turns_left: int
    due: float = 0.0  # when the next turn arrives
    start_prefetch_at: float = math.inf
    holder: Optional[KVCache] = None  # holds the history's pages while they are prefetched
    prefetch: Optional[PrefetchTask] = None
    prompt: list[int] = field(default_factory=list)
    arrived: bool = False
    located: bool = False  # where its history was is counted
    match: Optional[PrefixMatch] = None  # its prompt's reusable prefix, looked up when first needed this turn
    request: Optional[BatchRequest] = None


@dataclass
class ChatReport:
    offload: bool
    sessions: int
    hbm_sessions: int
    wall_s: float
    generated_tokens: int
    ttft_s: list[float]
    history_tokens_from: dict[str, int]  # where each arriving turn's history was: tokens per level / recomputed
    recomputed_turns: int
    loaded_turns: int
    max_lag_ms: float
    p99_lag_ms: float
    pages_moved: dict[str, int]
    turns: list[tuple[list[int], list[int]]] = field(default_factory=list, repr=False)
    stalls: list[str] = field(default_factory=list, repr=False)  # the loop thread's stack in each long stall

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s

    def ttft_ms(self, q: float) -> float:
        xs = sorted(self.ttft_s)
        return 1e3 * xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")

    def lines(self) -> list[str]:
        mode = "kvstore offloading" if self.offload else "drop and recompute"
        total = sum(self.history_tokens_from.values()) or 1
        where = ", ".join(f"{k} {100 * v / total:.0f} %" for k, v in self.history_tokens_from.items())
        return [
            f"{mode}: {self.sessions} sessions, HBM holds {self.hbm_sessions}",
            f"  throughput {self.tokens_per_s:.1f} tokens/s ({self.generated_tokens} tokens in {self.wall_s:.2f} s)",
            f"  TTFT p50 {self.ttft_ms(0.5):.1f} ms, p99 {self.ttft_ms(0.99):.1f} ms over {len(self.ttft_s)} turns",
            f"  history at arrival: {where}; turns loaded {self.loaded_turns}, recomputed {self.recomputed_turns}",
            f"  pages moved: {self.pages_moved}",
            f"  event-loop lag max {self.max_lag_ms:.2f} ms, p99 {self.p99_lag_ms:.2f} ms",
        ] + [f"  stall {i + 1} of {len(self.stalls)}, the loop thread was at:\n{st}"
             for i, st in enumerate(self.stalls)]


class LagMeter:
    """A 1 ms ticker on the loop: how late each tick ran. With ``stall_ms``, a watcher thread also takes the loop
    thread's stack, and every other thread's innermost frames, once per stall longer than that (``stalls``: where
    the loop was stuck, innermost frame last)."""

    def __init__(self, stall_ms: Optional[float] = None) -> None:
        self.lags: list[float] = []
        self.stalls: list[str] = []
        self.stall_ms = stall_ms
        self._task: Optional[asyncio.Task[None]] = None
        self._tick = time.perf_counter()
        self._watching = False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            self._tick = time.perf_counter()
            await asyncio.sleep(0.001)
            self.lags.append(max(0.0, loop.time() - t - 0.001))

    def _watch(self, loop_thread: int, limit_s: float) -> None:
        seen = None
        while self._watching:
            time.sleep(limit_s / 4)
            tick = self._tick
            if time.perf_counter() - tick > limit_s and tick != seen:
                seen = tick
                self.stalls.append(self._stacks(loop_thread))

    @staticmethod
    def _stacks(loop_thread: int) -> str:
        """The loop thread's stack, then every other thread's innermost frames: the one holding the GIL (or the
        driver) is among them."""
        frames = sys._current_frames()
        names = {t.ident: t.name for t in threading.enumerate()}
        loop = frames.pop(loop_thread, None)
        frames.pop(threading.get_ident(), None)
        out = ["".join(traceback.format_stack(loop)[-8:])] if loop is not None else []
        for ident, frame in frames.items():
            out.append(f"    -- thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame)[-3:]))
        return "".join(out)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())
        if self.stall_ms:
            self._watching = True
            threading.Thread(target=self._watch, args=(threading.get_ident(), self.stall_ms / 1e3),
                             name="kvstore-lag-watch", daemon=True).start()

    async def stop(self) -> tuple[float, float]:
        self._watching = False
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        xs = sorted(self.lags) or [0.0]
        return 1e3 * xs[-1], 1e3 * xs[min(len(xs) - 1, int(0.99 * (len(xs) - 1)))]


def store_config(model: Any, cfg: ChatConfig, disk_dir: str, device: torch.device) -> StoreConfig:
    layout = layout_for_model(model, cfg.tokens_per_page)
    tpp = cfg.tokens_per_page
    pages = -(-(cfg.session_tokens + tpp) // tpp)
    shared = cfg.system_tokens // tpp  # the system prompt's full pages, shared by every session: counted once
    tiers: list[Any] = [DeviceTier((shared + cfg.hbm_sessions * (pages - shared)) * layout.page_bytes, device=device)]
    if cfg.offload:
        every = cfg.sessions * pages * layout.page_bytes  # every session's pages: nothing is ever dropped
        tiers += [HostTier(every // 2), DiskTier(every, disk_dir)]  # host holds half of them
    return StoreConfig(layout, tiers)


async def calibrate(
    gen: BatchedGenerator, vocab: int, cfg: ChatConfig, rng: np.random.Generator
) -> tuple[PrefillModel, PrefillModel]:
    """(the model's prefill speed, its reuse forwards'): prompts of this workload's sizes prefilled from nothing,
    then a user turn after each of them, reusing it (the forward over a reused history, by its length)."""
    prefill, reuse_forward = PrefillModel(), reuse_forward_model()
    for n in (cfg.user_tokens, cfg.session_tokens // 2, cfg.session_tokens, cfg.user_tokens, cfg.session_tokens):
        prompt = [int(t) for t in rng.integers(1, vocab, n)]
        for reuse in (False, True):
            turn = prompt + ([int(t) for t in rng.integers(1, vocab, cfg.user_tokens)] if reuse else [])
            req = gen.add(turn, 1, reuse_prefix=reuse)
            t0 = time.perf_counter()
            await gen.step()
            seconds = time.perf_counter() - t0
            if reuse and req.num_reused_tokens:
                reuse_forward.observe(req.num_reused_tokens, seconds)
            elif not reuse:
                prefill.observe(n, seconds)
            if not req.done:
                gen.close(req)
    return prefill, reuse_forward


class ChatServer:
    """The serving loop of one run: sessions, the batch, the policy's decisions and the figures."""

    def __init__(self, model: Any, mgr: KVCacheManager, cfg: ChatConfig) -> None:
        self.model, self.mgr, self.cfg = model, mgr, cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.vocab = int(model.config.vocab_size)
        self.gen = BatchedGenerator(model, mgr, max_batch_size=cfg.max_batch, cuda_graphs=cfg.cuda_graphs)
        self.prefill = PrefillModel()
        self.reuse_forward: Optional[PrefillModel] = None
        self.ttft: list[float] = []
        self.where = {k: 0 for k in LEVELS}
        self.loaded = self.recomputed = 0
        self.generated = 0
        self.waiting: list[Session] = []  # arrived, not admitted yet, in arrival order
        self.device_pages = mgr.usage(CacheLevel.DEVICE).total_pages
        self.reserved = 0  # device pages the batch's requests lock by their end
        self.prefetching = 0  # device pages of the sessions being prefetched, not admitted yet
        self.by_request: dict[BatchRequest, Session] = {}
        self.turns: list[tuple[list[int], list[int]]] = []  # (prompt, reply) of every turn served

    def tokens(self, n: int) -> list[int]:
        return [int(t) for t in self.rng.integers(1, self.vocab, n)]

    def clock(self) -> float:
        return time.perf_counter()

    def think(self, s: Session, now: float) -> None:
        """Schedule ``s``'s next turn after a pause, and when its prefetch should start."""
        s.due = now + float(self.rng.exponential(self.cfg.think_s))
        s.prompt = s.history + self.tokens(self.cfg.user_tokens)
        s.arrived, s.located, s.request, s.match = False, False, None, None
        s.start_prefetch_at = math.inf
        if self.cfg.offload and self.cfg.prefetch:
            est = self.mgr.prefix_transfer_estimate(s.prompt, CacheLevel.DEVICE)
            s.start_prefetch_at = prefetch_start_time(s.due, est, self.cfg.margin_s)

    def need(self, s: Session) -> int:
        """Device pages ``s``'s turn locks by its end (prompt and reply)."""
        return -(-(len(s.prompt) + self.cfg.reply_tokens) // self.cfg.tokens_per_page)

    def start_prefetch(self, s: Session) -> bool:
        """Start bringing ``s``'s pages to the device, if they fit beside the batch's and the other prefetches'."""
        if s.holder is None:
            if self.reserved + self.prefetching + self.need(s) > self.device_pages:
                return False  # would only evict pages that the batch or an earlier prefetch needs
            self.locate(s)
            s.holder = self.mgr.create_cache(s.prompt[:-1])
            s.prefetch = s.holder.prefetch(CacheLevel.DEVICE)
            self.prefetching += self.need(s)
        return True

    def drop_holder(self, s: Session) -> None:
        if s.prefetch is not None and not s.prefetch.done():
            s.prefetch.cancel()
        if s.holder is not None:
            s.holder.close()
            self.prefetching -= self.need(s)
        s.holder = s.prefetch = None

    def arrive(self, s: Session) -> None:
        s.arrived = True
        self.locate(s)
        self.waiting.append(s)

    def locate(self, s: Session) -> None:
        """Count where ``s``'s history is when the loop first acts on its turn (a prefetch start or its arrival);
        the last partial page is always recomputed."""
        if s.located:
            return
        s.located = True
        match = self.mgr.lookup(s.history)
        for lvl, n in match.pages_per_level.items():
            if lvl.name.lower() in self.where:
                self.where[lvl.name.lower()] += n * self.cfg.tokens_per_page
        self.where["recomputed"] += len(s.history) - match.num_tokens

    def ready(self, s: Session) -> Optional[bool]:
        """None: keep waiting for its pages; True: admit reusing them; False: admit recomputing its history."""
        if s.holder is not None:  # being prefetched: admit once there, or recompute if waiting is slower
            if s.prefetch is None or s.prefetch.done():
                return True
            reusable = s.holder.num_reused_tokens
            choice = wait_or_recompute(s.holder.transfer_estimate(CacheLevel.DEVICE), self.prefill, reusable,
                                       new_tokens=len(s.prompt) - reusable, reuse_forward=self.reuse_forward).choice
            return False if choice is ReuseChoice.RECOMPUTE else None
        if s.match is None:  # once per turn (a lookup hashes the whole prompt on the loop's thread); the match
            s.match = self.mgr.lookup(s.prompt[:-1], CacheLevel.DEVICE)  # comes priced, its disk pages probed
        match = s.match
        if match.num_tokens == 0 or match.pages_per_level.get(CacheLevel.DEVICE, 0) * self.cfg.tokens_per_page \
                == match.num_tokens:
            return True  # nothing to move
        if decide_reuse(match.estimate, match.num_tokens, self.prefill, new_tokens=len(s.prompt) - match.num_tokens,
                        reuse_forward=self.reuse_forward).choice is ReuseChoice.RECOMPUTE:
            return False
        self.start_prefetch(s)  # the pages come up while the batch runs; admitted once they are there
        return None

    def admit(self) -> None:
        """Admit arrived turns in order while the batch and the device have room for them to the end. A turn
        waiting for its prefetch lets later turns run meanwhile, but none overtakes into room that a turn before it
        needs for its prefetch in flight (otherwise long histories starve behind short ones)."""
        ahead = 0  # device pages that earlier waiting turns' prefetches in flight need
        for s in list(self.waiting):
            if len(self.gen.running) >= self.cfg.max_batch or \
                    self.reserved + ahead + self.need(s) > self.device_pages:
                break
            reuse = self.ready(s)
            if reuse is None:
                ahead += self.need(s) if s.holder is not None else 0
                continue
            self.waiting.remove(s)
            s.request = self.gen.add(s.prompt, self.cfg.reply_tokens, reuse_prefix=reuse)
            self.by_request[s.request] = s
            self.drop_holder(s)  # the request holds the pages now
            self.reserved += self.need(s)
            if reuse:
                self.loaded += 1
            else:
                self.recomputed += 1

    async def run(self) -> None:
        cfg = self.cfg
        system = self.tokens(cfg.system_tokens)
        warm = self.gen.add(system + self.tokens(1), 1)  # commits the shared system prompt once
        await self.gen.run()
        del warm
        self.prefill, reuse_forward = await calibrate(self.gen, self.vocab, cfg, self.rng)
        self.reuse_forward = reuse_forward if reuse_forward.measured else None
        now = self.clock()
        sessions = [Session(i, list(system), cfg.turns) for i in range(cfg.sessions)]
        for s in sessions:
            self.think(s, now)
        live = list(sessions)
        while live:
            now = self.clock()
            for s in live:
                if s.request is None and not s.arrived:
                    if now >= s.start_prefetch_at and s.holder is None:
                        self.start_prefetch(s)
                    if now >= s.due:
                        self.arrive(s)
            self.admit()
            if self.gen.running:
                out = await self.gen.step()
                end = self.clock()
                self.generated += len(out)
                for req in out:
                    s = self.by_request[req]
                    if len(req.generated) == 1:
                        self.ttft.append(end - s.due)
                    if req.done:
                        del self.by_request[req]
                        self.turns.append((s.prompt, list(req.generated)))
                        self.reserved -= self.need(s)
                        s.history = list(req.tokens)
                        s.turns_left -= 1
                        if s.turns_left:
                            self.think(s, end)
                        else:
                            live.remove(s)
                continue
            # nothing runs: sleep until the next arrival or prefetch start, or a prefetch ends
            events = [t for s in live if s.request is None and not s.arrived for t in (s.due, s.start_prefetch_at)]
            pending = [s.prefetch for s in live if s.prefetch is not None and not s.prefetch.done()]
            delay = max(0.0, min(events, default=now + 0.01) - now)
            if pending:
                await asyncio.wait([asyncio.ensure_future(_wait(p)) for p in pending], timeout=delay,
                                   return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(min(delay, 0.01))


async def _wait(task: PrefetchTask) -> None:
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass


async def run_chat(model: Any, cfg: ChatConfig, device: torch.device) -> ChatReport:
    """One run of the chat workload; ``model`` built by :func:`kvstore.integrations.models.build_model`."""
    with tempfile.TemporaryDirectory(prefix="serve-chat-") as disk_dir:
        async with KVCacheManager(store_config(model, cfg, disk_dir, device)) as mgr:
            server = ChatServer(model, mgr, cfg)
            gc.collect()
            gc.freeze()  # the model's objects never need collecting: no multi-ms collection pauses on the loop
            lag = LagMeter(cfg.stall_ms)
            t0 = time.perf_counter()
            lag.start()
            try:
                await server.run()
            finally:
                max_lag, p99_lag = await lag.stop()
                gc.unfreeze()
            wall = time.perf_counter() - t0
            stats = mgr.stats()
            moved = {k[len("pages_"):]: int(v) for k, v in stats.items() if k.startswith("pages_") and v}
            mgr.check_invariants()
    return ChatReport(cfg.offload, cfg.sessions, cfg.hbm_sessions, wall, server.generated, server.ttft,
                      server.where, server.recomputed, server.loaded, max_lag, p99_lag, moved, server.turns,
                      lag.stalls)


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, ChatConfig]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny", help="model shape: tiny, 1b, 8b (random seeded weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d = ChatConfig()
    for name in ("sessions", "hbm_sessions", "turns", "system_tokens", "user_tokens", "reply_tokens",
                 "tokens_per_page", "max_batch", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--think-s", type=float, default=d.think_s)
    p.add_argument("--no-offload", action="store_true", help="device tier only: drop and recompute")
    p.add_argument("--no-prefetch", action="store_true", help="bring pages up only when a turn arrives")
    p.add_argument("--eager-decode", action="store_true", help="decode with the model's forward, no CUDA graphs")
    p.add_argument("--watch-stalls-ms", type=float, default=None,
                   help="print where the event loop's thread was in every stall longer than this")
    args = p.parse_args(argv)
    cfg = ChatConfig(args.sessions, args.hbm_sessions, args.turns, args.system_tokens, args.user_tokens,
                     args.reply_tokens, args.think_s, args.tokens_per_page, args.max_batch, not args.no_offload,
                     not args.no_prefetch, seed=args.seed, cuda_graphs=False if args.eager_decode else None,
                     stall_ms=args.watch_stalls_ms)
    return args, cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, cfg = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.shape, device=device, dtype=dtype, seed=cfg.seed)
    report = asyncio.run(run_chat(model, cfg, device))
    print("\n".join(report.lines()))
    if statistics.fmean(report.ttft_s) <= 0:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
