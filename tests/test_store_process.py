"""The Maildir store process (``[delivery] store_process``, delivery/store_process.py).

Three layers: the reactor side with a fake transport and ``task.Clock``; the helper
itself as a real process fed by hand; and a real server whose helper is killed while a
message waits for it.
"""

from __future__ import annotations

import errno
import json
import mailbox
import os
import signal
import smtplib
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, error, task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from clientid_mta.delivery import store_process
from clientid_mta.delivery.maildir import UnsafeMailboxName
from clientid_mta.delivery.store_process import StoreProcess, _Helper
from tests.conftest import RunningServer
from tests.sink import wait_until

MESSAGE = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: kept\r\n\r\nHello.\r\n"


class FakeProcess(StringTransport):
    """A process transport: what was written, signals sent, whether stdin was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.signals: list[str] = []
        self.stdin_closed = False
        self.pid = 4242

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def closeStdin(self) -> None:
        self.stdin_closed = True


class FakeReactor(task.Clock):
    """A clock that records the helpers it is asked to spawn, already connected."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[_Helper, FakeProcess, list[str]]] = []

    def spawnProcess(self, helper: _Helper, executable: str, args: list[str], env: Any) -> None:
        transport = FakeProcess()
        helper.makeConnection(transport)
        self.spawned.append((helper, transport, args))


def requests(written: bytes) -> list[tuple[dict[str, Any], bytes]]:
    """The (header, data) pairs in what the reactor side wrote to the helper."""
    found = []
    while written:
        head, _, rest = written.partition(b"\n")
        header = json.loads(head)
        found.append((header, rest[: header["size"]]))
        written = rest[header["size"] :]
    return found


def answer(helper: _Helper, **fields: Any) -> None:
    helper.outReceived(json.dumps(fields).encode() + b"\n")


def results(stored: defer.Deferred[Path]) -> list[Any]:
    got: list[Any] = []
    stored.addBoth(got.append)
    return got


@pytest.fixture
def started() -> tuple[StoreProcess, FakeReactor]:
    reactor = FakeReactor()
    store = StoreProcess(reactor, Path("/srv/mail"), env={}, max_pending=100)
    store.startService()
    return store, reactor


# --- the reactor side ----------------------------------------------------------------


def test_the_helper_starts_with_the_service_as_python_minus_m(started: Any) -> None:
    store, reactor = started
    [(_helper, _transport, args)] = reactor.spawned
    assert args[1:] == ["-P", "-m", "clientid_mta.delivery.store_helper", "/srv/mail"]
    assert store.available()


def two_stores(started: Any, bob: str) -> tuple[_Helper, list[Any], list[Any], list[Any]]:
    """Stores for alice ("one") and ``bob`` ("two"): the helper, each one's results, and
    the (header, data) the helper was sent."""
    store, reactor = started
    [(helper, transport, _)] = reactor.spawned
    first = results(store.store("example.org", "alice", b"one"))
    second = results(store.store("example.org", bob, b"two"))
    return helper, first, second, requests(transport.value())


def test_answers_fire_their_own_store_in_any_order_and_in_pieces(started: Any) -> None:
    helper, first, second, sent = two_stores(started, "bob")
    [(head1, data1), (head2, data2)] = sent
    assert (head1["domain"], head1["localpart"], data1) == ("example.org", "alice", b"one")
    assert (head2["localpart"], data2) == ("bob", b"two")
    line = json.dumps({"id": head2["id"], "path": "/srv/mail/b"}).encode() + b"\n"
    helper.outReceived(line[:7])
    assert second == []
    helper.outReceived(line[7:])
    assert second == [Path("/srv/mail/b")] and first == []
    answer(helper, id=head1["id"], path="/srv/mail/a")
    assert first == [Path("/srv/mail/a")]
    assert started[0].pending_bytes == 0


def test_an_error_answer_is_the_same_error_as_in_a_thread(started: Any) -> None:
    helper, full, unsafe, [(head1, _), (head2, _)] = two_stores(started, "..")
    answer(helper, id=head1["id"], error="No space left on device", errno=errno.ENOSPC)
    answer(helper, id=head2["id"], error="'..' cannot be a mailbox folder name", unsafe=True)
    assert isinstance(full[0], Failure) and isinstance(full[0].value, OSError)
    assert full[0].value.errno == errno.ENOSPC
    assert isinstance(unsafe[0], Failure) and unsafe[0].check(UnsafeMailboxName)


