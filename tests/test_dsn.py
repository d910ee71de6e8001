"""Bounces and delay notices (issue 4 item 3): RFC 3464 multipart/report DSNs.

Every notice is parsed back with the standard library's ``email`` package, the way a
mail program would read it, and one is delivered into a real Maildir.
"""

from __future__ import annotations

import email
import email.policy
import io
import mailbox
import re
from dataclasses import replace
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest

from clientid_mta.delivery.maildir import MaildirRoot
from clientid_mta.outbound.bounces import (
    MAX_DIAGNOSTIC,
    MAX_ORIGINAL_HEADERS,
    FailedRecipient,
    build_dsn,
    is_bounce_candidate,
)

HOST = "mail.example.org"
SENDER = "alice@example.org"
ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3600
FIVE_DAYS = 5 * 86400
ORIGINAL_HEADERS = (
    b"Received: from laptop (unknown) by mail.example.org with ESMTPSA\n"
    b"\tid Q1; Tue, 14 Nov 2023 22:13:20 +0000\n"
    b"From: Alice <alice@example.org>\n"
    b"To: Bob <bob@x.example>\n"
    b"Subject: Lunch on Friday\n"
    b"Message-ID: <lunch-1@example.org>\n"
)
ORIGINAL = ORIGINAL_HEADERS + b"\nSECRET BODY LINE that must never be returned\n"
BOB = FailedRecipient(
    address="bob@x.example",
    status="5.1.1",
    diagnostic="550 5.1.1 <bob@x.example>: user unknown",
    remote_mta="mx.x.example",
    last_attempt=ARRIVAL + 60,
)
INJECTION = (
    "x\r\nX-Injected: yes\r\n\r\n--boundary\nContent-Type: text/html\n\n<b>evil</b>\x00\x1b\u00e9"
)


def build(**overrides: Any) -> bytes:
    arguments: dict[str, Any] = {
        "reporting_mta": HOST,
        "postmaster": "",
        "original_sender": SENDER,
        "queue_id": "Q1",
        "arrival": ARRIVAL,
        "recipients": [BOB],
        "original": ORIGINAL,
        "now": NOW,
    }
    arguments.update(overrides)
    return build_dsn(**arguments)


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert not message.defects
    return message


def parts(message: EmailMessage) -> list[EmailMessage]:
    return list(message.iter_parts())  # type: ignore[arg-type]


def status_blocks(message: EmailMessage) -> list[Message]:
    """The message/delivery-status groups: per-message fields, then one per recipient."""
    payload = parts(message)[1].get_payload()
    assert isinstance(payload, list)
    return [block for block in payload if isinstance(block, Message)]


def original_headers(message: EmailMessage) -> str:
    content = parts(message)[2].get_content()
    assert isinstance(content, str)
    return content


def every_header(message: EmailMessage) -> list[tuple[str, str]]:
    """All header fields of the notice, its parts and its delivery-status groups."""
    found = list(message.items())
    for part in parts(message):
        found += list(part.items())
    for block in status_blocks(message):
        found += list(block.items())
    return found


def date_of(value: str) -> float:
    return parsedate_to_datetime(value).timestamp()


