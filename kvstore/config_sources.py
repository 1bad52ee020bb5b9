"""StoreConfig from plain data: a dict, a TOML or YAML file, or environment variables.

One shape for all three (the names are the constructors' parameters)::

    namespace = "llama-8b/tp0"            # any StoreConfig field but layout and tiers
    eviction_policy = "slru"
    [layout]                              # PageLayout; may be left out and passed as layout=...
    num_layers = 32
    num_kv_heads = 8
    head_dim = 128
    tokens_per_page = 16
    dtype = "bfloat16"
    [[tiers]]                             # hot -> cold; kind is a key of kvstore.config.TIER_KINDS
    kind = "device"
    quota_bytes = "8GiB"                  # every *_bytes field takes a size string (kvstore.sizes)
    [[tiers]]
    kind = "disk"
    quota_bytes = "256GiB"
    path = "/nvme/kvstore"

Environment variables (``from_env``): ``KVSTORE_<FIELD>`` for the StoreConfig fields,
``KVSTORE_LAYOUT_<FIELD>`` for the layout, ``KVSTORE_<KIND>_<FIELD>`` for a tier (a tier is configured
when any of its variables is set; tiers are ordered as in ``TIER_KINDS``). The table of every variable is
``docs/configuration.md``. Tier kinds are looked up in ``kvstore.config.TIER_KINDS`` only, so a new tier
class joins every source with one line there.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .errors import ConfigError
from .sizes import parse_size

if typing.TYPE_CHECKING:
    from .config import PageLayout, StoreConfig

__all__ = ["from_dict", "from_file", "from_env", "env_variables", "RUNTIME_ENV"]

#: Variables read elsewhere (process-wide switches, tests and benchmarks): from_env leaves them alone.
RUNTIME_ENV: dict[str, str] = {
    "IO_BACKEND": "disk I/O backend: auto (default), kvikio or posix (kvstore.transfer.io_backends)",
    "BATCH_COPIES": "0: no batched driver copies for host<->device (kvstore.transfer.batchcopy); default 1",
    "QUEUED_COPIES": "copies a copy stream keeps queued on the GPU before its issuing thread waits "
                     "(kvstore.transfer.batchcopy); 0 unbounded; default 2048",
    "MOONCAKE_TRACE": "path of the Mooncake trace for benchmarks/bench_trace.py",
    "CRASH_TRIALS": "tests: crash trials of tests/test_persistence.py (default 4)",
    "STATEFUL_EXAMPLES": "tests: hypothesis examples of tests/test_stateful.py (default 25)",
    "STATEFUL_STEPS": "tests: steps per example of tests/test_stateful.py (default 30)",
    "STATEFUL_DEVICE": "tests: device of tests/test_stateful.py (default cpu)",
    "STRESS_SEEDS": "tests: seeds of tests/test_stress.py (N, A-B or a comma list; default 20)",
    "STRESS_SECONDS": "tests: seconds per seed of tests/test_stress.py (default 3)",
    "STRESS_REPORT": "tests: JSON file for tests/test_stress.py failures",
    "STRESS_PROGRESS": "tests: file that gets one line per finished seed of tests/test_stress.py",
    "STRESS_DEVICE": "tests: device of tests/test_stress.py (default cpu)",
    "STRESS_TRACE": "tests: 1 records a page-event trace in tests/test_stress.py",
}

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _kinds() -> dict[str, type]:
    from .config import TIER_KINDS

    return TIER_KINDS


def _params(cls: type) -> dict[str, Any]:
    """Constructor parameters of ``cls`` -> their resolved type hints (``Any`` when unknown)."""
    hints: dict[str, Any] = {}
    try:
        target: Any = cls if dataclasses.is_dataclass(cls) else vars(cls).get("__init__", cls)
        hints = typing.get_type_hints(target, vars(sys.modules[cls.__module__]))
    except Exception:  # pragma: no cover - unresolvable hints: values pass through to the record's checks
        pass
    sig = inspect.signature(cls)
    return {name: hints.get(name, Any) for name, p in sig.parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _required(cls: type) -> list[str]:
    return [n for n, p in inspect.signature(cls).parameters.items()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _unknown(where: str, key: str, known: typing.Iterable[str]) -> ConfigError:
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"{where}: unknown key {key!r}; {hint}known keys: {', '.join(known)}")


def _alternatives(hint: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(hint)
    return (hint,)


def _dtype(value: object, where: str) -> object:
    if isinstance(value, str):
        found = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(found, torch.dtype):
            raise ConfigError(f"{where}={value!r} is not a torch dtype; write e.g. float16, bfloat16, float8_e4m3fn")
        return found
    return value


def _coerce(name: str, value: object, hint: Any, where: str, text: bool) -> object:
    """``value`` for parameter ``name``: sizes for ``*_bytes``, dtype names; with ``text`` (an environment
    variable) also the ints, floats, bools and None its type hint allows. Anything else is left to the
    record's own checks (which name the field)."""
    if name.endswith("_bytes") and value is not None:
        return parse_size(value, where)
    alts = _alternatives(hint)
    if torch.dtype in alts:
        return _dtype(value, where)
    if not (text and isinstance(value, str)):
        return value
    low = value.strip().lower()
    if type(None) in alts and low in ("", "none", "null"):
        return None
    if bool in alts:
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise ConfigError(f"{where}={value!r} is not a bool; write 1/0, true/false, yes/no or on/off")
    if int in alts:
        try:
            return int(value.replace("_", ""))
        except ValueError:
            if float not in alts:
                raise ConfigError(f"{where}={value!r} is not an int") from None
    if float in alts:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}={value!r} is not a number") from None
    return value


