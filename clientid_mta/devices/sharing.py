"""Shared-device detection: one client identity trying many accounts.

A device key seen trying more than ``max_accounts`` distinct accounts within
``window`` seconds is flagged in the store (so the flag survives a restart). With
``block`` on, a flagged device is refused on every account. The attempts are counted
in the store, so the worker processes of one server add up to one count. Blocking:
called in the auth threads.

A device seen again on the same account within ``RESIGHT_AFTER`` seconds by this process
is not written again (issue 16: a write transaction per login of every known device):
the same pair cannot change the count of accounts, so it can never be the attempt that
flags; its sighting's time moves forward at most that much (or half the window, if
shorter) later, out of a window of an hour by default. For the same reason a pair the
store still counts (``counted``, read on the reactor with the rest of a trusted device's
login) may be written after the reply rather than before it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from clientid_mta.config import SharedDevicesConfig
from clientid_mta.devices.store import ISharedDeviceStore

RESIGHT_AFTER = 60.0  # seconds before this process writes the same device and account again
MAX_RECENT = 10_000  # (device, account) pairs remembered; the oldest go first


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
        self._lock = threading.Lock()
        self._recent: OrderedDict[tuple[str, str], float] = OrderedDict()

    def saw(self, device_key: str, account: str) -> int | None:
        """Note an attempt; the number of accounts when this attempt flags the device."""
        if self.seen_lately(device_key, account):
            return None  # written a moment ago: the count is what it was
        now, pair = self._clock(), (device_key, account)
        count = self.store.saw(device_key, account, now, self.settings.window)
        with self._lock:
            self._recent[pair] = now
            self._recent.move_to_end(pair)
            while len(self._recent) > MAX_RECENT:
                self._recent.popitem(last=False)
        # ``flag`` is true for one caller only, in whichever process: one report.
        if count > self.settings.max_accounts and self.store.flag(device_key, count, now):
            return count
        return None

    def seen_lately(self, device_key: str, account: str) -> bool:
        """Whether ``saw`` would write nothing for this pair now (a set look-up): it was
        written by this process too recently to change the count of accounts."""
        resight = min(RESIGHT_AFTER, self.settings.window / 2)  # a short window stays exact
        with self._lock:
            return self._clock() - self._recent.get((device_key, account), float("-inf")) < resight

    def counted(self, sighted: float | None) -> bool:
        """Whether a pair last seen at ``sighted`` (the store's time, None: no row) is
        still in the window, so that seeing it again cannot change any count."""
        return sighted is not None and self._clock() - sighted < self.settings.window

    def blocked(self, device_key: str) -> bool:
        return self.settings.block and self.store.is_flagged(device_key)
