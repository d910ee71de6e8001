"""The queue runner: the schedule of the outbound queue.

One process owns the queue (it holds the queue lock). Every second it picks up new
entries and requests from ``clientid-mta queue``, then starts a delivery for each
entry with recipients that are due: one connection per destination (the smarthost,
or a recipient domain's MX), within ``max_connections`` overall and
``max_per_destination`` per destination, up to BATCH entries per connection. The
attempt itself (read, route, send, each recipient's result, bounces and delay
notices) is ``attempt.py``; the runner decides when, retries a failed save on a
back-off, and never spins on an entry that keeps failing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from clientid_mta.config import Config
from clientid_mta.global_reactor import global_reactor
from clientid_mta.outbound.attempt import Attempts, LocalBounceTarget, Send
from clientid_mta.outbound.queue import (
    PENDING,
    AdminBounce,
    Envelope,
    QueueDir,
    Recipient,
    flush,
    give_up,
)
from clientid_mta.outbound.routing import Router

log = Logger()

T = TypeVar("T")

BATCH = 20  # queue entries sent over one connection to one destination
# After a failed save (full disk...), the entry waits this long before the next try,
# doubling up to the maximum: a broken disk costs a few tries a minute, not thousands.
CONCLUDE_RETRY_FIRST = 1.0
CONCLUDE_RETRY_MAX = 300.0


def conclude_retry_delay(failures: int) -> float:
    """Seconds to wait after the ``failures``-th failure in a row to conclude an entry."""
    return min(CONCLUDE_RETRY_MAX, CONCLUDE_RETRY_FIRST * 2 ** min(failures - 1, 30))


@dataclass
class Entry:
    envelope: Envelope
    busy: bool = False
    deleted: bool = False
    conclude_failures: int = 0  # failed conclusions in a row (saving, bouncing, removing)
    retry_at: float = 0.0  # after a failed conclusion: not touched again before this


class Trouble:
    """A kind of failure that is retried: logged when it starts and when it ends, not at
    every try (a full disk once gave 4,180 tracebacks in a second)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failing: set[str] = set()  # the keys (queue ids) failing now

    def failed(self, key: str, failure: Failure) -> None:
        if not self.failing:
            log.failure(
                "{what} failed (first: {key}); retrying with back-off, quiet until it works",
                failure,
                level=LogLevel.error,
                what=self.what,
                key=key,
            )
        self.failing.add(key)

    def worked(self, key: str) -> None:
        if key in self.failing:
            self.failing.discard(key)
            if not self.failing:
                log.info("{what} works again", what=self.what)


@dataclass
class Recovered:
    """What ``QueueRunner.recover`` found on disk (read in a thread)."""

    password: str
    lock_fd: int | None
    removed: int = 0
    envelopes: list[Envelope] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)


