"""SubmissionESMTP on its own: no sockets, no TLS handshake, no threads, no sleeps.

The protocol runs over a ``StringTransport`` on a ``task.Clock`` that ``SubmissionFactory``
is given, with a fake portal (it decides each login as the test says) and a fake
``IMessageDelivery`` whose messages record what they were handed. "After TLS" is the
protocol's own flag, set by driving STARTTLS (the transport only records the context)
or by an implicit-TLS factory. The rows (C1..C16, S1..S15) are those of
docs/conformance.md; the end-to-end tests ``test_conformance_*.py`` check the same rows
over real sockets and TLS.
"""

from __future__ import annotations

import ast
import base64
import functools
import importlib
import inspect
import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from twisted.cred import error as cred_error
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from twisted.python.failure import Failure
from zope.interface import implementer, provider

import clientid_mta
import twisted
from clientid_mta.auth.credentials import (
    AuthUnavailable,
    ClientIdUsernamePassword,
    LoginThrottled,
)
from clientid_mta.config import Config, load_config
from clientid_mta.smtp.body import HeaderScanner
from clientid_mta.smtp.protocol import CLOSE_GRACE, SubmissionESMTP, SubmissionFactory

HOST = "mx.example.org"
USER, PASSWORD = "alice@example.org", "alice-password"
RECIPIENT, OTHER_RECIPIENT = "bob@example.org", "carol@example.org"
TOKEN = "23bf83be-aad7-46aa-9e0f-39191ccf402f"
SERVER_KEY = b"k" * 32
TLS_CONTEXT = object()  # what STARTTLS hands the transport; no handshake happens here

AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_REFUSED = "535 5.7.8 Authentication credentials invalid"
LOCAL_ERROR = "451 4.3.0 Local error in processing, try again later"
OK = "250 2.0.0 Ok"

EHLO_PLAINTEXT = [
    f"250-{HOST}",
    "250-PIPELINING",
    "250-SIZE 26214400",
    "250-8BITMIME",
    "250-ENHANCEDSTATUSCODES",
    "250 STARTTLS",
]
EHLO_TLS = [
    f"250-{HOST}",
    "250-SIZE 26214400",
    "250-8BITMIME",
    "250-ENHANCEDSTATUSCODES",
    "250-AUTH PLAIN LOGIN",
    "250 CLIENTID",
]


def plain(user: str = USER, password: str = PASSWORD, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def make_config(clientid: dict[str, Any] | None = None, **limits: Any) -> Config:
    base = load_config(None)
    return replace(
        base,
        server=replace(base.server, hostname=HOST),
        clientid=replace(base.clientid, **(clientid or {})),
        limits=replace(base.limits, **limits),
    )


# --- the fakes -------------------------------------------------------------------------------


class Trouble(Exception):
    """What a fake store raises when told to."""


@implementer(IMessageSMTP)
class FakeMessage:
    """One copy: "open" (a file, say) from creation until stored or discarded."""

    def __init__(self, delivery: FakeDelivery, recipient: str) -> None:
        self.delivery = delivery
        self.recipient = recipient
        self.lines: list[bytes] = []
        self.open = True
        self.stored = False
        self.discarded = 0  # connectionLost calls
        self.pending: defer.Deferred[None] | None = None

    def lineReceived(self, line: bytes) -> None:
        if self.delivery.write_raises is not None and len(self.lines) >= 5:
            raise self.delivery.write_raises
        self.lines.append(line)

    def eomReceived(self) -> defer.Deferred[None]:
        behaviour = self.delivery.eom.get(self.recipient, "ok")
        if isinstance(behaviour, BaseException):
            raise behaviour  # at once, before any store began: the file is still open
        if behaviour == "fail":  # the store itself failed, and closed its file
            self.open = False
            return defer.fail(OSError(28, "No space left on device"))
        if behaviour == "pending":
            self.pending = defer.Deferred()
            self.pending.addCallback(self._stored)
            return self.pending
        self._stored(None)
        return defer.succeed(None)

    def _stored(self, _: object) -> None:
        self.open = False
        self.stored = True

    def connectionLost(self) -> None:
        self.discarded += 1
        self.open = False

    @property
    def body(self) -> list[bytes]:
        """The lines after our Received: header (4 lines)."""
        return self.lines[4:]


@implementer(IMessageDelivery)
class FakeDelivery:
    """The avatar: one message per recipient; ``eom`` says how each one's store ends."""

    account = SimpleNamespace(address=USER)

    def __init__(self) -> None:
        self.messages: list[FakeMessage] = []
        self.eom: dict[str, str | BaseException] = {}
        self.write_raises: BaseException | None = None
        self.header_check_raises: BaseException | None = None

    def receivedHeader(self, helo: object, origin: object, recipients: object) -> None:
        return None  # the protocol writes its own (S15)

    def validateFrom(self, helo: object, origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], IMessageSMTP]:
        def open_message() -> IMessageSMTP:
            message = FakeMessage(self, str(user.dest))
            self.messages.append(message)
            return message

        return open_message

    def may_use_header_from(self, addresses: list[str]) -> bool:
        if self.header_check_raises is not None:
            raise self.header_check_raises
        return all(address == USER for address in addresses)


