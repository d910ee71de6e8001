"""Abuse resistance, round 2: the passwd file (M4), the author check (M1) and a bounded
header parser (H3).

Each ``test_m4_``/``test_m1_``/``test_h3_`` test guards one finding; the unit tests
drive ``BodyReader``, the address-list parser and the passwd file directly, and the
end-to-end ones speak to a real server over TLS and read the stored mail back with
``mailbox``/``email``.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import bcrypt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.logger import capturedLogs

from clientid_mta.auth.passwd_file import (
    Account,
    PasswdFile,
    PasswdFileError,
    format_line,
    parse_accounts,
    parse_line,
)
from clientid_mta.cli import admin
from clientid_mta.smtp.body import MAX_FROM_FIELD, BodyReader
from clientid_mta.smtp.headers import MAX_COMMENT_DEPTH, HeaderSyntaxError, parse_address_list
from tests.conftest import RunningServer, merge_toml, start_server

ALICE = "alice@example.org"
BOB = "bob@example.org"
PASSWORDS = {ALICE: "alice-password", BOB: "bob-password"}


def cheap_hash(password: str) -> str:
    return "{BLF-CRYPT}" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


# --- helpers: a BodyReader fed a whole DATA block --------------------------------------------


def read_headers(data: bytes, max_line: int = 1000) -> BodyReader:
    reader = BodyReader(lambda _line: None, 1_000_000, max_line)
    consumed, done = reader.feed(bytearray(data + b".\r\n"))
    assert done and consumed == len(data) + 3
    return reader


def verdict(data: bytes) -> tuple[int, str] | list[str] | None:
    """The scanner's refusal, else the author addresses (None: no author field)."""
    reader = read_headers(data)
    return reader.headers.refusal() or reader.headers.author_addresses()


