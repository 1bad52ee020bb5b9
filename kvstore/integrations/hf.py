"""Hugging Face ``transformers`` integration: a causal LM keeps its KV cache in kvstore pages.

Primitives:

- :func:`layout_for_model` -- the :class:`~kvstore.PageLayout` that holds a model's K/V.
- :class:`PagedKVCache` -- a ``transformers`` ``Cache`` over one :class:`~kvstore.KVCache`. In a
  forward pass every attention layer scatters its new K/V into the cache's device pages
  (``mgr.device_pool``) and gathers its whole past back from them: one indexing op each way,
  no per-token Python loop. The forward is synchronous, so pages are reserved beforehand with
  ``await paged.reserve(n)`` (which may resize the KVCache).
- :class:`PagedGeneration` -- one request's greedy generation: each :meth:`~PagedGeneration.step`
  resumes the cache, reserves pages, runs the forward and commits; between steps the request can
  be suspended, its pages demoted and prefetched by the manager. A committed prompt prefix is
  reused on creation and its prefill skipped.

Scope: batch size 1 per cache (:mod:`kvstore.integrations.hf_batch` runs several caches in one forward),
decoder-only models whose layers all use full attention (Llama, Mistral without sliding window, Qwen2, ...).
Needs the optional extra ``kvstore-llm[hf]``.
Tested with transformers 4.57.1 and 5.24.0 (``Cache`` built from per-layer ``CacheLayerMixin`` objects).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import TYPE_CHECKING, Any, Sequence, cast

import torch

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kvstore.integrations.hf needs Hugging Face transformers: pip install 'kvstore-llm[hf]' "
        "(or pip install -e '.[hf]' in a checkout; not 'kvstore', an unrelated PyPI project)"
    ) from exc

from kvstore import CacheLevel, CacheStatus, PageLayout
from kvstore.errors import ConfigError, InvalidArgumentError, InvalidStateError

if TYPE_CHECKING:
    from kvstore import KVCache, KVCacheManager, PrefetchTask

__all__ = ["layout_for_model", "PagedKVCache", "PagedGeneration", "attention_backends"]

_SUPPORTED_LAYER_TYPES = {"full_attention"}


def _text_config(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    get_text = getattr(config, "get_text_config", None)
    return get_text(decoder=True) if callable(get_text) else config


def layout_for_model(
    model_or_config: Any, tokens_per_page: int, dtype: torch.dtype | None = None
) -> PageLayout:
    """The page layout that holds the K/V of ``model_or_config`` (a model or its config).

    ``dtype`` defaults to the model's parameter dtype (a model), else the config's dtype, else
    float32. Raises :class:`~kvstore.ConfigError` for models with non full-attention layers.
    """
    config = _text_config(model_or_config)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and not set(layer_types) <= _SUPPORTED_LAYER_TYPES:
        raise ConfigError(
            f"config.layer_types={sorted(set(layer_types))}: only full-attention layers can live in kvstore pages"
        )
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        raise ConfigError("config.sliding_window is set: sliding-window attention is not supported")
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    if dtype is None:
        model_dtype = getattr(model_or_config, "dtype", None)
        if isinstance(model_dtype, torch.dtype):
            dtype = model_dtype
        else:
            cfg_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
            dtype = cfg_dtype if isinstance(cfg_dtype, torch.dtype) else torch.float32
    return PageLayout(
        num_layers=config.num_hidden_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        tokens_per_page=tokens_per_page,
        dtype=dtype,
    )


class _Binding:
    """Where each token slot of an ACTIVE cache lives in the device pool, as two index vectors."""

    __slots__ = ("tok_page", "tok_off", "capacity")

    def __init__(self, page_indices: torch.Tensor, tokens_per_page: int, device: torch.device) -> None:
        pages = page_indices.to(device=device, dtype=torch.long)
        self.capacity = pages.numel() * tokens_per_page
        # token t lives in slot tok_page[t] at row tok_off[t]
        self.tok_page = pages.repeat_interleave(tokens_per_page)
        self.tok_off = torch.arange(tokens_per_page, device=device).repeat(pages.numel())


class _PoolLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]  # transformers' __init_subclass__
    """Shared base of the layers whose storage is the kvstore device pool (no lazy allocation, no offload)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, layer_idx: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._layer_idx = layer_idx
        self.is_initialized = True  # storage is the kvstore pages; nothing to allocate lazily

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate: the storage is the kvstore device pool."""

    def get_max_length(self) -> int:
        """No fixed maximum: the KVCache grows with ``reserve``."""
        return -1

    def get_max_cache_shape(self) -> int:
        """transformers 4.5x name of :meth:`get_max_length`."""
        return -1

    def offload(self) -> None:
        """Tier placement belongs to kvstore (suspend / prefetch), not to transformers."""

    def prefetch(self) -> None:
        """Tier placement belongs to kvstore (suspend / prefetch), not to transformers."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError(f"{type(self).__name__}: beam search is not supported over kvstore pages")


