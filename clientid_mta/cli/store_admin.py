"""``clientid-mta store migrate|status|copy``: the PostgreSQL store, by hand.

Nodes apply the migrations themselves at start (under an advisory lock); ``migrate`` is
for admins who prefer to run them before starting the nodes. ``status`` shows the
schema version, what is pending, and whether this node's device-token key is the one
the database was filled under. ``copy --to URL`` moves this node's SQLite store into an
empty PostgreSQL database.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TextIO

from clientid_mta.config import Config
from clientid_mta.devices.keys import key_fingerprint, load_or_create_server_key
from clientid_mta.devices.postgres_store import (
    Database,
    describe,
    migrate,
    open_database,
    schema_status,
)
from clientid_mta.devices.store_copy import copy_sqlite_to_postgres


class StoreAdminError(Exception):
    """Ends the command with its message and exit status 1."""


def add_parser(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    store = groups.add_parser("store", help="the PostgreSQL store ([store] url)").add_subparsers(
        dest="action", required=True
    )
    store.add_parser("migrate", help="apply the schema migrations the database lacks")
    store.add_parser("status", help="schema version, pending migrations, the key's fingerprint")
    copy = store.add_parser("copy", help="copy the SQLite store into an empty PostgreSQL one")
    copy.add_argument("--to", required=True, metavar="URL", help="the target database")
    copy.add_argument(
        "--password-file", help="the target's password (default: [store] password_file)"
    )


def run(config: Config, args: argparse.Namespace, out: TextIO) -> None:
    if args.action == "copy":
        _copy(config, args.to, args.password_file, out)
        return
    if not config.store.url:
        raise StoreAdminError(
            "[store] url is not set: this server keeps its state in SQLite, which needs no"
            " migration; set url to a PostgreSQL database first"
        )
    database = _open(config.store.url, config.store.password_file)
    try:
        if args.action == "migrate":
            applied = migrate(database)
            done = ", ".join(str(n) for n in applied) if applied else "none (up to date)"
            print(f"{database.name}: applied migrations: {done}", file=out)
        else:
            _status(config, database, out)
    finally:
        database.close()


def _open(url: str, password_file: Path | None) -> Database:
    try:
        return open_database(url, password_file, pool_size=1)
    except (OSError, ValueError) as problem:
        raise StoreAdminError(f"cannot open {describe(url)}: {problem}") from None


def _status(config: Config, database: Database, out: TextIO) -> None:
    status = schema_status(database)
    print(f"database: {database.name}", file=out)
    print(f"schema version: {status.version} (latest {status.latest})", file=out)
    for number, what in status.pending:
        print(f"pending migration {number}: {what}", file=out)
    recorded = status.key_fingerprint or "none yet (recorded by the first node to start)"
    print(f"device-token key fingerprint: {recorded}", file=out)
    key_file = config.clientid.key_file
    if key_file.exists() and status.key_fingerprint is not None:
        mine = key_fingerprint(load_or_create_server_key(key_file))
        verdict = "matches" if mine == status.key_fingerprint else "DOES NOT MATCH"
        print(f"this node's key ({key_file}): {mine}, {verdict}", file=out)


def _copy(config: Config, url: str, password_file: str | None, out: TextIO) -> None:
    from clientid_mta.config.checks import Invalid, database_url

    try:
        database_url(url)
    except Invalid as problem:
        raise StoreAdminError(f"--to {problem}") from None
    key = load_or_create_server_key(config.clientid.key_file)
    secret = Path(password_file) if password_file else config.store.password_file
    database = _open(url, secret)
    try:
        copied = copy_sqlite_to_postgres(
            config.clientid.device_store, database, key_fingerprint(key)
        )
    finally:
        database.close()
    for table, count in copied.items():
        print(f"{table}: {count}", file=out)
    print(
        f"copied {sum(copied.values())} rows from {config.clientid.device_store} to"
        f" {database.name}; set [store] url to it and restart",
        file=out,
    )
