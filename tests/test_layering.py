"""The package layering (pyproject's [tool.importlinter] contracts) holds.

The wire (``clientid_mta.smtp``) imports no storage module and no database driver, and
no layer below the wiring imports ``server`` or ``cli``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept() -> None:
    # lint-imports reads pyproject.toml and analyses the source tree of the current folder.
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout
