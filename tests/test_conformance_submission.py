"""docs/conformance.md, rows S1..S15: exact replies on real sockets, real TLS, real Maildir.

Every test is named after the row it covers. The raw ``Wire`` client is used where exact
codes, pipelining or malformed input matter; ``smtplib`` where a real client matters.
"""

from __future__ import annotations

import base64
import os
import platform
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task
from twisted.internet.testing import StringTransport

import clientid_mta
import twisted
from clientid_mta.auth.passwd_file import Account, PasswdFile, hash_password
from clientid_mta.config import load_config
from clientid_mta.devices.keys import load_or_create_server_key
from clientid_mta.smtp.clientid import (
    ClientIdentity,
    device_key,
    fingerprint,
)
from clientid_mta.smtp.protocol import MAX_COMMAND_LINE, SubmissionESMTP
from tests.conftest import (
    HOSTNAME,
    THUNDERBIRD_UUID,
    RunningServer,
    ServerReads,
    Wire,
    merge_toml,
)
from tests.sink import wait_until

ALICE = "alice@example.org"
BOB = "bob@example.org"
PASSWORDS = {ALICE: "alice-password", BOB: "bob-password"}

NEED_TLS = "5.7.0 Must issue a STARTTLS command first"
USERNAME_CHALLENGE = "VXNlcm5hbWU6"  # base64 "Username:"
PASSWORD_CHALLENGE = "UGFzc3dvcmQ6"  # base64 "Password:"

Step = tuple[str, int, str]  # (line sent, expected code, expected start of the first reply line)