def test_more_than_max_pending_bytes_is_refused_at_once(started: Any) -> None:
    store, reactor = started
    waiting = results(store.store("example.org", "alice", b"a" * 60))
    refused = results(store.store("example.org", "alice", b"b" * 60))
    assert waiting == []
    assert isinstance(refused[0], Failure) and isinstance(refused[0].value, OSError)
    assert refused[0].value.errno == errno.ENOBUFS
    assert len(requests(reactor.spawned[0][1].value())) == 1  # the refused one never left


@pytest.mark.parametrize(
    "garbage",
    [b'{"id": 999, "path": "/x"}\n', b"not json\n", b"x" * (store_process.MAX_ANSWER + 1)],
)
def test_an_answer_it_was_not_asked_for_stops_the_helper(started: Any, garbage: bytes) -> None:
    store, reactor = started
    [(helper, transport, _)] = reactor.spawned
    results(store.store("example.org", "alice", b"x"))
    helper.outReceived(garbage)
    assert transport.signals == ["KILL"]


def test_when_the_helper_ends_its_stores_fail_and_threads_take_over_for_a_while(
    started: Any,
) -> None:
    store, reactor = started
    [(helper, _transport, _)] = reactor.spawned
    lost = results(store.store("example.org", "alice", b"x"))
    helper.outConnectionLost()
    helper.processEnded(Failure(error.ProcessTerminated(signal=9)))  # after: no second errback
    assert isinstance(lost[0], Failure) and isinstance(lost[0].value, OSError)
    assert lost[0].value.errno == errno.EIO
    assert store.pending_bytes == 0
    assert not store.available()  # the message store goes to a thread meanwhile
    reactor.advance(store_process.RESPAWN_WAIT)
    assert store.available()
    results(store.store("example.org", "alice", b"y"))
    assert len(reactor.spawned) == 2  # a new helper for the next store


def test_stop_closes_the_helpers_input_and_waits_for_it_to_end(started: Any) -> None:
    store, reactor = started
    [(helper, transport, _)] = reactor.spawned
    stopped = results(store.stopService())
    assert transport.stdin_closed and stopped == [] and not store.available()
    helper.outConnectionLost()
    assert stopped == [None]
    reactor.advance(store_process.STOP_WAIT)
    assert transport.signals == []  # ended in time: never killed


def test_a_helper_that_does_not_end_is_killed_after_the_stop_wait(started: Any) -> None:
    store, reactor = started
    [(_helper, transport, _)] = reactor.spawned
    results(store.stopService())
    reactor.advance(store_process.STOP_WAIT)
    assert transport.signals == ["KILL"]


class NoForkReactor(FakeReactor):
    def spawnProcess(self, helper: _Helper, executable: str, args: list[str], env: Any) -> None:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")


def test_a_helper_that_cannot_start_leaves_the_stores_to_threads_for_a_while() -> None:
    reactor = NoForkReactor()
    store = StoreProcess(reactor, Path("/srv/mail"), env={})
    store.startService()  # no exception: the server starts and stores in threads
    assert not store.available()
    reactor.advance(store_process.RESPAWN_WAIT)
    assert store.available()
    refused = results(store.store("example.org", "alice", b"x"))
    assert isinstance(refused[0], Failure) and isinstance(refused[0].value, OSError)
    assert refused[0].value.errno == errno.EAGAIN
    assert store.pending_bytes == 0 and not store.available()


# --- the helper, a real process --------------------------------------------------------


