"""Unit tests for the pure parts: grammar, addresses, DATA reader, config, passwords, policy."""

from __future__ import annotations

import os
from pathlib import Path

import bcrypt
import pytest

from clientid_mta.auth.passwd_file import Account, PasswdFile, hash_password, verify_password
from clientid_mta.config import load_config
from clientid_mta.delivery.maildir import MaildirRoot, UnsafeMailboxName
from clientid_mta.devices.keys import load_or_create_server_key
from clientid_mta.devices.policy import DevicePolicy, Where
from clientid_mta.devices.sqlite_store import SQLiteDeviceRegistry, create_schema
from clientid_mta.devices.store import PENDING, REVOKED, TRUSTED
from clientid_mta.smtp.addresses import AddressSyntaxError, parse_path
from clientid_mta.smtp.body import BodyReader
from clientid_mta.smtp.clientid import (
    ClientIdSyntaxError,
    device_key,
    parse_clientid,
)
from clientid_mta.smtp.network import network_prefix

# --- CLIENTID grammar (C5, C13, C14) -------------------------------------------------


@pytest.mark.parametrize(
    "arguments",
    [
        b"",
        b"UUID",
        b"UUID a b",
        b"U_ID tok",
        b"A" * 17 + b" tok",
        b"UUID " + b"x" * 129,
        b"UUID t\xc3\xa9",
        b"UUID a\x01b",
        b"UUID\ttok",
    ],
)
def test_C5_parser_rejects(arguments: bytes) -> None:
    with pytest.raises(ClientIdSyntaxError):
        parse_clientid(arguments)


def test_C5_parser_accepts_limits() -> None:
    identity = parse_clientid(b"A" * 16 + b" " + b"~" * 128)
    assert identity.type == "A" * 16 and identity.token == "~" * 128


def test_C13_uuid_tokens_lower_cased_others_exact() -> None:
    assert parse_clientid(b"tb-uuid ABC-def").token == "abc-def"
    assert parse_clientid(b"tb-uuid ABC").type == "TB-UUID"
    assert parse_clientid(b"license AbC").token == "AbC"


def test_C14_identity_never_shows_its_token() -> None:
    identity = parse_clientid(b"LICENSE sekrit-token-value")
    assert "sekrit" not in repr(identity) and "sekrit" not in str(identity)


def test_C14_server_key_created_once_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "clientid.key"
    key = load_or_create_server_key(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_or_create_server_key(path) == key and len(key) == 32
    identity = parse_clientid(b"UUID 1234")
    assert device_key(key, identity) != device_key(os.urandom(32), identity)


# --- addresses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "address", "params"),
    [
        (b"FROM:<alice@Example.ORG>", "alice@example.org", {}),
        (
            b"from: <a.b+c@example.org> SIZE=100 BODY=8BITMIME",
            "a.b+c@example.org",
            {"SIZE": "100", "BODY": "8BITMIME"},
        ),
        (b"FROM:<>", "", {}),
        (b"FROM:<@relay.example:bob@example.org>", "bob@example.org", {}),
        (b'FROM:<"odd name"@example.org>', '"odd name"@example.org', {}),
        (b"FROM:alice@example.org", "alice@example.org", {}),
    ],
)
def test_parse_path_accepts(arguments: bytes, address: str, params: dict[str, str]) -> None:
    path = parse_path(arguments, "FROM", allow_null=True)
    assert (path.address, path.params) == (address, params)


@pytest.mark.parametrize(
    "arguments",
    [
        b"TO:<>",
        b"TO:<no-at-sign>",
        b"TO:<a@b",
        b"TO:<a b@example.org>",
        b"TO:<\xff@example.org>",
        b"FROM:<a@example.org>",
        b"TO:<a@example.org>BAD",
        b"TO:<a@-bad-.org>",
        b"TO:<" + b"x" * 65 + b"@example.org>",
        b"TO:<a@example.org> SIZE=1=2",
    ],
)
def test_parse_path_rejects(arguments: bytes) -> None:
    with pytest.raises(AddressSyntaxError):
        parse_path(arguments, "TO", allow_null=False)


# --- the DATA reader (S7, S8, S10) ---------------------------------------------------


def read_body(
    chunks: list[bytes], max_size: int = 10_000, max_line: int = 100
) -> tuple[BodyReader, list[bytes], bytes]:
    lines: list[bytes] = []
    reader = BodyReader(lines.append, max_size, max_line)
    buffer = bytearray()
    for index, chunk in enumerate(chunks):
        buffer += chunk
        consumed, done = reader.feed(buffer)
        del buffer[:consumed]
        assert len(buffer) <= max_line + 1
        if done:
            return reader, lines, bytes(buffer) + b"".join(chunks[index + 1 :])
    raise AssertionError("no end of data")


def test_S10_body_reader_ends_only_at_crlf_dot_crlf() -> None:
    body = b"Subject: x\r\n\r\na\n.\nb\r.\nc\n.\r\nd\r\n..e\r\n.\r\nNEXT"
    for size in (1, 3, 1000):
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
        reader, lines, rest = read_body(chunks)
        assert rest == b"NEXT" and reader.bare_newline
    reader, lines, _ = read_body([b"Subject: x\r\n\r\n..dot\r\n.\r\n"])
    assert lines == [b"Subject: x", b"", b".dot"] and not reader.failed


def test_S8_body_reader_overlong_line_is_bounded_and_skipped() -> None:
    chunks = [b"Subject: x\r\n\r\n"] + [b"y" * 50] * 100 + [b"\r\nMAIL FROM:<a@b>\r\n.\r\nNEXT"]
    reader, _lines, rest = read_body(chunks)
    assert reader.line_too_long and rest == b"NEXT"


