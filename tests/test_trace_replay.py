"""The trace replay example on a tiny shipped trace: runs, keeps invariants, reports hit rates and timing."""

import importlib.util
import sys
from pathlib import Path

import pytest

from kvstore import CacheLevel

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO / "tests" / "data" / "mini_trace.jsonl"
CAPACITY = [24, 24, 48]  # pages of 512 tokens: device, host, disk


@pytest.fixture(scope="module")
def replay_mod():
    spec = importlib.util.spec_from_file_location("trace_replay", REPO / "examples" / "trace_replay.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["trace_replay"] = mod
    spec.loader.exec_module(mod)
    return mod


async def test_replay_runs_with_invariants_checked_after_every_request(replay_mod):
    requests = replay_mod.load_trace(TRACE)
    report = await replay_mod.replay(requests, CAPACITY, "slru", progress=False, check=True)
    assert report.requests == len(requests) == 120
    assert 0 < report.hit_rate < 1


async def test_replay_reports_hits_on_every_tier(replay_mod):
    report = await replay_mod.replay(replay_mod.load_trace(TRACE), CAPACITY, "lru", progress=False)
    assert set(report.hit_tokens) == {CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK}
    assert all(n > 0 for n in report.hit_tokens.values())


async def test_engine_lru_matches_the_exact_lru_reference_here(replay_mod):
    report = await replay_mod.replay(replay_mod.load_trace(TRACE), CAPACITY, "lru", progress=False)
    assert report.hit_rate == pytest.approx(report.lru_hit_rate, abs=0.01)


async def test_slru_beats_lru_on_the_tiny_trace(replay_mod):
    requests = replay_mod.load_trace(TRACE)
    lru = await replay_mod.replay(requests, CAPACITY, "lru", progress=False)
    slru = await replay_mod.replay(requests, CAPACITY, "slru", progress=False)
    assert slru.hit_rate > lru.hit_rate


def test_prompt_tokens_are_deterministic_per_block(replay_mod):
    req = replay_mod.Request(input_length=700, output_length=1, hash_ids=(3, 9))
    tokens = replay_mod.prompt_tokens(req, 512)
    assert len(tokens) == 700 and tokens[0] == 3 * 512 and tokens[512] == 9 * 512


def test_exact_lru_reference_counts_the_cached_prefix_only(replay_mod):
    ref = replay_mod.ExactLRU(capacity=3)
    assert ref.request([1, 2, 3]) == 0
    assert ref.request([1, 2, 9]) == 2
    assert ref.request([3]) == 0, "3 was least recently used and left when 9 came"


def test_command_line_prints_the_report(replay_mod, capsys):
    assert replay_mod.main(["--trace", str(TRACE), "--capacity-tokens", "12288,12288,24576", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "token hit rate overall" in out and "exact LRU" in out and "us" in out


def test_device_smaller_than_a_request_is_refused_up_front(replay_mod):
    with pytest.raises(SystemExit, match="device"):
        replay_mod.main(["--trace", str(TRACE), "--capacity-tokens", "2048,0,0", "--no-progress"])
