"""Remote tier pieces that need no server: URLs and redaction, config checks, keys, value codec, breaker."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore import (
    CacheLevel, ConfigError, DeviceTier, DiskTier, HostTier, InvalidArgumentError, KVCacheManager, RemoteTier,
    StoreConfig,
)
from kvstore.remote import codec
from kvstore.remote.breaker import Breaker
from kvstore.remote.keys import KeySpace
from kvstore.remote.url import parse_url, redact

from .conftest import LAYOUT, PAGE


def test_url_forms_parse():
    u = parse_url("redis://alice:s3cret@10.0.0.1:6380/2")
    assert (u.tls, u.cluster, u.nodes, u.db, u.username, u.password) == (False, False, (("10.0.0.1", 6380),), 2, "alice", "s3cret")
    assert parse_url("rediss://h:1").tls
    c = parse_url("redis+cluster://:pw@a:1,b:2")
    assert c.cluster and c.nodes == (("a", 1), ("b", 2)) and c.password == "pw" and c.username is None
    assert parse_url("redis://h").nodes == (("h", 6379),)


@pytest.mark.parametrize("url", ["http://h:1", "h:1", "redis://h:0", "redis://h:x", "redis://a:1,b:2",
                                 "redis://h:1/db", "redis+cluster://h:1/3"])
def test_bad_urls_are_config_errors(url):
    with pytest.raises(ConfigError):
        parse_url(url)


def test_credentials_never_shown():
    url = "redis://user:hunter2@h:1"
    assert "hunter2" not in redact(url) and "user" not in redact(url)
    assert "hunter2" not in repr(RemoteTier(url))
    assert "hunter2" not in repr(parse_url(url))
    with pytest.raises(ConfigError) as err:
        parse_url("redis://user:hunter2@h:notaport")
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("kw", [dict(ttl_s=0), dict(ttl_s=-1.0), dict(ttl_s=True), dict(ttl_s=float("nan")),
                                dict(ttl_s="60"), dict(timeout_s=0), dict(timeout_s=float("inf")),
                                dict(max_pending_pages=0), dict(max_pending_pages=1.5)])
def test_remote_tier_fields_validated(kw):
    with pytest.raises(ConfigError):
        RemoteTier("redis://h:1", **kw)


def test_remote_tier_is_last_and_needs_a_host_tier(tmp_path):
    dev, host, disk, rem = DeviceTier(4 * PAGE), HostTier(4 * PAGE), DiskTier(4 * PAGE, tmp_path), RemoteTier("redis://h:1")
    cfg = StoreConfig(LAYOUT, [dev, host, disk, rem])
    assert cfg.remote is rem and cfg.levels == (CacheLevel.DEVICE, CacheLevel.HOST, CacheLevel.DISK)
    assert StoreConfig(LAYOUT, [dev, host], remote=rem).remote is rem
    with pytest.raises(ConfigError, match="last"):
        StoreConfig(LAYOUT, [dev, host, rem, disk])
    with pytest.raises(ConfigError, match="HostTier"):
        StoreConfig(LAYOUT, [dev, rem])
    with pytest.raises(ConfigError, match="more than one"):
        StoreConfig(LAYOUT, [dev, host, rem, rem])


async def test_remote_is_not_a_placement_level():
    cfg = StoreConfig(LAYOUT, [DeviceTier(4 * PAGE), HostTier(4 * PAGE), RemoteTier("redis://127.0.0.1:1", timeout_s=0.2)])
    async with KVCacheManager(cfg) as mgr:
        for call in (lambda: mgr.usage(CacheLevel.REMOTE), lambda: mgr.quota(CacheLevel.REMOTE)):
            with pytest.raises(InvalidArgumentError):
                call()
        cache = mgr.create_cache()
        with pytest.raises(InvalidArgumentError):
            cache.prefetch(CacheLevel.REMOTE)
        stats = mgr.stats()
        for key in ("pages_host_to_remote", "bytes_device_to_remote", "pages_remote_to_host", "remote_hits",
                    "remote_misses", "remote_errors", "remote_corrupt", "remote_write_dropped"):
            assert stats[key] == 0, key
        assert "evictions_remote" not in stats
        cache.close()


def test_keys_carry_scope_not_tokens_or_namespace():
    a, b = KeySpace("tenant-a", LAYOUT.fingerprint()), KeySpace("tenant-b", LAYOUT.fingerprint())
    page_key = bytes(range(32))
    assert a.key(page_key) != b.key(page_key)
    assert KeySpace("tenant-a", "other-layout").key(page_key) != a.key(page_key)
    assert b"tenant" not in a.key(page_key) and a.key(page_key).endswith(page_key.hex().encode())


def _value(payload: bytes, key: bytes = b"k" * 32, lay: bytes = b"L" * 16, scope: bytes = b"S" * 16) -> bytes:
    return codec.encode(lay, scope, key, np.frombuffer(payload, dtype=np.uint8))


def test_codec_round_trip_and_every_mismatch_is_a_miss():
    payload = bytes(range(256)) * 4
    good = _value(payload)
    assert bytes(codec.decode(good, b"L" * 16, b"S" * 16, b"k" * 32, len(payload))) == payload
    flipped = bytearray(good)
    flipped[codec.HEADER + 100] ^= 1
    bad = {
        "flipped payload byte": bytes(flipped),
        "truncated": good[:-1],
        "header only": good[: codec.HEADER],
        "other layout": _value(payload, lay=b"M" * 16),
        "other namespace": _value(payload, scope=b"T" * 16),
        "other page key": _value(payload, key=b"j" * 32),
        "other magic": b"XXXX" + good[4:],
        "missing": None,
    }
    for what, value in bad.items():
        assert codec.decode(value, b"L" * 16, b"S" * 16, b"k" * 32, len(payload)) is None, what


def test_breaker_opens_after_repeated_failures_and_closes_on_success():
    br = Breaker(threshold=3)
    assert br.allow()
    assert not br.failure() and not br.failure() and br.allow()
    assert br.failure() and not br.allow() and br.opened == 1
    br.success()
    assert br.allow() and br.failures == 0


def test_tls_options_ride_on_a_rediss_url_only():
    u = parse_url("rediss://h:1?ssl_ca_certs=/etc/ca.pem&ssl_check_hostname=false&ssl_cert_reqs=required")
    assert dict(u.tls_options) == {"ssl_ca_certs": "/etc/ca.pem", "ssl_check_hostname": False, "ssl_cert_reqs": "required"}
    for bad in ("redis://h:1?ssl_ca_certs=/x", "rediss://h:1?timeout=3", "rediss://h:1?ssl_cert_reqs=maybe",
                "rediss://h:1?ssl_check_hostname=perhaps"):
        with pytest.raises(ConfigError):
            parse_url(bad)
