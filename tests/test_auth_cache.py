"""Issue 5 item 3: the authentication cache (clientid_mta/auth/cache.py).

A verified (account, password) pair is remembered as a keyed hash for ``[auth]
cache_ttl``; a returning client skips argon2id. Password changes and deletions take
effect at once, and the device policy still runs on every login. The server tests
count the real password-hash calls with a spy around ``cred.verify_password``.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable

import pytest

from clientid_mta.auth.cache import AuthCache
from tests.conftest import THUNDERBIRD_UUID, RunningServer
from tests.serverproc import devices, fingerprint_of
from tests.sink import wait_until

ALICE = ("alice@example.org", "alice-password")
BOB = ("bob@example.org", "bob-password")
DEVICE = f"UUID {THUNDERBIRD_UUID}"
OTHER_DEVICE = "UUID 0b6b2f7e-0000-4000-8000-000000000001"
ACCEPTED = (235, "2.7.0 Authentication successful")
REFUSED = (535, "5.7.8 Authentication credentials invalid")
STORED_HASH = "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"


class Clock:
    """A settable clock for the cache."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cache_of(server: RunningServer) -> AuthCache:
    return server.service.components.checker.cache


def login(
    server: RunningServer, account: tuple[str, str], clientid: str | None = DEVICE
) -> tuple[int, str]:
    """One AUTH PLAIN on a fresh STARTTLS session: (code, text of the reply)."""
    wire = server.wire().tls_session()
    try:
        if clientid is not None:
            assert wire.cmd(f"CLIENTID {clientid}") == (250, ["2.0.0 OK"])
        user, password = account
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        code, lines = wire.cmd(f"AUTH PLAIN {token}")
        return code, lines[-1]
    finally:
        wire.close()


# --- the cache on its own ------------------------------------------------------------


def test_auth_cache_hit_only_for_the_verified_triple() -> None:
    cache = AuthCache(ttl=60, size=10)
    assert not cache.check("alice@example.org", STORED_HASH, "alice-password")
    cache.remember("alice@example.org", STORED_HASH, "alice-password")
    assert cache.check("alice@example.org", STORED_HASH, "alice-password")
    for address, stored, password in (
        ("alice@example.org", STORED_HASH, "wrong-password"),
        ("alice@example.org", STORED_HASH + "x", "alice-password"),  # a new password hash
        ("bob@example.org", STORED_HASH, "alice-password"),
    ):
        assert not cache.check(address, stored, password)
    assert (cache.hits, cache.misses) == (1, 4)


def test_auth_cache_ttl_expiry() -> None:
    clock = Clock()
    cache = AuthCache(ttl=1, size=10, clock=clock)
    cache.remember("alice@example.org", STORED_HASH, "alice-password")
    clock.now += 0.999
    assert cache.check("alice@example.org", STORED_HASH, "alice-password")
    clock.now += 0.001
    assert not cache.check("alice@example.org", STORED_HASH, "alice-password")
    assert len(cache) == 0  # the expired entry is gone, not just skipped


def test_auth_cache_hits_do_not_extend_the_ttl() -> None:
    clock = Clock()
    cache = AuthCache(ttl=10, size=10, clock=clock)
    cache.remember("alice@example.org", STORED_HASH, "alice-password")
    for _ in range(3):
        clock.now += 3
        assert cache.check("alice@example.org", STORED_HASH, "alice-password")
    clock.now += 1
    assert not cache.check("alice@example.org", STORED_HASH, "alice-password")


def test_auth_cache_size_cap_evicts_oldest() -> None:
    cache = AuthCache(ttl=60, size=2)
    for password in ("one", "two", "three"):
        cache.remember("alice@example.org", STORED_HASH, password)
    assert len(cache) == 2
    assert [cache.check("alice@example.org", STORED_HASH, p) for p in ("one", "two", "three")] == [
        False,
        True,
        True,
    ]


def test_auth_cache_expired_entries_are_pruned_when_storing() -> None:
    clock = Clock()
    cache = AuthCache(ttl=5, size=10, clock=clock)
    cache.remember("alice@example.org", STORED_HASH, "old")
    clock.now += 5
    cache.remember("bob@example.org", STORED_HASH, "new")
    assert len(cache) == 1


def test_auth_cache_ttl_0_stores_nothing() -> None:
    cache = AuthCache(ttl=0, size=10)
    cache.remember("alice@example.org", STORED_HASH, "alice-password")
    assert len(cache) == 0
    assert not cache.check("alice@example.org", STORED_HASH, "alice-password")


def test_auth_cache_clear_forgets_every_entry() -> None:
    cache = AuthCache(ttl=60, size=10)
    cache.remember("alice@example.org", STORED_HASH, "alice-password")
    cache.clear()
    assert not cache.check("alice@example.org", STORED_HASH, "alice-password")


def test_auth_cache_is_keyed_by_a_per_process_secret() -> None:
    """Entries are HMACs under a random secret: nothing to test guesses against offline."""
    first, second = AuthCache(ttl=60, size=10), AuthCache(ttl=60, size=10)
    for cache in (first, second):
        cache.remember("alice@example.org", STORED_HASH, "alice-password")
    [key_one], [key_two] = list(first._entries), list(second._entries)
    assert len(key_one) == 32 and key_one != key_two
    assert b"alice-password" not in key_one


def test_auth_cache_never_caches_a_value_with_nul_in_address_or_hash() -> None:
    """``a NUL b NUL pw`` must stay unambiguous, so such values are simply not cached."""
    cache = AuthCache(ttl=60, size=10)
    cache.remember("alice@example.org\0" + STORED_HASH, STORED_HASH, "pw")
    cache.remember("alice@example.org", STORED_HASH + "\0x", "pw")
    assert len(cache) == 0