def test_dsn_is_a_multipart_report_with_the_three_parts_in_order() -> None:
    raw = build()
    message = parse(raw)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(message)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert message["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{HOST}"
    assert message["From"].addresses[0].display_name == "Mail Delivery System"
    assert [a.addr_spec for a in message["To"].addresses] == [SENDER]
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert date_of(message["Date"]) == NOW
    assert re.fullmatch(rf"<[^<>@\s]+@{re.escape(HOST)}>", message["Message-ID"])
    assert b"\r" not in raw
    raw.decode("ascii")  # 7-bit throughout
    assert max(len(line) for line in raw.split(b"\n")) <= 998


@pytest.mark.parametrize(
    ("postmaster", "shown"),
    [
        ("postmaster@example.org", "postmaster@example.org"),
        ("postmaster@example.org>, <victim@evil.example", f"MAILER-DAEMON@{HOST}"),
    ],
)
def test_dsn_from_is_the_postmaster_address_when_valid(postmaster: str, shown: str) -> None:
    message = parse(build(postmaster=postmaster))
    assert [a.addr_spec for a in message["From"].addresses] == [shown]


@pytest.mark.parametrize(
    ("sender", "shown"),
    [
        ('"a, b"@example.org', ['"a, b"@example.org']),
        ("<alice@example.org>", [SENDER]),
        ("alice@example.org>, <victim@evil.example", []),
        ("alice@example.org\r\nBcc: victim@evil.example", []),
    ],
    ids=["quoted-local-part", "bracketed", "second-address", "crlf"],
)
def test_dsn_to_names_the_sender_and_nobody_else(sender: str, shown: list[str]) -> None:
    raw = build(original_sender=sender)
    message = parse(raw)
    assert [a.addr_spec for a in message["To"].addresses] == shown
    assert b"victim" not in raw.partition(b"\n\n")[0]
    assert message["Bcc"] is None


def test_dsn_bracketed_recipient_is_reported_bare() -> None:
    bracketed = FailedRecipient("<bob@x.example>", "5.1.1", "550 no")
    _, bob = status_blocks(parse(build(recipients=[bracketed])))
    assert bob["Final-Recipient"] == "rfc822; bob@x.example"


def test_dsn_delivery_status_per_message_and_per_recipient_fields() -> None:
    message = parse(build())
    per_message, bob = status_blocks(message)
    assert per_message["Reporting-MTA"] == f"dns; {HOST}"
    assert date_of(per_message["Arrival-Date"]) == ARRIVAL
    assert per_message["X-Queue-ID"] == "Q1"
    assert dict(bob.items()) == {
        "Final-Recipient": "rfc822; bob@x.example",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.x.example",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob@x.example>: user unknown",
        "Last-Attempt-Date": bob["Last-Attempt-Date"],
    }
    assert date_of(bob["Last-Attempt-Date"]) == ARRIVAL + 60


def test_dsn_unknown_remote_mta_diagnostic_and_attempt_are_left_out() -> None:
    bare = FailedRecipient(address="carol@y.example", status="4.4.7", diagnostic="")
    _, carol = status_blocks(parse(build(recipients=[bare])))
    assert dict(carol.items()) == {
        "Final-Recipient": "rfc822; carol@y.example",
        "Action": "failed",
        "Status": "4.4.7",
    }


def test_dsn_our_own_words_are_not_labelled_as_an_smtp_reply() -> None:
    own = FailedRecipient("carol@y.example", "4.4.7", "connection refused by mx.y.example")
    _, carol = status_blocks(parse(build(recipients=[own])))
    assert carol["Diagnostic-Code"] == "X-clientid-mta; connection refused by mx.y.example"


def test_dsn_human_part_lists_each_recipient_and_diagnostic() -> None:
    text = parts(parse(build()))[0].get_content()
    assert "<bob@x.example> (from mx.x.example):" in text
    assert "550 5.1.1 <bob@x.example>: user unknown" in text
    assert "could not be delivered" in text


def test_dsn_returns_the_original_headers_and_never_the_body() -> None:
    raw = build()
    assert original_headers(parse(raw)) == ORIGINAL_HEADERS.decode()
    assert b"SECRET BODY" not in raw


def test_dsn_reads_the_original_from_a_file() -> None:
    stored = io.BytesIO(ORIGINAL)
    assert original_headers(parse(build(original=stored))) == ORIGINAL_HEADERS.decode()


def test_dsn_crlf_original_is_returned_with_lf() -> None:
    crlf = ORIGINAL.replace(b"\n", b"\r\n")
    raw = build(original=crlf)
    assert original_headers(parse(raw)) == ORIGINAL_HEADERS.decode()
    assert b"\r" not in raw and b"SECRET BODY" not in raw


@pytest.mark.parametrize("kind", ["bytes", "file"])
def test_dsn_original_without_body_separator_is_returned_whole(kind: str) -> None:
    headers_only = ORIGINAL_HEADERS.rstrip(b"\n")  # not even a final line break
    original = headers_only if kind == "bytes" else io.BytesIO(headers_only)
    assert original_headers(parse(build(original=original))) == ORIGINAL_HEADERS.decode()


def test_dsn_original_with_no_headers_gives_an_empty_third_part() -> None:
    raw = build(original=b"\nonly a body\n")
    message = parse(raw)
    assert parts(message)[2].get_content_type() == "text/rfc822-headers"
    assert original_headers(message).strip() == ""
    assert b"only a body" not in raw


@pytest.mark.parametrize("size", [MAX_ORIGINAL_HEADERS - 1, MAX_ORIGINAL_HEADERS])
@pytest.mark.parametrize("separator", [b"\nSECRET BODY\n", b""], ids=["body", "no-body"])
def test_dsn_original_header_section_of_64_kib_is_kept_whole(size: int, separator: bytes) -> None:
    section = filler_of(size)
    returned = original_headers(parse(build(original=section + separator))).encode()
    assert returned == section


@pytest.mark.parametrize("separator", [b"\nSECRET BODY\n", b""], ids=["body", "no-body"])
def test_dsn_original_header_section_one_byte_over_64_kib_loses_its_last_line(
    separator: bytes,
) -> None:
    section = filler_of(MAX_ORIGINAL_HEADERS + 1)
    returned = original_headers(parse(build(original=section + separator))).encode()
    assert returned == section[: section.rindex(b"\n", 0, -1) + 1]


def filler_of(size: int) -> bytes:
    """A header section of exactly ``size`` octets, whole lines of X-Filler fields."""
    line = b"X-Filler: " + b"f" * 89 + b"\n"  # 100 octets
    section = ORIGINAL_HEADERS + line * ((size - len(ORIGINAL_HEADERS)) // 100 - 1)
    last = size - len(section)
    section += b"X-Last: " + b"l" * (last - 9) + b"\n"
    assert len(section) == size
    return section


@pytest.mark.parametrize("separator", [b"\n\nSECRET BODY\n", b""], ids=["body", "no-body"])
def test_dsn_original_header_section_is_capped_at_64_kib(separator: bytes) -> None:
    filler = b"".join(b"X-Filler-%05d: %s\n" % (n, b"f" * 60) for n in range(2000))
    assert len(filler) > 2 * MAX_ORIGINAL_HEADERS
    raw = build(original=ORIGINAL_HEADERS + filler + separator)
    returned = original_headers(parse(raw)).encode()
    assert 0 < len(returned) <= MAX_ORIGINAL_HEADERS
    assert returned.startswith(ORIGINAL_HEADERS)
    assert filler.startswith(returned[len(ORIGINAL_HEADERS) :])  # whole lines, in order
    assert returned.endswith(b"f" * 60 + b"\n")
    assert b"SECRET BODY" not in raw
    assert len(raw) < MAX_ORIGINAL_HEADERS + 8192


def test_dsn_eight_bit_original_headers_travel_as_quoted_printable() -> None:
    eight_bit = ORIGINAL_HEADERS + "Subject: caf\u00e9 \u2615\n".encode() + b"X-Bare: a\rb\n"
    raw = build(original=eight_bit + b"\nbody\n")
    raw.decode("ascii")
    assert b"\r" not in raw
    message = parse(raw)
    third = parts(message)[2]
    assert third["Content-Transfer-Encoding"] == "quoted-printable"
    assert original_headers(message) == eight_bit.decode()


def test_dsn_original_headers_in_no_known_charset_stay_7bit_and_unlabelled() -> None:
    raw = build(original=ORIGINAL_HEADERS + b"Subject: caf\xe9\n\nbody\n")
    raw.decode("ascii")
    third = parts(parse(raw))[2]
    assert third["Content-Transfer-Encoding"] == "quoted-printable"
    assert third.get_param("charset") is None
    assert str(third.get_payload()).endswith("Subject: caf=E9\n")


@pytest.mark.parametrize(
    "override",
    [
        {"recipients": [FailedRecipient(INJECTION, "5.1.1", "550 no")]},
        {"recipients": [FailedRecipient("bob@x.example", "5.1.1", f"550 {INJECTION}")]},
        {"recipients": [FailedRecipient("bob@x.example", "5.1.1", "550", INJECTION)]},
        {"recipients": [FailedRecipient("bob@x.example", f"5.1.1{INJECTION}", "550")]},
        {"original_sender": f"alice@example.org>{INJECTION}"},
        {"postmaster": INJECTION},
        {"queue_id": INJECTION},
        {"reporting_mta": f"{HOST}{INJECTION}"},
    ],
    ids=[
        "address",
        "diagnostic",
        "remote_mta",
        "status",
        "original_sender",
        "postmaster",
        "queue_id",
        "reporting_mta",
    ],
)
def test_dsn_header_injection_from_remote_values_is_neutralised(override: dict[str, Any]) -> None:
    raw = build(**override)
    raw.decode("ascii")
    assert b"\r" not in raw and b"\x00" not in raw and b"\x1b" not in raw
    message = parse(raw)
    assert len(parts(message)) == 3
    assert [p.get_content_type() for p in parts(message)][1:] == [
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    names = {name.lower() for name, _ in every_header(message)}
    assert "x-injected" not in names
    assert not re.search(rb"^X-Injected:", raw, re.MULTILINE)
    assert not re.search(rb"^--boundary", raw, re.MULTILINE)
    assert len(status_blocks(message)) == 2


def test_dsn_invalid_status_falls_back_to_a_generic_code() -> None:
    recipients = [FailedRecipient("bob@x.example", "550", "550 no")]
    _, failed = status_blocks(parse(build(recipients=recipients)))
    _, delayed = status_blocks(parse(build(recipients=[BOB], action="delayed")))
    assert (failed["Status"], delayed["Status"]) == ("5.0.0", "4.0.0")


def test_dsn_long_multiline_diagnostic_is_folded_and_capped() -> None:
    reply = "\r\n".join(f"550-5.7.1 line {n} " + "word " * 40 for n in range(30))
    raw = build(recipients=[FailedRecipient("bob@x.example", "5.7.1", reply, "mx.x.example")])
    assert max(len(line) for line in raw.split(b"\n")) <= 78
    _, bob = status_blocks(parse(raw))
    value = bob["Diagnostic-Code"]
    assert value.startswith("smtp; 550-5.7.1 line 0 word word")
    assert len(value) <= len("smtp; ") + MAX_DIAGNOSTIC
    assert " ".join(reply.split()).startswith(value.removeprefix("smtp; "))


def test_dsn_multiple_recipients_each_get_their_block_in_order() -> None:
    others = [
        FailedRecipient(f"user{n}@z{n}.example", f"5.{n}.1", f"550 5.{n}.1 no {n}", f"mx.z{n}")
        for n in range(1, 4)
    ]
    message = parse(build(recipients=[BOB, *others]))
    blocks = status_blocks(message)[1:]
    assert [b["Final-Recipient"] for b in blocks] == [
        "rfc822; bob@x.example",
        "rfc822; user1@z1.example",
        "rfc822; user2@z2.example",
        "rfc822; user3@z3.example",
    ]
    assert [b["Status"] for b in blocks] == ["5.1.1", "5.1.1", "5.2.1", "5.3.1"]
    assert [b["Remote-MTA"] for b in blocks[1:]] == ["dns; mx.z1", "dns; mx.z2", "dns; mx.z3"]
    assert {b["Action"] for b in blocks} == {"failed"}
    text = parts(message)[0].get_content()
    assert all(f"<user{n}@z{n}.example>" in text for n in range(1, 4))


@pytest.mark.parametrize("retry_until", [None, ARRIVAL + 2 * 86400])
def test_dsn_delay_notice_says_until_when_it_will_retry(retry_until: float | None) -> None:
    delayed = FailedRecipient("bob@x.example", "4.2.2", "452 4.2.2 mailbox full", "mx.x.example")
    raw = build(recipients=[delayed], action="delayed", retry_until=retry_until)
    message = parse(raw)
    until = ARRIVAL + FIVE_DAYS if retry_until is None else retry_until
    assert message["Subject"] == "Delayed Mail (still being retried)"
    assert message.get_param("report-type") == "delivery-status"
    _, bob = status_blocks(message)
    assert (bob["Action"], bob["Status"]) == ("delayed", "4.2.2")
    assert date_of(bob["Will-Retry-Until"]) == until
    text = parts(message)[0].get_content()
    assert bob["Will-Retry-Until"] in text
    assert "do not need to do anything" in text
    assert original_headers(message) == ORIGINAL_HEADERS.decode()


def test_dsn_failure_notice_has_no_will_retry_until() -> None:
    _, bob = status_blocks(parse(build()))
    assert bob["Will-Retry-Until"] is None


def test_dsn_delivered_into_a_maildir_reads_back_whole(tmp_path: Path) -> None:
    raw = build()
    MaildirRoot(tmp_path).deliver_bytes("example.org", "alice", raw)
    box = mailbox.Maildir(tmp_path / "example.org" / "alice", factory=None, create=False)
    (key,) = box.keys()
    stored = box.get_bytes(key)
    assert stored == raw
    message = parse(stored)
    assert message.get_content_type() == "multipart/report"
    _, bob = status_blocks(message)
    assert bob["Final-Recipient"] == "rfc822; bob@x.example"
    assert original_headers(message) == ORIGINAL_HEADERS.decode()


def test_dsn_added_with_mailbox_maildir_reads_back(tmp_path: Path) -> None:
    box = mailbox.Maildir(tmp_path / "Maildir", create=True)
    key = box.add(build(action="delayed", recipients=[replace(BOB, status="4.4.1")]))
    message = parse(box.get_bytes(key))
    assert message["Subject"] == "Delayed Mail (still being retried)"
    assert [p.get_content_type() for p in parts(message)][1] == "message/delivery-status"


@pytest.mark.parametrize(("sender", "bounced"), [("", False), ("<>", False), (SENDER, True)])
def test_dsn_null_sender_is_never_bounced(sender: str, bounced: bool) -> None:
    assert is_bounce_candidate(sender) is bounced


@pytest.mark.parametrize(
    "override",
    [{"original_sender": ""}, {"recipients": []}, {"action": "relayed"}],
    ids=["null-sender", "no-recipients", "unknown-action"],
)
def test_dsn_refuses_to_build_a_notice_that_must_not_exist(override: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        build(**override)
