"""Readiness: may a load balancer or an orchestrator send mail here now?

Each check is a name and a blocking callable that raises (or returns a reason) when
the server cannot do its work; they run in a thread, one after the other, and the
answer lists every reason. Which checks a server has is the wiring's business.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

# A check returns None when all is well, else a sentence; an exception counts as one.
Check = Callable[[], str | None]


def run_checks(checks: Sequence[tuple[str, Check]]) -> list[str]:
    """Every failing check's "name: reason" (blocking: call it in a thread)."""
    problems = []
    for name, check in checks:
        try:
            reason = check()
        except Exception as problem:  # each kind of trouble is a reason, never a 500
            reason = f"{type(problem).__name__}: {problem}"
        if reason is not None:
            problems.append(f"{name}: {reason}")
    return problems


def writable_folder(folder: Path) -> Check:
    """The folder takes a new file: creates and removes one (root ignores the mode
    bits, so only trying tells a full, read-only or replaced folder)."""

    def check() -> str | None:
        target = folder
        while not target.exists() and target.parent != target:
            target = target.parent  # made on first use: its parent must take it
        if not target.is_dir():
            return f"{target} is not a folder"
        fd, name = tempfile.mkstemp(prefix=".ready-", dir=target)
        os.close(fd)
        os.unlink(name)
        return None

    return check
