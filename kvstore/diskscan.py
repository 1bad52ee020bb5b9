"""Read-only inspection of a disk tier directory: what ``kvstore inspect / verify / clean`` report.

Nothing here takes the tier's lock, writes a file or changes the journal, so it is safe while a manager
runs on the directory in another process: the journal is read once as it is (a record being appended
shows as a torn tail), the slot file is opened read-only, and whether a manager holds the directory is
read from ``/proc/locks``. A page that fails its checksum is read again against a fresh journal before it
is reported: a slot that a running manager rewrote meanwhile is counted as changed, not as damage.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, TypeVar

import numpy as np

from . import resources
from .errors import ConfigError
from .persistence import JournalScan, Record, scan_journal
from .transfer.diskfile import slot_stride
from .transfer.io_backends import checksum

__all__ = ["TierReport", "SlotFile", "Damage", "VerifyReport", "inspect_dir", "verify_dir", "lock_holders"]

META, INFO, JOURNAL, PAGES, LOCK = "kvstore.meta", "kvstore.info", "kvstore.journal", "kvstore.pages", "kvstore.lock"


@dataclass
class SlotFile:
    """A non-persistent tier's slot file (``kvstore-<pid>-<random>.pages``)."""

    name: str
    pid: int
    pid_alive: bool
    bytes: int
    allocated_bytes: int


@dataclass
class TierReport:
    """What ``kvstore inspect DIR`` shows."""

    path: str
    persistent: bool  # kvstore.meta exists
    locked_by: Optional[list[int]]  # pids holding kvstore.lock (flock); None: cannot tell
    format: Optional[int] = None
    layout: dict[str, object] = field(default_factory=dict)  # num_layers, ..., dtype (from kvstore.meta)
    page_bytes: Optional[int] = None
    slot_stride: Optional[int] = None
    namespace: Optional[str] = None  # from kvstore.info; None when it was made before kvstore.info
    namespace_hash: Optional[str] = None  # the prefix-hash seed (covers namespace and layout)
    kvstore_version: Optional[str] = None
    pages: int = 0  # committed pages the journal names (what a restart recovers)
    pages_beyond_file: int = 0  # records naming slots past the end of the slot file (dropped at start)
    slots: int = 0  # slots in the slot file
    slot_file_bytes: int = 0
    committed_bytes: int = 0  # pages * page_bytes
    journal_bytes: int = 0
    journal_records: int = 0
    journal_puts: int = 0
    journal_dels: int = 0
    journal_torn_bytes: int = 0  # a tail a running manager is appending, or torn by a crash
    size_on_disk: int = 0  # blocks allocated to every kvstore file in the directory
    slot_files: list[SlotFile] = field(default_factory=list)  # non-persistent tiers' files
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Damage:
    slot: int
    offset: int
    reason: str


