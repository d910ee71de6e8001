"""The SQLite backend of the store interfaces (store.py): one file under data_dir.

The admin command and the worker processes share the file; WAL mode lets readers
run beside a writer. Each repository has its own connection and lock, so a slow call
in one (an audit batch, a prune) does not queue the logins behind it. A decision that
must be atomic runs in one ``BEGIN IMMEDIATE`` transaction, which takes the write
lock before its first read: no other connection, in this process or another, can
write between that read and the transaction's write.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from zope.interface import implementer

from clientid_mta.devices.store import (
    PENDING,
    REVOKED,
    STATES,
    TRUSTED,
    AuditEntry,
    Budget,
    BudgetRow,
    Device,
    DeviceNotFound,
    IApprovalCodes,
    IAuditStore,
    IBudgetStore,
    IDeviceRegistry,
    ILoginLook,
    INoticeLedger,
    ISendingCounts,
    ISharedDeviceStore,
    LoginView,
    PendingLogin,
    Sending,
    Stores,
    StoreUnavailable,
    change_budgets,
    login_updates,
    parse_fingerprint,
)

BUSY_TIMEOUT = 5.0  # seconds to wait for the database (locked by another process)
# After a checkpoint the write-ahead log is cut back to this size, so a burst of writes
# does not leave a large -wal file behind.
JOURNAL_SIZE_LIMIT = 256 * 1024
WAL_AUTOCHECKPOINT_PAGES = 128  # checkpoint at 512 KiB of log, not SQLite's 4 MiB
VACUUM_PAGES = 2048  # free pages given back per compact() call (8 MiB at 4 KiB a page)
_INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL

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
CREATE TABLE IF NOT EXISTS audit_counts (
    minute      REAL NOT NULL,
    network     TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    reason      TEXT NOT NULL,
    count       INTEGER NOT NULL,
    UNIQUE (minute, network, fingerprint, outcome, reason)
);
CREATE TABLE IF NOT EXISTS notices_sent (
    recipient   TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    kind        TEXT NOT NULL,
    sent        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS notices_sent_by_recipient ON notices_sent (recipient, sent);
CREATE INDEX IF NOT EXISTS notices_sent_by_time ON notices_sent (sent);
CREATE TABLE IF NOT EXISTS throttle (
    key     TEXT PRIMARY KEY,
    tokens  REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS login_networks (
    account    TEXT NOT NULL,
    network    TEXT NOT NULL,
    last_login REAL NOT NULL,
    PRIMARY KEY (account, network)
);
CREATE INDEX IF NOT EXISTS login_networks_by_time ON login_networks (last_login);
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
CREATE TABLE IF NOT EXISTS device_sightings (
    device_key TEXT NOT NULL,
    account    TEXT NOT NULL,
    seen       REAL NOT NULL,
    PRIMARY KEY (device_key, account)
);
CREATE INDEX IF NOT EXISTS device_sightings_by_time ON device_sightings (seen);
CREATE TABLE IF NOT EXISTS sending (
    account    TEXT PRIMARY KEY,
    hour       INTEGER NOT NULL,
    messages   INTEGER NOT NULL,
    recipients INTEGER NOT NULL,
    refused    INTEGER NOT NULL DEFAULT 0
);
"""

# Columns added after the first release: (table, column, definition).
_ADDED_COLUMNS = (
    ("devices", "last_login", "REAL NOT NULL DEFAULT 0"),
    ("devices", "last_region", "TEXT NOT NULL DEFAULT ''"),
)


class SQLiteStoreUnavailable(StoreUnavailable, sqlite3.OperationalError):
    """Raised for every database error, so callers need not know the backend."""


def _connect(path: Path, synchronous: str, busy_timeout: float) -> sqlite3.Connection:
    previous_umask = os.umask(0o077)  # the database and its -wal/-shm stay private
    try:
        db = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None, timeout=busy_timeout
        )
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous}")
            db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        except BaseException:
            db.close()
            raise
        return db
    finally:
        os.umask(previous_umask)


