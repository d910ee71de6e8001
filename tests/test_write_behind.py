"""Issue 16: fewer writes on the path to a 235. A trusted device's login is recorded
after its 235 (devices/last_seen.py); the shared-device watch writes a repeat sighting
once a minute.

The decision still reads the device's state from the store at each login (a revocation
counts at once); the login count, last-seen time, network and region reach the store
at the next housekeeping flush (every second) and at stop; a crash loses at most that
window.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clientid_mta.config import ClientIdConfig, SharedDevicesConfig, TravelConfig
from clientid_mta.devices.last_seen import LoginRecorder, PendingLogin
from clientid_mta.devices.policy import (
    ALLOWED_KNOWN_DEVICE,
    REFUSED_REVOKED,
    REFUSED_TRAVEL,
    DevicePolicy,
    Where,
)
from clientid_mta.devices.sharing import RESIGHT_AFTER, SharedDevices
from clientid_mta.devices.sqlite_store import open_sqlite_stores
from clientid_mta.devices.store import REVOKED, Stores, StoreUnavailable
from clientid_mta.smtp.clientid import ClientIdentity, device_key
from tests.conftest import RunningServer
from tests.serverproc import devices
from tests.sink import wait_until
from tests.typed_reactor import blockingCallFromThread, reactor

ALICE = "alice@example.org"
KEY = b"k" * 32
PHONE = ClientIdentity("UUID", "1b4e28ba-2d11-4f5e-8d6f-0e7e2a2b5c01")
HOME = Where("192.0.2.0/24", "192.0")


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Stores]:
    opened = open_sqlite_stores(tmp_path / "devices.sqlite3")
    yield opened
    opened.close()


def policy_over(stores: Stores, tmp_path: Path, travel: TravelConfig | None = None) -> Any:
    settings = ClientIdConfig(key_file=tmp_path / "k", device_store=tmp_path / "d")
    recorder = LoginRecorder(stores.devices)
    policy = DevicePolicy(settings, stores.devices, KEY, None, travel, logins=recorder)
    return policy, recorder


def logins_in_store(stores: Stores) -> int:
    device = stores.devices.get(ALICE, device_key(KEY, PHONE))
    assert device is not None
    return device.logins


def test_a_trusted_devices_login_waits_for_the_flush(stores: Stores, tmp_path: Path) -> None:
    policy, recorder = policy_over(stores, tmp_path)
    first = policy.decide(ALICE, PHONE, HOME)
    assert first.allowed and first.device_trusted  # first device: written at once
    assert logins_in_store(stores) == 1 and len(recorder) == 0

    for _ in range(3):
        assert policy.decide(ALICE, PHONE, HOME).reason == ALLOWED_KNOWN_DEVICE
    assert logins_in_store(stores) == 1  # not on the path to the 235
    assert len(recorder) == 3

    assert recorder.flush() == 3
    assert logins_in_store(stores) == 4  # each login counted, none merged
    assert len(recorder) == 0


def test_a_revoked_device_is_refused_even_with_logins_pending(
    stores: Stores, tmp_path: Path
) -> None:
    policy, recorder = policy_over(stores, tmp_path)
    policy.decide(ALICE, PHONE, HOME)
    assert policy.decide(ALICE, PHONE, HOME).allowed
    fingerprint = device_key(KEY, PHONE)[:16]
    stores.devices.set_state(ALICE, fingerprint, REVOKED)  # the admin command, meanwhile
    refused = policy.decide(ALICE, PHONE, HOME)
    assert not refused.allowed and refused.reason == REFUSED_REVOKED
    recorder.flush()
    device = stores.devices.get(ALICE, device_key(KEY, PHONE))
    assert device is not None and device.state == REVOKED  # the flush changes no state


def test_the_travel_check_sees_this_process_pending_logins(stores: Stores, tmp_path: Path) -> None:
    policy, recorder = policy_over(stores, tmp_path, TravelConfig(window=3600, refuse=True))
    policy.decide(ALICE, PHONE, HOME)
    recorder.flush()  # the store knows nothing of a region until a known login
    assert policy.decide(ALICE, PHONE, HOME).allowed  # pending: region 192.0, now
    assert len(recorder) == 1
    far = policy.decide(ALICE, PHONE, Where("203.0.113.0/24", "203.0"))
    assert not far.allowed and far.reason == REFUSED_TRAVEL


class FlakyRegistry:
    """A registry whose ``record_logins`` fails while ``down``."""

    def __init__(self) -> None:
        self.down = True
        self.written: list[list[str]] = []  # one list a store transaction

    def record_logins(self, logins: list[PendingLogin]) -> None:
        if self.down:
            raise StoreUnavailable("the device store is busy")
        self.written.append([login.network for login in logins])


def test_a_failed_flush_keeps_the_logins_in_order() -> None:
    registry = FlakyRegistry()
    recorder = LoginRecorder(registry)  # type: ignore[arg-type]
    for network in ("a", "b"):
        recorder.record(PendingLogin(ALICE, "k1", network, "", 1.0))
    with pytest.raises(StoreUnavailable):
        recorder.flush()
    recorder.record(PendingLogin(ALICE, "k1", "c", "", 2.0))
    registry.down = False
    assert recorder.flush() == 3
    assert registry.written == [["a", "b", "c"]]  # one transaction, in order
    assert recorder.flush() == 0 and registry.written == [["a", "b", "c"]]  # none: no call


# --- in a running server ------------------------------------------------------------


def login(server: RunningServer, clientid: str) -> int:
    wire = server.wire().tls_session()
    try:
        assert wire.cmd(f"CLIENTID {clientid}")[0] == 250
        token = base64.b64encode(f"\0{ALICE}\0alice-password".encode()).decode()
        return wire.cmd(f"AUTH PLAIN {token}")[0]
    finally:
        wire.close()


def login_count(server: RunningServer) -> str:
    [(_type, _state, row)] = devices(server.admin("device", "list", ALICE)).values()
    return row.split()[3]


def test_logins_reach_the_store_by_housekeeping_and_at_stop(server: RunningServer) -> None:
    phone = "UUID 6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b"
    assert login(server, phone) == 235  # the first device: written before the 235
    assert login(server, phone) == 235
    # Housekeeping writes it within about a second; polled, bounded.
    wait_until(lambda: login_count(server) == "2" or None, 10, "the login in the store")

    recorder = server.service.components.checker.policy.logins
    assert recorder is not None
    # Stop the every-second flush, so only the one at stop can write the next login.
    blockingCallFromThread(reactor, server.service.housekeeping._loop.stop)
    assert login(server, phone) == 235
    assert len(recorder) == 1
    server.stop()  # the final housekeeping write flushes whatever is pending
    assert len(recorder) == 0
    assert login_count(server) == "3"


# --- the shared-device watch writes a repeat sighting once a minute --------------------


class CountingSightings:
    """An ``ISharedDeviceStore`` half: distinct accounts per device, and the writes."""

    def __init__(self) -> None:
        self.accounts: dict[str, set[str]] = {}
        self.writes = 0
        self.flagged: set[str] = set()

    def saw(self, device_key: str, account: str, now: float, window: float) -> int:
        self.writes += 1
        self.accounts.setdefault(device_key, set()).add(account)
        return len(self.accounts[device_key])

    def flag(self, device_key: str, accounts: int, now: float) -> bool:
        first = device_key not in self.flagged
        self.flagged.add(device_key)
        return first


def test_a_repeat_sighting_is_written_once_a_minute_and_flagging_is_unchanged() -> None:
    store, clock = CountingSightings(), Clock()
    sharing = SharedDevices(SharedDevicesConfig(max_accounts=2), store, clock)  # type: ignore[arg-type]
    assert sharing.saw("d1", "a@x") is None
    assert sharing.saw("d1", "a@x") is None
    assert store.writes == 1  # the same pair a moment later: nothing to change
    clock.now += RESIGHT_AFTER
    sharing.saw("d1", "a@x")
    assert store.writes == 2  # its time moves forward once a minute
    assert sharing.saw("d1", "b@x") is None
    assert sharing.saw("d1", "c@x") == 3  # the third account flags it, as before
    assert store.writes == 4


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
