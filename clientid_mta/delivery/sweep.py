"""The daily sweep of Maildir ``tmp/`` folders: a crash or a kill during DATA leaves a
partial message there, and nothing else would ever remove it."""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import task, threads
from twisted.logger import Logger

from clientid_mta.delivery.maildir import MaildirRoot
from clientid_mta.global_reactor import global_reactor

log = Logger()

SWEEP_INTERVAL = 86400.0  # once at start, then daily


class TmpSweeper(service.Service):
    """Runs ``MaildirRoot.sweep_tmp`` in a thread at start and every ``interval`` seconds."""

    name = "maildir-tmp-sweeper"

    def __init__(
        self, maildirs: MaildirRoot, reactor: Any = None, interval: float = SWEEP_INTERVAL
    ) -> None:
        self.maildirs = maildirs
        self.reactor = reactor if reactor is not None else global_reactor()
        self.interval = interval
        self._loop: task.LoopingCall | None = None
        self._busy = False

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.sweep)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def sweep(self) -> None:
        if self._busy:
            return  # the last sweep is still going
        self._busy = True
        now = self.reactor.seconds()
        swept = threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self.maildirs.sweep_tmp, now
        )
        swept.addCallbacks(self._swept, self._failed)

    def _swept(self, count: int) -> None:
        self._busy = False
        log.info(
            "removed {count} leftover files older than 36 hours from Maildir tmp/ folders",
            count=count,
        )

    def _failed(self, failure: Any) -> None:
        self._busy = False
        log.failure("sweeping Maildir tmp/ folders failed; trying again tomorrow", failure)
