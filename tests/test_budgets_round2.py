"""Abuse resistance, round 2: H2 (budgets an attacker cannot mint) and M2 (a stranger
cannot lock an account out).

The regressions (``test_h2_*``, ``test_m2_*``) run against a real server over real TLS,
from chosen loopback addresses (127.0.0.x is one /24, 127.0.y.x others); they count the
password hashes (the ``hashes`` fixture) and the checker's trips to a thread. The
pieces (the bound on waiting checks, the view of known devices and usual networks, the
memory of recent wrong passwords) have unit tests with injected clocks and no sockets.
"""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from typing import Any

import pytest
from twisted.cred import error as cred_error
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.python.failure import Failure

from clientid_mta.auth.budgets import PendingChecks, Throttle
from clientid_mta.auth.checker import ClientIdChecker, Defences
from clientid_mta.auth.credentials import ClientIdUsernamePassword, LoginThrottled
from clientid_mta.auth.known_clients import DAY, KnownClients
from clientid_mta.auth.passwd_file import Account, PasswdFile, hash_password
from clientid_mta.auth.repeats import RecentFailures
from clientid_mta.config import ClientIdConfig, ThrottleConfig
from clientid_mta.devices.policy import DevicePolicy
from clientid_mta.devices.sqlite_store import open_sqlite_stores
from clientid_mta.devices.store import PENDING, REVOKED
from clientid_mta.smtp.clientid import ClientIdentity
from tests.test_abuse_throttling import (
    ACCEPTED,
    ALICE,
    ALICE_PW,
    BOB,
    BOB_PW,
    REFUSED,
    THROTTLED,
    WRONG,
    Serve,
    attempt,
    auth,
    count_checks,
    key_of,
    new_token,
    serve,
    session,
)


def made_up() -> str:
    return f"{uuid.uuid4().hex[:12]}@example.org"


def flood_source(n: int) -> str:
    return f"127.0.0.{10 + n % 6}"  # 127.0.0.10-15, as in bench/auth_floods.py


# --- H2: a fresh CLIENTID per attempt escapes no budget -----------------------------------


