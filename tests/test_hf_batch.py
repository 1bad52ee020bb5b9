"""Batched decoding over kvstore pages: PagedBatchCache and BatchedGenerator (continuous batching).

CPU, tiny seeded Llama in float32: every request's greedy tokens must equal the model's own unbatched
``generate``, while requests of different prompt lengths join at different steps, leave at different
``max_new_tokens``, reuse a committed shared prefix, and one is suspended, demoted to disk, prefetched and
resumed mid-way. The layer must touch the device pool with one gather and one scatter per layer whatever the
batch size. GPU tests (marked ``cuda``) run the "1b" and a 4-layer "8b" shape in bf16 with a batch of 4 and
compare against each request run alone through the same paged path (batch size 1): see
docs/hf_integration.md, "Batched decoding", for why bf16 is not compared against HF ``generate``.
"""

from __future__ import annotations

import asyncio
import functools
import types

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from kvstore import CacheLevel, CacheStatus, KVCacheManager  # noqa: E402
from kvstore.errors import ConfigError, InvalidArgumentError, InvalidStateError  # noqa: E402
from .hf_support import cache_kw, paged_manager  # noqa: E402
from kvstore.integrations.hf import layout_for_model  # noqa: E402
from kvstore.integrations.hf_batch import BatchedGenerator, BatchRequest, PagedBatchCache  # noqa: E402
from kvstore.integrations.models import LLAMA_SHAPES, build_model, llama_config  # noqa: E402
from .conftest import until  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE_PAGES, HOST_PAGES, DISK_PAGES = 64, 16, 512  # host >= the pages of any one request
FILLER_PRIORITY = 10  # fillers outrank requests (priority 0): requests are evicted first


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


def _prompt(length: int, seed: int, vocab: int = LLAMA_SHAPES["tiny"]["vocab_size"]) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=g).tolist()


