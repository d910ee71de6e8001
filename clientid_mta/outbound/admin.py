"""``clientid-mta queue list|flush|delete|bounce``.

The running server owns the queue (it holds the queue lock): then a change is left
as a request in ``control/``, which the server carries out within a second, and
the command waits for that. When no server runs, the command changes the entry
itself, under the lock; a bounce it records is sent at the next start.
"""

from __future__ import annotations

import datetime
import json
import time
from typing import Any, TextIO

from clientid_mta.outbound.queue import (
    BOUNCED,
    DELIVERED,
    PENDING,
    AdminBounce,
    Envelope,
    QueueDir,
    flush,
    give_up,
)

REQUEST_WAIT = 10.0  # seconds to wait for the running server to take a request


class QueueAdminError(Exception):
    pass


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def utc_iso(timestamp: float | None) -> str | None:
    """A timestamp as ISO 8601 in UTC (for JSON listings); None for none."""
    if not timestamp:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _entry(envelope: Envelope) -> dict[str, Any]:
    """One entry for ``queue list --json`` (times in UTC, ISO 8601)."""
    return {
        "id": envelope.id,
        "sender": envelope.sender,
        "account": envelope.account,
        "arrival": utc_iso(envelope.arrival),
        "recipients": [
            {
                "address": r.address,
                "state": r.state,
                "attempts": r.attempts,
                "next_attempt": utc_iso(r.next_attempt) if r.state == PENDING else None,
                "last_error": r.last_error,
                "status": r.status,
            }
            for r in envelope.recipients
        ],
    }


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


class QueueAdmin:
    def __init__(self, queue: QueueDir, out: TextIO) -> None:
        self.queue = queue
        self.out = out

    def list(self, as_json: bool = False) -> None:
        queue = self.queue
        queue.create()
        envelopes, _ = _readable(queue)
        if as_json:
            json.dump([_entry(envelope) for envelope in envelopes], self.out, indent=2)
            self.out.write("\n")
            return
        if not envelopes:
            print("the queue is empty", file=self.out)
            return
        now = time.time()
        for envelope in envelopes:
            sender = envelope.sender or "<>"
            print(
                f"{envelope.id}  age {_age(now - envelope.arrival)}  from {_printable(sender)}",
                file=self.out,
            )
            for r in envelope.recipients:
                line = f"    {_printable(r.address)}  {r.state}"
                if r.state not in (DELIVERED, BOUNCED):
                    line += f", {r.attempts} attempts"
                    if r.next_attempt > now:
                        when = datetime.datetime.fromtimestamp(r.next_attempt)
                        line += f", next {when:%Y-%m-%d %H:%M:%S}"
                if r.last_error:
                    line += f"  last error: {_printable(r.last_error)}"
                print(line, file=self.out)
        print(f"{len(envelopes)} entries", file=self.out)

    def change(self, action: str, queue_id: str) -> None:
        """flush (queue_id may be ""), delete, bounce."""
        queue = self.queue
        queue.create()
        if queue_id and queue_id not in queue.ids():
            raise QueueAdminError(f"no queue entry {queue_id}; see: clientid-mta queue list")
        with queue.try_lock() as ours:
            if ours:
                self._change_offline(action, queue_id)
                return
        request = queue.request(action, queue_id)
        deadline = time.monotonic() + REQUEST_WAIT
        while request.exists():
            if time.monotonic() > deadline:
                raise QueueAdminError(
                    "the running server did not take the request within "
                    f"{REQUEST_WAIT:.0f} s; it stays in {request.parent} and runs when it can"
                )
            time.sleep(0.1)
        print(f"{action}: passed to the running server", file=self.out)

    def _change_offline(self, action: str, queue_id: str) -> None:
        queue = self.queue
        ids = [queue_id] if queue_id else queue.ids()
        for one in ids:
            if action == "delete":
                queue.remove(one)
            else:
                envelope = queue.load(one)
                if action == "flush":
                    flush(envelope)
                else:
                    give_up(envelope.recipients, AdminBounce.STATUS, AdminBounce.REASON)
                queue.save(envelope)
        later = "" if action == "delete" else "; the server acts on it when it next starts"
        print(f"{action}: done (no server is running{later})", file=self.out)


def _readable(queue: QueueDir) -> tuple[list[Envelope], list[str]]:
    envelopes, broken = [], []
    for queue_id in queue.ids():
        try:
            envelopes.append(queue.load(queue_id))
        except (OSError, ValueError, TypeError, KeyError):
            broken.append(queue_id)
    return envelopes, broken
