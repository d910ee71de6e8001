"""Local mail delivered by LMTP to Dovecot (``[delivery] lmtp``), instead of Maildir.

Dovecot's LMTP server answers the end of data once per accepted recipient (RFC 2033),
so its outcome is per recipient and cannot be made all-or-nothing the way our own
copies are (``smtp/staging.py``). What we do instead, so that nothing acknowledged is
lost and a client's retry duplicates nothing:

- The local recipients of one transaction share one message and one LMTP transaction
  (``LmtpTransaction``); it is delivered when the protocol *prepares* the copies, so a
  failure here stops the other copies (the queue's) from being committed.
- Our ``250`` comes only once Dovecot said ``250`` for every local recipient. Any other
  outcome is ``451 4.3.0`` (or Dovecot's own ``5xx`` when every recipient got one and
  none was delivered), and the client sends the message again.
- Every recipient Dovecot accepted is remembered (``Delivered``: a keyed digest of the
  account, the sender, the recipient and the message as the client sent it, i.e.
  without our ``Received:`` header) for a day: the retry skips them. In memory, per
  process: with several worker processes a retry that lands on another worker may
  deliver again to those recipients.

Connections are kept in a small pool and reused; one that Dovecot closed (a restart,
its idle timeout) is replaced on the next message. Every wait is bounded.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail.smtp import SMTPServerError
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from clientid_mta.auth.dovecot import client_endpoint, quiet_factory
from clientid_mta.smtp.errors import LocalDeliveryError
from clientid_mta.smtp.staging import IStagedMessage

log = Logger()

MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100
REMEMBER_FOR = 86400.0  # seconds a delivered recipient is remembered for a retry
REMEMBER_AT_MOST = 100_000


class LmtpUnavailable(LocalDeliveryError):
    """Dovecot's LMTP cannot take mail now (down, timed out, confused): 451 4.3.0."""


class LmtpRefused(SMTPServerError):
    """Dovecot refused every recipient for good: its 5xx passes on to the client (the
    wire answers an ``SMTPServerError`` with its code and text)."""


Reply = tuple[int, str]


class LmtpClientProtocol(LineOnlyReceiver):
    """One LMTP connection: commands one at a time, each answered by one reply (the
    end of data by one reply per accepted recipient)."""

    delimiter = b"\r\n"
    MAX_LENGTH = MAX_REPLY_LINE

    def __init__(self) -> None:
        self._waiting: list[defer.Deferred[Reply]] = []
        self._lines: list[str] = []
        self.closed = False
        self.extensions: set[str] = set()

    def connectionMade(self) -> None:
        pass  # the greeting is the first reply the pool waits for

    def expect(self) -> defer.Deferred[Reply]:
        waiting: defer.Deferred[Reply] = defer.Deferred()
        if self.closed:
            waiting.errback(LmtpUnavailable("the LMTP connection is closed"))
        else:
            self._waiting.append(waiting)
        return waiting

    def command(self, line: str) -> defer.Deferred[Reply]:
        answer = self.expect()
        if not self.closed:
            self.sendLine(line.encode("utf-8"))
        return answer

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if len(text) < 3 or not text[:3].isdigit() or text[3:4] not in ("", " ", "-"):
            self._broken("a reply that is not LMTP")
            return
        self._lines.append(text[4:])
        if len(self._lines) > MAX_REPLY_LINES:
            self._broken("a reply of too many lines")
            return
        if text[3:4] == "-":
            return
        lines, self._lines = self._lines, []
        if not self._waiting:
            self._broken("a reply nobody asked for")
            return
        self._waiting.pop(0).callback((int(text[:3]), "\n".join(lines)))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._broken("a reply line too long")

    def give_up(self) -> None:
        """Out of step with the server (a reply came too late): closed, never reused."""
        self.closed = True
        if self.transport is not None:
            self.transport.loseConnection()

    def _broken(self, problem: str) -> None:
        log.error("lmtp: {problem}; closing the connection", problem=problem)
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        waiting, self._waiting = self._waiting, []
        for each in waiting:
            each.errback(LmtpUnavailable("the LMTP connection was lost"))

    def send_data(self, data: bytes) -> None:
        """The message, CRLF line ends and dot-stuffed, then the final dot."""
        if self.transport is not None and not self.closed:
            self.transport.write(dot_stuffed(data))


