"""The submission client's SMTP session: one connection, its replies and its commands.

The session goes: greeting, EHLO, STARTTLS and EHLO again (unless the connection is
implicit TLS), then ``CLIENTID <type> <token>`` if the server advertised CLIENTID, then
AUTH, then for each transaction MAIL, one RCPT per recipient and DATA (RSET before the
next one when a transaction ended before its data was sent), and QUIT. CLIENTID is only
ever sent over TLS, after the EHLO that advertised it and before AUTH, as Thunderbird
does; whatever the server answers to it, the session goes on to AUTH. AUTH is only ever
sent over TLS.

Secrets: the password and the token are never logged and never put in an exception;
a server reply that echoes one has it replaced by ``[redacted]``. No line sent is kept.

Every reply has a timeout (``Job.timeout``, including the TLS handshake and the sending
of the message data), so a relay using this client never hangs on a silent server. The
arguments are checked, and the connection made, by ``clientid_mta.client.api``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from OpenSSL import SSL
from twisted.internet import error, protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPullProducer, IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from clientid_mta.client.results import ConnectionFailed, RecipientResult

log = Logger()

CHUNK_SIZE = 64 * 1024  # bytes of message read at a time
MAX_REPLY_LINES = 200  # a longer multi-line reply is a protocol error (memory stays bounded)
QUIT_WAIT = 10.0  # seconds for a clean close after QUIT before the connection is aborted
SUCCESS = list(range(200, 300))
ANY_REPLY = list(range(100, 600))

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")


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
class Mail:
    """One transaction, as the API checked it: the session sends it as it is."""

    sender: str
    recipients: tuple[str, ...]
    message: BinaryIO
    eight_bit: bool | None  # None: unknown (a stream that cannot be read twice)


# What the session reports per transaction: its results, or what stopped it (the same
# exception for it and every later one). An exception that is not ConnectionFailed is
# the caller's own (a message that could not be read).
Outcome = list[RecipientResult] | BaseException


@dataclass
class Job:
    """Everything one session needs, as the API checked it."""

    host: str
    port: int
    mails: tuple[Mail, ...]
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


def _reply_text(resp: bytes, job: Job) -> str:
    """A reply's text on one line, printable, with any secret the server echoed removed."""
    text = " ".join(resp.decode("utf-8", "replace").split("\n"))
    return job.redact(_CONTROL_RE.sub(" ", text).strip())


@implementer(IPullProducer)
class _BodyProducer:
    """Feeds the message through a DataEncoder into the transport, as the transport asks."""

    def __init__(self, client: SubmissionClient, source: BinaryIO) -> None:
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


class SubmissionClient(LineReceiver, TimeoutMixin):
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
        job: Job,
        report: Callable[[list[Outcome] | BaseException], None],
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
        self.outcomes: list[Outcome] = []  # one per finished transaction
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
    def mail(self) -> Mail:
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


def _lost(reason: Failure, step: str, job: Job) -> str:
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


class SubmissionClientFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, job: Job, clock: IReactorTime) -> None:
        self.job = job
        self.clock = clock
        self.deferred: Deferred[list[Outcome]] = Deferred(self.cancel)
        self.connector: Any = None
        self.client: SubmissionClient | None = None
        self.cancelled = False

    def buildProtocol(self, addr: Any) -> SubmissionClient:
        self.client = SubmissionClient(self.job, self.report, self.clock)
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

    def report(self, outcome: list[Outcome] | BaseException) -> None:
        if self.cancelled or self.deferred.called:
            return
        if isinstance(outcome, BaseException):
            self.deferred.errback(Failure(outcome))
        else:
            self.deferred.callback(outcome)

    def cancel(self, deferred: Deferred[list[Outcome]]) -> None:
        self.cancelled = True
        if self.client is not None and self.client.transport is not None:
            self.client.link.abortConnection()
        elif self.connector is not None:
            self.connector.disconnect()
