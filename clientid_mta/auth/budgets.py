"""Budgets for failed AUTH attempts: token buckets keyed by device, not by address.

Keys (draft 6.2, 6.3 item 6):
- ``device:<hmac>`` for a session that presented a client identity, else
  ``net:<prefix>`` (/24, /56), so that one attacker behind a carrier-grade NAT spends
  only his own device's budget;
- ``known:<account>`` and ``unknown:<account>``: failures from devices the account does
  not trust never spend the budget of the devices it does.

Only failures spend; successes never do. The reactor only looks (``admit``: a dict
look-up and a little arithmetic), so a spent device costs no hash and no thread; the
auth thread takes the attempt (``take``) before the password check. State is kept in
memory, bounded, and saved to the store so that it survives a restart.

With several worker processes the buckets are shared (``share``): the rows in SQLite
are the truth and ``take`` changes them in one transaction; the memory copy is then
the last level this process saw, which is what ``admit`` looks at.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from clientid_mta.auth.shared_budgets import Row, SharedBuckets
from clientid_mta.config import ThrottleConfig

MAX_KEYS = 200_000  # beyond this the longest-untouched buckets are forgotten


@dataclass(frozen=True)
class Budget:
    burst: int
    refill_seconds: int

    def level(self, tokens: float, elapsed: float) -> float:
        return min(float(self.burst), tokens + elapsed / self.refill_seconds)


def device_key_for(device: str | None, network: str) -> str:
    return f"device:{device}" if device else f"net:{network}"


def account_key_for(account: str, known_device: bool) -> str:
    return f"{'known' if known_device else 'unknown'}:{account}"


class Throttle:
    """Thread-safe token buckets; ``clock`` is injectable for tests."""

    def __init__(self, settings: ThrottleConfig, clock: Callable[[], float] = time.time) -> None:
        self.enabled = settings.enabled
        self._budgets = {
            "device": Budget(settings.device_burst, settings.device_refill),
            "net": Budget(settings.device_burst, settings.device_refill),
            "known": Budget(settings.account_known_burst, settings.account_known_refill),
            "unknown": Budget(settings.account_unknown_burst, settings.account_unknown_refill),
        }
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._shared: SharedBuckets | None = None

    def share(self, buckets: SharedBuckets) -> None:
        """From now on the buckets live in ``buckets``, shared with other processes."""
        self._shared = buckets

    @property
    def shared(self) -> bool:
        return self._shared is not None

    def admit(self, key: str) -> bool:
        """The reactor's look at a device budget, before any thread is used: False
        for a device known to be spent. It takes nothing; ``take`` in the auth thread
        does, atomically, so attempts that pass here together still share no token.
        Shared between processes, the level looked at is the last one this process saw.
        """
        if not self.enabled:
            return True
        with self._lock:
            return self._tokens(key, self._clock()) >= 1.0

    def prune_shared(self) -> None:
        """Forget the shared rows of buckets that have refilled."""
        if self._shared is not None:
            self._shared.prune(self.is_full)

    def is_full(self, key: str, tokens: float, updated: float) -> bool:
        budget = self._budgets.get(key.partition(":")[0])
        return budget is None or budget.level(tokens, self._clock() - updated) >= budget.burst

    def _budget(self, key: str) -> Budget:
        return self._budgets[key.partition(":")[0]]

    def _tokens(self, key: str, now: float) -> float:
        state = self._buckets.get(key)
        budget = self._budget(key)
        if state is None:
            return float(budget.burst)
        tokens, updated = state
        return budget.level(tokens, now - updated)

    def take(self, *keys: str) -> bool:
        """Spend one attempt from every key at once, if every key has one left.

        Taken before the password check and given back (``refund``) when the attempt
        succeeds: checking first and charging after would let every concurrent attempt
        through on one remaining token.
        """
        if not self.enabled:
            return True
        if self._shared is not None:
            return self._shared_change(keys, -1.0)
        now = self._clock()
        with self._lock:
            levels = [self._tokens(key, now) for key in keys]
            if any(level < 1.0 for level in levels):
                return False
            for key, level in zip(keys, levels, strict=True):
                self._buckets[key] = (level - 1.0, now)
                self._buckets.move_to_end(key)
            while len(self._buckets) > MAX_KEYS:
                self._buckets.popitem(last=False)
            return True

    def refund(self, *keys: str) -> None:
        """Give back what ``take`` spent (the attempt was not a failure)."""
        if not self.enabled:
            return
        if self._shared is not None:
            self._shared_change(keys, +1.0)
            return
        now = self._clock()
        with self._lock:
            for key in keys:
                level = min(self._tokens(key, now) + 1.0, float(self._budget(key).burst))
                self._buckets[key] = (level, now)

    def _shared_change(self, keys: tuple[str, ...], change: float) -> bool:
        """Take (-1) or give back (+1) one attempt on every key, in one transaction."""
        assert self._shared is not None
        now = self._clock()
        seen: dict[str, Row] = {}

        def decide(current: dict[str, Row | None]) -> dict[str, Row] | None:
            for key, row in current.items():
                budget = self._budget(key)
                seen[key] = (budget.level(row[0], now - row[1]) if row else budget.burst, now)
            if change < 0 and any(level < 1.0 for level, _ in seen.values()):
                return None
            return {
                key: (min(level + change, float(self._budget(key).burst)), now)
                for key, (level, _) in seen.items()
            }

        new = self._shared.update(keys, decide)
        with self._lock:
            self._buckets.update(new or seen)
            while len(self._buckets) > MAX_KEYS:
                self._buckets.popitem(last=False)
        return new is not None

    def snapshot(self) -> list[tuple[str, float, float]]:
        """The buckets that are not full (full ones carry no information)."""
        now = self._clock()
        with self._lock:
            full = [k for k in self._buckets if self._tokens(k, now) >= self._budget(k).burst]
            for key in full:
                del self._buckets[key]
            return [(key, tokens, updated) for key, (tokens, updated) in self._buckets.items()]

    def restore(self, rows: Iterable[tuple[str, float, float]]) -> None:
        with self._lock:
            for key, tokens, updated in rows:
                if key.partition(":")[0] in self._budgets:
                    self._buckets[key] = (tokens, updated)
