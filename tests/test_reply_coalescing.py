"""Issue 16: the replies written in one reactor turn leave in one TLS record, in order.

The session writes each reply with its own ``transport.write``; under TLS, Twisted's
``TLSMemoryBIOFactory`` (its ``BufferingTLSTransport``) gathers the writes of one
reactor turn and encrypts them together at the next turn. The server relies on that
rather than buffering replies itself, so this checks it where the server builds its
TLS: a real handshake in memory (no sockets, a ``task.Clock`` for the turn).
"""

from __future__ import annotations

from pathlib import Path

from OpenSSL import SSL
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory

from clientid_mta.smtp.protocol import SubmissionFactory
from clientid_mta.smtp.tls import generate_self_signed, server_context
from tests.test_protocol_units import SERVER_KEY, FakeDelivery, FakePortal, make_config

APPLICATION_DATA = 23  # TLS record content type


def records(data: bytes) -> list[int]:
    """The content type of each TLS record in ``data`` (whole records only)."""
    types = []
    while len(data) >= 5:
        length = int.from_bytes(data[3:5], "big")
        types.append(data[0])
        data = data[5 + length :]
    assert data == b""
    return types


class TlsPair:
    """Our session behind the TLS wrapper the server uses, and an OpenSSL client."""

    def __init__(self, folder: Path) -> None:
        self.clock = task.Clock()
        certificate, key = generate_self_signed(folder, "mail.example.org")
        sessions = SubmissionFactory(
            make_config(),
            FakePortal(FakeDelivery()),  # type: ignore[arg-type]
            None,
            server_key=SERVER_KEY,
            implicit_tls=True,
            reactor=self.clock,
        )
        wrapper = TLSMemoryBIOFactory(
            server_context(certificate, key), False, sessions, clock=self.clock
        )
        self.server = wrapper.buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000))
        self.wire = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000))
        self.server.makeConnection(self.wire)
        self.client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
        self.client.set_connect_state()

    def to_server(self) -> None:
        try:
            self.server.dataReceived(self.client.bio_read(65536))
        except SSL.WantReadError:
            pass

    def to_client(self) -> bytes:
        """One reactor turn of the server, then what it sent, given to the client."""
        self.clock.advance(0)
        sent = self.wire.value()
        self.wire.clear()
        if sent:
            self.client.bio_write(sent)
        return sent

    def handshake(self) -> str:
        """Until the handshake is done and the greeting read; the greeting."""
        for _ in range(10):
            try:
                self.client.do_handshake()
                break
            except SSL.WantReadError:
                self.to_server()
                self.to_client()
        self.to_server()  # the client's Finished: now the server writes its greeting
        self.to_client()
        return self.read()

    def read(self) -> str:
        received = b""
        while True:
            try:
                received += self.client.recv(65536)
            except SSL.WantReadError:
                return received.decode()


def test_one_turns_replies_go_out_in_one_tls_record_and_in_order(tmp_path: Path) -> None:
    pair = TlsPair(tmp_path)
    greeting = pair.handshake()
    assert greeting.startswith("220 ")
    pair.to_client()  # whatever the handshake left (TLS 1.3 session tickets)
    pair.read()

    pair.client.send(b"NOOP\r\nXYZZY\r\nRSET\r\n")  # one read, three replies
    pair.to_server()
    assert pair.wire.value() == b""  # nothing yet: written at the end of the turn
    sent = pair.to_client()
    assert records(sent) == [APPLICATION_DATA]  # one record: one encryption, one send
    replies = pair.read().splitlines()
    assert [line[:4] for line in replies] == ["250 ", "500 ", "250 "], replies
