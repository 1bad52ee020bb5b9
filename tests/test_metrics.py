"""kvstore.metrics: a Prometheus collector over stats(), usage() and the latency histograms, scraped as text."""

from __future__ import annotations

import asyncio

import pytest

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import kvstore.metrics  # noqa: E402
from kvstore import CacheLevel, InvalidArgumentError  # noqa: E402

from .conftest import PAGE, gated_io, new_cache_on_disk, new_filled_cache, until  # noqa: E402

D, H, K = CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parsed exposition text: (sample name, sorted labels) -> value."""
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def get(found, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


async def test_scrape_reports_counters_gauges_and_latency_histograms(make_store):
    registry = CollectorRegistry()
    async with make_store(device=4, host=4, disk=32, namespace="llama/tp0") as mgr:
        collector = kvstore.metrics.register(mgr, registry)
        a, _ = await new_cache_on_disk(mgr, 3, seed=1)
        res = await a.prefetch(H)
        assert res.pages_moved == 3
        resumes_before = get(samples(registry), "kvstore_resume_seconds_count", namespace="llama/tp0")
        await a.resume()  # host -> device
        found = samples(registry)
        stats, ns = mgr.stats(), "llama/tp0"
        assert get(found, "kvstore_pages_moved_total", namespace=ns, src="disk", dst="host") == stats["pages_disk_to_host"] == 3
        assert get(found, "kvstore_bytes_moved_total", namespace=ns, src="host", dst="device") == stats["bytes_host_to_device"]
        assert get(found, "kvstore_evictions_total", namespace=ns, level="device") == stats["evictions_device"]
        assert get(found, "kvstore_prefetches_total", namespace=ns) == stats["prefetches"] == 1
        assert get(found, "kvstore_io_errors_total", namespace=ns) == 0
        for level in (D, H, K):
            u = mgr.usage(level)
            assert get(found, "kvstore_tier_used_pages", namespace=ns, level=level.label) == u.used_pages
            assert get(found, "kvstore_tier_free_pages", namespace=ns, level=level.label) == u.free_pages
            assert get(found, "kvstore_tier_quota_bytes", namespace=ns, level=level.label) == mgr.quota(level)
        assert get(found, "kvstore_resume_seconds_count", namespace=ns) == resumes_before + 1
        assert get(found, "kvstore_resume_seconds_bucket", namespace=ns, le="+Inf") == get(
            found, "kvstore_resume_seconds_count", namespace=ns)
        assert get(found, "kvstore_prefetch_seconds_count", namespace=ns) == 1
        assert get(found, "kvstore_prefetch_seconds_sum", namespace=ns) == pytest.approx(res.seconds)
        assert get(found, "kvstore_io_seconds_count", namespace=ns, op="read") >= 1
        assert get(found, "kvstore_io_seconds_count", namespace=ns, op="write") >= 1
        assert get(found, "kvstore_fetch_prefix_seconds_count", namespace=ns) == 0
        assert isinstance(collector, kvstore.metrics.KVStoreCollector)


async def test_room_waits_are_timed(make_store):
    registry = CollectorRegistry()
    async with make_store(device=4, host=4, disk=64, batch_bytes=PAGE) as mgr:
        kvstore.metrics.register(mgr, registry)
        a, _ = await new_cache_on_disk(mgr, 4, seed=1)
        b, _ = await new_cache_on_disk(mgr, 4, seed=2)
        with gated_io(mgr) as gate:
            pf = a.prefetch(D)
            await until(lambda: any(p.move is not None for p in a._pages), "the prefetch planned its reads")
            resuming = asyncio.ensure_future(b.resume())
            await asyncio.sleep(0.05)
            gate.set()
            await resuming
        await pf
        found = samples(registry)
        assert mgr.stats()["room_waits"] >= 1
        assert get(found, "kvstore_room_wait_seconds_count", namespace="") == 1
        assert get(found, "kvstore_room_wait_seconds_sum", namespace="") >= 0.04


async def test_a_scrape_on_another_thread_reads_the_manager_on_its_loop(make_store):
    registry = CollectorRegistry()
    async with make_store(namespace="m") as mgr:
        kvstore.metrics.register(mgr, registry)
        cache, _ = await new_filled_cache(mgr, 2, seed=1)
        text = (await asyncio.to_thread(generate_latest, registry)).decode()  # like start_http_server's thread
        assert 'kvstore_tier_used_pages{level="device",namespace="m"} 2.0' in text
        cache.close()


async def test_managers_in_one_registry_share_one_collector(make_store, tmp_path):
    registry = CollectorRegistry()
    async with make_store(namespace="a", disk=0) as one, make_store(namespace="b", disk=0) as two:
        c1 = kvstore.metrics.register(one, registry)
        c2 = kvstore.metrics.register(two, registry)
        assert c1 is c2
        found = samples(registry)
        for ns in ("a", "b"):
            assert get(found, "kvstore_tier_total_pages", namespace=ns, level="device") == 4


async def test_register_refuses_what_is_not_a_manager():
    with pytest.raises(InvalidArgumentError, match="needs a KVCacheManager"):
        kvstore.metrics.register(object(), CollectorRegistry())


async def test_every_metric_the_grafana_dashboard_queries_is_exported(make_store):
    import json
    import re
    from pathlib import Path

    dash = json.loads((Path(__file__).resolve().parent.parent / "docs" / "grafana" / "kvstore-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    queried = {m for e in exprs for m in re.findall(r"\bkvstore_[a-z_]+", e)}
    registry = CollectorRegistry()
    async with make_store() as mgr:
        kvstore.metrics.register(mgr, registry)
        exported = {name for name, _ in samples(registry)}
    assert queried and queried - exported == set()
