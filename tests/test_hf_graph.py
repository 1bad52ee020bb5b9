"""Captured decode steps (kvstore.integrations.hf_graph): buckets, padding rows, failures, pool changes; on CPU the
static step runs eagerly and must give the model's own tokens; on a GPU the captured graphs must agree with the
eager path and be reused."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from kvstore import CacheLevel, CacheStatus  # noqa: E402
from kvstore.integrations.hf_batch import BatchedGenerator  # noqa: E402
from kvstore.integrations.hf_graph import batch_bucket, page_bucket  # noqa: E402
from kvstore.integrations.models import build_model  # noqa: E402

from .test_hf_batch import (  # noqa: E402
    _assert_same_greedy_tokens, _greedy_with_logits, _manager, _prompt, _reference,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


def _static_generator(model, mgr):
    """A generator whose decode steps go through DecodeGraphs (on CPU: their static step, eagerly)."""
    gen = BatchedGenerator(model, mgr, cuda_graphs=True)
    assert gen.decode_graphs is not None
    return gen, gen.decode_graphs


def test_page_buckets_pad_by_at_most_an_eighth_and_batch_buckets_are_powers_of_two_then_multiples_of_eight():
    for pages in range(1, 5000):
        b = page_bucket(pages)
        assert b >= pages and b - pages < max(8, pages / 8 + 1), pages
        assert page_bucket(b) == b  # a bucket serves itself
    assert [page_bucket(p) for p in (1, 8, 9, 64, 65, 136, 160, 161)] == [8, 8, 16, 64, 72, 144, 160, 176]
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 17, 24)] == [1, 2, 4, 8, 8, 16, 24, 24]


def test_folded_gqa_decode_attention_equals_sdpa_with_repeated_heads():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from kvstore.integrations.hf_graph import _gqa_decode_attention

    g = torch.Generator().manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    q = torch.randn(3, 8, 1, 16, generator=g)
    k, v = torch.randn(3, 2, 40, 16, generator=g), torch.randn(3, 2, 40, 16, generator=g)
    mask = torch.zeros(3, 1, 1, 40)
    mask[0, ..., 30:] = mask[2, ..., 7:] = torch.finfo(torch.float32).min
    got, _ = _gqa_decode_attention(module, q, k, v, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    assert got.shape == want.shape == (3, 1, 8, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    q2 = torch.randn(3, 8, 2, 16, generator=g)  # two query tokens: SDPA's own path
    mask2 = torch.zeros(3, 1, 2, 40)
    torch.testing.assert_close(_gqa_decode_attention(module, q2, k, v, mask2)[0],
                               sdpa_attention_forward(module, q2, k, v, mask2)[0])


async def test_static_decode_steps_use_the_folded_attention_and_restore_the_model_config(model, tmp_path):
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from kvstore.integrations import hf_graph

    assert model.config._attn_implementation == "sdpa"
    calls = []

    def counting(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return hf_graph._gqa_decode_attention(module, query, *args, **kwargs)

    AttentionInterface.register(hf_graph._GQA_DECODE, counting)
    try:
        prompt = _prompt(9, seed=280)
        async with _manager(model, tmp_path, 4) as mgr:
            gen = BatchedGenerator(model, mgr, cuda_graphs=True)
            req = gen.add(prompt, 4)
            await gen.run()
    finally:
        AttentionInterface.register(hf_graph._GQA_DECODE, hf_graph._gqa_decode_attention)
    assert calls == [1] * (3 * model.config.num_hidden_layers)  # the 3 decode steps, every layer; not the prefill
    assert model.config._attn_implementation == "sdpa"
    assert ALL_ATTENTION_FUNCTIONS[hf_graph._GQA_DECODE] is hf_graph._gqa_decode_attention
    assert req.generated == _reference(model, prompt, 4)


async def test_padding_rows_leave_every_real_row_exact(model, tmp_path):
    """3 and 5 rows run in buckets of 4 and 8 (padding rows repeat row 0); every row's tokens are generate()'s."""
    prompts = [_prompt(n, seed=200 + n) for n in (4, 11, 7, 19, 2)]
    refs = [_reference(model, p, 6) for p in prompts]
    async with _manager(model, tmp_path, 4) as mgr:
        gen, graphs = _static_generator(model, mgr)
        assert not graphs.capture  # CPU: the static step, eagerly
        reqs = [gen.add(p, 6) for p in prompts[:3]]
        await gen.step()
        await gen.step()
        assert {rows for rows, _ in graphs.buckets} == {4}
        reqs += [gen.add(p, 6) for p in prompts[3:]]
        await gen.run()
        assert {rows for rows, _ in graphs.buckets} >= {4, 8}
        mgr.check_invariants()
    assert [r.generated for r in reqs] == refs


async def test_static_decode_logits_match_a_full_forward(model, tmp_path):
    prompts = [_prompt(n, seed=40 + n) for n in (5, 19, 11)]
    async with _manager(model, tmp_path, 4) as mgr:
        gen = BatchedGenerator(model, mgr, keep_logits=True, cuda_graphs=True)
        reqs = [gen.add(p, 3) for p in prompts]
        await gen.step()
        await gen.step()  # a static decode step
        with torch.no_grad():
            for req in reqs:
                full = model(torch.tensor([req.tokens[:-1]])).logits[0, -1]
                torch.testing.assert_close(req.last_logits, full, rtol=1e-4, atol=1e-5)
        gen.close()


async def test_a_failed_or_cancelled_static_step_changes_no_request(model, tmp_path, monkeypatch):
    prompts = [_prompt(n, seed=220 + n) for n in (6, 9)]
    refs = [_reference(model, p, 5) for p in prompts]
    async with _manager(model, tmp_path, 4) as mgr:
        gen, graphs = _static_generator(model, mgr)
        reqs = [gen.add(p, 5) for p in prompts]
        await gen.step()
        before = [(list(r.tokens), r.num_cached) for r in reqs]
        real = graphs.run

        async def failing(*args, **kwargs):
            raise RuntimeError("boom")

        monkeypatch.setattr(graphs, "run", failing)
        with pytest.raises(RuntimeError, match="boom"):
            await gen.step()
        assert [(r.tokens, r.num_cached) for r in reqs] == before
        gate = asyncio.Event()

        async def held(*args, **kwargs):
            await gate.wait()
            return await real(*args, **kwargs)

        monkeypatch.setattr(graphs, "run", held)
        task = asyncio.ensure_future(gen.step())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [(r.tokens, r.num_cached) for r in reqs] == before
        monkeypatch.setattr(graphs, "run", real)
        await gen.run()
    assert [r.generated for r in reqs] == refs


async def test_a_static_step_refuses_a_cache_resized_after_reserve(model, tmp_path, monkeypatch):
    """The page table the step uses is the one reserve() read; a cache resized since is refused, not misread."""
    from kvstore.errors import InvalidStateError
    from kvstore.integrations import hf_batch

    async with _manager(model, tmp_path, 4) as mgr:
        gen = BatchedGenerator(model, mgr, cuda_graphs=True)
        reqs = [gen.add(_prompt(6, seed=240), 4), gen.add(_prompt(9, seed=241), 4)]
        await gen.step()
        before = [(list(r.tokens), r.num_cached) for r in reqs]
        real_reserve = hf_batch.PagedBatchCache.reserve

        async def reserve_then_grow(self, counts):
            await real_reserve(self, counts)
            await reqs[0].kv_cache.resize(reqs[0].kv_cache.num_tokens + 8)

        monkeypatch.setattr(hf_batch.PagedBatchCache, "reserve", reserve_then_grow)
        with pytest.raises(InvalidStateError, match="resized"):
            await gen.step()
        assert [(r.tokens, r.num_cached) for r in reqs] == before
        gen.close()


async def test_graphs_are_dropped_when_the_device_pool_is_reallocated(model, tmp_path):
    prompts = [_prompt(n, seed=260 + n) for n in (5, 8)]
    refs = [_reference(model, p, 6) for p in prompts]
    async with _manager(model, tmp_path, 4) as mgr:
        gen, graphs = _static_generator(model, mgr)
        reqs = [gen.add(p, 6) for p in prompts]
        await gen.step()
        await gen.step()
        assert len(graphs.buckets) == 1
        for r in reqs:
            gen.suspend(r)
        pool = mgr.device_pool
        await mgr.set_quota(CacheLevel.DEVICE, mgr.device_pool.shape[0] * 2 * mgr.layout.page_bytes)
        assert mgr.device_pool.data_ptr() != pool.data_ptr()
        old = graphs._graphs[graphs.buckets[0]]
        for r in reqs:
            gen.resume(r)
        await gen.run()
        assert old not in graphs._graphs.values()  # a graph over the old pool is never used again
        assert all(r.kv_cache.status is CacheStatus.CLOSED for r in reqs)
    assert [r.generated for r in reqs] == refs


# --------------------------------------------------------------------------- on the GPU


async def _decode(model, mgr, prompts, max_new, cuda_graphs):
    """Every prompt from step 0: (the generator, tokens per prompt, logits per prompt and step)."""
    n = len(prompts)
    tokens, logits, gen = await _greedy_with_logits(model, mgr, prompts, [max_new] * n, [0] * n,
                                                    cuda_graphs=cuda_graphs)
    return gen, tokens, logits


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("shape,overrides", [("1b", {}), ("8b", {"num_hidden_layers": 4})], ids=["1b", "8b-4layers"])
async def test_cuda_graph_decode_matches_the_eager_forward_and_reuses_its_graphs(tmp_path, shape, overrides):
    model = build_model(shape, device="cuda", dtype=torch.bfloat16, seed=0, **overrides)
    vocab = model.config.vocab_size
    prompts = [_prompt(n, seed=300 + n, vocab=vocab) for n in (40, 23, 77)]  # 3 rows: a padded bucket of 4
    async with _manager(model, tmp_path / "eager", 16, device="cuda") as mgr:
        _, eager, eager_logits = await _decode(model, mgr, prompts, 12, False)
    async with _manager(model, tmp_path / "graphs", 16, device="cuda") as mgr:
        gen, tokens, logits = await _decode(model, mgr, prompts, 12, True)
        graphs = gen.decode_graphs
        assert graphs is not None and graphs.capture
        assert graphs.captures == len(graphs.buckets) >= 1  # captured once per bucket, replayed after
        assert graphs.captures < 11  # 11 decode steps
        mgr.check_invariants()
    for i in range(len(prompts)):
        _assert_same_greedy_tokens(tokens[i], eager[i], logits[i], eager_logits[i])


@pytest.mark.cuda
@cuda
async def test_cuda_graph_decode_of_a_float32_model_gives_generate_tokens(tmp_path):
    model = build_model("tiny", device="cuda", seed=0)
    prompts = [_prompt(n, seed=n) for n in (5, 21, 13)]
    async with _manager(model, tmp_path, 4, device="cuda") as mgr:
        gen, tokens, _ = await _decode(model, mgr, prompts, 9, None)  # None: on by default on a GPU
        assert gen.decode_graphs is not None and gen.decode_graphs.captures >= 1
    for p, t in zip(prompts, tokens):
        assert t == _reference(model, p, 9)
