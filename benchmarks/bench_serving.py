#!/usr/bin/env python3
"""bench_serving: what kvstore buys a serving loop on the GPU, against recomputing, in one run.

Parts (``--parts``, all by default):

- ``ttft``: time to first token of a returning request (a committed history of ``L`` tokens plus a new
  turn of ``--tail`` tokens) for ``L`` in ``--lengths``: recompute the whole prompt, or reuse the history's
  pages from the device, from host memory after a prefetch finished and without one, and from disk with a
  warm and a cold page cache (``drop_caches``; needs root, else the row says so). Each figure is the median
  of ``--reps``. The fetch-or-recompute policy (:mod:`kvstore.policy`, fed by the manager's measured
  bandwidths, the recompute rows' prefill times and the device rows' reuse forwards) picks per row; its
  figure is the TTFT of its pick against the better of the two choices.
- ``chat``: the multi-turn chat workload of ``examples/serve_chat.py`` (shared system prompt, think time,
  continuous batching) at ``--oversubscribe`` times more sessions than HBM holds, with kvstore offloading
  against an engine that drops evicted sessions and recomputes them: throughput and TTFT p50/p99.
- ``overlap``: decode step time of a running batch alone and while other sessions are demoted and
  prefetched at the same time, and the event-loop lag meanwhile.

Model shapes (``--shapes``) are Llama-architecture configs with random seeded weights (no download):
``1b`` (16 layers, 8 KV heads, head dim 64), ``8b`` (32 layers, 8 KV heads, head dim 128), ``tiny`` (CPU).

    python benchmarks/bench_serving.py --device cuda --json results.json --plot   # the H200 run
    python benchmarks/bench_serving.py --shapes tiny --lengths 64,128 --reps 1    # CPU smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(_ROOT))
if str(_ROOT / "examples") not in sys.path:
    sys.path.insert(0, str(_ROOT / "examples"))

from kvstore import (  # noqa: E402
    CacheLevel, DeviceTier, DiskTier, HostTier, KVCacheManager, StoreConfig, TransferEstimate,
)
from kvstore.integrations.hf import PagedGeneration, layout_for_model  # noqa: E402
from kvstore.integrations.models import build_model  # noqa: E402
from kvstore.policy import PrefillModel, decide_reuse, reuse_forward_model  # noqa: E402

from serve_chat import ChatConfig, LagMeter, run_chat  # noqa: E402

RESULTS = _ROOT / "benchmarks" / "results"
#: chat workload per shape (GPU shapes: a 2k-token system prompt, 6 turns of 2k user + 32 reply tokens, 0.25 s think:
#: histories grow to 14.5k tokens, so HBM fills and evicted sessions return long; 3 turns of 1k pressed it too little)
CHAT = {
    "tiny": dict(hbm_sessions=4, turns=3, system_tokens=64, user_tokens=32, reply_tokens=8, think_s=0.02,
                 tokens_per_page=4, max_batch=8),
    "1b": dict(hbm_sessions=4, turns=6, system_tokens=2048, user_tokens=2048, reply_tokens=32, think_s=0.25,
               tokens_per_page=16, max_batch=8),
    "8b": dict(hbm_sessions=4, turns=6, system_tokens=2048, user_tokens=2048, reply_tokens=32, think_s=0.25,
               tokens_per_page=16, max_batch=8),
}
VARIANTS = ("device", "host_prefetched", "host", "disk_warm", "disk_cold")


def drop_page_cache() -> bool:
    """Drop the OS page cache (root only); False when not allowed."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TTFTBench:
    """One manager and model per shape; rows of (length, variant) TTFTs."""

    def __init__(self, model: Any, mgr: KVCacheManager, device: torch.device, tail: int, seed: int) -> None:
        self.model, self.mgr, self.device, self.tail = model, mgr, device, tail
        self.rng = np.random.default_rng(seed)
        self.vocab = int(model.config.vocab_size)
        self.prefill = PrefillModel()
        self.reuse_forward = reuse_forward_model()  # the turn's forward over a reused history, by history length

    def tokens(self, n: int) -> list[int]:
        return [int(t) for t in self.rng.integers(1, self.vocab, n)]

    async def first_token(self, gen: PagedGeneration) -> tuple[float, int]:
        t0 = time.perf_counter()
        token = await gen.step()  # returns an int: the logits were synchronised
        return time.perf_counter() - t0, token

    async def recompute(self, prompt: list[int]) -> float:
        gen = PagedGeneration(self.model, self.mgr, prompt, reuse_prefix=False)
        try:
            seconds, _ = await self.first_token(gen)
        finally:
            gen.close()
        self.prefill.observe(len(prompt), seconds)
        return seconds

    async def place(self, history: list[int], variant: str) -> dict[str, int]:
        """Commit ``history`` (turn 1), then push its pages to the variant's level."""
        gen = PagedGeneration(self.model, self.mgr, history + self.tokens(1), reuse_prefix=False)
        await gen.step()
        gen.close()
        mgr, pb = self.mgr, self.mgr.layout.page_bytes
        if variant.startswith("host") or variant.startswith("disk"):
            dev = mgr.quota(CacheLevel.DEVICE)
            await mgr.set_quota(CacheLevel.DEVICE, pb)  # demotes every evictable page to host
            if variant.startswith("disk"):
                host = mgr.quota(CacheLevel.HOST)
                await mgr.set_quota(CacheLevel.HOST, pb)
                await mgr.set_quota(CacheLevel.HOST, host)
            await mgr.set_quota(CacheLevel.DEVICE, dev)
        return {lvl.name.lower(): n for lvl, n in mgr.lookup(history).pages_per_level.items()}

    async def reuse(self, history: list[int], variant: str) -> dict[str, Any]:
        where = await self.place(history, variant)
        prompt = history + self.tokens(self.tail)
        dropped = drop_page_cache() if variant == "disk_cold" else None
        gen = PagedGeneration(self.model, self.mgr, prompt)
        try:
            if variant == "host_prefetched":  # the prefetch finished before the request arrives
                await gen.prefetch(CacheLevel.DEVICE)
            # the policy decides when the request arrives, from where its pages are then
            # by the pages: their disk share is probed for the page cache (counts alone price disk reads cold)
            match = self.mgr.lookup(prompt, CacheLevel.DEVICE)
            reusable, estimate = match.num_tokens, match.estimate
            reuse_forward = self.reuse_forward if self.reuse_forward.measured else None
            decision = decide_reuse(estimate, reusable, self.prefill, new_tokens=len(prompt) - reusable,
                                    reuse_forward=reuse_forward)
            seconds, _ = await self.first_token(gen)
        finally:
            gen.close()
        if variant == "device" and reusable:  # nothing moved: the whole TTFT is the forward over the history
            self.reuse_forward.observe(reusable, seconds)
        return {"seconds": seconds, "where": where, "reused_tokens": reusable, "cold": dropped,
                "policy": decision.choice.name.lower(), "predicted_load_s": decision.load_s,
                "predicted_recompute_s": decision.recompute_s, "estimate": estimate_record(estimate)}


