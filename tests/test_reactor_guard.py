"""Nothing blocks the reactor: a whole session, checked call by call.

An audit hook (``sys.addaudithook``) sees every ``open``, rename, unlink, mkdir, folder
listing and SQLite call of the process; ``os.stat``, ``os.fsync`` and their kin raise no
audit event, so they are wrapped for the test's duration. Any of them made on the
reactor thread while the guard is on is a violation, recorded with its stack. The
server, the relay and the sink run in this process's reactor thread (``conftest``).
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import THUNDERBIRD_UUID, RunningServer
from tests.postgres_server import Cluster
from tests.sink import running_sink, wait_until
from tests.typed_reactor import blockingCallFromThread, reactor

# Audit events that touch the disk or a database. "open" covers open(), os.open() and
# io.open_code(); os.replace raises "os.rename"; os.unlink raises "os.remove".
BLOCKING_EVENTS = frozenset(
    {
        "open",
        "os.rename",
        "os.remove",
        "os.rmdir",
        "os.mkdir",
        "os.listdir",
        "os.scandir",
        "os.chmod",
        "os.chown",
        "os.utime",
        "os.truncate",
        "os.link",
        "os.symlink",
        "fcntl.flock",
        "fcntl.lockf",
        "shutil.copyfile",
        "shutil.rmtree",
        "glob.glob",
    }
)
BLOCKING_PREFIXES = ("sqlite3.",)
# Calls without an audit event, wrapped while the guard is on.
WRAPPED_OS_CALLS = ("stat", "lstat", "fstat", "fsync", "fdatasync", "statvfs", "access")


class ReactorGuard:
    """Records blocking calls made on the reactor thread while ``active``.

    An audit hook cannot be removed: once the test ends it stays installed, switched off.
    """

    def __init__(self) -> None:
        self.active = False
        self.reactor_thread: int | None = None
        self.violations: list[str] = []
        self._inside = threading.local()  # the hook's own work may raise events too

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active or threading.get_ident() != self.reactor_thread:
            return
        if event in BLOCKING_EVENTS or event.startswith(BLOCKING_PREFIXES):
            self.violation(event, args)

    def violation(self, event: str, args: tuple[Any, ...]) -> None:
        if getattr(self._inside, "busy", False):
            return
        self._inside.busy = True
        try:
            where = "".join(traceback.format_stack(limit=16)[:-2])
            self.violations.append(f"{event}{args!r:.200} on the reactor thread at\n{where}")
        finally:
            self._inside.busy = False

    def on_reactor(self) -> bool:
        return self.active and threading.get_ident() == self.reactor_thread

    def wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def checked(*args: Any, **kwargs: Any) -> Any:
            if self.on_reactor():
                self.violation(f"os.{name}", args)
            return real(*args, **kwargs)

        return checked


_GUARD = ReactorGuard()
sys.addaudithook(_GUARD.hook)


@pytest.fixture
def guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[ReactorGuard]:
    """The guard, on from here to the end of the test (the reactor must be running)."""
    from tests.conftest import _ensure_reactor

    _ensure_reactor()
    for name in WRAPPED_OS_CALLS:
        monkeypatch.setattr(os, name, _GUARD.wrap(name, getattr(os, name)))
    _GUARD.reactor_thread = blockingCallFromThread(reactor, threading.get_ident)
    _GUARD.violations = []
    _GUARD.active = True
    try:
        yield _GUARD
    finally:
        _GUARD.active = False


def test_reactor_guard_catches_blocking_calls_on_the_reactor(
    guard: ReactorGuard, tmp_path: Path
) -> None:
    """The guard cannot pass vacuously: a deliberate open, stat and fsync on the reactor
    are caught, the same calls in this (test) thread are not."""
    target = tmp_path / "file"
    target.write_bytes(b"x")
    os.stat(target)
    assert guard.violations == []

    def blocking() -> None:
        with open(target, "rb") as handle:
            os.fsync(handle.fileno())
        os.stat(target)

    blockingCallFromThread(reactor, blocking)
    caught = [v.split("(", 1)[0] for v in guard.violations]
    assert caught == ["open", "os.fsync", "os.stat"]
    assert "in blocking" in guard.violations[0]


def test_reactor_guard_whole_session_tls_clientid_auth_1mib_local_and_relayed(
    guard: ReactorGuard, make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    """TLS, CLIENTID, AUTH, a 1 MiB message to a local and a remote recipient, the relay
    to the sink: no file or database call on the reactor thread from start to end."""
    from tests.test_relay import queue_of, relay_toml

    guard.active = False  # starting the servers is not the session: they read their files
    with running_sink(tmp_path, auth=("relay", "relay-password")) as sink:
        secret = tmp_path / "relay-password"
        secret.write_text("relay-password\n")
        secret.chmod(0o600)
        server = make_server(relay_toml(sink, username='"relay"', password_file=f'"{secret}"'))
        server.add_user("alice@example.org", "alice-password")
        server.add_user("bob@example.org", "bob-password")
        guard.active = True

        line = b"0123456789abcdef" * 8 + b"\r\n"  # 130 bytes
        body = line * (1024 * 1024 // len(line) + 1)
        message = (
            b"From: alice@example.org\r\nTo: bob@example.org, carol@example.net\r\n"
            b"Subject: big\r\n\r\n" + body
        )
        client = server.smtp()
        assert client.docmd("CLIENTID", f"UUID {THUNDERBIRD_UUID}") == (250, b"2.0.0 OK")
        client.login("alice@example.org", "alice-password")
        refused = client.sendmail(
            "alice@example.org", ["bob@example.org", "carol@example.net"], message
        )
        assert refused == {}
        client.quit()

        [relayed] = sink.wait_for(1, timeout=20)
        assert relayed.rcpt_to == ["carol@example.net"]
        assert len(relayed.data) > 1024 * 1024
        wait_until(lambda: not queue_of(server).ids() or None, 20, "the queue to empty")
        [stored] = server.messages("bob@example.org")
        assert stored["Subject"] == "big"
        guard.active = False
    assert guard.violations == [], "\n".join(guard.violations)


def test_reactor_guard_passwd_change_reaches_the_reactor_within_a_second_off_thread(
    guard: ReactorGuard, make_server: Callable[..., RunningServer]
) -> None:
    """The reactor reads accounts from a snapshot; a thread notices the admin command's
    write (at most a second later) without any file call on the reactor."""
    guard.active = False
    server = make_server()
    guard.active = True
    passwords = server.service.components.passwords

    def on_reactor() -> bool:
        return passwords.get("dora@example.org") is not None

    assert not blockingCallFromThread(reactor, on_reactor)
    server.add_user("dora@example.org", "dora-password")
    wait_until(
        lambda: blockingCallFromThread(reactor, on_reactor) or None, 3, "dora on the reactor"
    )
    guard.active = False
    assert guard.violations == [], "\n".join(guard.violations)


def test_reactor_guard_session_with_the_postgresql_store(
    guard: ReactorGuard,
    make_server: Callable[..., RunningServer],
    postgres_cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same with the store in PostgreSQL: libpq's socket calls raise no audit event,
    so every query, pool checkout and connect is checked for the reactor thread."""
    import psycopg
    import psycopg_pool

    queries: list[str] = []  # made anywhere: the test is not vacuous

    def checked(owner: Any, name: str) -> None:
        real = getattr(owner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            queries.append(name)
            if guard.on_reactor():
                guard.violation(f"psycopg {owner.__name__}.{name}", ())
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, call)

    checked(psycopg.Connection, "execute")
    checked(psycopg.Connection, "connect")
    checked(psycopg.Cursor, "execute")
    checked(psycopg.Cursor, "executemany")
    checked(psycopg_pool.ConnectionPool, "getconn")

    guard.active = False
    server = make_server(f'[store]\nurl = "{postgres_cluster.new_database()}"\n')
    server.add_user("alice@example.org", "alice-password")
    server.add_user("bob@example.org", "bob-password")
    guard.active = True
    queries.clear()
    client = server.smtp()
    assert client.docmd("CLIENTID", f"UUID {THUNDERBIRD_UUID}") == (250, b"2.0.0 OK")
    assert client.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHdyb25n")[0] == 535
    client.login("alice@example.org", "alice-password")
    message = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: pg\r\n\r\nhi\r\n"
    assert client.sendmail("alice@example.org", ["bob@example.org"], message) == {}
    client.quit()
    [stored] = server.messages("bob@example.org")
    assert stored["Subject"] == "pg"
    guard.active = False
    assert "getconn" in queries and "execute" in queries
    assert guard.violations == [], "\n".join(guard.violations)


