"""kvstore.policy: the prefill model's fit, load-or-recompute, just-in-time prefetch, wait-or-recompute.

Every expectation is derived here from the model's formulas and the inputs, not copied from a run."""

from __future__ import annotations

import pytest

from kvstore import (
    CacheLevel, Decision, InvalidArgumentError, PrefillModel, ReuseChoice, TransferEstimate, decide_reuse,
    prefetch_start_time, reuse_forward_model, should_start_prefetch, wait_or_recompute,
)


def transfer(seconds: float) -> TransferEstimate:
    return TransferEstimate(CacheLevel.DEVICE, seconds, pages=1, bytes=1)


# ------------------------------------------------------------------ PrefillModel
def test_an_unobserved_model_predicts_from_its_priors():
    m = PrefillModel(fixed_s=0.01, per_token_s=2e-4)
    assert not m.measured
    assert m.seconds(500) == pytest.approx(0.01 + 500 * 2e-4)
    assert m.seconds(0) == 0.0  # nothing to prefill costs nothing


def test_two_prompt_sizes_fit_the_line_through_them():
    m = PrefillModel(fixed_s=1.0, per_token_s=1.0)  # far-off priors: the observations must replace them
    fixed, per_token = 0.02, 3e-4
    for n in (1000, 4000):
        m.observe(n, fixed + n * per_token)
    assert m.per_token_s == pytest.approx(per_token)
    assert m.fixed_s == pytest.approx(fixed)
    assert m.seconds(2500) == pytest.approx(fixed + 2500 * per_token)
    assert m.samples == 2 and m.measured


def test_noisy_observations_of_many_sizes_converge_near_the_true_line():
    m = PrefillModel()
    fixed, per_token = 0.015, 2e-4
    for i in range(200):
        n = 256 + (i * 977) % 4096
        noise = 1.0 + (0.05 if i % 2 else -0.05)  # +-5 %
        m.observe(n, (fixed + n * per_token) * noise)
    assert m.per_token_s == pytest.approx(per_token, rel=0.2)
    assert m.seconds(3000) == pytest.approx(fixed + 3000 * per_token, rel=0.1)


def test_one_prompt_size_moves_only_the_fixed_cost():
    m = PrefillModel(fixed_s=0.0, per_token_s=1e-4)
    m.observe(1000, 0.15)
    # the slope cannot be told from one size: it keeps its prior, the fixed cost takes the rest
    assert m.per_token_s == 1e-4
    assert m.fixed_s == pytest.approx(0.15 - 1000 * 1e-4)
    m.observe(1000, 0.25)  # the moving mean of the seconds at that size: 0.15 + alpha * (0.25 - 0.15)
    assert m.fixed_s == pytest.approx(0.15 + m.alpha * 0.10 - 1000 * 1e-4)


def test_a_fit_never_goes_negative():
    m = PrefillModel(fixed_s=0.0, per_token_s=1e-3)
    m.observe(1000, 0.5)  # faster than the prior slope alone: the fixed cost would be 0.5 - 1.0 < 0
    assert m.fixed_s == 0.0 and m.per_token_s == pytest.approx(0.5 / 1000)


@pytest.mark.parametrize("args", [(0, 1.0), (-5, 1.0), (10, -1.0), (10, float("nan")), (1.5, 1.0), (True, 1.0)])
def test_observe_refuses_bad_input(args):
    with pytest.raises(InvalidArgumentError):
        PrefillModel().observe(*args)


def test_bad_priors_are_refused():
    for kw in (dict(fixed_s=-1.0), dict(per_token_s=float("inf")), dict(alpha=0.0), dict(alpha=1.5)):
        with pytest.raises(InvalidArgumentError):
            PrefillModel(**kw)


