"""Fetch-or-recompute policy for a serving loop: pure functions and small dataclasses, no I/O and no clock.

A reusable prefix can be *loaded* (its pages brought to the device by the store; predicted by
``mgr.transfer_estimate()`` / ``cache.transfer_estimate()``) or *recomputed* (prefilled again by the model;
predicted by a :class:`PrefillModel` measured from the serving loop's own prefills). This module owns:

- :class:`PrefillModel` — ``seconds = fixed_s + tokens * per_token_s``, a moving fit of observed prefills;
  :func:`reuse_forward_model` — one with the priors of a turn's forward over a reused prefix;
- :func:`decide_reuse` — load or recompute, whichever is predicted faster (with both predictions);
- :func:`prefetch_start_time` / :func:`should_start_prefetch` — start a prefetch just in time for a deadline
  (not earlier: prefetched pages hold device memory that other requests could use);
- :func:`wait_or_recompute` — at request time, with a prefetch still in flight: wait for what is left of it,
  or recompute when that is faster (a late prefetch must not delay the request; cancel it then).

Times are seconds; ``now`` and ``due_at`` are in any one clock of the caller's (``time.monotonic()``).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Optional, Union

from ._args import describe, integral, seconds as _real
from .errors import InvalidArgumentError
from .types import TransferEstimate

__all__ = [
    "PrefillModel", "ReuseChoice", "Decision", "decide_reuse", "prefetch_start_time", "should_start_prefetch",
    "wait_or_recompute", "reuse_forward_model",
]

#: priors of a PrefillModel that has observed nothing: a few ms of fixed cost, 10k tokens/s
DEFAULT_PREFILL_FIXED_S = 5e-3
DEFAULT_PREFILL_PER_TOKEN_S = 1e-4
#: priors of a reuse-forward model (a turn over a reused prefix, by the prefix's tokens): its cost is mostly fixed
#: (the turn's own tokens) and grows slowly with the prefix it attends (on the H200 a 64-token turn took 20-53 ms
#: over 1-32k reused tokens: ~1 us per reused token), so one observed size must not extrapolate in proportion
DEFAULT_REUSE_FIXED_S = 5e-3
DEFAULT_REUSE_PER_TOKEN_S = 1e-6
#: weight of the newest observation in the moving fit
DEFAULT_PREFILL_ALPHA = 0.2
#: token counts spread less than this (relative standard deviation) fit only the fixed cost
_MIN_SPREAD = 0.05

#: a transfer estimate, or its predicted seconds
Estimate = Union[TransferEstimate, float]


def _count(value: object, what: str) -> int:
    n = integral(value)
    if n is None or n < 0:
        raise InvalidArgumentError(f"{what} must be a number of tokens >= 0, got {describe(value)}")
    return n


def _time(value: object, what: str, minimum: float = -math.inf) -> float:
    t = _real(value)
    if t is None or t < minimum:
        bound = "" if minimum == -math.inf else f" >= {minimum}"
        raise InvalidArgumentError(f"{what} must be a finite number of seconds{bound}, got {describe(value)}")
    return t


def _estimate_s(estimate: object) -> float:
    if isinstance(estimate, TransferEstimate):
        return estimate.seconds
    return _time(estimate, "the transfer estimate (a TransferEstimate or its seconds)", 0.0)


@dataclass
class PrefillModel:
    """Measured prefill speed of one model: ``seconds(tokens) = fixed_s + tokens * per_token_s``.

    :meth:`observe` each prefill the loop ran. The fit is an exponentially weighted least-squares line over
    the observations (``alpha``: weight of the newest), clamped to ``fixed_s >= 0`` and ``per_token_s >= 0``.
    While the observed token counts barely vary (one prompt size, or a single observation) the slope cannot
    be told from the intercept: ``per_token_s`` keeps its value (the prior at first) and only ``fixed_s``
    moves, unless that would go negative (then ``fixed_s = 0`` and the slope carries it all)."""

    fixed_s: float = DEFAULT_PREFILL_FIXED_S
    per_token_s: float = DEFAULT_PREFILL_PER_TOKEN_S
    alpha: float = DEFAULT_PREFILL_ALPHA
    samples: int = field(default=0, init=False)
    _mean_tokens: float = field(default=0.0, init=False, repr=False)
    _mean_s: float = field(default=0.0, init=False, repr=False)
    _var_tokens: float = field(default=0.0, init=False, repr=False)
    _cov: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.fixed_s = _time(self.fixed_s, "PrefillModel.fixed_s", 0.0)
        self.per_token_s = _time(self.per_token_s, "PrefillModel.per_token_s", 0.0)
        a = _real(self.alpha)
        if a is None or not 0.0 < a <= 1.0:
            raise InvalidArgumentError(f"PrefillModel.alpha must be in (0, 1], got {describe(self.alpha)}")
        self.alpha = a

    @property
    def measured(self) -> bool:
        return self.samples > 0

    def seconds(self, tokens: int) -> float:
        """Predicted seconds to prefill ``tokens`` tokens (0 for none)."""
        n = _count(tokens, "PrefillModel.seconds(tokens)")
        return self.fixed_s + n * self.per_token_s if n else 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        """Record that a prefill of ``tokens`` (> 0) tokens took ``seconds``."""
        n = _count(tokens, "PrefillModel.observe(tokens)")
        if n == 0:
            raise InvalidArgumentError("PrefillModel.observe(tokens) needs at least 1 token (none says nothing)")
        s = _time(seconds, "PrefillModel.observe(seconds)", 0.0)
        x, y = float(n), s
        if self.samples == 0:
            self._mean_tokens, self._mean_s = x, y
        else:
            a = self.alpha
            dx, dy = x - self._mean_tokens, y - self._mean_s
            self._mean_tokens += a * dx
            self._mean_s += a * dy
            self._var_tokens = (1 - a) * (self._var_tokens + a * dx * dx)
            self._cov = (1 - a) * (self._cov + a * dx * dy)
        self.samples += 1
        mx, my = self._mean_tokens, self._mean_s
        if self._var_tokens > (_MIN_SPREAD * mx) ** 2:
            self.per_token_s = max(self._cov / self._var_tokens, 0.0)
        fixed = my - self.per_token_s * mx
        if fixed < 0:
            fixed, self.per_token_s = 0.0, my / mx
        self.fixed_s = fixed


def reuse_forward_model(alpha: float = DEFAULT_PREFILL_ALPHA) -> PrefillModel:
    """A :class:`PrefillModel` for ``decide_reuse(reuse_forward=...)``, observed as ``observe(reused tokens,
    seconds)``, with the priors of a reuse forward: until reused sizes spread, one size moves its fixed cost and
    keeps the small slope, where the prefill priors (10k tokens/s) would predict a 2x longer prefix to take 2x."""
    return PrefillModel(DEFAULT_REUSE_FIXED_S, DEFAULT_REUSE_PER_TOKEN_S, alpha)


class ReuseChoice(enum.Enum):
    """What to do with a reusable prefix."""

    LOAD = "load"  # bring its pages from the store (or wait for the prefetch bringing them)
    RECOMPUTE = "recompute"  # prefill those tokens again


@dataclass(frozen=True)
class Decision:
    """A choice with the predictions behind it: ``load_s`` (transfer, then prefill of the other tokens) and
    ``recompute_s`` (prefill of the reusable and the other tokens), both until the whole prompt's KV exists."""

    choice: ReuseChoice
    load_s: float
    recompute_s: float

    @property
    def load(self) -> bool:
        return self.choice is ReuseChoice.LOAD

    @property
    def seconds(self) -> float:
        """Predicted seconds of the chosen way."""
        return min(self.load_s, self.recompute_s)


