"""Every store backend against the store interfaces (clientid_mta/devices/store.py).

One fixture, ``stores``, runs each test on every backend in BACKENDS; a new backend is
one more entry there. The tests call the store the way the server does (in threads,
blocking) and check the decisions that must be atomic under forced interleavings.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from clientid_mta.cli import admin
from clientid_mta.config import load_config
from clientid_mta.devices import store as interfaces
from clientid_mta.devices.policy import Decision, DevicePolicy, Where
from clientid_mta.devices.postgres_store import open_postgres_stores
from clientid_mta.devices.sqlite_store import open_sqlite_stores
from clientid_mta.devices.store import (
    PENDING,
    REVOKED,
    TRUSTED,
    AuditEntry,
    BadFingerprint,
    Budget,
    DeviceNotFound,
    PendingLogin,
    Stores,
    StoreUnavailable,
    login_updates,
)
from clientid_mta.smtp.clientid import parse_clientid
from tests.postgres_server import Cluster

KEY_A = "a1" * 32  # device keys are 64 hex digits; fingerprints their first 16
KEY_B = "b2" * 32
KEY_A2 = "a1" * 8 + "ff" * 24  # shares its fingerprint's first 16 digits with KEY_A
ALICE = "alice@example.org"
BOB = "bob@example.org"


class _ObservedLock:
    """A lock that reports when a caller has to wait for it."""

    def __init__(self, lock: Any, waiting: Callable[[], None]) -> None:
        self._lock = lock
        self._waiting = waiting

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        self._waiting()
        return bool(self._lock.acquire(blocking, timeout))

    def release(self) -> None:
        self._lock.release()


def _sqlite_on_wait(registry: interfaces.IDeviceRegistry, waiting: Callable[[], None]) -> None:
    registry._lock = _ObservedLock(registry._lock, waiting)  # type: ignore[attr-defined]


def _postgres_on_wait(registry: interfaces.IDeviceRegistry, waiting: Callable[[], None]) -> None:
    registry.waiting_for_lock = waiting  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Backend:
    open: Callable[[Path], Stores]  # a fresh, empty store (a second call: another process)
    # Calls ``waiting`` when a registry call has to wait for another's transaction.
    on_wait: Callable[[interfaces.IDeviceRegistry, Callable[[], None]], None]


def _sqlite(request: pytest.FixtureRequest) -> Backend:
    return Backend(lambda where: open_sqlite_stores(where / "devices.sqlite3"), _sqlite_on_wait)


def _postgres(request: pytest.FixtureRequest) -> Backend:
    """A fresh database of the session's cluster per test folder (a second open of the
    same folder is another node on the same database)."""
    cluster: Cluster = request.getfixturevalue("postgres_cluster")
    databases: dict[Path, str] = {}

    def open_stores(where: Path) -> Stores:
        if where not in databases:
            databases[where] = cluster.new_database()
        return open_postgres_stores(databases[where], pool_size=4)

    return Backend(open_stores, _postgres_on_wait)


# Each backend, built for one test (it may need a fixture, such as a database server).
BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Backend]] = {
    "sqlite": _sqlite,
    "postgresql": _postgres,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param](request)


@pytest.fixture
def stores(backend: Backend, tmp_path: Path) -> Iterator[Stores]:
    opened = backend.open(tmp_path)
    yield opened
    opened.close()


def test_each_repository_provides_its_interface(stores: Stores) -> None:
    assert interfaces.IDeviceRegistry.providedBy(stores.devices)
    assert interfaces.IAuditStore.providedBy(stores.audit)
    assert interfaces.IBudgetStore.providedBy(stores.budgets)
    assert interfaces.IApprovalCodes.providedBy(stores.approval_codes)
    assert interfaces.ISharedDeviceStore.providedBy(stores.shared_devices)
    assert interfaces.INoticeLedger.providedBy(stores.notices)


# --- the device registry -------------------------------------------------------------------


def test_register_trusts_the_first_eligible_device_and_pends_the_next(stores: Stores) -> None:
    devices = stores.devices
    assert devices.get(ALICE, KEY_A) is None
    first, new = devices.register(ALICE, KEY_A, "UUID", "192.0.2.0/24", True)
    assert new and first.state == TRUSTED and first.last_network == "192.0.2.0/24"
    second, new = devices.register(ALICE, KEY_B, "UUID", "192.0.2.0/24", True)
    assert new and second.state == PENDING
    other, new = devices.register(BOB, KEY_B, "UUID", "net", True)  # per account
    assert new and other.state == TRUSTED
    assert [(d.device_key, d.state) for d in devices.devices_of(ALICE)] == [
        (KEY_A, TRUSTED),
        (KEY_B, PENDING),
    ]


def test_register_keeps_the_state_and_refreshes_last_seen(stores: Stores) -> None:
    devices = stores.devices
    pending, _ = devices.register(ALICE, KEY_A, "UUID", "net1", False)
    assert pending.state == PENDING
    again, new = devices.register(ALICE, KEY_A, "UUID", "net2", True)
    assert not new and again.state == PENDING  # an existing state is kept
    assert again.last_network == "net2" and again.last_seen >= pending.last_seen
    assert again.first_seen == pending.first_seen and again.logins == 0


def test_register_an_ineligible_device_leaves_the_first_device_slot(stores: Stores) -> None:
    devices = stores.devices
    assert devices.register(ALICE, KEY_A, "LOGONLY", "net", False)[0].state == PENDING
    assert devices.register(ALICE, KEY_B, "UUID", "net", True)[0].state == TRUSTED


def test_register_after_a_revocation_pends(stores: Stores) -> None:
    devices = stores.devices
    devices.register(ALICE, KEY_A, "UUID", "net", True)
    assert devices.set_state(ALICE, KEY_A[:6], REVOKED).state == REVOKED
    assert devices.register(ALICE, KEY_B, "UUID", "net", True)[0].state == PENDING


def test_login_counts_and_refreshes(stores: Stores) -> None:
    devices = stores.devices
    devices.register(ALICE, KEY_A, "UUID", "net1", True)
    devices.login(ALICE, KEY_A, "net2", "FR")
    devices.login(ALICE, KEY_A, "net3", "DE")
    device = devices.get(ALICE, KEY_A)
    assert device is not None
    assert (device.logins, device.last_network, device.last_region) == (2, "net3", "DE")
    assert device.last_login >= device.first_seen


def test_record_logins_writes_a_batch_in_order_with_each_logins_time(stores: Stores) -> None:
    """Issue 16: the write-behind's batch, one transaction for a second's logins."""
    devices = stores.devices
    devices.register(ALICE, KEY_A, "UUID", "net1", True)
    devices.register(BOB, KEY_B, "UUID", "net1", True)
    first_seen = devices.get(ALICE, KEY_A).first_seen  # type: ignore[union-attr]
    devices.record_logins(
        [
            PendingLogin(ALICE, KEY_A, "net2", "FR", first_seen + 10),
            PendingLogin(BOB, KEY_B, "net5", "IT", first_seen + 11),
            PendingLogin(ALICE, KEY_A, "net3", "DE", first_seen + 12),
            PendingLogin(ALICE, KEY_B, "net4", "ES", first_seen + 13),  # no such device
        ]
    )
    alice = devices.get(ALICE, KEY_A)
    assert alice is not None
    assert (alice.logins, alice.last_network, alice.last_region) == (2, "net3", "DE")
    assert alice.last_login == alice.last_seen == first_seen + 12
    bob = devices.get(BOB, KEY_B)
    assert bob is not None and (bob.logins, bob.last_network) == (1, "net5")
    assert devices.get(ALICE, KEY_B) is None
    devices.record_logins([])


def test_record_logins_keeps_a_newer_login_another_node_wrote(stores: Stores) -> None:
    """A node whose batch comes late counts its logins but does not overwrite the newer
    region and time another node wrote (the travel check reads them)."""
    devices = stores.devices
    devices.register(ALICE, KEY_A, "UUID", "net1", True)
    start = devices.get(ALICE, KEY_A).first_seen  # type: ignore[union-attr]
    devices.record_logins([PendingLogin(ALICE, KEY_A, "net-new", "FR", start + 20)])
    late = [
        PendingLogin(ALICE, KEY_A, "net-old", "DE", start + 10),
        PendingLogin(ALICE, KEY_A, "net-older", "IT", start + 5),
    ]
    devices.record_logins(late)
    device = devices.get(ALICE, KEY_A)
    assert device is not None
    assert device.logins == 3
    assert (device.last_network, device.last_region, device.last_login) == (
        "net-new",
        "FR",
        start + 20,
    )


def test_login_updates_are_one_row_a_device_in_key_order() -> None:
    rows = login_updates(
        [
            PendingLogin(BOB, KEY_B, "n1", "", 3.0),
            PendingLogin(ALICE, KEY_A, "n2", "", 2.0),
            PendingLogin(BOB, KEY_B, "n3", "", 1.0),
        ]
    )
    assert [(row[0], row[3], row[-2]) for row in rows] == [(1, "n2", ALICE), (2, "n1", BOB)]


def test_set_state_and_label_by_fingerprint_prefix(stores: Stores) -> None:
    devices = stores.devices
    devices.register(ALICE, KEY_A, "UUID", "net", True)
    devices.register(ALICE, KEY_B, "UUID", "net", True)
    assert devices.set_state(ALICE, KEY_B[:6].upper(), TRUSTED).state == TRUSTED
    labelled = devices.set_label(ALICE, f" {KEY_B[:16]} ", "phone")
    assert (labelled.device_key, labelled.label) == (KEY_B, "phone")
    with pytest.raises(ValueError, match="unknown device state"):
        devices.set_state(ALICE, KEY_B[:6], "blessed")
    with pytest.raises(DeviceNotFound, match="no device"):
        devices.set_state(BOB, KEY_B[:6], REVOKED)  # another account's device
    devices.register(ALICE, KEY_A2, "UUID", "net", True)
    with pytest.raises(DeviceNotFound, match="2 devices"):
        devices.set_label(ALICE, KEY_A[:8], "ambiguous")
    for bad in ("%", "a1a1a%", "a1_1a1", "a1a1", KEY_A[:17], "ghijkl", ""):
        with pytest.raises(BadFingerprint):
            devices.set_state(ALICE, bad, REVOKED)
    assert {d.state for d in devices.devices_of(ALICE) if d.device_key != KEY_B} == {
        TRUSTED,
        PENDING,
    }


def test_add_trusted_overrides_a_pending_state(stores: Stores) -> None:
    devices = stores.devices
    devices.register(ALICE, KEY_A, "UUID", "net", True)
    devices.register(ALICE, KEY_B, "UUID", "net", True)
    added = devices.add_trusted(ALICE, KEY_B, "UUID", "laptop")
    assert (added.state, added.label) == (TRUSTED, "laptop")
    fresh = devices.add_trusted(BOB, KEY_A, "IMEI")
    assert (fresh.state, fresh.type, fresh.label) == (TRUSTED, "IMEI", "")


def test_delete_account_forgets_its_devices_only(stores: Stores) -> None:
    devices = stores.devices
    devices.register(ALICE, KEY_A, "UUID", "net", True)
    devices.register(ALICE, KEY_B, "UUID", "net", True)
    devices.register(BOB, KEY_A, "UUID", "net", True)
    assert devices.delete_account(ALICE) == 2
    assert devices.devices_of(ALICE) == [] and len(devices.devices_of(BOB)) == 1
    assert devices.delete_account(ALICE) == 0


def _race(backend: Backend, devices: Any, attempts: dict[str, Callable[[], object]]) -> dict:
    """Run attempts A and B in two threads, A held between its read and its write until
    B has read too (or has to wait for A): the worst interleaving the backend allows."""
    a_between = threading.Event()
    b_read_or_waiting = threading.Event()
    backend.on_wait(devices, b_read_or_waiting.set)

    def between_read_and_write() -> None:
        if threading.current_thread().name == "A":
            a_between.set()
            assert b_read_or_waiting.wait(10), "B neither read nor waited"
        else:
            b_read_or_waiting.set()

    devices.between_read_and_write = between_read_and_write
    results: dict[str, object] = {}

    def run(name: str) -> None:
        try:
            results[name] = attempts[name]()
        except BaseException as problem:
            results[name] = problem

    first = threading.Thread(target=run, args=("A",), name="A")
    second = threading.Thread(target=run, args=("B",), name="B")
    first.start()
    assert a_between.wait(10)
    second.start()
    first.join(10)
    second.join(10)
    return results


def test_first_device_trust_under_a_forced_interleaving(backend: Backend, stores: Stores) -> None:
    """Two new devices of one fresh account register at once: exactly one is trusted."""
    devices = stores.devices
    results = _race(
        backend,
        devices,
        {
            name: partial(devices.register, "fresh@example.org", key, "UUID", "net", True)
            for name, key in (("A", KEY_A), ("B", KEY_B))
        },
    )
    assert {name: (device.state, new) for name, (device, new) in results.items()} == {
        "A": (TRUSTED, True),
        "B": (PENDING, True),
    }
    assert sorted(d.state for d in devices.devices_of("fresh@example.org")) == [PENDING, TRUSTED]


def test_policy_first_device_trust_under_a_forced_interleaving(
    backend: Backend, stores: Stores, tmp_path: Path
) -> None:
    """The same race through DevicePolicy.decide (tofu): one login allowed as the first
    device, the other refused as a new pending device."""
    (tmp_path / "c.toml").write_text("")
    policy = DevicePolicy(
        load_config(tmp_path / "c.toml").clientid, stores.devices, b"k" * 32, None
    )

    def decide(token: bytes) -> Decision:
        return policy.decide("fresh@example.org", parse_clientid(token), Where("net"))

    results = _race(
        backend,
        stores.devices,
        {name: partial(decide, token) for name, token in (("A", b"UUID 1"), ("B", b"UUID 2"))},
    )
    reasons = sorted(getattr(decision, "reason", decision) for decision in results.values())
    assert reasons == ["first_device_trusted", "new_device_pending"]


def test_sqlite_register_holds_the_write_lock_from_its_read_to_its_write(tmp_path: Path) -> None:
    """Across processes: another connection cannot write while a registration is between
    its read and its write (it would wait; with no patience it is refused)."""
    path = tmp_path / "devices.sqlite3"
    server, other = open_sqlite_stores(path), open_sqlite_stores(path, busy_timeout=0)
    refused: list[Exception] = []

    def between_read_and_write() -> None:
        try:
            other.devices.register(ALICE, KEY_B, "UUID", "net", True)
        except StoreUnavailable as problem:
            refused.append(problem)

    server.devices.between_read_and_write = between_read_and_write  # type: ignore[attr-defined]
    try:
        assert server.devices.register(ALICE, KEY_A, "UUID", "net", True)[0].state == TRUSTED
        assert len(refused) == 1
        assert other.devices.register(ALICE, KEY_B, "UUID", "net", True)[0].state == PENDING
    finally:
        server.close()
        other.close()


# --- the audit log -------------------------------------------------------------------------


def _entry(when: float, account: str = ALICE, fp: str = KEY_A[:16]) -> AuditEntry:
    return AuditEntry(when, account, fp, "192.0.2.0/24", "refused", "bad_password")


def test_audit_filters_limit_and_order(stores: Stores) -> None:
    audit = stores.audit
    entries = [
        _entry(100.0),
        _entry(200.0, BOB),
        _entry(300.0, fp=KEY_B[:16]),
        _entry(400.0, fp=""),
        _entry(500.0),
    ]
    audit.add_audit(entries)
    assert audit.audit() == entries
    assert audit.audit(account=BOB) == [entries[1]]
    assert audit.audit(fingerprint=KEY_A[:6].upper()) == [entries[0], entries[1], entries[4]]
    assert audit.audit(account=ALICE, fingerprint=KEY_A[:16], since=150.0) == [entries[4]]
    assert audit.audit(since=300.0) == entries[2:]
    assert audit.audit(limit=2) == entries[3:]  # the newest, oldest first
    for bad in ("%", "a1a1a_", "a1"):
        with pytest.raises(BadFingerprint):
            audit.audit(fingerprint=bad)


def test_audit_prune_drops_only_older_entries(stores: Stores) -> None:
    audit = stores.audit
    audit.add_audit([_entry(100.0), _entry(200.0), _entry(300.0)])
    audit.add_audit_counts([_count(60.0, 5), _count(240.0, 7)])
    assert audit.prune_audit(200.0) == 2
    assert [(e.time, e.count) for e in audit.audit()] == [(200.0, 1), (240.0, 7), (300.0, 1)]
    assert audit.prune_audit(200.0) == 0


def _count(
    minute: float, count: int, fp: str = KEY_A[:16], network: str = "192.0.2.0/24"
) -> AuditEntry:
    return AuditEntry(minute, "", fp, network, "throttled", "device_throttled", count)


def test_audit_counts_add_up_per_minute_network_device_and_reason(stores: Stores) -> None:
    audit = stores.audit
    audit.add_audit_counts([_count(60.0, 3), _count(60.0, 4), _count(60.0, 1, fp="")])
    audit.add_audit_counts([_count(60.0, 10), _count(120.0, 2, network="198.51.100.0/24")])
    other_reason = AuditEntry(60.0, "", "", "192.0.2.0/24", "throttled", "account_throttled", 1)
    audit.add_audit_counts([other_reason])
    audit.add_audit([_entry(90.0)])
    listed = audit.audit()
    assert sorted((e.time, e.fingerprint, e.network, e.reason, e.count) for e in listed) == [
        (60.0, "", "192.0.2.0/24", "account_throttled", 1),
        (60.0, "", "192.0.2.0/24", "device_throttled", 1),
        (60.0, KEY_A[:16], "192.0.2.0/24", "device_throttled", 17),
        (90.0, KEY_A[:16], "192.0.2.0/24", "bad_password", 1),
        (120.0, KEY_A[:16], "198.51.100.0/24", "device_throttled", 2),
    ]
    assert all(e.account == "" for e in listed if e.outcome == "throttled")
    assert audit.audit(account=ALICE) == [_entry(90.0)]  # a count row keeps no account
    assert [e.count for e in audit.audit(fingerprint=KEY_A[:8], since=61.0)] == [1, 2]


def test_audit_trim_keeps_the_latest_written(stores: Stores) -> None:
    audit = stores.audit
    audit.add_audit([_entry(float(n)) for n in range(10)])
    audit.add_audit_counts([_count(60.0 * n, 1) for n in range(4)])
    assert audit.trim_audit(3) == 7 + 1
    assert [e.time for e in audit.audit() if e.outcome == "refused"] == [7.0, 8.0, 9.0]
    assert [e.time for e in audit.audit() if e.outcome == "throttled"] == [60.0, 120.0, 180.0]
    assert audit.trim_audit(3) == 0
    audit.add_audit([_entry(10.0)])
    assert audit.trim_audit(3) == 1
    audit.compact()  # gives the freed pages back; the entries stay
    assert [e.time for e in audit.audit() if e.outcome == "refused"] == [8.0, 9.0, 10.0]


# --- failure budgets -----------------------------------------------------------------------

DEVICE = Budget(burst=2, refill_seconds=60)
ACCOUNT = Budget(burst=3, refill_seconds=600)


def test_budget_take_is_all_or_none(stores: Stores) -> None:
    budgets = stores.budgets
    both = {"device:d": DEVICE, "unknown:a": ACCOUNT}
    assert budgets.take(both, 1000.0) == (
        True,
        {"device:d": (1.0, 1000.0), "unknown:a": (2.0, 1000.0)},
    )
    assert budgets.take(both, 1000.0)[0]
    taken, seen = budgets.take(both, 1000.0)  # the device is spent: nothing is taken
    assert not taken and seen == {"device:d": (0.0, 1000.0), "unknown:a": (1.0, 1000.0)}
    assert budgets.take({"unknown:a": ACCOUNT}, 1000.0) == (True, {"unknown:a": (0.0, 1000.0)})
    assert budgets.take({"device:d": DEVICE}, 1060.0) == (True, {"device:d": (0.0, 1060.0)})


def test_budget_refund_never_exceeds_the_burst(stores: Stores) -> None:
    budgets = stores.budgets
    assert budgets.take({"device:d": DEVICE}, 1000.0)[0]
    assert budgets.refund({"device:d": DEVICE}, 1030.0) == {"device:d": (2.0, 1030.0)}
    assert budgets.refund({"device:d": DEVICE, "known:a": ACCOUNT}, 1030.0) == {
        "device:d": (2.0, 1030.0),
        "known:a": (3.0, 1030.0),
    }


def test_budget_prune_save_and_load(stores: Stores) -> None:
    budgets = stores.budgets
    budgets.save([("device:spent", 0.0, 1000.0), ("device:full", 2.0, 1000.0), ("old:x", 0.0, 0.0)])
    assert sorted(budgets.load()) == [
        ("device:full", 2.0, 1000.0),
        ("device:spent", 0.0, 1000.0),
        ("old:x", 0.0, 0.0),
    ]
    assert budgets.prune({"device": DEVICE}, 1060.0) == 2  # full, and of an unknown kind
    assert budgets.load() == [("device:spent", 0.0, 1000.0)]
    budgets.save([("net:192.0.2.0/24", 1.0, 5.0)])  # replaces every row
    assert budgets.load() == [("net:192.0.2.0/24", 1.0, 5.0)]


def test_budget_store_trusted_device_keys_are_the_trusted_ones_of_any_account(
    stores: Stores,
) -> None:
    """H2: the devices that earn a budget of their own."""
    stores.devices.register(ALICE, KEY_A, "UUID", "net", True)  # first: trusted
    stores.devices.register(ALICE, KEY_B, "UUID", "net", True)  # pending
    stores.devices.add_trusted(BOB, KEY_A2, "UUID")
    assert stores.budgets.trusted_device_keys() == {KEY_A, KEY_A2}
    stores.devices.set_state(BOB, KEY_A2[:16], REVOKED)
    stores.devices.set_state(ALICE, KEY_B[:16], TRUSTED)
    assert stores.budgets.trusted_device_keys() == {KEY_A, KEY_B}


def test_budget_store_login_networks_are_refreshed_and_forgotten(stores: Stores) -> None:
    """H2/M2: the networks each account logged in from lately, newest first; a later
    login moves a row forward, never back; rows older than ``keep`` go."""
    budgets = stores.budgets
    budgets.record_login_network(ALICE, "192.0.2.0/24", 1000.0, keep=500.0)
    budgets.record_login_network(BOB, "198.51.100.0/24", 1100.0, keep=500.0)
    budgets.record_login_network(ALICE, "192.0.2.0/24", 1200.0, keep=500.0)
    budgets.record_login_network(ALICE, "192.0.2.0/24", 1150.0, keep=500.0)  # late: kept
    assert budgets.login_networks(0.0) == [
        (ALICE, "192.0.2.0/24", 1200.0),
        (BOB, "198.51.100.0/24", 1100.0),
    ]
    assert budgets.login_networks(1150.0) == [(ALICE, "192.0.2.0/24", 1200.0)]
    budgets.record_login_network(ALICE, "203.0.113.0/24", 1700.0, keep=500.0)  # BOB's: gone
    assert budgets.login_networks(0.0) == [
        (ALICE, "203.0.113.0/24", 1700.0),
        (ALICE, "192.0.2.0/24", 1200.0),
    ]


def race_in_two_processes(
    backend: Backend, where: Path, call: Callable[[Stores, int], bool], count: int = 8
) -> list[bool]:
    """``count`` threads, started together, each making ``call`` (with its number) on one
    of two processes' connections to the store; their answers, sorted."""
    processes = [backend.open(where), backend.open(where)]
    answers: list[bool] = []
    start = threading.Barrier(count)

    def run(number: int) -> None:
        start.wait(10)
        answers.append(call(processes[number % 2], number))

    threads = [threading.Thread(target=run, args=(number,)) for number in range(count)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        for stores in processes:
            stores.close()
    return sorted(answers)


def test_budget_take_is_atomic_across_processes(backend: Backend, tmp_path: Path) -> None:
    """Two processes' connections, many threads, one bucket of 5: exactly 5 takes."""
    bucket = {"device:d": Budget(burst=5, refill_seconds=10**9)}

    def take(stores: Stores, _number: int) -> bool:
        return stores.budgets.take(bucket, 1000.0)[0]

    assert race_in_two_processes(backend, tmp_path, take) == [False] * 3 + [True] * 5


# --- approval codes ------------------------------------------------------------------------


def test_approval_code_works_once_before_expiry_for_its_account(stores: Stores) -> None:
    codes = stores.approval_codes
    codes.add_approval_code("h1", ALICE, KEY_A, expires=2000.0)
    codes.add_approval_code("h2", ALICE, KEY_B, expires=2000.0)
    assert codes.redeem_approval_code("h1", BOB, 1000.0) is None  # another account's
    assert codes.redeem_approval_code("h1", ALICE, 1000.0) == KEY_A
    assert codes.redeem_approval_code("h1", ALICE, 1001.0) is None  # once only
    assert codes.redeem_approval_code("h2", ALICE, 2000.0) is None  # expired
    assert codes.redeem_approval_code("unknown", ALICE, 1000.0) is None


def test_approval_codes_used_or_expired_are_pruned(stores: Stores) -> None:
    codes = stores.approval_codes
    codes.add_approval_code("used", ALICE, KEY_A, expires=2000.0)
    codes.add_approval_code("expired", ALICE, KEY_A, expires=1000.0)
    codes.add_approval_code("valid", ALICE, KEY_B, expires=2000.0)
    assert codes.redeem_approval_code("used", ALICE, 900.0) == KEY_A
    assert codes.prune_approval_codes(1500.0) == 2
    assert codes.prune_approval_codes(1500.0) == 0
    assert codes.redeem_approval_code("valid", ALICE, 1500.0) == KEY_B


# --- the notices sent ----------------------------------------------------------------------


def test_notice_ledger_one_per_device_and_kind_and_a_cap_per_recipient(stores: Stores) -> None:
    ledger = stores.notices
    assert ledger.may_notify(ALICE, "f1", "pending", 1000.0, 3600.0, 3)
    assert not ledger.may_notify(ALICE, "f1", "pending", 1001.0, 3600.0, 3)  # the same
    assert ledger.may_notify(ALICE, "f1", "failure", 1002.0, 3600.0, 3)  # another kind
    assert ledger.may_notify(ALICE, "f2", "pending", 1003.0, 3600.0, 3)  # another device
    assert not ledger.may_notify(ALICE, "f3", "pending", 1004.0, 3600.0, 3)  # 3 this hour
    assert ledger.may_notify(BOB, "f3", "pending", 1004.0, 3600.0, 3)  # per recipient
    assert ledger.may_notify(ALICE, "f1", "pending", 4600.0, 3600.0, 3)  # an hour later
    assert ledger.prune_notices(4600.0 - 3600.0) == 0
    assert ledger.prune_notices(4600.0) == 4
    assert ledger.may_notify(ALICE, "f2", "pending", 4601.0, 3600.0, 2)


def test_notice_ledger_cap_is_atomic_across_processes(backend: Backend, tmp_path: Path) -> None:
    """Two processes' connections, many threads, a cap of 3: exactly 3 notices."""

    def notify(stores: Stores, number: int) -> bool:
        return stores.notices.may_notify(ALICE, f"f{number}", "pending", 1000.0, 3600.0, 3)

    assert race_in_two_processes(backend, tmp_path, notify) == [False] * 5 + [True] * 3


# --- shared devices ------------------------------------------------------------------------


def test_shared_device_counts_distinct_accounts_within_the_window(stores: Stores) -> None:
    shared = stores.shared_devices
    assert shared.saw(KEY_A, "u1@x", 1000.0, 60.0) == 1
    assert shared.saw(KEY_A, "u1@x", 1010.0, 60.0) == 1  # the same account again
    assert shared.saw(KEY_A, "u2@x", 1020.0, 60.0) == 2
    assert shared.saw(KEY_B, "u1@x", 1020.0, 60.0) == 1  # another device
    assert shared.saw(KEY_A, "u3@x", 1071.0, 60.0) == 2  # u1 (last at 1010) has expired
    assert shared.saw(KEY_A, "u2@x", 1200.0, 60.0) == 1


def test_shared_device_flag_once_and_unflag_by_prefix(stores: Stores) -> None:
    shared = stores.shared_devices
    for account in ("u1@x", "u2@x", "u3@x"):
        shared.saw(KEY_A, account, 1000.0, 60.0)
    assert not shared.is_flagged(KEY_A)
    assert shared.flag(KEY_A, 3, 1000.0)
    assert not shared.flag(KEY_A, 4, 1001.0)  # flagged already: one report
    assert shared.flag(KEY_B, 3, 1000.0)
    assert shared.is_flagged(KEY_A) and shared.is_flagged(KEY_B)
    assert shared.unflag(KEY_A[:8].upper()) == 1
    assert not shared.is_flagged(KEY_A) and shared.is_flagged(KEY_B)
    assert shared.saw(KEY_A, "u4@x", 1002.0, 60.0) == 1  # counting starts afresh
    assert shared.unflag(KEY_A[:16]) == 0


def test_l6_unflag_accepts_hex_only(
    stores: Stores, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``device unflag %`` (or ``_``) must not clear every flag, nor ``audit --device %``
    list every device: a fingerprint is 6 to 16 hex digits, in the store and the command."""
    shared = stores.shared_devices
    shared.flag(KEY_A, 3, 1000.0)
    shared.flag(KEY_B, 3, 1000.0)
    for bad in ("%", "______", "a1a1a1%", "a1a1", KEY_A[:17], "a1 a1a1"):
        with pytest.raises(BadFingerprint):
            shared.unflag(bad)
    assert shared.is_flagged(KEY_A) and shared.is_flagged(KEY_B)

    config = tmp_path / "c.toml"
    (tmp_path / "state").mkdir()
    config.write_text('[server]\ndata_dir = "state"\n')
    flagged = open_sqlite_stores(tmp_path / "state" / "devices.sqlite3")
    try:
        flagged.shared_devices.flag(KEY_A, 3, 1000.0)
        flagged.audit.add_audit([_entry(100.0)])
        for command in (["device", "unflag", "%"], ["audit", "--device", "%"]):
            assert admin.main(["--config", str(config), *command]) == 1
            captured = capsys.readouterr()
            assert captured.out == ""
            assert captured.err.count("\n") == 1 and "hex digits" in captured.err
        assert flagged.shared_devices.is_flagged(KEY_A)
        assert admin.main(["--config", str(config), "device", "unflag", KEY_A[:16]]) == 0
        assert not flagged.shared_devices.is_flagged(KEY_A)
    finally:
        flagged.close()
