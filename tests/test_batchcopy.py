"""Run coalescing of the batched copier (pure numpy; the driver calls are tested in test_cuda.py)."""

import ctypes
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

    def no_lib(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_lib)
    assert load(0) is None


def test_batched_copies_are_the_default_and_can_be_turned_off(monkeypatch):
    from kvstore.transfer import batchcopy

    monkeypatch.delenv("KVSTORE_BATCH_COPIES", raising=False)
    assert batchcopy.enabled()
    monkeypatch.setenv("KVSTORE_BATCH_COPIES", "0")
    assert not batchcopy.enabled()


_STAND_IN_DRIVER = r"""
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
typedef struct { int type; int id; } loc_t;
typedef struct { int order; loc_t src; loc_t dst; unsigned flags; } attrs_t;
static int ctx_token;
int cuDriverGetVersion(int *v) { *v = 13000; return 0; }
int cuCtxGetCurrent(void **ctx) { *ctx = &ctx_token; return 0; }
int cuDeviceGet(int *d, int ordinal) { *d = ordinal; return 0; }
int cuDevicePrimaryCtxRetain(void **ctx, int d) { *ctx = &ctx_token; return 0; }
int cuCtxSetCurrent(void *ctx) { return 0; }
unsigned long long last_stream;
size_t last_count;
/* events: how many recorded events no synchronize has waited for yet, at most, when a copy is queued */
typedef struct { int queued; } event_t;
int queued_events, most_queued_at_a_copy, synchronized, created;
int cuEventCreate(event_t **e, unsigned flags) { *e = calloc(1, sizeof(event_t)); created++; return flags == 3 ? 0 : 1; }
int cuEventRecord(event_t *e, void *stream) { if (!e->queued) queued_events++; e->queued = 1; return 0; }
int cuEventSynchronize(event_t *e) { if (e->queued) queued_events--; e->queued = 0; synchronized++; return 0; }
void reset_event_counts(void) { queued_events = most_queued_at_a_copy = synchronized = created = 0; }
int cuMemcpyBatchAsync_v2(void **dsts, void **srcs, size_t *sizes, size_t count, attrs_t *attrs,
                          size_t *attr_idx, size_t num_attrs, void *stream) {
    if (num_attrs != 1 || attr_idx[0] != 0 || attrs->order != 1) return 1;
    if (queued_events > most_queued_at_a_copy) most_queued_at_a_copy = queued_events;
    for (size_t i = 0; i < count; i++) memcpy(dsts[i], srcs[i], sizes[i]);
    last_stream = (unsigned long long)stream;
    last_count = count;
    return 0;
}
"""


@pytest.fixture(scope="module")
def stand_in_driver(tmp_path_factory):
    """A libcuda stand-in whose batched copy is memcpy on host addresses (gcc builds it)."""
    import shutil
    import subprocess

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.fail("a C compiler (gcc) is needed to build the driver stand-in")
    d = tmp_path_factory.mktemp("fake_cuda")
    (d / "fake.c").write_text(_STAND_IN_DRIVER)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(d / "libcuda.so"), str(d / "fake.c")], check=True)
    return str(d / "libcuda.so")


