"""Configuration records: page layout, the three tier kinds, and the store config that orders them.

Every record validates itself on construction and raises :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ._args import describe, integral, seconds
from .errors import ConfigError
from .sizes import format_size
from .placement.policies import POLICIES
from .types import CacheLevel

__all__ = ["PageLayout", "DeviceTier", "HostTier", "DiskTier", "RemoteTier", "StoreConfig", "TierConfig", "TIER_KINDS"]


def _positive_int(owner: str, name: str, value: object) -> int:
    """``value`` as an int > 0 (any integral scalar: int, numpy integer, 0-d integer tensor; not a bool)."""
    n = integral(value)
    if n is None:
        raise ConfigError(f"{owner}.{name} must be an int, got {describe(value)}")
    if n <= 0:
        raise ConfigError(f"{owner}.{name} must be > 0, got {n}")
    return n


def _quota(owner: str, value: object) -> int:
    n = integral(value)
    if n is None:
        raise ConfigError(f"{owner}.quota_bytes must be an int number of bytes, got {describe(value)}")
    if n < 0:
        raise ConfigError(f"{owner}.quota_bytes must be >= 0, got {n}")
    return n


def _set(record: object, name: str, value: object) -> None:
    object.__setattr__(record, name, value)  # frozen dataclasses: store the validated (plain int) value


def _readable_repr(record: object) -> str:
    """``DiskTier(quota_bytes='256GiB', path='/nvme/kvstore', persistent=True)``: byte sizes in units, as
    :meth:`StoreConfig.from_dict` reads them back."""
    parts = []
    for f in dataclasses.fields(record):  # type: ignore[arg-type]
        if not f.repr:
            continue
        value = getattr(record, f.name)
        if f.name.endswith("_bytes") and isinstance(value, int):
            parts.append(f"{f.name}={format_size(value)!r}")
        elif isinstance(value, tuple) and f.name == "tiers":
            parts.append(f"tiers=[{', '.join(map(repr, value))}]")
        else:
            parts.append(f"{f.name}={value!r}")
    return f"{type(record).__name__}({', '.join(parts)})"


@dataclass(frozen=True)
class PageLayout:
    """Shape of one page: K and V of every layer for ``tokens_per_page`` tokens, contiguous.

    Page-first layout: a page is one block of ``page_bytes`` bytes, so it moves with one copy.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    tokens_per_page: int
    dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "tokens_per_page"):
            _set(self, name, _positive_int("PageLayout", name, getattr(self, name)))
        if not isinstance(self.dtype, torch.dtype):
            raise ConfigError(f"PageLayout.dtype must be a torch.dtype, got {self.dtype!r}")
        if self.dtype.is_complex or self.dtype == torch.bool:
            raise ConfigError(f"PageLayout.dtype {self.dtype} is not a KV dtype; use a float type")

    @property
    def page_shape(self) -> tuple[int, ...]:
        """(num_layers, 2, tokens_per_page, num_kv_heads, head_dim); index 0 of dim 1 is K, 1 is V."""
        return (self.num_layers, 2, self.tokens_per_page, self.num_kv_heads, self.head_dim)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page."""
        return math.prod(self.page_shape) * self.element_size

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def fingerprint(self) -> str:
        """Stable text that identifies the layout (used to seed prefix hashes)."""
        return f"{self.num_layers}x{self.num_kv_heads}x{self.head_dim}x{self.tokens_per_page}:{self.dtype}"


@dataclass(frozen=True)
class DeviceTier:
    """The hot level: one arena tensor on ``device`` (``cuda`` when available, else ``cpu``)."""

    quota_bytes: int
    device: Union[str, torch.device, None] = None

    level = CacheLevel.DEVICE
    __repr__ = _readable_repr

    def __post_init__(self) -> None:
        _set(self, "quota_bytes", _quota("DeviceTier", self.quota_bytes))
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise ConfigError(f"DeviceTier.device {self.device!r} is not a torch device: {exc}") from None

    def resolved_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError("DeviceTier.device is 'cuda' but CUDA is not available; use device=None or 'cpu'")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.type != "cpu":
            raise ConfigError(f"DeviceTier.device must be a cuda or cpu device, got {dev}")
        return dev


@dataclass(frozen=True)
class HostTier:
    """Host memory level: one arena, page-locked (pinned) when CUDA is available."""

    quota_bytes: int
    pinned: bool | None = None

    level = CacheLevel.HOST
    __repr__ = _readable_repr

    def __post_init__(self) -> None:
        _set(self, "quota_bytes", _quota("HostTier", self.quota_bytes))
        if self.pinned is not None and not isinstance(self.pinned, bool):
            raise ConfigError(f"HostTier.pinned must be a bool or None, got {self.pinned!r}")

    def resolved_pinned(self) -> bool:
        if self.pinned is None:
            return torch.cuda.is_available()
        if self.pinned and not torch.cuda.is_available():
            raise ConfigError("HostTier.pinned=True needs CUDA; use pinned=None or False on a machine without a GPU")
        return self.pinned


@dataclass(frozen=True)
class DiskTier:
    """Local disk level: one preallocated slot file in the directory ``path`` (created if missing)."""

    quota_bytes: int
    path: Union[str, "os.PathLike[str]"]
    persistent: bool = False

    level = CacheLevel.DISK
    __repr__ = _readable_repr

    def __post_init__(self) -> None:
        _set(self, "quota_bytes", _quota("DiskTier", self.quota_bytes))
        if not isinstance(self.path, (str, os.PathLike)) or str(self.path) == "":
            raise ConfigError(f"DiskTier.path must be a directory path, got {self.path!r}")
        if not isinstance(self.persistent, bool):
            raise ConfigError(f"DiskTier.persistent must be a bool, got {self.persistent!r}")
        p = Path(self.path)
        if p.exists() and not p.is_dir():
            raise ConfigError(f"DiskTier.path {str(p)!r} exists and is not a directory")


@dataclass(frozen=True)
class RemoteTier:
    """A shared Redis/Valkey server or cluster holding copies of committed pages (see docs/remote.md).

    ``url``: ``redis://[user:password@]host:port[/db]``, ``rediss://...`` (TLS; query parameters
    ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``, ``ssl_check_hostname``) or
    ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` with TLS). ``ttl_s``: expiry of every
    key written (None: none; the server's maxmemory policy evicts). ``timeout_s``: deadline of one remote
    call. ``max_pending_pages``: bound on committed pages queued for writing (beyond it they are dropped,
    counted in ``stats()["remote_write_dropped"]``). The URL's password never appears in ``repr``.
    """

    url: str
    ttl_s: float | None = 86400.0
    timeout_s: float = 1.0
    max_pending_pages: int = 4096

    level = CacheLevel.REMOTE

    def __post_init__(self) -> None:
        from .remote.url import parse_url  # the remote package imports config lazily too

        if not isinstance(self.url, str):
            raise ConfigError(f"RemoteTier.url must be a str, got {describe(self.url)}")
        parse_url(self.url)  # ConfigError naming the problem (credentials redacted)
        ttl = seconds(self.ttl_s)
        if self.ttl_s is not None and (ttl is None or ttl <= 0):
            raise ConfigError(f"RemoteTier.ttl_s must be a number of seconds > 0 or None, got {self.ttl_s!r}")
        timeout = seconds(self.timeout_s)
        if timeout is None or timeout <= 0:
            raise ConfigError(f"RemoteTier.timeout_s must be a number of seconds > 0, got {self.timeout_s!r}")
        _set(self, "max_pending_pages", _positive_int("RemoteTier", "max_pending_pages", self.max_pending_pages))

    def __repr__(self) -> str:
        from .remote.url import redact

        return (
            f"RemoteTier(url={redact(self.url)!r}, ttl_s={self.ttl_s!r}, timeout_s={self.timeout_s!r}, "
            f"max_pending_pages={self.max_pending_pages!r})"
        )


TierConfig = Union[DeviceTier, HostTier, DiskTier]

#: Tier kinds by the name configuration files and environment variables use (``kind = "disk"``,
#: ``KVSTORE_DISK_*``), hot to cold. A new tier class joins every configuration source with one line here.
TIER_KINDS: dict[str, type] = {
    "device": DeviceTier,
    "host": HostTier,
    "disk": DiskTier,
    "remote": RemoteTier,  # taken out of ``tiers`` into StoreConfig.remote (it holds copies, not pages)
}


@dataclass(frozen=True)
class StoreConfig:
    """A page layout and the tiers, ordered hot -> cold: a DeviceTier, then optionally a HostTier, then a DiskTier.

    Quotas are rounded down to whole pages. ``namespace`` (model name, dtype, TP rank, ...) seeds the prefix
    hash chain so that two models never share pages. ``eviction_policy`` orders the evictable pages of each level
    (:mod:`kvstore.placement.policies`: ``"lru"``, ``"lru-leaf"``, ``"slru"``). ``batch_bytes`` bounds one transfer batch and
    ``io_threads`` the disk worker threads (None: ``KVSTORE_IO_THREADS`` or 8). ``staging_buffers`` bounce
    buffers of ``batch_bytes`` serve disk <-> device moves and ``swap_buffers`` (None: as many) full-tier swaps
    (:class:`~kvstore.transfer.arenas.StagingPool`). ``free_target`` (0 <= f < 1;
    0 is off): the fraction of every level but the last that a background task keeps free, demoting that
    level's first eviction candidates into free slots one level colder, so pages admitted later rarely wait
    for a demotion (it never drops a page and never cascades).
    """

    layout: PageLayout
    tiers: Sequence[TierConfig]
    namespace: str = ""
    batch_bytes: int = 32 << 20
    io_threads: int | None = None
    staging_buffers: int = 4
    swap_buffers: int | None = None
    eviction_policy: str = "lru"
    free_target: float = 0.0
    remote: "RemoteTier | None" = None

    __repr__ = _readable_repr

    # ------------------------------------------------------------------ from plain data (kvstore.config_sources)
    @classmethod
    def from_dict(cls, data: Mapping[str, object], *, layout: Optional[PageLayout] = None) -> "StoreConfig":
        """From a dict: StoreConfig fields, a ``layout`` table and ``tiers`` (tables with a ``kind``, hot to
        cold); sizes may be strings (``"8GiB"``). ``layout`` supplies or replaces the layout table.
        See :mod:`kvstore.config_sources` and ``docs/configuration.md``."""
        from .config_sources import from_dict

        return from_dict(data, layout=layout)

    @classmethod
    def from_file(cls, path: "str | os.PathLike[str]", *, layout: Optional[PageLayout] = None) -> "StoreConfig":
        """From a ``.toml`` file, or a ``.yaml``/``.yml`` file (needs PyYAML: the ``yaml`` extra)."""
        from .config_sources import from_file

        return from_file(path, layout=layout)

    @classmethod
    def from_env(cls, prefix: str = "KVSTORE_", *, layout: Optional[PageLayout] = None,
                 environ: Optional[Mapping[str, str]] = None) -> "StoreConfig":
        """From environment variables (``KVSTORE_DEVICE_QUOTA_BYTES=8GiB``, ...; the table is in
        ``docs/configuration.md``); an unknown ``KVSTORE_*`` variable is a ConfigError."""
        from .config_sources import from_env

        return from_env(prefix, layout=layout, environ=environ)

    def __post_init__(self) -> None:
        if not isinstance(self.layout, PageLayout):
            raise ConfigError(f"StoreConfig.layout must be a PageLayout, got {type(self.layout).__name__}")
        tiers = tuple(self.tiers) if isinstance(self.tiers, (list, tuple)) else None
        if not tiers:
            raise ConfigError("StoreConfig.tiers must be a non-empty list starting with a DeviceTier")
        tiers = self._take_remote(tiers)
        object.__setattr__(self, "tiers", tiers)
        for i, tier in enumerate(tiers):
            if not isinstance(tier, tuple(TIER_KINDS.values())):
                raise ConfigError(f"StoreConfig.tiers[{i}] must be a DeviceTier, HostTier or DiskTier, got {tier!r}")
        if not isinstance(tiers[0], DeviceTier):
            raise ConfigError("StoreConfig.tiers[0] must be a DeviceTier (tiers are ordered hot -> cold)")
        levels = [t.level for t in tiers]
        if levels != sorted(set(levels)):
            raise ConfigError(
                "StoreConfig.tiers must be DeviceTier, then at most one HostTier, then at most one DiskTier, "
                f"in that order; got {[type(t).__name__ for t in tiers]}"
            )
        for i, tier in enumerate(tiers):
            if tier.quota_bytes < self.layout.page_bytes:
                raise ConfigError(
                    f"StoreConfig.tiers[{i}] ({type(tier).__name__}).quota_bytes={tier.quota_bytes} holds no page "
                    f"of {self.layout.page_bytes} bytes; give it at least one page or leave the tier out"
                )
        if not isinstance(self.namespace, str):
            raise ConfigError(f"StoreConfig.namespace must be a str, got {self.namespace!r}")
        if not isinstance(self.eviction_policy, str) or self.eviction_policy not in POLICIES:
            raise ConfigError(
                f"StoreConfig.eviction_policy must be one of {sorted(POLICIES)}, got {self.eviction_policy!r}"
            )
        _set(self, "batch_bytes", _positive_int("StoreConfig", "batch_bytes", self.batch_bytes))
        _set(self, "staging_buffers", _positive_int("StoreConfig", "staging_buffers", self.staging_buffers))
        if self.swap_buffers is not None:
            _set(self, "swap_buffers", _positive_int("StoreConfig", "swap_buffers", self.swap_buffers))
        if self.io_threads is not None:
            _set(self, "io_threads", _positive_int("StoreConfig", "io_threads", self.io_threads))
        if isinstance(self.free_target, bool) or not isinstance(self.free_target, (int, float)) or not (
            0 <= self.free_target < 1
        ):
            raise ConfigError(
                f"StoreConfig.free_target must be a fraction 0 <= f < 1 (0: no background demotion), got {self.free_target!r}"
            )

    def _take_remote(self, tiers: tuple[Any, ...]) -> tuple[Any, ...]:
        """``tiers`` without a closing RemoteTier, which becomes ``self.remote`` (checked: last, one, a host tier)."""
        if self.remote is not None and not isinstance(self.remote, RemoteTier):
            raise ConfigError(f"StoreConfig.remote must be a RemoteTier or None, got {self.remote!r}")
        found = [i for i, t in enumerate(tiers) if isinstance(t, RemoteTier)]
        if found:
            if len(found) > 1 or self.remote is not None:
                raise ConfigError("StoreConfig has more than one RemoteTier; configure at most one")
            if found[0] != len(tiers) - 1:
                raise ConfigError("StoreConfig.tiers: the RemoteTier must be the last tier (tiers are ordered hot -> cold)")
            _set(self, "remote", tiers[-1])
            tiers = tiers[:-1]
        if self.remote is not None and not any(isinstance(t, HostTier) for t in tiers):
            raise ConfigError(
                "StoreConfig: a RemoteTier needs a HostTier (remote pages cross host memory); add a HostTier"
            )
        if not tiers:
            raise ConfigError("StoreConfig.tiers must be a non-empty list starting with a DeviceTier")
        return tiers

    @property
    def levels(self) -> tuple[CacheLevel, ...]:
        return tuple(t.level for t in self.tiers)

    def tier(self, level: CacheLevel) -> TierConfig:
        for t in self.tiers:
            if t.level == level:
                return t
        raise ConfigError(f"level {CacheLevel(level).name} is not configured in this store")

    def slots(self, level: CacheLevel) -> int:
        """Quota of ``level`` in whole pages."""
        return self.tier(level).quota_bytes // self.layout.page_bytes

    def resolved_io_threads(self) -> int:
        if self.io_threads is not None:
            return self.io_threads
        env = os.environ.get("KVSTORE_IO_THREADS")
        if env:
            try:
                n = int(env)
            except ValueError:
                raise ConfigError(f"KVSTORE_IO_THREADS must be a positive int, got {env!r}") from None
            if n > 0:
                return n
            raise ConfigError(f"KVSTORE_IO_THREADS must be a positive int, got {env!r}")
        return 8
