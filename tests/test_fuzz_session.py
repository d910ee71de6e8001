"""Issue 6, point 1: stateful fuzzing of the SMTP session against a model of docs/conformance.md.

A Hypothesis ``RuleBasedStateMachine`` drives one real server (in-process, real sockets,
real TLS, real Maildir) with random sequences of valid, malformed and out-of-order
commands: EHLO/HELO, STARTTLS, CLIENTID, AUTH PLAIN/LOGIN in every shape, MAIL, RCPT,
DATA with random bodies sent in random TCP segments, RSET, NOOP, HELP, VRFY, EXPN, QUIT,
garbage with NUL and 8-bit bytes, over-long lines and pipelined batches. Every example
opens a new connection (and reconnects after the server closes one).

``Model`` is a small SMTP server written from the docs/conformance.md rows, not from the code: it
reads the same byte stream the server reads and predicts every reply code (and the
enhanced status code where docs/conformance.md gives one). Where the standards leave the server
a choice, the model allows exactly the codes that are legitimate, and follows the one
the server chose. On top of that, the machine checks these invariants on every reply:

- the server never drops the connection without a reply, and it closes exactly when the
  model expects it (after QUIT, a 421 for too many errors or failed AUTHs);
- ``CLIENTID`` (250) and ``AUTH`` (235) are never accepted on a plaintext socket, and no
  message is accepted (250 at the end of data) without a 235 earlier in the session;
- an accepted message is in each recipient's Maildir exactly once per RCPT, with the
  body that was sent (unstuffed) and never the CLIENTID token; a refused one is nowhere;
- no traceback: no ``log.failure`` and no error or critical event in the server's log;
- nothing leaks: after each example the server's session counters (overall, per
  address, per device) are back to zero, and after the run no session object is alive.

Memory is checked through those counts, not RSS: the server shares its process with
Hypothesis, whose own bookkeeping grows the RSS by ~250 MB per 1000 examples even with
the sockets stubbed out, while the same server under a fixed workload of 2000 sessions
(TLS, AUTH, DATA, over-long lines) stays within 4 MB. Point 5 of the issue measures the
server's memory on its own.

CI runs ``FUZZ_EXAMPLES`` examples (default 60) of up to 25 steps. A longer campaign:

    FUZZ_EXAMPLES=5000 ./run-tests tests/test_fuzz_session.py
"""

from __future__ import annotations

import base64
import email.utils
import gc
import os
import re
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import bcrypt
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer

from clientid_mta.smtp.protocol import SubmissionESMTP
from tests.conftest import (
    HOSTNAME,
    THUNDERBIRD_UUID,
    RunningServer,
    ServerReads,
    Wire,
    start_server,
)

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))

ALICE, BOB = "alice@example.org", "bob@example.org"
PASSWORDS = {ALICE: "alice-password", BOB: "bob-password"}
# Each account's trusted device, as the server compares it (C13): made trusted before
# the run, so under policy tofu every other device presented with the right password
# is refused with 535 (C12), and a session without CLIENTID is allowed.
TRUSTED = {ALICE: ("UUID", THUNDERBIRD_UUID), BOB: ("X-LAPTOP", "bob-laptop-1")}

COMMAND_LINE = 510  # RFC 5321 4.5.3.1.4: 512 octets with CRLF (S8)
AUTH_LINE = 12288  # RFC 4954 4: AUTH lines and SASL responses
MAX_ERRORS = 12
MAX_AUTH_FAILURES = 3
MAX_LINE = 1000  # DATA line cap for this server (S8)
MAX_SIZE = 5000  # message size limit for this server (S7)
FUZZ_CONFIG = f"""
[limits]
max_sessions_per_address = 1000
max_errors = {MAX_ERRORS}
max_line_length = {MAX_LINE}
max_message_size = {MAX_SIZE}

[auth]
max_failures_per_session = {MAX_AUTH_FAILURES}

[throttle]
enabled = false
"""

USERNAME_CHALLENGE = base64.b64encode(b"Username:").decode()
PASSWORD_CHALLENGE = base64.b64encode(b"Password:").decode()
RFC5322_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+:.*", re.S)
CLIENTID_GRAMMAR = re.compile(rb"([A-Za-z0-9-]{1,16}) +([\x21-\x7e]{1,128})")  # C5
DOMAIN = re.compile(
    rb"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
)
ADDRESS_LITERAL = re.compile(rb"\[[\x21-\x5a\x5e-\x7e]+\]")


# --- the model --------------------------------------------------------------------------


class Mode(Enum):
    COMMAND = "command"
    PLAIN = "AUTH PLAIN response"
    LOGIN_USER = "AUTH LOGIN user name"
    LOGIN_PASSWORD = "AUTH LOGIN password"
    DATA = "DATA"


@dataclass(frozen=True)
class Outcome:
    """One legitimate reply: its text must start with ``status`` (alternatives separated by
    "|"); ``then`` is the model's transition when the server chose it, returning the
    replies that must follow (a 421 before the close)."""

    status: str = ""
    then: Callable[[], list[Expect]] | None = None


@dataclass(frozen=True)
class Message:
    recipients: list[str]
    lines: list[bytes]  # as they must be stored: unstuffed, without line ends
    secrets: tuple[str, ...]  # CLIENTID token of the session: never in the stored message


@dataclass(frozen=True)
class Expect:
    """The reply the model expects next: one of ``codes``."""

    what: str  # the line it answers, for messages
    codes: dict[int, Outcome]
    check: Callable[[int, list[str]], None] | None = None
    unknown_verb: bool = False  # C3: must be exactly the reply to an unknown verb
    message: Message | None = None  # the end of a DATA block


def b64(data: bytes) -> bytes | None:
    """RFC 4648 base64 as RFC 4954 uses it ("=" is the empty response); None if malformed."""
    data = data.strip()
    if data == b"=":
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        return None


