"""Delivery status notifications: bounces and delay notices (RFC 3464, RFC 6522).

A notice is a ``multipart/report; report-type=delivery-status`` message in three parts:
a text/plain explanation for people, the machine-readable ``message/delivery-status``,
and the original header section as ``text/rfc822-headers`` (never the body).

Addresses, host names and diagnostics come from remote servers: every value is reduced
to printable ASCII on one line and capped in length before it reaches a header field,
so a hostile reply cannot add fields or parts. The result is 7-bit with LF line endings;
only the copied original headers may need quoted-printable, and then they get it.

The null sender is never bounced (RFC 5321 section 6.1): ask :func:`is_bounce_candidate`.
"""

from __future__ import annotations

import re
import secrets
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate, make_msgid
from quopri import encodestring
from typing import BinaryIO

from clientid_mta.config import QueueConfig
from clientid_mta.smtp.addresses import AddressSyntaxError, parse_path

FAILED = "failed"
DELAYED = "delayed"

MAX_ORIGINAL_HEADERS = 64 * 1024
MAX_ADDRESS = 256  # RFC 5321 path limit
MAX_HOST = 255
MAX_DIAGNOSTIC = 900  # keeps every field line under 998 octets even unfolded
MAX_QUEUE_ID = 64

_SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
}
# RFC 3463: a failure is class 4 (given up on a transient error, such as 4.4.7) or 5;
# a delay is always class 4
_STATUS_RES = {
    FAILED: re.compile(r"[45]\.\d{1,3}\.\d{1,3}\Z"),
    DELAYED: re.compile(r"4\.\d{1,3}\.\d{1,3}\Z"),
}
_SMTP_REPLY_RE = re.compile(r"[2-5]\d\d(?:[ -]|\Z)")
_HOST_UNSAFE_RE = re.compile(r"[^A-Za-z0-9.:\[\]_-]")
_NOT_PRINTABLE_RE = re.compile(r"[^\x20-\x7e]")
_SPACES_RE = re.compile(r"\s+")
_NOT_7BIT_RE = re.compile(rb"[^\t\n\x20-\x7e]")
_LOCAL_DIAGNOSTIC_TYPE = "X-clientid-mta"


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient the notice is about, and what went wrong for it."""

    address: str  # the envelope recipient
    status: str  # enhanced status code: "5.1.1", "4.4.7" on expiry, "4.x.x" when delayed
    diagnostic: str  # the remote reply ("550 5.1.1 ..."), or our own words; may be ""
    remote_mta: str = ""  # host name of the server that answered, "" if none
    last_attempt: float | None = None  # epoch seconds


def is_bounce_candidate(sender: str) -> bool:
    """False for the null reverse-path: notices about notices are never sent."""
    return sender.strip() not in ("", "<>")


def build_dsn(
    *,
    reporting_mta: str,
    postmaster: str,
    original_sender: str,
    queue_id: str,
    arrival: float,
    recipients: Sequence[FailedRecipient],
    original: BinaryIO | bytes,
    action: str = FAILED,
    now: float | None = None,
    retry_until: float | None = None,
) -> bytes:
    """The complete notice (RFC 5322, LF line endings, 7-bit), for a Maildir or the queue.

    ``original`` is the stored message; only its header section is read, from the current
    position of a file, up to the first empty line and at most 64 KiB. ``retry_until``
    (epoch seconds) is what a delay notice promises; by default arrival plus the default
    ``max_queue_time``.
    """
    if action not in _SUBJECTS:
        raise ValueError(f"action must be {FAILED!r} or {DELAYED!r}, not {action!r}")
    if not is_bounce_candidate(original_sender):
        raise ValueError("a notice is never sent to the null sender")
    if not recipients:
        raise ValueError("a notice needs at least one recipient")
    now = time.time() if now is None else now
    if retry_until is None:
        retry_until = arrival + QueueConfig.max_queue_time
    host = _host(reporting_mta) or "localhost"
    sender = _mailbox(original_sender)
    postmaster = _mailbox(postmaster) or f"MAILER-DAEMON@{host}"
    rows = [_Row.of(r, action) for r in recipients]

    headers_part = _original_headers_part(_read_header_section(original))
    explanation = _explanation(host, queue_id, arrival, rows, action, retry_until)
    status = _delivery_status(host, queue_id, arrival, rows, action, retry_until)
    parts = [
        b"Content-Type: text/plain; charset=us-ascii\n"
        b"Content-Description: Notification\n"
        b"Content-Transfer-Encoding: 7bit\n\n" + explanation.encode("ascii"),
        b"Content-Type: message/delivery-status\n"
        b"Content-Description: Delivery report\n"
        b"Content-Transfer-Encoding: 7bit\n\n" + status.encode("ascii"),
        headers_part,
    ]
    boundary = _boundary(parts)
    head = (
        f"From: Mail Delivery System <{postmaster}>\n"
        f"To: {f'<{sender}>' if sender else 'undisclosed-recipients:;'}\n"
        f"Subject: {_SUBJECTS[action]}\n"
        f"Date: {_date(now)}\n"
        f"Message-ID: {make_msgid(domain=host)}\n"
        "Auto-Submitted: auto-replied\n"
        "MIME-Version: 1.0\n"
        "Content-Type: multipart/report; report-type=delivery-status;\n"
        f'\tboundary="{boundary}"\n'
        "Content-Transfer-Encoding: 7bit\n"
        "\n"
        "This is a MIME-encapsulated message.\n"
    ).encode("ascii")
    delimiter = f"\n--{boundary}\n".encode("ascii")
    body = b"".join(delimiter + part.rstrip(b"\n") + b"\n" for part in parts)
    return head + body + f"\n--{boundary}--\n".encode("ascii")


@dataclass(frozen=True)
class _Row:
    """A recipient with every value already made safe for a header field."""

    address: str
    status: str
    diagnostic: str
    remote_mta: str
    last_attempt: float | None

    @classmethod
    def of(cls, recipient: FailedRecipient, action: str) -> _Row:
        status = recipient.status.strip()
        if not _STATUS_RES[action].match(status):
            status = "4.0.0" if action == DELAYED else "5.0.0"
        return cls(
            address=_address(recipient.address) or "unknown",
            status=status,
            diagnostic=_text(recipient.diagnostic, MAX_DIAGNOSTIC),
            remote_mta=_host(recipient.remote_mta),
            last_attempt=recipient.last_attempt,
        )

    @property
    def diagnostic_type(self) -> str:
        """The diagnostic-type: smtp for a server's reply, a private one for our own words."""
        return "smtp" if _SMTP_REPLY_RE.match(self.diagnostic) else _LOCAL_DIAGNOSTIC_TYPE


