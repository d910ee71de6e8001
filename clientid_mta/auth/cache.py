"""The authentication cache: verified (account, password) pairs, like Dovecot's auth_cache.

A full argon2id check costs tens of milliseconds and 64 MiB; a client that logs in
again within ``[auth] cache_ttl`` seconds with a password that was verified before
costs one HMAC and a dict look-up instead. In memory only, never written anywhere.

What is remembered, and why
---------------------------
Each entry is ``HMAC-SHA256(secret, address NUL stored_hash NUL password)`` and its
expiry time; nothing else.

- Keyed, with a 32-byte secret drawn at random when the process starts: the memory
  holds no value that can be tested offline against a guessed password (a plain
  SHA-256 of the password would be a fast hash an attacker could brute-force from a
  core dump or swap; the argon2id hash exists precisely to prevent that). A restart
  forgets everything, which costs one full check per client.
- The account's stored hash string is part of the key, so the cache memoises exactly
  ``verify_password(stored_hash, password) is True`` and can never be stale: a
  password change writes a new hash (new salt) to the passwd file, ``PasswdFile``
  re-reads it, and the old entry simply never matches again. A deleted account has
  no stored hash, so its attempts never reach the cache. Nothing has to be
  invalidated by hand; old entries age out by TTL or by the size cap.
- Only successful checks are stored. A wrong password always costs a full hash, so
  the cache can neither be filled by an attacker's guesses nor answer faster for a
  wrong password than before.
- The address and the stored hash never contain NUL (addresses are parsed mailbox
  names, hashes are ``{SCHEME}`` plus base64), so the encoding is unambiguous; a
  value that does is simply not cached.
- Look-up is a dict look-up of the digest. The digest depends on the secret, so a
  client can neither choose nor predict it, and the dict's timing reveals nothing.

The cache answers "is this password right?" only. The caller still applies the
failure budgets, the device policy, the audit and the alerts on every login, and a
refusal after a hit still costs one full hash (C12: a policy refusal has the timing
class of a wrong password); see ``ClientIdChecker._verify_and_decide``.

Thread-safe: login checks run in the ``AuthWorkers`` pool.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

SECRET_BYTES = 32


class AuthCache:
    """Verified (account, password) pairs for ``ttl`` seconds, at most ``size`` of them.

    ``ttl <= 0`` turns the cache off: nothing is stored and every look-up misses.
    When full, the oldest entry is evicted. The TTL counts from the full check that
    stored the entry; hits do not extend it.
    """

    def __init__(self, ttl: float, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        if size < 1:
            raise ValueError("the auth cache needs room for at least one entry")
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self._secret = secrets.token_bytes(SECRET_BYTES)
        self._lock = threading.Lock()
        # digest -> expiry; insertion order is expiry order (one TTL for all).
        self._entries: OrderedDict[bytes, float] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def _key(self, address: str, stored_hash: str, password: str) -> bytes | None:
        if "\0" in address or "\0" in stored_hash:
            return None
        message = f"{address}\0{stored_hash}\0{password}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def check(self, address: str, stored_hash: str, password: str, count: bool = True) -> bool:
        """True when this password was verified against this stored hash within the TTL.
        ``count=False``: neither counted (a caller that may ask again, or ``hit`` after)."""
        key = self._key(address, stored_hash, password) if self.enabled else None
        with self._lock:
            if key is not None and (expires := self._entries.get(key)) is not None:
                if self.clock() < expires:
                    self.hits += count
                    return True
                del self._entries[key]
            self.misses += count
            return False

    def hit(self) -> None:
        """Count a hit that ``check(count=False)`` answered."""
        with self._lock:
            self.hits += 1

    def remember(self, address: str, stored_hash: str, password: str) -> None:
        """Store a SUCCESSFUL full check (never call it for a wrong password)."""
        if not self.enabled:
            return
        key = self._key(address, stored_hash, password)
        if key is None:
            return
        with self._lock:
            now = self.clock()
            self._entries.pop(key, None)
            self._entries[key] = now + self.ttl
            self._prune(now)

    def _prune(self, now: float) -> None:
        """Drop expired entries (all at the front) and the oldest beyond ``size``."""
        entries = self._entries
        while entries:
            oldest, expires = next(iter(entries.items()))
            if expires > now and len(entries) <= self.size:
                return
            del entries[oldest]

    def clear(self) -> None:
        """Forget every entry (the counters are kept)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
