"""The SMTP client (issue 4 item 7): clientid_mta.client and ``clientid-mta send``
(clientid_mta.cli.send) against the real server, and against a scripted server in a thread
where the exact command order matters."""

from __future__ import annotations

import base64
import io
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypedDict, cast

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import provider

from clientid_mta.cli.send import send_command
from clientid_mta.client import (
    ConnectionFailed,
    RecipientResult,
    SendFailed,
    Transaction,
    send_message,
    send_messages,
    sendmail,
)
from clientid_mta.client.protocol import QUIT_WAIT, DataEncoder
from clientid_mta.devices.keys import load_or_create_server_key
from clientid_mta.smtp.clientid import (
    device_key,
    fingerprint,
    parse_clientid,
)
from clientid_mta.smtp.tls import generate_self_signed
from tests.conftest import HOSTNAME, THUNDERBIRD_UUID, RunningServer, _ensure_reactor
from tests.typed_reactor import blockingCallFromThread, reactor


class Login(TypedDict):
    """The keyword arguments that log a client in (``**ALICE``)."""

    username: str
    password: str


ALICE: Login = {"username": "alice@example.org", "password": "alice-password"}
CLIENT_ID = ("UUID", THUNDERBIRD_UUID)
MESSAGE = b"From: alice@example.org\nTo: alice@example.org\nSubject: client\n\nHello.\n"
QUEUED = re.compile(r"2\.0\.0 Ok: queued as [0-9A-F]{16}\Z")
ROOT = Path(__file__).resolve().parent.parent


def send(
    port: int, cafile: Path, recipients: tuple[str, ...] = ("alice@example.org",), **options: Any
) -> list[RecipientResult]:
    """send_message from the test thread; a ConnectionFailed is raised here."""
    message = options.pop("message", MESSAGE)
    options.setdefault("tls_hostname", HOSTNAME)
    return blockingCallFromThread(
        reactor,
        send_message,
        "127.0.0.1",
        port,
        "alice@example.org",
        list(recipients),
        message,
        trust_roots=cafile,
        **options,
    )


def deliver(server: RunningServer, **options: Any) -> list[RecipientResult]:
    """As alice, with her CLIENTID, over STARTTLS unless told otherwise."""
    options = {**ALICE, "client_id": CLIENT_ID, **options}
    port = server.tls_port if options.get("tls") == "implicit" else server.port
    return send(port, server.cafile, **options)


def refused(call: Callable[[], object]) -> ConnectionFailed:
    with pytest.raises(ConnectionFailed) as failed:
        call()
    assert failed.value.temporary is True
    return failed.value


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """Every Twisted log event (client and server side) while the test runs, as text."""
    lines: list[str] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        lines.append(f"{formatEvent(event)} {event!r}")
        failure = event.get("log_failure")
        if failure is not None:
            lines.append(failure.getTraceback())

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


# --- a scripted server --------------------------------------------------------------

SILENT = "<silent>"  # say nothing, keep the connection
CLOSE = "<close>"  # close the connection instead of replying


class Nth:
    """A script for successive uses of one verb: the first reply, the second, ...; the last
    one repeats."""

    def __init__(self, *replies: str) -> None:
        self.replies = replies

    def __getitem__(self, use: int) -> str:
        return self.replies[min(use, len(self.replies) - 1)]


Script = str | list[str] | Nth
PLAIN_EHLO = ["fake.example.org", "8BITMIME", "STARTTLS"]
TLS_EHLO = ["fake.example.org", "8BITMIME", "CLIENTID", "AUTH PLAIN LOGIN"]
DEFAULT_REPLIES: dict[str, Script] = {
    "<greeting>": "220 fake.example.org ESMTP",
    "STARTTLS": "220 2.0.0 Ready",
    "CLIENTID": "250 2.0.0 OK",
    "AUTH": "235 2.7.0 Authentication successful",
    "DATA": "354 End data with <CR><LF>.<CR><LF>",
    "<end>": "250 2.0.0 Ok: queued as FAKE",
    "QUIT": "221 2.0.0 Bye",
}


@dataclass
class FakeServer:
    """One SMTP session, scripted, in a thread: it records every line the client sends.

    ``replies`` maps a verb (or ``<greeting>``, ``<end>`` for the end of data) to its reply,
    SILENT or CLOSE; a list is the reply to the verb and then to the next lines, in order
    (AUTH LOGIN); an Nth has one reply per use of the verb. EHLO answers with
    ``plain_ehlo`` before TLS and ``tls_ehlo`` after. ``messages`` has each message's data
    as it came on the wire (dot-stuffed, with the end-of-data line).
    """

    context: ssl.SSLContext
    plain_ehlo: list[str]
    tls_ehlo: list[str]
    replies: dict[str, Script]
    listener: socket.socket = field(default_factory=socket.socket)
    commands: list[str] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> FakeServer:
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()
        return self

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    @property
    def data(self) -> bytes:
        """The last message's data."""
        return self.messages[-1] if self.messages else b""

    @property
    def verbs(self) -> list[str]:
        self.join()
        return [line.split(" ")[0].upper() for line in self.commands]

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(10)
        assert not self.thread.is_alive()

    def serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        session = _FakeSession(self, conn)
        try:
            session.run()
        except (OSError, ssl.SSLError):
            pass
        finally:
            session.sock.close()
            self.listener.close()


