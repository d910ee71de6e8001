"""What the reactor needs to pick an attempt's budget without asking the store.

Two sets, both kept in memory so that the reactor decides with a set look-up (no
thread, no store call):

- the keys of devices some account trusts: only such a device earns a failure budget
  of its own (``device:``). Trusted, not merely recorded: a pending row is created by
  any login with the right password, so an attacker holding one account could mint
  them; trust needs the first-device slot, an operator or the holder's approval;
- the (account, network) pairs of successful logins within ``[throttle]
  usual_network_days``: such a network keeps its own budget for that account
  (``usual:``), so a stranger elsewhere cannot lock out the account's usual network.

Both are loaded from the store in a thread (``refresh``, called at start and every
few seconds by the server's housekeeping), so changes made by other worker processes
and by the admin command are seen; this process's own trusts and logins are added at
once. Revocations take effect at the next refresh.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from clientid_mta.devices.store import IBudgetStore

DAY = 86400.0
MAX_USUAL = 200_000  # (account, network) pairs kept in memory; a small organisation has few


class KnownClients:
    def __init__(
        self,
        store: IBudgetStore | None,
        usual_days: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.usual_window = usual_days * DAY
        self._clock = clock
        self._lock = threading.Lock()
        self._devices: frozenset[str] = frozenset()
        self._usual: dict[tuple[str, str], float] = {}  # -> the last login the store had
        # Added while a refresh reads the store: kept over its swap, since the read may
        # have started before they were committed.
        self._added_devices: set[str] = set()
        self._added_usual: set[tuple[str, str]] = set()
        self.loaded = False

    def knows_device(self, device: str | None) -> bool:
        """Whether some account trusts the device (reactor-safe: a set look-up)."""
        return device is not None and (device in self._devices or device in self._added_devices)

    def is_usual(self, account: str, network: str) -> bool:
        """Whether the account logged in from this network recently (a set look-up)."""
        pair = (account, network)
        return pair in self._usual or pair in self._added_usual

    def trusted(self, device: str) -> None:
        """This process just trusted (or approved) the device for some account."""
        with self._lock:
            self._added_devices.add(device)

    def recorded_lately(self, account: str, network: str) -> bool:
        """Whether ``logged_in`` would write nothing for this login (a dict look-up)."""
        pair = (account, network)
        return pair in self._added_usual or self._usual.get(pair, 0.0) > self._clock() - DAY

    def logged_in(self, account: str, network: str) -> None:
        """A successful login: remembered in the store (shared with the other processes),
        then here. Blocking: call it in a thread."""
        if self.recorded_lately(account, network):
            return  # recorded lately: a day more or less does not matter over the window
        now = self._clock()
        if self._store is not None:
            self._store.record_login_network(account, network, now, self.usual_window)
        with self._lock:
            if len(self._added_usual) < MAX_USUAL:
                self._added_usual.add((account, network))

    def refresh(self) -> None:
        """Read both sets from the store again. Blocking: call it in a thread."""
        if self._store is None:
            return
        with self._lock:
            added_devices, added_usual = set(self._added_devices), set(self._added_usual)
        devices = self._store.trusted_device_keys()
        usual = self._store.login_networks(self._clock() - self.usual_window)[:MAX_USUAL]
        with self._lock:
            self._devices = frozenset(devices)
            self._usual = {(account, network): when for account, network, when in usual}
            # What was added before the read started is in what was read (or was revoked
            # since); what was added during the read is kept until the next refresh.
            self._added_devices -= added_devices
            self._added_usual -= added_usual
            self.loaded = True