def create_schema(path: Path) -> None:
    """Create the file, its tables and the columns added since (idempotent)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = _connect(path, "FULL", BUSY_TIMEOUT)
    try:
        _use_incremental_vacuum(db)
        db.executescript(_SCHEMA)
        for table, column, definition in _ADDED_COLUMNS:
            present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
    finally:
        db.close()


def _use_incremental_vacuum(db: sqlite3.Connection) -> None:
    """Let compact() shrink the file. A file made before needs one rebuild (VACUUM) to
    switch; if another process holds the file now, the next start tries again."""
    if db.execute("PRAGMA auto_vacuum").fetchone()[0] == _INCREMENTAL:
        return
    db.execute("PRAGMA auto_vacuum=INCREMENTAL")
    if db.execute("PRAGMA auto_vacuum").fetchone()[0] != _INCREMENTAL:
        with contextlib.suppress(sqlite3.OperationalError):
            db.execute("VACUUM")


class _Repository:
    """One connection and its lock; every call takes the lock at most ``busy_timeout``."""

    synchronous = "FULL"

    def __init__(self, path: Path, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        try:
            self._db = _connect(path, self.synchronous, busy_timeout)
        except sqlite3.Error as problem:
            raise SQLiteStoreUnavailable(str(problem)) from problem

    @contextlib.contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        """This connection's turn, waited for at most the busy timeout.

        Without the bound, calls queue behind one that waits on another process's lock,
        and a login would wait as long as that lock lasts instead of failing (454).
        """
        if not self._lock.acquire(timeout=self._busy_timeout):
            raise SQLiteStoreUnavailable("the device store is busy")
        try:
            yield self._db
        except SQLiteStoreUnavailable:
            raise
        except sqlite3.Error as problem:
            raise SQLiteStoreUnavailable(str(problem)) from problem
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, its write lock taken before the first read."""
        with self._locked() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._locked() as db:
            db.close()


_R = TypeVar("_R", bound=_Repository)

# The (key, key, time) tables of recent events: their key columns and time column.
_RECENT_COLUMNS = {
    "login_networks": ("account", "network", "last_login"),
    "device_sightings": ("device_key", "account", "seen"),
}


def _refresh_recent(
    db: sqlite3.Connection, table: str, row: tuple[str, str, float], window: float
) -> None:
    """Insert one event, or move its time forward, and forget the table's events older
    than ``window`` (by the index on time), inside the caller's transaction: the table
    holds at most one window's worth."""
    first, second, when = _RECENT_COLUMNS[table]  # fixed names only reach the SQL text
    db.execute(f"DELETE FROM {table} WHERE {when} < ?", (row[2] - window,))  # noqa: S608
    db.execute(
        f"INSERT INTO {table} VALUES (?, ?, ?) ON CONFLICT({first}, {second})"  # noqa: S608
        f" DO UPDATE SET {when}=max({when}, excluded.{when})",
        row,
    )


def _no_hook() -> None:
    pass


