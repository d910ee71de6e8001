"""Budgets for failed AUTH attempts: token buckets keyed on what an attacker cannot mint.

A budget keyed on something the attacker mints for free protects nothing: a fresh
CLIENTID costs nothing, and neither does a made-up account name. So every attempt
spends two buckets, one for where it comes from and one for the account it names:

- where from: ``device:<hmac>`` for a device some account trusts (the attacker cannot
  mint one without an account holder's consent); ``usual:<account>|<network>`` when the
  named account logged in successfully from this network recently (its own budget, so a
  stranger elsewhere cannot lock the account's usual network out); otherwise
  ``net:<prefix>`` (/24, /56), shared by every unknown device and every session
  without CLIENTID on that network;
- the account: ``known:<account>`` from a device it trusts, ``unknown:<account>`` from
  anything else (none for a usual network: its ``usual:`` bucket is the account's
  budget there), and ``nobody:<prefix>`` when no such account exists, one per network
  whatever name is made up. ``nobody`` has the shape of ``net`` and is only ever spent
  together with a source bucket, so from an unknown device the network is spent first
  and a made-up name cannot be told from a real one by its reply.

Only failures spend; successes never do. The reactor only looks (``admit``: a dict
look-up and a little arithmetic), so a spent source costs no hash and no thread; the
auth thread takes the attempt (``take``) before the password check. State is kept in
memory, bounded, and saved to the store so that it survives a restart.

With several worker processes the buckets are shared (``share``): the rows in the
store are the truth and ``take`` changes them in one store call (one transaction);
the memory copy is then the last level this process saw, which is what ``admit``
looks at.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

from clientid_mta.config import ThrottleConfig
from clientid_mta.devices.store import Budget, BudgetRow, IBudgetStore, change_budgets

MAX_KEYS = 200_000  # beyond this the longest-untouched buckets are forgotten


def source_key_for(device: str | None, usual_account: str | None, network: str) -> str:
    """The bucket of where an attempt comes from: ``device`` is the key of a device some
    account trusts (else None); ``usual_account`` the named account when this network
    is one it usually logs in from (else None)."""
    if device:
        return f"device:{device}"
    if usual_account:
        return f"usual:{usual_account}|{network}"
    return f"net:{network}"


def account_key_for(account: str, known_device: bool, exists: bool, network: str) -> str:
    if not exists:
        return f"nobody:{network}"
    return f"{'known' if known_device else 'unknown'}:{account}"


class PendingChecks:
    """Password checks per network that are in a thread or queued for one, counted on
    the reactor. Beyond ``bound`` the attempt is refused at once (454, no hash): one
    network cannot fill the auth threads' queue and delay everyone's logins."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._count: dict[str, int] = {}

    def enter(self, network: str) -> bool:
        count = self._count.get(network, 0)
        if count >= self.bound:
            return False
        self._count[network] = count + 1
        return True

    def leave(self, network: str) -> None:
        count = self._count.pop(network, 0) - 1
        if count > 0:
            self._count[network] = count

    def __len__(self) -> int:
        return sum(self._count.values())


class Throttle:
    """Thread-safe token buckets; ``clock`` is injectable for tests."""

    def __init__(self, settings: ThrottleConfig, clock: Callable[[], float] = time.time) -> None:
        self.enabled = settings.enabled
        network = Budget(settings.network_burst, settings.network_refill)
        known = Budget(settings.account_known_burst, settings.account_known_refill)
        self._budgets = {
            "device": Budget(settings.device_burst, settings.device_refill),
            "net": network,
            "nobody": network,
            "usual": known,  # the account's own client on its usual network
            "known": known,
            "unknown": Budget(settings.account_unknown_burst, settings.account_unknown_refill),
        }
        self.pending = PendingChecks(settings.network_checks)
        self._clock = clock
        self._buckets: OrderedDict[str, BudgetRow] = OrderedDict()
        self._lock = threading.Lock()
        self._shared: IBudgetStore | None = None

    def share(self, store: IBudgetStore) -> None:
        """From now on the buckets live in ``store``, shared with other processes."""
        self._shared = store

    @property
    def shared(self) -> bool:
        return self._shared is not None

    def admit(self, key: str) -> bool:
        """The reactor's look at a source budget, before any thread is used: False
        for a source known to be spent. It takes nothing; ``take`` in the auth thread
        does, atomically, so attempts that pass here together still share no token.
        Shared between processes, the level looked at is the last one this process saw.
        """
        if not self.enabled:
            return True
        with self._lock:
            return self._tokens(key, self._clock()) >= 1.0

    def admits_all(self, keys: Iterable[str], shared_rows: Mapping[str, BudgetRow]) -> bool:
        """Whether every key has an attempt left, taking nothing: for a login that will
        not spend (the quick path of a trusted device, whose success never does). Shared
        between processes, the levels are those of ``shared_rows``, just read from the
        store (a missing row is a full bucket); else this process's own."""
        if not self.enabled:
            return True
        now = self._clock()
        if self._shared is not None:
            for key in keys:
                row = shared_rows.get(key)
                if row is not None and self._budget(key).level(row[0], now - row[1]) < 1.0:
                    return False
            return True
        with self._lock:
            return all(self._tokens(key, now) >= 1.0 for key in keys)

    def prune_shared(self) -> None:
        """Forget the shared rows of buckets that have refilled."""
        if self._shared is not None:
            self._shared.prune(self._budgets, self._clock())

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
        budgets = {key: self._budget(key) for key in keys}
        now = self._clock()
        if self._shared is not None:
            taken, rows = self._shared.take(budgets, now)
            with self._lock:
                self._keep(rows)  # the levels seen, taken or not
            return taken
        with self._lock:  # the read and the write under one lock: one token, one taker
            taken, rows = change_budgets(budgets, self._buckets, now, -1.0)
            if taken:
                self._keep(rows)
        return taken

    def refund(self, *keys: str) -> None:
        """Give back what ``take`` spent (the attempt was not a failure)."""
        if not self.enabled:
            return
        budgets = {key: self._budget(key) for key in keys}
        now = self._clock()
        rows = self._shared.refund(budgets, now) if self._shared is not None else None
        with self._lock:
            if rows is None:
                _, rows = change_budgets(budgets, self._buckets, now, +1.0)
            self._keep(rows)

    def _keep(self, rows: dict[str, BudgetRow]) -> None:
        """Store rows in the memory copy, bounded. The caller holds the lock."""
        for key, row in rows.items():
            self._buckets[key] = row
            self._buckets.move_to_end(key)
        while len(self._buckets) > MAX_KEYS:
            self._buckets.popitem(last=False)

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
