"""Issue 3, points 2 and 3: failure budgets that spare the innocent, shared devices, session caps.

Everything runs against a real server over real TLS. The server runs in this process,
so the tests count the calls into the password hash (``clientid_mta.auth.checker.verify_password``)
and into the checker's thread half (``ClientIdChecker._check``) to prove that a throttled
attempt costs no hash, and a device-throttled one not even a thread.
"""

from __future__ import annotations

import base64
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from zope.interface import provider

from clientid_mta.auth.passwd_file import Account, PasswdFile, hash_password
from clientid_mta.smtp.clientid import ClientIdentity, device_key, fingerprint
from tests.conftest import RunningServer, Wire, start_server
from tests.sink import wait_until

ALICE, ALICE_PW = "alice@example.org", "alice-password"
BOB, BOB_PW = "bob@example.org", "bob-password"
WRONG = "not-the-password"
EHLO = "EHLO client.example.net"

Reply = tuple[int, str]
Serve = Callable[..., RunningServer]

ACCEPTED: Reply = (235, "2.7.0 Authentication successful")
REFUSED: Reply = (535, "5.7.8 Authentication credentials invalid")
THROTTLED: Reply = (454, "4.7.0 Too many failed logins, try again later")

# Concurrent checks may all pass the account budget before the first of them is charged
# (at most one per client worker / reactor thread-pool thread), and a bucket may refill
# by one while the flood runs.
RACE_SLACK = 10


# --- helpers ------------------------------------------------------------------------------


class From(Wire):
    """A ``Wire`` whose connection comes from a chosen loopback address (another /24, /16)."""

    def __init__(
        self, server: RunningServer, source: str = "127.0.0.1", implicit: bool = True
    ) -> None:
        self.server = server
        self.timeout = 10
        raw = socket.create_connection(
            ("127.0.0.1", server.tls_port if implicit else server.port),
            timeout=self.timeout,
            source_address=(source, 0),
        )
        self.sock = (
            server.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1") if implicit else raw
        )
        self._buffer = b""
        self.greeting = self.reply()


def new_token() -> str:
    return str(uuid.uuid4())


def key_of(server: RunningServer, token: str) -> str:
    """The device key the server derives from ``CLIENTID UUID <token>``."""
    return device_key(server.service.components.server_key, ClientIdentity("UUID", token))


def session(server: RunningServer, token: str | None = None, source: str = "127.0.0.1") -> Wire:
    """An implicit-TLS session after EHLO, with ``CLIENTID UUID <token>`` when given."""
    wire = From(server, source)
    assert wire.greeting[0] == 220
    assert wire.code(EHLO) == 250
    if token is not None:
        assert wire.cmd(f"CLIENTID UUID {token}") == (250, ["2.0.0 OK"])
    return wire


def auth(wire: Wire, user: str, password: str) -> Reply:
    response = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    code, lines = wire.cmd(f"AUTH PLAIN {response}")
    return code, lines[-1]


def attempt(
    server: RunningServer, token: str | None, user: str, password: str, source: str = "127.0.0.1"
) -> Reply:
    """One AUTH attempt in a session of its own (so no per-session failure limit applies)."""
    wire = session(server, token, source)
    try:
        return auth(wire, user, password)
    finally:
        wire.close()


def attempts(server: RunningServer, token: str | None, user: str, count: int) -> list[Reply]:
    """``count`` wrong passwords, each another one (the same one repeated counts once)."""
    return [attempt(server, token, user, f"{WRONG}-{new_token()}") for _ in range(count)]


def admitted(server: RunningServer, token: str, user: str, password: str) -> Wire:
    """A session that logged in with ``token``, once the server has uncounted the sessions
    of that device that were just closed (every device below its cap)."""
    cap = server.config.limits.max_sessions_per_device
    server.wait_for_sessions(
        lambda s: max(s.by_device.values(), default=0) < cap, "a closed session uncounted"
    )
    wire = session(server, token)
    assert auth(wire, user, password) == ACCEPTED
    return wire


def serve(make_server: Serve, extra_toml: str = "") -> RunningServer:
    server = make_server(extra_toml)
    server.add_user(ALICE, ALICE_PW)
    server.add_user(BOB, BOB_PW)
    return server


def count_checks(monkeypatch: pytest.MonkeyPatch, server: RunningServer) -> list[str]:
    """Accounts for which the checker went to a thread (the half after the reactor check)."""
    checker = server.service.components.checker
    real = checker._check
    calls: list[str] = []

    def counting(attempt: Any, password: str) -> Any:
        calls.append(attempt.address)
        return real(attempt, password)

    monkeypatch.setattr(checker, "_check", counting)
    return calls


