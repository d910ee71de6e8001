"""Issue 16: a reply is sent to the socket when it is written, not at the reactor's next
turn; what the socket cannot take, and every error, is left to the reactor as before.

Real connected sockets (``socketpair``) under Twisted's own TCP connection class, with a
reactor stand-in that records which connections ask to be told when they can write.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import protocol, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from clientid_mta.smtp.protocol import SubmissionESMTP
from clientid_mta.smtp.send_at_once import SendAtOnce, send_at_once
from clientid_mta.smtp.tls import generate_self_signed, server_context
from tests.conftest import RunningServer


class WriteWatch:
    """The reactor calls a connection makes: who waits to write, who to read."""

    def __init__(self) -> None:
        self.writers: set[object] = set()
        self.readers: set[object] = set()

    def addWriter(self, selectable: object) -> None:
        self.writers.add(selectable)

    def removeWriter(self, selectable: object) -> None:
        self.writers.discard(selectable)

    def addReader(self, selectable: object) -> None:
        self.readers.add(selectable)

    def removeReader(self, selectable: object) -> None:
        self.readers.discard(selectable)


Pair = tuple[tcp.Connection, socket.socket, WriteWatch]


def connected(ours: socket.socket, theirs: socket.socket) -> Iterator[Pair]:
    """Twisted's TCP connection on ``ours``, with a reactor stand-in; ``theirs`` reads."""
    watch = WriteWatch()
    connection = tcp.Connection(ours, protocol.Protocol(), reactor=watch)  # type: ignore[arg-type]
    connection.connected = True
    theirs.setblocking(False)
    yield connection, theirs, watch
    ours.close()
    theirs.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    yield from connected(*socket.socketpair())


