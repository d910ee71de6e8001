"""An SMTP submission client that speaks CLIENTID: ``send_message``, ``send_messages``,
``sendmail`` and ``clientid-mta send``.

``send_message`` (and ``sendmail``) is one connection and one mail transaction::

    d = sendmail("mail.example.org", 587, "alice@example.org", ["bob@example.org"],
                 message_bytes, username="alice@example.org", password=secret,
                 client_id=("UUID", "23bf83be-aad7-46aa-9e0f-39191ccf402f"))
    d.addCallback(lambda results: ...)   # [RecipientResult, ...], one per recipient

``send_messages`` is one connection (one TLS handshake, one AUTH) and several
transactions, for a relay that empties a queue::

    d = send_messages("relay.example.net", 587, [Transaction(sender, rcpts, message), ...],
                      username=..., password=...)
    d.addCallback(lambda outcomes: ...)  # per transaction: [RecipientResult, ...]
                                         # or the ConnectionFailed that stopped it

The session goes: greeting, EHLO, STARTTLS and EHLO again (unless the connection is
implicit TLS), then ``CLIENTID <type> <token>`` if the server advertised CLIENTID, then
AUTH, then for each transaction MAIL, one RCPT per recipient and DATA (RSET before the
next one when a transaction ended before its data was sent), and QUIT. CLIENTID is only
ever sent over TLS, after the EHLO that advertised it and before AUTH, as Thunderbird
does; whatever the server answers to it, the session goes on to AUTH. AUTH is only ever
sent over TLS.
Certificates are verified (the name and the chain) except in ``opportunistic`` mode.

Secrets: the password and the token are never logged and never put in an exception;
a server reply that echoes one has it replaced by ``[redacted]``. No line sent is kept.

Every step has a timeout (``connect_timeout`` for the TCP connection, ``timeout`` for
each reply, including the TLS handshake and the sending of the message data), so a
relay using this client never hangs on a silent server.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO, cast

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.internet import defer, error, protocol, ssl, task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPullProducer, IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

TLS_MODES = ("starttls", "implicit", "opportunistic", "none")
EX_TEMPFAIL = 75
CHUNK_SIZE = 64 * 1024  # bytes of message read at a time
MAX_REPLY_LINES = 200  # a longer multi-line reply is a protocol error (memory stays bounded)
QUIT_WAIT = 10.0  # seconds for a clean close after QUIT before the connection is aborted
SUCCESS = list(range(200, 300))
ANY_REPLY = list(range(100, 600))

_TYPE_RE = re.compile(r"[A-Za-z0-9-]{1,16}\Z")
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,128}\Z")
_ADDRESS_RE = re.compile(r"[\x21-\x7e]{1,254}\Z")  # printable ASCII, no space
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")


class ConnectionFailed(Exception):
    """No SMTP transaction took place with this host: connect error/timeout, TLS handshake or
    certificate failure, TLS required but STARTTLS not offered, connection lost before the end,
    greeting not 2xx, EHLO refused, AUTH refused (any code), server went silent (timeout), a
    ``421`` reply (the server is closing the session) before the end-of-data reply.
    `.temporary` is always True here; `str()` is a one-line human reason (no secrets).

    In ``send_messages``' results it is the outcome of the transaction that did not get its
    final reply and of every later one (the same instance); there a ``421`` to the end of
    data is one too, and so is a message that could not be read (its ``__cause__``)."""

    temporary = True


@dataclass(frozen=True)
class RecipientResult:
    """The outcome for one recipient.

    ``code`` is RCPT's code if RCPT was refused, else the code of the reply to the end of
    data (or to DATA, if DATA itself was refused); a refused MAIL FROM gives its code to
    every recipient. ``text`` is that reply's text (decoded, on one line).
    """

    address: str
    code: int
    text: str

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600


class SendFailed(Exception):
    """``sendmail``'s errback when a recipient was not delivered; ``.results`` has them all."""

    def __init__(self, results: Sequence[RecipientResult]) -> None:
        self.results = list(results)
        refused = [f"{r.address}: {r.code} {r.text}" for r in self.results if not r.delivered]
        super().__init__("not delivered to " + "; ".join(refused))


class DataEncoder:
    """Message bytes to the DATA wire form, chunk by chunk (RFC 5321 4.5.2).

    Every line ending (CRLF, LF, or a lone CR) becomes CRLF, and a line that starts with
    "." gets one more. The state between chunks (at the start of a line? a CR that a LF
    may follow?) is kept, so it does not matter where the chunks are cut. ``end()`` is the
    end-of-data marker, with a CRLF before it when the message did not end with a newline.
    """

    def __init__(self) -> None:
        self._line_start = True
        self._after_cr = False

    def encode(self, chunk: bytes) -> bytes:
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF cut between two chunks: already sent
        if not chunk:
            return b""
        self._after_cr = chunk.endswith(b"\r")
        lines = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        stuffed = lines.replace(b"\n.", b"\n..")
        if self._line_start and stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        self._line_start = stuffed.endswith(b"\n")
        return stuffed.replace(b"\n", b"\r\n")

    def end(self) -> bytes:
        return b".\r\n" if self._line_start else b"\r\n.\r\n"