def padded_from(tail: bytes) -> bytes:
    """``From: alice,`` folded over whitespace lines until past MAX_FROM_FIELD, then ``tail``."""
    pad = b" " + b" " * 900 + b"\r\n"
    return b"From: alice@example.org,\r\n" + pad * (MAX_FROM_FIELD // len(pad) + 1) + tail


# --- M1: the From: check cannot be bypassed -----------------------------------------------------


def test_m1_overlong_from_is_refused_not_cut() -> None:
    data = padded_from(b" bob@example.org\r\nSubject: x\r\n\r\nbody\r\n")
    assert verdict(data) == (550, "5.7.1 From: field too long to check")


def test_m1_second_from_after_padding_is_refused() -> None:
    data = padded_from(b"From: bob@example.org\r\n\r\nbody\r\n")
    refusal = verdict(data)
    assert isinstance(refusal, tuple) and refusal[0] == 550
    data = b"From: alice@example.org\r\nSubject: x\r\nFrom: alice@example.org\r\n\r\n"
    assert verdict(data) == (550, "5.6.0 More than one From: field")


@pytest.mark.parametrize("name", [b"From :", b"From\t:", b"FROM  :", b"from:"])
def test_m1_field_name_with_whitespace_before_the_colon_is_matched(name: bytes) -> None:
    data = b"Subject: x\r\n" + name + b" bob@example.org\r\n\r\nbody\r\n"
    assert verdict(data) == ["bob@example.org"]


@pytest.mark.parametrize(
    ("fields", "authors"),
    [
        (b"Sender: bob@example.org\r\n", [ALICE, BOB]),
        (b"Resent-From: Bob <bob@example.org>\r\n", [ALICE, BOB]),
        (
            b"Resent-From: a@example.org\r\nResent-From: b@x.example\r\n",
            [ALICE, "a@example.org", "b@x.example"],
        ),
        (b"Resent-Sender: bob@example.org\r\n", [ALICE, BOB]),
    ],
    ids=["sender", "resent_from", "two_resent_from", "resent_sender"],
)
def test_m1_sender_and_resent_from_are_collected(fields: bytes, authors: list[str]) -> None:
    assert verdict(b"From: alice@example.org\r\n" + fields + b"\r\nbody\r\n") == authors


def test_m1_sender_with_two_addresses_or_twice_is_refused() -> None:
    two = b"From: alice@example.org\r\nSender: alice@example.org, bob@example.org\r\n\r\n"
    assert verdict(two) == (550, "5.6.0 Malformed Sender: field")
    twice = b"From: alice@example.org\r\nSender: alice@example.org\r\nSender: a@example.org\r\n\r\n"
    assert verdict(twice) == (550, "5.6.0 More than one Sender: field")


def test_m1_from_in_the_body_is_not_an_author_field() -> None:
    assert verdict(b"Subject: x\r\n\r\nFrom: bob@example.org\r\n") is None
    # No header section at all: the protocol puts an empty line first, so it is body.
    assert verdict(b"just text\r\nFrom: bob@example.org\r\n") is None


def test_m1_many_resent_fields_are_bounded() -> None:
    data = b"From: alice@example.org\r\n" + b"Resent-From: alice@example.org\r\n" * 40 + b"\r\n"
    assert verdict(data) == (550, "5.6.0 Too many sender fields")


# --- H3: header parsing is bounded ----------------------------------------------------------------


def test_h3_nested_parentheses_in_from_are_refused_not_a_crash() -> None:
    data = b"From: " + b"(" * 4000 + b"\r\n " + b"(" * 4000 + b"\r\n\r\nbody\r\n"
    reader = read_headers(data, max_line=8192)
    assert reader.headers.refusal() == (
        550,
        "5.6.0 Malformed From: field: comments nested too deep",
    )


@pytest.mark.parametrize(
    ("text", "addresses"),
    [
        ("Alice <alice@example.org>", [ALICE]),
        ('"Doe, Alice" <Alice@Example.ORG>, bob@example.org', [ALICE, BOB]),
        ("alice@example.org (Alice (the (real) one))", [ALICE]),
        (
            "Friends: alice@example.org, Bob <bob@example.org>;, c@example.org",
            [ALICE, BOB, "c@example.org"],
        ),
        ("<@relay.example,@other.example:alice@example.org>", [ALICE]),
        ('"alice"@example.org', [ALICE]),
        ('"a b"@example.org', ['"a b"@example.org']),
        ("a@[192.0.2.1]", ["a@[192.0.2.1]"]),
        ("alice @ example . org", [ALICE]),
        ("undisclosed-recipients:;", []),
    ],
)
def test_h3_parser_reads_the_address_list_grammar(text: str, addresses: list[str]) -> None:
    assert parse_address_list(text) == addresses


@pytest.mark.parametrize(
    "text",
    [
        "(" * (MAX_COMMENT_DEPTH + 1) + ")" * (MAX_COMMENT_DEPTH + 1) + " a@b.example",
        "(unclosed a@b.example",
        '"unclosed a@b.example',
        "<a@b.example",
        "a@b.example>",
        "Alice <a@b.example> trailing",
        "a@@b.example",
        "no-at-sign",
        "group: a@b.example",
        "a@b.example;",
        "a@b.example.",
        "bob@example.org <alice@example.org>",
    ],
)
def test_h3_parser_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(HeaderSyntaxError):
        parse_address_list(text)


def test_h3_comments_up_to_the_cap_are_read() -> None:
    depth = MAX_COMMENT_DEPTH
    assert parse_address_list("(" * depth + ")" * depth + " a@b.example") == ["a@b.example"]


_PIECES = st.sampled_from(
    ["(", ")", "\\", '"', "<", ">", ",", ";", ":", "@", ".", "[", "]", " ", "\t", "a", "Bob", "x.y"]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.lists(_PIECES, max_size=400).map("".join),
        st.tuples(st.integers(0, 9000), st.text(max_size=50), st.integers(0, 9000)).map(
            lambda t: "(" * t[0] + t[1] + ")" * t[2]
        ),
        st.tuples(st.integers(1, 3000), _PIECES).map(lambda t: t[1] * t[0]),
        st.text(max_size=300),
    )
)
def test_h3_parser_fuzz_only_refuses_and_stays_bounded(text: str) -> None:
    started = time.perf_counter()
    try:
        addresses = parse_address_list(text)
    except HeaderSyntaxError:
        pass
    else:
        assert all(isinstance(a, str) and "@" in a for a in addresses)
        # What we accept is shallow enough for the stdlib readers downstream (DKIM domain).
        email.utils.getaddresses([text])
    assert time.perf_counter() - started < 2.0  # linear: ~10 ms for 20 KB on a busy machine


