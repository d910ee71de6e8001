"""The queue runner: delivers queued mail, retries it, and bounces what cannot go.

One process owns the queue (it holds the queue lock). Every second it picks up new
entries and requests from ``clientid-mta queue``, then starts a delivery for each
entry with recipients that are due: one connection per destination (the smarthost,
or a recipient domain's MX), within ``max_connections`` overall and
``max_per_destination`` per destination. Results per recipient:

- 2xx: delivered;
- 5xx, a domain that cannot receive mail, or a temporary failure past
  ``max_queue_time``: failed, and a DSN goes to the sender (never to ``<>``);
- 4xx, or no server could be reached: retried after the next step of
  ``retry_schedule``.

Every change of state is saved (fsynced) before the next step depends on it. The
one unavoidable window: the peer accepted the message and we are killed before
saving that; the restart then delivers it again (RFC 5321 6.1 prefers that to loss).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from clientid_mta.config import Config
from clientid_mta.outbound import bounces as dsn
from clientid_mta.outbound.queue import (
    BOUNCED,
    DELIVERED,
    FAILED,
    PENDING,
    AdminBounce,
    Envelope,
    QueueDir,
    Recipient,
    flush,
    give_up,
)
from clientid_mta.outbound.routing import Hop, RouteFailed, Router

if TYPE_CHECKING:
    from clientid_mta.client import submit as client

log = Logger()

BATCH = 20  # queue entries sent over one connection to one destination

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


def enhanced_status(code: int, text: str) -> str:
    """The enhanced status code of a reply, or the generic one for its class."""
    match = _STATUS.match(text)
    return match.group(0) if match else f"{code // 100}.0.0"


def as_file(message: HeaderThenFile) -> BinaryIO:
    return cast(BinaryIO, message)  # it has the read() the client uses


class HeaderThenFile:
    """A file-like reader: the DKIM header, then the stored message."""

    def __init__(self, header: bytes, handle: IO[bytes]) -> None:
        self._header = header
        self._handle = handle

    def read(self, size: int = -1) -> bytes:
        if self._header:
            if size < 0:
                data, self._header = self._header + self._handle.read(), b""
                return data
            data, self._header = self._header[:size], self._header[size:]
            return data
        return self._handle.read(size)

    def close(self) -> None:
        self._handle.close()


@dataclass
class Entry:
    envelope: Envelope
    busy: bool = False
    deleted: bool = False
    unsaved: bool = False  # the last save failed: try it again before anything else


@dataclass
class LocalBounceTarget:
    """How the runner hands a DSN to a local sender: ``deliver(address, data)`` returns
    False when the address is local but has no mailbox."""

    is_local: Callable[[str], bool]
    deliver: Callable[[str, bytes], bool]


# client.send_messages: one result list, or the ConnectionFailed, per transaction
Send = Callable[..., "defer.Deferred[list[list[client.RecipientResult] | client.ConnectionFailed]]"]


class QueueRunner(service.Service):
    name = "queue"

    def __init__(
        self,
        config: Config,
        queue: QueueDir,
        local: LocalBounceTarget,
        router: Router | None = None,
        clock: IReactorTime | None = None,
        send: Send | None = None,
        tick_interval: float = 1.0,
        *,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor

        self.config = config
        self.relay = config.relay
        self.settings = config.queue_config
        self.queue = queue
        self.local = local
        self.router = router or Router(config.relay)
        self.clock: IReactorTime = clock or reactor
        if send is None:
            from clientid_mta.client.submit import send_messages

            send = send_messages
        self.send: Send = send
        self.tick_interval = tick_interval
        self.entries: dict[str, Entry] = {}
        self.active = 0
        self.active_per_destination: dict[str, int] = {}
        self.owner = False
        self._lock_fd: int | None = None
        self._loop: task.LoopingCall | None = None
        self._scanning = False
        self._password = ""

    # --- life ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.relay.password_file is not None:
            self._password = self.relay.password_file.read_text(encoding="utf-8").strip("\r\n")
        self._lock_fd = self.queue.lock_forever()
        if self._lock_fd is None:
            log.info("queue {dir} is run by another process", dir=str(self.queue.root))
            return
        self.owner = True
        removed = self.queue.recover()
        envelopes, corrupt = self.queue.load_all()
        for envelope in envelopes:
            self.entries[envelope.id] = Entry(envelope)
        for queue_id in corrupt:
            log.error(
                "queue entry {id} cannot be read; moved to {dir}, not delivered",
                id=queue_id,
                dir=str(self.queue.corrupt),
            )
        log.info(
            "queue resumed: {count} entries, {removed} half-written files removed",
            count=len(envelopes),
            removed=removed,
        )
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.tick_interval, now=True)

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._lock_fd is not None:
            import os

            os.close(self._lock_fd)
            self._lock_fd = None
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
            scan = threads.deferToThread(self._scan_disk)
            scan.addCallback(self._apply_scan)
            scan.addErrback(lambda f: log.failure("queue scan failed", f))
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
        destination go in a later round.
        """
        now = self.clock.seconds()
        waiting: dict[str, list[tuple[Entry, list[Recipient]]]] = {}
        for entry in list(self.entries.values()):
            if entry.busy:
                continue
            envelope = entry.envelope
            due = [r for r in envelope.pending() if r.next_attempt <= now]
            if not due:
                if entry.deleted or entry.unsaved or envelope.owed_bounces() or envelope.done:
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
        """Save the entry's new state, then bounce, notify or remove as it requires."""
        entry.busy = True
        work = defer.ensureDeferred(self._after_attempts(entry))

        def failed(failure: Any) -> None:
            log.failure("queue entry {id}: internal error", failure, id=entry.envelope.id)

        def free(_: object) -> None:
            entry.busy = False
            self._fill()

        work.addErrback(failed)
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

    # --- one connection to one destination ------------------------------------------

    async def _deliver(self, destination: str, batch: list[tuple[Entry, list[Recipient]]]) -> None:
        try:
            await self._try_hops(destination, batch)
        finally:
            self._free_slot(destination)

    async def _try_hops(self, destination: str, batch: list[tuple[Entry, list[Recipient]]]) -> None:
        now = self.clock.seconds()
        try:
            hops = await self.router.hops(destination)
        except RouteFailed as problem:
            for entry, due in batch:
                for recipient in due:
                    self._temporary_or_final(
                        entry.envelope,
                        recipient,
                        now,
                        str(problem),
                        problem.status,
                        problem.permanent,
                    )
            return
        from clientid_mta.client.submit import ConnectionFailed

        problem_text = "no mail server to try"
        left = batch
        for hop in hops:
            try:
                outcomes = await self._send(hop, left)
            except ConnectionFailed as problem:
                outcomes = [problem] * len(left)
            now = self.clock.seconds()
            retry = []
            for (entry, due), outcome in zip(left, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    problem_text = f"{hop.name}[{hop.address}]:{hop.port}: {outcome}"
                    retry.append((entry, due))
                else:
                    self._record(entry.envelope, due, outcome, hop.name, now)
            if retry:
                log.info("queue: {problem}", problem=problem_text)
            left = retry
            if not left:
                return
        for entry, due in left:
            for recipient in due:
                self._temporary_or_final(
                    entry.envelope, recipient, now, problem_text, "4.4.1", False
                )

    def _record(
        self,
        envelope: Envelope,
        due: list[Recipient],
        results: list[client.RecipientResult],
        relay_name: str,
        now: float,
    ) -> None:
        by_address = {r.address: r for r in results}
        for recipient in due:
            result = by_address[recipient.address]
            recipient.remote_mta = relay_name
            text = f"{result.code} {result.text}"
            status = enhanced_status(result.code, result.text)
            if result.delivered:
                recipient.state, recipient.status, recipient.last_error = DELIVERED, status, ""
                recipient.last_attempt = now
                log.info(
                    "queue {id}: delivered to <{rcpt}> via {relay}: {reply}",
                    id=envelope.id,
                    rcpt=recipient.address,
                    relay=relay_name,
                    reply=text,
                )
            else:
                self._temporary_or_final(envelope, recipient, now, text, status, result.permanent)

    async def _send(
        self, hop: Hop, batch: list[tuple[Entry, list[Recipient]]]
    ) -> list[list[client.RecipientResult] | Exception]:
        """One connection to ``hop`` for the whole batch: a result list, or the
        ConnectionFailed that stopped it, per entry."""
        from clientid_mta.client.submit import ConnectionFailed

        relay = self.relay
        smarthost = relay.smarthost_address is not None
        if smarthost and hop.port == 465:
            tls = "implicit"
        else:
            tls = "starttls" if relay.tls == "required" else "opportunistic"
        options: dict[str, Any] = {
            "tls": tls,
            "tls_hostname": hop.name,
            "trust_roots": relay.ca_file,
            "username": (relay.username or None) if smarthost else None,
            "password": (self._password or None) if smarthost else None,
            "client_id": (relay.client_id_type, relay.client_id)
            if smarthost and relay.client_id
            else None,
            "helo": relay.helo_name or self.config.server.hostname,
            "timeout": relay.command_timeout,
            "connect_timeout": relay.connect_timeout,
        }
        from clientid_mta.client.submit import Transaction

        messages = [
            HeaderThenFile(
                entry.envelope.dkim_header.encode("ascii"),
                self.queue.open_message(entry.envelope.id),
            )
            for entry, _due in batch
        ]
        try:
            transactions = [
                Transaction(
                    entry.envelope.sender, [r.address for r in due], cast(BinaryIO, message)
                )
                for (entry, due), message in zip(batch, messages, strict=True)
            ]
            sent = await self.send(hop.address, hop.port, transactions, **options)
            outcomes: list[list[client.RecipientResult] | Exception] = list(sent)
        except ConnectionFailed as problem:
            outcomes = [problem] * len(batch)
        finally:
            for message in messages:
                message.close()
        return outcomes

    def _temporary_or_final(
        self,
        envelope: Envelope,
        recipient: Recipient,
        now: float,
        error: str,
        status: str,
        permanent: bool,
    ) -> None:
        if permanent:
            recipient.state, recipient.status, recipient.last_error = FAILED, status, error
            recipient.last_attempt = now
            recipient.attempts += 1
            log.info(
                "queue {id}: <{rcpt}> failed: {error}",
                id=envelope.id,
                rcpt=recipient.address,
                error=error,
            )
            return
        recipient.defer(now, error, status, self.settings.retry_schedule)
        if now - envelope.arrival >= self.settings.max_queue_time:
            give_up([recipient], "4.4.7", f"delivery time expired; last error: {error}")
            log.info("queue {id}: <{rcpt}> expired", id=envelope.id, rcpt=recipient.address)
        else:
            log.info(
                "queue {id}: <{rcpt}> deferred (attempt {n}, next in {wait:.0f} s): {error}",
                id=envelope.id,
                rcpt=recipient.address,
                n=recipient.attempts,
                wait=recipient.next_attempt - now,
                error=error,
            )

    # --- after an attempt: save, bounce, notice, remove ------------------------------

    async def _after_attempts(self, entry: Entry) -> None:
        envelope = entry.envelope
        if entry.deleted:
            await threads.deferToThread(self.queue.remove, envelope.id)
            self.entries.pop(envelope.id, None)
            return
        now = self.clock.seconds()
        if envelope.done:  # all delivered: removing it is the only save needed
            await threads.deferToThread(self.queue.remove, envelope.id)
            self.entries.pop(envelope.id, None)
            log.info("queue {id}: done", id=envelope.id)
            return
        entry.unsaved = True
        await threads.deferToThread(self.queue.save, envelope)
        entry.unsaved = False
        owed = envelope.owed_bounces()
        if owed:
            await self._notify_sender(envelope, owed, "failed")
            for recipient in owed:
                recipient.state = BOUNCED
            await threads.deferToThread(self.queue.save, envelope)
        elif self._delay_notice_due(envelope, now):
            await self._notify_sender(envelope, envelope.pending(), "delayed")
            envelope.delay_notice_sent = True
            await threads.deferToThread(self.queue.save, envelope)
        if envelope.done:
            await threads.deferToThread(self.queue.remove, envelope.id)
            self.entries.pop(envelope.id, None)
            log.info("queue {id}: done", id=envelope.id)

    def _delay_notice_due(self, envelope: Envelope, now: float) -> bool:
        after = self.settings.delay_notice_after
        return bool(
            after
            and not envelope.delay_notice_sent
            and envelope.pending()
            and now - envelope.arrival >= after
        )

    async def _notify_sender(
        self, envelope: Envelope, recipients: list[Recipient], action: str
    ) -> None:
        """A DSN to the envelope sender: into its Maildir, or queued if it is remote."""
        if not dsn.is_bounce_candidate(envelope.sender):
            log.info("queue {id}: null sender, no {action} notice", id=envelope.id, action=action)
            return
        report = [
            dsn.FailedRecipient(
                address=r.address,
                status=r.status or ("4.0.0" if action == "delayed" else "5.0.0"),
                diagnostic=r.last_error,
                remote_mta=r.remote_mta,
                last_attempt=r.last_attempt,
            )
            for r in recipients
        ]
        new_entry = await threads.deferToThread(self._store_notice, envelope, report, action)
        if new_entry is not None:
            self.add(new_entry)

    def _store_notice(
        self, envelope: Envelope, report: list[dsn.FailedRecipient], action: str
    ) -> Envelope | None:
        with self.queue.open_message(envelope.id) as original:
            data = dsn.build_dsn(
                reporting_mta=self.config.server.hostname,
                postmaster="",
                original_sender=envelope.sender,
                queue_id=envelope.id,
                arrival=envelope.arrival,
                recipients=report,
                original=original,
                action=action,
                now=time.time(),
                retry_until=envelope.arrival + self.settings.max_queue_time,
            )
        sender = envelope.sender
        if self.local.is_local(sender.rpartition("@")[2]):
            if not self.local.deliver(sender, data):
                log.warn(
                    "queue {id}: {action} notice dropped: local sender <{sender}> has no mailbox",
                    id=envelope.id,
                    action=action,
                    sender=sender,
                )
            return None
        return enqueue_bytes(self.queue, "", [sender], data)


def enqueue_bytes(queue: QueueDir, sender: str, recipients: list[str], data: bytes) -> Envelope:
    """Queue a message we wrote ourselves (a DSN). Blocking."""
    writer = queue.new_message()
    try:
        writer.write(data)
        envelope = Envelope(
            id=writer.id,
            sender=sender,
            arrival=time.time(),
            recipients=[Recipient(address) for address in recipients],
        )
        writer.commit(envelope)
    except BaseException:
        writer.abort()
        raise
    return envelope
