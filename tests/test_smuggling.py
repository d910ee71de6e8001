"""Issue 6 point 4: SMTP smuggling and injection (docs/conformance.md, S2, S4, S10, S15, C5, C14).

Builds on tests/test_conformance_submission.py, which already sends the odd endings in
the middle of a body (S10) and a few commands pipelined after STARTTLS (S2). Here:

- the odd endings at the very start of the body and right before the real end, with a
  whole second transaction pipelined inside the first body: the data never ends early,
  no second message appears (Maildirs counted), and exactly one reply comes;
- more commands pipelined after STARTTLS in the same packet, none ever executed;
- CR, LF, NUL, NEL (0x85) and other 8-bit line separators injected through every
  command argument: exactly one reply, and the injected command never runs;
- header and log injection through the EHLO name, CLIENTID tokens and AUTH identities:
  nothing reaches a header of a delivered message, a log line or the audit listing.
"""

from __future__ import annotations

import email
import email.policy
import re
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import provider

from tests import test_conformance_submission as conformance
from tests.conftest import HOSTNAME, THUNDERBIRD_UUID, RunningServer, Wire
from tests.test_conformance_submission import (
    ALICE,
    BOB,
    GOOD_PLAIN,
    ODD_ENDINGS,
    PASSWORDS,
    SMUGGLED,
    assert_in_sync,
    assert_nothing_stored,
    b64,
    check,
    ehlo,
    expect,
    logged_in,
    message,
    plain,
    session,
    stored_files,
    transaction,
)

# The conftest ``server`` (alice and bob), with their passwords hashed once per module.
password_hashes = conformance.password_hashes
start = conformance.start
server = conformance.server

MARKER = "X-Evil"  # every injection attempt below carries this text
EXPECTED_HEADERS = ["Received", "From", "To", "Subject"]  # of every message sent here

Reply = tuple[int, list[str]]


# --- helpers -------------------------------------------------------------------------------


@pytest.fixture
def log_text() -> Iterator[list[str]]:
    """Every log event of the test as the text log shows it (formatEvent), tracebacks too."""
    seen: list[str] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        seen.append(formatEvent(event) + (failure.getTraceback() if failure else ""))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def control_characters(text: str) -> list[str]:
    """C0 and C1 controls (CR, LF, NUL, NEL...): what may split or forge a line."""
    return [char for char in text if unicodedata.category(char) == "Cc"]


def assert_log_clean(log_text: list[str]) -> None:
    """One line per event, no traceback, and nothing of the injected text."""
    assert log_text, "the observer saw no event: the check would prove nothing"
    for text in log_text:
        assert not control_characters(text), f"raw control characters in a log line: {text!r}"
        assert MARKER.lower() not in text.lower(), f"injected text logged: {text!r}"


def assert_audit_clean(server: RunningServer, attempts: int) -> None:
    """``clientid-mta audit`` shows one line per AUTH attempt, each starting with its time."""
    audit = server.service.components.defences.audit
    assert audit is not None
    audit.flush()  # the server writes the audit in batches, once a second
    header, *rows = server.admin("audit").split("\n")[:-1]
    assert header.split()[:3] == ["TIME", "OUTCOME", "ACCOUNT"]
    assert len(rows) == attempts, f"{attempts} attempts, listed as {rows!r}"
    for row in rows:
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (accepted|refused) ", row), row
        assert not control_characters(row), f"raw control characters in {row!r}"


def drain(wire: Wire, wait: float = 0.2) -> list[Reply]:
    """Every reply the server sends until it has been silent for ``wait`` seconds."""
    replies: list[Reply] = []
    wire.sock.settimeout(wait)
    try:
        while True:
            replies.append(wire.reply())
    except TimeoutError:
        return replies
    finally:
        wire.sock.settimeout(wire.timeout)


