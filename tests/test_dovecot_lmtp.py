"""Issue 13, point 2: local mail delivered by LMTP to a real Dovecot, read back over IMAP.

A private Dovecot (``tests/dovecot_server.py``) reads our passwd file as its passdb and
takes local mail on its LMTP socket; our server (``[delivery] lmtp``) hands it every
local recipient. Dovecot stopped: ``451`` at the end of data and nothing acknowledged
lost; back: the same server delivers again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RunningServer
from tests.dovecot_server import DovecotServer, MakeDovecot, dovecot_servers
from tests.test_abuse_throttling import ACCEPTED, REFUSED, attempt, new_token

make_dovecot = pytest.fixture(name="make_dovecot")(dovecot_servers)

ALICE, ALICE_PW = "alice@example.org", "alice-password"
BOB, BOB_PW = "bob@example.org", "bob-password"


def lmtp_server(
    make_server: Callable[..., RunningServer], make_dovecot: MakeDovecot, tmp_path: Path
) -> tuple[RunningServer, DovecotServer]:
    passwd = tmp_path / "server" / "data" / "passwd"
    passwd.parent.mkdir(parents=True)
    dovecot = make_dovecot(passwd)
    server = make_server(f'[delivery]\nlmtp = "{dovecot.lmtp_socket}"\n')
    server.add_user(ALICE, ALICE_PW)
    server.add_user(BOB, BOB_PW)
    return server, dovecot


def message(subject: str) -> bytes:
    return (
        f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: {subject}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        "Grüße aus der Warteschlange.\r\n.a line that starts with a dot\r\n"
    ).encode()


def send(server: RunningServer, recipients: list[str], data: bytes) -> tuple[int, bytes]:
    client = server.smtp()
    try:
        client.login(ALICE, ALICE_PW)
        assert client.mail(ALICE, ["BODY=8BITMIME"])[0] == 250
        for recipient in recipients:
            assert client.rcpt(recipient)[0] == 250
        return client.data(data)
    finally:
        client.close()


def test_two_local_recipients_arrive_by_lmtp_and_read_back_over_imap(
    make_server: Callable[..., RunningServer], make_dovecot: MakeDovecot, tmp_path: Path
) -> None:
    server, dovecot = lmtp_server(make_server, make_dovecot, tmp_path)
    code, _text = send(server, [BOB, "Alice@Example.org"], message("by lmtp"))
    assert code == 250
    for user, password in ((BOB, BOB_PW), (ALICE, ALICE_PW)):
        [stored] = dovecot.imap_messages(user, password)
        assert "Grüße aus der Warteschlange.".encode() in stored  # 8 bits intact
        assert b"\r\n.a line that starts with a dot\r\n" in stored  # dots unstuffed
        assert b"Subject: by lmtp" in stored
    assert server.messages(BOB) == []  # Dovecot stored it, not our Maildir writer
    # The envelope recipient reaches Dovecot's delivery (and Sieve) as the client wrote it.
    assert "to_envelope=Alice@" in dovecot.log()
    # A second message goes over the same LMTP connection.
    assert send(server, [BOB], message("again"))[0] == 250
    assert len(dovecot.imap_messages(BOB, BOB_PW)) == 2
    assert dovecot.log().count("Connect from local") == 1


def test_dovecot_stopped_is_451_at_the_end_of_data_and_back_delivers_again(
    make_server: Callable[..., RunningServer], make_dovecot: MakeDovecot, tmp_path: Path
) -> None:
    server, dovecot = lmtp_server(make_server, make_dovecot, tmp_path)
    dovecot.stop()
    code, text = send(server, [BOB, ALICE], message("while down"))
    assert (code, text) == (451, b"4.3.0 Local error in processing, try again later")
    dovecot.start()
    assert not any(dovecot.mail_root.glob("example.org/*/new/*"))  # nothing half-delivered
    code, _text = send(server, [BOB, ALICE], message("while down"))
    assert code == 250
    assert len(dovecot.imap_messages(BOB, BOB_PW)) == 1
    assert len(dovecot.imap_messages(ALICE, ALICE_PW)) == 1


def test_an_unknown_local_recipient_is_still_refused_at_rcpt(
    make_server: Callable[..., RunningServer], make_dovecot: MakeDovecot, tmp_path: Path
) -> None:
    server, _dovecot = lmtp_server(make_server, make_dovecot, tmp_path)
    client = server.smtp()
    try:
        client.login(ALICE, ALICE_PW)
        assert client.mail(ALICE)[0] == 250
        assert client.rcpt("nobody@example.org") == (550, b"5.1.1 No such user here")
    finally:
        client.close()


def test_notices_to_account_holders_go_by_lmtp_too(
    make_server: Callable[..., RunningServer], make_dovecot: MakeDovecot, tmp_path: Path
) -> None:
    server, dovecot = lmtp_server(make_server, make_dovecot, tmp_path)
    assert attempt(server, new_token(), ALICE, ALICE_PW) == ACCEPTED  # her first device
    assert attempt(server, new_token(), ALICE, ALICE_PW) == REFUSED  # a second one waits
    notices = dovecot.imap_messages(ALICE, ALICE_PW)
    subjects = [line for n in notices for line in n.split(b"\r\n") if line.startswith(b"Subject:")]
    assert subjects == [
        b"Subject: A new device can now send mail as you",
        b"Subject: A new device was refused on your mail account",
    ]
    assert server.messages(ALICE) == []  # not written to Maildir by us