@dataclass
class Transaction:
    """One message for ``send_messages``: the envelope and the message (bytes or a binary
    file, read from where it stands; the caller keeps ownership of the file)."""

    sender: str
    recipients: Sequence[str]
    message: bytes | BinaryIO


@dataclass
class _Mail:
    """One transaction, checked."""

    sender: str
    recipients: tuple[str, ...]
    message: BinaryIO
    eight_bit: bool | None  # None: unknown (a stream that cannot be read twice)


# What the session reports per transaction: its results, or what stopped it (the same
# exception for it and every later one). An exception that is not ConnectionFailed is
# the caller's own (a message that could not be read).
_Outcome = list[RecipientResult] | BaseException


@dataclass
class _Job:
    """Everything one session needs, checked."""

    host: str
    port: int
    mails: tuple[_Mail, ...]
    tls: str
    tls_hostname: str
    tls_options: Any  # the client TLS creator/context factory, or None
    username: str | None
    password: str | None
    client_id: tuple[str, str] | None
    helo: str
    timeout: float
    # send_message's documented rule: a 421 reply to the end of data is the recipients'
    # result. In send_messages a 421 anywhere ends the session (ConnectionFailed).
    eod_421_is_result: bool

    def redact(self, text: str) -> str:
        for secret in (self.password, self.client_id[1] if self.client_id else None):
            if secret:
                text = text.replace(secret, "[redacted]")
        return text


def _reply_text(resp: bytes, job: _Job) -> str:
    """A reply's text on one line, printable, with any secret the server echoed removed."""
    text = " ".join(resp.decode("utf-8", "replace").split("\n"))
    return job.redact(_CONTROL_RE.sub(" ", text).strip())


@implementer(IPullProducer)
class _BodyProducer:
    """Feeds the message through a DataEncoder into the transport, as the transport asks."""

    def __init__(self, client: _SubmissionClient, source: BinaryIO) -> None:
        self.client = client
        self.source: BinaryIO | None = source
        self.encoder = DataEncoder()

    @property
    def sending(self) -> bool:
        return self.source is not None

    def resumeProducing(self) -> None:
        if self.source is None:
            return
        try:
            chunk = self.source.read(CHUNK_SIZE)
        except Exception as problem:  # reported to the caller, not lost in the reactor
            self.unregister()
            self.client.body_failed(problem)
            return
        self.client.resetTimeout()  # progress: the reply timeout starts again
        if chunk:
            self.client.link.write(self.encoder.encode(chunk))
        else:
            self.unregister()
            self.client.link.write(self.encoder.end())

    def unregister(self) -> None:
        if self.source is not None:
            self.source = None
            self.client.link.unregisterProducer()

    def stopProducing(self) -> None:  # the transport is going away
        self.source = None


