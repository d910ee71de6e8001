"""What TLS costs the server per session, in memory: Twisted's ``TLSMemoryBIOProtocol``
over pyOpenSSL (what the server uses) against the standard library's ``ssl.MemoryBIO``
(issue 16: would moving TLS to the standard library bring the CPU per message to 1 ms?).

No sockets and no reactor: a client (standard library ``ssl``) and the server side are
fed each other's bytes by hand. Only the server side's calls are timed (process CPU
time): the handshake, then the commands of one message in workload (a) (EHLO, CLIENTID,
AUTH, MAIL, RCPT, DATA, a body of ``--size`` bytes, QUIT), each answered by one reply
line. The server side for the standard library is the least a real one would do
(decrypt, answer, encrypt, hand the bytes on), so its figure is a floor.

    .venv/bin/python bench/tls_layer.py --sessions 300
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from twisted.internet import protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory

from clientid_mta.smtp.tls import generate_self_signed, server_context

REPLY = b"250 2.0.0 OK a reply of a usual length\r\n"
TIMER = time.process_time


def commands(size: int) -> list[bytes]:
    return [
        b"EHLO bench.example\r\n",
        b"CLIENTID UUID 12345678-1234-1234-1234-123456789abc\r\n",
        b"AUTH PLAIN AGJvYkBleGFtcGxlLm9yZwBzZWNyZXQ=\r\n",
        b"MAIL FROM:<bob@example.org>\r\n",
        b"RCPT TO:<alice@example.org>\r\n",
        b"DATA\r\n",
        b"x" * size + b"\r\n.\r\n",
        b"QUIT\r\n",
    ]


class Client:
    """The client's end, in memory."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=False)

    def handshake(self, received: bytes) -> bytes:
        self.incoming.write(received)
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()

    def send(self, data: bytes) -> bytes:
        self.tls.write(data)
        return self.outgoing.read()

    def receive(self, data: bytes) -> None:
        self.incoming.write(data)
        try:
            while self.tls.read(65536):
                pass
        except ssl.SSLWantReadError:
            pass


class Answer(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(REPLY)  # type: ignore[union-attr]


class StdlibServer:
    """The least a server side on ``ssl.MemoryBIO`` would do."""

    def __init__(self, context: ssl.SSLContext, transport: StringTransport) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.transport = transport
        self.established = False

    def dataReceived(self, data: bytes) -> None:
        self.incoming.write(data)
        if not self.established:
            try:
                self.tls.do_handshake()
                self.established = True
            except ssl.SSLWantReadError:
                pass
        if self.established:
            try:
                while self.tls.read(65536):
                    self.tls.write(REPLY)
            except ssl.SSLWantReadError:
                pass
        sent = self.outgoing.read()
        if sent:
            self.transport.write(sent)


def session(
    server: Callable[[StringTransport], object], client_context: ssl.SSLContext, size: int
) -> tuple[float, float]:
    """(handshake, commands): the server side's CPU seconds for one session."""
    transport, client = StringTransport(), Client(client_context)
    started = TIMER()
    side = server(transport)
    handshake = TIMER() - started
    received = client.handshake(b"")
    while received:
        started = TIMER()
        side.dataReceived(received)  # type: ignore[attr-defined]
        handshake += TIMER() - started
        received = client.handshake(transport.value())
        transport.clear()
    spent = 0.0
    for line in commands(size):
        data = client.send(line)
        started = TIMER()
        side.dataReceived(data)  # type: ignore[attr-defined]
        spent += TIMER() - started
        client.receive(transport.value())
        transport.clear()
    return handshake, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--size", type=int, default=4096, help="message bytes")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        certificate, key = generate_self_signed(Path(folder), "localhost")
        options_for_twisted = server_context(certificate, key)
        stdlib_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        stdlib_context.minimum_version = ssl.TLSVersion.TLSv1_2
        stdlib_context.load_cert_chain(certificate, key)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE

    def twisted_side(transport: StringTransport) -> object:
        factory = TLSMemoryBIOFactory(
            options_for_twisted, False, protocol.Factory.forProtocol(Answer)
        )
        side = factory.buildProtocol(None)
        assert side is not None
        side.makeConnection(transport)
        return side

    def stdlib_side(transport: StringTransport) -> object:
        return StdlibServer(stdlib_context, transport)

    sides = {"Twisted + pyOpenSSL": twisted_side, "ssl.MemoryBIO": stdlib_side}
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for _round in range(options.rounds):
        for name, side in sides.items():
            for _ in range(options.sessions):
                figures[name].append(session(side, client_context, options.size))
    print(
        f"| server side | handshake ms | one message's commands ms "
        f"({len(commands(options.size))} commands, {options.size}-byte body) |"
    )
    print("|---|---:|---:|")
    for name, values in figures.items():
        handshake = statistics.fmean(v[0] for v in values) * 1000
        spent = statistics.fmean(v[1] for v in values) * 1000
        print(f"| {name} | {handshake:.3f} | {spent:.3f} |")


if __name__ == "__main__":
    main()