def dot_stuffed(data: bytes) -> bytes:
    """LF-ended lines as the DATA of SMTP/LMTP: CRLF, leading dots doubled, final dot."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"


@dataclass
class Outcome:
    """Dovecot's reply for each recipient (the RCPT reply when it refused there)."""

    replies: dict[str, Reply] = field(default_factory=dict)

    @property
    def delivered(self) -> list[str]:
        return [r for r, (code, _text) in self.replies.items() if 200 <= code < 300]


class LmtpPool:
    """Up to ``size`` LMTP connections to one Dovecot, reused between messages."""

    def __init__(
        self, reactor: Any, where: str, hostname: str, timeout: float = 30.0, size: int = 10
    ) -> None:
        self.reactor = reactor
        self.where = where
        self.hostname = hostname
        self.timeout = timeout
        self._endpoint = client_endpoint(reactor, where, timeout)
        self._idle: list[LmtpClientProtocol] = []
        self._slots = defer.DeferredSemaphore(size)

    def deliver(self, sender: str, recipients: list[str], data: bytes) -> defer.Deferred[Outcome]:
        """One LMTP transaction; LmtpUnavailable when Dovecot cannot take it."""
        return self._slots.run(self._deliver_with_retry, sender, recipients, data)

    @defer.inlineCallbacks
    def _deliver_with_retry(self, sender: str, recipients: list[str], data: bytes) -> Any:
        reused = bool(self._idle)
        try:
            outcome = yield self._deliver(sender, recipients, data)
        except LmtpUnavailable:
            if not reused:
                raise
            # A kept connection Dovecot had closed (restart, idle timeout): once more,
            # on a new one. Nothing was delivered: it failed before the end of data.
            self.close()  # the other kept ones are likely closed too
            outcome = yield self._deliver(sender, recipients, data)
        return outcome

    @defer.inlineCallbacks
    def _deliver(self, sender: str, recipients: list[str], data: bytes) -> Any:
        connection = yield self._connection()
        done = False
        try:
            outcome = yield self._transaction(connection, sender, recipients, data)
            done = True
            return outcome
        finally:
            if done and not connection.closed:
                self._idle.append(connection)
            elif connection.transport is not None:
                connection.transport.loseConnection()

    @defer.inlineCallbacks
    def _connection(self) -> Any:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
        try:
            opening = self._endpoint.connect(quiet_factory(LmtpClientProtocol))
            connection = yield opening.addTimeout(self.timeout, self.reactor)
        except Exception as problem:
            raise LmtpUnavailable(f"cannot connect to LMTP at {self.where}: {problem}") from None
        try:
            greeting = yield self._bounded(connection.expect())
            if greeting[0] != 220:
                raise LmtpUnavailable(f"LMTP greeting {greeting[0]}")
            code, text = yield self._bounded(connection.command(f"LHLO {self.hostname}"))
            if code != 250:
                raise LmtpUnavailable(f"LMTP LHLO answered {code}")
        except BaseException:
            if connection.transport is not None:
                connection.transport.loseConnection()
            raise
        connection.extensions = {line.split()[0].upper() for line in text.split("\n") if line}
        return connection

    def _bounded(self, waiting: defer.Deferred[Reply]) -> defer.Deferred[Reply]:
        waiting.addTimeout(self.timeout, self.reactor)

        def timed_out(failure: Failure) -> Failure:
            if failure.check(defer.TimeoutError, defer.CancelledError):
                raise LmtpUnavailable("LMTP did not answer in time")
            return failure

        return waiting.addErrback(timed_out)

    @defer.inlineCallbacks
    def _transaction(
        self, connection: LmtpClientProtocol, sender: str, recipients: list[str], data: bytes
    ) -> Any:
        body = " BODY=8BITMIME" if "8BITMIME" in connection.extensions and _eight_bit(data) else ""
        code, text = yield self._bounded(connection.command(f"MAIL FROM:<{sender}>{body}"))
        if code != 250:
            yield self._bounded(connection.command("RSET"))
            if code >= 500:
                return Outcome({r: (code, text) for r in recipients})
            raise LmtpUnavailable(f"LMTP MAIL answered {code} {text}")
        outcome = Outcome()
        accepted = []
        for recipient in recipients:
            reply = yield self._bounded(connection.command(f"RCPT TO:<{recipient}>"))
            if reply[0] == 250:
                accepted.append(recipient)
            else:
                outcome.replies[recipient] = reply
        if not accepted:
            yield self._bounded(connection.command("RSET"))
            return outcome
        code, text = yield self._bounded(connection.command("DATA"))
        if code != 354:
            raise LmtpUnavailable(f"LMTP DATA answered {code} {text}")
        replies = [connection.expect() for _ in accepted]
        connection.send_data(data)
        lost: LmtpUnavailable | None = None
        for recipient, waiting in zip(accepted, replies, strict=True):
            if lost is None:
                try:
                    outcome.replies[recipient] = yield self._bounded(waiting)
                    continue
                except LmtpUnavailable as problem:
                    # Lost or late after the data: those that answered 250 have the
                    # message (and must be remembered as delivered); the rest are
                    # deferred at once, and the connection, out of step with Dovecot's
                    # replies now, is never used again.
                    lost = problem
                    connection.give_up()
            waiting.addErrback(lambda _failure: None)
            outcome.replies[recipient] = (451, f"4.3.0 {lost}")
        return outcome

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            if connection.transport is not None:
                connection.transport.loseConnection()