# --- helpers -------------------------------------------------------------------------------


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def plain(authcid: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{authcid}\0{password}")


GOOD_PLAIN = plain(ALICE, PASSWORDS[ALICE])


def check(reply: tuple[int, list[str]], code: int, status: str = "") -> list[str]:
    """Assert a reply's code and the start of its first line; return its lines."""
    got, lines = reply
    assert got == code and lines[0].startswith(status), (code, status, reply)
    return lines


def expect(wire: Wire, line: str | bytes, code: int, status: str = "") -> list[str]:
    return check(wire.cmd(line), code, status)


def run_steps(wire: Wire, steps: list[Step]) -> None:
    for line, code, status in steps:
        expect(wire, line, code, status)


def assert_in_sync(wire: Wire) -> None:
    """The connection still works and no stray reply is queued before ours."""
    expect(wire, "VRFY probe", 252, "2.5.2")
    expect(wire, "NOOP", 250)


def ehlo(wire: Wire) -> list[str]:
    return expect(wire, "EHLO client.example.net", 250)


def session(server: RunningServer, implicit: bool = False) -> Wire:
    """An encrypted session after EHLO, not authenticated."""
    wire = server.wire(implicit=implicit)
    if implicit:
        ehlo(wire)
    else:
        wire.tls_session()
    return wire


def logged_in(server: RunningServer, user: str = ALICE, password: str = "") -> Wire:
    wire = session(server)
    assert wire.auth_plain(user, password or PASSWORDS[user]) == 235
    return wire


def message(
    sender: str = ALICE, to: str = BOB, subject: str = "test", body: bytes = b"Hello.\r\n"
) -> bytes:
    head = f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\n".encode()
    return head + body


def transaction(
    wire: Wire,
    data: bytes,
    sender: str = ALICE,
    recipients: tuple[str, ...] = (BOB,),
    params: str = "",
) -> tuple[int, list[str]]:
    """MAIL, RCPT, DATA, then ``data`` (CRLF-terminated, already dot-stuffed) and the dot.

    Returns the reply to the final dot, or the DATA reply when it is not 354."""
    expect(wire, f"MAIL FROM:<{sender}>{params}", 250, "2.1.0")
    for rcpt in recipients:
        expect(wire, f"RCPT TO:<{rcpt}>", 250, "2.1.5")
    reply = wire.cmd("DATA")
    if reply[0] != 354:
        return reply
    wire.send(data + b".\r\n")
    return wire.reply()


def mail_dir(server: RunningServer, address: str) -> Path:
    localpart, _, domain = address.partition("@")
    return server.config.delivery.maildir_root / domain / localpart


def stored_files(server: RunningServer, address: str, folder: str = "new") -> list[bytes]:
    path = mail_dir(server, address) / folder
    return [p.read_bytes() for p in sorted(path.iterdir())] if path.is_dir() else []


def assert_nothing_stored(server: RunningServer, *addresses: str) -> None:
    """Nothing in ``new/``, at once; ``tmp/`` emptied. A refused message that had spilled
    is removed by a thread queued behind the spill's write, which may finish just after
    the reply (CI once read tmp/ in between)."""
    for address in addresses or (ALICE, BOB):
        assert stored_files(server, address) == []
        tmp = mail_dir(server, address) / "tmp"

        def emptied(tmp: Path = tmp) -> bool | None:
            return True if not tmp.is_dir() or not any(tmp.iterdir()) else None

        wait_until(emptied, 10, f"{address}'s tmp/ emptied")


@pytest.fixture(scope="module")
def password_hashes() -> dict[str, str]:
    """Argon2 is slow on purpose: hash alice's and bob's passwords once per module."""
    return {address: hash_password(password) for address, password in PASSWORDS.items()}


@pytest.fixture
def start(
    make_server: Callable[..., RunningServer], password_hashes: dict[str, str]
) -> Callable[[str], RunningServer]:
    """``make_server(extra_toml)`` with alice and bob in its passwd file."""

    def started(extra_toml: str = "") -> RunningServer:
        running = make_server(extra_toml)
        accounts = [Account(address, digest) for address, digest in password_hashes.items()]
        PasswdFile(running.config.auth.passwd_file).save(accounts)
        return running

    return started


@pytest.fixture
def server(start: Callable[[str], RunningServer]) -> RunningServer:
    """conftest's ``server`` (policy tofu, alice and bob), without hashing per test."""
    return start("")


@pytest.fixture
def small_server(start: Callable[[str], RunningServer]) -> RunningServer:
    return start("[limits]\nmax_message_size = 10000")


@pytest.fixture
def pipelining_server(start: Callable[[str], RunningServer]) -> RunningServer:
    return start("[clientid]\npipelining = true")


@pytest.fixture
def impatient_server(start: Callable[[str], RunningServer]) -> RunningServer:
    return start("[limits]\ncommand_timeout = 1\ndata_timeout = 2")


# --- S1: the two ports ---------------------------------------------------------------------


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls_port", "implicit_tls_port"])
def test_S1_both_ports_accept_a_message(server: RunningServer, implicit: bool) -> None:
    client = server.smtp(implicit=implicit)
    client.login(ALICE, PASSWORDS[ALICE])
    assert client.sendmail(ALICE, [BOB], message(subject="port")) == {}
    client.quit()
    [stored] = server.messages(BOB)
    assert stored["Subject"] == "port"


def test_S1_starttls_port_advertises_starttls(server: RunningServer) -> None:
    wire = server.wire()
    assert "STARTTLS" in ehlo(wire)
    wire.starttls()
    assert "STARTTLS" not in ehlo(wire)


def test_S1_implicit_tls_does_not_advertise_starttls_and_answers_503(
    server: RunningServer,
) -> None:
    wire = server.wire(implicit=True)
    lines = ehlo(wire)
    assert "STARTTLS" not in lines
    assert "AUTH PLAIN LOGIN" in lines
    expect(wire, "STARTTLS", 503)
    assert_in_sync(wire)
    assert wire.auth_plain(ALICE, PASSWORDS[ALICE]) == 235


# --- S2: STARTTLS resets the session ----------------------------------------------------------


def test_S2_starttls_resets_ehlo_auth_and_mail(server: RunningServer) -> None:
    wire = server.wire()
    ehlo(wire)
    # Attempts before TLS (refused) must leave no trace inside TLS.
    expect(wire, f"AUTH PLAIN {GOOD_PLAIN}", 530, "5.7.0")
    expect(wire, f"MAIL FROM:<{ALICE}>", 530, "5.7.0")
    wire.starttls()
    expect(wire, f"MAIL FROM:<{ALICE}>", 503)  # the plaintext EHLO is forgotten
    expect(wire, f"AUTH PLAIN {GOOD_PLAIN}", 503)
    expect(wire, f"CLIENTID UUID {THUNDERBIRD_UUID}", 503, "5.5.1")
    ehlo(wire)
    # The AUTH seen in plaintext is forgotten: CLIENTID is still allowed (C7 after reset).
    expect(wire, f"CLIENTID UUID {THUNDERBIRD_UUID}", 250, "2.0.0")
    expect(wire, f"AUTH PLAIN {GOOD_PLAIN}", 235, "2.7.0")
    expect(wire, f"MAIL FROM:<{ALICE}>", 250, "2.1.0")


@pytest.mark.parametrize(
    "injected",
    [b"NOOP\r\n", b"HELP\r\nVRFY injected\r\n", f"AUTH PLAIN {GOOD_PLAIN}\r\n".encode()],
    ids=["noop", "help_vrfy", "auth"],
)
def test_S2_plaintext_pipelined_after_starttls_is_never_executed(
    server: RunningServer, injected: bytes
) -> None:
    wire = server.wire()
    ehlo(wire)
    wire.send(b"STARTTLS\r\n" + injected)
    check(wire.reply(), 220, "2.0.0")
    assert not wire._buffer, "a reply to the injected command came in plaintext"
    wire.sock = server.ssl_context().wrap_socket(wire.sock, server_hostname="127.0.0.1")
    # The first reply inside TLS must be the EHLO's, not one to the injected command.
    lines = ehlo(wire)
    assert lines[0].split()[0] == HOSTNAME and len(lines) > 1
    assert_in_sync(wire)
    expect(wire, f"MAIL FROM:<{ALICE}>", 530, "5.7.0")  # an injected AUTH did not log in


def test_S2_second_starttls_is_503(server: RunningServer) -> None:
    wire = session(server)
    expect(wire, "STARTTLS", 503)
    assert_in_sync(wire)


def test_S2_starttls_with_arguments_is_501(server: RunningServer) -> None:
    wire = server.wire()
    ehlo(wire)
    expect(wire, "STARTTLS now", 501)
    wire.starttls()
    assert "AUTH PLAIN LOGIN" in ehlo(wire)


# --- S3: nothing before TLS --------------------------------------------------------------------


def test_S3_auth_advertised_only_after_tls(server: RunningServer) -> None:
    wire = server.wire()
    assert not [line for line in ehlo(wire) if line.upper().startswith("AUTH")]
    wire.starttls()
    auth = [line.split() for line in ehlo(wire) if line.upper().startswith("AUTH")]
    assert auth == [["AUTH", "PLAIN", "LOGIN"]]


@pytest.mark.parametrize(
    "command",
    [
        f"AUTH PLAIN {GOOD_PLAIN}",
        "AUTH LOGIN",
        f"MAIL FROM:<{ALICE}>",
        f"RCPT TO:<{BOB}>",
        "DATA",
    ],
    ids=["auth_plain", "auth_login", "mail", "rcpt", "data"],
)
def test_S3_command_before_tls_is_530(server: RunningServer, command: str) -> None:
    wire = server.wire()
    ehlo(wire)
    assert wire.cmd(command) == (530, [NEED_TLS])
    assert_in_sync(wire)


# --- S4: AUTH PLAIN and LOGIN --------------------------------------------------------------------

AUTH_SUCCESSES: dict[str, list[Step]] = {
    "plain_with_initial_response": [(f"AUTH PLAIN {GOOD_PLAIN}", 235, "2.7.0")],
    "plain_without_initial_response": [("AUTH PLAIN", 334, ""), (GOOD_PLAIN, 235, "2.7.0")],
    "plain_lower_case_mechanism": [(f"auth plain {GOOD_PLAIN}", 235, "2.7.0")],
    "login_with_initial_response": [
        (f"AUTH LOGIN {b64(ALICE)}", 334, PASSWORD_CHALLENGE),
        (b64(PASSWORDS[ALICE]), 235, "2.7.0"),
    ],
    "login_without_initial_response": [
        ("AUTH LOGIN", 334, USERNAME_CHALLENGE),
        (b64(ALICE), 334, PASSWORD_CHALLENGE),
        (b64(PASSWORDS[ALICE]), 235, "2.7.0"),
    ],
}


@pytest.mark.parametrize("steps", AUTH_SUCCESSES.values(), ids=AUTH_SUCCESSES.keys())
def test_S4_auth_succeeds(server: RunningServer, steps: list[Step]) -> None:
    wire = session(server)
    run_steps(wire, steps)
    assert_in_sync(wire)
    expect(wire, f"MAIL FROM:<{ALICE}>", 250, "2.1.0")


GOOD_AUTH: Step = (f"AUTH PLAIN {GOOD_PLAIN}", 235, "2.7.0")

AUTH_REFUSALS: dict[str, list[Step]] = {
    "plain_empty_initial_response": [("AUTH PLAIN =", 501, "")],
    "plain_empty_response_as_equals": [("AUTH PLAIN", 334, ""), ("=", 501, "")],
    "login_empty_username_as_equals": [("AUTH LOGIN =", 501, "")],
    "plain_cancelled": [("AUTH PLAIN", 334, ""), ("*", 501, "5.0.0")],
    "login_cancelled_at_username": [("AUTH LOGIN", 334, USERNAME_CHALLENGE), ("*", 501, "5.0.0")],
    "login_cancelled_at_password": [
        (f"AUTH LOGIN {b64(ALICE)}", 334, PASSWORD_CHALLENGE),
        ("*", 501, "5.0.0"),
    ],
    "plain_bad_base64_initial_response": [("AUTH PLAIN not*base64!", 501, "")],
    "plain_bad_base64_response": [("AUTH PLAIN", 334, ""), ("%%%%", 501, "")],
    "login_bad_base64_password": [
        ("AUTH LOGIN", 334, USERNAME_CHALLENGE),
        (b64(ALICE), 334, PASSWORD_CHALLENGE),
        ("@@@@", 501, ""),
    ],
    "plain_without_nuls": [(f"AUTH PLAIN {b64(ALICE + PASSWORDS[ALICE])}", 501, "")],
    "plain_one_nul": [(f"AUTH PLAIN {b64(ALICE + chr(0) + PASSWORDS[ALICE])}", 501, "")],
    "plain_empty_response": [("AUTH PLAIN", 334, ""), ("", 501, "")],
    "no_mechanism": [("AUTH", 501, "")],
    "unknown_mechanism": [("AUTH NOSUCHMECH", 504, "5.5.4")],
    "cram_md5": [("AUTH CRAM-MD5", 504, "5.5.4")],
    "auth_while_authenticated": [GOOD_AUTH, (f"AUTH PLAIN {GOOD_PLAIN}", 503, "5.5.1")],
    "auth_inside_transaction": [
        GOOD_AUTH,
        (f"MAIL FROM:<{ALICE}>", 250, "2.1.0"),
        ("AUTH LOGIN", 503, ""),
    ],
    "authzid_differs_from_authcid": [
        (f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE], authzid=BOB)}", 535, "5.7.8")
    ],
}