class _SubmissionClient(LineReceiver, TimeoutMixin):
    """One session, on its own reply dispatch (Twisted's ESMTPClient is not used: its
    state machine retries, falls back to HELO and keeps a log of the lines sent).

    Each command says which reply codes go on (``expected`` -> ``on_ok``) and what any
    other reply does (``on_fail``). The session walks ``job.mails`` in order, with RSET
    before the next one when a transaction ended before the end of data, and reports
    once: either what stopped the session before the first MAIL FROM, or one outcome per
    transaction. Every timer runs on ``clock``.
    """

    def __init__(
        self,
        job: _Job,
        report: Callable[[list[_Outcome] | BaseException], None],
        clock: IReactorTime,
    ) -> None:
        self.job = job
        self.report = report
        self.clock = clock
        self.identity = job.helo.encode("ascii")  # the EHLO name
        self.context = job.tls_options  # for STARTTLS; None: never
        self.require_tls = job.tls in ("starttls", "implicit")
        self.secure = job.tls == "implicit"  # TLS is on (from the connect, or after STARTTLS)
        self.reported = False
        self.step = "greeting"
        self.expected: Sequence[int] = SUCCESS  # the greeting: 2xx goes on to EHLO
        self.on_ok: Callable[[int, bytes], object] = self.send_ehlo
        self.on_fail: Callable[[int, bytes], object] = self.refused
        self.items: dict[bytes, bytes | None] = {}
        self.in_transactions = False  # the first MAIL FROM has been sent
        self.outcomes: list[_Outcome] = []  # one per finished transaction
        self.rcpt_replies: list[tuple[int, str]] = []
        self.producer: _BodyProducer | None = None
        self.reply_lines: list[bytes] = []  # of a multi-line reply so far
        self.reply_code = b""

    # --- plumbing -------------------------------------------------------------------

    @property
    def link(self) -> Any:
        """The transport: TCP, or TLS over it (abortConnection, startTLS, registerProducer)."""
        return self.transport

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        """TimeoutMixin's timer, on the injected clock."""
        return self.clock.callLater(period, func)

    def command(
        self,
        step: str,
        line: bytes,
        expected: Sequence[int],
        ok: Callable[[int, bytes], object],
        fail: Callable[[int, bytes], object] | None = None,
    ) -> None:
        self.step = step
        self.expected = list(expected)
        self.on_ok = ok
        self.on_fail = fail or self.refused
        self.sendLine(line)

    def lineReceived(self, line: bytes) -> None:
        code = line[:3]
        if not (code.isdigit() and code[:1] in b"12345" and line[3:4] in (b"", b" ", b"-")):
            self.fail(f"the server sent something that is not an SMTP reply ({self.step})")
            return
        if self.reply_lines and code != self.reply_code:
            self.fail(f"the server's multi-line reply changed its code ({self.step})")
            return
        self.reply_code = code
        self.reply_lines.append(line[4:])
        if line[3:4] == b"-":
            if len(self.reply_lines) > MAX_REPLY_LINES:
                self.fail(f"the server's reply is longer than {MAX_REPLY_LINES} lines")
            return
        resp, self.reply_lines = b"\n".join(self.reply_lines), []
        self.resetTimeout()  # the timeout is per reply, not per line
        number = int(code)
        if number == 421 and self.step != "QUIT" and not self.closing_is_a_result:
            self.fail(f"the server is closing the session ({self.step}): 421 {self.text(resp)}")
        elif number in self.expected:
            self.on_ok(number, resp)
        else:
            self.on_fail(number, resp)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.fail(f"the server sent a reply line over {self.MAX_LENGTH} bytes ({self.step})")

    @property
    def closing_is_a_result(self) -> bool:
        """Whether a 421 reply now is the transaction's result (send_message, end of data)."""
        return self.step == "message data" and self.job.eod_421_is_result

    def text(self, resp: bytes) -> str:
        return _reply_text(resp, self.job)

    def refused(self, code: int, resp: bytes) -> None:
        self.fail(f"{self.step} failed: {code} {self.text(resp)}", polite=True)

    def fail(self, reason: str | BaseException, polite: bool = False) -> None:
        """Report a failure (once); say QUIT if the session is still in step, else close."""
        self.done(ConnectionFailed(reason) if isinstance(reason, str) else reason)
        if polite:
            self.quit()
        elif self.transport is not None:
            self.link.abortConnection()

    def done(self, problem: BaseException | None = None) -> None:
        """Report (once): every transaction done, or ``problem`` stopped the session. Once
        the transactions have begun, ``problem`` is the outcome of the current transaction
        and of every later one."""
        if self.reported:
            return
        self.reported = True
        if problem is not None and not self.in_transactions:
            self.report(problem)
            return
        outcomes = list(self.outcomes)
        if problem is not None:
            outcomes += [problem] * (len(self.job.mails) - len(outcomes))
        self.report(outcomes)

    def quit(self) -> None:
        """QUIT and close without waiting for the reply (as Postfix's smtp_skip_quit_response)."""

        def ignore(code: int, resp: bytes) -> None:
            pass

        self.command("QUIT", b"QUIT", ANY_REPLY, ignore, ignore)
        self.setTimeout(min(self.job.timeout, QUIT_WAIT))  # the close itself may not finish
        self.link.loseConnection()

    def timeoutConnection(self) -> None:
        if not self.reported:
            self.done(ConnectionFailed(f"no reply within {self.job.timeout:g} s ({self.step})"))
        self.link.abortConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.setTimeout(None)
        if self.producer is not None:
            self.producer.stopProducing()
        if not self.reported:
            self.done(ConnectionFailed(_lost(reason, self.step, self.job)))

    # --- greeting, EHLO, STARTTLS ------------------------------------------------

    def connectionMade(self) -> None:
        self.setTimeout(self.job.timeout)  # the greeting, then each reply

    def send_ehlo(self, code: int, resp: bytes) -> None:
        self.command("EHLO", b"EHLO " + self.identity, SUCCESS, self.ehlo_reply)

    def ehlo_reply(self, code: int, resp: bytes) -> None:
        self.items = {}
        for line in resp.splitlines()[1:]:
            keyword, _, params = line.partition(b" ")
            self.items[keyword.upper()] = params or None
        self.try_tls(code, resp, self.items)

    def try_tls(self, code: int, resp: bytes, items: dict[bytes, bytes | None]) -> None:
        if self.secure or self.context is None:
            self.authenticate(code, resp, items)
        elif b"STARTTLS" in items:
            self.command("STARTTLS", b"STARTTLS", [220], self.start_tls, self.tls_refused)
        elif self.require_tls:
            self.fail("TLS is required but the server does not offer STARTTLS", polite=True)
        else:
            self.authenticate(code, resp, items)  # opportunistic: plaintext

    def tls_refused(self, code: int, resp: bytes) -> None:
        if self.job.tls != "opportunistic":
            self.refused(code, resp)
            return
        log.info(
            "STARTTLS refused by {host} ({code}); going on without TLS",
            host=self.job.host,
            code=code,
        )
        self.authenticate(code, resp, self.items)

    def start_tls(self, code: int, resp: bytes) -> None:
        self.step = "TLS handshake"
        # A failed handshake or certificate check ends in connectionLost.
        self.link.startTLS(self.context)
        self.secure = True
        self.send_ehlo(code, resp)

    # --- CLIENTID and AUTH -------------------------------------------------------------

    def authenticate(self, code: int, resp: bytes, items: dict[bytes, bytes | None]) -> None:
        """CLIENTID first (when advertised, and only over TLS), then AUTH."""
        if self.job.client_id is not None and self.secure and b"CLIENTID" in items:
            client_type, token = self.job.client_id
            line = f"CLIENTID {client_type} {token}".encode("ascii")
            self.command("CLIENTID", line, [250], self.after_clientid, self.after_clientid)
        else:
            self.start_auth()

    def after_clientid(self, code: int, resp: bytes) -> None:
        if code != 250:
            log.warn(
                "CLIENTID not accepted by {host}: {code} {text}; going on to AUTH",
                host=self.job.host,
                code=code,
                text=self.text(resp),
            )
        self.start_auth()

    def start_auth(self) -> None:
        job = self.job
        if job.username is None or job.password is None:
            self.start_mail()
            return
        if not self.secure:
            self.fail("the server does not offer STARTTLS, and AUTH is only sent over TLS", True)
            return
        mechanisms = (self.items.get(b"AUTH") or b"").upper().split()
        user, password = job.username.encode(), job.password.encode()
        if b"PLAIN" in mechanisms:
            plain = base64.b64encode(b"\0" + user + b"\0" + password)
            self.command("AUTH", b"AUTH PLAIN " + plain, [235], self.authenticated)
        elif b"LOGIN" in mechanisms:
            self.command("AUTH", b"AUTH LOGIN", [334], self.login_username)
        else:
            self.fail("the server does not offer AUTH PLAIN or LOGIN", polite=True)

    def login_username(self, code: int, resp: bytes) -> None:
        username = base64.b64encode((self.job.username or "").encode())
        self.command("AUTH", username, [334], self.login_password)

    def login_password(self, code: int, resp: bytes) -> None:
        password = base64.b64encode((self.job.password or "").encode())
        self.command("AUTH", password, [235], self.authenticated)

    def authenticated(self, code: int, resp: bytes) -> None:
        self.start_mail()

    # --- the transactions ---------------------------------------------------------------

    @property
    def mail(self) -> _Mail:
        """The current transaction."""
        return self.job.mails[len(self.outcomes)]

    def start_mail(self) -> None:
        self.in_transactions = True
        self.rcpt_replies = []
        body = b""
        if b"8BITMIME" in self.items and self.mail.eight_bit is not False:
            body = b" BODY=8BITMIME"
        line = b"MAIL FROM:<" + self.mail.sender.encode("ascii") + b">" + body
        self.command("MAIL FROM", line, SUCCESS, self.next_rcpt, self.sender_refused)

    def sender_refused(self, code: int, resp: bytes) -> None:
        self.finish([(code, self.text(resp))] * len(self.mail.recipients))

    def next_rcpt(self, code: int = 0, resp: bytes = b"") -> None:
        address = self.mail.recipients[len(self.rcpt_replies)]
        line = b"RCPT TO:<" + address.encode("ascii") + b">"
        self.command("RCPT TO", line, SUCCESS, self.rcpt_reply, self.rcpt_reply)

    def rcpt_reply(self, code: int, resp: bytes) -> None:
        self.rcpt_replies.append((code, self.text(resp)))
        if len(self.rcpt_replies) < len(self.mail.recipients):
            self.next_rcpt()
        elif any(c in SUCCESS for c, _ in self.rcpt_replies):
            self.command("DATA", b"DATA", [354], self.send_data, self.data_refused)
        else:
            self.finish(self.rcpt_replies)

    def send_data(self, code: int, resp: bytes) -> None:
        self.step = "message data"
        self.expected = ANY_REPLY
        self.on_ok = self.on_fail = self.data_reply
        self.producer = _BodyProducer(self, self.mail.message)
        self.link.registerProducer(self.producer, False)

    def body_failed(self, problem: Exception) -> None:
        self.fail(problem)  # the message could not be read: the caller's problem, as is

    def data_refused(self, code: int, resp: bytes) -> None:
        if code in SUCCESS:  # "sent" without the message: the server is broken
            self.fail(f"DATA failed: the server answered {code} instead of 354", polite=True)
        else:
            self.data_reply(code, resp)

    def data_reply(self, code: int, resp: bytes) -> None:
        """The reply to DATA (when refused) or to the end of data: it settles the rest."""
        final = (code, self.text(resp))
        self.finish([final if c in SUCCESS else (c, t) for c, t in self.rcpt_replies])

    def finish(self, replies: Sequence[tuple[int, str]]) -> None:
        """The current transaction has its results: go on to the next one, or QUIT."""
        ended = self.step == "message data"  # else MAIL, every RCPT or DATA was refused
        self.outcomes.append(
            [
                RecipientResult(address, code, text)
                for address, (code, text) in zip(self.mail.recipients, replies, strict=True)
            ]
        )
        early = self.producer is not None and self.producer.sending
        if self.producer is not None:
            self.producer.unregister()
            self.producer = None
        if early:  # replied before the end of data: anything more we sent would be data
            self.fail("the server replied before the end of the message data")
        elif len(self.outcomes) == len(self.job.mails):
            self.done()
            self.quit()
        elif ended:
            self.start_mail()
        else:  # a transaction may be open on the server's side (MAIL accepted)
            self.command("RSET", b"RSET", SUCCESS, lambda code, resp: self.start_mail())