def audit_rows(server: RunningServer, account: str, count: int) -> list[tuple[str, str, str]]:
    """(outcome, device fingerprint, reason) of each audited attempt on ``account``, once
    ``count`` of them are written (the server writes them in batches)."""
    audit = server.service.components.defences.audit
    assert audit is not None

    def written() -> list[str] | None:
        audit.flush()  # a housekeeping flush may be writing a batch at the same moment
        lines = server.admin("audit", "--account", account).splitlines()[1:]
        return lines if len(lines) >= count else None

    try:
        lines = wait_until(written, 5, f"{count} audit rows", interval=0.1)
    except TimeoutError:
        lines = server.admin("audit", "--account", account).splitlines()[1:]
    return [(cols[2], cols[4], cols[6]) for cols in (line.split() for line in lines)]


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


# --- point 2: budgets per device and per account ------------------------------------------


def test_innocent_neighbour_scenario(server: RunningServer, hashes: list[str | None]) -> None:
    trusted = new_token()
    assert attempt(server, trusted, ALICE, ALICE_PW) == ACCEPTED  # first device: trusted
    hashes.clear()

    tokens = [new_token() for _ in range(500)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(
            pool.map(lambda token: attempt(server, token, ALICE, f"{WRONG}-{token}"), tokens)
        )

    assert set(replies) <= {REFUSED, THROTTLED}
    codes = Counter(code for code, _ in replies)
    burst = server.config.throttle.account_unknown_burst
    # At most the burst is hashed; fewer when the network's bound on waiting checks
    # refuses some at once (454, no hash).
    assert 1 <= codes[535] <= burst + RACE_SLACK
    assert codes[454] >= 500 - burst - RACE_SLACK
    alice_hash = server.service.components.passwords.get(ALICE)
    assert alice_hash is not None
    assert hashes == [alice_hash.password_hash] * codes[535]  # throttled ones hashed nothing

    # The neighbours' sins spent neither alice's trusted device's budget nor bob's (they
    # spent their network's: bob's new device comes from another one).
    assert attempt(server, trusted, ALICE, ALICE_PW) == ACCEPTED
    assert attempt(server, new_token(), BOB, BOB_PW, source="127.0.1.1") == ACCEPTED


def test_throttled_attempts_compute_no_hash(
    make_server: Serve, hashes: list[str | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(make_server, "[throttle]\nnetwork_burst = 2\naccount_unknown_burst = 2")
    checks = count_checks(monkeypatch, server)
    device, other = new_token(), new_token()
    assert attempts(server, device, ALICE, 2) == [REFUSED, REFUSED]
    assert (len(hashes), len(checks)) == (2, 2)

    # The (unknown) device's network budget is spent: refused on the reactor, no thread
    # and no hash, even with the right password.
    assert attempt(server, device, ALICE, WRONG) == THROTTLED
    assert attempt(server, device, ALICE, ALICE_PW) == THROTTLED
    assert (len(hashes), len(checks)) == (2, 2)

    # Those two failures also spent alice's unknown-device budget: a device from another
    # network, with a full budget there, goes to the thread but is refused before any hash.
    assert attempt(server, other, ALICE, WRONG, source="127.0.1.1") == THROTTLED
    assert (len(hashes), len(checks)) == (2, 3)

    fp = fingerprint(key_of(server, device))
    assert audit_rows(server, ALICE, 2) == [
        ("refused", fp, "bad_password"),
        ("refused", fp, "bad_password"),
    ]
    # Throttled attempts are kept as counts per minute, network, device and reason, with
    # no account (H1, tests/test_audit_round2.py).
    throttled: Counter[tuple[str, str]] = Counter()
    for entry in server.service.components.store.audit.audit():
        if entry.outcome == "throttled":
            throttled[entry.fingerprint, entry.reason] += entry.count
    # Neither device is trusted by any account: a count keeps no fingerprint of it (a
    # fresh CLIENTID per attempt would otherwise make every count a row of its own).
    assert throttled == {("", "network_throttled"): 2, ("", "account_throttled"): 1}


def test_device_budget_refills_over_time(make_server: Serve, hashes: list[str | None]) -> None:
    refill = 2
    # An unknown device: its network's budget.
    server = serve(make_server, f"[throttle]\nnetwork_burst = 2\nnetwork_refill = {refill}")
    throttle = server.service.components.defences.throttle
    assert throttle is not None
    now = time.time()
    throttle._clock = lambda: now  # the budgets' clock, moved by the test
    device = new_token()
    assert attempts(server, device, ALICE, 3) == [REFUSED, REFUSED, THROTTLED]
    assert len(hashes) == 2
    now += refill * 0.8
    assert attempts(server, device, ALICE, 1) == [THROTTLED]  # not yet
    now += refill * 0.2 + 0.01
    # One attempt came back (and was hashed); the burst did not.
    assert attempts(server, device, ALICE, 2) == [REFUSED, THROTTLED]
    assert len(hashes) == 3


def test_successful_logins_never_spend_the_budget(
    make_server: Serve, hashes: list[str | None]
) -> None:
    # Without the auth cache, so that every success is a full hash check too.
    server = serve(make_server, "[throttle]\ndevice_burst = 3\n[auth]\ncache_ttl = 0")
    device = new_token()
    for _ in range(4):
        assert attempt(server, device, ALICE, ALICE_PW) == ACCEPTED
    assert attempts(server, device, ALICE, 4) == [REFUSED, REFUSED, REFUSED, THROTTLED]
    assert len(hashes) == 4 + 3


def test_unknown_device_failures_never_lock_out_trusted_device(make_server: Serve) -> None:
    server = serve(make_server, "[throttle]\naccount_unknown_burst = 3")
    trusted = new_token()
    assert attempt(server, trusted, ALICE, ALICE_PW) == ACCEPTED
    # Strangers elsewhere (alice's own network has a budget of its own for her, M2).
    replies = [
        attempt(server, new_token(), ALICE, f"{WRONG}-{n}", source="127.0.1.1") for n in range(4)
    ]
    assert replies == [REFUSED, REFUSED, REFUSED, THROTTLED]
    assert attempt(server, trusted, ALICE, ALICE_PW) == ACCEPTED


def test_trusted_device_failures_spend_the_known_budget(
    make_server: Serve, hashes: list[str | None]
) -> None:
    server = serve(make_server, "[throttle]\naccount_known_burst = 2\ndevice_burst = 10")
    trusted = new_token()
    assert attempt(server, trusted, ALICE, ALICE_PW) == ACCEPTED
    assert attempts(server, trusted, ALICE, 2) == [REFUSED, REFUSED]
    # The device itself has 8 failures left: it is the account's known budget that is spent.
    assert attempt(server, trusted, ALICE, ALICE_PW) == THROTTLED
    assert len(hashes) == 3
    # The unknown-device budget is a separate one.
    assert attempt(server, new_token(), ALICE, WRONG) == REFUSED
    assert len(hashes) == 4


def test_without_clientid_the_budget_key_is_the_network_prefix(
    make_server: Serve, hashes: list[str | None]
) -> None:
    server = serve(make_server, "[throttle]\nnetwork_burst = 2")
    assert attempts(server, None, ALICE, 3) == [REFUSED, REFUSED, THROTTLED]
    # Same /24: the same "net:" budget, also for another account.
    assert attempt(server, None, BOB, WRONG, source="127.0.0.2") == THROTTLED
    assert len(hashes) == 2
    # Another /24 has a budget of its own; a fresh client identity does not (H2).
    assert attempt(server, None, ALICE, WRONG, source="127.0.1.1") == REFUSED
    assert attempt(server, new_token(), ALICE, WRONG) == THROTTLED
    assert len(hashes) == 3


def test_throttle_action_421_replies_and_closes(
    make_server: Serve, hashes: list[str | None]
) -> None:
    server = serve(make_server, '[throttle]\naction = "421"\nnetwork_burst = 1')
    device = new_token()
    assert attempt(server, device, ALICE, WRONG) == REFUSED
    wire = session(server, device)
    code, text = auth(wire, ALICE, ALICE_PW)
    assert (code, text.split()[0]) == (421, "4.7.0")
    assert wire.is_closed()
    wire.close()
    assert len(hashes) == 1


def test_throttle_state_survives_a_restart(make_server: Serve, hashes: list[str | None]) -> None:
    settings = "[throttle]\nnetwork_burst = 2\nnetwork_refill = 3600"
    server = serve(make_server, settings)
    device = new_token()
    assert attempts(server, device, ALICE, 3) == [REFUSED, REFUSED, THROTTLED]
    server.stop()  # saves the throttle state

    restarted = start_server(server.root, settings)
    try:
        assert attempt(restarted, device, ALICE, ALICE_PW) == THROTTLED
        assert len(hashes) == 2
        # Other networks are not.
        assert attempt(restarted, new_token(), ALICE, WRONG, source="127.0.1.1") == REFUSED
    finally:
        restarted.stop()


# --- point 3: one device, many accounts -------------------------------------------------


SHARED_SETTINGS = """
[throttle]
device_burst = 100
network_burst = 100
[shared_devices]
block = true
[alerts]
postmaster = "alice@example.org"
"""
USER_PW = "user-password"


def add_users(server: RunningServer, count: int) -> list[str]:
    """``count`` more accounts sharing one password hash (hashed once, to save time)."""
    passwd = PasswdFile(server.config.auth.passwd_file)
    users = [f"user{i:02d}@example.org" for i in range(count)]
    shared_hash = hash_password(USER_PW)
    passwd.save(passwd.accounts() + [Account(user, shared_hash) for user in users])
    return users


def try_accounts(server: RunningServer, token: str, users: list[str]) -> list[Reply]:
    """Wrong passwords for each of ``users`` from one device, three attempts per session."""
    replies: list[Reply] = []
    for start in range(0, len(users), 3):
        wire = session(server, token)
        replies += [auth(wire, user, WRONG) for user in users[start : start + 3]]
        wire.close()
    return replies


def test_one_device_many_accounts_is_flagged_reported_and_refused(
    make_server: Serve, log_events: list[dict[str, Any]]
) -> None:
    server = serve(make_server, SHARED_SETTINGS)
    users = add_users(server, 20)
    shared = new_token()
    assert try_accounts(server, shared, users) == [REFUSED] * 20

    key = key_of(server, shared)
    fp = fingerprint(key)
    assert server.service.components.store.shared_devices.is_flagged(key)
    max_accounts = server.config.shared_devices.max_accounts
    warnings = [
        event
        for event in log_events
        if event.get("log_level") == LogLevel.warn and "flagged as shared" in formatEvent(event)
    ]
    assert [(w["fingerprint"], w["accounts"]) for w in warnings] == [(fp, max_accounts + 1)]
    notices = [
        m for m in server.messages(ALICE) if m["Subject"] == "A device is trying many accounts"
    ]
    assert len(notices) == 1
    assert fp in notices[0].get_payload()
    assert f"clientid-mta device unflag {fp}" in notices[0].get_payload()

    # C12: blocked on an account whose password is right, with the plain wrong-password reply;
    # another device is fine on the same account.
    assert attempt(server, shared, users[0], USER_PW) == REFUSED
    assert attempt(server, new_token(), users[0], USER_PW) == ACCEPTED


def test_device_unflag_clears_the_shared_device_block(make_server: Serve) -> None:
    server = serve(make_server, SHARED_SETTINGS + "[shared_devices]\nmax_accounts = 2")
    users = add_users(server, 3)
    shared = new_token()
    assert try_accounts(server, shared, users) == [REFUSED] * 3
    key = key_of(server, shared)
    assert server.service.components.store.shared_devices.is_flagged(key)
    assert attempt(server, shared, users[0], USER_PW) == REFUSED

    fp = fingerprint(key)
    assert server.admin("device", "unflag", fp) == f"cleared the shared-device flag of {fp}\n"
    assert not server.service.components.store.shared_devices.is_flagged(key)
    assert attempt(server, shared, users[0], USER_PW) == ACCEPTED


# --- session caps -------------------------------------------------------------------------


def test_sessions_per_address_are_capped_with_421(make_server: Serve) -> None:
    server = make_server("[limits]\nmax_sessions_per_address = 3")
    open_sessions = [From(server, implicit=False) for _ in range(3)]
    try:
        assert [wire.greeting[0] for wire in open_sessions] == [220, 220, 220]
        for implicit in (False, True):  # both listeners count against one cap
            refused = From(server, implicit=implicit)
            assert (refused.greeting[0], refused.greeting[1][0].split()[0]) == (421, "4.7.0")
            assert refused.is_closed()
            refused.close()
        other_address = From(server, source="127.0.0.2", implicit=False)
        assert other_address.greeting[0] == 220  # the cap is per address
        other_address.close()

        open_sessions.pop().close()
        server.wait_for_sessions(
            lambda s: s.by_address["127.0.0.1"] < 3, "the closed session uncounted"
        )
        fresh = From(server, implicit=False)
        open_sessions.append(fresh)
        assert fresh.greeting[0] == 220
    finally:
        for wire in open_sessions:
            wire.close()


def test_sessions_per_device_are_capped_with_421_at_auth(make_server: Serve) -> None:
    server = serve(make_server, "[limits]\nmax_sessions_per_device = 2")
    device = new_token()
    first, second = session(server, device), session(server, device)
    assert auth(first, ALICE, ALICE_PW) == ACCEPTED
    assert auth(second, ALICE, ALICE_PW) == ACCEPTED

    third = session(server, device)  # C12: CLIENTID itself is never refused
    code, text = auth(third, ALICE, ALICE_PW)
    assert (code, text) == (421, "4.7.0 mail.example.org Error: too many sessions for this device")
    assert third.is_closed()
    third.close()
    assert attempt(server, new_token(), BOB, BOB_PW) == ACCEPTED  # other devices are fine

    assert first.code(EHLO) == 250  # a new EHLO forgets the identity: one session fewer
    fourth = admitted(server, device, ALICE, ALICE_PW)
    fifth = session(server, device)
    assert auth(fifth, ALICE, ALICE_PW)[0] == 421  # second and fourth count
    for wire in (fifth, second):
        wire.close()
    sixth = admitted(server, device, ALICE, ALICE_PW)  # closing one made room
    for wire in (first, fourth, sixth):
        wire.close()
