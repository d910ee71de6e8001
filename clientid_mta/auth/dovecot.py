"""Passwords checked by Dovecot's auth service, over its authentication protocol.

The protocol (Dovecot's "auth-client" socket, protocol version 1.2) is tab-separated
lines. We send ``VERSION 1 2`` and ``CPID <pid>``; Dovecot answers ``VERSION``, its
``MECH`` lines, ``SPID``, ``CUID``, ``COOKIE`` and ``DONE``. Each check is then one
``AUTH <id> PLAIN service=smtp ... resp=<base64>`` line, answered by ``OK <id> ...``
or ``FAIL <id> ...`` (``temp`` in a FAIL: Dovecot's own backend is in trouble).
Requests are multiplexed over one connection by their id, the connection is kept and
opened again when lost, and every wait is bounded: Dovecot unreachable, slow or
confused is ``DovecotUnavailable``, which the checker turns into ``454 4.7.0``.

Dovecot sees the device only as its 16-hex fingerprint (``client_id=``, which its auth
policy forwards as ``device_id``), never the CLIENTID token.
"""

from __future__ import annotations

import base64
import itertools
import os
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

log = Logger()

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 2
MAX_LINE = 16384  # Dovecot's replies are short; a longer line is not Dovecot talking
MAX_ID = 2**31 - 1


class DovecotUnavailable(Exception):
    """Dovecot cannot answer now (unreachable, timed out, temporary failure)."""


@dataclass(frozen=True)
class LoginContext:
    """What Dovecot is told about one login (its log and auth policy see these)."""

    remote_host: str = ""
    remote_port: int = 0
    local_host: str = ""
    local_port: int = 0
    secured: bool = False
    session: str = ""
    device: str = ""  # the 16-hex fingerprint, "" without a usable CLIENTID


def _escape(value: str) -> str:
    """Dovecot's tab escaping: the protocol's separators cannot appear in a value."""
    return (
        value.replace("\x01", "\x011")
        .replace("\t", "\x01t")
        .replace("\r", "\x01r")
        .replace("\n", "\x01n")
    )


def auth_line(request_id: int, username: str, password: str, context: LoginContext) -> bytes:
    """The AUTH line of one PLAIN check (the SASL response carries both secrets)."""
    response = base64.b64encode(b"\0" + username.encode() + b"\0" + password.encode())
    fields = ["AUTH", str(request_id), "PLAIN", "service=smtp"]
    if context.local_host:
        fields.append(f"lip={context.local_host}")
    if context.remote_host:
        fields.append(f"rip={context.remote_host}")
    if context.local_port:
        fields.append(f"lport={context.local_port}")
    if context.remote_port:
        fields.append(f"rport={context.remote_port}")
    if context.secured:
        fields.append("secured")
    if context.session:
        fields.append(f"session={context.session}")
    if context.device:
        fields.append(f"client_id={context.device}")
    fields.append("resp=" + response.decode("ascii"))
    return "\t".join(_escape(f) for f in fields).encode("utf-8")


