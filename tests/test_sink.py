"""The relay's test peers themselves: the SMTP sink (tests/sink.py) and the DNS server
(tests/dnsserver.py). They cover no docs/conformance.md row; they make sure the peers the relay's
end-to-end tests rely on behave as scripted."""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from twisted.names import client, dns
from twisted.names.error import DNSNameError, DNSServerError

from tests.dnsserver import Zone, dns_process, running_dns
from tests.sink import (
    LoopbackSMTP,
    RcptReplies,
    Sink,
    SinkProcess,
    read_record,
    running_sink,
    sink_client,
    sink_process,
)
from tests.typed_reactor import blockingCallFromThread, reactor

AUTH = ("relay", "relay-password")
TOKEN = "23bf83be-aad7-46aa-9e0f-39191ccf402f"
SENDER = "relay@example.org"
GOOD, GONE = "bob@example.net", "gone@example.net"
MESSAGE = (
    b"From: relay@example.org\r\nTo: bob@example.net\r\nSubject: sink\r\n\r\n"
    b".a line that starts with a dot\r\nbody\r\n"
)
GONE_REPLY = (550, "5.1.1 No such user")
ZONE: Zone = {
    "example.net": [("MX", 10, "mx1.example.net"), ("MX", 20, "mx2.example.net")],
    "mx1.example.net": [("A", "127.0.0.1")],
    "mx2.example.net": [("A", "127.0.0.2"), ("AAAA", "::1")],
    "txt.example.net": [("TXT", "v=DKIM1; p=" + "A" * 300)],
    "broken.example.net": "SERVFAIL",
}


def plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def expect(smtp: smtplib.SMTP, script: list[tuple[str, int, bytes]]) -> None:
    """Send each command; all replies must be exactly as scripted."""
    replies = [(line, *smtp.docmd(line)) for line, _, _ in script]
    assert replies == script


# --- the SMTP sink ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mechanism", "initial_response"),
    [("PLAIN", True), ("PLAIN", False), ("LOGIN", True), ("LOGIN", False)],
)
def test_sink_records_a_starttls_clientid_auth_session(
    tmp_path: Path, mechanism: str, initial_response: bool
) -> None:
    with running_sink(tmp_path, auth=AUTH, advertise_clientid=True) as sink:
        smtp = sink.client()
        assert smtp.has_extn("clientid") and smtp.has_extn("auth")
        assert not smtp.has_extn("starttls") and not smtp.has_extn("pipelining")
        assert smtp.docmd("CLIENTID", f"UUID {TOKEN}") == (250, b"2.0.0 OK")
        smtp.user, smtp.password = AUTH
        authenticate = getattr(smtp, f"auth_{mechanism.lower()}")
        reply = smtp.auth(mechanism, authenticate, initial_response_ok=initial_response)
        assert reply == (235, b"2.7.0 Authentication successful")
        assert smtp.sendmail(SENDER, [GOOD], MESSAGE) == {}
        smtp.quit()
        [message] = sink.messages()
        [session] = sink.sessions()
    assert (message.mail_from, message.rcpt_to, message.data) == (SENDER, [GOOD], MESSAGE)
    assert (message.tls, message.auth_user, message.clientid) == (True, "relay", ("UUID", TOKEN))
    assert (message.session, message.quit, message.helo) == (session.id, True, "client.example.org")
    assert message.parsed()["Subject"] == "sink"
    assert session.commands == [
        *("EHLO", "STARTTLS", "EHLO", "CLIENTID", "AUTH", "MAIL", "RCPT", "DATA", "QUIT")
    ]
    assert sink.errors() == []


