"""Telling systemd how the server is doing (``Type=notify``): sd_notify in a few lines.

systemd puts the path of a datagram socket in ``$NOTIFY_SOCKET`` (``@name`` is a
socket in the abstract namespace); each message is one datagram of ``KEY=value``
lines. The server sends ``READY=1`` once its ports are bound and its state is open,
``RELOADING=1`` then ``READY=1`` around a SIGHUP reload, ``STOPPING=1`` when it begins
to stop, and ``STATUS=`` (sessions, queue) every ``STATUS_INTERVAL`` seconds. Without
``$NOTIFY_SOCKET`` (not under systemd, embedded, a worker process) nothing is sent.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import task
from twisted.logger import Logger

log = Logger()

STATUS_INTERVAL = 10.0  # seconds between STATUS= updates
# What systemd passes to the process it starts, and no child of it must take as its own.
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def without_systemd_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment for a child process: systemd's messages and sockets are ours."""
    return {key: value for key, value in environ.items() if key not in SYSTEMD_VARIABLES}


def socket_address(value: str) -> str | bytes | None:
    """The address in ``$NOTIFY_SOCKET``: a path, or ``@name`` in the abstract namespace."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock and other kinds: not supported, nothing is sent


class Notifier:
    """Sends the state changes to ``address`` (None: does nothing)."""

    def __init__(self, address: str | bytes | None = None, reactor: Any = None) -> None:
        self.address = address
        self.reactor = reactor
        self._socket: socket.socket | None = None
        self._status: task.LoopingCall | None = None
        self._warned = False

    @classmethod
    def from_environment(cls, reactor: Any, environ: Mapping[str, str] | None = None) -> Notifier:
        value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
        return cls(socket_address(value), reactor)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """One datagram; False (and one warning) when systemd's socket is not there."""
        if self.address is None:
            return False
        try:
            if self._socket is None:
                kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                self._socket = socket.socket(socket.AF_UNIX, kind)
                self._socket.setblocking(False)  # a full socket drops a status, never waits
            self._socket.sendto("\n".join(lines).encode(), self.address)
        except OSError as problem:
            if not self._warned:
                self._warned = True
                log.warn("cannot notify systemd: {problem}", problem=str(problem))
            return False
        return True

    def ready(self, status: Callable[[], str]) -> None:
        """The server serves: READY=1, then STATUS= from ``status()`` regularly."""
        self.send("READY=1", f"STATUS={status()}")
        if self.enabled and self._status is None and self.reactor is not None:
            self._status = task.LoopingCall(lambda: self.send(f"STATUS={status()}"))
            self._status.clock = self.reactor
            self._status.start(STATUS_INTERVAL, now=False)

    def reloading(self) -> None:
        # MONOTONIC_USEC: what Type=notify-reload (systemd 253+) expects with RELOADING=1.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def reloaded(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def stopping(self) -> None:
        if self._status is not None and self._status.running:
            self._status.stop()
        self.send("STOPPING=1", "STATUS=stopping")
