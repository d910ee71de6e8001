"""Caps on concurrent sessions: overall, per client address, and per device.

Per device rather than only per address: behind a carrier-grade NAT many innocent
devices share one address (draft 6.2 item 3). Lives on the reactor thread.
"""

from __future__ import annotations

from collections import Counter

from clientid_mta.config import LimitsConfig


class SessionLimits:
    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits
        self.total = 0
        self.by_address: Counter[str] = Counter()
        self.by_device: Counter[str] = Counter()

    def open(self, address: str) -> str | None:
        """Count a new session; the reason to refuse it, or None."""
        if self.total >= self.limits.max_sessions:
            return "too many sessions"
        if self.by_address[address] >= self.limits.max_sessions_per_address:
            return "too many sessions from your address"
        self.total += 1
        self.by_address[address] += 1
        return None

    def close(self, address: str) -> None:
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
