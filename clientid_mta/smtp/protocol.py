"""SubmissionESMTP: the SMTP submission protocol with CLIENTID, and its factory.

It speaks twisted.mail's vocabulary (``IMessageDelivery``, ``IMessage``,
``smtp.Address``/``smtp.User``) but is its own ``Protocol``: Twisted's ``ESMTP`` is not
a base, because every part of it (line framing, command dispatch, AUTH, STARTTLS,
DATA) is replaced here, Twisted's versions being unsafe for a submission server:

- input is framed by a bounded buffer of our own: over-long lines are answered and
  skipped, never buffered without limit, and DATA is never re-read as commands;
- while a command waits on a Deferred (password check, fsync) no further input is
  processed, so replies always come in command order (S9);
- STARTTLS resets the whole session and discards the plaintext that followed it (S2);
- the session knows it is encrypted from its own flag, also on implicit TLS (S1);
- AUTH is our own PLAIN/LOGIN decoder: every malformed input gets a reply (S4);
- the end of data always gets a reply, and every message opened for it is either
  handed to its store or discarded (S11);
- a message is stored for every recipient or for none: every copy is prepared before
  any is committed (``smtp/staging.py``), so a client that gets no 250 can resend it
  without a recipient getting it twice; a recipient the client names twice gets one
  copy (the delivery returns the same factory for it, which is opened once).

Every timer (idle timeout, close grace) runs on the clock the factory was given.
The row ids (C1..C16, S1..S15) are those of docs/conformance.md.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable
from enum import Enum
from typing import Any

from OpenSSL.SSL import Error as TLSError
from twisted.cred import error as cred_error
from twisted.cred.portal import Portal
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from clientid_mta.auth.credentials import (
    AuthUnavailable,
    ClientIdUsernamePassword,
    LoginThrottled,
    TLSInfo,
)
from clientid_mta.config import Config
from clientid_mta.global_reactor import global_reactor
from clientid_mta.observe.events import NO_EVENTS, IServerEvents
from clientid_mta.smtp.addresses import AddressSyntaxError, Path, parse_path
from clientid_mta.smtp.body import BodyReader
from clientid_mta.smtp.clientid import (
    ClientIdentity,
    ClientIdSyntaxError,
    device_key,
    fingerprint,
    parse_clientid,
)
from clientid_mta.smtp.errors import LocalDeliveryError
from clientid_mta.smtp.limits import SessionLimits
from clientid_mta.smtp.network import network_prefix, session_address
from clientid_mta.smtp.sasl import (
    SaslError,
    decode_response,
    decode_text,
    decode_username,
    parse_plain,
)
from clientid_mta.smtp.send_at_once import SendAtOnce, send_at_once
from clientid_mta.smtp.staging import IStagedMessage

log = Logger()

MAX_COMMAND_LINE = 510  # 512 octets with CRLF (RFC 5321 4.5.3.1.4)
MAX_AUTH_LINE = 12288  # SASL responses are exempt from the 512 limit (RFC 4954 4)
CLOSE_GRACE = 1.0  # seconds a closing TLS session may take to say goodbye
MAX_PENDING_INPUT = 1024 * 1024  # input held while a command's Deferred is open (S9)

LOGIN_USERNAME_CHALLENGE = base64.b64encode(b"Username:")
LOGIN_PASSWORD_CHALLENGE = base64.b64encode(b"Password:")

UNKNOWN_COMMAND = (500, "5.5.1 Command unrecognized")
NEED_TLS = (530, "5.7.0 Must issue a STARTTLS command first")
AUTH_FAILED = (535, "5.7.8 Authentication credentials invalid")


class Mode(Enum):
    COMMAND = "command"
    AUTH_PLAIN = "auth-plain"
    AUTH_LOGIN_USER = "auth-login-user"
    AUTH_LOGIN_PASSWORD = "auth-login-password"  # noqa: S105  (a state name)
    DATA = "data"


# Verbs and the handler for each. Anything else is an unknown command (S12), and so
# is CLIENTID where support must not be revealed (C3).
VERBS = frozenset(
    {
        "EHLO",
        "HELO",
        "STARTTLS",
        "AUTH",
        "CLIENTID",
        "MAIL",
        "RCPT",
        "DATA",
        "RSET",
        "NOOP",
        "QUIT",
        "HELP",
        "VRFY",
        "EXPN",
    }
)


LOCAL_ERROR = (451, "4.3.0 Local error in processing, try again later")


def _resp_text(resp: str | bytes) -> str:
    """SMTPServerError.resp is str on the MAIL/RCPT path and bytes on DATA (Twisted 26.10)."""
    return resp.decode("utf-8", "replace") if isinstance(resp, bytes) else str(resp)


def _describe(problem: BaseException | None) -> str:
    """An exception on one short line for the log (its text is ours or the parser's)."""
    text = " ".join(str(problem).split())
    return f"{type(problem).__name__}: {text[:200]}" if text else type(problem).__name__


def _account_address(avatar: object) -> str | None:
    """The logged-in account's address, through the wrappers of the avatar (the service
    wraps the account's delivery, which holds the account): for the log lines."""
    for _depth in range(4):
        address = getattr(avatar, "address", None)
        if isinstance(address, str):
            return address
        avatar = getattr(avatar, "account", None)
    return None


def _discard(message: IMessageSMTP) -> None:
    """``connectionLost``: the message is thrown away, and its file closed."""
    try:
        message.connectionLost()
    except Exception as problem:
        log.error("discarding a message failed: {problem}", problem=_describe(problem))


class _NotStored(Exception):
    """A copy left unstored because another copy of the message failed."""


def _store_all(messages: list[IMessageSMTP]) -> defer.Deferred[list[tuple[bool, Any]]]:
    """Store every copy of a message, or none: (stored, result or Failure) per message.

    Staged copies (``IStagedMessage``) are all prepared first; then the plain ones (a
    Twisted ``IMessage``, such as the device-approval message, which is always alone)
    are stored in one step; only when all of that succeeded are the staged copies
    committed. A copy left unstored because another failed is reported as
    ``_NotStored``. Only the commits themselves (a rename and a folder fsync each) can
    still fail after another copy became visible.

    A single copy is all or nothing by itself: it gets its one-step store
    (``eomReceived``), which for a Maildir copy is one thread hand-off instead of two.
    """
    if len(messages) == 1:
        alone = defer.maybeDeferred(messages[0].eomReceived)
        return alone.addBoth(lambda result: [(not isinstance(result, Failure), result)])
    staged: list[IMessageSMTP] = [m for m in messages if IStagedMessage.providedBy(m)]
    plain: list[IMessageSMTP] = [m for m in messages if not IStagedMessage.providedBy(m)]
    outcome: dict[int, tuple[bool, Any]] = {}

    def step(group: list[IMessageSMTP], name: str, final: bool) -> defer.Deferred[bool]:
        # A store that raises at once fails like one that fails later.
        calls = [defer.maybeDeferred(getattr(message, name)) for message in group]

        def record(results: list[tuple[bool, Any]]) -> bool:
            for (ok, value), message in zip(results, group, strict=True):
                if final or not ok:
                    outcome[id(message)] = (ok, value)
            return all(ok for ok, _value in results)

        return defer.DeferredList(calls, consumeErrors=True).addCallback(record)

    def then(group: list[IMessageSMTP], name: str) -> Callable[[bool], Any]:
        return lambda done: step(group, name, final=True) if done else False

    settled: defer.Deferred[Any] = step(staged, "prepare", final=False)
    settled.addCallback(then(plain, "eomReceived"))
    settled.addCallback(then(staged, "commit"))

    def report(_: object) -> list[tuple[bool, Any]]:
        left = (False, Failure(_NotStored()))
        return [outcome.get(id(message), left) for message in messages]

    return settled.addCallback(report)


# The key of the per-session memory of failed credentials: random per process and never
# written anywhere, so the digests say nothing outside this process.
_CREDENTIALS_KEY = secrets.token_bytes(32)


def _credentials_digest(username: str, password: str, proxy: bool) -> bytes:
    message = "\0".join((username, password, "proxy" if proxy else "")).encode("utf-8", "replace")
    return hmac.new(_CREDENTIALS_KEY, message, hashlib.sha256).digest()


def _tls_info(transport: Any) -> TLSInfo | None:
    try:
        connection = transport.getHandle()
        version = connection.get_protocol_version_name()
        cipher = connection.get_cipher_name()
    except Exception:  # not a TLS transport (yet); nothing to report
        return None
    return TLSInfo(str(version), str(cipher))


class SubmissionESMTP(protocol.Protocol, TimeoutMixin):
    """One submission session. Created by ``SubmissionFactory``."""

    # Twisted types this loosely; we use TCP/TLS transports (pause, resume, startTLS).
    transport: Any

    def __init__(
        self,
        config: Config,
        portal: Portal | None,
        tls_context: Any,
        implicit_tls: bool = False,
        server_key: bytes | None = None,
        sessions: SessionLimits | None = None,
        *,
        clock: IReactorTime | None = None,
    ) -> None:
        self.portal = portal  # None: no logins possible
        self.tls_context = tls_context  # None: no STARTTLS
        self.clock = clock if clock is not None else global_reactor()
        self.hostname = config.server.hostname
        self.host = self.hostname.encode("ascii")  # smtp.User reads it as the default domain
        self.implicit_tls = implicit_tls
        self.clientid_settings = config.clientid
        self.limits = config.limits
        self.max_auth_failures = config.auth.max_failures_per_session
        self.received_header_ip = config.server.received_header_ip
        self.throttle_action = config.throttle.action
        self.server_key = server_key
        self.sessions = sessions or SessionLimits(config.limits)
        self._counted_address: str | None = None  # this session is counted in ``sessions``
        self.events: IServerEvents = NO_EVENTS  # the factory's counter, if any
        self._listener = "submissions" if implicit_tls else "submission"
        self._counted_open = False  # told ``events`` of this session
        self._data_ended_at = 0.0  # clock at the end of DATA, for the reply's delay
        self._counted_device: str | None = None
        self._device_over_cap = False
        self._clientid: ClientIdentity | None = None

        self._inbuf = bytearray()
        self._skip_line = False  # inside an over-long command line (S8)
        self._waiting = False  # a command's Deferred is open (S9)
        self._paused = False
        self._in_process = False
        self._closing = False
        self._abort_later: IDelayedCall | None = None
        self._send: SendAtOnce | None = None  # the TCP connection's sender, if it is TCP
        self._nagle_back_in = 0  # replies until Nagle's algorithm is on again (STARTTLS)
        self._logout: Callable[[], None] | None = None  # the avatar's, once logged in
        self.input_mode = Mode.COMMAND
        self.errors = 0
        self.auth_failures = 0
        # Keyed hashes of the credentials that failed in this session (never the password):
        # a client that retries them (AUTH LOGIN after AUTH PLAIN) fails once, not twice.
        self._failed_credentials: set[bytes] = set()
        self._messages: list[IMessageSMTP] = []
        self.tls = False
        self.can_start_tls = False
        self.session_id = ""
        self._network = ""
        self._session_logged = False
        self._reset_session()

    # --- session state -----------------------------------------------------------

    def _forget_device(self) -> None:
        """Drop the client identity, and this session from its device's session count."""
        self._clientid = None
        self._device_over_cap = False
        if self._counted_device is not None:
            self.sessions.remove_device(self._counted_device)
            self._counted_device = None

    def _reset_session(self) -> None:
        """Forget everything a new TLS layer must not inherit (S2)."""
        self._forget_device()
        self._helo_name: str | None = None
        self._ehlo = False
        self._clientid_advertised = False
        self._clientid_done = False
        self._auth_seen = False
        self._login_user: str | None = None
        self.authenticated = False
        self.account: str | None = None
        self.delivery: IMessageDelivery | None = None
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        self._abort_messages()  # a transaction never ends with a message left open
        self._storage_failed = False  # a message store failed while the data came in
        self._sender: Path | None = None
        self._recipients: list[tuple[smtp.User, Callable[[], IMessageSMTP]]] = []
        self._messages = []
        self._body: BodyReader | None = None
        self._message_id = ""

    def _reset_greeting(self) -> None:
        """EHLO/HELO: a new transaction and a new client identity (C10); RSET keeps it."""
        self._reset_transaction()
        self._forget_device()
        self._clientid_done = False
        if not self.authenticated:
            self._auth_seen = False

    def _helo_pair(self) -> tuple[bytes, bytes]:
        """(HELO argument, client address): what Twisted's IMessageDelivery expects."""
        return ((self._helo_name or "").encode("ascii", "replace"), self._peer_host().encode())

    def _peer(self) -> IAddress:
        """The client's address: every cap, budget, log line and header asks here. Behind
        the PROXY protocol the transport reports the address the proxy sent."""
        return self.transport.getPeer()

    def _peer_host(self) -> str:
        return str(getattr(self._peer(), "host", "unknown"))

    # --- connection --------------------------------------------------------------

    def connectionMade(self) -> None:
        self._send = send_at_once(self.transport)  # replies leave when made, not a turn later
        self.tls = self.implicit_tls  # a WrappingFactory hides ISSLTransport: keep our own flag
        self.can_start_tls = self.tls_context is not None and not self.implicit_tls
        self.session_id = secrets.token_hex(6)
        self._network = network_prefix(self._peer_host())
        self.events.session_opened(self._listener)
        self._counted_open = True
        counted_as = session_address(self._peer_host())
        refused = self.sessions.open(counted_as, self, self._pushed_out)
        if refused is not None:
            self.reply(421, f"4.7.0 {self.hostname} Error: {refused}, try again later")
            self._close()
            return
        self._counted_address = counted_as
        self.reply(220, f"{self.hostname} ESMTP")  # S14: no software name or version
        self.setTimeout(self.limits.command_timeout)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._abort_later is not None:
            self._abort_later.cancel()
            self._abort_later = None
        self._closing = True
        if self._counted_open:
            self._counted_open = False
            self.events.session_closed(self._listener)
            if reason.check(TLSError) is not None:
                self.events.tls_failed()
        self._inbuf.clear()
        self._abort_messages()
        self._forget_device()
        self._release_session()
        self._log_session()  # a session that never got as far as CLIENTID or AUTH
        if self._logout is not None:
            logout, self._logout = self._logout, None
            logout()
        self.setTimeout(None)

    def _release_session(self) -> None:
        if self._counted_address is not None:
            self.sessions.close(self._counted_address, self)
            self._counted_address = None

    def _pushed_out(self) -> None:
        """The server is full and this session has not logged in: make room."""
        self._release_session()
        if not self._closing:
            self.reply(421, f"4.7.0 {self.hostname} Error: server busy, try again later")
            self._close()

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        """TimeoutMixin's timer, on the factory's clock rather than the global reactor."""
        return self.clock.callLater(period, func)

    def timeoutConnection(self) -> None:
        self.reply(421, f"4.4.2 {self.hostname} Error: timeout exceeded")
        self._close()

    def _close(self) -> None:
        self._closing = True
        self._inbuf.clear()
        self.transport.loseConnection()
        if self.tls and self._abort_later is None:
            # Over TLS, loseConnection waits for the client's close_notify, which an idle or
            # hostile client never sends (S13). Give the reply a moment to leave, then cut.
            self._abort_later = self.clock.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._abort_later = None
        self.transport.abortConnection()

    # --- replies -----------------------------------------------------------------

    def reply(self, code: int, text: str | list[str]) -> None:
        lines = text if isinstance(text, list) else [text]
        out = [
            f"{code}{'-' if i < len(lines) - 1 else ' '}{line}\r\n" for i, line in enumerate(lines)
        ]
        if self._nagle_back_in:
            self._nagle_back_in -= 1
            if not self._nagle_back_in and self._send is not None:
                self._send.nagle(True)  # the EHLO reply has left: see _past_the_tickets
        self.transport.write("".join(out).encode("utf-8", "replace"))

    def error(self, code: int, text: str) -> None:
        """An error reply that counts towards the session's limit (S13)."""
        self.reply(code, text)
        self.errors += 1
        if self.errors >= self.limits.max_errors:
            self.reply(421, f"4.7.0 {self.hostname} Error: too many errors")
            self._close()

    # --- input: bounded framing, one command at a time ---------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self.input_mode is Mode.DATA:
            self.resetTimeout()  # a body may stream for long; commands must complete (below)
        self._inbuf += data
        if self._waiting and len(self._inbuf) > MAX_PENDING_INPUT:
            # Reading is paused while a command runs; only a client ignoring that can get here.
            self.reply(421, f"4.7.0 {self.hostname} Error: too much pipelined input")
            self._close()
            return
        self._process()

    def _process(self) -> None:
        if self._in_process:
            return
        self._in_process = True
        try:
            while not self._waiting and not self._closing and self._inbuf:
                if self.input_mode is Mode.DATA:
                    if not self._process_data():
                        break
                elif not self._process_line():
                    break
        finally:
            self._in_process = False
        if self._waiting and self._inbuf and not self._paused and not self._closing:
            # Input came in behind a command still running: read no more until its reply
            # (S9). A client that waits for each reply (all do: no PIPELINING next to
            # CLIENTID) is never paused, which spares two epoll calls per command.
            self._paused = True
            self.transport.pauseProducing()

    def _line_limit(self, line: bytes | bytearray) -> int:
        """512 octets for a command; SASL lines (AUTH and its responses) may be longer."""
        if self.input_mode is not Mode.COMMAND or line[:5].upper() == b"AUTH ":
            return MAX_AUTH_LINE
        return MAX_COMMAND_LINE

    def _process_line(self) -> bool:
        """Take one line from the buffer and run it; False when no full line is there.

        Only CRLF ends a command line (RFC 5321 2.3.8): a bare CR or LF stays inside the
        line, where the command's own syntax check refuses it, so nothing can be smuggled
        in as a second command.
        """
        end = self._inbuf.find(b"\r\n")
        if end < 0:
            if len(self._inbuf) > self._line_limit(self._inbuf) + 1:
                # Keep a final CR: it may be the first half of the CRLF that ends the line.
                keep = self._inbuf[-1:] == b"\r"
                self._inbuf[:] = b"\r" if keep else b""
                if not self._skip_line:
                    self._skip_line = True
                    self._line_too_long()
            return False
        line = bytes(self._inbuf[:end])
        del self._inbuf[: end + 2]
        # The idle timer restarts per complete line, not per byte: a client that dribbles
        # a command one byte at a time still has to finish it within command_timeout.
        self.resetTimeout()
        if self._skip_line:
            self._skip_line = False
            return True
        if len(line) > self._line_limit(line):
            self._line_too_long()
            return True
        self._run(line)
        return True

    def _line_too_long(self) -> None:
        self.input_mode = Mode.COMMAND  # an over-long SASL response aborts the exchange
        self.error(500, "5.5.2 Line too long")

    def _run(self, line: bytes) -> None:
        try:
            if self.input_mode is Mode.COMMAND:
                result = self._command(line)
            else:
                result = self._auth_response(line)
        except Exception:
            log.failure("internal error in session {session}", session=self.session_id)
            self.reply(451, "4.3.0 Local error in processing")
            return
        if isinstance(result, defer.Deferred):
            self._waiting = True
            result.addErrback(self._internal_error)
            result.addBoth(self._resume)

    def _internal_error(self, failure: Failure) -> None:
        log.failure("internal error in session {session}", failure, session=self.session_id)
        if not self._closing:
            self.reply(451, "4.3.0 Local error in processing")

    def _resume(self, _: object) -> None:
        self._waiting = False
        if self._closing:
            return
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self._process()

    def _handler(self, command: bytes) -> Callable[[bytes], Any] | None:
        verb = command.decode("ascii", "replace").upper()
        if verb not in VERBS:
            return None
        return getattr(self, "do_" + verb)

    def _command(self, line: bytes) -> Any:
        verb, _, rest = line.strip(b" \t").partition(b" ")
        handler = self._handler(verb)
        if handler is None:
            self.error(*UNKNOWN_COMMAND)
            return None
        return handler(rest.strip(b" \t"))

    # --- greeting ----------------------------------------------------------------

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        ext: dict[bytes, list[bytes] | None] = {}
        clientid = self.tls and self.clientid_settings.advertised  # C1
        if not clientid or self.clientid_settings.pipelining:  # C2
            ext[b"PIPELINING"] = None
        ext[b"SIZE"] = [str(self.limits.max_message_size).encode()]
        ext[b"8BITMIME"] = None
        ext[b"ENHANCEDSTATUSCODES"] = None
        if self.can_start_tls and not self.tls:
            ext[b"STARTTLS"] = None
        if self.tls:  # S3: AUTH only under TLS
            ext[b"AUTH"] = [b"PLAIN", b"LOGIN"]
        if clientid:
            ext[b"CLIENTID"] = None
        return ext

    def _greeting_name(self, rest: bytes) -> str | None:
        try:
            name = rest.decode("ascii")
        except UnicodeDecodeError:
            return None
        if not name or any(not (0x21 <= ord(c) <= 0x7E) for c in name) or len(name) > 255:
            return None
        return name

    def do_EHLO(self, rest: bytes) -> None:
        name = self._greeting_name(rest)
        if name is None:
            self.error(501, "5.5.4 Syntax: EHLO hostname")
            return
        self._reset_greeting()
        self._helo_name, self._ehlo = name, True
        self._clientid_advertised = self.tls and self.clientid_settings.advertised
        lines = [f"{self.hostname}"]
        for keyword, params in self.extensions().items():
            lines.append(b" ".join([keyword, *(params or [])]).decode())
        self.reply(250, lines)

    def do_HELO(self, rest: bytes) -> None:
        name = self._greeting_name(rest)
        if name is None:
            self.error(501, "5.5.4 Syntax: HELO hostname")
            return
        self._reset_greeting()
        self._helo_name, self._ehlo = name, False
        self._clientid_advertised = False  # C4: HELO never advertises CLIENTID
        self.reply(250, self.hostname)

    # --- STARTTLS (S1, S2) -------------------------------------------------------

    def do_STARTTLS(self, rest: bytes) -> None:
        if self.tls:
            self.error(503, "5.5.1 TLS already active")
            return
        if rest:
            self.error(501, "5.5.4 Syntax: STARTTLS")
            return
        if not self.can_start_tls:
            self.reply(454, "4.7.0 TLS not available")
            return
        self.reply(220, "2.0.0 Ready to start TLS")
        # S2: whatever followed STARTTLS in plaintext is discarded, never run inside TLS.
        self._inbuf.clear()
        self._skip_line = False
        self.transport.startTLS(self.tls_context)
        self.tls = True
        self._past_the_tickets()
        self._reset_session()

    def _past_the_tickets(self) -> None:
        """Nagle's algorithm off from STARTTLS until the EHLO reply inside TLS has left.

        At the end of the handshake the server sends its TLS 1.3 session tickets; the
        EHLO reply follows a moment later, in its own write, while the tickets are not yet
        acknowledged. Nagle's algorithm then holds it until the client's delayed ACK, 40 ms
        later, in one session in two (issue 16). The replies inside TLS leave a reactor
        turn after they are made (Twisted gathers a turn's small TLS writes), so Nagle
        comes back on at the reply after that one: the client has read the EHLO reply by
        then. Off for the whole session, it costs 10-19% more CPU per session."""
        if self._send is not None and self._send.nagle(False):
            self._nagle_back_in = 2

    # --- CLIENTID (C1-C16) -------------------------------------------------------

    def do_CLIENTID(self, rest: bytes) -> None:
        if not self.tls or not self.clientid_settings.advertised:
            self.error(*UNKNOWN_COMMAND)  # C3: support is not revealed
        elif not self._clientid_advertised:
            self.error(503, "5.5.1 Send EHLO first")  # C4
        elif self._auth_seen or self.authenticated:
            self.error(503, "5.5.1 CLIENTID must come before AUTH")  # C7
        elif self._sender is not None:
            self.error(503, "5.5.1 CLIENTID not allowed during a mail transaction")  # C8
        elif self._clientid_done:
            self.error(503, "5.5.1 CLIENTID already given")  # C6
        else:
            try:
                identity = parse_clientid(rest)  # C5, C13
            except ClientIdSyntaxError as bad:
                self.error(501, f"5.5.4 {bad}")
                return
            self._accept_clientid(identity)
            self.reply(250, "2.0.0 OK")  # C9; C12: never refused here for policy

    def _accept_clientid(self, identity: ClientIdentity) -> None:
        flags = self.clientid_settings.flags_for(identity.type)  # C16
        self._clientid_done = True
        if "ignore" in flags:
            return  # treated as not presented, nothing kept
        self._clientid = identity
        if self.server_key is None:
            return
        key = device_key(self.server_key, identity)
        self._counted_device = key
        self._device_over_cap = not self.sessions.add_device(key)  # enforced at AUTH (C12)
        if "syslog" in flags and not self._session_logged:
            self._log_session(identity.type, fingerprint(key))
        elif "syslog" in flags:
            log.info(
                "clientid type={client_type} device={fingerprint} session={session}",
                client_type=identity.type,
                fingerprint=fingerprint(key),
                session=self.session_id,
            )

    def _log_session(self, client_type: str = "", device: str = "") -> None:
        """The session's line, once: at its first CLIENTID the type's ``syslog`` flag logs
        (with it, so one line rather than two), else at its first AUTH, else at its end.
        Issue 16: a line costs the reactor a format and a write."""
        if self._session_logged or not self.session_id:
            return
        self._session_logged = True
        port = self._listener
        if client_type:
            log.info(
                "session {session} from {network} on {port} clientid type={client_type}"
                " device={fingerprint}",
                session=self.session_id,
                network=self._network,
                port=port,
                client_type=client_type,
                fingerprint=device,
            )
        else:
            log.info(
                "session {session} from {network} on {port}",
                session=self.session_id,
                network=self._network,
                port=port,
            )

    # --- AUTH (S3, S4, C11, C12) ---------------------------------------------------

    def do_AUTH(self, rest: bytes) -> Any:
        self._log_session()  # before the verdict's line
        if not self.tls:
            self.error(*NEED_TLS)
            return None
        if self._helo_name is None:
            self.error(503, "5.5.1 Send EHLO first")
            return None
        if self.authenticated:
            self.error(503, "5.5.1 Already authenticated")
            return None
        if self._sender is not None:
            self.error(503, "5.5.1 AUTH not allowed during a mail transaction")
            return None
        self._auth_seen = True  # C7: any AUTH command closes the CLIENTID window
        if self._device_over_cap:
            self.reply(421, f"4.7.0 {self.hostname} Error: too many sessions for this device")
            self._close()
            return None
        parts = rest.split()
        if not parts or len(parts) > 2:
            self.error(501, "5.5.4 Syntax: AUTH mechanism [initial-response]")
            return None
        mechanism = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        if mechanism == b"PLAIN":
            if initial is None:
                self.input_mode = Mode.AUTH_PLAIN
                self.reply(334, "")
                return None
            return self._auth_plain(initial)
        if mechanism == b"LOGIN":
            if initial is None:
                self.input_mode = Mode.AUTH_LOGIN_USER
                self.reply(334, LOGIN_USERNAME_CHALLENGE.decode())
                return None
            return self._auth_login_user(initial)
        self.error(504, "5.5.4 Unrecognized authentication type")
        return None

    def _auth_response(self, line: bytes) -> Any:
        mode, self.input_mode = self.input_mode, Mode.COMMAND
        if line.strip() == b"*":
            self.error(501, "5.0.0 Authentication aborted")
            return None
        if mode is Mode.AUTH_PLAIN:
            return self._auth_plain(line)
        if mode is Mode.AUTH_LOGIN_USER:
            return self._auth_login_user(line)
        return self._auth_login_password(line)

    def _auth_plain(self, response: bytes) -> Any:
        try:
            plain = parse_plain(response)
        except SaslError as bad:
            self.error(501, str(bad))
            return None
        if plain.acting_for_other:
            # Acting for another user is not offered; refuse like any wrong password.
            return self._login(plain.username, "", proxy=True)
        return self._login(plain.username, plain.password)

    def _auth_login_user(self, response: bytes) -> None:
        try:
            self._login_user = decode_username(decode_response(response))
        except SaslError as bad:
            self.error(501, str(bad))
            return
        self.input_mode = Mode.AUTH_LOGIN_PASSWORD
        self.reply(334, LOGIN_PASSWORD_CHALLENGE.decode())

    def _auth_login_password(self, response: bytes) -> Any:
        username, self._login_user = self._login_user, None
        try:
            secret = decode_text(decode_response(response))
        except SaslError as bad:
            self.error(501, str(bad))
            return None
        if username is None:  # not reachable: the mode is set only after a user name
            self.error(501, "5.5.2 Malformed authentication response")
            return None
        return self._login(username, secret)

    def _login(self, username: str, password: str, proxy: bool = False) -> defer.Deferred[None]:
        if self.portal is None:
            self.reply(454, "4.7.0 Temporary authentication failure")
            return defer.succeed(None)
        credentials = ClientIdUsernamePassword(
            username=username,
            password=password,
            clientId=self._clientid,  # C11: kept for a retry after a failure
            peer=self._peer(),
            tls=_tls_info(self.transport),
            local=self.transport.getHost(),
        )
        if proxy:
            result: defer.Deferred[Any] = defer.fail(cred_error.UnauthorizedLogin())
        else:
            result = self.portal.login(credentials, credentials, IMessageDelivery)
        tried = _credentials_digest(username, password, proxy)
        result.addCallbacks(self._auth_succeeded, self._auth_failed, errbackArgs=(tried,))
        return result

    def _auth_succeeded(self, login: tuple[Any, IMessageDelivery, Callable[[], None]]) -> None:
        _interface, avatar, logout = login
        if self._closing:
            logout()
            return
        self.delivery = avatar
        self._logout = logout
        self.authenticated = True
        self.sessions.logged_in(self)
        self.account = _account_address(avatar)
        self.reply(235, "2.7.0 Authentication successful")

    def _count_failure(self, tried: bytes) -> None:
        """One more failed AUTH in this session, unless it retried failed credentials."""
        if tried not in self._failed_credentials:
            self._failed_credentials.add(tried)
            self.auth_failures += 1

    def _auth_failed(self, failure: Failure, tried: bytes) -> None:
        if self._closing:
            return
        if failure.check(LoginThrottled):
            self._count_failure(tried)
            if self.throttle_action == "421" or self.auth_failures >= self.max_auth_failures:
                self.reply(421, f"4.7.0 {self.hostname} Error: too many failed logins, try later")
                self._close()
            else:
                self.reply(454, "4.7.0 Too many failed logins, try again later")
            return
        if not failure.check(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials):
            if failure.check(OSError, AuthUnavailable):  # store locked, disk: expected
                log.error(
                    "authentication unavailable in session {session}: {problem}",
                    session=self.session_id,
                    problem=str(failure.value),
                )
            else:
                log.failure(
                    "authentication error in session {session}", failure, session=self.session_id
                )
            self.reply(454, "4.7.0 Temporary authentication failure")
            return
        self._count_failure(tried)
        self.reply(*AUTH_FAILED)  # C12: one reply for every refusal
        if self.auth_failures >= self.max_auth_failures:
            self.reply(421, f"4.7.0 {self.hostname} Error: too many failed authentications")
            self._close()

    # --- the mail transaction ----------------------------------------------------

    def _may_transact(self) -> bool:
        if not self.tls:
            self.error(*NEED_TLS)  # S3
        elif self._helo_name is None:
            self.error(503, "5.5.1 Send EHLO first")
        elif not self.authenticated:
            self.error(530, "5.7.0 Authentication required")  # S5
        else:
            return True
        return False

    def do_MAIL(self, rest: bytes) -> Any:
        if not self._may_transact():
            return None
        if self._sender is not None:
            self.error(503, "5.5.1 Nested MAIL command")
            return None
        try:
            path = parse_path(rest, "FROM", allow_null=True)
        except AddressSyntaxError as bad:
            self.error(501, f"5.5.4 Syntax: MAIL FROM:<address> ({bad})")
            return None
        for key, value in path.params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    self.error(501, "5.5.4 Syntax: SIZE=<number>")
                    return None
                if int(value) > self.limits.max_message_size:
                    self.reply(552, "5.3.4 Message size exceeds fixed maximum message size")  # S7
                    return None
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    self.error(501, "5.5.4 Syntax: BODY=7BIT or BODY=8BITMIME")
                    return None
            elif key != "AUTH":  # AUTH=<> is accepted and ignored (RFC 4954 5)
                self.error(555, f"5.5.4 Unsupported parameter {key}")
                return None
        try:
            origin = smtp.Address(path.address.encode("ascii"))
        except smtp.AddressError:
            self.error(553, "5.1.3 Sender address not supported")
            return None
        assert self.delivery is not None
        checked = defer.maybeDeferred(self.delivery.validateFrom, self._helo_pair(), origin)
        checked.addCallbacks(self._sender_ok, self._address_refused, callbackArgs=(path,))
        return checked

    def _sender_ok(self, _origin: object, path: Path) -> None:
        self._sender = path
        self._message_id = secrets.token_hex(8).upper()
        self.reply(250, "2.1.0 Ok")

    def _address_refused(self, failure: Failure) -> None:
        if failure.check(smtp.SMTPServerError):
            value: Any = failure.value
            self.error(value.code, _resp_text(value.resp))
        else:
            failure.raiseException()

    def do_RCPT(self, rest: bytes) -> Any:
        if not self._may_transact():
            return None
        if self._sender is None:
            self.error(503, "5.5.1 Need MAIL command")
            return None
        if len(self._recipients) >= self.limits.max_recipients:
            self.reply(452, "4.5.3 Too many recipients")
            return None
        try:
            path = parse_path(rest, "TO", allow_null=False)
        except AddressSyntaxError as bad:
            self.error(501, f"5.5.4 Syntax: RCPT TO:<address> ({bad})")
            return None
        if path.params:
            self.error(555, f"5.5.4 Unsupported parameter {next(iter(path.params))}")
            return None
        try:
            user = smtp.User(
                path.address.encode("ascii"), self._helo_pair(), self, self._sender.address
            )
        except smtp.AddressError:
            self.error(553, "5.1.3 Recipient address not supported")
            return None
        assert self.delivery is not None
        checked = defer.maybeDeferred(self.delivery.validateTo, user)
        checked.addCallbacks(self._recipient_ok, self._address_refused, callbackArgs=(user,))
        return checked

    def _recipient_ok(self, factory: Callable[[], IMessageSMTP], user: smtp.User) -> None:
        self._recipients.append((user, factory))
        self.reply(250, "2.1.5 Ok")

    def do_DATA(self, rest: bytes) -> None:
        if not self._may_transact():
            return
        if rest:
            self.error(501, "5.5.4 Syntax: DATA")
            return
        if self._sender is None:
            self.error(503, "5.5.1 Need MAIL command")
            return
        if not self._recipients:
            self.error(503, "5.5.1 Need RCPT command")
            return
        try:
            # A recipient named twice has one factory: one copy. Recipients that share
            # one stored copy (the outbound queue) return the same message object: it
            # must see each line once.
            opened = [factory() for factory in self._factories()]
            self._messages = list({id(m): m for m in opened}.values())
        except smtp.SMTPServerError as refused:
            self._abort_messages()
            self.reply(refused.code, _resp_text(refused.resp))
            self._reset_transaction()
            return
        except (OSError, LocalDeliveryError) as problem:
            self._abort_messages()
            log.error("cannot open mailbox: {problem}", problem=str(problem))
            self.reply(*LOCAL_ERROR)
            self._reset_transaction()
            return
        for line in self.received_header():
            self._write_line(line)
        self._body = BodyReader(
            self._write_line,
            self.limits.max_message_size,
            self.limits.max_line_length,
            self._write_block,
        )
        self.input_mode = Mode.DATA
        self.setTimeout(self.limits.data_timeout)
        self.reply(354, "End data with <CR><LF>.<CR><LF>")

    def _factories(self) -> list[Callable[[], IMessageSMTP]]:
        """The distinct message factories of the recipients, in RCPT order."""
        return list(dict.fromkeys(factory for _user, factory in self._recipients))

    def received_header(self) -> list[bytes]:
        """S15: names this server, ESMTPSA and the TLS version; no client identity, no IP."""
        helo = (self._helo_name or "unknown").translate({ord(c): "_" for c in '();\\"'})
        source = f"from {helo}"
        if self.received_header_ip:
            source += f" ([{self._peer_host()}])"
        tls = _tls_info(self.transport)
        tls_text = f" ({tls.version})" if tls else ""
        recipients = self._recipients
        single = len(self._factories()) == 1 and len(recipients) >= 1
        for_text = f" for <{recipients[0][0].dest}>" if single else ""
        return [
            f"Received: {source}".encode("ascii", "replace"),
            f"\tby {self.hostname} with ESMTPSA{tls_text}".encode("ascii", "replace"),
            f"\tid {self._message_id}{for_text};".encode("ascii", "replace"),
            f"\t{smtp.rfc822date().decode()}".encode("ascii"),
        ]

    def _write_line(self, line: bytes) -> None:
        self._to_messages(lambda message: message.lineReceived(line))

    def _write_block(self, data: bytes) -> None:
        """Many body lines at once, LF-terminated; messages without ``write_block``
        (Twisted's plain IMessage) get them line by line."""

        def write(message: IMessageSMTP) -> None:
            write_block = getattr(message, "write_block", None)
            if write_block is not None:
                write_block(data)
            else:
                for line in data.split(b"\n")[:-1]:
                    message.lineReceived(line)

        self._to_messages(write)

    def _to_messages(self, write: Callable[[IMessageSMTP], None]) -> None:
        """Hand data to every open message. A store that raises loses all the copies:
        the rest of the data is read and dropped, and the end of data gets a 451."""
        try:
            for message in self._messages:
                write(message)
        except Exception as problem:
            log.error(
                "storing a message failed in session {session}: {problem}",
                session=self.session_id,
                problem=_describe(problem),
            )
            self._storage_failed = True
            self._abort_messages()

    def _process_data(self) -> bool:
        assert self._body is not None
        consumed, done = self._body.feed(self._inbuf)
        del self._inbuf[:consumed]
        if done:
            self._run_end_of_data()
            return True
        return False

    def _run_end_of_data(self) -> None:
        """The end of data always gets a reply (S11): a refusal, 451 for our own trouble,
        or the outcome of storing the message."""
        self.input_mode = Mode.COMMAND
        self.setTimeout(self.limits.command_timeout)
        self._data_ended_at = self.clock.seconds()
        try:
            result = self._end_of_data()
        except Exception as problem:
            log.error(
                "end of data failed in session {session}: {problem}",
                session=self.session_id,
                problem=_describe(problem),
            )
            self.reply(*LOCAL_ERROR)
            return
        if result is not None:
            self._waiting = True
            result.addErrback(self._storing_failed)
            result.addBoth(self._resume)

    def _end_of_data(self) -> defer.Deferred[Any] | None:
        body, message_id, sender = self._body, self._message_id, self._sender
        recipients = len(self._factories())
        storage_failed = self._storage_failed
        # The messages are ours from here: each is either handed to its store
        # (eomReceived returned) or discarded, whatever is raised on the way.
        unsettled, self._messages = self._messages, []
        self._reset_transaction()
        try:
            assert body is not None and sender is not None
            refusal = self._refusal(body)
            if refusal is not None:
                self.error(*refusal)
                self._count_message("refused", 0)
                return None
            if storage_failed:
                self.reply(*LOCAL_ERROR)
                self._count_message("failed", 0)
                return None
            messages, unsettled = unsettled, []
        finally:
            for message in unsettled:
                _discard(message)
        stored = _store_all(messages)
        stored.addCallback(self._stored, messages, message_id, sender, recipients, body.size)
        return stored

    def _refusal(self, body: BodyReader) -> tuple[int, str] | None:
        if body.too_big:
            return 552, "5.3.4 Message size exceeds fixed maximum message size"  # S7
        if body.line_too_long:
            return 500, "5.5.2 Line too long"  # S8
        if body.bare_newline:
            return 550, "5.6.0 Bare CR or LF in message; use CRLF line endings"  # S10
        refusal = body.headers.refusal()  # malformed, duplicate or over-long author field
        if refusal is not None:
            return refusal
        try:
            authors = body.headers.author_addresses()
        except Exception as problem:  # a parser bug must still end in a reply
            log.warn(
                "unreadable author header in session {session}: {problem}",
                session=self.session_id,
                problem=type(problem).__name__,  # its text may quote the message
            )
            return 550, "5.6.0 Malformed From: header"
        check = getattr(self.delivery, "may_use_header_from", None)
        if authors is not None and check is not None and not check(authors):
            return 550, "5.7.1 From:/Sender: header address not owned by you"  # S6
        return None

    def _stored(
        self,
        results: list[tuple[bool, Any]],
        messages: list[IMessageSMTP],
        message_id: str,
        sender: Path,
        recipients: int,
        size: int,
    ) -> None:
        failures = [result for ok, result in results if not ok and not result.check(_NotStored)]
        for (ok, _result), message in zip(results, messages, strict=True):
            if not ok:
                # Its store has finished failing, or was never finished because another
                # copy failed: drop what it left open (a prepared copy's file).
                _discard(message)
        if failures:
            # One line for the message, not a traceback per recipient.
            delivered = sum(1 for ok, _result in results if ok)
            log.error(
                "delivery of {id} failed for {failed} of {copies} copies ({delivered} delivered"
                " all the same): {problem}",
                id=message_id,
                failed=len(failures),
                copies=len(results),
                delivered=delivered,
                problem=_describe(failures[0].value),
            )
        else:
            log.info(
                "accepted {id} from account={account} sender=<{sender}> recipients={recipients}"
                " size={size} session={session}",
                id=message_id,
                session=self.session_id,
                account=self.account,
                sender=sender.address,
                recipients=recipients,
                size=size,
            )
        self._count_message("failed" if failures else "accepted", size)
        if self._closing:
            return  # the client left; what was stored stays stored
        if not failures:
            self.reply(250, f"2.0.0 Ok: queued as {message_id}")  # S11: only once durable
            return
        refused = next((f.value for f in failures if f.check(smtp.SMTPServerError)), None)
        if refused is not None and 400 <= refused.code < 600:
            self.reply(refused.code, _resp_text(refused.resp))
        else:
            self.reply(*LOCAL_ERROR)  # S11

    def _count_message(self, result: str, size: int) -> None:
        self.events.message(result, size, self.clock.seconds() - self._data_ended_at)

    def _storing_failed(self, failure: Failure) -> None:
        """Our own reporting of a stored message failed: still one line and one reply."""
        log.error(
            "end of data failed in session {session}: {problem}",
            session=self.session_id,
            problem=_describe(failure.value),
        )
        if not self._closing:
            self.reply(*LOCAL_ERROR)

    def _abort_messages(self) -> None:
        messages, self._messages = self._messages, []
        for message in messages:
            _discard(message)

    # --- the rest (S12) ----------------------------------------------------------

    def do_RSET(self, rest: bytes) -> None:
        self._reset_transaction()  # C10: the client identity survives RSET
        self.reply(250, "2.0.0 Ok")

    def do_NOOP(self, rest: bytes) -> None:
        self.reply(250, "2.0.0 Ok")

    def do_QUIT(self, rest: bytes) -> None:
        self.reply(221, f"2.0.0 {self.hostname} closing connection")
        self._close()

    def do_HELP(self, rest: bytes) -> None:
        hidden = set() if self.tls and self.clientid_settings.advertised else {"CLIENTID"}  # C3
        commands = " ".join(sorted(VERBS - hidden))
        self.reply(214, f"2.0.0 See RFC 5321 and RFC 6409; commands: {commands}")

    def do_VRFY(self, rest: bytes) -> None:
        self.reply(252, "2.5.2 Cannot VRFY user, but will accept message and attempt delivery")

    def do_EXPN(self, rest: bytes) -> None:
        self.error(502, "5.5.1 EXPN not available")


class SubmissionFactory(protocol.ServerFactory):
    """Builds ``SubmissionESMTP`` sessions for one listener.

    Both listeners of a server share one ``SessionLimits``, so the caps count all
    sessions of the server.
    """

    protocol = SubmissionESMTP
    noisy = False

    def __init__(
        self,
        config: Config,
        portal: Portal | None,
        tls_context: Any,
        server_key: bytes | None = None,
        implicit_tls: bool = False,
        sessions: SessionLimits | None = None,
        *,
        reactor: IReactorTime | None = None,
    ) -> None:
        self.config = config
        # The one clock of every session's timers; tests give a task.Clock.
        self.reactor = reactor if reactor is not None else global_reactor()
        self.portal = portal
        self.tls_context = tls_context
        self.server_key = server_key
        self.implicit_tls = implicit_tls
        self.sessions = sessions or SessionLimits(config.limits)
        self.events: IServerEvents = NO_EVENTS  # set by the server when it counts

    def buildProtocol(self, addr: IAddress | None) -> SubmissionESMTP:
        session = SubmissionESMTP(
            self.config,
            self.portal,
            self.tls_context,
            self.implicit_tls,
            self.server_key,
            self.sessions,
            clock=self.reactor,
        )
        session.factory = self
        session.events = self.events
        return session
