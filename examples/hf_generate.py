"""Serve a Hugging Face causal LM whose KV cache lives in kvstore pages.

A small Llama-architecture model is built from a seeded config (random weights, no download).
Two demos:

1. Round-robin serving: several requests take turns, one decode step each, on a device tier too
   small to hold them all. After its step a request is suspended; its pages are demoted to host
   and disk under pressure; while the current request computes, the next requests in the queue
   are prefetched to host; a request's next step resumes it (joining its prefetch). Every
   request's tokens are checked against the model's own uninterrupted ``generate``.
2. Prefix reuse: two requests share a long prompt; the second reuses the first's committed pages
   and prefills only its own tail.

Run (``pip install 'kvstore-llm[hf]'``, or ``pip install -e '.[hf]'`` in a checkout)::

    python examples/hf_generate.py                 # CPU, or CUDA device tier when available
    python examples/hf_generate.py --requests 8 --max-new-tokens 16 --tokens-per-page 4
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from transformers import LlamaForCausalLM

from kvstore import (
    CacheLevel,
    CacheStatus,
    DeviceTier,
    DiskTier,
    HostTier,
    KVCacheManager,
    PageLayout,
    PrefetchTask,
    StoreConfig,
)
from kvstore.integrations import models
from kvstore.integrations.hf import PagedGeneration, layout_for_model

VOCAB_SIZE = 128


def build_model(
    seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    """A tiny seeded Llama (2 layers, hidden 64, 4 heads, 2 KV heads, vocab 128) in eval mode."""
    return models.build_model("tiny", device=device, dtype=dtype, seed=seed, vocab_size=VOCAB_SIZE)


def reference_tokens(model: LlamaForCausalLM, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """The model's own uninterrupted greedy generation (its DynamicCache, no kvstore)."""
    ids = torch.tensor([list(prompt)], device=model.device)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


def store_config(
    layout: PageLayout, *, device_pages: int, host_pages: int, disk_pages: int, disk_dir: str,
    device: str | None = None,
) -> StoreConfig:
    """Device, host and disk tiers sized in pages."""
    page = layout.page_bytes
    tiers = [DeviceTier(device_pages * page, device=device), HostTier(host_pages * page),
             DiskTier(disk_pages * page, disk_dir)]
    return StoreConfig(layout, tiers)


@dataclass
class RequestReport:
    """What happened to one request."""

    rid: int
    prompt_len: int
    tokens: list[int] = field(default_factory=list)
    suspends: int = 0
    prefetches: int = 0
    reused_tokens: int = 0
    prefilled_tokens: int = 0
    found_on: collections.Counter = field(default_factory=collections.Counter)  # coldest level when it came back

    def line(self) -> str:
        where = ", ".join(f"{lvl} {self.found_on[lvl]}x" for lvl in ("device", "host", "disk") if self.found_on[lvl])
        return (
            f"req {self.rid}: prompt {self.prompt_len} tok (reused {self.reused_tokens}, prefilled "
            f"{self.prefilled_tokens}), generated {len(self.tokens)} tok {self.tokens}, suspended "
            f"{self.suspends}x, prefetched {self.prefetches}x, pages found on: {where or '-'}"
        )


class _Request:
    def __init__(self, rid: int, gen: PagedGeneration, max_new_tokens: int) -> None:
        self.gen = gen
        self.max_new_tokens = max_new_tokens
        self.report = RequestReport(rid, gen.num_prompt_tokens, reused_tokens=gen.num_reused_tokens)
        self.prefetch: PrefetchTask | None = None
        self._observed = True  # pages looked at since the last suspend

    @property
    def done(self) -> bool:
        return len(self.gen.generated) >= self.max_new_tokens

    @property
    def observed(self) -> bool:
        return self._observed

    def observe(self) -> None:
        """Record the coldest level holding a page, once per suspension (before any prefetch)."""
        if self._observed:
            return
        self._observed = True
        levels = [lvl for lvl, n in self.gen.page_levels().items() if n > 0]
        self.report.found_on[CacheLevel(max(levels)).name.lower() if levels else "device"] += 1

    def suspend(self) -> None:
        self.gen.suspend()
        self._observed = False


async def serve(
    model: LlamaForCausalLM,
    mgr: KVCacheManager,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    prefetch_ahead: int = 2,
    log: Callable[[str], Any] | None = None,
) -> list[RequestReport]:
    """Generate every prompt round-robin, one step per turn, suspending between turns.

    While the current request computes, the next ``prefetch_ahead`` suspended requests in the
    queue are prefetched to host. Returns one report per prompt, in order.
    """
    queue = collections.deque(
        _Request(i, PagedGeneration(model, mgr, p), max_new_tokens) for i, p in enumerate(prompts)
    )
    finished: list[RequestReport] = []
    while queue:
        req = queue.popleft()
        for nxt in list(queue)[:prefetch_ahead]:
            if nxt.gen.status is CacheStatus.SUSPENDED and nxt.gen.kv_cache.num_pages and not nxt.observed:
                nxt.observe()  # once per suspension: where its pages went, then bring them up
                nxt.prefetch = nxt.gen.prefetch(CacheLevel.HOST)
                nxt.report.prefetches += 1
        req.observe()
        token = await req.gen.step()  # resume waits for room in-flight prefetches hold
        req.report.tokens.append(token)
        if req.done:
            req.gen.close()
            req.report.suspends = req.gen.num_suspends
            req.report.prefilled_tokens = req.gen.num_prefilled_tokens
            finished.append(req.report)
            if log:
                log(req.report.line())
        else:
            req.suspend()
            queue.append(req)
        await asyncio.sleep(0)  # let transfer completions run
    return sorted(finished, key=lambda r: r.rid)


async def prefix_reuse(
    model: LlamaForCausalLM, mgr: KVCacheManager, shared: Sequence[int], tails: Sequence[Sequence[int]],
    *, max_new_tokens: int,
) -> list[tuple[PagedGeneration, torch.Tensor]]:
    """Run ``shared + tail`` for each tail, one after the other; later ones reuse the shared pages.

    Returns each request's finished generation and the logits of its first step (prefill).
    """
    results = []
    for tail in tails:
        gen = PagedGeneration(model, mgr, list(shared) + list(tail))
        await gen.step()
        first_logits = gen.last_logits.clone()
        while len(gen.generated) < max_new_tokens:
            await gen.step()
        gen.suspend()
        gen.close()  # committed pages stay as reusable prefix
        results.append((gen, first_logits))
    return results


def _random_prompts(n: int, lengths: Sequence[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB_SIZE, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


async def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--tokens-per-page", type=int, default=8)
    ap.add_argument("--device-pages", type=int, default=10, help="device tier quota, in pages")
    ap.add_argument("--host-pages", type=int, default=12, help="host tier quota, in pages")
    ap.add_argument("--device", default=None, help="device tier device (default: cuda if available, else cpu)")
    ap.add_argument("--disk-dir", default=None, help="disk tier directory (default: a temporary one)")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(device=device)
    layout = layout_for_model(model, args.tokens_per_page)
    prompts = _random_prompts(args.requests, (21, 37, 30, 16, 43), seed=1)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        disk_dir = args.disk_dir or tmp
        cfg = store_config(layout, device_pages=args.device_pages, host_pages=args.host_pages,
                           disk_pages=1024, disk_dir=disk_dir, device=device)
        print(f"model: tiny Llama on {device}; page = {args.tokens_per_page} tokens, {layout.page_bytes} bytes; "
              f"device {args.device_pages} pages, host {args.host_pages} pages, disk 1024 pages")
        print(f"== round-robin serving of {len(prompts)} requests ==")
        t0 = time.perf_counter()
        async with KVCacheManager(cfg) as mgr:
            reports = await serve(model, mgr, prompts, max_new_tokens=args.max_new_tokens, log=print)
            stats = mgr.stats()
        print(f"served in {time.perf_counter() - t0:.2f} s; transfers: "
              + ", ".join(f"{k}={v}" for k, v in sorted(stats.items()) if k.startswith("pages_") and v))
        for rep, prompt in zip(reports, prompts, strict=True):
            same = rep.tokens == reference_tokens(model, prompt, args.max_new_tokens)
            ok &= same
            print(f"req {rep.rid}: tokens match model.generate: {same}")

        print("== prefix reuse ==")
        shared = _random_prompts(1, (6 * args.tokens_per_page + 3,), seed=2)[0]
        tails = _random_prompts(2, (5,), seed=3)
        big = store_config(layout, device_pages=64, host_pages=64, disk_pages=1024, disk_dir=disk_dir, device=device)
        async with KVCacheManager(big) as mgr:
            results = await prefix_reuse(model, mgr, shared, tails, max_new_tokens=args.max_new_tokens)
            hits = mgr.stats().get("prefix_hit_tokens", 0)
        for i, (gen, first_logits) in enumerate(results):
            prompt = gen.tokens[: gen.num_prompt_tokens]
            with torch.no_grad():
                full = model(torch.tensor([prompt], device=model.device)).logits[0, -1]
            same = gen.generated == reference_tokens(model, prompt, args.max_new_tokens)
            ok &= same
            print(f"request {i}: prompt {len(prompt)} tok, reused {gen.num_reused_tokens}, prefilled "
                  f"{gen.num_prefilled_tokens}; max |logit - full prefill| = "
                  f"{(first_logits - full).abs().max().item():.2e}; tokens match model.generate: {same}")
        print(f"prefix_hit_tokens = {hits}")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