class FakePortal:
    """Decides each login as ``outcome`` says; keeps the credentials it was shown."""

    def __init__(self, delivery: FakeDelivery) -> None:
        self.delivery = delivery
        self.outcome = "check"  # check the password | throttled | unavailable | pending | ...
        self.seen: list[ClientIdUsernamePassword] = []
        self.pending: list[defer.Deferred[Any]] = []
        self.logouts = 0

    def login(self, credentials: ClientIdUsernamePassword, mind: object, *interfaces: Any) -> Any:
        self.seen.append(credentials)
        if self.outcome == "throttled":
            return defer.fail(LoginThrottled())
        if self.outcome == "unavailable":
            return defer.fail(AuthUnavailable("device store locked"))
        if self.outcome == "unhandled":
            return defer.fail(cred_error.UnhandledCredentials())
        if self.outcome == "pending":
            self.pending.append(defer.Deferred())
            return self.pending[-1]
        if credentials.username == USER and credentials.password == PASSWORD:
            return defer.succeed(self.avatar())
        return defer.fail(cred_error.UnauthorizedLogin())

    def avatar(self) -> tuple[Any, FakeDelivery, Callable[[], None]]:
        return IMessageDelivery, self.delivery, self.logout

    def logout(self) -> None:
        self.logouts += 1


class FakeTransport(StringTransport):
    """A TCP transport that can "start TLS" (it records the context) and be aborted."""

    def __init__(self) -> None:
        super().__init__()
        self.tls_context: object | None = None
        self.aborted = False

    def startTLS(self, context: object) -> None:
        self.tls_context = context

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class Session:
    """One protocol instance, its transport and clock, and what the client saw."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        implicit: bool = False,
        tls_context: object | None = TLS_CONTEXT,
        with_portal: bool = True,
    ) -> None:
        self.clock = task.Clock()
        self.delivery = FakeDelivery()
        self.portal = FakePortal(self.delivery)
        self.config = config or make_config()
        factory = SubmissionFactory(
            self.config,
            cast(Portal, self.portal) if with_portal else None,  # it is asked only to login()
            tls_context,
            server_key=SERVER_KEY,
            implicit_tls=implicit,
            reactor=self.clock,
        )
        self.protocol: SubmissionESMTP = factory.buildProtocol(None)
        self.transport = FakeTransport()
        self.protocol.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> list[str]:
        """The reply lines written since the last look."""
        data = self.transport.value()
        self.transport.clear()
        return data.decode("utf-8").splitlines()

    def send(self, data: bytes) -> list[str]:
        self.protocol.dataReceived(data)
        return self.take()

    def cmd(self, line: str) -> list[str]:
        return self.send(line.encode() + b"\r\n")

    def starttls(self) -> None:
        assert self.cmd("STARTTLS") == ["220 2.0.0 Ready to start TLS"]
        assert self.transport.tls_context is TLS_CONTEXT

    def login(self, clientid: bool = True) -> None:
        """TLS, EHLO, CLIENTID, AUTH: ready for MAIL."""
        if not self.protocol.tls:
            self.starttls()
        assert self.cmd("EHLO client.example")[-1] == "250 CLIENTID"
        if clientid:
            assert self.cmd(f"CLIENTID UUID {TOKEN}") == ["250 2.0.0 OK"]
        assert self.cmd(f"AUTH PLAIN {plain()}") == [AUTH_OK]

    def envelope(self, *recipients: str) -> None:
        assert self.cmd(f"MAIL FROM:<{USER}>") == ["250 2.1.0 Ok"]
        for recipient in recipients or (RECIPIENT,):
            assert self.cmd(f"RCPT TO:<{recipient}>") == ["250 2.1.5 Ok"]
        assert self.cmd("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]

    def disconnect(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


def message(body: str = "Hello.", author: str = USER) -> bytes:
    return f"From: {author}\r\nTo: {RECIPIENT}\r\nSubject: units\r\n\r\n{body}\r\n.\r\n".encode()


@pytest.fixture
def session() -> Session:
    return Session()


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    """The protocol's log events while the test runs."""
    events: list[dict[str, Any]] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "clientid_mta.smtp.protocol":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


ERROR_LEVELS = (LogLevel.error, LogLevel.critical)


def errors(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["log_level"] in ERROR_LEVELS]


