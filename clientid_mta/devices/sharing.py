"""Shared-device detection: one client identity trying many accounts.

A device key seen trying more than ``max_accounts`` distinct accounts within
``window`` seconds is flagged in the store (so the flag survives a restart). With
``block`` on, a flagged device is refused on every account. The attempts are counted
in the store, so the worker processes of one server add up to one count. Blocking:
called in the auth threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from clientid_mta.config import SharedDevicesConfig
from clientid_mta.devices.store import ISharedDeviceStore


class SharedDevices:
    def __init__(
        self,
        settings: SharedDevicesConfig,
        store: ISharedDeviceStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self._clock = clock

    def saw(self, device_key: str, account: str) -> int | None:
        """Note an attempt; the number of accounts when this attempt flags the device."""
        now = self._clock()
        count = self.store.saw(device_key, account, now, self.settings.window)
        # ``flag`` is true for one caller only, in whichever process: one report.
        if count > self.settings.max_accounts and self.store.flag(device_key, count, now):
            return count
        return None

    def blocked(self, device_key: str) -> bool:
        return self.settings.block and self.store.is_flagged(device_key)