def decide_reuse(
    estimate: Estimate, reusable_tokens: int, prefill: PrefillModel, *, new_tokens: int = 0,
    reuse_forward: Optional[PrefillModel] = None,
) -> Decision:
    """Load the reusable prefix from its tier or recompute it, whichever is predicted faster (a tie loads: it
    spends no compute).

    ``estimate``: the transfer of the prefix's pages to the device (``mgr.prefix_transfer_estimate(tokens,
    DEVICE)``); ``reusable_tokens``: the tokens those pages hold; ``new_tokens``: tokens after the prefix that
    are prefilled either way. Recomputing takes ``prefill.seconds(reusable_tokens + new_tokens)``; loading takes
    ``estimate.seconds`` plus the forward of the new tokens over the loaded prefix. That forward attends the whole
    prefix, so its cost grows with the prefix, not only with ``new_tokens``: pass ``reuse_forward``, a
    :class:`PrefillModel` of the loop's own reuse forwards observed as ``observe(reused tokens, seconds)`` at its
    usual turn size (made by :func:`reuse_forward_model`), and it predicts that part as
    ``reuse_forward.seconds(reusable_tokens)``. Without it the part is ``prefill.seconds(new_tokens)``, which
    misses the attention over the prefix (on the H200 a 64-token turn over 1-32k reused tokens took 20-53 ms, a
    fresh 64-token prefill a few ms; docs/serving_benchmarks.md)."""
    if not isinstance(prefill, PrefillModel):
        raise InvalidArgumentError(f"decide_reuse() prefill must be a PrefillModel, got {describe(prefill)}")
    if reuse_forward is not None and not isinstance(reuse_forward, PrefillModel):
        raise InvalidArgumentError(
            f"decide_reuse() reuse_forward must be a PrefillModel or None, got {describe(reuse_forward)}"
        )
    transfer = _estimate_s(estimate)
    reused = _count(reusable_tokens, "decide_reuse() reusable_tokens")
    new = _count(new_tokens, "decide_reuse() new_tokens")
    forward = reuse_forward.seconds(reused) if reuse_forward is not None and reused else prefill.seconds(new)
    load_s = transfer + forward
    recompute_s = prefill.seconds(reused + new)
    choice = ReuseChoice.LOAD if load_s <= recompute_s else ReuseChoice.RECOMPUTE
    return Decision(choice, load_s, recompute_s)


