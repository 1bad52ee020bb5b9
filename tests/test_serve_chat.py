"""examples/serve_chat.py: the multi-turn chat serving loop over BatchedGenerator and kvstore tiers.

Every reply must equal the model's own greedy ``generate`` of that turn's whole prompt, whether the session's
history came back from host memory or disk, stayed on the device, or was recomputed (drop-and-recompute
engine, or the fetch-or-recompute policy choosing recompute).
"""

from __future__ import annotations

import asyncio
import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from kvstore.integrations.models import build_model  # noqa: E402
from kvstore.policy import PrefillModel  # noqa: E402

_EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "serve_chat.py"
_spec = importlib.util.spec_from_file_location("serve_chat_example", _EXAMPLE)
chat = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = chat  # dataclasses resolve annotations through sys.modules
_spec.loader.exec_module(chat)

SMALL = dict(sessions=6, hbm_sessions=2, turns=3, system_tokens=16, user_tokens=16, reply_tokens=6,
             think_s=0.01, tokens_per_page=4, max_batch=4)


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", device="cpu", dtype=torch.float32, seed=0)


def generate(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def check_replies(model, report, cfg) -> None:
    assert len(report.turns) == cfg.sessions * cfg.turns == len(report.ttft_s)
    assert report.generated_tokens == cfg.sessions * cfg.turns * cfg.reply_tokens
    for prompt, reply in report.turns:
        assert reply == generate(model, prompt, cfg.reply_tokens)


def run(model, **kw):
    cfg = chat.ChatConfig(**{**SMALL, **kw})
    return cfg, asyncio.run(chat.run_chat(model, cfg, torch.device("cpu")))


def test_offloaded_sessions_come_back_from_host_and_disk_and_reply_exactly(model, monkeypatch):
    """With a prefill predicted dear (1 s + 1 ms per token), every turn loads its history: none is recomputed."""
    async def dear_prefill(gen, vocab, cfg, rng):
        return PrefillModel(fixed_s=1.0, per_token_s=1e-3), PrefillModel(fixed_s=0.0, per_token_s=1e-9)

    monkeypatch.setattr(chat, "calibrate", dear_prefill)
    cfg, report = run(model)
    check_replies(model, report, cfg)
    assert report.pages_moved.get("device_to_host", 0) > 0
    assert report.pages_moved.get("host_to_device", 0) + report.pages_moved.get("disk_to_device", 0) > 0
    # every turn's history is counted once, wherever it was (device, host, disk, or its partial page recomputed)
    assert sum(report.history_tokens_from.values()) == sum(len(p) - cfg.user_tokens for p, _ in report.turns)
    assert report.recomputed_turns == 0 and report.loaded_turns == cfg.sessions * cfg.turns
    assert all(t > 0 for t in report.ttft_s) and report.max_lag_ms >= report.p99_lag_ms


def test_the_drop_and_recompute_engine_moves_no_page_and_recomputes_more(model):
    cfg, dropped = run(model, offload=False)
    check_replies(model, dropped, cfg)
    assert dropped.pages_moved == {}
    _, offloaded = run(model)
    assert dropped.history_tokens_from["recomputed"] > offloaded.history_tokens_from["recomputed"]
    assert dropped.history_tokens_from["host"] == dropped.history_tokens_from["disk"] == 0


def test_turns_the_policy_recomputes_still_reply_exactly(model, monkeypatch):
    """A prefill predicted nearly free makes every move slower than recomputing: turns whose history is off
    the device are recomputed (no prefetch), and their replies are still exact."""
    async def free_prefill(gen, vocab, cfg, rng):
        return PrefillModel(fixed_s=1e-9, per_token_s=1e-12), PrefillModel(fixed_s=1.0, per_token_s=1e-3)

    monkeypatch.setattr(chat, "calibrate", free_prefill)
    cfg, report = run(model, prefetch=False)
    check_replies(model, report, cfg)
    assert report.recomputed_turns > 0


def test_the_example_runs_from_the_command_line(capsys):
    assert chat.main(["--sessions", "4", "--hbm-sessions", "2", "--turns", "2", "--system-tokens", "8",
                      "--user-tokens", "8", "--reply-tokens", "4", "--tokens-per-page", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "kvstore offloading: 4 sessions, HBM holds 2" in out and "TTFT p50" in out


def test_no_turn_overtakes_into_room_an_earlier_turns_prefetch_needs(model, tmp_path):
    """Admission is in arrival order: a turn waiting for its prefetch lets a later turn run only if the room that
    prefetch needs stays free; otherwise the later turn waits (long histories do not starve behind short ones)."""
    cfg = chat.ChatConfig(**SMALL)

    async def scenario(first_need: int) -> list[int]:
        async with chat.KVCacheManager(chat.store_config(model, cfg, str(tmp_path / f"d{first_need}"),
                                                         torch.device("cpu"))) as mgr:
            server = chat.ChatServer(model, mgr, cfg)
            first, second = chat.Session(0, [1] * 5, 1), chat.Session(1, [2] * 5, 1)
            for s, tokens in ((first, 4 * first_need - cfg.reply_tokens), (second, 4 * 3 - cfg.reply_tokens)):
                s.prompt = [7] * tokens  # need(): prompt + reply tokens, in pages of 4
            first.holder = mgr.create_cache(None)  # its prefetch is in flight
            server.prefetching = server.need(first)
            server.device_pages, server.reserved = 10, 2
            server.waiting = [first, second]
            server.ready = lambda s: None if s is first else True  # the first waits for its pages
            server.admit()
            admitted = [s.sid for s in (first, second) if s.request is not None]
            server.gen.close()
            first.holder.close()
            return admitted

    assert asyncio.run(scenario(3)) == [1]  # 2 + 3 + 3 <= 10: the later turn runs meanwhile
    assert asyncio.run(scenario(6)) == []  # 2 + 6 + 3 > 10: waits behind the first turn


def test_the_lag_meter_takes_the_loop_threads_stack_in_a_long_stall():
    import threading
    import time

    def _blocking_call_for_the_test() -> None:
        time.sleep(0.08)  # blocks the loop: what a stall watcher must point at

    release = threading.Event()

    def _other_thread_for_the_test() -> None:
        release.wait(5)  # a thread beside the loop: the stall report names it and where it is

    other = threading.Thread(target=_other_thread_for_the_test, name="beside-the-loop")
    other.start()

    async def scenario():
        meter = chat.LagMeter(stall_ms=20)
        meter.start()
        await asyncio.sleep(0.03)
        _blocking_call_for_the_test()
        await asyncio.sleep(0.03)
        return meter, await meter.stop()

    try:
        meter, (max_ms, _) = asyncio.run(scenario())
    finally:
        release.set()
        other.join()
    assert max_ms >= 60
    assert len(meter.stalls) == 1 and "_blocking_call_for_the_test" in meter.stalls[0]
    assert meter.stalls[0].index("_blocking_call_for_the_test") < meter.stalls[0].index("thread beside-the-loop")
    assert "_other_thread_for_the_test" in meter.stalls[0]
    assert "kvstore-lag-watch" not in meter.stalls[0]  # the watcher leaves itself out
    quiet = chat.LagMeter()  # without stall_ms nothing watches
    assert asyncio.run(_stop_soon(quiet)) and quiet.stalls == []


async def _stop_soon(meter) -> bool:
    meter.start()
    await asyncio.sleep(0.01)
    await meter.stop()
    return True
