"""The server as admins run it: ``twistd -n clientid-mta --config FILE`` in a subprocess.

``ServerProcess`` is a ``RunningServer`` (same ``smtp()``, ``wire()``, ``messages()``,
in-process ``admin()``) whose server is a twistd child process instead of a service in
the test's reactor, so it can be killed, restarted and grepped like a real deployment.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from clientid_mta.config import load_config
from clientid_mta.devices.keys import load_or_create_server_key
from clientid_mta.smtp.clientid import (
    device_key,
    fingerprint,
    parse_clientid,
)
from tests.conftest import RunningServer, merge_toml
from tests.sink import wait_until

BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
ADMIN = BIN / "clientid-mta"
START_TIMEOUT = 15.0
USERS = (("alice@example.org", "alice-password"), ("bob@example.org", "bob-password"))


def free_ports(count: int) -> list[int]:
    """Ports that were free a moment ago on 127.0.0.1 (distinct from each other)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_is_free(port: int) -> bool:
    """Could a server listen on ``port`` now? With SO_REUSEADDR, as Twisted's listeners
    bind: connections in TIME_WAIT (a closed session) do not hold a port, a listener does."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def greets(port: int) -> bool:
    """The server answers with its 220: started, not just bound (the kernel accepts
    connections as soon as the port listens, before the state is opened)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
            return connection.recv(4).startswith(b"220")
    except OSError:
        return False


def twistd_argv(root: Path, config: Path | None, logfile: Path | None = None) -> list[str]:
    argv = [str(TWISTD), "-n", "--pidfile", str(root / "twistd.pid")]
    argv += ["--logfile", str(logfile) if logfile else "-", "clientid-mta"]
    return argv + (["--config", str(config)] if config else [])


def run_twistd_once(root: Path, config: Path | None, timeout: float = 30) -> tuple[int, str]:
    """Run twistd to completion (for start-up errors): (exit status, stdout + stderr)."""
    done = subprocess.run(
        twistd_argv(root, config), cwd=root, capture_output=True, timeout=timeout, check=False
    )
    return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")


@dataclass
class ServerProcess(RunningServer):
    """A twistd child process run in ``root``, serving ``config`` (its file, or the defaults)."""

    logfile: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def create(cls, root: Path, extra_toml: str = "", logfile: Path | None = None) -> Self:
        """A server on two free ports, configured by ``root/clientid-mta.toml``."""
        root.mkdir(parents=True, exist_ok=True)
        port, tls_port = free_ports(2)
        listen = (
            f'[listen]\nsubmission = "tcp:{port}:interface=127.0.0.1"\n'
            f'submissions = "tcp:{tls_port}:interface=127.0.0.1"\n'
        )
        config_path = root / "clientid-mta.toml"
        config_path.write_text(merge_toml(listen + extra_toml))
        config = load_config(config_path)
        return cls(config, None, port, tls_port, root, logfile=logfile)  # type: ignore[arg-type]

    @property
    def output_path(self) -> Path:
        """twistd's stdout and stderr (the log too, unless ``logfile`` is set)."""
        return self.root / "twistd.out"

    def output(self) -> str:
        return self.output_path.read_text(errors="replace") if self.output_path.exists() else ""

    def wait_for_output(self, pattern: str, timeout: float = 5) -> re.Match[str]:
        """The first match of ``pattern`` in the output, once it has been written."""
        try:
            return wait_until(lambda: re.search(pattern, self.output()), timeout, pattern)
        except TimeoutError:
            raise AssertionError(f"no {pattern!r} in:\n{self.output()}") from None

    def start(self) -> None:
        """Start twistd and wait until both ports accept connections."""
        assert self.process is None or self.process.poll() is not None, "already running"
        with open(self.output_path, "ab") as out:
            self.process = subprocess.Popen(
                twistd_argv(self.root, self.config.source, self.logfile),
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.stopped = False
        process = self.process

        def listening() -> bool | None:
            if process.poll() is not None:
                status = process.returncode
                raise RuntimeError(f"twistd exited with {status}:\n{self.output()}")
            return self.serving() or None

        try:
            wait_until(listening, START_TIMEOUT, "twistd to listen", interval=0.05)
        except TimeoutError:
            self.kill()
            raise RuntimeError(
                f"twistd did not listen in {START_TIMEOUT} s:\n{self.output()}"
            ) from None

    def serving(self) -> bool:
        """The ports are bound before the state is open: wait for the greeting."""
        return greets(self.port) and accepts(self.tls_port)

    def _end(self, sig: signal.Signals) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (the crash case)."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, the way init systems stop it; SIGKILL if it hangs."""
        if not self.stopped:
            self.stopped = True
            self._end(signal.SIGTERM)

    def cli(self, *argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """The ``clientid-mta`` admin command as a separate process, as admins run it."""
        config = ["--config", str(self.config.source)] if self.config.source else []
        return cli([*config, *argv], stdin=stdin, cwd=self.root)


def cli(
    argv: Sequence[str], stdin: str = "", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``clientid-mta ARGV`` with ``stdin`` (secrets go there, never in ARGV)."""
    return subprocess.run(
        [str(ADMIN), *argv],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=30,
        check=False,
    )


@contextmanager
def running(
    root: Path,
    extra_toml: str = "",
    users: Sequence[tuple[str, str]] = USERS,
    logfile: Path | None = None,
) -> Iterator[ServerProcess]:
    """A started twistd server with ``users`` (policy tofu unless ``extra_toml`` says so)."""
    server = ServerProcess.create(root, extra_toml, logfile)
    for address, password in users:
        server.add_user(address, password)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def login_code(server: RunningServer, user: str, password: str, clientid: str = "") -> int:
    """One session: TLS, EHLO, optional CLIENTID, AUTH PLAIN; the AUTH reply code."""
    client = server.smtp()
    try:
        if clientid:
            assert client.docmd("CLIENTID", clientid) == (250, b"2.0.0 OK")
        return auth_plain_code(client, user, password)
    finally:
        client.close()


def auth_plain_code(client: smtplib.SMTP, user: str, password: str) -> int:
    """AUTH PLAIN on an open session: the reply code, refused or not."""
    client.user, client.password = user, password
    try:
        return client.auth("PLAIN", client.auth_plain)[0]
    except smtplib.SMTPAuthenticationError as refused:
        return refused.smtp_code


def submit(client: smtplib.SMTP, sender: str, recipient: str, message: bytes) -> None:
    """MAIL, RCPT, DATA with the exact replies of a successful submission."""
    assert client.mail(sender) == (250, b"2.1.0 Ok")
    assert client.rcpt(recipient) == (250, b"2.1.5 Ok")
    code, text = client.data(message)
    assert (code, text[:20]) == (250, b"2.0.0 Ok: queued as "), (code, text)


def fingerprint_of(server: RunningServer, clientid: str) -> str:
    """The fingerprint operators see for a client identity, computed from the server key."""
    key = load_or_create_server_key(server.config.clientid.key_file)
    return fingerprint(device_key(key, parse_clientid(clientid.encode())))


def devices(listing: str) -> dict[str, tuple[str, str, str]]:
    """A ``device list`` output as {fingerprint: (type, state, whole row)}."""
    rows = listing.splitlines()[1:]
    return {row.split()[0]: (row.split()[1], row.split()[2], row) for row in rows}


def child_processes(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc; one that ends meanwhile is
    left out)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def command_line(pid: int) -> list[bytes]:
    """A process's arguments; none once it has ended."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []
