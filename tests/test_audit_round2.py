"""Abuse resistance, round 2: H1 (the audit log fills the disk, no password needed), L1
(notice caps per process) and the notices that must tell the holder what happened.

The principle: nothing an unauthenticated client does may grow the disk without bound.
Unit tests run the audit log, the notifier and the failure counter on a real SQLite
store with injected clocks; the end-to-end ones go over real TLS sockets.
"""

from __future__ import annotations

import mailbox
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clientid_mta.delivery.maildir import MaildirRoot
from clientid_mta.devices import notices as alerts
from clientid_mta.devices.audit import MAX_PENDING, AuditLog, unknown_account
from clientid_mta.devices.sqlite_store import (
    JOURNAL_SIZE_LIMIT,
    WAL_AUTOCHECKPOINT_PAGES,
    open_sqlite_stores,
)
from clientid_mta.devices.store import AuditEntry, Stores
from tests import test_alerts_audit_approval as round1
from tests import test_conformance_clientid as conformance
from tests.conftest import RunningServer, Wire

# The fixtures of the round-1 tests: alice and bob without hashing again, sessions from
# any loopback address.
passwd_with_users = conformance.passwd_with_users
serve = conformance.serve
connect = round1.connect
log_lines = conformance.log_lines

ALICE, ALICE_PW = round1.ALICE, round1.ALICE_PW
DEVICE_A, DEVICE_B = round1.DEVICE_A, round1.DEVICE_B
HOME_NETWORK = round1.HOME_NETWORK
LONG_USER = "u" * 988 + "@example.org"  # 1,000 characters, as in bench/auth_floods.py
NETWORK = "192.0.2.0/24"
KEY = b"k" * 32

Serve = Callable[..., RunningServer]
Connect = Callable[..., Wire]


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Stores]:
    opened = open_sqlite_stores(tmp_path / "devices.sqlite3")
    yield opened
    opened.close()


def maildir_of(maildirs: MaildirRoot, address: str) -> mailbox.Maildir:
    localpart, _, domain = address.partition("@")
    return mailbox.Maildir(maildirs.maildir(domain, localpart), create=False)


def used_bytes(path: Path) -> int:
    """Bytes of the store that hold data (not its free pages), whatever is in the -wal."""
    db = sqlite3.connect(path)
    try:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
    finally:
        db.close()
    return int((pages - free) * size)


# --- H1: the audit log may not grow without bound ------------------------------------------


def flood(
    server: RunningServer, connect: Connect, sessions: int, same_password: bool = False
) -> list[int]:
    """``sessions`` sessions without CLIENTID, 3 AUTH PLAIN each with a 1,000-character
    user name and a wrong password, a new one each time unless ``same_password`` (the
    H1 flood); every AUTH reply code."""
    codes = []
    for n in range(sessions):
        wire = connect(server)
        for k in range(3):
            password = "not-the-password" if same_password else f"guess-{n}-{k}"
            code, _lines = wire.cmd(conformance.plain(LONG_USER, password))
            codes.append(code)
            if code == 421:
                break
        wire.close()
    return codes


def flood_and_growth(
    server: RunningServer, connect: Connect, same_password: bool
) -> tuple[list[int], int]:
    """The H1 flood of 60 sessions, its reply codes and how much the store grew."""
    store = server.config.clientid.device_store
    audit = server.service.components.defences.audit
    assert audit is not None
    audit.flush()
    before = used_bytes(store)
    codes = flood(server, connect, 60, same_password)
    audit.flush()
    return codes, used_bytes(store) - before


