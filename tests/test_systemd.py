"""systemd: ``Type=notify`` messages and socket activation, with real twistd processes.

A datagram socket of the test stands in for systemd's ``$NOTIFY_SOCKET`` (with
SO_PASSCRED, so each message says which process sent it); a socket the test binds is
passed as systemd passes it (fd 3, ``LISTEN_FDS``, ``LISTEN_FDNAMES``, and
``LISTEN_PID`` set by a shell to its own pid just before it execs twistd).
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from twisted.internet import task

from clientid_mta.config import ConfigError, load_config
from clientid_mta.server.systemd import (
    STATUS_INTERVAL,
    Notifier,
    socket_address,
    without_systemd_variables,
)
from tests.serverproc import (
    START_TIMEOUT,
    USERS,
    ServerProcess,
    greets,
    run_twistd_once,
    running,
    twistd_argv,
)
from tests.sink import wait_until
from tests.test_workers import served_by_both

WORKERS = "[server]\nworkers = 2\n"
UCRED = struct.Struct("3i")  # pid, uid, gid


class FakeSystemd:
    """The receiving end of ``$NOTIFY_SOCKET``: (sender pid, message) per datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.socket.bind(str(path))
        self.received: list[tuple[int, str]] = []

    def _receive(self, timeout: float | None) -> bool:
        self.socket.settimeout(timeout)
        try:
            data, ancillary, _flags, _ = self.socket.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
        except (TimeoutError, BlockingIOError):
            return False
        pid = next(
            UCRED.unpack(item[2][: UCRED.size])[0]
            for item in ancillary
            if item[:2] == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
        )
        self.received.append((pid, data.decode()))
        return True

    def wait_for(self, line: str, timeout: float = START_TIMEOUT) -> None:
        """Receive until a message holds ``line`` (bounded: each receive has a timeout)."""
        while not any(line in message.split("\n") for _pid, message in self.received):
            assert self._receive(timeout), f"no {line} within {timeout} s: {self.received}"

    def drain(self) -> None:
        while self._receive(0):
            pass

    def states(self) -> list[tuple[int, str]]:
        """The state changes (messages that are more than a STATUS= update)."""
        return [
            (
                pid,
                " ".join(
                    line
                    for line in message.split("\n")
                    if not line.startswith(("STATUS=", "MONOTONIC_USEC="))
                ),
            )
            for pid, message in self.received
            if any(not line.startswith("STATUS=") for line in message.split("\n"))
        ]

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def fake_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    receiver = FakeSystemd(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(receiver.path))
    yield receiver
    receiver.close()


def test_notify_ready_reload_and_stop_in_order_from_the_main_process_only(
    tmp_path: Path, fake_systemd: FakeSystemd
) -> None:
    with running(tmp_path / "server", WORKERS) as server:
        assert server.process is not None
        main = server.process.pid
        fake_systemd.wait_for("READY=1")
        # The worker started with the same environment: it must not claim readiness.
        wait_until(lambda: "worker 1: clientid-mta" in server.output() or None, 15, "worker 1")
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_output("reloaded the TLS certificate and key")
        fake_systemd.wait_for("RELOADING=1")
        server.stop()
    fake_systemd.drain()
    assert fake_systemd.states() == [
        (main, "READY=1"),
        (main, "RELOADING=1"),
        (main, "READY=1"),
        (main, "STOPPING=1"),
    ]
    first = fake_systemd.received[0][1]
    assert "STATUS=0 sessions, " in first, first
    reloading = fake_systemd.received[1][1]
    assert "MONOTONIC_USEC=" in reloading, reloading


def test_notifier_writes_to_an_abstract_socket(tmp_path: Path) -> None:
    name = f"clientid-mta-test-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(b"\0" + name.encode())
    receiver.settimeout(5)
    try:
        notifier = Notifier(socket_address("@" + name))
        assert notifier.send("READY=1", "STATUS=up")
        assert receiver.recv(100) == b"READY=1\nSTATUS=up"
    finally:
        receiver.close()


def test_status_is_sent_every_interval_until_stopping(tmp_path: Path) -> None:
    receiver = FakeSystemd(tmp_path / "notify")
    clock = task.Clock()
    sessions = iter(range(100))
    notifier = Notifier(str(receiver.path), clock)
    try:
        notifier.ready(lambda: f"{next(sessions)} sessions")
        clock.advance(STATUS_INTERVAL)
        clock.advance(STATUS_INTERVAL)
        notifier.stopping()
        assert clock.getDelayedCalls() == []  # no status after STOPPING=1
        receiver.drain()
    finally:
        receiver.close()
    assert [message for _pid, message in receiver.received] == [
        "READY=1\nSTATUS=0 sessions",
        "STATUS=1 sessions",
        "STATUS=2 sessions",
        "STOPPING=1\nSTATUS=stopping",
    ]


