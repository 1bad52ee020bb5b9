"""Replay a Mooncake-format request trace through the public kvstore API and report prefix reuse.

Each trace line is ``{"timestamp", "input_length", "output_length", "hash_ids"}``; ``hash_ids`` name
the 512-token blocks of the prompt, and equal ids are equal prefix blocks. Per request the replay
builds deterministic token ids from the block ids (block ``b`` holds tokens ``b*512 .. b*512+511``),
then runs ``create_cache(tokens)``, ``resume()``, ``resize(input + output)``, ``commit(prompt)`` and
``close()``. It prints the token hit rate per tier and overall, the hit rate of an exact LRU over the
same total capacity (a separate simulator over block ids, so the engine's policy can be judged), and
the engine time per request (``time.perf_counter`` around the API calls only, not the token lists).

    python examples/trace_replay.py                       # the shared trace, default policy
    python examples/trace_replay.py --policy lru --capacity-tokens 262144,1310720,2621440
    # the Mooncake conversation trace with issue #11's capacities (1000/2000/2859 pages of 512 tokens);
    # median of several runs against the targets: benchmarks/bench_trace.py
    python examples/trace_replay.py --trace /path/to/conversation_trace.jsonl \
        --capacity-tokens 512000,1024000,1463808
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from kvstore import CacheLevel, DeviceTier, DiskTier, HostTier, KVCacheManager, PageLayout, StoreConfig  # noqa: E402
from kvstore.placement.policies import POLICIES  # noqa: E402

DEFAULT_TRACE = "../shared/traces/mooncake_synthetic_trace.jsonl"
DEFAULT_CAPACITY = "262144,1310720,2621440"  # device, host, disk in tokens: 512 + 2560 + 5120 pages of 512


@dataclass(frozen=True, slots=True)
class Request:
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


@dataclass
class Report:
    """What a replay measured."""

    requests: int = 0
    input_tokens: int = 0
    hit_tokens: dict[CacheLevel, int] = field(default_factory=dict)
    lru_hit_tokens: int = 0
    engine_seconds: float = 0.0
    capacity_pages: int = 0

    @property
    def hit_rate(self) -> float:
        return sum(self.hit_tokens.values()) / max(1, self.input_tokens)

    @property
    def lru_hit_rate(self) -> float:
        return self.lru_hit_tokens / max(1, self.input_tokens)

    @property
    def us_per_request(self) -> float:
        return 1e6 * self.engine_seconds / max(1, self.requests)

    def lines(self) -> list[str]:
        out = [f"requests: {self.requests}   prompt tokens: {self.input_tokens}   capacity: {self.capacity_pages} pages"]
        for lvl, n in self.hit_tokens.items():
            out.append(f"token hit rate {lvl.label:>6}: {n / max(1, self.input_tokens):7.2%}")
        out.append(f"token hit rate overall: {self.hit_rate:7.2%}")
        out.append(f"exact LRU, same total capacity: {self.lru_hit_rate:7.2%}")
        out.append(f"engine time per request: {self.us_per_request:.1f} us")
        return out


def resolve(path: str) -> Path:
    """``path`` as given when absolute, else relative to the repository root."""
    p = Path(path)
    return p if p.is_absolute() else REPO / p


def load_trace(path: Path, limit: Optional[int] = None) -> list[Request]:
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            out.append(Request(int(rec["input_length"]), int(rec["output_length"]), tuple(rec["hash_ids"])))
            if limit is not None and len(out) >= limit:
                break
    return out


def prompt_tokens(req: Request, block: int) -> np.ndarray:
    """Token ids of the prompt: block ``b`` is ``b*block + 0..block-1``; the last block may be partial."""
    ids = np.asarray(req.hash_ids, dtype=np.int64) * block
    return (ids[:, None] + np.arange(block, dtype=np.int64)).ravel()[: req.input_length]


def parse_capacity(text: str, block: int) -> list[int]:
    """``"device,host,disk"`` in tokens (host/disk may be 0 or left out) -> pages per level."""
    try:
        parts = [int(float(x)) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"--capacity-tokens must be DEVICE[,HOST[,DISK]] token counts, got {text!r}") from None
    if not 1 <= len(parts) <= 3 or parts[0] < block or any(p < 0 for p in parts):
        raise SystemExit(f"--capacity-tokens needs DEVICE >= {block} tokens and HOST, DISK >= 0, got {text!r}")
    return [p // block for p in parts] + [0] * (3 - len(parts))


class ExactLRU:
    """Reference: an exact LRU over full prompt blocks with a capacity in blocks (no tiers, no engine)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def request(self, full_blocks: Sequence[int]) -> int:
        """Blocks of the longest cached prefix; then every block is used (inserted or refreshed)."""
        hit = 0
        for b in full_blocks:
            if b not in self.blocks:
                break
            hit += 1
        for b in full_blocks:
            self.blocks[b] = None
            self.blocks.move_to_end(b)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
        return hit