class _FakeSession:
    def __init__(self, server: FakeServer, conn: socket.socket) -> None:
        self.server = server
        self.sock: socket.socket = conn
        self.sock.settimeout(10)
        self.buffer = b""
        self.queued: list[str] = []
        self.uses: dict[str, int] = {}
        self.last = ""  # the last reply sent
        self.tls = False

    def readline(self) -> bytes | None:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def reply(self, key: str, text: str | None = None) -> bool:
        """Send the scripted reply; False when the session is over."""
        if text is None:
            if self.queued:
                text = self.queued.pop(0)
            else:
                script = self.server.replies.get(key, DEFAULT_REPLIES.get(key, "250 2.0.0 Ok"))
                if isinstance(script, Nth):
                    self.uses[key] = self.uses.get(key, 0) + 1
                    script = script[self.uses[key] - 1]
                text, self.queued = (
                    (script[0], script[1:]) if isinstance(script, list) else (script, [])
                )
        self.last = text
        if text == SILENT:
            while self.sock.recv(65536):
                pass
            return False
        if text == CLOSE:
            return False
        self.sock.sendall(text.encode() + b"\r\n")
        return True

    def ehlo(self) -> str:
        lines = self.server.tls_ehlo if self.tls else self.server.plain_ehlo
        return "\r\n".join(
            f"250{' ' if i == len(lines) - 1 else '-'}{line}" for i, line in enumerate(lines)
        )

    def run(self) -> None:
        if not self.reply("<greeting>"):
            return
        while (line := self.readline()) is not None:
            text = line.decode("utf-8", "replace")
            self.server.commands.append(text)
            verb = "" if self.queued else text.split(" ")[0].upper()
            scripted = verb != "EHLO" or "EHLO" in self.server.replies
            if not self.reply(verb, None if scripted else self.ehlo()):
                return
            if verb == "STARTTLS":
                self.sock = self.server.context.wrap_socket(self.sock, server_side=True)
                self.tls, self.buffer = True, b""
            elif verb == "DATA" and self.last.startswith("354"):
                while b"\r\n.\r\n" not in self.buffer:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        return
                    self.buffer += chunk
                end = self.buffer.index(b"\r\n.\r\n") + 5
                self.server.messages.append(self.buffer[:end])
                self.buffer = self.buffer[end:]
                self.server.commands.append(".")
                if not self.reply("<end>"):
                    return
            elif verb == "QUIT":
                return