def _lost(reason: Failure, step: str, job: _Job) -> str:
    """One line saying why the connection ended early."""
    if reason.check(SSL.Error):
        args = getattr(reason.value, "args", ())
        details = [part[-1] for part in args[0] if part] if args and args[0] else []
        return f"TLS handshake failed: {', '.join(map(str, details)) or 'no reason given'}"
    if reason.check(error.ConnectionDone):
        return f"the server closed the connection ({step})"
    if reason.check(error.ConnectionLost):
        return f"the connection was lost ({step})"
    if type(reason.value).__name__ == "VerificationError":  # service_identity's
        return f"TLS certificate is not valid for {job.tls_hostname}"
    return f"connection lost ({step}): {job.redact(reason.getErrorMessage())}"


class _ClientFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, job: _Job, clock: IReactorTime) -> None:
        self.job = job
        self.clock = clock
        self.deferred: Deferred[list[_Outcome]] = Deferred(self.cancel)
        self.connector: Any = None
        self.client: _SubmissionClient | None = None
        self.cancelled = False

    def buildProtocol(self, addr: Any) -> _SubmissionClient:
        self.client = _SubmissionClient(self.job, self.report, self.clock)
        self.client.factory = self
        return self.client

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if reason.check(error.TimeoutError):
            why = "no answer"
        else:
            why = reason.getErrorMessage()
        self.report(
            ConnectionFailed(f"cannot connect to {self.job.host} port {self.job.port}: {why}")
        )

    def report(self, outcome: list[_Outcome] | BaseException) -> None:
        if self.cancelled or self.deferred.called:
            return
        if isinstance(outcome, BaseException):
            self.deferred.errback(Failure(outcome))
        else:
            self.deferred.callback(outcome)

    def cancel(self, deferred: Deferred[list[_Outcome]]) -> None:
        self.cancelled = True
        if self.client is not None and self.client.transport is not None:
            self.client.link.abortConnection()
        elif self.connector is not None:
            self.connector.disconnect()


