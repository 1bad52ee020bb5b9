"""Typed errors raised by kvstore. Every message says what the caller can do about it."""

from __future__ import annotations

import errno as _errno

__all__ = [
    "KVStoreError",
    "ConfigError",
    "InvalidArgumentError",
    "InvalidStateError",
    "CapacityError",
    "StorageIOError",
    "CorruptPageError",
]


class KVStoreError(Exception):
    """Base class of every error kvstore raises on purpose."""


class ConfigError(KVStoreError, ValueError):
    """A configuration value is invalid; the message names the field."""


class InvalidArgumentError(KVStoreError, ValueError):
    """An argument of a call is of the wrong type or out of range."""


class InvalidStateError(KVStoreError):
    """The operation is not allowed in the cache's or the manager's current state."""


class CapacityError(KVStoreError):
    """Not enough room, even after evicting everything that may be evicted."""


class StorageIOError(KVStoreError, OSError):
    """A disk read or write failed; ``errno`` is preserved from the underlying OSError."""

    def __init__(self, message: str, err: int | None = None) -> None:
        OSError.__init__(self, err if err is not None else _errno.EIO, message)

    def __str__(self) -> str:
        return str(self.strerror)


class CorruptPageError(KVStoreError):
    """A page read back from disk failed its integrity check."""
