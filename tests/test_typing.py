"""``mypy --strict kvstore`` is clean (configured by pyproject.toml's ``[tool.mypy]``; mypy and types-PyYAML
come with the ``test`` extra). Without mypy the test is skipped, except in CI (``CI`` set), where it fails."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_is_clean_under_mypy_strict():
    if importlib.util.find_spec("mypy") is None:
        if os.environ.get("CI"):
            pytest.fail("mypy is not installed; CI must install the test extra (mypy>=1.10, types-PyYAML)")
        pytest.skip("mypy is not installed (it comes with the test extra: pip install 'kvstore-llm[test]')")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "kvstore"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"mypy --strict kvstore failed:\n{proc.stdout}{proc.stderr}"
