"""One delivery attempt: a batch of queue entries sent to one destination, and after it.

The runner (``runner.py``) decides when and what: which entries are due, at which
destination, in which batch, within which connection slots. ``Attempts.deliver``
makes one attempt of such a batch: it reads the messages (in a thread), finds the
route (``routing.py``), sends through ``clientid_mta.client`` over one connection per
hop, and turns each recipient's reply into its new state:

- 2xx: delivered;
- 5xx, a domain that cannot receive mail, or a temporary failure past
  ``max_queue_time``: failed, and a DSN goes to the sender (never to ``<>``);
- 4xx, no server could be reached, or an unreadable message: retried after the next
  step of ``retry_schedule``.

``Attempts.conclude`` then records the outcome: it saves (fsyncs) the entry, sends the
bounce or the delay notice it is owed (``bounces.py``) and removes it once every
recipient is delivered or bounced. Every change of state is saved before the next step
depends on it. The one unavoidable window: the peer accepted the message and we are
killed before saving that; the restart then delivers it again (RFC 5321 6.1 prefers
that to loss).
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, BinaryIO, TypeVar, cast

from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger

from clientid_mta.config import Config
from clientid_mta.observe.events import NO_EVENTS, IServerEvents
from clientid_mta.outbound import bounces as dsn
from clientid_mta.outbound.queue import (
    BOUNCED,
    DELIVERED,
    FAILED,
    Envelope,
    QueueDir,
    Recipient,
    give_up,
)
from clientid_mta.outbound.routing import Hop, RouteFailed, Router

if TYPE_CHECKING:
    import clientid_mta.client as client

log = Logger()

T = TypeVar("T")

# Queued messages are read into memory (in a thread) before a connection sends them;
# a batch stops growing at this many bytes, so a connection holds at most about this.
BATCH_BYTES = 32 * 1024 * 1024

# One entry of a batch: its envelope and the recipients due at the batch's destination.
Due = tuple[Envelope, list[Recipient]]

# client.send_messages: one result list, or the ConnectionFailed, per transaction
Send = Callable[..., "defer.Deferred[list[list[client.RecipientResult] | client.ConnectionFailed]]"]

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


def enhanced_status(code: int, text: str) -> str:
    """The enhanced status code of a reply, or the generic one for its class."""
    match = _STATUS.match(text)
    return match.group(0) if match else f"{code // 100}.0.0"


def delay_notice_due(envelope: Envelope, now: float, after: float) -> bool:
    """A delay notice is owed once, when recipients are still pending ``after`` seconds
    past arrival (0: never)."""
    return bool(
        after
        and not envelope.delay_notice_sent
        and envelope.pending()
        and now - envelope.arrival >= after
    )


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
class Loaded:
    """What one delivery sends, read in a thread: the CA file (PEM) and each message."""

    trust_roots: bytes | None = None
    messages: dict[str, bytes | OSError] = field(default_factory=dict)
    size: int = 0


@dataclass
class LocalBounceTarget:
    """How a DSN reaches a local sender: ``deliver(address, data)`` returns False when
    the address is local but has no mailbox."""

    is_local: Callable[[str], bool]
    deliver: Callable[[str, bytes], bool]


class Attempts:
    """Makes the delivery attempts of one queue and records their outcomes.

    ``reactor`` gives the clock, the threads and the client's connections;
    ``enqueued`` is told of each DSN this puts into the queue (the runner's ``add``);
    ``password`` is the smarthost password, set once the runner has read it."""

    def __init__(
        self,
        config: Config,
        queue: QueueDir,
        local: LocalBounceTarget,
        router: Router,
        *,
        reactor: Any,
        send: Send,
        enqueued: Callable[[Envelope], None],
    ) -> None:
        self.config = config
        self.relay = config.relay
        self.settings = config.queue_config
        self.queue = queue
        self.local = local
        self.router = router
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.send = send
        self.enqueued = enqueued
        self.password = ""
        self.events: IServerEvents = NO_EVENTS  # metrics, when the server counts

    def _in_thread(self, function: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        pool = cast(IReactorThreads, self.reactor).getThreadPool()
        return threads.deferToThreadPool(self.reactor, pool, function, *args)

    # --- one attempt: route, read, send, record each recipient's result ----------------

    async def deliver(
        self, destination: str, batch: list[Due], set_aside: Callable[[Envelope], None]
    ) -> None:
        """One attempt of ``batch`` at ``destination``: each hop in turn, over one
        connection, until every entry has a result or no hop is left. Updates the
        recipients in place (nothing is saved here: see ``conclude``). An entry whose
        message was not read because the batch reached BATCH_BYTES is handed to
        ``set_aside`` at once, untouched, for a later batch."""
        now = self.clock.seconds()
        try:
            hops = await self.router.hops(destination)
        except RouteFailed as problem:
            for envelope, due in batch:
                for recipient in due:
                    self._temporary_or_final(
                        envelope, recipient, now, str(problem), problem.status, problem.permanent
                    )
            return
        from clientid_mta.client import ConnectionFailed

        loaded = await self._in_thread(self._read_batch, [envelope.id for envelope, _ in batch])
        left = self._readable(batch, loaded, set_aside)
        problem_text = "no mail server to try"
        for hop in hops:
            try:
                outcomes = await self._send(hop, left, loaded)
            except ConnectionFailed as problem:
                outcomes = [problem] * len(left)
            now = self.clock.seconds()
            retry = []
            for (envelope, due), outcome in zip(left, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    problem_text = f"{hop.name}[{hop.address}]:{hop.port}: {outcome}"
                    retry.append((envelope, due))
                else:
                    self._record(envelope, due, outcome, hop.name, now)
            if retry:
                log.info("queue: {problem}", problem=problem_text)
            left = retry
            if not left:
                return
        for envelope, due in left:
            for recipient in due:
                self._temporary_or_final(envelope, recipient, now, problem_text, "4.4.1", False)

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
                self.events.delivery("delivered")
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

    def _read_batch(self, queue_ids: list[str]) -> Loaded:
        """The CA file and the queued messages, read in a thread (the client reads its
        message on the reactor). Stops at BATCH_BYTES; an unreadable one is its error."""
        loaded = Loaded()
        if self.relay.ca_file is not None:
            loaded.trust_roots = self.relay.ca_file.read_bytes()
        for queue_id in queue_ids:
            if loaded.size >= BATCH_BYTES:
                break
            try:
                with self.queue.open_message(queue_id) as handle:
                    data = handle.read()
            except OSError as problem:
                loaded.messages[queue_id] = problem
                continue
            loaded.messages[queue_id] = data
            loaded.size += len(data)
        return loaded

    def _readable(
        self, batch: list[Due], loaded: Loaded, set_aside: Callable[[Envelope], None]
    ) -> list[Due]:
        """What of ``batch`` can be sent. Entries left out for size are set aside
        untouched; unreadable ones are deferred like a temporary failure."""
        now = self.clock.seconds()
        sendable = []
        for item in batch:
            envelope, due = item
            data = loaded.messages.get(envelope.id)
            if data is None:
                set_aside(envelope)
            elif isinstance(data, OSError):
                log.error(
                    "queue {id}: cannot read the message: {problem}",
                    id=envelope.id,
                    problem=str(data),
                )
                for recipient in due:
                    recipient.defer(
                        now, "cannot read the queued message", "4.3.0", self.settings.retry_schedule
                    )
            else:
                sendable.append(item)
        return sendable

    async def _send(
        self, hop: Hop, batch: list[Due], loaded: Loaded
    ) -> list[list[client.RecipientResult] | Exception]:
        """One connection to ``hop`` for the whole batch: a result list, or the
        ConnectionFailed that stopped it, per entry."""
        from clientid_mta.client import ConnectionFailed, Transaction

        if not batch:
            return []
        relay = self.relay
        smarthost = relay.smarthost_address is not None
        if smarthost and hop.port == 465:
            tls = "implicit"
        else:
            tls = "starttls" if relay.tls == "required" else "opportunistic"
        options: dict[str, Any] = {
            "tls": tls,
            "tls_hostname": hop.name,
            "trust_roots": loaded.trust_roots,
            "username": (relay.username or None) if smarthost else None,
            "password": (self.password or None) if smarthost else None,
            "client_id": (relay.client_id_type, relay.client_id)
            if smarthost and relay.client_id
            else None,
            "helo": relay.helo_name or self.config.server.hostname,
            "timeout": relay.command_timeout,
            "connect_timeout": relay.connect_timeout,
            "reactor": self.reactor,
        }
        transactions = [
            Transaction(
                envelope.sender,
                [r.address for r in due],
                as_file(
                    HeaderThenFile(
                        envelope.dkim_header.encode("ascii"),
                        io.BytesIO(cast(bytes, loaded.messages[envelope.id])),
                    )
                ),
            )
            for envelope, due in batch
        ]
        try:
            sent = await self.send(hop.address, hop.port, transactions, **options)
            outcomes: list[list[client.RecipientResult] | Exception] = list(sent)
        except ConnectionFailed as problem:
            outcomes = [problem] * len(batch)
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
            self.events.delivery("failed")
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
            self.events.delivery("expired")
            log.info("queue {id}: <{rcpt}> expired", id=envelope.id, rcpt=recipient.address)
        else:
            self.events.delivery("deferred")
            log.info(
                "queue {id}: <{rcpt}> deferred (attempt {n}, next in {wait:.0f} s): {error}",
                id=envelope.id,
                rcpt=recipient.address,
                n=recipient.attempts,
                wait=recipient.next_attempt - now,
                error=error,
            )

    # --- after an attempt: save, bounce, notice, remove --------------------------------

    async def conclude(self, envelope: Envelope, *, deleted: bool = False) -> bool:
        """Save the entry's new state, then send the bounce or the delay notice it is
        owed and remove it when nothing is left to do (``deleted``: remove it now).
        True when the entry is gone from the queue. Raises when a step fails; the state
        saved so far stays, so calling it again resumes."""
        if deleted:
            await self._in_thread(self.queue.remove, envelope.id)
            return True
        now = self.clock.seconds()
        if envelope.done:  # all delivered: removing it is the only save needed
            return await self._remove_done(envelope)
        await self._in_thread(self.queue.save, envelope)
        owed = envelope.owed_bounces()
        if owed:
            await self._notify_sender(envelope, owed, dsn.FAILED)
            for recipient in owed:
                recipient.state = BOUNCED
            await self._in_thread(self.queue.save, envelope)
        elif delay_notice_due(envelope, now, self.settings.delay_notice_after):
            await self._notify_sender(envelope, envelope.pending(), dsn.DELAYED)
            envelope.delay_notice_sent = True
            await self._in_thread(self.queue.save, envelope)
        if envelope.done:
            return await self._remove_done(envelope)
        return False

    async def _remove_done(self, envelope: Envelope) -> bool:
        await self._in_thread(self.queue.remove, envelope.id)
        log.info("queue {id}: done", id=envelope.id)
        return True

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
                status=r.status or ("4.0.0" if action == dsn.DELAYED else "5.0.0"),
                diagnostic=r.last_error,
                remote_mta=r.remote_mta,
                last_attempt=r.last_attempt,
            )
            for r in recipients
        ]
        new_entry = await self._in_thread(self._store_notice, envelope, report, action)
        if new_entry is not None:
            self.enqueued(new_entry)

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
