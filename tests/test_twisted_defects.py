"""The defects of Twisted 26.10's stock ``twisted.mail.smtp.ESMTP``, the reason SubmissionESMTP is a
protocol of its own rather than a subclass of it (docs/architecture.md, "The Twisted defects we
override").

Each defect has ONE check: a function that drives a server over a real socket and says whether
the server behaved as docs/conformance.md requires. Every check runs twice:

- ``test_defect_fixed``: against our server (the harness's ``server`` fixture), it passes;
- ``test_defect_present_in_stock_twisted``: against a stock ``smtp.ESMTP`` on the same reactor,
  with the same certificate, it reports failure. A crash, a hang or a dropped connection counts
  as a failure of the server.

A check distinguishes the step under test from its set-up: when a set-up step goes wrong (the
stock fixture could not even log in, say) the test errors instead of "proving" the defect.
Enhanced status codes are required where docs/conformance.md gives them, and only from a server that
advertised ENHANCEDSTATUSCODES in its last EHLO (RFC 2034), so both servers face the same check.
"""

from __future__ import annotations

import base64
import errno
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IAddress
from twisted.mail import smtp
from twisted.mail.imap4 import PLAINCredentials
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from clientid_mta.smtp.tls import server_context
from tests.conftest import HOSTNAME, RunningServer, ServerReads, Wire
from tests.typed_reactor import blockingCallFromThread, reactor

USER, PASSWORD = "alice@example.org", "alice-password"
RECIPIENT = "bob@example.org"
REPLY_TIMEOUT = 5.0  # a reply slower than this counts as a hang
STARTTLS_TIMEOUT = 2.0  # S1: the refusal of STARTTLS on implicit TLS is immediate
STOCK_CHECK_DELAY = 0.3  # the stock checker answers late, like our threaded password check
MESSAGE = f"From: {USER}\r\nTo: {RECIPIENT}\r\nSubject: defects\r\n\r\nHello.\r\n".encode()

Reply = tuple[int, list[str]]
Expected = tuple[int, str]  # (reply code, enhanced status code, "" where the row gives none)


def plain_token(user: str = USER, password: str = PASSWORD) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def _show(data: bytes) -> str:
    return repr(data) if len(data) <= 80 else f"{data[:40]!r}...<{len(data)} bytes>"


class Misbehaved(Exception):
    """The server did not do what docs/conformance.md requires at the step under test."""


class SetupFailed(Exception):
    """A step before the one under test went wrong: the check cannot tell anything."""


# --- the client side: one server under test, and sessions with it --------------------------------


@dataclass
class Target:
    """A server under test, as the checks see it (Wire needs port, tls_port and ssl_context)."""

    port: int
    tls_port: int
    cafile: Path
    break_mailbox: Callable[[str], None]  # make delivery to an address fail temporarily
    reads: ServerReads  # what the server has read of each connection
    transcript: list[str] = field(default_factory=list)

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.cafile))
        context.check_hostname = True
        return context

    @contextmanager
    def connect(self, implicit: bool = False) -> Iterator[Session]:
        self.transcript.append(
            f"-- connect to the {'implicit TLS' if implicit else 'STARTTLS'} port"
        )
        try:
            wire = Wire(cast(RunningServer, self), implicit=implicit, timeout=REPLY_TIMEOUT)
        except (OSError, ValueError) as problem:
            raise SetupFailed(f"no greeting: {problem!r}") from problem
        session = Session(self, wire)
        session.log(f"S: {wire.greeting}")
        try:
            yield session
        finally:
            wire.close()