def test_batch_copier_hands_the_driver_full_64_bit_addresses(stand_in_driver, monkeypatch):
    """Addresses above 4 GiB reach the driver whole (an undeclared ctypes argument is a 32-bit int: the copy
    then writes to a truncated address, which crashed the H200 run); sizes, chunking and the stream too."""
    import ctypes.util

    import numpy as np

    from kvstore.transfer import batchcopy

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: stand_in_driver)
    monkeypatch.setattr(batchcopy, "CHUNK", 7)
    copier = load(0)
    assert copier is not None
    width = 96
    import mmap

    rows_total = 64 << 10
    maps = [mmap.mmap(-1, rows_total * width) for _ in range(2)]  # anonymous maps sit far above 4 GiB on Linux
    src, dst = (np.frombuffer(m, dtype=np.uint8).reshape(rows_total, width) for m in maps)
    src[:] = np.random.default_rng(0).integers(0, 255, size=src.shape, dtype=np.uint8)
    assert src.ctypes.data > 1 << 32 and dst.ctypes.data > 1 << 32
    rows = np.random.default_rng(1).permutation(src.shape[0])[:50]
    d0, s0, n = runs(rows[::-1].copy(), rows)
    base_d, base_s = np.uint64(dst.ctypes.data), np.uint64(src.ctypes.data)
    copier.copy(base_d + (d0 * width).astype(np.uint64), base_s + (s0 * width).astype(np.uint64),
                (n * width).astype(np.uint64), "h2d", 0xDEADBEEF12)
    assert (dst[rows[::-1]] == src[rows]).all()
    assert not dst[np.setdiff1d(np.arange(src.shape[0]), rows)].any()
    lib = ctypes.CDLL(stand_in_driver)
    assert ctypes.c_ulonglong.in_dll(lib, "last_stream").value == 0xDEADBEEF12
    assert ctypes.c_size_t.in_dll(lib, "last_count").value == (len(n) % 7 or 7)


def _queue_copier(stand_in_driver, monkeypatch, bound: int):
    """A copier on the stand-in driver, 4 copies per call, ``bound`` queued copies; and the driver library
    with its event counters reset."""
    import ctypes.util

    from kvstore.transfer import batchcopy

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: stand_in_driver)
    monkeypatch.setattr(batchcopy, "CHUNK", 4)
    monkeypatch.setattr(batchcopy, "QUEUED_COPIES", bound)
    lib = ctypes.CDLL(stand_in_driver)
    lib.reset_event_counts()
    copier = load(0)
    assert copier is not None
    return copier, lambda name: ctypes.c_int.in_dll(lib, name).value


def test_batch_copier_keeps_at_most_queued_copies_per_stream(stand_in_driver, monkeypatch):
    """Each driver call is followed by an event; once more than QUEUED_COPIES copies are queued the issuing
    thread waits for its oldest calls, so the driver's command queue never fills (a full one blocked the H200's
    event-loop CUDA calls for 20-2000 ms). The newest call is never waited for; events are reused."""
    import numpy as np

    copier, value = _queue_copier(stand_in_driver, monkeypatch, 10)
    src = np.arange(400, dtype=np.uint8)
    dst = np.zeros(400, dtype=np.uint8)
    n_runs = 100  # 25 driver calls of 4 copies of 4 bytes
    offsets = np.arange(n_runs, dtype=np.uint64) * np.uint64(4)
    sizes = np.full(n_runs, 4, dtype=np.uint64)
    copier.copy(np.uint64(dst.ctypes.data) + offsets, np.uint64(src.ctypes.data) + offsets, sizes, "d2h", 7)
    assert (dst == src).all()
    assert value("most_queued_at_a_copy") == 2  # 2 calls = 8 copies queued when the next is made; never 3 (12)
    assert value("synchronized") == 25 - 2  # waited for every call but the last two
    assert value("created") == 3  # one more than ever queued at once, recycled
    # a second request on the same stream continues the count: the two calls still queued are waited for
    copier.copy(np.uint64(dst.ctypes.data) + offsets[:4], np.uint64(src.ctypes.data) + offsets[:4], sizes[:4], "d2h", 7)
    assert value("synchronized") == 24 and value("most_queued_at_a_copy") == 2


def test_an_unbounded_queue_never_waits(stand_in_driver, monkeypatch):
    import numpy as np

    copier, value = _queue_copier(stand_in_driver, monkeypatch, 0)
    buf = np.zeros(400, dtype=np.uint8)
    offsets = np.arange(100, dtype=np.uint64) * np.uint64(4)
    copier.copy(np.uint64(buf.ctypes.data) + offsets, np.uint64(buf.ctypes.data) + offsets,
                np.full(100, 4, dtype=np.uint64), "d2h", 9)
    assert value("synchronized") == 0