# ------------------------------------------------------------------ decide_reuse
def test_loading_wins_when_the_transfer_is_faster_than_the_prefill_it_saves():
    m = PrefillModel(fixed_s=0.01, per_token_s=1e-4)
    d = decide_reuse(transfer(0.05), 1000, m)  # recompute: 0.01 + 1000 * 1e-4 = 0.11 s
    assert isinstance(d, Decision) and d.choice is ReuseChoice.LOAD and d.load
    assert d.load_s == pytest.approx(0.05)
    assert d.recompute_s == pytest.approx(0.01 + 1000 * 1e-4)
    assert d.seconds == d.load_s


def test_recompute_wins_when_the_transfer_is_slower():
    m = PrefillModel(fixed_s=0.01, per_token_s=1e-4)
    d = decide_reuse(transfer(0.5), 1000, m)
    assert d.choice is ReuseChoice.RECOMPUTE and not d.load and d.seconds == d.recompute_s


def test_new_tokens_are_prefilled_either_way_so_only_the_reused_part_is_compared():
    m = PrefillModel(fixed_s=0.01, per_token_s=1e-4)
    reused, new = 1000, 500
    # load: transfer, then prefill the new tokens; recompute: prefill all of them (one fixed cost)
    t = 0.5 * reused * 1e-4 + 0.001
    d = decide_reuse(transfer(t), reused, m, new_tokens=new)
    assert d.load_s == pytest.approx(t + 0.01 + new * 1e-4)
    assert d.recompute_s == pytest.approx(0.01 + (reused + new) * 1e-4)
    assert d.load  # t < reused * per_token: the transfer beats the prefill it replaces
    # just above the saved prefill time, recompute wins even though t < a cold prefill of the prefix
    t2 = reused * 1e-4 + 0.001
    assert t2 < m.seconds(reused)
    assert decide_reuse(transfer(t2), reused, m, new_tokens=new).choice is ReuseChoice.RECOMPUTE


def test_a_tie_loads_and_seconds_are_accepted_for_an_estimate():
    m = PrefillModel(fixed_s=0.0, per_token_s=1e-3)
    assert decide_reuse(1.0, 1000, m).load  # 1.0 s either way: loading spends no compute
    assert decide_reuse(0.0, 0, m).load


def test_decide_reuse_refuses_bad_input():
    m = PrefillModel()
    for est, tokens, model in ((transfer(1.0), -1, m), (-0.5, 10, m), ("fast", 10, m), (transfer(1.0), 10, None)):
        with pytest.raises(InvalidArgumentError):
            decide_reuse(est, tokens, model)  # type: ignore[arg-type]


# ------------------------------------------------------------------ just-in-time prefetch
def test_a_prefetch_starts_its_predicted_time_plus_margin_before_it_is_due():
    due, t, margin = 100.0, 2.5, 0.25
    start = prefetch_start_time(due, transfer(t), margin)
    assert start == pytest.approx(due - t - margin)
    assert prefetch_start_time(due, transfer(t), margin, factor=2.0) == pytest.approx(due - 2 * t - margin)
    assert not should_start_prefetch(start - 0.01, due, transfer(t), margin)  # too early: would hold HBM
    assert should_start_prefetch(start, due, transfer(t), margin)
    assert should_start_prefetch(due + 1.0, due, transfer(t), margin)  # late: start at once


def test_prefetch_timing_refuses_bad_input():
    for args, kw in (((1.0, transfer(1.0), -1.0), {}), ((float("inf"), transfer(1.0)), {}),
                     ((1.0, transfer(1.0)), dict(factor=0.0)), ((1.0, -1.0), {})):
        with pytest.raises(InvalidArgumentError):
            prefetch_start_time(*args, **kw)
    with pytest.raises(InvalidArgumentError):
        should_start_prefetch("now", 1.0, transfer(1.0))  # type: ignore[arg-type]


# ------------------------------------------------------------------ at request time
def test_a_late_prefetch_does_not_delay_the_request():
    m = PrefillModel(fixed_s=0.01, per_token_s=1e-4)
    reused = 2000
    recompute = 0.01 + reused * 1e-4
    assert wait_or_recompute(transfer(recompute * 0.5), m, reused).choice is ReuseChoice.LOAD
    late = wait_or_recompute(transfer(recompute * 2), m, reused)
    assert late.choice is ReuseChoice.RECOMPUTE
    assert late.seconds == pytest.approx(recompute) and late.load_s == pytest.approx(recompute * 2)


