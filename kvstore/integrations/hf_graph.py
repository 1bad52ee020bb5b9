"""CUDA-graph decode steps for :class:`~kvstore.integrations.hf_batch.BatchedGenerator`.

Owns :class:`DecodeGraphs`: one captured decode forward per (batch bucket, page bucket), replayed from the
event loop's thread; and the attention a static step runs under ``sdpa`` (:func:`_gqa_decode_attention`: grouped
K/V heads read once, not copied per query head). A captured step reads everything it needs from one small device
tensor (per row: its last token, its length after that token, the row whose K/V it writes, its page table) and
computes the page-index gather/scatter tensors, the positions and the 4D additive mask on the GPU, so a step
costs the host one ``(B, 3 + P)`` int64 copy, one graph launch and one event: no Python per layer, no kernel
launches from Python. That matters twice: the eager forward
of a 1B model spends ~20 ms of Python launching kernels per step, and while kvstore moves pages the eager forward's
thread fights the loop and copy threads for the GIL (every torch op releases and re-takes it).

Buckets: a row's page count is padded up to a bucket (at most 1/8 more beyond 64 pages; keys beyond a row's
length are masked) and the batch up to a power of two (8 or more: a multiple of 8). A padding row repeats row 0
and writes row 0's own new K/V values to row 0's slot (the same elements twice: the duplicate write cannot change
them). A bucket's first step runs eagerly on the capture stream (that run IS the step: its K/V land in the pages),
is then captured, and every later step of the bucket replays the graph. Graphs are captured on the generator's
forward thread (``capture_error_mode="thread_local"``, so kvstore's copy threads go on meanwhile) and dropped when
the device pool is reallocated (``set_quota``) or more than ``max_graphs`` are held (least recently used first).

Pipelining (``launch``/``wait``, what ``BatchedGenerator.step_many`` drives): a step may be launched while the one
before still runs, on the same rows and page tables; its inputs are that step's, advanced on the device (each row
one token longer, fed the token it chose), so the GPU goes from step to step without waiting for the host. Each
graph has two host slots (staging inputs, tokens out) and the generator two events, one per step in flight.

The same static forward runs eagerly (``capture=False``) on any device: the CPU tests check it token for token
(there the forward thread stands in for the stream: a launch is a job queued on it).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvstore._aio import settle_thread
from kvstore.errors import InvalidArgumentError
from kvstore.integrations.hf import _PoolGeometry, _PoolLayer, _scatter_gather, attention_backends

if TYPE_CHECKING:
    from kvstore import KVCacheManager

__all__ = ["DecodeGraphs", "page_bucket", "batch_bucket"]

T = TypeVar("T")


_GQA_DECODE = "kvstore_gqa_decode"  # the attention implementation of a static decode step under "sdpa"


def _gqa_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``transformers``' SDPA attention, except for one query token per row over grouped K/V heads: then the
    query heads of each K/V head are folded into the query-length axis, so SDPA reads every K/V head once instead
    of a copy per query head (``repeat_kv`` of the whole history: 35 % of a 1B decode step's GPU time on the H200,
    docs/serving_benchmarks.md). The mask ``(B, 1, 1, L)`` broadcasts over both axes; the result is the same."""
    b, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if (length != 1 or heads == kv_heads or heads % kv_heads or dropout or attention_mask is None
            or attention_mask.shape[1] != 1):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    folded = query.reshape(b, kv_heads, heads // kv_heads, dim)  # query head h uses K/V head h // group
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(_GQA_DECODE, _gqa_decode_attention)
try:  # a 4D mask is used as given; registered so a mask lookup by this name finds SDPA's
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionMaskInterface.register(_GQA_DECODE, sdpa_mask)
except ImportError:  # pragma: no cover - transformers without the mask registry
    pass


@contextlib.contextmanager
def _decode_attention(model: Any) -> Iterator[None]:
    """While a static decode step is run or captured: the model's ``sdpa`` attention as
    :func:`_gqa_decode_attention` (the same result for every call; restored afterwards)."""
    config = model.config
    before = config._attn_implementation
    if before == "sdpa":
        config._attn_implementation = _GQA_DECODE
    try:
        yield
    finally:
        config._attn_implementation = before


def page_bucket(pages: int) -> int:
    """Pages per row of the graph that serves rows of up to ``pages`` pages: the next multiple of a step that is
    an eighth of the power of two below ``pages`` (>= 8), so at most 1/8 of the keys are padding (beyond 64 pages)."""
    step = max(8, 1 << max(0, pages.bit_length() - 4))
    return -(-pages // step) * step


def batch_bucket(rows: int) -> int:
    """Rows of the graph that serves ``rows`` rows: a power of two up to 8, then a multiple of 8."""
    if rows <= 8:
        return 1 << max(0, (rows - 1).bit_length())
    return -(-rows // 8) * 8


class _StaticLayer(_PoolLayer):  # type: ignore[no-untyped-call]  # transformers' __init_subclass__
    """One layer of a :class:`_StaticCache`: its update is one scatter and one gather with the step's indices."""

    def __init__(self, owner: _StaticCache, layer_idx: int) -> None:
        super().__init__(layer_idx)
        self._owner = owner

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scatter the new token's K/V of every row into its page and return every row's padded K/V history."""
        return self._owner._update(self._layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length: Any) -> tuple[int, int]:
        """Not used: the forward always gets a 4D mask."""
        return self._owner.keys, 0

    def get_seq_length(self) -> int:
        """Keys of the padded history (the graph's fixed length); the real lengths are in the device inputs."""
        return self._owner.keys - 1

    def reset(self) -> None:
        """Nothing to forget: the lengths live in the step's device inputs."""


class _StaticCache(Cache):
    """The ``transformers`` Cache of a captured decode step; its indices are tensors computed in the graph."""

    def __init__(self, pool: torch.Tensor, geometry: _PoolGeometry, keys: int) -> None:
        self._pool = pool
        self._geometry = geometry
        self.keys = keys
        self.scatter: tuple[torch.Tensor, torch.Tensor] | None = None  # (B,) page and offset of each new token
        self.gather: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, keys) page and offset of each key
        self.source: torch.Tensor | None = None  # (B,) the row whose new K/V each row writes
        layers: list[Any] = [_StaticLayer(self, i) for i in range(geometry.num_layers)]
        super().__init__(layers=layers)

    def _update(
        self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scatter is None or self.gather is None or self.source is None:
            raise RuntimeError("a static decode step runs only inside DecodeGraphs")  # internal misuse
        pool = self._pool
        self._geometry.check_heads(key_states.shape[1], key_states.shape[3])
        new = torch.stack((key_states[:, :, 0], value_states[:, :, 0]), dim=1)  # (B, 2, heads, hd)
        new = new.to(device=pool.device, dtype=pool.dtype)
        return _scatter_gather(pool, layer, new.index_select(0, self.source), self.scatter, self.gather, key_states)


class _Graph:
    """One (rows, pages) bucket: static input/output tensors, the forward that reads them and its CUDA graph."""

    def __init__(self, rows: int, pages: int, owner: DecodeGraphs) -> None:
        self.rows, self.pages = rows, pages
        self.owner = owner
        device = owner.device  # the model's: the inputs feed it; the indices move to the pool once per step
        # per row: token, length after it, the row whose new K/V it writes (itself; 0 for padding), page table
        self.inputs = torch.zeros((rows, 3 + pages), dtype=torch.long, device=device)
        pin = device.type == "cuda"
        # two of each host buffer, one per step in flight (a step queued behind another fills the other slot)
        self.staging = tuple(torch.zeros((rows, 3 + pages), dtype=torch.long, pin_memory=pin) for _ in range(2))
        self.tokens_host = tuple(torch.zeros(rows, dtype=torch.long, pin_memory=pin) for _ in range(2))
        # the same pinned memory seen from the GPU: a replayed step's tokens reach the host through a kernel's
        # stores, not a copy-engine copy queued behind the running step beside kvstore's transfers
        self.tokens_mapped = tuple(_device_view(t, device) for t in self.tokens_host) if pin else ()
        self.cache = _StaticCache(owner.pool, owner.geometry, pages * owner.geometry.tokens_per_page)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tokens: torch.Tensor | None = None  # outputs of the captured forward (static)
        self.logits: torch.Tensor | None = None

    def eager(self, slot: int, after: _Launch | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step without a graph: :meth:`stage`, then :meth:`forward`."""
        self.stage(slot, after)
        return self.forward()

    def stage(self, slot: int, after: _Launch | None) -> None:
        """The step's inputs: the host staging tensor of ``slot``, or, for a step chained to ``after`` (the step
        before, on the same rows and pages), that step's inputs advanced on the device: every row one token
        longer, fed the token it chose. A chained step queues no host copy, so nothing of a step queued behind a
        running one waits in the copy engines' queues with kvstore's transfers."""
        if after is None:
            self.inputs.copy_(self.staging[slot], non_blocking=True)
            return
        chosen = after.chosen if after.future is None else after.future.result()[0]
        if chosen is None:  # pragma: no cover - a launch holds its tokens one way or the other
            raise RuntimeError("a chained step without its predecessor's tokens")
        self.inputs[:, 1] += 1  # padding rows repeat row 0: one longer too
        self.inputs[: after.rows, 0].copy_(chosen[: after.rows])

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode step of every row from :attr:`inputs` alone (this is what is captured)."""
        o = self.owner
        tpp = o.geometry.tokens_per_page
        token, total, source, table = self.inputs[:, :1], self.inputs[:, 1], self.inputs[:, 2], self.inputs[:, 3:]
        last = (total - 1).unsqueeze(1)  # (B, 1): the new token's position
        key = torch.arange(self.cache.keys, device=table.device).unsqueeze(0)
        valid = key <= last  # (B, keys)
        tok = torch.where(valid, key, 0)
        on_pool = o.pool.device
        self.cache.gather = (table.gather(1, tok // tpp).to(on_pool), (tok % tpp).to(on_pool))
        self.cache.scatter = (table.gather(1, last // tpp).squeeze(1).to(on_pool), (last % tpp).squeeze(1).to(on_pool))
        self.cache.source = source.to(on_pool)
        mask = torch.zeros(valid.shape, dtype=o.dtype, device=table.device)
        mask.masked_fill_(~valid, torch.finfo(o.dtype).min)
        kwargs: dict[str, Any] = {o.cache_kw: self.cache, "use_cache": True}
        if o.keep_kw is not None:
            kwargs[o.keep_kw] = 1
        with torch.no_grad(), attention_backends(), _decode_attention(o.model):
            out = o.model(input_ids=token, position_ids=last, attention_mask=mask[:, None, None, :], **kwargs)
        logits = out.logits[:, -1]
        return logits.argmax(dim=-1), logits


@dataclass
class _Launch:
    """One decode step queued by :meth:`DecodeGraphs.launch`; :meth:`DecodeGraphs.wait` gives its tokens."""

    graph: _Graph
    rows: int  # the real rows (the rest of the bucket is padding)
    lengths: tuple[int, ...]  # each row's length after its token
    pages: Sequence[torch.Tensor]  # each row's page table
    slot: int  # the graph's host buffers it staged its inputs in and gets its tokens back in
    logits: torch.Tensor | None = None  # captured: its logits (the graph's own output unless kept)
    chosen: torch.Tensor | None = None  # captured: the device tensor of its tokens (what a chained step reads)
    event: Any = None  # captured: the torch.cuda.Event recorded after it
    future: Future[tuple[torch.Tensor, torch.Tensor]] | None = None  # eager: its forward on the forward thread


class _ArrayInterface:
    """``__cuda_array_interface__`` of a pinned host tensor: unified addressing makes its pointer valid on the
    GPU."""

    def __init__(self, host: torch.Tensor) -> None:
        self.__cuda_array_interface__ = {"shape": tuple(host.shape), "typestr": "<i8",
                                         "data": (host.data_ptr(), False), "version": 3, "strides": None}


def _device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor over the memory of ``host`` (pinned, int64, contiguous); ``host`` must outlive it."""
    return torch.as_tensor(_ArrayInterface(host), device=device)


def _bucket(rows: int, pages: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(rows, pages per row) of the graph that serves ``rows`` rows with these page tables."""
    return batch_bucket(rows), page_bucket(max(int(p.numel()) for p in pages))


def _completed(fn: Callable[[], T]) -> Future[T]:
    """``fn()`` run here, as a finished future."""
    future: Future[T] = Future()
    try:
        future.set_result(fn())
    except Exception as exc:
        future.set_exception(exc)
    return future


class DecodeGraphs:
    """Captured decode steps of one generator (see the module docstring).

    ``await run(tokens, lengths, pages)``: row ``b`` holds ``lengths[b]`` tokens once ``tokens[b]`` (its last
    token, the one this step feeds) is written, in the pages ``pages[b]`` (its page table, read on the loop's
    thread). Returns every row's next token and its logits (with ``keep_logits=False`` the graph's own output
    tensor, overwritten by the bucket's next step). A failed or cancelled run leaves the rows' token counts to
    the caller (the K/V it wrote are overwritten by the next step)."""

    def __init__(
        self,
        model: Any,
        manager: KVCacheManager,
        cache_kw: str,
        keep_kw: str | None,
        compute: ThreadPoolExecutor | None,
        *,
        keep_logits: bool = False,
        capture: bool = True,
        max_graphs: int = 32,
    ) -> None:
        self.model = model
        self.manager = manager
        self.cache_kw, self.keep_kw = cache_kw, keep_kw
        self.keep_logits = keep_logits  # False: a step's logits are the graph's, overwritten by its next replay
        self.dtype: torch.dtype = model.dtype
        self.device = torch.device(model.device)
        self.capture = capture and manager.device_pool.is_cuda and self.device == manager.device_pool.device
        self.max_graphs = max_graphs
        self._compute = compute
        self._graphs: OrderedDict[tuple[int, int], _Graph] = OrderedDict()
        self._pool_ptr = -1
        self.geometry = _PoolGeometry(manager)
        self.captures = 0  # graphs captured so far (a figure for benchmarks and tests)
        self._stream = torch.cuda.Stream(manager.device_pool.device) if self.capture else None  # type: ignore[no-untyped-call]
        self._mempool = torch.cuda.graph_pool_handle() if self.capture else None
        # one event per step in flight (at most two: see launch())
        self._events = tuple(torch.cuda.Event() for _ in range(2)) if self.capture else ()  # type: ignore[no-untyped-call]
        self._launches = 0  # steps launched so far; the parity picks a step's slot and event
        self._waiter: ThreadPoolExecutor | None = None  # waits for each step's event, GIL released
        if self.capture:
            self._waiter = ThreadPoolExecutor(1, thread_name_prefix="kvstore-graph-wait")
            weakref.finalize(self, self._waiter.shutdown, wait=False)

    @property
    def buckets(self) -> tuple[tuple[int, int], ...]:
        """(rows, pages per row) of every graph held, least recently used first."""
        return tuple(self._graphs)

    @property
    def pool(self) -> torch.Tensor:
        return self.manager.device_pool

    async def run(
        self, tokens: Sequence[int], lengths: Sequence[int], pages: Sequence[torch.Tensor]
    ) -> tuple[list[int], torch.Tensor]:
        """The decode step of ``len(tokens)`` rows (see the class docstring)."""
        launch = self.launch(tokens, lengths, pages)
        if launch is None:
            launch = await self._first_launch(tokens, lengths, pages)
        return await self.wait(launch)

    def launch(
        self,
        tokens: Sequence[int] | None,
        lengths: Sequence[int],
        pages: Sequence[torch.Tensor],
        after: _Launch | None = None,
    ) -> _Launch | None:
        """Queue the decode step of ``len(lengths)`` rows without waiting for it (on the loop's thread: a
        replay is asynchronous); None when its bucket has no graph yet (:meth:`run` makes one).

        ``tokens=None`` chains the step to ``after``, the step launched just before on the same rows and ``pages``
        (each row one token shorter): each row is fed the token ``after`` chooses, read on the device, so this
        step is queued before that one's tokens reach the host and the GPU goes from one step to the next without
        waiting for the event loop. At most two steps are in flight: :meth:`wait` for each, in launch order,
        before launching a third."""
        if (tokens is None) != (after is not None):
            raise InvalidArgumentError("launch() takes either the rows' tokens or the step they follow, not both")
        if after is not None and (pages is not after.pages or tuple(lengths) != tuple(n + 1 for n in after.lengths)):
            raise InvalidArgumentError("a chained step runs on its step's rows and pages, each row one token longer")
        self._check_pool()
        n = len(lengths)
        key = _bucket(n, pages)
        graph = self._graphs.get(key)
        if graph is None or (self.capture and graph.graph is None) or (after is not None and after.graph is not graph):
            return None  # (a chained step whose graph was dropped meanwhile: the pool moved)
        self._graphs.move_to_end(key)
        slot = self._next_slot()
        if tokens is not None:
            self._fill(graph, slot, tokens, lengths, pages)
        lengths = tuple(lengths)
        if not self.capture:  # eager (CPU, or capture off): the same static forward, off the loop
            compute = self._compute
            future = _completed(lambda: graph.eager(slot, after)) if compute is None else \
                compute.submit(graph.eager, slot, after)
            return _Launch(graph, n, lengths, pages, slot, future=future)
        chosen, logits = self._replay(graph, slot, after)
        return _Launch(graph, n, lengths, pages, slot, logits=logits, chosen=chosen, event=self._record(slot))

    async def wait(self, launch: _Launch) -> tuple[list[int], torch.Tensor]:
        """The tokens and logits of a launched step once it has run (to its end even if the caller is
        cancelled meanwhile; then the cancellation is raised)."""
        n = launch.rows
        if launch.future is not None:
            chosen, logits = await settle_thread(launch.future)
            return [int(t) for t in chosen[:n].tolist()], logits[:n]
        waiter, kept = self._waiter, launch.logits
        if waiter is None or kept is None or launch.event is None:  # pragma: no cover - capture makes them
            raise RuntimeError("a captured step without its waiter thread, logits or event")
        await settle_thread(waiter.submit(launch.event.synchronize))
        return [int(t) for t in launch.graph.tokens_host[launch.slot][:n].tolist()], kept[:n]

    async def _first_launch(
        self, tokens: Sequence[int], lengths: Sequence[int], pages: Sequence[torch.Tensor]
    ) -> _Launch:
        """A step whose bucket has no graph: make the bucket's tensors (off the loop: device and pinned memory
        are driver calls), then launch it, or, the bucket's first step on a GPU, run it eagerly and capture it
        (off the loop)."""
        key = _bucket(len(tokens), pages)
        graph = self._graphs.get(key)
        if graph is None:
            graph = await self._off_loop(lambda: _Graph(*key, self))
            self._graphs[key] = graph
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        if not self.capture:
            launch = self.launch(tokens, lengths, pages)
            if launch is None:  # pragma: no cover - the bucket was just made
                raise RuntimeError("an eager bucket without its graph")
            return launch
        slot = self._next_slot()
        self._fill(graph, slot, tokens, lengths, pages)
        logits = await self._off_loop(lambda: self._first_step(graph, slot))
        return _Launch(graph, len(tokens), tuple(lengths), pages, slot, logits=logits, event=self._record(slot))

    def _next_slot(self) -> int:
        slot = self._launches % 2
        self._launches += 1
        return slot

    def _record(self, slot: int) -> Any:
        """The event of ``slot``, recorded on the capture stream after the step just queued there."""
        event = self._events[slot]
        event.record(self._stream)
        return event

    def close(self) -> None:
        """Drop every graph; the generator can still step (graphs are captured again)."""
        self._graphs.clear()

    async def _off_loop(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the forward thread (to its end even if the step is cancelled), or here without one."""
        if self._compute is None:
            return fn()
        return await settle_thread(self._compute.submit(fn))

    def _check_pool(self) -> None:
        """Drop every graph when the device pool moved (a captured graph addresses the old one)."""
        ptr = self.pool.data_ptr()
        if ptr != self._pool_ptr:
            self._graphs.clear()
            self._pool_ptr = ptr
            self.geometry = _PoolGeometry(self.manager)

    def _fill(
        self,
        graph: _Graph,
        slot: int,
        tokens: Sequence[int] | None,
        lengths: Sequence[int],
        pages: Sequence[torch.Tensor],
    ) -> None:
        """Write the step's inputs into the graph's host staging tensor of ``slot`` (numpy: no torch op, no GIL
        release); without ``tokens`` their column is written on the device (a chained step)."""
        host = graph.staging[slot].numpy()
        n = len(lengths)
        if tokens is not None:
            host[:n, 0] = np.asarray(tokens, dtype=np.int64)
        host[:n, 1] = np.asarray(lengths, dtype=np.int64)
        host[:n, 2] = np.arange(n)
        for b, p in enumerate(pages):  # one slice per row (rows are few); pad with the row's first page
            row = p.numpy()  # page_indices() of the loop's thread: a CPU tensor
            host[b, 3 : 3 + row.size] = row
            host[b, 3 + row.size :] = row[0]
        host[n:] = host[0]  # padding rows repeat row 0 ...
        host[n:, 2] = 0  # ... and write row 0's K/V

    def _first_step(self, graph: _Graph, slot: int) -> torch.Tensor:
        """Run the bucket's first step eagerly on the capture stream, then capture it (its K/V are written once,
        by the eager run; capturing runs nothing)."""
        stream = self._stream
        if stream is None:  # pragma: no cover
            raise RuntimeError("no capture stream")
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            graph.stage(slot, None)
            chosen, logits = graph.forward()
            graph.tokens_host[slot].copy_(chosen, non_blocking=True)
            logits = logits.clone()
        graph.tokens, graph.logits, graph.graph = self._capture(graph, stream)
        self.captures += 1
        return logits

    def _capture(self, graph: _Graph, stream: torch.cuda.Stream) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Capture ``graph.forward()`` on ``stream``. Not through ``torch.cuda.graph``: that synchronizes the
        whole device, runs ``gc.collect()`` and empties the allocator's cache before every capture, and the
        ``cudaFree`` calls of that empty hold the driver while kvstore's copies and the loop's own CUDA calls wait
        (the graph's memory comes from its private pool, so nothing needs freeing first)."""
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            cuda_graph.capture_begin(self._mempool, capture_error_mode="thread_local")
            try:
                tokens, logits = graph.forward()
            except BaseException:
                with contextlib.suppress(Exception):  # the capture is invalid anyway: end it, raise the cause
                    cuda_graph.capture_end()
                raise
            cuda_graph.capture_end()
        return tokens, logits, cuda_graph

    def _replay(self, graph: _Graph, slot: int, after: _Launch | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Queue one step of a captured bucket on the capture stream (all asynchronous: fit for the loop's
        thread); its tokens (the graph's static output) and logits."""
        stream = self._stream
        if stream is None or graph.graph is None or graph.tokens is None or graph.logits is None:  # pragma: no cover
            raise RuntimeError("replay of a graph not captured")
        with torch.cuda.stream(stream):
            graph.stage(slot, after)
            graph.graph.replay()
            torch.mul(graph.tokens, 1, out=graph.tokens_mapped[slot])  # a kernel writes the host buffer
            # no allocation on the loop's thread unless the logits are kept (the static ones live until the next step)
            return graph.tokens, graph.logits.clone() if self.keep_logits else graph.logits