def _reference(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The model's own unbatched greedy generation (its DynamicCache, no kvstore)."""
    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return out[0, len(prompt):].tolist()


def _manager(model, tmp_path, tokens_per_page: int, *, device_pages: int = DEVICE_PAGES,
             host_pages: int = HOST_PAGES, device: str | None = None):
    return paged_manager(model, tmp_path, tokens_per_page, device_pages=device_pages, host_pages=host_pages,
                         disk_pages=DISK_PAGES, device=device)


_cache_kw = cache_kw


async def _demote_to_disk(mgr: KVCacheManager, req: BatchRequest) -> None:
    """Fill the device's free and evictable room with high-priority caches until ``req``'s pages are on disk."""
    tpp = mgr.layout.tokens_per_page
    fillers = []
    for _ in range(6):
        if req.kv_cache.page_levels().get(CacheLevel.DISK, 0) == req.kv_cache.num_pages:
            break
        usage = mgr.usage(CacheLevel.DEVICE)
        room = usage.free_pages + usage.evictable_pages
        assert room > 0, "every device page is locked: nothing can be demoted"
        filler = mgr.create_cache(priority=FILLER_PRIORITY)
        await filler.resume()
        await filler.resize(room * tpp)
        filler.suspend()
        fillers.append(filler)
    for filler in fillers:
        filler.close()
    assert req.kv_cache.page_levels().get(CacheLevel.DISK, 0) == req.kv_cache.num_pages > 0


class _PoolOps(TorchFunctionMode):
    """Counts indexing reads (``pool[...]``) and writes (``pool[...] = x``) of one tensor."""

    def __init__(self, pool: torch.Tensor) -> None:
        super().__init__()
        self.pool = pool
        self.gets = self.sets = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if args and args[0] is self.pool:
            if func is torch.Tensor.__getitem__:
                self.gets += 1
            elif func is torch.Tensor.__setitem__:
                self.sets += 1
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------- model shapes


def test_llama_shapes_have_the_published_dimensions():
    tiny = llama_config("tiny")
    assert (tiny.num_hidden_layers, tiny.hidden_size, tiny.num_attention_heads, tiny.num_key_value_heads,
            tiny.vocab_size) == (2, 64, 4, 2, 256)
    one = llama_config("1b")
    assert (one.num_hidden_layers, one.hidden_size, one.num_attention_heads, one.num_key_value_heads, one.head_dim,
            one.intermediate_size, one.vocab_size) == (16, 2048, 32, 8, 64, 8192, 128256)
    assert one.rope_parameters["rope_theta"] == 500000.0
    eight = llama_config("8b", num_hidden_layers=4)
    assert (eight.num_hidden_layers, eight.hidden_size, eight.head_dim, eight.intermediate_size) == (
        4, 4096, 128, 14336)
    with pytest.raises(ConfigError, match="shape='70b'"):
        llama_config("70b")


def test_build_model_is_seeded_and_matches_its_config():
    a, b, c = build_model("tiny", seed=1), build_model("tiny", seed=1), build_model("tiny", seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    half = build_model("tiny", dtype=torch.bfloat16, num_hidden_layers=3)
    assert half.dtype == torch.bfloat16 and len(half.model.layers) == 3
    assert layout_for_model(half, 4).num_layers == 3


# --------------------------------------------------------------------------- continuous batching on CPU


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "static-decode"])
@pytest.mark.parametrize("tokens_per_page", [3, 4, 16])
async def test_continuous_batching_matches_unbatched_generate(model, tmp_path, tokens_per_page, cuda_graphs):
    shared = _prompt(17, seed=1)
    prompts = {
        "a": shared + _prompt(4, seed=2),
        "b": _prompt(7, seed=3),
        "c": _prompt(30, seed=4),
        "d": shared + _prompt(6, seed=5),  # joins later, reuses a's committed prefix
        "e": _prompt(12, seed=6),  # joins while c is suspended
    }
    max_new = {"a": 9, "b": 4, "c": 7, "d": 6, "e": 8}
    expected = {k: _reference(model, p, max_new[k]) for k, p in prompts.items()}
    async with _manager(model, tmp_path, tokens_per_page) as mgr:
        gen = BatchedGenerator(model, mgr, cuda_graphs=cuda_graphs)  # True on CPU: the graphs' static step, eager
        reqs = {k: gen.add(prompts[k], max_new[k]) for k in "abc"}
        assert await gen.step() == {r: r.generated[0] for r in reqs.values()}  # batched prefill, 3 lengths
        await gen.step()
        reqs["d"] = gen.add(prompts["d"], max_new["d"])
        assert reqs["d"].num_reused_tokens == (17 // tokens_per_page) * tokens_per_page
        out = await gen.step()  # d prefills while a, b, c decode
        assert set(out) == {reqs[k] for k in "abcd"}
        gen.suspend(reqs["c"])
        assert reqs["c"].kv_cache.status is CacheStatus.SUSPENDED
        await _demote_to_disk(mgr, reqs["c"])
        for _ in range(2):
            out = await gen.step()
            assert reqs["c"] not in out
        reqs["e"] = gen.add(prompts["e"], max_new["e"])
        result = await gen.prefetch(reqs["c"], CacheLevel.HOST)
        assert result.complete and result.pages_moved == reqs["c"].kv_cache.num_pages
        gen.resume(reqs["c"])
        out = await gen.step()  # c's resume is awaited before the forward
        assert reqs["c"] in out and reqs["e"] in out
        assert reqs["b"].done and reqs["b"] not in out  # b left after 4 tokens
        while gen.running:
            running = set(gen.running)
            assert set(await gen.step()) == running
        assert gen.requests == ()
        stats = mgr.stats()
    for k, req in reqs.items():
        assert req.generated == expected[k], k
        assert req.done and req.finish_reason == "length" and req.kv_cache.status is CacheStatus.CLOSED
        assert req.tokens == prompts[k] + expected[k]
    assert reqs["c"].num_suspends == 1
    assert reqs["d"].num_prefilled_tokens == len(prompts["d"]) - reqs["d"].num_reused_tokens
    assert stats["pages_disk_to_host"] >= reqs["c"].kv_cache.num_pages
    assert stats["prefix_hit_tokens"] >= reqs["d"].num_reused_tokens


async def test_batched_logits_match_a_full_unbatched_forward(model, tmp_path):
    prompts = [_prompt(n, seed=40 + n) for n in (5, 19, 11, 2)]
    async with _manager(model, tmp_path, 4) as mgr:
        gen = BatchedGenerator(model, mgr, keep_logits=True)
        reqs = [gen.add(p, 3) for p in prompts]
        await gen.step()
        await gen.step()  # decode: every row attends its own history only
        with torch.no_grad():
            for req in reqs:
                full = model(torch.tensor([req.tokens[:-1]])).logits[0, -1]
                torch.testing.assert_close(req.last_logits, full, rtol=1e-4, atol=1e-5)
        gen.close()


async def test_stop_tokens_and_max_batch_size(model, tmp_path):
    prompts = [_prompt(n, seed=60 + n) for n in (6, 9, 4)]
    refs = [_reference(model, p, 5) for p in prompts]
    async with _manager(model, tmp_path, 4) as mgr:
        gen = BatchedGenerator(model, mgr, max_batch_size=2)
        reqs = [gen.add(p, 5, stop_tokens=[refs[0][1]] if i == 0 else ()) for i, p in enumerate(prompts)]
        assert gen.running == tuple(reqs[:2])
        await gen.run()
    assert reqs[0].finish_reason == "stop" and reqs[0].generated == refs[0][: refs[0].index(refs[0][1]) + 1]
    assert [r.generated for r in reqs[1:]] == refs[1:]


# --------------------------------------------------------------------------- one gather, one scatter per layer


@pytest.mark.parametrize("lengths", [[9], [9, 9, 9, 9], [3, 17, 8, 12, 5]], ids=["one", "four-same", "five-ragged"])
async def test_each_layer_does_one_pool_gather_and_one_pool_scatter_whatever_the_batch(model, tmp_path, lengths):
    num_layers = model.config.num_hidden_layers
    async with _manager(model, tmp_path, 4) as mgr:
        kvs = [mgr.create_cache() for _ in lengths]
        await asyncio.gather(*(kv.resume() for kv in kvs))
        prompts = [_prompt(n, seed=n) for n in lengths]
        for new in (lengths, [1] * len(lengths)):  # a (padded) prefill, then a decode step
            past = [0] * len(lengths) if new is lengths else lengths
            batch = PagedBatchCache(mgr, kvs, past)
            await batch.reserve(new)
            tokens = prompts if new is lengths else [[7]] * len(lengths)
            inputs = batch.model_inputs(tokens, dtype=model.dtype)
            ops = _PoolOps(mgr.device_pool)
            with ops, torch.no_grad():
                model(**inputs, use_cache=True, **{_cache_kw(model): batch})
            assert (ops.gets, ops.sets) == (num_layers, num_layers)
            assert batch.seq_lengths == tuple(p + n for p, n in zip(past, new))
        batch.rollback()  # a finished forward is undone too (the generator discards a step's every forward)
        assert batch.seq_lengths == tuple(lengths)
        for kv in kvs:
            kv.close()


# --------------------------------------------------------------------------- errors and rollback


async def _two_active(mgr, n: int = 8):
    kvs = [mgr.create_cache(), mgr.create_cache()]
    for kv in kvs:
        await kv.resume()
    return kvs


async def test_a_batch_member_that_is_not_active_raises_invalid_state(model, tmp_path):
    async with _manager(model, tmp_path, 4) as mgr:
        kvs = await _two_active(mgr)
        batch = PagedBatchCache(mgr, kvs, [0, 0])
        await batch.reserve([5, 3])
        inputs = batch.model_inputs([_prompt(5, 1), _prompt(3, 2)], dtype=model.dtype)
        kvs[1].suspend()
        with pytest.raises(InvalidStateError, match="batch row 1.*SUSPENDED"), torch.no_grad():
            model(**inputs, use_cache=True, **{_cache_kw(model): batch})
        batch.rollback()
        assert batch.seq_lengths == (0, 0)
        with pytest.raises(InvalidStateError, match="ACTIVE"):
            await batch.reserve([5, 3])
        for kv in kvs:
            kv.close()


async def test_a_forward_beyond_the_reserved_pages_raises_invalid_state(model, tmp_path):
    async with _manager(model, tmp_path, 4) as mgr:
        kvs = await _two_active(mgr)
        batch = PagedBatchCache(mgr, kvs, [0, 0])
        await batch.reserve([9, 2])
        inputs = batch.model_inputs([_prompt(9, 1), _prompt(2, 2)], dtype=model.dtype)
        await kvs[0].resize(4)  # shrunk behind the batch's back: 9 tokens no longer fit
        with pytest.raises(InvalidStateError, match="batch row 0: the KVCache was resized to 4 tokens after reserve"), \
                torch.no_grad():
            model(**inputs, use_cache=True, **{_cache_kw(model): batch})
        batch.rollback()
        with pytest.raises(InvalidStateError, match="reserve"), torch.no_grad():  # no plan: no forward
            model(**inputs, use_cache=True, **{_cache_kw(model): batch})
        for kv in kvs:
            kv.close()


def _resize_calls(monkeypatch) -> list[int]:
    """Record the token count of every KVCache.resize() call (then run it)."""
    from kvstore.cache import KVCache

    calls: list[int] = []
    real = KVCache.resize

    async def resize(self, num_tokens: int) -> None:
        calls.append(num_tokens)
        await real(self, num_tokens)

    monkeypatch.setattr(KVCache, "resize", resize)
    return calls


async def test_a_reserve_within_the_rows_pages_neither_resizes_nor_yields(model, tmp_path, monkeypatch):
    """Most decode steps need no new page: their reserve must not pass through the event loop, where it would queue
    behind every other ready callback (prefetches and demotions) at each await."""
    async with _manager(model, tmp_path, 4) as mgr:
        kvs = await _two_active(mgr)
        for kv in kvs:
            await kv.resize(8)
        calls = _resize_calls(monkeypatch)
        batch = PagedBatchCache(mgr, kvs, [0, 0])
        other = asyncio.ensure_future(asyncio.sleep(0))  # runs at the loop's next pass
        await batch.reserve([8, 5])
        assert calls == [] and not other.done()
        await batch.reserve([9, 5])  # nothing written yet, so past is still 0: row 0 needs a third page
        assert calls == [9] and kvs[0].num_pages == 3
        await batch.reserve([12, 10])  # row 0 grows within its pages (no pass of the loop), row 1 by a page
        assert sorted(calls) == [9, 10, 12] and [kv.num_tokens for kv in kvs] == [12, 10]
        await other
        for kv in kvs:
            kv.close()


async def test_a_reserve_with_a_row_not_active_changes_no_row(model, tmp_path, monkeypatch):
    async with _manager(model, tmp_path, 4) as mgr:
        kvs = await _two_active(mgr)
        kvs[1].suspend()
        calls = _resize_calls(monkeypatch)
        batch = PagedBatchCache(mgr, kvs, [0, 0])
        with pytest.raises(InvalidStateError, match="ACTIVE.*SUSPENDED"):
            await batch.reserve([5, 3])
        assert calls == [] and kvs[0].num_tokens == 0
        for kv in kvs:
            kv.close()


async def test_a_decode_step_within_its_pages_does_not_yield(model, tmp_path):
    """A step on the loop's thread whose rows all fit their pages completes without a pass of the event loop."""
    async with _manager(model, tmp_path, 4) as mgr:
        gen = BatchedGenerator(model, mgr, forward_thread=False)
        reqs = [gen.add(_prompt(5, seed=140 + i), 4) for i in range(2)]
        await gen.step()  # prefill: 5 tokens in 2 pages, room up to 8
        other = asyncio.ensure_future(asyncio.sleep(0))
        await gen.step()  # token 6 fits
        assert not other.done()
        await gen.run()
        await other
    assert [r.generated for r in reqs] == [_reference(model, _prompt(5, seed=140 + i), 4) for i in range(2)]


async def test_paged_batch_cache_argument_errors(model, tmp_path):
    async with _manager(model, tmp_path, 4) as mgr:
        kvs = await _two_active(mgr)
        with pytest.raises(InvalidArgumentError):
            PagedBatchCache(mgr, [], [])
        with pytest.raises(InvalidArgumentError, match="one per cache"):
            PagedBatchCache(mgr, kvs, [0])
        with pytest.raises(InvalidArgumentError, match="twice"):
            PagedBatchCache(mgr, [kvs[0], kvs[0]], [0, 0])
        with pytest.raises(InvalidArgumentError, match="capacity"):
            PagedBatchCache(mgr, kvs, [0, 5])
        batch = PagedBatchCache(mgr, kvs, [0, 0])
        with pytest.raises(InvalidStateError, match="reserve"):
            batch.model_inputs([[1], [2]], dtype=model.dtype)
        with pytest.raises(InvalidArgumentError, match=">= 1 new token"):
            await batch.reserve([1, 0])
        await batch.reserve([2, 3])
        with pytest.raises(InvalidArgumentError, match="planned"):
            batch.model_inputs([[1], [2]], dtype=model.dtype)
        # ragged rows without the 4D mask would attend padding: refused
        with pytest.raises(InvalidStateError, match="attention_mask"), torch.no_grad():
            model(torch.zeros(2, 3, dtype=torch.long), use_cache=True, **{_cache_kw(model): batch})
        for kv in kvs:
            kv.close()


async def test_generator_argument_and_state_errors(model, tmp_path):
    flash = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="flash_attention_2"))
    async with _manager(model, tmp_path, 4) as mgr:
        with pytest.raises(ConfigError, match="sdpa"):
            BatchedGenerator(flash, mgr)
        with pytest.raises(InvalidArgumentError):
            BatchedGenerator(model, mgr, max_batch_size=0)
        gen = BatchedGenerator(model, mgr)
        with pytest.raises(InvalidArgumentError, match="at least one token"):
            gen.add([], 3)
        with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
            gen.add([1, 2], 0)
        with pytest.raises(InvalidArgumentError, match="vocab_size"):
            gen.add([1, 256], 2)
        req = gen.add([1, 2, 3], 1)
        with pytest.raises(InvalidStateError, match="not suspended"):
            gen.resume(req)
        other = BatchedGenerator(model, mgr)
        with pytest.raises(InvalidArgumentError, match="another"):
            other.suspend(req)
        await gen.step()
        assert req.done
        with pytest.raises(InvalidStateError, match="done"):
            gen.suspend(req)
        assert await gen.step() == {}


