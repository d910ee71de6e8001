"""The issue's headline: a first message with a client identity lands durably in Maildir,
and an unknown device is refused exactly like a wrong password."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from clientid_mta.auth.passwd_file import Account, PasswdFile
from clientid_mta.delivery.maildir import MaildirRoot
from clientid_mta.delivery.router import LocalRouter
from tests.conftest import THUNDERBIRD_UUID, RunningServer

MESSAGE = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: first\r\n\r\nHello Bob.\r\n"


def test_first_message_with_client_identity_lands_in_maildir(server: RunningServer) -> None:
    client = server.smtp()
    assert client.has_extn("clientid")
    assert client.docmd("CLIENTID", f"UUID {THUNDERBIRD_UUID}") == (250, b"2.0.0 OK")
    client.login("alice@example.org", "alice-password")
    refused = client.sendmail("alice@example.org", ["bob@example.org"], MESSAGE)
    client.quit()
    assert refused == {}
    [stored] = server.messages("bob@example.org")
    assert stored["Subject"] == "first"
    body = stored.get_payload()
    assert isinstance(body, str)  # not multipart
    assert body.strip() == "Hello Bob."
    assert "with ESMTPSA (TLSv1.3)" in stored["Received"]


def test_unknown_device_is_refused_like_a_wrong_password(server: RunningServer) -> None:
    first = server.smtp()
    first.docmd("CLIENTID", f"UUID {THUNDERBIRD_UUID}")
    first.login("alice@example.org", "alice-password")  # trusted on first use
    first.quit()

    replies = []
    for clientid, password in (
        ("UUID 0b6b2f7e-0000-4000-8000-000000000001", "alice-password"),  # unknown device
        (f"UUID {THUNDERBIRD_UUID}", "wrong-password"),  # known device, wrong password
    ):
        client = server.smtp()
        client.docmd("CLIENTID", clientid)
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login("alice@example.org", password)
        replies.append((refused.value.smtp_code, refused.value.smtp_error))
        client.close()
    assert replies[0] == replies[1] == (535, b"5.7.8 Authentication credentials invalid")


def test_implicit_tls_port_delivers(server: RunningServer) -> None:
    client = server.smtp(implicit=True)
    assert not client.has_extn("starttls")
    client.docmd("CLIENTID", f"UUID {THUNDERBIRD_UUID}")
    client.login("alice@example.org", "alice-password")
    client.sendmail("alice@example.org", ["alice@example.org"], MESSAGE.replace(b"bob", b"alice"))
    client.quit()
    assert len(server.messages("alice@example.org")) >= 1


def test_S11_each_local_recipient_gets_its_own_durable_copy(server: RunningServer) -> None:
    client = server.smtp()
    client.login("alice@example.org", "alice-password")
    client.sendmail("alice@example.org", ["alice@example.org", "bob@example.org"], MESSAGE)
    client.quit()
    for address in ("alice@example.org", "bob@example.org"):
        [stored] = [m for m in server.messages(address) if m["Subject"] == "first"]
        body = stored.get_payload()
        assert isinstance(body, str)  # not multipart
        assert body.strip() == "Hello Bob."


@pytest.mark.parametrize(
    ("recipient", "reply"),
    [
        ("nobody@example.org", "550 5.1.1 No such user here"),
        ("Bob@EXAMPLE.org", "250 2.1.5 Ok"),
        ("someone@elsewhere.example", "250 2.1.5 Ok"),  # queued for the relay (test_relay.py)
    ],
)
def test_recipients_are_routed_by_domain_and_user(
    server: RunningServer, recipient: str, reply: str
) -> None:
    wire = server.wire().tls_session()
    assert wire.auth_plain("alice@example.org", "alice-password") == 235
    assert wire.code("MAIL FROM:<alice@example.org>") == 250
    code, [text] = wire.cmd(f"RCPT TO:<{recipient}>")
    assert f"{code} {text}" == reply


def test_without_local_domains_the_account_domains_are_local(tmp_path: Path) -> None:
    passwords = PasswdFile(tmp_path / "passwd")
    passwords.save([Account("alice@example.org", "{ARGON2ID}x")])
    router = LocalRouter(passwords, None, MaildirRoot(tmp_path / "mail"))
    assert router.is_local("EXAMPLE.org") and not router.is_local("example.net")
    passwords.save([Account("carol@example.net", "{ARGON2ID}x")])
    assert router.is_local("example.net") and not router.is_local("example.org")