def _eight_bit(data: bytes) -> bool:
    return any(byte >= 0x80 for byte in data)


class Delivered:
    """The recipients Dovecot took a message for, so the client's retry skips them.

    Keys are HMAC-SHA256 under a per-process secret of (account, sender, recipient,
    digest of the message as the client sent it); nothing else is kept. Bounded in
    time and count."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._secret = secrets.token_bytes(32)
        self._clock = clock
        self._entries: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def _key(self, account: str, sender: str, recipient: str, digest: bytes) -> bytes:
        text = "\0".join((account, sender, recipient.lower())).encode("utf-8", "replace")
        return hmac.new(self._secret, text + b"\0" + digest, hashlib.sha256).digest()

    def remember(self, account: str, sender: str, recipient: str, digest: bytes) -> None:
        key = self._key(account, sender, recipient, digest)
        with self._lock:
            now = self._clock()
            self._entries.pop(key, None)
            self._entries[key] = now + REMEMBER_FOR
            while self._entries and (
                len(self._entries) > REMEMBER_AT_MOST or next(iter(self._entries.values())) <= now
            ):
                self._entries.popitem(last=False)

    def already(self, account: str, sender: str, recipient: str, digest: bytes) -> bool:
        key = self._key(account, sender, recipient, digest)
        with self._lock:
            expires = self._entries.get(key)
            return expires is not None and expires > self._clock()


class LmtpDelivery:
    """The LMTP side of the server: the pool, the retry memory, the transactions."""

    def __init__(self, pool: LmtpPool) -> None:
        self.pool = pool
        self.delivered = Delivered()

    def transaction(self, sender: str, account: str) -> LmtpTransaction:
        return LmtpTransaction(self, sender, account)

    def deliver_bytes(self, domain: str, localpart: str, data: bytes) -> None:
        """A whole message (a notice, a bounce) for one local mailbox. Blocking: from a
        thread, like ``MaildirRoot.deliver_bytes``; LocalDeliveryError if not taken."""
        from twisted.internet.threads import blockingCallFromThread
        from twisted.python import threadable

        if threadable.isInIOThread():  # it would wait for the reactor it blocks
            raise LmtpUnavailable("a blocking LMTP delivery was called on the reactor")
        recipient = f"{localpart}@{domain}"
        deliver: Any = self.pool.deliver
        outcome = blockingCallFromThread(self.pool.reactor, deliver, "", [recipient], data)
        if recipient not in outcome.delivered:
            raise LmtpUnavailable(f"LMTP did not take the message: {outcome.replies}")


class LmtpTransaction:
    """The local recipients of one MAIL transaction: one shared message."""

    def __init__(self, lmtp: LmtpDelivery, sender: str, account: str) -> None:
        self.lmtp = lmtp
        self.sender = sender
        self.account = account
        self.message: LmtpMessage | None = None

    def recipient(self, address: str) -> Callable[[], LmtpMessage]:
        """The message factory for one local recipient (``address`` as the client gave it)."""

        def open_message() -> LmtpMessage:
            if self.message is None:
                self.message = LmtpMessage(self.lmtp, self.sender, self.account)
            if address not in self.message.recipients:
                self.message.recipients.append(address)
            return self.message

        return open_message


@implementer(IStagedMessage)
class LmtpMessage:
    """One message for all the local recipients of a transaction, delivered by LMTP
    when the protocol prepares the copies (see the module docstring)."""

    def __init__(self, lmtp: LmtpDelivery, sender: str, account: str) -> None:
        self.lmtp = lmtp
        self.sender = sender
        self.account = account
        self.recipients: list[str] = []
        self._data = bytearray()
        self._digest = hashlib.sha256()
        self._in_our_header: bool | None = None  # None: the first line not seen yet
        self._outcome: defer.Deferred[None] | None = None

    def lineReceived(self, line: bytes) -> None:
        self._add(line + b"\n")

    def write_block(self, data: bytes) -> None:
        self._add(data)

    def _add(self, data: bytes) -> None:
        self._data += data
        if self._in_our_header is False:
            self._digest.update(data)
            return
        # The digest leaves out our Received: header (it differs on a retry): its first
        # line, and the folded lines that follow it, come first, one call each.
        if self._in_our_header is None:
            self._in_our_header = data.startswith(b"Received:")
            if not self._in_our_header:
                self._digest.update(data)
        elif data[:1] in (b"\t", b" ") and data.count(b"\n") == 1:
            pass  # a folded line of our header (they come one line a call)
        else:
            self._in_our_header = False
            self._digest.update(data)

    def prepare(self) -> defer.Deferred[None]:
        if self._outcome is None:
            self._outcome = self._deliver()
        return self._outcome

    def commit(self) -> defer.Deferred[None]:
        return defer.succeed(None)  # delivered (or refused) when prepared

    def eomReceived(self) -> defer.Deferred[None]:
        return self.prepare()

    def connectionLost(self) -> None:
        self._data = bytearray()

    @defer.inlineCallbacks
    def _deliver(self) -> Any:
        digest = self._digest.digest()
        memory = self.lmtp.delivered
        account, sender = self.account, self.sender
        left = [r for r in self.recipients if not memory.already(account, sender, r, digest)]
        if not left:
            return None  # a retry of what Dovecot took before
        outcome = yield self.lmtp.pool.deliver(sender, left, bytes(self._data))
        for recipient in outcome.delivered:
            memory.remember(account, sender, recipient, digest)
        failed = {r: reply for r, reply in outcome.replies.items() if not 200 <= reply[0] < 300}
        if not failed:
            return None
        log.warn(
            "lmtp: {failed} of {count} recipients not delivered: {replies}",
            failed=len(failed),
            count=len(left),
            replies=[f"{code} {text}" for code, text in failed.values()],
        )
        code, text = next(iter(failed.values()))
        if not outcome.delivered and all(c >= 500 for c, _t in failed.values()):
            raise LmtpRefused(code, text)
        raise LmtpUnavailable(f"LMTP deferred {len(failed)} recipients: {code} {text}")