async def test_a_failed_step_changes_no_request_and_the_next_step_recovers(model, tmp_path, monkeypatch):
    prompts = [_prompt(n, seed=80 + n) for n in (6, 13, 9)]
    refs = [_reference(model, p, 4) for p in prompts]
    async with _manager(model, tmp_path, 4) as mgr:
        gen = BatchedGenerator(model, mgr)
        reqs = [gen.add(p, 4) for p in prompts[:2]]
        await gen.step()
        reqs.append(gen.add(prompts[2], 4))
        calls = {"n": 0}
        real = gen._forward

        def failing_second_forward(group, batch):  # the prefill of reqs[2] runs, then the decode fails
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("boom")
            return real(group, batch)

        monkeypatch.setattr(gen, "_forward", failing_second_forward)
        before = [(list(r.tokens), r.num_cached) for r in reqs]
        with pytest.raises(RuntimeError, match="boom"):
            await gen.step()
        assert [(r.tokens, r.num_cached) for r in reqs] == before
        monkeypatch.setattr(gen, "_forward", real)
        await gen.run()
    assert [r.generated for r in reqs] == refs


async def test_a_cancelled_step_changes_no_request(model, tmp_path):
    prompts = [_prompt(n, seed=90 + n) for n in (10, 7)]
    refs = [_reference(model, p, 5) for p in prompts]
    async with _manager(model, tmp_path, 4) as mgr:
        gen = BatchedGenerator(model, mgr)
        reqs = [gen.add(p, 5) for p in prompts]
        await gen.step()
        gen.suspend(reqs[0])
        await _demote_to_disk(mgr, reqs[0])
        gen.resume(reqs[0])
        before = [(list(r.tokens), r.num_cached) for r in reqs]
        task = asyncio.ensure_future(gen.step())
        await asyncio.sleep(0)  # the step is now awaiting reqs[0]'s resume from disk
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [(r.tokens, r.num_cached) for r in reqs] == before
        await gen.run()
    assert [r.generated for r in reqs] == refs


