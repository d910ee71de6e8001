"""Caps on concurrent sessions: overall, per client address, and per device.

Per device rather than only per address: behind a carrier-grade NAT many innocent
devices share one address (draft 6.2 item 3). When the overall cap is reached, the
oldest session that has not logged in yet makes room (it gets 421 4.7.0), so idle
connections from many addresses cannot lock everyone out; logged-in sessions are never
pushed out. Lives on the reactor thread.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from clientid_mta.config import LimitsConfig


class SessionLimits:
    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits
        self.total = 0
        self.by_address: Counter[str] = Counter()
        self.by_device: Counter[str] = Counter()
        # Sessions not logged in yet, oldest first: session -> what pushes it out.
        self._evictable: OrderedDict[Any, Callable[[], None]] = OrderedDict()

    def open(
        self, address: str, session: Any = None, evict: Callable[[], None] | None = None
    ) -> str | None:
        """Count a new session; the reason to refuse it, or None.

        ``evict`` closes ``session`` (with a 421) if room is needed later; the callable
        must call ``close`` for it, as any closing session does.
        """
        if self.by_address[address] >= self.limits.max_sessions_per_address:
            return "too many sessions from your address"
        if self.total >= self.limits.max_sessions:
            if not self._evictable:
                return "too many sessions"
            _oldest, push_out = self._evictable.popitem(last=False)
            push_out()
        self.total += 1
        self.by_address[address] += 1
        if session is not None and evict is not None:
            self._evictable[session] = evict
        return None

    def logged_in(self, session: Any) -> None:
        """A session that authenticated is never pushed out."""
        self._evictable.pop(session, None)

    def close(self, address: str, session: Any = None) -> None:
        self._evictable.pop(session, None)
        self.total -= 1
        self.by_address[address] -= 1
        if self.by_address[address] <= 0:
            del self.by_address[address]

    def add_device(self, device_key: str) -> bool:
        """Count a session presenting this device; False when over the cap (still counted)."""
        self.by_device[device_key] += 1
        return self.by_device[device_key] <= self.limits.max_sessions_per_device

    def remove_device(self, device_key: str) -> None:
        self.by_device[device_key] -= 1
        if self.by_device[device_key] <= 0:
            del self.by_device[device_key]
