"""kvstore: an asynchronous multi-tier (device / host / disk) KV-cache storage engine for LLM serving."""

from .cache import KVCache, PrefetchTask
from .config import DeviceTier, DiskTier, HostTier, PageLayout, RemoteTier, StoreConfig
from .errors import (
    CapacityError,
    ConfigError,
    CorruptPageError,
    InvalidArgumentError,
    InvalidStateError,
    KVStoreError,
    StorageIOError,
)
from .manager import KVCacheManager
from .types import (
    CacheLevel, CacheStatus, PathCost, PathEstimate, PrefetchResult, PrefixMatch, Stats, TierUsage, TransferEstimate,
)

__all__ = [
    "CacheLevel",
    "CacheStatus",
    "CapacityError",
    "ConfigError",
    "CorruptPageError",
    "DeviceTier",
    "DiskTier",
    "HostTier",
    "InvalidArgumentError",
    "InvalidStateError",
    "KVCache",
    "KVCacheManager",
    "KVStoreError",
    "PageLayout",
    "PathCost",
    "PathEstimate",
    "PrefetchResult",
    "PrefetchTask",
    "PrefixMatch",
    "RemoteTier",
    "Stats",
    "StorageIOError",
    "StoreConfig",
    "TierUsage",
    "TransferEstimate",
]

__version__ = "0.1.0"