def test_sink_refuses_auth_before_tls_a_wrong_password_and_mail_without_auth(
    tmp_path: Path,
) -> None:
    with running_sink(tmp_path, auth=AUTH, advertise_clientid=True) as sink:
        smtp = LoopbackSMTP(sink.config.hostname, sink.port, "client.example.org")
        smtp.ehlo()
        assert smtp.has_extn("starttls") and not smtp.has_extn("auth")
        expect(
            smtp,
            [
                (plain(*AUTH), 530, b"5.7.0 Must issue a STARTTLS command first"),
                (f"CLIENTID UUID {TOKEN}", 500, b"5.5.1 Unknown command"),
            ],
        )
        smtp.starttls(context=ssl.create_default_context(cafile=str(sink.ca_file)))
        smtp.ehlo()
        expect(
            smtp,
            [
                ("CLIENTID UUID", 501, b"5.5.4 Syntax: CLIENTID <type> <token>"),
                (plain("relay", "wrong"), 535, b"5.7.8 Authentication credentials invalid"),
                (f"CLIENTID UUID {TOKEN}", 503, b"5.5.1 CLIENTID must come before AUTH"),
                (f"MAIL FROM:<{SENDER}>", 530, b"5.7.0 Authentication required"),
                ("AUTH CRAM-MD5", 504, b"5.5.4 Unrecognized authentication type"),
            ],
        )
        smtp.close()
        [session] = sink.sessions()
    assert (session.auth_user, session.auth_failures, session.clientid) == (None, 1, None)
    assert sink.messages() == [] and sink.errors() == []


@pytest.mark.parametrize(
    "rcpt_replies",
    [{GONE: GONE_REPLY}, lambda address: GONE_REPLY if address == GONE else None],
    ids=["dict", "callable"],
)
def test_sink_scripted_rcpt_and_data_replies(tmp_path: Path, rcpt_replies: RcptReplies) -> None:
    with running_sink(
        tmp_path, rcpt_replies=rcpt_replies, data_reply=(451, "4.3.0 Try again later")
    ) as sink:
        smtp = sink.client()
        with pytest.raises(smtplib.SMTPDataError) as deferred:
            smtp.sendmail(SENDER, [GOOD, GONE], MESSAGE)
        assert (deferred.value.smtp_code, deferred.value.smtp_error) == (
            451,
            b"4.3.0 Try again later",
        )
        assert sink.messages() == []
        sink.set(data_reply=lambda message: (250, f"2.0.0 queued for {message.rcpt_to[0]}"))
        assert smtp.sendmail(SENDER, [GOOD, GONE], MESSAGE) == {GONE: (550, b"5.1.1 No such user")}
        smtp.quit()
        [message] = sink.messages()
    assert message.rcpt_to == [GOOD]


def test_sink_scripted_greeting_and_mail_replies(tmp_path: Path) -> None:
    with (
        running_sink(tmp_path, name="down", greeting=(421, "4.3.2 Shutting down")) as down,
        running_sink(tmp_path, name="picky", mail_reply=(451, "4.7.1 Greylisted")) as picky,
    ):
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            LoopbackSMTP(down.config.hostname, down.port)
        with pytest.raises(smtplib.SMTPSenderRefused) as greylisted:
            picky.client().sendmail(SENDER, [GOOD], MESSAGE)
    assert (refused.value.smtp_code, refused.value.smtp_error) == (421, b"4.3.2 Shutting down")
    assert (greylisted.value.smtp_code, greylisted.value.smtp_error) == (451, b"4.7.1 Greylisted")
    assert down.messages() == picky.messages() == []