class QueueRunner(service.Service):
    """``reactor`` (default: the global one) gives the clock, the connections and the
    threads; tests pass a fake one. ``attempts`` makes each delivery attempt and its
    conclusion; ``send`` (default: ``client.send_messages``) is what it sends with."""

    name = "queue"

    def __init__(
        self,
        config: Config,
        queue: QueueDir,
        local: LocalBounceTarget,
        router: Router | None = None,
        *,
        reactor: Any = None,
        send: Send | None = None,
        tick_interval: float = 1.0,
    ) -> None:
        self.config = config
        self.relay = config.relay
        self.settings = config.queue_config
        self.queue = queue
        self.router = router or Router(config.relay)
        self.reactor = reactor if reactor is not None else global_reactor()
        self.clock: IReactorTime = self.reactor
        if send is None:
            from clientid_mta.client import send_messages

            send = send_messages
        self.attempts = Attempts(
            config, queue, local, self.router, reactor=reactor, send=send, enqueued=self.add
        )
        self.tick_interval = tick_interval
        self.entries: dict[str, Entry] = {}
        self.active = 0
        self.active_per_destination: dict[str, int] = {}
        self.owner = False
        self._lock_fd: int | None = None
        self._loop: task.LoopingCall | None = None
        self._recovery: defer.Deferred[None] | None = None
        self._recovery_failure: Failure | None = None
        self._scanning = False
        self.scan_trouble = Trouble("scanning the queue")
        self.conclude_trouble = Trouble("saving queue entries")

    @property
    def send(self) -> Send:
        """How an attempt sends (``client.send_messages``); a test may replace it."""
        return self.attempts.send

    @send.setter
    def send(self, send: Send) -> None:
        self.attempts.send = send

    def _in_thread(self, function: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        pool = cast(IReactorThreads, self.reactor).getThreadPool()
        return threads.deferToThreadPool(self.reactor, pool, function, *args)

    # --- life ---------------------------------------------------------------------

    def recover(self) -> defer.Deferred[None]:
        """Take the queue lock, delete what a crash left half-written and load the
        entries, all in a thread. Call it before the listeners start: it deletes the
        files in ``tmp/``, where new sessions write (files newer than the call are kept,
        for a listener already bound, as under twistd). ``startService`` calls it if nobody
        did. Fires when done (errback: the queue cannot be used)."""
        if self._recovery is None:
            found = self._in_thread(self._recover_disk, time.time())
            self._recovery = found.addCallback(self._resume).addErrback(self._keep_recovery_failure)
        done: defer.Deferred[None] = defer.Deferred()
        self._recovery.addCallback(lambda _: self._tell_recovered(done))
        return done

    def _keep_recovery_failure(self, failure: Failure) -> None:
        self._recovery_failure = failure

    def _tell_recovered(self, waiting: defer.Deferred[None]) -> None:
        if self._recovery_failure is not None:
            waiting.errback(self._recovery_failure)
        else:
            waiting.callback(None)

    def _recover_disk(self, started: float) -> Recovered:
        password = ""
        if self.relay.password_file is not None:
            password = self.relay.password_file.read_text(encoding="utf-8").strip("\r\n")
        lock_fd = self.queue.lock_forever()
        if lock_fd is None:
            return Recovered(password, None)
        removed = self.queue.recover(older_than=started)
        envelopes, corrupt = self.queue.load_all()
        return Recovered(password, lock_fd, removed, envelopes, corrupt)

    def _resume(self, found: Recovered) -> None:
        self.attempts.password = found.password
        if found.lock_fd is None:
            log.info("queue {dir} is run by another process", dir=str(self.queue.root))
            return
        self._lock_fd = found.lock_fd
        self.owner = True
        for envelope in found.envelopes:
            self.entries.setdefault(envelope.id, Entry(envelope))
        for queue_id in found.corrupt:
            log.error(
                "queue entry {id} cannot be read; moved to {dir}, not delivered",
                id=queue_id,
                dir=str(self.queue.corrupt),
            )
        log.info(
            "queue resumed: {count} entries, {removed} half-written files removed",
            count=len(found.envelopes),
            removed=found.removed,
        )
        self._start_loop()

    def _start_loop(self) -> None:
        if self.running and self.owner and self._loop is None:
            self._loop = task.LoopingCall(self.tick)
            self._loop.clock = self.clock
            self._loop.start(self.tick_interval, now=True)

    def startService(self) -> None:
        super().startService()
        if self._recovery is None:
            self.recover().addErrback(
                lambda failure: log.failure("the queue cannot be started", failure)
            )
        self._start_loop()

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            self.owner = False
        return None

    def add(self, envelope: Envelope) -> None:
        """A new entry was committed by this process: start on it now."""
        if self.owner and envelope.id not in self.entries:
            self.entries[envelope.id] = Entry(envelope)
            self._fill()

    # --- the loop -----------------------------------------------------------------

    def tick(self) -> None:
        if not self._scanning:
            self._scanning = True
            scan = self._in_thread(self._scan_disk)
            scan.addCallback(self._apply_scan)
            scan.addCallbacks(
                lambda _: self.scan_trouble.worked("scan"),
                lambda failure: self.scan_trouble.failed("scan", failure),
            )
            scan.addBoth(self._scan_done)
        self._fill()

    def _scan_done(self, _: object) -> None:
        self._scanning = False

    def _scan_disk(self) -> tuple[list[tuple[str, str]], list[Envelope]]:
        requests = self.queue.take_requests()
        new = []
        for queue_id in set(self.queue.ids()) - set(self.entries):
            try:
                new.append(self.queue.load(queue_id))
            except (OSError, ValueError, TypeError, KeyError):
                continue  # being written or removed; the next scan sees it settled
        return requests, new

    def _apply_scan(self, scanned: tuple[list[tuple[str, str]], list[Envelope]]) -> None:
        requests, new = scanned
        for envelope in new:
            self.entries.setdefault(envelope.id, Entry(envelope))
        for action, queue_id in requests:
            targets = (
                [self.entries[queue_id]]
                if queue_id in self.entries
                else list(self.entries.values())
                if not queue_id and action == "flush"
                else []
            )
            for entry in targets:
                self._request(entry, action)
        self._fill()

    def _request(self, entry: Entry, action: str) -> None:
        log.info("queue {action} {id} by the administrator", action=action, id=entry.envelope.id)
        if action == "flush":
            flush(entry.envelope)
        elif action == "delete":
            entry.deleted = True
        elif action == "bounce":
            give_up(entry.envelope.recipients, AdminBounce.STATUS, AdminBounce.REASON)

    def _fill(self) -> None:
        """Start what is due, oldest first, while there are free connection slots.

        Entries due at one destination share a connection (up to BATCH of them). An
        entry takes part in one delivery at a time; recipients it has at another
        destination go in a later round. An entry whose last conclusion failed waits
        for its back-off, then concludes again before anything else.
        """
        now = self.clock.seconds()
        waiting: dict[str, list[tuple[Entry, list[Recipient]]]] = {}
        for entry in list(self.entries.values()):
            if entry.busy or entry.retry_at > now:
                continue
            envelope = entry.envelope
            due = [r for r in envelope.pending() if r.next_attempt <= now]
            if entry.conclude_failures or not due:
                if (
                    entry.conclude_failures
                    or entry.deleted
                    or envelope.owed_bounces()
                    or envelope.done
                ):
                    self._conclude(entry)
                continue
            destination = self.router.destination(due[0].address)
            same = [r for r in due if self.router.destination(r.address) == destination]
            waiting.setdefault(destination, []).append((entry, same))
        for destination, items in waiting.items():
            while items and self._take_slot(destination):
                batch, items = items[:BATCH], items[BATCH:]
                for entry, _ in batch:
                    entry.busy = True
                job = defer.ensureDeferred(self._deliver(destination, batch))
                job.addErrback(self._internal_error, batch)
                job.addBoth(self._conclude_all, batch)

    def _internal_error(self, failure: Any, batch: list[tuple[Entry, list[Recipient]]]) -> None:
        """A bug or an unreadable entry: back off like a temporary failure, so that the
        runner never spins on it."""
        log.failure("queue delivery: internal error", failure)
        now = self.clock.seconds()
        for _entry, due in batch:
            for recipient in due:
                if recipient.state == PENDING and recipient.next_attempt <= now:
                    recipient.defer(
                        now, "internal error, see the log", "4.3.0", self.settings.retry_schedule
                    )

    def _conclude_all(self, _: object, batch: list[tuple[Entry, list[Recipient]]]) -> None:
        for entry, _due in batch:
            self._conclude(entry)

    def _conclude(self, entry: Entry) -> None:
        """Save the entry's new state, then bounce, notify or remove as it requires.

        A failure (full disk, anything) puts the entry aside on a back-off schedule;
        the trouble is logged once, and once more when saving works again."""
        entry.busy = True
        queue_id = entry.envelope.id
        work = defer.ensureDeferred(self._after_attempts(entry))

        def concluded(_: object) -> None:
            entry.conclude_failures, entry.retry_at = 0, 0.0
            self.conclude_trouble.worked(queue_id)

        def failed(failure: Failure) -> None:
            entry.conclude_failures += 1
            entry.retry_at = self.clock.seconds() + conclude_retry_delay(entry.conclude_failures)
            self.conclude_trouble.failed(queue_id, failure)

        def free(_: object) -> None:
            entry.busy = False
            self._fill()

        work.addCallbacks(concluded, failed)
        work.addBoth(free)

    def _take_slot(self, destination: str) -> bool:
        in_flight = self.active_per_destination.get(destination, 0)
        if self.active >= self.relay.max_connections or in_flight >= self.relay.max_per_destination:
            return False
        self.active += 1
        self.active_per_destination[destination] = in_flight + 1
        return True

    def _free_slot(self, destination: str) -> None:
        self.active -= 1
        left = self.active_per_destination[destination] - 1
        if left:
            self.active_per_destination[destination] = left
        else:
            del self.active_per_destination[destination]

    # --- the attempt (attempt.py) and its conclusion --------------------------------

    async def _deliver(self, destination: str, batch: list[tuple[Entry, list[Recipient]]]) -> None:
        """One attempt of ``batch``, holding a connection slot of ``destination``."""

        def set_aside(envelope: Envelope) -> None:
            # Not read (the batch reached its size cap): free for a later batch at once,
            # and out of this batch so that it is not concluded.
            for item in batch:
                if item[0].envelope is envelope:
                    batch.remove(item)
                    item[0].busy = False
                    return

        due = [(entry.envelope, recipients) for entry, recipients in batch]
        try:
            await self.attempts.deliver(destination, due, set_aside)
        finally:
            self._free_slot(destination)

    async def _after_attempts(self, entry: Entry) -> None:
        if await self.attempts.conclude(entry.envelope, deleted=entry.deleted):
            self.entries.pop(entry.envelope.id, None)
