"""The ``kvstore`` command, run as ``python -m kvstore`` in a subprocess on real files (a persistent disk
tier written by a real manager, a damaged page, stale slot files of a dead process)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kvstore import DeviceTier, DiskTier, HostTier, KVCacheManager, StoreConfig
from kvstore.persistence import scan_journal
from kvstore.transfer.diskfile import slot_stride

from .conftest import LAYOUT, PAGE, sink_to_disk, write_pages

ROOT = Path(__file__).resolve().parent.parent
TPP = LAYOUT.tokens_per_page
COMMITTED = 3


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def kvstore(*args: str, check: int | None = 0) -> subprocess.CompletedProcess:
    """Run ``python -m kvstore ARGS`` from this checkout (not the installed copy)."""
    proc = subprocess.run([sys.executable, "-m", "kvstore", *args], env=env(), capture_output=True, text=True,
                          timeout=180, cwd=ROOT)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


async def kvstore_async(*args: str) -> tuple[int, str]:
    """The same without blocking the event loop (a manager runs in this process meanwhile)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "kvstore", *args, env=env(), cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    return proc.returncode, out.decode()


def config(path: Path) -> StoreConfig:
    return StoreConfig(LAYOUT, [DeviceTier(4 * PAGE), HostTier(4 * PAGE), DiskTier(32 * PAGE, path, persistent=True)],
                       namespace="llama/tp0")


async def commit_pages_to_disk(mgr: KVCacheManager, tokens: list[int]) -> None:
    cache = mgr.create_cache()
    await cache.resume()
    await cache.resize(len(tokens))
    write_pages(mgr, cache, seed=1)
    cache.commit(tokens)
    cache.suspend()
    await sink_to_disk(mgr, cache)
    cache.close()


@pytest.fixture
def tier(tmp_path) -> Path:
    """A persistent disk tier holding COMMITTED committed pages, closed."""
    path = tmp_path / "tier"

    async def build() -> None:
        async with KVCacheManager(config(path)) as mgr:
            await commit_pages_to_disk(mgr, list(range(COMMITTED * TPP)))

    asyncio.run(build())
    return path


def first_page_offset(path: Path) -> int:
    live = scan_journal((path / "kvstore.journal").read_bytes()).live
    return min(live) * slot_stride(PAGE)


# ---------------------------------------------------------------------------------------------- info
def test_info_reports_versions_cuda_kvikio_backend_and_redis(tmp_path):
    out = json.loads(kvstore("info", "--json", "--dir", str(tmp_path), "--redis", "redis://127.0.0.1:1/0").stdout)
    assert out["versions"]["kvstore"] and out["versions"]["torch"]
    assert out["cuda"]["available"] in (True, False) and "pinned_memory" in out["cuda"]
    assert "installed" in out["kvikio"]
    assert out["io_backend"]["backend"] in ("posix", "kvikio") and out["io_backend"]["reason"]
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
    assert out["redis"]["reachable"] in (False, None)  # nothing listens on port 1
    text = kvstore("info", "--dir", str(tmp_path)).stdout
    assert "io backend:" in text and "pinned memory" in text and "kvikio:" in text


# ---------------------------------------------------------------------------------------------- inspect
def test_inspect_reports_layout_namespace_pages_and_journal(tier):
    rep = json.loads(kvstore("inspect", str(tier), "--json").stdout)
    assert rep["persistent"] and rep["locked_by"] == []
    assert rep["namespace"] == "llama/tp0"
    assert rep["layout"] == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "tokens_per_page": 4,
                             "dtype": "float16"}
    assert rep["page_bytes"] == PAGE and rep["pages"] == COMMITTED and rep["slots"] == 32
    assert rep["journal_torn_bytes"] == 0 and rep["journal_puts"] >= COMMITTED
    assert rep["size_on_disk"] > 0 and rep["problems"] == []
    text = kvstore("inspect", str(tier)).stdout
    assert f"pages:           {COMMITTED} committed" in text and "not in use" in text and "'llama/tp0'" in text