def _build(cls: type, data: Mapping[str, object], where: str, text: bool = False) -> Any:
    params = _params(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in params:
            raise _unknown(where, key, params)
        kwargs[key] = _coerce(key, value, params[key], f"{where}.{key}", text)
    missing = [n for n in _required(cls) if n not in kwargs]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(repr(m) for m in missing)} (a {cls.__name__} needs them)")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _mapping(value: object, where: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a table/mapping, got {type(value).__name__}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where}: keys must be strings, got {bad[0]!r}")
    return value


def from_dict(data: Mapping[str, object], *, layout: Optional["PageLayout"] = None,
              where: str = "config") -> "StoreConfig":
    """A StoreConfig from the shape in this module's docstring; ``layout`` supplies (or replaces) the
    ``layout`` table, e.g. ``layout_for_model(model, 16)``. ConfigError names the key that is wrong."""
    from .config import PageLayout, StoreConfig

    data = _mapping(data, where)
    fields = dict(data)
    if layout is not None:
        fields.pop("layout", None)
        chosen = layout
    elif "layout" in fields:
        chosen = _build(PageLayout, _mapping(fields.pop("layout"), f"{where}.layout"), f"{where}.layout")
    else:
        raise ConfigError(f"{where}: no 'layout' table; add one (num_layers, num_kv_heads, head_dim, "
                          "tokens_per_page, dtype) or pass layout=PageLayout(...)")
    tiers_data = fields.pop("tiers", None)
    if not isinstance(tiers_data, (list, tuple)) or not tiers_data:
        raise ConfigError(f"{where}: 'tiers' must be a non-empty list of tables, each with a 'kind' "
                          f"({', '.join(_kinds())}), hot to cold")
    tiers = []
    kinds = _kinds()
    for i, t in enumerate(tiers_data):
        t_where = f"{where}.tiers[{i}]"
        t = dict(_mapping(t, t_where))
        kind = t.pop("kind", None)
        if kind not in kinds:
            raise ConfigError(f"{t_where}.kind must be one of {', '.join(repr(k) for k in kinds)}, got {kind!r}")
        tiers.append(_build(kinds[kind], t, t_where))
    fields = {**fields, "layout": chosen, "tiers": tiers}
    config: StoreConfig = _build(StoreConfig, fields, where)
    return config


def _load(path: Path) -> object:
    suffix = path.suffix.lower()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {str(path)!r}: {exc.strerror}") from None
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        try:
            return tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: YAML needs PyYAML: pip install 'kvstore-llm[yaml]' (or write TOML)") from None
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    raise ConfigError(f"{path}: unknown config format {suffix!r}; use a .toml, .yaml or .yml file")


