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
from .policy import (
    Decision,
    PrefillModel,
    ReuseChoice,
    decide_reuse,
    prefetch_start_time,
    reuse_forward_model,
    should_start_prefetch,
    wait_or_recompute,
)
from .types import (
    CacheLevel, CacheStatus, PathCost, PathEstimate, PrefetchResult, PrefixMatch, Stats, TierUsage, TransferEstimate,
)

__all__ = [
    "CacheLevel",
    "CacheStatus",
    "CapacityError",
    "ConfigError",
    "CorruptPageError",
    "Decision",
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
    "PrefillModel",
    "PrefetchResult",
    "PrefetchTask",
    "PrefixMatch",
    "RemoteTier",
    "ReuseChoice",
    "Stats",
    "StorageIOError",
    "StoreConfig",
    "TierUsage",
    "TransferEstimate",
    "decide_reuse",
    "prefetch_start_time",
    "reuse_forward_model",
    "should_start_prefetch",
    "wait_or_recompute",
]

__version__ = "0.1.0"