@implementer(IDeviceRegistry)
class SQLiteDeviceRegistry(_Repository):
    def __init__(self, path: Path, busy_timeout: float = BUSY_TIMEOUT) -> None:
        super().__init__(path, busy_timeout)
        # For the conformance tests: runs inside ``register``, between its reads and its
        # write, where a race would have to strike.
        self.between_read_and_write: Callable[[], None] = _no_hook

    @staticmethod
    def _device(db: sqlite3.Connection, account: str, device_key: str) -> Device | None:
        row = db.execute(
            "SELECT * FROM devices WHERE account=? AND device_key=?", (account, device_key)
        ).fetchone()
        return Device(**dict(row)) if row else None

    def get(self, account: str, device_key: str) -> Device | None:
        with self._locked() as db:
            return self._device(db, account, device_key)

    def register(
        self, account: str, device_key: str, type: str, network: str, eligible: bool
    ) -> tuple[Device, bool]:
        now = time.time()
        with self._transaction() as db:
            existing = self._device(db, account, device_key)
            first = (
                existing is None
                and eligible
                and db.execute(
                    "SELECT 1 FROM devices WHERE account=? AND state IN (?, ?) LIMIT 1",
                    (account, TRUSTED, REVOKED),
                ).fetchone()
                is None
            )
            self.between_read_and_write()
            if existing is None:
                db.execute(
                    "INSERT INTO devices (account, device_key, type, state, first_seen,"
                    " last_seen, last_network) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (account, device_key, type, TRUSTED if first else PENDING, now, now, network),
                )
            else:
                db.execute(
                    "UPDATE devices SET last_seen=?, last_network=? WHERE account=? AND"
                    " device_key=?",
                    (now, network, account, device_key),
                )
            device = self._device(db, account, device_key)
        assert device is not None
        return device, existing is None

    def login(self, account: str, device_key: str, network: str, region: str) -> None:
        self.record_logins([PendingLogin(account, device_key, network, region, time.time())])

    def record_logins(self, logins: Sequence[PendingLogin]) -> None:
        with self._transaction() as db:
            db.executemany(
                "UPDATE devices SET logins=logins+?, last_seen=max(last_seen, ?),"
                " last_network=CASE WHEN last_login<=? THEN ? ELSE last_network END,"
                " last_region=CASE WHEN last_login<=? THEN ? ELSE last_region END,"
                " last_login=max(last_login, ?) WHERE account=? AND device_key=?",
                login_updates(logins),
            )

    def add_trusted(self, account: str, device_key: str, type: str, label: str = "") -> Device:
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO devices (account, device_key, type, state, label, first_seen,"
                " last_seen) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(account, device_key)"
                " DO UPDATE SET state=excluded.state, label=excluded.label",
                (account, device_key, type, TRUSTED, label, now, now),
            )
            device = self._device(db, account, device_key)
        assert device is not None
        return device

    def _change(self, account: str, fingerprint: str, column: str, value: str) -> Device:
        """Set one column of the one device matching the fingerprint prefix."""
        prefix = parse_fingerprint(fingerprint)
        with self._transaction() as db:
            keys = [
                row[0]
                for row in db.execute(
                    "SELECT device_key FROM devices WHERE account=? AND substr(device_key, 1, ?)=?",
                    (account, len(prefix), prefix),
                )
            ]
            if len(keys) != 1:
                what = "no device" if not keys else f"{len(keys)} devices"
                raise DeviceNotFound(f"{what} of {account} match fingerprint {prefix}")
            # Only the two fixed column names below reach the SQL text.
            db.execute(
                f"UPDATE devices SET {column}=? WHERE account=? AND device_key=?",  # noqa: S608
                (value, account, keys[0]),
            )
            device = self._device(db, account, keys[0])
        assert device is not None
        return device

    def set_state(self, account: str, fingerprint: str, state: str) -> Device:
        if state not in STATES:
            raise ValueError(f"unknown device state {state!r}")
        return self._change(account, fingerprint, "state", state)

    def set_label(self, account: str, fingerprint: str, label: str) -> Device:
        return self._change(account, fingerprint, "label", label)

    def devices_of(self, account: str) -> list[Device]:
        with self._locked() as db:
            rows = db.execute(
                "SELECT * FROM devices WHERE account=? ORDER BY first_seen", (account,)
            ).fetchall()
        return [Device(**dict(row)) for row in rows]

    def delete_account(self, account: str) -> int:
        with self._locked() as db:
            return db.execute("DELETE FROM devices WHERE account=?", (account,)).rowcount


# Attempts and count rows as one listing: a count row has no account.
_AUDIT_LISTING = (
    "SELECT time, account, fingerprint, network, outcome, reason, 1 AS count FROM audit"
    " UNION ALL SELECT minute, '', fingerprint, network, outcome, reason, count"
    " FROM audit_counts"
)


