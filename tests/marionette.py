"""A small Marionette client (stdlib only), enough to drive Thunderbird from a test.

The protocol is JSON on a local TCP socket, each message framed as ``<length>:<json>``.
On connect the browser sends a greeting; then each command is
``[0, id, name, params]`` and its answer ``[1, id, error, result]``. Scripts run in the
chrome context, where Thunderbird's own XPCOM services (``MailServices``,
``Services``) are reachable, so the test makes Thunderbird's own code do the work.
"""

from __future__ import annotations

import json
import socket
from typing import Any


class MarionetteError(Exception):
    """Marionette answered a command with an error (its message and JS stack included)."""


class Marionette:
    """One connection to a Marionette server, with one WebDriver session."""

    def __init__(self, port: int, timeout: float = 30) -> None:
        self._socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buffer = b""
        self._next_id = 0
        self.greeting = self._receive()

    def _receive(self) -> Any:
        while b":" not in self._buffer:
            self._fill()
        length, _, rest = self._buffer.partition(b":")
        size = int(length)
        self._buffer = rest
        while len(self._buffer) < size:
            self._fill()
        body, self._buffer = self._buffer[:size], self._buffer[size:]
        return json.loads(body)

    def _fill(self) -> None:
        data = self._socket.recv(65536)
        if not data:
            raise ConnectionError("Marionette closed the connection")
        self._buffer += data

    def command(self, name: str, params: dict[str, Any] | None = None) -> Any:
        """Send one command and return its result; MarionetteError if it failed."""
        self._next_id += 1
        message_id = self._next_id
        body = json.dumps([0, message_id, name, params or {}]).encode()
        self._socket.sendall(str(len(body)).encode() + b":" + body)
        while True:
            kind, answer_id, error, result = self._receive()
            if kind == 1 and answer_id == message_id:
                break
        if error:
            raise MarionetteError(
                f"{name}: {error.get('error')}: {error.get('message')}\n{error.get('stacktrace')}"
            )
        return result

    def start_session(self) -> None:
        """A WebDriver session in the chrome context (Thunderbird's own privileged JS).

        The test's scripts answer dialogs themselves. Marionette, which may still count a
        dialog as open while it closes, dismisses it too, without failing the command
        ("dismiss", not WebDriver's default "dismiss and notify")."""
        # Marionette takes the capabilities themselves as parameters (no "alwaysMatch").
        self.command("WebDriver:NewSession", {"unhandledPromptBehavior": "dismiss"})
        self.command("Marionette:SetContext", {"value": "chrome"})

    def run(self, script: str, args: list[Any] | None = None, timeout: float = 30) -> Any:
        """Run ``script`` synchronously; its ``return`` value comes back as JSON."""
        return self._script("WebDriver:ExecuteScript", script, args, timeout)

    def run_async(self, script: str, args: list[Any] | None = None, timeout: float = 30) -> Any:
        """Run ``script``, which calls ``arguments[arguments.length - 1](value)`` when
        done; Marionette gives up (script timeout) after ``timeout`` seconds."""
        return self._script("WebDriver:ExecuteAsyncScript", script, args, timeout)

    def _script(self, command: str, script: str, args: list[Any] | None, timeout: float) -> Any:
        self.command("WebDriver:SetTimeouts", {"script": int(timeout * 1000)})
        self._socket.settimeout(timeout + 15)
        result = self.command(command, {"script": script, "args": args or []})
        return result.get("value") if isinstance(result, dict) else result

    def quit(self) -> None:
        """Ask the application to quit (the process exits on its own)."""
        try:
            self.command("Marionette:Quit", {"flags": ["eForceQuit"]})
        except (OSError, ConnectionError, MarionetteError):
            pass
        self.close()

    def close(self) -> None:
        self._socket.close()