def send_and_check_headers(server: RunningServer, wire: Wire) -> str:
    """Send a message on a logged-in session; the stored copy has exactly our header
    fields, and the Received: field only the HELO name from the client. Returns that."""
    check(transaction(wire, message(subject="headers")), 250, "2.0.0")
    [raw] = stored_files(server, BOB)
    head = raw.split(b"\n\n", 1)[0].decode("ascii")
    names = [line.split(":", 1)[0] for line in head.split("\n") if line[:1] not in (" ", "\t")]
    assert names == EXPECTED_HEADERS, head
    parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
    for name in EXPECTED_HEADERS[1:]:
        assert MARKER.lower() not in str(parsed[name]).lower(), head
    received = " ".join(str(parsed["Received"]).split())
    # The date follows the only ";" (RFC 5322 3.6.7): nothing from the client may add one.
    assert received.count(";") == 1, received
    pattern = rf"from \S+ by {HOSTNAME} with ESMTPSA \(TLSv1\.[23]\) id \w+ for <{BOB}>; .+"
    assert re.fullmatch(pattern, received), received
    return received


# --- S10: odd endings at the start of the body and right before the real end --------------

START_ENDINGS = ODD_ENDINGS | {
    "dot_lf": b".\n",  # with the CRLF of "DATA\r\n" before it: CRLF . LF
    "dot_cr": b".\r",
    "cr_dot_crlf": b"\r.\r\n",
}
END_ENDINGS = ODD_ENDINGS | {"cr_dot_crlf": b"\r.\r\n", "cr_dot_cr": b"\r.\r"}


def at_start(ending: bytes) -> bytes:
    """The body starts with the odd ending, and a second transaction follows it."""
    return ending + SMUGGLED


def before_the_end(ending: bytes) -> bytes:
    """A second transaction inside the body, then the odd ending right before CRLF . CRLF."""
    return message(body=SMUGGLED + b"last line" + ending + b"\r\n")


CASES = [
    pytest.param(at_start(ending), id=f"start-{name}") for name, ending in START_ENDINGS.items()
] + [pytest.param(before_the_end(ending), id=f"end-{name}") for name, ending in END_ENDINGS.items()]


@pytest.mark.parametrize("data", CASES)
def test_S10_odd_ending_at_start_or_end_of_body_never_ends_data(
    server: RunningServer, data: bytes
) -> None:
    wire = logged_in(server)
    check(transaction(wire, data), 550, "5.6.0")  # one reply for the whole body
    assert_in_sync(wire)  # and none to the smuggled MAIL, RCPT, DATA or to the dot
    assert_nothing_stored(server)  # no second message, in bob's Maildir or alice's
    check(transaction(wire, message(subject="after")), 250, "2.0.0")
    assert [m["Subject"] for m in server.messages(BOB)] == ["after"]
    assert server.messages(ALICE) == []


# --- S2: commands pipelined after STARTTLS in the same packet ------------------------------

TRANSACTION = (
    (
        f"EHLO client.example.net\r\nAUTH PLAIN {GOOD_PLAIN}\r\nMAIL FROM:<{ALICE}>\r\n"
        f"RCPT TO:<{BOB}>\r\nDATA\r\n"
    ).encode()
    + message(subject="injected")
    + b".\r\n"
)

AFTER_STARTTLS = {
    "quit": b"STARTTLS\r\nQUIT\r\n",
    "whole_transaction": b"STARTTLS\r\n" + TRANSACTION,
    "bare_lf_endings": b"STARTTLS\r\nVRFY injected\nQUIT\n",
    "ehlo_starttls_and_more_in_one_packet": b"EHLO client.example.net\r\nSTARTTLS\r\nQUIT\r\n",
    "unfinished_line": b"STARTTLS\r\nVRFY injected",  # must not prefix the first TLS line
    "unfinished_auth": f"STARTTLS\r\nAUTH PLAIN {GOOD_PLAIN}".encode(),
}