_FRAGMENTS = st.sampled_from(
    [
        *(ALICE, BOB, "<alice@example.org>", "<bob@example.org>", "Bob ", '"Doe, A" ', "g: "),
        *(";", ",", " ", "(c)", "(\\)", "\\", '"', "(", ")", "<", ">", "@", ".", ":", "[x]"),
        *("=?utf-8?q?B=C3=B6b?=", '"a@b"', "@relay.example:"),
    ]
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(_FRAGMENTS, max_size=10).map("".join))
@example("g: bob@example.org;")
@example("Alice <alice@example.org> bob@example.org")
@example("(\\) bob@example.org) alice@example.org")
@example('"\\" bob@example.org" <alice@example.org>')
@example("bob@example.org <alice@example.org>")
@example("[x]g: ;")
def test_m1_python_reads_no_author_the_check_did_not_see(text: str) -> None:
    """Whatever the parser accepts, the stdlib reader of the stored message (and of the
    DKIM signing domain) finds no address the ownership check was not given."""
    try:
        checked = parse_address_list(text)
    except HeaderSyntaxError:
        return
    read = {a.lower() for _n, a in email.utils.getaddresses([text]) if a}
    # Quoting may differ ('"a@b".c@d' is '"a@b.c"@d' to us), never the mailbox.
    assert {a.replace('"', "") for a in read} <= {a.replace('"', "") for a in checked}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    depth=st.integers(0, 5000),
    folds=st.integers(0, 12),
    name=st.sampled_from([b"From", b"Sender", b"Resent-From", b"From "]),
)
def test_h3_header_scanner_fuzz_over_nesting_and_folding(
    depth: int, folds: int, name: bytes
) -> None:
    value = b"(" * depth + b"a@b.example" + b")" * depth
    step = max(1, len(value) // (folds + 1))
    folded = b"\r\n ".join(value[i : i + step] for i in range(0, len(value), step))
    started = time.perf_counter()
    reader = read_headers(name + b": " + folded + b"\r\n\r\nbody\r\n", max_line=20_000)
    refusal = reader.headers.refusal()
    if refusal is None:
        assert depth <= MAX_COMMENT_DEPTH and reader.headers.author_addresses() == ["a@b.example"]
    else:
        assert refusal[0] == 550 and refusal[1].startswith(("5.6.0", "5.7.1"))
    assert time.perf_counter() - started < 2.0


# --- M1/H3 end to end: a real server, the stored message read back ------------------------------


@pytest.fixture(scope="module")
def mail_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server(tmp_path_factory.mktemp("round2"))
    server.config.auth.passwd_file.write_text(
        "".join(f"{user}:{cheap_hash(pw)}\n" for user, pw in PASSWORDS.items())
    )
    yield server
    server.stop()


def submit(server: RunningServer, data: bytes) -> tuple[int, list[str]]:
    """Alice sends ``data`` to bob; the reply to the final dot. The session stays usable."""
    wire = server.wire().tls_session()
    try:
        assert wire.auth_plain(ALICE, PASSWORDS[ALICE]) == 235
        assert wire.code(f"MAIL FROM:<{ALICE}>") == 250
        assert wire.code(f"RCPT TO:<{BOB}>") == 250
        assert wire.code("DATA") == 354
        wire.send(data + b".\r\n")
        reply = wire.reply()
        assert wire.code("NOOP") == 250  # in sync, still open
        return reply
    finally:
        wire.close()


def stored_authors(server: RunningServer) -> dict[str, list[str]]:
    """For each message in bob's Maildir (by key), the authors Python's parser reads."""
    found = {}
    for key, message in server.maildir(BOB).items() if server.messages(BOB) else ():
        parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.compat32)
        found[key] = [a for _n, a in email.utils.getaddresses(parsed.get_all("From", []))]
    return found


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (padded_from(b" bob@example.org\r\nSubject: x\r\n\r\nhi\r\n"), "5.7.1"),
        (padded_from(b"From: bob@example.org\r\nSubject: x\r\n\r\nhi\r\n"), "5.7.1"),
        (b"From: alice@example.org\r\nFrom: bob@example.org\r\n\r\nhi\r\n", "5.6.0"),
        (b"Subject: x\r\nFrom : bob@example.org\r\n\r\nhi\r\n", "5.7.1"),
        (b"From: alice@example.org\r\nSender: bob@example.org\r\n\r\nhi\r\n", "5.7.1"),
        (b"From: alice@example.org\r\nResent-From: bob@example.org\r\n\r\nhi\r\n", "5.7.1"),
    ],
    ids=["padded_from", "second_from_after_padding", "two_from", "obs_from", "sender", "resent"],
)
def test_m1_author_bypasses_are_refused_end_to_end(
    mail_server: RunningServer, data: bytes, status: str
) -> None:
    before = len(mail_server.messages(BOB))
    code, lines = submit(mail_server, data)
    assert (code, lines[0][:5]) == (550, status), lines
    assert len(mail_server.messages(BOB)) == before