# --- greeting and EHLO (S14, S1, S3, C1, C2) -------------------------------------------------


def test_S14_greeting_names_the_host_and_no_software(session: Session) -> None:
    assert session.greeting == [f"220 {HOST} ESMTP"]


def test_S1_S3_C1_plaintext_ehlo_offers_starttls_and_neither_auth_nor_clientid(
    session: Session,
) -> None:
    assert session.cmd("EHLO client.example") == EHLO_PLAINTEXT


def test_C1_C2_ehlo_after_starttls_offers_auth_and_clientid_without_pipelining(
    session: Session,
) -> None:
    session.starttls()
    assert session.cmd("EHLO client.example") == EHLO_TLS


def test_C2_the_pipelining_switch_advertises_it_with_clientid() -> None:
    session = Session(make_config(clientid={"pipelining": True}), implicit=True)
    assert "250-PIPELINING" in session.cmd("EHLO client.example")


def test_C1_clientid_not_advertised_when_disabled() -> None:
    session = Session(make_config(clientid={"enabled": False}), implicit=True)
    lines = session.cmd("EHLO client.example")
    assert "250 CLIENTID" not in lines and "250-PIPELINING" in lines


def test_S1_implicit_tls_advertises_no_starttls_and_refuses_it() -> None:
    session = Session(implicit=True)
    assert session.cmd("EHLO client.example") == EHLO_TLS
    assert session.cmd("STARTTLS") == ["503 5.5.1 TLS already active"]


def test_S1_no_tls_context_means_no_starttls() -> None:
    session = Session(tls_context=None)
    assert "250 STARTTLS" not in session.cmd("EHLO client.example")
    assert session.cmd("STARTTLS") == ["454 4.7.0 TLS not available"]


def test_ehlo_and_helo_need_a_name(session: Session) -> None:
    assert session.cmd("EHLO") == ["501 5.5.4 Syntax: EHLO hostname"]
    assert session.cmd("HELO bad\x01name") == ["501 5.5.4 Syntax: HELO hostname"]
    assert session.cmd("HELO client.example") == [f"250 {HOST}"]


# --- STARTTLS (S2) ---------------------------------------------------------------------------


def test_S2_plaintext_pipelined_after_starttls_is_discarded(session: Session) -> None:
    replies = session.send(b"STARTTLS\r\nEHLO client.example\r\nAUTH PLAIN " + b"x" * 8 + b"\r\n")
    assert replies == ["220 2.0.0 Ready to start TLS"]
    assert session.cmd("MAIL FROM:<a@example.org>") == ["503 5.5.1 Send EHLO first"]


def test_S2_starttls_resets_the_greeting(session: Session) -> None:
    session.cmd("EHLO client.example")
    session.starttls()
    assert session.cmd(f"AUTH PLAIN {plain()}") == ["503 5.5.1 Send EHLO first"]


def test_S2_starttls_syntax_and_repeat(session: Session) -> None:
    assert session.cmd("STARTTLS now") == ["501 5.5.4 Syntax: STARTTLS"]
    session.starttls()
    assert session.cmd("STARTTLS") == ["503 5.5.1 TLS already active"]


# --- CLIENTID (C3..C11) ----------------------------------------------------------------------


def test_C3_clientid_before_tls_is_an_unknown_command_and_help_hides_it(session: Session) -> None:
    session.cmd("EHLO client.example")
    assert session.cmd(f"CLIENTID UUID {TOKEN}") == ["500 5.5.1 Command unrecognized"]
    [help_line] = session.cmd("HELP")
    assert help_line.startswith("214 2.0.0") and "CLIENTID" not in help_line
    session.starttls()
    assert "CLIENTID" in session.cmd("HELP")[0]


def test_C4_clientid_needs_the_ehlo_that_advertised_it(session: Session) -> None:
    session.starttls()
    assert session.cmd(f"CLIENTID UUID {TOKEN}") == ["503 5.5.1 Send EHLO first"]
    session.cmd("HELO client.example")
    assert session.cmd(f"CLIENTID UUID {TOKEN}") == ["503 5.5.1 Send EHLO first"]


@pytest.mark.parametrize(
    ("arguments", "reply"),
    [
        ("", "501 5.5.4 CLIENTID takes exactly two arguments: type and token"),
        ("UUID", "501 5.5.4 CLIENTID takes exactly two arguments: type and token"),
        (f"UUID {TOKEN} extra", "501 5.5.4 CLIENTID takes exactly two arguments: type and token"),
        (f"{'T' * 17} {TOKEN}", "501 5.5.4 client-id-type must be 1-16 letters, digits or dashes"),
        (
            f"UUID {'t' * 129}",
            "501 5.5.4 client-id-token must be 1-128 printable ASCII characters",
        ),
    ],
)
def test_C5_malformed_clientid_is_501(arguments: str, reply: str) -> None:
    session = Session(implicit=True)
    session.cmd("EHLO client.example")
    assert session.cmd(f"CLIENTID {arguments}".rstrip()) == [reply]


