"""Remote tier URLs: parsing ``redis://``, ``rediss://`` and ``redis+cluster://`` forms, and redaction.

A URL may carry credentials (``user:password@``); :func:`redact` replaces them so that no message,
log line or ``repr`` ever shows them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

from ..errors import ConfigError

__all__ = ["RemoteURL", "parse_url", "redact"]

_SCHEMES = {"redis": (False, False), "rediss": (True, False), "redis+cluster": (False, True),
            "rediss+cluster": (True, True)}
_CREDS = re.compile(r"(?<=://)[^@/]*@")
#: TLS options a ``rediss://`` URL may carry as query parameters (passed to redis-py).
TLS_OPTIONS = {"ssl_ca_certs": str, "ssl_certfile": str, "ssl_keyfile": str, "ssl_cert_reqs": str,
               "ssl_check_hostname": bool}


def redact(url: str) -> str:
    """``url`` with any ``user:password@`` part replaced by ``***@``."""
    return _CREDS.sub("***@", url) if isinstance(url, str) else "<not a str>"


@dataclass(frozen=True)
class RemoteURL:
    """A parsed remote URL; ``repr`` never shows the password."""

    tls: bool
    cluster: bool
    nodes: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    text: str = field(default="", repr=False)
    tls_options: tuple[tuple[str, object], ...] = ()

    @property
    def redacted(self) -> str:
        return redact(self.text)



def parse_url(url: str) -> RemoteURL:
    """Parse ``url``; ConfigError (credentials redacted) when it is not a usable remote URL."""
    shown = redact(url)
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"RemoteTier.url must look like redis://host:port, rediss://... or redis+cluster://...; got {shown!r}")
    scheme, rest = url.split("://", 1)
    if scheme.lower() not in _SCHEMES:
        raise ConfigError(
            f"RemoteTier.url scheme {scheme!r} is not supported; use redis://, rediss:// (TLS), redis+cluster:// "
            f"or rediss+cluster://; got {shown!r}"
        )
    tls, cluster = _SCHEMES[scheme.lower()]
    username = password = None
    if "@" in rest.split("/", 1)[0]:
        creds, rest = rest.split("@", 1)
        if ":" in creds:
            user, password = creds.split(":", 1)
            username, password = (unquote(user) or None), unquote(password)
        else:
            username = unquote(creds) or None
    rest, _, query = rest.partition("?")
    hostpart, _, path = rest.partition("/")
    options: list[tuple[str, object]] = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        kind = TLS_OPTIONS.get(name)
        if kind is None or not tls:
            raise ConfigError(
                f"RemoteTier.url parameter {name!r} is not supported; rediss:// URLs take {sorted(TLS_OPTIONS)}; "
                f"got {shown!r}"
            )
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"RemoteTier.url parameter {name} must be true or false; got {shown!r}")
            options.append((name, value.lower() in ("true", "1", "yes")))
        else:
            if name == "ssl_cert_reqs" and value not in ("none", "optional", "required"):
                raise ConfigError(f"RemoteTier.url ssl_cert_reqs must be none, optional or required; got {shown!r}")
            options.append((name, value))
    db = 0
    if path:
        if not path.isdigit():
            raise ConfigError(f"RemoteTier.url database must be a number (redis://host:port/0); got {shown!r}")
        db = int(path)
    if cluster and db:
        raise ConfigError(f"RemoteTier.url: a Redis Cluster has only database 0; got {shown!r}")
    nodes = []
    for part in hostpart.split(","):
        host, sep, port = part.rpartition(":")
        if not sep:
            host, port = part, "6379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"RemoteTier.url needs host:port with a port in 1..65535; got {shown!r}")
        nodes.append((host, int(port)))
    if len(nodes) > 1 and not cluster:
        raise ConfigError(f"RemoteTier.url lists several hosts: use redis+cluster:// for a cluster; got {shown!r}")
    return RemoteURL(tls, cluster, tuple(nodes), db, username, password, url, tuple(options))
