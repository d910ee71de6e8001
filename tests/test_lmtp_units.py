"""Issue 13, point 2, in memory: the LMTP client's transaction, and how per-recipient
outcomes are settled so that a client's retry never duplicates a delivered recipient."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.mail.smtp import SMTPServerError

from clientid_mta.delivery.lmtp import (
    Delivered,
    LmtpClientProtocol,
    LmtpDelivery,
    LmtpPool,
    LmtpUnavailable,
    Outcome,
    dot_stuffed,
)
from clientid_mta.smtp.errors import LocalDeliveryError

ALICE, BOB = "alice@example.org", "Bob@example.org"
CAROL = "carol@example.org"


def test_dot_stuffing_and_line_ends() -> None:
    assert dot_stuffed(b"a\n.b\n..c\n") == b"a\r\n..b\r\n...c\r\n.\r\n"


def connected() -> tuple[LmtpClientProtocol, StringTransport]:
    protocol = LmtpClientProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.extensions = {"8BITMIME", "PIPELINING"}
    return protocol, transport


def test_one_transaction_with_a_reply_per_recipient() -> None:
    protocol, transport = connected()
    pool = LmtpPool(MemoryReactorClock(), "unix:/nowhere", "mail.example.org")
    results: list[Outcome] = []
    pool._transaction(
        protocol, ALICE, [BOB, "carol@example.org", ALICE], "ü\n".encode()
    ).addCallback(results.append)
    for reply in (
        b"250 2.1.0 OK",
        b"250 2.1.5 OK",
        b"550 5.1.1 <carol> User doesn't exist",
        b"250 2.1.5 OK",
        b"354 OK",
        b"250 2.0.0 <Bob> Saved",
        b"452-4.2.2 <alice> Mailbox is full\r\n452 4.2.2 try later",
    ):
        protocol.dataReceived(reply + b"\r\n")
    sent = transport.value().decode().split("\r\n")
    assert sent[:5] == [
        "MAIL FROM:<alice@example.org> BODY=8BITMIME",
        f"RCPT TO:<{BOB}>",  # as the client wrote it
        "RCPT TO:<carol@example.org>",
        f"RCPT TO:<{ALICE}>",
        "DATA",
    ]
    assert sent[5:7] == ["ü", "."]
    [outcome] = results
    assert outcome.delivered == [BOB]
    assert outcome.replies["carol@example.org"][0] == 550
    assert outcome.replies[ALICE] == (452, "4.2.2 <alice> Mailbox is full\n4.2.2 try later")


def test_a_reply_that_is_not_lmtp_closes_and_fails_what_waits() -> None:
    protocol, transport = connected()
    failures = []
    protocol.command("RSET").addErrback(lambda f: failures.append(f.check(LmtpUnavailable)))
    protocol.dataReceived(b"HTTP/1.1 400 Bad Request\r\n")
    assert transport.disconnecting
    protocol.connectionLost(None)
    assert failures == [LmtpUnavailable]


class FakePool:
    """Dovecot's answers, decided by the test: one Outcome per call, in order."""

    def __init__(self, *outcomes: dict[str, tuple[int, str]] | Exception) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[list[str]] = []

    def deliver(self, sender: str, recipients: list[str], data: bytes) -> defer.Deferred[Any]:
        self.calls.append(list(recipients))
        answer = self.outcomes.pop(0)
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(Outcome({r: answer[r] for r in recipients}))


def attempt(
    lmtp: LmtpDelivery, received_id: str, recipients: list[str], body: bytes = b"body\n"
) -> list[Any]:
    """One SMTP transaction as the protocol drives it: our Received: header (new each
    time), the client's message, then prepare."""
    transaction = lmtp.transaction(ALICE, ALICE)
    message = None
    for recipient in recipients:
        message = transaction.recipient(recipient)()
    assert message is not None
    for line in (b"Received: from client", f"\tid {received_id};".encode(), b"\tdate"):
        message.lineReceived(line)
    message.write_block(b"Subject: hello\n\n" + body)
    results: list[Any] = []
    message.prepare().addBoth(results.append)
    return results


def test_a_deferred_recipient_fails_the_message_and_the_retry_skips_the_delivered() -> None:
    ok, later = (250, "2.0.0 Saved"), (451, "4.3.0 Temporary failure")
    pool = FakePool({BOB: ok, ALICE: later}, {ALICE: ok})
    lmtp = LmtpDelivery(pool)  # type: ignore[arg-type]
    [first] = attempt(lmtp, "one", [BOB, ALICE])
    assert first.check(LocalDeliveryError)  # the client gets 451 and sends again
    assert not first.check(SMTPServerError)
    [second] = attempt(lmtp, "two", [BOB, ALICE])
    assert second is None  # 250
    assert pool.calls == [[BOB, ALICE], [ALICE]]  # bob got it once
    # The same message again is a retry; another message to bob is delivered.
    assert attempt(lmtp, "three", [BOB]) == [None] and len(pool.calls) == 2
    pool.outcomes.append({BOB: ok})
    transaction_results = attempt(lmtp, "four", [BOB], b"another body\n")
    assert transaction_results == [None] and pool.calls[-1] == [BOB]


