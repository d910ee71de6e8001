"""docs/conformance.md, rows C1..C16: the CLIENTID extension on the wire.

Every test talks to a real server over real sockets and TLS with the raw ``Wire``
client, so that reply codes and enhanced status codes are checked exactly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import provider

from clientid_mta.cli import admin
from clientid_mta.config import load_config
from tests.conftest import THUNDERBIRD_UUID, RunningServer, Wire

ALICE, ALICE_PW = "alice@example.org", "alice-password"
BOB, BOB_PW = "bob@example.org", "bob-password"
EHLO = "EHLO client.example.net"
OTHER_UUID = "0b6b2f7e-1c2d-4e5f-8a9b-0c1d2e3f4a5b"
IDENTITY = f"UUID {THUNDERBIRD_UUID}"
OTHER_IDENTITY = f"UUID {OTHER_UUID}"

OK = (250, ["2.0.0 OK"])
AUTH_OK = 235

ALLOWLIST_STRICT = '[clientid]\npolicy = "allowlist"\nallow_without_clientid = false'
TOFU_STRICT = '[clientid]\npolicy = "tofu"\nallow_without_clientid = false'

Reply = tuple[int, list[str]]
Connect = Callable[..., Wire]
Serve = Callable[..., RunningServer]


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
def connect() -> Iterator[Connect]:
    """Open a ``Wire`` session, by default STARTTLS + EHLO; closed after the test."""
    opened: list[Wire] = []

    def open_session(
        server: RunningServer, *, implicit: bool = False, tls: bool = True, ehlo: bool = True
    ) -> Wire:
        wire = server.wire(implicit=implicit)
        opened.append(wire)
        if tls and not implicit:
            wire.tls_session(ehlo=ehlo)
        elif ehlo:
            assert wire.code(EHLO) == 250
        return wire

    yield open_session
    for wire in opened:
        wire.close()


@pytest.fixture(scope="module")
def passwd_with_users(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A passwd file holding alice and bob, made once with the admin command: argon2
    hashing is slow on purpose, so the tests copy it instead of hashing again."""
    root = tmp_path_factory.mktemp("passwd")
    config = root / "clientid-mta.toml"
    config.write_text('[server]\ndata_dir = "data"\n')
    for address, password in ((ALICE, ALICE_PW), (BOB, BOB_PW)):
        argv = ["--config", str(config), "user", "add", address]
        admin.run(argv, io.StringIO(), io.StringIO(password + "\n"))
    return load_config(config).auth.passwd_file.read_bytes()


@pytest.fixture
def serve(make_server: Callable[..., RunningServer], passwd_with_users: bytes) -> Serve:
    """A server with ``toml`` merged in and, unless ``users`` is false, alice and bob."""

    def start(toml: str = "", users: bool = True) -> RunningServer:
        running = make_server(toml)
        if users:
            running.config.auth.passwd_file.write_bytes(passwd_with_users)
        return running

    return start


def plain(user: str, password: str) -> str:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return f"AUTH PLAIN {token}"


def keywords(reply: Reply) -> list[str]:
    """The EHLO keyword lines (parameters kept) of an EHLO reply."""
    code, lines = reply
    assert code == 250
    return lines[1:]


def ehlo_keywords(server: RunningServer, connect: Connect, **how: Any) -> list[str]:
    wire = connect(server, ehlo=False, **how)
    return keywords(wire.cmd(EHLO))


def assert_code(reply: Reply, code: int, enhanced: str) -> None:
    assert reply[0] == code, reply
    assert reply[1][0].startswith(enhanced + " "), reply


def attempt(wire: Wire, identity: str | None, password: str = ALICE_PW, user: str = ALICE) -> Reply:
    """CLIENTID (never refused for policy reasons, C12) then AUTH PLAIN; the AUTH reply."""
    if identity is not None:
        assert wire.cmd(f"CLIENTID {identity}") == OK
    return wire.cmd(plain(user, password))


def login(
    server: RunningServer,
    connect: Connect,
    identity: str | None,
    password: str = ALICE_PW,
    user: str = ALICE,
) -> Reply:
    """``attempt`` in a new session."""
    return attempt(connect(server), identity, password, user)


