"""Outbound mail end to end (issue 4): our server relays to a real SMTP peer on loopback.

The peer is ``tests/sink.py`` (or a second clientid-mta acting as the smarthost), MX
names are resolved through ``tests/dnsserver.py``, and every message is read back at
the peer or, for bounces, from the sender's Maildir with Python's ``mailbox``.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, cast

import pytest

from clientid_mta.outbound.queue import Envelope, QueueDir
from tests.conftest import RunningServer
from tests.dnsserver import running_dns
from tests.sink import Sink, running_sink, wait_until

MESSAGE = (
    "From: Alice <alice@example.org>\r\n"
    "To: Carol <carol@example.net>\r\n"
    "Subject: outbound {n}\r\n"
    "Message-ID: <outbound-{n}@example.org>\r\n"
    "\r\n"
    "Hello Carol.\r\n"
    ".a line that starts with a dot\r\n"
)


def relay_toml(sink: Sink, extra: str = "", **relay: str) -> str:
    keys = {"smarthost": f'"127.0.0.1:{sink.port}"', "ca_file": f'"{sink.ca_file}"', **relay}
    lines = "\n".join(f"{key} = {value}" for key, value in keys.items())
    return f"[relay]\n{lines}\n[queue]\nretry_schedule = [1]\n{extra}"


def submit(server: RunningServer, recipients: list[str], n: int = 1, sender: str = "") -> str:
    """Send as alice over STARTTLS; returns the 250 reply text."""
    client = server.smtp()
    client.login("alice@example.org", "alice-password")
    client.mail(sender if sender else "alice@example.org")
    for recipient in recipients:
        code, text = client.rcpt(recipient)
        assert code == 250, (recipient, code, text)
    code, text = client.data(MESSAGE.format(n=n).encode())
    client.quit()
    assert code == 250, text
    return text.decode()


def queue_of(server: RunningServer) -> QueueDir:
    return QueueDir(server.config.queue_config.directory)


def wait_queue_empty(server: RunningServer, timeout: float = 15) -> None:
    wait_until(lambda: not queue_of(server).ids() or None, timeout, "the queue to empty")


def wait_for_mail(server: RunningServer, address: str, count: int = 1, timeout: float = 15) -> list:
    return wait_until(
        lambda: server.messages(address) if len(server.messages(address)) >= count else None,
        timeout,
        f"{count} message(s) for {address}",
    )


def wait_attempted(server: RunningServer, count: int = 1, attempts: int = 1) -> list[Envelope]:
    """Wait until ``count`` entries are queued and each was tried ``attempts`` times."""
    queue = queue_of(server)

    def tried() -> list[Envelope] | None:
        envelopes = [queue.load(i) for i in queue.ids()]
        ready = len(envelopes) == count and all(
            r.attempts >= attempts for e in envelopes for r in e.recipients
        )
        return envelopes if ready else None

    return wait_until(tried, 15, f"{count} entries tried {attempts} time(s)")


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    with running_sink(tmp_path, auth=("relay", "relay-password")) as running:
        yield running


@pytest.fixture
def relaying(
    make_server: Callable[..., RunningServer], sink: Sink, tmp_path: Path
) -> Callable[..., RunningServer]:
    """A server whose smarthost is the sink (STARTTLS, verified, AUTH)."""
    secret = tmp_path / "relay-password"
    secret.write_text("relay-password\n")
    secret.chmod(0o600)

    def make(extra: str = "", **relay: str) -> RunningServer:
        settings = {"username": '"relay"', "password_file": f'"{secret}"', **relay}
        server = make_server(relay_toml(sink, extra, **settings))
        server.add_user("alice@example.org", "alice-password")
        server.add_user("bob@example.org", "bob-password")
        return server

    return make


def test_relay_smarthost_starttls_auth_delivers_exactly_once(
    relaying: Callable[..., RunningServer], sink: Sink
) -> None:
    server = relaying()
    submit(server, ["carol@example.net"])
    [message] = sink.wait_for(1)
    assert message.mail_from == "alice@example.org"
    assert message.rcpt_to == ["carol@example.net"]
    assert message.tls and message.auth_user == "relay"
    parsed = message.parsed()
    assert parsed["Subject"] == "outbound 1"
    assert "with ESMTPSA" in parsed["Received"]
    assert parsed.get_content().splitlines()[1] == ".a line that starts with a dot"
    wait_queue_empty(server)
    # A marker sent afterwards goes out on a later runner tick: the first message must not
    # have gone out again before it.
    submit(server, ["carol@example.net"], n=2)
    marked = sink.wait_for(2)
    assert [m.parsed()["Subject"] for m in marked] == ["outbound 1", "outbound 2"]
    login = ["EHLO", "STARTTLS", "EHLO", "AUTH"]
    assert [s.commands[:4] for s in sink.sessions()] == [login, login]


def test_S11_remote_recipients_are_queued_before_250_one_copy_per_message(
    make_server: Callable[..., RunningServer],
) -> None:
    """Point 1: one copy per message, each recipient tracked; local + remote both delivered."""
    server = make_server()  # base config: the smarthost (port 1) is down
    server.add_user("alice@example.org", "alice-password")
    server.add_user("bob@example.org", "bob-password")
    remote = ["carol@example.net", "dave@example.com", "erin@example.net"]
    submit(server, [*remote, "bob@example.org"])
    [stored] = wait_for_mail(server, "bob@example.org")
    assert stored["Subject"] == "outbound 1"
    queue = queue_of(server)
    [queue_id] = queue.ids()
    assert [p.name for p in queue.msg.iterdir()] == [queue_id]
    envelope = queue.load(queue_id)
    assert [r.address for r in envelope.recipients] == remote
    assert envelope.sender == "alice@example.org" and envelope.account == "alice@example.org"


def test_relay_tls_required_refuses_a_smarthost_without_starttls(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    with running_sink(tmp_path, name="plain", tls="none") as plain:
        server = make_server(relay_toml(plain, tls='"required"'))
        server.add_user("alice@example.org", "alice-password")
        submit(server, ["carol@example.net"])
        [envelope] = wait_attempted(server)
        [recipient] = envelope.recipients
        assert recipient.state == "pending"
        assert "TLS" in recipient.last_error or "STARTTLS" in recipient.last_error
        assert plain.messages() == []
        assert plain.sessions()[0].commands[:1] == ["EHLO"]
        assert all("MAIL" not in s.commands for s in plain.sessions())


def test_relay_opportunistic_tls_sends_in_clear_when_starttls_is_missing(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    with running_sink(tmp_path, name="plain", tls="none") as plain:
        server = make_server(relay_toml(plain, tls='"opportunistic"'))
        server.add_user("alice@example.org", "alice-password")
        submit(server, ["carol@example.net"])
        [message] = plain.wait_for(1)
        assert not message.tls


def test_relay_smarthost_down_then_up_delivers_from_the_queue(
    relaying: Callable[..., RunningServer], sink: Sink
) -> None:
    sink.stop()
    server = relaying()
    submit(server, ["carol@example.net"])
    [envelope] = wait_attempted(server, attempts=2)
    queue_id = envelope.id
    assert "refused" in envelope.recipients[0].last_error.lower()
    listing = server.admin("queue", "list")
    assert queue_id in listing and "carol@example.net  pending" in listing
    sink.start()
    [message] = sink.wait_for(1, timeout=10)
    assert message.rcpt_to == ["carol@example.net"]
    wait_queue_empty(server)


def dsn_of(server: RunningServer, address: str = "alice@example.org") -> email.message.Message:
    [notice] = wait_for_mail(server, address)
    parsed = email.message_from_bytes(notice.as_bytes(), policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    return parsed


def delivery_status(report: email.message.Message) -> list[email.message.Message]:
    """The per-message block, then one block per recipient."""
    part = report.get_payload(1)
    assert isinstance(part, email.message.Message)
    assert part.get_content_type() == "message/delivery-status"
    # A list of header blocks, each a Message (the stub says Message | str for any part).
    return cast(list[email.message.Message], part.get_payload())


def test_relay_permanent_5xx_bounces_a_dsn_into_the_senders_maildir(
    relaying: Callable[..., RunningServer], sink: Sink
) -> None:
    sink.set(rcpt_replies={"gone@example.net": (550, "5.1.1 No such user here")})
    server = relaying()
    submit(server, ["gone@example.net", "carol@example.net"])
    [delivered] = sink.wait_for(1)
    assert delivered.rcpt_to == ["carol@example.net"]
    report = dsn_of(server)
    per_message, per_recipient = delivery_status(report)[0], delivery_status(report)[1:]
    assert "dns; mail.example.org" in per_message["Reporting-MTA"]
    [failed] = per_recipient
    assert failed["Final-Recipient"] == "rfc822; gone@example.net"
    assert failed["Action"] == "failed" and failed["Status"] == "5.1.1"
    assert "550 5.1.1 No such user here" in failed["Diagnostic-Code"]
    original = report.get_payload(2)
    assert isinstance(original, email.message.Message)
    assert original.get_content_type() == "text/rfc822-headers"
    assert "Subject: outbound 1" in original.get_payload()
    assert "Hello Carol" not in report.as_string()
    wait_queue_empty(server)


def test_relay_null_sender_is_never_bounced(
    relaying: Callable[..., RunningServer], sink: Sink
) -> None:
    sink.set(rcpt_replies={"gone@example.net": (550, "5.1.1 No such user here")})
    server = relaying()
    server.admin("user", "send-as", "alice@example.org", "*")
    client = server.smtp()
    client.login("alice@example.org", "alice-password")
    assert client.sendmail("", ["gone@example.net"], MESSAGE.format(n=2).encode()) == {}
    client.quit()
    wait_queue_empty(server)
    # A marker from alice that does bounce: its bounce arrives, and no other before it.
    submit(server, ["gone@example.net"], n=3)
    [bounce] = wait_for_mail(server, "alice@example.org")
    assert "Subject: outbound 3" in bounce.as_string()
    wait_queue_empty(server)


def test_relay_expired_entry_bounces_with_4_4_7(
    relaying: Callable[..., RunningServer], sink: Sink
) -> None:
    sink.stop()
    server = relaying("max_queue_time = 2\n")
    submit(server, ["carol@example.net"])
    report = dsn_of(server)
    [failed] = delivery_status(report)[1:]
    assert failed["Status"] == "4.4.7" and failed["Action"] == "failed"
    wait_queue_empty(server)


def test_relay_delay_notice_is_sent_once_and_the_entry_stays(
    relaying: Callable[..., RunningServer], sink: Sink
) -> None:
    sink.stop()
    server = relaying("delay_notice_after = 1\n")
    submit(server, ["carol@example.net"])
    report = dsn_of(server)
    assert report["Subject"].startswith("Delayed Mail")
    [delayed] = delivery_status(report)[1:]
    assert delayed["Action"] == "delayed" and "Will-Retry-Until" in delayed
    # Two more attempts (each a chance for another notice) instead of a fixed wait.
    [envelope] = wait_attempted(server)
    [tried] = envelope.recipients
    wait_attempted(server, attempts=tried.attempts + 2)
    assert len(server.messages("alice@example.org")) == 1
    assert len(queue_of(server).ids()) == 1


def test_relay_queue_admin_flush_bounce_and_delete(
    relaying: Callable[..., RunningServer], sink: Sink
) -> None:
    """Point 5, against the running server (the requests go through control/)."""
    sink.stop()
    server = relaying("retry_schedule = [3600]\n")
    for n in (1, 2, 3):
        submit(server, [f"carol{n}@example.net"], n=n)
    first, second, third = (e.id for e in wait_attempted(server, count=3))
    assert "passed to the running server" in server.admin("queue", "bounce", first)
    report = dsn_of(server)
    [failed] = delivery_status(report)[1:]
    assert failed["Final-Recipient"] == "rfc822; carol1@example.net"
    assert failed["Status"] == "5.0.0"
    server.admin("queue", "delete", second)
    sink.start()
    server.admin("queue", "flush", third)  # the schedule says an hour; flush says now
    [message] = sink.wait_for(1)
    assert message.rcpt_to == ["carol3@example.net"]
    wait_queue_empty(server)
    assert len(server.messages("alice@example.org")) == 1  # no bounce for the deleted one
    assert server.admin("queue", "list").strip() == "the queue is empty"


def test_relay_queue_admin_without_a_running_server(
    relaying: Callable[..., RunningServer], sink: Sink
) -> None:
    sink.stop()
    server = relaying("retry_schedule = [3600]\n")
    submit(server, ["carol@example.net"])
    [queue_id] = queue_of(server).ids()
    server.stop()
    out = server.admin("queue", "bounce", queue_id)
    assert "no server is running" in out
    assert queue_of(server).load(queue_id).recipients[0].state == "failed"
    with pytest.raises(Exception, match="no queue entry"):
        server.admin("queue", "delete", "NOSUCHID")


def test_relay_direct_mx_in_preference_order_through_a_test_resolver(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    """Point 2: MX lookup with twisted.names; the preferred MX is down, the next one takes it."""
    with running_sink(tmp_path, hostname="mx2.example.net") as mx:
        zone: dict[str, Any] = {
            "example.net": [("MX", 20, "mx2.example.net"), ("MX", 10, "mx1.example.net")],
            "mx1.example.net": [("A", "127.0.0.2")],  # nothing listens there
            "mx2.example.net": [("A", "127.0.0.1")],
            "implicit.example": [("A", "127.0.0.1")],  # no MX: the A record is the MX
        }
        with running_dns(zone) as dns:
            server = make_server(
                f'[relay]\nsmarthost = ""\ntls = "required"\nca_file = "{mx.ca_file}"\n'
                f'mx_port = {mx.port}\nnameservers = ["{dns.nameserver}"]\n'
                "[queue]\nretry_schedule = [1]\n"
            )
            server.add_user("alice@example.org", "alice-password")
            submit(server, ["carol@example.net"])
            [message] = mx.wait_for(1)
            assert message.rcpt_to == ["carol@example.net"] and message.tls


@pytest.mark.parametrize(
    ("zone", "status"),
    [
        ({}, "5.1.2"),  # NXDOMAIN
        ({"example.net": [("MX", 0, "")]}, "5.1.10"),  # RFC 7505 null MX
    ],
)
def test_relay_domain_that_cannot_receive_mail_bounces_at_once(
    make_server: Callable[..., RunningServer], zone: dict[str, Any], status: str
) -> None:
    with running_dns(zone) as dns:
        server = make_server(f'[relay]\nsmarthost = ""\nnameservers = ["{dns.nameserver}"]\n')
        server.add_user("alice@example.org", "alice-password")
        submit(server, ["carol@example.net"])
        [failed] = delivery_status(dsn_of(server))[1:]
        assert failed["Status"] == status


def test_relay_sends_our_clientid_to_our_own_server_as_smarthost(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    """The upstream CLIENTID: our relay, configured with a token, logs in to another
    clientid-mta, which records the relay's device under TOFU."""
    upstream = make_server(
        '[delivery]\nlocal_domains = ["example.net"]\n[clientid]\npolicy = "tofu"\n',
        name="upstream",
    )
    upstream.add_user("relay@example.net", "relay-password", send_as="*")
    upstream.add_user("carol@example.net", "carol-password")
    secret = tmp_path / "upstream-password"
    secret.write_text("relay-password")
    secret.chmod(0o600)
    token = "4b1d0c2e-8f3a-4c5b-9d6e-7f8a9b0c1d2e"
    server = make_server(
        f'[relay]\nsmarthost = "localhost:{upstream.port}"\ntls = "required"\n'
        f'ca_file = "{upstream.cafile}"\nusername = "relay@example.net"\n'
        f'password_file = "{secret}"\nclient_id = "{token}"\n'
    )
    server.add_user("alice@example.org", "alice-password")
    submit(server, ["carol@example.net"])
    [stored] = wait_for_mail(upstream, "carol@example.net")
    assert stored["Subject"] == "outbound 1"
    devices = upstream.admin("device", "list", "relay@example.net")
    assert "UUID" in devices and "trusted" in devices
    assert token not in devices


