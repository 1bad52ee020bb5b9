"""The README's commands and its usage program are true."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_usage_program_runs_as_is():
    program = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "PrefetchResult(complete=True" in proc.stdout and "reused tokens: 96" in proc.stdout


def test_the_test_command_names_the_tests_directory_and_ci_runs_it():
    command = 'python -m pytest -q -m "not slow" tests'
    assert command in README
    assert command.replace("python ", "python3 ") in (ROOT / ".ci" / "run").read_text()