def test_dovecot_down_delivers_nothing_and_the_retry_delivers_all() -> None:
    ok = (250, "2.0.0 Saved")
    pool = FakePool(LmtpUnavailable("connection refused"), {BOB: ok, ALICE: ok})
    lmtp = LmtpDelivery(pool)  # type: ignore[arg-type]
    [first] = attempt(lmtp, "one", [BOB, ALICE])
    assert first.check(LmtpUnavailable)
    assert attempt(lmtp, "two", [BOB, ALICE]) == [None]
    assert pool.calls == [[BOB, ALICE], [BOB, ALICE]]


def test_every_recipient_refused_for_good_passes_dovecot_s_5xx_on() -> None:
    pool = FakePool({BOB: (552, "5.2.2 Mailbox full")})
    [result] = attempt(LmtpDelivery(pool), "one", [BOB])  # type: ignore[arg-type]
    assert result.check(SMTPServerError)
    assert (result.value.code, result.value.resp) == (552, "5.2.2 Mailbox full")


def test_the_memory_of_delivered_recipients_forgets_after_a_day() -> None:
    now = [0.0]
    delivered = Delivered(clock=lambda: now[0])
    delivered.remember(ALICE, ALICE, BOB, b"digest")
    assert delivered.already(ALICE, ALICE, BOB.lower(), b"digest")
    assert not delivered.already(ALICE, ALICE, BOB, b"other")
    now[0] = 86401.0
    assert not delivered.already(ALICE, ALICE, BOB, b"digest")


@pytest.mark.parametrize("greeting", [b"554 go away\r\n", b"garbage\r\n"])
def test_a_bad_greeting_is_unavailable(greeting: bytes) -> None:
    reactor = MemoryReactorClock()
    pool = LmtpPool(reactor, "unix:/nowhere/lmtp", "mail.example.org", timeout=5)
    failures: list[Any] = []
    pool.deliver(ALICE, [BOB], b"x\n").addErrback(failures.append)
    [(_path, factory, _timeout, _check)] = reactor.unixClients
    protocol = factory.buildProtocol(None)
    # The endpoint wraps the factory: drive the connection through its transport.
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(greeting)
    if not failures:
        protocol.connectionLost(None)
    assert len(failures) == 1 and failures[0].check(LmtpUnavailable)


def test_no_answer_in_time_is_unavailable() -> None:
    reactor = MemoryReactorClock()
    pool = LmtpPool(reactor, "unix:/nowhere/lmtp", "mail.example.org", timeout=5)
    failures: list[Any] = []
    pool.deliver(ALICE, [BOB], b"x\n").addErrback(failures.append)
    reactor.advance(5)
    assert len(failures) == 1 and failures[0].check(LmtpUnavailable)


def test_a_connection_lost_after_the_data_keeps_the_replies_that_came() -> None:
    protocol, _transport = connected()
    pool = LmtpPool(MemoryReactorClock(), "unix:/nowhere", "mail.example.org")
    results: list[Outcome] = []
    pool._transaction(protocol, ALICE, [BOB, ALICE], b"x\n").addCallback(results.append)
    for reply in (b"250 OK", b"250 OK", b"250 OK", b"354 OK", b"250 2.0.0 Saved"):
        protocol.dataReceived(reply + b"\r\n")
    protocol.connectionLost(None)
    [outcome] = results
    assert outcome.delivered == [BOB]  # remembered, so a retry skips bob
    assert outcome.replies[ALICE][0] == 451


def test_a_reply_late_after_the_data_defers_the_rest_at_once_and_drops_the_connection() -> None:
    """Out of step with Dovecot's replies, the connection must not carry the next
    message (its MAIL would read this message's late reply)."""
    protocol, transport = connected()
    reactor = MemoryReactorClock()
    pool = LmtpPool(reactor, "unix:/nowhere", "mail.example.org", timeout=5)
    pool._idle = [protocol]
    results: list[Outcome] = []
    pool._deliver(ALICE, [BOB, ALICE, CAROL], b"x\n").addCallback(results.append)
    for reply in (b"250 OK", b"250 OK", b"250 OK", b"250 OK", b"354 OK", b"250 2.0.0 Saved"):
        protocol.dataReceived(reply + b"\r\n")
    reactor.advance(5)  # alice's reply does not come: one timeout, not one a recipient
    [outcome] = results
    assert outcome.delivered == [BOB]
    assert outcome.replies[ALICE][0] == outcome.replies[CAROL][0] == 451
    assert protocol.closed and transport.disconnecting
    assert pool._idle == []
