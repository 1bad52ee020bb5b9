"""Hugging Face transformers generation with its KV cache in kvstore pages (issue 6).

A tiny seeded Llama (random weights, float32) generates greedily through kvstore; its tokens must
equal the model's own uninterrupted ``generate`` even when the cache is suspended, demoted to disk,
prefetched and resumed between every step, and when a committed prompt prefix is reused.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from kvstore import (  # noqa: E402
    CacheLevel,
    CacheStatus,
    KVCacheManager,
)
from kvstore.errors import InvalidArgumentError, InvalidStateError  # noqa: E402
from .hf_support import cache_kw, paged_manager  # noqa: E402
from kvstore.integrations.hf import PagedGeneration, PagedKVCache, layout_for_model  # noqa: E402

_EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "hf_generate.py"
_spec = importlib.util.spec_from_file_location("hf_generate_example", _EXAMPLE)
example = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = example  # dataclasses resolve annotations through sys.modules
_spec.loader.exec_module(example)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MAX_NEW = 6
DEVICE_PAGES = HOST_PAGES = 12  # >= the pages of any request below (fillers rely on device >= host)
FILLER_PRIORITY = 10  # fillers outrank requests (priority 0): requests are evicted first


@pytest.fixture(scope="module")
def model():
    return example.build_model(seed=0)


def _prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, example.VOCAB_SIZE, (length,), generator=g).tolist()


def _manager(model, tmp_path, tokens_per_page: int, *, device_pages: int = DEVICE_PAGES,
             host_pages: int = HOST_PAGES, device: str | None = None):
    return paged_manager(model, tmp_path, tokens_per_page, device_pages=device_pages, host_pages=host_pages,
                         disk_pages=256, device=device)


_cache_kw = cache_kw


async def _demote_all_to_disk(mgr: KVCacheManager, tokens_per_page: int) -> None:
    """Fill the device twice with high-priority caches: suspended pages go device -> host -> disk."""
    fillers = []
    for _ in range(2):
        filler = mgr.create_cache(priority=FILLER_PRIORITY)
        await filler.resume()
        await filler.resize(DEVICE_PAGES * tokens_per_page)
        filler.suspend()
        fillers.append(filler)
    for filler in fillers:
        filler.close()


def test_layout_for_model_matches_the_model_kv_shape(model):
    layout = layout_for_model(model, 8)
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim) == (2, 2, 16)
    assert layout.tokens_per_page == 8 and layout.dtype == torch.float32


@pytest.mark.parametrize("tokens_per_page", [3, 4, 16])
@pytest.mark.parametrize("prompt_len", [5, 16, 23])
async def test_generation_demoted_to_disk_and_prefetched_between_every_step_matches_generate(
    model, tmp_path, tokens_per_page, prompt_len
):
    prompt = _prompt(prompt_len, seed=prompt_len)
    expected = example.reference_tokens(model, prompt, MAX_NEW)
    async with _manager(model, tmp_path, tokens_per_page) as mgr:
        gen = PagedGeneration(model, mgr, prompt)
        await gen.step()
        moved = 0
        for _ in range(MAX_NEW - 1):
            gen.suspend()
            await _demote_all_to_disk(mgr, tokens_per_page)
            assert gen.page_levels().get(CacheLevel.DISK, 0) == gen.kv_cache.num_pages
            result = await gen.prefetch(CacheLevel.HOST)
            assert result.complete and result.pages_moved == gen.kv_cache.num_pages
            assert gen.page_levels().get(CacheLevel.HOST, 0) == gen.kv_cache.num_pages
            moved += result.pages_moved
            await gen.step()
        assert gen.generated == expected
        assert gen.num_suspends == MAX_NEW - 1
        assert mgr.stats()["pages_disk_to_host"] >= moved
        gen.close()


@pytest.mark.parametrize("close_first", [True, False], ids=["first-closed", "first-suspended"])
async def test_reused_prefix_skips_its_prefill_and_matches_a_full_prefill(model, tmp_path, close_first):
    tpp = 4
    shared = _prompt(27, seed=7)  # 6 whole pages of shared tokens, then a partial page
    prompt_a, prompt_b = shared + _prompt(5, seed=8), shared + _prompt(5, seed=9)
    async with _manager(model, tmp_path, tpp) as mgr:
        a = PagedGeneration(model, mgr, prompt_a)
        for _ in range(MAX_NEW):
            await a.step()
        a.suspend()
        if close_first:
            a.close()
        b = PagedGeneration(model, mgr, prompt_b)
        assert b.num_reused_tokens == 24
        await b.step()
        first_logits = b.last_logits.clone()
        for _ in range(MAX_NEW - 1):
            await b.step()
        assert b.num_prefilled_tokens == len(prompt_b) - 24
        assert mgr.stats()["prefix_hit_tokens"] >= 24
        b.close()
        a.close()
    with torch.no_grad():
        full = model(torch.tensor([prompt_b])).logits[0, -1]
    torch.testing.assert_close(first_logits, full, rtol=1e-4, atol=1e-5)
    assert b.generated == example.reference_tokens(model, prompt_b, MAX_NEW)


async def test_round_robin_serving_demotes_prefetches_resumes_and_matches_generate(model, tmp_path):
    prompts = [_prompt(n, seed=100 + n) for n in (21, 13, 30, 9, 26)]
    max_new = 8
    async with _manager(model, tmp_path, 4, device_pages=10, host_pages=6) as mgr:
        reports = await example.serve(model, mgr, prompts, max_new_tokens=max_new, prefetch_ahead=2)
        stats = mgr.stats()
    for rep, prompt in zip(reports, prompts, strict=True):
        assert rep.tokens == example.reference_tokens(model, prompt, max_new)
        assert rep.suspends == max_new - 1
    assert sum(rep.found_on["disk"] for rep in reports) > 0
    assert stats["prefetches"] > 0
    assert stats["bytes_disk_to_host"] + stats["bytes_disk_to_device"] > 0


async def test_model_generate_runs_on_a_paged_cache_with_reserved_pages(model, tmp_path):
    prompt = _prompt(19, seed=3)
    async with _manager(model, tmp_path, 4) as mgr:
        kv = mgr.create_cache()
        await kv.resume()
        paged = PagedKVCache(mgr, kv)
        await paged.reserve(len(prompt) + MAX_NEW)
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                                 **{_cache_kw(model): paged})
        assert paged.get_seq_length() == len(prompt) + MAX_NEW - 1
        kv.close()
    assert out[0, len(prompt):].tolist() == example.reference_tokens(model, prompt, MAX_NEW)


async def test_forward_beyond_reserved_pages_raises_invalid_state(model, tmp_path):
    async with _manager(model, tmp_path, 4) as mgr:
        kv = mgr.create_cache()
        await kv.resume()
        paged = PagedKVCache(mgr, kv)
        await paged.reserve(4)
        with pytest.raises(InvalidStateError), torch.no_grad():
            model(torch.tensor([_prompt(5, seed=1)]), use_cache=True, **{_cache_kw(model): paged})
        kv.close()


async def test_forward_on_a_suspended_cache_raises_invalid_state(model, tmp_path):
    async with _manager(model, tmp_path, 4) as mgr:
        kv = mgr.create_cache()
        await kv.resume()
        paged = PagedKVCache(mgr, kv)
        await paged.reserve(8)
        kv.suspend()
        assert kv.status is CacheStatus.SUSPENDED
        with pytest.raises(InvalidStateError), torch.no_grad():
            model(torch.tensor([_prompt(5, seed=1)]), use_cache=True, **{_cache_kw(model): paged})
        kv.close()


async def test_a_batch_of_two_sequences_is_rejected(model, tmp_path):
    async with _manager(model, tmp_path, 4) as mgr:
        kv = mgr.create_cache()
        await kv.resume()
        paged = PagedKVCache(mgr, kv)
        await paged.reserve(8)
        with pytest.raises(InvalidArgumentError), torch.no_grad():
            model(torch.zeros(2, 3, dtype=torch.long), use_cache=True, **{_cache_kw(model): paged})
        kv.close()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("tokens_per_page", [4, 16])
async def test_generation_on_a_cuda_device_tier_survives_disk_round_trips_and_matches_generate(
    tmp_path, tokens_per_page
):
    model = example.build_model(seed=0, device="cuda")
    prompt = _prompt(23, seed=23)
    expected = example.reference_tokens(model, prompt, MAX_NEW)
    async with _manager(model, tmp_path, tokens_per_page, device="cuda") as mgr:
        assert mgr.device_pool.is_cuda
        gen = PagedGeneration(model, mgr, prompt)
        await gen.step()
        for _ in range(MAX_NEW - 1):
            gen.suspend()
            await _demote_all_to_disk(mgr, tokens_per_page)
            assert gen.page_levels().get(CacheLevel.DISK, 0) == gen.kv_cache.num_pages
            assert (await gen.prefetch(CacheLevel.HOST)).complete
            await gen.step()
        assert gen.generated == expected
        gen.close()


@pytest.mark.cuda
@cuda
async def test_round_robin_serving_on_cuda_matches_generate(tmp_path):
    model = example.build_model(seed=0, device="cuda")
    prompts = [_prompt(n, seed=200 + n) for n in (21, 13, 30, 9)]
    async with _manager(model, tmp_path, 4, device_pages=10, host_pages=12, device="cuda") as mgr:
        reports = await example.serve(model, mgr, prompts, max_new_tokens=8)
    for rep, prompt in zip(reports, prompts, strict=True):
        assert rep.tokens == example.reference_tokens(model, prompt, 8)