@pytest.fixture
def fake_tls(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    """A certificate for mail.example.org that the scripted server uses: (cafile, context)."""
    cert, key = generate_self_signed(tmp_path / "fake-tls", HOSTNAME)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return cert, context


@pytest.fixture
def fake(fake_tls: tuple[Path, ssl.SSLContext]) -> Iterator[Callable[..., FakeServer]]:
    _ensure_reactor()
    started: list[FakeServer] = []

    def start(
        plain_ehlo: list[str] = PLAIN_EHLO,
        tls_ehlo: list[str] = TLS_EHLO,
        **replies: Script,
    ) -> FakeServer:
        server = FakeServer(fake_tls[1], plain_ehlo, tls_ehlo, replies).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.listener.close()


def fake_send(server: FakeServer, cafile: Path, **options: Any) -> list[RecipientResult]:
    return send(server.port, cafile, **{**ALICE, "client_id": CLIENT_ID, **options})


# --- through the real server ------------------------------------------------------------


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_S1_starttls_and_implicit_tls_deliver_with_clientid_and_auth(
    server: RunningServer, tls: str
) -> None:
    [result] = deliver(server, tls=tls)
    assert (result.address, result.code, result.delivered, result.permanent) == (
        "alice@example.org",
        250,
        True,
        False,
    )
    assert QUEUED.match(result.text)
    [stored] = [m for m in server.messages("alice@example.org") if m["Subject"] == "client"]
    assert "with ESMTPSA (TLSv1.3)" in stored["Received"]


def test_C15_the_clientid_reaches_the_server_as_the_accounts_device(server: RunningServer) -> None:
    assert "has no devices yet" in server.admin("device", "list", "alice@example.org")
    deliver(server)
    key = load_or_create_server_key(server.config.clientid.key_file)
    identity = parse_clientid(f"UUID {THUNDERBIRD_UUID}".encode())
    expected = fingerprint(device_key(key, identity))
    [header, row] = server.admin("device", "list", "alice@example.org").splitlines()
    assert header.split()[:4] == ["FINGERPRINT", "TYPE", "STATE", "LOGINS"]
    assert row.split()[:4] == [expected, "UUID", "trusted", "1"]


def test_C1_clientid_is_not_sent_when_the_server_does_not_advertise_it(
    make_server: Callable[..., RunningServer], logged: list[str]
) -> None:
    server = make_server('[clientid]\npolicy = "off"')
    server.add_user("alice@example.org", "alice-password")
    [result] = deliver(server)
    assert result.code == 250
    assert len(server.messages("alice@example.org")) == 1
    assert not [line for line in logged if "CLIENTID" in line]  # no 500 for a CLIENTID sent


@pytest.mark.parametrize(
    ("plain_ehlo", "tls_ehlo", "options", "verbs"),
    [
        pytest.param(
            PLAIN_EHLO,
            TLS_EHLO,
            {},
            ["EHLO", "STARTTLS", "EHLO", "CLIENTID", "AUTH", "MAIL", "RCPT", "DATA"],
            id="advertised-after-tls",
        ),
        pytest.param(
            PLAIN_EHLO,
            [x for x in TLS_EHLO if x != "CLIENTID"],
            {},
            ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL", "RCPT", "DATA"],
            id="not-advertised",
        ),
        pytest.param(
            ["fake.example.org", "CLIENTID", "AUTH PLAIN"],
            TLS_EHLO,
            {"tls": "opportunistic", "username": None, "password": None},
            ["EHLO", "MAIL", "RCPT", "DATA"],
            id="advertised-in-plaintext",
        ),
    ],
)
def test_C7_clientid_goes_after_the_tls_ehlo_and_before_auth_and_only_when_advertised(
    fake: Callable[..., FakeServer],
    fake_tls: tuple[Path, ssl.SSLContext],
    plain_ehlo: list[str],
    tls_ehlo: list[str],
    options: dict[str, Any],
    verbs: list[str],
) -> None:
    server = fake(plain_ehlo, tls_ehlo)
    [result] = fake_send(server, fake_tls[0], **options)
    assert (result.code, result.text) == (250, "2.0.0 Ok: queued as FAKE")
    assert server.verbs == [*verbs, ".", "QUIT"]
    assert server.data == MESSAGE.replace(b"\n", b"\r\n") + b".\r\n"
    if "CLIENTID" in verbs:
        assert f"CLIENTID UUID {THUNDERBIRD_UUID}" in server.commands


def test_C14_a_refused_clientid_is_logged_without_the_token_and_auth_follows(
    fake: Callable[..., FakeServer], fake_tls: tuple[Path, ssl.SSLContext], logged: list[str]
) -> None:
    server = fake(CLIENTID=f"501 5.5.4 Bad token {THUNDERBIRD_UUID}")
    [result] = fake_send(server, fake_tls[0])
    assert result.code == 250
    assert server.verbs[3:5] == ["CLIENTID", "AUTH"]
    [warning] = [line for line in logged if "CLIENTID not accepted" in line]
    assert "501 5.5.4 Bad token [redacted]; going on to AUTH" in warning
    assert not [line for line in logged if THUNDERBIRD_UUID in line]


def test_C14_the_token_and_the_password_are_never_logged(
    server: RunningServer, logged: list[str]
) -> None:
    deliver(server)
    failed = refused(lambda: deliver(server, password="wrong-password-xyz"))
    assert "wrong-password-xyz" not in str(failed)
    assert [line for line in logged if "clientid type=UUID device=" in line]  # we do see logs
    plain = base64.b64encode(b"\0alice@example.org\0alice-password").decode()
    for secret in (THUNDERBIRD_UUID, "alice-password", "wrong-password-xyz", plain):
        assert not [line for line in logged if secret in line], secret


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
@pytest.mark.parametrize(
    ("trusted", "name", "reason"),
    [
        ("other", HOSTNAME, "TLS handshake failed: certificate verify failed"),
        ("server", "other.example.org", "TLS certificate is not valid for other.example.org"),
    ],
)
def test_S1_a_certificate_that_does_not_verify_is_connection_failed(
    server: RunningServer, tmp_path: Path, tls: str, trusted: str, name: str, reason: str
) -> None:
    other, _ = generate_self_signed(tmp_path / "other-ca", HOSTNAME)
    cafile = other if trusted == "other" else server.cafile
    port = server.tls_port if tls == "implicit" else server.port
    failed = refused(lambda: send(port, cafile, tls=tls, tls_hostname=name, **ALICE))
    assert str(failed) == reason
    assert server.messages("alice@example.org") == []


def test_S4_a_wrong_password_is_connection_failed(server: RunningServer) -> None:
    failed = refused(lambda: deliver(server, password="not-her-password"))
    assert str(failed) == "AUTH failed: 535 5.7.8 Authentication credentials invalid"


def test_S4_auth_login_when_plain_is_not_offered(
    fake: Callable[..., FakeServer], fake_tls: tuple[Path, ssl.SSLContext]
) -> None:
    server = fake(
        tls_ehlo=["fake.example.org", "AUTH LOGIN"],
        AUTH=["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "235 2.7.0 Authentication successful"],
    )
    [result] = fake_send(server, fake_tls[0])
    assert result.code == 250
    server.join()
    assert server.commands[3:6] == [
        "AUTH LOGIN",
        base64.b64encode(b"alice@example.org").decode(),
        base64.b64encode(b"alice-password").decode(),
    ]


@pytest.mark.parametrize(
    ("plain_ehlo", "options", "reason"),
    [
        (
            ["fake.example.org", "AUTH PLAIN"],
            {},
            "TLS is required but the server does not offer STARTTLS",
        ),
        (
            ["fake.example.org", "AUTH PLAIN"],
            {"tls": "opportunistic"},
            "the server does not offer STARTTLS, and AUTH is only sent over TLS",
        ),
    ],
)
def test_S3_auth_is_never_sent_without_tls(
    fake: Callable[..., FakeServer],
    fake_tls: tuple[Path, ssl.SSLContext],
    plain_ehlo: list[str],
    options: dict[str, Any],
    reason: str,
) -> None:
    server = fake(plain_ehlo)
    assert str(refused(lambda: fake_send(server, fake_tls[0], **options))) == reason
    assert server.verbs == ["EHLO", "QUIT"]


def test_S11_a_refused_recipient_gets_its_rcpt_reply_and_the_other_is_delivered(
    server: RunningServer,
) -> None:
    recipients = ("nobody@example.org", "bob@example.org")
    nobody, bob = deliver(server, recipients=recipients)
    assert (nobody.address, nobody.code, nobody.text) == (
        "nobody@example.org",
        550,
        "5.1.1 No such user here",
    )
    assert nobody.permanent and not nobody.delivered
    assert (bob.address, bob.code, bob.delivered) == ("bob@example.org", 250, True)
    assert len(server.messages("bob@example.org")) == 1

    with pytest.raises(SendFailed) as failed:
        blockingCallFromThread(
            reactor,
            sendmail,
            "127.0.0.1",
            server.port,
            "alice@example.org",
            list(recipients),
            MESSAGE,
            trust_roots=server.cafile,
            tls_hostname=HOSTNAME,
            **ALICE,
        )
    assert [r.code for r in failed.value.results] == [550, 250]
    assert str(failed.value) == "not delivered to nobody@example.org: 550 5.1.1 No such user here"


class Pieces(io.RawIOBase):
    """A file whose reads return the given pieces, one per read: chunk boundaries we choose."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


DOTTED = [
    b"From: alice@example.org\nTo: alice@example.org\nSubject: dots\n\nfirst\n",
    b".starts with a dot\n",
    b"..two dots\n",
    b".\n",
    b".\r",
    b"\n.",
    b"\r\n",
    b"\r\n..",
    b".\nlast line with no newline",
]


def test_S10_dot_stuffing_across_chunk_boundaries_reads_back_identical(
    server: RunningServer,
) -> None:
    source = Pieces(DOTTED)
    [result] = deliver(server, message=source)
    assert result.code == 250 and source.pieces == []
    maildir = server.maildir("alice@example.org")
    [raw] = [raw for raw in map(maildir.get_bytes, maildir.keys()) if b"Subject: dots" in raw]
    *received, body = raw.split(b"\n", 4)
    assert received[0].startswith(b"Received: ")
    assert body == b"".join(DOTTED).replace(b"\r\n", b"\n") + b"\n"


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (b"", b".\r\n"),
        (b"no newline", b"no newline\r\n.\r\n"),
        (b".a\r\n.b\n\r\n..c\r.d", b"..a\r\n..b\r\n\r\n...c\r\n..d\r\n.\r\n"),
        (b"x\n.\n", b"x\r\n..\r\n.\r\n"),
    ],
)
def test_S10_the_data_encoder_does_not_depend_on_chunk_boundaries(
    message: bytes, wire: bytes
) -> None:
    cuts = [[message]] + [[message[:i], message[i:]] for i in range(len(message) + 1)]
    cuts.append([message[i : i + 1] for i in range(len(message))])
    for pieces in cuts:
        encoder = DataEncoder()
        assert b"".join(encoder.encode(p) for p in pieces) + encoder.end() == wire, pieces


@pytest.mark.parametrize(
    ("message", "mail_from"),
    [
        (MESSAGE, "MAIL FROM:<alice@example.org>"),
        (MESSAGE + "Grüße\n".encode(), "MAIL FROM:<alice@example.org> BODY=8BITMIME"),
        (io.BytesIO(MESSAGE), "MAIL FROM:<alice@example.org>"),
        (Pieces([MESSAGE]), "MAIL FROM:<alice@example.org> BODY=8BITMIME"),  # unknown
    ],
)
def test_S7_body_8bitmime_is_declared_for_8bit_data(
    fake: Callable[..., FakeServer],
    fake_tls: tuple[Path, ssl.SSLContext],
    message: Any,
    mail_from: str,
) -> None:
    server = fake()
    fake_send(server, fake_tls[0], message=message)
    server.join()
    assert server.commands[5] == mail_from


@pytest.mark.parametrize(
    ("replies", "reason"),
    [
        ({"<greeting>": "554 5.3.2 not now"}, "greeting failed: 554 5.3.2 not now"),
        ({"EHLO": "500 5.5.1 what"}, "EHLO failed: 500 5.5.1 what"),
        ({"DATA": "250 2.0.0 sure"}, "DATA failed: the server answered 250 instead of 354"),
        ({"<greeting>": SILENT}, "no reply within 0.5 s (greeting)"),
        ({"STARTTLS": SILENT}, "no reply within 0.5 s (STARTTLS)"),
        ({"<end>": SILENT}, "no reply within 0.5 s (message data)"),
        ({"RCPT": CLOSE}, "the connection was lost (RCPT TO)"),  # no TLS close_notify
        ({"<end>": CLOSE}, "the connection was lost (message data)"),
        (
            {"RCPT": "421 4.3.2 shutting down"},
            "the server is closing the session (RCPT TO): 421 4.3.2 shutting down",
        ),
    ],
)
def test_S13_no_transaction_is_connection_failed_with_a_one_line_reason(
    fake: Callable[..., FakeServer],
    fake_tls: tuple[Path, ssl.SSLContext],
    replies: dict[str, str],
    reason: str,
) -> None:
    server = fake(**replies)
    started = time.monotonic()
    assert str(refused(lambda: fake_send(server, fake_tls[0], timeout=0.5))) == reason
    assert time.monotonic() - started < 5
    server.join()


def test_S13_a_port_nobody_listens_on_is_connection_failed(
    fake_tls: tuple[Path, ssl.SSLContext],
) -> None:
    _ensure_reactor()
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    failed = refused(lambda: send(port, fake_tls[0], **ALICE))
    assert str(failed).startswith(
        f"cannot connect to 127.0.0.1 port {port}: Connection was refused"
    )


@pytest.mark.parametrize("quit_reply", [SILENT, CLOSE])
def test_S12_the_results_do_not_wait_for_the_quit_reply(
    fake: Callable[..., FakeServer], fake_tls: tuple[Path, ssl.SSLContext], quit_reply: str
) -> None:
    server = fake(QUIT=quit_reply)
    started = time.monotonic()
    [result] = fake_send(server, fake_tls[0], timeout=30)
    assert result.code == 250
    assert time.monotonic() - started < 5
    server.join()  # and the client closes the connection itself


# --- timers: on the reactor the caller gives -------------------------------------------


@dataclass
class Scripted:
    """send_message on a MemoryReactorClock; its protocol on a StringTransport, greeted."""

    timeout: float
    clock: MemoryReactorClock = field(default_factory=MemoryReactorClock)
    transport: StringTransport = field(default_factory=StringTransport)
    outcome: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        sending = send_message(
            "mx.example.org",
            587,
            "a@example.org",
            ["b@example.org"],
            b"Hi\n",
            tls="none",
            timeout=self.timeout,
            reactor=self.clock,
        )
        sending.addBoth(self.outcome.append)
        [(host, port, factory, connect_timeout, _bind)] = self.clock.tcpClients
        assert (host, port, connect_timeout) == ("mx.example.org", 587, 30)
        client = factory.buildProtocol(None)
        assert client is not None
        self.client = client
        self.client.makeConnection(self.transport)
        self.client.dataReceived(b"220 mx.example.org ESMTP\r\n")
        assert self.transport.value() == b"EHLO localhost\r\n"


def test_S13_a_silent_server_times_out_on_the_injected_reactor() -> None:
    session = Scripted(timeout=30)
    session.clock.advance(29.9)
    assert session.outcome == []
    session.clock.advance(0.1)
    [failure] = session.outcome
    assert failure.check(ConnectionFailed)
    assert str(failure.value) == "no reply within 30 s (EHLO)"
    assert session.transport.disconnecting


def test_S13_the_wait_for_the_close_after_quit_is_on_the_injected_reactor() -> None:
    session = Scripted(timeout=300)
    client, transport, clock = session.client, session.transport, session.clock
    for reply in (b"250 mx.example.org", b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"354 Go ahead"):
        client.dataReceived(reply + b"\r\n")
    while transport.producer is not None:  # a pull producer: the transport asks for more
        transport.producer.resumeProducing()
    assert transport.value().endswith(b"DATA\r\nHi\r\n.\r\n")
    client.dataReceived(b"250 2.0.0 Ok: queued as 1234\r\n")
    [[result]] = session.outcome
    assert result.delivered and transport.value().endswith(b"QUIT\r\n")
    assert transport.disconnecting and not transport.disconnected  # a clean close, asked for
    clock.advance(QUIT_WAIT - 0.1)
    assert not transport.disconnected
    clock.advance(0.1)
    assert transport.disconnected  # the server never closed: aborted


# --- send_messages: several transactions over one connection ---------------------------

Outcomes = list[list[RecipientResult] | ConnectionFailed]
SESSION = ["EHLO", "STARTTLS", "EHLO", "CLIENTID", "AUTH"]
TRANSACTION = ["MAIL", "RCPT", "DATA", "."]


def send_all(port: int, cafile: Path, transactions: list[Transaction], **options: Any) -> Outcomes:
    """send_messages from the test thread, as alice with her CLIENTID."""
    options = {**ALICE, "client_id": CLIENT_ID, "tls_hostname": HOSTNAME, **options}
    return blockingCallFromThread(
        reactor, send_messages, "127.0.0.1", port, transactions, trust_roots=cafile, **options
    )


def numbered(count: int) -> list[Transaction]:
    """``count`` messages from alice to alice, with "Subject: batch <n>"."""
    return [
        Transaction(
            "alice@example.org",
            ["alice@example.org"],
            MESSAGE.replace(b"Subject: client", b"Subject: batch %d" % n),
        )
        for n in range(1, count + 1)
    ]


def summary(outcomes: Outcomes) -> list[list[int] | str]:
    """Each transaction's recipient codes, or the reason of the ConnectionFailed it got."""
    return [str(o) if isinstance(o, ConnectionFailed) else [r.code for r in o] for o in outcomes]


def results(outcome: list[RecipientResult] | ConnectionFailed) -> list[RecipientResult]:
    assert not isinstance(outcome, ConnectionFailed), str(outcome)
    return outcome


def batches(server: RunningServer, address: str) -> list[str]:
    """The subjects of the "batch <n>" messages in the mailbox (not the new-device notice)."""
    found = (str(message["Subject"]) for message in server.messages(address))
    return sorted(subject for subject in found if subject.startswith("batch "))


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_S12_three_transactions_share_one_connection_one_tls_session_and_one_auth(
    server: RunningServer, logged: list[str], tls: str
) -> None:
    port = server.tls_port if tls == "implicit" else server.port
    outcomes = send_all(port, server.cafile, numbered(3), tls=tls)
    assert summary(outcomes) == [[250], [250], [250]]
    assert all(QUEUED.match(results(o)[0].text) for o in outcomes)
    assert batches(server, "alice@example.org") == ["batch 1", "batch 2", "batch 3"]
    assert len([line for line in logged if re.match(r"session \w+ from ", line)]) == 1
    assert len([line for line in logged if "clientid type=UUID device=" in line]) == 1
    [_, row] = server.admin("device", "list", "alice@example.org").splitlines()
    assert row.split()[2:4] == ["trusted", "1"]  # LOGINS: one AUTH for the three


@pytest.mark.parametrize(
    ("middle", "codes"),
    [
        (["nobody@example.org"], [550]),  # every RCPT refused: RSET, then the third
        (["nobody@example.org", "bob@example.org"], [550, 250]),
    ],
)
def test_S12_a_refused_recipient_in_the_middle_transaction_does_not_disturb_the_others(
    server: RunningServer, middle: list[str], codes: list[int]
) -> None:
    batch = numbered(3)
    batch[1].recipients = middle
    outcomes = send_all(server.port, server.cafile, batch)
    assert summary(outcomes) == [[250], codes, [250]]
    nobody = results(outcomes[1])[0]
    assert (nobody.address, nobody.text) == ("nobody@example.org", "5.1.1 No such user here")
    assert batches(server, "alice@example.org") == ["batch 1", "batch 3"]
    assert batches(server, "bob@example.org") == ["batch 2"] * (len(middle) - 1)


@pytest.mark.parametrize(
    ("verb", "accepted", "middle"),
    [
        ("MAIL", "250 2.1.0 Ok", ["MAIL", "RSET"]),
        ("RCPT", "250 2.1.5 Ok", ["MAIL", "RCPT", "RSET"]),
        ("DATA", "354 End data with <CR><LF>.<CR><LF>", ["MAIL", "RCPT", "DATA", "RSET"]),
        ("<end>", "250 2.0.0 Ok: queued as FAKE", TRANSACTION),  # ended: no RSET
    ],
)
def test_S12_rset_comes_only_after_a_transaction_that_ended_before_its_data(
    fake: Callable[..., FakeServer],
    fake_tls: tuple[Path, ssl.SSLContext],
    verb: str,
    accepted: str,
    middle: list[str],
) -> None:
    server = fake(**{verb: Nth(accepted, "554 5.7.1 not this one", accepted)})
    outcomes = send_all(server.port, fake_tls[0], numbered(3))
    assert summary(outcomes) == [[250], [554], [250]]
    assert results(outcomes[1])[0].text == "5.7.1 not this one"
    assert server.verbs == [*SESSION, *TRANSACTION, *middle, *TRANSACTION, "QUIT"]
    assert len(server.messages) == (3 if verb == "<end>" else 2)


def test_S10_each_transaction_is_dot_stuffed_and_declares_its_body_on_its_own(
    fake: Callable[..., FakeServer], fake_tls: tuple[Path, ssl.SSLContext]
) -> None:
    server = fake()
    eight_bit = MESSAGE + "Grüße\n".encode()
    first = cast(BinaryIO, Pieces(DOTTED))  # it ends mid-line
    messages: list[bytes | BinaryIO] = [first, b".leading dot\n", eight_bit]
    send_all(
        server.port,
        fake_tls[0],
        [Transaction("alice@example.org", ["alice@example.org"], m) for m in messages],
    )
    assert server.verbs == [*SESSION, *TRANSACTION * 3, "QUIT"]  # one STARTTLS, one AUTH
    assert [c for c in server.commands if c.startswith("MAIL")] == [
        "MAIL FROM:<alice@example.org> BODY=8BITMIME",  # a stream: unknown
        "MAIL FROM:<alice@example.org>",
        "MAIL FROM:<alice@example.org> BODY=8BITMIME",
    ]
    encoder = DataEncoder()
    assert server.messages == [
        encoder.encode(b"".join(DOTTED)) + encoder.end(),
        b"..leading dot\r\n.\r\n",
        eight_bit.replace(b"\n", b"\r\n") + b".\r\n",
    ]


LOST_MAIL = "the connection was lost (MAIL FROM)"  # no TLS close_notify
CLOSING = "the server is closing the session ({}): 421 4.3.2 shutting down"


@pytest.mark.parametrize(
    ("replies", "expected"),
    [
        pytest.param(
            {"MAIL": Nth("250 2.1.0 Ok", "250 2.1.0 Ok", CLOSE)},
            [[250], [250], LOST_MAIL],
            id="dropped-after-the-second-250",
        ),
        pytest.param({"MAIL": CLOSE}, [LOST_MAIL] * 3, id="dropped-in-the-first"),
        pytest.param(
            {"RCPT": Nth("250 2.1.5 Ok", "421 4.3.2 shutting down")},
            [[250], *[CLOSING.format("RCPT TO")] * 2],
            id="421-to-rcpt",
        ),
        pytest.param(
            {"<end>": Nth("250 2.0.0 Ok: queued as FAKE", "421 4.3.2 shutting down")},
            [[250], *[CLOSING.format("message data")] * 2],
            id="421-to-the-end-of-data",
        ),
        pytest.param(
            {"<end>": Nth("250 2.0.0 Ok: queued as FAKE", SILENT)},
            [[250], *["no reply within 0.5 s (message data)"] * 2],
            id="silent-after-the-data",
        ),
        pytest.param(
            {"RCPT": Nth("250 2.1.5 Ok", "550 5.1.1 no such user"), "RSET": "500 5.5.1 what"},
            [[250], [550], "RSET failed: 500 5.5.1 what"],
            id="rset-refused",
        ),
    ],
)
def test_S13_a_session_that_stops_fails_the_current_and_every_later_transaction(
    fake: Callable[..., FakeServer],
    fake_tls: tuple[Path, ssl.SSLContext],
    replies: dict[str, Script],
    expected: list[list[int] | str],
) -> None:
    server = fake(**replies)
    started = time.monotonic()
    outcomes = send_all(server.port, fake_tls[0], numbered(3), timeout=0.5)
    assert time.monotonic() - started < 5
    assert summary(outcomes) == expected
    failed = [o for o in outcomes if isinstance(o, ConnectionFailed)]
    assert all(f is failed[0] and f.temporary for f in failed)  # one instance for the rest
    server.join()


def test_S13_send_message_still_gives_a_421_to_the_end_of_data_as_the_result(
    fake: Callable[..., FakeServer], fake_tls: tuple[Path, ssl.SSLContext]
) -> None:
    server = fake(**{"<end>": "421 4.3.2 shutting down"})
    [result] = fake_send(server, fake_tls[0])
    assert (result.code, result.text, result.delivered, result.permanent) == (
        421,
        "4.3.2 shutting down",
        False,
        False,
    )
    assert server.verbs[-2:] == [".", "QUIT"]


@pytest.mark.parametrize(
    ("replies", "reason"),
    [
        ({"AUTH": "535 5.7.8 nope"}, "AUTH failed: 535 5.7.8 nope"),
        ({"STARTTLS": SILENT}, "no reply within 0.5 s (STARTTLS)"),
    ],
)
def test_S13_a_session_that_stops_before_the_first_transaction_is_connection_failed(
    fake: Callable[..., FakeServer],
    fake_tls: tuple[Path, ssl.SSLContext],
    replies: dict[str, str],
    reason: str,
) -> None:
    server = fake(**replies)
    failed = refused(lambda: send_all(server.port, fake_tls[0], numbered(2), timeout=0.5))
    assert str(failed) == reason
    assert "MAIL" not in server.verbs


class Unreadable(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        raise OSError(5, "Input/output error")


def test_S13_an_unreadable_message_aborts_the_session_and_the_rest_is_connection_failed(
    fake: Callable[..., FakeServer], fake_tls: tuple[Path, ssl.SSLContext]
) -> None:
    server = fake()
    batch = numbered(3)
    batch[1].message = cast(BinaryIO, Unreadable())
    outcomes = send_all(server.port, fake_tls[0], batch)
    reason = "cannot read the message of transaction 2: [Errno 5] Input/output error"
    assert summary(outcomes) == [[250], reason, reason]
    assert isinstance(outcomes[1], ConnectionFailed)
    assert isinstance(outcomes[1].__cause__, OSError)
    server.join()
    assert len(server.messages) == 1
    with pytest.raises(OSError, match="Input/output error"):  # send_message: as it was
        fake_send(fake(), fake_tls[0], message=Unreadable())


def test_S12_no_transactions_is_an_empty_list_without_connecting(
    fake_tls: tuple[Path, ssl.SSLContext],
) -> None:
    _ensure_reactor()
    with socket.socket() as unused:  # nobody listens: connecting would be ConnectionFailed
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    assert send_all(port, fake_tls[0], []) == []


# --- clientid-mta send ----------------------------------------------------------------


def run_send(
    argv: list[str], message: bytes, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    code = "import sys; from clientid_mta.cli.send import send_command; "
    code += "sys.exit(send_command(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        input=message.decode(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("CLIENTID_MTA")} | env,
        check=False,
    )


@pytest.mark.parametrize(
    ("tls", "password", "recipients", "status", "stdout"),
    [
        ("starttls", "file", ["bob@example.org"], 0, [r"bob@example.org: 250 2\.0\.0 Ok: queued"]),
        (
            "implicit",
            "env",
            ["bob@example.org", "nobody@example.org"],
            1,
            [r"bob@example.org: 250 2\.0\.0 Ok", "nobody@example.org: 550 5.1.1 No such user here"],
        ),
        ("starttls", "wrong", ["bob@example.org"], 75, []),
    ],
)
def test_S1_send_command_end_to_end(
    server: RunningServer,
    tmp_path: Path,
    tls: str,
    password: str,
    recipients: list[str],
    status: int,
    stdout: list[str],
) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("wrong-password\n" if password == "wrong" else "alice-password\n")
    port = server.tls_port if tls == "implicit" else server.port
    argv = [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--tls",
        tls,
        "--ca-file",
        str(server.cafile),
    ]
    argv += ["--user", "alice@example.org", "--from", "alice@example.org", *recipients]
    env = {"CLIENTID_MTA_CLIENT_ID": f"UUID:{THUNDERBIRD_UUID}"}
    if password == "env":
        env["CLIENTID_MTA_PASSWORD"] = "alice-password"
    else:
        argv[:0] = ["--password-file", str(password_file)]
    done = run_send(argv, MESSAGE, env)
    assert done.returncode == status, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(stdout)
    assert all(re.match(p, line) for p, line in zip(stdout, lines, strict=True)), lines
    if password == "wrong":
        assert done.stderr.strip() == (
            "clientid-mta send: AUTH failed: 535 5.7.8 Authentication credentials invalid"
        )
    assert THUNDERBIRD_UUID not in done.stdout + done.stderr
    assert len(server.messages("bob@example.org")) == (1 if status != 75 else 0)


@pytest.mark.parametrize(
    "argv",
    [
        ["--host", "h", "alice@example.org"],  # no --from
        [
            "--host",
            "h",
            "--from",
            "a@b",
            "--password",
            "secret",
            "b@c",
        ],  # never on the command line
        ["--host", "h", "--from", "a@b", "--user", "a@b", "b@c"],  # a user but no password
        ["--host", "h", "--from", "a@b", "--client-id", "UUID", "b@c"],  # no ":TOKEN"
        ["--host", "h", "--from", "a@b", "--client-id", "UUID:two words", "b@c"],
    ],
)
def test_S4_send_command_usage_errors_exit_2(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CLIENTID_MTA_PASSWORD", raising=False)
    monkeypatch.delenv("CLIENTID_MTA_CLIENT_ID", raising=False)
    assert send_command(argv, stdin=io.BytesIO(MESSAGE)) == 2
    assert capsys.readouterr().err.strip()
