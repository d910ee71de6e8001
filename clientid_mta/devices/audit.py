"""The audit log: every AUTH attempt, with its internal reason (never sent to the client).

``record`` is called on the reactor and only notes the attempt in memory; ``flush`` (in
a thread, from the server's housekeeping) writes the batch and drops old entries.

Nothing a client does without a password may grow the store without bound, so:
- throttled attempts are not kept one by one but counted, per minute, network,
  device and reason (a flood of them adds a row a minute);
- an account that does not exist is kept as ``unknown:`` and a short keyed hash of
  what was typed, never the text itself (it may be 1,000 characters, or a password
  typed in the wrong field);
- the log holds at most ``max_entries`` entries (and as many count rows): past that the
  earliest go, and a log line says so.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable

from clientid_mta.devices.store import AuditEntry, IAuditStore

THROTTLED = "throttled"  # the outcome whose attempts are counted, not kept one by one
# Refusals that cost the server nothing (no hash, no budget) and say nothing new: a
# stranger can send them as fast as throttled ones, so they are counted the same way.
COUNTED_REASONS = frozenset({"bad_password_repeated"})
UNKNOWN_ACCOUNT = "unknown:"
PRUNE_EVERY = 3600.0  # seconds between the retention prunes
DROP_REPORT_EVERY = 3600.0  # at most one "dropped entries" line an hour
MAX_PENDING = 100_000  # entries (and count rows) kept while the store cannot be written

CountKey = tuple[float, str, str, str, str]  # minute, network, fingerprint, outcome, reason


def unknown_account(typed: str, key: bytes) -> str:
    """How an attempt on an account that does not exist is kept: ``unknown:3f2a9c1d``,
    the same for the same text, so that repeated tries of one name can be told apart."""
    digest = hmac.new(key, typed.encode("utf-8", "surrogatepass"), hashlib.sha256)
    return UNKNOWN_ACCOUNT + digest.hexdigest()[:8]


class AuditLog:
    def __init__(
        self,
        store: IAuditStore,
        retention_days: int,
        max_entries: int = 1_000_000,
        name_key: bytes = b"",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.retention = retention_days * 86400.0
        self.max_entries = max_entries
        self._name_key = name_key
        self._clock = clock
        self._pending: list[AuditEntry] = []
        self._counts: dict[CountKey, int] = {}
        self._lock = threading.Lock()
        self._pruned = float("-inf")
        self._dropped = 0  # dropped by the bound and not yet reported
        self._reported = float("-inf")

    def record(
        self,
        account: str,
        fingerprint: str,
        network: str,
        outcome: str,
        reason: str,
        *,
        known: bool,
    ) -> None:
        """Note one attempt; ``known``: ``account`` is an account of this server."""
        now = self._clock()
        if outcome == THROTTLED or reason in COUNTED_REASONS:
            key = (now - now % 60, network, fingerprint, outcome, reason)
            with self._lock:
                if key in self._counts or len(self._counts) < MAX_PENDING:
                    self._counts[key] = self._counts.get(key, 0) + 1
            return
        if not known:
            account = unknown_account(account, self._name_key)
        entry = AuditEntry(now, account, fingerprint, network, outcome, reason)
        with self._lock:
            if len(self._pending) < MAX_PENDING:
                self._pending.append(entry)

    def flush(self) -> int:
        """Write what is pending, keep the bound, prune past retention at most hourly.
        Returns how many entries the bound dropped when that is due to be logged (at most
        once an hour), else 0. Blocking."""
        with self._lock:
            batch, self._pending = self._pending, []
            counts, self._counts = self._counts, {}
        wrote = bool(batch or counts)
        try:
            if batch:
                self.store.add_audit(batch)
                batch = []
            if counts:
                self.store.add_audit_counts(
                    [
                        AuditEntry(minute, "", fingerprint, network, outcome, reason, count)
                        for (minute, network, fingerprint, outcome, reason), count in counts.items()
                    ]
                )
        except Exception:
            self._keep_for_next_flush(batch, counts)  # the store may be locked: try again
            raise
        now = self._clock()
        if now - self._pruned > PRUNE_EVERY:
            self._pruned = now
            self.store.prune_audit(now - self.retention)
        if wrote:
            self._dropped += self.store.trim_audit(self.max_entries)
        if self._dropped and now - self._reported >= DROP_REPORT_EVERY:
            dropped, self._dropped, self._reported = self._dropped, 0, now
            return dropped
        return 0

    def _keep_for_next_flush(self, batch: list[AuditEntry], counts: dict[CountKey, int]) -> None:
        with self._lock:
            self._pending[:0] = batch[: max(0, MAX_PENDING - len(self._pending))]
            for key, count in counts.items():
                if key in self._counts or len(self._counts) < MAX_PENDING:
                    self._counts[key] = self._counts.get(key, 0) + count