def test_S7_body_reader_counts_size() -> None:
    reader, _lines, _ = read_body(
        [b"x: y\r\n" + b"z" * 90 + b"\r\n" * 200 + b".\r\n"], max_size=300
    )
    assert reader.too_big


def test_S6_body_reader_collects_from_header() -> None:
    reader, _lines, _ = read_body(
        [b"From: A <a@Example.org>,\r\n b@example.org\r\nX: y\r\n\r\nFrom: c@d\r\n.\r\n"]
    )
    assert reader.headers.author_addresses() == ["a@example.org", "b@example.org"]


def test_body_without_headers_is_separated_from_received() -> None:
    _reader, lines, _ = read_body([b"just text\r\n.\r\n"])
    assert lines == [b"", b"just text"]


# --- passwords -----------------------------------------------------------------------


def test_passwords_argon2id_and_bcrypt_verify() -> None:
    assert verify_password(hash_password("pw"), "pw")
    assert not verify_password(hash_password("pw"), "PW")
    blf = "{BLF-CRYPT}" + bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    assert verify_password(blf, "pw") and not verify_password(blf, "nope")
    assert not verify_password(None, "pw")
    assert not verify_password("{PLAIN}pw", "pw")


def test_passwd_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    passwd = PasswdFile(tmp_path / "passwd")
    assert passwd.get("a@example.org") is None
    passwd.save([Account("a@example.org", "{ARGON2ID}x")])
    assert passwd.get("A@Example.org") is not None
    passwd.save([Account("b@example.org", "{ARGON2ID}y", frozenset({"*"}))])
    assert passwd.get("a@example.org") is None
    assert passwd.get("b@example.org").may_send_as("anyone@else.example")  # type: ignore[union-attr]


# --- Maildir -------------------------------------------------------------------------


def test_S11_maildir_commit_is_complete_and_abort_leaves_nothing(tmp_path: Path) -> None:
    root = MaildirRoot(tmp_path / "mail")
    stored = root.deliver_bytes("example.org", "alice", b"Subject: x\n\nbody\n")
    assert stored.parent.name == "new" and stored.read_bytes() == b"Subject: x\n\nbody\n"
    pending = root.open_new("example.org", "alice")
    pending.write(b"partial")
    pending.abort()
    assert not list((tmp_path / "mail/example.org/alice/tmp").iterdir())
    assert len(list((tmp_path / "mail/example.org/alice/new").iterdir())) == 1


def test_maildir_refuses_names_and_links_that_leave_the_root(tmp_path: Path) -> None:
    root = MaildirRoot(tmp_path / "mail")
    for domain, localpart in (("example.org", "../x"), ("..", "x"), ("example.org", ".hidden")):
        with pytest.raises(UnsafeMailboxName):
            root.maildir(domain, localpart)
    (tmp_path / "mail").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "mail" / "evil.example").symlink_to(tmp_path / "outside")
    with pytest.raises(UnsafeMailboxName):
        root.maildir("evil.example", "bob")
    assert not list((tmp_path / "outside").iterdir())


# --- the device policy ---------------------------------------------------------------


def make_policy(tmp_path: Path, toml: str) -> DevicePolicy:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    settings = load_config(path).clientid
    create_schema(tmp_path / "d.sqlite3")
    return DevicePolicy(settings, SQLiteDeviceRegistry(tmp_path / "d.sqlite3"), b"k" * 32, None)


def test_policy_tofu_trusts_first_device_then_pends(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, "")
    first, second = parse_clientid(b"UUID 1"), parse_clientid(b"UUID 2")
    assert policy.decide("a@x", first, Where("net")).allowed
    assert policy.decide("a@x", first, Where("net")).allowed
    refused = policy.decide("a@x", second, Where("net"))
    assert not refused.allowed and refused.reason == "new_device_pending"
    states = {d.fingerprint: d.state for d in policy.store.devices_of("a@x")}
    assert sorted(states.values()) == [PENDING, TRUSTED]
    assert policy.decide("a@x", None, Where("net")).allowed  # allow_without_clientid = true


def test_policy_allowlist_and_revocation(tmp_path: Path) -> None:
    policy = make_policy(
        tmp_path, '[clientid]\npolicy = "allowlist"\nallow_without_clientid = false\n'
    )
    device = parse_clientid(b"UUID 1")
    assert not policy.decide("a@x", device, Where("net")).allowed
    assert not policy.decide("a@x", None, Where("net")).allowed
    fingerprint = policy.store.devices_of("a@x")[0].fingerprint
    policy.store.set_state("a@x", fingerprint, TRUSTED)
    assert policy.decide("a@x", device, Where("net")).allowed
    policy.store.set_state("a@x", fingerprint, REVOKED)
    assert policy.decide("a@x", device, Where("net")).reason == "device_revoked"


def test_policy_observe_records_but_never_refuses(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, '[clientid]\npolicy = "observe"\n')
    for token in (b"UUID 1", b"UUID 2", b"UUID 3"):
        assert policy.decide("a@x", parse_clientid(token), Where("net")).allowed
    assert len(policy.store.devices_of("a@x")) == 3


def test_network_prefixes() -> None:
    assert network_prefix("192.0.2.77") == "192.0.2.0/24"
    assert network_prefix("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert network_prefix("2001:db8:1:2ff::1") == "2001:db8:1:200::/56"
    assert network_prefix("garbage") == "unknown"
