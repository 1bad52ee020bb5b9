"""StoreConfig from a dict, a TOML/YAML file and the environment; human sizes; readable repr; the env table."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from kvstore import ConfigError, DeviceTier, DiskTier, HostTier, PageLayout, StoreConfig
from kvstore.config import TIER_KINDS
from kvstore.config_sources import RUNTIME_ENV, env_variables
from kvstore.sizes import format_size, parse_size

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "tokens_per_page": 4, "dtype": "bfloat16"}


def expected(tmp_path: Path) -> StoreConfig:
    return StoreConfig(
        PageLayout(2, 2, 8, 4, torch.bfloat16),
        [DeviceTier(1 << 20, "cpu"), HostTier(2 << 20), DiskTier(8 << 20, str(tmp_path / "d"), persistent=True)],
        namespace="m/tp0", eviction_policy="slru", free_target=0.25, batch_bytes=1 << 20,
    )


def as_dict(tmp_path: Path) -> dict:
    return {
        "namespace": "m/tp0", "eviction_policy": "slru", "free_target": 0.25, "batch_bytes": "1MiB",
        "layout": dict(LAYOUT),
        "tiers": [
            {"kind": "device", "quota_bytes": "1MiB", "device": "cpu"},
            {"kind": "host", "quota_bytes": "2 MiB"},
            {"kind": "disk", "quota_bytes": 8 << 20, "path": str(tmp_path / "d"), "persistent": True},
        ],
    }


# ---------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("text, n", [("8GiB", 8 << 30), ("512MiB", 512 << 20), ("1.5 GB", 1_500_000_000),
                                     ("4096", 4096), (4096, 4096), ("1_000kB", 10**6), ("0.5KiB", 512)])
def test_sizes_parse_binary_and_decimal_units(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text, hint", [("8G", "did you mean 8GiB or 8GB"), ("1.5B", "whole number"),
                                        ("-1", "not a size"), (-1, ">= 0"), ("lots", "not a size"),
                                        (1.5, "size string"), (True, "size string")])
def test_sizes_refuse_ambiguous_or_fractional_values_saying_what_to_write(text, hint):
    with pytest.raises(ConfigError, match=re.escape(hint)):
        parse_size(text, "DeviceTier.quota_bytes")


@pytest.mark.parametrize("n", [0, 1, 1500, 4096, 3 << 20, 8 << 30, (1 << 50) * 3])
def test_format_size_round_trips(n):
    assert parse_size(format_size(n)) == n


# ---------------------------------------------------------------------------------------------- dict
def test_from_dict_builds_the_same_config_as_code(tmp_path):
    assert StoreConfig.from_dict(as_dict(tmp_path)) == expected(tmp_path)


def test_from_dict_takes_the_layout_from_the_caller(tmp_path):
    data = as_dict(tmp_path)
    del data["layout"]
    assert StoreConfig.from_dict(data, layout=PageLayout(2, 2, 8, 4, torch.bfloat16)) == expected(tmp_path)
    with pytest.raises(ConfigError, match="no 'layout' table"):
        StoreConfig.from_dict(data)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["tiers"][0].update(quota="1MiB"), r"tiers\[0\]: unknown key 'quota'; did you mean 'quota_bytes'"),
    (lambda d: d["tiers"][1].update(kind="ssd"), r"tiers\[1\]\.kind must be one of 'device', 'host', 'disk'"),
    (lambda d: d["tiers"][2].pop("path"), r"tiers\[2\]: missing 'path'"),
    (lambda d: d.update(evicton_policy="lru"), "did you mean 'eviction_policy'"),
    (lambda d: d["layout"].update(dtype="float17"), "not a torch dtype"),
    (lambda d: d["tiers"][0].update(quota_bytes="1M"), "did you mean 1MiB or 1MB"),
    (lambda d: d.update(tiers=[]), "'tiers' must be a non-empty list"),
    (lambda d: d.update(eviction_policy="fifo"), "eviction_policy must be one of"),
])
def test_from_dict_errors_name_the_key_and_what_to_do(tmp_path, edit, message):
    data = as_dict(tmp_path)
    edit(data)
    with pytest.raises(ConfigError, match=message):
        StoreConfig.from_dict(data)


def test_a_new_tier_kind_joins_with_one_table_entry(tmp_path, monkeypatch):
    class Big(HostTier):
        pass

    monkeypatch.setitem(TIER_KINDS, "big", Big)
    data = as_dict(tmp_path)
    data["tiers"][1] = {"kind": "big", "quota_bytes": "2MiB"}
    cfg = StoreConfig.from_dict(data)
    assert type(cfg.tiers[1]) is Big
    assert "KVSTORE_BIG_QUOTA_BYTES" in env_variables()


# ---------------------------------------------------------------------------------------------- files
def test_from_file_reads_toml(tmp_path):
    path = tmp_path / "kvstore.toml"
    path.write_text(f"""