def test_relay_dkim_signature_verifies_at_the_peer(
    relaying: Callable[..., RunningServer],
    sink: Sink,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Point 6, through the admin command as an admin runs it: keygen, publish, sign."""
    import dkim

    from clientid_mta.cli import admin

    argv = ["dkim", "keygen", "example.org", "--selector", "s1", "--dir", str(tmp_path / "k")]
    assert admin.main(argv) == 0
    printed = capsys.readouterr().out
    [txt] = [line for line in printed.splitlines() if "._domainkey." in line]
    key = tmp_path / "k" / "example.org.s1.key"
    record = "".join(re.findall(r'"([^"]*)"', txt))
    server = relaying(f'[dkim."example.org"]\nselector = "s1"\nkey = "{key}"\n')
    submit(server, ["carol@example.net"])
    [message] = sink.wait_for(1)
    assert message.data.startswith(b"DKIM-Signature:")
    assert dkim.verify(message.data, dnsfunc=lambda name, timeout=5: record.encode())
    assert not dkim.verify(
        message.data.replace(b"Hello Carol", b"Hello Mallory"),
        dnsfunc=lambda name, timeout=5: record.encode(),
    )


def test_relay_refused_recipient_at_submission_still_gets_smtp_errors(
    relaying: Callable[..., RunningServer],
) -> None:
    """Remote recipients no longer get 550 5.7.1; local unknown users still get 5.1.1."""
    server = relaying()
    client = server.smtp()
    client.login("alice@example.org", "alice-password")
    client.mail("alice@example.org")
    assert client.rcpt("nobody@example.org")[0] == 550
    assert client.rcpt("someone@elsewhere.example")[0] == 250
    client.quit()


def test_relay_internal_error_backs_off_instead_of_spinning(
    make_server: Callable[..., RunningServer],
) -> None:
    """A bug in a delivery (here: the client raising) defers the entry on the retry
    schedule; the runner does not retry it in a loop."""
    server = make_server()
    server.add_user("alice@example.org", "alice-password")
    calls: list[int] = []

    def broken_send(*args: object, **kwargs: object) -> NoReturn:
        calls.append(1)
        raise RuntimeError("simulated bug")

    server.service.components.queue_runner.send = broken_send
    submit(server, ["carol@example.net"])
    [envelope] = wait_attempted(server)
    [recipient] = envelope.recipients
    assert recipient.state == "pending" and recipient.last_error == "internal error, see the log"
    assert recipient.last_attempt is not None
    assert recipient.next_attempt - recipient.last_attempt == 60
    # A second entry, tried on a later tick: the first was not tried again meanwhile.
    submit(server, ["dave@example.net"], n=2)
    wait_attempted(server, count=2)
    assert len(calls) == 2


def test_relay_bounce_for_a_remote_sender_is_queued_with_the_null_sender(
    relaying: Callable[..., RunningServer], sink: Sink
) -> None:
    """Point 3: the DSN goes to a remote sender through the queue, from <>."""
    sink.set(rcpt_replies={"gone@example.net": (550, "5.1.1 No such user here")})
    server = relaying()
    server.admin("user", "send-as", "alice@example.org", "alice@elsewhere.example")
    client = server.smtp()
    client.login("alice@example.org", "alice-password")
    message = MESSAGE.format(n=5).replace(
        "From: Alice <alice@example.org>", "From: alice@example.org"
    )
    client.sendmail("alice@elsewhere.example", ["gone@example.net"], message.encode())
    client.quit()
    [notice] = sink.wait_for(1)
    assert notice.mail_from == "" and notice.rcpt_to == ["alice@elsewhere.example"]
    report = notice.parsed()
    assert report.get_content_type() == "multipart/report"
    [failed] = delivery_status(report)[1:]
    assert failed["Final-Recipient"] == "rfc822; gone@example.net"
    wait_queue_empty(server)


def test_S11_unwritable_queue_is_451_and_nothing_is_queued(
    make_server: Callable[..., RunningServer],
) -> None:
    """A queue that cannot be written (here ``tmp/`` replaced by a file) gives 451 4.3.0
    after the data, never a 250; the next try, once it is writable, is queued."""
    server = make_server()
    server.add_user("alice@example.org", "alice-password")
    queue = queue_of(server)
    queue.tmp.rmdir()
    queue.tmp.write_text("a file where a folder should be\n")
    client = server.smtp()
    client.login("alice@example.org", "alice-password")
    client.mail("alice@example.org")
    assert client.rcpt("carol@example.net")[0] == 250
    code, text = client.data(MESSAGE.format(n=7).encode())
    assert (code, text[:5]) == (451, b"4.3.0")
    assert queue.ids() == []
    queue.tmp.unlink()
    queue.tmp.mkdir()
    assert client.sendmail("alice@example.org", ["carol@example.net"], MESSAGE.format(n=8)) == {}
    client.quit()
    assert len(queue.ids()) == 1
