"""Helpers shared by the Hugging Face integration tests: a three-tier manager sized in pages of a model."""

from __future__ import annotations

import contextlib
import inspect
from typing import AsyncIterator

from kvstore import DeviceTier, DiskTier, HostTier, KVCacheManager, StoreConfig
from kvstore.integrations.hf import layout_for_model


@contextlib.asynccontextmanager
async def paged_manager(model, tmp_path, tokens_per_page: int, *, device_pages: int, host_pages: int,
                        disk_pages: int, device: str | None = None) -> AsyncIterator[KVCacheManager]:
    """A manager whose tiers hold that many pages of ``model``'s K/V; its invariants are checked at the end."""
    layout = layout_for_model(model, tokens_per_page)
    page = layout.page_bytes
    cfg = StoreConfig(layout, [DeviceTier(device_pages * page, device=device), HostTier(host_pages * page),
                               DiskTier(disk_pages * page, tmp_path / "disk")])
    async with KVCacheManager(cfg) as mgr:
        yield mgr
        mgr.check_invariants()


def cache_kw(model) -> str:
    """The name of ``model.forward``'s cache argument (it changed across transformers versions)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
