"""The PostgreSQL backend of the store interfaces (store.py): one database for many nodes.

Every node of a farm opens the same database, so a device trusted through one node is
known on the next, and a failure budget is one budget whichever node an attempt
reaches. All repositories share one connection pool (psycopg_pool); each call takes a
connection for one transaction. A decision that must be atomic across nodes takes a
transaction-scoped advisory lock on what it decides about (the account for the
first-device rule, each budget key, the notice recipient, the account's sending count)
before its first read, so no other node can decide between that read and its write.

A database that cannot answer (down, restarting, failing over, the pool exhausted) is
``StoreUnavailable``, after at most ``POOL_WAIT`` seconds, which the login path
answers with 454. The pool reconnects by itself; the change of state (unreachable,
reachable again) is logged once, never once per attempt.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from twisted.logger import Logger
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

log = Logger()

POOL_WAIT = 3.0  # seconds a call waits for a connection before it is StoreUnavailable
CONNECT_TIMEOUT = 3  # seconds libpq waits for the server (unless the URL says otherwise)
# A node cut off in the middle of a transaction keeps its locks until the server ends
# it: other nodes' logins wait for a lock at most LOCK_WAIT (then 454), and the server
# ends a transaction left idle for IDLE_TRANSACTION (ours last milliseconds). The
# migrations' session lock waits without limit (a long migration on another node).
LOCK_WAIT = "5s"
IDLE_TRANSACTION = "60s"
SESSION_OPTIONS = (
    f"-c lock_timeout={LOCK_WAIT} -c idle_in_transaction_session_timeout={IDLE_TRANSACTION}"
)
# A database that goes silent (a cut network, a host gone) without closing the
# connection: libpq's TCP keepalives notice an idle one, and a query whose bytes stay
# unacknowledged is given up after TCP_USER_TIMEOUT ms, so a login thread is not held
# until the kernel's own retransmissions give up (about 15 minutes). The URL may set
# its own values.
TCP_SETTINGS = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
# A failed reconnection is given up after this long; the next call starts a new one at
# once, so recovery never waits on a long back-off.
RECONNECT_GIVE_UP = 2.0
DEFAULT_POOL_SIZE = 10

# Advisory lock spaces (the first argument of pg_advisory_xact_lock(int, int)).
_LOCK_MIGRATIONS = 0x434D0001
_LOCK_ACCOUNT = 0x434D0002  # first-device rule
_LOCK_BUDGET = 0x434D0003
_LOCK_NOTICES = 0x434D0004
_LOCK_SENDING = 0x434D0005

KEY_FINGERPRINT = "key_fingerprint"  # the name of the meta row that holds it

# Versioned migrations: (version, what it does, SQL). Append only; never edit one that
# has shipped.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "devices, audit, budgets, approval codes, shared devices, notices, sending counts",
        """
