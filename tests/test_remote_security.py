"""The remote tier's security paths on real servers: AUTH/ACL through the URL, TLS (rediss://), no credential
in any log line or message."""

from __future__ import annotations

import logging
import shutil
import subprocess

import pytest

from kvstore import CacheLevel

from .redis_fixtures import free_port
from .test_remote import TPP, commit_prompt, fresh_namespace, node, resume_bytes, same_bytes, tokens_of


async def test_auth_through_the_url_and_a_wrong_password_is_a_miss_never_logged(tmp_path, own_redis, caplog):
    server = own_redis("--requirepass", "s3cret-pw")
    ns = fresh_namespace()
    toks = tokens_of(3, seed=1)
    url = f"redis://:s3cret-pw@127.0.0.1:{server.port}"
    caplog.set_level(logging.DEBUG)
    async with node(tmp_path, url, ns) as a, node(tmp_path, url, ns) as b:
        data = await commit_prompt(a, toks)
        await a.flush(5)
        assert (await b.fetch_prefix(toks)).pages_moved == 3
        reused, got = await resume_bytes(b, toks)
        assert reused == 3 * TPP and same_bytes(got, data)
    bad = f"redis://:wrong-pw@127.0.0.1:{server.port}"
    async with node(tmp_path, bad, ns, timeout_s=0.3) as c:
        for _ in range(3):
            res = await c.fetch_prefix(toks)
            assert res.pages_moved == 0 and not res.complete
        assert c.stats()["remote_errors"] >= 3 and c.stats()["remote_breaker_opened"] == 1
        assert "wrong-pw" not in repr(c.config) and "wrong-pw" not in repr(c._remote.client)
    text = caplog.text
    assert "s3cret-pw" not in text and "wrong-pw" not in text
    assert "***@" in text  # the breaker's warning names the server, redacted


def _tls_files(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("the TLS test needs the openssl command to make a test CA")
    run = lambda *a: subprocess.run(a, cwd=tmp_path, check=True, capture_output=True, timeout=60)
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=kvstore-test-ca")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1")
    (tmp_path / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "srv.crt", "-days", "2", "-extfile", "ext")
    return tmp_path / "ca.crt", tmp_path / "srv.crt", tmp_path / "srv.key"


async def test_tls_through_rediss(tmp_path, own_redis):
    ca, crt, key = _tls_files(tmp_path)
    tls_port = free_port()  # the fixture's readiness PING goes to the server's plain port
    server = own_redis("--tls-port", str(tls_port), "--tls-cert-file", str(crt), "--tls-key-file", str(key),
                       "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no")
    ns = fresh_namespace()
    toks = tokens_of(3, seed=2)
    url = f"rediss://127.0.0.1:{tls_port}?ssl_ca_certs={ca}"
    async with node(tmp_path, url, ns) as a, node(tmp_path, url, ns) as b:
        data = await commit_prompt(a, toks)
        await a.flush(5)
        assert a.stats()["pages_device_to_remote"] == 3 and a.stats()["remote_errors"] == 0
        assert (await b.lookup_remote(toks)).pages_per_level[CacheLevel.REMOTE] == 3
        assert (await b.fetch_prefix(toks)).pages_moved == 3
        reused, got = await resume_bytes(b, toks)
        assert reused == 3 * TPP and same_bytes(got, data)
    # the same server over TLS without trusting its CA: every call fails, counted, nothing handed out
    async with node(tmp_path, f"rediss://127.0.0.1:{tls_port}", ns, timeout_s=0.5) as c:
        res = await c.fetch_prefix(toks)
        assert res.pages_moved == 0 and c.stats()["remote_errors"] >= 1
    server.kill()