def test_reactor_guard_a_trusted_devices_quick_login_makes_one_stat_and_no_file_call(
    guard: ReactorGuard, make_server: Callable[..., RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quick login (issue 16) decides on the reactor: the one call the rule allows is
    its ``stat`` of the passwd file, by name; no open, no other file call, no SQLite
    connect. (Its SQLite read raises no audit event; ``test_quick_login.py`` shows that it
    never waits for a lock.)"""
    guard.active = False
    server = make_server()
    server.add_user("alice@example.org", "alice-password")
    checker = server.service.components.checker
    real = checker._quick_check
    quick: list[bool] = []

    def counted(attempt: Any, password: str, look: Any) -> Any:
        outcome = real(attempt, password, look)
        quick.append(outcome is not None)
        return outcome

    monkeypatch.setattr(checker, "_quick_check", counted)

    def session() -> None:
        client = server.smtp()
        assert client.docmd("CLIENTID", f"UUID {THUNDERBIRD_UUID}") == (250, b"2.0.0 OK")
        client.login("alice@example.org", "alice-password")
        client.quit()

    session()  # the first login trusts the device and caches the password, in a thread
    guard.active = True
    session()
    session()
    guard.active = False
    passwd = str(server.service.components.passwords.path)
    allowed = [v for v in guard.violations if v.startswith(f"os.stat(PosixPath('{passwd}')")]
    allowed = [v for v in allowed if "in is_current" in v]
    assert quick[-2:] == [True, True], quick  # both decided on the reactor
    assert len(allowed) == 2  # one stat a quick login
    assert [v for v in guard.violations if v not in allowed] == [], "\n".join(guard.violations)