async def test_inspect_is_safe_while_a_manager_runs_on_the_directory(tier):
    tokens = list(range(1000, 1000 + 2 * TPP))
    async with KVCacheManager(config(tier)) as mgr:
        rc, out = await kvstore_async("inspect", str(tier), "--json")
        assert rc == 0
        assert json.loads(out)["locked_by"] == [os.getpid()]
        await commit_pages_to_disk(mgr, tokens)  # the manager is unaffected: it still commits and journals
        assert mgr.lookup(tokens).num_tokens == len(tokens)
    assert json.loads(kvstore("inspect", str(tier), "--json").stdout)["pages"] == COMMITTED + 2


# ---------------------------------------------------------------------------------------------- verify
def test_verify_passes_an_intact_tier_with_a_progress_bar(tier):
    proc = kvstore("verify", str(tier), "--progress")
    assert f"verified {COMMITTED} committed pages" in proc.stdout and "ok:" in proc.stdout
    assert "verify" in proc.stderr and f"{COMMITTED}/{COMMITTED}" in proc.stderr  # tqdm's bar


def test_verify_finds_a_damaged_page_and_exits_1(tier):
    offset = first_page_offset(tier)
    with open(tier / "kvstore.pages", "r+b") as f:
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    proc = kvstore("verify", str(tier), check=1)
    assert "DAMAGED: 1 pages" in proc.stdout and f"at offset {offset}: checksum mismatch" in proc.stdout
    rep = json.loads(kvstore("verify", str(tier), "--json", check=1).stdout)
    assert rep["ok"] is False and [d["offset"] for d in rep["damaged"]] == [offset]
    assert rep["checked"] == COMMITTED


def test_verify_reports_a_truncated_slot_file(tier):
    os.truncate(tier / "kvstore.pages", first_page_offset(tier) + 10)
    rep = json.loads(kvstore("verify", str(tier), "--json", check=1).stdout)
    assert len(rep["damaged"]) >= 1 and "short read" in rep["damaged"][0]["reason"]


def test_verify_refuses_a_directory_that_is_not_a_persistent_tier(tmp_path):
    proc = kvstore("verify", str(tmp_path), check=2)
    assert "not a persistent disk tier" in proc.stderr


# ---------------------------------------------------------------------------------------------- clean
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_clean_removes_only_slot_files_of_dead_processes(tier):
    dead = tier / f"kvstore-{dead_pid()}-{uuid.uuid4().hex[:12]}.pages"
    live = tier / f"kvstore-{os.getpid()}-{uuid.uuid4().hex[:12]}.pages"
    for f in (dead, live):
        f.write_bytes(b"\0" * 4096)
    dry = json.loads(kvstore("clean", str(tier), "--dry-run", "--json").stdout)
    assert dry["removed"] == [dead.name] and dry["kept"] == [live.name] and dead.exists()
    assert f"{dead.name} (4.0 KiB), pid" in kvstore("inspect", str(tier)).stdout  # inspect lists it, gone
    out = kvstore("clean", str(tier)).stdout
    assert f"removed {dead.name}" in out and "removed 1 stale slot files, kept 1" in out
    assert not dead.exists() and live.exists()
    assert (tier / "kvstore.pages").exists() and (tier / "kvstore.journal").exists()  # the persistent tier stays


# ---------------------------------------------------------------------------------------------- bench
def test_bench_lists_and_runs_a_benchmark_script(tmp_path, capsys):
    from kvstore.cli import main

    assert main(["bench", "--list", "--json"]) == 0  # in-process: the listing and the usage error
    assert {"tiers", "bookkeeping", "trace", "commit"} <= set(json.loads(capsys.readouterr().out)["benchmarks"])
    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    out = tmp_path / "tiers.json"
    kvstore("bench", "tiers", "--device", "cpu", "--rows", "h2d_128k", "--size-mib", "2", "--reps", "1",
            "--no-progress", "--no-gc-freeze", "--json", str(out))
    assert json.loads(out.read_text())["rows"][0]["status"] == "ok"
