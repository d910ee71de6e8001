"""Token-bucket rows shared by the worker processes of one server.

With ``[server] workers`` above 1, every worker must see the same failure budgets, or
an attacker gets one budget per worker. The rows live in the device store's
``throttle`` table, changed in short ``BEGIN IMMEDIATE`` transactions (called from
the auth threads, never the reactor). This connection uses ``synchronous=NORMAL``:
a budget is not worth an fsync per login, and WAL still keeps the table consistent.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from clientid_mta.devices.store import BUSY_TIMEOUT

Row = tuple[float, float]  # (tokens, updated)
Decide = Callable[[dict[str, Row | None]], dict[str, Row] | None]


class SharedBuckets:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()

    def update(self, keys: Sequence[str], decide: Decide) -> dict[str, Row] | None:
        """Read the rows of ``keys``, let ``decide`` return new rows (or None for no
        change), write them: all in one transaction that other processes cannot split.
        Returns what ``decide`` returned."""
        if not self._lock.acquire(timeout=BUSY_TIMEOUT):
            raise sqlite3.OperationalError("the device store is busy")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                current: dict[str, Row | None] = dict.fromkeys(keys)
                marks = ",".join("?" * len(keys))
                sql = f"SELECT key, tokens, updated FROM throttle WHERE key IN ({marks})"  # noqa: S608
                for key, tokens, updated in self._db.execute(sql, tuple(keys)):
                    current[key] = (tokens, updated)
                new = decide(current)
                if new:
                    self._db.executemany(
                        "INSERT OR REPLACE INTO throttle VALUES (?, ?, ?)",
                        [(key, tokens, updated) for key, (tokens, updated) in new.items()],
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return new
        finally:
            self._lock.release()

    def prune(self, is_full: Callable[[str, float, float], bool]) -> None:
        """Forget rows whose bucket has refilled (they carry no information)."""
        with self._lock:
            rows = self._db.execute("SELECT key, tokens, updated FROM throttle").fetchall()
            stale = [(key,) for key, tokens, updated in rows if is_full(key, tokens, updated)]
            if stale:
                self._db.executemany("DELETE FROM throttle WHERE key = ?", stale)

    def close(self) -> None:
        with self._lock:
            self._db.close()
