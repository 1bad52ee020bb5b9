"""What this machine offers kvstore: versions, CUDA and GPUs, pinned memory, kvikio / GDS, the disk I/O
backend ``auto`` picks for a directory, and whether a Redis URL answers. Backs ``kvstore info``.

Every probe is bounded and reports a failure as text instead of raising: the report is for a person
deciding what to install or configure.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any, Optional

from . import resources

__all__ = ["versions", "cuda_info", "kvikio_info", "backend_for", "redis_info", "report"]

_PACKAGES = ("torch", "numpy", "xxhash", "click", "tqdm", "prometheus-client", "PyYAML",
             "kvikio-cu13", "libkvikio-cu13", "redis", "transformers")


def versions() -> dict[str, Optional[str]]:
    """Installed versions of kvstore's dependencies (None: not installed). Imports nothing."""
    from . import __version__

    out: dict[str, Optional[str]] = {"python": platform.python_version(), "kvstore": __version__,
                                     "kvstore location": str(Path(__file__).resolve().parent)}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def host_info() -> dict[str, object]:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_total_bytes": resources.memory_total(),
        "memory_available_bytes": resources.memory_available(),
        "memlock_limit_bytes": None if soft == resource.RLIM_INFINITY else soft,
    }


def cuda_info() -> dict[str, object]:
    """CUDA as torch sees it, and whether pinned (page-locked) host memory can be allocated."""
    import torch

    out: dict[str, object] = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                              "devices": []}
    if not torch.cuda.is_available():
        out["pinned_memory"] = "not used: no CUDA (host tiers are pageable memory)"
        return out
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        devices.append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                        "total_bytes": total, "free_bytes": free})
    out["devices"] = devices
    try:
        torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
        out["pinned_memory"] = "ok (1 MiB allocated and freed)"
    except RuntimeError as exc:
        out["pinned_memory"] = f"failed: {exc}"
    return out


def kvikio_info() -> dict[str, object]:
    """Whether kvikio imports, its version, and compat mode (no GPUDirect Storage) or GDS."""
    if importlib.util.find_spec("kvikio") is None:
        return {"installed": False, "note": "pip install 'kvstore-llm[gds]' for kvikio (GPUDirect Storage)"}
    try:
        import kvikio
        import kvikio.defaults
    except Exception as exc:
        return {"installed": True, "importable": False, "error": f"{type(exc).__name__}: {exc}"}
    out: dict[str, object] = {"installed": True, "importable": True, "version": getattr(kvikio, "__version__", None)}
    try:
        compat = bool(kvikio.defaults.is_compat_mode_preferred())
        out["compat_mode"] = compat
        out["gds"] = not compat
    except Exception as exc:
        out["compat_mode"] = None
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def backend_for(directory: Path) -> dict[str, object]:
    """The disk I/O backend a manager would pick for a disk tier in ``directory`` (a probe file is written
    there and removed), honouring ``KVSTORE_IO_BACKEND``."""
    from .transfer.io_backends import choose_backend

    out: dict[str, object] = {"directory": str(directory), "KVSTORE_IO_BACKEND": os.environ.get("KVSTORE_IO_BACKEND")}
    if not Path(directory).is_dir():
        out["error"] = "not a directory (create it first: the probe writes a small file there)"
        return out
    try:
        name, why = choose_backend(Path(directory))
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    out["backend"], out["reason"] = name, why
    return out


def redis_info(url: str, timeout_s: float = 1.0) -> dict[str, object]:
    """Whether a Redis-protocol server answers PING at ``url`` within ``timeout_s`` (needs redis-py)."""
    out: dict[str, object] = {"url": url}
    if importlib.util.find_spec("redis") is None:
        out["reachable"] = None
        out["error"] = "redis-py is not installed (pip install redis)"
        return out
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                      retry_on_timeout=False)
        try:
            client.ping()
            out["reachable"] = True
            out["server_version"] = client.info("server").get("redis_version")
        finally:
            client.close()
    except Exception as exc:
        out["reachable"] = False
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def report(directory: Optional[Path] = None, redis_url: Optional[str] = None) -> dict[str, Any]:
    """Everything ``kvstore info`` prints."""
    out: dict[str, Any] = {"versions": versions(), "host": host_info(), "cuda": cuda_info(),
                              "kvikio": kvikio_info()}
    if directory is not None:
        out["io_backend"] = backend_for(directory)
    if redis_url is not None:
        out["redis"] = redis_info(redis_url)
    out["executable"] = sys.executable
    return out