@pytest.mark.parametrize("steps", AUTH_REFUSALS.values(), ids=AUTH_REFUSALS.keys())
def test_S4_auth_refusal_gets_a_reply_and_connection_stays_usable(
    server: RunningServer, steps: list[Step]
) -> None:
    wire = session(server)
    run_steps(wire, steps)
    assert_in_sync(wire)


def test_S4_failed_auth_can_be_retried(server: RunningServer) -> None:
    wire = session(server)
    expect(wire, "AUTH PLAIN", 334)
    expect(wire, "*", 501, "5.0.0")
    expect(wire, f"AUTH PLAIN {plain(ALICE, 'wrong-password')}", 535, "5.7.8")
    expect(wire, f"AUTH PLAIN {GOOD_PLAIN}", 235, "2.7.0")


# --- S5: MAIL needs AUTH -----------------------------------------------------------------------


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls_port", "implicit_tls_port"])
@pytest.mark.parametrize("failed_auth_first", [False, True], ids=["no_auth", "after_failed_auth"])
def test_S5_mail_without_auth_is_530(
    server: RunningServer, implicit: bool, failed_auth_first: bool
) -> None:
    wire = session(server, implicit=implicit)
    if failed_auth_first:
        assert wire.auth_plain(ALICE, "wrong-password") == 535
    assert wire.cmd(f"MAIL FROM:<{ALICE}>") == (530, ["5.7.0 Authentication required"])
    assert_in_sync(wire)


