"""Many SIGKILL crash trials by hand (not run by CI): ``python -m tests.crash_trials --trials 1000 --seed S``.

Each trial starts ``tests/crash_writer.py`` on one persistent directory (kept across trials, so the
journal and the slot file grow, recover and compact as in real use), SIGKILLs it a uniform random
0.05-1.5 s after it reports ready, and reopens the directory to check that every page served is
byte-exact (:func:`tests.test_persistence.crash_trial`). Prints one line per trial and a summary."""

from __future__ import annotations

import argparse
import random
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
    args = ap.parse_args()
    directory = Path(args.dir or tempfile.mkdtemp(prefix="kvstore-crash-"))
    rng = random.Random(args.seed)
    exact = refused = wrong = errors = 0
    t0 = time.monotonic()
    for trial in range(args.trials):
        try:
            s, r, w = crash_trial(directory, args.seed * 100_000 + trial, rng, (args.min_kill, args.max_kill))
        except Exception:  # a trial that could not run or verify is counted, never hidden
            errors += 1
            print(f"trial {trial}: ERROR\n{traceback.format_exc()}", flush=True)
            continue
        exact, refused, wrong = exact + s, refused + r, wrong + w
        print(f"trial {trial}: exact {s} refused {r} wrong {w} (totals {exact}/{refused}/{wrong}, "
              f"{time.monotonic() - t0:.0f} s)", flush=True)
    print(f"SUMMARY trials={args.trials} seed={args.seed} kill={args.min_kill}-{args.max_kill}s dir={directory} "
          f"exact_pages={exact} refused_resumes={refused} wrong_pages={wrong} errors={errors} "
          f"wall_s={time.monotonic() - t0:.0f}", flush=True)
    return 1 if wrong or errors else 0


if __name__ == "__main__":
    sys.exit(main())