def trust(server: RunningServer, identity: str, account: str = ALICE) -> str:
    """Pre-approve a device with the admin command; its fingerprint."""
    client_type, token = identity.split(" ", 1)
    out = server.admin("device", "add", account, client_type, stdin=token + "\n")
    return out.split()[2]


def devices(server: RunningServer, account: str = ALICE) -> list[tuple[str, str, str]]:
    """(fingerprint, type, state) of each device in ``device list``."""
    out = server.admin("device", "list", account)
    if "has no devices yet" in out:
        return []
    rows = []
    for line in out.splitlines()[1:]:
        shown, client_type, state = line.split()[:3]
        rows.append((shown, client_type, state))
    return rows


def device_key(server: RunningServer, identity: str) -> str:
    """HMAC-SHA256(server key, TYPE ":" token), computed here from the spec (C13, C14)."""
    client_type, token = identity.split(" ", 1)
    client_type = client_type.upper()
    if client_type.endswith("UUID"):
        token = token.lower()
    key = bytes.fromhex(server.config.clientid.key_file.read_text().strip())
    return hmac.new(key, f"{client_type}:{token}".encode(), hashlib.sha256).hexdigest()


def fingerprint(server: RunningServer, identity: str) -> str:
    return device_key(server, identity)[:16]


def files_under(root: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


# --- C1: advertised only under TLS and when enabled, without parameters -------------------


def test_C1_not_advertised_on_plaintext_but_after_starttls_and_new_ehlo(
    serve: Serve, connect: Connect
) -> None:
    wire = connect(serve(users=False), tls=False, ehlo=False)
    assert "CLIENTID" not in keywords(wire.cmd(EHLO))
    wire.starttls()
    assert "CLIENTID" in keywords(wire.cmd(EHLO))


def test_C1_advertised_on_implicit_tls_from_first_ehlo(serve: Serve, connect: Connect) -> None:
    assert "CLIENTID" in ehlo_keywords(serve(users=False), connect, implicit=True)


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit_tls"])
def test_C1_keyword_has_no_parameters(serve: Serve, connect: Connect, implicit: bool) -> None:
    lines = ehlo_keywords(serve(users=False), connect, implicit=implicit)
    assert [line for line in lines if line.upper().startswith("CLIENTID")] == ["CLIENTID"]


@pytest.mark.parametrize("setting", ["enabled = false", 'policy = "off"'])
@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit_tls"])
def test_C1_not_advertised_when_disabled(
    serve: Serve, connect: Connect, setting: str, implicit: bool
) -> None:
    lines = ehlo_keywords(serve(f"[clientid]\n{setting}", users=False), connect, implicit=implicit)
    assert [line for line in lines if line.startswith("AUTH ")]  # the EHLO reply under TLS
    assert not [line for line in lines if line.upper().startswith("CLIENTID")]


# --- C2: no PIPELINING next to CLIENTID, unless switched on -------------------------------


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit_tls"])
def test_C2_pipelining_not_advertised_with_clientid(
    serve: Serve, connect: Connect, implicit: bool
) -> None:
    lines = ehlo_keywords(serve(users=False), connect, implicit=implicit)
    assert "CLIENTID" in lines
    assert "PIPELINING" not in lines


def test_C2_config_switch_re_enables_pipelining(serve: Serve, connect: Connect) -> None:
    lines = ehlo_keywords(serve("[clientid]\npipelining = true", users=False), connect)
    assert "CLIENTID" in lines
    assert "PIPELINING" in lines


# --- C3: where unsupported, CLIENTID is just an unknown verb ------------------------------

UNSUPPORTED = {
    "plaintext_before_ehlo": ("", {"tls": False, "ehlo": False}),
    "plaintext_after_ehlo": ("", {"tls": False}),
    "disabled_after_starttls": ("[clientid]\nenabled = false", {}),
    "disabled_on_implicit_tls": ("[clientid]\nenabled = false", {"implicit": True}),
    "policy_off_after_starttls": ('[clientid]\npolicy = "off"', {}),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
@pytest.mark.parametrize("arguments", [f" {IDENTITY}", "", " UUID"], ids=["valid", "none", "one"])
def test_C3_unsupported_clientid_gets_the_unknown_verb_reply(
    serve: Serve, connect: Connect, case: str, arguments: str
) -> None:
    toml, how = UNSUPPORTED[case]
    wire = connect(serve(toml, users=False), **how)
    unknown = wire.cmd(f"FOOBAR{arguments}")
    assert_code(unknown, 500, "5.5.1")
    assert wire.cmd(f"CLIENTID{arguments}") == unknown


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_C3_help_does_not_reveal_unsupported_clientid(
    serve: Serve, connect: Connect, case: str
) -> None:
    toml, how = UNSUPPORTED[case]
    code, lines = connect(serve(toml, users=False), **how).cmd("HELP")
    assert code == 214
    assert "CLIENTID" not in " ".join(lines).upper()


# --- C4: not before the EHLO that advertised it -------------------------------------------


@pytest.mark.parametrize("arguments", [IDENTITY, "UUID"], ids=["valid", "malformed"])
def test_C4_after_starttls_before_new_ehlo_is_503(
    serve: Serve, connect: Connect, arguments: str
) -> None:
    wire = connect(serve(users=False), ehlo=False)
    assert_code(wire.cmd(f"CLIENTID {arguments}"), 503, "5.5.1")


@pytest.mark.parametrize("arguments", [IDENTITY, "UUID"], ids=["valid", "malformed"])
def test_C4_on_implicit_tls_before_any_ehlo_is_503(
    serve: Serve, connect: Connect, arguments: str
) -> None:
    wire = connect(serve(users=False), implicit=True, ehlo=False)
    assert_code(wire.cmd(f"CLIENTID {arguments}"), 503, "5.5.1")


@pytest.mark.parametrize(
    "how",
    [{"ehlo": False}, {"implicit": True, "ehlo": False}, {}],
    ids=["after_starttls", "on_implicit_tls", "after_an_ehlo_that_advertised_it"],
)
def test_C4_after_helo_is_503(serve: Serve, connect: Connect, how: dict[str, bool]) -> None:
    wire = connect(serve(users=False), **how)
    assert wire.code("HELO client.example.net") == 250
    assert_code(wire.cmd(f"CLIENTID {IDENTITY}"), 503, "5.5.1")


# --- C5: syntax ---------------------------------------------------------------------------

MALFORMED = {
    "one_argument": b"UUID",
    "three_arguments": b"UUID abc def",
    "empty": b"",
    "type_of_17_chars": b"A" * 17 + b" token",
    "token_of_129_chars": b"LICENSE " + b"x" * 129,
    "underscore_in_type": b"DEVICE_ID token",
    "8bit_byte_in_token": b"LICENSE abc\xe9def",
    "8bit_bytes_in_type": b"UU\xc3\x89ID token",
    "control_byte_in_token": b"LICENSE abc\x01def",
    "control_byte_in_type": b"UU\x01ID token",
    "nul_byte_in_token": b"LICENSE abc\x00def",
    "del_byte_in_token": b"LICENSE abc\x7fdef",
    "tab_instead_of_space": b"LICENSE\ttoken",
}

WELL_FORMED = {
    "type_of_16_chars": "A" * 16 + " token",
    "token_of_128_chars": "LICENSE " + "x" * 128,
    "one_char_type_and_token": "X y",
    "digits_and_dash_in_type": "Tb-2024 token",
    "every_vchar_in_token": "LICENSE " + "".join(chr(c) for c in range(0x21, 0x7F)),
}


@pytest.mark.parametrize("arguments", list(MALFORMED.values()), ids=list(MALFORMED))
def test_C5_malformed_clientid_is_501(serve: Serve, connect: Connect, arguments: bytes) -> None:
    wire = connect(serve(users=False))
    assert_code(wire.cmd(b"CLIENTID " + arguments), 501, "5.5.4")
    assert wire.cmd(f"CLIENTID {IDENTITY}") == OK  # a refused CLIENTID does not count (C6)


@pytest.mark.parametrize("arguments", list(WELL_FORMED.values()), ids=list(WELL_FORMED))
def test_C5_boundary_syntax_is_accepted(serve: Serve, connect: Connect, arguments: str) -> None:
    assert connect(serve(users=False)).cmd(f"CLIENTID {arguments}") == OK


# --- C6: only one per session -------------------------------------------------------------


@pytest.mark.parametrize(
    "second", [IDENTITY, OTHER_IDENTITY, "UUID"], ids=["same", "different", "malformed"]
)
def test_C6_second_clientid_is_503(serve: Serve, connect: Connect, second: str) -> None:
    wire = connect(serve(users=False))
    assert wire.cmd(f"CLIENTID {IDENTITY}") == OK
    assert_code(wire.cmd(f"CLIENTID {second}"), 503, "5.5.1")


# --- C7: not after any AUTH ---------------------------------------------------------------

AUTH_EXCHANGES: dict[str, tuple[list[str], int]] = {
    "failed": ([plain(ALICE, "wrong-password")], 535),
    "successful": ([plain(ALICE, ALICE_PW)], 235),
    "cancelled": (["AUTH PLAIN", "*"], 501),
    "unknown_mechanism": (["AUTH CRAM-MD5"], 504),
}


def run_exchange(wire: Wire, name: str) -> None:
    lines, final = AUTH_EXCHANGES[name]
    codes = [wire.code(line) for line in lines]
    assert codes[-1] == final, codes


@pytest.mark.parametrize("exchange", list(AUTH_EXCHANGES))
@pytest.mark.parametrize("arguments", [IDENTITY, "UUID"], ids=["valid", "malformed"])
def test_C7_clientid_after_auth_is_503(
    serve: Serve, connect: Connect, exchange: str, arguments: str
) -> None:
    wire = connect(serve())
    run_exchange(wire, exchange)
    assert_code(wire.cmd(f"CLIENTID {arguments}"), 503, "5.5.1")


# --- C8: not inside a mail transaction ----------------------------------------------------


def test_C8_clientid_inside_a_transaction_is_503(serve: Serve, connect: Connect) -> None:
    wire = connect(serve())
    assert wire.cmd(plain(ALICE, ALICE_PW))[0] == AUTH_OK
    assert wire.code(f"MAIL FROM:<{ALICE}>") == 250
    assert_code(wire.cmd(f"CLIENTID {IDENTITY}"), 503, "5.5.1")
    assert wire.code(f"RCPT TO:<{BOB}>") == 250  # the transaction goes on
    assert_code(wire.cmd(f"CLIENTID {IDENTITY}"), 503, "5.5.1")


# --- C9: accepted -------------------------------------------------------------------------


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit_tls"])
def test_C9_accepted_clientid_is_250_2_0_0_ok(
    serve: Serve, connect: Connect, implicit: bool
) -> None:
    assert connect(serve(users=False), implicit=implicit).cmd(f"CLIENTID {IDENTITY}") == OK


# --- C10: EHLO discards the identity, RSET keeps it ---------------------------------------


def test_C10_new_ehlo_discards_the_identity(serve: Serve, connect: Connect) -> None:
    server = serve(ALLOWLIST_STRICT)
    trust(server, IDENTITY)
    wire = connect(server)
    assert wire.cmd(f"CLIENTID {IDENTITY}") == OK
    assert wire.code(EHLO) == 250
    assert_code(attempt(wire, None), 535, "5.7.8")  # as if no identity had been sent
    assert login(server, connect, IDENTITY)[0] == AUTH_OK  # the device itself is fine


def test_C10_new_clientid_after_ehlo_is_accepted_and_used(serve: Serve, connect: Connect) -> None:
    server = serve(ALLOWLIST_STRICT)
    trust(server, OTHER_IDENTITY)
    wire = connect(server)
    assert wire.cmd(f"CLIENTID {IDENTITY}") == OK  # not trusted
    assert wire.code(EHLO) == 250
    assert attempt(wire, OTHER_IDENTITY)[0] == AUTH_OK


def test_C10_rset_keeps_the_identity_for_auth(serve: Serve, connect: Connect) -> None:
    server = serve(ALLOWLIST_STRICT)
    trust(server, IDENTITY)
    wire = connect(server)
    assert wire.cmd(f"CLIENTID {IDENTITY}") == OK
    assert wire.cmd("RSET")[0] == 250
    assert attempt(wire, None)[0] == AUTH_OK


def test_C10_second_clientid_after_rset_is_503(serve: Serve, connect: Connect) -> None:
    server = serve(ALLOWLIST_STRICT)
    trust(server, IDENTITY)
    wire = connect(server)
    assert wire.cmd(f"CLIENTID {IDENTITY}") == OK
    assert wire.cmd("RSET")[0] == 250
    assert_code(wire.cmd(f"CLIENTID {OTHER_IDENTITY}"), 503, "5.5.1")
    assert attempt(wire, None)[0] == AUTH_OK  # still the first identity, not the refused one


# --- C11: a failed AUTH keeps the identity ------------------------------------------------

FAILURES = {
    "wrong_password_plain": [(plain(ALICE, "wrong-password"), 535)],
    "wrong_password_login": [
        ("AUTH LOGIN", 334),
        (base64.b64encode(ALICE.encode()).decode(), 334),
        (base64.b64encode(b"wrong-password").decode(), 535),
    ],
    "cancelled": [("AUTH PLAIN", 334), ("*", 501)],
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_C11_failed_auth_keeps_the_identity(serve: Serve, connect: Connect, failure: str) -> None:
    server = serve(TOFU_STRICT)
    wire = connect(server)
    assert wire.cmd(f"CLIENTID {IDENTITY}") == OK
    for line, code in FAILURES[failure]:
        assert wire.code(line) == code
    assert attempt(wire, None)[0] == AUTH_OK  # no CLIENTID resent
    assert devices(server) == [(fingerprint(server, IDENTITY), "UUID", "trusted")]


# --- C12: every policy refusal looks like a wrong password --------------------------------


def test_C12_every_refusal_is_the_same_535_reply(serve: Serve, connect: Connect) -> None:
    server = serve(ALLOWLIST_STRICT)
    trust(server, IDENTITY)
    revoked = "LICENSE revoked-device-token"
    server.admin("device", "revoke", ALICE, trust(server, revoked))
    unknown = "LICENSE unknown-device-token"
    cases = {
        "wrong_password": (IDENTITY, "wrong-password", ALICE),
        "unknown_device": (unknown, ALICE_PW, ALICE),
        "pending_device": (unknown, ALICE_PW, ALICE),  # recorded as pending by the previous
        "revoked_device": (revoked, ALICE_PW, ALICE),
        "no_clientid": (None, ALICE_PW, ALICE),
        "unknown_account": (IDENTITY, ALICE_PW, "nobody@example.org"),
    }
    replies = {name: login(server, connect, *case) for name, case in cases.items()}
    assert_code(replies["wrong_password"], 535, "5.7.8")
    assert replies == dict.fromkeys(cases, replies["wrong_password"])
    states = {fp: state for fp, _type, state in devices(server)}
    assert states[fingerprint(server, unknown)] == "pending"
    assert states[fingerprint(server, revoked)] == "revoked"
    assert login(server, connect, IDENTITY)[0] == AUTH_OK  # the control: a trusted device


# --- C13: case rules ----------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["clientid", "ClientId", "cLIENTiD"])
def test_C13_verb_is_case_insensitive(serve: Serve, connect: Connect, verb: str) -> None:
    assert connect(serve(users=False)).cmd(f"{verb} {IDENTITY}") == OK


@pytest.mark.parametrize(
    ("trusted", "presented"),
    [
        (f"UUID {THUNDERBIRD_UUID}", f"uuid {THUNDERBIRD_UUID}"),
        (f"UUID {THUNDERBIRD_UUID}", f"Uuid {THUNDERBIRD_UUID.upper()}"),
        (f"uuid {THUNDERBIRD_UUID.upper()}", f"UUID {THUNDERBIRD_UUID}"),
        (f"TB-UUID {THUNDERBIRD_UUID}", f"tb-uuid {THUNDERBIRD_UUID.upper()}"),
    ],
    ids=["type_lower", "uuid_token_upper", "trusted_upper", "type_ending_in_uuid"],
)
def test_C13_type_and_uuid_token_ignore_case(
    serve: Serve, connect: Connect, trusted: str, presented: str
) -> None:
    server = serve(ALLOWLIST_STRICT)
    trust(server, trusted)
    assert login(server, connect, presented)[0] == AUTH_OK
    assert len(devices(server)) == 1


@pytest.mark.parametrize(
    ("presented", "code"),
    [("LICENSE AbC", 235), ("license AbC", 235), ("LICENSE abc", 535), ("LICENSE ABC", 535)],
)
def test_C13_other_tokens_compared_exactly(
    serve: Serve, connect: Connect, presented: str, code: int
) -> None:
    server = serve(ALLOWLIST_STRICT)
    trust(server, "LICENSE AbC")
    assert login(server, connect, presented)[0] == code


def test_C13_type_stored_upper_cased(serve: Serve, connect: Connect) -> None:
    server = serve(TOFU_STRICT)
    assert login(server, connect, "license Secret-Key")[0] == AUTH_OK
    assert devices(server) == [(fingerprint(server, "LICENSE Secret-Key"), "LICENSE", "trusted")]


# --- C14: the token is a secret -----------------------------------------------------------

SECRET_LICENSE = "LICENSE Zq8-Secret-Licence-Token-77x"
SECRET_UUID_TOKEN = "9f0e1d2c-3b4a-4958-8a7b-6c5d4e3f2a1b"
SECRET_UUID = f"UUID {SECRET_UUID_TOKEN.upper()}"
SECRET_STRINGS = [
    variant.encode()
    for identity in (SECRET_LICENSE, SECRET_UUID)
    for token in [identity.split(" ", 1)[1]]
    for variant in (token, token.lower(), token.upper())
]
MESSAGE = f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: secret test\r\n\r\nNothing secret here.\r\n.\r\n"


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Every log event (formatted text, its fields and any traceback) while the test runs."""
    seen: list[str] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        text = f"{formatEvent(event)} {event!r}"
        failure = event.get("log_failure")
        if failure is not None:
            text += failure.getTraceback()
        seen.append(text)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def secret_sessions(server: RunningServer, connect: Connect) -> list[str]:
    """Log in with a LICENSE token and send mail, get a UUID device refused, fail a
    password; every reply line the server sent."""
    replies: list[Reply] = []
    wire = connect(server)
    replies.append(wire.cmd(f"CLIENTID {SECRET_LICENSE}"))
    replies.append(wire.cmd(plain(ALICE, ALICE_PW)))
    for line in (f"MAIL FROM:<{ALICE}>", f"RCPT TO:<{BOB}>", f"RCPT TO:<{ALICE}>", "DATA"):
        replies.append(wire.cmd(line))
    wire.send(MESSAGE)
    replies.append(wire.reply())
    replies.append(wire.cmd("QUIT"))
    replies.append(login(server, connect, SECRET_UUID))  # a second device: pending, refused
    replies.append(login(server, connect, SECRET_LICENSE, "wrong-password"))
    assert [code for code, _ in replies] == [250, 235, 250, 250, 250, 354, 250, 221, 535, 535]
    return [line for _code, lines in replies for line in lines]


def assert_no_secret(data: bytes, where: object) -> None:
    for secret in SECRET_STRINGS:
        assert secret not in data, f"token {secret!r} found in {where}"


def test_C14_token_never_in_replies_or_delivered_messages(serve: Serve, connect: Connect) -> None:
    server = serve()
    replies = secret_sessions(server, connect)
    assert_no_secret("\r\n".join(replies).encode(), "a reply")
    delivered = server.messages(BOB) + server.messages(ALICE)
    assert len(server.messages(BOB)) == 1
    assert len(delivered) >= 2  # alice's copy, plus the device notices
    for message in delivered:
        assert_no_secret(message.as_bytes(), f"message {message['Subject']!r}")


def test_C14_token_never_in_data_files(serve: Serve, connect: Connect) -> None:
    server = serve()
    secret_sessions(server, connect)
    files = files_under(server.root)
    store = server.config.clientid.device_store
    assert store in files and server.config.auth.passwd_file in files
    for path, data in files.items():
        assert_no_secret(data, path)
    # What the store holds instead is HMAC-SHA256(server key, TYPE ":" token).
    store_bytes = b"".join(data for path, data in files.items() if path.name.startswith(store.name))
    for identity in (SECRET_LICENSE, SECRET_UUID):
        assert device_key(server, identity).encode() in store_bytes


def test_C14_token_never_logged(serve: Serve, connect: Connect, log_lines: list[str]) -> None:
    server = serve()
    secret_sessions(server, connect)
    logged = "\n".join(log_lines)
    assert fingerprint(server, SECRET_LICENSE) in logged  # the observer did see the sessions
    assert_no_secret(logged.encode(), "the log")


def test_C14_key_file_is_0600_and_apart_from_the_password_file(serve: Serve) -> None:
    server = serve()
    key_file, passwd_file = server.config.clientid.key_file, server.config.auth.passwd_file
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.resolve() != passwd_file.resolve()
    assert key_file.read_text().strip().encode() not in passwd_file.read_bytes()


def test_C14_device_list_shows_a_short_fingerprint(serve: Serve, connect: Connect) -> None:
    server = serve()
    assert login(server, connect, SECRET_LICENSE)[0] == AUTH_OK
    listing = server.admin("device", "list", ALICE)
    [(shown, client_type, _state)] = devices(server)
    assert len(shown) == 16 and set(shown) <= set("0123456789abcdef")
    assert shown == device_key(server, SECRET_LICENSE)[:16]
    assert device_key(server, SECRET_LICENSE) not in listing
    assert client_type == "LICENSE"
    assert_no_secret(listing.encode(), "device list")


# --- C15: device records apart from the credentials ---------------------------------------


def test_C15_device_records_are_not_in_the_password_file(serve: Serve, connect: Connect) -> None:
    server = serve()
    passwd_file, store = server.config.auth.passwd_file, server.config.clientid.device_store
    assert passwd_file.resolve() != store.resolve()
    before = passwd_file.read_bytes()
    assert login(server, connect, SECRET_LICENSE)[0] == AUTH_OK
    assert login(server, connect, IDENTITY)[0] == 535  # a second device, recorded as pending
    after = passwd_file.read_bytes()
    assert after == before
    assert len(devices(server)) == 2
    for identity in (SECRET_LICENSE, IDENTITY):
        assert device_key(server, identity)[:16].encode() not in after


def test_C15_device_records_are_keyed_by_account(serve: Serve, connect: Connect) -> None:
    server = serve(TOFU_STRICT)
    for user, password in ((ALICE, ALICE_PW), (BOB, BOB_PW)):
        assert login(server, connect, IDENTITY, password, user)[0] == AUTH_OK
    [(alice_fp, _, _)] = devices(server, ALICE)
    assert devices(server, BOB) == [(alice_fp, "UUID", "trusted")]
    server.admin("device", "revoke", ALICE, alice_fp)
    assert login(server, connect, IDENTITY)[0] == 535
    assert login(server, connect, IDENTITY, BOB_PW, BOB)[0] == AUTH_OK


# --- C16: per-type handling flags ---------------------------------------------------------

PROBE = "PROBE probe-device-token"


def type_flags(pattern: str, flags: list[str]) -> str:
    quoted = ", ".join(f'"{flag}"' for flag in flags)
    return f'[clientid.types."{pattern}"]\nflags = [{quoted}]\n'


def policy(mode: str, allow_without: bool) -> str:
    return f'[clientid]\npolicy = "{mode}"\nallow_without_clientid = {str(allow_without).lower()}\n'


# (flags of PROBE, allow_without_clientid, PROBE trusted beforehand, AUTH code, states after)
FLAG_CASES = {
    "ignore_even_a_trusted_device": (["ignore"], False, True, 535, ["trusted"]),
    "ignore_records_nothing": (["ignore"], True, False, 235, []),
    "debug_is_not_used": (["debug"], False, True, 535, ["trusted"]),
    "debug_records_nothing": (["debug"], True, False, 235, []),
    "syslog_only_records_nothing": (["syslog"], True, False, 235, []),
    "userlog_recorded_not_enforced": (["userlog"], True, False, 235, ["pending"]),
    "auth_enforced": (["auth"], True, False, 535, ["pending"]),
    "auth_uses_a_trusted_device": (["auth"], False, True, 235, ["trusted"]),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_C16_type_flags(serve: Serve, connect: Connect, case: str) -> None:
    flags, allow_without, trusted, code, states = FLAG_CASES[case]
    server = serve(policy("allowlist", allow_without) + type_flags("PROBE", flags))
    if trusted:
        trust(server, PROBE)
    assert login(server, connect, PROBE)[0] == code
    assert [state for _fp, _type, state in devices(server)] == states


def test_C16_ignored_type_under_tofu_is_not_presented(serve: Serve, connect: Connect) -> None:
    server = serve(TOFU_STRICT + "\n" + type_flags("IGNOREME", ["ignore"]))
    assert_code(login(server, connect, "IGNOREME some-token"), 535, "5.7.8")
    assert devices(server) == []
    assert login(server, connect, IDENTITY)[0] == AUTH_OK  # other types still work


@pytest.mark.parametrize(
    ("presented", "code", "states"),
    [("TBIRD tok", 235, []), ("tb tok", 235, []), ("XTB tok", 535, ["pending"])],
    ids=["matching", "matching_without_case", "not_matching"],
)
def test_C16_glob_pattern(
    serve: Serve, connect: Connect, presented: str, code: int, states: list[str]
) -> None:
    server = serve(policy("allowlist", True) + type_flags("TB*", ["ignore"]))
    assert login(server, connect, presented)[0] == code
    assert [state for _fp, _type, state in devices(server)] == states


@pytest.mark.parametrize(
    ("presented", "code", "states"),
    [("NEWTYPE tok", 235, []), (IDENTITY, 535, ["pending"])],
    ids=["unknown_type", "listed_type"],
)
def test_C16_default_entry_covers_unknown_types(
    serve: Serve, connect: Connect, presented: str, code: int, states: list[str]
) -> None:
    toml = type_flags("default", ["ignore"]) + type_flags("UUID", ["auth", "userlog"])
    server = serve(policy("allowlist", True) + toml)
    assert login(server, connect, presented)[0] == code
    assert [state for _fp, _type, state in devices(server)] == states


def test_C16_builtin_default_accepts_and_uses_unknown_types(serve: Serve, connect: Connect) -> None:
    server = serve(TOFU_STRICT)
    assert login(server, connect, "NEWTYPE tok")[0] == AUTH_OK  # CLIENTID 250 inside
    assert devices(server) == [(fingerprint(server, "NEWTYPE tok"), "NEWTYPE", "trusted")]
    assert login(server, connect, "OTHERTYPE tok")[0] == 535  # enforced: a second device


# (flags of PROBE, password, AUTH code, notices expected)
ALERT_CASES = {
    "alert_success_on_success": (["auth", "alert-success"], ALICE_PW, 235, 1),
    "alert_success_not_on_failure": (["auth", "alert-success"], "wrong-password", 535, 0),
    "alert_fail_on_failure": (["auth", "alert-fail"], "wrong-password", 535, 1),
    "alert_fail_not_on_success": (["auth", "alert-fail"], ALICE_PW, 235, 0),
    "no_alert_flag_on_success": (["auth"], ALICE_PW, 235, 0),
    "no_alert_flag_on_failure": (["auth"], "wrong-password", 535, 0),
}


@pytest.mark.parametrize("case", list(ALERT_CASES))
def test_C16_alert_flags_notify_the_account_holder(
    serve: Serve, connect: Connect, case: str
) -> None:
    flags, password, code, notices = ALERT_CASES[case]
    server = serve(policy("allowlist", False) + type_flags("PROBE", flags))
    trust(server, PROBE)
    assert login(server, connect, PROBE, password)[0] == code
    messages = server.messages(ALICE)
    assert len(messages) == notices
    for message in messages:
        assert message["To"] == ALICE
        text = message.as_bytes()
        assert fingerprint(server, PROBE).encode() in text
        assert b"probe-device-token" not in text
    assert server.messages(BOB) == []


def test_the_accepted_message_line_names_the_account(
    serve: Serve, connect: Connect, log_lines: list[str]
) -> None:
    """One line per accepted message names the account that sent it (not ``None``)."""
    server = serve()
    wire = connect(server)
    assert wire.cmd(f"CLIENTID {IDENTITY}")[0] == 250
    assert wire.cmd(plain(ALICE, ALICE_PW))[0] == 235
    for line in (f"MAIL FROM:<{ALICE}>", f"RCPT TO:<{BOB}>", "DATA"):
        wire.cmd(line)
    wire.send(MESSAGE)
    assert wire.reply()[0] == 250
    accepted = [line for line in log_lines if line.startswith("accepted ")]
    assert len(accepted) == 1 and f"account={ALICE} " in accepted[0]