# --- S6: who may send as whom ------------------------------------------------------------------


def test_S6_envelope_sender_not_owned_is_553(server: RunningServer) -> None:
    wire = logged_in(server)
    expect(wire, f"MAIL FROM:<{BOB}>", 553, "5.7.1")
    expect(wire, "MAIL FROM:<someone@elsewhere.net>", 553, "5.7.1")
    expect(wire, f"MAIL FROM:<{ALICE}>", 250, "2.1.0")


def test_S6_granted_alias_may_send(server: RunningServer) -> None:
    server.add_user("carol@example.org", "carol-password", send_as="sales@example.org")
    wire = logged_in(server, "carol@example.org", "carol-password")
    expect(wire, f"MAIL FROM:<{ALICE}>", 553, "5.7.1")  # the grant is for sales@ only
    reply = transaction(wire, message(sender="sales@example.org"), sender="sales@example.org")
    check(reply, 250, "2.0.0")
    [stored] = server.messages(BOB)
    assert stored["From"] == "sales@example.org"


@pytest.mark.parametrize(
    "author",
    [BOB, f"Alice <{ALICE}>, {BOB}", "Sales <sales@example.org>"],
    ids=["other_user", "one_of_two_not_owned", "alias_not_granted"],
)
def test_S6_from_header_not_owned_is_550_after_data(server: RunningServer, author: str) -> None:
    wire = logged_in(server)
    check(transaction(wire, message(sender=author)), 550, "5.7.1")
    assert_nothing_stored(server)
    assert_in_sync(wire)


def test_S6_send_as_any_lets_any_sender_and_author(server: RunningServer) -> None:
    server.add_user("boss@example.org", "boss-password", send_as="*")
    wire = logged_in(server, "boss@example.org", "boss-password")
    data = message(sender="CEO <ceo@elsewhere.net>")
    check(transaction(wire, data, sender="someone@elsewhere.net"), 250, "2.0.0")
    [stored] = server.messages(BOB)
    assert stored["From"] == "CEO <ceo@elsewhere.net>"


# --- S7: SIZE, 8BITMIME, ENHANCEDSTATUSCODES ---------------------------------------------------


def test_S7_extensions_advertised_with_the_size_limit(small_server: RunningServer) -> None:
    wire = session(small_server)
    lines = ehlo(wire)
    for keyword in ("SIZE 10000", "8BITMIME", "ENHANCEDSTATUSCODES"):
        assert keyword in lines


def test_S7_mail_size_parameter_over_limit_is_552(small_server: RunningServer) -> None:
    wire = logged_in(small_server)
    expect(wire, f"MAIL FROM:<{ALICE}> SIZE=10001", 552, "5.3.4")
    expect(wire, f"MAIL FROM:<{ALICE}> SIZE=10000", 250, "2.1.0")


