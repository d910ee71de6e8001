"""Test harness: a real server on loopback, real TLS, real clients.

The Twisted reactor runs in a background thread for the whole test session; each
test starts its own ``SubmissionService`` on random ports under ``tmp_path`` and
talks to it with ``smtplib`` or the raw line client ``Wire`` below.
"""

from __future__ import annotations

import io
import mailbox
import smtplib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred

from clientid_mta.cli import admin
from clientid_mta.config import Config, load_config
from clientid_mta.server.service import SubmissionService
from clientid_mta.smtp.limits import SessionLimits
from tests.typed_reactor import blockingCallFromThread, reactor

HOSTNAME = "mail.example.org"
THUNDERBIRD_UUID = "23bf83be-aad7-46aa-9e0f-39191ccf402f"

BASE_CONFIG = f"""
[server]
hostname = "{HOSTNAME}"
data_dir = "data"

[listen]
submission = "tcp:0:interface=127.0.0.1"
submissions = "tcp:0:interface=127.0.0.1"

[delivery]
local_domains = ["example.org"]

[relay]
# Nothing listens on port 1: mail for other domains stays queued unless a test
# points the relay at its own peer.
smarthost = "127.0.0.1:1"
tls = "opportunistic"
"""

_reactor_lock = threading.Lock()
UNCOUNTING = ("close", "remove_device")  # the SessionLimits methods that lower a count


def _ensure_reactor() -> None:
    """Run the global reactor in a daemon thread, once per test process."""
    with _reactor_lock:
        if reactor.running:
            return
        started = threading.Event()
        reactor.callWhenRunning(started.set)
        threading.Thread(
            target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True
        ).start()
        assert started.wait(10), "the reactor thread did not start"


def merge_toml(extra: str) -> str:
    """BASE_CONFIG with the sections of ``extra`` merged in (extra's keys win)."""
    sections: dict[str, list[str]] = {}
    order: list[str] = []
    for text in (BASE_CONFIG, extra):
        current = ""
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("[") and stripped.endswith("]"):
                current = stripped
                if current not in sections:
                    sections[current] = []
                    order.append(current)
            elif stripped:
                key = stripped.split("=", 1)[0].strip()
                lines = sections.setdefault(current, [])
                lines[:] = [item for item in lines if item.split("=", 1)[0].strip() != key]
                lines.append(stripped)
    return "\n".join(f"{name}\n" + "\n".join(sections[name]) + "\n" for name in order)