def _trust_root(trust_roots: str | Path | bytes | None) -> Any:
    """The CAs to verify against: every certificate in a PEM file (or PEM bytes already
    read, so a caller on the reactor need not open a file), or the system's."""
    if trust_roots is None:
        return ssl.platformTrust()
    pem = trust_roots if isinstance(trust_roots, bytes) else Path(trust_roots).read_bytes()
    certificates = x509.load_pem_x509_certificates(pem)
    return ssl.trustRootFromCertificates(
        [ssl.Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certificates]
    )


def _tls_options(tls: str, hostname: str, trust_roots: str | Path | bytes | None) -> Any:
    if tls in ("starttls", "implicit"):
        return ssl.optionsForClientTLS(
            hostname,
            trustRoot=_trust_root(trust_roots),
            extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
        )
    if tls == "opportunistic":
        return ssl.CertificateOptions(verify=False)  # better than plaintext; not verified
    return None


def _check_address(address: str, what: str, empty_ok: bool = False) -> str:
    if not isinstance(address, str):
        raise TypeError(f"{what} must be str, not {type(address).__name__}")
    if (address or not empty_ok) and (not _ADDRESS_RE.match(address) or set(address) & set("<>")):
        raise ValueError(f"{what} {address!r} is not a plain ASCII address")
    return address


def _has_8bit(message: BinaryIO) -> bool | None:
    """Whether the message has a byte over 127; None when it cannot be read twice."""
    try:
        if not message.seekable():
            return None
        start = message.tell()
    except (AttributeError, OSError):
        return None
    try:
        while chunk := message.read(CHUNK_SIZE):
            if not chunk.isascii():
                return True
        return False
    finally:
        message.seek(start)