def test_S7_body_over_limit_is_read_to_the_end_then_552(
    small_server: RunningServer, server_reads: ServerReads
) -> None:
    wire = logged_in(small_server)
    expect(wire, f"MAIL FROM:<{ALICE}>", 250)
    expect(wire, f"RCPT TO:<{BOB}>", 250)
    expect(wire, "DATA", 354)
    body = message(body=b"0123456789" * 60 + b"\r\n") + (b"y" * 98 + b"\r\n") * 120
    read_before = server_reads.count(wire.sock)
    wire.send(body)
    assert server_reads.wait(wire.sock, read_before + len(body))  # all of it, before the dot
    wire.send(b".\r\n")
    # One reply, after the dot: an early 552 would leave the dot to be answered as a command,
    # and that stray reply would come before the VRFY's in assert_in_sync.
    check(wire.reply(), 552, "5.3.4")
    assert_nothing_stored(small_server)
    assert_in_sync(wire)
    check(transaction(wire, message()), 250, "2.0.0")  # a small one still goes through


def test_S7_8bit_body_with_8bitmime_is_stored_byte_exact(server: RunningServer) -> None:
    body = b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\nlatin-1 \xe9\xe8 and \xff\x80\x81\r\n..dot\r\n"
    data = message(subject="8bit", body=body)
    wire = logged_in(server)
    check(transaction(wire, data, params=" BODY=8BITMIME"), 250, "2.0.0")
    [raw] = stored_files(server, BOB)
    assert raw.endswith(data.replace(b"..dot", b".dot").replace(b"\r\n", b"\n"))


# --- S8: line limits -----------------------------------------------------------------------


def test_S8_command_line_over_512_octets_is_500_and_connection_keeps_working(
    server: RunningServer,
) -> None:
    wire = session(server)
    expect(wire, "NOOP " + "x" * 505, 250)  # 510 octets + CRLF = 512: allowed
    expect(wire, "NOOP " + "x" * 506, 500, "5.5.2")  # 513 octets
    expect(wire, f"MAIL FROM:<{ALICE}> " + "x" * 2000, 500, "5.5.2")
    assert_in_sync(wire)


def unit_session(
    root: Path, extra_toml: str = ""
) -> tuple[SubmissionESMTP, StringTransport, task.Clock]:
    """A session on a StringTransport, after the greeting (no sockets, a Clock for timers)."""
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "clientid-mta.toml"
    config_path.write_text(merge_toml(extra_toml))
    clock = task.Clock()
    protocol = SubmissionESMTP(load_config(config_path), None, None, clock=clock)  # all timers
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert transport.value().startswith(b"220 ")
    transport.clear()
    return protocol, transport, clock


def test_S8_huge_command_line_keeps_the_pending_input_bounded(tmp_path: Path) -> None:
    """32 MiB without a line end: the session never holds more than a line's worth of it."""
    protocol, transport, _clock = unit_session(tmp_path)
    largest = 0
    for _ in range(512):
        protocol.dataReceived(b"x" * 65536)
        largest = max(largest, len(protocol._inbuf))
    protocol.dataReceived(b"\r\nNOOP\r\n")
    replies = transport.value().split(b"\r\n")
    assert largest <= MAX_COMMAND_LINE + 2, f"{largest} bytes of one line held"
    assert [reply[:9] for reply in replies] == [b"500 5.5.2", b"250 2.0.0", b""]  # one 500


def test_S8_huge_command_line_gets_one_500_and_the_connection_keeps_working(
    server: RunningServer,
) -> None:
    wire = session(server)
    chunk = b"x" * 65536
    for _ in range(512):  # 32 MiB without a line end
        wire.send(chunk)
    wire.send(b"\r\nNOOP\r\n")
    check(wire.reply(), 500, "5.5.2")  # one reply for the whole line
    check(wire.reply(), 250)
    assert_in_sync(wire)


def test_S8_data_line_of_5000_octets_is_accepted(server: RunningServer) -> None:
    long_line = b"z" * 5000
    wire = logged_in(server)
    check(transaction(wire, message(body=long_line + b"\r\n")), 250, "2.0.0")
    [raw] = stored_files(server, BOB)
    assert long_line + b"\n" in raw


def test_S8_data_line_over_cap_is_500_and_body_never_run_as_commands(
    server: RunningServer,
) -> None:
    too_long = b"w" * 20000 + b"\r\n"
    commands = f"RSET\r\nMAIL FROM:<x@y>\r\nHELP\r\nRCPT TO:<{BOB}>\r\nQUIT\r\n".encode()
    wire = logged_in(server)
    # Over-long lines in the middle and right before the final dot.
    check(transaction(wire, message(body=too_long + commands + too_long)), 500, "5.5.2")
    assert_in_sync(wire)  # exactly one reply came: nothing of the body ran as a command
    assert_nothing_stored(server)


# --- S9: replies in command order ----------------------------------------------------------

PIPELINED = [f"MAIL FROM:<{ALICE}>", f"RCPT TO:<{BOB}>", "RCPT TO:<nobody@example.org>", "DATA"]