def test_h1_auth_flood_without_password_barely_grows_the_store(
    serve: Serve, connect: Connect
) -> None:
    server = serve()
    codes, grown = flood_and_growth(server, connect, same_password=False)
    # Throttled: 454, or 421 when it also ends the session (max_failures_per_session).
    throttled = codes.count(454) + codes.count(421)
    assert throttled > 100, codes  # the budget of the network is spent early on
    # 180 attempts kept one by one with their user name took about 1 MB (2 indexes on
    # 1,000 characters); counted per minute, and unknown names hashed, a few pages.
    assert grown < 64 * 1024, grown
    rows = round1.audit_rows(server)
    counts = [row for row in rows if row[1] == "*"]
    assert sum(int(row[0].split(" x ")[1]) for row in counts) == throttled
    assert {row[4] for row in counts} <= {
        "network_throttled",
        "account_throttled",
        "network_busy",
    }
    assert len(counts) <= 4  # one per minute and reason (the flood may cross a minute)
    name = unknown_account(LONG_USER, server.service.components.server_key)
    refused = [row for row in rows if row[0] == "refused"]
    assert refused and {row[1] for row in refused} == {name}
    assert all(len(row[1]) < 40 for row in rows)
    assert "uuuuuuuu" not in server.admin("audit")


def test_h1_the_same_wrong_password_again_and_again_is_counted_not_kept(
    serve: Serve, connect: Connect
) -> None:
    """A repeated wrong password costs no hash and no budget (M2), so a stranger can send
    it as fast as he likes: it must not grow the audit one row at a time either."""
    server = serve()
    codes, grown = flood_and_growth(server, connect, same_password=True)
    assert codes.count(535) > 100, codes
    assert grown < 64 * 1024, grown
    rows = round1.audit_rows(server)
    repeated = [row for row in rows if row[4] == "bad_password_repeated"]
    assert repeated and all(row[0].startswith("535 x ") and row[1] == "*" for row in repeated)
    assert sum(int(row[0].split(" x ")[1]) for row in repeated) == codes.count(535) - 1


def test_h1_throttled_attempts_are_one_count_per_minute_network_device_and_reason(
    stores: Stores,
) -> None:
    clock = Clock(1_800_000_000.0)  # a whole minute
    audit = AuditLog(stores.audit, 90, name_key=KEY, clock=clock)
    for second in range(120):  # two minutes of a flood, 10 attempts a second
        clock.now = 1_800_000_000.0 + second
        for _ in range(10):
            audit.record(LONG_USER, "", NETWORK, "throttled", "device_throttled", known=False)
        audit.record(LONG_USER, "", "198.51.100.0/24", "throttled", "device_throttled", known=False)
        if second % 7 == 0:
            audit.flush()  # counts of one minute arrive in several flushes
    audit.flush()
    listed = stores.audit.audit()
    assert sorted((e.time, e.network, e.count) for e in listed) == [
        (1_800_000_000.0, NETWORK, 600),
        (1_800_000_000.0, "198.51.100.0/24", 60),
        (1_800_000_060.0, NETWORK, 600),
        (1_800_000_060.0, "198.51.100.0/24", 60),
    ]
    assert all(e.account == "" and e.outcome == "throttled" for e in listed)


def test_h1_unknown_account_is_kept_as_a_short_keyed_hash(stores: Stores) -> None:
    clock = Clock()
    audit = AuditLog(stores.audit, 90, name_key=KEY, clock=clock)
    audit.record(LONG_USER, "", NETWORK, "refused", "unknown_account", known=False)
    clock.now += 1
    audit.record("nobody@example.org", "", NETWORK, "refused", "unknown_account", known=False)
    clock.now += 1
    audit.record("alice@example.org", "", NETWORK, "refused", "bad_password", known=True)
    audit.flush()
    accounts = [e.account for e in stores.audit.audit()]
    assert accounts == [
        unknown_account(LONG_USER, KEY),
        unknown_account("nobody@example.org", KEY),
        "alice@example.org",
    ]
    assert accounts[0].startswith("unknown:") and len(accounts[0]) == len("unknown:") + 8
    assert accounts[0] != accounts[1]
    assert unknown_account(LONG_USER, b"another key") != accounts[0]  # keyed


def test_h1_audit_keeps_at_most_max_entries_and_reports_drops_once_an_hour(
    stores: Stores,
) -> None:
    clock = Clock()
    audit = AuditLog(stores.audit, 90, max_entries=5, name_key=KEY, clock=clock)

    def attempts(count: int) -> None:
        for number in range(count):
            clock.now += 1
            audit.record(f"u{number}@example.org", "", NETWORK, "refused", "x", known=True)

    attempts(12)
    assert audit.flush() == 7  # the first drop is reported at once
    kept = stores.audit.audit()
    assert [e.account for e in kept] == [f"u{n}@example.org" for n in range(7, 12)]
    attempts(3)
    assert audit.flush() == 0  # dropped, but reported at most once an hour
    assert len(stores.audit.audit()) == 5
    clock.now += 3600
    attempts(1)
    assert audit.flush() == 4  # the 3 and the 1 since the last report
    assert len(stores.audit.audit()) == 5


def test_h1_pending_entries_are_bounded_while_the_store_cannot_be_written(
    stores: Stores,
) -> None:
    audit = AuditLog(stores.audit, 90, name_key=KEY, clock=Clock())
    stores.audit.close()  # every write fails from now on
    for number in range(MAX_PENDING + 10):
        audit.record(f"u{number}@x", "", NETWORK, "refused", "x", known=True)
    with pytest.raises(sqlite3.Error):
        audit.flush()
    assert len(audit._pending) == MAX_PENDING