@implementer(IAuditStore)
class SQLiteAuditStore(_Repository):
    def add_audit(self, entries: list[AuditEntry]) -> None:
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (e.time, e.account, e.fingerprint, e.network, e.outcome, e.reason)
                    for e in entries
                ],
            )

    def add_audit_counts(self, counts: list[AuditEntry]) -> None:
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO audit_counts VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(minute,"
                " network, fingerprint, outcome, reason) DO UPDATE SET count=count+excluded.count",
                [(e.time, e.network, e.fingerprint, e.outcome, e.reason, e.count) for e in counts],
            )

    def prune_audit(self, before: float) -> int:
        with self._transaction() as db:
            dropped = db.execute("DELETE FROM audit WHERE time < ?", (before,)).rowcount
            return (
                dropped
                + db.execute("DELETE FROM audit_counts WHERE minute < ?", (before,)).rowcount
            )

    def trim_audit(self, max_entries: int) -> int:
        dropped = 0
        with self._transaction() as db:
            # Rows are appended with ever larger rowids: those more than max_entries below
            # the largest were written earlier than the max_entries kept (a look-up, no scan).
            for table in ("audit", "audit_counts"):
                # Only the two fixed table names above reach the SQL text.
                (last,) = db.execute(f"SELECT max(rowid) FROM {table}").fetchone()  # noqa: S608
                if last is not None and last > max_entries:
                    dropped += db.execute(
                        f"DELETE FROM {table} WHERE rowid <= ?",  # noqa: S608
                        (last - max_entries,),
                    ).rowcount
        return dropped

    def compact(self) -> None:
        with self._locked() as db:
            # Through executescript: it steps the pragma to its end, and each step frees a
            # page (execute() would free only the first).
            db.executescript(f"PRAGMA incremental_vacuum({VACUUM_PAGES});")
            # PASSIVE never waits for other connections; the next write then starts the
            # log afresh and cuts the file to JOURNAL_SIZE_LIMIT.
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def audit(
        self,
        account: str | None = None,
        fingerprint: str | None = None,
        since: float | None = None,
        limit: int = 1000,
    ) -> list[AuditEntry]:
        # Only fixed condition strings are joined into the SQL; values go in as parameters.
        where: list[str] = ["1=1"]
        args: list[object] = []
        if account is not None:
            where.append("account = ?")
            args.append(account)
        if fingerprint is not None:
            prefix = parse_fingerprint(fingerprint)
            where.append("substr(fingerprint, 1, ?) = ?")
            args += [len(prefix), prefix]
        if since is not None:
            where.append("time >= ?")
            args.append(since)
        sql = (
            f"SELECT * FROM ({_AUDIT_LISTING}) WHERE {' AND '.join(where)}"  # noqa: S608
            " ORDER BY time DESC LIMIT ?"
        )
        with self._locked() as db:
            rows = db.execute(sql, (*args, limit)).fetchall()
        return [AuditEntry(**dict(row)) for row in reversed(rows)]


@implementer(IBudgetStore)
class SQLiteBudgetStore(_Repository):
    # A budget is not worth an fsync per login; WAL still keeps the table consistent.
    synchronous = "NORMAL"

    @staticmethod
    def _rows(db: sqlite3.Connection, keys: list[str]) -> dict[str, BudgetRow | None]:
        marks = ",".join("?" * len(keys))
        sql = f"SELECT key, tokens, updated FROM throttle WHERE key IN ({marks})"  # noqa: S608
        return {key: (tokens, updated) for key, tokens, updated in db.execute(sql, keys)}

    def _apply(
        self, budgets: Mapping[str, Budget], now: float, change: float
    ) -> tuple[bool, dict[str, BudgetRow]]:
        if not budgets:
            return True, {}
        with self._transaction() as db:
            applied, rows = change_budgets(budgets, self._rows(db, list(budgets)), now, change)
            if applied:
                db.executemany(
                    "INSERT OR REPLACE INTO throttle VALUES (?, ?, ?)",
                    [(key, tokens, updated) for key, (tokens, updated) in rows.items()],
                )
        return applied, rows

    def take(self, budgets: Mapping[str, Budget], now: float) -> tuple[bool, dict[str, BudgetRow]]:
        return self._apply(budgets, now, -1.0)

    def refund(self, budgets: Mapping[str, Budget], now: float) -> dict[str, BudgetRow]:
        return self._apply(budgets, now, +1.0)[1]

    def prune(self, kinds: Mapping[str, Budget], now: float) -> int:
        with self._transaction() as db:
            stale = []
            for key, tokens, updated in db.execute("SELECT key, tokens, updated FROM throttle"):
                budget = kinds.get(key.partition(":")[0])
                if budget is None or budget.level(tokens, now - updated) >= budget.burst:
                    stale.append((key,))
            db.executemany("DELETE FROM throttle WHERE key = ?", stale)
        return len(stale)

    def save(self, rows: list[tuple[str, float, float]]) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM throttle")
            db.executemany("INSERT INTO throttle VALUES (?, ?, ?)", rows)

    def load(self) -> list[tuple[str, float, float]]:
        with self._locked() as db:
            return [
                (key, tokens, updated)
                for key, tokens, updated in db.execute("SELECT key, tokens, updated FROM throttle")
            ]

    def trusted_device_keys(self) -> set[str]:
        with self._locked() as db:
            rows = db.execute("SELECT DISTINCT device_key FROM devices WHERE state=?", (TRUSTED,))
            return {str(row[0]) for row in rows}

    def record_login_network(self, account: str, network: str, now: float, keep: float) -> None:
        with self._transaction() as db:
            _refresh_recent(db, "login_networks", (account, network, now), keep)

    def login_networks(self, since: float) -> list[tuple[str, str, float]]:
        with self._locked() as db:
            rows = db.execute(
                "SELECT account, network, last_login FROM login_networks WHERE last_login >= ?"
                " ORDER BY last_login DESC",
                (since,),
            )
            return [(str(account), str(network), float(when)) for account, network, when in rows]