class Session:
    """A line-level SMTP session that records a transcript and checks replies."""

    def __init__(self, target: Target, wire: Wire) -> None:
        self.target = target
        self.wire = wire
        self.enhanced = False  # the last EHLO advertised ENHANCEDSTATUSCODES

    def log(self, text: str) -> None:
        self.target.transcript.append(text)

    # -- raw exchange --

    def send(self, data: bytes) -> None:
        self.log(f"C: {_show(data)}")
        self.wire.send(data)

    def reply(self, timeout: float = REPLY_TIMEOUT) -> Reply:
        self.wire.sock.settimeout(timeout)
        try:
            reply = self.wire.reply()
        except (OSError, ValueError) as problem:  # closed, reset, timed out, bad reply line
            self.log(f"S: <{problem!r}>")
            raise Misbehaved(f"no reply: {problem!r}") from problem
        self.log(f"S: {reply}")
        return reply

    def cmd(self, line: str) -> Reply:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    # -- the step under test: a wrong answer is the server's fault --

    def expect_reply(self, *accepted: Expected, timeout: float = REPLY_TIMEOUT) -> Reply:
        reply = self.reply(timeout)
        if not any(self._matches(reply, expected) for expected in accepted):
            raise Misbehaved(f"expected one of {accepted}, got {reply}")
        return reply

    def expect(self, line: str, *accepted: Expected, timeout: float = REPLY_TIMEOUT) -> Reply:
        self.send(line.encode() + b"\r\n")
        return self.expect_reply(*accepted, timeout=timeout)

    def verify(self, condition: bool, problem: str) -> None:
        if not condition:
            self.log(f"!! {problem}")
            raise Misbehaved(problem)

    def _matches(self, reply: Reply, expected: Expected) -> bool:
        code, enhanced = expected
        if reply[0] != code:
            return False
        return not (self.enhanced and enhanced) or reply[1][-1].startswith(enhanced + " ")

    # -- set-up steps: a wrong answer means the check proves nothing --

    def setup_reply(self, code: int) -> Reply:
        try:
            reply = self.reply()
        except Misbehaved as problem:
            raise SetupFailed(str(problem)) from problem
        if reply[0] != code:
            raise SetupFailed(f"expected {code}, got {reply}")
        return reply

    def setup(self, line: str, code: int) -> Reply:
        self.send(line.encode() + b"\r\n")
        return self.setup_reply(code)

    def ehlo(self) -> set[str]:
        """EHLO; the keywords advertised."""
        _code, lines = self.setup("EHLO client.example.net", 250)
        keywords = {line.split()[0].upper() for line in lines[1:] if line.strip()}
        self.enhanced = "ENHANCEDSTATUSCODES" in keywords
        return keywords

    def handshake(self) -> None:
        """The client side of STARTTLS, after the 220."""
        try:
            self.wire.sock = self.target.ssl_context().wrap_socket(
                self.wire.sock, server_hostname="127.0.0.1"
            )
        except OSError as problem:
            raise SetupFailed(f"TLS handshake failed: {problem!r}") from problem
        self.enhanced = False  # RFC 3207 4.2: what the server advertised is forgotten
        self.log("-- TLS handshake done")

    def starttls(self) -> None:
        self.setup("STARTTLS", 220)
        self.handshake()

    def login(self) -> None:
        self.setup(f"AUTH PLAIN {plain_token()}", 235)

    def open_data(self, recipient: str = RECIPIENT) -> None:
        """An authenticated session's MAIL, RCPT and DATA, up to the 354."""
        self.setup(f"MAIL FROM:<{USER}>", 250)
        self.setup(f"RCPT TO:<{recipient}>", 250)
        self.setup("DATA", 354)


@contextmanager
def tls_session(target: Target) -> Iterator[Session]:
    """A session after EHLO, STARTTLS and a new EHLO."""
    with target.connect() as session:
        session.ehlo()
        session.starttls()
        session.ehlo()
        yield session


# --- the checks ----------------------------------------------------------------------------------


def check_starttls_injection(target: Target) -> None:
    """S2: plaintext pipelined after STARTTLS is discarded, never executed inside TLS."""
    with target.connect() as session:
        session.ehlo()
        session.send(b"STARTTLS\r\nRSET\r\n")
        session.setup_reply(220)
        session.handshake()
        # The first reply inside TLS must answer the client's own first command.
        session.expect("QUIT", (221, ""))


def check_starttls_no_state_reset(target: Target) -> None:
    """S2: STARTTLS forgets AUTH and the open transaction (RFC 3207 4.2)."""
    with target.connect() as session:
        session.ehlo()
        session.cmd(f"AUTH PLAIN {plain_token()}")  # stock: 235; ours: 530 (S3)
        session.cmd(f"MAIL FROM:<{USER}>")
        session.starttls()
        # Before the new EHLO (which alone would clear a transaction in any server):
        session.expect(f"RCPT TO:<{RECIPIENT}>", (503, "5.5.1"), (530, "5.7.0"))
        session.ehlo()
        session.expect(f"MAIL FROM:<{USER}>", (530, "5.7.0"))


def check_implicit_tls_starttls_hang(target: Target) -> None:
    """S1: on the implicit-TLS port STARTTLS is not advertised and answers 503 at once."""
    with target.connect(implicit=True) as session:
        keywords = session.ehlo()
        session.expect("STARTTLS", (503, ""), timeout=STARTTLS_TIMEOUT)
        session.expect("RSET", (250, ""))
        session.verify("STARTTLS" not in keywords, "STARTTLS advertised on implicit TLS")