CREATE TABLE devices (
    account      text NOT NULL,
    device_key   text NOT NULL,
    type         text NOT NULL,
    state        text NOT NULL,
    label        text NOT NULL DEFAULT '',
    first_seen   double precision NOT NULL,
    last_seen    double precision NOT NULL,
    last_network text NOT NULL DEFAULT '',
    logins       bigint NOT NULL DEFAULT 0,
    last_login   double precision NOT NULL DEFAULT 0,
    last_region  text NOT NULL DEFAULT '',
    PRIMARY KEY (account, device_key)
);
CREATE INDEX devices_by_state ON devices (state, device_key);
CREATE TABLE audit (
    id          bigserial PRIMARY KEY,
    time        double precision NOT NULL,
    account     text NOT NULL,
    fingerprint text NOT NULL,
    network     text NOT NULL,
    outcome     text NOT NULL,
    reason      text NOT NULL
);
CREATE INDEX audit_by_time ON audit (time);
CREATE INDEX audit_by_account ON audit (account, time);
CREATE TABLE audit_counts (
    id          bigserial PRIMARY KEY,
    minute      double precision NOT NULL,
    network     text NOT NULL,
    fingerprint text NOT NULL,
    outcome     text NOT NULL,
    reason      text NOT NULL,
    count       bigint NOT NULL,
    UNIQUE (minute, network, fingerprint, outcome, reason)
);
CREATE TABLE notices_sent (
    recipient   text NOT NULL,
    fingerprint text NOT NULL,
    kind        text NOT NULL,
    sent        double precision NOT NULL
);
CREATE INDEX notices_sent_by_recipient ON notices_sent (recipient, sent);
CREATE INDEX notices_sent_by_time ON notices_sent (sent);
CREATE TABLE throttle (
    key     text PRIMARY KEY,
    tokens  double precision NOT NULL,
    updated double precision NOT NULL
);
CREATE TABLE login_networks (
    account    text NOT NULL,
    network    text NOT NULL,
    last_login double precision NOT NULL,
    PRIMARY KEY (account, network)
);
CREATE INDEX login_networks_by_time ON login_networks (last_login);
CREATE TABLE approval_codes (
    code_hash  text PRIMARY KEY,
    account    text NOT NULL,
    device_key text NOT NULL,
    expires    double precision NOT NULL,
    used       double precision
);
CREATE TABLE shared_devices (
    device_key text PRIMARY KEY,
    flagged_at double precision NOT NULL,
    accounts   bigint NOT NULL
);
CREATE TABLE device_sightings (
    device_key text NOT NULL,
    account    text NOT NULL,
    seen       double precision NOT NULL,
    PRIMARY KEY (device_key, account)
);
CREATE INDEX device_sightings_by_time ON device_sightings (seen);
CREATE TABLE sending (
    account    text PRIMARY KEY,
    hour       bigint NOT NULL,
    messages   bigint NOT NULL,
    recipients bigint NOT NULL,
    refused    bigint NOT NULL DEFAULT 0
);
CREATE TABLE clientid_mta_meta (
    name  text PRIMARY KEY,
    value text NOT NULL
);
""",
    ),
)
LATEST = MIGRATIONS[-1][0]

_VERSIONS_TABLE = """
CREATE TABLE IF NOT EXISTS clientid_mta_schema (
    version     integer PRIMARY KEY,
    description text NOT NULL,
    applied     double precision NOT NULL
)
"""


class PostgresStoreUnavailable(StoreUnavailable):
    """Raised for every database error, so callers need not know the backend."""

    def __init__(self, problem: str, reported: bool = False) -> None:
        super().__init__(problem)
        self.reported = reported  # the database unreachable: logged once per change


class KeyMismatch(Exception):
    """This node's device-token key is not the one the database was filled with."""


def _quiet_pool_logging() -> None:
    """psycopg_pool warns once per failed connection attempt; our own log says it once
    per change of state instead."""
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)


def conninfo(url: str, password_file: Path | None) -> str:
    """The libpq connection string: ``url`` (a URI or key/value string) with the
    password read from ``password_file`` (else libpq's own PGPASSFILE applies), a
    connect timeout and TCP_SETTINGS unless the URL sets them, and SESSION_OPTIONS.
    Raises ValueError for a malformed URL or an unreadable password file."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError as problem:
        raise ValueError(str(problem).strip()) from None
    extra: dict[str, Any] = {}
    if "connect_timeout" not in parts:
        extra["connect_timeout"] = CONNECT_TIMEOUT
    extra.update({key: value for key, value in TCP_SETTINGS.items() if key not in parts})
    # The URL's own options come after ours: a setting it names wins.
    extra["options"] = f"{SESSION_OPTIONS} {parts.get('options', '')}".strip()
    if password_file is not None:
        extra["password"] = password_file.read_text().strip("\r\n")
    return make_conninfo(url, **extra)


def describe(url: str) -> str:
    """Where the database is, for log lines and messages: never the password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "the database"
    where = f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}"
    return f"{parts.get('dbname', '')}@{where}"


