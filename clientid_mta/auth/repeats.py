"""Recent wrong passwords, so that the same wrong password repeated counts once.

A mail program with a stale saved password retries it every few minutes; counted each
time, it spends its account's budget by itself and locks the account out. Remembered
here is only a keyed hash (HMAC-SHA256 under a random key made per process, never
written anywhere) of the account, its current password hash, the client's network and
the password: never the password. The stored hash is part of it, so after a password
change the old wrong guesses are forgotten; the network is part of it, so a repeat
only ever answers the network that made the first attempt.

Bounded in memory (the oldest are forgotten) and in time (``window`` seconds). Per
process: with several worker processes a repeat counts at most once per process.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

MAX_REMEMBERED = 50_000
WINDOW = 3600.0


class RecentFailures:
    def __init__(
        self,
        window: float = WINDOW,
        size: int = MAX_REMEMBERED,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = os.urandom(32)
        self._window = window
        self._size = size
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def _digest(
        self, account: str, stored: str | None, network: str, password: str, device: str | None
    ) -> bytes:
        fields = (account, stored or "", network, password, device or "")
        message = "\0".join(fields).encode("utf-8", "replace")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def repeated(
        self,
        account: str,
        stored: str | None,
        network: str,
        password: str,
        device: str | None = None,
    ) -> bool:
        """Whether exactly this attempt failed recently (``stored``: the account's hash;
        ``device``: the session's device key, since the policy's answer depends on it)."""
        digest = self._digest(account, stored, network, password, device)
        now = self._clock()
        with self._lock:
            when = self._seen.get(digest)
            return when is not None and now - when < self._window

    def failed(
        self,
        account: str,
        stored: str | None,
        network: str,
        password: str,
        device: str | None = None,
    ) -> None:
        """Remember a refused attempt: a wrong password, an account that does not exist,
        or a right password the policy refused for this device."""
        digest = self._digest(account, stored, network, password, device)
        with self._lock:
            self._seen[digest] = self._clock()
            self._seen.move_to_end(digest)
            while len(self._seen) > self._size:
                self._seen.popitem(last=False)