async def test_the_forward_runs_off_the_event_loop_which_keeps_ticking(model, tmp_path, monkeypatch):
    """While the model computes (held here for 0.2 s), the loop's thread is free: a 5 ms ticker keeps running and
    the forward is on another thread. Cancelling the step then waits for the forward and changes no request."""
    import threading
    import time

    prompts = [_prompt(n, seed=110 + n) for n in (9, 6)]
    refs = [_reference(model, p, 4) for p in prompts]
    threads: list[int] = []
    hold = {"s": 0.0}
    real = type(model).forward

    @functools.wraps(real)  # the same signature: the generator picks the same keyword arguments
    def forward(self, *args, **kwargs):
        threads.append(threading.get_ident())
        time.sleep(hold["s"])  # a slow forward (a GPU one waits for its logits)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", forward)
    async with _manager(model, tmp_path, 4) as mgr:
        gen = BatchedGenerator(model, mgr)
        reqs = [gen.add(p, 4) for p in prompts]
        await gen.step()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        tick = asyncio.ensure_future(ticker())
        hold["s"] = 0.2
        before = [(list(r.tokens), r.num_cached) for r in reqs]
        task = asyncio.ensure_future(gen.step())
        await until(lambda: len(threads) == 2, "the forward started")
        ticks_then = ticks
        await asyncio.sleep(0.05)
        assert ticks >= ticks_then + 3  # the loop ran while the forward slept
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [(r.tokens, r.num_cached) for r in reqs] == before
        tick.cancel()
        hold["s"] = 0.0
        await gen.run()
    assert threading.get_ident() not in threads
    assert [r.generated for r in reqs] == refs