@pytest.mark.parametrize("packet", AFTER_STARTTLS.values(), ids=AFTER_STARTTLS.keys())
def test_S2_commands_pipelined_after_starttls_never_run(
    server: RunningServer, packet: bytes
) -> None:
    wire = server.wire()
    if not packet.startswith(b"EHLO"):
        ehlo(wire)
    wire.sock.sendall(packet)
    if packet.startswith(b"EHLO"):
        check(wire.reply(), 250)
    check(wire.reply(), 220, "2.0.0")
    assert not wire._buffer, f"plaintext after the 220: {wire._buffer!r}"
    wire.sock = server.ssl_context().wrap_socket(wire.sock, server_hostname="127.0.0.1")
    lines = ehlo(wire)  # the first reply inside TLS is the EHLO's ...
    assert lines[0] == HOSTNAME and "AUTH PLAIN LOGIN" in lines
    assert_in_sync(wire)  # ... and nothing else is queued
    expect(wire, f"MAIL FROM:<{ALICE}>", 530, "5.7.0")  # not logged in
    assert server.messages(BOB) == []


def test_S2_pipelined_flood_after_starttls_is_never_run_even_as_tls(
    server: RunningServer,
) -> None:
    """More than one read of plaintext after STARTTLS: the rest reaches the TLS layer,
    which must refuse it as a broken handshake; no command of it may get a reply."""
    wire = server.wire()
    ehlo(wire)
    wire.sock.sendall(b"STARTTLS\r\n" + b"VRFY injected\r\n" * 20000)
    check(wire.reply(), 220, "2.0.0")
    rest = bytearray(wire._buffer)
    wire.sock.settimeout(5)
    try:
        while chunk := wire.sock.recv(65536):
            rest += chunk
    except (TimeoutError, ConnectionError):
        pass
    assert b"252 2.5.2" not in rest, f"a pipelined VRFY was answered: {bytes(rest[:200])!r}"
    assert_in_sync(session(server))  # the server is fine


# --- CR, LF, NUL and 8-bit separators injected through every argument -------------------------

SEPARATORS = {
    "cr": b"\r",
    "lf": b"\n",
    "nul": b"\x00",
    "nel": b"\x85",  # NEXT LINE in Latin-1; str.splitlines() splits on it
    "line_separator": "\u2028".encode(),  # U+2028 in UTF-8; str.splitlines() splits on it
    "vertical_tab": b"\x0b",
}
INJECTED = b"HELP"  # answered 214 if it ever runs, a reply no case below expects

Opener = Callable[[RunningServer], Wire]
Step = tuple[str, int, str]  # (line sent, expected code, expected start of the reply)


def tls_before_ehlo(server: RunningServer) -> Wire:
    return server.wire().tls_session(ehlo=False)


def auth_prompt(mechanism: str) -> Opener:
    def prompted(server: RunningServer) -> Wire:
        wire = session(server)
        expect(wire, f"AUTH {mechanism}", 334)
        return wire

    return prompted


def in_transaction(server: RunningServer) -> Wire:
    wire = logged_in(server)
    expect(wire, f"MAIL FROM:<{ALICE}>", 250, "2.1.0")
    return wire


# name: (how to get there, the line the separator and INJECTED are appended to, its one
#        reply (code, start of text), a later command showing that the line had no effect)
Injection = tuple[Opener, str, tuple[int, str], Step]
NO_EHLO_YET: Step = (f"AUTH PLAIN {GOOD_PLAIN}", 503, "5.5.1")
NOT_LOGGED_IN: Step = (f"MAIL FROM:<{ALICE}>", 530, "5.7.0")
CLIENTID_STILL_OPEN: Step = (f"CLIENTID UUID {THUNDERBIRD_UUID}", 250, "2.0.0")