def test_m1_own_addresses_in_all_author_fields_are_accepted(mail_server: RunningServer) -> None:
    data = (
        b"From: Alice <alice@example.org>\r\nSender: alice@example.org\r\n"
        b"Resent-From: (me) alice@example.org\r\nSubject: x\r\n\r\nhi\r\n"
    )
    before = stored_authors(mail_server)
    code, _lines = submit(mail_server, data)
    assert code == 250
    after = stored_authors(mail_server)
    assert [after[key] for key in after.keys() - before.keys()] == [[ALICE]]


def test_h3_nested_parentheses_get_550_5_6_0_end_to_end(mail_server: RunningServer) -> None:
    before = len(mail_server.messages(BOB))
    data = b"From: " + b"(" * 4000 + b"\r\n " + b"(" * 4000 + b"\r\nSubject: x\r\n\r\nhi\r\n"
    code, lines = submit(mail_server, data)
    assert (code, lines[0][:5]) == (550, "5.6.0")
    assert len(mail_server.messages(BOB)) == before


# --- M4: the passwd file can never break every account ------------------------------------------


def run_admin(config: Path, *argv: str, stdin: str = "") -> str:
    out = io.StringIO()
    admin.run(["--config", str(config), *argv], out, io.StringIO(stdin))
    return out.getvalue()


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "clientid-mta.toml"
    path.write_text(merge_toml(""))
    return path


def passwd_of(config: Path) -> PasswdFile:
    return PasswdFile(config.parent / "data" / "passwd")


@pytest.mark.parametrize(
    "address",
    [
        '"x:y"@example.org',
        '"a/b"@example.org',
        '"../x"@example.org',
        "a/b@example.org",
        '"a,b"@example.org',
        '"#x"@example.org',
        "x@[192.0.2.1]",
    ],
)
def test_m4_user_add_refuses_what_it_cannot_store_or_deliver_to(
    config_file: Path, address: str
) -> None:
    run_admin(config_file, "user", "add", ALICE, stdin="pw\n")
    with pytest.raises(admin.AdminError, match="cannot be an account") as refused:
        run_admin(config_file, "user", "add", address, stdin="pw\n")
    assert "\n" not in str(refused.value)
    assert [a.address for a in passwd_of(config_file).accounts()] == [ALICE]
    assert run_admin(config_file, "user", "list") == f"{ALICE}\n"


@pytest.mark.parametrize("alias", ['"x:y"@example.org', '"a,b"@example.org'])
def test_m4_send_as_refuses_what_it_cannot_store(config_file: Path, alias: str) -> None:
    run_admin(config_file, "user", "add", ALICE, stdin="pw\n")
    with pytest.raises(admin.AdminError, match="cannot be a send-as address"):
        run_admin(config_file, "user", "send-as", ALICE, alias)
    with pytest.raises(admin.AdminError, match="address"):  # --send-as splits at commas
        run_admin(config_file, "user", "add", BOB, "--send-as", alias, stdin="pw\n")
    assert [(a.address, a.send_as) for a in passwd_of(config_file).accounts()] == [
        (ALICE, frozenset())
    ]