namespace = "m/tp0"
eviction_policy = "slru"
free_target = 0.25
batch_bytes = "1MiB"
[layout]
num_layers = 2
num_kv_heads = 2
head_dim = 8
tokens_per_page = 4
dtype = "bfloat16"
[[tiers]]
kind = "device"
quota_bytes = "1MiB"
device = "cpu"
[[tiers]]
kind = "host"
quota_bytes = "2MiB"
[[tiers]]
kind = "disk"
quota_bytes = "8MiB"
path = "{tmp_path / 'd'}"
persistent = true
""")
    assert StoreConfig.from_file(path) == expected(tmp_path)


def test_from_file_reads_yaml(tmp_path):
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "kvstore.yaml"
    path.write_text(yaml.safe_dump(as_dict(tmp_path)))
    assert StoreConfig.from_file(path) == expected(tmp_path)


@pytest.mark.parametrize("name, text, message", [
    ("c.toml", "namespace = ", "not valid TOML"),
    ("c.yaml", "tiers: [", "not valid YAML"),
    ("c.json", "{}", "use a .toml, .yaml or .yml file"),
    ("c.yaml", "- 1", "must be a table/mapping"),
])
def test_from_file_errors_name_the_file(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        StoreConfig.from_file(path)
    assert str(path) in str(err.value)


def test_from_file_names_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        StoreConfig.from_file(tmp_path / "absent.toml")


# ---------------------------------------------------------------------------------------------- env
def env_of(tmp_path: Path) -> dict[str, str]:
    return {
        "KVSTORE_NAMESPACE": "m/tp0", "KVSTORE_EVICTION_POLICY": "slru", "KVSTORE_FREE_TARGET": "0.25",
        "KVSTORE_BATCH_BYTES": "1MiB",
        "KVSTORE_LAYOUT_NUM_LAYERS": "2", "KVSTORE_LAYOUT_NUM_KV_HEADS": "2", "KVSTORE_LAYOUT_HEAD_DIM": "8",
        "KVSTORE_LAYOUT_TOKENS_PER_PAGE": "4", "KVSTORE_LAYOUT_DTYPE": "torch.bfloat16",
        "KVSTORE_DEVICE_QUOTA_BYTES": "1MiB", "KVSTORE_DEVICE_DEVICE": "cpu",
        "KVSTORE_HOST_QUOTA_BYTES": "2MiB", "KVSTORE_HOST_PINNED": "none",
        "KVSTORE_DISK_QUOTA_BYTES": "8MiB", "KVSTORE_DISK_PATH": str(tmp_path / "d"),
        "KVSTORE_DISK_PERSISTENT": "yes",
        "KVSTORE_IO_BACKEND": "posix", "KVSTORE_STRESS_SEEDS": "3", "PATH": "/bin",  # not config: left alone
    }


def test_from_env_builds_the_same_config_as_code(tmp_path):
    assert StoreConfig.from_env(environ=env_of(tmp_path)) == expected(tmp_path)


def test_from_env_reads_os_environ_and_a_prefix(tmp_path, monkeypatch):
    for k, v in env_of(tmp_path).items():
        monkeypatch.setenv(k.replace("KVSTORE_", "MYKV_"), v)
    monkeypatch.delenv("MYKV_IO_BACKEND")
    monkeypatch.delenv("MYKV_STRESS_SEEDS")
    assert StoreConfig.from_env("MYKV_") == expected(tmp_path)


def test_from_env_configures_only_the_tiers_whose_variables_are_set(tmp_path):
    env = {k: v for k, v in env_of(tmp_path).items() if not k.startswith(("KVSTORE_DISK", "KVSTORE_HOST"))}
    assert [type(t) for t in StoreConfig.from_env(environ=env).tiers] == [DeviceTier]


@pytest.mark.parametrize("var, value, message", [
    ("KVSTORE_DISK_QUOTA", "8MiB", "unknown environment variable KVSTORE_DISK_QUOTA; did you mean KVSTORE_DISK_QUOTA_BYTES"),
    ("KVSTORE_DISK_PERSISTENT", "maybe", "KVSTORE_DISK_PERSISTENT='maybe' is not a bool"),
    ("KVSTORE_LAYOUT_HEAD_DIM", "eight", "KVSTORE_LAYOUT_HEAD_DIM='eight' is not an int"),
    ("KVSTORE_FREE_TARGET", "lots", "KVSTORE_FREE_TARGET='lots' is not a number"),
    ("KVSTORE_HOST_QUOTA_BYTES", "2m", "did you mean 2MiB or 2MB"),
])
def test_from_env_errors_name_the_variable(tmp_path, var, value, message):
    env = env_of(tmp_path)
    env[var] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        StoreConfig.from_env(environ=env)


def test_from_env_without_a_device_tier_or_layout_says_what_to_set(tmp_path):
    env = {k: v for k, v in env_of(tmp_path).items() if not k.startswith("KVSTORE_DEVICE")}
    with pytest.raises(ConfigError, match="set KVSTORE_DEVICE_QUOTA_BYTES"):
        StoreConfig.from_env(environ=env)
    env = {k: v for k, v in env_of(tmp_path).items() if not k.startswith("KVSTORE_LAYOUT")}
    with pytest.raises(ConfigError, match="no page layout"):
        StoreConfig.from_env(environ=env)
    assert StoreConfig.from_env(environ=env, layout=PageLayout(2, 2, 8, 4, torch.bfloat16)) == expected(tmp_path)


# ---------------------------------------------------------------------------------------------- repr / docs
def test_repr_shows_sizes_in_units_and_round_trips_through_from_dict(tmp_path):
    cfg = expected(tmp_path)
    text = repr(cfg)
    assert "DeviceTier(quota_bytes='1MiB', device='cpu')" in text
    assert "batch_bytes='1MiB'" in text
    assert "tiers=[DeviceTier(" in text
    ns = {"StoreConfig": dict, "PageLayout": dict, "DeviceTier": dict, "HostTier": dict, "DiskTier": dict,
          "torch": torch}
    rebuilt = eval(text.replace("tiers=[DeviceTier(", "tiers=[dict(kind='device', ").replace(
        "HostTier(", "dict(kind='host', ").replace("DiskTier(", "dict(kind='disk', "), ns)
    rebuilt["tiers"][2]["path"] = str(rebuilt["tiers"][2]["path"])
    rebuilt["layout"]["dtype"] = "bfloat16"
    assert StoreConfig.from_dict(rebuilt) == cfg


def test_every_environment_variable_is_documented_in_one_table():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    rows = set(re.findall(r"^\| `(KVSTORE_[A-Z0-9_]+)` \|", doc, re.M))
    used = set()
    for folder in ("kvstore", "benchmarks", "tests", "examples"):
        for f in (ROOT / folder).rglob("*.py"):
            used |= set(re.findall(r"KVSTORE_[A-Z0-9_]*[A-Z0-9]", f.read_text()))
    # this file's fakes and prefixes (startswith("KVSTORE_DISK") ...)
    used -= {"KVSTORE_BIG_QUOTA_BYTES", "KVSTORE_DISK_QUOTA", "KVSTORE_DEVICE", "KVSTORE_HOST", "KVSTORE_DISK",
             "KVSTORE_LAYOUT"}
    expected_rows = set(env_variables()) | {f"KVSTORE_{k}" for k in RUNTIME_ENV}
    assert rows == expected_rows
    assert used - rows == set()


def test_the_documented_toml_example_is_a_valid_config():
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    doc = (ROOT / "docs" / "configuration.md").read_text()
    example = re.findall(r"```toml\n(.*?)```", doc, re.S)[0]
    cfg = StoreConfig.from_dict(tomllib.loads(example))
    assert [type(t) for t in cfg.tiers] == [DeviceTier, HostTier, DiskTier]
    assert cfg.tiers[2].quota_bytes == 256 << 30 and cfg.eviction_policy == "slru"


def test_from_dict_takes_a_remote_tier_out_of_the_tiers(tmp_path):
    d = {"layout": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "tokens_per_page": 4, "dtype": "float16"},
         "tiers": [{"kind": "device", "quota_bytes": "1MiB", "device": "cpu"}, {"kind": "host", "quota_bytes": "1MiB"},
                   {"kind": "remote", "url": "redis://user:secret@127.0.0.1:6379/0", "ttl_s": 60}]}
    cfg = StoreConfig.from_dict(d)
    assert cfg.remote is not None and cfg.remote.ttl_s == 60
    assert len(cfg.tiers) == 2  # the remote holds copies: never a placement level
    assert "secret" not in repr(cfg)
    with pytest.raises(ConfigError, match="needs a HostTier"):
        StoreConfig.from_dict({**d, "tiers": [d["tiers"][0], d["tiers"][2]]})


def test_from_env_builds_a_remote_tier_from_its_variables():
    env = {"KVSTORE_DEVICE_QUOTA_BYTES": "1MiB", "KVSTORE_DEVICE_DEVICE": "cpu", "KVSTORE_HOST_QUOTA_BYTES": "1MiB",
           "KVSTORE_REMOTE_URL": "redis://127.0.0.1:6379/0", "KVSTORE_REMOTE_TTL_S": "none",
           "KVSTORE_REMOTE_TIMEOUT_S": "0.25"}
    cfg = StoreConfig.from_env(layout=PageLayout(2, 2, 8, 4, torch.float16), environ=env)
    assert cfg.remote is not None and cfg.remote.ttl_s is None and cfg.remote.timeout_s == 0.25
    assert len(cfg.tiers) == 2