@dataclass
class RunningServer:
    config: Config
    service: SubmissionService
    port: int
    tls_port: int
    root: Path
    stopped: bool = field(default=False)

    @property
    def cafile(self) -> Path:
        return self.config.generated_tls_dir / "cert.pem"

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that verifies the server's generated certificate."""
        context = ssl.create_default_context(cafile=str(self.cafile))
        context.check_hostname = True
        return context

    def admin(self, *argv: str, stdin: str = "") -> str:
        out = io.StringIO()
        admin.run(["--config", str(self.config.source), *argv], out, io.StringIO(stdin))
        return out.getvalue()

    def add_user(self, address: str, password: str, send_as: str = "") -> None:
        extra = ["--send-as", send_as] if send_as else []
        self.admin("user", "add", address, *extra, stdin=password + "\n")

    def maildir(self, address: str) -> mailbox.Maildir:
        localpart, _, domain = address.partition("@")
        return mailbox.Maildir(self.config.delivery.maildir_root / domain / localpart, create=False)

    def messages(self, address: str) -> list[mailbox.MaildirMessage]:
        localpart, _, domain = address.partition("@")
        # The server makes a new Maildir's tmp/, new/ and cur/ one after another, cur/
        # last: until it is there the Maildir is still being made, and holds nothing.
        if not (self.config.delivery.maildir_root / domain / localpart / "cur").is_dir():
            return []
        return list(self.maildir(address))

    def smtp(self, implicit: bool = False, timeout: float = 10) -> smtplib.SMTP:
        """An smtplib client, after TLS and EHLO (server name checked against the cert)."""
        if implicit:
            client: smtplib.SMTP = smtplib.SMTP_SSL(
                "127.0.0.1",
                self.tls_port,
                timeout=timeout,
                context=self.ssl_context(),
                local_hostname="client.example.net",
            )
        else:
            client = smtplib.SMTP(
                "127.0.0.1", self.port, timeout=timeout, local_hostname="client.example.net"
            )
            client.starttls(context=self.ssl_context())
        client.ehlo()
        return client

    def wire(self, implicit: bool = False) -> Wire:
        return Wire(self, implicit=implicit)

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            blockingCallFromThread(reactor, self.service.stopService)

    def wait_for_sessions(
        self, condition: Callable[[SessionLimits], bool], what: str, timeout: float = 5
    ) -> None:
        """Until ``condition`` holds for the server's session counts. No polling: it is
        checked again each time the server uncounts a session or a device."""
        sessions = self.service.components.sessions

        def wait() -> Deferred[None]:
            done: Deferred[None] = Deferred()

            def recheck(real: Callable[..., None]) -> Callable[..., None]:
                def uncount(*args: Any) -> None:
                    real(*args)
                    if not done.called and condition(sessions):
                        done.callback(None)

                return uncount

            for name in UNCOUNTING:
                setattr(sessions, name, recheck(getattr(sessions, name)))

            def restore(result: object) -> object:
                for name in UNCOUNTING:
                    vars(sessions).pop(name, None)
                return result

            done.addBoth(restore)
            if condition(sessions):
                done.callback(None)
            done.addTimeout(timeout, reactor)
            return done

        try:
            blockingCallFromThread(reactor, wait)
        except CancelledError:
            counts = (sessions.total, dict(sessions.by_address), dict(sessions.by_device))
            raise AssertionError(f"{what}: not within {timeout} s; counts {counts}") from None


