"""The audit log: every AUTH attempt, with its internal reason (never sent to the client).

``record`` is called on the reactor and only appends to a list; ``flush`` (in a
thread, from the server's housekeeping) writes the batch and drops old entries.
"""

from __future__ import annotations

import threading
import time

from clientid_mta.devices.store import AuditEntry, IAuditStore

PRUNE_EVERY = 3600.0
MAX_PENDING = 100_000  # entries kept while the store cannot be written


class AuditLog:
    def __init__(self, store: IAuditStore, retention_days: int) -> None:
        self.store = store
        self.retention = retention_days * 86400.0
        self._pending: list[AuditEntry] = []
        self._lock = threading.Lock()
        self._pruned = 0.0

    def record(
        self, account: str, fingerprint: str, network: str, outcome: str, reason: str
    ) -> None:
        entry = AuditEntry(time.time(), account, fingerprint, network, outcome, reason)
        with self._lock:
            self._pending.append(entry)

    def flush(self) -> int:
        """Write what is pending; prune past retention at most hourly. Blocking."""
        with self._lock:
            batch, self._pending = self._pending, []
        if batch:
            try:
                self.store.add_audit(batch)
            except Exception:
                with self._lock:  # keep them for the next flush (the store may be locked)
                    self._pending[:0] = batch[-MAX_PENDING:]
                raise
        now = time.time()
        if now - self._pruned > PRUNE_EVERY:
            self._pruned = now
            self.store.prune_audit(now - self.retention)
        return len(batch)
