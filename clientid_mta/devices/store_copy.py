"""``clientid-mta store copy --to URL``: move a SQLite store into an empty PostgreSQL one.

Every table the SQLite backend keeps (devices, the audit and its counts, budgets, login
networks, approval codes, shared devices and their sightings, notices sent, sending
counts) is read from the file and written with COPY, in one transaction: the target
holds all of it or nothing. The target must be empty, so that nothing is merged by
accident; its schema is brought up to date and the key's fingerprint recorded first.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from clientid_mta.devices.postgres_store import Database, claim_key, migrate

# (table, columns) in the order they are copied; the same names in both backends.
TABLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "devices",
        (
            "account",
            "device_key",
            "type",
            "state",
            "label",
            "first_seen",
            "last_seen",
            "last_network",
            "logins",
            "last_login",
            "last_region",
        ),
    ),
    ("audit", ("time", "account", "fingerprint", "network", "outcome", "reason")),
    ("audit_counts", ("minute", "network", "fingerprint", "outcome", "reason", "count")),
    ("throttle", ("key", "tokens", "updated")),
    ("login_networks", ("account", "network", "last_login")),
    ("approval_codes", ("code_hash", "account", "device_key", "expires", "used")),
    ("shared_devices", ("device_key", "flagged_at", "accounts")),
    ("device_sightings", ("device_key", "account", "seen")),
    ("notices_sent", ("recipient", "fingerprint", "kind", "sent")),
    ("sending", ("account", "hour", "messages", "recipients", "refused")),
)


class CopyRefused(Exception):
    """The copy cannot start (the source is missing, the target not empty)."""


def copy_sqlite_to_postgres(source: Path, target: Database, key_fingerprint: str) -> dict[str, int]:
    """Copy every table of the SQLite file ``source`` into ``target``; the rows per table.
    Raises CopyRefused, KeyMismatch, StoreUnavailable."""
    if not source.is_file():
        raise CopyRefused(f"there is no SQLite store at {source} to copy")
    migrate(target)
    claim_key(target, key_fingerprint)
    reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    copied: dict[str, int] = {}
    try:
        with target.transaction() as db:
            for table, _ in TABLES:
                # Only the fixed table names above reach the SQL text.
                row = db.execute(f"SELECT count(*) AS n FROM {table}").fetchone()  # noqa: S608
                if row and row["n"]:
                    raise CopyRefused(
                        f"the target already holds {row['n']} rows in {table}; copy into an"
                        " empty database"
                    )
            for table, columns in TABLES:
                names = ", ".join(columns)
                rows = reader.execute(f"SELECT {names} FROM {table}")  # noqa: S608
                count = 0
                with db.cursor() as cursor:
                    with cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                        for values in rows:
                            copy.write_row(values)
                            count += 1
                copied[table] = count
    finally:
        reader.close()
    return copied