def from_file(path: "str | os.PathLike[str]", *, layout: Optional["PageLayout"] = None) -> "StoreConfig":
    """A StoreConfig from a TOML (``.toml``) or YAML (``.yaml``/``.yml``, needs PyYAML) file."""
    p = Path(path)
    return from_dict(_mapping(_load(p), str(p)), layout=layout, where=str(p))


def _env_fields(prefix: str) -> dict[str, tuple[str, type, str, Any]]:
    """Every variable -> (section: "store", "layout" or a tier kind, its class, parameter, type hint)."""
    from .config import PageLayout, StoreConfig

    out: dict[str, tuple[str, type, str, Any]] = {}
    for name, hint in _params(StoreConfig).items():
        if name not in ("layout", "tiers", "remote"):  # a remote tier comes in as the last of the tiers (its REMOTE_ variables)
            out[f"{prefix}{name.upper()}"] = ("store", StoreConfig, name, hint)
    for name, hint in _params(PageLayout).items():
        out[f"{prefix}LAYOUT_{name.upper()}"] = ("layout", PageLayout, name, hint)
    for kind, cls in _kinds().items():
        for name, hint in _params(cls).items():
            out[f"{prefix}{kind.upper()}_{name.upper()}"] = (kind, cls, name, hint)
    return out


def env_variables(prefix: str = "KVSTORE_") -> dict[str, tuple[str, str]]:
    """Every configuration variable ``from_env`` reads -> (the field it sets, e.g. ``DiskTier.path``; its type)."""
    return {var: (f"{cls.__name__}.{name}", _hint_text(name, hint))
            for var, (_, cls, name, hint) in _env_fields(prefix).items()}


def _hint_text(name: str, hint: Any) -> str:
    if name.endswith("_bytes"):
        return "size"
    alts = [a for a in _alternatives(hint) if a is not type(None)]
    if os.PathLike in alts or typing.get_origin(hint) is os.PathLike:
        alts = [os.PathLike]
    elif torch.device in alts:
        alts = [torch.device]
    words = {bool: "bool", int: "int", float: "float", str: "str", torch.dtype: "dtype",
             os.PathLike: "path", torch.device: "device"}
    text = " or ".join(dict.fromkeys(words.get(a, "str") for a in alts))
    return text + (" or none" if type(None) in _alternatives(hint) else "")


def from_env(prefix: str = "KVSTORE_", *, layout: Optional["PageLayout"] = None,
             environ: Optional[Mapping[str, str]] = None) -> "StoreConfig":
    """A StoreConfig from ``prefix``-ed environment variables (``environ``: ``os.environ`` by default).

    An unknown variable with the prefix is a ConfigError (a typo would otherwise be ignored), except the
    process-wide switches and test variables of :data:`RUNTIME_ENV`."""
    from .config import PageLayout, StoreConfig

    env = os.environ if environ is None else environ
    known = _env_fields(prefix)
    sections: dict[str, dict[str, object]] = {}
    for var in sorted(env):
        if not var.startswith(prefix):
            continue
        if var not in known:
            if var[len(prefix):] in RUNTIME_ENV and prefix == "KVSTORE_":
                continue
            close = difflib.get_close_matches(var, list(known), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"unknown environment variable {var}; {hint}the variables are listed in "
                              "docs/configuration.md (unset it, or fix its name)")
        section, _, name, hint_ = known[var]
        sections.setdefault(section, {})[name] = _coerce(name, env[var], hint_, var, True)
    if layout is None:
        if "layout" not in sections:
            raise ConfigError(f"no page layout: set {prefix}LAYOUT_NUM_LAYERS, _NUM_KV_HEADS, _HEAD_DIM, "
                              "_TOKENS_PER_PAGE (and _DTYPE), or pass layout=PageLayout(...)")
        layout = _build(PageLayout, sections["layout"], f"{prefix}LAYOUT_*")
    kinds = _kinds()
    if "device" not in sections:
        raise ConfigError(f"no device tier: set {prefix}DEVICE_QUOTA_BYTES (e.g. 8GiB)")
    tiers = [_build(cls, sections[k], f"{prefix}{k.upper()}_*") for k, cls in kinds.items() if k in sections]
    config: StoreConfig = _build(StoreConfig, {**sections.get("store", {}), "layout": layout, "tiers": tiers},
                                 "environment")
    return config
