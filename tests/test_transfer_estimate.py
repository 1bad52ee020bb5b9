"""Measured path bandwidths and transfer estimates: priors first, measured by real batches, the chain model,
queued bytes, cancellation, bad input."""

from __future__ import annotations

import asyncio
import math
import os

import numpy as np
import pytest

from kvstore import CacheLevel, InvalidArgumentError, PageLayout, PathEstimate, TransferEstimate
from kvstore.transfer import bandwidth as bw
from kvstore.transfer.bandwidth import Bandwidth, PathMeter, estimate_moves
from kvstore.transfer.residency import Residency

from .conftest import LAYOUT, PAGE, gated_io, io_hook, levels, new_cache_on_disk, new_filled_cache, sink_to_disk, slow_io, until

D, H, K, R = CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK, CacheLevel.REMOTE
BIG = PageLayout(num_layers=4, num_kv_heads=8, head_dim=128, tokens_per_page=16)  # 256 KiB pages


def drop_page_cache(mgr) -> None:
    """Evict the store's slot file from the OS page cache. A file system that keeps its files in memory (tmpfs)
    does not evict them; there the probe is told the pages are cold, so the tests check the same pricing."""
    fd = mgr._disk_file.fd
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    if mgr._bandwidth.cached_share(np.arange(4)):
        mgr._bandwidth.residency = lambda slots: 0.0


def sane(e: PathEstimate) -> bool:
    return math.isfinite(e.bytes_per_s) and e.bytes_per_s > 0 and math.isfinite(e.latency_s) and e.latency_s >= 0


# ------------------------------------------------------------------ one path's meter (no store, a fake clock)
def test_a_small_batch_alone_on_its_path_moves_the_latency_only():
    m = PathMeter((K, H), 1e9, 1e-3)
    t = m.begin(10.0)
    m.end(t, 1000, 10.004, ok=True)  # byte time 1 us < latency 1 ms: latency-bound
    assert m.latency_s == pytest.approx(0.004 - 1000 / 1e9)  # the first sample replaces the prior
    assert m.bytes_per_s == 1e9 and m.samples == 1 and m.bandwidth_samples == 0
    t = m.begin(11.0)
    m.end(t, 1000, 11.002, ok=True)
    lat1 = 0.004 - 1e-6
    assert m.latency_s == pytest.approx(lat1 + bw.LATENCY_ALPHA * ((0.002 - 1e-6) - lat1))


def test_a_large_batch_moves_the_bandwidth_with_the_latency_taken_out_once():
    m = PathMeter((K, H), 1e9, 1e-3)
    t = m.begin(0.0)
    m.end(t, 10_000_000, 0.021, ok=True)  # byte time 10 ms at the prior: bandwidth-bound
    assert m.bytes_per_s == pytest.approx(10_000_000 / (0.021 - 1e-3))
    assert m.latency_s == 1e-3 and m.bandwidth_samples == 1 and m.estimate().measured


def test_overlapping_batches_measure_the_aggregate_throughput_not_each_batchs_own():
    m = PathMeter((K, H), 1e9, 1e-3)
    a, b = m.begin(0.0), m.begin(0.0)  # two batches in flight together, 10 MB each
    m.end(a, 10_000_000, 0.020, ok=True)
    m.end(b, 10_000_000, 0.021, ok=True)
    # busy time 21 ms less the latency once carried 20 MB (each batch's own rate would say 10 MB / 20 ms)
    d = bw.BANDWIDTH_DECAY
    expected = (d * 10_000_000 + 10_000_000) / (d * (0.020 - 1e-3) + 0.001)
    assert m.bytes_per_s == pytest.approx(expected)
    assert m.active == 0