class DovecotAuthProtocol(LineOnlyReceiver):
    """One auth-client connection: the handshake, then requests answered by id."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self) -> None:
        self.ready: defer.Deferred[DovecotAuthProtocol] = defer.Deferred()
        self.mechanisms: set[str] = set()
        self._version_ok = False
        # Each waiting check, and the name it asked for.
        self._pending: dict[int, tuple[defer.Deferred[bool], str]] = {}
        self._ids = itertools.count(1)
        self.closed = False

    def connectionMade(self) -> None:
        self.sendLine(f"VERSION\t{PROTOCOL_MAJOR}\t{PROTOCOL_MINOR}".encode())
        self.sendLine(f"CPID\t{os.getpid()}".encode())

    def lineReceived(self, line: bytes) -> None:
        fields = line.decode("utf-8", "replace").split("\t")
        if not self.ready.called:
            self._handshake(fields)
            return
        if fields[0] in ("OK", "FAIL", "CONT") and len(fields) > 1 and fields[1].isdigit():
            self._answer(fields[0], int(fields[1]), fields[2:])
        # Anything else (a newer Dovecot's extra lines) says nothing about our requests.

    def _handshake(self, fields: list[str]) -> None:
        if fields[0] == "VERSION":
            if len(fields) < 2 or fields[1] != str(PROTOCOL_MAJOR):
                self._give_up(f"Dovecot speaks auth protocol {fields[1:]!r}, not 1.x")
                return
            self._version_ok = True
        elif fields[0] == "MECH" and len(fields) > 1:
            self.mechanisms.add(fields[1].upper())
        elif fields[0] == "DONE":
            if not self._version_ok:
                self._give_up("Dovecot sent no VERSION")
            elif "PLAIN" not in self.mechanisms:
                self._give_up("Dovecot does not offer PLAIN (auth_mechanisms)")
            else:
                self.ready.callback(self)

    def _give_up(self, problem: str) -> None:
        log.error("dovecot auth: {problem}", problem=problem)
        if not self.ready.called:
            self.ready.errback(DovecotUnavailable(problem))
        if self.transport is not None:
            self.transport.loseConnection()

    def _answer(self, verb: str, request_id: int, args: list[str]) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return  # timed out before: its answer no longer matters
        waiting, asked = pending
        if verb == "OK":
            # Dovecot may accept another name for the user it logs in (a default domain,
            # a domain it ignores): only the very name it accepted is that account here,
            # or a typed name could become an account (and a local domain) it is not.
            accepted = next((arg[5:] for arg in args if arg.startswith("user=")), "")
            waiting.callback(accepted.casefold() == asked.casefold())
        elif verb == "FAIL" and ("temp" in args or "code=temp_fail" in args):
            waiting.errback(DovecotUnavailable("Dovecot reported a temporary failure"))
        else:
            # FAIL, or CONT (PLAIN sends everything at once, so a CONT means Dovecot
            # wants something we never give): a refusal. Dovecot drops the CONT request
            # itself after its own timeout.
            waiting.callback(False)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._give_up("a line longer than any Dovecot sends")

    def check(self, username: str, password: str, context: LoginContext) -> defer.Deferred[bool]:
        """True (OK) or False (FAIL); DovecotUnavailable if the connection goes."""
        if self.closed:
            return defer.fail(DovecotUnavailable("the connection to Dovecot is closed"))
        request_id = next(self._ids)
        if request_id > MAX_ID:
            self._ids = itertools.count(1)  # ids only need to be unique among pending
            request_id = next(self._ids)
        answer: defer.Deferred[bool] = defer.Deferred(lambda _d: self._forget(request_id))
        self._pending[request_id] = (answer, username)
        self.sendLine(auth_line(request_id, username, password, context))
        return answer

    def _forget(self, request_id: int) -> None:
        self._pending.pop(request_id, None)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        if not self.ready.called:
            self.ready.errback(DovecotUnavailable("Dovecot closed the connection"))
        pending, self._pending = self._pending, {}
        for waiting, _asked in pending.values():
            waiting.errback(DovecotUnavailable("the connection to Dovecot was lost"))


def client_endpoint(reactor: Any, where: str, timeout: float) -> Any:
    """``unix:/path`` (or a bare path) or ``tcp:host:port`` as a client endpoint."""
    if where.startswith("tcp:"):
        host, _, port = where[4:].rpartition(":")
        return TCP4ClientEndpoint(reactor, host.strip("[]"), int(port), timeout=timeout)
    path = where[5:] if where.startswith("unix:") else where
    return UNIXClientEndpoint(reactor, path, timeout=timeout)


class DovecotAuth:
    """Checks passwords with Dovecot over one kept connection (reopened when lost).

    ``check`` runs on the reactor; ``verify`` is the blocking form the login threads
    call. Both bound their wait by ``timeout`` seconds.
    """

    def __init__(
        self, reactor: Any, where: str, timeout: float = 5.0, failure_delay: float = 2.0
    ) -> None:
        self.reactor = reactor
        self.where = where
        self.timeout = timeout
        # Dovecot's auth_failure_delay: what a wrong password costs in time.
        self.failure_delay = failure_delay
        self._endpoint = client_endpoint(reactor, where, timeout)
        self._connection: DovecotAuthProtocol | None = None
        self._connecting: list[defer.Deferred[DovecotAuthProtocol]] | None = None
        self._down_logged = False

    def _connected(self) -> defer.Deferred[DovecotAuthProtocol]:
        """The open connection, or a new one once its handshake is done."""
        if self._connection is not None and not self._connection.closed:
            return defer.succeed(self._connection)
        waiting: defer.Deferred[DovecotAuthProtocol] = defer.Deferred()
        if self._connecting is not None:
            self._connecting.append(waiting)
            return waiting
        self._connecting = [waiting]
        opened = self._endpoint.connect(quiet_factory(DovecotAuthProtocol))
        opened.addCallback(lambda protocol: protocol.ready)
        opened.addTimeout(self.timeout, self.reactor)
        opened.addBoth(self._opened)
        return waiting

    def _opened(self, result: DovecotAuthProtocol | Failure) -> None:
        waiting, self._connecting = self._connecting or [], None
        if isinstance(result, Failure):
            if not self._down_logged:
                self._down_logged = True
                log.error(
                    "dovecot auth {where} unreachable: {problem}",
                    where=self.where,
                    problem=result.getErrorMessage(),
                )
            for each in waiting:
                each.errback(DovecotUnavailable(f"Dovecot auth at {self.where} unreachable"))
            return
        if self._down_logged:
            self._down_logged = False
            log.info("dovecot auth {where} reachable again", where=self.where)
        self._connection = result
        for each in waiting:
            each.callback(result)

    def check(self, username: str, password: str, context: LoginContext) -> defer.Deferred[bool]:
        """On the reactor: Dovecot's verdict, or DovecotUnavailable within ``timeout``."""
        answer = self._connected().addCallback(lambda c: c.check(username, password, context))
        # Dovecot delays a FAIL by its auth_failure_delay (2 s by default): leave room.
        answer.addTimeout(self.timeout + self.failure_delay, self.reactor)
        return answer.addErrback(self._unavailable)

    @staticmethod
    def _unavailable(failure: Failure) -> Failure:
        if failure.check(DovecotUnavailable):
            return failure
        if failure.check(defer.TimeoutError, defer.CancelledError):
            raise DovecotUnavailable("Dovecot did not answer in time")
        raise DovecotUnavailable(failure.getErrorMessage())

    def verify(self, username: str, password: str, context: LoginContext) -> bool:
        """The blocking form, for the login threads (never call it on the reactor)."""
        from twisted.internet.threads import blockingCallFromThread
        from twisted.python import threadable

        if threadable.isInIOThread():  # it would wait for the reactor it blocks
            raise DovecotUnavailable("a blocking Dovecot check was called on the reactor")

        check: Any = self.check
        return bool(blockingCallFromThread(self.reactor, check, username, password, context))

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and connection.transport is not None:
            connection.transport.loseConnection()


def quiet_factory(protocol: type[Any]) -> Factory:
    """A client factory that does not log "Starting factory" for every connection."""
    factory = Factory.forProtocol(protocol)
    factory.noisy = False
    return factory