class _PagedLayer(_PoolLayer):  # type: ignore[no-untyped-call]  # transformers' __init_subclass__
    """One model layer's view of the shared pages; tracks how many tokens this layer has written."""

    def __init__(self, owner: PagedKVCache, layer_idx: int, num_tokens: int) -> None:
        super().__init__(layer_idx)
        self._owner = owner
        self.num_tokens = num_tokens

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new K/V after the past ones and return the whole K/V history of this layer."""
        end = self._owner._write(self._layer_idx, self.num_tokens, key_states, value_states)
        self.num_tokens = end
        return self._owner._read(self._layer_idx, end, key_states)

    def get_mask_sizes(self, query_length: Any) -> tuple[int, int]:
        """(kv_length, kv_offset) of the attention mask for ``query_length`` new tokens."""
        if isinstance(query_length, torch.Tensor):  # older transformers pass cache_position
            query_length = query_length.shape[0]
        return self.num_tokens + int(query_length), 0

    def get_seq_length(self) -> int:
        """Tokens whose K/V this layer holds."""
        return self.num_tokens

    def reset(self) -> None:
        """Forget every token (pages stay allocated and are overwritten)."""
        self.num_tokens = 0


class _PoolGeometry:
    """Shape facts of ``manager.device_pool`` that a paged Cache checks the model's K/V against."""

    __slots__ = ("num_layers", "tokens_per_page", "kv_shape")

    def __init__(self, manager: KVCacheManager) -> None:
        pool = manager.device_pool
        if pool.dim() != 6:
            raise InvalidStateError(f"manager.device_pool has shape {tuple(pool.shape)}, expected 6 dims")
        self.num_layers = int(pool.shape[1])
        self.tokens_per_page = int(pool.shape[3])
        self.kv_shape = (int(pool.shape[4]), int(pool.shape[5]))

    def check_heads(self, heads: int, head_dim: int) -> None:
        """Raise :class:`ConfigError` when the model's K/V heads do not match the page layout."""
        if (heads, head_dim) != self.kv_shape:
            raise ConfigError(
                f"model K/V have {heads} heads x {head_dim} dims but the PageLayout has "
                f"num_kv_heads x head_dim = {self.kv_shape[0]} x {self.kv_shape[1]}"
            )