def test_auth_cache_is_thread_safe() -> None:
    cache = AuthCache(ttl=60, size=50)
    rounds, workers = 300, 8

    def work(worker: int) -> None:
        for n in range(rounds):
            cache.remember(f"user{worker}@example.org", STORED_HASH, str(n))
            cache.check(f"user{worker}@example.org", STORED_HASH, str(n))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cache) == 50
    assert cache.hits + cache.misses == rounds * workers


# --- the cache in a running server ------------------------------------------------------


def test_auth_cache_hit_skips_the_password_hash(server: RunningServer, hashes: list[str]) -> None:
    assert login(server, ALICE) == ACCEPTED
    assert len(hashes) == 1
    hits = cache_of(server).hits
    assert login(server, ALICE) == ACCEPTED
    assert len(hashes) == 1  # no argon2id the second time
    assert cache_of(server).hits == hits + 1
    # The device policy ran on the hit too: the device's login was recorded (after the
    # 235, by the server's housekeeping within about a second: devices/last_seen.py).

    def recorded() -> tuple[str, str] | None:
        [(_type, state, row)] = devices(server.admin("device", "list", ALICE[0])).values()
        return (state, row.split()[3]) if row.split()[3] == "2" else None

    assert wait_until(recorded, 10, "the second login in the store") == ("trusted", "2")


def test_auth_cache_wrong_password_is_never_cached(
    server: RunningServer, hashes: list[str]
) -> None:
    wrong = (ALICE[0], "wrong-password")
    assert [login(server, wrong) for _ in range(2)] == [REFUSED, REFUSED]
    assert len(hashes) == 1  # the repeat is known wrong (auth/repeats.py), not a cache hit
    assert cache_of(server).hits == 0 and len(cache_of(server)) == 0


def test_auth_cache_ttl_expiry_on_a_running_server(
    make_server: Callable[..., RunningServer], hashes: list[str]
) -> None:
    server = make_server("[auth]\ncache_ttl = 2")
    server.add_user(*ALICE)
    clock = Clock()
    cache_of(server).clock = clock
    assert cache_of(server).ttl == 2
    assert [login(server, ALICE) for _ in range(2)] == [ACCEPTED, ACCEPTED]
    assert len(hashes) == 1
    clock.now += 1.9
    assert login(server, ALICE) == ACCEPTED
    assert len(hashes) == 1  # still cached just before the TTL
    clock.now += 0.15
    assert login(server, ALICE) == ACCEPTED
    assert len(hashes) == 2


def test_auth_cache_password_change_refuses_the_old_password_at_once(
    server: RunningServer,
) -> None:
    assert login(server, ALICE) == ACCEPTED  # now cached
    server.admin("user", "passwd", ALICE[0], stdin="a-new-password\n")
    assert login(server, ALICE) == REFUSED
    assert login(server, (ALICE[0], "a-new-password")) == ACCEPTED


def test_auth_cache_user_deletion_refuses_at_once(server: RunningServer) -> None:
    assert login(server, ALICE) == ACCEPTED  # now cached
    server.admin("user", "del", ALICE[0])
    assert login(server, ALICE) == REFUSED


@pytest.mark.parametrize("policy", ["tofu", "allowlist"])
def test_auth_cache_revoked_device_refused_on_a_cache_hit(
    make_server: Callable[..., RunningServer], hashes: list[str], policy: str
) -> None:
    server = make_server(f'[clientid]\npolicy = "{policy}"')
    server.add_user(*ALICE)
    if policy == "allowlist":
        server.admin("device", "add", ALICE[0], "UUID", stdin=THUNDERBIRD_UUID + "\n")
    assert login(server, ALICE) == ACCEPTED  # now cached
    server.admin("device", "revoke", ALICE[0], fingerprint_of(server, DEVICE))
    hits = cache_of(server).hits
    assert login(server, ALICE) == REFUSED
    assert cache_of(server).hits == hits + 1  # the password came from the cache


def test_C12_policy_refusal_on_a_cache_hit_still_costs_a_full_hash(
    server: RunningServer, hashes: list[str]
) -> None:
    """A stolen password must not be confirmable by a fast 535 from an unknown device."""
    assert login(server, ALICE) == ACCEPTED  # trusted first device; password cached
    assert login(server, ALICE, OTHER_DEVICE) == REFUSED  # a new device: pending
    assert cache_of(server).hits == 1
    assert hashes == [hashes[0]] * 2  # the refusal paid for argon2id like a wrong password


def test_auth_cache_ttl_0_disables_the_cache(
    make_server: Callable[..., RunningServer], hashes: list[str]
) -> None:
    server = make_server("[auth]\ncache_ttl = 0")
    server.add_user(*ALICE)
    assert [login(server, ALICE) for _ in range(2)] == [ACCEPTED, ACCEPTED]
    assert len(hashes) == 2
    assert cache_of(server).hits == 0 and len(cache_of(server)) == 0


def test_auth_cache_size_cap_evicts_on_a_running_server(
    make_server: Callable[..., RunningServer], hashes: list[str]
) -> None:
    server = make_server("[auth]\ncache_size = 1")
    for account in (ALICE, BOB):
        server.add_user(*account)
    assert [login(server, a, None) for a in (ALICE, BOB, ALICE, ALICE)] == [ACCEPTED] * 4
    assert len(hashes) == 3  # bob's entry pushed alice's out; her third login is a hit