class Database:
    """The pool every repository of one node shares, and the reachability it logs."""

    def __init__(self, info: str, name: str, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        _quiet_pool_logging()
        self.name = name
        self._down = False
        self._state_lock = threading.Lock()
        self.pool = ConnectionPool(
            info,
            min_size=1,
            max_size=max(1, pool_size),
            timeout=POOL_WAIT,
            reconnect_timeout=RECONNECT_GIVE_UP,
            reconnect_failed=lambda _pool: None,
            check=ConnectionPool.check_connection,
            kwargs={"row_factory": dict_row},
            open=False,
            name="clientid-mta",
        )
        self.pool.open(wait=False)

    def _went(self, down: bool, problem: str = "") -> None:
        with self._state_lock:
            if down == self._down:
                return
            self._down = down
        if down:
            log.error(
                "the device store {database} cannot be reached: {problem}; AUTH answers 454"
                " until it is back",
                database=self.name,
                problem=problem,
            )
        else:
            log.info("the device store {database} is reachable again", database=self.name)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """One connection, one transaction (committed at the end, rolled back on error).
        Every database error becomes PostgresStoreUnavailable."""
        try:
            with self.pool.connection() as db:
                yield db
        except psycopg.errors.LockNotAvailable as problem:  # lock_timeout: the server is up
            raise PostgresStoreUnavailable(str(problem).strip()) from problem
        except psycopg.OperationalError as problem:
            # The server is gone, restarting or out of connections; the pool replaces
            # the connection. (PoolTimeout is one of these.)
            self._went(True, str(problem).strip().splitlines()[0] if str(problem) else "")
            raise PostgresStoreUnavailable(str(problem).strip(), reported=True) from problem
        except psycopg.Error as problem:
            raise PostgresStoreUnavailable(str(problem).strip()) from problem
        self._went(False)

    def close(self) -> None:
        self.pool.close()


def _lock(db: psycopg.Connection[Any], space: int, name: str, waiting: Callable[[], None]) -> None:
    """Take the transaction's advisory lock on ``name``; ``waiting`` is told first when
    another transaction holds it (for the conformance tests)."""
    key = zlib.crc32(name.encode()) - 2**31  # an int4
    taken = db.execute("SELECT pg_try_advisory_xact_lock(%s, %s) AS ok", (space, key)).fetchone()
    if taken is not None and taken["ok"]:
        return
    waiting()
    db.execute("SELECT pg_advisory_xact_lock(%s, %s)", (space, key))


def _no_hook() -> None:
    pass


class _Repository:
    """A view on the shared pool; ``close`` of the last one closes the pool."""

    def __init__(self, database: Database, release: Callable[[], None]) -> None:
        self._database = database
        self._release = release

    def _transaction(self) -> contextlib.AbstractContextManager[psycopg.Connection[Any]]:
        return self._database.transaction()

    def close(self) -> None:
        self._release()


# The (key, key, time) tables of recent events: their key columns and time column.
_RECENT_COLUMNS = {
    "login_networks": ("account", "network", "last_login"),
    "device_sightings": ("device_key", "account", "seen"),
}


def _refresh_recent(
    db: psycopg.Connection[Any], table: str, row: tuple[str, str, float], window: float
) -> None:
    """Insert one event or move its time forward, and forget the table's events older
    than ``window``, in the caller's transaction (see sqlite_store._refresh_recent)."""
    first, second, when = _RECENT_COLUMNS[table]  # fixed names only reach the SQL text
    db.execute(f"DELETE FROM {table} WHERE {when} < %s", (row[2] - window,))  # noqa: S608
    db.execute(
        f"INSERT INTO {table} VALUES (%s, %s, %s) ON CONFLICT ({first}, {second})"  # noqa: S608
        f" DO UPDATE SET {when} = greatest({table}.{when}, excluded.{when})",
        row,
    )


def _budget_rows(db: psycopg.Connection[Any], keys: Sequence[str]) -> dict[str, BudgetRow]:
    """The named budgets' rows (a budget without one is full)."""
    if not keys:
        return {}
    found = db.execute(
        "SELECT key, tokens, updated FROM throttle WHERE key = ANY(%s)", (list(keys),)
    ).fetchall()
    return {row["key"]: (row["tokens"], row["updated"]) for row in found}


def _flagged(db: psycopg.Connection[Any], device_key: str) -> bool:
    row = db.execute("SELECT 1 FROM shared_devices WHERE device_key = %s", (device_key,))
    return row.fetchone() is not None


def _device(db: psycopg.Connection[Any], account: str, device_key: str) -> Device | None:
    row = db.execute(
        "SELECT account, device_key, type, state, label, first_seen, last_seen, last_network,"
        " logins, last_login, last_region FROM devices WHERE account = %s AND device_key = %s",
        (account, device_key),
    ).fetchone()
    return Device(**row) if row else None


@implementer(IDeviceRegistry)
class PostgresDeviceRegistry(_Repository):
    def __init__(self, database: Database, release: Callable[[], None]) -> None:
        super().__init__(database, release)
        # For the conformance tests: ``register`` between its reads and its write, and a
        # registration that has to wait for another's transaction.
        self.between_read_and_write: Callable[[], None] = _no_hook
        self.waiting_for_lock: Callable[[], None] = _no_hook

    def get(self, account: str, device_key: str) -> Device | None:
        with self._transaction() as db:
            return _device(db, account, device_key)

    def register(
        self, account: str, device_key: str, type: str, network: str, eligible: bool
    ) -> tuple[Device, bool]:
        now = time.time()
        with self._transaction() as db:
            # The account's lock: no other node registers a device of it until we commit.
            _lock(db, _LOCK_ACCOUNT, account, self.waiting_for_lock)
            existing = _device(db, account, device_key)
            first = (
                existing is None
                and eligible
                and db.execute(
                    "SELECT 1 FROM devices WHERE account = %s AND state IN (%s, %s) LIMIT 1",
                    (account, TRUSTED, REVOKED),
                ).fetchone()
                is None
            )
            self.between_read_and_write()
            if existing is None:
                db.execute(
                    "INSERT INTO devices (account, device_key, type, state, first_seen,"
                    " last_seen, last_network) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (account, device_key, type, TRUSTED if first else PENDING, now, now, network),
                )
            else:
                db.execute(
                    "UPDATE devices SET last_seen = %s, last_network = %s WHERE account = %s"
                    " AND device_key = %s",
                    (now, network, account, device_key),
                )
            device = _device(db, account, device_key)
        assert device is not None
        return device, existing is None

    def login(self, account: str, device_key: str, network: str, region: str) -> None:
        self.record_logins([PendingLogin(account, device_key, network, region, time.time())])

    def record_logins(self, logins: Sequence[PendingLogin]) -> None:
        with self._transaction() as db, db.cursor() as cursor:
            cursor.executemany(
                "UPDATE devices SET logins = logins + %s, last_seen = greatest(last_seen, %s),"
                " last_network = CASE WHEN last_login <= %s THEN %s ELSE last_network END,"
                " last_region = CASE WHEN last_login <= %s THEN %s ELSE last_region END,"
                " last_login = greatest(last_login, %s) WHERE account = %s AND device_key = %s",
                login_updates(logins),
            )

    def add_trusted(self, account: str, device_key: str, type: str, label: str = "") -> Device:
        now = time.time()
        with self._transaction() as db:
            # The account's lock, as register takes it: a login's INSERT of the same
            # device cannot then fail on the key (a 454) while the admin adds it.
            _lock(db, _LOCK_ACCOUNT, account, _no_hook)
            db.execute(
                "INSERT INTO devices (account, device_key, type, state, label, first_seen,"
                " last_seen) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (account,"
                " device_key) DO UPDATE SET state = excluded.state, label = excluded.label",
                (account, device_key, type, TRUSTED, label, now, now),
            )
            device = _device(db, account, device_key)
        assert device is not None
        return device

    def _change(self, account: str, fingerprint: str, column: str, value: str) -> Device:
        prefix = parse_fingerprint(fingerprint)
        with self._transaction() as db:
            keys = [
                row["device_key"]
                for row in db.execute(
                    "SELECT device_key FROM devices WHERE account = %s"
                    " AND substr(device_key, 1, %s) = %s FOR UPDATE",
                    (account, len(prefix), prefix),
                )
            ]
            if len(keys) != 1:
                what = "no device" if not keys else f"{len(keys)} devices"
                raise DeviceNotFound(f"{what} of {account} match fingerprint {prefix}")
            # Only the two fixed column names below reach the SQL text.
            db.execute(
                f"UPDATE devices SET {column} = %s WHERE account = %s"  # noqa: S608
                " AND device_key = %s",
                (value, account, keys[0]),
            )
            device = _device(db, account, keys[0])
        assert device is not None
        return device

    def set_state(self, account: str, fingerprint: str, state: str) -> Device:
        if state not in STATES:
            raise ValueError(f"unknown device state {state!r}")
        return self._change(account, fingerprint, "state", state)

    def set_label(self, account: str, fingerprint: str, label: str) -> Device:
        return self._change(account, fingerprint, "label", label)

    def devices_of(self, account: str) -> list[Device]:
        with self._transaction() as db:
            rows = db.execute(
                "SELECT account, device_key, type, state, label, first_seen, last_seen,"
                " last_network, logins, last_login, last_region FROM devices"
                " WHERE account = %s ORDER BY first_seen, device_key",
                (account,),
            ).fetchall()
        return [Device(**row) for row in rows]

    def delete_account(self, account: str) -> int:
        with self._transaction() as db:
            return db.execute("DELETE FROM devices WHERE account = %s", (account,)).rowcount


# Attempts and count rows as one listing: a count row has no account.
_AUDIT_LISTING = (
    "SELECT id, 0 AS counted, time, account, fingerprint, network, outcome, reason,"
    " 1 AS count FROM audit UNION ALL SELECT id, 1, minute, '', fingerprint, network,"
    " outcome, reason, count FROM audit_counts"
)


@implementer(IAuditStore)
class PostgresAuditStore(_Repository):
    def add_audit(self, entries: list[AuditEntry]) -> None:
        with self._transaction() as db, db.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO audit (time, account, fingerprint, network, outcome, reason)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                [
                    (e.time, e.account, e.fingerprint, e.network, e.outcome, e.reason)
                    for e in entries
                ],
            )

    def add_audit_counts(self, counts: list[AuditEntry]) -> None:
        with self._transaction() as db, db.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO audit_counts (minute, network, fingerprint, outcome, reason, count)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (minute, network, fingerprint,"
                " outcome, reason) DO UPDATE SET count = audit_counts.count + excluded.count",
                [(e.time, e.network, e.fingerprint, e.outcome, e.reason, e.count) for e in counts],
            )

    def prune_audit(self, before: float) -> int:
        with self._transaction() as db:
            dropped = db.execute("DELETE FROM audit WHERE time < %s", (before,)).rowcount
            return (
                dropped
                + db.execute("DELETE FROM audit_counts WHERE minute < %s", (before,)).rowcount
            )

    def trim_audit(self, max_entries: int) -> int:
        dropped = 0
        with self._transaction() as db:
            # Ids grow with every row written: those more than max_entries below the
            # largest were written earlier than the max_entries kept (an index look-up).
            # An upsert of a count row spends an id too, so at most max_entries are kept.
            for table in ("audit", "audit_counts"):
                # Only the two fixed table names above reach the SQL text.
                row = db.execute(f"SELECT max(id) AS last FROM {table}").fetchone()  # noqa: S608
                last = row["last"] if row else None
                if last is not None and last > max_entries:
                    dropped += db.execute(
                        f"DELETE FROM {table} WHERE id <= %s",  # noqa: S608
                        (last - max_entries,),
                    ).rowcount
        return dropped

    def compact(self) -> None:
        """PostgreSQL's autovacuum gives the freed space back to its tables: nothing to do."""

    def audit(
        self,
        account: str | None = None,
        fingerprint: str | None = None,
        since: float | None = None,
        limit: int = 1000,
    ) -> list[AuditEntry]:
        # Only fixed condition strings are joined into the SQL; values go in as parameters.
        where: list[str] = ["TRUE"]
        args: list[object] = []
        if account is not None:
            where.append("account = %s")
            args.append(account)
        if fingerprint is not None:
            prefix = parse_fingerprint(fingerprint)
            where.append("substr(fingerprint, 1, %s) = %s")
            args += [len(prefix), prefix]
        if since is not None:
            where.append("time >= %s")
            args.append(since)
        sql = (
            "SELECT time, account, fingerprint, network, outcome, reason, count FROM"  # noqa: S608
            f" ({_AUDIT_LISTING}) AS listing WHERE {' AND '.join(where)}"
            " ORDER BY time DESC, counted DESC, id DESC LIMIT %s"
        )
        with self._transaction() as db:
            rows = db.execute(sql, (*args, limit)).fetchall()
        return [AuditEntry(**row) for row in reversed(rows)]