def prefetch_start_time(due_at: float, estimate: Estimate, margin_s: float = 0.0, *, factor: float = 1.0) -> float:
    """The latest time to start a prefetch that should be done by ``due_at``: ``due_at - factor * seconds -
    margin_s``. ``factor`` (>= 1 for safety) scales the estimate; ``margin_s`` (>= 0) is fixed slack for the
    loop's own latency in starting it."""
    due = _time(due_at, "prefetch_start_time() due_at")
    transfer = _estimate_s(estimate)
    margin = _time(margin_s, "prefetch_start_time() margin_s", 0.0)
    f = _real(factor)
    if f is None or f <= 0:
        raise InvalidArgumentError(f"prefetch_start_time() factor must be a number > 0, got {describe(factor)}")
    return due - f * transfer - margin


def should_start_prefetch(
    now: float, due_at: float, estimate: Estimate, margin_s: float = 0.0, *, factor: float = 1.0
) -> bool:
    """Whether a prefetch due at ``due_at`` should start at ``now``: not before :func:`prefetch_start_time`
    (earlier, its pages would hold device memory for nothing), and at once when that time has passed."""
    t = _time(now, "should_start_prefetch() now")
    return t >= prefetch_start_time(due_at, estimate, margin_s, factor=factor)


def wait_or_recompute(
    remaining_estimate: Estimate, prefill: PrefillModel, reusable_tokens: int, *, new_tokens: int = 0,
    reuse_forward: Optional[PrefillModel] = None,
) -> Decision:
    """At request time, with the prefix's prefetch still in flight: LOAD (wait for it) when what is left of the
    transfer (``cache.transfer_estimate(DEVICE)``, which counts the bytes still queued) plus the prefill of the
    other tokens is predicted no slower than recomputing, else RECOMPUTE (then cancel the prefetch: it must not
    delay the request, nor hold device memory and bandwidth). The arithmetic of :func:`decide_reuse`."""
    return decide_reuse(
        remaining_estimate, reusable_tokens, prefill, new_tokens=new_tokens, reuse_forward=reuse_forward
    )