def old_style_store(path: Path, rows: int) -> None:
    """A device store as the first releases made it: WAL, no auto_vacuum, full audit rows."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(
        "CREATE TABLE audit (time REAL NOT NULL, account TEXT NOT NULL, fingerprint TEXT NOT"
        " NULL, network TEXT NOT NULL, outcome TEXT NOT NULL, reason TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX audit_by_account ON audit (account, time)")
    db.executemany(
        "INSERT INTO audit VALUES (?, ?, '', ?, 'throttled', 'device_throttled')",
        [(float(n), LONG_USER, NETWORK) for n in range(rows)],
    )
    db.close()


def test_h1_an_existing_store_switches_to_incremental_vacuum_and_shrinks(tmp_path: Path) -> None:
    path = tmp_path / "devices.sqlite3"
    old_style_store(path, 2000)
    stores = open_sqlite_stores(path)
    try:
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
        db.close()
        grown = path.stat().st_size
        assert grown > 4_000_000
        assert stores.audit.prune_audit(1900.0) == 1900
        stores.audit.compact()
        stores.audit.compact()
        assert path.stat().st_size < grown / 4
        assert len(stores.audit.audit()) == 100
    finally:
        stores.close()


def test_h1_the_write_ahead_log_stays_small(stores: Stores, tmp_path: Path) -> None:
    wal = tmp_path / "devices.sqlite3-wal"
    entry = AuditEntry(1.0, "alice@example.org", "", NETWORK, "refused", "bad_password")
    largest = 0
    for _ in range(300):  # about 12 MB through the log, in 300 transactions
        stores.audit.add_audit([entry] * 400)
        largest = max(largest, wal.stat().st_size)
    # SQLite's default: a checkpoint at 4 MiB of log, and the file never cut back.
    assert largest < WAL_AUTOCHECKPOINT_PAGES * 4096 + 256 * 1024, largest
    stores.audit.trim_audit(10)
    stores.audit.compact()
    stores.audit.add_audit([entry])  # the log starts afresh after a full checkpoint
    assert wal.stat().st_size <= JOURNAL_SIZE_LIMIT + 64 * 1024


def test_h1_audit_bound_from_config_drops_the_earliest_with_one_log_line(
    serve: Serve, connect: Connect, log_lines: list[str]
) -> None:
    server = serve("[audit]\nmax_entries = 2\n")
    for number in range(5):
        identity = f"LICENSE device-{number}"
        # A new wrong password each time: a repeated one is only counted (M2, H1).
        assert round1.login(server, connect, identity, f"wrong-password-{number}")[0] == 535
    latest = [round1.fingerprint(server, f"LICENSE device-{number}") for number in (3, 4)]

    def kept() -> list[str]:
        return [row[2] for row in round1.audit_rows(server)]

    assert round1.eventually(lambda: kept()[-1:] == latest[-1:])  # the last one is written
    assert kept() == latest

    def reported() -> list[str]:
        return [line for line in log_lines if "[audit] max_entries" in line]

    assert round1.eventually(reported)
    [line] = reported()  # the later drops wait for the next hourly line
    assert "at its bound of 2 entries" in line


# --- L1: the notice caps hold for all worker processes together -----------------------------


def notice(fingerprint: str, kind: str = alerts.NEW_DEVICE_PENDING) -> alerts.Notice:
    extra = {"code": "ABCDE-FGHJK", "expires": "tomorrow", "approval_address": "a@example.org"}
    return alerts.Notice(kind, ALICE, fingerprint, "UUID", NETWORK, extra)


def test_l1_notice_cap_holds_across_worker_processes(tmp_path: Path) -> None:
    path = tmp_path / "devices.sqlite3"
    workers = [open_sqlite_stores(path), open_sqlite_stores(path)]  # two processes' opens
    try:
        maildirs = MaildirRoot(tmp_path / "mail")
        notifiers = [
            alerts.Notifier(
                maildirs, "mail.example.org", max_per_account_per_hour=3, ledger=s.notices
            )
            for s in workers
        ]
        sent = [notifiers[n % 2].notify(notice(f"{n:016x}")) for n in range(20)]
        assert sent == [True] * 3 + [False] * 17
        assert len(maildir_of(maildirs, ALICE)) == 3
        assert notifiers[0].notify(notice("ff" * 8, alerts.LOGIN_FAILED)) is False  # any kind
    finally:
        for opened in workers:
            opened.close()


def test_l1_one_notice_per_device_and_kind_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "devices.sqlite3"
    workers = [open_sqlite_stores(path), open_sqlite_stores(path)]
    try:
        maildirs = MaildirRoot(tmp_path / "mail")
        first, second = (alerts.Notifier(maildirs, "h", ledger=s.notices) for s in workers)
        assert first.notify(notice("aa" * 8)) is True
        assert second.notify(notice("aa" * 8)) is False  # the same device and kind
        assert second.notify(notice("aa" * 8, alerts.LOGIN_FAILED)) is True  # another kind
    finally:
        for opened in workers:
            opened.close()


def test_l1_housekeeping_prunes_notices_sent_and_used_or_expired_codes(serve: Serve) -> None:
    server = serve()
    store = server.service.components.store
    now = time.time()
    assert store.notices.may_notify(ALICE, "aa" * 8, "pending", now - 7200, 3600, 10)
    assert store.notices.may_notify(ALICE, "bb" * 8, "pending", now, 3600, 10)
    store.approval_codes.add_approval_code("expired", ALICE, "a1" * 32, now - 1)
    store.approval_codes.add_approval_code("used", ALICE, "a1" * 32, now + 3600)
    store.approval_codes.add_approval_code("valid", ALICE, "b2" * 32, now + 3600)
    assert store.approval_codes.redeem_approval_code("used", ALICE, now) == "a1" * 32
    server.service.housekeeping.prune_and_compact()
    db = sqlite3.connect(server.config.clientid.device_store)
    try:
        sent = db.execute("SELECT fingerprint FROM notices_sent").fetchall()
        codes = db.execute("SELECT code_hash FROM approval_codes").fetchall()
    finally:
        db.close()
    assert sent == [("bb" * 8,)]
    assert codes == [("valid",)]


# --- Notices: tell the holder what happened ------------------------------------------------


def test_notices_repeated_failures_tell_unapproved_devices_from_wrong_passwords(
    serve: Serve, connect: Connect
) -> None:
    server = serve("[alerts]\nunknown_failures = 2")
    assert round1.login(server, connect, DEVICE_A)[0] == 235  # trusted: the first device
    assert round1.login(server, connect, DEVICE_B)[0] == 535  # right password, pending
    # Another device: the same credentials again are a repeat, counted once (M2).
    assert round1.login(server, connect, "LICENSE device-c")[0] == 535
    [body] = round1.notices(server, ALICE, round1.REPEATED_SUBJECT)
    assert "wrong password" not in body
    assert "twice with your right password, but from a device\n    you have not approved" in body
    assert "If it was not you, someone knows your password: change it." in body
    assert round1.login(server, connect, "LICENSE thief", "wrong-password")[0] == 535
    assert round1.login(server, connect, DEVICE_B)[0] == 535
    assert len(round1.notices(server, ALICE, round1.REPEATED_SUBJECT)) == 1  # once an hour


def test_notices_failure_counter_tallies_both_kinds() -> None:
    clock = Clock(0.0)
    counter = alerts.FailureCounter(3, clock=clock)
    assert counter.failed(ALICE, False) is None
    assert counter.failed(ALICE, True) is None
    tally = counter.failed(ALICE, False)
    assert tally == alerts.FailureTally(wrong_password=2, unapproved_device=1)
    text = alerts._EXPLANATIONS[alerts.REPEATED_FAILURES].format(**tally.fields())
    assert "tried to log in\n3 times within the hour" in text
    assert "  - twice with a wrong password;\n  - once with your right password" in text
    assert "If your password is weak or used elsewhere too, change it." in text
    clock.now = 4000.0  # the window has passed: counting starts afresh
    assert counter.failed(ALICE, True) is None
    assert counter.failed(ALICE, True) is None
    wrong_only = alerts.FailureTally(3, 0).fields()
    assert "right password" not in alerts._EXPLANATIONS[alerts.REPEATED_FAILURES].format(
        **wrong_only
    )


def test_notices_approved_device_notice_has_type_network_and_first_seen(
    serve: Serve, connect: Connect
) -> None:
    server = serve()
    code = round1.pending_code(server, connect)
    wire = round1.logged_in(server, connect, DEVICE_A)
    assert round1.send_approval(wire, code, "That was me.")[0] == 250
    [body] = round1.notices(server, ALICE, round1.APPROVED_SUBJECT)
    fp = round1.fingerprint(server, DEVICE_B)
    assert f"Device:      {fp} (type UUID)\n" in body
    assert f"Network:     {HOME_NETWORK}\n" in body
    assert "First seen:  " in body
    assert "Network:     \n" not in body


def test_notices_an_unknown_network_is_left_out(tmp_path: Path) -> None:
    maildirs = MaildirRoot(tmp_path / "mail")
    notifier = alerts.Notifier(maildirs, "mail.example.org")
    unknown = alerts.Notice(alerts.DEVICE_APPROVED, ALICE, "aa" * 8, "", "")
    assert notifier.notify(unknown)
    [message] = maildir_of(maildirs, ALICE).values()
    payload = message.get_payload(decode=True)
    assert isinstance(payload, bytes)  # a single-part notice
    body = payload.decode()
    assert "Network:" not in body
    assert f"Device:      {'aa' * 8}\n" in body  # no empty "(type )" either


def test_notices_pending_device_notice_tells_the_story(serve: Serve, connect: Connect) -> None:
    """For a holder on a trusted device who just saw "Login failed" on another one."""
    server = serve()
    assert round1.login(server, connect, DEVICE_A)[0] == 235
    assert round1.login(server, connect, DEVICE_B)[0] == 535
    [body] = round1.notices(server, ALICE, round1.PENDING_SUBJECT)
    fp = round1.fingerprint(server, DEVICE_B)
    details, _, story = body.partition("\n\n")
    # Which device: its type, when it was first seen, from where.
    assert f"Device:      {fp} (type UUID)" in details
    assert "First seen:  " in details
    assert f"Network:     {HOME_NETWORK}" in details
    # What happened, in the words the holder just saw.
    assert '"Login failed"' in story
    assert "right password" in story and "needs your approval" in story
    # How to let it in: the code by mail, or the administrator's command.
    assert len(round1.CODE.findall(story)) == 1
    assert f"    clientid-mta device approve {ALICE} {fp}\n" in story
    # And that nothing is needed if it was not them.
    assert "If it was not you, nothing needs doing to keep that device out" in story
    round1.assert_no_token(body, round1.DEVICE_A_TOKEN, round1.DEVICE_B_TOKEN)