@implementer(IBudgetStore)
class PostgresBudgetStore(_Repository):
    def _apply(
        self, budgets: Mapping[str, Budget], now: float, change: float
    ) -> tuple[bool, dict[str, BudgetRow]]:
        if not budgets:
            return True, {}
        keys = sorted(budgets)  # always locked in one order: no deadlock between nodes
        with self._transaction() as db:
            for key in keys:
                _lock(db, _LOCK_BUDGET, key, _no_hook)
            rows: dict[str, BudgetRow | None] = dict(_budget_rows(db, keys))
            applied, new = change_budgets(budgets, rows, now, change)
            if applied:
                with db.cursor() as cursor:
                    cursor.executemany(
                        "INSERT INTO throttle VALUES (%s, %s, %s) ON CONFLICT (key)"
                        " DO UPDATE SET tokens = excluded.tokens, updated = excluded.updated",
                        [(key, tokens, updated) for key, (tokens, updated) in new.items()],
                    )
        return applied, new

    def take(self, budgets: Mapping[str, Budget], now: float) -> tuple[bool, dict[str, BudgetRow]]:
        return self._apply(budgets, now, -1.0)

    def refund(self, budgets: Mapping[str, Budget], now: float) -> dict[str, BudgetRow]:
        return self._apply(budgets, now, +1.0)[1]

    def prune(self, kinds: Mapping[str, Budget], now: float) -> int:
        with self._transaction() as db:
            stale = []
            for row in db.execute("SELECT key, tokens, updated FROM throttle"):
                budget = kinds.get(row["key"].partition(":")[0])
                level = budget.level(row["tokens"], now - row["updated"]) if budget else 0.0
                if budget is None or level >= budget.burst:
                    stale.append((row["key"], row["updated"]))
            with db.cursor() as cursor:
                # A row another node changed since it was read is not stale any more.
                cursor.executemany("DELETE FROM throttle WHERE key = %s AND updated = %s", stale)
        return len(stale)

    def save(self, rows: list[tuple[str, float, float]]) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM throttle")
            with db.cursor() as cursor:
                cursor.executemany("INSERT INTO throttle VALUES (%s, %s, %s)", rows)

    def load(self) -> list[tuple[str, float, float]]:
        with self._transaction() as db:
            rows = db.execute("SELECT key, tokens, updated FROM throttle").fetchall()
        return [(row["key"], row["tokens"], row["updated"]) for row in rows]

    def trusted_device_keys(self) -> set[str]:
        with self._transaction() as db:
            rows = db.execute(
                "SELECT DISTINCT device_key FROM devices WHERE state = %s", (TRUSTED,)
            ).fetchall()
        return {str(row["device_key"]) for row in rows}

    def record_login_network(self, account: str, network: str, now: float, keep: float) -> None:
        with self._transaction() as db:
            _refresh_recent(db, "login_networks", (account, network, now), keep)

    def login_networks(self, since: float) -> list[tuple[str, str, float]]:
        with self._transaction() as db:
            rows = db.execute(
                "SELECT account, network, last_login FROM login_networks WHERE last_login >= %s"
                " ORDER BY last_login DESC",
                (since,),
            ).fetchall()
        return [(row["account"], row["network"], float(row["last_login"])) for row in rows]