def sasl_text(data: bytes) -> str | None:
    """A password: non-empty UTF-8 without NUL (RFC 4616), of sane length."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text and "\0" not in text and len(text) <= 1024 else None


def sasl_name(data: bytes) -> str | None:
    """A user name: a password-like text that cannot start a new line in a log."""
    text = sasl_text(data)
    breaks = text is not None and any(
        ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in text
    )
    return None if breaks else text


def greeting_name(name: bytes) -> set[int]:
    """The codes EHLO/HELO may get for ``name`` (RFC 5321 4.1.1.1)."""
    if not name or any(b < 0x21 or b > 0x7E for b in name):
        return {501}
    if len(name) <= 255 and (DOMAIN.fullmatch(name) or ADDRESS_LITERAL.fullmatch(name)):
        return {250}
    return {250, 501}  # printable but not a domain: servers may be lenient


def from_verdict(lines: list[bytes], account: str) -> tuple[str, bool]:
    """S6 at the end of data: (the status the check must refuse with, "" if none; whether
    a cautious server may refuse anyway).

    The header section is the run of RFC 5322 fields (and folded lines) before the first
    empty line. More than one From:, or one without an address, is malformed (5.6.0);
    an address not the account's is 5.7.1. If the section ends at a line that is no
    header field (a malformed message), a cautious server may also refuse on a From:
    line further down, with either status.
    """
    fields: list[bytes] = []
    malformed = False
    for line in lines:
        if line == b"":
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line  # unfolding (RFC 5322 2.2.3)
        elif RFC5322_FIELD.fullmatch(line):
            fields.append(line)
        else:
            malformed = True
            break
    values = [f.partition(b":")[2] for f in fields if f.partition(b":")[0].lower() == b"from"]
    authors = [
        [addr.lower() for _name, addr in email.utils.getaddresses([v.decode("ascii", "replace")])]
        for v in values
    ]
    if len(values) > 1 or any(not found or not all(found) for found in authors):
        return "5.6.0", malformed
    if any(a != account for found in authors for a in found):
        return "5.7.1", malformed
    return "", malformed


@dataclass(frozen=True)
class MailSpec:
    """A catalogued MAIL/RCPT argument: the address it names ('' null, None malformed)
    and the refusals its parameters allow (empty: the parameters are fine)."""

    address: str | None
    strict: bool = True  # False: lenient syntax that a server may also refuse with 501
    param_refusals: tuple[tuple[int, str], ...] = ()


SENDERS = {  # as written -> as compared (case-insensitive domain, source route dropped)
    "alice@example.org": ALICE,
    "alice@EXAMPLE.ORG": ALICE,
    "@relay.example:alice@example.org": ALICE,
    "bob@example.org": BOB,
    "carol@example.org": "carol@example.org",
    "alice@example.net": "alice@example.net",
    '"quoted local"@example.org': '"quoted local"@example.org',
    "": "",
}
RECIPIENTS = {  # as written -> (delivered to, refusals)
    "alice@example.org": (ALICE, ()),
    "bob@example.org": (BOB, ()),
    "bob@EXAMPLE.org": (BOB, ()),
    "carol@example.org": (None, ((550, "5.1.1"),)),
    "": (None, ((501, "5.5.4"),)),  # the null path is not a recipient
}
BAD_PARAM = ((555, "5.5.4"), (501, "5.5.4"))
MAIL_PARAMS: dict[str, tuple[tuple[int, str], ...]] = {
    "": (),
    " SIZE=1000": (),
    f" SIZE={MAX_SIZE}": (),
    f" SIZE={MAX_SIZE + 1}": ((552, "5.3.4"),),  # S7
    " SIZE=abc": ((501, "5.5.4"),),
    " BODY=8BITMIME": (),
    " body=7bit": (),
    " AUTH=<>": (),
    " BODY=BINARYMIME": BAD_PARAM,
    " FOO=BAR": BAD_PARAM,
    " SMTPUTF8": BAD_PARAM,
}
MALFORMED_MAIL = [
    "FROM:<alice@example.org",
    "FROM:<al ice@example.org>",
    "FROM:<alice@@example.org>",
    "TO:<alice@example.org>",
    "FROM:<alice@example.org> =x",
    "",
]
MALFORMED_RCPT = [
    "TO:<alice@example.org",
    "FROM:<alice@example.org>",
    "TO:<a b@example.org>",
    "",
]


def _catalogue(
    keyword: str, addresses: dict[str, Any], params: dict[str, tuple[tuple[int, str], ...]]
) -> dict[bytes, MailSpec]:
    specs: dict[bytes, MailSpec] = {}
    for written, target in addresses.items():
        address = target if isinstance(target, str) else written.lower()
        for form, strict in (("{}:<{}>", True), ("{}: <{}>", True), ("{}:{}", False)):
            if not written and not strict:
                continue
            for param, refusals in params.items():
                line = form.format(keyword, written) + param
                specs[line.encode()] = MailSpec(address, strict, refusals)
                specs[line.lower().encode()] = MailSpec(address, strict, refusals)
    return specs


MAIL_ARGS = _catalogue("FROM", SENDERS, MAIL_PARAMS)
MAIL_ARGS.update({m.encode(): MailSpec(None) for m in MALFORMED_MAIL})
MAIL_ARGS[b"FROM:<alice@exa\xffmple.org>"] = MailSpec(None)
RCPT_ARGS = _catalogue("TO", RECIPIENTS, {"": (), " NOTIFY=NEVER": BAD_PARAM})
RCPT_ARGS.update({m.encode(): MailSpec(None) for m in MALFORMED_RCPT})
RECIPIENT_BY_ADDRESS = {written.lower(): spec for written, spec in RECIPIENTS.items()}
RCPT_8BIT = b"TO:<caf\xc3\xa9@example.org>"  # no SMTPUTF8: 501 or 553


def ehlo_check(tls: bool, implicit: bool) -> Callable[[int, list[str]], None]:
    """C1, C2, S1, S3, S7, S14: what EHLO advertises in this state."""
    required = {"SIZE " + str(MAX_SIZE), "8BITMIME", "ENHANCEDSTATUSCODES"}
    optional = set()
    if tls:
        required |= {"AUTH LOGIN PLAIN", "CLIENTID"}  # and never PIPELINING with CLIENTID
    else:
        optional.add("PIPELINING")
        if not implicit:
            required.add("STARTTLS")

    def check(code: int, lines: list[str]) -> None:
        if code != 250:
            return
        assert lines[0].split()[0] == HOSTNAME, lines
        words = [line.upper().split() for line in lines[1:]]
        got = {" ".join([w[0], *sorted(w[1:])]) for w in words if w}
        assert required <= got <= required | optional, (sorted(got), sorted(required))

    return check


def help_check(tls: bool) -> Callable[[int, list[str]], None]:
    def check(code: int, lines: list[str]) -> None:
        if code in (211, 214):
            assert ("CLIENTID" in " ".join(lines)) == tls, lines  # C3: not revealed

    return check


class Model:
    """What docs/conformance.md says one session must answer, fed the bytes the server gets."""

    def __init__(self, implicit: bool) -> None:
        self.implicit = implicit
        self.tls = implicit
        self.buffer = bytearray()
        self.closed = False
        self.handshake_due = False
        self.errors = 0
        self.auth_failures = 0
        self.failed_credentials: set[object] = set()
        self.mode = Mode.COMMAND
        self.reset_session()

    # state --------------------------------------------------------------------------

    def reset_session(self) -> None:
        """A new connection, or STARTTLS (S2): everything is forgotten."""
        self.greeted = False
        self.advertised = False  # CLIENTID advertised by an EHLO under TLS (C1, C4)
        self.clientid_done = False
        self.device: tuple[str, str] | None = None
        self.token: str | None = None
        self.auth_seen = False
        self.account: str | None = None
        self.login_user: str | None = None
        self.reset_transaction()

    def reset_transaction(self) -> None:
        self.sender = False
        self.recipients: list[str] = []
        self.body: list[bytes] = []

    def greeted_again(self, ehlo: bool) -> list[Expect]:
        """EHLO/HELO: a new transaction and a new client identity (C10)."""
        self.reset_transaction()
        self.device = self.token = None
        self.clientid_done = False
        if self.account is None:
            self.auth_seen = False
        self.greeted = True
        self.advertised = ehlo and self.tls
        return []

    # replies ------------------------------------------------------------------------

    def close(self) -> list[Expect]:
        self.closed = True
        self.buffer.clear()
        return []

    def counted(self, status: str) -> Outcome:
        """An error reply; too many of them end the session with 421 (S13)."""

        def then() -> list[Expect]:
            self.errors += 1
            if self.errors >= MAX_ERRORS:
                return [Expect("(too many errors)", {421: Outcome("4.7.0", self.close)})]
            return []

        return Outcome(status, then)

    def refusals(self, *options: tuple[int, str]) -> dict[int, Outcome]:
        """Counted error replies; one code may come with several legitimate statuses."""
        codes: dict[int, Outcome] = {}
        for code, status in options:
            known = codes.get(code)
            codes[code] = self.counted(f"{known.status}|{status}" if known else status)
        return codes

    def refuse(self, what: str, *options: tuple[int, str]) -> list[Expect]:
        return [Expect(what, self.refusals(*options))]

    def ok(
        self,
        what: str,
        code: int,
        status: str = "",
        then: Callable[[], list[Expect]] | None = None,
        check: Callable[[int, list[str]], None] | None = None,
    ) -> list[Expect]:
        return [Expect(what, {code: Outcome(status, then)}, check)]

    def unknown(self, what: str) -> list[Expect]:
        return [Expect(what, {500: self.counted("5.5.1")}, unknown_verb=True)]  # S12

    # the byte stream ----------------------------------------------------------------

    def step(self) -> list[Expect] | None:
        """Take the next complete line from the buffer; None when there is none."""
        if self.closed:
            return None
        # Only CRLF ends a line (RFC 5321 2.3.8, S10): a bare CR or LF is part of the line.
        end = self.buffer.find(b"\r\n")
        if end < 0:
            return None
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return self.data_line(line) if self.mode is Mode.DATA else self.line(line)

    def line(self, line: bytes) -> list[Expect]:
        what = line[:60].decode("ascii", "replace")
        sasl = self.mode is not Mode.COMMAND
        limit = AUTH_LINE if sasl or line[:5].upper() == b"AUTH " else COMMAND_LINE
        if len(line) > limit:
            self.mode = Mode.COMMAND  # S8; an over-long SASL response ends the exchange
            return self.refuse(what, (500, "5.5.2"))
        if sasl:
            return self.sasl_response(what, line)
        verb, _, rest = line.strip(b" \t").partition(b" ")
        handler = getattr(self, "cmd_" + verb.decode("ascii", "replace").upper(), None)
        if handler is None or not verb.isalpha():
            return self.unknown(what)
        result: list[Expect] = handler(what, rest.strip(b" \t"))
        return result

    # commands -----------------------------------------------------------------------

    def _greeting(self, what: str, rest: bytes, ehlo: bool) -> list[Expect]:
        codes = greeting_name(rest)
        outcomes: dict[int, Outcome] = {}
        if 501 in codes:
            outcomes[501] = self.counted("5.5.4")
        if 250 in codes:
            outcomes[250] = Outcome("", lambda: self.greeted_again(ehlo))
        check = ehlo_check(self.tls, self.implicit) if ehlo else self._helo_check
        return [Expect(what, outcomes, check)]

    @staticmethod
    def _helo_check(code: int, lines: list[str]) -> None:
        if code == 250:
            assert lines[0].split()[0] == HOSTNAME, lines  # S14

    def cmd_EHLO(self, what: str, rest: bytes) -> list[Expect]:
        return self._greeting(what, rest, ehlo=True)

    def cmd_HELO(self, what: str, rest: bytes) -> list[Expect]:
        return self._greeting(what, rest, ehlo=False)

    def cmd_STARTTLS(self, what: str, rest: bytes) -> list[Expect]:
        refusals = [(503, "5.5.1")] if self.tls else []  # S1, S2
        refusals += [(501, "5.5.4")] if rest else []
        if refusals:
            return self.refuse(what, *refusals)
        return self.ok(what, 220, "2.0.0", self.start_tls)

    def start_tls(self) -> list[Expect]:
        self.buffer.clear()  # S2: what followed STARTTLS in plaintext is discarded
        self.handshake_due = True
        self.tls = True
        self.reset_session()
        return []

    def cmd_CLIENTID(self, what: str, rest: bytes) -> list[Expect]:
        # The check order of docs/conformance.md: C3, C4, C7, C8, C6, C5, C9.
        if not self.tls:
            return self.unknown(what)
        if not self.advertised or self.auth_seen or self.account or self.sender:
            return self.refuse(what, (503, "5.5.1"))
        if self.clientid_done:
            return self.refuse(what, (503, "5.5.1"))
        match = CLIENTID_GRAMMAR.fullmatch(rest)
        if match is None:
            return self.refuse(what, (501, "5.5.4"))
        client_type = match[1].decode().upper()
        token = match[2].decode()
        device = (client_type, token.lower() if client_type.endswith("UUID") else token)

        def accepted() -> list[Expect]:
            self.clientid_done = True
            self.device, self.token = device, token
            return []

        return self.ok(what, 250, "2.0.0", accepted)

    def cmd_AUTH(self, what: str, rest: bytes) -> list[Expect]:
        if not self.tls:
            return self.refuse(what, (530, "5.7.0"))  # S3
        if not self.greeted or self.account or self.sender:
            return self.refuse(what, (503, "5.5.1"))  # S4
        self.auth_seen = True  # C7
        parts = rest.split()
        if not parts or len(parts) > 2:
            return self.refuse(what, (501, "5.5.4"))
        mechanism = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        if mechanism == b"PLAIN":
            if initial is None:
                return self.challenge(what, "", Mode.PLAIN)
            return self.plain(what, initial)
        if mechanism == b"LOGIN":
            if initial is None:
                return self.challenge(what, USERNAME_CHALLENGE, Mode.LOGIN_USER)
            return self.login_user_response(what, initial)
        return self.refuse(what, (504, "5.5.4"))

    def challenge(self, what: str, text: str, mode: Mode) -> list[Expect]:
        def then() -> list[Expect]:
            self.mode = mode
            return []

        def check(code: int, lines: list[str]) -> None:
            assert lines == [text], lines

        return self.ok(what, 334, "", then, check)

    def sasl_response(self, what: str, line: bytes) -> list[Expect]:
        mode, self.mode = self.mode, Mode.COMMAND
        if line.strip() == b"*":
            self.login_user = None
            return self.refuse(what, (501, "5.0.0"))  # S4: cancelled
        if mode is Mode.PLAIN:
            return self.plain(what, line)
        if mode is Mode.LOGIN_USER:
            return self.login_user_response(what, line)
        return self.login_password(what, line)

    def plain(self, what: str, response: bytes) -> list[Expect]:
        message = b64(response)
        if message is None:
            return self.refuse(what, (501, "5.5.2"))  # RFC 4954: undecodable is 501
        fields = message.split(b"\0")
        if len(fields) != 3:
            return self.malformed(what, ("plain", response))
        authzid, authcid, password = fields
        user, secret = sasl_name(authcid), sasl_text(password)
        if user is None or secret is None:
            return self.malformed(what, ("plain", response))
        if authzid and authzid != authcid:
            # Acting for another user is not offered.
            return self.login(what, None, "", tried=("proxy", user))
        return self.login(what, user, secret)

    def malformed(self, what: str, tried: object) -> list[Expect]:
        """Decodable but not credentials: a syntax error or a failed authentication."""
        failed = self.auth_failed(tried)
        return [Expect(what, {501: self.counted("5.5.2"), 535: failed})]

    def login_user_response(self, what: str, response: bytes) -> list[Expect]:
        message = b64(response)
        if message is None:
            return self.refuse(what, (501, "5.5.2"))
        user = sasl_name(message)

        def then() -> list[Expect]:
            self.mode, self.login_user = Mode.LOGIN_PASSWORD, user
            return []

        def check(code: int, lines: list[str]) -> None:
            if code == 334:
                assert lines == [PASSWORD_CHALLENGE], lines

        expect = Expect(what, {334: Outcome("", then)}, check)
        if user is None:  # malformed: refused now, or asked for the password and failed then
            expect.codes[501] = self.counted("5.5.2")
        return [expect]

    def login_password(self, what: str, response: bytes) -> list[Expect]:
        user, self.login_user = self.login_user, None
        message = b64(response)
        if message is None:
            return self.refuse(what, (501, "5.5.2"))
        secret = sasl_text(message)
        if secret is None:
            return self.malformed(what, ("login", user, response))
        return self.login(what, user, secret)

    def login(
        self, what: str, user: str | None, password: str, tried: object = None
    ) -> list[Expect]:
        account = user.strip().lower() if user is not None else None
        if (
            account in PASSWORDS
            and password == PASSWORDS[account]
            and self.device in (None, TRUSTED[account])  # C12: tofu, devices trusted up front
        ):

            def accepted() -> list[Expect]:
                self.account = account
                return []

            return self.ok(what, 235, "2.7.0", accepted)
        return [Expect(what, {535: self.auth_failed(tried or ("login", user, password))})]

    def auth_failed(self, tried: object) -> Outcome:
        """A refusal; credentials that already failed in this session count once (M2)."""

        def then() -> list[Expect]:
            if tried in self.failed_credentials:
                return []
            self.failed_credentials.add(tried)
            self.auth_failures += 1
            if self.auth_failures >= MAX_AUTH_FAILURES:  # S13
                return [Expect("(too many failed AUTH)", {421: Outcome("4.7.0", self.close)})]
            return []

        return Outcome("5.7.8", then)  # C12: one reply for every refusal

    def transaction_refusal(self, what: str) -> list[Expect] | None:
        if not self.tls:
            return self.refuse(what, (530, "5.7.0"))  # S3
        if not self.greeted:
            return self.refuse(what, (503, "5.5.1"), (530, "5.7.0"))
        if self.account is None:
            return self.refuse(what, (530, "5.7.0"))  # S5
        return None

    def cmd_MAIL(self, what: str, rest: bytes) -> list[Expect]:
        refused = self.transaction_refusal(what)
        if refused is not None:
            return refused
        spec = MAIL_ARGS[rest]
        syntax = [(501, "5.5.4")] if spec.address is None or not spec.strict else []
        if self.sender:
            return self.refuse(what, (503, "5.5.1"), *syntax)  # a server may parse first
        if spec.address is None:
            return self.refuse(what, *syntax)
        problems = list(spec.param_refusals)
        if spec.address != self.account:
            problems.append((553, "5."))  # S6: a null sender is no address of the account
        options = self.refusals(*problems, *syntax)
        if 552 in options:
            options[552] = Outcome("5.3.4")  # S7: a size refusal is not a client error
        if not problems:

            def accepted() -> list[Expect]:
                self.sender = True
                return []

            options[250] = Outcome("2.1.0", accepted)
        return [Expect(what, options)]

    def cmd_RCPT(self, what: str, rest: bytes) -> list[Expect]:
        refused = self.transaction_refusal(what)
        if refused is not None:
            return refused
        if rest == RCPT_8BIT:  # 8-bit without SMTPUTF8
            spec, syntax = MailSpec(None), [(501, "5.5.4"), (553, "5.")]
        else:
            spec = RCPT_ARGS[rest]
            syntax = [(501, "5.5.4")] if spec.address is None or not spec.strict else []
        if not self.sender:
            return self.refuse(what, (503, "5.5.1"), *syntax)  # a server may parse first
        if spec.address is None:
            return self.refuse(what, *syntax)
        target, refusals = RECIPIENT_BY_ADDRESS[spec.address]
        problems = [*refusals, *spec.param_refusals]
        options = self.refusals(*problems, *syntax)
        if not problems:
            assert target is not None

            def accepted() -> list[Expect]:
                self.recipients.append(target)
                return []

            options[250] = Outcome("2.1.5", accepted)
        return [Expect(what, options)]

    def cmd_DATA(self, what: str, rest: bytes) -> list[Expect]:
        refused = self.transaction_refusal(what)
        if refused is not None:
            return refused
        options = [(501, "5.5.4")] if rest else []
        if not self.sender:
            options.append((503, "5.5.1"))
        elif not self.recipients:  # RFC 5321 3.3: 503 or 554 "no valid recipients"
            options += [(503, "5.5.1"), (554, "5.")]
        if options:
            return self.refuse(what, *options)

        def then() -> list[Expect]:
            self.mode = Mode.DATA
            return []

        return self.ok(what, 354, "", then)

    def data_line(self, line: bytes) -> list[Expect]:
        if line != b".":
            self.body.append(line)
            return []
        self.mode = Mode.COMMAND
        raw, recipients, account = self.body, self.recipients, self.account
        self.reset_transaction()
        assert account is not None
        kept = [r[1:] if r[:1] == b"." else r for r in raw if len(r) <= MAX_LINE]
        refusals = []
        if any(len(r) > MAX_LINE for r in raw):
            refusals.append((500, "5.5.2"))  # S8
        if sum(len(line) + 2 for line in kept) > MAX_SIZE:
            refusals.append((552, "5.3.4"))  # S7
        if any(b"\r" in line or b"\n" in line for line in kept):
            refusals.append((550, "5.6.0"))  # S10
        others = bool(refusals)
        must, may = from_verdict(kept, account)
        if must:
            refusals.append((550, must))  # S6
        if may:  # a malformed header section: what comes after it may be read either way
            refusals += [(550, "5.6.0"), (550, "5.7.1")]
        options = self.refusals(*refusals)
        if not others and not must:
            options[250] = Outcome("2.0.0")
        message = Message(recipients, kept, (self.token,) if self.token else ())
        return [Expect("(end of data)", options, message=message)]

    def cmd_RSET(self, what: str, rest: bytes) -> list[Expect]:
        return self.maybe_need_tls(what, 250, "2.0.0", self.reset_transaction)  # C10

    def cmd_NOOP(self, what: str, rest: bytes) -> list[Expect]:
        return self.ok(what, 250, "2.0.0")

    def cmd_QUIT(self, what: str, rest: bytes) -> list[Expect]:
        return self.ok(what, 221, "2.0.0", self.close)

    def cmd_HELP(self, what: str, rest: bytes) -> list[Expect]:
        expects = self.maybe_need_tls(what, 214, "", None, help_check(self.tls))
        expects[0].codes[211] = Outcome()
        return expects

    def cmd_VRFY(self, what: str, rest: bytes) -> list[Expect]:
        return self.maybe_need_tls(what, 252, "2.5.2")  # S12

    def cmd_EXPN(self, what: str, rest: bytes) -> list[Expect]:
        expects = self.refuse(what, (502, "5."))  # S12
        if not self.tls:
            expects[0].codes[530] = self.counted("5.7.0")
        return expects

    def maybe_need_tls(
        self,
        what: str,
        code: int,
        status: str,
        then: Callable[[], Any] | None = None,
        check: Callable[[int, list[str]], None] | None = None,
    ) -> list[Expect]:
        """RFC 3207 4: before TLS a server may answer 530 to all but NOOP/EHLO/STARTTLS/QUIT."""

        def transition() -> list[Expect]:
            if then is not None:
                then()
            return []

        expect = Expect(what, {code: Outcome(status, transition)}, check)
        if not self.tls:
            expect.codes[530] = self.counted("5.7.0")
        return [expect]


# --- what the fuzzer sends --------------------------------------------------------------

VERBS = {"EHLO", "HELO", "STARTTLS", "AUTH", "CLIENTID", "MAIL", "RCPT", "DATA"}
VERBS |= {"RSET", "NOOP", "QUIT", "HELP", "VRFY", "EXPN"}


def verb_of(line: bytes) -> str:
    return line.strip(b" \t").partition(b" ")[0].decode("ascii", "replace").upper()


def b64encode(data: bytes) -> bytes:
    return base64.b64encode(data) or b"="


GREETING_NAMES = [b"client.example.net", b"[127.0.0.1]", b"x", b"", b"a b", b"foo_bar!"]
GREETING_NAMES += [b"caf\xc3\xa9.example", b"\x00", b"a" * 256, b"client.example.net"]
TOKENS = [THUNDERBIRD_UUID.encode(), THUNDERBIRD_UUID.upper().encode(), b"bob-laptop-1"]
TOKENS += [b"BOB-LAPTOP-1", b"x" * 128]
BAD_CLIENTID = [b"", b"UUID", b"UUID a b", b"A" * 17 + b" tok", b"UUID " + b"t" * 129]
BAD_CLIENTID += [b"U_ID tok", b"UUID t\xffk", b"UUID t\x01k", b"UUID\ttok", b"UUID t\x00k"]
SIMPLE = [b"RSET", b"NOOP", b"noop", b"NOOP hello \xff\x00", b"HELP", b"VRFY alice"]
SIMPLE += [b"EXPN staff", b"QUIT", b"RSET", b"NOOP"]
BODY_LINES = [b"", b".", b"..", b".hidden", b"From: bob@example.org", b"hello", b"\xff\x00"]
BODY_LINES += [b"a\rb", b"a\nb", b"\n.", b".\n", b"\r.", b"x\r", b"\rx", b"\n", b"caf\xc3\xa9"]

greeting_lines = st.builds(
    lambda verb, name: verb + (b" " + name if name else b""),
    st.sampled_from([b"EHLO", b"HELO", b"ehlo", b"EHLO", b"EHLO"]),
    st.sampled_from(GREETING_NAMES),
)
client_types = st.sampled_from([b"UUID", b"uuid", b"X-UUID", b"X-LAPTOP", b"x-laptop"]) | (
    st.from_regex(rb"[A-Za-z0-9-]{1,16}", fullmatch=True)
)
client_tokens = st.sampled_from(TOKENS) | st.from_regex(rb"[\x21-\x7e]{1,128}", fullmatch=True)
clientid_lines = st.builds(
    lambda verb, args: verb + b" " + args,
    st.sampled_from([b"CLIENTID", b"clientid", b"ClientId"]),
    st.one_of(
        st.builds(
            lambda t, sep, tok: t + sep + tok,
            client_types,
            st.sampled_from([b" ", b"  "]),
            client_tokens,
        ),
        st.sampled_from(BAD_CLIENTID),
    ),
)
USERS = [b"alice@example.org", b"bob@example.org", b"ALICE@example.org", b" bob@example.org"]
USERS += [b"alice@example.org", b"carol@example.org", b"", b"\xff\xfe", b"al\x00ice"]
USERS += [b"alice@example.org\r\nX-Injected: 1", b"bob\xc2\x85", b"al\xe2\x80\xa8ice", b"\x1b[0m"]


@st.composite
def auth_exchanges(draw: st.DrawFn) -> list[bytes]:
    """An AUTH command and the responses a client would send after it (RFC 4954, 4616)."""
    mechanism = draw(st.sampled_from([b"PLAIN", b"LOGIN", b"plain", b"login", b"CRAM-MD5", b""]))
    user = draw(st.sampled_from(USERS))
    right = PASSWORDS.get(user.decode("utf-8", "replace").strip().lower(), "x").encode()
    password = draw(
        st.sampled_from([right, right, b"wrong", b"", b"p\xc3\xa4ss", b"p" * 600, b"p" * 1100])
    )
    authzid = draw(st.sampled_from([b"", b"", user, b"bob@example.org"]))
    initial = draw(st.booleans())
    spoil = draw(st.sampled_from([None, None, None, b"*", b"!!bad!!", b"=", b"YQ=", b"AGFsaWNl"]))
    if mechanism.upper() == b"PLAIN":
        responses = [b64encode(authzid + b"\0" + user + b"\0" + password)]
    elif mechanism.upper() == b"LOGIN":
        responses = [b64encode(user), b64encode(password)]
    else:
        return [b"AUTH " + mechanism + draw(st.sampled_from([b"", b" AAAA", b" a b"]))]
    if spoil is not None:
        responses[draw(st.integers(0, len(responses) - 1))] = spoil
    if initial:
        return [b"AUTH " + mechanism + b" " + responses[0], *responses[1:]]
    return [b"AUTH " + mechanism, *responses]


mail_lines = st.sampled_from(sorted(MAIL_ARGS)).map(lambda rest: b"MAIL " + rest)
rcpt_lines = st.sampled_from([*sorted(RCPT_ARGS), RCPT_8BIT]).map(lambda rest: b"RCPT " + rest)
simple_lines = st.sampled_from(SIMPLE)


def _one_line(data: bytes) -> bytes:
    """One line: bare CR and LF may stay (they do not end it, S10), CRLF may not."""
    while b"\r\n" in data:
        data = data.replace(b"\r\n", b"\n")
    return data


garbage_lines = (
    st.binary(max_size=80).map(_one_line).filter(lambda line: verb_of(line) not in VERBS)
)
overlong_lines = st.builds(
    lambda prefix, n: (prefix + b"A" * n)[:n],
    st.sampled_from([b"NOOP ", b"EHLO ", b"XYZZY ", b"AUTH PLAIN ", b"CLIENTID UUID "]),
    st.one_of(
        st.sampled_from([509, 510, 511, 512, 1000, AUTH_LINE, AUTH_LINE + 1, 20000]),
        st.integers(400, AUTH_LINE + 500),
    ),
)

HEADER_ITEMS = [
    [b"Subject: fuzz"],
    [b"From: alice@example.org"],
    [b"From: Alice <ALICE@example.org>"],
    [b"From: bob@example.org"],
    [b"from: bob@example.org"],
    [b"From: alice@example.org, bob@example.org"],
    [b"From:"],
    [b"From: Alice", b" <bob@example.org>"],
    [b"X-8bit: caf\xc3\xa9"],
    [b"To: bob@example.org"],
]
body_lines = st.one_of(
    st.binary(max_size=40).map(_one_line),
    st.sampled_from(BODY_LINES),
    st.sampled_from([MAX_LINE - 1, MAX_LINE, MAX_LINE + 1, 3 * MAX_LINE]).map(lambda n: b"L" * n),
)
bodies = st.builds(
    lambda headers, blank, lines: [*(h for item in headers for h in item), *[b""] * blank, *lines],
    st.lists(st.sampled_from(HEADER_ITEMS), max_size=4),
    st.booleans(),
    st.lists(body_lines, max_size=12),
)


@dataclass(frozen=True)
class Body:
    lines: list[bytes]
    stuff: bool  # dot-stuff every line that starts with "." (else only "." itself)
    cuts: list[int]  # where TCP segments end (modulo the places below)
    at_crlf: bool  # cut only between the CR and the LF of a line end


bodies_sent = st.builds(
    Body, bodies, st.booleans(), st.lists(st.integers(0, 2**16), max_size=3), st.booleans()
)


def render_body(lines: list[bytes], stuff: bool) -> bytes:
    """Lines with CRLF, dot-stuffed (always for "." itself), then the end of data."""
    out = []
    for line in lines:
        if line[:1] == b"." and (stuff or line == b"."):
            line = b"." + line
        out.append(line + b"\r\n")
    return b"".join(out) + b".\r\n"


# --- the machine ------------------------------------------------------------------------


def _sessions(server: RunningServer) -> Any:
    return server.service.components.sessions


def open_session(method: Any) -> Any:
    return precondition(lambda self: not self.model.closed)(method)


class SessionMachine(RuleBasedStateMachine):
    server: ClassVar[RunningServer]
    bad_events: ClassVar[list[dict[str, Any]]]
    unknown_reply: ClassVar[list[str]]
    context: ClassVar[ssl.SSLContext]
    reads: ClassVar[ServerReads]

    def __init__(self) -> None:
        super().__init__()
        self.wire: Wire | None = None
        self.model = Model(implicit=False)
        self.model.closed = True
        self.transcript: list[str] = []
        self.saw_235 = False
        self.known_files: dict[str, set[str]] = {}

    # connections --------------------------------------------------------------------

    def open(self, implicit: bool) -> None:
        if self.wire is not None:
            self.wire.close()
        self.wire = Wire(self.server, implicit=implicit)
        self.wire.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code, lines = self.wire.greeting
        assert code == 220 and lines[0].split()[0] == HOSTNAME, self.wire.greeting  # S14
        self.model = Model(implicit)
        self.saw_235 = False
        self.transcript.append(f"--- connect ({'465' if implicit else '587'}) <<< 220")

    @initialize(implicit=st.booleans())
    def connect(self, implicit: bool) -> None:
        self.open(implicit)

    @precondition(lambda self: self.model.closed)
    @rule(implicit=st.booleans())
    def reconnect(self, implicit: bool) -> None:
        self.open(implicit)

    def teardown(self) -> None:
        if self.wire is not None:
            self.wire.close()
        self.server.wait_for_sessions(
            lambda s: (s.total, s.by_address, s.by_device) == (0, {}, {}),
            "session counters back to zero",
        )
        events, self.bad_events[:] = list(self.bad_events), []
        assert not events, "the server logged errors:\n" + "\n".join(map(describe, events))

    # talking ------------------------------------------------------------------------

    def exchange(self, data: bytes, cuts: list[int] | None = None) -> None:
        """Send ``data`` (cut into TCP segments at ``cuts``) and check every reply."""
        assert self.wire is not None
        self.transcript.append(f">>> {data[:300]!r}" + (" ..." if len(data) > 300 else ""))
        bounds = sorted({c for c in cuts or [] if 0 < c < len(data)})
        read_before = self.reads.count(self.wire.sock)
        for start, stop in zip([0, *bounds], [*bounds, len(data)], strict=True):
            self.wire.send(data[start:stop])
            if stop < len(data):  # the next piece comes in a later read of the server
                read = self.reads.wait(self.wire.sock, read_before + stop)
                assert read, self.report("the server did not read the first piece")
        self.model.buffer += data
        while (expects := self.model.step()) is not None:
            self.check(expects)
        if self.model.handshake_due:
            self.model.handshake_due = False
            assert not self.wire._buffer, f"bytes after 220 to STARTTLS: {self.wire._buffer!r}"
            self.wire.sock = self.context.wrap_socket(self.wire.sock, server_hostname="127.0.0.1")
            self.saw_235 = False
            self.transcript.append("--- TLS handshake done")
        if self.model.closed:
            assert self.wire.is_closed(wait=3), self.report("the server did not close the session")
            assert not self.wire._buffer, self.report(f"sent after closing: {self.wire._buffer!r}")

    def report(self, problem: str) -> str:
        return problem + "\n" + "\n".join(self.transcript[-30:])

    def check(self, expects: list[Expect]) -> None:
        assert self.wire is not None
        queue = list(expects)
        while queue:
            expect = queue.pop(0)
            allowed = sorted(expect.codes)
            try:
                code, lines = self.wire.reply()
            except (OSError, ssl.SSLError) as error:
                raise AssertionError(
                    self.report(f"no reply to {expect.what!r} (expected {allowed}): {error!r}")
                ) from None
            self.transcript.append(f"<<< {code} {lines!r}"[:300])
            outcome = expect.codes.get(code)
            if outcome is None:
                raise AssertionError(
                    self.report(f"{expect.what!r}: got {code} {lines!r}, model allows {allowed}")
                )
            statuses = tuple(outcome.status.split("|"))
            assert lines[0].startswith(statuses), self.report(f"{code}: want {outcome.status}")
            if expect.check is not None:
                expect.check(code, lines)
            if expect.unknown_verb:
                assert lines == self.unknown_reply, self.report("C3: not the unknown-verb reply")
            self.assert_safety(expect, code)
            if expect.message is not None:
                self.check_delivery(expect.message, code, lines)
            if outcome.then is not None:
                queue[0:0] = outcome.then()

    def assert_safety(self, expect: Expect, code: int) -> None:
        assert self.wire is not None
        encrypted = isinstance(self.wire.sock, ssl.SSLSocket)
        if code == 250 and verb_of(expect.what.encode()) == "CLIENTID":
            assert encrypted, self.report("CLIENTID accepted before TLS")
        if code == 235:
            assert encrypted, self.report("AUTH accepted before TLS")
            self.saw_235 = True
        if code == 250 and expect.message is not None:
            assert self.saw_235, self.report("mail accepted without AUTH")

    # the Maildir --------------------------------------------------------------------

    def new_dir(self, address: str) -> Path:
        local, _, domain = address.partition("@")
        return self.server.config.delivery.maildir_root / domain / local / "new"

    def files(self, address: str) -> set[str]:
        folder = self.new_dir(address)
        return set(os.listdir(folder)) if folder.is_dir() else set()

    def snapshot(self, recipients: list[str]) -> None:
        for address in set(recipients):
            self.known_files[address] = self.files(address)

    def check_delivery(self, message: Message, code: int, lines: list[str]) -> None:
        """S11: an accepted message is stored once per recipient, as sent (a recipient named
        twice gets one copy, L3); a refused one nowhere."""
        queued = re.search(r"queued as (\S+)", lines[0]) if code == 250 else None
        assert code != 250 or queued, self.report("250 without a queue id")
        for address in sorted(set(message.recipients)):
            new = self.files(address) - self.known_files.get(address, set())
            self.known_files.setdefault(address, set()).update(new)
            tmp = self.new_dir(address).parent / "tmp"
            assert not (tmp.is_dir() and os.listdir(tmp)), self.report(f"left in {tmp}")
            if queued is None:
                assert not new, self.report(f"refused ({code}) but stored for {address}: {new}")
                continue
            assert len(new) == 1, self.report(f"{address}: {new}")
            for name in new:
                self.check_stored(self.new_dir(address) / name, queued[1], message)

    def check_stored(self, path: Path, queue_id: str, message: Message) -> None:
        data = path.read_bytes()
        stored = data.split(b"\n")
        assert stored[-1] == b"" and stored[0].startswith(b"Received: "), data[:200]
        assert stored[2].startswith(b"\tid " + queue_id.encode()), stored[:4]
        body, want = stored[4:-1], message.lines
        separated = body[:1] == [b""] and want[:1] != [b""]
        if separated and want and not RFC5322_FIELD.fullmatch(want[0]):
            body = body[1:]  # the blank line before a body without a header section
        assert body == want, self.report(f"{path} holds {body[:5]!r}..., sent {want[:5]!r}...")
        for token in message.secrets:
            if len(token) >= 16:
                assert token.encode() not in data, self.report("C14: the CLIENTID token stored")

    # rules --------------------------------------------------------------------------

    @open_session
    @rule(line=greeting_lines)
    def greet(self, line: bytes) -> None:
        self.exchange(line + b"\r\n")

    @open_session
    @rule(line=st.sampled_from([b"STARTTLS", b"starttls", b"STARTTLS now"]))
    def starttls(self, line: bytes) -> None:
        self.exchange(line + b"\r\n")

    @open_session
    @rule(line=clientid_lines)
    def clientid(self, line: bytes) -> None:
        self.exchange(line + b"\r\n")

    @open_session
    @rule(lines=auth_exchanges(), stop_after=st.integers(1, 3))
    def auth(self, lines: list[bytes], stop_after: int) -> None:
        self.exchange(lines[0] + b"\r\n")
        for response in lines[1:stop_after]:
            if self.model.mode in (Mode.COMMAND, Mode.DATA) or self.model.closed:
                break
            self.exchange(response + b"\r\n")

    @precondition(lambda self: not self.model.closed and self.model.mode is not Mode.COMMAND)
    @rule(line=st.sampled_from([b"*", b"=", b"!!", b"AGFsaWNlQGV4YW1wbGUub3JnAHg="]))
    def sasl_response(self, line: bytes) -> None:
        self.exchange(line + b"\r\n")

    @open_session
    @rule(line=mail_lines)
    def mail(self, line: bytes) -> None:
        self.exchange(line + b"\r\n")

    @open_session
    @rule(line=rcpt_lines)
    def rcpt(self, line: bytes) -> None:
        self.exchange(line + b"\r\n")

    @open_session
    @rule(arg=st.sampled_from([b"", b"", b"", b" x"]), body=bodies_sent)
    def data(self, arg: bytes, body: Body) -> None:
        self.send_data(arg, body)

    def send_data(self, arg: bytes, body: Body) -> None:
        self.exchange(b"DATA" + arg + b"\r\n")
        if self.model.mode is not Mode.DATA or self.model.closed:
            return
        self.snapshot(self.model.recipients)
        payload = render_body(body.lines, body.stuff)
        # Segments cut anywhere, or between the CR and the LF of a line end.
        places = [m.start() + 1 for m in re.finditer(b"\r\n", payload)] if body.at_crlf else []
        places = places or list(range(len(payload)))
        self.exchange(payload, [places[c % len(places)] for c in body.cuts])

    def send_lines(self, lines: list[bytes]) -> None:
        for line in lines:
            if self.model.closed:
                return
            self.exchange(line + b"\r\n")

    @open_session
    @rule(
        account=st.sampled_from([ALICE, BOB]),
        clientid=st.sampled_from([None, None, "trusted", "UUID another-device"]),
        mechanism=st.sampled_from(["PLAIN", "LOGIN"]),
    )
    def login(self, account: str, clientid: str | None, mechanism: str) -> None:
        """The way a mail client logs in, so that the machine gets past AUTH often."""
        lines = [] if self.model.tls else [b"EHLO client.example.net", b"STARTTLS"]
        lines.append(b"EHLO client.example.net")
        if clientid is not None:
            trusted = " ".join(TRUSTED[account])
            lines.append(f"CLIENTID {trusted if clientid == 'trusted' else clientid}".encode())
        password = PASSWORDS[account].encode()
        if mechanism == "PLAIN":
            lines.append(b"AUTH PLAIN " + b64encode(b"\0" + account.encode() + b"\0" + password))
        else:
            lines += [b"AUTH LOGIN " + b64encode(account.encode()), b64encode(password)]
        self.send_lines(lines)

    @open_session
    @rule(
        sender=st.sampled_from([b"", b"", b"", b"MAIL FROM:<bob@example.org>"]),
        recipients=st.lists(
            st.sampled_from([ALICE, BOB, BOB, "carol@example.org"]), min_size=1, max_size=3
        ),
        body=bodies_sent,
    )
    def transaction(self, sender: bytes, recipients: list[str], body: Body) -> None:
        """A whole mail transaction from the authenticated account (or a spoofed sender)."""
        own = f"MAIL FROM:<{self.model.account or ALICE}>".encode()
        self.send_lines([sender or own, *(f"RCPT TO:<{r}>".encode() for r in recipients)])
        if not self.model.closed and self.model.mode is Mode.COMMAND:
            self.send_data(b"", body)

    @open_session
    @rule(line=simple_lines)
    def simple(self, line: bytes) -> None:
        self.exchange(line + b"\r\n")

    @open_session
    @rule(line=garbage_lines, cuts=st.lists(st.integers(0, 80), max_size=2))
    def garbage(self, line: bytes, cuts: list[int]) -> None:
        self.exchange(line + b"\r\n", cuts)

    @open_session
    @rule(line=overlong_lines)
    def overlong(self, line: bytes) -> None:
        self.exchange(line + b"\r\n")

    @open_session
    @rule(
        lines=st.lists(
            st.one_of(
                simple_lines,
                mail_lines,
                rcpt_lines,
                greeting_lines,
                clientid_lines,
                garbage_lines,
                auth_exchanges().map(lambda lines: b"\r\n".join(lines)),
            ),
            min_size=2,
            max_size=6,
        )
    )
    def pipeline(self, lines: list[bytes]) -> None:
        """S9: a batch in one segment gets the replies it would get one by one."""
        self.exchange(b"".join(line + b"\r\n" for line in lines))


def describe(event: dict[str, Any]) -> str:
    failure = event.get("log_failure")
    text = formatEvent(event)
    return text + ("\n" + failure.getTraceback() if failure is not None else "")


def trust_device(server: RunningServer, account: str) -> None:
    wire = server.wire().tls_session()
    client_type, token = TRUSTED[account]
    assert wire.code(f"CLIENTID {client_type} {token}") == 250
    assert wire.auth_plain(account, PASSWORDS[account]) == 235
    assert wire.code("QUIT") == 221
    wire.close()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for the whole run; cheap bcrypt hashes so that AUTH costs ~1 ms."""
    server = start_server(tmp_path_factory.mktemp("fuzz-session"), FUZZ_CONFIG)
    lines = []
    for account, password in PASSWORDS.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        lines.append(f"{account}:{{BLF-CRYPT}}{hashed}\n")
    server.config.auth.passwd_file.write_text("".join(lines))
    for account in PASSWORDS:
        trust_device(server, account)
    yield server
    server.stop()