def _mail(sender: str, recipients: Sequence[str], message: bytes | BinaryIO) -> _Mail:
    if isinstance(recipients, str) or not recipients:
        raise ValueError("recipients must be a non-empty sequence of addresses")
    rcpts = tuple(_check_address(r, "recipient") for r in recipients)
    if isinstance(message, bytes | bytearray):
        source: BinaryIO = io.BytesIO(bytes(message))
        eight_bit: bool | None = not bytes(message).isascii()
    else:
        source, eight_bit = message, _has_8bit(message)
    return _Mail(_check_address(sender, "sender", empty_ok=True), rcpts, source, eight_bit)


def _job(
    host: str,
    port: int,
    transactions: Sequence[Transaction],
    *,
    tls: str,
    tls_hostname: str | None,
    trust_roots: str | Path | None,
    username: str | None,
    password: str | None,
    client_id: tuple[str, str] | None,
    helo: str,
    timeout: float,
    eod_421_is_result: bool,
) -> _Job:
    if tls not in TLS_MODES:
        raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {tls!r}")
    if isinstance(transactions, Transaction) or not all(
        isinstance(t, Transaction) for t in transactions
    ):
        raise TypeError("transactions must be a sequence of Transaction")
    mails = tuple(_mail(t.sender, t.recipients, t.message) for t in transactions)
    if (username is None) != (password is None):
        raise ValueError("username and password go together")
    if username is not None and tls == "none":
        raise ValueError('AUTH is only sent over TLS: tls="none" cannot take a username')
    if client_id is not None:
        client_type, token = client_id
        if not _TYPE_RE.match(client_type) or not _TOKEN_RE.match(token):
            raise ValueError("client_id must be (type: 1-16 of A-Z a-z 0-9 -, token: 1-128 VCHAR)")
    if not _ADDRESS_RE.match(helo):
        raise ValueError(f"helo {helo!r} must be a host name or address literal")
    return _Job(
        host=host,
        port=port,
        mails=mails,
        tls=tls,
        tls_hostname=tls_hostname or host,
        tls_options=_tls_options(tls, tls_hostname or host, trust_roots),
        username=username,
        password=password,
        client_id=client_id,
        helo=helo,
        timeout=timeout,
        eod_421_is_result=eod_421_is_result,
    )