def test_a_failed_batch_records_nothing_and_its_time_goes_to_no_other_batch():
    m = PathMeter((K, H), 1e9, 1e-3)
    a, b = m.begin(0.0), m.begin(0.0)
    m.end(a, 10_000_000, 0.050, ok=False)  # failed after 50 ms
    m.end(b, 10_000_000, 0.060, ok=True)
    assert m.bandwidth_samples == 1
    assert m.bytes_per_s == pytest.approx(10_000_000 / (0.010 - 1e-3))  # only the 10 ms after the failure
    m2 = PathMeter((K, H), 1e9, 1e-3)
    m2.end(m2.begin(0.0), 10_000_000, 0.5, ok=False)
    assert m2.estimate() == PathMeter((K, H), 1e9, 1e-3).estimate()


def test_an_overlapped_small_batch_does_not_move_the_latency():
    m = PathMeter((K, H), 1e9, 1e-3)
    a, b = m.begin(0.0), m.begin(0.0)
    m.end(a, 1000, 0.5, ok=True)
    m.end(b, 1000, 0.6, ok=True)
    assert m.latency_s == 1e-3 and m.samples == 0


# ------------------------------------------------------------------ the chain model (pure)
def test_chain_model_of_remote_pages_to_the_device_by_hand():
    band = Bandwidth(cuda=False)
    rh, hd = band.estimate((R, H)), band.estimate((H, D))
    n, pb = 100, 1 << 20
    est = estimate_moves({R: n}, D, pb, band)
    # hops pipelined: every hop's latency once, plus the slowest hop's byte time
    slowest = max(n * pb / rh.bytes_per_s, n * pb / hd.bytes_per_s)
    assert est.seconds == pytest.approx(rh.latency_s + hd.latency_s + slowest)
    assert set(est.paths) == {(R, H), (H, D)} and est.pages == n and est.bytes == n * pb
    # host pages share the host -> device hop with the remote pages; routes run concurrently: the slowest counts
    both = estimate_moves({R: n, H: 50}, D, pb, band)
    assert both.paths[(H, D)].pages == n + 50
    remote_route = rh.latency_s + hd.latency_s + max(n * pb / rh.bytes_per_s, (n + 50) * pb / hd.bytes_per_s)
    host_route = hd.latency_s + (n + 50) * pb / hd.bytes_per_s
    assert both.seconds == pytest.approx(max(remote_route, host_route))


def test_queued_bytes_go_first_on_the_hops_they_share():
    band = Bandwidth(cuda=False)
    kd = band.estimate((K, D))
    est = estimate_moves({K: 10}, D, PAGE, band, queued={(K, D): 1 << 20, (H, K): 1 << 30})
    assert est.paths[(K, D)].queued_bytes == 1 << 20
    assert est.seconds == pytest.approx(kd.latency_s + (10 * PAGE + (1 << 20)) / kd.bytes_per_s)  # (H, K) not used


def test_cuda_disk_to_device_is_the_pipeline_of_its_two_hops_until_measured():
    band = Bandwidth(cuda=True)
    kh, hd = band.estimate((K, H)), band.estimate((H, D))
    kd = band.estimate((K, D))
    assert kd.bytes_per_s == min(kh.bytes_per_s, hd.bytes_per_s)
    assert kd.latency_s == pytest.approx(kh.latency_s + hd.latency_s) and not kd.measured


# ------------------------------------------------------------------ on a store
async def test_estimates_start_as_the_priors_for_the_configured_paths(make_store):
    async with make_store(device=4, host=4, disk=32) as mgr:
        est = mgr.bandwidth_estimates
        assert set(est) == {(a, b) for a in (D, H, K) for b in (D, H, K) if a != b}  # no remote tier: no (R, H)
        pri = bw.priors(cuda=mgr.device_pool.is_cuda)  # the store's device tier is CUDA on a GPU machine
        for path, e in est.items():
            assert not e.measured and e.samples == 0
            assert (e.bytes_per_s, e.latency_s) == pytest.approx(pri[path])
        with pytest.raises(TypeError):
            est[(D, H)] = est[(H, D)]  # type: ignore[index]  # read-only
    async with make_store(device=4, host=0, disk=8) as mgr:
        assert set(mgr.bandwidth_estimates) == {(D, K), (K, D)}


