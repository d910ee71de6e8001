"""Debian's Thunderbird, headless, against our twistd server (issue 15).

Each profile is one device: its outgoing server sends ``CLIENTID UUID <clientid>``.
Thunderbird's own compose and SMTP code sends (``nsIMsgSend.createAndSendMessage``
through Marionette, see ``tests/thunderbird_profile.py``); every scenario checks
Thunderbird's verdict and the server's side: the device list and the Maildir.

One server for the module, one Thunderbird start per profile (each start costs
seconds): "laptop" is the account's first device and stays trusted; "phone",
"tablet" and "no-uuid" are the later devices of the scenarios.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.serverproc import ServerProcess, devices, fingerprint_of, running
from tests.sink import wait_until
from tests.thunderbird_profile import (
    CERTUTIL,
    IMPLICIT_TLS,
    STARTTLS,
    THUNDERBIRD,
    OutgoingServer,
    SendResult,
    Thunderbird,
    build_profile,
)

pytestmark = [
    pytest.mark.skipif(
        shutil.which(THUNDERBIRD) is None,
        reason="thunderbird is not installed (Debian package thunderbird; CI installs it)",
    ),
    pytest.mark.skipif(
        shutil.which(CERTUTIL) is None,
        reason="certutil is not installed (Debian package libnss3-tools; CI installs it)",
    ),
]

ALICE, ALICE_PW = "alice@example.org", "alice-password"
BOB = "bob@example.org"
APPROVAL = "device-approval@example.org"
PENDING_SUBJECT = "A new device was refused on your mail account"
CODE = re.compile(r"\b[A-Z2-9]{5}-[A-Z2-9]{5}\b")
LAPTOP, PHONE, TABLET = (str(uuid.uuid4()) for _ in range(3))

StartThunderbird = Callable[..., Thunderbird]


@pytest.fixture(scope="module")
def tb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running(tmp_path_factory.mktemp("tb-server")) as server:
        yield server


@pytest.fixture(scope="module")
def start_thunderbird(
    tb_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StartThunderbird]:
    """Start Thunderbird on a new profile for ALICE (password stored); all quit at the end."""
    started: list[Thunderbird] = []
    root = tmp_path_factory.mktemp("thunderbird")

    def start(name: str, clientid: str | None, try_ssl: int = STARTTLS) -> Thunderbird:
        port = tb_server.port if try_ssl == STARTTLS else tb_server.tls_port
        outgoing = OutgoingServer(port, try_ssl, ALICE, clientid)
        profile = build_profile(root / name, outgoing, ALICE, tb_server.cafile)
        thunderbird = Thunderbird(profile, root / f"{name}-home")
        started.append(thunderbird)
        thunderbird.start()
        thunderbird.store_password(ALICE, ALICE_PW)
        return thunderbird

    yield start
    for thunderbird in started:
        thunderbird.stop()


@pytest.fixture(scope="module")
def laptop(start_thunderbird: StartThunderbird) -> tuple[Thunderbird, SendResult]:
    """The account's first device, and the result of its first send (over STARTTLS)."""
    thunderbird = start_thunderbird("laptop", LAPTOP)
    return thunderbird, send(thunderbird, "first from the laptop")


def send(thunderbird: Thunderbird, subject: str, to: str = BOB) -> SendResult:
    return thunderbird.send(ALICE, to, subject, f"{subject}.\n")


def explain(thunderbird: Thunderbird, result: SendResult) -> str:
    """Thunderbird's result, the dialogs it showed and its SMTP log: for failing asserts."""
    smtp_log = [line for line in thunderbird.log().splitlines() if "mailnews.smtp" in line]
    return f"{result}\n" + "\n".join(smtp_log[-40:])


def assert_sent(thunderbird: Thunderbird, result: SendResult) -> None:
    assert (result.sent, result.dialogs) == (True, []), explain(thunderbird, result)


def assert_refused(thunderbird: Thunderbird, result: SendResult) -> None:
    assert not result.sent, explain(thunderbird, result)
    [prompt] = result.dialogs
    assert_login_failed_prompt(prompt)


def assert_login_failed_prompt(prompt: dict[str, Any]) -> None:
    """What a refused device looks like in Thunderbird: the login-failed prompt, offering
    Retry and Enter New Password, and nothing about devices."""
    assert prompt["title"] == 'Login to account "127.0.0.1" failed', prompt
    assert prompt["text"] == f"Login to server 127.0.0.1 with username {ALICE} failed.", prompt
    assert prompt["buttons"] == ["Retry", "Cancel", "Enter New Password"], prompt


def subjects(server: ServerProcess, address: str = BOB) -> list[str]:
    return [str(message["Subject"]) for message in server.messages(address)]


def state_of(server: ServerProcess, clientid: str) -> str | None:
    """The device's state in ``device list`` (None: not listed)."""
    listing = devices(server.cli("device", "list", ALICE).stdout)
    row = listing.get(fingerprint_of(server, f"UUID {clientid}"))
    return row[1] if row else None


def wire_lines(thunderbird: Thunderbird, prefix: str) -> list[str]:
    """The commands Thunderbird logged as sent (``C: ...``) starting with ``prefix``."""
    return re.findall(rf'"C: ({prefix}[^"]*)"', thunderbird.log())


