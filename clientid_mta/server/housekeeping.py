"""Housekeeping: the audit batch and the failure budgets reach the disk every second.

The audit log buffers entries in memory and the throttle keeps its budgets there;
this service writes both (in a thread: SQLite and fsync block), prunes the shared
budget rows of a multi-process server, and logs the count of throttled attempts.
``stopService`` writes everything one last time.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from clientid_mta.auth.checker import ClientIdChecker, Defences
from clientid_mta.devices.store import Stores

log = Logger()

INTERVAL = 1.0  # seconds between audit flushes
THROTTLE_SAVE_TICKS = 10  # save the throttle state every this many flushes


class Housekeeping(service.Service):
    name = "housekeeping"

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.defences: Defences | None = None
        self.store: Stores | None = None
        self.checker: ClientIdChecker | None = None
        self._ticks = 0
        self._writing = defer.DeferredLock()  # one write at a time, the final one last
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = reactor

    def watch(self, defences: Defences, store: Stores, checker: ClientIdChecker) -> None:
        """What to look after; set by the server once it has opened its state."""
        self.defences, self.store, self.checker = defences, store, checker

    def _in_thread(self, function: Callable[..., None], *args: Any) -> defer.Deferred[None]:
        return threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), function, *args
        )

    def write(self, final: bool = False) -> None:
        """Write the audit batch and, now and then, the throttle state. Blocking."""
        defences, store = self.defences, self.store
        if defences is None or store is None:
            return
        if defences.audit is not None:
            defences.audit.flush()
        self._ticks += 1
        throttle = defences.throttle
        if throttle is not None and (final or self._ticks % THROTTLE_SAVE_TICKS == 0):
            if throttle.shared:
                throttle.prune_shared()
            else:
                store.budgets.save(throttle.snapshot())

    def _tick(self) -> None:
        checker = self.checker
        if checker is not None and checker.throttled_count:
            log.info("throttled {count} AUTH attempts", count=checker.throttled_count)
            checker.throttled_count = 0
        if not self._writing.locked:
            self._writing.run(self._in_thread, self.write).addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        if failure.check(OSError, sqlite3.Error):  # locked or full: retried next second
            log.error("cannot write the audit log now: {problem}", problem=str(failure.value))
        else:
            log.failure("housekeeping failed", failure)

    def startService(self) -> None:
        super().startService()
        self._loop.start(INTERVAL, now=False)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        final = self._writing.run(self._in_thread, self.write, True)
        return final.addErrback(lambda failure: log.failure("saving state at stop failed", failure))