def test_m4_one_bad_line_is_skipped_and_logged_the_others_work(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_bytes(
        f"{ALICE}:{{ARGON2ID}}a\n"
        '"x:y"@example.org:{ARGON2ID}secret-hash-text\n'
        "b\xffd@example.org:{ARGON2ID}c\n".encode("latin-1")
        + f"{BOB}:{{ARGON2ID}}b:sales@example.org\n".encode()
    )
    with capturedLogs() as events:
        accounts = PasswdFile(path).accounts()
    assert [a.address for a in accounts] == [ALICE, BOB]
    skipped = [e for e in events if e.get("log_format", "").startswith("passwd file")]
    assert [e["lineno"] for e in skipped] == [2, 3]
    assert all(f"line {e['lineno']}" in e["reason"] for e in skipped)
    assert not any("secret-hash-text" in repr(e) for e in skipped)


def test_m4_rewrite_keeps_an_unreadable_line_as_a_comment(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    passwd = passwd_of(config_file)
    passwd.path.parent.mkdir(parents=True, exist_ok=True)
    passwd.path.write_text(f'"x:y"@example.org:{{ARGON2ID}}h\n{ALICE}:{{ARGON2ID}}a\n')
    run_admin(config_file, "user", "list")
    assert "line 1" in capsys.readouterr().err
    run_admin(config_file, "user", "add", BOB, stdin="pw\n")
    assert "line 1" in capsys.readouterr().err
    run_admin(config_file, "user", "send-as", BOB, "sales@example.org")
    text = passwd.path.read_text()
    assert text.count('#! unreadable, kept by clientid-mta: "x:y"@example.org:{ARGON2ID}h') == 1
    assert [a.address for a in passwd.accounts()] == [ALICE, BOB]
    assert parse_accounts(passwd.path.read_bytes())[1] == []


def test_m4_bad_line_does_not_stop_logins(make_server: Callable[..., RunningServer]) -> None:
    server = make_server()
    server.config.auth.passwd_file.write_text(
        f'"x:y"@example.org:{cheap_hash("x")}\n{ALICE}:{cheap_hash(PASSWORDS[ALICE])}\n'
    )
    wire = server.wire().tls_session()
    try:
        assert wire.auth_plain(ALICE, PASSWORDS[ALICE]) == 235
    finally:
        wire.close()
    assert "added" in server.admin("user", "add", BOB, stdin="pw\n")


# The property: whatever the writer (and so ``user add``) accepts, the reader reads back
# identically; the writer refuses the rest with PasswdFileError and never writes it.
_ADDRESS_CHARS = st.sampled_from([*"abcXYZ019.-_+/#:,\"'@ *\\\n\r\t[]()<>!", "é", "\u2028"])
_ADDRESSES = st.one_of(
    st.lists(_ADDRESS_CHARS, min_size=0, max_size=20).map("".join),
    st.tuples(
        st.from_regex(r"[a-z0-9.+_/#-]{1,10}", fullmatch=True),
        st.sampled_from(
            ["example.org", "Example.ORG", "x-y.example", "-bad.example", "[192.0.2.1]"]
        ),
    ).map(lambda t: f"{t[0]}@{t[1]}"),
    st.sampled_from(['"x:y"@example.org', '"a/b"@example.org', '"../x"@example.org', "*"]),
)
_HASHES = st.one_of(
    st.just("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"),
    st.from_regex(r"\{[A-Z0-9-]{1,12}\}[!-~]{1,30}", fullmatch=True),
    st.text(max_size=30),
)


@settings(max_examples=400, deadline=None)
@given(address=_ADDRESSES, send_as=st.frozensets(_ADDRESSES, max_size=4), hashed=_HASHES)
def test_m4_whatever_the_writer_accepts_the_reader_reads_back(
    address: str, send_as: frozenset[str], hashed: str
) -> None:
    account = Account(address, hashed, send_as)
    try:
        line = format_line(account)
    except PasswdFileError:
        return
    assert line.endswith("\n") and line.count("\n") == 1
    assert parse_line(line, 1) == account
    accounts, unreadable = parse_accounts(b"# header\n" + line.encode() + b"bad line\n")
    assert accounts == {account.address: account}
    assert [u.lineno for u in unreadable] == [3]


@settings(max_examples=200, deadline=None)
@given(address=_ADDRESSES, send_as=st.lists(_ADDRESSES, max_size=3))
def test_m4_whatever_user_add_accepts_the_reader_reads_back(
    address: str, send_as: list[str]
) -> None:
    try:
        account_address = admin._storable(address, account=True)
        aliases = frozenset(admin._storable(a, account=False) for a in send_as)
    except admin.AdminError as refused:
        assert "\n" not in str(refused)
        return
    account = Account(
        account_address, "{ARGON2ID}$argon2id$v=19$m=8,t=1,p=1$c2FsdA$aGFzaA", aliases
    )
    assert parse_line(format_line(account), 1) == account
    # ...and it is a mailbox the Maildir code can create.
    local = account_address.rpartition("@")[0]
    assert local and not local.startswith(".") and "/" not in local


def test_m1_from_after_a_line_that_is_no_field_is_still_checked() -> None:
    data = b"Subject: x\r\nnot a field\r\nFrom: bob@example.org\r\n\r\nbody\r\n"
    assert verdict(data) == [BOB]