def pending_notice(server: ServerProcess, clientid: str) -> str:
    """The "refused" notice about ``clientid``'s device in ALICE's Maildir (written by a
    thread after the 535: polled)."""
    mark = fingerprint_of(server, f"UUID {clientid}")

    def notice() -> str | None:
        for message in server.messages(ALICE):
            body = message.get_payload(decode=True)
            if message["Subject"] == PENDING_SUBJECT and mark.encode() in body:
                assert isinstance(body, bytes)  # a single-part notice
                return str(body.decode())
        return None

    return wait_until(notice, 10, f"the pending notice for {mark}", interval=0.05)


def test_first_thunderbird_is_trusted_and_sends_clientid_over_starttls(
    tb_server: ServerProcess, laptop: tuple[Thunderbird, SendResult]
) -> None:
    thunderbird, first = laptop
    assert_sent(thunderbird, first)
    assert "first from the laptop" in subjects(tb_server)
    assert state_of(tb_server, LAPTOP) == "trusted"
    # After the TLS EHLO, before AUTH, as the draft asks.
    log = thunderbird.log()
    order = [log.index(f'"C: {cmd}') for cmd in ("STARTTLS", "CLIENTID UUID", "AUTH")]
    assert order == sorted(order), log
    assert wire_lines(thunderbird, "CLIENTID") == [f"CLIENTID UUID {LAPTOP}"]


def test_thunderbird_over_implicit_tls(
    tb_server: ServerProcess, laptop: tuple[Thunderbird, SendResult]
) -> None:
    thunderbird, _ = laptop
    smtp1 = "mail.smtpserver.smtp1."
    thunderbird.set_prefs({smtp1 + "port": tb_server.tls_port, smtp1 + "try_ssl": IMPLICIT_TLS})
    try:
        assert_sent(thunderbird, send(thunderbird, "over implicit TLS"))
    finally:
        thunderbird.set_prefs({smtp1 + "port": tb_server.port, smtp1 + "try_ssl": STARTTLS})
    assert "over implicit TLS" in subjects(tb_server)
    assert wire_lines(thunderbird, "STARTTLS") == ["STARTTLS"]  # only the first send's
    assert state_of(tb_server, LAPTOP) == "trusted"


def test_second_thunderbird_refused_then_retry_after_device_approve_sends(
    tb_server: ServerProcess,
    laptop: tuple[Thunderbird, SendResult],
    start_thunderbird: StartThunderbird,
) -> None:
    """The user keeps the "Login ... failed" dialog open while the administrator
    approves the device, then presses Retry: Thunderbird logs in again in the same
    session, without resending CLIENTID, and the server takes it as the approved device."""
    phone = start_thunderbird("phone", PHONE, try_ssl=IMPLICIT_TLS)
    fingerprint = fingerprint_of(tb_server, f"UUID {PHONE}")

    def approve_while_the_dialog_is_open() -> None:
        assert state_of(tb_server, PHONE) == "pending"
        assert "from the phone" not in subjects(tb_server)
        notice = pending_notice(tb_server, PHONE)
        assert 'Thunderbird shows "Login to server ...\nfailed"' in notice  # what it showed
        approved = tb_server.cli("device", "approve", ALICE, fingerprint)
        assert approved.returncode == 0, approved.stderr

    result = phone.send_and_retry(
        ALICE, BOB, "from the phone", "from the phone.\n", approve_while_the_dialog_is_open
    )
    assert result.sent, explain(phone, result)
    [prompt] = result.dialogs
    assert_login_failed_prompt(prompt)
    assert "from the phone" in subjects(tb_server)
    assert state_of(tb_server, PHONE) == "trusted"
    assert wire_lines(phone, "CLIENTID") == [f"CLIENTID UUID {PHONE}"]  # once, before Retry
    assert len(wire_lines(phone, "AUTH PLAIN")) == 2  # refused, then the Retry


def test_approval_code_mailed_from_the_trusted_thunderbird_lets_a_third_in(
    tb_server: ServerProcess,
    laptop: tuple[Thunderbird, SendResult],
    start_thunderbird: StartThunderbird,
) -> None:
    laptop_tb, _ = laptop
    tablet = start_thunderbird("tablet", TABLET)
    assert_refused(tablet, send(tablet, "from the tablet, refused"))
    assert state_of(tb_server, TABLET) == "pending"
    [code] = CODE.findall(pending_notice(tb_server, TABLET))

    assert_sent(laptop_tb, send(laptop_tb, f"Approve {code}", to=APPROVAL))
    assert state_of(tb_server, TABLET) == "trusted"
    assert_sent(tablet, send(tablet, "from the tablet, approved"))
    assert "from the tablet, approved" in subjects(tb_server)
    assert tb_server.messages(APPROVAL) == []  # the approval message is not stored


def test_clientid_enabled_without_a_clientid_sends_none(
    tb_server: ServerProcess,
    laptop: tuple[Thunderbird, SendResult],
    start_thunderbird: StartThunderbird,
) -> None:
    """Only ``clientidEnabled``, no ``clientid``: Thunderbird sends no CLIENTID, so the
    server sees a mail program without a device identity; under tofu with
    ``allow_without_clientid`` (the default) the password alone lets it in, and no device
    is recorded."""
    before = devices(tb_server.cli("device", "list", ALICE).stdout)
    no_uuid = start_thunderbird("no-uuid", None)
    assert_sent(no_uuid, send(no_uuid, "without a client identity"))
    assert wire_lines(no_uuid, "CLIENTID") == []
    assert wire_lines(no_uuid, "AUTH")  # it did log in
    assert "without a client identity" in subjects(tb_server)
    assert devices(tb_server.cli("device", "list", ALICE).stdout).keys() == before.keys()
    audit = tb_server.cli("audit", "--account", ALICE).stdout
    assert "no_clientid_allowed" in audit, audit