def _start(
    host: str,
    port: int,
    transactions: Sequence[Transaction],
    *,
    connect_timeout: float,
    reactor: IReactorTCP | None,
    **options: Any,
) -> Deferred[list[_Outcome]]:
    """Check everything, then connect: one outcome per transaction (none: no connection)."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = cast(IReactorTCP, default_reactor)
    try:
        job = _job(host, port, transactions, **{"eod_421_is_result": False, **options})
    except (ValueError, TypeError, OSError) as problem:
        return defer.fail(problem)
    if not job.mails:
        return defer.succeed([])
    factory = _ClientFactory(job, cast(IReactorTime, reactor))
    wrapped: Any = factory
    if job.tls == "implicit":  # the greeting comes after the handshake
        wrapped = TLSMemoryBIOFactory(job.tls_options, True, factory)
    factory.connector = reactor.connectTCP(job.host, job.port, wrapped, timeout=connect_timeout)
    return factory.deferred


def _unreadable_is_connection_failed(
    outcomes: list[_Outcome],
) -> list[list[RecipientResult] | ConnectionFailed]:
    """A message that could not be read aborted the session: ConnectionFailed from then on,
    with the read error as its ``__cause__``."""
    settled: list[list[RecipientResult] | ConnectionFailed] = []
    for number, outcome in enumerate(outcomes, 1):
        if isinstance(outcome, ConnectionFailed | list):
            settled.append(outcome)
            continue
        failed = ConnectionFailed(f"cannot read the message of transaction {number}: {outcome}")
        failed.__cause__ = outcome
        return settled + [failed] * (len(outcomes) - len(settled))
    return settled


def send_messages(
    host: str,
    port: int,
    transactions: Sequence[Transaction],
    *,
    tls: str = "starttls",
    tls_hostname: str | None = None,
    trust_roots: str | Path | None = None,
    username: str | None = None,
    password: str | None = None,
    client_id: tuple[str, str] | None = None,
    helo: str = "localhost",
    timeout: float = 300,
    connect_timeout: float = 30,
    reactor: IReactorTCP | None = None,
) -> Deferred[list[list[RecipientResult] | ConnectionFailed]]:
    """Send several messages to ``host`` over one connection (TLS, EHLO, CLIENTID and AUTH
    once); the Deferred fires with one entry per transaction, in order.

    Each transaction is MAIL FROM, one RCPT per recipient and DATA, as in ``send_message``
    (whose keyword arguments these are); when one ends before the end of data (MAIL
    refused, every RCPT refused, DATA refused), RSET comes before the next.

    An entry is the transaction's RecipientResult list once its final reply came back (the
    end-of-data reply, or the refusals), even when it refused every recipient. When the
    session stops before a transaction has that (connection lost, a timeout, a ``421``
    reply at any point, including the end of data, a refused RSET, a server that broke the
    protocol), that transaction and every later one get the same ``ConnectionFailed``
    instance: nothing of theirs was accepted, and they may be retried. A message that
    cannot be read aborts the session the same way (the ConnectionFailed's ``__cause__``
    is the read error).

    The Deferred errbacks with ``ConnectionFailed`` when the session stops before the first
    MAIL FROM (connect, TLS, greeting, EHLO, AUTH); with ``ValueError``/``TypeError`` when
    an option or any transaction is invalid, and ``OSError`` for an unreadable
    ``trust_roots`` (then nothing is sent). An empty ``transactions`` fires with ``[]``
    without connecting. Cancelling the Deferred closes the connection.
    """
    return _start(
        host,
        port,
        transactions,
        tls=tls,
        tls_hostname=tls_hostname,
        trust_roots=trust_roots,
        username=username,
        password=password,
        client_id=client_id,
        helo=helo,
        timeout=timeout,
        connect_timeout=connect_timeout,
        reactor=reactor,
    ).addCallback(_unreadable_is_connection_failed)


def send_message(
    host: str,
    port: int,
    sender: str,
    recipients: Sequence[str],
    message: bytes | BinaryIO,
    *,
    tls: str = "starttls",
    tls_hostname: str | None = None,
    trust_roots: str | Path | None = None,
    username: str | None = None,
    password: str | None = None,
    client_id: tuple[str, str] | None = None,
    helo: str = "localhost",
    timeout: float = 300,
    connect_timeout: float = 30,
    reactor: IReactorTCP | None = None,
) -> Deferred[list[RecipientResult]]:
    """Send one message to ``host``; the Deferred fires with one RecipientResult per recipient.

    ``tls``: ``"starttls"`` (required, certificate verified), ``"implicit"`` (TLS from the
    connect, RFC 8314, verified), ``"opportunistic"`` (STARTTLS when offered, certificate
    not verified, else plaintext) or ``"none"`` (never; for tests). The certificate must
    name ``tls_hostname`` (default ``host``) and chain to a CA in ``trust_roots`` (a PEM
    file) or to the system's CAs. TLS 1.2 or newer when verified.

    ``username``/``password``: AUTH PLAIN (or LOGIN, if PLAIN is not offered), only ever
    over TLS; when the server offers neither, the send fails. ``client_id`` is
    ``(type, token)``, e.g. ``("UUID", "23bf83be-...")``, sent as CLIENTID when the server
    advertises it (after TLS, before AUTH).

    ``message``: bytes or a binary file, lines ending in LF or CRLF; it is sent with CRLF
    line endings and dot-stuffed. ``BODY=8BITMIME`` is declared when the server offers it
    and the message has 8-bit bytes (or cannot be read twice to find out).

    The Deferred fires as soon as the reply to the end of data arrives (QUIT follows).
    SMTP refusals are results, not errors: only ``ConnectionFailed`` (no transaction took
    place: see its docstring) and programming errors (``ValueError``, ``TypeError``,
    ``OSError`` for an unreadable ``trust_roots`` or message) go to the errback.
    ``timeout`` is per reply (and per chunk of message sent); ``connect_timeout`` is for
    the TCP connection. Cancelling the Deferred closes the connection.
    """

    def only(outcomes: list[_Outcome]) -> list[RecipientResult]:
        [outcome] = outcomes
        if isinstance(outcome, BaseException):
            raise outcome  # ConnectionFailed, or the message's own read error, as it was
        return outcome

    return _start(
        host,
        port,
        [Transaction(sender, recipients, message)],
        tls=tls,
        tls_hostname=tls_hostname,
        trust_roots=trust_roots,
        username=username,
        password=password,
        client_id=client_id,
        helo=helo,
        timeout=timeout,
        connect_timeout=connect_timeout,
        reactor=reactor,
        eod_421_is_result=True,  # as ConnectionFailed's docstring has it
    ).addCallback(only)


def sendmail(
    host: str,
    port: int,
    sender: str,
    recipients: Sequence[str],
    message: bytes | BinaryIO,
    *,
    username: str | None = None,
    password: str | None = None,
    client_id: tuple[str, str] | None = None,
    tls: str = "starttls",
    trust_roots: str | Path | None = None,
    **options: Any,
) -> Deferred[list[RecipientResult]]:
    """``send_message`` for Twisted programs that want an errback when anything failed.

    The Deferred fires with the results when every recipient was delivered; otherwise it
    errbacks with ``SendFailed`` (``.results`` holds them all) or ``ConnectionFailed``.
    The other keyword arguments (``tls_hostname``, ``helo``, ``timeout``, ...) are those
    of ``send_message``.
    """

    def check(results: list[RecipientResult]) -> list[RecipientResult]:
        if not all(r.delivered for r in results):
            raise SendFailed(results)
        return results

    sending = send_message(
        host,
        port,
        sender,
        recipients,
        message,
        username=username,
        password=password,
        client_id=client_id,
        tls=tls,
        trust_roots=trust_roots,
        **options,
    )
    return sending.addCallback(check)


# --- clientid-mta send ------------------------------------------------------------------


class _UsageError(Exception):
    pass


def _send_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clientid-mta send",
        description="Send the message on standard input through a submission server. The "
        "password comes from --password-file or CLIENTID_MTA_PASSWORD, the client identity "
        "from --client-id or CLIENTID_MTA_CLIENT_ID. Exit status: 0 delivered to all, 1 a "
        "recipient was refused for good, 75 try again later, 2 usage error.",
    )
    parser.add_argument("--host", required=True, help="the submission server")
    parser.add_argument("--port", type=int, default=587, help="default 587")
    parser.add_argument(
        "--tls",
        choices=("starttls", "implicit"),
        help="default starttls; implicit when --port is 465",
    )
    parser.add_argument("--tls-hostname", help="the name the certificate must have (--host)")
    parser.add_argument("--ca-file", type=Path, help="PEM trust roots (default: the system's)")
    parser.add_argument("--user", help="log in (AUTH) as this account")
    parser.add_argument("--password-file", type=Path, help="its first line is the password")
    parser.add_argument("--client-id", metavar="TYPE:TOKEN", help="sent as CLIENTID")
    parser.add_argument("--helo", default="localhost", help="the EHLO name (localhost)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per reply (300)")
    parser.add_argument("--from", dest="sender", required=True, metavar="ADDR")
    parser.add_argument("recipients", nargs="+", metavar="RECIPIENT")
    return parser


def _password(args: argparse.Namespace) -> str | None:
    if args.password_file is not None:
        if args.user is None:
            raise _UsageError("--password-file needs --user")
        try:
            lines = args.password_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as problem:
            raise _UsageError(f"cannot read --password-file: {problem}") from None
        if not lines or not lines[0]:
            raise _UsageError(f"--password-file {args.password_file} is empty")
        return lines[0]
    if args.user is None:
        return None
    password = os.environ.get("CLIENTID_MTA_PASSWORD")
    if not password:
        raise _UsageError("--user needs --password-file or CLIENTID_MTA_PASSWORD")
    return password


def _client_id(args: argparse.Namespace) -> tuple[str, str] | None:
    text = (
        args.client_id if args.client_id is not None else os.environ.get("CLIENTID_MTA_CLIENT_ID")
    )
    if not text:
        return None
    client_type, _, token = text.partition(":")
    if not _TYPE_RE.match(client_type) or not _TOKEN_RE.match(token):
        raise _UsageError(
            "the client id must be TYPE:TOKEN (type 1-16 of A-Z a-z 0-9 -, "
            "token 1-128 printable characters)"
        )
    return client_type, token


def exit_status(results: Sequence[RecipientResult]) -> int:
    """0 when all were delivered, 1 when one was refused for good, else 75 (EX_TEMPFAIL)."""
    if all(r.delivered for r in results):
        return 0
    return 1 if any(r.permanent for r in results) else EX_TEMPFAIL


def send_command(
    argv: list[str],
    stdin: BinaryIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """``clientid-mta send``: runs the reactor; prints "<addr>: <code> <text>" per recipient."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        args = _send_parser().parse_args(argv)
    except SystemExit as stop:  # argparse has printed the usage (or the help)
        return 0 if stop.code in (0, None) else 2
    try:
        password, client_id = _password(args), _client_id(args)
    except _UsageError as problem:
        print(f"clientid-mta send: {problem}", file=err)
        return 2
    tls = args.tls or ("implicit" if args.port == 465 else "starttls")
    message = (stdin or sys.stdin.buffer).read()
    status = [2]

    def show(results: list[RecipientResult]) -> None:
        for r in results:
            print(f"{r.address}: {r.code} {r.text}", file=out)
        status[0] = exit_status(results)

    def trouble(failure: Failure) -> None:
        print(f"clientid-mta send: {failure.getErrorMessage()}", file=err)
        status[0] = EX_TEMPFAIL if failure.check(ConnectionFailed) else 2

    def main(reactor: Any) -> Deferred[None]:
        sending = send_message(
            args.host,
            args.port,
            args.sender,
            args.recipients,
            message,
            tls=tls,
            tls_hostname=args.tls_hostname,
            trust_roots=args.ca_file,
            username=args.user,
            password=password,
            client_id=client_id,
            helo=args.helo,
            timeout=args.timeout,
            reactor=reactor,
        )
        return sending.addCallbacks(show, trouble)

    try:
        task.react(main)
    except SystemExit as stop:
        if stop.code not in (0, None):
            return int(stop.code) if isinstance(stop.code, int) else 1
    return status[0]