def malformed_auth(line: str) -> Callable[[Target], None]:
    """S4: a malformed AUTH gets a reply (501) and leaves a usable connection."""

    def check(target: Target) -> None:
        with tls_session(target) as session:
            session.expect(line, (501, ""))
            session.expect("RSET", (250, ""))  # stock Twisted has no NOOP: RSET is the probe

    return check


def check_auth_before_tls(target: Target) -> None:
    """S3: AUTH is neither advertised nor accepted before STARTTLS."""
    with target.connect() as session:
        session.verify("AUTH" not in session.ehlo(), "AUTH advertised before TLS")
        session.expect(f"AUTH PLAIN {plain_token()}", (530, "5.7.0"))


def check_unbounded_line(target: Target) -> None:
    """S8: a 100 KB command line gets one 500 and is skipped; the connection stays usable."""
    with target.connect() as session:
        session.ehlo()
        session.send(b"X" * 100_000)
        session.send(b"\r\n")
        session.expect_reply((500, "5.5.2"))
        session.expect("RSET", (250, ""))


def check_body_reread_as_commands(target: Target) -> None:
    """S8: a DATA line over the cap refuses the message after the final dot; the rest of the
    body is never executed as commands."""
    with tls_session(target) as session:
        session.login()
        session.open_data()
        first = MESSAGE + b"x" * 20_000 + b"\r\n"  # over our 8192 and Twisted's 16384
        read_before = target.reads.count(session.wire.sock)
        session.send(first)
        # The rest comes in a later read, as from any slow client.
        if not target.reads.wait(session.wire.sock, read_before + len(first)):
            raise Misbehaved("the server did not read the body line")
        session.send(b"RSET\r\n.\r\n")
        session.expect_reply((500, "5.5.2"))
        session.expect("QUIT", (221, ""))  # not the 250 of a body line run as RSET


def check_out_of_order_replies(target: Target) -> None:
    """S9: replies come in command order while a login is pending."""
    with tls_session(target) as session:
        session.send(f"AUTH PLAIN {plain_token()}\r\nRSET\r\n".encode())
        session.expect_reply((235, "2.7.0"))
        session.expect_reply((250, ""))


def check_temporary_failure_is_451(target: Target) -> None:
    """S11: a temporary failure at end of data (disk full, I/O error) is 451 4.3.0, not 550."""
    target.break_mailbox(RECIPIENT)
    with tls_session(target) as session:
        session.login()
        session.open_data()
        session.send(MESSAGE + b".\r\n")
        session.expect_reply((451, "4.3.0"))


CHECKS: dict[str, Callable[[Target], None]] = {
    "S2_starttls_injection": check_starttls_injection,
    "S2_starttls_no_state_reset": check_starttls_no_state_reset,
    "S1_implicit_tls_starttls_hang": check_implicit_tls_starttls_hang,
    "S4_malformed_auth_bad_base64": malformed_auth("AUTH PLAIN %%%%"),
    "S4_malformed_auth_no_nuls": malformed_auth(
        "AUTH PLAIN " + base64.b64encode(f"{USER}{PASSWORD}".encode()).decode()
    ),
    "S4_malformed_auth_no_mechanism": malformed_auth("AUTH"),
    "S3_auth_before_tls": check_auth_before_tls,
    "S8_unbounded_line": check_unbounded_line,
    "S8_body_reread_as_commands": check_body_reread_as_commands,
    "S9_out_of_order_replies": check_out_of_order_replies,
    "S11_temporary_failure_is_550": check_temporary_failure_is_451,
}


def behaves_correctly(check: Callable[[Target], None], target: Target) -> bool:
    """Run one check: True if the server did what docs/conformance.md requires.

    SetupFailed propagates: the test errors rather than pass on a check that could not run.
    """
    try:
        check(target)
    except Misbehaved:
        return False
    return True


# --- the two servers -----------------------------------------------------------------------------


def break_maildir(server: RunningServer, address: str) -> None:
    """Make the account's ``new/`` a regular file: the Maildir opens and takes the message, and
    the rename into ``new/`` at end of data fails with ENOTDIR (root ignores permissions)."""
    localpart, _, domain = address.partition("@")
    maildir = server.config.delivery.maildir_root / domain / localpart
    for folder in ("tmp", "cur"):
        (maildir / folder).mkdir(parents=True, exist_ok=True)
    (maildir / "new").write_bytes(b"")


@implementer(IMessageSMTP)
class MemoryMessage:
    def __init__(self, mailbox: list[bytes], broken: bool) -> None:
        self.mailbox = mailbox
        self.broken = broken
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> defer.Deferred[None]:
        if self.broken:
            return defer.fail(OSError(errno.ENOSPC, "No space left on device"))
        self.mailbox.append(b"\n".join(self.lines))
        return defer.succeed(None)

    def connectionLost(self) -> None:
        self.lines.clear()


