"""The distribution name and every install hint agree (PyPI's ``kvstore`` is an unrelated project)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DIST = "kvstore-llm"


def test_the_distribution_is_not_the_unrelated_pypi_kvstore():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["name"] == DIST


def test_no_install_hint_names_the_wrong_project():
    wrong = re.compile(r"pip install\s+['\"]?kvstore(\[|['\"\s]|$)", re.M)
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "kvstore").rglob("*.py"),
             *(ROOT / "examples").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
    hits = [f"{f.relative_to(ROOT)}: {m.group(0)!r}" for f in files for m in wrong.finditer(f.read_text())]
    assert hits == []


def test_the_console_script_points_at_the_cli_entry_point(capsys):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["kvstore"].partition(":")
    import importlib

    import kvstore

    entry = getattr(importlib.import_module(module), func)
    assert entry(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"kvstore {kvstore.__version__}"
    assert entry(["verify"]) == 2  # a usage error: missing DIRECTORY