def _envelope_replies(server: RunningServer, pipelined: bool) -> list[tuple[int, list[str]]]:
    wire = logged_in(server)
    if pipelined:
        wire.send("".join(line + "\r\n" for line in PIPELINED))
        replies = [wire.reply() for _ in PIPELINED]
    else:
        replies = [wire.cmd(line) for line in PIPELINED]
    wire.send(message(subject="pipelined" if pipelined else "one by one") + b".\r\n")
    check(wire.reply(), 250, "2.0.0")
    assert_in_sync(wire)
    return replies


def test_S9_pipelined_envelope_gets_the_one_by_one_replies(
    pipelining_server: RunningServer,
) -> None:
    assert "PIPELINING" in ehlo(session(pipelining_server))
    pipelined = _envelope_replies(pipelining_server, pipelined=True)
    one_by_one = _envelope_replies(pipelining_server, pipelined=False)
    assert [code for code, _ in pipelined] == [250, 250, 550, 354]
    assert pipelined == one_by_one
    subjects = sorted(m["Subject"] for m in pipelining_server.messages(BOB))
    assert subjects == ["one by one", "pipelined"]


def test_S9_auth_in_a_thread_replies_before_the_next_command(server: RunningServer) -> None:
    wire = session(server)
    wire.send(f"AUTH PLAIN {GOOD_PLAIN}\r\nMAIL FROM:<{ALICE}>\r\nNOOP\r\n")
    check(wire.reply(), 235, "2.7.0")
    check(wire.reply(), 250, "2.1.0")  # MAIL waited for the AUTH to finish
    check(wire.reply(), 250)
    assert_in_sync(wire)


def test_S9_a_quick_login_replies_before_the_next_command(server: RunningServer) -> None:
    """A trusted device with a cached password is answered on the reactor, in the turn
    that reads its AUTH (issue 16): the pipelined MAIL still waits for it."""
    checker = server.service.components.checker
    quick: list[bool] = []
    real = checker._quick_check

    def counted(attempt: Any, password: str, look: Any) -> Any:
        outcome = real(attempt, password, look)
        quick.append(outcome is not None)
        return outcome

    checker._quick_check = counted  # type: ignore[method-assign]
    try:
        for _ in range(2):  # the first trusts the device and caches the password
            wire = session(server)
            expect(wire, f"CLIENTID UUID {THUNDERBIRD_UUID}", 250)
            wire.send(f"AUTH PLAIN {GOOD_PLAIN}\r\nMAIL FROM:<{ALICE}>\r\nNOOP\r\n")
            check(wire.reply(), 235, "2.7.0")
            check(wire.reply(), 250, "2.1.0")
            check(wire.reply(), 250)
            assert_in_sync(wire)
            wire.close()
    finally:
        del checker._quick_check
    assert quick[-1:] == [True]  # the second session's AUTH was answered on the reactor


def test_S9_end_of_data_replies_before_the_next_command(server: RunningServer) -> None:
    wire = logged_in(server)
    expect(wire, f"MAIL FROM:<{ALICE}>", 250)
    expect(wire, f"RCPT TO:<{BOB}>", 250)
    expect(wire, "DATA", 354)
    wire.send(message() + b".\r\nVRFY next\r\n")
    check(wire.reply(), 250, "2.0.0")
    check(wire.reply(), 252, "2.5.2")
    assert len(server.messages(BOB)) == 1


# --- S10: only CRLF.CRLF ends the data ------------------------------------------------------

SMUGGLED = (
    f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<{BOB}>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n"
).encode()

ODD_ENDINGS = {
    "lf_dot_lf": b"\n.\n",
    "cr_dot_lf": b"\r.\n",
    "lf_dot_crlf": b"\n.\r\n",
    "crlf_dot_lf": b"\r\n.\n",
    "crlf_dot_cr": b"\r\n.\r",
    "bare_lf": b"\n",
    "bare_cr": b"\r",
}


@pytest.mark.parametrize("ending", ODD_ENDINGS.values(), ids=ODD_ENDINGS.keys())
def test_S10_bare_cr_or_lf_never_ends_data_and_is_550(server: RunningServer, ending: bytes) -> None:
    wire = logged_in(server)
    body = b"first line" + ending + SMUGGLED + b"last line\r\n"
    check(transaction(wire, message(body=body)), 550, "5.6.0")
    assert_in_sync(wire)  # no reply to any smuggled command
    assert_nothing_stored(server)


# --- S11: durable before 250; temporary failures are 4xx --------------------------------------


def test_S11_message_is_in_new_when_250_arrives(server: RunningServer) -> None:
    wire = logged_in(server)
    check(transaction(wire, message(subject="durable")), 250, "2.0.0")
    [raw] = stored_files(server, BOB)  # no waiting: it is there already
    assert b"Subject: durable\n" in raw
    assert stored_files(server, BOB, "tmp") == []