@implementer(IMessageDelivery)
@dataclass
class MemoryDelivery:
    """Accepts any sender and recipient; keeps messages in memory."""

    mailboxes: dict[str, list[bytes]] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)

    def receivedHeader(self, helo: object, origin: object, recipients: object) -> None:
        return None

    def validateFrom(self, helo: object, origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], IMessageSMTP]:
        address = str(user.dest)
        mailbox = self.mailboxes.setdefault(address, [])
        return lambda: MemoryMessage(mailbox, address in self.broken)

    def break_mailbox(self, address: str) -> None:
        self.broken.add(address)


@implementer(IRealm)
@dataclass
class MemoryRealm:
    delivery: MemoryDelivery

    def requestAvatar(self, avatarId: bytes | tuple[()], mind: object, *interfaces: Any) -> Any:
        if IMessageDelivery not in interfaces:
            raise NotImplementedError("only IMessageDelivery")
        return IMessageDelivery, self.delivery, lambda: None


@implementer(ICredentialsChecker)
class SlowChecker:
    """The in-memory checker, answering after a delay like a password hash in a thread."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, delay: float, **users: bytes) -> None:
        self.delay = delay
        self.inner = InMemoryUsernamePasswordDatabaseDontUse(**users)

    def requestAvatarId(self, credentials: IUsernamePassword) -> defer.Deferred[bytes | tuple[()]]:
        return task.deferLater(reactor, self.delay, self.inner.requestAvatarId, credentials)


class StockFactory(protocol.ServerFactory):
    """Stock ``smtp.ESMTP`` sessions with AUTH PLAIN and STARTTLS, as Twisted documents them."""

    def __init__(self, portal: Portal, tls_context: Any) -> None:
        self.portal = portal
        self.tls_context = tls_context

    def buildProtocol(self, addr: IAddress | None) -> smtp.ESMTP:
        session = smtp.ESMTP(chal={b"PLAIN": PLAINCredentials}, contextFactory=self.tls_context)
        session.portal = self.portal  # type: ignore[assignment]  # typed None in Twisted
        session.host = HOSTNAME.encode()
        session.factory = self
        return session


@pytest.fixture
def ours(server: RunningServer, server_reads: ServerReads) -> Target:
    return Target(
        server.port,
        server.tls_port,
        server.cafile,
        lambda address: break_maildir(server, address),
        server_reads,
    )


@pytest.fixture
def stock(
    make_server: Callable[..., RunningServer], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Target]:
    """A stock ``smtp.ESMTP`` on both kinds of port, on the harness's reactor thread.

    It borrows the certificate a harness server generates (``make_server`` rather than
    ``server``: the accounts' password hashing would double the time of these tests). That
    also starts the reactor thread: ``tests.conftest._ensure_reactor`` must not be called from
    here, as ``tests.conftest`` is a second copy of the module pytest loaded as ``conftest``
    (tests/ is not a package), whose own "not started yet" flag would start a second thread.
    """
    certificate_source = make_server(name="certificate")
    tls_dir = certificate_source.config.generated_tls_dir
    tls_context = server_context(tls_dir / "cert.pem", tls_dir / "key.pem")
    delivery = MemoryDelivery()
    portal = Portal(
        MemoryRealm(delivery), [SlowChecker(STOCK_CHECK_DELAY, **{USER: PASSWORD.encode()})]
    )
    factory = StockFactory(portal, tls_context)

    def listen() -> list[Any]:
        return [
            reactor.listenTCP(0, wrapped, interface="127.0.0.1")
            for wrapped in (factory, TLSMemoryBIOFactory(tls_context, False, factory))
        ]

    plain, implicit = blockingCallFromThread(reactor, listen)
    yield Target(
        plain.getHost().port,
        implicit.getHost().port,
        certificate_source.cafile,
        delivery.break_mailbox,
        ServerReads().install(monkeypatch, smtp.ESMTP),
    )
    for port in (plain, implicit):
        blockingCallFromThread(reactor, port.stopListening)


# --- the tests -----------------------------------------------------------------------------------

DEFECTS = pytest.mark.parametrize("check", list(CHECKS.values()), ids=list(CHECKS))


@DEFECTS
def test_defect_fixed(check: Callable[[Target], None], ours: Target) -> None:
    assert behaves_correctly(check, ours), "\n".join(ours.transcript)


@DEFECTS
def test_defect_present_in_stock_twisted(check: Callable[[Target], None], stock: Target) -> None:
    assert not behaves_correctly(check, stock), "\n".join(stock.transcript)
