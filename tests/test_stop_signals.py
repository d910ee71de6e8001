"""A second SIGTERM or SIGINT while the server is stopping: one log line, no traceback.

Unit tests of the wrapped handlers, and twistd itself held in a slow stop (a relay to a
smarthost that never greets) and signalled twice.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import capturedLogs, formatEvent

from clientid_mta.server.stop_signals import STOP_SIGNALS, StopOnce
from tests.serverproc import auth_plain_code, running, submit


class Triggers:
    """The part of a reactor StopOnce uses: system event triggers, fired by hand."""

    def __init__(self) -> None:
        self.added: dict[tuple[str, str], list[Callable[[], None]]] = {}

    def addSystemEventTrigger(self, phase: str, event: str, call: Callable[[], None]) -> None:
        self.added.setdefault((phase, event), []).append(call)

    def fire(self, phase: str, event: str) -> None:
        for call in self.added.get((phase, event), []):
            call()


@pytest.fixture
def recorded_handlers() -> Iterator[list[int]]:
    """SIGTERM and SIGINT handled by a recorder (as the reactor's would be); restored."""
    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    calls: list[int] = []
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda number, frame: calls.append(number))
    try:
        yield calls
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def deliver(signum: int) -> None:
    """Run the installed Python handler as the interpreter would for ``signum``."""
    handler: Any = signal.getsignal(signum)
    handler(signum, None)


def started() -> Triggers:
    """StopOnce installed on a reactor that has started (and installed its handlers)."""
    reactor = Triggers()
    StopOnce().install(reactor)
    reactor.fire("after", "startup")
    return reactor


def test_the_first_stop_signal_reaches_the_reactor_and_later_ones_are_one_line(
    recorded_handlers: list[int],
) -> None:
    started()
    with capturedLogs() as events:
        deliver(signal.SIGTERM)
        deliver(signal.SIGTERM)
        deliver(signal.SIGINT)
    assert recorded_handlers == [signal.SIGTERM]
    lines = [formatEvent(event) for event in events]
    again = "received {} again: already stopping"
    assert lines == [again.format("SIGTERM"), again.format("SIGINT")]


def test_a_signal_after_a_stop_begun_otherwise_does_not_stop_again(
    recorded_handlers: list[int],
) -> None:
    started().fire("before", "shutdown")  # reactor.stop() called by the server itself
    with capturedLogs():
        deliver(signal.SIGINT)
    assert recorded_handlers == []


def test_handlers_left_at_their_defaults_are_not_wrapped() -> None:
    saved = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        started()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, saved)


def test_twistd_signalled_twice_during_a_slow_stop_logs_no_traceback(tmp_path: Path) -> None:
    with socket.socket() as silent:  # a smarthost that accepts and never greets
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(20)
        config = (
            f'[server]\nworkers = 1\n[relay]\nsmarthost = "127.0.0.1:{silent.getsockname()[1]}"\n'
            "[clientid]\nallow_without_clientid = true\n"
        )
        with running(tmp_path, config) as server:
            client = server.smtp()
            try:
                assert auth_plain_code(client, "alice@example.org", "alice-password") == 235
                message = b"Subject: out\r\n\r\nleaving\r\n"
                submit(client, "alice@example.org", "carol@elsewhere.example", message)
            finally:
                client.close()
            relay, _ = silent.accept()  # the relay is under way: the stop waits for it
            with relay:
                assert server.process is not None
                server.process.send_signal(signal.SIGTERM)
                server.wait_for_output(r"Received SIGTERM, shutting down", timeout=10)
                server.process.send_signal(signal.SIGTERM)
                server.process.send_signal(signal.SIGINT)
                server.wait_for_output(r"received SIGINT again: already stopping", timeout=10)
                server.process.wait(timeout=30)  # the stop's wait for the relay runs out
    output = server.output()
    assert "Traceback" not in output and "ReactorNotRunning" not in output, output
    assert output.count("received SIGTERM again: already stopping") == 1, output
    assert "Server Shut Down." in output, output