def helper_process(root: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "clientid_mta.delivery.store_helper", str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def ask(helper: subprocess.Popen[bytes], number: int, localpart: str, data: bytes) -> Any:
    assert helper.stdin is not None and helper.stdout is not None
    head = {"id": number, "size": len(data), "domain": "example.org", "localpart": localpart}
    helper.stdin.write(json.dumps(head).encode() + b"\n" + data)
    helper.stdin.flush()
    return json.loads(helper.stdout.readline())


def test_the_helper_stores_durably_and_answers_with_the_path(tmp_path: Path) -> None:
    helper = helper_process(tmp_path)
    try:
        reply = ask(helper, 7, "bob", MESSAGE)
        assert reply["id"] == 7
        path = Path(reply["path"])
        assert path.parent == tmp_path / "example.org" / "bob" / "new"
        assert f"P{helper.pid}Q" in path.name  # written by the helper, not by us
        [kept] = list(mailbox.Maildir(tmp_path / "example.org" / "bob", create=False))
        assert kept["Subject"] == "kept"
        assert list((tmp_path / "example.org" / "bob" / "tmp").iterdir()) == []
        assert ask(helper, 8, "..", b"x") == {
            "id": 8,
            "error": "'..' cannot be a mailbox folder name",
            "unsafe": True,
        }
    finally:
        assert helper.stdin is not None
        helper.stdin.close()
        assert helper.wait(timeout=10) == 0


def test_the_helper_ignores_sigterm_and_ends_when_its_input_closes(tmp_path: Path) -> None:
    helper = helper_process(tmp_path)
    assert ask(helper, 1, "bob", MESSAGE)["id"] == 1  # up and serving before the signal
    helper.send_signal(signal.SIGTERM)
    assert "path" in ask(helper, 2, "bob", MESSAGE)  # still serving
    assert helper.stdin is not None
    helper.stdin.write(b'{"id": 3, "size": 1000, "domain": "example.org", "localpart": "bob"}\n')
    helper.stdin.write(b"only part of it")
    helper.stdin.close()  # the server died mid-request
    assert helper.wait(timeout=10) == 0
    assert len(list(mailbox.Maildir(tmp_path / "example.org" / "bob", create=False))) == 2


# --- a real server ---------------------------------------------------------------------


def send(server: RunningServer, outcome: list[Any]) -> None:
    client = server.smtp()
    client.login("alice@example.org", "alice-password")
    try:
        client.sendmail("alice@example.org", ["bob@example.org"], MESSAGE)
        outcome.append("250")
    except smtplib.SMTPDataError as refused:
        outcome.append(refused.smtp_code)
    client.quit()


@pytest.fixture
def server(make_server: Callable[..., RunningServer]) -> RunningServer:
    """A server with ``[delivery] store_process`` on, alice and bob."""
    running = make_server("[delivery]\nstore_process = true\n")
    running.add_user("alice@example.org", "alice-password")
    running.add_user("bob@example.org", "bob-password")
    return running


def test_without_the_setting_a_server_stores_in_threads(
    make_server: Callable[..., RunningServer],
) -> None:
    plain = make_server()
    assert plain.service.parts.store_process is None
    assert plain.service.parts.router.store_process is None


def test_a_server_stores_through_its_helper(server: RunningServer) -> None:
    outcome: list[Any] = []
    send(server, outcome)
    assert outcome == ["250"]
    helper = server.service.parts.store_process
    assert helper is not None and helper.helper is not None
    pid = helper.helper.transport.pid  # type: ignore[union-attr]
    [name] = os.listdir(server.config.delivery.maildir_root / "example.org" / "bob" / "new")
    assert f"P{pid}Q" in name


def test_a_helper_killed_with_a_message_in_it_gives_451_then_the_next_message_is_stored(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_process, "RESPAWN_WAIT", 0.0)
    store = server.service.parts.store_process
    assert store is not None and store.helper is not None
    first = store.helper.transport.pid  # type: ignore[union-attr]
    os.kill(first, signal.SIGSTOP)  # it reads nothing more: the message waits in it
    outcome: list[Any] = []
    sender = threading.Thread(target=send, args=(server, outcome))
    sender.start()
    wait_until(lambda: store.pending_bytes or None, 10, "the message handed to the helper")
    os.kill(first, signal.SIGKILL)
    sender.join(timeout=20)
    assert outcome == [451]
    bob = server.config.delivery.maildir_root / "example.org" / "bob"
    assert not (bob / "new").exists() or os.listdir(bob / "new") == []
    send(server, outcome)
    assert outcome == [451, "250"]
    second = store.helper.transport.pid  # type: ignore[union-attr]
    assert second != first
    [name] = os.listdir(bob / "new")
    assert f"P{second}Q" in name