@implementer(IApprovalCodes)
class PostgresApprovalCodes(_Repository):
    def add_approval_code(
        self, code_hash: str, account: str, device_key: str, expires: float
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO approval_codes VALUES (%s, %s, %s, %s, NULL)",
                (code_hash, account, device_key, expires),
            )

    def redeem_approval_code(self, code_hash: str, account: str, now: float) -> str | None:
        with self._transaction() as db:
            row = db.execute(
                "UPDATE approval_codes SET used = %s WHERE code_hash = %s AND account = %s"
                " AND used IS NULL AND expires > %s RETURNING device_key",
                (now, code_hash, account, now),
            ).fetchone()
        return str(row["device_key"]) if row else None

    def prune_approval_codes(self, now: float) -> int:
        with self._transaction() as db:
            return db.execute(
                "DELETE FROM approval_codes WHERE used IS NOT NULL OR expires <= %s", (now,)
            ).rowcount


@implementer(INoticeLedger)
class PostgresNoticeLedger(_Repository):
    def may_notify(
        self, recipient: str, fingerprint: str, kind: str, now: float, repeat: float, per_hour: int
    ) -> bool:
        with self._transaction() as db:
            _lock(db, _LOCK_NOTICES, recipient, _no_hook)
            again = db.execute(
                "SELECT 1 FROM notices_sent WHERE recipient = %s AND fingerprint = %s"
                " AND kind = %s AND sent > %s LIMIT 1",
                (recipient, fingerprint, kind, now - repeat),
            ).fetchone()
            if again is not None:
                return False
            row = db.execute(
                "SELECT count(*) AS sent FROM notices_sent WHERE recipient = %s AND sent > %s",
                (recipient, now - 3600),
            ).fetchone()
            if row is not None and row["sent"] >= per_hour:
                return False
            db.execute(
                "INSERT INTO notices_sent VALUES (%s, %s, %s, %s)",
                (recipient, fingerprint, kind, now),
            )
            return True

    def prune_notices(self, before: float) -> int:
        with self._transaction() as db:
            return db.execute("DELETE FROM notices_sent WHERE sent < %s", (before,)).rowcount