async def test_demotions_and_prefetches_measure_their_paths(make_store):
    async with make_store(device=4, host=4, disk=32) as mgr:
        cache, _ = await new_cache_on_disk(mgr, 3, seed=1)  # demotions device -> host -> disk
        est = mgr.bandwidth_estimates
        assert est[(D, H)].measured and est[(H, K)].measured
        assert not est[(K, D)].measured
        share = mgr._bandwidth.cached_share(mgr._placement.slots_at(cache._pages, K))
        result = await cache.prefetch(D)
        assert result.complete
        est, hot = mgr.bandwidth_estimates, mgr.page_cache_read_estimates
        filed, other = (hot, est) if share is not None and share >= bw.CACHED_FROM else (est, hot)
        assert filed[(K, D)].measured and filed[(K, D)].samples >= 1  # disk -> device is a direct path here
        assert not other[(K, D)].measured  # a read is filed as cached or as cold, never both
        assert all(sane(e) for e in est.values())
        assert cache.transfer_estimate(D).seconds == 0.0  # every page is there now


async def test_large_batches_move_the_bandwidth(make_store):
    async with make_store(device=16, host=0, disk=32, layout=BIG) as mgr:
        cache, _ = await new_filled_cache(mgr, 16, seed=2)
        prior = mgr.bandwidth_estimates[(D, K)]
        await mgr.set_quota(D, BIG.page_bytes)  # 15 pages of 256 KiB demoted to disk at once: bandwidth-bound
        after = mgr.bandwidth_estimates[(D, K)]
        assert after.bandwidth_samples >= 1 and after.bytes_per_s != prior.bytes_per_s and sane(after)
        assert levels(cache) == {D: 1, K: 15}


async def test_estimates_scale_with_page_counts_and_pages_at_the_target_cost_nothing(make_store):
    async with make_store(device=4, host=4, disk=32) as mgr:
        kd = mgr.bandwidth_estimates[(K, D)]
        one, two = mgr.transfer_estimate({K: 10}, D), mgr.transfer_estimate({K: 20}, D)
        assert isinstance(one, TransferEstimate)
        assert one.seconds == pytest.approx(kd.latency_s + 10 * PAGE / kd.bytes_per_s)
        assert two.seconds - one.seconds == pytest.approx(10 * PAGE / kd.bytes_per_s)
        assert (one.pages, one.bytes, two.bytes) == (10, 10 * PAGE, 20 * PAGE)
        assert one.paths[(K, D)].pages == 10
        for counts, target in (({D: 5}, D), ({D: 5, H: 3}, H), ({D: 1, H: 1, K: 2}, K), ({}, D)):
            est = mgr.transfer_estimate(counts, target)
            assert (est.seconds, est.pages, est.bytes, est.paths) == (0.0, 0, 0, {})
        mixed = mgr.transfer_estimate({D: 7, H: 2, K: 3}, H)  # only the disk pages move to the host
        assert set(mixed.paths) == {(K, H)} and mixed.pages == 3


async def test_disk_pages_cost_more_than_host_pages_when_the_disk_is_slower(make_store):
    async with make_store(device=4, host=4, disk=32) as mgr:
        est = mgr.bandwidth_estimates
        assert est[(K, D)].seconds(4 * PAGE) > est[(H, D)].seconds(4 * PAGE)  # the priors say so
        assert mgr.transfer_estimate({K: 4}, D).seconds > mgr.transfer_estimate({H: 4}, D).seconds
        on_disk, _ = await new_cache_on_disk(mgr, 2, seed=4)
        on_host, _ = await new_filled_cache(mgr, 2, seed=3)
        filler, _ = await new_filled_cache(mgr, 4, seed=5)  # pushes on_host down to the (empty) host level
        filler.close()
        assert levels(on_host) == {H: 2} and levels(on_disk) == {K: 2}
        drop_page_cache(mgr)  # a cold read: the cold meter
        with slow_io(mgr, 0.02):  # measured: every disk batch takes 20 ms more
            await on_disk.prefetch(D)
        await on_host.prefetch(D)
        est = mgr.bandwidth_estimates
        assert est[(K, D)].measured and est[(H, D)].measured
        assert est[(K, D)].latency_s > est[(H, D)].latency_s
        assert mgr.transfer_estimate({K: 2}, D).seconds > mgr.transfer_estimate({H: 2}, D).seconds
        # a mixed set takes the slower route (they run concurrently), not the sum
        mixed = mgr.transfer_estimate({H: 2, K: 2}, D)
        assert mixed.seconds == pytest.approx(max(mixed.paths[(K, D)].seconds, mixed.paths[(H, D)].seconds))