def start_server(root: Path, extra_toml: str = "") -> RunningServer:
    _ensure_reactor()
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "clientid-mta.toml"
    config_path.write_text(merge_toml(extra_toml))
    config = load_config(config_path)
    service = blockingCallFromThread(reactor, SubmissionService, config)

    def start() -> Any:
        service.startService()
        return service.listening()

    ports = blockingCallFromThread(reactor, start)
    return RunningServer(
        config,
        service,
        ports["submission"].getHost().port,
        ports["submissions"].getHost().port,
        root,
    )


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """Start a server with extra TOML merged into the test base config."""
    servers: list[RunningServer] = []

    def make(extra_toml: str = "", name: str = "server") -> RunningServer:
        server = start_server(tmp_path / name, extra_toml)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The stored hash of every full password check the server makes while the test runs
    (None: the dummy check for an unknown account)."""
    from clientid_mta.auth import checker as cred

    real = cred.verify_password
    calls: list[str | None] = []

    def counting(stored: str | None, password: str) -> bool:
        calls.append(stored)
        return real(stored, password)

    monkeypatch.setattr(cred, "verify_password", counting)
    return calls


@pytest.fixture
def server(make_server: Callable[..., RunningServer]) -> RunningServer:
    """A default server (policy tofu) with alice@example.org / alice-password."""
    running = make_server()
    running.add_user("alice@example.org", "alice-password")
    running.add_user("bob@example.org", "bob-password")
    return running


class ServerReads:
    """What the in-process server's sessions have read, per client port: a test that must
    send a second piece only once the server has read the first (so that it arrives in a
    later read, as from a slow client) waits for that read instead of sleeping."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._read: dict[int, int] = {}
        self._lost: set[int] = set()

    def install(self, monkeypatch: pytest.MonkeyPatch, *protocols: type[Any]) -> ServerReads:
        """Count what each of these protocol classes receives (their own dataReceived)."""
        for cls in protocols:
            monkeypatch.setattr(cls, "connectionMade", self._made(cls.connectionMade))
            monkeypatch.setattr(cls, "dataReceived", self._received(cls.dataReceived))
            monkeypatch.setattr(cls, "connectionLost", self._lost_hook(cls.connectionLost))
        return self

    def _note(self, session: Any, read: int = 0, made: bool = False, lost: bool = False) -> None:
        port = session.transport.getPeer().port
        with self._changed:
            if made:  # a port used again by a new connection
                self._read[port] = 0
                self._lost.discard(port)
            self._read[port] = self._read.get(port, 0) + read
            if lost:
                self._lost.add(port)
            self._changed.notify_all()

    def _made(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def made(session: Any) -> Any:
            self._note(session, made=True)
            return real(session)

        return made

    def _received(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def received(session: Any, data: bytes) -> Any:
            self._note(session, len(data))
            return real(session, data)

        return received

    def _lost_hook(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def lost(session: Any, *args: Any) -> Any:
            self._note(session, lost=True)
            return real(session, *args)

        return lost

    def count(self, sock: socket.socket) -> int:
        with self._changed:
            return self._read.get(sock.getsockname()[1], 0)

    def wait(self, sock: socket.socket, count: int, timeout: float = 5) -> bool:
        """Until the server has read ``count`` bytes from ``sock`` (or closed it): False if
        it has not within ``timeout`` seconds."""
        port = sock.getsockname()[1]
        with self._changed:
            return self._changed.wait_for(
                lambda: self._read.get(port, 0) >= count or port in self._lost, timeout
            )


@pytest.fixture
def server_reads(monkeypatch: pytest.MonkeyPatch) -> ServerReads:
    """``ServerReads`` of our sessions (``SubmissionESMTP``)."""
    from clientid_mta.smtp.protocol import SubmissionESMTP

    return ServerReads().install(monkeypatch, SubmissionESMTP)


class Wire:
    """A raw line-level SMTP client, for exact replies and malformed input."""

    def __init__(self, server: RunningServer, implicit: bool = False, timeout: float = 10) -> None:
        self.server = server
        self.timeout = timeout
        raw = socket.create_connection(
            ("127.0.0.1", server.tls_port if implicit else server.port), timeout=timeout
        )
        self.sock: socket.socket = (
            server.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1") if implicit else raw
        )
        self._buffer = b""
        self.greeting = self.reply()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self._buffer += chunk
        return True

    def reply(self) -> tuple[int, list[str]]:
        """One whole (possibly multi-line) reply: (code, [text of each line])."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self._buffer:
                if not self._fill():
                    raise ConnectionError(f"closed before a full reply; got {lines!r}")
            raw, self._buffer = self._buffer.split(b"\r\n", 1)
            line = raw.decode("utf-8", "replace")
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), lines

    def cmd(self, line: bytes | str) -> tuple[int, list[str]]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def code(self, line: bytes | str) -> int:
        return self.cmd(line)[0]

    def starttls(self) -> None:
        code, _ = self.cmd("STARTTLS")
        assert code == 220
        self.sock = self.server.ssl_context().wrap_socket(self.sock, server_hostname="127.0.0.1")

    def tls_session(self, ehlo: bool = True) -> Wire:
        """EHLO, STARTTLS, and (by default) EHLO again."""
        assert self.code("EHLO client.example.net") == 250
        self.starttls()
        if ehlo:
            assert self.code("EHLO client.example.net") == 250
        return self

    def auth_plain(self, user: str, password: str) -> int:
        import base64

        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.code(f"AUTH PLAIN {token}")

    def is_closed(self, wait: float = 5) -> bool:
        """True when the server closes the connection within ``wait`` seconds."""
        self.sock.settimeout(wait)
        try:
            while True:
                if not self._fill():
                    return True
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError):
            return True
        finally:
            self.sock.settimeout(self.timeout)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# The private PostgreSQL cluster, for the tests of the PostgreSQL store (at the end: it
# imports serverproc, which imports this module).
from tests.postgres_server import postgres_cluster  # noqa: E402, F401