@implementer(ISharedDeviceStore)
class PostgresSharedDevices(_Repository):
    def saw(self, device_key: str, account: str, now: float, window: float) -> int:
        with self._transaction() as db:
            _refresh_recent(db, "device_sightings", (device_key, account, now), window)
            row = db.execute(
                "SELECT count(*) AS accounts FROM device_sightings WHERE device_key = %s",
                (device_key,),
            ).fetchone()
        return int(row["accounts"]) if row else 0

    def flag(self, device_key: str, accounts: int, now: float) -> bool:
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO shared_devices VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (device_key, now, accounts),
            )
        return cursor.rowcount == 1

    def is_flagged(self, device_key: str) -> bool:
        with self._transaction() as db:
            return _flagged(db, device_key)

    def unflag(self, fingerprint: str) -> int:
        prefix = parse_fingerprint(fingerprint)
        with self._transaction() as db:
            keys = [
                row["device_key"]
                for row in db.execute(
                    "DELETE FROM shared_devices WHERE substr(device_key, 1, %s) = %s"
                    " RETURNING device_key",
                    (len(prefix), prefix),
                ).fetchall()
            ]
            # Counting starts afresh: the accounts tried before the flag was cleared are
            # what the operator just forgave.
            db.execute("DELETE FROM device_sightings WHERE device_key = ANY(%s)", (keys,))
        return len(keys)


