"""The device registry and its companions: audit log, throttle state, approval codes.

Kept apart from the password file, keyed by account (docs/conformance.md, C15). Tokens are
never stored: a row holds the HMAC device key (see clientid.device_key), and approval
codes are kept as SHA-256 hashes. Calls are synchronous and short; the server runs
them in a thread, the admin command directly. SQLite in WAL mode, so the admin command
can change a device while the server runs.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from zope.interface import Interface, implementer

BUSY_TIMEOUT = 5.0  # seconds to wait for the database (locked by another process)

TRUSTED = "trusted"
PENDING = "pending"
REVOKED = "revoked"
STATES = (TRUSTED, PENDING, REVOKED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    account      TEXT NOT NULL,
    device_key   TEXT NOT NULL,
    type         TEXT NOT NULL,
    state        TEXT NOT NULL,
    label        TEXT NOT NULL DEFAULT '',
    first_seen   REAL NOT NULL,
    last_seen    REAL NOT NULL,
    last_network TEXT NOT NULL DEFAULT '',
    logins       INTEGER NOT NULL DEFAULT 0,
    last_login   REAL NOT NULL DEFAULT 0,
    last_region  TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (account, device_key)
);
CREATE TABLE IF NOT EXISTS audit (
    time        REAL NOT NULL,
    account     TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    network     TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    reason      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (time);
CREATE INDEX IF NOT EXISTS audit_by_account ON audit (account, time);
CREATE TABLE IF NOT EXISTS throttle (
    key     TEXT PRIMARY KEY,
    tokens  REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS approval_codes (
    code_hash  TEXT PRIMARY KEY,
    account    TEXT NOT NULL,
    device_key TEXT NOT NULL,
    expires    REAL NOT NULL,
    used       REAL
);
CREATE TABLE IF NOT EXISTS shared_devices (
    device_key TEXT PRIMARY KEY,
    flagged_at REAL NOT NULL,
    accounts   INTEGER NOT NULL
);
"""

# Columns added after the first release: (table, column, definition).
_ADDED_COLUMNS = (
    ("devices", "last_login", "REAL NOT NULL DEFAULT 0"),
    ("devices", "last_region", "TEXT NOT NULL DEFAULT ''"),
)


@dataclass(frozen=True)
class AuditEntry:
    time: float
    account: str
    fingerprint: str
    network: str
    outcome: str
    reason: str


@dataclass(frozen=True)
class Device:
    account: str
    device_key: str
    type: str
    state: str
    label: str
    first_seen: float
    last_seen: float
    last_network: str
    logins: int
    last_login: float = 0.0
    last_region: str = ""

    @property
    def fingerprint(self) -> str:
        from clientid_mta.smtp.clientid import fingerprint

        return fingerprint(self.device_key)


class DeviceNotFound(LookupError):
    pass


class IDeviceStore(Interface):
    """Where device records live; SQLite here, a shared database for a server farm later."""

    def get(account: str, device_key: str) -> Device | None:
        """The device, or None."""

    def ever_trusted(account: str) -> bool:
        """Whether the account has a trusted or revoked device (TOFU is then over)."""

    def record(account: str, device_key: str, type: str, state: str, network: str) -> Device:
        """Insert (with ``state``) or refresh last-seen; an existing state is kept."""

    def login(account: str, device_key: str, network: str, region: str) -> None:
        """Count a successful login and refresh last-seen, network and region."""

    def set_state(account: str, fingerprint: str, state: str) -> Device:
        """Change a device's state, found by fingerprint prefix."""

    def set_label(account: str, fingerprint: str, label: str) -> Device:
        """Change a device's label."""

    def devices_of(account: str) -> list[Device]:
        """All devices of an account."""


