"""Batched decoding over kvstore pages: several requests' KV caches in one ``transformers`` forward pass.

Owns:

- :class:`PagedBatchCache` -- a ``transformers`` ``Cache`` over several ACTIVE :class:`~kvstore.KVCache` objects,
  one per batch row. At layer 0 of a forward it builds, once, a page table ``(B, max_pages)`` from every cache's
  ``page_indices()`` and from it the device index tensors of the whole batch; every layer then does ONE scatter of
  the new tokens' K/V into ``mgr.device_pool`` and ONE gather of the batch's K/V history, padded to the longest
  sequence. :meth:`PagedBatchCache.model_inputs` gives the matching ``input_ids``, per-row ``position_ids`` (RoPE)
  and a 4D additive attention mask that hides the padding, so each row computes what it would alone.
- :class:`BatchedGenerator` and its handles, :class:`BatchRequest` -- continuous batching of greedy generation:
  requests join (reusing a committed prompt prefix) and leave between steps, can be suspended (pages evictable,
  demoted by the manager) and resumed; each :meth:`BatchedGenerator.step` prefills the new requests in one padded
  forward and decodes every other running request in one forward, then commits every cache.

Scope as :mod:`kvstore.integrations.hf` (decoder-only, full-attention layers), with the ``sdpa`` or ``eager``
attention implementation (the ones that take a 4D mask).
"""

from __future__ import annotations

import asyncio
import collections
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Collection, Sequence, cast

import torch
from transformers.cache_utils import Cache

from kvstore import CacheLevel, CacheStatus
from kvstore._aio import settle_thread
from kvstore.errors import CapacityError, ConfigError, InvalidArgumentError, InvalidStateError
from kvstore.integrations.hf import (
    _CacheOwner, _check_active, _commit_full_pages, _forward_kwargs, _PoolGeometry, _PoolLayer, _scatter_gather,
    attention_backends,
)
from kvstore.integrations.hf_graph import DecodeGraphs, _Launch

if TYPE_CHECKING:
    from kvstore import KVCache, KVCacheManager, PrefetchTask

__all__ = ["PagedBatchCache", "BatchRequest", "BatchedGenerator"]

_MASKED_ATTENTION = ("sdpa", "eager")  # attention implementations that take a 4D additive mask
#: decode steps of one pipelined run of step_many(): the room reserved up front is this many tokens per row
PIPELINE_STEPS = 64


