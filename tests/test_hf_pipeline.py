"""Pipelined decode (BatchedGenerator.step_many): two steps in flight, the second fed the first's tokens on the
device; the model's own tokens whatever ends a run (length, a stop token, no room, a cancellation). On CPU the
static step runs eagerly on the forward thread, which stands in for the GPU's stream; on a GPU the graphs."""

from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from kvstore import CacheStatus, InvalidArgumentError, InvalidStateError  # noqa: E402
from kvstore.integrations.hf_batch import BatchedGenerator  # noqa: E402
from kvstore.integrations.hf_graph import _Graph  # noqa: E402
from kvstore.integrations.models import build_model  # noqa: E402

from .test_hf_batch import _manager, _prompt, _reference  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


class InFlight:
    """Counts the steps launched and not yet waited for, the most at once, and the chained launches."""

    def __init__(self, graphs, monkeypatch) -> None:
        self.now = self.most = self.chained = 0
        launch, wait = graphs.launch, graphs.wait

        counted = set()

        def counted_launch(tokens, lengths, pages, after=None):
            got = launch(tokens, lengths, pages, after)
            if got is not None:
                counted.add(id(got))
                self.now += 1
                self.most = max(self.most, self.now)
                self.chained += after is not None
            return got

        async def counted_wait(one):  # (a bucket's first step on a GPU is launched by run() itself)
            try:
                return await wait(one)
            finally:
                if id(one) in counted:
                    counted.discard(id(one))
                    self.now -= 1

        monkeypatch.setattr(graphs, "launch", counted_launch)
        monkeypatch.setattr(graphs, "wait", counted_wait)


async def test_step_many_gives_generate_tokens_with_two_steps_in_flight(model, tmp_path, monkeypatch):
    prompts = [_prompt(n, seed=500 + n) for n in (5, 14, 9)]
    max_new = [13, 6, 10]  # rows leave at different steps; 4 tokens per page: runs cross pages
    refs = [_reference(model, p, m) for p, m in zip(prompts, max_new)]
    async with _manager(model, tmp_path, 4) as mgr:
        gen = BatchedGenerator(model, mgr, cuda_graphs=True)
        flight = InFlight(gen.decode_graphs, monkeypatch)
        reqs = [gen.add(p, m) for p, m in zip(prompts, max_new)]
        await gen.run()  # step_many underneath
        assert flight.most == 2 and flight.chained >= 5 and flight.now == 0  # a run per batch shape: 3 + 2 + 1
        assert all(r.finish_reason == "length" for r in reqs)
        mgr.check_invariants()
    assert [r.generated for r in reqs] == refs


async def test_step_many_returns_what_single_steps_return(model, tmp_path):
    prompts = [_prompt(n, seed=520 + n) for n in (7, 12)]
    runs = []
    for many in (False, True):
        async with _manager(model, tmp_path / str(many), 4) as mgr:
            gen = BatchedGenerator(model, mgr, cuda_graphs=True)
            reqs = [gen.add(p, 9) for p in prompts]
            seen = []
            if many:
                got = await gen.step_many(6, on_step=lambda new: seen.append(dict(new)))
                assert got == seen
            else:
                got = [await gen.step() for _ in range(6)]
            runs.append(([[new[r] for r in reqs] for new in got], [list(r.generated) for r in reqs],
                         [r._kv.num_tokens for r in reqs]))
            assert [len(r.generated) for r in reqs] == [6, 6]
            gen.close()
    assert runs[0] == runs[1]  # tokens per step, and the caches' capacity given back to what single steps leave