def test_notifier_without_systemd_sends_nothing_and_a_gone_socket_is_one_warning(
    tmp_path: Path,
) -> None:
    assert not Notifier.from_environment(None, {}).enabled
    assert not Notifier.from_environment(None, {"NOTIFY_SOCKET": "vsock:2:5"}).enabled
    gone = Notifier(socket_address(str(tmp_path / "nobody-listens")))
    assert gone.enabled
    assert not gone.send("READY=1")  # no traceback, no exception


def test_worker_processes_get_no_systemd_variables() -> None:
    environ = {"NOTIFY_SOCKET": "/run/x", "LISTEN_PID": "1", "LISTEN_FDS": "1", "PATH": "/bin"}
    assert without_systemd_variables(environ | {"LISTEN_FDNAMES": "a"}) == {"PATH": "/bin"}


# What systemd does between fork and exec: the socket on fd 3, LISTEN_PID the pid that
# execs the server (dash cannot redirect fds above 9, so not a shell).
BECOME_ACTIVATED = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.close(int(sys.argv[1]))
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


@contextmanager
def socket_activated(root: Path, listener: socket.socket, name: str) -> Iterator[ServerProcess]:
    """twistd started the way systemd starts it for a .socket unit: ``listener`` on fd 3."""
    server = ServerProcess.create(
        root,
        f'[listen]\nsubmission = "systemd:domain=INET:name={name}"\nsubmissions = ""\n' + WORKERS,
    )
    for address, password in USERS:
        server.add_user(address, password)
    server.port = listener.getsockname()[1]
    high = fcntl.fcntl(listener.fileno(), fcntl.F_DUPFD, 10)  # never 3: moved to 3 below
    argv = twistd_argv(server.root, server.config.source)
    environ = os.environ | {"LISTEN_FDS": "1", "LISTEN_FDNAMES": name}
    with open(server.output_path, "ab") as out:
        server.process = subprocess.Popen(
            [sys.executable, "-c", BECOME_ACTIVATED, str(high), *argv],
            cwd=server.root,
            env=environ,
            pass_fds=(high,),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    os.close(high)
    process = server.process

    def serving() -> bool | None:
        if process.poll() is not None:
            raise AssertionError(f"twistd exited with {process.returncode}:\n{server.output()}")
        return greets(server.port) or None

    try:
        wait_until(serving, START_TIMEOUT, "the activated socket to greet", interval=0.05)
        yield server
    finally:
        server.stop()


def test_a_socket_passed_by_systemd_is_served_by_all_processes(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        with socket_activated(tmp_path / "server", listener, "submission") as server:
            listener.close()  # from now on only the server holds it
            main, worker = served_by_both(server)
    assert main > 0 and worker > 0, (main, worker)


def test_a_systemd_listener_without_its_socket_stops_the_start_with_one_line(
    tmp_path: Path,
) -> None:
    root = tmp_path / "server"
    root.mkdir()
    config = root / "clientid-mta.toml"
    config.write_text('[listen]\nsubmission = "systemd:domain=INET:index=0"\nsubmissions = ""\n')
    status, output = run_twistd_once(root, config)
    assert status != 0
    assert "[listen] submission = 'systemd:domain=INET:index=0': systemd passed no such" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "description",
    ["systemd:domain=INET:index=0", "systemd:domain=INET6:name=submission"],
)
def test_the_config_accepts_systemd_listeners_outside_systemd(
    tmp_path: Path, description: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[listen]\nsubmission = "{description}"\n')
    assert load_config(config).listen.submission == description  # the admin command runs


@pytest.mark.parametrize(
    "description",
    [
        "systemd:domain=INET",
        "systemd:domain=INET:index=0:name=x",
        "systemd:domain=IPX:index=0",
        "systemd:domain=INET:index=one",
        "systemd:domain=INET:name=",
        "systemd:index=0",
    ],
)
def test_a_bad_systemd_description_is_one_sentence(tmp_path: Path, description: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[listen]\nsubmission = "{description}"\n')
    with pytest.raises(ConfigError, match=r"\[listen\] submission is not a systemd socket"):
        load_config(config)