@implementer(IDeviceStore)
class SQLiteDeviceStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self._lock = threading.Lock()
        previous_umask = os.umask(0o077)  # the database and its -wal/-shm stay private
        try:
            self._db = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT
            )
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._add_missing_columns()
        finally:
            os.umask(previous_umask)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's turn at the database, waited for at most BUSY_TIMEOUT.

        Without the bound, calls queue behind one that waits on another process's lock,
        and a login would wait as long as that lock lasts instead of failing (454).
        """
        if not self._lock.acquire(timeout=BUSY_TIMEOUT):
            raise sqlite3.OperationalError("the device store is busy")
        try:
            yield
        finally:
            self._lock.release()

    def _add_missing_columns(self) -> None:
        for table, column, definition in _ADDED_COLUMNS:
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    def close(self) -> None:
        with self._locked():
            self._db.close()

    def _one(self, sql: str, args: tuple[object, ...]) -> Device | None:
        with self._locked():
            row = self._db.execute(sql, args).fetchone()
        return Device(**dict(row)) if row else None

    def get(self, account: str, device_key: str) -> Device | None:
        return self._one(
            "SELECT * FROM devices WHERE account=? AND device_key=?", (account, device_key)
        )

    def ever_trusted(self, account: str) -> bool:
        with self._locked():
            row = self._db.execute(
                "SELECT 1 FROM devices WHERE account=? AND state IN (?, ?) LIMIT 1",
                (account, TRUSTED, REVOKED),
            ).fetchone()
        return row is not None

    def record(self, account: str, device_key: str, type: str, state: str, network: str) -> Device:
        now = time.time()
        with self._locked():
            self._db.execute(
                "INSERT INTO devices (account, device_key, type, state, first_seen, last_seen,"
                " last_network) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(account, device_key) DO UPDATE SET last_seen=excluded.last_seen,"
                " last_network=excluded.last_network",
                (account, device_key, type, state, now, now, network),
            )
        device = self.get(account, device_key)
        assert device is not None
        return device

    def login(self, account: str, device_key: str, network: str, region: str) -> None:
        now = time.time()
        with self._locked():
            self._db.execute(
                "UPDATE devices SET logins=logins+1, last_seen=?, last_network=?, last_login=?,"
                " last_region=? WHERE account=? AND device_key=?",
                (now, network, now, region, account, device_key),
            )

    def _find(self, account: str, fingerprint: str) -> Device:
        prefix = fingerprint.strip().lower()
        if len(prefix) < 6 or not all(c in "0123456789abcdef" for c in prefix):
            raise DeviceNotFound(f"{fingerprint!r} is not a device fingerprint (6+ hex digits)")
        matches = [d for d in self.devices_of(account) if d.device_key.startswith(prefix)]
        if len(matches) != 1:
            what = "no device" if not matches else f"{len(matches)} devices"
            raise DeviceNotFound(f"{what} of {account} match fingerprint {fingerprint}")
        return matches[0]

    def set_state(self, account: str, fingerprint: str, state: str) -> Device:
        if state not in STATES:
            raise ValueError(f"unknown device state {state!r}")
        device = self._find(account, fingerprint)
        with self._locked():
            self._db.execute(
                "UPDATE devices SET state=? WHERE account=? AND device_key=?",
                (state, account, device.device_key),
            )
        return self._find(account, fingerprint)

    def set_label(self, account: str, fingerprint: str, label: str) -> Device:
        device = self._find(account, fingerprint)
        with self._locked():
            self._db.execute(
                "UPDATE devices SET label=? WHERE account=? AND device_key=?",
                (label, account, device.device_key),
            )
        return self._find(account, fingerprint)

    def add_trusted(self, account: str, device_key: str, type: str, label: str = "") -> Device:
        """An operator's pre-approved device (``device add``); trusted even if seen before."""
        self.record(account, device_key, type, TRUSTED, "")
        with self._locked():
            self._db.execute(
                "UPDATE devices SET state=?, label=? WHERE account=? AND device_key=?",
                (TRUSTED, label, account, device_key),
            )
        device = self.get(account, device_key)
        assert device is not None
        return device

    def delete_account(self, account: str) -> int:
        """Forget every device of an account; returns how many there were."""
        with self._locked():
            cursor = self._db.execute("DELETE FROM devices WHERE account=?", (account,))
        return cursor.rowcount

    def devices_of(self, account: str) -> list[Device]:
        with self._locked():
            rows = self._db.execute(
                "SELECT * FROM devices WHERE account=? ORDER BY first_seen", (account,)
            ).fetchall()
        return [Device(**dict(row)) for row in rows]

    # --- audit log ------------------------------------------------------------------

    def add_audit(self, entries: list[AuditEntry]) -> None:
        with self._locked():
            self._db.executemany(
                "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (e.time, e.account, e.fingerprint, e.network, e.outcome, e.reason)
                    for e in entries
                ],
            )

    def prune_audit(self, before: float) -> int:
        with self._locked():
            return self._db.execute("DELETE FROM audit WHERE time < ?", (before,)).rowcount

    def audit(
        self,
        account: str | None = None,
        fingerprint: str | None = None,
        since: float | None = None,
        limit: int = 1000,
    ) -> list[AuditEntry]:
        """The newest ``limit`` entries matching, oldest first."""
        # Only fixed condition strings are joined into the SQL; values go in as parameters.
        where: list[str] = ["1=1"]
        args: list[object] = []
        if account is not None:
            where.append("account = ?")
            args.append(account)
        if fingerprint is not None:
            where.append("fingerprint LIKE ?")
            args.append(fingerprint.lower() + "%")
        if since is not None:
            where.append("time >= ?")
            args.append(since)
        sql = f"SELECT * FROM audit WHERE {' AND '.join(where)} ORDER BY time DESC LIMIT ?"  # noqa: S608
        with self._locked():
            rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [AuditEntry(**dict(row)) for row in reversed(rows)]

    # --- throttle state -------------------------------------------------------------

    def save_throttle(self, rows: list[tuple[str, float, float]]) -> None:
        with self._locked():
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM throttle")
            self._db.executemany("INSERT INTO throttle VALUES (?, ?, ?)", rows)
            self._db.execute("COMMIT")

    def load_throttle(self) -> list[tuple[str, float, float]]:
        with self._locked():
            return [tuple(row) for row in self._db.execute("SELECT * FROM throttle")]

    # --- approval codes -------------------------------------------------------------

    def add_approval_code(
        self, code_hash: str, account: str, device_key: str, expires: float
    ) -> None:
        with self._locked():
            self._db.execute(
                "INSERT INTO approval_codes VALUES (?, ?, ?, ?, NULL)",
                (code_hash, account, device_key, expires),
            )

    def redeem_approval_code(self, code_hash: str, account: str, now: float) -> str | None:
        """Mark the code used and return its device key, or None if not valid (once only)."""
        with self._locked():
            row = self._db.execute(
                "UPDATE approval_codes SET used=? WHERE code_hash=? AND account=? AND used IS NULL"
                " AND expires > ? RETURNING device_key",
                (now, code_hash, account, now),
            ).fetchone()
        return str(row[0]) if row else None

    # --- shared devices -------------------------------------------------------------

    def flag_shared(self, device_key: str, accounts: int) -> bool:
        """Record a device seen on many accounts; False if it was flagged already."""
        with self._locked():
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO shared_devices VALUES (?, ?, ?)",
                (device_key, time.time(), accounts),
            )
        return cursor.rowcount == 1

    def is_flagged(self, device_key: str) -> bool:
        with self._locked():
            row = self._db.execute(
                "SELECT 1 FROM shared_devices WHERE device_key=?", (device_key,)
            ).fetchone()
        return row is not None

    def unflag(self, fingerprint: str) -> int:
        with self._locked():
            return self._db.execute(
                "DELETE FROM shared_devices WHERE device_key LIKE ?", (fingerprint.lower() + "%",)
            ).rowcount