@implementer(ILogObserver)
@dataclass
class LogWatch:
    """Collects what would be a traceback or an error in the server's log."""

    events: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if event.get("log_failure") is not None or level in (LogLevel.error, LogLevel.critical):
            self.events.append(event)


@pytest.fixture(scope="module")
def machine(fuzz_server: RunningServer) -> Iterator[type[SessionMachine]]:
    """SessionMachine bound to the server, with the log watched while it runs."""
    watch = LogWatch()
    globalLogPublisher.addObserver(watch)
    wire = fuzz_server.wire()
    SessionMachine.unknown_reply = wire.cmd("XYZZY")[1]
    wire.close()
    SessionMachine.server = fuzz_server
    SessionMachine.bad_events = watch.events
    SessionMachine.context = fuzz_server.ssl_context()
    with pytest.MonkeyPatch.context() as patches:
        SessionMachine.reads = ServerReads().install(patches, SubmissionESMTP)
        yield SessionMachine
    globalLogPublisher.removeObserver(watch)


@pytest.mark.timeout(300 + FUZZ_EXAMPLES)  # a long campaign outlives the 300 s default
def test_C1_C16_S1_S15_random_sessions_get_the_replies_of_the_model(
    machine: type[SessionMachine],
) -> None:
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=FUZZ_EXAMPLES,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    gc.collect()
    sessions = _sessions(machine.server)
    alive = [
        o
        for o in gc.get_objects()
        if isinstance(o, SubmissionESMTP) and getattr(o, "sessions", None) is sessions
    ]
    assert not alive, f"{len(alive)} session objects outlived their connections"