COMMAND_ARGUMENTS: dict[str, Injection] = {
    "ehlo_name": (tls_before_ehlo, "EHLO client.example.net", (501, "5.5.4"), NO_EHLO_YET),
    "helo_name": (tls_before_ehlo, "HELO client.example.net", (501, "5.5.4"), NO_EHLO_YET),
    "mail_from": (logged_in, f"MAIL FROM:<{ALICE}>", (501, "5.5.4"), ("DATA", 503, "5.5.1")),
    "rcpt_to": (in_transaction, f"RCPT TO:<{BOB}>", (501, "5.5.4"), ("DATA", 503, "5.5.1")),
}
AUTH_ARGUMENTS: dict[str, Injection] = {
    "plain_initial_response": (session, f"AUTH PLAIN {GOOD_PLAIN}", (501, ""), NOT_LOGGED_IN),
    "plain_response": (auth_prompt("PLAIN"), GOOD_PLAIN, (501, ""), NOT_LOGGED_IN),
    "login_initial_user": (session, f"AUTH LOGIN {b64(ALICE)}", (501, ""), NOT_LOGGED_IN),
    "login_user": (auth_prompt("LOGIN"), b64(ALICE), (501, ""), NOT_LOGGED_IN),
}
CLIENTID_ARGUMENTS: dict[str, Injection] = {
    "type": (session, "CLIENTID UUID", (501, "5.5.4"), CLIENTID_STILL_OPEN),
    "token": (session, f"CLIENTID UUID {THUNDERBIRD_UUID}", (501, "5.5.4"), CLIENTID_STILL_OPEN),
}


def assert_injection_runs_nothing(
    server: RunningServer, injection: Injection, separator: bytes
) -> None:
    """The line with the separator gets exactly one reply; INJECTED never runs."""
    opened, line, (code, status), (later, later_code, later_status) = injection
    wire = opened(server)
    wire.send(line.encode() + separator + INJECTED + b"\r\n")
    replies = drain(wire)
    assert len(replies) == 1, f"one reply expected, got {replies!r}"
    check(replies[0], code, status)
    assert_in_sync(wire)
    expect(wire, later, later_code, later_status)


separators = pytest.mark.parametrize("separator", SEPARATORS.values(), ids=SEPARATORS.keys())


@separators
@pytest.mark.parametrize("argument", COMMAND_ARGUMENTS.keys())
def test_S10_separator_in_ehlo_mail_or_rcpt_argument_runs_nothing(
    server: RunningServer, argument: str, separator: bytes
) -> None:
    """Only CRLF ends a command line, as only CRLF . CRLF ends the data."""
    assert_injection_runs_nothing(server, COMMAND_ARGUMENTS[argument], separator)


@separators
@pytest.mark.parametrize("argument", AUTH_ARGUMENTS.keys())
def test_S4_separator_in_auth_response_gets_one_reply_and_logs_nobody_in(
    server: RunningServer, argument: str, separator: bytes
) -> None:
    assert_injection_runs_nothing(server, AUTH_ARGUMENTS[argument], separator)


@separators
@pytest.mark.parametrize("argument", CLIENTID_ARGUMENTS.keys())
def test_C5_separator_in_clientid_argument_is_501_and_runs_nothing(
    server: RunningServer, argument: str, separator: bytes
) -> None:
    assert_injection_runs_nothing(server, CLIENTID_ARGUMENTS[argument], separator)


# --- header and log injection through the EHLO name, CLIENTID and AUTH identities ------------


def ehlo_anyhow(wire: Wire, name: bytes) -> None:
    """EHLO ``name`` in TLS; if the server refuses it, EHLO with a plain name instead."""
    wire.send(b"EHLO " + name + b"\r\n")
    if not any(code == 250 for code, _ in drain(wire)):
        ehlo(wire)


