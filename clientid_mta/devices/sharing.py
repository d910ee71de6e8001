"""Shared-device detection (draft 6.3 item 2): one client identity, many accounts.

A device key seen trying more than ``max_accounts`` distinct accounts within
``window`` seconds is flagged in the store (so the flag survives a restart). With
``block`` on, a flagged device is refused on every account. Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from clientid_mta.config import SharedDevicesConfig
from clientid_mta.devices.store import SQLiteDeviceStore

MAX_TRACKED = 100_000


class SharedDevices:
    def __init__(self, settings: SharedDevicesConfig, store: SQLiteDeviceStore) -> None:
        self.settings = settings
        self.store = store
        self._seen: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._flagged: set[str] = set()  # flagged by this process, while it runs
        self._lock = threading.Lock()

    def saw(self, device_key: str, account: str) -> int | None:
        """Note an attempt; the number of accounts when this attempt flags the device."""
        now = time.time()
        with self._lock:
            if device_key in self._flagged and not self.store.is_flagged(device_key):
                # An operator cleared the flag (device unflag): start counting afresh.
                self._flagged.discard(device_key)
                self._seen.pop(device_key, None)
            accounts = self._seen.pop(device_key, {})
            accounts[account] = now
            accounts = {a: t for a, t in accounts.items() if now - t <= self.settings.window}
            self._seen[device_key] = accounts
            while len(self._seen) > MAX_TRACKED:
                self._seen.popitem(last=False)
            count = len(accounts)
        if count > self.settings.max_accounts and self.store.flag_shared(device_key, count):
            with self._lock:
                self._flagged.add(device_key)
            return count
        return None

    def blocked(self, device_key: str) -> bool:
        return self.settings.block and self.store.is_flagged(device_key)
