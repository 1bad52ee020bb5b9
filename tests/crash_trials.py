"""Many SIGKILL crash trials by hand (not run by CI): ``python -m tests.crash_trials --trials 1000 --seed S``.

Each trial starts ``tests/crash_writer.py`` on one persistent directory (kept across trials, so the
journal and the slot file grow, recover and compact as in real use), SIGKILLs it a uniform random
0.05-1.5 s after it reports ready, and reopens the directory to check that every page served is
byte-exact (:func:`tests.test_persistence.crash_trial`). Prints one line per trial and a summary.

Trial ``i`` kills after ``random.Random(f"{seed}-{i}")`` seconds and its writer has seed ``seed*100000+i``,
so ``--jobs N`` (N shard processes, shard k runs the trials i with i % N == k, each on its own directory)
runs the same trials as a serial run, on N directories instead of one."""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .test_persistence import crash_trial


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=20261201)
    ap.add_argument("--min-kill", type=float, default=0.05)
    ap.add_argument("--max-kill", type=float, default=1.5)
    ap.add_argument("--dir", default=None, help="tier directory (default: a fresh temporary one)")
    ap.add_argument("--jobs", type=int, default=1, help="shard processes run in parallel")
    ap.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    directory = Path(args.dir or tempfile.mkdtemp(prefix="kvstore-crash-"))
    if args.jobs > 1 and args.shard is None:
        return run_shards(args, directory)
    exact = refused = wrong = errors = 0
    t0 = time.monotonic()
    mine = range(args.trials) if args.shard is None else range(args.shard, args.trials, args.jobs)
    for trial in mine:
        rng = random.Random(f"{args.seed}-{trial}")
        try:
            s, r, w = crash_trial(directory, args.seed * 100_000 + trial, rng, (args.min_kill, args.max_kill))
        except Exception:  # a trial that could not run or verify is counted, never hidden
            errors += 1
            print(f"trial {trial}: ERROR\n{traceback.format_exc()}", flush=True)
            continue
        exact, refused, wrong = exact + s, refused + r, wrong + w
        print(f"trial {trial}: exact {s} refused {r} wrong {w} (totals {exact}/{refused}/{wrong}, "
              f"{time.monotonic() - t0:.0f} s)", flush=True)
    print(f"SUMMARY trials={len(mine)} seed={args.seed} kill={args.min_kill}-{args.max_kill}s dir={directory} "
          f"exact_pages={exact} refused_resumes={refused} wrong_pages={wrong} errors={errors} "
          f"wall_s={time.monotonic() - t0:.0f}", flush=True)
    return 1 if wrong or errors else 0


def run_shards(args, directory: Path) -> int:
    t0 = time.monotonic()
    procs = []
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(args.jobs):
        cmd = [sys.executable, "-m", "tests.crash_trials", "--trials", str(args.trials), "--seed", str(args.seed),
               "--min-kill", str(args.min_kill), "--max-kill", str(args.max_kill), "--jobs", str(args.jobs),
               "--shard", str(k), "--dir", str(directory / f"shard{k}")]
        with open(directory / f"shard{k}.log", "w") as log:  # per-trial lines, readable while it runs
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ))
    totals = dict(trials=0, exact_pages=0, refused_resumes=0, wrong_pages=0, errors=0)
    for k, p in enumerate(procs):
        p.wait()
        out = (directory / f"shard{k}.log").read_text()
        for line in out.splitlines():
            if "ERROR" in line or line.startswith("SUMMARY") or "Traceback" in line:
                print(f"[shard {k}] {line}", flush=True)
        summary = [l for l in out.splitlines() if l.startswith("SUMMARY")]
        if not summary:
            totals["errors"] += 1
            print(f"[shard {k}] no summary; tail:\n{out[-2000:]}", flush=True)
            continue
        for name in totals:
            totals[name] += int(re.search(rf"\b{name}=(\d+)", summary[0]).group(1))
    print(f"TOTAL jobs={args.jobs} seed={args.seed} kill={args.min_kill}-{args.max_kill}s "
          + " ".join(f"{k}={v}" for k, v in totals.items()) + f" wall_s={time.monotonic() - t0:.0f}", flush=True)
    return 1 if totals["wrong_pages"] or totals["errors"] or totals["trials"] != args.trials else 0


if __name__ == "__main__":
    sys.exit(main())
