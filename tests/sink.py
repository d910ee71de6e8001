"""A test SMTP peer ("sink") on loopback, for the outbound relay's end-to-end tests.

In the test process (the reactor runs in a background thread, see ``conftest``)::

    with running_sink(tmp_path, tls="starttls", auth=("relay", "pw"),
                      rcpt_replies={"gone@example.net": (550, "5.1.1 No such user")}) as sink:
        ...  # point the relay at 127.0.0.1:sink.port, trusting sink.ca_file
        [message] = sink.wait_for(1)
        sink.stop(); sink.start()  # "smarthost down, then up" on the same port
        sink.set(data_reply=(451, "4.3.0 Try later"))  # change the script at run time

As a subprocess, so it keeps running (and keeps its record) while the server under test is
killed: ``python -m tests.sink --port P --record FILE ...`` (see ``main``), or
``with sink_process(tmp_path, "--auth", "relay:pw") as sink:`` from a test.

A message is recorded once its end-of-data reply is a 2xx, BEFORE that reply is sent: in
memory, and with ``record`` as a JSON line appended and fsynced (``read_record`` reads it).
"""

from __future__ import annotations

import argparse
import base64
import copy
import datetime
import email
import email.message
import email.policy
import ipaddress
import json
import os
import re
import select
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL.crypto import X509, PKey
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.protocol import ServerFactory
from twisted.internet.ssl import CertificateOptions
from twisted.protocols.basic import LineReceiver

from tests.typed_reactor import blockingCallFromThread, reactor

Reply = tuple[int, str]
RcptReplies = Mapping[str, Reply] | Callable[[str], Reply | None]
DataReply = Reply | Callable[["Message"], Reply]
T = TypeVar("T")

TLS_MODES = ("starttls", "none", "implicit")
MAX_RECIPIENTS = 1000
MAX_ERRORS = 50  # per session, then 421 and close
MAX_COMMANDS = 1000  # recorded per session
CLIENTID_TYPE = re.compile(r"[A-Za-z0-9-]{1,16}")
CLIENTID_TOKEN = re.compile(r"[\x21-\x7e]{1,128}")
ADDRESS = re.compile(r"(?i)(FROM|TO):\s*<([^<>]*)>(.*)")
READY_TIMEOUT = 20.0


@dataclass(frozen=True)
class SinkConfig:
    """What the sink offers and how it answers; read afresh for every command."""

    hostname: str = "smtp.example.net"
    tls: str = "starttls"  # starttls | none (STARTTLS not offered) | implicit
    cert_names: tuple[str, ...] | None = None  # certificate names; None: (hostname, 127.0.0.1)
    auth: tuple[str, str] | None = None  # (user, password): AUTH PLAIN/LOGIN required, after TLS
    advertise_clientid: bool = False  # CLIENTID in the EHLO reply after TLS
    pipelining: bool = False
    greeting: Reply = (220, "")  # a non-220 greeting is sent and the connection closed
    mail_reply: Reply = (250, "2.1.0 OK")
    rcpt_replies: RcptReplies = field(default_factory=dict)  # recipient -> reply; default 250
    data_reply: DataReply = (250, "2.0.0 OK")  # or message -> reply
    drop_after_data: bool = False  # close after the final dot, no reply
    max_line: int = 8192
    max_message: int = 10 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {TLS_MODES}, not {self.tls!r}")


@dataclass
class Message:
    """One accepted message (its end-of-data reply was a 2xx)."""

    session: str
    mail_from: str
    rcpt_to: list[str]
    data: bytes
    tls: bool
    auth_user: str | None
    clientid: tuple[str, str] | None  # (TYPE upper-cased, token)
    helo: str
    quit: bool = False  # the session later ended with QUIT
    at: float = field(default_factory=time.time)  # when it was accepted (before the 250)

    def parsed(self) -> email.message.EmailMessage:
        parsed = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(parsed, email.message.EmailMessage)
        return parsed

    def to_json(self) -> dict[str, Any]:
        fields = asdict(self)
        fields["data"] = base64.b64encode(self.data).decode()
        return {"type": "message", **fields}

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> Message:
        fields = {key: value for key, value in fields.items() if key != "type"}
        fields["data"] = base64.b64decode(fields["data"])
        fields["clientid"] = tuple(fields["clientid"]) if fields["clientid"] else None
        return cls(**fields)