def make_config(pages: Sequence[int], block: int, policy: str, disk_dir: str, free_target: float = 0.0) -> StoreConfig:
    layout = PageLayout(num_layers=1, num_kv_heads=1, head_dim=1, tokens_per_page=block, dtype=torch.float16)
    pb = layout.page_bytes
    tiers = [DeviceTier(pages[0] * pb, device="cpu")]
    if pages[1]:
        tiers.append(HostTier(pages[1] * pb, pinned=False))
    if pages[2]:
        tiers.append(DiskTier(pages[2] * pb, disk_dir))
    return StoreConfig(layout, tiers, namespace="trace-replay", eviction_policy=policy, free_target=free_target)


async def replay(
    requests: Sequence[Request],
    pages: Sequence[int],
    policy: str,
    block: int = 512,
    progress: bool = True,
    check: bool = False,
    free_target: float = 0.0,
) -> Report:
    """Run ``requests`` through a fresh manager; ``check`` runs check_invariants() after every request."""
    from tqdm import tqdm

    report = Report(capacity_pages=sum(pages))
    ref = ExactLRU(sum(pages))
    with tempfile.TemporaryDirectory(prefix="kvstore-replay-") as tmp:
        config = make_config(pages, block, policy, tmp, free_target)
        report.hit_tokens = {lvl: 0 for lvl in config.levels}
        async with KVCacheManager(config) as mgr:
            bar = tqdm(requests, unit="req", disable=not progress, mininterval=0.5, file=sys.stderr)
            for i, req in enumerate(bar):
                tokens = prompt_tokens(req, block)
                t0 = time.perf_counter()
                cache = mgr.create_cache(tokens)
                t1 = time.perf_counter()
                for lvl, n in cache.page_levels().items():
                    report.hit_tokens[lvl] += n * block
                t2 = time.perf_counter()
                await cache.resume()
                await cache.resize(req.input_length + req.output_length)
                cache.commit(tokens)
                cache.close()
                report.engine_seconds += (t1 - t0) + (time.perf_counter() - t2)
                report.requests += 1
                report.input_tokens += req.input_length
                report.lru_hit_tokens += ref.request(req.hash_ids[: req.input_length // block]) * block
                if check:
                    mgr.check_invariants()
                if progress and i % 64 == 0:
                    bar.set_postfix(hit=f"{report.hit_rate:.1%}", lru=f"{report.lru_hit_rate:.1%}",
                                    us=f"{report.us_per_request:.0f}", refresh=False)
            bar.close()
    return report


def main(argv: Optional[Iterable[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", default=DEFAULT_TRACE, help="Mooncake JSONL trace (relative paths: from the repo root)")
    ap.add_argument("--policy", default="slru", choices=POLICIES, help="eviction policy (StoreConfig.eviction_policy)")
    ap.add_argument("--capacity-tokens", default=DEFAULT_CAPACITY,
                    help="DEVICE,HOST,DISK capacity in tokens (0 leaves a tier out)")
    ap.add_argument("--block", type=int, default=512, help="tokens per trace block = tokens per page")
    ap.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    ap.add_argument("--free-target", type=float, default=0.0, help="StoreConfig.free_target (background demotion)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(list(argv) if argv is not None else None)
    path = resolve(args.trace).resolve()
    if not path.is_file():
        raise SystemExit(f"trace not found: {path}")
    requests = load_trace(path, args.limit)
    pages = parse_capacity(args.capacity_tokens, args.block)
    need = max((-(-(r.input_length + r.output_length) // args.block) for r in requests), default=0)
    if need > pages[0]:
        raise SystemExit(
            f"the device level holds {pages[0]} pages but the largest request needs {need}; "
            f"raise the device part of --capacity-tokens to at least {need * args.block}"
        )
    print(f"trace {path} ({len(requests)} requests), policy {args.policy}, pages device/host/disk = "
          f"{pages[0]}/{pages[1]}/{pages[2]} of {args.block} tokens")
    report = asyncio.run(replay(requests, pages, args.policy, args.block, progress=not args.no_progress,
                                free_target=args.free_target))
    print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
