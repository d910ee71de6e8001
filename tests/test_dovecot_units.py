"""Issue 13: the Dovecot auth-client protocol, the send-as file and the socket key, in
memory (StringTransport, a clock): no Dovecot needed."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport

from clientid_mta.auth.dovecot import (
    DovecotAuth,
    DovecotAuthProtocol,
    DovecotUnavailable,
    LoginContext,
    auth_line,
)
from clientid_mta.auth.dovecot_accounts import DovecotAccounts, parse_send_as_line
from clientid_mta.auth.passwd_file import PasswdFileError
from clientid_mta.config.checks import Invalid, socket_address

HANDSHAKE = (
    b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t7\nCUID\t1\n"
    b"COOKIE\t0123\nDONE\n"
)
CONTEXT = LoginContext("192.0.2.7", 40000, "192.0.2.1", 587, True, "s1", "0123456789abcdef")


def connected() -> tuple[DovecotAuthProtocol, StringTransport]:
    protocol = DovecotAuthProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def sent_lines(transport: StringTransport) -> list[list[str]]:
    return [line.split("\t") for line in transport.value().decode().splitlines()]


def test_the_handshake_then_an_auth_line_with_the_fingerprint_never_the_token() -> None:
    protocol, transport = connected()
    assert sent_lines(transport)[0] == ["VERSION", "1", "2"]
    assert sent_lines(transport)[1][0] == "CPID"
    ready: list[DovecotAuthProtocol] = []
    protocol.ready.addCallback(ready.append)
    protocol.dataReceived(HANDSHAKE)
    assert ready == [protocol]
    transport.clear()
    protocol.check("carol@example.org", "pw\tx", CONTEXT)
    [line] = sent_lines(transport)
    assert line[:4] == ["AUTH", "1", "PLAIN", "service=smtp"]
    fields = dict(f.split("=", 1) if "=" in f else [f, ""] for f in line[4:])
    assert fields["client_id"] == "0123456789abcdef"
    assert (fields["rip"], fields["rport"], fields["lip"], fields["lport"]) == (
        "192.0.2.7",
        "40000",
        "192.0.2.1",
        "587",
    )
    assert "secured" in fields and fields["session"] == "s1"
    assert base64.b64decode(fields["resp"]) == b"\0carol@example.org\0pw\tx"


def test_answers_are_matched_by_id_in_any_order() -> None:
    protocol, _transport = connected()
    protocol.dataReceived(HANDSHAKE)
    first = protocol.check("a@example.org", "1", CONTEXT)
    second = protocol.check("b@example.org", "2", CONTEXT)
    results: dict[str, object] = {}
    first.addCallback(lambda ok: results.setdefault("first", ok))
    second.addCallback(lambda ok: results.setdefault("second", ok))
    protocol.dataReceived(
        b"FAIL\t2\tuser=b@example.org\nsomething new\nOK\t1\tuser=A@Example.org\n"
    )
    assert results == {"first": True, "second": False}


@pytest.mark.parametrize(
    "reply", [b"OK\t1\tuser=alice@example.org\n", b"OK\t1\n", b"OK\t1\tuser=\n"]
)
def test_an_ok_for_another_name_than_the_one_asked_is_a_refusal(reply: bytes) -> None:
    """Dovecot may accept "alice@any-bank.example" as alice (a domain it ignores): that
    typed name must not become an account, a local domain or a send-as address here."""
    protocol, _transport = connected()
    protocol.dataReceived(HANDSHAKE)
    answer = protocol.check("alice@any-bank.example", "pw", CONTEXT)
    results: list[bool] = []
    answer.addCallback(results.append)
    protocol.dataReceived(reply)
    assert results == [False]


def test_only_an_account_address_is_learnt(tmp_path: Path) -> None:
    accounts = DovecotAccounts(tmp_path / "passwd", None)
    assert accounts.learn("not an address") is None
    assert accounts.get("not an address") is None
    learnt = accounts.learn("Carol@Example.org")
    assert learnt is not None and learnt.address == "carol@example.org"


def test_a_temporary_failure_and_a_lost_connection_are_unavailable() -> None:
    protocol, _transport = connected()
    protocol.dataReceived(HANDSHAKE)
    temp = protocol.check("a@example.org", "1", CONTEXT)
    lost = protocol.check("a@example.org", "2", CONTEXT)
    protocol.dataReceived(b"FAIL\t1\ttemp\n")
    failures = []
    temp.addErrback(lambda f: failures.append(f.check(DovecotUnavailable)))
    lost.addErrback(lambda f: failures.append(f.check(DovecotUnavailable)))
    protocol.connectionLost(None)
    assert failures == [DovecotUnavailable, DovecotUnavailable]
    after = protocol.check("a@example.org", "3", CONTEXT)
    after.addErrback(lambda f: failures.append(f.check(DovecotUnavailable)))
    assert len(failures) == 3


@pytest.mark.parametrize(
    "reply",
    [
        b"VERSION\t2\t0\n",  # a protocol we do not speak
        b"VERSION\t1\t2\nMECH\tLOGIN\nDONE\n",  # no PLAIN
        b"DONE\n",  # no VERSION at all
        b"x" * 20000,  # not Dovecot
    ],
)
def test_a_server_that_is_not_a_usable_dovecot_is_left_at_once(reply: bytes) -> None:
    protocol, transport = connected()
    failures = []
    protocol.ready.addErrback(lambda f: failures.append(f.check(DovecotUnavailable)))
    protocol.dataReceived(reply)
    assert transport.disconnecting
    assert failures == [DovecotUnavailable]


def test_no_answer_in_time_is_unavailable() -> None:
    reactor = MemoryReactorClock()
    auth = DovecotAuth(reactor, "unix:/nonexistent/auth-client", timeout=5, failure_delay=0)
    failures = []
    auth.check("a@example.org", "pw", CONTEXT).addErrback(
        lambda f: failures.append(f.check(DovecotUnavailable))
    )
    assert len(reactor.unixClients) == 1  # connecting; the socket never answers
    reactor.advance(5)
    assert failures == [DovecotUnavailable]


def test_the_send_as_file() -> None:
    account = parse_send_as_line("Carol@Example.org: sales@example.org, *", 1)
    assert account is not None
    assert account.address == "carol@example.org"
    assert account.may_send_as("sales@example.org") and account.may_send_as("x@y.example")
    assert parse_send_as_line("# a comment", 2) is None
    with pytest.raises(PasswdFileError):
        parse_send_as_line("not an address:x@example.org", 3)


def test_accounts_are_the_passwd_file_the_send_as_file_and_those_dovecot_accepted(
    tmp_path: object,
) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path))
    (folder / "passwd").write_text("alice@example.org:{ARGON2ID}$argon2id$x\n")
    (folder / "send-as").write_text("carol@example.org:info@example.org\n")
    accounts = DovecotAccounts(folder / "passwd", folder / "send-as")
    assert accounts.get("alice@example.org") is not None
    carol = accounts.get("carol@example.org")
    assert carol is not None and carol.may_send_as("info@example.org")
    assert accounts.get("dave@example.org") is None
    accounts.learn("Dave@example.org")
    assert accounts.get("dave@example.org") is not None
    assert [a.address for a in accounts.accounts()] == [
        "alice@example.org",
        "carol@example.org",
        "dave@example.org",
    ]


@pytest.mark.parametrize(
    ("given", "read"),
    [
        ("/run/dovecot/lmtp", "unix:/run/dovecot/lmtp"),
        ("unix:/run/dovecot/auth-client", "unix:/run/dovecot/auth-client"),
        ("tcp:127.0.0.1:24", "tcp:127.0.0.1:24"),
        ("", ""),
    ],
)
def test_socket_addresses(given: str, read: str) -> None:
    assert socket_address(given) == read


@pytest.mark.parametrize("bad", ["run/dovecot/lmtp", "tcp:127.0.0.1", 24])
def test_bad_socket_addresses(bad: object) -> None:
    with pytest.raises(Invalid):
        socket_address(bad)


def test_auth_line_escapes_what_would_split_it() -> None:
    line = auth_line(3, "a@example.org", "p", LoginContext(session="a\tb\nc"))
    assert b"\n" not in line and line.count(b"\t") == 5


# --- issue 13, point 3: one passwd file for both --------------------------------------

SEVEN = (
    "alice@example.org:{ARGON2ID}$argon2id$v=19$x:1000:1000:Alice:/home/alice::"
    "userdb_mail=maildir:~/Mail send_as=sales@example.org,*  nopassword=n"
)


def test_the_seven_field_form_is_read_with_send_as_in_an_extra_field() -> None:
    from clientid_mta.auth.passwd_file import DovecotFields, format_line, parse_line

    account = parse_line(SEVEN, 1)
    assert account is not None
    assert account.address == "alice@example.org"
    assert account.password_hash == "{ARGON2ID}$argon2id$v=19$x"
    assert account.send_as == {"sales@example.org", "*"}
    assert account.dovecot == DovecotFields(
        ("1000", "1000", "Alice", "/home/alice", ""), ("userdb_mail=maildir:~/Mail", "nopassword=n")
    )
    # Written back with Dovecot's fields as they were (send_as first, then the others).
    line = format_line(account)
    assert line == (
        "alice@example.org:{ARGON2ID}$argon2id$v=19$x:1000:1000:Alice:/home/alice::"
        "send_as=*,sales@example.org userdb_mail=maildir:~/Mail nopassword=n\n"
    )
    assert parse_line(line, 1) == account


def test_today_s_form_still_reads_and_either_form_is_written() -> None:
    from clientid_mta.auth.passwd_file import format_line, parse_line

    short = "bob@example.org:{ARGON2ID}$argon2id$y:bob2@example.org"
    account = parse_line(short, 1)
    assert account is not None and account.dovecot is None
    assert account.send_as == {"bob2@example.org"}
    assert format_line(account) == short + "\n"
    seven = format_line(account, seven_fields=True)
    assert seven == "bob@example.org:{ARGON2ID}$argon2id$y::::::send_as=bob2@example.org\n"
    again = parse_line(seven, 1)
    assert again is not None and again.send_as == account.send_as


@pytest.mark.parametrize(
    "line",
    [
        "a@example.org:{PLAIN}x:1:2",  # neither form
        "a@example.org:{PLAIN}x:1:2:g:/h:/s:send_as=not an address",
        "not-an-address:{PLAIN}x:::::",
    ],
)
def test_lines_of_neither_form_are_refused(line: str) -> None:
    from clientid_mta.auth.passwd_file import parse_line

    with pytest.raises(PasswdFileError):
        parse_line(line, 1)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[auth]\nbackend = "dovecot"\n',
            'config error: [auth] backend = "dovecot" needs dovecot_socket; set it to '
            'Dovecot\'s auth-client socket, e.g. "/run/dovecot/auth-client" or '
            '"tcp:127.0.0.1:12345".',
        ),
        (
            '[auth]\nbackend = "ldap"\n',
            'config error: [auth] backend must be one of "passwd-file", "dovecot".',
        ),
        (
            '[delivery]\nlmtp = "lmtp"\n',
            "config error: [delivery] lmtp must be an absolute socket path such as "
            '"/run/dovecot/lmtp" or "tcp:host:port", not \'lmtp\'.',
        ),
    ],
)
def test_config_mistakes_are_one_sentence(toml: str, message: str, tmp_path: object) -> None:
    from pathlib import Path

    from clientid_mta.config import ConfigError, load_config

    path = Path(str(tmp_path)) / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value) == message


def test_the_blocking_check_refuses_to_run_on_the_reactor_thread() -> None:
    """Called on the reactor it would wait for the reactor it blocks: it says so instead."""
    from twisted.internet import defer

    from tests.conftest import _ensure_reactor
    from tests.typed_reactor import blockingCallFromThread, reactor

    _ensure_reactor()
    auth = DovecotAuth(reactor, "unix:/nowhere", timeout=5)
    with pytest.raises(DovecotUnavailable):
        blockingCallFromThread(
            reactor, lambda: defer.maybeDeferred(auth.verify, "a@example.org", "pw", CONTEXT)
        )


class RightPasswords:
    """A password service that accepts every password, and refuses slowly (like Dovecot)."""

    failure_delay = 1.5

    def verify(self, username: str, password: str, context: object) -> bool:
        return True


def test_c12_a_policy_refusal_through_dovecot_waits_like_its_wrong_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dovecot answers a wrong password after its failure delay; a right password that
    our device policy refuses must take as long (C12), or the speed of the 535 would
    confirm a stolen password. An accepted login does not wait. The wait is on the
    reactor's clock, not a sleep in a login thread: four refused logins would otherwise
    hold every login thread for the whole delay."""
    from twisted.cred.error import UnauthorizedLogin
    from twisted.internet import defer
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.python.failure import Failure

    from clientid_mta.auth.checker import ClientIdChecker
    from clientid_mta.auth.credentials import ClientIdUsernamePassword
    from clientid_mta.auth.passwd_file import Account, PasswdFile, hash_password
    from clientid_mta.config import ClientIdConfig
    from clientid_mta.devices.policy import DevicePolicy
    from clientid_mta.devices.sqlite_store import open_sqlite_stores
    from clientid_mta.smtp.clientid import ClientIdentity

    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    stores = open_sqlite_stores(tmp_path / "devices.sqlite3")
    config = ClientIdConfig(key_file=tmp_path / "k", device_store=tmp_path / "d")
    policy = DevicePolicy(config, stores.devices, b"k" * 32, None)
    passwd = PasswdFile(tmp_path / "passwd")
    passwd.save([Account("dora@example.org", hash_password("not-what-dovecot-checks"))])
    checker = ClientIdChecker(passwd, policy, service=RightPasswords())
    checker.run_in_thread = lambda function, *args: defer.maybeDeferred(function, *args)
    checker.clock = clock = Clock()

    def login(device: str) -> defer.Deferred[bytes | tuple[()]]:
        identity = ClientIdentity("UUID", device)
        peer = IPv4Address("TCP", "192.0.2.7", 40000)
        creds = ClientIdUsernamePassword("dora@example.org", "pw", identity, peer)
        return checker.requestAvatarId(creds)

    first = login("0b6b2f7e-1c2d-4e5f-8a9b-0c1d2e3f4a5b")
    assert first.result == b"dora@example.org"  # trusted on first use, at once
    second = login("1c7c3f8f-2d3e-4f60-9bac-1d2e3f4a5b6c")
    refused: list[Failure] = []
    second.addErrback(refused.append)
    clock.advance(RightPasswords.failure_delay - 0.01)
    assert refused == []  # still waiting, like Dovecot's refusal of a wrong password
    clock.advance(0.01)
    assert len(refused) == 1 and refused[0].check(UnauthorizedLogin)
    assert sleeps == [] and clock.getDelayedCalls() == []  # no thread slept


def test_C12_the_configured_failure_delay_is_the_one_the_service_waits(tmp_path: Path) -> None:
    """[auth] dovecot_failure_delay (and the socket and timeout) reach the service the
    checker asks, so a policy refusal waits what the admin set (C12)."""
    from twisted.internet import task

    from clientid_mta.config import load_config
    from clientid_mta.server.components import _password_backend

    config_file = tmp_path / "c.toml"
    config_file.write_text(
        '[server]\ndata_dir = "data"\n[auth]\nbackend = "dovecot"\n'
        'dovecot_socket = "tcp:127.0.0.1:12345"\ndovecot_timeout = 7\n'
        "dovecot_failure_delay = 4\n"
    )
    _accounts, service = _password_backend(load_config(config_file), task.Clock())
    assert service is not None
    assert (service.where, service.timeout, service.failure_delay) == (
        "tcp:127.0.0.1:12345",
        7,
        4,
    )