def estimate_record(est: TransferEstimate) -> dict[str, Any]:
    """The policy's transfer estimate, hop by hop (what each hop's bandwidth and queue predicted)."""
    return {"seconds": est.seconds, "paths": {
        f"{s.name.lower()}_to_{d.name.lower()}": {
            "pages": c.pages, "queued_bytes": c.queued_bytes, "seconds": c.seconds,
            "gb_per_s": c.estimate.bytes_per_s / 1e9, "latency_s": c.estimate.latency_s}
        for (s, d), c in est.paths.items()}}


async def run_ttft(args: argparse.Namespace, shape: str, device: torch.device, tmp: str) -> list[dict[str, Any]]:
    model = model_for(shape, device, args.seed)
    layout = layout_for_model(model, args.tokens_per_page)
    longest = max(args.lengths) + args.tail + 2 * args.tokens_per_page
    pages = -(-longest // args.tokens_per_page)
    pb = layout.page_bytes
    tiers = [DeviceTier(4 * pages * pb, device=device), HostTier(3 * pages * pb),
             DiskTier(3 * pages * pb, os.path.join(tmp, shape))]
    rows: list[dict[str, Any]] = []
    async with KVCacheManager(StoreConfig(layout, tiers)) as mgr:
        bench = TTFTBench(model, mgr, device, args.tail, args.seed)
        # warm-up: kernels, allocator, every path twice; the policy's models keep the second round only (the
        # first paid for the kernels' set-up), so the first row's decisions are calibrated as a server's are
        warm = min(args.lengths)
        for first in (True, False):
            if not first:
                bench.prefill, bench.reuse_forward = PrefillModel(), reuse_forward_model()
            await bench.recompute(bench.tokens(warm + args.tail))
            for variant in VARIANTS:
                await bench.reuse(bench.tokens(warm), variant)
        for length in args.lengths:
            rec = [await bench.recompute(bench.tokens(length + args.tail)) for _ in range(args.reps)]
            row: dict[str, Any] = {"shape": shape, "length": length, "recompute_s": statistics.median(rec)}
            for variant in VARIANTS:
                runs = [await bench.reuse(bench.tokens(length), variant) for _ in range(args.reps)]
                runs.sort(key=lambda r: r["seconds"])
                mid = runs[len(runs) // 2]
                mid["reps"] = [{k: r[k] for k in ("seconds", "policy", "predicted_load_s", "predicted_recompute_s")}
                               for r in runs]  # every run's pick and predictions (the row keeps the median's)
                row[variant] = mid
            rows.append(row)
            print(ttft_line(row), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def ttft_line(row: dict[str, Any]) -> str:
    rec = row["recompute_s"]
    parts = [f"{row['shape']} L={row['length']}: recompute {rec * 1e3:.1f} ms"]
    for v in VARIANTS:
        parts.append(f"{v} {row[v]['seconds'] * 1e3:.1f} ms ({rec / row[v]['seconds']:.1f}x, "
                     f"policy {row[v]['policy']} {policy_check(row, v)[2]:.2f})")
    return "; ".join(parts)


def policy_check(row: dict[str, Any], variant: str) -> tuple[str, float, float]:
    """(the policy's pick, its TTFT, the ratio to the better of recompute and reuse)."""
    reuse, rec = row[variant]["seconds"], row["recompute_s"]
    pick = row[variant]["policy"]
    chosen = reuse if pick == "load" else rec
    return pick, chosen, chosen / min(reuse, rec)


def ttft_tables(rows: list[dict[str, Any]]) -> list[str]:
    out = ["", "### TTFT of a returning request (ms; speed-up over recompute in brackets)", "",
           "| shape | history tokens | recompute | " + " | ".join(VARIANTS) + " |",
           "| --- | ---: | ---: | " + " | ".join("---:" for _ in VARIANTS) + " |"]
    for r in rows:
        rec = r["recompute_s"]
        cells = [f"{r[v]['seconds'] * 1e3:.1f} ({rec / r[v]['seconds']:.1f}x)" for v in VARIANTS]
        out.append(f"| {r['shape']} | {r['length']} | {rec * 1e3:.1f} | " + " | ".join(cells) + " |")
    cold = [r["disk_cold"]["cold"] for r in rows]
    if not all(cold):
        out.append("")
        out.append("disk_cold: the page cache could not be dropped (not root): those rows are warm reads.")
    out += ["", "### Fetch-or-recompute policy: TTFT of its pick / the better choice (target <= 1.10)", "",
            "| shape | history tokens | " + " | ".join(VARIANTS) + " |",
            "| --- | ---: | " + " | ".join("---" for _ in VARIANTS) + " |"]
    worst = 0.0
    for r in rows:
        cells = []
        for v in VARIANTS:
            pick, _, ratio = policy_check(r, v)
            worst = max(worst, ratio)
            cells.append(f"{pick} {ratio:.2f}")
        out.append(f"| {r['shape']} | {r['length']} | " + " | ".join(cells) + " |")
    out += ["", f"worst policy ratio: {worst:.2f} ({'met' if worst <= 1.10 else 'missed'}: <= 1.10)"]
    return out


def plot_ttft(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sub = [r for r in rows if r["shape"] == shape]
        xs = [r["length"] for r in sub]
        ax.plot(xs, [r["recompute_s"] * 1e3 for r in sub], "k-o", label="recompute")
        for v in VARIANTS:
            ax.plot(xs, [r[v]["seconds"] * 1e3 for r in sub], "-o", label=f"reuse: {v}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("history tokens")
        ax.set_ylabel("TTFT (ms)")
        ax.set_title(f"{shape}: time to first token of a returning request")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def model_for(shape: str, device: torch.device, seed: int) -> Any:
    return build_model(shape, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                       seed=seed)


async def run_chats(args: argparse.Namespace, shape: str, model: Any, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    chat_decodes = [d for d in args.decode if d != "pipelined"]  # the chat loop steps one at a time
    for decode, factor, offload in itertools.product(chat_decodes, args.oversubscribe, (True, False)):
        base = {**CHAT[shape], **args.chat_config}
        cfg = ChatConfig(sessions=factor * base["hbm_sessions"], offload=offload, seed=args.seed,
                         cuda_graphs=decode == "graphs", stall_ms=args.watch_stalls_ms, **base)
        rep = await run_chat(model, cfg, device)
        row = {"shape": shape, "decode": decode, "oversubscribe": factor, "offload": offload,
               "sessions": cfg.sessions,
               "tokens_per_s": rep.tokens_per_s, "ttft_p50_ms": rep.ttft_ms(0.5), "ttft_p99_ms": rep.ttft_ms(0.99),
               "history_tokens_from": rep.history_tokens_from, "recomputed_turns": rep.recomputed_turns,
               "loaded_turns": rep.loaded_turns, "max_lag_ms": rep.max_lag_ms, "p99_lag_ms": rep.p99_lag_ms,
               "pages_moved": rep.pages_moved, "wall_s": rep.wall_s, "stalls": rep.stalls}
        rows.append(row)
        print("\n".join(rep.lines()), flush=True)
    return rows


def chat_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["", "### Chat workload: kvstore offloading vs drop-and-recompute", "",
           "| shape | decode | sessions / HBM | engine | tokens/s | TTFT p50 ms | TTFT p99 ms "
           "| history from (dev/host/disk/recomp %) | loop lag max / p99 ms |",
           "| --- | --- | --- | --- | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        w = r["history_tokens_from"]
        total = sum(w.values()) or 1
        where = "/".join(f"{100 * w[k] / total:.0f}" for k in ("device", "host", "disk", "recomputed"))
        engine = "kvstore" if r["offload"] else "drop+recompute"
        out.append(f"| {r['shape']} | {r['decode']} | {r['oversubscribe']}x | {engine} | "
                   f"{r['tokens_per_s']:.0f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | {where} | "
                   f"{r['max_lag_ms']:.2f} / {r['p99_lag_ms']:.2f} |")
    for shape, decode, f in sorted({(r["shape"], r["decode"], r["oversubscribe"]) for r in rows}):
        pair = {r["offload"]: r for r in rows
                if (r["shape"], r["decode"], r["oversubscribe"]) == (shape, decode, f)}
        if len(pair) == 2:
            gain = pair[True]["tokens_per_s"] / pair[False]["tokens_per_s"]
            out.append(f"\n{shape} ({decode} decode) at {f}x: throughput {gain:.2f}x, "
                       f"TTFT p50 {pair[False]['ttft_p50_ms'] / pair[True]['ttft_p50_ms']:.2f}x lower, "
                       f"p99 {pair[False]['ttft_p99_ms'] / pair[True]['ttft_p99_ms']:.2f}x lower with kvstore")
    return out


async def run_overlap(args: argparse.Namespace, shape: str, model: Any, device: torch.device,
                      tmp: str) -> dict[str, Any]:
    """Decode steps of a running batch, alone and while other sessions' pages are prefetched and demoted: one
    run per decode path, each with a manager of its own (no run inherits the pages the one before committed)."""
    rng = np.random.default_rng(args.seed)
    out: dict[str, Any] = {"shape": shape, "batch": args.overlap_batch, "context": args.overlap_context, "runs": []}
    raw: Optional[RawCopies] = None
    for decode in args.decode:
        run, raw = await _overlap_run(args, shape, model, device, os.path.join(tmp, f"overlap-{shape}-{decode}"),
                                      decode, rng, raw)
        base = min(run["alone"]["step_ms_median"], run["alone_again"]["step_ms_median"])
        for w in run["with"] + run["raw"] + ([run["raw_max"]] if "raw_max" in run else []):
            w["slowdown"] = w["step_ms_median"] / base
        for w, r in itertools.zip_longest(run["with"], run["raw"]):
            raw_part = "" if r is None else f"; raw copies at that rate: {r['slowdown']:.3f}x " \
                f"({r['gb_per_s_moved']:.1f} GB/s)"
            print(f"{shape} overlap ({decode}): step {base:.2f} ms alone, {w['step_ms_median']:.2f} ms with "
                  f"transfers ({w['gb_per_s_moved']:.1f} GB/s moved, paced {w['paced_gbps']:g}): "
                  f"{w['slowdown']:.3f}x; loop thread busy {w['loop_cpu_share']:.0%} "
                  f"(alone {run['alone']['loop_cpu_share']:.0%}){raw_part}", flush=True)
        if "raw_max" in run:
            m = run["raw_max"]
            print(f"{shape} overlap ({decode}): raw copies flat out {m['gb_per_s_moved']:.1f} GB/s: "
                  f"{m['slowdown']:.3f}x", flush=True)
        out["runs"].append(run)
    return out


async def _overlap_run(args: argparse.Namespace, shape: str, model: Any, device: torch.device, disk: str,
                       decode: str, rng: np.random.Generator,
                       raw: Optional[RawCopies]) -> tuple[dict[str, Any], Optional[RawCopies]]:
    """The phases of one decode path (and the raw copier, made on the first run on a GPU)."""
    from kvstore.integrations.hf_batch import BatchedGenerator

    batch, context, steps = args.overlap_batch, args.overlap_context, args.overlap_steps
    tpp = args.tokens_per_page
    layout = layout_for_model(model, tpp)
    # prefill, 3 warm-up steps, then phases of ``steps``: alone, with each rate, raw copies at each of those rates
    # and flat out, alone again
    max_new = (3 + 2 * len(args.overlap_gbps)) * steps + 10
    run_pages = batch * (-(-(context + max_new) // tpp) + 1)
    mover_pages = -(-context * 2 // tpp)  # one background session of twice the context
    movers = 4
    pb = layout.page_bytes
    tiers = [DeviceTier((run_pages + mover_pages + 4) * pb, device=device), HostTier(movers * (mover_pages + 2) * pb),
             DiskTier(movers * (mover_pages + 2) * pb, disk)]
    vocab = int(model.config.vocab_size)
    async with KVCacheManager(StoreConfig(layout, tiers)) as mgr:
        if raw is None and device.type == "cuda":
            raw = RawCopies(device, mgr.config.batch_bytes)
        holders = []
        for _ in range(movers):  # background sessions: committed, then held suspended
            hist = [int(t) for t in rng.integers(1, vocab, 2 * context)]
            g = PagedGeneration(model, mgr, hist, reuse_prefix=False)
            await g.step()
            g.close()
            holders.append(mgr.create_cache(hist))
        moved = {"pages": 0, "bytes": 0, "incomplete": 0}

        async def traffic(stop: asyncio.Event, gbps: float) -> None:
            """Prefetch the background sessions in turn, flat out (0) or paced to ``gbps`` of moved bytes."""
            i, t0, start = 0, time.perf_counter(), moved["bytes"]
            while not stop.is_set():
                res = await holders[i % movers].prefetch(CacheLevel.DEVICE)  # evicts the one before to host
                moved["pages"] += res.pages_moved
                moved["bytes"] += res.bytes_moved
                if not res.complete:
                    moved["incomplete"] += 1
                    await asyncio.sleep(0.001)  # no room: never spin
                if gbps > 0:  # pace: the bytes so far at the given rate, counting the demotions too
                    ahead = 2 * (moved["bytes"] - start) / (gbps * 1e9) - (time.perf_counter() - t0)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                i += 1

        gen = BatchedGenerator(model, mgr, cuda_graphs=decode != "eager")
        for _ in range(batch):
            gen.add([int(t) for t in rng.integers(1, vocab, context)], max_new)
        await gen.step()  # prefill
        for _ in range(3):
            await gen.step()  # warm

        async def timed_steps() -> list[float]:
            """Each step's time: from step() call to return, or (pipelined) from one accepted step to the next."""
            if len(gen.running) != batch or any(len(r.generated) + steps > max_new for r in gen.running):
                raise RuntimeError("overlap: a request would finish before its phases did; raise max_new")
            if decode == "pipelined":
                stamps = [time.perf_counter()]
                await gen.step_many(steps, on_step=lambda _: stamps.append(time.perf_counter()))
                return [b - a for a, b in zip(stamps, stamps[1:])]
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                await gen.step()
                times.append(time.perf_counter() - t0)
            return times

        run: dict[str, Any] = {"decode": decode, "with": [], "raw": []}
        # raw copies run once per kvstore phase, paced to the bytes that phase moved (both directions, as the
        # kvstore pacing counts them), then once flat out ("raw_max"): the hardware's share and its ceiling
        phases: list[tuple[str, Optional[float]]] = [("alone", None)]
        phases += [("with", r) for r in args.overlap_gbps]
        if raw is not None:
            phases += [("raw", r) for r in args.overlap_gbps] + [("raw_max", 0.0)]
        phases.append(("alone_again", None))
        for kind, gbps in phases:
            lag = LagMeter()
            lag.start()
            stop = asyncio.Event()
            mover = asyncio.ensure_future(traffic(stop, gbps)) if kind == "with" and gbps is not None else None
            copier = raw if kind in ("raw", "raw_max") else None
            if copier is not None and gbps is not None:
                same = next((w for w in run["with"] if w["paced_gbps"] == gbps), None) if kind == "raw" else None
                copier.start(0.0 if same is None else 2 * same["gb_per_s_moved"])
            before, incomplete = moved["pages"], moved["incomplete"]
            t0, cpu0 = time.perf_counter(), time.thread_time()
            times = await timed_steps()
            wall, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
            stop.set()
            if mover is not None:
                await mover
            raw_bytes = await asyncio.to_thread(copier.stop) if copier is not None else 0
            max_lag, p99_lag = await lag.stop()
            fig = {"step_ms_median": 1e3 * statistics.median(times), "step_ms_max": 1e3 * max(times),
                   "max_lag_ms": max_lag, "p99_lag_ms": p99_lag, "loop_cpu_share": cpu / wall,
                   "gb_per_s_moved": ((moved["pages"] - before) * pb + raw_bytes / 2) / wall / 1e9,
                   "incomplete_prefetches": moved["incomplete"] - incomplete}
            if kind != "with" and kind != "raw":
                run[kind] = fig
            else:
                run[kind].append(dict(fig, paced_gbps=gbps))
        gen.close()
        for h in holders:
            h.close()
    return run, raw


class RawCopies:
    """The hardware's own cost of the overlap's traffic: one thread copying a pinned buffer to the device and
    another device buffer back, ``nbytes`` (one kvstore batch) at a time on two streams of their own, flat out or
    paced to ``gbps`` of both directions (as the kvstore traffic counts). Buffers are made once, up front."""

    def __init__(self, device: torch.device, nbytes: int) -> None:
        self.device, self.nbytes = device, nbytes
        self.src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.dev_in = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.dev_out = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.streams = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.moved = 0

    def start(self, gbps: float) -> None:
        self._stop.clear()
        self.moved = 0
        self._thread = threading.Thread(target=self._run, args=(gbps,), name="raw-copies", daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """Stop, wait for the thread; the bytes it moved (both directions)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.moved

    def _run(self, gbps: float) -> None:
        h2d, d2h = self.streams
        t0 = time.perf_counter()
        while not self._stop.is_set():
            with torch.cuda.stream(h2d):
                self.dev_in.copy_(self.src, non_blocking=True)
            with torch.cuda.stream(d2h):
                self.dst.copy_(self.dev_out, non_blocking=True)
            h2d.synchronize()  # GIL released while waiting
            d2h.synchronize()
            self.moved += 2 * self.nbytes
            if gbps > 0:
                ahead = self.moved / (gbps * 1e9) - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)


def overlap_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["", "### Overlap: decode step of a running batch with prefetches and demotions running "
           "(target < 5 % slower)", "",
           "| shape | decode | batch x context | paced GB/s | step alone ms | step with transfers ms | slower by | "
           "moved GB/s | raw copies at that GB/s: slower by (GB/s) | loop lag max / p99 ms (alone, with) | "
           "loop thread busy (alone, with) |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        for run in r["runs"]:
            a = run["alone"]
            base = min(a["step_ms_median"], run["alone_again"]["step_ms_median"])
            raws = {x["paced_gbps"]: x for x in run.get("raw", [])}
            for w in run["with"]:
                paced = f"{w['paced_gbps']:g}" if w["paced_gbps"] > 0 else "flat out"
                x = raws.get(w["paced_gbps"])
                raw = "-" if x is None else f"{100 * (x['slowdown'] - 1):+.1f} % ({x['gb_per_s_moved']:.1f})"
                m = run.get("raw_max")
                if m is not None and w["paced_gbps"] == 0:
                    raw += f"; flat out {100 * (m['slowdown'] - 1):+.1f} % ({m['gb_per_s_moved']:.1f})"
                out.append(f"| {r['shape']} | {run['decode']} | {r['batch']} x {r['context']} | {paced} | {base:.2f} | "
                           f"{w['step_ms_median']:.2f} | {100 * (w['slowdown'] - 1):+.1f} % | "
                           f"{w['gb_per_s_moved']:.2f} | {raw} | {a['max_lag_ms']:.2f} / {a['p99_lag_ms']:.2f}, "
                           f"{w['max_lag_ms']:.2f} / {w['p99_lag_ms']:.2f} | "
                           f"{a['loop_cpu_share']:.0%}, {w['loop_cpu_share']:.0%} |")
    return out


def _chat_overrides(p: argparse.ArgumentParser, text: str) -> dict[str, Any]:
    """``name=value,...`` as ChatConfig fields of their own types (the shape's CHAT entry is the default)."""
    fields = {f.name: f.type for f in dataclasses.fields(ChatConfig)}
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        kind = fields.get(name)
        if kind not in ("int", "float") or not value:
            p.error(f"--chat-config takes int/float ChatConfig fields as name=value, got {item!r}")
        try:
            out[name] = int(value) if kind == "int" else float(value)
        except ValueError:
            p.error(f"--chat-config {name} must be a number, got {value!r}")
    for name in ("sessions", "offload", "seed", "cuda_graphs"):  # set per row by the benchmark itself
        if name in out:
            p.error(f"--chat-config cannot set {name}: the benchmark sets it per row")
    return out


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--parts", default="ttft,chat,overlap", help="comma-separated: ttft, chat, overlap")
    p.add_argument("--shapes", default=None, help="comma-separated model shapes (default 1b,8b on CUDA, tiny on CPU)")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768", help="history tokens per TTFT row")
    p.add_argument("--tail", type=int, default=64, help="new tokens of the returning turn")
    p.add_argument("--tokens-per-page", type=int, default=16)
    p.add_argument("--reps", type=int, default=3, help="runs per TTFT figure (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--oversubscribe", default="2,4", help="chat: sessions per session HBM holds")
    p.add_argument("--overlap-batch", type=int, default=8)
    p.add_argument("--overlap-context", type=int, default=2048)
    p.add_argument("--overlap-steps", type=int, default=40)
    p.add_argument("--overlap-gbps", default="0",
                   help="overlap: comma-separated rates to pace the background transfers at (prefetched + demoted "
                        "GB/s; 0: flat out), one phase each")
    p.add_argument("--decode", default="graphs,pipelined",
                   help="overlap and chat: comma-separated decode paths, graphs (captured CUDA graphs, one step() "
                        "at a time; their static step eagerly on CPU), pipelined (overlap only: the same graphs "
                        "through step_many(), two steps in flight) and/or eager (the model's forward on the forward "
                        "thread)")
    p.add_argument("--chat-config", default="",
                   help="chat: override the workload, e.g. turns=6,user_tokens=2048,think_s=0.5 (ChatConfig fields)")
    p.add_argument("--watch-stalls-ms", type=float, default=None,
                   help="chat: record where the event loop's thread was in every stall longer than this")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--plot", nargs="?", const=str(RESULTS), default=None,
                   help=f"write plots into this directory (default {RESULTS})")
    args = p.parse_args(argv)
    args.parts = [s for s in args.parts.split(",") if s]
    if args.shapes is None:
        args.shapes = "1b,8b" if args.device.startswith("cuda") else "tiny"
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.oversubscribe = [int(x) for x in args.oversubscribe.split(",") if x]
    args.overlap_gbps = [float(x) for x in args.overlap_gbps.split(",") if x]
    args.decode = [x for x in args.decode.split(",") if x]
    args.chat_config = _chat_overrides(p, args.chat_config)
    if not args.decode or not set(args.decode) <= {"graphs", "pipelined", "eager"}:
        p.error(f"--decode takes graphs, pipelined and/or eager, got {args.decode}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    doc: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args)}
    lines: list[str] = []

    def save() -> None:  # after every part: a run stopped midway keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=1, default=str))

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        if "ttft" in args.parts:
            rows: list[dict[str, Any]] = []
            for shape in args.shapes:
                rows += asyncio.run(run_ttft(args, shape, device, tmp))
            doc["ttft"] = rows
            save()
            lines += ttft_tables(rows)
            if args.plot:
                plot_ttft(rows, Path(args.plot) / "bench_serving_ttft.png")
        if "chat" in args.parts or "overlap" in args.parts:
            chats: list[dict[str, Any]] = []
            overlaps: list[dict[str, Any]] = []
            for shape in args.shapes:
                model = model_for(shape, device, args.seed)
                if "overlap" in args.parts:
                    overlaps.append(asyncio.run(run_overlap(args, shape, model, device, tmp)))
                    doc["overlap"] = overlaps
                    save()
                if "chat" in args.parts:
                    chats += asyncio.run(run_chats(args, shape, model, device))
                    doc["chat"] = chats
                    save()
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if chats:
                doc["chat"] = chats
                lines += chat_table(chats)
            if overlaps:
                doc["overlap"] = overlaps
                lines += overlap_table(overlaps)
    print("\n".join(lines))
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