@pytest.mark.parametrize("obstacle", ["bob", "bob/new"], ids=["maildir", "new_folder"])
def test_S11_unwritable_maildir_is_451_then_retry_is_stored(
    server: RunningServer, obstacle: str
) -> None:
    domain_dir = server.config.delivery.maildir_root / "example.org"
    if obstacle == "bob/new":
        for folder in ("tmp", "cur"):
            (domain_dir / "bob" / folder).mkdir(parents=True)
    domain_dir.mkdir(parents=True, exist_ok=True)
    blocker = domain_dir / obstacle
    blocker.write_text("a file where a folder should be\n")  # stops root too, unlike chmod
    wire = logged_in(server)
    check(transaction(wire, message(subject="retry")), 451, "4.3.0")
    if obstacle == "bob/new":
        assert stored_files(server, BOB, "tmp") == []
    blocker.unlink()
    check(transaction(wire, message(subject="retry")), 250, "2.0.0")
    assert [m["Subject"] for m in server.messages(BOB)] == ["retry"]


def test_S11_H3_an_unparsable_from_header_gets_a_reply_and_leaves_no_file(
    server: RunningServer,
) -> None:
    """A From: of 8,000 "(" once raised RecursionError at the end of data: no reply, a
    dropped connection and the spilled message files left open in tmp/."""
    wire = logged_in(server)
    lines = b"".join(b"%07d " % n + b"x" * 70 + b"\r\n" for n in range(4000))  # spills to disk
    data = b"From: " + b"(" * 8000 + b"\r\nSubject: h3\r\n\r\n" + lines
    code, _ = transaction(wire, data, recipients=(BOB, ALICE))
    assert code == 550  # refused as content, whichever way the header parser says no
    assert_in_sync(wire)
    assert_nothing_stored(server, BOB, ALICE)


# --- S12: the small commands ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "code", "status"),
    [
        ("NOOP", 250, ""),
        ("noop", 250, ""),
        ("RSET", 250, ""),
        ("HELP", 214, ""),
        (f"VRFY {BOB}", 252, "2.5.2"),
        ("EXPN staff", 502, ""),
        ("FROBNICATE", 500, "5.5.1"),
        ("TURN", 500, "5.5.1"),
    ],
    ids=["noop", "noop_lower_case", "rset", "help", "vrfy", "expn", "unknown", "turn"],
)
def test_S12_simple_commands(server: RunningServer, command: str, code: int, status: str) -> None:
    wire = session(server)
    expect(wire, command, code, status)
    assert_in_sync(wire)


def test_S12_rset_ends_the_transaction(server: RunningServer) -> None:
    wire = logged_in(server)
    expect(wire, f"MAIL FROM:<{ALICE}>", 250)
    expect(wire, "RSET", 250)
    expect(wire, f"RCPT TO:<{BOB}>", 503)
    expect(wire, f"MAIL FROM:<{ALICE}>", 250)  # not a nested MAIL


@pytest.mark.parametrize("implicit", [False, True], ids=["plaintext", "implicit_tls"])
def test_S12_quit_is_221_and_closes(server: RunningServer, implicit: bool) -> None:
    wire = server.wire(implicit=implicit)
    expect(wire, "QUIT", 221)
    assert wire.is_closed()


# --- S13: timeouts and error limits ----------------------------------------------------------

LAYERS = ["plaintext", "starttls", "implicit_tls"]


def connect(server: RunningServer, layer: str) -> Wire:
    """A session after EHLO on the given layer."""
    if layer == "plaintext":
        wire = server.wire()
        ehlo(wire)
        return wire
    return session(server, implicit=layer == "implicit_tls")


def assert_closed_by_server(wire: Wire, wait: float = 3) -> None:
    """The server closed the TCP connection itself, not only the TLS layer (close_notify):
    a client that has stopped talking must not keep the session (and its resources) alive."""
    assert wire.is_closed()
    raw = socket.socket(fileno=os.dup(wire.sock.fileno()))
    raw.settimeout(wait)
    try:
        pending: bytes | None = raw.recv(1, socket.MSG_PEEK)
    except ConnectionResetError:
        pending = b""
    except TimeoutError:
        pending = None
    finally:
        raw.close()  # the duplicate only
    assert pending == b"", f"the server did not close the TCP connection within {wait} s"


@pytest.mark.parametrize("layer", LAYERS)
def test_S13_idle_command_is_421_4_4_2_then_close(
    impatient_server: RunningServer, layer: str
) -> None:
    wire = connect(impatient_server, layer)
    check(wire.reply(), 421, "4.4.2")
    assert_closed_by_server(wire)