EHLO_NAMES = {
    "crlf": b"x\r\nX-Evil: 1",
    "cr": b"x\rX-Evil: 1",
    "lf": b"x\nX-Evil: 1",
    "nul": b"x\x00X-Evil:1",
    "nel": b"x\x85X-Evil:1",
    "received_syntax": b'x;X-Evil:1(by"evil")\\',  # valid VCHAR: a ";" would end the field
    "longest_name": b"x" * 248 + b";X-Evil",  # 255 octets, the most the server takes
}


@pytest.mark.parametrize("name", EHLO_NAMES.values(), ids=EHLO_NAMES.keys())
def test_S15_ehlo_name_never_injects_a_header_or_log_line(
    server: RunningServer, log_text: list[str], name: bytes
) -> None:
    wire = server.wire()
    assert wire.code("EHLO client.example.net") == 250
    wire.starttls()
    ehlo_anyhow(wire, name)
    assert wire.auth_plain(ALICE, PASSWORDS[ALICE]) == 235
    helo = send_and_check_headers(server, wire).split()[1]
    assert helo == "client.example.net" or helo.startswith("x"), helo
    assert not set(helo) & set('();\\"'), helo  # the comment and date syntax of Received:
    assert_log_clean(log_text)


IDENTITIES = {
    "crlf_bcc": f"{ALICE}\r\nBcc: {MARKER}@example.org",
    "lf_header": f"{ALICE}\n{MARKER}: 1",
    "header_first": f"{MARKER}: 1\r\n\r\n{ALICE}",
    "cr_only": f"{ALICE}\r{MARKER}: 1",
    "nel": f"{ALICE}\x85{MARKER}: 1",
}


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("identity", IDENTITIES.values(), ids=IDENTITIES.keys())
def test_S4_auth_identity_never_reaches_a_header_log_line_or_audit_line(
    server: RunningServer, log_text: list[str], identity: str, mechanism: str
) -> None:
    wire = session(server)
    # A user name with a control or line-breaking character is malformed (501): it is
    # refused before any check, so it is neither tried nor audited.
    if mechanism == "PLAIN":
        refused = wire.cmd(f"AUTH PLAIN {plain(identity, PASSWORDS[ALICE])}")
    else:
        refused = wire.cmd(f"AUTH LOGIN {b64(identity)}")
    assert refused == (501, ["5.5.2 Malformed authentication response"])
    assert wire.auth_plain(ALICE, PASSWORDS[ALICE]) == 235
    assert MARKER.lower() not in send_and_check_headers(server, wire).lower()
    assert_log_clean(log_text)
    assert_audit_clean(server, attempts=1)


CLIENTID_TOKENS = {
    "header_text": f"{MARKER}:1".encode(),
    "bcc_text": f"Bcc:{MARKER}@example.org".encode(),
    "received_syntax": f"a;{MARKER}:1(x)".encode(),
    "lf": f"a\n{MARKER}:1".encode(),
    "cr": f"a\r{MARKER}:1".encode(),
    "crlf_header": f"a\r\n{MARKER}: 1".encode(),
}


@pytest.mark.parametrize("token", CLIENTID_TOKENS.values(), ids=CLIENTID_TOKENS.keys())
def test_C14_clientid_token_never_reaches_a_header_or_log_line(
    server: RunningServer, log_text: list[str], token: bytes
) -> None:
    wire = session(server)
    wire.send(b"CLIENTID LICENSE " + token + b"\r\n")
    drain(wire)  # 250 or 501 (the replies are counted by test_C5_separator_in_clientid_...)
    assert wire.auth_plain(ALICE, PASSWORDS[ALICE]) == 235
    assert MARKER.lower() not in send_and_check_headers(server, wire).lower()
    assert_log_clean(log_text)
    assert_audit_clean(server, attempts=1)


def test_S9_drain_sees_every_reply_to_pipelined_commands(server: RunningServer) -> None:
    """The helper the injection tests count replies with misses none."""
    wire = session(server)
    wire.send(b"NOOP\r\nVRFY x\r\nHELP\r\n")
    assert [code for code, _ in drain(wire)] == [250, 252, 214]
