"""The standards of the code, checked with the tools the test extras install."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("tool", "argv"),
    [
        ("ruff", ["check", "."]),
        ("ruff", ["format", "--check", "."]),
        # The package and its tests, with the settings in pyproject.toml. Not bench/: its
        # scripts import each other as top-level modules (sys.path), two of them named
        # sitecustomize, and aiosmtpd, which one of them is typed against, is a bench extra.
        ("mypy", []),
    ],
)
def test_code_is_clean(tool: str, argv: list[str]) -> None:
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"{tool} is not installed (pip install '.[test]')")
    done = subprocess.run(
        [sys.executable, "-m", tool, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