@implementer(IApprovalCodes)
class SQLiteApprovalCodes(_Repository):
    def add_approval_code(
        self, code_hash: str, account: str, device_key: str, expires: float
    ) -> None:
        with self._locked() as db:
            db.execute(
                "INSERT INTO approval_codes VALUES (?, ?, ?, ?, NULL)",
                (code_hash, account, device_key, expires),
            )

    def redeem_approval_code(self, code_hash: str, account: str, now: float) -> str | None:
        with self._locked() as db:
            row = db.execute(
                "UPDATE approval_codes SET used=? WHERE code_hash=? AND account=? AND used IS NULL"
                " AND expires > ? RETURNING device_key",
                (now, code_hash, account, now),
            ).fetchone()
        return str(row[0]) if row else None

    def prune_approval_codes(self, now: float) -> int:
        with self._locked() as db:
            return db.execute(
                "DELETE FROM approval_codes WHERE used IS NOT NULL OR expires <= ?", (now,)
            ).rowcount


@implementer(INoticeLedger)
class SQLiteNoticeLedger(_Repository):
    # Rate-limit bookkeeping: losing the last second of it in a power cut costs at most a
    # notice sent twice, not worth an fsync per notice.
    synchronous = "NORMAL"

    def may_notify(
        self, recipient: str, fingerprint: str, kind: str, now: float, repeat: float, per_hour: int
    ) -> bool:
        with self._transaction() as db:
            again = db.execute(
                "SELECT 1 FROM notices_sent WHERE recipient=? AND fingerprint=? AND kind=?"
                " AND sent > ? LIMIT 1",
                (recipient, fingerprint, kind, now - repeat),
            ).fetchone()
            if again is not None:
                return False
            (sent,) = db.execute(
                "SELECT COUNT(*) FROM notices_sent WHERE recipient=? AND sent > ?",
                (recipient, now - 3600),
            ).fetchone()
            if sent >= per_hour:
                return False
            db.execute(
                "INSERT INTO notices_sent VALUES (?, ?, ?, ?)", (recipient, fingerprint, kind, now)
            )
            return True

    def prune_notices(self, before: float) -> int:
        with self._locked() as db:
            return db.execute("DELETE FROM notices_sent WHERE sent < ?", (before,)).rowcount


@implementer(ISharedDeviceStore)
class SQLiteSharedDevices(_Repository):
    # Sightings are a heuristic's counters, not worth an fsync per login attempt.
    synchronous = "NORMAL"

    def saw(self, device_key: str, account: str, now: float, window: float) -> int:
        with self._transaction() as db:
            # Every expired sighting goes (by the index on time), so the table holds at
            # most one window's worth of attempts.
            _refresh_recent(db, "device_sightings", (device_key, account, now), window)
            row = db.execute(
                "SELECT COUNT(*) FROM device_sightings WHERE device_key=?", (device_key,)
            ).fetchone()
        return int(row[0])

    def flag(self, device_key: str, accounts: int, now: float) -> bool:
        with self._locked() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO shared_devices VALUES (?, ?, ?)",
                (device_key, now, accounts),
            )
        return cursor.rowcount == 1

    @staticmethod
    def _flagged(db: sqlite3.Connection, device_key: str) -> bool:
        row = db.execute("SELECT 1 FROM shared_devices WHERE device_key=?", (device_key,))
        return row.fetchone() is not None

    def is_flagged(self, device_key: str) -> bool:
        with self._locked() as db:
            return self._flagged(db, device_key)

    def unflag(self, fingerprint: str) -> int:
        prefix = parse_fingerprint(fingerprint)
        with self._transaction() as db:
            keys = [
                (row[0],)
                for row in db.execute(
                    "DELETE FROM shared_devices WHERE substr(device_key, 1, ?)=?"
                    " RETURNING device_key",
                    (len(prefix), prefix),
                ).fetchall()
            ]
            # Counting starts afresh: the accounts tried before the flag was cleared are
            # what the operator just forgave.
            db.executemany("DELETE FROM device_sightings WHERE device_key=?", keys)
        return len(keys)


