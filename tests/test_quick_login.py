"""Issue 16: a trusted device's login with a cached password is decided on the reactor.

The checker's quick path (``ClientIdChecker._quick_check``) reads the device, the
budgets and the shared-device flag with one SQLite read that never waits
(``ILoginLook``) and answers with no thread. Everything else, and every refusal, goes to
the thread as before. These tests use the real checker, policy, defences and SQLite
store; the "thread" is a queue the test runs by hand, so a trip to it is seen, and a
second connection to the same file plays the admin command or another worker process.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from twisted.cred import error as cred_error
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from clientid_mta.auth.budgets import Throttle
from clientid_mta.auth.cache import AuthCache
from clientid_mta.auth.checker import ClientIdChecker, Defences
from clientid_mta.auth.credentials import ClientIdUsernamePassword, LoginThrottled
from clientid_mta.auth.known_clients import KnownClients
from clientid_mta.auth.passwd_file import Account, PasswdFile, hash_password
from clientid_mta.config import (
    ClientIdConfig,
    SharedDevicesConfig,
    ThrottleConfig,
    TravelConfig,
)
from clientid_mta.devices import last_seen
from clientid_mta.devices.last_seen import LoginRecorder
from clientid_mta.devices.policy import ALLOWED_KNOWN_DEVICE, DevicePolicy, Where
from clientid_mta.devices.postgres_store import open_postgres_stores
from clientid_mta.devices.sharing import SharedDevices
from clientid_mta.devices.sqlite_store import (
    SQLiteDeviceRegistry,
    SQLiteLoginLook,
    open_sqlite_stores,
)
from clientid_mta.devices.store import (
    PENDING,
    REVOKED,
    TRUSTED,
    Budget,
    Stores,
    StoreUnavailable,
)
from clientid_mta.smtp.clientid import ClientIdentity, device_key
from tests.postgres_server import Cluster

ALICE = "alice@example.org"
PASSWORD = "correct horse battery"
KEY = b"k" * 32
PHONE = ClientIdentity("UUID", "1b4e28ba-2d11-4f5e-8d6f-0e7e2a2b5c01")
HOME = IPv4Address("TCP", "192.0.2.7", 40000)
PHONE_KEY = device_key(KEY, PHONE)
FINGERPRINT = PHONE_KEY[:16]


@dataclass
class Login:
    """A checker over a real store, and the trips its logins made to the thread."""

    checker: ClientIdChecker
    stores: Stores
    recorder: LoginRecorder
    cache: AuthCache
    trips: list[tuple[Any, tuple[Any, ...], defer.Deferred[Any]]] = field(default_factory=list)

    def run_in_thread(self, function: Any, *args: Any) -> defer.Deferred[Any]:
        waiting: defer.Deferred[Any] = defer.Deferred()
        self.trips.append((function, args, waiting))
        return waiting

    def run_trips(self) -> None:
        """What the login threads would do, here and now."""
        while self.trips:
            function, args, waiting = self.trips.pop(0)
            try:
                result = function(*args)
            except Exception:
                waiting.errback(Failure())
            else:
                waiting.callback(result)

    def attempt(self, password: str = PASSWORD, peer: IPv4Address = HOME) -> defer.Deferred[Any]:
        creds = ClientIdUsernamePassword(ALICE, password, PHONE, peer)
        return self.checker.requestAvatarId(creds)

    def login(self, password: str = PASSWORD, peer: IPv4Address = HOME) -> Any:
        """The outcome (an avatar id or a Failure) of one login, thread trips run."""
        outcome: list[Any] = []
        self.attempt(password, peer).addBoth(outcome.append)
        self.run_trips()
        assert len(outcome) == 1
        return outcome[0]


def build(
    tmp_path: Path,
    throttle: ThrottleConfig | None = None,
    sharing: SharedDevicesConfig | None = None,
    clientid: dict[str, Any] | None = None,
    travel: TravelConfig | None = None,
    shared_budgets: bool = True,
    stores: Stores | None = None,
) -> Login:
    """A checker over ``stores`` (default: SQLite in ``tmp_path``)."""
    passwd = PasswdFile(tmp_path / "passwd")
    passwd.save([Account(ALICE, hash_password(PASSWORD))])
    if stores is None:
        stores = open_sqlite_stores(tmp_path / "devices.sqlite3")
    recorder = LoginRecorder(stores.devices)
    settings = ClientIdConfig(
        key_file=tmp_path / "k", device_store=tmp_path / "d", **(clientid or {})
    )
    policy = DevicePolicy(settings, stores.devices, KEY, None, travel, logins=recorder)
    budgets = Throttle(throttle or ThrottleConfig())
    if shared_budgets:
        budgets.share(stores.budgets)  # as with worker processes
    defences = Defences(
        throttle=budgets,
        sharing=SharedDevices(sharing or SharedDevicesConfig(), stores.shared_devices),
        known=KnownClients(stores.budgets, ThrottleConfig().usual_network_days),
    )
    cache = AuthCache(ttl=3600, size=100)
    checker = ClientIdChecker(passwd, policy, defences, cache)
    checker.quick_look = stores.look
    checker.thread_look = stores.thread_look
    login = Login(checker, stores, recorder, cache)
    checker.run_in_thread = login.run_in_thread
    return login


@pytest.fixture
def login(tmp_path: Path) -> Iterator[Login]:
    built = build(tmp_path)
    yield built
    built.stores.close()


@pytest.fixture
def other(tmp_path: Path, login: Login) -> Iterator[Stores]:
    """A second connection to the same file: the admin command, or another process."""
    opened = open_sqlite_stores(tmp_path / "devices.sqlite3")
    yield opened
    opened.close()


def trusted_and_cached(login: Login) -> None:
    """The first login: in a thread, it trusts the device (first use) and caches the
    password; from then on the device has its own budget."""
    assert login.login() == ALICE.encode()
    device = login.stores.devices.get(ALICE, PHONE_KEY)
    assert device is not None and device.state == TRUSTED


def test_a_trusted_devices_second_login_needs_no_thread(login: Login) -> None:
    trusted_and_cached(login)
    hits = login.cache.hits
    answered: list[Any] = []
    login.attempt().addBoth(answered.append)
    assert answered == [ALICE.encode()]  # decided before any thread ran
    assert login.trips == []
    assert login.cache.hits == hits + 1
    assert len(login.recorder) == 1  # the login is recorded after the 235, as before
    assert login.recorder.flush() == 1
    device = login.stores.devices.get(ALICE, PHONE_KEY)
    assert device is not None and device.logins == 2


def test_a_success_on_the_quick_path_spends_no_budget(tmp_path: Path) -> None:
    login = build(tmp_path, ThrottleConfig(device_burst=2, account_known_burst=2))
    try:
        trusted_and_cached(login)
        rows = login.stores.budgets.load()  # the first login's, in the thread
        for _ in range(5):
            assert login.login() == ALICE.encode()
        assert login.trips == []
        assert login.stores.budgets.load() == rows  # neither taken nor given back
    finally:
        login.stores.close()


@pytest.mark.parametrize("state", [REVOKED, PENDING])
def test_a_device_revoked_a_moment_ago_is_refused_on_a_cache_hit(
    login: Login, other: Stores, state: str
) -> None:
    trusted_and_cached(login)
    other.devices.set_state(ALICE, FINGERPRINT, state)  # `device revoke`, meanwhile
    answered: list[Any] = []
    login.attempt().addBoth(answered.append)
    assert answered == [] and len(login.trips) == 1  # sent to the thread
    login.run_trips()
    assert isinstance(answered[0], Failure) and answered[0].check(cred_error.UnauthorizedLogin)


def test_a_budget_spent_by_another_process_stops_the_quick_path(
    tmp_path: Path, login: Login, other: Stores
) -> None:
    login.stores.close()
    login = build(tmp_path, ThrottleConfig(device_burst=2))
    trusted_and_cached(login)
    # Another worker spent the device's budget on wrong passwords; this process's memory
    # copy of the levels has not seen it.
    elsewhere = Throttle(ThrottleConfig(device_burst=2))
    elsewhere.share(other.budgets)
    device_bucket = f"device:{PHONE_KEY}"
    assert elsewhere.take(device_bucket) and elsewhere.take(device_bucket)
    assert login.checker.defences.throttle is not None
    assert login.checker.defences.throttle.admit(device_bucket)  # the stale view
    outcome = login.login()
    assert isinstance(outcome, Failure) and outcome.check(LoginThrottled)
    login.stores.close()


def test_a_budget_spent_in_this_process_stops_the_quick_path(tmp_path: Path) -> None:
    login = build(tmp_path, ThrottleConfig(account_known_burst=1), shared_budgets=False)
    try:
        trusted_and_cached(login)
        throttle = login.checker.defences.throttle
        assert throttle is not None and throttle.take(f"known:{ALICE}")
        answered: list[Any] = []
        login.attempt().addBoth(answered.append)
        assert answered == [] and len(login.trips) == 1
        login.run_trips()
        assert isinstance(answered[0], Failure) and answered[0].check(LoginThrottled)
    finally:
        login.stores.close()


def test_a_device_flagged_as_shared_is_refused_on_a_cache_hit(
    tmp_path: Path, login: Login, other: Stores
) -> None:
    login.stores.close()
    login = build(tmp_path, sharing=SharedDevicesConfig(block=True))
    trusted_and_cached(login)
    assert other.shared_devices.flag(PHONE_KEY, 5, time.time())  # another process flagged it
    outcome = login.login()
    assert isinstance(outcome, Failure) and outcome.check(cred_error.UnauthorizedLogin)
    login.stores.close()


def test_a_wrong_password_goes_to_the_thread_and_counts_one_miss(login: Login) -> None:
    trusted_and_cached(login)
    misses = login.cache.misses
    answered: list[Any] = []
    login.attempt("wrong").addBoth(answered.append)
    assert answered == [] and len(login.trips) == 1
    login.run_trips()
    assert isinstance(answered[0], Failure) and answered[0].check(cred_error.UnauthorizedLogin)
    assert login.cache.misses == misses + 1


def sighted_at(login: Login) -> float | None:
    assert login.stores.look is not None
    return login.stores.look.look(ALICE, PHONE_KEY, ()).sighted


def forgetful_sharing(login: Login, clock: Any = time.time) -> SharedDevices:
    """The shared-device watch of a process that has not written this pair lately (a
    worker, or this one RESIGHT_AFTER later), over the same store."""
    fresh = SharedDevices(SharedDevicesConfig(), login.stores.shared_devices, clock=clock)
    login.checker.defences.sharing = fresh
    return fresh


def test_a_pair_the_count_holds_is_resighted_after_the_reply(login: Login) -> None:
    """A trusted device's login minutes after the last (every real one): the sighting
    only moves a time, so the 235 does not wait for it; it is written behind."""
    trusted_and_cached(login)
    before = sighted_at(login)
    assert before is not None
    forgetful_sharing(login, clock=lambda: time.time() + 120)
    answered: list[Any] = []
    login.attempt().addBoth(answered.append)
    assert answered == [ALICE.encode()]  # before any thread ran
    assert len(login.trips) == 1  # the sighting, queued behind the reply
    login.run_trips()
    after = sighted_at(login)
    assert after is not None and after >= before + 119


def test_a_sighting_behind_the_reply_that_the_store_refuses_is_one_line(
    login: Login, monkeypatch: pytest.MonkeyPatch
) -> None:
    trusted_and_cached(login)
    sharing = forgetful_sharing(login, clock=lambda: time.time() + 120)

    def locked(*_args: Any) -> int:
        raise StoreUnavailable("database is locked")

    monkeypatch.setattr(sharing.store, "saw", locked)
    answered: list[Any] = []
    login.attempt().addBoth(answered.append)
    assert answered == [ALICE.encode()]
    with capturedLogs() as events:
        login.run_trips()
    [event] = events
    assert "log_failure" not in event
    assert formatEvent(event) == "a device sighting was not recorded: database is locked"
    assert not sharing.seen_lately(PHONE_KEY, ALICE)  # the next login writes it again


def test_a_pair_the_count_no_longer_holds_is_sighted_before_the_reply(login: Login) -> None:
    """Out of the window the pair counts again: this attempt may be the one that flags."""
    trusted_and_cached(login)
    forgetful_sharing(login, clock=lambda: time.time() + 2 * SharedDevicesConfig().window)
    answered: list[Any] = []
    login.attempt().addBoth(answered.append)
    assert answered == [] and len(login.trips) == 1
    login.run_trips()
    assert answered == [ALICE.encode()]


def test_a_resighting_behind_that_flags_the_device_reports_it(tmp_path: Path, login: Login) -> None:
    trusted_and_cached(login)
    now = sighted_at(login)
    assert now is not None
    for n in range(SharedDevicesConfig().max_accounts):  # five other accounts, in the window
        login.stores.shared_devices.saw(PHONE_KEY, f"other{n}@example.org", now, 3600)
    # Between the read and the write the pair left the window (the read said it had not).
    forgetful_sharing(login, clock=lambda: now + 3599.9)
    answered: list[Any] = []
    login.attempt().addBoth(answered.append)
    assert answered == [ALICE.encode()]
    devices = login.stores.devices
    assert isinstance(devices, SQLiteDeviceRegistry)  # the fixture's stores are SQLite
    with devices._locked() as db:  # what the store's own clean-up would do
        db.execute("DELETE FROM device_sightings WHERE account=?", (ALICE,))
    reported: list[int] = []
    login.checker._report_shared = lambda attempt, accounts: reported.append(accounts)  # type: ignore[method-assign]
    login.run_trips()
    assert reported == [SharedDevicesConfig().max_accounts + 1]
    assert login.stores.shared_devices.is_flagged(PHONE_KEY)


@contextmanager
def another_process(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """A connection of its own to the store, as the admin command or another worker has."""
    writer = sqlite3.connect(tmp_path / "devices.sqlite3", isolation_level=None, timeout=0)
    try:
        yield writer
    finally:
        writer.close()


def test_a_writer_in_another_process_does_not_hold_up_the_look(
    tmp_path: Path, login: Login
) -> None:
    trusted_and_cached(login)
    with another_process(tmp_path) as writer:
        writer.execute("BEGIN IMMEDIATE")  # the write lock, held while the reactor reads
        writer.execute("UPDATE devices SET state='revoked'")
        assert login.stores.look is not None
        seen = login.stores.look.look(ALICE, PHONE_KEY, ())
        assert seen.device is not None and seen.device.state == TRUSTED  # the last commit
        writer.execute("COMMIT")
        seen = login.stores.look.look(ALICE, PHONE_KEY, ())
        assert seen.device is not None and seen.device.state == REVOKED  # seen at once


def test_a_trusted_devices_login_is_answered_while_another_process_holds_the_write_lock(
    tmp_path: Path, login: Login
) -> None:
    """S4: a locked store refuses with 454 the logins that need it; this one does not."""
    trusted_and_cached(login)
    with another_process(tmp_path) as writer:
        writer.execute("BEGIN EXCLUSIVE")  # as the fault soak's "device store locked"
        answered: list[Any] = []
        login.attempt().addBoth(answered.append)
        assert answered == [ALICE.encode()] and login.trips == []


def test_a_look_that_cannot_start_at_once_sends_the_login_to_the_thread(login: Login) -> None:
    trusted_and_cached(login)
    look = login.stores.look
    assert isinstance(look, SQLiteLoginLook)
    with look._lock:  # its connection busy (a close, say): the look must not wait for it
        with pytest.raises(StoreUnavailable):
            look.look(ALICE, PHONE_KEY, ())
        answered: list[Any] = []
        login.attempt().addBoth(answered.append)
        assert answered == [] and len(login.trips) == 1
    login.run_trips()
    assert answered == [ALICE.encode()]


def test_without_a_quick_look_every_login_goes_to_the_thread(login: Login) -> None:
    trusted_and_cached(login)
    login.checker.quick_look = None  # PostgreSQL offers none
    assert login.login() == ALICE.encode()
    assert len(login.recorder) == 1


def test_a_new_network_is_recorded_in_the_thread(login: Login) -> None:
    trusted_and_cached(login)
    away = IPv4Address("TCP", "198.51.100.9", 40000)
    answered: list[Any] = []
    login.attempt(peer=away).addBoth(answered.append)
    assert answered == [] and len(login.trips) == 1  # its usual-network row is written
    login.run_trips()
    assert answered == [ALICE.encode()]
    assert login.login(peer=away) == ALICE.encode()
    assert login.trips == []


def test_the_look_reads_the_device_budgets_and_flag_in_one_call(login: Login) -> None:
    trusted_and_cached(login)
    login.stores.budgets.take({"device:x": Budget(5, 60)}, 100.0)
    login.stores.shared_devices.flag(PHONE_KEY, 4, 100.0)
    look = login.stores.look
    assert look is not None
    seen = look.look(ALICE, PHONE_KEY, ["device:x", "known:nobody"])
    assert seen.device is not None and seen.device.state == TRUSTED
    assert set(seen.budgets) == {"device:x"} and seen.flagged
    assert look.look("bob@example.org", PHONE_KEY, []).device is None


# The policy's half, alone: when it declines, so that ``decide`` runs in the thread.


def policy_for(tmp_path: Path, stores: Stores, **settings: Any) -> DevicePolicy:
    travel = settings.pop("travel", None)
    config = ClientIdConfig(key_file=tmp_path / "k", device_store=tmp_path / "d", **settings)
    recorder = LoginRecorder(stores.devices)
    return DevicePolicy(config, stores.devices, KEY, None, travel, logins=recorder)


def trusted_device(stores: Stores) -> Any:
    stores.devices.add_trusted(ALICE, PHONE_KEY, "UUID")
    return stores.devices.get(ALICE, PHONE_KEY)


HERE = Where("192.0.2.0/24", "192.0")


def test_the_policy_decides_a_plain_trusted_login_without_the_store(login: Login) -> None:
    policy = login.checker.policy
    decision = policy.quick_decision(ALICE, PHONE, HERE, trusted_device(login.stores))
    assert decision is not None and decision.allowed and decision.device_trusted
    assert decision.reason == ALLOWED_KNOWN_DEVICE and decision.fingerprint == FINGERPRINT


def test_the_policy_declines_what_needs_a_notice_or_a_write(
    tmp_path: Path, login: Login, monkeypatch: pytest.MonkeyPatch
) -> None:
    stores = login.stores
    device = trusted_device(stores)
    alerting = policy_for(tmp_path, stores, default_flags=frozenset({"auth", "alert-success"}))
    assert alerting.quick_decision(ALICE, PHONE, HERE, device) is None
    observing = policy_for(tmp_path, stores, policy="observe")
    assert observing.quick_decision(ALICE, PHONE, HERE, device) is None
    travel = TravelConfig(window=3600, refuse=True)
    travelling = policy_for(tmp_path, stores, travel=travel)
    recent = type(device)(**{**vars(device), "last_login": time.time(), "last_region": "203.0"})
    assert travelling.quick_decision(ALICE, PHONE, HERE, recent) is None
    plain = policy_for(tmp_path, stores)
    assert plain.quick_decision(ALICE, PHONE, HERE, device) is not None  # the control
    other_account = type(device)(**{**vars(device), "account": "bob@example.org"})
    assert plain.quick_decision(ALICE, PHONE, HERE, other_account) is None
    monkeypatch.setattr(last_seen, "MAX_PENDING", 0)  # the write-behind is full
    assert plain.quick_decision(ALICE, PHONE, HERE, device) is None


def test_a_password_changed_a_moment_ago_is_refused_at_once(login: Login) -> None:
    trusted_and_cached(login)
    passwords = login.checker.passwords
    assert passwords.is_current()
    passwords.save([Account(ALICE, hash_password("a new password"))])  # `user passwd`
    assert not passwords.is_current()  # seen with one stat, before the reactor re-reads
    answered: list[Any] = []
    login.attempt().addBoth(answered.append)
    assert answered == [] and len(login.trips) == 1  # the thread re-reads the file
    login.run_trips()
    assert isinstance(answered[0], Failure) and answered[0].check(cred_error.UnauthorizedLogin)


# --- PostgreSQL: the same decision in one login thread, with one read -----------------


@pytest.fixture
def on_postgres(tmp_path: Path, postgres_cluster: Cluster) -> Iterator[Login]:
    built = build(tmp_path, stores=open_postgres_stores(postgres_cluster.new_database()))
    yield built
    built.stores.close()


def test_on_postgresql_a_trusted_devices_login_is_one_read_in_one_thread(
    on_postgres: Login,
) -> None:
    trusted_and_cached(on_postgres)
    budgets = sorted(on_postgres.stores.budgets.load())
    answered: list[Any] = []
    on_postgres.attempt().addBoth(answered.append)
    assert answered == [] and len(on_postgres.trips) == 1  # never a read on the reactor
    function, _args, _waiting = on_postgres.trips[0]
    assert function == on_postgres.checker._quick_check
    on_postgres.run_trips()
    assert answered == [ALICE.encode()]
    assert sorted(on_postgres.stores.budgets.load()) == budgets  # no take, no refund
    assert on_postgres.recorder.flush() == 1  # the login, written behind as on SQLite


def test_on_postgresql_what_the_quick_check_declines_goes_on_to_the_full_check(
    on_postgres: Login,
) -> None:
    trusted_and_cached(on_postgres)
    wrong = on_postgres.login("wrong")
    assert isinstance(wrong, Failure) and wrong.check(cred_error.UnauthorizedLogin)
    on_postgres.stores.devices.set_state(ALICE, FINGERPRINT, REVOKED)  # by another node
    revoked = on_postgres.login()
    assert isinstance(revoked, Failure) and revoked.check(cred_error.UnauthorizedLogin)


def test_on_postgresql_the_look_reads_device_budgets_flag_and_sighting(
    on_postgres: Login,
) -> None:
    trusted_and_cached(on_postgres)
    stores = on_postgres.stores
    stores.budgets.take({"device:x": Budget(5, 60)}, 100.0)
    stores.shared_devices.flag(PHONE_KEY, 4, 100.0)
    assert stores.look is None and stores.thread_look is not None
    seen = stores.thread_look.look(ALICE, PHONE_KEY, ["device:x", "known:nobody"])
    assert seen.device is not None and seen.device.state == TRUSTED
    assert seen.budgets == {"device:x": (4.0, 100.0)}
    assert seen.flagged and seen.sighted is not None
