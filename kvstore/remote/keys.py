"""Remote key derivation: namespace + layout fingerprint + the page's chained prefix hash.

A key is ``kvs1:<16 hex of sha256(namespace, layout fingerprint)>:<64 hex of the page key>``. The page
key is already a chained SHA-256 over the token prefix seeded by namespace and layout; the scope part
makes managers of another namespace or layout miss even before the value header is checked. Keys carry
no token ids and no namespace text (a namespace may name a tenant).
"""

from __future__ import annotations

import hashlib

__all__ = ["KeySpace", "scope_digest"]


def scope_digest(namespace: str, layout_fingerprint: str) -> bytes:
    """16 bytes identifying (namespace, layout): in every key and every value header."""
    return hashlib.sha256(b"kvstore-remote-v1\0" + namespace.encode() + b"\0" + layout_fingerprint.encode()).digest()[:16]


class KeySpace:
    """Remote keys of one manager's pages."""

    def __init__(self, namespace: str, layout_fingerprint: str) -> None:
        self.scope = scope_digest(namespace, layout_fingerprint)
        self.layout_digest = hashlib.sha256(layout_fingerprint.encode()).digest()[:16]
        self._prefix = b"kvs1:" + self.scope.hex().encode() + b":"

    def key(self, page_key: bytes) -> bytes:
        """The remote key of the committed page whose chained prefix hash is ``page_key``."""
        return self._prefix + page_key.hex().encode()

    def keys(self, page_keys: list[bytes]) -> list[bytes]:
        return [self._prefix + k.hex().encode() for k in page_keys]