async def _committed_prefix(mgr, pages: int, on_disk: bool = False) -> list[int]:
    """Tokens of ``pages`` whole pages committed by a cache closed since (its pages stay indexed), on disk if
    ``on_disk``."""
    tokens = list(range(pages * LAYOUT.tokens_per_page))
    cache = mgr.create_cache(tokens)
    await cache.resume()
    await cache.resize(len(tokens))
    cache.commit(tokens)
    cache.suspend()
    if on_disk:
        await sink_to_disk(mgr, cache)
    cache.close()
    return tokens


async def test_prefix_transfer_estimate_uses_the_local_match(make_store):
    async with make_store(device=4, host=4, disk=32) as mgr:
        tokens = await _committed_prefix(mgr, 3)
        match = mgr.lookup(tokens)
        assert mgr.prefix_transfer_estimate(tokens, D) == mgr.transfer_estimate(match.pages_per_level, D)
        assert mgr.prefix_transfer_estimate([1, 2], D).seconds == 0.0  # no whole page: nothing to move


async def test_lookup_with_a_target_prices_the_match_from_one_pass_over_the_tokens(make_store):
    async with make_store(device=4, host=4, disk=32) as mgr:
        tokens = await _committed_prefix(mgr, 3, on_disk=True)
        calls = []
        real = mgr._match
        mgr._match = lambda arr: calls.append(1) or real(arr)
        match = mgr.lookup(tokens, D)
        assert len(calls) == 1, "the match and its estimate come from one hashing of the tokens"
        assert match.pages_per_level[K] == 3 and match.num_tokens == 3 * LAYOUT.tokens_per_page
        assert match.estimate == mgr.prefix_transfer_estimate(tokens, D) and match.estimate.pages == 3
        assert mgr.lookup(tokens).estimate is None  # no target: no estimate
        with pytest.raises(InvalidArgumentError):
            mgr.lookup(tokens, "device")


async def test_a_prefetch_in_flight_is_counted_as_queued_bytes_once(make_store):
    async with make_store(device=8, host=0, disk=32, batch_bytes=2 * PAGE) as mgr:
        cache, _ = await new_cache_on_disk(mgr, 6, seed=5)
        idle = mgr.transfer_estimate({K: 6}, D)
        assert idle.paths[(K, D)].queued_bytes == 0
        with gated_io(mgr) as gate:
            task = cache.prefetch(D)
            await until(lambda: mgr._executor.queued.get((K, D), 0) > 0, "the prefetch's batches are queued")
            busy = mgr.transfer_estimate({K: 6}, D)
            queued = busy.paths[(K, D)].queued_bytes
            assert 0 < queued <= 6 * PAGE and busy.seconds > idle.seconds
            left = cache.transfer_estimate(D)  # the moving pages are in the queue, not counted twice
            assert left.pages * PAGE + queued == 6 * PAGE
            gate.set()
            assert (await task).complete
        assert mgr._executor.queued == {}
        assert cache.transfer_estimate(D).seconds == 0.0