@pytest.fixture
def tcp_pair() -> Iterator[Pair]:
    """The same over real TCP on 127.0.0.1, where Nagle's algorithm applies."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname())
        ours, _address = listener.accept()
    yield from connected(ours, theirs)


def nodelay(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def received(peer: socket.socket) -> bytes:
    try:
        return peer.recv(1 << 16)
    except BlockingIOError:
        return b""


def test_without_it_a_write_waits_for_the_reactor(pair: Pair) -> None:
    connection, peer, watch = pair
    connection.write(b"235 2.7.0 ok\r\n")
    assert received(peer) == b""  # Twisted's own behaviour, the wait being removed
    assert connection in watch.writers


def test_a_write_reaches_the_socket_at_once(pair: Pair) -> None:
    connection, peer, watch = pair
    send_at_once(connection)
    connection.write(b"235 2.7.0 ok\r\n")
    assert received(peer) == b"235 2.7.0 ok\r\n"
    assert connection not in watch.writers  # nothing left for the reactor
    connection.write(b"250 2.0.0 next\r\n")
    assert received(peer) == b"250 2.0.0 next\r\n"


def test_what_the_socket_cannot_take_is_left_to_the_reactor(pair: Pair) -> None:
    connection, peer, watch = pair
    send_at_once(connection)
    big = b"x" * (16 << 20)  # far more than a socket buffer
    connection.write(big)
    assert connection in watch.writers
    got = bytearray()
    while chunk := received(peer):  # all the socket took at once
        got += chunk
    assert 0 < len(got) < len(big)
    connection.write(b"tail")  # behind data still queued: no send out of turn
    assert received(peer) == b""
    while connection in watch.writers:  # the reactor's turns, by hand
        got += received(peer)
        assert connection.doWrite() is None
    while chunk := received(peer):
        got += chunk
    assert bytes(got) == big + b"tail"


def test_a_closing_connection_is_left_to_the_reactor(pair: Pair) -> None:
    connection, peer, watch = pair
    send_at_once(connection)
    connection.write(b"221 2.0.0 bye\r\n")
    assert received(peer) == b"221 2.0.0 bye\r\n"
    # loseConnection asks to write before it sets ``disconnecting``: with nothing left
    # to send, that call must still register, or the reactor would never close it.
    connection.loseConnection()
    assert connection in watch.writers
    assert connection.disconnecting
    assert connection.doWrite() is not None  # the reactor's turn: "close it now"
    connection.startWriting()  # once closing, every later call only registers
    assert connection in watch.writers


def test_an_error_is_left_to_the_reactor(pair: Pair) -> None:
    connection, peer, watch = pair
    send_at_once(connection)
    peer.close()
    connection.write(b"250 2.0.0 ok\r\n")  # EPIPE or ECONNRESET: no exception here
    assert connection in watch.writers  # its doWrite meets the error and closes


def test_it_finds_the_connection_under_tls_and_is_installed_once(
    pair: Pair, tmp_path: Path
) -> None:
    connection, _peer, _watch = pair
    certificate, key = generate_self_signed(tmp_path, "mail.example.org")
    tls = TLSMemoryBIOFactory(
        server_context(certificate, key), False, protocol.Factory.forProtocol(protocol.Protocol)
    ).buildProtocol(None)
    tls.transport = connection
    send_at_once(tls)
    installed = vars(connection)["startWriting"]
    send_at_once(connection)
    assert vars(connection)["startWriting"] is installed


def test_other_transports_are_left_alone() -> None:
    transport = StringTransport()
    send_at_once(transport)
    assert "startWriting" not in vars(transport)


# --- Nagle's algorithm off from STARTTLS to the EHLO reply -----------------------------


def test_nagle_is_turned_off_and_on_again(tcp_pair: Pair) -> None:
    connection, peer, _watch = tcp_pair
    sender = send_at_once(connection)
    assert sender is not None
    assert nodelay(connection.socket) == 0  # the kernel's default: Nagle on
    assert sender.nagle(False) is True
    assert nodelay(connection.socket) == 1
    connection.write(b"250 2.0.0 ok\r\n")
    assert received(peer) == b"250 2.0.0 ok\r\n"
    assert sender.nagle(True) is True
    assert nodelay(connection.socket) == 0


def test_nagle_does_not_apply_to_a_unix_socket_or_a_closed_one(pair: Pair, tcp_pair: Pair) -> None:
    unix = send_at_once(pair[0])
    assert unix is not None and unix.nagle(False) is False
    connection = tcp_pair[0]
    closed = send_at_once(connection)
    assert closed is not None
    connection.socket.close()
    assert closed.nagle(False) is False


def test_nagle_after_the_connection_is_lost_is_refused_not_raised(tcp_pair: Pair) -> None:
    """A login that finishes after the client left still replies (into nothing); its
    reply may be the one that turns Nagle back on, when Twisted has removed the socket."""
    connection, _peer, _watch = tcp_pair
    sender = send_at_once(connection)
    assert sender is not None
    connection.connectionLost(Failure(ConnectionDone()))
    assert not hasattr(connection, "socket")
    assert sender.nagle(True) is False


def test_the_ehlo_reply_inside_tls_leaves_with_nagle_off_and_the_next_with_it_on(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real session over STARTTLS: the socket write that carries the EHLO reply (it
    follows the TLS session tickets, and would wait for the client's delayed ACK) is
    made with Nagle off; the write of the next reply with Nagle on again. Replies are
    recorded as the session makes them, writes as they reach the socket."""
    events: list[tuple[str, object]] = []
    real_reply, real_send = SubmissionESMTP.reply, SendAtOnce.write_some

    def reply(self: SubmissionESMTP, code: int, text: Any) -> None:
        events.append(("reply", code))
        real_reply(self, code, text)

    def write_some(self: SendAtOnce, data: bytes) -> Any:
        if data:
            events.append(("send", nodelay(self.connection.socket)))
        return real_send(self, data)

    monkeypatch.setattr(SubmissionESMTP, "reply", reply)
    monkeypatch.setattr(SendAtOnce, "write_some", write_some)
    wire = server.wire().tls_session()
    assert wire.code("NOOP") == 250
    wire.close()
    replies = [i for i, (kind, _) in enumerate(events) if kind == "reply"]
    assert [events[i][1] for i in replies] == [220, 250, 220, 250, 250]  # greeting .. NOOP
    ehlo_in_tls, noop = replies[3], replies[4]

    def first_send_after(index: int) -> object:
        return next(flag for kind, flag in events[index:] if kind == "send")

    assert first_send_after(replies[0]) == 0  # plaintext: Nagle on, as the kernel has it
    assert first_send_after(ehlo_in_tls) == 1
    assert first_send_after(noop) == 0


def test_an_implicit_tls_session_keeps_nagle_on(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the implicit TLS port the tickets leave with the greeting: nothing to undo."""
    turned: list[bool] = []
    real = SendAtOnce.nagle

    def nagle(self: SendAtOnce, on: bool) -> bool:
        turned.append(on)
        return real(self, on)

    monkeypatch.setattr(SendAtOnce, "nagle", nagle)
    implicit = server.wire(implicit=True)
    assert implicit.code("EHLO client.example.net") == 250
    assert implicit.code("NOOP") == 250
    implicit.close()
    assert turned == []
    starttls = server.wire().tls_session()
    assert starttls.code("NOOP") == 250
    starttls.close()
    assert turned == [False, True]
