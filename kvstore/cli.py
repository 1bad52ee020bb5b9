"""The ``kvstore`` command (also ``python -m kvstore``): info, inspect, verify, clean, bench.

Parsing and printing only; the work is in :mod:`kvstore.sysinfo` and :mod:`kvstore.diskscan`. Every
command takes ``--json`` (one JSON object on stdout, for scripts). Exit codes: 0 fine, 1 damage found
(``verify``), 2 a usage or configuration error.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import click

from .errors import KVStoreError
from . import __version__

__all__ = ["main", "cli"]


def _human(n: object) -> str:
    """1.5 GiB-style for reports (format_size is exact, this one is short)."""
    if not isinstance(n, int):
        return "unknown"
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def _emit(as_json: bool, data: dict[str, Any], lines: Sequence[str]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        click.echo("\n".join(lines))


def _fail(exc: Exception) -> "click.exceptions.Exit":
    click.echo(f"kvstore: {exc}", err=True)
    return click.exceptions.Exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, message="kvstore %(version)s")
def cli() -> None:
    """kvstore: inspect the machine and the disk tiers a KV-cache manager leaves behind."""


# ---------------------------------------------------------------------------------------------- info
@cli.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help="Probe which disk I/O backend 'auto' picks for a disk tier in this directory.")
@click.option("--redis", "redis_url", metavar="URL", help="Check that a Redis-protocol server answers PING.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def info(directory: Optional[Path], redis_url: Optional[str], as_json: bool) -> None:
    """Versions, CUDA and GPUs, pinned memory, kvikio/GDS, the I/O backend for a directory, Redis."""
    from . import sysinfo

    rep: dict[str, Any] = sysinfo.report(directory, redis_url)
    v, host, cuda, kv = rep["versions"], rep["host"], rep["cuda"], rep["kvikio"]
    lines = ["versions:"]
    lines += [f"  {k:<18} {val or '-'}" for k, val in v.items()]
    lines += ["host:",
              f"  platform           {host['platform']}",
              f"  cpus               {host['cpus']}",
              f"  memory             {_human(host['memory_total_bytes'])} total, "
              f"{_human(host['memory_available_bytes'])} available",
              f"  memlock limit      {_human(host['memlock_limit_bytes']) if host['memlock_limit_bytes'] is not None else 'unlimited'}",
              "cuda:",
              f"  available          {cuda['available']} (torch built for CUDA {cuda['torch_cuda'] or '-'})"]
    for dev in cuda["devices"]:
        lines.append(f"  cuda:{dev['index']}             {dev['name']} (sm {dev['capability']}), "
                     f"{_human(dev['free_bytes'])} free of {_human(dev['total_bytes'])}")
    lines.append(f"  pinned memory      {cuda['pinned_memory']}")
    if not kv["installed"]:
        lines.append(f"kvikio:              not installed ({kv['note']})")
    elif not kv.get("importable"):
        lines.append(f"kvikio:              installed but does not import: {kv['error']}")
    else:
        mode = {True: "compat mode (no GPUDirect Storage)", False: "GPUDirect Storage"}.get(kv.get("compat_mode"), "unknown")
        lines.append(f"kvikio:              {kv.get('version')}, {mode}")
    if "io_backend" in rep:
        io = rep["io_backend"]
        if "error" in io:
            lines.append(f"io backend:          {io['directory']}: {io['error']}")
        else:
            env = io["KVSTORE_IO_BACKEND"] or "auto"
            lines.append(f"io backend:          {io['backend']} for {io['directory']} "
                         f"(KVSTORE_IO_BACKEND={env}: {io['reason']})")
    if "redis" in rep:
        r = rep["redis"]
        state = {True: f"reachable (server {r.get('server_version')})", False: "NOT reachable",
                 None: "not checked"}[r["reachable"]]
        lines.append(f"redis:               {r['url']}: {state}" + (f" - {r['error']}" if "error" in r else ""))
    _emit(as_json, rep, lines)


# ---------------------------------------------------------------------------------------------- inspect
_DIR = click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))


@cli.command()
@_DIR
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def inspect(directory: Path, as_json: bool) -> None:
    """Describe a disk tier directory: layout, namespace, pages, journal, size. Read-only, safe while a
    manager runs on it."""
    from .diskscan import inspect_dir

    try:
        rep = inspect_dir(directory)
    except KVStoreError as exc:
        raise _fail(exc) from None
    if rep.locked_by is None:
        lock = "unknown (/proc/locks unreadable)"
    else:
        lock = f"in use by pid {', '.join(map(str, rep.locked_by))}" if rep.locked_by else "not in use"
    lines = [f"directory:       {rep.path}"]
    if rep.persistent:
        lay = rep.layout
        lines += [
            "kind:            persistent disk tier (format {})".format(rep.format),
            f"state:           {lock}",
            f"namespace:       {rep.namespace!r}" if rep.namespace is not None
            else f"namespace:       unknown (no kvstore.info; hash seed {str(rep.namespace_hash)[:16]}...)",
            "layout:          " + (f"{lay['num_layers']} layers x {lay['num_kv_heads']} kv heads x {lay['head_dim']}, "
                                   f"{lay['tokens_per_page']} tokens/page, {lay['dtype']}" if "num_layers" in lay
                                   else str(lay)),
            f"page:            {_human(rep.page_bytes)} ({rep.page_bytes} bytes, slot stride {rep.slot_stride})",
            f"pages:           {rep.pages} committed ({_human(rep.committed_bytes)}) in {rep.slots} slots",
            f"journal:         {rep.journal_records} records ({rep.journal_puts} PUT, {rep.journal_dels} DEL), "
            f"{_human(rep.journal_bytes)}" + (f", torn tail {rep.journal_torn_bytes} bytes" if rep.journal_torn_bytes else ", clean"),
            f"slot file:       {_human(rep.slot_file_bytes)}",
            f"size on disk:    {_human(rep.size_on_disk)}",
        ]
    else:
        lines.append("kind:            no persistent tier (no kvstore.meta)")
    for sf in rep.slot_files:
        alive = "running" if sf.pid_alive else "gone: 'kvstore clean' removes it"
        lines.append(f"slot file:       {sf.name} ({_human(sf.allocated_bytes)}), pid {sf.pid} {alive}")
    lines += [f"problem:         {p}" for p in rep.problems]
    _emit(as_json, rep.to_json(), lines)


# ---------------------------------------------------------------------------------------------- verify
@cli.command()
@_DIR
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when it is a terminal).")
def verify(directory: Path, as_json: bool, progress: Optional[bool]) -> None:
    """Re-read every committed page of a persistent tier and check its checksum. Exit 1 (and list the
    pages) on damage. Read-only."""
    from .diskscan import inspect_dir, verify_dir

    try:
        total = inspect_dir(directory).pages
        bar = None
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="page", file=sys.stderr, desc="verify", leave=True)
        try:
            def advance(pages: int, _nbytes: int) -> None:
                if bar is not None:
                    bar.update(pages)

            rep = verify_dir(directory, advance if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
    except KVStoreError as exc:
        raise _fail(exc) from None
    rate = rep.bytes_read / rep.seconds / 2**30 if rep.seconds > 0 else 0.0
    lines = [f"verified {rep.checked} committed pages ({_human(rep.bytes_read)}) of {rep.path} in "
             f"{rep.seconds:.2f} s ({rate:.2f} GiB/s)"]
    if rep.changed:
        lines.append(f"{rep.changed} pages were rewritten by a running manager while checked (not damage)")
    if rep.damaged:
        lines.append(f"DAMAGED: {len(rep.damaged)} pages (a manager never hands them out: a cache that holds one gets CorruptPageError, else it is dropped as a miss):")
        lines += [f"  slot {d.slot} at offset {d.offset}: {d.reason}" for d in rep.damaged]
    else:
        lines.append("ok: every page matches its checksum")
    _emit(as_json, rep.to_json(), lines)
    if rep.damaged:
        raise click.exceptions.Exit(1)


# ---------------------------------------------------------------------------------------------- clean
@cli.command()
@_DIR
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def clean(directory: Path, dry_run: bool, as_json: bool) -> None:
    """Remove the slot files that dead processes left (kvstore-<pid>-*.pages whose pid is gone, owned by
    this user, not locked). Files of running processes and persistent tiers are never touched."""
    from . import resources

    removed = resources.reclaim_stale_slot_files(directory, dry_run=dry_run)
    kept = sorted(n for n in (p.name for p in directory.iterdir())
                  if resources.slot_file_pid(n) is not None and directory / n not in removed)
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {p.name}" for p in removed] + [f"kept {n} (its process runs, or it is locked or not ours)" for n in kept]
    lines.append(f"{verb} {len(removed)} stale slot files, kept {len(kept)}")
    _emit(as_json, {"directory": str(directory), "dry_run": dry_run, "removed": [p.name for p in removed],
                    "kept": kept}, lines)


# ---------------------------------------------------------------------------------------------- bench
def _bench_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "benchmarks"


def _benches() -> dict[str, Path]:
    d = _bench_dir()
    return {p.stem.removeprefix("bench_"): p for p in sorted(d.glob("bench_*.py"))} if d.is_dir() else {}


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("name", required=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--list", "list_", is_flag=True, help="List the benchmarks.")
@click.option("--json", "as_json", is_flag=True, help="With --list: one JSON object on stdout.")
def bench(name: Optional[str], args: tuple[str, ...], list_: bool, as_json: bool) -> None:
    """Run a benchmark script of the source checkout: kvstore bench tiers --rows h2d_2m ... (ARGS go to
    the script; 'kvstore bench NAME --help' shows its options). Figures: docs/benchmarks.md."""
    benches = _benches()
    if not benches:
        raise _fail(KVStoreError(f"no benchmarks/ beside the kvstore package ({_bench_dir()}); they ship with "
                                 "the source checkout, not the wheel: clone the repository"))
    if list_ or name is None:
        _emit(as_json, {"benchmarks": {k: str(v) for k, v in benches.items()}},
              [f"{k:<12} {v}" for k, v in benches.items()])
        return
    if name not in benches:
        raise _fail(KVStoreError(f"unknown benchmark {name!r}; one of: {', '.join(benches)}"))
    rc = subprocess.call([sys.executable, str(benches[name]), *args])
    raise click.exceptions.Exit(rc)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console-script entry point."""
    try:
        rc = cli.main(args=list(argv) if argv is not None else None, prog_name="kvstore", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    return rc if isinstance(rc, int) else 0  # without standalone mode click returns an Exit's code