async def test_cancelled_prefetches_leave_the_estimates_sane_and_record_no_unstarted_batch(make_store):
    async with make_store(device=8, host=0, disk=32, batch_bytes=PAGE) as mgr:
        for round_ in range(3):
            cache, _ = await new_cache_on_disk(mgr, 6, seed=6 + round_)
            before = mgr.bandwidth_estimates[(K, D)].samples
            moved_before = mgr.stats().get("pages_disk_to_device", 0)
            with gated_io(mgr) as gate:
                task = cache.prefetch(D)
                await until(lambda: mgr._executor.queued.get((K, D), 0) > 0, "the prefetch started")
                await asyncio.sleep(0.01)
                task.cancel()
                gate.set()
                result = await task
            assert result.cancelled
            meter = mgr._bandwidth.meters[(K, D)]
            assert meter.active == 0 and mgr._executor.queued == {}
            batches_run = mgr.stats().get("pages_disk_to_device", 0) - moved_before  # one page per batch
            assert mgr.bandwidth_estimates[(K, D)].samples - before <= batches_run
            assert all(sane(e) for e in mgr.bandwidth_estimates.values())
            assert cache.transfer_estimate(D).seconds >= 0
            assert result.pages_moved == 6 - levels(cache).get(K, 0), round_  # each page at its old level or new
            cache.close()


async def test_a_failed_transfer_records_nothing(make_store):
    async with make_store(device=8, host=0, disk=32) as mgr:
        cache, _ = await new_cache_on_disk(mgr, 2, seed=7)
        before = mgr.bandwidth_estimates[(K, D)]

        def fail(op, off, n):
            raise OSError(5, "injected")

        with io_hook(mgr, fail):
            with pytest.raises(Exception):
                await cache.prefetch(D)
        assert mgr.bandwidth_estimates[(K, D)] == before
        assert mgr._bandwidth.meters[(K, D)].active == 0


async def test_bad_input_says_what_to_do(make_store):
    async with make_store(device=4, host=0, disk=8) as mgr:
        for counts, target, words in (
            ({K: -1}, D, "page count >= 0"),
            ({K: 1.5}, D, "page count >= 0"),
            ({K: True}, D, "page count >= 0"),
            ([(K, 1)], D, "mapping"),
            ({7: 1}, D, "CacheLevel"),
            ({"disk": 1}, D, "CacheLevel"),
            ({H: 1}, D, "not configured"),
            ({R: 1}, D, "not configured"),
            ({K: 1}, H, "not configured"),
            ({K: 1}, R, "REMOTE"),
            ({K: 1}, "device", "CacheLevel"),
        ):
            with pytest.raises(InvalidArgumentError, match=words):
                mgr.transfer_estimate(counts, target)  # type: ignore[arg-type]
        assert mgr.transfer_estimate({H: 0, R: 0, K: 2}, D).pages == 2  # an unconfigured level with 0 pages is fine
        assert mgr.transfer_estimate({K: 2}, K).seconds == 0.0


async def test_remote_fetches_measure_the_remote_path(tmp_path, redis_server):
    from .test_remote import commit_prompt, fresh_namespace, node, tokens_of

    ns = fresh_namespace()
    toks = tokens_of(6, seed=11)
    async with node(tmp_path, redis_server.url, ns) as a, node(tmp_path, redis_server.url, ns) as b:
        await commit_prompt(a, toks)
        await a.flush(5)
        assert not b.bandwidth_estimates[(R, H)].measured
        match = await b.lookup_remote(toks)
        assert match.pages_per_level[R] == 6
        est = b.transfer_estimate(match.pages_per_level, D)
        assert set(est.paths) == {(R, H), (H, D)} and est.seconds > 0
        with pytest.raises(InvalidArgumentError, match="never DISK"):
            b.transfer_estimate(match.pages_per_level, K)
        assert (await b.fetch_prefix(toks)).complete
        assert b.bandwidth_estimates[(R, H)].measured and sane(b.bandwidth_estimates[(R, H)])


