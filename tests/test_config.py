"""Configuration validation: every bad field raises ConfigError naming it."""

import pytest
import torch

from kvstore import CacheLevel, ConfigError, DeviceTier, DiskTier, HostTier, PageLayout, StoreConfig

from .conftest import LAYOUT, PAGE


def test_page_shape_holds_k_and_v_of_every_layer():
    layout = PageLayout(num_layers=3, num_kv_heads=4, head_dim=8, tokens_per_page=16, dtype=torch.bfloat16)
    assert layout.page_shape == (3, 2, 16, 4, 8)
    assert layout.page_bytes == 3 * 2 * 16 * 4 * 8 * 2


@pytest.mark.parametrize("field", ["num_layers", "num_kv_heads", "head_dim", "tokens_per_page"])
@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_layout_rejects_non_positive_int_fields(field, bad):
    kw = dict(num_layers=1, num_kv_heads=1, head_dim=8, tokens_per_page=4)
    kw[field] = bad
    with pytest.raises(ConfigError, match=field):
        PageLayout(**kw)


def test_layout_rejects_non_dtype():
    with pytest.raises(ConfigError, match="dtype"):
        PageLayout(1, 1, 8, 4, dtype="float16")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("tier", [DeviceTier, HostTier])
def test_negative_quota_is_rejected(tier):
    with pytest.raises(ConfigError, match="quota_bytes"):
        tier(-1)


def test_tiers_must_start_with_device(tmp_path):
    with pytest.raises(ConfigError, match=r"tiers\[0\]"):
        StoreConfig(LAYOUT, [HostTier(4 * PAGE), DeviceTier(4 * PAGE)])


def test_tiers_must_be_ordered_hot_to_cold(tmp_path):
    with pytest.raises(ConfigError, match="in that order"):
        StoreConfig(LAYOUT, [DeviceTier(4 * PAGE), DiskTier(4 * PAGE, tmp_path), HostTier(4 * PAGE)])


def test_at_most_one_tier_of_each_kind():
    with pytest.raises(ConfigError, match="at most one"):
        StoreConfig(LAYOUT, [DeviceTier(4 * PAGE), HostTier(4 * PAGE), HostTier(4 * PAGE)])


def test_tier_smaller_than_a_page_is_rejected():
    with pytest.raises(ConfigError, match=r"tiers\[1\].*HostTier"):
        StoreConfig(LAYOUT, [DeviceTier(4 * PAGE), HostTier(PAGE - 1)])


def test_quotas_are_rounded_down_to_whole_pages(tmp_path):
    cfg = StoreConfig(LAYOUT, [DeviceTier(4 * PAGE + PAGE // 2), DiskTier(3 * PAGE + 1, tmp_path)])
    assert cfg.slots(CacheLevel.DEVICE) == 4
    assert cfg.slots(CacheLevel.DISK) == 3


def test_disk_path_that_is_a_file_is_rejected(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        DiskTier(PAGE, f)


def test_cuda_device_without_cuda_is_rejected():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="DeviceTier.device"):
        DeviceTier(PAGE, device="cuda").resolved_device()


def test_unknown_device_string_is_rejected():
    with pytest.raises(ConfigError, match="DeviceTier.device"):
        DeviceTier(PAGE, device="not-a-device")


def test_store_config_rejects_wrong_layout_type():
    with pytest.raises(ConfigError, match="layout"):
        StoreConfig("layout", [DeviceTier(PAGE)])


def test_store_config_rejects_empty_tiers():
    with pytest.raises(ConfigError, match="tiers"):
        StoreConfig(LAYOUT, [])