async def test_a_stop_token_mid_run_ends_that_request_after_the_queued_step_ended(model, tmp_path, monkeypatch):
    prompts = [_prompt(n, seed=540 + n) for n in (6, 10, 8)]
    refs = [_reference(model, p, 12) for p in prompts]
    at = next(i for i in range(3, 12) if refs[1][i] not in refs[1][:i])
    async with _manager(model, tmp_path, 4) as mgr:
        gen = BatchedGenerator(model, mgr, cuda_graphs=True)
        flight = InFlight(gen.decode_graphs, monkeypatch)
        finish = gen._finish
        in_flight_at_finish = []

        def finishing(req, reason):
            in_flight_at_finish.append(flight.now)
            finish(req, reason)

        monkeypatch.setattr(gen, "_finish", finishing)
        reqs = [gen.add(p, 12, stop_tokens=[refs[1][at]] if i == 1 else ()) for i, p in enumerate(prompts)]
        await gen.run()
        assert reqs[1].finish_reason == "stop" and reqs[1].generated == refs[1][: at + 1]
        assert in_flight_at_finish == [0, 0, 0]  # no step still used a page of a request that left
        mgr.check_invariants()
    assert [reqs[0].generated, reqs[2].generated] == [refs[0], refs[2]]


async def test_a_cancelled_step_many_keeps_its_accepted_steps_and_ends_its_queued_ones(model, tmp_path, monkeypatch):
    prompts = [_prompt(n, seed=560 + n) for n in (9, 4)]
    refs = [_reference(model, p, 14) for p in prompts]
    async with _manager(model, tmp_path, 4) as mgr:
        gen = BatchedGenerator(model, mgr, cuda_graphs=True)
        flight = InFlight(gen.decode_graphs, monkeypatch)
        reqs = [gen.add(p, 14) for p in prompts]
        await gen.step()  # the prefill
        capacity = [r._kv.num_tokens for r in reqs]
        gate, held = threading.Event(), threading.Event()
        eager, calls = _Graph.eager, []

        def slow(graph, slot, after):  # the forward thread: the 4th step of the run waits at the gate
            calls.append(slot)
            if len(calls) == 4:
                held.set()
                gate.wait(10)
            return eager(graph, slot, after)

        monkeypatch.setattr(_Graph, "eager", slow)
        accepted = []
        task = asyncio.ensure_future(gen.step_many(10, on_step=accepted.append))
        while not held.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # the cancellation waits for the step on the forward thread
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(accepted) == 3 and flight.now == 0
        assert [r.generated for r in reqs] == [ref[:4] for ref in refs]
        assert [r._kv.num_tokens for r in reqs] == [max(c, r.num_cached) for c, r in zip(capacity, reqs)]
        assert not gen._stepping
        mgr.check_invariants()
        monkeypatch.setattr(_Graph, "eager", eager)
        await gen.run()
    assert [r.generated for r in reqs] == refs


async def test_the_batch_is_fixed_while_step_many_runs(model, tmp_path):
    async with _manager(model, tmp_path, 4) as mgr:
        gen = BatchedGenerator(model, mgr, cuda_graphs=True)
        req = gen.add(_prompt(6, seed=580), 8)
        errors = []

        def meddle(new):
            for call in (lambda: gen.add(_prompt(3, seed=581), 2), lambda: gen.suspend(req), gen.close):
                with pytest.raises(InvalidStateError, match="while a step"):
                    call()
                errors.append(call)

        await gen.step_many(3, on_step=meddle)
        assert len(errors) == 9 and len(req.generated) == 3 and req._kv.status is CacheStatus.ACTIVE
        for bad in (0, -1, 2.0, True):
            with pytest.raises(InvalidArgumentError, match="steps >= 1"):
                await gen.step_many(bad)
        gen.close()


async def test_no_room_for_a_whole_run_falls_back_to_single_steps_until_room_comes_back(model, tmp_path,
                                                                                        monkeypatch):
    """7 device pages of 4 tokens, two 8-token prompts, 9 new tokens each: the two whole runs (4 pages a row)
    never fit at once; single steps do until row B stops, then row A's run fits."""
    prompts = [_prompt(8, seed=600), _prompt(8, seed=601)]
    refs = [_reference(model, p, 9) for p in prompts]
    at = next(i for i in range(2, 6) if refs[1][i] not in refs[1][:i])
    async with _manager(model, tmp_path, 4, device_pages=7) as mgr:
        gen = BatchedGenerator(model, mgr, cuda_graphs=True)
        flight = InFlight(gen.decode_graphs, monkeypatch)
        a, b = gen.add(prompts[0], 9), gen.add(prompts[1], 9, stop_tokens=[refs[1][at]])
        await gen.step_many(20)
        assert flight.most == 2  # A's run, after B left
        assert b.finish_reason == "stop" and b.generated == refs[1][: at + 1]
        mgr.check_invariants()
    assert a.generated == refs[0]