async def test_the_forward_can_run_on_the_loop_thread(model, tmp_path, monkeypatch):
    import threading

    threads: list[int] = []
    real = type(model).forward

    @functools.wraps(real)
    def forward(self, *args, **kwargs):
        threads.append(threading.get_ident())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", forward)
    prompt = _prompt(7, seed=120)
    async with _manager(model, tmp_path, 4) as mgr:
        gen = BatchedGenerator(model, mgr, forward_thread=False)
        req = gen.add(prompt, 3)
        await gen.run()
    assert set(threads) == {threading.get_ident()}
    assert req.generated == _reference(model, prompt, 3)


async def test_a_step_commits_only_when_it_completes_a_page(model, tmp_path, monkeypatch):
    """A commit reads the whole history; steps whose K/V complete no page skip it, and every full page is still
    committed and reusable afterwards."""
    from kvstore.cache import KVCache

    calls: list[int] = []
    real = KVCache.commit
    monkeypatch.setattr(KVCache, "commit", lambda self, tokens: (calls.append(len(tokens)), real(self, tokens))[1])
    prompt = _prompt(5, seed=130)
    async with _manager(model, tmp_path, 4) as mgr:
        gen = BatchedGenerator(model, mgr)
        req = gen.add(prompt, 8)
        await gen.run()
        written = [5 + i for i in range(8)]  # tokens whose K/V each step wrote: the prompt, then one per step
        before = [0] + written[:-1]
        assert calls == [n for n, b in zip(written, before) if n // 4 > b // 4] == [5, 8, 12]
        again = gen.add(req.tokens[:13], 1)  # the history's 3 full pages are reused
        assert again.num_reused_tokens == 12
        gen.close()


def test_paged_forwards_run_without_cudnn_attention_and_restore_it():
    from kvstore.integrations.hf import attention_backends

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with attention_backends():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


# --------------------------------------------------------------------------- GPU (bf16, realistic shapes)


def _assert_same_greedy_tokens(batched, alone, batched_logits, alone_logits, rel_tol: float = 0.05) -> None:
    """bf16: tokens equal, except that the runs may part at a near-tie explained by the logits' rounding difference.

    While the tokens agree, the two runs' logits must agree within ``rel_tol`` of the logit range (a wrong mask,
    page or position gives O(range) differences). Where they first differ, the unbatched run's margin between the
    two tokens must be within the two runs' logit difference at that step; after that the histories differ.
    """
    for step, (b_tok, a_tok) in enumerate(zip(batched, alone, strict=True)):
        a, b = alone_logits[step], batched_logits[step]
        diff = float((a - b).abs().max())
        assert diff <= rel_tol * float(a.max() - a.min()), f"step {step}: logits differ by {diff}"
        if b_tok != a_tok:
            margin = float(a[a_tok] - a[b_tok])
            assert margin <= 2 * diff, f"step {step}: tokens {b_tok} != {a_tok} with margin {margin} > 2 x {diff}"
            return


async def _greedy_with_logits(model, mgr, prompts, max_new, join_at, **gen_kwargs):
    """Run ``prompts`` through one BatchedGenerator (``gen_kwargs``), prompt i joining before step ``join_at[i]``:
    (tokens per prompt, logits per prompt and step, the generator)."""
    gen = BatchedGenerator(model, mgr, keep_logits=True, **gen_kwargs)
    reqs: dict[int, BatchRequest] = {}
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    step = 0
    while gen.running or len(reqs) < len(prompts):
        for i, p in enumerate(prompts):
            if i not in reqs and join_at[i] <= step:
                reqs[i] = gen.add(p, max_new[i])
        index = {req: i for i, req in reqs.items()}
        for req in await gen.step():
            logits[index[req]].append(req.last_logits.float().cpu())
        step += 1
    return [reqs[i].generated for i in range(len(prompts))], logits, gen


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("shape,overrides", [("1b", {}), ("8b", {"num_hidden_layers": 4})], ids=["1b", "8b-4layers"])
async def test_cuda_bf16_batch_of_four_matches_each_request_alone(tmp_path, shape, overrides):
    model = build_model(shape, device="cuda", dtype=torch.bfloat16, seed=0, **overrides)
    vocab = model.config.vocab_size
    shared = _prompt(40, seed=1, vocab=vocab)
    prompts = [shared + _prompt(9, seed=2, vocab=vocab), _prompt(23, seed=3, vocab=vocab),
               _prompt(77, seed=4, vocab=vocab), shared + _prompt(15, seed=5, vocab=vocab)]
    max_new, join_at = [12, 8, 10, 9], [0, 0, 2, 3]
    alone = []
    for i, p in enumerate(prompts):  # each request alone: the same paged path with batch size 1
        async with _manager(model, tmp_path / f"alone{i}", 16, device="cuda") as mgr:
            alone.append(await _greedy_with_logits(model, mgr, [p], [max_new[i]], [0]))
    async with _manager(model, tmp_path / "batched", 16, device="cuda") as mgr:
        assert mgr.device_pool.is_cuda and mgr.device_pool.dtype == torch.bfloat16
        tokens, logits, _ = await _greedy_with_logits(model, mgr, prompts, max_new, join_at)
    for i in range(len(prompts)):
        assert len(tokens[i]) == max_new[i]
        _assert_same_greedy_tokens(tokens[i], alone[i][0][0], logits[i], alone[i][1][0])


@pytest.mark.cuda
@cuda
async def test_cuda_float32_tiny_batch_matches_generate(tmp_path):
    model = build_model("tiny", device="cuda", seed=0)
    prompts = [_prompt(n, seed=n) for n in (5, 21, 13, 30)]
    async with _manager(model, tmp_path, 4, device="cuda") as mgr:
        gen = BatchedGenerator(model, mgr)
        reqs = [gen.add(p, 6 + i) for i, p in enumerate(prompts)]
        await gen.run()
    for req, p in zip(reqs, prompts):
        assert req.generated == _reference(model, p, req.max_new_tokens)