# --- what the campaigns found, replayed on every run -------------------------------------

LONG_PLAIN = b"AUTH PLAIN " + b64encode(b"\0alice@example.org\0" + b"p" * 600)  # 839 octets


def replay(machine: type[SessionMachine], steps: list[tuple[str, dict[str, Any]]]) -> None:
    """Run rules of the machine in a fixed order, with the same model and checks."""
    session = machine()
    try:
        for name, arguments in steps:
            getattr(session, name)(**arguments)
    finally:
        session.teardown()


LOGIN = ("login", {"account": ALICE, "clientid": None, "mechanism": "PLAIN"})


GREETED: list[tuple[str, dict[str, Any]]] = [
    ("connect", {"implicit": True}),
    ("greet", {"line": b"EHLO client.example.net"}),
]


def test_S4_auth_initial_response_longer_than_a_command_line_is_read(
    machine: type[SessionMachine],
) -> None:
    """RFC 4954 4: an AUTH line may be 12288 octets; this one is a wrong password (535)."""
    replay(machine, [*GREETED, ("auth", {"lines": [LONG_PLAIN], "stop_after": 1})])


def test_S8_command_line_over_512_octets_is_refused_even_before_an_auth_line(
    machine: type[SessionMachine],
) -> None:
    """500 5.5.2 for the long NOOP, whatever line is pipelined after it."""
    pipelined = [b"NOOP " + b"x" * 600, b"AUTH PLAIN =", b"QUIT"]
    replay(machine, [*GREETED, ("pipeline", {"lines": pipelined})])