@dataclass
class VerifyReport:
    """What ``kvstore verify DIR`` found: ``damaged`` empty means every committed page read back intact."""

    path: str
    pages: int
    checked: int
    bytes_read: int
    seconds: float
    damaged: list[Damage] = field(default_factory=list)
    changed: int = 0  # slots rewritten by a running manager while they were checked (not damage)

    @property
    def ok(self) -> bool:
        return not self.damaged

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def lock_holders(path: Path) -> Optional[list[int]]:
    """Pids holding a ``flock`` on ``path`` (from ``/proc/locks``, without touching the lock); None when
    that cannot be read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return []
    except OSError:
        return None
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            lines = f.readlines()
    except OSError:
        return None
    pids = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == ident and parts[4].isdigit():
            pids.append(int(parts[4]))
    return sorted(set(pids))


def _layout(fingerprint: object) -> dict[str, object]:
    """``32x8x128x16:torch.bfloat16`` -> its fields (see PageLayout.fingerprint)."""
    try:
        dims, dtype = str(fingerprint).split(":", 1)
        nl, nh, hd, tpp = (int(x) for x in dims.split("x"))
    except ValueError:
        return {"fingerprint": fingerprint}
    return {"num_layers": nl, "num_kv_heads": nh, "head_dim": hd, "tokens_per_page": tpp,
            "dtype": dtype.removeprefix("torch.")}


def _allocated(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


T = TypeVar("T")


def _field(data: dict[str, object], key: str, kind: type[T]) -> Optional[T]:
    """``data[key]`` when it is a ``kind`` (never a bool for int), else None."""
    value = data.get(key)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _read_json(path: Path) -> Optional[dict[str, object]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _journal(directory: Path) -> tuple[JournalScan, int]:
    try:
        data = (directory / JOURNAL).read_bytes()
    except FileNotFoundError:
        data = b""
    return scan_journal(data), len(data)


def _check_dir(directory: Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{str(directory)!r} is not a directory; pass a DiskTier.path")
    return directory


def inspect_dir(directory: "str | os.PathLike[str]") -> TierReport:
    """Describe the disk tier in ``directory`` (persistent or not) without changing anything."""
    d = _check_dir(Path(directory))
    meta = _read_json(d / META)
    rep = TierReport(path=str(d.resolve()), persistent=(d / META).exists(), locked_by=lock_holders(d / LOCK))
    for name in sorted(os.listdir(d)):
        pid = resources.slot_file_pid(name)
        if pid is not None:
            p = d / name
            rep.slot_files.append(SlotFile(name, pid, resources.pid_alive(pid), p.stat().st_size, _allocated(p)))
        if name.startswith("kvstore"):
            rep.size_on_disk += _allocated(d / name)
    if not rep.persistent:
        if not rep.slot_files:
            rep.problems.append("no kvstore files here (neither a persistent tier nor slot files)")
        return rep
    if meta is None:
        rep.problems.append("kvstore.meta is unreadable: a manager will refuse this directory")
        return rep
    rep.format = _field(meta, "format", int)
    rep.layout = _layout(meta.get("layout"))
    rep.page_bytes = _field(meta, "page_bytes", int)
    rep.slot_stride = _field(meta, "slot_stride", int)
    rep.namespace_hash = _field(meta, "hash_seed", str)
    info = _read_json(d / INFO) or {}
    rep.namespace = _field(info, "namespace", str)
    rep.kvstore_version = _field(info, "kvstore_version", str)
    scan, nbytes = _journal(d)
    rep.journal_bytes, rep.journal_records = nbytes, scan.records
    rep.journal_puts, rep.journal_dels, rep.journal_torn_bytes = scan.puts, scan.dels, scan.torn_bytes
    try:
        rep.slot_file_bytes = (d / PAGES).stat().st_size
    except FileNotFoundError:
        rep.problems.append("kvstore.pages is missing: no committed page can be read back")
    stride = rep.slot_stride or (slot_stride(rep.page_bytes) if rep.page_bytes else 0)
    rep.slots = rep.slot_file_bytes // stride if stride else 0
    rep.pages = sum(1 for s in scan.live if s < rep.slots)
    rep.pages_beyond_file = len(scan.live) - rep.pages
    rep.committed_bytes = rep.pages * (rep.page_bytes or 0)
    if rep.pages_beyond_file:
        rep.problems.append(f"{rep.pages_beyond_file} journal records name slots past the end of the slot file "
                            "(a quota shrink not yet compacted; they are dropped at the next start)")
    return rep


def _read_page(fd: int, rec: Record, stride: int, page_bytes: int) -> Optional[str]:
    """None when the page at ``rec.slot`` has its checksum, else why not."""
    off = rec.slot * stride
    try:
        data = os.pread(fd, page_bytes, off)
    except OSError as exc:
        return f"read failed: {exc.strerror}"
    if len(data) != page_bytes:
        return f"short read: {len(data)} of {page_bytes} bytes (the file ends early)"
    got = checksum(np.frombuffer(data, dtype=np.uint8))  # the engine's page checksum
    if got != rec.checksum:
        return f"checksum mismatch: xxh3-64 {got:016x}, journal says {rec.checksum:016x}"
    return None


def verify_dir(directory: "str | os.PathLike[str]",
               progress: Optional[Callable[[int, int], None]] = None) -> VerifyReport:
    """Re-read every committed page of the persistent tier in ``directory`` and check its checksum.

    ``progress(pages_done_now, bytes_now)`` is called after each page. Read-only."""
    import time

    d = _check_dir(Path(directory))
    meta = _read_json(d / META)
    page_bytes = _field(meta, "page_bytes", int) if meta is not None else None
    if meta is None or page_bytes is None:
        raise ConfigError(f"{str(d)!r} is not a persistent disk tier (no readable kvstore.meta): only "
                          "DiskTier(persistent=True) keeps checksums on disk to verify")
    stride = _field(meta, "slot_stride", int) or slot_stride(page_bytes)
    scan, _ = _journal(d)
    records = [scan.live[s] for s in sorted(scan.live)]
    rep = VerifyReport(path=str(d.resolve()), pages=len(records), checked=0, bytes_read=0, seconds=0.0)
    start = time.perf_counter()
    try:
        fd = os.open(d / PAGES, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        rep.damaged = [Damage(r.slot, r.slot * stride, f"slot file unreadable: {exc.strerror}") for r in records]
        return rep
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        suspects: list[tuple[Record, str]] = []
        for rec in records:
            why = _read_page(fd, rec, stride, page_bytes)
            rep.checked += 1
            rep.bytes_read += page_bytes
            if why is not None:
                suspects.append((rec, why))
            if progress is not None:
                progress(1, page_bytes)
        if suspects:  # a running manager may have moved a page on: judge against the journal as it is now
            fresh, _ = _journal(d)
            for rec, why in suspects:
                now = fresh.live.get(rec.slot)
                if now != rec:
                    rep.changed += 1
                    if now is None:
                        continue
                    why2 = _read_page(fd, now, stride, page_bytes)
                    if why2 is None:
                        continue
                    why = why2
                rep.damaged.append(Damage(rec.slot, rec.slot * stride, why))
    finally:
        os.close(fd)
    rep.seconds = time.perf_counter() - start
    return rep
