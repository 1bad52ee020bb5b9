"""Run coalescing of the batched copier (pure numpy; the driver calls are tested in test_cuda.py)."""

import random

import pytest

from kvstore.transfer.batchcopy import load, runs
from kvstore.transfer.copier import coalesce


def _expand(d0, s0, n):
    return sorted((s + i, d + i) for d, s, k in zip(d0, s0, n) for i in range(k))


def test_runs_coalesce_rows_contiguous_on_both_sides():
    d0, s0, n = runs([10, 11, 12, 3, 4, 7], [0, 1, 2, 3, 4, 9])
    assert (d0.tolist(), s0.tolist(), n.tolist()) == ([10, 3, 7], [0, 3, 9], [3, 2, 1])


def test_runs_break_where_only_one_side_is_contiguous():
    d0, s0, n = runs([0, 2, 3], [0, 1, 2])
    assert (d0.tolist(), s0.tolist(), n.tolist()) == ([0, 2], [0, 1], [1, 2])


@pytest.mark.parametrize("seed", range(20))
def test_runs_cover_every_pair_exactly_once(seed):
    rng = random.Random(seed)
    k = rng.randrange(0, 200)
    src = rng.sample(range(1000), k)
    dst = rng.sample(range(1000), k)
    if rng.random() < 0.5:  # long contiguous stretches too
        base = rng.randrange(500)
        src, dst = list(range(base, base + k)), list(range(k))
    d0, s0, n = runs(dst, src)
    assert _expand(d0, s0, n) == sorted(zip(src, dst))
    assert (n >= 1).all() and n.sum() == k
    assert coalesce(dst, src) == list(zip(d0.tolist(), s0.tolist(), n.tolist()))


def test_runs_refuse_mismatched_row_lists():
    with pytest.raises(ValueError, match="equally long"):
        runs([1, 2], [1])


def test_load_without_a_driver_library_is_none(monkeypatch):
    import ctypes

    def no_lib(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_lib)
    assert load(0) is None


def test_batched_copies_are_opt_in(monkeypatch):
    from kvstore.transfer import batchcopy

    monkeypatch.delenv("KVSTORE_BATCH_COPIES", raising=False)
    assert not batchcopy.enabled()
    monkeypatch.setenv("KVSTORE_BATCH_COPIES", "1")
    assert batchcopy.enabled()