@pytest.mark.cuda
@cuda
async def test_pipelined_cuda_graph_decode_gives_the_single_steps_tokens(tmp_path, monkeypatch):
    model = build_model("1b", device="cuda", dtype=torch.bfloat16, seed=0)
    vocab = model.config.vocab_size
    prompts = [_prompt(n, seed=620 + n, vocab=vocab) for n in (40, 23, 77)]
    out = []
    for many in (False, True):
        async with _manager(model, tmp_path / str(many), 16, device="cuda") as mgr:
            gen = BatchedGenerator(model, mgr)
            flight = InFlight(gen.decode_graphs, monkeypatch)
            reqs = [gen.add(p, 24) for p in prompts]
            if many:
                await gen.run()
                assert flight.most == 2 and flight.chained >= 20
            else:
                while gen.running:
                    await gen.step()
                assert flight.most == 1
            assert gen.decode_graphs is not None and gen.decode_graphs.capture
            out.append([r.generated for r in reqs])
            mgr.check_invariants()
    assert out[0] == out[1]


async def test_a_long_run_reserves_one_stretch_at_a_time(model, tmp_path, monkeypatch):
    from kvstore.integrations import hf_batch

    monkeypatch.setattr(hf_batch, "PIPELINE_STEPS", 5)
    prompt = _prompt(7, seed=640)
    ref = _reference(model, prompt, 17)
    async with _manager(model, tmp_path, 4) as mgr:
        gen = BatchedGenerator(model, mgr, cuda_graphs=True)
        req = gen.add(prompt, 17)
        ahead = []
        await gen.step_many(17, on_step=lambda _: ahead.append(req._kv.num_tokens - req.num_cached))
        assert max(ahead) <= 5 and ahead.count(0) >= 3  # each stretch ends with nothing reserved beyond its tokens
        mgr.check_invariants()
    assert req.generated == ref


@pytest.mark.parametrize("seed", range(6))
async def test_seeded_stress_of_stop_tokens_and_cancellations_keeps_generate_tokens(model, tmp_path, seed):
    """Random prompts, lengths and stop tokens; step_many runs cancelled at random moments, then resumed: every
    request ends with generate()'s tokens up to its stop, and the manager's invariants hold throughout."""
    import random

    rnd = random.Random(seed)
    prompts = [_prompt(rnd.randint(2, 15), seed=700 + 10 * seed + i) for i in range(rnd.randint(2, 4))]
    max_new = [rnd.randint(3, 14) for _ in prompts]
    refs = [_reference(model, p, m) for p, m in zip(prompts, max_new)]
    stops = [[ref[rnd.randrange(len(ref))]] if rnd.random() < 0.5 else [] for ref in refs]
    async with _manager(model, tmp_path, 4) as mgr:
        gen = BatchedGenerator(model, mgr, cuda_graphs=True)
        reqs = [gen.add(p, m, stop_tokens=s) for p, m, s in zip(prompts, max_new, stops)]
        while gen.running:
            task = asyncio.ensure_future(gen.step_many(rnd.randint(1, 8)))
            await asyncio.sleep(rnd.random() * 0.004)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            assert not gen._stepping
            mgr.check_invariants()
            for r in gen.running:  # nothing reserved beyond what one ordinary step may have grown
                assert r._kv.num_tokens <= len(r.tokens)
    for req, ref, stop in zip(reqs, refs, stops):
        end = next((i + 1 for i, t in enumerate(ref) if t in stop), len(ref))
        assert req.generated == ref[:end]
        assert req.finish_reason == ("stop" if end < len(ref) or (stop and ref[end - 1] in stop) else "length")