def _scatter_gather(
    pool: torch.Tensor, layer: int, new_kv: torch.Tensor, scatter: tuple[torch.Tensor, torch.Tensor],
    gather: tuple[torch.Tensor, torch.Tensor], like: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer of a batched paged forward: write ``new_kv`` (N, 2, heads, head_dim; on the pool's device and
    dtype) to ``pool[scatter[0][i], layer, :, scatter[1][i]]``, then gather the (B, L) positions ``gather`` of
    ``layer`` as K and V of shape (B, heads, L, head_dim), on ``like``'s device and dtype."""
    pool[scatter[0], layer, :, scatter[1]] = new_kv
    past = pool[gather[0], layer, :, gather[1]]  # (B, L, 2, heads, head_dim)
    past = past.permute(2, 0, 3, 1, 4).to(device=like.device, dtype=like.dtype)
    return past[0], past[1]


def _check_active(kv: KVCache) -> None:
    """Raise unless ``kv`` is ACTIVE (a reserve() needs its pages on the device)."""
    if kv.status is not CacheStatus.ACTIVE:
        raise InvalidStateError(f"reserve() needs an ACTIVE cache, it is {kv.status.name}; resume() it")


async def _ensure_capacity(kv: KVCache, num_tokens: int) -> None:
    """Grow the ACTIVE ``kv`` to hold ``num_tokens`` tokens (never shrinks it)."""
    _check_active(kv)
    if num_tokens > kv.num_tokens:
        await kv.resize(num_tokens)


def _commit_full_pages(kv: KVCache, tokens: Sequence[int], before: int, tokens_per_page: int) -> None:
    """``kv.commit(tokens)`` when the K/V written since ``before`` tokens completed a page: a commit reads the
    whole history (O(tokens) on the loop's thread), and one that completes no page changes nothing."""
    if len(tokens) // tokens_per_page > before // tokens_per_page:
        kv.commit(tokens)


class PagedKVCache(Cache):
    """A ``transformers`` Cache whose K/V live in the device pages of one kvstore :class:`KVCache`.

    ``num_tokens`` is how many leading tokens already have K/V in the pages (a reused prefix).
    Before each forward call ``await reserve(n_new)`` while the KVCache is ACTIVE; the forward then
    writes token ``t`` of layer ``l`` at ``device_pool[page_indices[t // P], l, :, t % P]``.
    Page indices are re-read at the start of every forward (layer 0), and the pool on every
    access, so resume / resize / ``set_quota`` between forwards are safe.
    """

    def __init__(self, manager: KVCacheManager, kv_cache: KVCache, num_tokens: int = 0) -> None:
        self._geometry = _PoolGeometry(manager)
        self._manager = manager
        self._kv = kv_cache
        self._tokens_per_page = self._geometry.tokens_per_page
        if num_tokens < 0 or num_tokens > kv_cache.num_tokens:
            raise InvalidArgumentError(
                f"num_tokens={num_tokens} must be within the KVCache's capacity of {kv_cache.num_tokens} tokens"
            )
        self._binding: _Binding | None = None
        layers: list[Any] = [_PagedLayer(self, i, num_tokens) for i in range(self._geometry.num_layers)]
        super().__init__(layers=layers)

    @property
    def kv_cache(self) -> KVCache:
        """The kvstore cache holding the pages."""
        return self._kv

    async def reserve(self, num_new_tokens: int) -> None:
        """Make room for ``num_new_tokens`` more tokens (the KVCache must be ACTIVE)."""
        if num_new_tokens < 0:
            raise InvalidArgumentError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        await _ensure_capacity(self._kv, self.get_seq_length() + num_new_tokens)
        self._binding = None

    def rollback(self, num_tokens: int) -> None:
        """Forget every token from ``num_tokens`` on in every layer (e.g. after a failed forward)."""
        for layer in cast("list[_PagedLayer]", self.layers):
            layer.num_tokens = min(layer.num_tokens, num_tokens)

    def _bind(self, pool: torch.Tensor) -> _Binding:
        if self._kv.status is not CacheStatus.ACTIVE:
            raise InvalidStateError(
                f"the KVCache is {self._kv.status.name}: resume() it and reserve() pages before the forward pass"
            )
        self._binding = _Binding(self._kv.page_indices(), self._tokens_per_page, pool.device)
        return self._binding

    def _write(self, layer_idx: int, start: int, key_states: torch.Tensor, value_states: torch.Tensor) -> int:
        """Scatter ``key_states``/``value_states`` (1, heads, n, head_dim) to tokens start..start+n."""
        batch, heads, n, head_dim = key_states.shape
        if batch != 1:
            raise InvalidArgumentError(f"PagedKVCache holds one sequence; got a batch of {batch}")
        self._geometry.check_heads(heads, head_dim)
        pool = self._manager.device_pool
        binding = self._binding
        if binding is None or layer_idx == 0:
            binding = self._bind(pool)
        end = start + n
        if end > binding.capacity:
            raise InvalidStateError(
                f"{end} tokens do not fit in {binding.capacity} reserved; await reserve({n}) before the forward"
            )
        kv = torch.stack((key_states[0], value_states[0]))  # (2, heads, n, head_dim)
        kv = kv.permute(2, 0, 1, 3).to(device=pool.device, dtype=pool.dtype)  # (n, 2, heads, head_dim)
        pool[binding.tok_page[start:end], layer_idx, :, binding.tok_off[start:end]] = kv
        return end

    def _read(self, layer_idx: int, length: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather tokens 0..length of one layer as (1, heads, length, head_dim) K and V like ``like``."""
        pool = self._manager.device_pool
        binding = self._binding if self._binding is not None else self._bind(pool)
        kv = pool[binding.tok_page[:length], layer_idx, :, binding.tok_off[:length]]  # (length, 2, heads, hd)
        kv = kv.permute(1, 2, 0, 3).to(device=like.device, dtype=like.dtype).contiguous()
        return kv[0].unsqueeze(0), kv[1].unsqueeze(0)


def attention_backends() -> contextlib.AbstractContextManager[Any]:
    """Context for a paged forward pass: PyTorch's SDPA without its cuDNN backend.

    cuDNN's attention builds a new execution graph for every new sequence length, and a paged forward sees a
    new length at every step: on the H200 that cost ~4.4 ms of CPU per layer call (70 % of a 1B model's decode
    step, measured with torch.profiler; docs/serving_benchmarks.md). Flash and memory-efficient attention have
    no such set-up; the math kernel stays as the fallback. No effect on CPU."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _forward_kwargs(model: Any) -> tuple[str, str | None]:
    """Names of the cache and logits-to-keep arguments of ``model.forward`` (they changed across versions)."""
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return cache_kw, keep_kw


class _CacheOwner:
    """A request that owns one kvstore :class:`KVCache` (``_kv``)."""

    _kv: KVCache

    @property
    def kv_cache(self) -> KVCache:
        """The kvstore cache of this request (CLOSED once the request is done)."""
        return self._kv

    @property
    def num_reused_tokens(self) -> int:
        """Prompt tokens whose K/V came from committed pages of earlier requests."""
        return self._kv.num_reused_tokens


class PagedGeneration(_CacheOwner):
    """Greedy generation of one request whose KV cache lives in kvstore pages.

    Creating it reuses the longest committed prefix of ``prompt`` (never the last prompt token,
    whose logits are needed). Each :meth:`step` resumes the cache if suspended, prefills the
    prompt (first step) or feeds the last generated token, commits, and returns the next token.
    """

    def __init__(
        self,
        model: Any,
        manager: KVCacheManager,
        prompt: Sequence[int],
        *,
        priority: int = 0,
        reuse_prefix: bool = True,
    ) -> None:
        if len(prompt) == 0:
            raise InvalidArgumentError("prompt must hold at least one token")
        self.model = model
        self.tokens: list[int] = [int(t) for t in prompt]
        self.num_prompt_tokens = len(self.tokens)
        self.generated: list[int] = []
        self.last_logits: torch.Tensor | None = None
        self.num_prefilled_tokens = 0
        self.num_suspends = 0
        self._kv = manager.create_cache(self.tokens[:-1] if reuse_prefix else None, priority=priority)
        self.cache = PagedKVCache(manager, self._kv, num_tokens=self._kv.num_reused_tokens)
        self._cache_kw, self._keep_kw = _forward_kwargs(model)

    @property
    def status(self) -> CacheStatus:
        return self._kv.status

    async def step(self) -> int:
        """Run one forward pass and return the greedily chosen next token."""
        if self._kv.status is CacheStatus.SUSPENDED:
            await self._kv.resume()
        past = self.cache.get_seq_length()
        new = self.tokens[past:]
        await self.cache.reserve(len(new))
        device = self.model.device
        kwargs: dict[str, Any] = {self._cache_kw: self.cache, "use_cache": True}
        if self._keep_kw is not None:
            kwargs[self._keep_kw] = 1
        input_ids = torch.tensor([new], dtype=torch.long, device=device)
        position_ids = torch.arange(past, past + len(new), device=device).unsqueeze(0)
        try:
            with torch.no_grad(), attention_backends():
                out = self.model(input_ids=input_ids, position_ids=position_ids, **kwargs)
        except BaseException:
            self.cache.rollback(past)
            raise
        _commit_full_pages(self._kv, self.tokens, past, self.cache._tokens_per_page)  # K/V of every token is written
        if past < self.num_prompt_tokens:
            self.num_prefilled_tokens += min(len(new), self.num_prompt_tokens - past)
        self.last_logits = out.logits[0, -1]
        token = int(torch.argmax(self.last_logits))
        self.tokens.append(token)
        self.generated.append(token)
        return token

    def suspend(self) -> None:
        """Suspend the cache: its pages become evictable (and may be demoted) until the next step."""
        self._kv.suspend()
        self.num_suspends += 1

    def prefetch(self, target: CacheLevel = CacheLevel.HOST) -> PrefetchTask:
        """Start moving the suspended cache's pages up to ``target``; await the task for the result."""
        return self._kv.prefetch(target)

    def page_levels(self) -> dict[CacheLevel, int]:
        """Pages of this request per level."""
        return self._kv.page_levels()

    def close(self) -> None:
        """Close the cache; committed pages stay reusable by later requests."""
        self._kv.close()