@pytest.mark.parametrize("cut_at_crlf", [False, True], ids=["cut-elsewhere", "cut-between-cr-lf"])
def test_S8_data_line_of_exactly_the_cap_is_accepted_however_it_is_cut(
    machine: type[SessionMachine], cut_at_crlf: bool
) -> None:
    body = Body([b"Subject: cap", b"", b"L" * MAX_LINE], False, [2], cut_at_crlf)
    transaction = {"sender": b"", "recipients": [BOB], "body": body}
    replay(machine, [("connect", {"implicit": False}), LOGIN, ("transaction", transaction)])


def test_C9_C11_C13_S11_trusted_device_logs_in_after_a_failure_and_sends(
    machine: type[SessionMachine],
) -> None:
    body = Body([b"From: bob@example.org", b"", b".dot", b"caf\xc3\xa9"], True, [5, 40], False)
    wrong = [b"AUTH LOGIN", b64encode(BOB.encode()), b64encode(b"wrong")]
    replay(
        machine,
        [
            ("connect", {"implicit": False}),
            ("login", {"account": BOB, "clientid": "trusted", "mechanism": "LOGIN"}),
            ("simple", {"line": b"QUIT"}),
            ("reconnect", {"implicit": True}),
            ("greet", {"line": b"EHLO client.example.net"}),
            ("clientid", {"line": b"CLIENTID x-laptop bob-laptop-1"}),
            ("auth", {"lines": wrong, "stop_after": 3}),
            (
                "auth",
                {
                    "lines": [b"AUTH PLAIN " + b64encode(b"\0bob@example.org\0bob-password")],
                    "stop_after": 1,
                },
            ),
            ("transaction", {"sender": b"", "recipients": [ALICE, BOB, ALICE], "body": body}),
        ],
    )