@dataclass
class Session:
    """One connection: what was said, in order (verbs only; never credentials)."""

    id: str
    peer: str
    tls: bool
    commands: list[str] = field(default_factory=list)  # e.g. EHLO STARTTLS EHLO CLIENTID AUTH
    helo: str = ""
    auth_user: str | None = None
    auth_failures: int = 0
    clientid: tuple[str, str] | None = None
    dropped: int = 0  # messages whose final dot was answered by closing (drop_after_data)
    quit: bool = False
    closed: bool = False


def read_record(path: Path) -> list[Message]:
    """The messages of a ``--record`` file, with ``quit`` set from its quit lines."""
    messages: list[Message] = []
    quits: set[str] = set()
    if not path.exists():
        return messages
    for line in path.read_text().splitlines():
        if not line.endswith("}"):
            continue  # a line cut short by a crash of the writer
        entry = json.loads(line)
        if entry["type"] == "quit":
            quits.add(entry["session"])
        else:
            messages.append(Message.from_json(entry))
    for message in messages:
        message.quit = message.session in quits
    return messages


def wait_until(
    probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.02
) -> T:
    """Poll ``probe`` until it returns something other than None, or time out.

    The one place tests sleep: for what only polling can see (another process's output
    or files, a port that starts to accept). Never wait here for something not to happen.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --- certificates -------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    temporary.replace(path)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


class SinkCA:
    """A throwaway CA in ``directory`` (ca.pem, ca.key), created on first use, then reused,
    so several sinks (mx1, mx2, a smarthost) can share one trust-roots file."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = directory / "ca.pem"
        key_file = directory / "ca.key"
        if self.ca_file.exists() and key_file.exists():
            key = serialization.load_pem_private_key(key_file.read_bytes(), None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            self.key = key
            self.cert = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
            return
        self.key = ec.generate_private_key(ec.SECP256R1())
        public = self.key.public_key()
        self.cert = (
            self._builder(_name("clientid-mta test sink CA"), public)
            .issuer_name(_name("clientid-mta test sink CA"))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), False)
            .sign(self.key, hashes.SHA256())
        )
        _write_atomically(key_file, _pem_key(self.key))
        _write_atomically(self.ca_file, self.cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _builder(subject: x509.Name, public: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        )

    def issue(self, names: Sequence[str], directory: Path) -> tuple[Path, Path]:
        """A server certificate for ``names`` (DNS names or IP addresses): (cert, key) files."""
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            self._builder(_name(names[0]), key.public_key())
            .issuer_name(self.cert.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_file, key_file = directory / "cert.pem", directory / "key.pem"
        _write_atomically(key_file, _pem_key(key))
        _write_atomically(cert_file, cert.public_bytes(serialization.Encoding.PEM))
        return cert_file, key_file


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# --- the protocol ---------------------------------------------------------------------


def _reply_lines(code: int, texts: Sequence[str]) -> bytes:
    last = len(texts) - 1
    return b"".join(
        f"{code}{' ' if i == last else '-'}{text}".rstrip().encode() + b"\r\n"
        for i, text in enumerate(texts)
    )


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        return None


class SinkProtocol(LineReceiver):
    """One SMTP session: just enough of RFC 5321/3207/4954 and CLIENTID to test a client."""

    delimiter = b"\r\n"
    factory: SinkFactory
    transport: ITLSTransport  # TCP (with startTLS), or TLS over it: set before connectionMade

    def connectionMade(self) -> None:
        self.sink = self.factory.sink
        self.MAX_LENGTH = self.config.max_line
        self.tls = self.config.tls == "implicit"
        self.closing = False
        self.errors = 0
        self.helo: str | None = None
        self.clientid_advertised = False
        self.clientid: tuple[str, str] | None = None
        self.auth_seen = False
        self.auth_user: str | None = None
        self.auth_step: Callable[[str], None] | None = None
        self.in_data = False
        self.reset_transaction()
        peer = self.transport.getPeer()
        assert isinstance(peer, IPv4Address)  # it listens on 127.0.0.1
        self.session = self.sink.new_session(f"{peer.host}:{peer.port}", self.tls)
        self.sink.connections.add(self)
        code, text = self.config.greeting
        self.reply(code, text or f"{self.config.hostname} ESMTP test sink")
        if code != 220:
            self.close()

    @property
    def config(self) -> SinkConfig:
        return self.sink.config

    def connectionLost(self, reason: object = None) -> None:
        self.sink.connections.discard(self)
        self.sink.update(self.session, closed=True)

    def reset_transaction(self) -> None:
        self.mail_from: str | None = None
        self.rcpt_to: list[str] = []
        self.data: list[bytes] = []
        self.data_size = 0

    def reply(self, code: int, *texts: str) -> None:
        if not self.closing:
            self.transport.write(_reply_lines(code, texts))

    def error(self, code: int, text: str) -> None:
        self.errors += 1
        self.reply(code, text)
        if self.errors >= MAX_ERRORS:
            self.reply(421, "4.7.0 Too many errors")
            self.close()

    def close(self) -> None:
        self.closing = True
        self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.reply(500, "5.5.2 Line too long")
        self.close()

    def lineReceived(self, line: bytes) -> None:
        if self.closing:
            return
        try:
            if self.in_data:
                self.data_line(line)
            elif self.auth_step is not None:
                step, self.auth_step = self.auth_step, None
                step(line.decode("latin-1"))
            else:
                self.command(line.decode("latin-1"))
        except Exception:
            self.sink.note_error(traceback.format_exc())
            self.reply(451, "4.3.0 Internal error in the test sink")

    def command(self, line: str) -> None:
        verb, _, rest = line.partition(" ")
        verb = verb.upper()
        handler = getattr(self, f"do_{verb}", None) if verb.isalpha() else None
        self.sink.command(self.session, verb[:16] if verb.isalpha() else "?")
        if handler is None:
            self.error(500, "5.5.1 Unknown command")
        else:
            handler(rest.strip())

    # --- session commands --------------------------------------------------------------

    def do_HELO(self, rest: str) -> None:
        self.greet(rest)
        self.clientid_advertised = False
        self.reply(250, self.config.hostname)

    def do_EHLO(self, rest: str) -> None:
        self.greet(rest)
        config = self.config
        self.clientid_advertised = self.tls and config.advertise_clientid
        lines = [config.hostname, f"SIZE {config.max_message}", "8BITMIME", "ENHANCEDSTATUSCODES"]
        lines += ["PIPELINING"] if config.pipelining else []
        lines += ["STARTTLS"] if config.tls == "starttls" and not self.tls else []
        lines += ["AUTH PLAIN LOGIN"] if config.auth and self.tls else []
        lines += ["CLIENTID"] if self.clientid_advertised else []
        self.reply(250, *lines)

    def greet(self, name: str) -> None:
        self.helo = name
        self.clientid = None
        self.reset_transaction()
        self.sink.update(self.session, helo=name, clientid=None)

    def do_STARTTLS(self, rest: str) -> None:
        if self.tls:
            self.error(503, "5.5.1 TLS already active")
        elif self.config.tls != "starttls":
            self.error(500, "5.5.1 Unknown command")
        elif rest:
            self.error(501, "5.5.4 No parameters allowed")
        else:
            self.reply(220, "2.0.0 Ready to start TLS")
            self.clearLineBuffer()  # plaintext sent after STARTTLS is never executed
            self.transport.startTLS(self.sink.tls_options)
            self.tls = True
            self.helo = None
            self.clientid_advertised = False
            self.clientid = None
            self.auth_seen = False
            self.auth_user = None
            self.reset_transaction()
            self.sink.update(self.session, tls=True, helo="", clientid=None, auth_user=None)

    def do_CLIENTID(self, rest: str) -> None:
        args = rest.split(" ")
        if not self.clientid_advertised:
            self.error(500, "5.5.1 Unknown command")
        elif self.auth_seen:
            self.error(503, "5.5.1 CLIENTID must come before AUTH")
        elif self.mail_from is not None:
            self.error(503, "5.5.1 CLIENTID not allowed during a mail transaction")
        elif self.clientid is not None:
            self.error(503, "5.5.1 CLIENTID already given")
        elif (
            len(args) != 2
            or not CLIENTID_TYPE.fullmatch(args[0])
            or not CLIENTID_TOKEN.fullmatch(args[1])
        ):
            self.error(501, "5.5.4 Syntax: CLIENTID <type> <token>")
        else:
            self.clientid = (args[0].upper(), args[1])
            self.sink.update(self.session, clientid=self.clientid)
            self.reply(250, "2.0.0 OK")

    def do_AUTH(self, rest: str) -> None:
        mechanism, _, initial = rest.partition(" ")
        if not self.config.auth:
            self.error(502, "5.5.1 AUTH not available")
        elif not self.tls:
            self.error(530, "5.7.0 Must issue a STARTTLS command first")
        elif self.auth_user is not None:
            self.error(503, "5.5.1 Already authenticated")
        elif self.mail_from is not None:
            self.error(503, "5.5.1 AUTH not allowed during a mail transaction")
        elif mechanism.upper() not in ("PLAIN", "LOGIN"):
            self.error(504, "5.5.4 Unrecognized authentication type")
        else:
            self.auth_seen = True
            if mechanism.upper() == "PLAIN":
                self.auth_answer(initial, "", self.auth_plain)
            else:
                self.auth_answer(initial, "VXNlcm5hbWU6", self.auth_login_user)

    def auth_answer(self, response: str, challenge: str, step: Callable[[str], None]) -> None:
        """Feed an initial response to ``step``, or send a 334 challenge and wait for one."""
        if response:
            step("" if response == "=" else response)
        else:
            self.auth_step = step
            self.reply(334, challenge)

    def auth_decode(self, response: str) -> bytes | None:
        if response.strip() == "*":
            self.error(501, "5.0.0 Authentication cancelled")
            return None
        decoded = _b64(response.strip())
        if decoded is None:
            self.error(501, "5.5.2 Invalid base64 data")
        return decoded

    def auth_plain(self, response: str) -> None:
        decoded = self.auth_decode(response)
        if decoded is not None:
            parts = decoded.split(b"\0")
            user, password = (parts[1], parts[2]) if len(parts) == 3 else (b"", b"")
            self.auth_result(user.decode("utf-8", "replace"), password.decode("utf-8", "replace"))

    def auth_login_user(self, response: str) -> None:
        decoded = self.auth_decode(response)
        if decoded is not None:
            user = decoded.decode("utf-8", "replace")
            self.auth_step = lambda answer: self.auth_login_password(user, answer)
            self.reply(334, "UGFzc3dvcmQ6")

    def auth_login_password(self, user: str, response: str) -> None:
        decoded = self.auth_decode(response)
        if decoded is not None:
            self.auth_result(user, decoded.decode("utf-8", "replace"))

    def auth_result(self, user: str, password: str) -> None:
        if self.config.auth and (user, password) == tuple(self.config.auth):
            self.auth_user = user
            self.sink.update(self.session, auth_user=user)
            self.reply(235, "2.7.0 Authentication successful")
        else:
            self.sink.update(self.session, auth_failures=self.session.auth_failures + 1)
            self.error(535, "5.7.8 Authentication credentials invalid")

    # --- the mail transaction ------------------------------------------------------------

    def do_MAIL(self, rest: str) -> None:
        match = ADDRESS.fullmatch(rest)
        if self.helo is None:
            self.error(503, "5.5.1 Send EHLO first")
        elif self.config.auth and self.auth_user is None:
            self.error(530, "5.7.0 Authentication required")
        elif self.mail_from is not None:
            self.error(503, "5.5.1 Nested MAIL command")
        elif not match or match.group(1).upper() != "FROM":
            self.error(501, "5.5.4 Syntax: MAIL FROM:<address>")
        elif self._size_param(match.group(3)) > self.config.max_message:
            self.error(552, "5.3.4 Message size exceeds fixed maximum message size")
        else:
            code, text = self.config.mail_reply
            if 200 <= code < 300:
                self.mail_from = match.group(2)
            self.reply(code, text)

    @staticmethod
    def _size_param(params: str) -> int:
        for param in params.split():
            key, _, value = param.partition("=")
            if key.upper() == "SIZE" and value.isdigit():
                return int(value)
        return 0

    def do_RCPT(self, rest: str) -> None:
        match = ADDRESS.fullmatch(rest)
        if self.mail_from is None:
            self.error(503, "5.5.1 Need MAIL before RCPT")
        elif not match or match.group(1).upper() != "TO":
            self.error(501, "5.5.4 Syntax: RCPT TO:<address>")
        elif len(self.rcpt_to) >= MAX_RECIPIENTS:
            self.error(452, "4.5.3 Too many recipients")
        else:
            address = match.group(2)
            code, text = self.rcpt_reply(address)
            if 200 <= code < 300:
                self.rcpt_to.append(address)
            self.reply(code, text)

    def rcpt_reply(self, address: str) -> Reply:
        script = self.config.rcpt_replies
        if callable(script):
            scripted = script(address)
        else:
            lowered = {key.lower(): value for key, value in script.items()}
            scripted = script.get(address, lowered.get(address.lower()))
        return scripted or (250, "2.1.5 OK")

    def do_DATA(self, rest: str) -> None:
        if self.mail_from is None:
            self.error(503, "5.5.1 Need MAIL before DATA")
        elif not self.rcpt_to:
            self.error(554, "5.5.1 No valid recipients")
        else:
            self.in_data = True
            self.reply(354, "Start mail input; end with <CRLF>.<CRLF>")

    def data_line(self, line: bytes) -> None:
        if line != b".":
            line = line[1:] if line.startswith(b".") else line
            self.data_size += len(line) + 2
            if self.data_size <= self.config.max_message:
                self.data.append(line + b"\r\n")
            return
        self.in_data = False
        config = self.config
        if config.drop_after_data:
            self.sink.update(self.session, dropped=self.session.dropped + 1)
            self.close()
        elif self.data_size > config.max_message:
            self.error(552, "5.3.4 Message size exceeds fixed maximum message size")
        else:
            assert self.mail_from is not None
            message = Message(
                session=self.session.id,
                mail_from=self.mail_from,
                rcpt_to=list(self.rcpt_to),
                data=b"".join(self.data),
                tls=self.tls,
                auth_user=self.auth_user,
                clientid=self.clientid,
                helo=self.helo or "",
            )
            reply = config.data_reply
            code, text = reply(message) if callable(reply) else reply
            if 200 <= code < 300:
                self.sink.accept(message)  # recorded (and fsynced) before the reply
            self.reply(code, text)
        self.reset_transaction()

    def do_RSET(self, rest: str) -> None:
        self.reset_transaction()
        self.reply(250, "2.0.0 OK")

    def do_NOOP(self, rest: str) -> None:
        self.reply(250, "2.0.0 OK")

    def do_QUIT(self, rest: str) -> None:
        self.sink.quit(self.session)
        self.reply(221, "2.0.0 Bye")
        self.close()


class SinkFactory(ServerFactory[SinkProtocol]):
    protocol = SinkProtocol

    def __init__(self, sink: Sink) -> None:
        self.sink = sink


# --- the controller -------------------------------------------------------------------


class MessageSource:
    """``wait_for`` over the ``messages`` of an in-process sink or of a sink's record file."""

    port: int

    def messages(self) -> list[Message]:
        raise NotImplementedError

    def wait_for(self, count: int, timeout: float = 10) -> list[Message]:
        """Wait until at least ``count`` messages were accepted; return all of them."""

        def probe() -> list[Message] | None:
            messages = self.messages()
            return messages if len(messages) >= count else None

        return wait_until(probe, timeout, f"{count} message(s) at the sink on port {self.port}")


class Sink(MessageSource):
    """A sink's state and controls. Recording runs in the reactor thread; the accessors
    (messages, sessions, errors, wait_for) are for the test thread and return copies."""

    def __init__(
        self,
        directory: Path,
        config: SinkConfig,
        port: int = 0,
        record: Path | None = None,
        ca_dir: Path | None = None,
    ) -> None:
        self.directory = directory
        self.config = config
        self.port = port
        self.record = record
        self.ca = SinkCA(ca_dir or directory)
        self.ca_file = self.ca.ca_file
        names = config.cert_names or (config.hostname, "127.0.0.1")
        self.cert_file, self.key_file = self.ca.issue(names, directory)
        # Typed as pyOpenSSL's PKey and X509; it takes cryptography's key and certificate too.
        self.tls_options = CertificateOptions(
            privateKey=cast(
                PKey, serialization.load_pem_private_key(self.key_file.read_bytes(), None)
            ),
            certificate=cast(X509, x509.load_pem_x509_certificate(self.cert_file.read_bytes())),
        )
        self.lock = threading.Lock()
        self.connections: set[SinkProtocol] = set()
        self.listening: Any = None
        self._messages: list[Message] = []
        self._sessions: list[Session] = []
        self._errors: list[str] = []

    # reactor thread ----------------------------------------------------------------------

    def listen(self) -> None:
        if self.listening is not None:
            return
        factory = SinkFactory(self)
        if self.config.tls == "implicit":
            self.listening = reactor.listenSSL(
                self.port, factory, self.tls_options, interface="127.0.0.1"
            )
        else:
            self.listening = reactor.listenTCP(self.port, factory, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    def unlisten(self, drop_connections: bool = True) -> Any:
        listening, self.listening = self.listening, None
        if drop_connections:
            for connection in list(self.connections):
                connection.transport.abortConnection()
        return listening.stopListening() if listening else None

    def new_session(self, peer: str, tls: bool) -> Session:
        session = Session(id=uuid.uuid4().hex[:12], peer=peer, tls=tls)
        with self.lock:
            self._sessions.append(session)
        return session

    def update(self, session: Session, **changes: Any) -> None:
        with self.lock:
            for key, value in changes.items():
                setattr(session, key, value)

    def command(self, session: Session, verb: str) -> None:
        with self.lock:
            if len(session.commands) < MAX_COMMANDS:
                session.commands.append(verb)

    def note_error(self, text: str) -> None:
        with self.lock:
            self._errors.append(text)

    def accept(self, message: Message) -> None:
        self._append_record(message.to_json())
        with self.lock:
            self._messages.append(message)

    def quit(self, session: Session) -> None:
        self._append_record({"type": "quit", "session": session.id})
        with self.lock:
            session.quit = True
            for message in self._messages:
                if message.session == session.id:
                    message.quit = True

    def _append_record(self, entry: dict[str, Any]) -> None:
        if self.record is None:
            return
        with open(self.record, "ab") as out:
            out.write(json.dumps(entry).encode() + b"\n")
            out.flush()
            os.fsync(out.fileno())

    # test thread -------------------------------------------------------------------------

    def start(self) -> None:
        """Listen (again, on the same port after ``stop``)."""
        blockingCallFromThread(reactor, self.listen)

    def stop(self, drop_connections: bool = True) -> None:
        """Stop listening (connections are refused); by default also drop open sessions."""
        blockingCallFromThread(reactor, self.unlisten, drop_connections)

    def set(self, **changes: Any) -> None:
        """Change the script (any SinkConfig field but tls/cert_names) for new commands."""
        self.config = replace(self.config, **changes)

    def messages(self) -> list[Message]:
        with self.lock:
            return copy.deepcopy(self._messages)

    def sessions(self) -> list[Session]:
        with self.lock:
            return copy.deepcopy(self._sessions)

    def errors(self) -> list[str]:
        """Tracebacks of exceptions in the sink itself (a test can assert there are none)."""
        with self.lock:
            return list(self._errors)

    def client(self, timeout: float = 10) -> smtplib.SMTP:
        """An smtplib client for this sink (TLS verified against the hostname), after EHLO
        (and STARTTLS + EHLO when the sink offers STARTTLS)."""
        return sink_client(
            self.config.hostname, self.port, self.ca_file, self.config.tls, timeout=timeout
        )


@contextmanager
def running_sink(
    directory: Path,
    *,
    name: str = "sink",
    port: int = 0,
    record: Path | None = None,
    ca_dir: Path | None = None,
    **options: Any,
) -> Iterator[Sink]:
    """A sink in this process's reactor (``options``: SinkConfig fields). Certificates go to
    ``directory/name``; the CA to ``ca_dir`` (default ``directory/sink-ca``), shared by all
    sinks of one test, so one ``sink.ca_file`` trusts them all."""
    from tests.conftest import _ensure_reactor

    _ensure_reactor()
    sink = Sink(
        directory / name, SinkConfig(**options), port, record, ca_dir or ca_dir_of(directory)
    )
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


def ca_dir_of(directory: Path) -> Path:
    return directory / "sink-ca"


# --- clients --------------------------------------------------------------------------


class LoopbackSMTP(smtplib.SMTP):
    """smtplib that connects to 127.0.0.1 whatever host it is given; TLS then verifies the
    certificate against that host name (smtplib uses it as the server name)."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout, self.source_address)


class LoopbackSMTPSSL(smtplib.SMTP_SSL, LoopbackSMTP):
    """Implicit TLS to 127.0.0.1, verifying the certificate against the given host name."""


def sink_client(
    hostname: str, port: int, ca_file: Path, tls: str = "starttls", timeout: float = 10
) -> smtplib.SMTP:
    context = ssl.create_default_context(cafile=str(ca_file))
    local = "client.example.org"
    client: smtplib.SMTP
    if tls == "implicit":
        client = LoopbackSMTPSSL(hostname, port, local, timeout=timeout, context=context)
    else:
        client = LoopbackSMTP(hostname, port, local, timeout=timeout)
        if tls == "starttls":
            client.starttls(context=context)
    client.ehlo()
    return client


# --- the subprocess -------------------------------------------------------------------


def _reply_arg(text: str) -> Reply:
    code, _, message = text.partition(":")
    return int(code), message


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, SinkConfig]:
    parser = argparse.ArgumentParser(prog="python -m tests.sink", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--record", type=Path, help="JSON-lines file of accepted messages")
    parser.add_argument("--dir", type=Path, default=Path("."), help="where the cert goes")
    parser.add_argument("--ca-dir", type=Path, help="the CA's directory (default DIR/sink-ca)")
    parser.add_argument("--hostname", default=SinkConfig.hostname)
    parser.add_argument("--cert-name", action="append", dest="cert_names")
    parser.add_argument("--tls", choices=TLS_MODES, default="starttls")
    parser.add_argument("--auth", help="USER:PASSWORD")
    parser.add_argument("--clientid", action="store_true", help="advertise CLIENTID after TLS")
    parser.add_argument("--pipelining", action="store_true")
    parser.add_argument("--rcpt", action="append", default=[], help="ADDRESS=CODE:TEXT")
    parser.add_argument("--data-reply", type=_reply_arg, default=SinkConfig.data_reply)
    parser.add_argument("--drop-after-data", action="store_true")
    args = parser.parse_args(argv)
    user, _, password = (args.auth or "").partition(":")
    config = SinkConfig(
        hostname=args.hostname,
        tls=args.tls,
        cert_names=tuple(args.cert_names) if args.cert_names else None,
        auth=(user, password) if args.auth else None,
        advertise_clientid=args.clientid,
        pipelining=args.pipelining,
        rcpt_replies=dict(
            (address, _reply_arg(reply))
            for address, _, reply in (item.partition("=") for item in args.rcpt)
        ),
        data_reply=args.data_reply,
        drop_after_data=args.drop_after_data,
    )
    return args, config


def announce(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> None:
    """Run a sink until SIGTERM. Prints one JSON line ``{"port": P, "ca_file": ...}`` when
    listening; SIGUSR1 stops listening, SIGUSR2 listens again (each acknowledged by a line
    ``{"listening": false|true}``)."""
    args, config = parse_args(sys.argv[1:] if argv is None else argv)
    sink = Sink(args.dir, config, args.port, args.record, args.ca_dir or ca_dir_of(args.dir))

    def stop() -> None:
        stopped = defer.maybeDeferred(sink.unlisten)
        stopped.addCallback(lambda _: announce(listening=False))

    def start() -> None:
        sink.listen()
        announce(listening=True)

    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(stop))
    signal.signal(signal.SIGUSR2, lambda *_: reactor.callFromThread(start))
    sink.listen()
    announce(port=sink.port, ca_file=str(sink.ca_file), pid=os.getpid())
    reactor.run()


class ChildProcess:
    """A ``python -m tests.<module>`` child that announces itself with JSON lines on stdout."""

    def __init__(self, module: str, argv: Sequence[str], cwd: Path) -> None:
        root = Path(__file__).resolve().parent.parent
        path = [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *argv],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            bufsize=0,  # unbuffered, so select() sees every line that has arrived
        )
        self.ready = self.read_line()

    def read_line(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        assert self.process.stdout is not None
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if readable else b""
        if not line:
            self.terminate()
            raise RuntimeError(f"{self.process.args!r} did not announce itself")
        parsed: dict[str, Any] = json.loads(line)
        return parsed

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()


class SinkProcess(ChildProcess, MessageSource):
    """``python -m tests.sink`` in a child process; messages come from its record file."""

    def __init__(self, directory: Path, argv: Sequence[str], record: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.record = record
        super().__init__(
            "tests.sink", ["--dir", str(directory), "--record", str(record), *argv], directory
        )
        self.port: int = self.ready["port"]
        self.ca_file = Path(self.ready["ca_file"])

    def messages(self) -> list[Message]:
        return read_record(self.record)

    def _signal(self, signum: int, listening: bool) -> None:
        self.process.send_signal(signum)
        assert self.read_line(10) == {"listening": listening}

    def stop(self) -> None:
        self._signal(signal.SIGUSR1, False)

    def start(self) -> None:
        self._signal(signal.SIGUSR2, True)


@contextmanager
def sink_process(
    directory: Path, *argv: str, name: str = "sink", record: Path | None = None
) -> Iterator[SinkProcess]:
    """``python -m tests.sink`` with ``argv`` (see ``parse_args``), recording to
    ``record`` (default ``directory/name/record.jsonl``); terminated on exit."""
    where = directory / name
    child = SinkProcess(
        where, ["--ca-dir", str(ca_dir_of(directory)), *argv], record or where / "record.jsonl"
    )
    try:
        yield child
    finally:
        child.terminate()


if __name__ == "__main__":
    main()
