"""Issue 3, points 1, 4, 5, 6 and 7, end to end over real TLS sockets: the per-type flags
the C16 rows leave out (syslog, userlog), impossible travel, notices to the account
holder, the audit log, and approval of a pending device by its holder.

Sessions can come from any loopback address (all of 127/8 is local on Linux): a
client bound to 127.1.0.1 comes from another /16 than one bound to 127.0.0.1.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path
from typing import TypeVar

import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from clientid_mta.config import ConfigError
from clientid_mta.devices.audit import unknown_account
from clientid_mta.devices.regions import Regions
from clientid_mta.devices.store import AuditEntry
from tests import test_conformance_clientid as conformance
from tests.conftest import THUNDERBIRD_UUID, RunningServer, Wire, start_server
from tests.sink import wait_until
from tests.test_conformance_clientid import assert_code, attempt, devices, fingerprint, trust

# Fixtures shared with the C-row tests: alice and bob without hashing again, a log observer.
passwd_with_users = conformance.passwd_with_users
serve = conformance.serve
log_lines = conformance.log_lines

ALICE, ALICE_PW = "alice@example.org", "alice-password"
BOB, BOB_PW = "bob@example.org", "bob-password"
APPROVAL = "device-approval@example.org"
DEVICE_A_TOKEN = THUNDERBIRD_UUID
DEVICE_B_TOKEN = "0b6b2f7e-1c2d-4e5f-8a9b-0c1d2e3f4a5b"
DEVICE_A = f"UUID {DEVICE_A_TOKEN}"
DEVICE_B = f"UUID {DEVICE_B_TOKEN}"
AUTH_OK = 235

HOME = "127.0.0.1"  # region 127.0.0.0/16, network 127.0.0.0/24
HOME_NETWORK = "127.0.0.0/24"
POSTMASTER_BOB = '[alerts]\npostmaster = "bob@example.org"\n'

TRUSTED_SUBJECT = "A new device can now send mail as you"
PENDING_SUBJECT = "A new device was refused on your mail account"
REPEATED_SUBJECT = "Repeated failed logins on your mail account"
TRAVEL_SUBJECT = "Your device logged in from two distant networks"
APPROVED_SUBJECT = "You approved a new device"

CODE = re.compile(r"\b[A-Z2-9]{5}-[A-Z2-9]{5}\b")
REASON_CODES = (
    "known_device",
    "first_device_trusted",
    "observed",
    "no_clientid_allowed",
    "no_clientid_refused",
    "new_device_pending",
    "device_pending",
    "device_revoked",
    "impossible_travel",
    "bad_password",
    "unknown_account",
    "shared_device",
    "device_throttled",
    "network_throttled",
    "usual_network_throttled",
    "network_busy",
    "bad_password_repeated",
    "account_throttled",
)

Reply = tuple[int, list[str]]
Connect = Callable[..., Wire]
Serve = Callable[..., RunningServer]
T = TypeVar("T")


# --- helpers ------------------------------------------------------------------------------


class SourcedWire(Wire):
    """A ``Wire`` on the STARTTLS port, connecting from a chosen loopback address."""

    def __init__(self, server: RunningServer, source: str, timeout: float = 10) -> None:
        self.server = server
        self.timeout = timeout
        self.sock = socket.create_connection(
            ("127.0.0.1", server.port), timeout=timeout, source_address=(source, 0)
        )
        self._buffer = b""
        self.greeting = self.reply()


@pytest.fixture
def connect() -> Iterator[Connect]:
    """Open a session from ``source`` (STARTTLS + EHLO done); closed after the test."""
    opened: list[Wire] = []

    def open_session(server: RunningServer, source: str = HOME) -> Wire:
        wire = SourcedWire(server, source)
        opened.append(wire)
        return wire.tls_session()

    yield open_session
    for wire in opened:
        wire.close()


def login(
    server: RunningServer,
    connect: Connect,
    identity: str | None,
    password: str = ALICE_PW,
    user: str = ALICE,
    source: str = HOME,
) -> Reply:
    """CLIENTID (when given) and AUTH PLAIN in a new session, then QUIT; the AUTH reply.
    (Quitting keeps the device's concurrent sessions under [limits] max_sessions_per_device.)"""
    wire = connect(server, source)
    reply = attempt(wire, identity, password, user)
    assert wire.code("QUIT") == 221
    return reply


def logged_in(
    server: RunningServer, connect: Connect, identity: str | None, user: str = ALICE
) -> Wire:
    """A session authenticated as ``user`` (password right) with ``identity``."""
    wire = connect(server)
    password = {ALICE: ALICE_PW, BOB: BOB_PW}[user]
    assert attempt(wire, identity, password, user)[0] == AUTH_OK
    return wire


def text_of(message: Message) -> str:
    payload = message.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()


def notices(server: RunningServer, address: str, subject: str) -> list[str]:
    """The bodies of the notices with ``subject`` in ``address``'s Maildir."""
    return [text_of(m) for m in server.messages(address) if m["Subject"] == subject]


def eventually(check: Callable[[], T], timeout: float = 2.5) -> T:
    """``check()`` once it is true (notices are written by a thread), or its last value."""
    try:
        return wait_until(lambda: check() or None, timeout, "a true value", interval=0.05)
    except TimeoutError:
        return check()


AuditRow = tuple[str, str, str, str, str]  # outcome, account, device, network, reason


def audit_rows(server: RunningServer, *argv: str) -> list[AuditRow]:
    """The rows of ``clientid-mta audit``, without their time: the attempts, then the
    counts of throttled attempts (``454 x 3``; dated by the start of their minute, so
    their place among the attempts of that minute says nothing)."""
    lines = server.admin("audit", *argv).splitlines()
    assert lines[0].split() == ["TIME", "OUTCOME", "ACCOUNT", "DEVICE", "NETWORK", "REASON"]
    attempts: list[AuditRow] = []
    counts: list[AuditRow] = []
    for line in lines[1:]:
        count = re.fullmatch(r"\S+ \d\d:\d\d +(\d{3} x \d+) +(\S+) +(\S+) +(\S+) +(\S+)", line)
        if count is not None:
            times, account, device, network, reason = count.groups()
            counts.append((times, account, device, network, reason))
            continue
        _date, _time, outcome, account, device, network, reason = line.split()
        attempts.append((outcome, account, device, network, reason))
    return attempts + counts


def assert_no_token(text: str | bytes, *tokens: str) -> None:
    data = text.encode() if isinstance(text, str) else text
    for token in tokens:
        for variant in (token, token.lower(), token.upper()):
            assert variant.encode() not in data


# --- point 1 (C16): what the flag rows in test_conformance_clientid.py leave out ----------

PROBE = "PROBE probe-device-token"


def type_flags(flags: list[str]) -> str:
    quoted = ", ".join(f'"{flag}"' for flag in flags)
    return f'[clientid.types."PROBE"]\nflags = [{quoted}]\n'


@pytest.mark.parametrize(
    ("flags", "logged"),
    [
        (["syslog"], True),
        (None, True),  # the built-in default: syslog, userlog, auth
        (["debug", "syslog"], True),
        (["userlog", "auth"], False),
        (["debug"], False),
        (["ignore", "syslog"], False),
    ],
    ids=["syslog", "builtin_default", "debug_and_syslog", "no_syslog", "debug", "ignore_wins"],
)
def test_C16_syslog_flag_logs_the_fingerprint_at_clientid(
    serve: Serve, connect: Connect, log_lines: list[str], flags: list[str] | None, logged: bool
) -> None:
    server = serve(type_flags(flags) if flags is not None else "", users=False)
    wire = connect(server)
    assert wire.cmd(f"CLIENTID {PROBE}") == (250, ["2.0.0 OK"])
    assert wire.code("QUIT") == 221  # no AUTH: only the CLIENTID itself can have been logged
    logged_text = "\n".join(log_lines)
    assert (fingerprint(server, PROBE) in logged_text) is logged
    if logged:
        assert f"clientid type=PROBE device={fingerprint(server, PROBE)}" in logged_text
    assert_no_token(logged_text, "probe-device-token")


def device_rows(server: RunningServer, account: str = ALICE) -> dict[str, list[str]]:
    """``device list`` rows by fingerprint: [type, state, logins, label, first seen (2),
    last seen (2), last network]."""
    lines = server.admin("device", "list", account).splitlines()
    return {line.split()[0]: line.split()[1:] for line in lines[1:] if "has no devices" not in line}


def test_C16_userlog_records_each_login_and_network_in_device_list(
    serve: Serve, connect: Connect
) -> None:
    server = serve(conformance.policy("allowlist", True) + type_flags(["userlog"]))
    for source in (HOME, "127.1.0.1"):
        assert login(server, connect, PROBE, source=source)[0] == AUTH_OK  # not enforced
    rows = device_rows(server)
    assert list(rows) == [fingerprint(server, PROBE)]
    client_type, _state, logins, *_rest, last_network = rows[fingerprint(server, PROBE)]
    assert (client_type, logins, last_network) == ("PROBE", "2", "127.1.0.0/24")


def test_C16_userlog_only_device_does_not_take_the_tofu_slot(
    serve: Serve, connect: Connect
) -> None:
    """A userlog-only type is recorded but not used by the policy: the first device the
    policy does use is still the one trusted on first use."""
    server = serve(conformance.policy("tofu", True) + type_flags(["userlog"]))
    assert login(server, connect, PROBE)[0] == AUTH_OK
    assert login(server, connect, DEVICE_A)[0] == AUTH_OK
    states = {fp: state for fp, _type, state in devices(server)}
    assert states[fingerprint(server, DEVICE_A)] == "trusted"
    assert fingerprint(server, PROBE) in states  # still in the account's history


# --- point 4: impossible travel -----------------------------------------------------------


@pytest.fixture(scope="module")
def geoip_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MaxMind country database: 127.0/16 and 127.1/16 are NL, 127.2/16 is DE."""
    writer = MMDBWriter(ip_version=4, database_type="GeoIP2-Country")
    for network, country in (
        ("127.0.0.0/16", "NL"),
        ("127.1.0.0/16", "NL"),
        ("127.2.0.0/16", "DE"),
    ):
        writer.insert_network(IPSet([network]), {"country": {"iso_code": country}})
    path = tmp_path_factory.mktemp("geoip") / "countries.mmdb"
    writer.to_db_file(str(path))
    return path


GEOIP = '[travel]\ngeoip_database = "{geoip}"'


def test_an_ipv4_mapped_address_has_the_country_of_its_ipv4_address(geoip_database: Path) -> None:
    """A dual-stack listener, or HAProxy's TCP6 header, gives IPv4 clients as ::ffff:a.b.c.d;
    an IPv4-only database refuses that form, and the region fell back to the network: the
    same client seen both ways was in two regions (a false impossible journey)."""
    regions = Regions(geoip_database)
    try:
        assert regions.region("::ffff:127.2.0.1") == regions.region("127.2.0.1") == "country:DE"
    finally:
        regions.close()


# (extra TOML, second source address, AUTH code there, (previous, new) region if it alerts)
TRAVEL_CASES: dict[str, tuple[str, str, int, tuple[str, str] | None]] = {
    "other_16_alerts": ("", "127.1.0.1", 235, ("127.0.0.0/16", "127.1.0.0/16")),
    "refuse_refuses_with_535": (
        "[travel]\nrefuse = true",
        "127.1.0.1",
        535,
        ("127.0.0.0/16", "127.1.0.0/16"),
    ),
    "window_0_never_compares": ("[travel]\nwindow = 0", "127.1.0.1", 235, None),
    "same_16_never_alerts": ("", "127.0.200.1", 235, None),
    "geoip_same_country_does_not_alert": (GEOIP, "127.1.0.1", 235, None),
    "geoip_other_country_alerts": (GEOIP, "127.2.0.1", 235, ("country:NL", "country:DE")),
}


@pytest.mark.parametrize("case", list(TRAVEL_CASES))
def test_travel_trusted_device_in_two_regions_alerts_holder_and_postmaster(
    serve: Serve, connect: Connect, geoip_database: Path, case: str
) -> None:
    toml, source, code, regions = TRAVEL_CASES[case]
    server = serve(POSTMASTER_BOB + toml.format(geoip=geoip_database))
    assert login(server, connect, DEVICE_A)[0] == AUTH_OK  # first device: trusted
    assert login(server, connect, DEVICE_A, source=source)[0] == code
    holder, postmaster = notices(server, ALICE, TRAVEL_SUBJECT), server.messages(BOB)
    if regions is None:
        assert (holder, postmaster) == ([], [])
        return
    assert [(m["Subject"], m["To"]) for m in postmaster] == [(TRAVEL_SUBJECT, BOB)]
    assert len(holder) == 1
    previous, new = regions
    network = source.rsplit(".", 1)[0] + ".0/24"
    journey = f"logged in from {network} ({new}), shortly after\nlogging in from {previous}."
    for body in [*holder, text_of(postmaster[0])]:
        assert f"Account:     {ALICE}\n" in body
        assert journey in body
        assert f"clientid-mta device revoke {ALICE} {fingerprint(server, DEVICE_A)}" in body
        assert_no_token(body, DEVICE_A_TOKEN)


def test_travel_refusal_is_a_plain_535_audited_as_impossible_travel(
    serve: Serve, connect: Connect
) -> None:
    server = serve("[travel]\nrefuse = true")
    assert login(server, connect, DEVICE_A)[0] == AUTH_OK
    refused = login(server, connect, DEVICE_A, source="127.1.0.1")
    assert refused == login(server, connect, DEVICE_A, "wrong-password")  # nothing revealed
    assert_code(refused, 535, "5.7.8")
    assert login(server, connect, DEVICE_A)[0] == AUTH_OK  # still trusted at home
    fp = fingerprint(server, DEVICE_A)
    expected = ("refused", ALICE, fp, "127.1.0.0/24", "impossible_travel")
    assert eventually(lambda: expected in audit_rows(server, "--device", fp)), audit_rows(server)


@pytest.mark.parametrize(
    "content", [b"this is not a MaxMind database", None], ids=["bad", "missing"]
)
def test_travel_unusable_geoip_database_stops_the_start_with_one_config_error(
    tmp_path: Path, content: bytes | None
) -> None:
    database = tmp_path / "countries.mmdb"
    if content is not None:
        database.write_bytes(content)
    with pytest.raises(ConfigError) as stopped:
        start_server(tmp_path / "server", f'[travel]\ngeoip_database = "{database}"')
    message = str(stopped.value)
    assert message.startswith("config error: [travel] geoip_database")
    assert "\n" not in message
    assert "MaxMind" in message  # says what to point it at
    assert "PEM" not in message


# --- point 5: notices to the account holder -----------------------------------------------


def test_alerts_pending_device_notice_has_fingerprint_network_time_command_and_code(
    serve: Serve, connect: Connect
) -> None:
    server = serve(POSTMASTER_BOB)
    assert login(server, connect, DEVICE_A)[0] == AUTH_OK
    assert login(server, connect, DEVICE_B)[0] == 535
    [message] = [m for m in server.messages(ALICE) if m["Subject"] == PENDING_SUBJECT]
    assert message["To"] == ALICE
    assert message["Auto-Submitted"] == "auto-generated"
    body = text_of(message)
    fp = fingerprint(server, DEVICE_B)
    assert f"Device:      {fp} (type UUID)" in body
    assert f"Network:     {HOME_NETWORK}" in body
    assert re.search(r"^Time: +\S.*\d\d:\d\d:\d\d", body, re.MULTILINE), body
    assert f"    clientid-mta device approve {ALICE} {fp}\n" in body
    assert f"send a message to\n    {APPROVAL} with this code in the subject: " in body
    assert len(CODE.findall(body)) == 1
    assert_no_token(message.as_bytes(), DEVICE_A_TOKEN, DEVICE_B_TOKEN)
    assert server.messages(BOB) == []  # not an admin event


def test_alerts_tofu_trusted_device_notice(serve: Serve, connect: Connect) -> None:
    server = serve()
    assert login(server, connect, DEVICE_A)[0] == AUTH_OK
    [message] = server.messages(ALICE)
    assert (message["Subject"], message["To"]) == (TRUSTED_SUBJECT, ALICE)
    body = text_of(message)
    fp = fingerprint(server, DEVICE_A)
    assert f"Device:      {fp} (type UUID)" in body
    assert f"Network:     {HOME_NETWORK}" in body
    assert f"clientid-mta device revoke {ALICE} {fp}" in body
    assert_no_token(message.as_bytes(), DEVICE_A_TOKEN)
    assert login(server, connect, DEVICE_A)[0] == AUTH_OK
    assert len(server.messages(ALICE)) == 1  # a known device: no further notice


def test_alerts_repeated_failures_from_unknown_devices_notify_the_holder(
    serve: Serve, connect: Connect
) -> None:
    server = serve("[alerts]\nunknown_failures = 3")
    assert login(server, connect, DEVICE_A)[0] == AUTH_OK
    for _ in range(3):  # the holder's own trusted device mistyping does not count
        assert login(server, connect, DEVICE_A, "wrong-password")[0] == 535
    assert notices(server, ALICE, REPEATED_SUBJECT) == []
    unknown = [None, "LICENSE stolen-1", "LICENSE stolen-2"]
    for count, identity in enumerate(unknown, 1):  # each another password: repeats count once
        assert login(server, connect, identity, f"wrong-password-{count}")[0] == 535
        assert len(notices(server, ALICE, REPEATED_SUBJECT)) == count // 3
    [body] = notices(server, ALICE, REPEATED_SUBJECT)
    assert "Your own devices are not affected" in body
    assert server.messages(BOB) == []


@pytest.mark.parametrize(("limit", "expected"), [(2, 2), (None, 4)], ids=["limit_2", "default"])
def test_alerts_rate_limited_per_account(
    serve: Serve, connect: Connect, limit: int | None, expected: int
) -> None:
    server = serve(f"[alerts]\nmax_per_account_per_hour = {limit}" if limit else "")
    codes = [login(server, connect, f"LICENSE device-{number}")[0] for number in range(4)]
    assert codes == [235, 535, 535, 535]  # trusted, then pending: one notice each
    assert len(server.messages(ALICE)) == expected
    assert len(devices(server)) == 4  # the decisions do not depend on the notices


def test_alerts_one_notice_per_device_and_kind_an_hour(serve: Serve, connect: Connect) -> None:
    server = serve(type_flags(["auth", "alert-fail"]))
    trust(server, PROBE)
    for _ in range(3):
        assert login(server, connect, PROBE, "wrong-password")[0] == 535
    failed = "A device failed to log in to your mail account"
    assert len(notices(server, ALICE, failed)) == 1
    assert login(server, connect, DEVICE_B)[0] == 535  # another kind still gets through
    assert len(notices(server, ALICE, PENDING_SUBJECT)) == 1


# --- point 6: the audit log ---------------------------------------------------------------

WRONG_PASSWORD_DEVICE = "LICENSE wrong-password-device"
UNKNOWN_ACCOUNT_DEVICE = "LICENSE unknown-account-device"
NOBODY = "nobody@example.org"


@pytest.fixture
def audited(serve: Serve, connect: Connect) -> tuple[RunningServer, list[Reply]]:
    """One attempt of each kind; the server and every reply. After the first login, HOME
    is alice's usual network: unknown devices there spend her budget on it (two failures)."""
    server = serve("[throttle]\naccount_known_burst = 2")
    attempts: list[tuple[str, str, str, int]] = [
        (DEVICE_A, ALICE_PW, ALICE, 235),  # accepted: first device
        (WRONG_PASSWORD_DEVICE, "wrong-password", ALICE, 535),
        (UNKNOWN_ACCOUNT_DEVICE, ALICE_PW, NOBODY, 535),
        (DEVICE_B, ALICE_PW, ALICE, 535),  # right password, new device: pending
        (WRONG_PASSWORD_DEVICE, ALICE_PW, ALICE, 454),  # the budget is spent
    ]
    replies: list[Reply] = []
    for identity, password, user, code in attempts:
        wire = connect(server)
        replies.append(wire.cmd(f"CLIENTID {identity}"))
        replies.append(wire.cmd(conformance.plain(user, password)))
        assert replies[-1][0] == code, replies[-1]
    return server, replies


def expected_audit(server: RunningServer) -> list[AuditRow]:
    def fp(identity: str) -> str:
        return fingerprint(server, identity)

    # Not an account: what was typed is kept only as a keyed hash (H1).
    nobody = unknown_account(NOBODY, server.service.components.server_key)
    assert nobody.startswith("unknown:") and len(nobody) == len("unknown:") + 8

    return [
        ("accepted", ALICE, fp(DEVICE_A), HOME_NETWORK, "first_device_trusted"),
        ("refused", ALICE, fp(WRONG_PASSWORD_DEVICE), HOME_NETWORK, "bad_password"),
        ("refused", nobody, fp(UNKNOWN_ACCOUNT_DEVICE), HOME_NETWORK, "unknown_account"),
        ("refused", ALICE, fp(DEVICE_B), HOME_NETWORK, "new_device_pending"),
        ("454 x 1", "*", "-", HOME_NETWORK, "usual_network_throttled"),  # no device key: minted
    ]


def test_audit_lists_every_attempt_with_outcome_and_reason_within_2_seconds(
    audited: tuple[RunningServer, list[Reply]],
) -> None:
    server, _replies = audited
    expected = expected_audit(server)
    assert eventually(lambda: audit_rows(server) == expected, timeout=2.5), audit_rows(server)


def test_audit_reason_codes_never_reach_the_client(
    audited: tuple[RunningServer, list[Reply]],
) -> None:
    server, replies = audited
    assert_code(replies[-1], 454, "4.7.0")
    sent = "\n".join(line for _code, lines in replies for line in lines).lower()
    for reason in REASON_CODES:
        assert reason not in sent
    assert eventually(lambda: len(audit_rows(server)) == 5)  # they were recorded


def test_audit_filters_by_account_device_and_since(
    audited: tuple[RunningServer, list[Reply]],
) -> None:
    server, _replies = audited
    expected = expected_audit(server)
    assert eventually(lambda: audit_rows(server) == expected)
    hours_ago = AuditEntry(time.time() - 7200, ALICE, "", "192.0.2.0/24", "refused", "bad_password")
    server.service.components.store.audit.add_audit([hours_ago])
    earlier = ("refused", ALICE, "-", "192.0.2.0/24", "bad_password")
    assert audit_rows(server) == [earlier, *expected]
    assert audit_rows(server, "--account", NOBODY) == [expected[2]]
    # A count of throttled attempts keeps no account: --account leaves it out.
    assert audit_rows(server, "--account", ALICE) == [earlier, *expected[:2], expected[3]]
    wrong = fingerprint(server, WRONG_PASSWORD_DEVICE)
    # The count of its throttled attempt keeps no device: a device no account trusts is
    # not part of a count's key (a fresh CLIENTID per attempt would make each a row).
    assert audit_rows(server, "--device", wrong) == [expected[1]]
    assert audit_rows(server, "--device", wrong[:8]) == [expected[1]]
    assert audit_rows(server, "--since", "1h") == expected
    assert audit_rows(server, "--since", "3h") == [earlier, *expected]
    assert audit_rows(server, "--account", ALICE, "--device", wrong, "--since", "1h") == [
        expected[1]
    ]


@pytest.mark.parametrize(("retention_days", "kept"), [(90, ["40-days", "1-day"]), (30, ["1-day"])])
def test_audit_entries_older_than_retention_are_pruned(
    make_server: Callable[..., RunningServer], retention_days: int, kept: list[str]
) -> None:
    toml = f"[audit]\nretention_days = {retention_days}"
    first = make_server(toml)
    now = time.time()
    entries = [
        AuditEntry(now - days * 86400, f"{name}@example.org", "", HOME_NETWORK, "refused", "x")
        for name, days in (("100-days", 100), ("40-days", 40), ("1-day", 1))
    ]
    first.service.components.store.audit.add_audit(entries)
    first.stop()
    restarted = make_server(toml)  # the same data directory; pruning happens on a first flush
    audit = restarted.service.components.defences.audit
    assert audit is not None
    audit.flush()

    def accounts() -> list[str]:
        return [row[1].split("@")[0] for row in audit_rows(restarted)]

    assert eventually(lambda: accounts() == kept), accounts()


# --- point 7: approval by the account holder ----------------------------------------------


def send_approval(wire: Wire, code: str, marker: str, sender: str = ALICE) -> Reply:
    """A message with ``code`` in its subject to the approval address; the reply to DATA."""
    assert wire.code(f"MAIL FROM:<{sender}>") == 250
    assert wire.code(f"RCPT TO:<{APPROVAL}>") == 250
    assert wire.code("DATA") == 354
    wire.send(
        f"From: {sender}\r\nTo: {APPROVAL}\r\nSubject: Approve {code}\r\n\r\n{marker}\r\n.\r\n"
    )
    return wire.reply()


def pending_code(server: RunningServer, connect: Connect, user: str = ALICE) -> str:
    """Trust device A for ``user``, get device B refused and pending; the code sent to them."""
    password = {ALICE: ALICE_PW, BOB: BOB_PW}[user]
    assert login(server, connect, DEVICE_A, password, user)[0] == AUTH_OK
    assert login(server, connect, DEVICE_B, password, user)[0] == 535
    [body] = notices(server, user, PENDING_SUBJECT)
    [code] = CODE.findall(body)
    return code


def stored_anywhere(server: RunningServer, marker: str) -> bool:
    root = server.config.delivery.maildir_root
    return any(marker.encode() in path.read_bytes() for path in root.rglob("*") if path.is_file())


def test_approval_code_from_trusted_device_approves_once(serve: Serve, connect: Connect) -> None:
    server = serve()
    code = pending_code(server, connect)
    wire = logged_in(server, connect, DEVICE_A)
    assert send_approval(wire, code, "That was me.")[0] == 250
    assert login(server, connect, DEVICE_B)[0] == AUTH_OK
    assert_code(send_approval(wire, code, "Once more."), 550, "5.7.1")  # single use
    states = {fp: state for fp, _type, state in devices(server)}
    assert states[fingerprint(server, DEVICE_B)] == "trusted"
    [body] = notices(server, ALICE, APPROVED_SUBJECT)
    assert fingerprint(server, DEVICE_B) in body
    assert not stored_anywhere(server, "That was me.")
    assert not stored_anywhere(server, "Once more.")
    assert not (server.config.delivery.maildir_root / "example.org" / "device-approval").exists()


def test_approval_address_refuses_a_session_without_clientid(
    serve: Serve, connect: Connect
) -> None:
    server = serve()
    pending_code(server, connect)
    wire = logged_in(server, connect, None)  # allowed: allow_without_clientid is true
    assert wire.code(f"MAIL FROM:<{ALICE}>") == 250
    assert wire.cmd(f"RCPT TO:<{APPROVAL}>") == (
        550,
        ["5.7.1 Only a trusted device may approve devices"],
    )
    assert login(server, connect, DEVICE_B)[0] == 535


def test_approval_expired_code_is_550(serve: Serve, connect: Connect) -> None:
    server = serve("[approval]\ncode_lifetime = 60")
    approvals = server.service.components.checker.policy.approvals
    assert approvals is not None
    now = time.time()
    approvals.clock = lambda: now  # the code's expiry is checked against this clock
    code = pending_code(server, connect)
    now += 61
    wire = logged_in(server, connect, DEVICE_A)
    assert_code(send_approval(wire, code, "Too late."), 550, "5.7.1")
    assert login(server, connect, DEVICE_B)[0] == 535
    assert notices(server, ALICE, APPROVED_SUBJECT) == []


def test_approval_code_of_another_account_does_not_work(serve: Serve, connect: Connect) -> None:
    server = serve()
    bobs_code = pending_code(server, connect, BOB)
    trust(server, DEVICE_A, ALICE)
    alice = logged_in(server, connect, DEVICE_A)
    assert_code(send_approval(alice, bobs_code, "Not mine."), 550, "5.7.1")
    assert_code(send_approval(alice, "ABCDE-FGH2K", "Made up."), 550, "5.7.1")
    assert login(server, connect, DEVICE_B, BOB_PW, BOB)[0] == 535
    bob = logged_in(server, connect, DEVICE_A, BOB)  # the control: the code itself is good
    assert send_approval(bob, bobs_code, "Mine.", BOB)[0] == 250
    assert login(server, connect, DEVICE_B, BOB_PW, BOB)[0] == AUTH_OK