async def test_the_policy_runs_on_a_stores_estimates(make_store):
    from .conftest import new_cache_on_disk

    async with make_store(device=4, host=4, disk=32) as mgr:
        cache, _ = await new_cache_on_disk(mgr, 3, seed=1)
        est = cache.transfer_estimate(CacheLevel.DEVICE)
        assert est.pages == 3 and est.seconds > 0
        tokens = cache.num_pages * mgr.layout.tokens_per_page
        fast = PrefillModel(fixed_s=0.0, per_token_s=est.seconds / tokens / 10)  # recompute 10x quicker
        slow = PrefillModel(fixed_s=0.0, per_token_s=est.seconds / tokens * 10)
        assert decide_reuse(est, tokens, fast).choice is ReuseChoice.RECOMPUTE
        assert decide_reuse(est, tokens, slow).choice is ReuseChoice.LOAD
        due = 50.0
        assert should_start_prefetch(due - est.seconds, due, est) and not should_start_prefetch(0.0, due, est)
        cache.close()


def test_a_reuse_forward_model_prices_the_attention_over_the_loaded_prefix():
    """Recomputing 2,000 tokens and loading them cost the same by the prefill line alone (transfer 0.1 s + a
    64-token prefill); a reuse forward measured at 0.2 s over 2,000 reused tokens makes recompute the faster."""
    prefill = PrefillModel(fixed_s=0.0, per_token_s=1e-4)
    reuse = PrefillModel(fixed_s=0.0, per_token_s=1e-4)
    reuse.observe(1000, 0.1)
    reuse.observe(3000, 0.3)  # 1e-4 s per reused token, no fixed cost
    transfer = 2064 * 1e-4 - 64 * 1e-4  # = the prefill of the reused 2,000 tokens
    plain = decide_reuse(transfer, 2000, prefill, new_tokens=64)
    assert plain.choice is ReuseChoice.LOAD
    assert plain.load_s == pytest.approx(transfer + 64 * 1e-4)
    priced = decide_reuse(transfer, 2000, prefill, new_tokens=64, reuse_forward=reuse)
    assert priced.load_s == pytest.approx(transfer + reuse.seconds(2000)) and reuse.seconds(2000) == pytest.approx(0.2)
    assert priced.choice is ReuseChoice.RECOMPUTE and priced.recompute_s == plain.recompute_s
    late = wait_or_recompute(transfer, prefill, 2000, new_tokens=64, reuse_forward=reuse)
    assert late == priced
    with pytest.raises(InvalidArgumentError, match="reuse_forward"):
        decide_reuse(transfer, 2000, prefill, reuse_forward=0.2)


def test_a_reuse_forward_model_seen_at_one_size_does_not_extrapolate_in_proportion():
    """The 8b row of run 11: reuse forwards seen at 1k reused tokens only (45 ms). The prefill priors make the
    fit proportional (90 ms at 2k), so a 2k prefix was recomputed (75 ms) where reusing it took 50 ms."""
    seen = 0.045
    plain, reuse = PrefillModel(), reuse_forward_model()
    for m in (plain, reuse):
        m.observe(1024, seen)
    assert plain.seconds(2048) == pytest.approx(2 * seen)
    assert reuse.seconds(2048) == pytest.approx(seen + 1024 * reuse.per_token_s) and reuse.seconds(2048) < 0.05
    prefill = PrefillModel(fixed_s=0.0, per_token_s=0.075 / 2112)  # 2k + 64 tokens recomputed in 75 ms
    assert decide_reuse(0.0, 2048, prefill, new_tokens=64, reuse_forward=reuse).load
    assert not decide_reuse(0.0, 2048, prefill, new_tokens=64, reuse_forward=plain).load