@implementer(ILoginLook)
class PostgresLoginLook(_Repository):
    """A trusted device's login state in one read-only transaction (issue 16), for the
    login threads: it may wait for the network, so never on the reactor."""

    def look(self, account: str, device_key: str, budget_keys: Sequence[str]) -> LoginView:
        with self._transaction() as db:
            device = _device(db, account, device_key)
            rows = _budget_rows(db, budget_keys)
            flagged = _flagged(db, device_key)
            sighted = db.execute(
                "SELECT seen FROM device_sightings WHERE device_key = %s AND account = %s",
                (device_key, account),
            ).fetchone()
        return LoginView(device, rows, flagged, sighted["seen"] if sighted else None)


@implementer(ISendingCounts)
class PostgresSendingCounts(_Repository):
    """One row per account: the hour it last sent in, its counts, whether refused."""

    def count_sending(
        self, account: str, hour: int, add: Sending, most: Sending
    ) -> tuple[bool, bool]:
        with self._transaction() as db:
            _lock(db, _LOCK_SENDING, account, _no_hook)
            row = db.execute(
                "SELECT hour, messages, recipients, refused FROM sending WHERE account = %s",
                (account,),
            ).fetchone()
            sent, to, refused = 0, 0, 0
            if row is not None and row["hour"] >= hour:  # later: another node's clock
                hour, sent, to, refused = (
                    row["hour"],
                    row["messages"],
                    row["recipients"],
                    row["refused"],
                )
            over = (most.messages and sent + add.messages > most.messages) or (
                most.recipients and to + add.recipients > most.recipients
            )
            kept = (sent, to, 1) if over else (sent + add.messages, to + add.recipients, refused)
            db.execute(
                "INSERT INTO sending VALUES (%s, %s, %s, %s, %s) ON CONFLICT (account) DO UPDATE"
                " SET hour = excluded.hour, messages = excluded.messages,"
                " recipients = excluded.recipients, refused = excluded.refused",
                (account, hour, *kept),
            )
            if over:
                return False, not refused
            return True, False


# --- schema and the key ---------------------------------------------------------------


@dataclass(frozen=True)
class SchemaStatus:
    version: int  # 0: an empty database
    latest: int
    key_fingerprint: str | None  # None: no node has started on it yet

    @property
    def pending(self) -> list[tuple[int, str]]:
        return [(number, what) for number, what, _ in MIGRATIONS if number > self.version]


def _version(db: psycopg.Connection[Any]) -> int:
    """The schema's version, creating the versions table if it is missing (migrate)."""
    db.execute(_VERSIONS_TABLE)
    return _read_version(db)


def _read_version(db: psycopg.Connection[Any]) -> int:
    """The schema's version, without writing anything: 0 when there is no versions table."""
    table = db.execute("SELECT to_regclass('clientid_mta_schema') AS name").fetchone()
    if table is None or table["name"] is None:
        return 0
    row = db.execute("SELECT coalesce(max(version), 0) AS version FROM clientid_mta_schema")
    found = row.fetchone()
    return int(found["version"]) if found else 0