def test_S13_idle_data_is_421_4_4_2_then_close_and_nothing_stored(
    impatient_server: RunningServer,
) -> None:
    wire = logged_in(impatient_server)
    expect(wire, f"MAIL FROM:<{ALICE}>", 250)
    expect(wire, f"RCPT TO:<{BOB}>", 250)
    expect(wire, "DATA", 354)
    wire.send(message(body=b"the rest never comes\r\n"))
    started = time.monotonic()
    check(wire.reply(), 421, "4.4.2")
    assert time.monotonic() - started > 1.5  # the DATA timeout (2 s), not the command one (1 s)
    assert stored_files(impatient_server, BOB) == []
    assert_closed_by_server(wire)
    wait_until(  # removed by a disk thread after the reply
        lambda: not stored_files(impatient_server, BOB, "tmp") or None, 2, "tmp/ emptied"
    )
    assert_nothing_stored(impatient_server)  # the partial copy in tmp/ is gone too


def test_S13_idle_timer_restarts_per_line_not_per_byte(tmp_path: Path) -> None:
    """The command timeout, on a Clock: a complete line restarts it, dribbled bytes do not."""
    protocol, transport, clock = unit_session(tmp_path, "[limits]\ncommand_timeout = 10")
    clock.advance(9)
    protocol.dataReceived(b"NOOP\r\n")
    clock.advance(9)
    assert transport.value() == b"250 2.0.0 Ok\r\n" and not transport.disconnecting
    transport.clear()
    protocol.dataReceived(b"VRFY")  # bytes, but no complete line
    clock.advance(0.5)
    assert transport.value() == b"" and not transport.disconnecting
    protocol.dataReceived(b" x")
    clock.advance(0.5)  # 10 s since the NOOP
    assert transport.value().startswith(b"421 4.4.2 ") and transport.disconnecting


@pytest.mark.parametrize("layer", LAYERS)
def test_S13_too_many_errors_is_421_4_7_0_then_close(
    start: Callable[[str], RunningServer], layer: str
) -> None:
    wire = connect(start("[limits]\nmax_errors = 3"), layer)
    expect(wire, "FROBNICATE", 500, "5.5.1")
    expect(wire, "FROBNICATE", 500, "5.5.1")
    expect(wire, "FROBNICATE", 500, "5.5.1")
    check(wire.reply(), 421, "4.7.0")
    assert_closed_by_server(wire)


def test_S13_too_many_failed_auth_is_421_4_7_0_then_close(
    start: Callable[[str], RunningServer],
) -> None:
    wire = session(start("[auth]\nmax_failures_per_session = 2"))
    expect(wire, f"AUTH PLAIN {plain(ALICE, 'wrong-1')}", 535, "5.7.8")
    expect(wire, f"AUTH PLAIN {plain(ALICE, 'wrong-2')}", 535, "5.7.8")
    check(wire.reply(), 421, "4.7.0")
    assert_closed_by_server(wire)


# --- S14: the greeting ---------------------------------------------------------------------

SOFTWARE_WORDS = ("twisted", "python", "clientid-mta", "clientid_mta")
VERSIONS = (twisted.__version__, platform.python_version(), clientid_mta.__version__)


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls_port", "implicit_tls_port"])
def test_S14_greeting_and_ehlo_name_the_host_and_no_software(
    server: RunningServer, implicit: bool
) -> None:
    wire = server.wire(implicit=implicit)
    code, greeting = wire.greeting
    lines = ehlo(wire)
    assert code == 220
    for first in (greeting[0], lines[0]):
        assert first.split()[0] == HOSTNAME
        assert not re.search(r"\d+\.\d+", first), first
    text = "\n".join(greeting + lines).lower()
    for word in SOFTWARE_WORDS + VERSIONS:
        assert word.lower() not in text


# --- S15: the Received: header ---------------------------------------------------------------


def _received_for_message_with_clientid(server: RunningServer, implicit: bool) -> str:
    client = server.smtp(implicit=implicit)
    assert client.docmd("CLIENTID", f"UUID {THUNDERBIRD_UUID}")[0] == 250
    client.login(ALICE, PASSWORDS[ALICE])
    client.sendmail(ALICE, [BOB], message(subject="received"))
    client.quit()
    [raw] = stored_files(server, BOB)
    key = device_key(
        load_or_create_server_key(server.config.clientid.key_file),
        ClientIdentity("UUID", THUNDERBIRD_UUID),
    )
    for secret in (THUNDERBIRD_UUID, key, fingerprint(key)):
        assert secret.encode() not in raw.lower()
    [stored] = server.messages(BOB)
    return " ".join(str(stored["Received"]).split())


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls_port", "implicit_tls_port"])
def test_S15_received_header_names_server_esmtpsa_and_tls_without_ip_or_clientid(
    server: RunningServer, implicit: bool
) -> None:
    received = _received_for_message_with_clientid(server, implicit)
    assert f"by {HOSTNAME} with ESMTPSA" in received
    assert re.search(r"\bTLSv1\.[23]\b", received), received
    assert "127.0.0.1" not in received


def test_S15_received_header_shows_ip_when_configured(
    start: Callable[[str], RunningServer],
) -> None:
    server = start("[server]\nreceived_header_ip = true")
    received = _received_for_message_with_clientid(server, implicit=False)
    assert "127.0.0.1" in received
    assert f"by {HOSTNAME} with ESMTPSA" in received
