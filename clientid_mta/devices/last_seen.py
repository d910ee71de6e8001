"""Write-behind of a trusted device's logins: recorded after the ``235``, not before it.

A known device's login changes nothing the decision depends on except the travel
check's last region and time, so its record (the login count, last-seen time, network
and region) need not be on the path to the reply, where each one cost an fsync. The
policy notes it here (``record``, from a login thread); the server's housekeeping
writes the batch every second (``flush``, in a thread, in one store transaction, in
order, with each login's own time) and once more at stop.

What this trades: a crash (SIGKILL, power loss) loses at most the logins of the last
batch window (about a second) from the devices' counts and last-seen times; never a
decision, since states (trusted, pending, revoked) are still read from the store at
each login and every first-device, pending or revoked path still writes at once. This
process's own unwritten logins are visible to the travel check through ``latest``.
"""

from __future__ import annotations

import threading
from dataclasses import replace

from clientid_mta.devices.store import Device, IDeviceRegistry, PendingLogin

__all__ = ["LoginRecorder", "PendingLogin"]

MAX_PENDING = 100_000  # logins kept while the store cannot be written; beyond, written at once


class LoginRecorder:
    """The logins of trusted devices waiting for the next flush."""

    def __init__(self, store: IDeviceRegistry) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._pending: list[PendingLogin] = []
        self._latest: dict[tuple[str, str], PendingLogin] = {}

    def record(self, login: PendingLogin) -> None:
        """Note a login for the next flush. Blocking only when the batch is at its bound
        (the store has not been writable for a long while): then written at once."""
        if not self.record_later(login):
            self.store.login(login.account, login.device_key, login.network, login.region)

    def record_later(self, login: PendingLogin) -> bool:
        """Note a login for the next flush if the batch has room; never blocks."""
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                return False
            self._pending.append(login)
            self._latest[(login.account, login.device_key)] = login
            return True

    def latest(self, device: Device) -> Device:
        """The device as it will be once this process's pending logins are written."""
        with self._lock:
            pending = self._latest.get((device.account, device.device_key))
        if pending is None or pending.when <= device.last_login:
            return device
        return replace(
            device,
            last_seen=pending.when,
            last_login=pending.when,
            last_network=pending.network,
            last_region=pending.region,
        )

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self) -> int:
        """Write the pending logins in order; how many were written. Blocking. On a store
        error, what was not written stays for the next flush and the error is raised."""
        with self._lock:
            batch, self._pending = self._pending, []
        try:
            if batch:
                self.store.record_logins(batch)  # one transaction: one fsync a flush
        except Exception:
            with self._lock:
                self._pending[:0] = batch
            raise
        with self._lock:
            done = {(login.account, login.device_key): login for login in batch}
            for key, login in done.items():
                if self._latest.get(key) is login:
                    del self._latest[key]
        return len(batch)