def test_h2_fresh_clientid_and_made_up_accounts_spend_the_network_budget(
    make_server: Serve, hashes: list[str | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(make_server, "[throttle]\nnetwork_burst = 3\nnetwork_refill = 3600")
    trusted = new_token()
    assert attempt(server, trusted, ALICE, ALICE_PW, source="127.0.0.2") == ACCEPTED
    hashes.clear()
    checks = count_checks(monkeypatch, server)

    replies = [attempt(server, new_token(), made_up(), WRONG, flood_source(n)) for n in range(12)]

    assert replies == [REFUSED] * 3 + [THROTTLED] * 9
    # Only the network's burst was hashed; the rest were refused on the reactor,
    # without a thread.
    assert (len(hashes), len(checks)) == (3, 3)
    # The trusted device on the same /24 has a budget of its own.
    assert attempt(server, trusted, ALICE, ALICE_PW, source="127.0.0.2") == ACCEPTED


def test_h2_fresh_clientids_are_counted_in_one_audit_row_not_one_each(
    make_server: Serve,
) -> None:
    """Throttled attempts are counted per minute, network, device and reason (H1); a
    device nobody trusts is not part of that key, or a fresh CLIENTID per attempt would
    make every count a row of its own and grow the store without a password."""
    server = serve(make_server, "[throttle]\nnetwork_burst = 1\nnetwork_refill = 3600")
    replies = [attempt(server, new_token(), made_up(), WRONG, flood_source(0)) for _ in range(8)]
    assert replies == [REFUSED] + [THROTTLED] * 7
    audit = server.service.components.defences.audit
    assert audit is not None
    audit.flush()
    counted = [e for e in server.service.components.store.audit.audit() if e.count > 1]
    assert [(e.fingerprint, e.count) for e in counted] == [("", 7)] or (
        len(counted) == 2 and sum(e.count for e in counted) == 7  # the flood crossed a minute
    )


def test_h2_made_up_accounts_share_one_budget_per_network(
    make_server: Serve, hashes: list[str | None]
) -> None:
    """Even from a device the account trusts (its own budget is large), made-up names
    spend one budget per network, not a fresh one each."""
    server = serve(make_server, "[throttle]\ndevice_burst = 50\nnetwork_burst = 3")
    trusted = new_token()
    assert attempt(server, trusted, ALICE, ALICE_PW) == ACCEPTED
    hashes.clear()
    replies = [attempt(server, trusted, made_up(), WRONG) for _ in range(5)]
    assert replies == [REFUSED] * 3 + [THROTTLED] * 2
    assert len(hashes) == 3
    assert attempt(server, trusted, ALICE, ALICE_PW) == ACCEPTED


def test_h2_a_device_earns_its_own_budget_once_an_account_trusts_it(
    make_server: Serve,
) -> None:
    server = serve(make_server, "[throttle]\nnetwork_burst = 2\ndevice_burst = 5")
    device = new_token()
    assert attempt(server, device, ALICE, ALICE_PW) == ACCEPTED  # first device: trusted
    replies = [attempt(server, device, BOB, f"{WRONG}-{n}") for n in range(6)]
    assert replies == [REFUSED] * 5 + [THROTTLED]  # the device's burst, not the network's
    # ... while a stranger on the same network still has the network's budget of 2.
    strangers = [attempt(server, new_token(), BOB, f"{WRONG}-s{n}") for n in range(3)]
    assert strangers == [REFUSED, REFUSED, THROTTLED]


def test_the_admin_commands_trust_reaches_the_running_server(make_server: Serve) -> None:
    """``device add`` in another process: the server sees it at its next refresh."""
    server = serve(make_server, "[throttle]\nnetwork_burst = 1\ndevice_burst = 3")
    token = new_token()
    server.admin("device", "add", BOB, "UUID", stdin=token + "\n")
    known = server.service.components.defences.known
    assert known is not None
    known.refresh()  # what the housekeeping does every few seconds
    assert known.knows_device(key_of(server, token))
    replies = [attempt(server, token, BOB, f"{WRONG}-{n}") for n in range(4)]
    assert replies == [REFUSED] * 3 + [THROTTLED]


def fake_checker(tmp_path: Path, settings: ThrottleConfig) -> tuple[ClientIdChecker, list[Any]]:
    """A checker whose thread half never runs: each trip to a thread is a Deferred the
    test fires."""
    passwd = PasswdFile(tmp_path / "passwd")
    passwd.save([Account(ALICE, hash_password(ALICE_PW))])
    stores = open_sqlite_stores(tmp_path / "devices.sqlite3")
    policy = DevicePolicy(
        ClientIdConfig(key_file=tmp_path / "k", device_store=tmp_path / "d"),
        stores.devices,
        b"k" * 32,
        None,
    )
    known = KnownClients(stores.budgets, settings.usual_network_days)
    checker = ClientIdChecker(passwd, policy, Defences(throttle=Throttle(settings), known=known))
    trips: list[Any] = []

    def run_in_thread(function: Any, *args: Any) -> defer.Deferred[Any]:
        waiting: defer.Deferred[Any] = defer.Deferred()
        trips.append(waiting)
        return waiting

    checker.run_in_thread = run_in_thread
    return checker, trips


def stranger(host: str) -> ClientIdUsernamePassword:
    return ClientIdUsernamePassword(
        made_up(), WRONG, ClientIdentity("UUID", new_token()), IPv4Address("TCP", host, 40000)
    )


def test_h2_waiting_checks_per_network_are_bounded(tmp_path: Path) -> None:
    checker, trips = fake_checker(tmp_path, ThrottleConfig(network_checks=3))
    waiting = [checker.requestAvatarId(stranger(flood_source(n))) for n in range(3)]
    assert len(trips) == 2  # the strangers' two threads; the third waits its turn

    refused = checker.requestAvatarId(stranger("127.0.0.14"))
    assert len(trips) == 2  # no thread, so no hash: refused at once
    assert isinstance(refused.result, Failure)
    assert refused.result.check(LoginThrottled)
    refused.addErrback(lambda _: None)
    # Another network is not refused for this one's sake; it waits for the lane too.
    other = checker.requestAvatarId(stranger("127.0.9.1"))
    assert len(trips) == 2 and not other.called

    # A device an account trusts does not wait behind the strangers.
    token = new_token()
    assert checker.defences.known is not None
    key = checker.policy.key_of(ClientIdentity("UUID", token))
    assert key is not None  # an identity has a key
    checker.defences.known.trusted(key)
    own = ClientIdUsernamePassword(
        ALICE, ALICE_PW, ClientIdentity("UUID", token), IPv4Address("TCP", "127.0.0.2", 1)
    )
    checker.requestAvatarId(own).addErrback(lambda _: None)
    assert len(trips) == 3

    # One stranger's check done: the next waiting one gets its thread.
    trips[0].errback(cred_error.UnauthorizedLogin())
    assert len(trips) == 4
    for pending in (*waiting, other):
        pending.addErrback(lambda _: None)


def test_pending_checks_count_per_network() -> None:
    pending = PendingChecks(bound=2)
    assert pending.enter("a") and pending.enter("a") and not pending.enter("a")
    assert pending.enter("b")
    pending.leave("a")
    assert pending.enter("a")
    for network in ("a", "a", "b"):
        pending.leave(network)
    assert len(pending) == 0


def test_known_clients_follow_the_store(tmp_path: Path) -> None:
    stores = open_sqlite_stores(tmp_path / "devices.sqlite3")
    now = [1_000_000.0]
    known = KnownClients(stores.budgets, usual_days=30, clock=lambda: now[0])
    first, second, third = "a1" * 32, "b2" * 32, "c3" * 32  # device keys are hex
    stores.devices.register(ALICE, first, "UUID", "n", eligible=True)  # first: trusted
    stores.devices.register(ALICE, second, "UUID", "n", eligible=True)  # then: pending
    stores.devices.add_trusted(BOB, third, "UUID")
    assert not known.knows_device(first)  # nothing read yet
    known.refresh()
    assert [known.knows_device(d) for d in (first, second, third, None)] == [
        True,
        False,  # pending: a login with the right password makes one, so it earns nothing
        True,
        False,
    ]
    assert getattr(stores.devices.get(ALICE, second), "state", "") == PENDING
    stores.devices.set_state(BOB, third[:16], REVOKED)
    known.refresh()
    assert not known.knows_device(third)

    known.logged_in(ALICE, "192.0.2.0/24")
    assert known.is_usual(ALICE, "192.0.2.0/24")
    assert not known.is_usual(BOB, "192.0.2.0/24")
    other = KnownClients(stores.budgets, usual_days=30, clock=lambda: now[0])
    other.refresh()  # another process sees it through the store
    assert other.is_usual(ALICE, "192.0.2.0/24")
    now[0] += 31 * DAY
    other.refresh()
    assert not other.is_usual(ALICE, "192.0.2.0/24")
    stores.close()


def test_recent_failures_remember_a_keyed_hash_for_a_while() -> None:
    now = [0.0]
    recent = RecentFailures(window=60, size=2, clock=lambda: now[0])
    recent.failed(ALICE, "hash", "net", "guess")
    assert recent.repeated(ALICE, "hash", "net", "guess")
    assert not recent.repeated(ALICE, "new-hash", "net", "guess")  # password changed
    assert not recent.repeated(ALICE, "hash", "other-net", "guess")
    assert not recent.repeated(BOB, "hash", "net", "guess")
    assert all("guess" not in repr(k) for k in recent._seen)  # never the password
    now[0] = 61
    assert not recent.repeated(ALICE, "hash", "net", "guess")
    for n in range(3):
        recent.failed(ALICE, "hash", "net", f"g{n}")
    assert len(recent._seen) == 2


# --- M2: a stranger cannot lock out password-only logins ---------------------------------


def test_m2_a_usual_network_keeps_its_own_budget_for_the_account(
    make_server: Serve,
) -> None:
    server = serve(make_server, "[throttle]\naccount_unknown_burst = 3\nnetwork_burst = 50")
    assert attempt(server, None, BOB, BOB_PW, source="127.0.0.1") == ACCEPTED  # no CLIENTID

    # A stranger elsewhere, a fresh CLIENTID each time, spends bob's budget for strangers.
    strangers = [
        attempt(server, new_token(), BOB, f"{WRONG}-{n}", source="127.0.7.1") for n in range(6)
    ]
    assert strangers == [REFUSED] * 3 + [THROTTLED] * 3

    # Bob's mail program without CLIENTID, on his usual network, is not locked out...
    assert attempt(server, None, BOB, BOB_PW, source="127.0.0.1") == ACCEPTED
    # ... nor on another address of the same /24, while a new network is.
    assert attempt(server, None, BOB, BOB_PW, source="127.0.0.9") == ACCEPTED
    assert attempt(server, None, BOB, BOB_PW, source="127.0.8.1") == THROTTLED


def test_m2_the_same_wrong_password_repeated_counts_once(
    make_server: Serve, hashes: list[str | None]
) -> None:
    server = serve(make_server, "[throttle]\naccount_unknown_burst = 2\nnetwork_burst = 2")
    stale = "bobs-old-password"
    replies = [attempt(server, None, BOB, stale) for _ in range(6)]
    assert replies == [REFUSED] * 6
    assert len(hashes) == 1  # the repeats are known wrong: no hash, no budget
    assert attempt(server, None, BOB, BOB_PW) == ACCEPTED


def test_c12_a_repeated_right_password_is_answered_like_a_repeated_wrong_one(
    make_server: Serve, hashes: list[str | None]
) -> None:
    """The repeat memory must not tell a stolen password from a wrong one: a right
    password that the policy refused (a device not yet approved) is remembered exactly
    like a wrong one, so its repeat costs no hash and no budget either. Once the device is
    approved (by the admin command, another process), the same credentials are checked
    afresh at once and go through: no wait for a refresh of the in-memory views."""
    server = serve(make_server, "[throttle]\nnetwork_burst = 2\naccount_unknown_burst = 2")
    assert attempt(server, new_token(), ALICE, ALICE_PW) == ACCEPTED  # the first device
    stranger = new_token()
    hashes.clear()
    right = [attempt(server, stranger, ALICE, ALICE_PW) for _ in range(4)]
    right_hashes = len(hashes)
    hashes.clear()
    wrong = [attempt(server, stranger, ALICE, "not-it") for _ in range(4)]
    assert right == wrong == [REFUSED] * 4
    assert right_hashes == len(hashes) == 1  # one hash each; the repeats none
    pending = server.admin("device", "list", ALICE).splitlines()[-1].split()[0]
    server.admin("device", "approve", ALICE, pending)
    assert attempt(server, stranger, ALICE, ALICE_PW) == ACCEPTED


def login_exchange(wire: Any, user: str, password: str) -> tuple[int, str]:
    assert wire.cmd("AUTH LOGIN")[0] == 334
    assert wire.cmd(base64.b64encode(user.encode()).decode())[0] == 334
    code, lines = wire.cmd(base64.b64encode(password.encode()).decode())
    return code, lines[-1]


def test_m2_auth_login_after_auth_plain_with_the_same_credentials_counts_once(
    make_server: Serve, hashes: list[str | None]
) -> None:
    """Thunderbird tries AUTH LOGIN after AUTH PLAIN with the same password."""
    server = serve(
        make_server,
        "[auth]\nmax_failures_per_session = 2\n[throttle]\naccount_unknown_burst = 3",
    )
    wire = session(server, new_token())
    assert auth(wire, BOB, WRONG) == REFUSED
    assert login_exchange(wire, BOB, WRONG) == REFUSED
    assert wire.code("NOOP") == 250  # one failure so far, not two: the session goes on
    assert len(hashes) == 1

    # A second, other wrong password is the second failure: the session ends.
    assert auth(wire, BOB, f"{WRONG}-2") == REFUSED
    code, lines = wire.reply()
    assert (code, lines[0].split()[0]) == (421, "4.7.0")
    wire.close()
    # Two failures spent two of bob's budget of 3, not three.
    assert attempt(server, new_token(), BOB, BOB_PW) == ACCEPTED


def test_m2_the_protocol_counts_a_retry_of_failed_credentials_once() -> None:
    """StringTransport: PLAIN, then LOGIN, then PLAIN again with the same wrong password
    are one failure of the session's three; two other passwords end it."""
    from tests.test_protocol_units import AUTH_REFUSED, HOST, USER, Session, b64, plain

    session = Session()
    session.starttls()
    session.cmd("EHLO client.example")
    assert session.cmd(f"AUTH PLAIN {plain(password='stale')}") == [AUTH_REFUSED]
    assert session.cmd("AUTH LOGIN")[0].startswith("334 ")
    assert session.cmd(b64(USER))[0].startswith("334 ")
    assert session.cmd(b64("stale")) == [AUTH_REFUSED]
    assert session.cmd(f"AUTH PLAIN {plain(password='stale')}") == [AUTH_REFUSED]
    assert session.protocol.auth_failures == 1
    assert session.cmd(f"AUTH PLAIN {plain(password='other')}") == [AUTH_REFUSED]
    assert session.cmd(f"AUTH PLAIN {plain(password='third')}") == [
        AUTH_REFUSED,
        f"421 4.7.0 {HOST} Error: too many failed authentications",
    ]