def test_C6_C9_clientid_once_per_greeting(session: Session) -> None:
    session.starttls()
    session.cmd("EHLO client.example")
    assert session.cmd(f"clientid uuid {TOKEN}") == ["250 2.0.0 OK"]  # C9, C13: any case
    assert session.cmd(f"CLIENTID UUID {TOKEN}") == ["503 5.5.1 CLIENTID already given"]


def test_C7_clientid_after_an_auth_attempt_is_503(session: Session) -> None:
    session.starttls()
    session.cmd("EHLO client.example")
    assert session.cmd(f"AUTH PLAIN {plain(password='wrong')}") == [AUTH_REFUSED]
    assert session.cmd(f"CLIENTID UUID {TOKEN}") == ["503 5.5.1 CLIENTID must come before AUTH"]


def test_C7_C8_clientid_inside_a_transaction_is_503(session: Session) -> None:
    session.login(clientid=False)
    session.cmd(f"MAIL FROM:<{USER}>")
    assert session.cmd(f"CLIENTID UUID {TOKEN}") == ["503 5.5.1 CLIENTID must come before AUTH"]


def test_C10_ehlo_discards_the_identity_and_rset_keeps_it(session: Session) -> None:
    session.starttls()
    session.cmd("EHLO client.example")
    session.cmd(f"CLIENTID UUID {TOKEN}")
    assert session.cmd("RSET") == [OK]
    session.cmd(f"AUTH PLAIN {plain(password='wrong')}")
    session.cmd("EHLO client.example")
    session.cmd(f"AUTH PLAIN {plain(password='wrong')}")
    first, second = session.portal.seen
    assert first.clientId is not None and first.clientId.token == TOKEN
    assert second.clientId is None


def test_C11_a_failed_auth_keeps_the_identity_for_the_retry(session: Session) -> None:
    session.starttls()
    session.cmd("EHLO client.example")
    session.cmd(f"CLIENTID UUID {TOKEN}")
    assert session.cmd(f"AUTH PLAIN {plain(password='wrong')}") == [AUTH_REFUSED]
    assert session.cmd(f"AUTH PLAIN {plain()}") == [AUTH_OK]
    assert [c.clientId for c in session.portal.seen] == [session.portal.seen[0].clientId] * 2
    assert session.portal.seen[0].clientId is not None


def test_C14_the_token_is_never_echoed(session: Session, logged: list[dict[str, Any]]) -> None:
    session.starttls()
    session.cmd("EHLO client.example")
    replies = session.cmd(f"CLIENTID UUID {TOKEN}")
    replies += session.cmd(f"CLIENTID UUID {TOKEN} {TOKEN}")
    replies += session.cmd(f"AUTH PLAIN {plain()}")
    replies += session.cmd(f"CLIENTID UUID {TOKEN}")
    session.envelope()
    replies += session.send(message())
    assert len(replies) == 5 and TOKEN not in "\n".join(replies)
    assert TOKEN not in repr(logged)
    assert all(TOKEN.encode() not in line for line in session.delivery.messages[0].lines)


# --- AUTH (S3, S4, C12) ----------------------------------------------------------------------


def test_S3_auth_and_mail_before_tls_are_530(session: Session) -> None:
    session.cmd("EHLO client.example")
    need_tls = ["530 5.7.0 Must issue a STARTTLS command first"]
    assert session.cmd(f"AUTH PLAIN {plain()}") == need_tls
    assert session.cmd(f"MAIL FROM:<{USER}>") == need_tls


def test_S4_auth_plain_with_a_continuation(session: Session) -> None:
    session.starttls()
    session.cmd("EHLO client.example")
    assert session.cmd("AUTH PLAIN") == ["334 "]
    assert session.cmd(plain()) == [AUTH_OK]
    assert session.cmd("AUTH PLAIN") == ["503 5.5.1 Already authenticated"]


def test_S4_auth_login_asks_for_the_user_then_the_password(session: Session) -> None:
    session.starttls()
    session.cmd("EHLO client.example")
    assert session.cmd("AUTH LOGIN") == ["334 VXNlcm5hbWU6"]
    assert session.cmd(b64(USER)) == ["334 UGFzc3dvcmQ6"]
    assert session.cmd(b64(PASSWORD)) == [AUTH_OK]


def test_S4_auth_login_with_the_user_as_initial_response(session: Session) -> None:
    session.starttls()
    session.cmd("EHLO client.example")
    assert session.cmd(f"AUTH LOGIN {b64(USER)}") == ["334 UGFzc3dvcmQ6"]
    assert session.cmd(b64(PASSWORD)) == [AUTH_OK]