# ------------------------------------------------------------------ disk reads from the page cache vs cold
def test_a_disk_read_is_filed_cached_or_cold_by_the_probe_and_priced_apart():
    meters = Bandwidth(cuda=False)
    slots = np.arange(4)
    ticket = meters.begin(K, D, slots)  # no probe (no disk tier): a cold read
    assert not ticket.cached
    meters.end(ticket, 0, ok=False)
    meters.residency = lambda s: 0.75
    ticket = meters.begin(K, D, slots)
    assert ticket.cached
    meters.end(ticket, 10 * PAGE)
    assert meters.cached_meters[(K, D)].samples == 1 and meters.meters[(K, D)].samples == 0
    meters.residency = lambda s: 0.25
    assert not meters.begin(K, H, slots).cached and not meters.begin(H, K, slots).cached  # writes never probe
    cold, fast = meters.estimate((K, D)), meters.estimate((K, D), cached=True)
    cold_only = estimate_moves({K: 8}, D, PAGE, meters)
    part = estimate_moves({K: 8}, D, PAGE, meters, disk_cached=6)
    all_hot = estimate_moves({K: 8}, D, PAGE, meters, disk_cached=8)
    assert cold_only.seconds == pytest.approx(cold.seconds(8 * PAGE))
    assert part.seconds == pytest.approx(cold.latency_s + 2 * PAGE / cold.bytes_per_s + 6 * PAGE / fast.bytes_per_s)
    assert all_hot.seconds == pytest.approx(fast.seconds(8 * PAGE))
    assert part.paths[(K, D)].pages == 8 and part.paths[(K, D)].seconds == pytest.approx(part.seconds)
    assert estimate_moves({K: 8, H: 2}, H, PAGE, meters, disk_cached=8).seconds == pytest.approx(
        meters.estimate((K, H), cached=True).seconds(8 * PAGE))


def test_the_probe_tells_cached_pages_from_dropped_ones(tmp_path):
    """A real file: written pages are cached, dropped ones (POSIX_FADV_DONTNEED after a sync) are not, and a read
    brings them back. On a file system that keeps files in memory (tmpfs) nothing is dropped: the probe says so."""
    stride = 64 << 10
    path = tmp_path / "slots"
    path.write_bytes(os.urandom(32 * stride))
    fd = os.open(path, os.O_RDONLY)
    try:
        probe = Residency(fd, stride, stride)
        assert probe.available
        assert probe.fraction(np.arange(32)) == 1.0
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert probe.fraction(np.arange(32)) == (1.0 if _in_memory_fs(path) else 0.0)
        os.pread(fd, 4 * stride, 0)
        assert probe.fraction(np.arange(4)) == 1.0
        assert probe.fraction(np.arange(0)) is None
    finally:
        os.close(fd)


async def test_estimates_of_known_pages_price_their_cached_share_and_reads_are_filed_by_it(make_store):
    async with make_store(device=4, host=4, disk=32) as mgr:
        cache, _ = await new_cache_on_disk(mgr, 3, seed=7)
        slots = mgr._placement.slots_at(cache._pages, K)
        assert len(slots) == 3 and mgr._bandwidth.cached_share(slots) == 1.0  # just written
        hot = cache.transfer_estimate(D)
        drop_page_cache(mgr)
        assert mgr._bandwidth.cached_share(slots) == 0.0
        cold = cache.transfer_estimate(D)
        assert cold == mgr.transfer_estimate({K: 3}, D)  # counts alone: priced cold
        assert hot.seconds < cold.seconds  # the priors: 8 GB/s cached against 1.5 GB/s cold
        assert hot.paths[(K, D)].estimate.bytes_per_s == pytest.approx(
            mgr.page_cache_read_estimates[(K, D)].bytes_per_s)
        await cache.prefetch(D)  # a cold read
        assert mgr.bandwidth_estimates[(K, D)].measured and not mgr.page_cache_read_estimates[(K, D)].measured
        assert set(mgr.page_cache_read_estimates) == {(K, D), (K, H)}


def _in_memory_fs(path) -> bool:
    """Whether ``path`` lives on tmpfs/ramfs (its pages are the file: never dropped), by /proc/self/mounts."""
    best, kind = "", ""
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, point, fstype = line.split()[:3]
            if str(path).startswith(point.rstrip("/") + "/") and len(point) > len(best):
                best, kind = point, fstype
    return kind in ("tmpfs", "ramfs")
