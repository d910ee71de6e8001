"""What only the PostgreSQL backend has (the interfaces are in test_store_conformance.py):
its migrations under an advisory lock, the key's fingerprint, the connection string,
what it says when the database cannot be reached (and the notices that wait for it),
and ``clientid-mta store``.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import cast

import pytest
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher

from clientid_mta.cli import admin
from clientid_mta.config import ConfigError, check_server_files, load_config
from clientid_mta.delivery.maildir import MaildirRoot
from clientid_mta.devices import postgres_store
from clientid_mta.devices.keys import key_fingerprint, load_or_create_server_key
from clientid_mta.devices.notices import NEW_DEVICE_TRUSTED, Notice, Notifier
from clientid_mta.devices.postgres_store import (
    KeyMismatch,
    conninfo,
    describe,
    open_database,
    open_postgres_stores,
    schema_status,
)
from clientid_mta.devices.store import StoreUnavailable
from tests.postgres_server import Cluster
from tests.serverproc import ServerProcess, free_ports, run_twistd_once


def test_nodes_starting_together_apply_each_migration_once(postgres_cluster: Cluster) -> None:
    url = postgres_cluster.new_database()
    opened: list[object] = []
    start = threading.Barrier(4)

    def start_node() -> None:
        start.wait(10)
        try:
            opened.append(open_postgres_stores(url, key_fingerprint="f" * 16, pool_size=2))
        except Exception as problem:
            opened.append(problem)

    threads = [threading.Thread(target=start_node) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    problems = [item for item in opened if isinstance(item, Exception)]
    assert not problems and len(opened) == 4
    for stores in opened:
        stores.close()  # type: ignore[attr-defined]
    database = open_database(url, None, 1)
    try:
        assert schema_status(database) == postgres_store.SchemaStatus(1, 1, "f" * 16)
        assert postgres_store.migrate(database) == []  # nothing left to do
        with database.transaction() as db:
            rows = db.execute("SELECT version FROM clientid_mta_schema").fetchall()
        assert [row["version"] for row in rows] == [1]
    finally:
        database.close()


def test_a_second_key_is_refused_naming_both_fingerprints(postgres_cluster: Cluster) -> None:
    url = postgres_cluster.new_database()
    open_postgres_stores(url, key_fingerprint="1" * 16).close()
    open_postgres_stores(url, key_fingerprint="1" * 16).close()  # the same key: fine
    with pytest.raises(KeyMismatch, match=f"fingerprint {'1' * 16}, this node's is {'2' * 16}"):
        open_postgres_stores(url, key_fingerprint="2" * 16)


def test_the_pool_closes_with_the_last_repository_and_a_second_close_counts_once(
    postgres_cluster: Cluster,
) -> None:
    stores = open_postgres_stores(postgres_cluster.new_database(), pool_size=1)
    pool = stores.devices._database.pool  # type: ignore[attr-defined]
    stores.audit.close()
    stores.audit.close()  # again: still one member gone, not two
    for repository in (stores.budgets, stores.approval_codes, stores.shared_devices):
        repository.close()
    stores.sending.close()
    assert not pool.closed  # the registry and the ledger still use it
    assert stores.devices.get("a@example.org", "0" * 64) is None
    stores.notices.close()
    assert stores.thread_look is not None
    stores.thread_look.close()
    assert not pool.closed
    stores.devices.close()
    assert pool.closed


def test_the_key_fingerprint_tells_keys_apart_and_is_not_the_key() -> None:
    first, second = b"k" * 32, b"j" * 32
    assert key_fingerprint(first) == key_fingerprint(first) != key_fingerprint(second)
    assert len(key_fingerprint(first)) == 16 and first.hex()[:16] != key_fingerprint(first)


def test_the_password_comes_from_its_file_and_is_never_described(tmp_path: Path) -> None:
    secret = tmp_path / "db-password"
    secret.write_text("s3cret pass\n")
    info = conninfo("postgresql://clientid@db.example:6432/mail", secret)
    assert "s3cret pass" in info and "connect_timeout=" in info
    assert describe("postgresql://clientid@db.example:6432/mail") == "mail@db.example:6432"
    assert describe("host=db.example dbname=mail") == "mail@db.example:5432"
    with pytest.raises(OSError):
        conninfo("postgresql://clientid@db.example/mail", tmp_path / "missing")


def test_a_silent_database_is_given_up_by_tcp_settings_the_url_may_override() -> None:
    """Keepalives and a TCP user timeout by default, so a database that goes silent
    mid-query frees the login thread; a value the URL names is kept."""
    from psycopg.conninfo import conninfo_to_dict

    default = conninfo_to_dict(conninfo("postgresql://clientid@db.example/mail", None))
    assert default["keepalives"] == "1" and default["tcp_user_timeout"] == "30000"
    own = conninfo_to_dict(
        conninfo("postgresql://clientid@db.example/mail?tcp_user_timeout=5000", None)
    )
    assert own["tcp_user_timeout"] == "5000" and own["keepalives_idle"] == "30"


def test_an_unreachable_database_is_unavailable_and_said_once() -> None:
    (port,) = free_ports(1)  # nothing listens there
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)  # any callable of an event will do
    globalLogPublisher.addObserver(observer)
    database = open_database(f"postgresql://clientid@127.0.0.1:{port}/mail", None, 1)
    try:
        for _ in range(3):
            with pytest.raises(StoreUnavailable), database.transaction():
                pass
    finally:
        database.close()
        globalLogPublisher.removeObserver(observer)
    said = [formatEvent(e) for e in events if "cannot be reached" in formatEvent(e)]
    assert len(said) == 1 and f"mail@127.0.0.1:{port}" in said[0]


def _config(tmp_path: Path, url: str) -> Path:
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\ndata_dir = "state"\n[store]\nurl = "{url}"\n')
    return config


def tables(url: str) -> list[str]:
    """The tables of the database at ``url``."""
    database = open_database(url, None, 1)
    try:
        with database.transaction() as db:
            rows = db.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            ).fetchall()
    finally:
        database.close()
    return sorted(row["tablename"] for row in rows)


def test_store_migrate_and_status(postgres_cluster: Cluster, tmp_path: Path) -> None:
    url = postgres_cluster.new_database()
    config = _config(tmp_path, url)

    def command(*argv: str) -> str:
        out = io.StringIO()
        assert admin.run(["--config", str(config), "store", *argv], out, io.StringIO()) == 0
        return out.getvalue()

    status = command("status")
    assert "schema version: 0 (latest 1)" in status and "pending migration 1:" in status
    assert not tables(url)  # status only reads: it created nothing
    assert "applied migrations: 1" in command("migrate")
    assert "none (up to date)" in command("migrate")
    assert "schema version: 1 (latest 1)" in command("status")
    assert "none yet" in command("status")  # no node has started on it
    key = load_or_create_server_key(tmp_path / "state" / "clientid.key")
    open_postgres_stores(
        postgres_cluster.url(command("status").split()[1].split("@")[0]),
        key_fingerprint=key_fingerprint(key),
    ).close()
    assert f"{key_fingerprint(key)}, matches" in command("status")


def test_store_commands_without_a_url_say_what_to_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[server]\ndata_dir = "state"\n')
    assert admin.main(["--config", str(config), "store", "migrate"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "[store] url is not set" in error


def test_a_node_that_cannot_reach_the_database_says_so_in_one_line(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    node = ServerProcess.create(
        tmp_path / "node", f'[store]\nurl = "postgresql://clientid@127.0.0.1:{port}/mail"\n'
    )
    status, output = run_twistd_once(node.root, node.config.source)
    assert status != 0
    lines = [line for line in output.splitlines() if "clientid-mta:" in line]
    assert len(lines) == 1, output
    assert "[store] url: cannot open the device store mail@127.0.0.1:" in lines[0]
    assert "Traceback" not in output


class _LedgerAway:
    """A notice ledger whose store is away until ``back`` is set."""

    def __init__(self) -> None:
        self.back = False
        self.recorded: list[str] = []

    def may_notify(self, recipient: str, fingerprint: str, *_: object) -> bool:
        if not self.back:
            raise StoreUnavailable("the database is away")
        self.recorded.append(fingerprint)
        return True


def test_notices_the_ledger_cannot_record_wait_and_are_sent_when_it_is_back(
    tmp_path: Path,
) -> None:
    ledger = _LedgerAway()
    maildirs = MaildirRoot(tmp_path / "mail")
    notifier = Notifier(maildirs, "mail.example.org", ledger=ledger)  # type: ignore[arg-type]
    notices = [Notice(NEW_DEVICE_TRUSTED, "alice@example.org", fp, "UUID", "n") for fp in "ab"]
    assert [notifier.notify(notice) for notice in notices] == [False, False]
    assert notifier.send_waiting() == 0  # still away: they keep waiting
    inbox = tmp_path / "mail" / "example.org" / "alice" / "new"
    assert not inbox.exists()
    ledger.back = True
    assert notifier.send_waiting() == 2
    assert ledger.recorded == ["a", "b"] and len(list(inbox.iterdir())) == 2
    assert notifier.send_waiting() == 0  # sent once


def test_a_missing_password_file_is_one_line_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[store]\nurl = "postgresql://clientid@db.example/mail"\npassword_file = "db-password"\n'
    )
    with pytest.raises(ConfigError) as problem:
        check_server_files(load_config(config))
    assert str(problem.value) == (
        f"config error: [store] password_file: {tmp_path / 'db-password'} does not exist;"
        " point it at the file that holds the password."
    )


def test_readiness_probes_the_database_and_names_it_when_away(postgres_cluster: Cluster) -> None:
    """The readiness check of a node on PostgreSQL asks the database, not a SQLite file."""
    url = postgres_cluster.new_database()
    assert postgres_store.probe_reachable(url, None) is None
    (closed,) = free_ports(1)
    away = f"postgresql://postgres@127.0.0.1:{closed}/nodes?connect_timeout=1"
    reason = postgres_store.probe_reachable(away, None)
    assert reason is not None and reason.startswith(f"nodes@127.0.0.1:{closed}: ")


def test_a_lock_held_by_a_stuck_node_turns_into_unavailable_not_a_wait_forever(
    postgres_cluster: Cluster,
) -> None:
    """A node cut off from the database in the middle of a transaction keeps its locks
    until the server notices: a login of that account on another node must answer (454)
    instead of holding a thread and a connection forever, and the stuck transaction
    must be ended by the server itself."""
    import zlib

    import psycopg

    url = postgres_cluster.new_database()
    stores = open_postgres_stores(url, key_fingerprint="3" * 16, pool_size=2)
    stuck = psycopg.connect(conninfo(url, None))
    try:
        key = zlib.crc32(b"alice@example.org") - 2**31
        stuck.execute("SELECT pg_advisory_xact_lock(%s, %s)", (postgres_store._LOCK_ACCOUNT, key))
        outcome: list[object] = []

        def register() -> None:
            try:
                outcome.append(
                    stores.devices.register("alice@example.org", "k" * 64, "UUID", "n", True)
                )
            except Exception as problem:
                outcome.append(problem)

        logged: list[LogEvent] = []
        observer = cast(ILogObserver, logged.append)  # any callable of an event will do
        globalLogPublisher.addObserver(observer)
        try:
            waiting = threading.Thread(target=register, daemon=True)
            waiting.start()
            waiting.join(timeout=60)
        finally:
            globalLogPublisher.removeObserver(observer)
        assert outcome and isinstance(outcome[0], StoreUnavailable), outcome
        # The database is up: a lock that did not come is not an outage to report.
        assert not [e for e in logged if "cannot be reached" in (formatEvent(e) or "")]
        settings = stuck.execute(
            "SELECT current_setting('idle_in_transaction_session_timeout') AS idle,"
            " current_setting('lock_timeout') AS lock"
        ).fetchone()
        assert settings is not None and "0" not in (settings[0], settings[1])
    finally:
        stuck.close()
    _device, first = stores.devices.register("alice@example.org", "k" * 64, "UUID", "n", True)
    assert first
    stores.close()
