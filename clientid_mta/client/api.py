"""The submission client's public API: ``send_message``, ``send_messages`` and
``sendmail``, with their argument checks and TLS options.

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

Everything is checked before connecting; the session itself is
``clientid_mta.client.protocol``. Certificates are verified (the name and the chain)
except in ``opportunistic`` mode. Every step has a timeout (``connect_timeout`` for the
TCP connection, ``timeout`` for each reply).
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer, ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.protocols.tls import TLSMemoryBIOFactory

from clientid_mta.client.protocol import CHUNK_SIZE, Job, Mail, Outcome, SubmissionClientFactory
from clientid_mta.client.results import ConnectionFailed, RecipientResult, SendFailed
from clientid_mta.global_reactor import global_reactor

TLS_MODES = ("starttls", "implicit", "opportunistic", "none")

_TYPE_RE = re.compile(r"[A-Za-z0-9-]{1,16}\Z")
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,128}\Z")
_ADDRESS_RE = re.compile(r"[\x21-\x7e]{1,254}\Z")  # printable ASCII, no space


@dataclass
class Transaction:
    """One message for ``send_messages``: the envelope and the message (bytes or a binary
    file, read from where it stands; the caller keeps ownership of the file)."""

    sender: str
    recipients: Sequence[str]
    message: bytes | BinaryIO


def valid_client_id(client_type: str, token: str) -> bool:
    """Whether ``(client_type, token)`` can be sent as CLIENTID: a type of 1-16 letters,
    digits or dashes, a token of 1-128 printable ASCII characters (no space)."""
    return bool(_TYPE_RE.match(client_type) and _TOKEN_RE.match(token))


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


def _mail(sender: str, recipients: Sequence[str], message: bytes | BinaryIO) -> Mail:
    if isinstance(recipients, str) or not recipients:
        raise ValueError("recipients must be a non-empty sequence of addresses")
    rcpts = tuple(_check_address(r, "recipient") for r in recipients)
    if isinstance(message, bytes | bytearray):
        source: BinaryIO = io.BytesIO(bytes(message))
        eight_bit: bool | None = not bytes(message).isascii()
    else:
        source, eight_bit = message, _has_8bit(message)
    return Mail(_check_address(sender, "sender", empty_ok=True), rcpts, source, eight_bit)


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
) -> Job:
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
        if not valid_client_id(client_type, token):
            raise ValueError("client_id must be (type: 1-16 of A-Z a-z 0-9 -, token: 1-128 VCHAR)")
    if not _ADDRESS_RE.match(helo):
        raise ValueError(f"helo {helo!r} must be a host name or address literal")
    return Job(
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
) -> Deferred[list[Outcome]]:
    """Check everything, then connect: one outcome per transaction (none: no connection)."""
    if reactor is None:
        reactor = cast(IReactorTCP, global_reactor())
    try:
        job = _job(host, port, transactions, **{"eod_421_is_result": False, **options})
    except (ValueError, TypeError, OSError) as problem:
        return defer.fail(problem)
    if not job.mails:
        return defer.succeed([])
    factory = SubmissionClientFactory(job, cast(IReactorTime, reactor))
    wrapped: Any = factory
    if job.tls == "implicit":  # the greeting comes after the handshake
        wrapped = TLSMemoryBIOFactory(job.tls_options, True, factory)
    factory.connector = reactor.connectTCP(job.host, job.port, wrapped, timeout=connect_timeout)
    return factory.deferred


def _unreadable_is_connection_failed(
    outcomes: list[Outcome],
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

    def only(outcomes: list[Outcome]) -> list[RecipientResult]:
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
