"""The outbound queue on disk: one durable copy per message, one state per recipient.

Layout under ``[queue] directory``::

    tmp/          files being written; anything here at start is a crash's leftover
    msg/<id>      the message (LF line endings, as in Maildir), fsynced
    env/<id>.json the envelope: sender, arrival, and each recipient's state
    corrupt/      envelopes that cannot be read, moved aside and never delivered
    control/      requests from ``clientid-mta queue ...`` to the running server
    lock          held (flock) by the process that runs the queue

The envelope is written last: its rename into ``env/`` is the commit. A message
file without an envelope is a half-written entry and is deleted at start, never
delivered. Every write is write-to-``tmp/``, fsync, rename, fsync of the folder,
so a SIGKILL at any moment leaves either the old or the new envelope.

Recipient states: ``pending`` (to be tried at ``next_attempt``), ``delivered``,
``failed`` (permanently; a bounce is owed) and ``bounced`` (the bounce is stored,
or none was due). An entry whose recipients are all delivered or bounced is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from clientid_mta.delivery.durable import DurableFile, fsync_dir

_requests = itertools.count()

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
BOUNCED = "bounced"
DONE_STATES = (DELIVERED, BOUNCED)


def new_queue_id() -> str:
    """Sortable by arrival, unique without coordination between processes."""
    return f"{int(time.time() * 1000):013X}{secrets.token_hex(5).upper()}"


def _valid_id(queue_id: str) -> bool:
    return 0 < len(queue_id) <= 64 and queue_id.isalnum()


@dataclass
class Recipient:
    address: str
    state: str = PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_attempt: float | None = None
    last_error: str = ""  # the remote reply or our reason, one line
    status: str = ""  # enhanced status code of the last result
    remote_mta: str = ""

    def defer(self, now: float, error: str, status: str, schedule: tuple[int, ...]) -> None:
        """Record a temporary failure and schedule the next try (the last step repeats)."""
        self.attempts += 1
        self.last_attempt = now
        self.last_error = error
        self.status = status
        self.next_attempt = now + schedule[min(self.attempts - 1, len(schedule) - 1)]


@dataclass
class Envelope:
    id: str
    sender: str  # "" is the null sender: never bounced
    arrival: float
    recipients: list[Recipient]
    account: str = ""
    dkim_header: str = ""  # prepended when sending; computed once at submission
    delay_notice_sent: bool = False

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    def owed_bounces(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == FAILED]

    @property
    def done(self) -> bool:
        return all(r.state in DONE_STATES for r in self.recipients)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        raw: dict[str, Any] = json.loads(data)
        recipients = [Recipient(**r) for r in raw.pop("recipients")]
        envelope = cls(recipients=recipients, **raw)
        if not _valid_id(envelope.id) or not recipients:
            raise ValueError("bad queue id or no recipients")
        return envelope


class AdminBounce:
    """What ``clientid-mta queue bounce`` records for each pending recipient."""

    STATUS = "5.0.0"
    REASON = "returned to the sender by the postmaster"


def give_up(recipients: Sequence[Recipient], status: str, reason: str) -> None:
    """Turn pending recipients into failed ones (a bounce is then owed)."""
    for recipient in recipients:
        if recipient.state == PENDING:
            recipient.state, recipient.status, recipient.last_error = FAILED, status, reason


def flush(envelope: Envelope) -> None:
    for recipient in envelope.pending():
        recipient.next_attempt = 0.0


class QueueDir:
    """The queue's folders and the durable operations on them (all blocking)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.msg = root / "msg"
        self.env = root / "env"
        self.corrupt = root / "corrupt"
        self.control = root / "control"

    def create(self) -> None:
        for folder in (self.root, self.tmp, self.msg, self.env, self.corrupt, self.control):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def message_path(self, queue_id: str) -> Path:
        return self.msg / queue_id

    def envelope_path(self, queue_id: str) -> Path:
        return self.env / f"{queue_id}.json"

    # --- writing ------------------------------------------------------------------

    def new_message(self) -> MessageWriter:
        return MessageWriter(self)

    def save(self, envelope: Envelope) -> None:
        """Write the envelope atomically and durably (replaces the previous one)."""
        temp = self.tmp / f"{envelope.id}.json.{secrets.token_hex(4)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(envelope.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temp, self.envelope_path(envelope.id))
        fsync_dir(self.env)

    def remove(self, queue_id: str) -> None:
        """Envelope first (the commit), then the message: a crash between leaves an
        orphan message file, which ``recover`` deletes."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.envelope_path(queue_id))
            fsync_dir(self.env)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.message_path(queue_id))

    # --- reading ------------------------------------------------------------------

    def ids(self) -> list[str]:
        return sorted(
            name[:-5]
            for name in os.listdir(self.env)
            if name.endswith(".json") and _valid_id(name[:-5])
        )

    def load(self, queue_id: str) -> Envelope:
        envelope = Envelope.from_json(self.envelope_path(queue_id).read_bytes())
        if envelope.id != queue_id or not self.message_path(queue_id).is_file():
            raise ValueError("envelope does not match its message file")
        return envelope

    def open_message(self, queue_id: str) -> BinaryIO:
        return open(self.message_path(queue_id), "rb")

    def load_all(self) -> tuple[list[Envelope], list[str]]:
        """Every readable entry, and the ids of those moved to ``corrupt/``."""
        envelopes, corrupt = [], []
        for queue_id in self.ids():
            try:
                envelopes.append(self.load(queue_id))
            except FileNotFoundError:
                continue  # removed meanwhile by its owner
            except (ValueError, TypeError, KeyError):
                self._set_aside(queue_id)
                corrupt.append(queue_id)
        return envelopes, corrupt

    def _set_aside(self, queue_id: str) -> None:
        for path in (self.envelope_path(queue_id), self.message_path(queue_id)):
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, self.corrupt / path.name)

    def recover(self, older_than: float | None = None) -> int:
        """Delete what a crash left half-written: ``tmp/`` files and message files that
        have no envelope. Only the queue's owner may call this. Returns the count.

        With ``older_than`` (a time.time()), files modified since then are kept: they
        belong to sessions of this process that started while recovery ran."""

        def stale(path: Path) -> bool:
            try:
                return older_than is None or path.stat().st_mtime < older_than
            except FileNotFoundError:
                return False

        removed = 0
        for path in self.tmp.iterdir():
            if stale(path):
                path.unlink(missing_ok=True)
                removed += 1
        committed = set(self.ids())
        for path in self.msg.iterdir():
            if path.name not in committed and stale(path):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # --- ownership ------------------------------------------------------------------

    @contextlib.contextmanager
    def try_lock(self) -> Iterator[bool]:
        """Hold the queue lock while the block runs; yields False if another process has it."""
        self.create()
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def lock_forever(self) -> int | None:
        """Take the lock for the life of this process; the fd, or None if it is taken."""
        self.create()
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    # --- requests from the admin command ----------------------------------------------

    def request(self, action: str, queue_id: str = "") -> Path:
        """Leave a request for the running server; it deletes the file once done."""
        # Fixed-width nanoseconds, then a counter: names sort in the order of the calls.
        path = self.control / f"{time.time_ns():020d}-{os.getpid()}-{next(_requests):06d}.json"
        temp = self.tmp / f"control.{path.name}"
        temp.write_text(json.dumps({"action": action, "id": queue_id}), encoding="utf-8")
        os.rename(temp, path)
        return path

    def take_requests(self) -> list[tuple[str, str]]:
        """The pending requests (action, id), oldest first; each is removed as it is read."""
        requests = []
        for path in sorted(self.control.glob("*.json")):
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                requests.append((str(raw.get("action", "")), str(raw.get("id", ""))))
            except (OSError, ValueError):
                pass
            path.unlink(missing_ok=True)
        return requests


class MessageWriter(DurableFile):
    """One message being written into ``tmp/``; ``commit`` makes it a queue entry."""

    def __init__(self, queue: QueueDir) -> None:
        self.queue = queue
        self.id = new_queue_id()
        super().__init__(queue.tmp / f"{self.id}.msg")

    def commit(self, envelope: Envelope) -> None:
        """Message into ``msg/``, then the envelope into ``env/``: the entry exists."""
        self.commit_to(self.queue.message_path(self.id))
        self.queue.save(envelope)