def test_sink_drop_after_data_closes_without_a_reply_and_records_nothing(tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    with running_sink(tmp_path, drop_after_data=True, record=record) as sink:
        smtp = sink.client()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtp.sendmail(SENDER, [GOOD], MESSAGE)
        [session] = sink.sessions()
    assert (session.dropped, session.quit) == (1, False)
    assert sink.messages() == [] and read_record(record) == []


def assert_refused(port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def send_one(sink: Sink | SinkProcess, hostname: str = "smtp.example.net") -> None:
    smtp = sink_client(hostname, sink.port, sink.ca_file)
    assert smtp.sendmail(SENDER, [GOOD], MESSAGE) == {}
    smtp.quit()


def test_sink_stop_refuses_connections_and_start_listens_on_the_same_port(
    tmp_path: Path,
) -> None:
    with running_sink(tmp_path) as sink:
        port = sink.port
        open_session = sink.client()
        sink.stop()
        assert_refused(port)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            open_session.noop()  # stop() dropped it
        sink.start()
        assert sink.port == port
        send_one(sink)
        assert len(sink.wait_for(1)) == 1


@pytest.mark.parametrize(
    ("tls", "starttls_reply", "encrypted"),
    [
        ("starttls", (503, b"5.5.1 TLS already active"), True),
        ("implicit", (503, b"5.5.1 TLS already active"), True),
        ("none", (500, b"5.5.1 Unknown command"), False),
    ],
)
def test_sink_tls_modes(
    tmp_path: Path, tls: str, starttls_reply: tuple[int, bytes], encrypted: bool
) -> None:
    with running_sink(tmp_path, tls=tls) as sink:
        smtp = sink.client()
        assert not smtp.has_extn("starttls")
        assert smtp.docmd("STARTTLS") == starttls_reply
        assert smtp.sendmail(SENDER, [GOOD], MESSAGE) == {}
        smtp.quit()
        [message] = sink.messages()
    assert message.tls is encrypted


def test_sink_certificates_name_the_host_and_share_one_ca(tmp_path: Path) -> None:
    with (
        running_sink(tmp_path, name="mx1", hostname="mx1.example.net") as mx1,
        running_sink(tmp_path, name="mx2", cert_names=("mx2.example.net",)) as mx2,
    ):
        assert mx1.ca_file == mx2.ca_file
        send_one(mx1, "mx1.example.net")
        send_one(mx1, "127.0.0.1")  # the default names include the loopback address
        send_one(mx2, "mx2.example.net")
        for name in ("mx1.example.net", "127.0.0.1"):
            with pytest.raises(ssl.SSLCertVerificationError):
                sink_client(name, mx2.port, mx2.ca_file)


def test_sink_record_file_has_the_message_at_the_reply_and_the_quit_after_quit(
    tmp_path: Path,
) -> None:
    record = tmp_path / "record.jsonl"
    with running_sink(tmp_path, record=record) as sink:
        smtp = sink.client()
        smtp.sendmail(SENDER, [GOOD], MESSAGE)
        [before_quit] = read_record(record)
        smtp.quit()
        [after_quit] = read_record(record)
    assert (before_quit.data, before_quit.quit, after_quit.quit) == (MESSAGE, False, True)
    assert [after_quit] == sink.messages()


def test_sink_bounds_lines_and_messages_and_survives_garbage(tmp_path: Path) -> None:
    with running_sink(tmp_path, max_line=1000, max_message=100) as sink:
        smtp = sink.client()
        smtp.send(b"\xff\xfe\x00garbage\r\n")
        assert smtp.getreply() == (500, b"5.5.1 Unknown command")
        size = b"5.3.4 Message size exceeds fixed maximum message size"
        assert smtp.docmd(f"MAIL FROM:<{SENDER}> SIZE=101") == (552, size)
        assert smtp.mail(SENDER)[0] == smtp.rcpt(GOOD)[0] == 250
        assert smtp.data(b"x" * 200) == (552, size)
        assert smtp.docmd("NOOP " + "x" * 1000) == (500, b"5.5.2 Line too long")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtp.noop()
    assert sink.messages() == [] and sink.errors() == []


def test_sink_as_a_subprocess(tmp_path: Path) -> None:
    rcpt = f"{GONE}={GONE_REPLY[0]}:{GONE_REPLY[1]}"
    with sink_process(tmp_path, "--auth", ":".join(AUTH), "--clientid", "--rcpt", rcpt) as sink:
        smtp = sink_client("smtp.example.net", sink.port, sink.ca_file)
        assert smtp.docmd("CLIENTID", f"UUID {TOKEN}") == (250, b"2.0.0 OK")
        smtp.login(*AUTH)
        assert smtp.sendmail(SENDER, [GOOD, GONE], MESSAGE) == {GONE: (550, b"5.1.1 No such user")}
        smtp.quit()
        [message] = sink.wait_for(1)
        sink.stop()
        assert_refused(sink.port)
        sink.start()
        smtp = sink_client("smtp.example.net", sink.port, sink.ca_file)
        assert smtp.noop()[0] == 250
        smtp.close()
    assert (message.rcpt_to, message.auth_user, message.clientid) == (
        [GOOD],
        "relay",
        ("UUID", TOKEN),
    )
    assert (message.data, message.quit) == (MESSAGE, True)


# --- the DNS server --------------------------------------------------------------------


def value(payload: Any) -> Any:
    """A record's data as a plain value, for comparisons."""
    if isinstance(payload, dns.Record_MX):
        return payload.preference, str(payload.name)
    if isinstance(payload, dns.Record_A):
        return payload.dottedQuad()
    if isinstance(payload, dns.Record_AAAA):
        return socket.inet_ntop(socket.AF_INET6, payload.address)
    return b"".join(payload.data).decode()


def lookup(port: int, method: str, name: str) -> list[Any]:
    """``client.createResolver(...).<method>(name)`` in the reactor: the answers' values."""

    def query() -> Any:
        resolver = client.createResolver(servers=[("127.0.0.1", port)])
        return getattr(resolver, method)(name, timeout=(5,))

    answers, _, _ = blockingCallFromThread(reactor, query)
    return sorted(value(answer.payload) for answer in answers)


def test_dns_answers_mx_a_aaaa_and_txt() -> None:
    with running_dns(ZONE) as server:
        mx = lookup(server.port, "lookupMailExchange", "Example.NET.")
        assert mx == [(10, "mx1.example.net"), (20, "mx2.example.net")]
        assert lookup(server.port, "lookupAddress", "mx1.example.net") == ["127.0.0.1"]
        assert lookup(server.port, "lookupIPV6Address", "mx1.example.net") == []  # NODATA
        assert lookup(server.port, "lookupIPV6Address", "mx2.example.net") == ["::1"]
        txt = lookup(server.port, "lookupText", "txt.example.net")
        assert txt == ["v=DKIM1; p=" + "A" * 300]


def test_dns_answers_over_tcp_on_the_same_port() -> None:
    with running_dns(ZONE) as server:

        def query() -> Any:
            resolver = client.Resolver(servers=[("127.0.0.1", server.port)])
            return resolver.queryTCP([dns.Query(b"example.net", dns.MX)])

        response = blockingCallFromThread(reactor, query)
    assert sorted(value(answer.payload) for answer in response.answers) == [
        (10, "mx1.example.net"),
        (20, "mx2.example.net"),
    ]


def assert_fails(port: int, name: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        lookup(port, "lookupMailExchange", name)


def test_dns_nxdomain_servfail_and_changes_at_run_time() -> None:
    with running_dns(ZONE) as server:
        assert_fails(server.port, "nowhere.example.net", DNSNameError)
        assert_fails(server.port, "broken.example.net", DNSServerError)
        server.set("nowhere.example.net", [("MX", 0, "mx1.example.net")])
        assert lookup(server.port, "lookupMailExchange", "nowhere.example.net") == [
            (0, "mx1.example.net")
        ]
        server.fail("example.net")
        assert_fails(server.port, "example.net", DNSServerError)
        server.delete("nowhere.example.net")
        assert_fails(server.port, "nowhere.example.net", DNSNameError)


def test_dns_as_a_subprocess_rereads_its_zone_file(tmp_path: Path) -> None:
    with dns_process(tmp_path / "zone.json", ZONE) as server:
        assert lookup(server.port, "lookupAddress", "mx2.example.net") == ["127.0.0.2"]
        server.set_zone({**ZONE, "mx2.example.net": [("A", "127.0.0.3")]})
        assert lookup(server.port, "lookupAddress", "mx2.example.net") == ["127.0.0.3"]
        assert_fails(server.port, "broken.example.net", DNSServerError)
