"""Housekeeping: trusted devices' logins, the audit batch and the failure budgets reach
the disk every second.

The device policy notes a trusted device's login after its reply (devices/last_seen.py),
the audit log buffers entries in memory and the throttle keeps its budgets there;
this service writes them (in a thread: SQLite and fsync block), prunes the shared
budget rows of a multi-process server, and logs the count of throttled attempts.
``stopService`` writes everything one last time.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from clientid_mta.auth.checker import ClientIdChecker, Defences
from clientid_mta.devices.notices import SENT_KEPT_FOR
from clientid_mta.devices.store import Stores, StoreUnavailable

log = Logger()
T = TypeVar("T")

INTERVAL = 1.0  # seconds between audit flushes
THROTTLE_SAVE_TICKS = 10  # save the throttle state every this many flushes
# Every this many flushes: give freed pages back, checkpoint the journal, forget the
# notices sent more than an hour ago and the approval codes used or expired.
COMPACT_TICKS = 60
KNOWN_REFRESH_TICKS = 5  # re-read the trusted devices and usual networks this often


class Housekeeping(service.Service):
    name = "housekeeping"

    def __init__(self, reactor: Any, max_entries: int = 0) -> None:
        self.reactor = reactor
        self.max_entries = max_entries  # [audit] max_entries, for the log line
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

    def _in_thread(self, function: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        return threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), function, *args
        )

    def write(self, final: bool = False) -> int:
        """Write the audit batch and, now and then, the throttle state; prune and compact
        the store. Returns how many audit entries the bound dropped (to log). Blocking."""
        defences, store = self.defences, self.store
        if defences is None or store is None:
            return 0
        logins = self.checker.policy.logins if self.checker is not None else None
        if logins is not None:
            logins.flush()  # first: "durable within a second" is promised for them
        dropped = defences.audit.flush() if defences.audit is not None else 0
        self._ticks += 1
        if self._ticks % COMPACT_TICKS == 0:
            self.prune_and_compact()
        throttle = defences.throttle
        if throttle is not None and (final or self._ticks % THROTTLE_SAVE_TICKS == 0):
            if throttle.shared:
                throttle.prune_shared()
            else:
                store.budgets.save(throttle.snapshot())
        notifier = self.checker.policy.notifier if self.checker is not None else None
        if notifier is not None and not final:
            notifier.send_waiting()  # the notices that waited for the store
        if defences.known is not None and not final and self._ticks % KNOWN_REFRESH_TICKS == 0:
            defences.known.refresh()  # the admin command's and other workers' changes
        return dropped

    def prune_and_compact(self) -> None:
        """Forget the notices sent that no cap counts any more and the approval codes
        used or expired; give the store's free pages back, keep its journal small.
        Blocking."""
        store = self.store
        if store is None:
            return
        now = time.time()
        store.notices.prune_notices(now - SENT_KEPT_FOR)
        store.approval_codes.prune_approval_codes(now)
        store.audit.compact()

    def _report_dropped(self, dropped: int) -> None:
        if dropped:
            log.warn(
                "the audit log is at its bound of {max_entries} entries ([audit] max_entries):"
                " dropped the {dropped} earliest",
                max_entries=self.max_entries,
                dropped=dropped,
            )

    def _tick(self) -> None:
        checker = self.checker
        if checker is not None and checker.throttled_count:
            log.info("throttled {count} AUTH attempts", count=checker.throttled_count)
            checker.throttled_count = 0
        if not self._writing.locked:
            written = self._writing.run(self._in_thread, self.write)
            written.addCallback(self._report_dropped).addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        if isinstance(failure.value, StoreUnavailable) and failure.value.reported:
            return  # the backend logs when the store goes and comes back; retried anyway
        if failure.check(OSError, sqlite3.Error, StoreUnavailable):  # retried next second
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
        reported = final.addCallback(self._report_dropped)
        return reported.addErrback(
            lambda failure: log.failure("saving state at stop failed", failure)
        )