def migrate(database: Database) -> list[int]:
    """Apply the migrations this database lacks, each in its own transaction, under a
    session advisory lock so that nodes starting together apply each once. Returns the
    versions applied."""
    applied: list[int] = []
    with database.transaction() as db:
        db.autocommit = True  # the lock spans the transactions below
        db.execute("SET lock_timeout = 0")  # another node may be migrating: wait for it
        db.execute("SELECT pg_advisory_lock(%s, 0)", (_LOCK_MIGRATIONS,))
        try:
            for number, what, sql in MIGRATIONS:
                with db.transaction():
                    if _version(db) >= number:
                        continue
                    db.execute(sql.encode())
                    db.execute(
                        "INSERT INTO clientid_mta_schema VALUES (%s, %s, %s)",
                        (number, what, time.time()),
                    )
                    applied.append(number)
        finally:
            db.execute("SELECT pg_advisory_unlock(%s, 0)", (_LOCK_MIGRATIONS,))
            db.execute("RESET lock_timeout")
            db.autocommit = False
    return applied


def schema_status(database: Database) -> SchemaStatus:
    """What ``clientid-mta store status`` shows, read in a read-only transaction: it
    creates nothing (not even the versions table) and works for a role that may only read."""
    with database.transaction() as db:
        db.execute("SET TRANSACTION READ ONLY")
        version = _read_version(db)
        fingerprint = None
        if version >= 1:
            row = db.execute(
                "SELECT value FROM clientid_mta_meta WHERE name = %s", (KEY_FINGERPRINT,)
            ).fetchone()
            fingerprint = row["value"] if row else None
    return SchemaStatus(version, LATEST, fingerprint)


def claim_key(database: Database, fingerprint: str) -> None:
    """Record the device-token key's fingerprint if no node did yet; KeyMismatch if the
    database was filled under another key."""
    with database.transaction() as db:
        db.execute(
            "INSERT INTO clientid_mta_meta VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (KEY_FINGERPRINT, fingerprint),
        )
        row = db.execute(
            "SELECT value FROM clientid_mta_meta WHERE name = %s", (KEY_FINGERPRINT,)
        ).fetchone()
    recorded = row["value"] if row else fingerprint
    if recorded != fingerprint:
        raise KeyMismatch(
            f"the device store {database.name} was filled under another device-token key"
            f" (fingerprint {recorded}, this node's is {fingerprint}): copy [clientid] key_file"
            " from the first node to this one"
        )


def open_database(url: str, password_file: Path | None, pool_size: int) -> Database:
    """The pool for ``url``; ValueError for a malformed URL or unreadable password file."""
    return Database(conninfo(url, password_file), describe(url), pool_size)


def open_postgres_stores(
    url: str,
    password_file: Path | None = None,
    key_fingerprint: str | None = None,
    pool_size: int = DEFAULT_POOL_SIZE,
    migrate_schema: bool = True,
) -> Stores:
    """Every repository on the database at ``url``, sharing one pool. Applies the
    migrations it lacks (unless ``migrate_schema`` is false), then checks the device-token
    key's fingerprint (KeyMismatch). StoreUnavailable when the database cannot be reached."""
    database = open_database(url, password_file, pool_size)
    try:
        if migrate_schema:
            migrate(database)
        if key_fingerprint is not None:
            claim_key(database, key_fingerprint)
    except BaseException:
        database.close()
        raise
    users = PoolUsers(database)
    return Stores(
        PostgresDeviceRegistry(database, users.member()),
        PostgresAuditStore(database, users.member()),
        PostgresBudgetStore(database, users.member()),
        PostgresApprovalCodes(database, users.member()),
        PostgresSharedDevices(database, users.member()),
        PostgresSendingCounts(database, users.member()),
        PostgresNoticeLedger(database, users.member()),
        thread_look=PostgresLoginLook(database, users.member()),
    )


class PoolUsers:
    """The repositories that share one pool: it closes when the last of them has closed.
    Each member counts once, however often it closes, and a new repository is one more
    ``member()``, with no count to keep in step."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._open: set[int] = set()
        self._joined = 0
        self._lock = threading.Lock()

    def member(self) -> Callable[[], None]:
        """A new member's release: call it when that member closes."""
        with self._lock:
            number = self._joined
            self._joined += 1
            self._open.add(number)

        def release() -> None:
            with self._lock:
                if number not in self._open:
                    return
                self._open.discard(number)
                last = not self._open
            if last:
                self._database.close()

        return release


def probe_reachable(url: str, password_file: Path | None) -> str | None:
    """None if the database answers a query on a connection of its own, else why not.
    For readiness checks: never waits behind the server's pool."""
    try:
        with psycopg.connect(conninfo(url, password_file), autocommit=True) as db:
            db.execute("SELECT 1")
    except (psycopg.Error, ValueError, OSError) as problem:
        return f"{describe(url)}: {str(problem).strip() or type(problem).__name__}"
    return None