async def _settle(awaitables: Sequence[Awaitable[Any]]) -> None:
    """Await all concurrently; once every one has finished, raise the first error (if any).

    None or one is awaited in place: no task and no extra pass of the event loop, so a decode step whose rows need
    nothing (most steps) does not queue behind other callbacks at each of its awaits.
    """
    if len(awaitables) <= 1:
        for only in awaitables:
            await only
        return
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _to_device(host: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """Copy a small CPU tensor to ``device``; to a GPU from pinned memory without blocking the host."""
    target = torch.device(device) if device is not None else host.device
    if target.type == "cuda":
        return host.pin_memory().to(device=target, non_blocking=True)
    return host.to(device=target)


class _Plan:
    """Token counts of one forward pass: row ``b`` has ``past[b]`` cached tokens and ``new[b]`` new ones."""

    __slots__ = ("past", "new", "total", "width", "length")

    def __init__(self, past: Sequence[int], new: Sequence[int]) -> None:
        self.past = tuple(past)
        self.new = tuple(new)
        self.total = tuple(p + n for p, n in zip(past, new))
        self.width = max(new)  # input columns; a row's new tokens are right-aligned (left padding)
        self.length = max(self.total)  # gathered K/V length

    @property
    def dense(self) -> bool:
        """Every row has ``width`` new tokens: no padded input column."""
        return min(self.new) == self.width


class _BatchIndex:
    """Device index tensors of one forward pass, built once (layer 0) and used by every layer.

    Gather: K/V position ``k`` of row ``b`` is ``pool[gather_page[b, k], layer, :, gather_off[b, k]]``; positions past
    the row's length point at its token 0 (written, finite) and are masked. Scatter: new token ``i`` of the flattened
    batch goes to ``pool[scatter_page[i], layer, :, scatter_off[i]]``; it is input row ``src_row[i]``, column
    ``src_col[i]`` (both ``None`` when the plan is dense: rows in order, every column).
    """

    __slots__ = ("gather_page", "gather_off", "scatter_page", "scatter_off", "src_row", "src_col")

    def __init__(self, plan: _Plan, pages: Sequence[torch.Tensor], tokens_per_page: int, device: torch.device) -> None:
        table = torch.nn.utils.rnn.pad_sequence(list(pages), batch_first=True, padding_value=0)  # (B, max_pages)
        past = torch.tensor(plan.past, dtype=torch.long)
        new = torch.tensor(plan.new, dtype=torch.long)
        total = past + new
        k = torch.arange(plan.length).unsqueeze(0)
        tok = torch.where(k < total.unsqueeze(1), k, 0)  # (B, length)
        col = torch.arange(plan.width).unsqueeze(0)
        first = plan.width - new.unsqueeze(1)  # first real column of each row
        dst = past.unsqueeze(1) + col - first  # (B, width): token position of each input column (< 0: padding)
        dst_page = table.gather(1, dst.clamp(min=0) // tokens_per_page)
        src: list[torch.Tensor] = []
        if plan.dense:
            dst_page, dst_tok = dst_page.reshape(-1), dst.reshape(-1)
        else:
            src = list((col >= first).nonzero(as_tuple=True))  # (row, column) of every real new token
            dst_page, dst_tok = dst_page[src[0], src[1]], dst[src[0], src[1]]
        host = [table.gather(1, tok // tokens_per_page), tok % tokens_per_page, dst_page, dst_tok % tokens_per_page]
        host += src
        flat = _to_device(torch.cat([t.reshape(-1) for t in host]), device)  # one host-to-device copy
        parts = torch.split(flat, [t.numel() for t in host])
        moved = [part.view(t.shape) for part, t in zip(parts, host)]
        self.gather_page, self.gather_off, self.scatter_page, self.scatter_off = moved[:4]
        self.src_row: torch.Tensor | None = moved[4] if src else None
        self.src_col: torch.Tensor | None = moved[5] if src else None


class _BatchLayer(_PoolLayer):  # type: ignore[no-untyped-call]  # transformers' __init_subclass__
    """One model layer of a :class:`PagedBatchCache`: how many tokens of each row this layer has written."""

    def __init__(self, owner: PagedBatchCache, layer_idx: int, lengths: tuple[int, ...]) -> None:
        super().__init__(layer_idx)
        self._owner = owner
        self.lengths = lengths

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scatter the batch's new K/V into the pages and return the padded K/V history of every row."""
        return self._owner._update(self, key_states, value_states)

    def get_mask_sizes(self, query_length: Any) -> tuple[int, int]:
        """Only used when no 4D mask is passed, which is correct only when every row has the same length."""
        if isinstance(query_length, torch.Tensor):  # older transformers pass cache_position
            query_length = query_length.shape[0]
        plan = self._owner._plan
        if len(set(self.lengths)) > 1 or (plan is not None and len(set(plan.new)) > 1):
            raise InvalidStateError(
                "the batch rows have different lengths: pass attention_mask (and position_ids) from "
                "PagedBatchCache.model_inputs() so padded positions are masked"
            )
        return self.lengths[0] + int(query_length), 0

    def get_seq_length(self) -> int:
        """Tokens of the longest row whose K/V this layer holds."""
        return max(self.lengths)

    def reset(self) -> None:
        """Forget every token (pages stay allocated and are overwritten)."""
        self.lengths = (0,) * len(self.lengths)


class PagedBatchCache(Cache):
    """A ``transformers`` Cache whose batch row ``b`` lives in the device pages of ``kv_caches[b]``.

    ``past_lengths[b]`` leading tokens of row ``b`` already have K/V in its pages. One forward pass::

        batch = PagedBatchCache(mgr, kv_caches, past_lengths)
        await batch.reserve(num_new_tokens)                 # per row; caches ACTIVE; resizes them concurrently
        inputs = batch.model_inputs(new_tokens, dtype=model.dtype, device=model.device)
        out = model(**inputs, cache=batch, use_cache=True)  # past_key_values= on transformers 4.x

    Inputs are left-padded to the longest row's new tokens, so ``out.logits[:, -1]`` is every row's next-token
    logits. After the forward ``seq_lengths`` are the rows' new lengths; :meth:`rollback` undoes a failed one.
    Every forward needs its own ``reserve`` (the page indices are re-read at layer 0 of each forward).
    """

    def __init__(self, manager: KVCacheManager, kv_caches: Sequence[KVCache], past_lengths: Sequence[int]) -> None:
        if len(kv_caches) == 0:
            raise InvalidArgumentError("PagedBatchCache needs at least one KVCache")
        if len(past_lengths) != len(kv_caches):
            raise InvalidArgumentError(
                f"got {len(past_lengths)} past_lengths for {len(kv_caches)} kv_caches; give one per cache"
            )
        if len({id(kv) for kv in kv_caches}) != len(kv_caches):
            raise InvalidArgumentError("a KVCache appears twice in the batch; each row needs its own cache")
        for b, (kv, past) in enumerate(zip(kv_caches, past_lengths)):
            if past < 0 or past > kv.num_tokens:
                raise InvalidArgumentError(
                    f"past_lengths[{b}]={past} must be within that KVCache's capacity of {kv.num_tokens} tokens"
                )
        self._geometry = _PoolGeometry(manager)
        self._manager = manager
        self._kvs = tuple(kv_caches)
        self._undo = tuple(int(p) for p in past_lengths)  # lengths that rollback() restores
        self._plan: _Plan | None = None
        self._pages: tuple[torch.Tensor, ...] = ()  # each row's page indices, read by reserve()
        self._index: _BatchIndex | None = None
        layers: list[Any] = [_BatchLayer(self, i, self._undo) for i in range(self._geometry.num_layers)]
        super().__init__(layers=layers)

    @property
    def kv_caches(self) -> tuple[KVCache, ...]:
        """The kvstore cache of each batch row."""
        return self._kvs

    @property
    def batch_size(self) -> int:
        return len(self._kvs)

    @property
    def seq_lengths(self) -> tuple[int, ...]:
        """Tokens of each row whose K/V are in the pages of every layer."""
        per_layer = [cast("_BatchLayer", layer).lengths for layer in self.layers]
        return tuple(min(col) for col in zip(*per_layer))

    async def reserve(self, num_new_tokens: Sequence[int]) -> None:
        """Plan the next forward (``num_new_tokens[b]`` >= 1 new tokens of row ``b``) and make room for it.

        Every cache must be ACTIVE (else InvalidStateError, before anything changes). Those that need more pages
        are resized concurrently; if any resize fails, the error is raised after all have settled and no forward is
        planned (caches that grew keep their pages; nothing else changes).
        """
        if len(num_new_tokens) != self.batch_size:
            raise InvalidArgumentError(
                f"got {len(num_new_tokens)} counts for a batch of {self.batch_size}; give one per row"
            )
        if any(n < 1 for n in num_new_tokens):
            raise InvalidArgumentError(f"every row needs >= 1 new token, got {list(num_new_tokens)}")
        past = self.seq_lengths
        self._plan = self._index = None
        self._undo = past
        for kv in self._kvs:
            _check_active(kv)
        wanted = [(kv, p + n) for kv, p, n in zip(self._kvs, past, num_new_tokens) if p + n > kv.num_tokens]
        tpp = self._geometry.tokens_per_page
        growing = [(kv, n) for kv, n in wanted if -(-n // tpp) > kv.num_pages]
        await _settle([kv.resize(n) for kv, n in growing])  # these wait for room: concurrently
        for kv, n in wanted:
            if (kv, n) not in growing:
                await kv.resize(n)  # within its pages: completes without a pass of the event loop
        # the page table is read here, on the event loop's thread (the forward may run on another one)
        self._pages = tuple(kv.page_indices() for kv in self._kvs)
        self._plan = _Plan(past, [int(n) for n in num_new_tokens])

    def model_inputs(
        self,
        new_tokens: Sequence[Sequence[int]],
        *,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        pad_token_id: int = 0,
    ) -> dict[str, torch.Tensor]:
        """``input_ids``, ``position_ids`` and ``attention_mask`` of the planned forward, as model keyword args.

        ``input_ids`` ``(B, W)``: row ``b``'s new tokens right-aligned, ``pad_token_id`` before them.
        ``position_ids`` ``(B, W)``: each token's position in its own sequence (padding: 0).
        ``attention_mask`` ``(B, 1, W, L)`` additive in ``dtype`` (the model's compute dtype): 0 where a query may
        attend (key position <= its own, inside its row), ``finfo(dtype).min`` elsewhere. ``L`` is the longest row.
        """
        plan = self._require_plan("model_inputs()")
        if [len(t) for t in new_tokens] != list(plan.new):
            raise InvalidArgumentError(
                f"new_tokens have lengths {[len(t) for t in new_tokens]} but reserve() planned {list(plan.new)}"
            )
        rows = [[pad_token_id] * (plan.width - len(t)) + [int(x) for x in t] for t in new_tokens]
        input_ids = _to_device(torch.tensor(rows, dtype=torch.long), device)
        counts = _to_device(torch.tensor([plan.past, plan.new], dtype=torch.long), device)
        past, new = counts[0].unsqueeze(1), counts[1].unsqueeze(1)
        col = torch.arange(plan.width, device=device).unsqueeze(0)
        positions = (past + col - (plan.width - new)).clamp(min=0)  # (B, W); padding -> 0 (attends key 0 only)
        key = torch.arange(plan.length, device=device).view(1, 1, -1)
        allowed = key <= positions.unsqueeze(2)  # (B, W, L); a real token's position is < its row's length
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return {"input_ids": input_ids, "position_ids": positions, "attention_mask": mask.unsqueeze(1)}

    def rollback(self) -> None:
        """Forget every token written since the last :meth:`reserve` (e.g. after a failed or discarded forward)."""
        for layer in cast("list[_BatchLayer]", self.layers):
            layer.lengths = self._undo
        self._plan = self._index = None

    def _require_plan(self, what: str) -> _Plan:
        if self._plan is None:
            raise InvalidStateError(
                f"{what} needs a planned forward: await reserve(num_new_tokens) before each forward"
            )
        return self._plan

    def _bind(self, plan: _Plan, device: torch.device) -> _BatchIndex:
        """Layer 0: check the page table read by :meth:`reserve` still holds and build the batch's device index
        tensors from it (no call into the manager: the forward may run off the event loop's thread)."""
        self._check_pages(plan)
        self._index = _BatchIndex(plan, self._pages, self._geometry.tokens_per_page, device)
        return self._index

    def _check_pages(self, plan: _Plan) -> None:
        """Raise :class:`InvalidStateError` unless every row is ACTIVE with the pages :meth:`reserve` read."""
        for b, (kv, idx) in enumerate(zip(self._kvs, self._pages)):
            if kv.status is not CacheStatus.ACTIVE:
                raise InvalidStateError(
                    f"batch row {b}: the KVCache is {kv.status.name}; resume() it and reserve() before the forward"
                )
            if idx.numel() != kv.num_pages:
                raise InvalidStateError(
                    f"batch row {b}: the KVCache was resized to {kv.num_tokens} tokens after reserve() read its "
                    "pages; await reserve() again before the forward"
                )
            if idx.numel() * self._geometry.tokens_per_page < plan.total[b]:
                raise InvalidStateError(
                    f"batch row {b}: {plan.total[b]} tokens do not fit in its "
                    f"{idx.numel() * self._geometry.tokens_per_page} reserved; await reserve() before the forward"
                )

    def _decode_inputs(self) -> tuple[tuple[int, ...], tuple[torch.Tensor, ...]]:
        """For a forward that runs outside this cache (a captured decode step): each row's length after its one
        new token and its page table, after the checks a forward's layer 0 makes."""
        plan = self._require_plan("a decode step")
        if plan.width != 1 or not plan.dense:
            raise InvalidStateError(f"a decode step feeds one new token per row; reserve() planned {list(plan.new)}")
        self._check_pages(plan)
        return plan.total, self._pages

    def _page_tables(self) -> tuple[torch.Tensor, ...]:
        """Each row's page table as :meth:`reserve` read it, after the checks a forward's layer 0 makes (for
        forwards that run outside this cache: a pipelined run of captured decode steps)."""
        self._check_pages(self._require_plan("a pipelined run"))
        return self._pages

    def _written(self) -> None:
        """The planned forward wrote every layer's K/V outside this cache (a captured decode step)."""
        plan = self._require_plan("a decode step")
        for layer in cast("list[_BatchLayer]", self.layers):
            layer.lengths = plan.total
        self._plan = self._index = None

    def _update(
        self, layer: _BatchLayer, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self._require_plan("a forward pass")
        batch, heads, width, head_dim = key_states.shape
        if (batch, width) != (self.batch_size, plan.width):
            raise InvalidArgumentError(
                f"the forward has batch x new tokens = {batch} x {width} but reserve() planned "
                f"{self.batch_size} x {plan.width}; feed model_inputs()"
            )
        self._geometry.check_heads(heads, head_dim)
        if layer.lengths != plan.past:
            raise InvalidStateError(f"layer {layer._layer_idx} already ran this forward; reserve() again first")
        pool = self._manager.device_pool
        index = self._index
        if index is None or layer._layer_idx == 0:
            index = self._bind(plan, pool.device)
        # (B, 2, heads, W, head_dim) on the pool's device, where the index tensors are
        new_kv = torch.stack((key_states, value_states), dim=1).to(device=pool.device, dtype=pool.dtype)
        if index.src_row is None or index.src_col is None:
            new_kv = new_kv.permute(0, 3, 1, 2, 4).reshape(batch * width, 2, heads, head_dim)
        else:
            new_kv = new_kv[index.src_row, :, :, index.src_col]  # (N, 2, heads, head_dim)
        li = layer._layer_idx
        past = _scatter_gather(pool, li, new_kv, (index.scatter_page, index.scatter_off),
                               (index.gather_page, index.gather_off), key_states)
        layer.lengths = plan.total
        if li == self._geometry.num_layers - 1:
            self._plan = self._index = None  # consumed: the next forward needs its own reserve()
        return past


class BatchRequest(_CacheOwner):
    """Handle of one request of a :class:`BatchedGenerator` (read its fields; act through the generator)."""

    def __init__(
        self, rid: int, kv_cache: KVCache, prompt: Sequence[int], max_new_tokens: int, stop_tokens: Collection[int]
    ) -> None:
        self.rid = rid
        self.tokens: list[int] = [int(t) for t in prompt]
        self.num_prompt_tokens = len(self.tokens)
        self.generated: list[int] = []
        self.max_new_tokens = max_new_tokens
        self.stop_tokens = frozenset(int(t) for t in stop_tokens)
        self.num_cached = kv_cache.num_reused_tokens  # leading tokens whose K/V are in the pages
        self.num_prefilled_tokens = 0
        self.num_suspends = 0
        self.suspended = False
        self.finish_reason: str | None = None  # "length", "stop" or "closed" once done
        self.last_logits: torch.Tensor | None = None  # kept when the generator has keep_logits=True
        self._kv = kv_cache

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        state = self.finish_reason or ("suspended" if self.suspended else "running")
        return (
            f"BatchRequest(rid={self.rid}, prompt={self.num_prompt_tokens}, "
            f"generated={len(self.generated)}, {state})"
        )


class BatchedGenerator:
    """Continuous batching of greedy generation; every request's KV cache lives in kvstore pages.

    ``add()`` a request at any time between steps; each ``await step()`` gives every running request one new
    token: requests without a token yet are prefilled (the prompt minus the reused prefix) in one left-padded
    forward, all others decode in one forward. Then every cache commits its history. A request that reached
    ``max_new_tokens`` (or a stop token) leaves and its cache is closed (committed pages stay reusable).
    ``suspend(req)`` takes a request out between steps (its pages may be demoted); ``resume(req)`` puts it back,
    and the next step awaits its ``KVCache.resume()`` before the forward. A step that raises, or is cancelled,
    changes no request: token counts stay as before the step.
    ``await step_many(n)`` makes ``n`` steps with the batch held fixed, and pipelines their decode steps on the
    GPU (two in flight); ``run()`` steps that way until no request runs.

    The forwards run on a thread of the generator's own (``forward_thread=True``, the default), so the event loop
    keeps serving prefetches, demotions and other requests while the model computes and the step awaits its
    logits; a cancelled step waits for its forward to end, then rolls back. The page tables are read on the loop's
    thread, in ``reserve()``; the manager is never called from the forward thread.

    Decode steps (every row one new token) run as captured CUDA graphs when the model and the device pool share a
    GPU (``cuda_graphs=None``, the default; :mod:`kvstore.integrations.hf_graph`): no Python per layer, launched
    from the loop's thread. ``cuda_graphs=True`` off a GPU runs the same static step eagerly; ``False`` decodes
    with the model's own forward. Prefills always run eagerly.
    """

    def __init__(
        self,
        model: Any,
        manager: KVCacheManager,
        *,
        max_batch_size: int | None = None,
        keep_logits: bool = False,
        pad_token_id: int = 0,
        forward_thread: bool = True,
        cuda_graphs: bool | None = None,
    ) -> None:
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if impl not in _MASKED_ATTENTION:
            raise ConfigError(
                f"model attention implementation {impl!r} does not take a 4D padding mask; load the model with "
                f"attn_implementation='sdpa' (or 'eager')"
            )
        if max_batch_size is not None and max_batch_size < 1:
            raise InvalidArgumentError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        self.model = model
        self.manager = manager
        self.max_batch_size = max_batch_size
        self.keep_logits = keep_logits
        self.pad_token_id = pad_token_id
        self._vocab_size = int(getattr(model.config, "vocab_size", 0)) or None
        self._cache_kw, self._keep_kw = _forward_kwargs(model)
        self._requests: list[BatchRequest] = []  # not done, in join order
        self._next_rid = 0
        self._stepping = False
        # the forward runs on this thread, so the event loop serves transfers meanwhile (a GPU forward waits for
        # its logits; a CPU one computes); None: on the loop's thread
        self._compute: ThreadPoolExecutor | None = None
        if forward_thread:
            self._compute = ThreadPoolExecutor(1, thread_name_prefix="kvstore-forward")
            weakref.finalize(self, self._compute.shutdown, wait=False)
        on_gpu = manager.device_pool.is_cuda and torch.device(model.device).type == "cuda"
        # decode steps through captured graphs (hf_graph); off a GPU the same static step runs eagerly
        self._graphs: DecodeGraphs | None = None
        if on_gpu if cuda_graphs is None else cuda_graphs:
            self._graphs = DecodeGraphs(model, manager, self._cache_kw, self._keep_kw, self._compute,
                                        keep_logits=keep_logits, capture=on_gpu)

    @property
    def decode_graphs(self) -> DecodeGraphs | None:
        """The captured decode steps (None with ``cuda_graphs=False``; on CPU their static step runs eagerly)."""
        return self._graphs

    @property
    def requests(self) -> tuple[BatchRequest, ...]:
        """Every request not done yet (running or suspended), in join order."""
        return tuple(self._requests)

    @property
    def running(self) -> tuple[BatchRequest, ...]:
        """Requests that the next step serves (not suspended, within ``max_batch_size``), in join order."""
        active = [r for r in self._requests if not r.suspended]
        return tuple(active if self.max_batch_size is None else active[: self.max_batch_size])

    def add(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        priority: int = 0,
        reuse_prefix: bool = True,
        stop_tokens: Collection[int] = (),
    ) -> BatchRequest:
        """A new request; it joins at the next step. Reuses the longest committed prefix of ``prompt[:-1]``."""
        self._check_idle("add()")
        if len(prompt) == 0:
            raise InvalidArgumentError("prompt must hold at least one token")
        if max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if self._vocab_size is not None and not all(0 <= int(t) < self._vocab_size for t in prompt):
            raise InvalidArgumentError(f"prompt token ids must be in [0, {self._vocab_size}) (the model's vocab_size)")
        tokens = [int(t) for t in prompt]
        kv = self.manager.create_cache(tokens[:-1] if reuse_prefix else None, priority=priority)
        req = BatchRequest(self._next_rid, kv, tokens, max_new_tokens, stop_tokens)
        self._next_rid += 1
        self._requests.append(req)
        return req

    def suspend(self, req: BatchRequest) -> None:
        """Take ``req`` out of the batch: its cache is suspended, its pages evictable, until :meth:`resume`."""
        self._check_member(req, "suspend()")
        if req.suspended:
            raise InvalidStateError(f"request {req.rid} is already suspended; resume() it first")
        if req._kv.status is CacheStatus.ACTIVE:
            req._kv.suspend()
        req.suspended = True
        req.num_suspends += 1

    def resume(self, req: BatchRequest) -> None:
        """Put a suspended ``req`` back; the next step awaits its cache's ``resume()`` before the forward."""
        self._check_member(req, "resume()")
        if not req.suspended:
            raise InvalidStateError(f"request {req.rid} is not suspended")
        req.suspended = False

    def prefetch(self, req: BatchRequest, target: CacheLevel = CacheLevel.HOST) -> PrefetchTask:
        """Start moving a suspended request's pages up to ``target`` (e.g. shortly before resuming it)."""
        self._check_member(req, "prefetch()")
        return req._kv.prefetch(target)

    def close(self, req: BatchRequest | None = None) -> None:
        """Close ``req`` (or every request not done): it leaves, committed pages stay reusable."""
        self._check_idle("close()")
        for r in [req] if req is not None else list(self._requests):
            if not r.done:
                self._finish(r, "closed")
        if req is None and self._graphs is not None:
            self._graphs.close()

    async def step(self) -> dict[BatchRequest, int]:
        """One token for every running request: the new token of each, by handle (empty when none runs)."""
        self._check_idle("step()")
        self._stepping = True
        try:
            return await self._step()
        finally:
            self._stepping = False

    async def step_many(
        self, steps: int, on_step: Callable[[dict[BatchRequest, int]], None] | None = None
    ) -> list[dict[BatchRequest, int]]:
        """Up to ``steps`` steps, as many ``step()`` calls would make them (fewer once no request runs): the new
        tokens of each step, in order; ``on_step`` is called with each as it is accepted (on the loop's thread).

        The batch is fixed meanwhile (``add``/``suspend``/``resume``/``close`` raise InvalidStateError), so the
        decode steps of captured graphs are pipelined: each step is queued on the GPU before the one before it
        has returned its tokens to the host (its tokens are read on the device), and the GPU goes from step to
        step without waiting for the event loop, however busy the loop is. They run in stretches of up to
        ``PIPELINE_STEPS``, room for each row's tokens of a stretch reserved up front (where the device has no
        room for it, steps run one at a time); what a stretch did not use is given back at its end. A step that
        raises or is cancelled changes no request; the steps accepted before it stay.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InvalidArgumentError(f"step_many() takes steps >= 1, got {steps!r}")
        self._check_idle("step_many()")
        self._stepping = True
        out: list[dict[BatchRequest, int]] = []

        def accept(new: dict[BatchRequest, int]) -> None:
            out.append(new)
            if on_step is not None:
                on_step(new)

        try:
            while len(out) < steps and self.running:
                members = self.running
                ahead = min([steps - len(out), PIPELINE_STEPS] + [r.max_new_tokens - len(r.generated) for r in members])
                decoding = all(r.generated and r._kv.status is CacheStatus.ACTIVE for r in members)
                if self._graphs is not None and ahead >= 2 and decoding:
                    if await self._pipelined(self._graphs, members, ahead, accept):
                        continue
                # a prefill, a resume, one step left, or no room for a stretch: one step, the ordinary way
                accept(await self._step())
            return out
        finally:
            self._stepping = False

    async def run(self) -> None:
        """Step until no request runs (suspended ones stay); decode steps are pipelined (:meth:`step_many`)."""
        while self.running:
            await self.step_many(1 << 30)

    async def _step(self) -> dict[BatchRequest, int]:
        members = self.running
        if not members:
            return {}
        await _settle([r._kv.resume() for r in members if r._kv.status is CacheStatus.SUSPENDED])
        groups = [g for g in ([r for r in members if not r.generated], [r for r in members if r.generated]) if g]
        batches = [PagedBatchCache(self.manager, [r._kv for r in g], [r.num_cached for r in g]) for g in groups]
        await _settle([b.reserve([len(r.tokens) - r.num_cached for r in g]) for g, b in zip(groups, batches)])
        try:
            chosen = [await self._run_group(g, b) for g, b in zip(groups, batches)]
        except BaseException:
            for b in batches:
                b.rollback()
            raise
        new: dict[BatchRequest, int] = {}
        for group, batch, (tokens, logits) in zip(groups, batches, chosen):
            for row, (req, token, length) in enumerate(zip(group, tokens, batch.seq_lengths)):
                self._take(req, token, length, logits[row])
                new[req] = token
        return new

    async def _pipelined(
        self,
        graphs: DecodeGraphs,
        group: Sequence[BatchRequest],
        steps: int,
        accept: Callable[[dict[BatchRequest, int]], None],
    ) -> bool:
        """``steps`` decode steps of ``group`` (no row reaches its ``max_new_tokens`` before the last), up to
        two in flight, each fed the tokens of the one before on the device. Ends early after a stop token; every
        step still queued has run to its end before this returns (its K/V land beyond the accepted tokens).
        False, with nothing changed, when the device has no room for every row's tokens of the whole run."""
        kvs = [r._kv for r in group]
        capacity = [kv.num_tokens for kv in kvs]
        queued: collections.deque[_Launch] = collections.deque()
        launched = done = 0
        try:
            batch = PagedBatchCache(self.manager, kvs, [r.num_cached for r in group])
            try:
                await batch.reserve([steps] * len(group))  # room for every step, the page tables read once
            except CapacityError:
                return False
            pages = batch._page_tables()
            batch.rollback()
            first = [r.num_cached + 1 for r in group]  # each row's length after the run's first token
            while done < steps:
                while launched < steps and len(queued) < 2:
                    after = queued[-1] if queued else None
                    tokens = None if after is not None else [r.tokens[-1] for r in group]
                    launch = graphs.launch(tokens, [n + launched for n in first], pages, after)
                    if launch is None:
                        break
                    queued.append(launch)
                    launched += 1
                if queued:  # (a cancelled wait returns once the step has ended: it leaves nothing in flight)
                    tokens_out, logits = await graphs.wait(queued.popleft())
                else:  # the bucket has no graph yet: this step makes it, with nothing else in flight
                    tokens_out, logits = await graphs.run([r.tokens[-1] for r in group],
                                                          [n + launched for n in first], pages)
                    launched += 1
                if any(t in r.stop_tokens for r, t in zip(group, tokens_out)):
                    await self._drain(graphs, queued)  # a row leaves: nothing may still use its pages
                new: dict[BatchRequest, int] = {}
                for row, (req, token) in enumerate(zip(group, tokens_out)):
                    self._take(req, token, first[row] + done, logits[row])
                    new[req] = token
                done += 1
                accept(new)
                if any(r.done for r in group):
                    break
            return True
        finally:
            await self._drain(graphs, queued)
            for req, kv, before in zip(group, kvs, capacity):
                if not req.done and kv.num_tokens > max(before, req.num_cached):
                    await kv.resize(max(before, req.num_cached))  # a shrink: in place, no await inside

    @staticmethod
    async def _drain(graphs: DecodeGraphs, queued: collections.deque[_Launch]) -> None:
        """Wait for every queued step to end, whatever cancellations arrive meanwhile (then one is raised);
        their tokens are discarded, and so is any error of theirs (the step that raised it is being given up)."""
        cancelled = False
        while queued:
            try:
                await graphs.wait(queued[0])
            except asyncio.CancelledError:
                cancelled = True
            except Exception:  # noqa: BLE001 - a step being discarded: its error is not the caller's
                pass
            queued.popleft()
        if cancelled:
            raise asyncio.CancelledError()

    async def _run_group(self, group: Sequence[BatchRequest], batch: PagedBatchCache) -> tuple[list[int], torch.Tensor]:
        """One forward of a group: a decode group through the graphs, else eagerly (on the forward thread, to its
        end even if the step is cancelled meanwhile: the pages are written to the end)."""
        if self._graphs is not None and group[0].generated:
            lengths, pages = batch._decode_inputs()
            chosen = await self._graphs.run([r.tokens[-1] for r in group], lengths, pages)
            batch._written()
            return chosen
        if self._compute is None:
            return self._forward(group, batch)
        return await settle_thread(self._compute.submit(self._forward, group, batch))

    def _forward(self, group: Sequence[BatchRequest], batch: PagedBatchCache) -> tuple[list[int], torch.Tensor]:
        inputs = batch.model_inputs(
            [r.tokens[r.num_cached :] for r in group],
            dtype=self.model.dtype,
            device=self.model.device,
            pad_token_id=self.pad_token_id,
        )
        kwargs: dict[str, Any] = {self._cache_kw: batch, "use_cache": True}
        if self._keep_kw is not None:
            kwargs[self._keep_kw] = 1
        with torch.no_grad(), attention_backends():
            logits = self.model(**inputs, **kwargs).logits[:, -1]
        return [int(t) for t in logits.argmax(dim=-1).tolist()], logits

    def _take(self, req: BatchRequest, token: int, length: int, logits: torch.Tensor) -> None:
        """Accept ``token``, chosen by a forward after which ``req`` has K/V of ``length`` tokens."""
        if not req.generated:
            req.num_prefilled_tokens = length - req.num_cached
        _commit_full_pages(req._kv, req.tokens, req.num_cached, self.manager.layout.tokens_per_page)
        req.num_cached = length
        req.tokens.append(token)
        req.generated.append(token)
        if self.keep_logits:
            req.last_logits = logits
        if token in req.stop_tokens:
            self._finish(req, "stop")
        elif len(req.generated) >= req.max_new_tokens:
            self._finish(req, "length")

    def _finish(self, req: BatchRequest, reason: str) -> None:
        req.finish_reason = reason
        req.suspended = False
        req._kv.close()
        self._requests.remove(req)

    def _check_idle(self, what: str) -> None:
        if self._stepping:
            raise InvalidStateError(f"{what} while a step() is running; call it between steps")

    def _check_member(self, req: BatchRequest, what: str) -> None:
        self._check_idle(what)
        if req.done:
            raise InvalidStateError(f"{what}: request {req.rid} is done ({req.finish_reason})")
        if req not in self._requests:
            raise InvalidArgumentError(f"{what}: request {req.rid} belongs to another BatchedGenerator")