@pytest.mark.parametrize(
    ("lines", "reply"),
    [
        (["AUTH PLAIN", "*"], "501 5.0.0 Authentication aborted"),
        (["AUTH PLAIN !!!"], "501 5.5.2 Cannot decode response"),
        ([f"AUTH PLAIN {b64('no-nul-here')}"], "501 5.5.2 Malformed PLAIN response"),
        (["AUTH LOGIN", "*"], "501 5.0.0 Authentication aborted"),
        (["AUTH CRAM-MD5"], "504 5.5.4 Unrecognized authentication type"),
        (["AUTH"], "501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
        (["AUTH PLAIN a b"], "501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
    ],
)
def test_S4_every_malformed_auth_gets_a_reply_and_the_session_goes_on(
    session: Session, lines: list[str], reply: str
) -> None:
    session.starttls()
    session.cmd("EHLO client.example")
    for line in lines[:-1]:
        assert session.cmd(line)[0].startswith("334")
    assert session.cmd(lines[-1]) == [reply]
    assert session.cmd(f"AUTH PLAIN {plain()}") == [AUTH_OK]


@pytest.mark.parametrize("refusal", ["password", "unknown user", "unhandled", "acting for other"])
def test_C12_every_refusal_is_the_same_535(session: Session, refusal: str) -> None:
    session.starttls()
    session.cmd("EHLO client.example")
    session.cmd(f"CLIENTID UUID {TOKEN}")
    response = {
        "password": plain(password="wrong"),
        "unknown user": plain(user="nobody@example.org"),
        "unhandled": plain(),
        "acting for other": plain(authzid="bob@example.org"),
    }[refusal]
    if refusal == "unhandled":
        session.portal.outcome = "unhandled"
    assert session.cmd(f"AUTH PLAIN {response}") == [AUTH_REFUSED]


def test_S13_the_third_refusal_closes_the_session(session: Session) -> None:
    session.starttls()
    session.cmd("EHLO client.example")
    for n in range(2):  # other credentials each time: a retry of the same ones counts once
        assert session.cmd(f"AUTH PLAIN {plain(password=f'wrong-{n}')}") == [AUTH_REFUSED]
    assert session.cmd(f"AUTH PLAIN {plain(password='wrong-2')}") == [
        AUTH_REFUSED,
        f"421 4.7.0 {HOST} Error: too many failed authentications",
    ]
    assert session.transport.disconnecting


@pytest.mark.parametrize(
    ("outcome", "reply"),
    [
        ("throttled", "454 4.7.0 Too many failed logins, try again later"),
        ("unavailable", "454 4.7.0 Temporary authentication failure"),
    ],
)
def test_throttled_or_unavailable_login_is_454(session: Session, outcome: str, reply: str) -> None:
    session.starttls()
    session.cmd("EHLO client.example")
    session.portal.outcome = outcome
    assert session.cmd(f"AUTH PLAIN {plain()}") == [reply]
    assert not session.transport.disconnecting


def test_no_portal_is_454() -> None:
    session = Session(with_portal=False, implicit=True)
    session.cmd("EHLO client.example")
    assert session.cmd(f"AUTH PLAIN {plain()}") == ["454 4.7.0 Temporary authentication failure"]


# --- pipelining: one command at a time (S9) --------------------------------------------------


def test_S9_input_waits_while_the_login_runs(session: Session) -> None:
    session.starttls()
    session.cmd("EHLO client.example")
    session.portal.outcome = "pending"
    assert session.send(f"AUTH PLAIN {plain()}\r\nNOOP\r\n".encode()) == []
    assert session.transport.producerState == "paused"
    session.portal.pending[0].callback(session.portal.avatar())
    assert session.take() == [AUTH_OK, OK]
    assert session.transport.producerState == "producing"


def test_S9_S11_end_of_data_replies_only_once_stored_and_before_the_next_command(
    session: Session,
) -> None:
    session.login()
    session.delivery.eom[RECIPIENT] = "pending"
    session.envelope()
    assert session.send(message() + b"NOOP\r\n") == []
    [stored] = session.delivery.messages
    assert stored.pending is not None
    stored.pending.callback(None)
    queued, noop = session.take()
    assert queued.startswith("250 2.0.0 Ok: queued as ") and noop == OK


# --- the mail transaction (S5, S6, S7, S10, S11, S15) -----------------------------------------


def test_S5_mail_without_auth_is_530(session: Session) -> None:
    session.starttls()
    assert session.cmd(f"MAIL FROM:<{USER}>") == ["503 5.5.1 Send EHLO first"]
    session.cmd("EHLO client.example")
    assert session.cmd(f"MAIL FROM:<{USER}>") == ["530 5.7.0 Authentication required"]


def test_a_message_is_stored_with_our_received_header_and_unstuffed_dots(session: Session) -> None:
    session.login()
    session.envelope()
    [reply] = session.send(message(body="..leading dot\r\nlast"))
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    [stored] = session.delivery.messages
    assert stored.stored and not stored.open and stored.discarded == 0
    received = b"\n".join(stored.lines[:4])
    assert received.startswith(b"Received: from client.example\n\tby mx.example.org with ESMTPSA")
    assert f"for <{RECIPIENT}>".encode() in received and b"192.168" not in received  # S15
    assert stored.body == [
        f"From: {USER}".encode(),
        f"To: {RECIPIENT}".encode(),
        b"Subject: units",
        b"",
        b".leading dot",
        b"last",
    ]


def test_transaction_order_is_checked(session: Session) -> None:
    session.login()
    assert session.cmd(f"RCPT TO:<{RECIPIENT}>") == ["503 5.5.1 Need MAIL command"]
    assert session.cmd("DATA") == ["503 5.5.1 Need MAIL command"]
    session.cmd(f"MAIL FROM:<{USER}>")
    assert session.cmd(f"MAIL FROM:<{USER}>") == ["503 5.5.1 Nested MAIL command"]
    assert session.cmd("DATA") == ["503 5.5.1 Need RCPT command"]
    [syntax] = session.cmd("RCPT TO:bob")
    assert syntax.startswith("501 5.5.4 Syntax: RCPT TO:<address>")


def test_S6_from_header_not_owned_is_550_and_the_copy_discarded(session: Session) -> None:
    session.login()
    session.envelope()
    assert session.send(message(author="mallory@example.org")) == [
        "550 5.7.1 From:/Sender: header address not owned by you"
    ]
    [refused] = session.delivery.messages
    assert refused.discarded == 1 and not refused.stored


def test_S7_size_over_the_limit_is_552_before_and_after_data() -> None:
    session = Session(make_config(max_message_size=100))
    session.login()
    assert session.cmd(f"MAIL FROM:<{USER}> SIZE=101") == [
        "552 5.3.4 Message size exceeds fixed maximum message size"
    ]
    session.envelope()
    assert session.send(message(body="x" * 80)) == [
        "552 5.3.4 Message size exceeds fixed maximum message size"
    ]
    assert session.delivery.messages[0].discarded == 1


def test_S10_bare_lf_in_the_body_is_550_and_never_ends_the_data(session: Session) -> None:
    session.login()
    session.envelope()
    assert session.send(b"Subject: x\r\n\r\nline\n.\nRSET\r\n") == []  # still in DATA
    assert session.send(b".\r\n") == ["550 5.6.0 Bare CR or LF in message; use CRLF line endings"]
    [refused] = session.delivery.messages
    assert refused.discarded == 1 and not refused.stored


def test_S11_a_failed_store_is_451_and_the_copy_discarded(session: Session) -> None:
    session.login()
    session.delivery.eom[RECIPIENT] = "fail"
    session.envelope()
    assert session.send(message()) == [LOCAL_ERROR]
    [failed] = session.delivery.messages
    assert failed.discarded == 1 and not failed.stored


def test_S12_simple_commands(session: Session) -> None:
    assert session.cmd("NOOP") == [OK]
    assert session.cmd("RSET") == [OK]
    assert session.cmd("VRFY bob") == [
        "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery"
    ]
    assert session.cmd("EXPN list") == ["502 5.5.1 EXPN not available"]
    assert session.cmd("QUIT") == [f"221 2.0.0 {HOST} closing connection"]
    assert session.transport.disconnecting


# --- bounded input (S8, S13) -----------------------------------------------------------------


def test_S8_a_command_line_over_512_octets_is_500_and_the_session_goes_on(
    session: Session,
) -> None:
    assert session.cmd("NOOP " + "x" * 505) == [OK]  # 510 octets: the limit
    assert session.cmd("NOOP " + "x" * 506) == ["500 5.5.2 Line too long"]
    assert session.cmd("NOOP") == [OK]


def test_S8_an_endless_line_is_answered_once_and_never_buffered(session: Session) -> None:
    replies = []
    for _ in range(64):
        replies += session.send(b"x" * 16384)
        assert len(session.protocol._inbuf) <= 1024
    assert replies == ["500 5.5.2 Line too long"]
    assert session.send(b"\r\nNOOP\r\n") == [OK]


def test_S13_too_many_errors_closes_the_session() -> None:
    session = Session(make_config(max_errors=3))
    assert session.cmd("BOGUS") == ["500 5.5.1 Command unrecognized"]
    assert session.cmd("BOGUS") == ["500 5.5.1 Command unrecognized"]
    assert session.cmd("BOGUS") == [
        "500 5.5.1 Command unrecognized",
        f"421 4.7.0 {HOST} Error: too many errors",
    ]
    assert session.transport.disconnecting
    assert session.cmd("NOOP") == []  # nothing is read after the close


# --- timers: all on the factory's clock (S13) ------------------------------------------------


def test_S13_idle_timeout_on_the_injected_clock(session: Session) -> None:
    timeout = session.config.limits.command_timeout
    session.clock.advance(timeout - 1)
    assert session.cmd("NOOP") == [OK]  # a complete command restarts the timer
    session.clock.advance(timeout - 1)
    assert session.take() == []
    session.clock.advance(1)
    assert session.take() == [f"421 4.4.2 {HOST} Error: timeout exceeded"]
    assert session.transport.disconnecting and not session.transport.aborted


def test_S13_a_command_dribbled_byte_by_byte_still_times_out(session: Session) -> None:
    timeout = session.config.limits.command_timeout
    for byte in b"NOOP":
        session.send(bytes([byte]))
        session.clock.advance(timeout / 5)
    session.clock.advance(timeout / 5)
    assert session.take() == [f"421 4.4.2 {HOST} Error: timeout exceeded"]


def test_S13_closing_over_tls_aborts_after_the_grace(session: Session) -> None:
    session.starttls()
    session.cmd("QUIT")
    assert session.transport.disconnecting and not session.transport.aborted
    session.clock.advance(CLOSE_GRACE)
    assert session.transport.aborted


def test_S13_idle_data_times_out_on_the_data_timeout_and_nothing_is_stored(
    session: Session,
) -> None:
    session.login()
    session.envelope()
    limits = session.config.limits
    session.send(b"Subject: x\r\n")
    session.clock.advance(limits.command_timeout + 1)  # DATA has its own, longer timeout
    assert session.take() == []
    session.clock.advance(limits.data_timeout - limits.command_timeout - 1)
    assert session.take() == [f"421 4.4.2 {HOST} Error: timeout exceeded"]
    session.disconnect()
    [message_] = session.delivery.messages
    assert message_.discarded == 1 and not message_.stored


# --- disconnects -----------------------------------------------------------------------------


def test_disconnect_mid_data_discards_every_message_and_logs_out(session: Session) -> None:
    session.login()
    session.envelope(RECIPIENT, OTHER_RECIPIENT)
    session.send(b"Subject: x\r\n\r\npart of the body\r\n")
    session.disconnect()
    messages = session.delivery.messages
    assert len(messages) == 2
    assert all(m.discarded == 1 and not m.stored and not m.open for m in messages)
    assert session.portal.logouts == 1


def test_disconnect_while_storing_keeps_what_is_stored(session: Session) -> None:
    session.login()
    session.delivery.eom[RECIPIENT] = "pending"
    session.envelope()
    session.send(message())
    session.disconnect()
    [stored] = session.delivery.messages
    assert stored.pending is not None
    stored.pending.callback(None)
    assert stored.stored and stored.discarded == 0
    assert session.take() == []  # nobody to answer


# --- H3: the end of data never goes without a reply ------------------------------------------


def _end_of_data_raises(
    session: Session, where: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, bytes]:
    """Make one part of the end-of-data handling raise RecursionError; the expected reply."""
    if where == "eomReceived":
        for recipient in (RECIPIENT, OTHER_RECIPIENT):
            session.delivery.eom[recipient] = RecursionError("maximum recursion depth exceeded")
        return LOCAL_ERROR, message()
    if where == "header check":
        session.delivery.header_check_raises = RecursionError("maximum recursion depth exceeded")
        return LOCAL_ERROR, message()

    def unreadable(self: HeaderScanner) -> list[str] | None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(HeaderScanner, "author_addresses", unreadable)
    return "550 5.6.0 Malformed From: header", message()


@pytest.mark.parametrize("where", ["eomReceived", "header check", "From: parser"])
def test_h3_end_of_data_exception_gets_reply_and_aborts(
    session: Session,
    where: str,
    monkeypatch: pytest.MonkeyPatch,
    logged: list[dict[str, Any]],
) -> None:
    session.login()
    reply, data = _end_of_data_raises(session, where, monkeypatch)
    session.envelope(RECIPIENT, OTHER_RECIPIENT)
    logged.clear()
    assert session.send(data) == [reply]
    messages = session.delivery.messages
    assert len(messages) == 2
    assert all(m.discarded == 1 and not m.open and not m.stored for m in messages)
    problems = [e for e in logged if e["log_level"] in (LogLevel.warn, *ERROR_LEVELS)]
    assert len(problems) == 1, problems  # one line for the message, not one per recipient
    assert "log_failure" not in problems[0]  # and no traceback
    assert session.cmd("NOOP") == [OK]  # the session goes on


def test_h3_from_header_of_8000_parentheses_is_refused_with_a_reply(session: Session) -> None:
    session.login()
    session.envelope()
    data = b"From: " + b"(" * 8000 + b"\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
    [reply] = session.send(data)
    # Whichever way the header parser refuses it, the refusal is a reply, not a drop.
    assert reply.startswith("550 5.")
    [refused] = session.delivery.messages
    assert refused.discarded == 1 and not refused.open
    assert session.cmd("NOOP") == [OK]


def test_h3_one_store_raising_does_not_lose_the_others_reply(
    session: Session, logged: list[dict[str, Any]]
) -> None:
    session.login()
    session.delivery.eom[OTHER_RECIPIENT] = Trouble("store broke")
    session.envelope(RECIPIENT, OTHER_RECIPIENT)
    assert session.send(message()) == [LOCAL_ERROR]
    stored, broken = session.delivery.messages
    assert stored.stored and stored.discarded == 0
    assert broken.discarded == 1 and not broken.open
    assert len(errors(logged)) == 1 and "log_failure" not in errors(logged)[0]


def test_h3_a_store_raising_mid_body_is_451_at_the_end_of_data(
    session: Session, logged: list[dict[str, Any]]
) -> None:
    session.login()
    session.delivery.write_raises = OSError(5, "Input/output error")
    session.envelope(RECIPIENT, OTHER_RECIPIENT)
    body = "\r\n".join(f"line {n}" for n in range(50))
    assert session.send(message(body=body)) == [LOCAL_ERROR]
    assert all(m.discarded and not m.open and not m.stored for m in session.delivery.messages)
    assert len(errors(logged)) == 1 and "log_failure" not in errors(logged)[0]
    session.delivery.write_raises = None
    session.envelope()
    assert session.send(message())[0].startswith("250 2.0.0 Ok: queued as ")


# --- how the package uses Twisted ------------------------------------------------------------

PACKAGE = Path(clientid_mta.__file__).resolve().parent
MODULES = sorted(PACKAGE.rglob("*.py"))
TWISTED = Path(twisted.__file__).resolve().parent


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(
        ".__init__"
    )


@functools.cache
def _twisted_private_names() -> frozenset[str]:
    """Every ``._name`` Twisted's own source uses: its private attributes."""
    names: set[str] = set()
    for source in TWISTED.rglob("*.py"):
        if "test" not in source.relative_to(TWISTED).parts:
            names.update(re.findall(r"\._([A-Za-z]\w*)", source.read_text("utf-8", "replace")))
    return frozenset(f"_{name}" for name in names)


def _private_names_of(cls: type) -> set[str]:
    """The ``self._name`` attributes the Twisted classes in ``cls``'s MRO use."""
    names: set[str] = set()
    for base in cls.__mro__:
        if base.__module__.split(".")[0] == "twisted":
            try:
                source = inspect.getsource(base)
            except (OSError, TypeError):
                continue
            names.update(re.findall(r"self\.(_[A-Za-z]\w*)", source))
    return names


def _twisted_private_uses(path: Path) -> list[str]:
    """``._name`` uses that reach into a Twisted object: on another object (``x._name``
    with a name Twisted uses), or on ``self`` where a Twisted base class owns ``_name``."""
    tree = ast.parse(path.read_text("utf-8"))
    module = importlib.import_module(_module_name(path))
    twisted_names = _twisted_private_names()
    uses = []
    for cls_node in [n for n in tree.body if isinstance(n, ast.ClassDef)]:
        cls = getattr(module, cls_node.name)
        inherited = _private_names_of(cls) if isinstance(cls, type) else set()
        for node in ast.walk(cls_node):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "self" and node.attr in inherited:
                    uses.append(f"{path.name}:{node.lineno}: self.{node.attr} (Twisted's)")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in twisted_names
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            uses.append(f"{path.name}:{node.lineno}: .{node.attr}")
    return uses


@pytest.mark.parametrize(
    "path",
    [path for path in MODULES],
    ids=lambda path: path.relative_to(PACKAGE).as_posix(),
)
def test_no_private_attribute_of_twisted_is_used(path: Path) -> None:
    assert _twisted_private_uses(path) == []


@pytest.mark.parametrize(
    "path",
    [p for p in MODULES if p.relative_to(PACKAGE).parts[0] in ("smtp", "client")],
    ids=lambda path: path.relative_to(PACKAGE).as_posix(),
)
def test_the_wire_and_the_client_import_no_global_reactor_at_module_level(path: Path) -> None:
    """Their clocks are injected; the global reactor is only a default, imported late."""
    tree = ast.parse(path.read_text("utf-8"))
    imported = [
        alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module == "twisted.internet"
        for alias in node.names
    ] + [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
    assert "reactor" not in imported and "twisted.internet.reactor" not in imported
