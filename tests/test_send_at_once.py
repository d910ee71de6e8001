"""Issue 16: a reply is sent to the socket when it is written, not at the reactor's next
turn; what the socket cannot take, and every error, is left to the reactor as before.

Real connected sockets (``socketpair``) under Twisted's own TCP connection class, with a
reactor stand-in that records which connections ask to be told when they can write.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import protocol, tcp
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory

from clientid_mta.smtp.send_at_once import send_at_once
from clientid_mta.smtp.tls import generate_self_signed, server_context


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


@pytest.fixture
def pair() -> Iterator[tuple[tcp.Connection, socket.socket, WriteWatch]]:
    ours, theirs = socket.socketpair()
    watch = WriteWatch()
    connection = tcp.Connection(ours, protocol.Protocol(), reactor=watch)  # type: ignore[arg-type]
    connection.connected = True
    theirs.setblocking(False)
    yield connection, theirs, watch
    ours.close()
    theirs.close()


def received(peer: socket.socket) -> bytes:
    try:
        return peer.recv(1 << 16)
    except BlockingIOError:
        return b""


def test_without_it_a_write_waits_for_the_reactor(pair):
    connection, peer, watch = pair
    connection.write(b"235 2.7.0 ok\r\n")
    assert received(peer) == b""  # Twisted's own behaviour, the wait being removed
    assert connection in watch.writers


def test_a_write_reaches_the_socket_at_once(pair):
    connection, peer, watch = pair
    send_at_once(connection)
    connection.write(b"235 2.7.0 ok\r\n")
    assert received(peer) == b"235 2.7.0 ok\r\n"
    assert connection not in watch.writers  # nothing left for the reactor
    connection.write(b"250 2.0.0 next\r\n")
    assert received(peer) == b"250 2.0.0 next\r\n"


def test_what_the_socket_cannot_take_is_left_to_the_reactor(pair):
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


def test_a_closing_connection_is_left_to_the_reactor(pair):
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


def test_an_error_is_left_to_the_reactor(pair):
    connection, peer, watch = pair
    send_at_once(connection)
    peer.close()
    connection.write(b"250 2.0.0 ok\r\n")  # EPIPE or ECONNRESET: no exception here
    assert connection in watch.writers  # its doWrite meets the error and closes


def test_it_finds_the_connection_under_tls_and_is_installed_once(pair, tmp_path: Path):
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


def test_other_transports_are_left_alone():
    transport = StringTransport()
    send_at_once(transport)
    assert "startWriting" not in vars(transport)
