"""A second SIGTERM or SIGINT while the server is already stopping gets one log line.

Twisted's own handlers call ``reactor.stop()`` on every such signal. During a stop that
takes a while (messages still being stored or relayed) a second one raises
``ReactorNotRunning`` and logs a traceback. Sending it twice is normal: an admin pressing
Ctrl-C again, or systemd and the parent process both signalling a worker.

Only for processes that own their reactor (twistd, a worker); an embedding program keeps
its own signal handling.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from twisted.logger import Logger

log = Logger()

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnce:
    """Wraps the reactor's stop handlers once it has installed them (after startup)."""

    def __init__(self) -> None:
        self.stopping = False

    def install(self, reactor: Any) -> None:
        reactor.addSystemEventTrigger("after", "startup", self._wrap_handlers)
        # A stop that did not come from a signal (the service ending the process).
        reactor.addSystemEventTrigger("before", "shutdown", self._mark_stopping)

    def _mark_stopping(self) -> None:
        self.stopping = True

    def _wrap_handlers(self) -> None:
        for signum in STOP_SIGNALS:
            previous = signal.getsignal(signum)
            if callable(previous):  # not SIG_DFL/SIG_IGN: the reactor's (or a caller's) own
                signal.signal(signum, self._handler(previous))

    def _handler(self, previous: Any) -> Any:
        def handle(number: int, frame: FrameType | None) -> None:
            if self.stopping:
                log.info(
                    "received {signal} again: already stopping",
                    signal=signal.Signals(number).name,
                )
                return
            self.stopping = True
            previous(number, frame)

        return handle