def _text(value: str, limit: int) -> str:
    """One line of printable ASCII: line breaks and tabs become spaces, the rest goes."""
    flat = _SPACES_RE.sub(" ", value)
    return _NOT_PRINTABLE_RE.sub("", flat).strip()[:limit].rstrip()


def _address(value: str) -> str:
    """An address fit to stand inside angle brackets or after "rfc822;"."""
    return _text(value, MAX_ADDRESS).replace("<", "").replace(">", "").strip()


def _mailbox(value: str) -> str:
    """A valid RFC 5321 mailbox to name in a header field, or "" when it is not one."""
    try:
        return parse_path(f"TO:<{_address(value)}>".encode("ascii"), "TO", False).address
    except AddressSyntaxError:
        return ""


def _host(value: str) -> str:
    return _HOST_UNSAFE_RE.sub("", value)[:MAX_HOST]


def _date(when: float) -> str:
    return formatdate(when, localtime=True)


def _field(name: str, value: str) -> str:
    """A field folded at spaces so that lines stay short (RFC 5322 2.2.3)."""
    lines = textwrap.wrap(
        f"{name}: {value}",
        width=76,
        subsequent_indent=" ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    return "\n".join(lines) + "\n"


def _delivery_status(
    host: str,
    queue_id: str,
    arrival: float,
    rows: Sequence[_Row],
    action: str,
    retry_until: float,
) -> str:
    """The message/delivery-status body: per-message fields, then one block per recipient."""
    blocks = [
        _field("Reporting-MTA", f"dns; {host}")
        + _field("Arrival-Date", _date(arrival))
        + _field("X-Queue-ID", _text(queue_id, MAX_QUEUE_ID) or "unknown")
    ]
    for row in rows:
        block = (
            _field("Final-Recipient", f"rfc822; {row.address}")
            + _field("Action", action)
            + _field("Status", row.status)
        )
        if row.remote_mta:
            block += _field("Remote-MTA", f"dns; {row.remote_mta}")
        if row.diagnostic:
            block += _field("Diagnostic-Code", f"{row.diagnostic_type}; {row.diagnostic}")
        if row.last_attempt is not None:
            block += _field("Last-Attempt-Date", _date(row.last_attempt))
        if action == DELAYED:
            block += _field("Will-Retry-Until", _date(retry_until))
        blocks.append(block)
    return "\n".join(blocks)


def _explanation(
    host: str,
    queue_id: str,
    arrival: float,
    rows: Sequence[_Row],
    action: str,
    retry_until: float,
) -> str:
    """The part for people: what happened, to whom, and what to do."""
    if action == DELAYED:
        intro = (
            f"This is the mail system at {host}.\n\n"
            "Your message has not been delivered yet to the recipients below. The\n"
            f"mail system will keep trying until {_date(retry_until)}.\n"
            "You do not need to do anything: you will be told if it finally fails.\n"
        )
    else:
        intro = (
            f"This is the mail system at {host}.\n\n"
            "Your message could not be delivered to the recipients below, and the\n"
            "mail system has given up. The original headers are attached.\n"
        )
    lines = [
        intro,
        f"Queue ID: {_text(queue_id, MAX_QUEUE_ID) or 'unknown'}; accepted {_date(arrival)}.\n",
    ]
    for row in rows:
        where = f" (from {row.remote_mta})" if row.remote_mta else ""
        reason = row.diagnostic or f"status {row.status}"
        lines.append(f"<{row.address}>{where}:")
        lines.extend(
            textwrap.wrap(reason, width=72, initial_indent="    ", subsequent_indent="    ")
        )
        lines.append("")
    return "\n".join(lines)


def _read_header_section(original: BinaryIO | bytes) -> bytes:
    """The header section: up to the first empty line, whole lines only, at most 64 KiB."""
    if isinstance(original, bytes | bytearray | memoryview):
        data = bytes(original[: MAX_ORIGINAL_HEADERS + 2])
    else:
        data = original.read(MAX_ORIGINAL_HEADERS + 2)
    data = data.replace(b"\r\n", b"\n")
    if data.startswith(b"\n"):
        return b""
    end = data.find(b"\n\n")
    if end >= 0:
        data = data[: end + 1]
    if len(data) > MAX_ORIGINAL_HEADERS:
        data = data[:MAX_ORIGINAL_HEADERS]
        cut = data.rfind(b"\n")
        data = data[: cut + 1] if cut >= 0 else b""
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return data


def _is_7bit(data: bytes) -> bool:
    """Printable ASCII, tabs and line ends only, in lines of at most 998 octets."""
    lines_fit = all(len(line) <= 998 for line in data.split(b"\n"))
    return lines_fit and not _NOT_7BIT_RE.search(data)


def _original_headers_part(headers: bytes) -> bytes:
    """The text/rfc822-headers part; quoted-printable when the headers are not 7-bit."""
    if _is_7bit(headers):
        encoding, body = "7bit", headers
    else:
        # quopri leaves a bare CR alone; in quoted-printable it must be encoded too
        encoding, body = "quoted-printable", encodestring(headers).replace(b"\r", b"=0D")
    charset = "" if headers.isascii() or not _decodes_as_utf8(headers) else "; charset=utf-8"
    return (
        f"Content-Type: text/rfc822-headers{charset}\n"
        "Content-Description: Undelivered message headers\n"
        f"Content-Transfer-Encoding: {encoding}\n\n"
    ).encode("ascii") + body


def _decodes_as_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _boundary(parts: Sequence[bytes]) -> str:
    """A boundary that no part contains."""
    while True:
        boundary = f"=_dsn_{secrets.token_hex(12)}"
        if not any(boundary.encode("ascii") in part for part in parts):
            return boundary