@implementer(ISendingCounts)
class SQLiteSendingCounts(_Repository):
    """One row per account: the hour it last sent in, its counts, whether refused."""

    # A count is not worth an fsync per message; WAL still keeps the table consistent.
    synchronous = "NORMAL"

    def count_sending(
        self, account: str, hour: int, add: Sending, most: Sending
    ) -> tuple[bool, bool]:
        with self._transaction() as db:
            row = db.execute(
                "SELECT hour, messages, recipients, refused FROM sending WHERE account = ?",
                (account,),
            ).fetchone()
            sent, to, refused = 0, 0, 0
            if row is not None and row["hour"] >= hour:  # later: another process's clock
                hour, sent, to, refused = tuple(row)
            over = (most.messages and sent + add.messages > most.messages) or (
                most.recipients and to + add.recipients > most.recipients
            )
            if over:
                db.execute(
                    "INSERT OR REPLACE INTO sending VALUES (?, ?, ?, ?, 1)",
                    (account, hour, sent, to),
                )
                return False, not refused
            db.execute(
                "INSERT OR REPLACE INTO sending VALUES (?, ?, ?, ?, ?)",
                (account, hour, sent + add.messages, to + add.recipients, refused),
            )
            return True, False


@implementer(ILoginLook)
class SQLiteLoginLook(_Repository):
    """The reactor's read (issue 16): a connection of its own that never waits. In WAL
    mode a reader is never blocked by a writer, in this process or another; for the
    rare moments it would be (the log being reset, a lock held by ``close``) the busy
    timeout is 0, so the call fails at once and the login takes the thread path."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, busy_timeout=0.0)
        with self._locked() as db:
            db.execute("PRAGMA query_only=ON")

    def look(self, account: str, device_key: str, budget_keys: Sequence[str]) -> LoginView:
        with self._locked() as db:
            db.execute("BEGIN")  # one snapshot for the four reads
            try:
                device = SQLiteDeviceRegistry._device(db, account, device_key)
                budgets = SQLiteBudgetStore._rows(db, list(budget_keys)) if budget_keys else {}
                flagged = SQLiteSharedDevices._flagged(db, device_key)
                sighted = db.execute(
                    "SELECT seen FROM device_sightings WHERE device_key=? AND account=?",
                    (device_key, account),
                ).fetchone()
            finally:
                db.execute("COMMIT")
        rows = {key: row for key, row in budgets.items() if row is not None}
        return LoginView(device, rows, flagged, sighted[0] if sighted else None)

    def close(self) -> None:
        with self._lock:  # waits for a look in progress (microseconds), unlike a look
            self._db.close()


def open_sqlite_stores(path: Path, busy_timeout: float = BUSY_TIMEOUT) -> Stores:
    """Every repository on the one file at ``path`` (created if missing)."""
    try:
        create_schema(path)
    except sqlite3.Error as problem:
        raise SQLiteStoreUnavailable(str(problem)) from problem
    with contextlib.ExitStack() as undo:  # a connection that fails closes those before it

        def opened(repository: _R) -> _R:
            undo.callback(repository.close)
            return repository

        stores = Stores(
            opened(SQLiteDeviceRegistry(path, busy_timeout)),
            opened(SQLiteAuditStore(path, busy_timeout)),
            opened(SQLiteBudgetStore(path, busy_timeout)),
            opened(SQLiteApprovalCodes(path, busy_timeout)),
            opened(SQLiteSharedDevices(path, busy_timeout)),
            opened(SQLiteSendingCounts(path, busy_timeout)),
            opened(SQLiteNoticeLedger(path, busy_timeout)),
            opened(SQLiteLoginLook(path)),
        )
        undo.pop_all()
    return stores


def probe_writable(path: Path, timeout: float = 1.0) -> str | None:
    """None if a write transaction on the store can start within ``timeout`` seconds,
    else why not (locked by another process, unreadable, gone). For readiness checks:
    its own short-lived connection, so it never waits behind the server's own calls."""
    if not path.exists():
        return f"{path} does not exist"
    try:
        db = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    except sqlite3.Error as problem:
        return str(problem)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
    except sqlite3.Error as problem:
        return str(problem)
    finally:
        db.close()
    return None
